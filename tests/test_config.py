"""Experiment configs: inheritance, overrides, and one-line errors naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvlx.config import ConfigError, ExperimentConfig, load_config, to_yaml
from dvlx.fit import main, sweep_variants

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path / "base.yaml", "data:\n  train: shards\n  batch_size: 4\noptim:\n  lr: 0.01\n")


def test_extends_and_overrides(tmp_path: Path, base: Path) -> None:
    text = "extends: base.yaml\noptim:\n  lr: 0.5\ntrainer:\n  max_steps: 7\n"
    child = write(tmp_path / "child.yaml", text)
    cfg = load_config(child, ["data.batch_size=2", "trainer.devices=2"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "child"
    assert cfg.data.train == "shards"
    assert cfg.data.batch_size == 2
    assert cfg.optim.lr == 0.5
    assert cfg.trainer.max_steps == 7
    assert cfg.trainer.devices == 2
    assert cfg.run_dir == Path("runs/child/default")
    assert "batch_size: 2" in to_yaml(cfg)


BAD_CASES = [
    ("data:\n  bach_size: 3\n", [], "bad.yaml: unknown key 'data.bach_size' (did you mean 'batch_size'?)"),
    ("data:\n  batch_size: three\n", [], "bad.yaml: key 'data.batch_size'"),
    ("optim:\n  lr: 1\n", ["optim.lrr=2"], "command line: unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ("optim:\n  lr: 1\n", ["optim.lr=fast"], "command line: key 'optim.lr'"),
    ("optim:\n  lr: 1\n", ["optim.lr"], "command line: override 'optim.lr' is not of the form key=value"),
    ("backbone:\n  attention: ful\n", [], "key 'backbone.attention': 'ful' is not one of"),
    (
        "stage:\n  name: vl_pretrian\n",
        [],
        "key 'stage.name': 'vl_pretrian' is not one of ['vl_pretrain'] (did you mean 'vl_pretrain'?)",
    ),
    ("data:\n  batch_size: 0\n", [], "key 'data.batch_size': must be positive"),
    ("optim:\n  schedule: cosin\n", [], "did you mean 'cosine'?"),
    ("processor:\n  min_pixels: 100\n  max_pixels: 10\n", [], "key 'processor.max_pixels'"),
    ("extends: missing.yaml\n", [], "missing.yaml: experiment file not found"),
    ("- a\n- b\n", [], "expected a mapping at the top level"),
    ("data: [\n", [], "cannot parse YAML"),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), BAD_CASES)
def test_bad_config_one_line_error(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, stage_names=("vl_pretrain",))
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_missing_training_data_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "nodata.yaml", "optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="key 'data.train'"):
        load_config(path)


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_cli_errors_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path / "bad.yaml", "data:\n  train: x\n  bach_size: 3\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    assert main([str(tmp_path / "none.yaml")]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_missing_data_path_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = f"output_dir: {tmp_path / 'runs'}\ndata:\n  train: {tmp_path / 'nope'}\n"
    path = write(tmp_path / "exp.yaml", text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "key 'data.train'" in err and "does not exist" in err


def test_print_config(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(base), "optim.lr=0.25", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "name: base" in out


def test_sweep_variants() -> None:
    variants = sweep_variants(["optim.lr=0.1,0.2", "data.batch_size=4,8"])
    assert [name for name, _ in variants] == [
        "optim.lr-0.1_data.batch_size-4",
        "optim.lr-0.1_data.batch_size-8",
        "optim.lr-0.2_data.batch_size-4",
        "optim.lr-0.2_data.batch_size-8",
    ]
    assert variants[1][1] == ["optim.lr=0.1", "data.batch_size=8"]
    assert sweep_variants([]) == [("", [])]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_validates(path: Path) -> None:
    from dvlx.stages import STAGES

    cfg = load_config(path, stage_names=tuple(STAGES))
    assert cfg.name == path.stem
