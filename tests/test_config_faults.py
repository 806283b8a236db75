"""Bad experiments through `python -m dvlx.fit`: one error line naming the key or file, exit code 2, no
traceback, for every kind of mistake (table-driven)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_trajectory_data import _write_set

from dvlx.backbone import DreamVL, preset_config
from dvlx.fit import main
from dvlx.processing import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "experiments" / "tiny_vl_pretrain.yaml"
VLA = REPO / "experiments" / "tiny_vla_flow_matching.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trajectory set with chunks of max_horizon 4, a checkpoint folder that lacks one tensor, a cut
    checkpoint file and experiment files with a misspelt key and a wrongly typed value."""
    root = tmp_path_factory.mktemp("faults")
    _write_set(root / "traj", [5, 5, 5], max_horizon=4)
    tokenizer = build_tiny_tokenizer()
    model = DreamVL(preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids()))
    folder = root / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors.pop("lm_head.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    cut = root / "cut.ckpt"
    cut.write_bytes(b"PK\x03\x04 not the rest of a checkpoint")
    typo = root / "typo.yaml"
    typo.write_text(f"extends: {PRETRAIN}\ntrainer:\n  max_step: 3\n")
    wrong_type = root / "wrong_type.yaml"
    wrong_type.write_text(f"extends: {PRETRAIN}\ndata:\n  batch_size: [4]\n")
    return {"traj": root / "traj", "checkpoint": folder, "cut": cut, "root": root, "typo": typo,
            "wrong_type": wrong_type, "nope": root / "nope"}


def vla(files: dict[str, Path], *extra: str) -> list[str]:
    return [str(VLA), "data.synthetic=null", f"data.train={files['traj']}", "data.val_episodes=1", *extra]


# (id, arguments, texts the error line must contain)
CASES = [
    ("unknown-key", lambda f: [str(PRETRAIN), "data.bach_size=3"],
     ["command line: unknown key 'data.bach_size' (did you mean 'batch_size'?)"]),
    ("unknown-key-in-file", lambda f: [str(f["typo"])],
     ["typo.yaml: unknown key 'trainer.max_step' (did you mean 'max_steps'?)"]),
    ("wrong-type", lambda f: [str(PRETRAIN), "trainer.max_steps=many"], ["key 'trainer.max_steps'"]),
    ("wrong-type-in-file", lambda f: [str(f["wrong_type"])], ["wrong_type.yaml", "key 'data.batch_size'"]),
    ("missing-data-path", lambda f: [str(PRETRAIN), "data.synthetic=null", f"data.train={f['nope']}"],
     ["key 'data.train'", "nope does not exist"]),
    ("missing-trajectory-path", lambda f: vla(f, f"data.train={f['nope']}"),
     ["key 'data.datasets'", "nope does not exist"]),
    ("chunk-above-max-horizon", lambda f: vla(f, "data.horizon=6"),
     ["key 'data.horizon' is 6", "traj stores chunks of max_horizon 4"]),
    ("objective-misspelt", lambda f: vla(f, "objective.name=flow_matchng"),
     ["key 'objective.name': 'flow_matchng' is not one of", "(did you mean 'flow_matching'?)"]),
    ("checkpoint-missing-parameters", lambda f: [str(PRETRAIN), f"backbone.pretrained={f['checkpoint']}"],
     ["key 'backbone.pretrained'", "checkpoint", "1 missing", "lm_head.weight"]),
    ("checkpoint-folder-absent", lambda f: [str(PRETRAIN), f"backbone.pretrained={f['root'] / 'none'}"],
     ["key 'backbone.tokenizer'", "none"]),
    ("init-checkpoint-cut", lambda f: [str(PRETRAIN), f"backbone.init_checkpoint={f['cut']}"],
     ["key 'backbone.init_checkpoint'", "cut.ckpt is not a readable checkpoint"]),
    ("nonfinite-limit", lambda f: [str(PRETRAIN), "trainer.max_consecutive_nonfinite=0"],
     ["key 'trainer.max_consecutive_nonfinite': must be positive"]),
    ("fault-fraction", lambda f: [str(PRETRAIN), "data.max_fault_fraction=2"],
     ["key 'data.max_fault_fraction'"]),
    ("lora-outside-vla", lambda f: [str(PRETRAIN), "lora.rank=8"],
     ["key 'lora.rank': LoRA adapters are built by stage 'vla' only"]),
]


@pytest.mark.parametrize(("arguments", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_with_exit_code_2(
    files, tmp_path: Path, capsys: pytest.CaptureFixture, arguments, expected: list[str], one_thread
) -> None:
    argv = [*arguments(files), f"output_dir={tmp_path / 'runs'}", "trainer.progress_bar=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], errors[0]
    assert "Traceback" not in err
