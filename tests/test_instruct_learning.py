"""End to end learning through `dvlx.fit.main` and `dvlx.eval vl`: tiny pre-training on captions, then
instruction tuning on VQA. Held-out answers generated in 4 denoising steps beat chance (the most frequent
answer of each question type) by a wide margin, while the same recipe on grey images (the text-only control)
does no better than one fixed answer per question type. A shortened `tiny_vl_instruct` recipe;
docs/results.md has the full one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_modules.synthetic import score_by_question_type
from dvlx.eval import vl
from dvlx.fit import main

REPO = Path(__file__).resolve().parents[1]
NUM_VAL = 96

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(experiment: str, output: Path, *overrides: str) -> None:
    common = [f"output_dir={output}", "data.num_workers=1", "trainer.progress_bar=false"]
    assert main([str(REPO / "experiments" / experiment), *common, *overrides]) == 0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    _run("tiny_vl_pretrain.yaml", root / "runs", f"data.synthetic_dir={root / 'captions'}",
         "data.synthetic.num_train=2000", "data.synthetic.num_val=32", "trainer.max_steps=1000",
         "trainer.val_every_n_steps=1000", "trainer.checkpoint_every_n_steps=1000")
    return root / "runs" / "tiny_vl_pretrain" / "default" / "export"


def _instruct_and_score(pretrained: Path, root: Path, kind: str, steps: int) -> dict[str, dict]:
    data = root / kind
    _run("tiny_vl_instruct.yaml", root / "runs", f"backbone.pretrained={pretrained}",
         f"data.synthetic_dir={data}", f"data.synthetic.kind={kind}", "data.synthetic.num_train=3000",
         f"data.synthetic.num_val={NUM_VAL}", f"trainer.max_steps={steps}",
         f"trainer.val_every_n_steps={steps}", f"trainer.checkpoint_every_n_steps={steps}",
         "stage.generation.enabled=false")
    report = root / "eval.json"
    model = root / "runs" / "tiny_vl_instruct" / "default" / "export"
    argv = ["--model", str(model), "--data", str(data / "val"), "--steps", "4", "--max-new-tokens", "4"]
    assert vl.main([*argv, "--out", str(report)]) == 0
    rows = score_by_question_type(json.loads(report.read_text()), data / "train")
    assert rows["all"]["n"] == NUM_VAL and 0.2 < rows["all"]["chance"] < 0.4, rows
    return rows


def test_instruct_answers_held_out_questions_from_the_image(pretrained: Path, tmp_path: Path) -> None:
    # Measured: 0.73 against a chance of 0.28 (colour 0.60 against 0.15); the full recipe reaches 0.86.
    rows = _instruct_and_score(pretrained, tmp_path, "vqa", steps=2000)
    assert rows["all"]["exact_match"] > rows["all"]["chance"] + 0.3, rows
    # Localised questions beat chance too, not only the count: a colour question names a quadrant.
    assert rows["colour"]["exact_match"] > rows["colour"]["chance"] + 0.25, rows


def test_text_only_control_does_no_better_than_one_fixed_answer(pretrained: Path, tmp_path: Path) -> None:
    # Enough steps to learn one answer per question type, which is all grey images allow. Which answer it
    # settles on among near-equally frequent ones is luck, so the bound is the best constant answer per type
    # on the held-out set itself (0.385 here, against 0.281 for the training majority).
    rows = _instruct_and_score(pretrained, tmp_path, "vqa-blank", steps=600)
    assert rows["all"]["exact_match"] <= rows["all"]["best_constant"] + 0.05, rows
    assert rows["all"]["exact_match"] < rows["all"]["chance"] + 0.15, rows
