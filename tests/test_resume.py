"""Exact resume: the data position of the streaming DataModules, and a run killed with SIGKILL that continues
with `--resume` exactly as if it had never stopped."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_image_text_data import _captions, _faulty_set, _numbered_set
from test_trajectory_data import _ids, _write_set

from data_modules.faults import FaultTally
from data_modules.image_text import ImageTextDataModule
from data_modules.resume import POSITION_KEY, StreamPositions, TarSampleIndex, reservoir_order, skip_reservoir
from data_modules.shards import ShardWriter, iter_shard_samples
from data_modules.trajectory import TrajectoryDataModule
from dvlx.processing import ImageProcessor, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIDE = 56


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)


# ---- the pieces ------------------------------------------------------------------------------------------


def _buffer_shuffle(items: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """A plain shuffle buffer, written out: the behaviour `reservoir_order` must reproduce."""
    buffer: list[int] = []
    out = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        out.append(buffer[j])
        buffer[j] = item
    out.extend(buffer[int(j)] for j in rng.permutation(len(buffer)))
    return out


@pytest.mark.parametrize(("num", "size"), [(0, 4), (3, 8), (8, 8), (9, 8), (200, 16), (50, 1)])
def test_reservoir_order_is_the_shuffle_buffer(num: int, size: int) -> None:
    expected = list(range(num))
    if size > 1:
        expected = _buffer_shuffle(expected, size, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    assert reservoir_order(num, size, rng).tolist() == expected
    skipped = np.random.default_rng(7)
    skip_reservoir(num, size, skipped)
    assert rng.integers(10**9) == skipped.integers(10**9)  # the same draws were consumed


def test_tar_index_reads_what_the_stream_reads(tmp_path: Path) -> None:
    path = tmp_path / "odd.tar"
    members = [("a", "json"), ("a", "img0.png"), ("b", "json"), ("b", "json"), ("c", "json"), ("a", "cls"),
               ("__meta__", "json"), ("d", "json"), ("d", "img0.png")]
    with tarfile.open(path, "w") as tar:
        for i, (key, ext) in enumerate(members):
            data = f"{key}.{ext}#{i}".encode() * (i + 1)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut, cut_between = tmp_path / "cut.tar", tmp_path / "cut_between.tar"
    raw = path.read_bytes()
    data_offsets = [m.offset_data for m in tarfile.open(path).getmembers()]
    # Cut inside the last sample's second file, and inside its first (the sample before stays complete).
    for target, size in ((path, len(raw)), (cut_between, data_offsets[-2] + 3), (cut, data_offsets[-1] + 3)):
        target.write_bytes(raw[:size])
        streamed = []
        try:
            streamed.extend(iter_shard_samples(str(target)))
        except Exception:  # the cut tar raises after its complete samples
            pass
        index = TarSampleIndex(str(target))
        assert len(index) == len(streamed)
        assert list(index.read(range(len(streamed) + 1))) == [*streamed, None]
    assert [s.get("__bad__") is not None for s in streamed] == [False, True, False, True]


def _round_robin(stream, num_workers: int) -> list[dict]:
    """What a DataLoader with `num_workers` workers yields: workers 0, 1, ... in turn until each ends."""
    iterators = [stream.iter_worker(w, num_workers) for w in range(num_workers)]
    out: list[dict] = []
    live = list(range(num_workers))
    while live:
        for w in list(live):
            try:
                out.append(next(iterators[w]))
            except StopIteration:
                live.remove(w)
    return out


def _resumed(make_stream, full: list[dict], consumed: int, num_workers: int) -> list[dict]:
    """The batches after the first `consumed` of `full`, from a fresh stream told only their positions."""
    positions = StreamPositions()
    for batch in full[:consumed]:
        positions.record(batch[POSITION_KEY])
    loaded = StreamPositions()
    loaded.load_state_dict(positions.state_dict(0, 1, num_workers))
    stream = make_stream()
    stream.resume = loaded.resume(stream.epoch, 0, 1, num_workers)
    return _round_robin(stream, num_workers)


def _image_text_stream(path: Path, tokenizer, processor, **kwargs):
    """The epoch-1 training stream of an image-text set (batch 2, workers simulated by `_round_robin`)."""
    dm = ImageTextDataModule(train=str(path), tokenizer=tokenizer, image_processor=processor, batch_size=2,
                             num_workers=0, **kwargs)
    dm.setup()
    stream = dm.train_dataloader().dataset
    stream.set_epoch(1)
    return stream


@pytest.mark.parametrize("grouping", [0, 3])
def test_faults_are_counted_once_across_a_resume(tmp_path, tokenizer, processor, grouping: int) -> None:
    """Bad samples, a truncated shard included, count the same whether or not the run was resumed between."""
    _faulty_set(str(tmp_path), tokenizer)
    num_workers = 2

    def make_stream():
        return _image_text_stream(tmp_path, tokenizer, processor, shuffle_buffer=4, length_grouping=grouping,
                                  max_length=64, fault_min_samples=1000)

    def totals(batches: list[dict]) -> dict[str, int]:
        tally = FaultTally()
        for batch in batches:
            tally.add(batch["faults"])
        return tally.as_dict()

    full = _round_robin(make_stream(), num_workers)
    expected = totals(full)
    # Each of the five faults at least once (a worker that runs dry wraps around and may meet one again).
    assert all(expected[kind] >= 1 for kind in ("truncated_tar", "corrupt_image", "missing_key", "bad_record",
                                                 "too_long")), expected
    for consumed in range(1, len(full)):
        rest = _resumed(make_stream, full, consumed, num_workers)
        assert totals(full[:consumed] + rest) == expected, consumed


@pytest.mark.parametrize("grouping", [0, 3])
def test_image_text_stream_resumes_after_any_batch(tmp_path, tokenizer, processor, grouping: int) -> None:
    _numbered_set(tmp_path, 45, per_shard=7)
    num_workers = 3

    def make_stream():
        return _image_text_stream(tmp_path, tokenizer, processor, shuffle_buffer=6, length_grouping=grouping)

    full = _round_robin(make_stream(), num_workers)
    assert len(full) == 22
    captions = [_captions(b, tokenizer) for b in full]
    for consumed in range(1, len(full)):
        rest = _resumed(make_stream, full, consumed, num_workers)
        assert [_captions(b, tokenizer) for b in rest] == captions[consumed:], consumed


def test_trajectory_stream_resumes_after_any_batch(tmp_path, tokenizer, processor) -> None:
    # Dataset a: one slot per shard; b: one shard shared by the slots; augmentation on.
    _write_set(tmp_path / "a", [7, 5, 9, 6], per_shard=4, name="a")
    _write_set(tmp_path / "b", [5, 6], base=100_000, per_shard=100, name="b", seed=1)
    num_workers = 3

    def make_stream():
        dm = TrajectoryDataModule(
            datasets=[str(tmp_path / "a"), str(tmp_path / "b")],
            tokenizer=tokenizer,
            image_processor=processor,
            horizon=3, batch_size=2, num_workers=0, image_size=SIDE, augment=True, shuffle_buffer=5,
            val_episodes=1,
        )
        dm.setup()
        stream = dm.train_dataloader().dataset
        stream.set_epoch(2)
        return stream

    full = _round_robin(make_stream(), num_workers)
    assert len(full) == 13
    for consumed in range(1, len(full)):
        rest = _resumed(make_stream, full, consumed, num_workers)
        assert len(rest) == len(full) - consumed
        for got, want in zip(rest, full[consumed:], strict=True):
            assert _ids(got) == _ids(want), consumed
            assert torch.equal(got["pixel_values"], want["pixel_values"]), consumed


def test_real_loader_follows_the_round_robin_and_resumes(tmp_path, tokenizer, processor) -> None:
    """Worker processes yield in turn; a loader given a saved state rotates its workers to continue."""
    _numbered_set(tmp_path, 30, per_shard=4)

    def module():
        dm = ImageTextDataModule(
            train=str(tmp_path), tokenizer=tokenizer, image_processor=processor, batch_size=2, num_workers=2,
            shuffle_buffer=5,
        )
        dm.setup()
        return dm

    dm = module()
    loader = dm.train_dataloader()
    full = list(loader)
    assert [_captions(b, tokenizer) for b in full] == [
        _captions(b, tokenizer) for b in _round_robin(loader.dataset, 2)
    ]
    for batch in full[:5]:
        assert POSITION_KEY not in dm.on_before_batch_transfer(dict(batch), 0)
    assert dm.positions.epoch is None  # no trainer, nothing trained: nothing recorded
    for batch in full[:5]:
        dm.positions.record(batch[POSITION_KEY])
    state = loader.state_dict()
    assert state["batches"] == 5 and state["num_workers"] == 2
    again = module()
    resumed_loader = again.train_dataloader()
    resumed_loader.load_state_dict(state)
    rest = list(resumed_loader)
    assert [_captions(b, tokenizer) for b in rest] == [_captions(b, tokenizer) for b in full[5:]]
    # Once a resumed batch has been trained on, a new iteration starts its epoch afresh.
    again.positions.record(rest[0][POSITION_KEY])
    assert len(list(resumed_loader)) == len(full)


# ---- a run killed with SIGKILL -----------------------------------------------------------------------------


def _experiment(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"""extends: {REPO / "experiments" / "tiny_vl_pretrain.yaml"}
processor:
  min_pixels: {SIDE * SIDE}
  max_pixels: {SIDE * SIDE}
