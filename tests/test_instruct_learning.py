"""End to end learning: tiny pre-training on captions, instruction tuning on VQA through `dvlx.fit.main`, then
generation on held-out questions (`dvlx.eval vl`) beats chance, the most frequent answer of each question
type, by a clear margin. A shortened `tiny_vl_instruct` recipe; docs/generation.md has the full one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_modules.synthetic import score_by_question_type
from dvlx.eval import vl
from dvlx.fit import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(experiment: str, tmp_path: Path, *overrides: str) -> None:
    common = [f"output_dir={tmp_path / 'runs'}", "data.num_workers=1", "trainer.progress_bar=false"]
    assert main([str(REPO / "experiments" / experiment), *common, *overrides]) == 0


def test_instruct_answers_held_out_questions_from_the_image(tmp_path: Path) -> None:
    _run(
        "tiny_vl_pretrain.yaml",
        tmp_path,
        f"data.synthetic_dir={tmp_path / 'captions'}",
        "data.synthetic.num_train=1000",
        "data.synthetic.num_val=32",
        "trainer.max_steps=300",
        "trainer.val_every_n_steps=300",
        "trainer.checkpoint_every_n_steps=300",
    )
    export = tmp_path / "runs" / "tiny_vl_pretrain" / "default" / "export"
    vqa = tmp_path / "vqa"
    _run(
        "tiny_vl_instruct.yaml",
        tmp_path,
        f"backbone.pretrained={export}",
        f"data.synthetic_dir={vqa}",
        "data.synthetic.num_train=1500",
        "data.synthetic.num_val=96",
        "trainer.max_steps=300",
        "trainer.val_every_n_steps=300",
        "trainer.checkpoint_every_n_steps=300",
        "stage.generation.enabled=false",
    )
    report = tmp_path / "eval.json"
    model = tmp_path / "runs" / "tiny_vl_instruct" / "default" / "export"
    argv = ["--model", str(model), "--data", str(vqa / "val"), "--steps", "4", "--max-new-tokens", "4"]
    assert vl.main([*argv, "--out", str(report)]) == 0
    rows = score_by_question_type(json.loads(report.read_text()), vqa / "train")
    overall = rows["all"]
    assert overall["n"] == 96
    assert 0.2 < overall["chance"] < 0.4, rows
    assert overall["exact_match"] > overall["chance"] + 0.2, rows
