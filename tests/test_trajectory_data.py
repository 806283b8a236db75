"""Trajectory data: shard writer, statistics, the streaming TrajectoryDataModule, mixtures, splits, faults."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.faults import FAULT_KINDS, FaultTally
from data_modules.shards import ShardWriter, iter_shard_samples, list_shards
from data_modules.stats import StatsAccumulator, compute_stats
from data_modules.stats import main as stats_main
from data_modules.trajectory import (
    TrajectoryDataModule,
    TrajectoryShardWriter,
    combine_stats,
    decode_npy,
    encode_npy,
    parse_step_key,
    read_trajectory_meta,
    validation_episodes,
)
from dvlx.processing import ArrayStats, ImageProcessor, build_tiny_tokenizer

IMAGE_SIDE = 56  # images are resized to 56x56 = 4x4 patches = 4 visual tokens per camera
CAMERAS = ("agent", "wrist")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE)


def _write_set(
    path,
    lengths,
    *,
    base=0,
    per_shard=5,
    action_dim=3,
    proprio_dim=2,
    max_horizon=4,
    cameras=CAMERAS,
    name="toy",
    image_format="png",
    seed=0,
    scale=1.0,
    shift=0.0,
):
    """A dataset whose action dim 0 is a unique frame id (base + 1000 * episode + step), not normalised, so
    every batch row can be traced back to its frame. Returns {episode index: (actions, proprio, images)}."""
    rng = np.random.default_rng(seed)
    episodes = {}
    mask = [False] + [True] * (action_dim - 1)
    with TrajectoryShardWriter(
        path,
        action_dim=action_dim,
        proprio_dim=proprio_dim,
        cameras=list(cameras),
        max_horizon=max_horizon,
        control_hz=10.0,
        dataset_name=name,
        action_norm_mask=mask,
        max_samples_per_shard=per_shard,
        image_format=image_format,
    ) as writer:
        for e, length in enumerate(lengths):
            ids = base + 1000 * e + np.arange(length)
            actions = np.concatenate(
                [ids[:, None], rng.normal(size=(length, action_dim - 1)) * scale + shift], 1
            )
            proprio = rng.normal(size=(length, proprio_dim)) if proprio_dim else None
            images = {
                c: [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(length)] for c in cameras
            }
            writer.write_episode(
                images, actions, f"Task number {e}.", proprio=proprio, episode_id=f"{name}-{e}"
            )
            episodes[e] = (actions.astype(np.float32), proprio, images)
    return episodes


def _module(tokenizer, processor, datasets, **kwargs) -> TrajectoryDataModule:
    defaults = dict(
        horizon=3,
        batch_size=2,
        num_workers=0,
        image_size=IMAGE_SIDE,
        augment=False,
        shuffle_buffer=4,
        val_episodes=0,
    )
    dm = TrajectoryDataModule(
        datasets=datasets, tokenizer=tokenizer, image_processor=processor, **{**defaults, **kwargs}
    )
    dm.setup()
    return dm


def _ids(batch) -> list[int]:
    return [int(v) for v in batch["actions"][:, 0, 0].tolist()]


def _all_samples(directory):
    return [s for path in list_shards(str(directory)) for s in iter_shard_samples(path)]


# ---- writer ---------------------------------------------------------------------------------------


def test_writer_reader_round_trip_and_chunking(tmp_path):
    lengths = [3, 7, 5]
    episodes = _write_set(tmp_path, lengths, per_shard=4, max_horizon=4)
    meta = read_trajectory_meta(tmp_path)
    assert meta["format"] == "dvlx.trajectory" and meta["version"] == 1 and meta["dataset"] == "toy"
    assert (meta["num_episodes"], meta["num_frames"], meta["num_samples"]) == (3, 15, 15)
    assert [s["num_samples"] for s in meta["shards"]] == [4, 4, 4, 3]  # episodes span shards
    assert meta["episodes"] == [
        {"id": f"toy-{e}", "length": n, "instruction": f"Task number {e}."} for e, n in enumerate(lengths)
    ]
    assert meta["cameras"] == list(CAMERAS) and meta["image_size"] == {c: [8, 10] for c in CAMERAS}
    assert meta["action_names"] == ["action_0", "action_1", "action_2"] and meta["proprio_dim"] == 2
    assert meta["action_norm_mask"] == [False, True, True] and meta["proprio_norm_mask"] == [True, True]
    assert (meta["control_hz"], meta["max_horizon"]) == (10.0, 4)
    samples = _all_samples(tmp_path)
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == 15
    for sample in samples:
        e, t = parse_step_key(sample["__key__"])
        actions, proprio, images = episodes[e]
        record = json.loads(sample["json"])
        assert record == {
            "episode": f"toy-{e}",
            "step": t,
            "episode_length": lengths[e],
            "instruction": f"Task number {e}.",
            "dataset": "toy",
        }
        for camera in CAMERAS:
            decoded = np.asarray(Image.open(io.BytesIO(sample[f"{camera}.png"])))
            np.testing.assert_array_equal(decoded, images[camera][t])
        window = decode_npy(sample["actions.npy"])
        valid = decode_npy(sample["action_valid.npy"])
        assert window.dtype == np.float32 and window.shape == (4, 3) and valid.dtype == bool
        # Actions t .. t+3 of this episode only: zeros and invalid past its end.
        n_valid = min(4, lengths[e] - t)
        assert valid.tolist() == [True] * n_valid + [False] * (4 - n_valid)
        np.testing.assert_array_equal(window[:n_valid], actions[t : t + n_valid])
        np.testing.assert_array_equal(window[n_valid:], 0)
        np.testing.assert_array_equal(decode_npy(sample["proprio.npy"]), proprio[t].astype(np.float32))


def test_writer_rejects_bad_episodes_and_stays_usable(tmp_path):
    rng = np.random.default_rng(0)

    def images(n, shape=(8, 8, 3), dtype=np.uint8):
        return {c: [np.zeros(shape, dtype) for _ in range(n)] for c in CAMERAS}

    writer = TrajectoryShardWriter(
        tmp_path,
        action_dim=2,
        proprio_dim=1,
        cameras=list(CAMERAS),
        max_horizon=2,
        control_hz=5,
        dataset_name="bad",
    )
    good = rng.normal(size=(3, 2))
    nan = good.copy()
    nan[1, 1] = np.nan
    cases = [
        (
            dict(images=images(3), actions=nan, proprio=np.zeros((3, 1))),
            r"episode 'e'.*'actions'.*step 1 dim 1",
        ),
        (dict(images=images(3), actions=np.full((3, 2), 1e39), proprio=np.zeros((3, 1))), "'actions'"),
        (dict(images=images(0), actions=np.zeros((0, 2)), proprio=np.zeros((0, 1))), "empty"),
        (dict(images=images(3), actions=good[:, :1], proprio=np.zeros((3, 1))), r"'actions'.*\[T, 2\]"),
        (dict(images=images(2), actions=good, proprio=np.zeros((3, 1))), "'images.agent' has 2 frames"),
        (dict(images=images(3, dtype=np.float32), actions=good, proprio=np.zeros((3, 1))), "uint8"),
        (dict(images=images(3), actions=good, proprio=None), "'proprio' is required"),
        (dict(images=images(3), actions=good, proprio=np.full((3, 1), np.inf)), "'proprio'"),
        (dict(images={"agent": images(3)["agent"]}, actions=good, proprio=np.zeros((3, 1))), "cameras"),
        (dict(images=images(3), actions=good, proprio=np.zeros((3, 1)), instruction=" "), "'instruction'"),
    ]
    for kwargs, match in cases:
        kwargs = {"instruction": "go", "episode_id": "e", **kwargs}
        with pytest.raises(ValueError, match=match):
            writer.write_episode(**kwargs)
    writer.write_episode(images(3), good, "go", proprio=np.zeros((3, 1)), episode_id="e")
    with pytest.raises(ValueError, match="episode_id"):
        writer.write_episode(images(3), good, "go", proprio=np.zeros((3, 1)), episode_id="e")
    with pytest.raises(ValueError, match="'images.agent' step 0 is 9x8"):
        writer.write_episode(images(3, shape=(9, 8, 3)), good, "go", proprio=np.zeros((3, 1)))
    meta = writer.close()
    assert meta["num_episodes"] == 1 and meta["num_frames"] == 3
    with pytest.raises(ValueError, match="no episodes"):
        TrajectoryShardWriter(
            tmp_path / "empty",
            action_dim=1,
            proprio_dim=0,
            cameras=["a"],
            max_horizon=1,
            control_hz=1,
            dataset_name="x",
        ).close()
    assert not os.path.exists(tmp_path / "empty" / "meta.json")


# ---- statistics -----------------------------------------------------------------------------------


def test_statistics_match_numpy_in_writer_and_streaming_pass(tmp_path, capsys):
    episodes = _write_set(tmp_path, [30, 45, 25], per_shard=16, scale=2.0, shift=1.0)
    actions = np.concatenate([a for a, _, _ in episodes.values()]).astype(np.float64)
    proprio = np.concatenate([p for _, p, _ in episodes.values()]).astype(np.float32).astype(np.float64)
    meta = read_trajectory_meta(tmp_path)
    streamed = compute_stats(tmp_path)
    assert streamed["num_frames"] == 100 and streamed["skipped"] == {} and streamed["quantiles"] == "exact"
    for stats in (meta["stats"], streamed):
        for key, values in (("action", actions), ("proprio", proprio)):
            s = stats[key]
            assert s["count"] == 100
            np.testing.assert_allclose(s["q01"], np.quantile(values, 0.01, axis=0), rtol=0, atol=1e-12)
            np.testing.assert_allclose(s["q99"], np.quantile(values, 0.99, axis=0), rtol=0, atol=1e-12)
            np.testing.assert_allclose(s["mean"], values.mean(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s["std"], values.std(0), rtol=1e-12)
            np.testing.assert_array_equal(s["min"], values.min(0))
            np.testing.assert_array_equal(s["max"], values.max(0))
    # The command line recomputes them and writes them back into meta.json.
    spoiled = read_trajectory_meta(tmp_path)
    spoiled["stats"]["action"]["q99"] = [0.0, 0.0, 0.0]
    (tmp_path / "meta.json").write_text(json.dumps(spoiled))
    assert stats_main([str(tmp_path), "--write"]) == 0
    out = capsys.readouterr().out
    assert "100 frames" in out and "action_1" in out and "wrote" in out
    rewritten = read_trajectory_meta(tmp_path)["stats"]
    for key in ("action", "proprio"):
        for name, values in meta["stats"][key].items():
            # Merged per frame instead of per episode: the float64 sums may differ in the last bits.
            np.testing.assert_allclose(rewritten[key][name], values, rtol=1e-12)


def test_accumulator_chunks_and_reservoir_approximation():
    rng = np.random.default_rng(1)
    x = rng.standard_t(df=3, size=(20000, 2)).astype(np.float32)
    exact = StatsAccumulator(2)
    for chunk in np.array_split(x, 7):
        exact.update(chunk)
    reference = ArrayStats.from_array(x)
    got = exact.result()
    assert exact.quantiles_exact and got.q01 == reference.q01 and got.q99 == reference.q99
    np.testing.assert_allclose(got.mean, reference.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.std, reference.std, rtol=1e-12)
    sampled = StatsAccumulator(2, max_exact_rows=4000, seed=3)
    for chunk in np.array_split(x, 9):
        sampled.update(chunk)
    approx = sampled.result()
    assert not sampled.quantiles_exact and "4000" in sampled.describe_quantiles()
    # Mean, std, min and max stay exact; the quantiles' rank error is a few sqrt(q (1 - q) / k) = 0.0016.
    np.testing.assert_allclose(approx.mean, reference.mean, rtol=1e-12, atol=1e-12)
    assert approx.min == reference.min and approx.max == reference.max
    for d in range(2):
        assert abs((x[:, d] <= approx.q01[d]).mean() - 0.01) < 0.006
        assert abs((x[:, d] <= approx.q99[d]).mean() - 0.99) < 0.006
    with pytest.raises(ValueError, match="non-finite"):
        exact.update(np.array([[np.nan, 0.0]]))


def test_combined_stats_of_a_mixture():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 2)), rng.normal(3.0, 2.0, size=(100, 2))
    both = combine_stats([ArrayStats.from_array(a), ArrayStats.from_array(b)])
    union = np.concatenate([a, b])
    np.testing.assert_allclose(both.mean, union.mean(0))
    np.testing.assert_allclose(both.std, union.std(0))
    np.testing.assert_array_equal(both.min, union.min(0))
    np.testing.assert_array_equal(both.q01, np.minimum(np.quantile(a, 0.01, 0), np.quantile(b, 0.01, 0)))
    np.testing.assert_array_equal(both.q99, np.maximum(np.quantile(a, 0.99, 0), np.quantile(b, 0.99, 0)))
    assert both.count == 400


# ---- DataModule: batches --------------------------------------------------------------------------


def test_batch_layout_normalisation_and_spec(tmp_path, tokenizer, processor):
    episodes = _write_set(tmp_path, [4, 6, 5], max_horizon=4)
    dm = _module(tokenizer, processor, str(tmp_path), horizon=3, batch_size=4)
    spec = dm.action_spec
    assert (spec.horizon, spec.max_horizon, spec.action_dim, spec.proprio_dim) == (3, 4, 3, 2)
    assert spec.cameras == list(CAMERAS) and spec.control_hz == 10.0 and spec.center_crop is None
    meta = read_trajectory_meta(tmp_path)
    assert spec.action_normalizer.stats.to_dict() == meta["stats"]["action"]
    assert spec.action_normalizer.mask == [False, True, True] and spec.action_normalizer.mode == "bounds_q99"
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.num_batches() == 15 // 4
    batch = batches[0]
    size, length = batch["input_ids"].shape
    assert size == 4
    for key in ("labels", "attention_mask", "action_slots", "proprio_slots", "prefix_mask"):
        assert batch[key].shape == (4, length)
    assert batch["action_slots"].dtype == torch.bool and batch["input_ids"].dtype == torch.long
    assert (
        batch["action_slots"].sum(1).tolist() == [9] * 4 and batch["proprio_slots"].sum(1).tolist() == [1] * 4
    )
    first_slot = batch["action_slots"].float().argmax(1)
    assert batch["prefix_mask"].sum(1).tolist() == first_slot.tolist()
    assert batch["pixel_values"].shape == (4 * 2 * 16, processor.row_size)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 8
    assert batch["actions"].shape == (4, 3, 3) and batch["action_valid"].shape == (4, 3)
    assert batch["proprio"].shape == (4, 2) and batch["dataset"].tolist() == [0] * 4
    assert set(batch["faults"]) == set(FAULT_KINDS) and "nan_value" in FAULT_KINDS
    for b in batches:
        for row, frame in enumerate(_ids(b)):
            e, t = divmod(frame, 1000)
            actions, proprio, _ = episodes[e]
            n_valid = min(3, len(actions) - t)
            assert b["action_valid"][row].tolist() == [True] * n_valid + [False] * (3 - n_valid)
            want = spec.action_normalizer.normalize(actions[t : t + n_valid])
            np.testing.assert_allclose(b["actions"][row, :n_valid].numpy(), want, atol=1e-6)
            assert b["actions"][row, n_valid:].eq(0).all()
            want_p = spec.proprio_normalizer.normalize(proprio[t].astype(np.float32))
            np.testing.assert_allclose(b["proprio"][row].numpy(), want_p, atol=1e-6)
    no_proprio = _module(tokenizer, processor, str(tmp_path), use_proprio=False, cameras=["wrist"])
    batch = next(iter(no_proprio.train_dataloader()))
    assert batch["proprio"].shape == (2, 0) and not batch["proprio_slots"].any()
    assert batch["image_grid_thw"].shape == (2, 3) and no_proprio.action_spec.proprio_normalizer is None


def test_augmentation_is_seeded(tmp_path, tokenizer, processor):
    _write_set(tmp_path, [6, 6])

    def first_pixels(seed, augment=True):
        dm = _module(tokenizer, processor, str(tmp_path), augment=augment, seed=seed, shuffle_buffer=1)
        return next(iter(dm.train_dataloader()))["pixel_values"]

    assert torch.equal(first_pixels(0), first_pixels(0))
    assert not torch.equal(first_pixels(0), first_pixels(0, augment=False))
    assert not torch.equal(first_pixels(0), first_pixels(1))
    assert _module(tokenizer, processor, str(tmp_path), augment=True).action_spec.center_crop == 0.9


# ---- mixtures, ranks, workers, splits -------------------------------------------------------------


def test_mixture_weights_are_honoured(tmp_path, tokenizer, processor):
    _write_set(tmp_path / "a", [20] * 4, base=0, per_shard=20, name="a")
    _write_set(tmp_path / "b", [20] * 4, base=100_000, per_shard=20, name="b", seed=1)
    _write_set(tmp_path / "c", [20] * 2, base=200_000, per_shard=20, name="c", seed=2)
    datasets = [{"path": str(tmp_path / "a"), "weight": 3.0}, {"path": str(tmp_path / "b"), "weight": 1}]
    dm = _module(tokenizer, processor, datasets, balance=False, batch_size=8)
    assert dm.mixture_weights() == [0.75, 0.25]
    counts = Counter()
    for batch in dm.train_dataloader():  # 160 frames -> 20 batches of 8
        counts.update(batch["dataset"].tolist())
        assert all(
            (i >= 100_000) == (d == 1) for i, d in zip(_ids(batch), batch["dataset"].tolist(), strict=True)
        )
    assert sum(counts.values()) == 160
    assert abs(counts[0] / 160 - 0.75) < 0.1
    balanced = _module(
        tokenizer, processor, [str(tmp_path / "a"), {"path": str(tmp_path / "c"), "weight": 2}]
    )
    assert balanced.mixture_weights() == pytest.approx([80 / 160, 80 / 160])
    assert balanced.action_spec.datasets == ["a", "c"]


def test_ranks_and_workers_get_disjoint_samples_and_equal_batch_counts(tmp_path, tokenizer, processor):
    # Dataset a: 6 shards (one slot per shard), b: one shard shared by the 4 slots sample by sample.
    _write_set(tmp_path / "a", [7, 5, 9, 6, 4, 8], per_shard=7, name="a")
    _write_set(tmp_path / "b", [5, 6], base=100_000, per_shard=100, name="b", seed=1)
    datasets = [str(tmp_path / "a"), str(tmp_path / "b")]
    train_ids = set()
    for path, base in ((datasets[0], 0), (datasets[1], 100_000)):
        meta = read_trajectory_meta(path)
        val = validation_episodes(meta["episodes"], 1, path)
        train_ids |= {
            base + 1000 * e + t
            for e, ep in enumerate(meta["episodes"])
            if e not in val
            for t in range(ep["length"])
        }
    per_rank = {}
    lengths = []
    for rank in range(2):
        dm = _module(tokenizer, processor, datasets, num_workers=2, rank=rank, world_size=2, val_episodes=1)
        loader = dm.train_dataloader()
        assert len(loader) == dm.num_batches() == len(train_ids) // 4
        batches = list(loader)
        lengths.append(len(batches))
        per_rank[rank] = [i for b in batches for i in _ids(b)]
        # The real workers produced what each (rank, worker) slot stream gives, and the slots are disjoint.
        slots = [[i for b in loader.dataset.iter_worker(w, 2) for i in _ids(b)] for w in range(2)]
        assert Counter(per_rank[rank]) == Counter(slots[0] + slots[1])
        assert not set(slots[0]) & set(slots[1])
    assert lengths[0] == lengths[1] == len(train_ids) // 4
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) <= train_ids


def test_validation_split_is_by_episode(tmp_path, tokenizer, processor):
    _write_set(tmp_path, [5, 6, 7, 4, 5, 6, 3, 8], per_shard=6)
    meta = read_trajectory_meta(tmp_path)
    assert validation_episodes(meta["episodes"], 0.25, "x") == validation_episodes(meta["episodes"], 2, "x")
    assert len(validation_episodes(meta["episodes"], 0.01, "x")) == 1
    with pytest.raises(ValueError, match="data.val_episodes"):
        validation_episodes(meta["episodes"], 8, "x")
    dm = _module(tokenizer, processor, str(tmp_path), val_episodes=0.25, val_batch_size=3)
    train = {i // 1000 for b in dm.train_dataloader() for i in _ids(b)}
    val_frames = [i for b in dm.val_dataloader() for i in _ids(b)]
    val = {i // 1000 for i in val_frames}
    assert len(val) == 2 and not train & val and len(train | val) == 8
    assert len(val_frames) == dm.num_val_frames == len(set(val_frames))
    assert dm.num_train_frames + dm.num_val_frames == 44
    assert _module(tokenizer, processor, str(tmp_path)).val_dataloader() == []


# ---- errors and faults ----------------------------------------------------------------------------


def test_configuration_errors_name_the_key_and_dataset(tmp_path, tokenizer, processor):
    _write_set(tmp_path / "a", [5, 5], max_horizon=4, name="a")
    _write_set(tmp_path / "b", [5, 5], action_dim=4, name="b")
    _write_set(tmp_path / "c", [5, 5], cameras=("agent",), name="c")
    with pytest.raises(ValueError, match=r"data.horizon.*5.*a.*max_horizon 4"):
        _module(tokenizer, processor, str(tmp_path / "a"), horizon=5)
    with pytest.raises(ValueError, match=r"datasets .*a and .*b cannot be mixed: key 'action_dim'"):
        _module(tokenizer, processor, [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match=r"data.cameras.*c has no camera \['wrist'\]"):
        _module(tokenizer, processor, [str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(ValueError, match="data.datasets\\[0\\].weight"):
        _module(tokenizer, processor, [{"path": str(tmp_path / "a"), "weight": 0}])
    with pytest.raises(ValueError, match="data.normalization"):
        _module(tokenizer, processor, str(tmp_path / "a"), normalization="q99")
    with ShardWriter(tmp_path / "img") as writer:
        writer.write("k0", {"json": b"{}"})
    with pytest.raises(ValueError, match=r"img/meta.json: key 'format' is 'dvlx.image_text'"):
        _module(tokenizer, processor, [str(tmp_path / "a"), str(tmp_path / "img")])


def _rewrite_shards(directory, change):
    """Rewrite the shards of `directory` in place, each sample's files passed through `change(key, files)`."""
    meta = read_trajectory_meta(directory)
    for shard in meta["shards"]:
        path = os.path.join(directory, shard["name"])
        samples = list(iter_shard_samples(path))
        tmp = os.path.join(directory, "rewrite")
        with ShardWriter(tmp, max_samples_per_shard=10**6, overwrite=True) as writer:
            for sample in samples:
                files = {k: v for k, v in sample.items() if not k.startswith("__")}
                writer.write(sample["__key__"], change(sample["__key__"], files))
        os.replace(os.path.join(tmp, "train-000000.tar"), path)


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer, processor):
    _write_set(tmp_path, [9, 8, 7, 8], per_shard=5)
    meta = read_trajectory_meta(tmp_path)
    (held_out,) = validation_episodes(meta["episodes"], 1, "x")

    def spoil(key, files):
        episode, step = parse_step_key(key)
        if episode != held_out:
            return files
        if step == 0:
            files["actions.npy"] = encode_npy(np.full((4, 3), np.nan, np.float32))
        elif step == 1:
            files["proprio.npy"] = encode_npy(np.array([np.inf, 0.0], np.float32))
        elif step == 2:
            files["wrist.png"] = files["wrist.png"][:60]  # a cut PNG: the header parses, the pixels do not
        elif step == 3:
            del files["actions.npy"]
        elif step == 4:
            files["action_valid.npy"] = encode_npy(np.zeros(4, bool))
        return files

    _rewrite_shards(tmp_path, spoil)
    dm = _module(
        tokenizer, processor, str(tmp_path), val_episodes=1, val_batch_size=1, fault_min_samples=1000
    )
    tally = FaultTally()
    batches = list(dm.val_dataloader())
    for batch in batches:
        tally.add(batch["faults"])
    assert tally.as_dict() == {"nan_value": 2, "corrupt_image": 1, "missing_key": 1, "bad_record": 1}
    assert len(batches) == meta["episodes"][held_out]["length"] - 5
    # Training skips them too and still yields its full count of batches.
    train = list(dm.train_dataloader())
    assert len(train) == dm.num_batches()
    strict = _module(
        tokenizer, processor, str(tmp_path), val_episodes=1, fault_min_samples=3, max_fault_fraction=0.2
    )
    with pytest.raises(RuntimeError, match="too many bad samples"):
        list(strict.val_dataloader())


def test_prepare_data_generates_missing_sets(tmp_path, tokenizer, processor):
    calls = []

    def generate():
        calls.append(1)
        _write_set(tmp_path / "gen", [4, 4])

    dm = TrajectoryDataModule(
        datasets=str(tmp_path / "gen"),
        tokenizer=tokenizer,
        image_processor=processor,
        horizon=2,
        batch_size=2,
        num_workers=0,
        image_size=IMAGE_SIDE,
        generate=generate,
        val_episodes=0,
    )
    dm.prepare_data()
    dm.prepare_data()
    assert calls == [1] and dm.action_spec.horizon == 2