data:
  synthetic:
    num_train: 40
    num_val: 8
    image_size: {SIDE}
  synthetic_dir: {tmp_path / "data"}
  batch_size: 4
  num_workers: 2
  shuffle_buffer: 16
  max_length: 48
trainer:
  max_steps: 8
  accumulate_grad_batches: 3
  val_every_n_steps: 3
  checkpoint_every_n_steps: 1
  log_every_n_steps: 1
  progress_bar: false
optim:
  warmup_steps: 2
  schedule: cosine
"""
    )
    return path


def _losses(run_dir: Path) -> dict[int, set[str]]:
    """Logged training losses by step, over every start of the run (text, so equality is bitwise)."""
    out: dict[int, set[str]] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    out.setdefault(int(row["step"]), set()).add(row["train/loss"])
    return out


def test_killed_sweep_resumes_exactly(tmp_path: Path) -> None:
    """A sweep of two variants that differ only in name: 40 samples, batch 4, 2 workers, shuffling,
    accumulation 3 (4 steps per epoch), warm-up + cosine, a validation every 3 steps. Killed with SIGKILL at a
    random step of the second variant, with `last.ckpt` then cut in half, `--resume` skips the finished
    variant and continues the second so that it repeats the first bit for bit."""
    experiment = _experiment(tmp_path)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "dvlx.fit", str(experiment), f"output_dir={runs}", "--sweep",
               "variant=first,second"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    kill_step = random.Random().randint(1, 6)
    first, second = runs / "exp" / "variant-first", runs / "exp" / "variant-second"
    target = second / "checkpoints" / f"step-{kill_step:07d}.ckpt"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not target.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"run ended before step {kill_step}"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = second / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if last.exists() else b"PK\x03\x04")

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "variant-first: finished earlier" in resumed.stderr
    assert "last.ckpt is not a complete checkpoint" in resumed.stderr
    expected, got = _losses(first), _losses(second)
    assert sorted(expected) == list(range(8))
    assert set(got) >= set(range(kill_step, 8)), (kill_step, sorted(got))
    mismatched = {s: (got[s], expected[s]) for s in got if got[s] != expected[s]}
    assert not mismatched, f"killed at step {kill_step}: {mismatched}"
    final = torch.load(last, weights_only=True)
    want = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == want["global_step"] == 8
    for name, tensor in want["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), (kill_step, name)
    assert not list(second.glob("checkpoints/.*tmp*"))
    assert "| variant-second | 8 |" in (runs / "exp" / "sweep.md").read_text()


def test_finished_epoch_checkpoint_starts_the_next_epoch(tmp_path, tokenizer, processor) -> None:
    """A checkpoint saved on an epoch's last batch resumes into the next epoch's data, not an empty one."""
    _numbered_set(tmp_path, 12, per_shard=4)
    dm = ImageTextDataModule(train=str(tmp_path), tokenizer=tokenizer, image_processor=processor,
                             batch_size=2, num_workers=0, shuffle_buffer=4)
    dm.setup()
    loader = dm.train_dataloader()
    epoch0 = list(loader)
    for batch in epoch0:
        dm.positions.record(batch[POSITION_KEY])
    state = loader.state_dict()
    dm.set_epoch(1)
    epoch1 = [_captions(b, tokenizer) for b in loader]
    fresh = ImageTextDataModule(train=str(tmp_path), tokenizer=tokenizer, image_processor=processor,
                                batch_size=2, num_workers=0, shuffle_buffer=4)
    fresh.setup()
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)  # the restored trainer still says epoch 0 when the loader starts
    assert [_captions(b, tokenizer) for b in resumed] == epoch1


def test_changed_worker_count_restarts_the_epoch(tmp_path, tokenizer, processor, caplog) -> None:
    _numbered_set(tmp_path, 12, per_shard=4)
    positions = StreamPositions()
    positions.record({"epoch": 0, "slot": 0, "batches": 1, "position": 2, "skip": 0})
    state = positions.state_dict(0, 1, 2)
    loaded = StreamPositions()
    loaded.load_state_dict(state)
    with caplog.at_level("WARNING"):
        assert loaded.resume(0, 0, 1, 3) is None
    assert "data.num_workers" in caplog.text
    assert loaded.resume(1, 0, 1, 2) is None  # another epoch: nothing to resume
    assert loaded.resume(0, 0, 1, 2).start(1, 2) == (0, {"batches": 1, "position": 2, "skip": 0})


def test_shard_writer_counts_drive_the_references(tmp_path, tokenizer, processor) -> None:
    """References come from meta.json: a shard cut short yields None for its missing samples, in place."""
    with ShardWriter(tmp_path, max_samples_per_shard=100) as writer:
        for i in range(6):
            writer.write(f"k{i}", {"json": b"{}"})
    shard = tmp_path / "train-000000.tar"
    members = tarfile.open(shard).getmembers()
    shard.write_bytes(shard.read_bytes()[: members[3].offset_data + 1])
    dm = ImageTextDataModule(train=str(tmp_path), tokenizer=tokenizer, image_processor=processor,
                             batch_size=1, num_workers=0, shuffle_buffer=0)
    dm.setup()
    stream = dm.train_dataloader().dataset
    assert stream.slot_references(0, 1).tolist() == [[0, i] for i in range(6)]
    from data_modules.faults import FaultCounter

    items = stream._train_samples(0, 1, FaultCounter(min_samples=1000), 0)
    keys = [None if s is None else s["__key__"] for s in (next(items) for _ in range(6))]
    assert keys == ["k0", "k1", "k2", None, None, None]
