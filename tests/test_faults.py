"""Fault injection: checkpoints cut short or interrupted, bad data, non-finite losses and gradients,
mismatched specs and statistics, unsafe run folders. Each fault is reported precisely, never silently."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_converters import _demo, _write_hdf5
from test_image_text_data import _conversation, _image
from test_trajectory_data import _write_set
from test_vla import export_policy

import dvlx.fit as fit
from callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    checkpoint_problem,
    find_resume_checkpoint,
    free_space_problem,
)
from callbacks.numerics import NonFiniteGuard, NonFiniteTrainingError
from data_modules.convert import main as convert_main
from data_modules.shards import ShardWriter, write_image_text_sample
from dvlx.export import stats_hash
from dvlx.fit import main
from dvlx.policy import Policy, SpecMismatchError, spec_differences
from dvlx.stages.base import DiffusionStage

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "experiments" / "tiny_vl_pretrain.yaml"
VLA = REPO / "experiments" / "tiny_vla_flow_matching.yaml"
SIDE = 56


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def tiny_pretrain(tmp_path: Path, train: Path, *extra: str) -> list[str]:
    return [
        str(PRETRAIN),
        f"output_dir={tmp_path / 'runs'}",
        "data.synthetic=null",
        f"data.train={train}",
        f"processor.min_pixels={SIDE * SIDE}",
        f"processor.max_pixels={SIDE * SIDE}",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.shuffle_buffer=8",
        "data.max_length=48",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=1",
        *extra,
    ]


def caption_set(directory: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    """n captioned images; `bad` maps sample index to a fault: `image` (cut PNG) or `json` (no json)."""
    bad = bad or {}
    with ShardWriter(directory, max_samples_per_shard=n) as writer:
        for i in range(n):
            if bad.get(i) == "image":
                cut = (b"\x89PNG cut", "png")
                write_image_text_sample(writer, f"k{i}", [cut], _conversation("x"), id=str(i))
            elif bad.get(i) == "json":
                writer.write(f"k{i}", {"img0.png": b"lonely"})
            else:
                write_image_text_sample(writer, f"k{i}", [_image(i)], _conversation(f"sample {i}"), id=str(i))
    return directory


def read_csv(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


# ---- 2. atomic checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_problems_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, good)
    assert checkpoint_problem(good) is None
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in checkpoint_problem(cut)
    cut_tail = tmp_path / "cut_tail.ckpt"
    cut_tail.write_bytes(data[:-10])
    assert "truncated" in checkpoint_problem(cut_tail)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "empty file"
    (tmp_path / "text.ckpt").write_text("hello")
    assert "not a torch checkpoint" in checkpoint_problem(tmp_path / "text.ckpt")
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / "rank0.pt").write_bytes(data)
    assert checkpoint_problem(sharded) is None
    (sharded / "rank1.pt").write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(sharded).startswith("rank1.pt: truncated")
    assert checkpoint_problem(tmp_path / "absent.ckpt").startswith("cannot read it")


def test_resume_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step}, folder / f"step-{step:07d}.ckpt")
        time.sleep(0.01)
    io.save_checkpoint({"global_step": 3}, folder / "last.ckpt")
    assert find_resume_checkpoint(folder) == (folder / "last.ckpt", [])
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    (folder / f".last.ckpt.tmp-{2**22 + 12345}").write_bytes(b"left by a killed writer")
    found, rejected = find_resume_checkpoint(folder)
    assert found == folder / "step-0000003.ckpt"
    assert [(p.name, "truncated" in why) for p, why in rejected] == [("last.ckpt", True)]
    assert not list(folder.glob(".*tmp*"))  # the dead writer's temporary file is gone
    for path in folder.glob("step-*.ckpt"):
        path.write_bytes(b"")
    assert find_resume_checkpoint(folder)[0] is None


def test_killed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(10)}, last)
    before = last.read_bytes()
    script = (
        "import sys, torch\n"
        "from callbacks.checkpoint_io import AtomicCheckpointIO\n"
        "AtomicCheckpointIO().save_checkpoint({'global_step': 2, 'w': torch.ones(2**25)}, sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script, str(last)], env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.ckpt.tmp-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the writer finished or never started"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.read_bytes() == before
    assert find_resume_checkpoint(tmp_path) == (last, [])
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_resume_refuses_when_no_checkpoint_is_complete(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "runs" / "tiny_vl_pretrain" / "default"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04")
    assert main([*tiny_pretrain(tmp_path, tmp_path / "none"), "--resume"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "last.ckpt: --resume found no complete checkpoint (truncated" in line


# ---- 7. run folder safety ----------------------------------------------------------------------------------


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "runs" / "tiny_vl_pretrain" / "default"
    (run_dir / "checkpoints").mkdir(parents=True)
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, run_dir / "checkpoints" / "last.ckpt")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert main(tiny_pretrain(tmp_path, tmp_path / "none")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(run_dir) in line and "already holds a run" in line and "--resume" in line
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_is_refused_before_training(tmp_path: Path, capsys, where: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    output = blocker / "runs" if where == "under-a-file" else Path("/proc/dvlx-runs")
    argv = [*tiny_pretrain(tmp_path, caption_set(tmp_path / "data", 8)), f"output_dir={output}"]
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{output}/tiny_vl_pretrain/default: output folder is not writable" in line


def test_full_output_location_is_refused_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    assert free_space_problem(tmp_path, 1) is None
    assert "GiB free, about" in free_space_problem(tmp_path / "not" / "yet", 1 << 62)
    # A checkpoint larger than any disk: the check runs once the model is built, before any step.
    monkeypatch.setattr("callbacks.checkpoint_io.estimate_checkpoint_bytes", lambda module: 1 << 61)
    assert main(tiny_pretrain(tmp_path, caption_set(tmp_path / "data", 8))) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "output location is too full for checkpoints" in line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


# ---- 3. data faults ----------------------------------------------------------------------------------------


def test_data_faults_are_counted_logged_and_in_tensorboard(tmp_path: Path, caplog, one_thread) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = caption_set(tmp_path / "data", 40, {3: "image", 17: "image", 25: "json"})
    with caplog.at_level(logging.INFO, logger="dvlx.data"):
        argv = tiny_pretrain(tmp_path, train, "trainer.max_steps=12", "trainer.val_every_n_steps=100")
        assert main(argv) == 0
    run_dir = tmp_path / "runs" / "tiny_vl_pretrain" / "default"
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    scalars = events.Tags()["scalars"]
    assert "data/skipped_corrupt_image" in scalars and "data/skipped_missing_key" in scalars
    # 12 steps of 4 = 48 samples: a first pass over 40 and part of a second.
    assert events.Scalars("data/skipped_corrupt_image")[-1].value >= 2
    assert events.Scalars("data/skipped_missing_key")[-1].value >= 1
    report = [r.getMessage() for r in caplog.records if "run total training data" in r.getMessage()]
    assert report and "corrupt_image" in report[0] and "missing_key" in report[0]


def test_too_many_bad_samples_stop_the_run_naming_the_shard(tmp_path: Path, capsys, one_thread) -> None:
    train = caption_set(tmp_path / "data", 60, {i: "image" for i in range(0, 60, 2)})
    assert main(tiny_pretrain(tmp_path, train, "trainer.max_steps=30", "data.max_fault_fraction=0.2")) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "too many bad samples" in line and "train-000000.tar" in line and "max_fault_fraction" in line
    assert "Traceback" not in line


def test_converter_names_file_and_episode_of_non_finite_values(tmp_path: Path, caplog) -> None:
    nan_proprio = _demo(8, {}, seed=1)
    nan_proprio["obs/ee_states"][5, 1] = np.nan
    inf_action = _demo(8, {}, seed=2)
    inf_action["actions"][2, 0] = np.inf
    path = str(tmp_path / "libero_10" / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5")
    _write_hdf5(path, {"demo_0": _demo(8, {}, seed=0), "demo_1": nan_proprio, "demo_2": inf_action})
    with caplog.at_level(logging.WARNING):
        assert convert_main(["libero", "--hdf5", path, "--out", str(tmp_path / "out"), "--keep-noops"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path in m and "demo_1" in m and "nan_value" in m and "proprio" in m for m in warnings)
    assert any(path in m and "demo_2" in m and "nan_value" in m and "actions" in m for m in warnings)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_episodes"] == 1


# ---- 4. numerical faults -----------------------------------------------------------------------------------


class Regression(L.LightningModule):
    """y = 2x with SGD; the loss of the steps in `nan_loss` is NaN and one gradient of `inf_grad` is inf."""

    def __init__(self, nan_loss=(), inf_grad=()) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.nan_loss, self.inf_grad = set(nan_loss), set(inf_grad)
        self.weights: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.layer(x) - y) ** 2).mean()
        return loss * float("nan") if self.trainer.global_step in self.nan_loss else loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.inf_grad:
            self.layer.weight.grad[0, 0] = float("inf")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.weights[self.trainer.global_step] = self.layer.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def regression_trainer(tmp_path: Path, guard: NonFiniteGuard, steps: int) -> tuple[L.Trainer, object]:
    x = torch.linspace(-1, 1, 16)[:, None]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 2 * x), batch_size=4)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[guard],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return trainer, loader


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    model = Regression(nan_loss={1}, inf_grad={3, 5})
    trainer, loader = regression_trainer(tmp_path, guard, 8)
    trainer.fit(model, loader)
    assert guard.skipped == 3 and guard.consecutive == 0
    for step in (1, 3, 5):  # no update, and AdamW's moments untouched: the next step starts from the same
        assert torch.equal(model.weights[step + 1], model.weights[step]), step
    for step in (0, 2, 4, 6):
        assert not torch.equal(model.weights[step + 1], model.weights[step]), step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [r for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if r.get("step")]
    logged = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert logged[-1] == 3 and logged[0] == 0


def test_consecutive_non_finite_steps_stop_training(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    model = Regression(nan_loss={2, 3, 4})
    trainer, loader = regression_trainer(tmp_path, guard, 8)
    with pytest.raises(NonFiniteTrainingError, match="2 optimiser steps in a row"):
        trainer.fit(model, loader)
    assert torch.isfinite(model.layer.weight).all() and torch.equal(model.layer.weight, model.weights[2])


def test_non_finite_run_stops_with_clean_checkpoints(tmp_path: Path, capsys, monkeypatch, one_thread) -> None:
    original = DiffusionStage.training_step

    def diverging(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step >= 2 else loss

    monkeypatch.setattr(DiffusionStage, "training_step", diverging)
    train = caption_set(tmp_path / "data", 24)
    argv = tiny_pretrain(tmp_path, train, "trainer.max_steps=10", "trainer.max_consecutive_nonfinite=3")
    assert main(argv) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "3 optimiser steps in a row had a non-finite loss or gradient" in line
    assert "trainer.max_consecutive_nonfinite 3" in line
    checkpoints = sorted((tmp_path / "runs" / "tiny_vl_pretrain" / "default").glob("*/*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt", "step-0000003.ckpt", "step-0000004.ckpt"]
    states = [torch.load(p, weights_only=True) for p in checkpoints]
    for state in states:
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
        moments = [v for s in state["optimizer_states"][0]["state"].values() for v in s.values()]
        assert all(torch.isfinite(m).all() for m in moments)
        assert state["callbacks"]["NonFiniteGuard"]["skipped"] >= 1
    # Steps 3 and 4 were skipped: the weights are those after step 2.
    for name, tensor in states[1]["state_dict"].items():
        assert torch.equal(states[2]["state_dict"][name], tensor), name


# ---- 6. statistics and spec mismatch -----------------------------------------------------------------------


def test_policy_refuses_another_spec_or_statistics(tmp_path: Path, caplog) -> None:
    _, folder, spec = export_policy(tmp_path)
    meta = json.loads((folder / "dvlx.json").read_text())
    assert meta["stats_hash"] == stats_hash(spec)
    policy = Policy.from_pretrained(folder, expected_spec=spec, expected_stats_hash=stats_hash(spec))
    assert policy.stats_hash == stats_hash(spec)

    other_stats = dataclasses.replace(spec.action_normalizer.stats, q99=[3.0, 10.0, 1.0])
    other = dataclasses.replace(
        spec, action_normalizer=dataclasses.replace(spec.action_normalizer, stats=other_stats)
    )
    with pytest.raises(SpecMismatchError, match=rf"stats_hash: trained '{stats_hash(spec)}', expected"):
        Policy.from_pretrained(folder, expected_spec=other)
    with pytest.raises(SpecMismatchError, match="stats_hash"):
        Policy.from_pretrained(folder, expected_stats_hash="0" * 16)
    with pytest.raises(SpecMismatchError, match=r"cameras: trained \[.*\], expected \['front'\]; action_dim"):
        policy.check_spec({"cameras": ["front"], "action_dim": spec.action_dim + 1})
    with pytest.raises(ValueError, match="unknown keys"):
        policy.check_spec({"camera": ["front"]})
    with caplog.at_level(logging.WARNING):
        differences = policy.check_spec({"proprio_dim": 9}, allow_mismatch=True)
    assert differences == [f"proprio_dim: trained {spec.proprio_dim}, expected 9"]
    assert "spec differences allowed" in caplog.text
    assert Policy.from_pretrained(folder, expected_spec=other, allow_spec_mismatch=True)
    assert spec_differences(spec, spec) == []

    # Statistics edited inside the export after training.
    stored = json.loads((folder / "action_spec.json").read_text())
    stored["action_normalizer"]["stats"]["q99"][0] = 5.0
    (folder / "action_spec.json").write_text(json.dumps(stored))
    meta.pop("action_spec_fingerprint")
    (folder / "dvlx.json").write_text(json.dumps(meta))
    with pytest.raises(SpecMismatchError, match="statistics hash .* differs from the one recorded at export"):
        Policy.from_pretrained(folder)


def test_vla_run_resumes_after_a_crash_and_refuses_changed_statistics(
    tmp_path: Path, capsys, monkeypatch, one_thread
) -> None:
    """A VLA run (trajectory mixture, augmentation, flow-matching noise, accumulation 2) that crashes between
    micro-batches resumes exactly; resuming after the data's statistics changed is refused."""
    _write_set(tmp_path / "a", [9, 7, 8, 6], per_shard=6, name="a")
    _write_set(tmp_path / "b", [8, 9], base=100_000, per_shard=100, name="b", seed=1)
    datasets = f"data.datasets=[{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'b'}, weight: 2.0}}]"
    base = [
        str(VLA),
        "data.synthetic=null",
        datasets,
        "data.horizon=3",
        f"data.image_size={SIDE}",
        f"processor.min_pixels={SIDE * SIDE}",
        f"processor.max_pixels={SIDE * SIDE}",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "data.val_episodes=1",
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "trainer.val_every_n_steps=4",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "stage.val_sample_batches=1",
        "optim.warmup_steps=2",
    ]
    assert main([*base, f"output_dir={tmp_path / 'reference'}"]) == 0

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step >= 3 and batch_idx % 2 == 1:  # between the micro-batches of a step
                raise RuntimeError("simulated crash")

    build_trainer = fit.build_trainer

    def crashing(cfg, tokenizer, image_processor):
        trainer = build_trainer(cfg, tokenizer, image_processor)
        trainer.callbacks.append(Crash())
        return trainer

    with monkeypatch.context() as patch:
        patch.setattr(fit, "build_trainer", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main([*base, f"output_dir={tmp_path / 'runs'}"])
    assert main([*base, f"output_dir={tmp_path / 'runs'}", "--resume"]) == 0

    def losses(root: Path) -> dict[str, str]:
        rows = read_csv(root / "tiny_vla_flow_matching" / "default")
        return {r["step"]: r["train/loss"] for r in rows if r.get("train/loss")}

    got, want = losses(tmp_path / "runs"), losses(tmp_path / "reference")
    assert {s: got[s] for s in ("3", "4", "5")} == {s: want[s] for s in ("3", "4", "5")}
    final = torch.load(tmp_path / "runs" / "tiny_vla_flow_matching" / "default" / "checkpoints" / "last.ckpt",
                       weights_only=True)
    reference = torch.load(
        tmp_path / "reference" / "tiny_vla_flow_matching" / "default" / "checkpoints" / "last.ckpt",
        weights_only=True,
    )
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name

    # New statistics under the same dataset (re-converted data, say): resuming is refused, naming them.
    meta_path = tmp_path / "b" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["stats"]["action"]["q99"] = [v + 1.0 for v in meta["stats"]["action"]["q99"]]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main([*base, f"output_dir={tmp_path / 'runs'}", "trainer.max_steps=8", "--resume"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "last.ckpt: the data's action spec differs from the checkpoint's" in line and "stats_hash" in line
