# Quick start: `make demo` (robot demonstrations -> tiny Dream-VLA -> closed-loop success rate) and
# `make test` (the test suite).
# Both create or update the virtual environment in .venv first. torch is pinned through constraints.txt
# so pip never swaps in another build; set PIP_TORCH_ARGS (e.g. an --index-url of CPU wheels) if your
# default index would give you a CUDA build you do not want.
PYTHON ?= python3.11
VENV ?= .venv
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.dvlx-installed

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(PIP_TORCH_ARGS) torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,sim,scale]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps robosuite==1.4.1 hf-libero==0.1.4 bddl==1.0.1
	touch $(STAMP)

demo: venv
	$(BIN)/python -m dvlx.fit experiments/tiny_vla_closed_loop.yaml variant=demo-$$(date +%Y%m%d-%H%M%S)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check dvlx data_modules callbacks tests

clean-venv:
	rm -rf $(VENV)
