"""Robot dataset converters: LIBERO/robomimic HDF5 and LeRobot (v2.1 images and video, v3.0 video) -> shards.

Every input file is written by the test itself in the real format (h5py, pyarrow parquet, PyAV mp4).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_modules.convert import main as convert_main
from data_modules.convert_libero import (
    PROPRIO_NAMES,
    gripper_open_fraction,
    instruction_from_filename,
    keep_mask,
    quat_to_axis_angle,
)
from data_modules.shards import iter_shard_samples, list_shards
from data_modules.trajectory import TrajectoryDataModule, decode_npy, read_trajectory_meta
from dvlx.processing import ImageProcessor, build_tiny_tokenizer

SIDE = 32
MARK = 6  # side of the marker square drawn in the top-left corner of every raw frame
STOVE = "KITCHEN_SCENE3_turn_on_the_stove_demo"
BOWL = "LIVING_ROOM_SCENE2_put_the_bowl_on_the_plate_demo"


# ---- LIBERO / robomimic HDF5 -------------------------------------------------------------------------------


def _raw_frame(t: int, marker: tuple[int, int, int]) -> np.ndarray:
    """Raw simulator frame of step t: green level 8 t + 20 names the step, a marker square in the top-left."""
    frame = np.zeros((SIDE, SIDE, 3), np.uint8)
    frame[..., 1] = 8 * t + 20
    frame[:MARK, :MARK] = marker
    return frame


def _actions(length: int, noops: dict[int, float], seed: int) -> np.ndarray:
    """[T, 7] raw LIBERO actions: small pose deltas, gripper -1 (open) for the first half then +1 (close);
    steps in `noops` get a zero pose and the given gripper value."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-0.5, 0.5, (length, 7))
    actions[:, 6] = np.where(np.arange(length) < length // 2, -1.0, 1.0)
    for t, gripper in noops.items():
        actions[t, :6] = 0.0
        actions[t, 6] = gripper
    return actions


def _demo(length: int, noops: dict[int, float], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    return {
        "actions": _actions(length, noops, seed),
        "obs/agentview_rgb": np.stack([_raw_frame(t, (255, 0, 0)) for t in range(length)]),
        "obs/eye_in_hand_rgb": np.stack([_raw_frame(t, (0, 0, 255)) for t in range(length)]),
        "obs/ee_states": rng.normal(size=(length, 6)),
        "obs/gripper_states": rng.uniform(-0.04, 0.04, (length, 2)),
        "obs/joint_states": rng.normal(size=(length, 7)),
    }


def _write_hdf5(path, demos: dict[str, dict[str, np.ndarray]], attrs: dict[str, str] | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for key, value in (attrs or {}).items():
            data.attrs[key] = value
        for name, datasets in demos.items():
            for key, value in datasets.items():
                data.create_dataset(f"{name}/{key}", data=value)


# Demo 0: steps 0 and 1 are no-ops before any kept step, step 5 repeats the kept gripper (-1), step 8 changes
# the gripper to +1 with a zero pose (kept), step 9 repeats it (dropped): 4 of 16 dropped.
DEMO0_NOOPS = {0: -1.0, 1: -1.0, 5: -1.0, 8: 1.0, 9: 1.0}
DEMO0_KEPT = [t for t in range(16) if t not in (0, 1, 5, 9)]


@pytest.fixture
def libero_files(tmp_path):
    """Two LIBERO files in a `libero_10` folder; the first has a length mismatch and a NaN demo."""
    folder = tmp_path / "libero_10"
    bad_length = _demo(10, {}, seed=3)
    bad_length["obs/agentview_rgb"] = bad_length["obs/agentview_rgb"][:-1]
    bad_nan = _demo(10, {}, seed=4)
    bad_nan["actions"][4, 2] = np.nan
    demos = {"demo_0": _demo(16, DEMO0_NOOPS, seed=0), "demo_1": _demo(12, {}, seed=1),
             "demo_10": _demo(10, {}, seed=10), "demo_2": bad_length, "demo_3": bad_nan}
    stove = str(folder / f"{STOVE}.hdf5")
    info = json.dumps({"problem_name": "libero_kitchen_tabletop_manipulation",
                       "language_instruction": "Turn on the stove, please"})
    _write_hdf5(stove, demos, {"problem_info": info, "env_name": "Libero_Kitchen_Tabletop_Manipulation"})
    bowl = str(folder / f"{BOWL}.hdf5")
    bowl_demos = {"demo_0": _demo(8, {}, seed=20)}
    _write_hdf5(bowl, bowl_demos)
    return {"stove": stove, "bowl": bowl, "demos": demos, "bowl_demos": bowl_demos, "dir": tmp_path}


def _steps(out_dir) -> dict[str, list[dict]]:
    """Decoded samples per episode id, in step order."""
    episodes: dict[str, list[dict]] = {}
    for path in list_shards(str(out_dir)):
        for sample in iter_shard_samples(path):
            record = json.loads(sample["json"])
            step = {"record": record, "actions": decode_npy(sample["actions.npy"]),
                    "valid": decode_npy(sample["action_valid.npy"])}
            if "proprio.npy" in sample:
                step["proprio"] = decode_npy(sample["proprio.npy"])
            for name, data in sample.items():
                if name.endswith((".jpg", ".png")):
                    step[name.rsplit(".", 1)[0]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            episodes.setdefault(record["episode"], []).append(step)
    for steps in episodes.values():
        steps.sort(key=lambda s: s["record"]["step"])
    return episodes


def _corner_means(image: np.ndarray, channel: int) -> tuple[float, float]:
    """Mean of `channel` in the top-left and bottom-right MARK x MARK corners."""
    return (float(image[:MARK, :MARK, channel].mean()), float(image[-MARK:, -MARK:, channel].mean()))


def test_noop_filter_gripper_mapping_and_axis_angle():
    keep = keep_mask(_actions(16, DEMO0_NOOPS, seed=0))
    assert np.flatnonzero(keep).tolist() == DEMO0_KEPT
    # Before the first kept step the pose alone decides; after it, a gripper change is not a no-op.
    still = [[0, 0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, -1.0], [0.1, 0, 0, 0, 0, 0, -1.0],
             [0, 0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, 1.0]]
    assert keep_mask(np.array(still)).tolist() == [False, False, True, True, False]
    assert gripper_open_fraction(np.array([-1.0, 1.0, 0.0, 0.5])).tolist() == [1.0, 0.0, 1.0, 0.5]
    half = math.sqrt(0.5)
    quats = np.array([[0, 0, half, half], [0, 0, 0, 1.0], [1.0, 0, 0, 0]])  # x, y, z, w
    np.testing.assert_allclose(quat_to_axis_angle(quats), [[0, 0, math.pi / 2], [0, 0, 0], [math.pi, 0, 0]],
                               atol=1e-7)
    assert instruction_from_filename(f"/x/{STOVE}.hdf5") == "turn on the stove"
    assert instruction_from_filename("/x/pick_up_the_bowl_demo.hdf5") == "pick up the bowl"
    assert instruction_from_filename("/x/image.hdf5") is None


def test_libero_conversion(libero_files, tmp_path, capsys, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        code = convert_main(["libero", "--hdf5", libero_files["stove"], libero_files["bowl"],
                             "--out", str(out), "--max-horizon", "4", "--samples-per-shard", "7"])
    assert code == 0
    meta = read_trajectory_meta(out)
    stove_ids = [f"{STOVE}/demo_{i}" for i in (0, 1, 10)]
    assert [e["id"] for e in meta["episodes"]] == stove_ids + [f"{BOWL}/demo_0"]
    assert [e["length"] for e in meta["episodes"]] == [len(DEMO0_KEPT), 12, 10, 8]
    assert meta["dataset"] == "libero_10" and meta["control_hz"] == 20 and meta["max_horizon"] == 4
    assert meta["cameras"] == ["agentview_rgb", "eye_in_hand_rgb"]
    assert meta["action_dim"] == 7 and meta["proprio_dim"] == 8
    assert meta["proprio_names"] == list(PROPRIO_NAMES)
    assert meta["action_norm_mask"] == [True] * 6 + [False]
    assert meta["image_orientation"] == "rotated_180_from_raw_sim"
    assert meta["noop_filter"]["dropped_per_episode"] == {stove_ids[0]: 4, stove_ids[1]: 0, stove_ids[2]: 0,
                                                          f"{BOWL}/demo_0": 0}
    assert meta["noop_filter"]["dropped_total"] == 4
    skipped = meta["skipped_episodes"]
    assert sorted(skipped) == [f"{libero_files['stove']}:demo_2", f"{libero_files['stove']}:demo_3"]
    assert skipped[f"{libero_files['stove']}:demo_2"].startswith("length_mismatch")
    assert skipped[f"{libero_files['stove']}:demo_3"].startswith("nan_value")
    assert len(meta["shards"]) == math.ceil((12 + 12 + 10 + 8) / 7)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(libero_files["stove"] in m and "demo_2" in m and "length_mismatch" in m for m in warnings)
    assert any(libero_files["stove"] in m and "demo_3" in m and "nan_value" in m for m in warnings)
    printed = capsys.readouterr().out
    assert f"{STOVE}/demo_0: 16 steps, 4 no-ops dropped, 12 written" in printed
    assert "skipped: length_mismatch=1, nan_value=1" in printed

    episodes = _steps(out)
    demo = libero_files["demos"]["demo_0"]
    steps = episodes[stove_ids[0]]
    assert len(steps) == len(DEMO0_KEPT)
    expected_actions = demo["actions"][DEMO0_KEPT].astype(np.float32)
    expected_actions[:, 6] = np.where(expected_actions[:, 6] > 0, 0.0, 1.0)  # -1 open -> 1, +1 close -> 0
    expected_proprio = np.concatenate([demo["obs/ee_states"], demo["obs/gripper_states"]], 1)[DEMO0_KEPT]
    for k, (t, step) in enumerate(zip(DEMO0_KEPT, steps, strict=True)):
        assert step["record"]["instruction"] == "Turn on the stove, please"
        np.testing.assert_allclose(step["actions"][0], expected_actions[k], rtol=1e-6)
        valid = min(4, len(DEMO0_KEPT) - k)
        assert step["valid"].tolist() == [True] * valid + [False] * (4 - valid)
        np.testing.assert_allclose(step["actions"][:valid], expected_actions[k:k + valid], rtol=1e-6)
        np.testing.assert_allclose(step["proprio"], expected_proprio[k], rtol=1e-6)
        agent, wrist = step["agentview_rgb"], step["eye_in_hand_rgb"]
        # The frame is the kept step's own frame (green level), rotated 180 degrees: the marker drawn in
        # the raw top-left corner is now in the bottom-right corner.
        assert abs(agent[MARK:-MARK, MARK:-MARK, 1].mean() - (8 * t + 20)) < 3
        top_left, bottom_right = _corner_means(agent, 0)
        assert top_left < 30 and bottom_right > 220
        top_left, bottom_right = _corner_means(wrist, 2)
        assert top_left < 30 and bottom_right > 220
    bowl = episodes[f"{BOWL}/demo_0"]
    assert {s["record"]["instruction"] for s in bowl} == {"put the bowl on the plate"}

    # The shards stream as VLA batches whose gripper dimension stays in {0, 1} (not normalised).
    side = 28
    dm = TrajectoryDataModule(datasets=str(out), tokenizer=build_tiny_tokenizer(),
                              image_processor=ImageProcessor(min_pixels=side * side, max_pixels=side * side),
                              horizon=2, batch_size=4, num_workers=0, image_size=side, augment=False,
                              val_episodes=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["actions"].shape == (4, 2, 7) and batch["proprio"].shape == (4, 8)
    assert set(batch["actions"][..., 6][batch["action_valid"]].tolist()) <= {0.0, 1.0}
    assert batch["actions"][..., :6].abs().max() <= 1.0


def test_libero_keep_noops_strict_and_nothing_written(libero_files, tmp_path, caplog):
    out = tmp_path / "all"
    code = convert_main(["libero", "--hdf5", libero_files["stove"], "--out", str(out), "--keep-noops",
                         "--image-size", "16", "--dataset-name", "stove"])
    assert code == 0
    meta = read_trajectory_meta(out)
    assert [e["length"] for e in meta["episodes"]] == [16, 12, 10]
    assert meta["image_size"] == {"agentview_rgb": [16, 16], "eye_in_hand_rgb": [16, 16]}
    assert meta["dataset"] == "stove" and meta["noop_filter"]["enabled"] is False

    strict_out = tmp_path / "strict"
    with caplog.at_level(logging.ERROR):
        code = convert_main(["libero", "--hdf5", libero_files["stove"], "--out", str(strict_out), "--strict"])
    assert code == 2
    assert not os.path.exists(strict_out / "meta.json")
    assert any("demo_2" in r.getMessage() and "length_mismatch" in r.getMessage() for r in caplog.records)

    # A file whose demos are all bad, and a file that is not HDF5: nothing written, exit code 2.
    bad_demo = _demo(6, {}, seed=5)
    del bad_demo["obs/gripper_states"]
    only_bad = str(tmp_path / "libero_goal" / "open_the_drawer_demo.hdf5")
    _write_hdf5(only_bad, {"demo_0": bad_demo})
    not_hdf5 = str(tmp_path / "broken_demo.hdf5")
    with open(not_hdf5, "wb") as f:
        f.write(b"not an hdf5 file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = convert_main(["libero", "--hdf5", only_bad, not_hdf5, "--out", str(tmp_path / "none")])
    assert code == 2
    assert not os.path.exists(tmp_path / "none" / "meta.json")
    messages = [r.getMessage() for r in caplog.records]
    assert any(only_bad in m and "demo_0" in m and "gripper_states" in m for m in messages)
    assert any(not_hdf5 in m and "unreadable_file" in m for m in messages)


def test_robomimic_layout_quaternion_and_instruction(tmp_path, caplog):
    length = 5
    half = math.sqrt(0.5)
    demo = {
        "actions": _actions(length, {}, seed=7),
        "obs/agentview_image": np.stack([_raw_frame(t, (255, 0, 0)) for t in range(length)]),
        "obs/robot0_eye_in_hand_image": np.stack([_raw_frame(t, (0, 0, 255)) for t in range(length)]),
        "obs/robot0_eef_pos": np.arange(3 * length, dtype=np.float64).reshape(length, 3),
        "obs/robot0_eef_quat": np.tile([0.0, 0.0, half, half], (length, 1)),
        "obs/robot0_gripper_qpos": np.full((length, 2), 0.02),
    }
    path = str(tmp_path / "lift" / "image.hdf5")
    _write_hdf5(path, {"demo_0": demo}, {"macros_image_convention": "opencv"})
    with caplog.at_level(logging.WARNING):
        assert convert_main(["libero", "--hdf5", path, "--out", str(tmp_path / "no_text")]) == 2
    assert any("missing_instruction" in r.getMessage() for r in caplog.records)

    out = tmp_path / "lift_shards"
    assert convert_main(["libero", "--hdf5", path, "--out", str(out), "--instruction", "lift the cube"]) == 0
    meta = read_trajectory_meta(out)
    assert meta["cameras"] == ["agentview_image", "robot0_eye_in_hand_image"] and meta["dataset"] == "image"
    steps = _steps(out)["image/demo_0"]
    assert [s["record"]["instruction"] for s in steps] == ["lift the cube"] * length
    np.testing.assert_allclose(steps[2]["proprio"], [6, 7, 8, 0, 0, math.pi / 2, 0.02, 0.02], rtol=1e-6)
    # "opencv" frames are already upright: only the horizontal flip remains, the marker goes top-right.
    image = steps[0]["agentview_image"]
    assert image[:MARK, -MARK:, 0].mean() > 220 and image[:MARK, :MARK, 0].mean() < 30


# ---- LeRobot ----------------------------------------------------------------------------------------------

FPS = 10
STATE_NAMES = ["x", "y", "gripper", "gripper"]  # LeRobot LIBERO sets repeat "gripper"
ACTION_NAMES = ["x", "y", "gripper"]


def _lerobot_frame(episode: int, t: int) -> np.ndarray:
    frame = np.zeros((SIDE, SIDE, 3), np.uint8)
    frame[..., 1] = 20 * t + 10
    frame[..., 2] = 40 * episode + 10
    return frame


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _episode_arrays(episode: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(episode)
    return (rng.normal(size=(length, 3)).astype(np.float32), rng.normal(size=(length, 4)).astype(np.float32))


def _data_table(rows: list[tuple[int, int, int]], camera: str | None, start_index: int = 0) -> pa.Table:
    """Parquet rows for (episode, length, task) triples; `camera` adds a PNG image column."""
    columns: dict[str, list] = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index",
                                                "episode_index", "index", "task_index")}
    images = []
    for episode, length, task in rows:
        actions, state = _episode_arrays(episode, length)
        for t in range(length):
            columns["observation.state"].append(state[t].tolist())
            columns["action"].append(actions[t].tolist())
            columns["timestamp"].append(t / FPS)
            columns["frame_index"].append(t)
            columns["episode_index"].append(episode)
            columns["index"].append(start_index + len(columns["index"]))
            columns["task_index"].append(task)
            images.append({"bytes": _png(_lerobot_frame(episode, t)), "path": f"frame_{t:06d}.png"})
    arrays = {
        "observation.state": pa.array(columns["observation.state"], type=pa.list_(pa.float32(), 4)),
        "action": pa.array(columns["action"], type=pa.list_(pa.float32(), 3)),
        "timestamp": pa.array(columns["timestamp"], type=pa.float32()),
        **{k: pa.array(columns[k], type=pa.int64()) for k in ("frame_index", "episode_index", "index",
                                                             "task_index")},
    }
    if camera is not None:
        arrays[camera] = pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(arrays)


def _write_mp4(path: str, frames: list[np.ndarray]) -> None:
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _info(version: str, camera: str, dtype: str, total: int) -> dict:
    v2 = version.startswith("v2")
    features = {
        camera: {"dtype": dtype, "shape": [SIDE, SIDE, 3], "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": [4], "names": {"motors": STATE_NAMES}},
        "action": {"dtype": "float32", "shape": [3], "names": ACTION_NAMES},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    return {
        "codebase_version": version, "robot_type": "panda", "total_episodes": total, "fps": FPS,
        "chunks_size": 1000, "features": features,
        "data_path": ("data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet" if v2
                      else "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"),
        "video_path": ("videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" if v2
                       else "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
    }


TASKS = ["Pick up the red block", "Push the button"]


def _write_v21(root, camera: str, dtype: str, episodes: list[tuple[int, int, int]]) -> None:
    os.makedirs(root / "meta")
    (root / "meta" / "info.json").write_text(json.dumps(_info("v2.1", camera, dtype, len(episodes))))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [TASKS[task]], "length": n}) + "\n"
        for e, n, task in episodes))
    os.makedirs(root / "data" / "chunk-000")
    for episode, length, task in episodes:
        table = _data_table([(episode, length, task)], camera if dtype == "image" else None)
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet")
        if dtype == "video":
            _write_mp4(str(root / "videos" / "chunk-000" / camera / f"episode_{episode:06d}.mp4"),
                       [_lerobot_frame(episode, t) for t in range(length)])


def _check_episode(steps: list[dict], episode: int, length: int, task: int, camera: str, tolerance: float,
                   proprio: bool = True) -> None:
    """Instruction, actions, proprio and frames of one converted episode; a frame must match its own flat
    colour levels within `tolerance` (shards hold JPEG, videos are lossy)."""
    actions, state = _episode_arrays(episode, length)
    assert len(steps) == length
    for t, step in enumerate(steps):
        assert step["record"]["instruction"] == TASKS[task]
        np.testing.assert_allclose(step["actions"][0], actions[t], rtol=1e-6)
        if proprio:
            np.testing.assert_allclose(step["proprio"], state[t], rtol=1e-6)
        else:
            assert "proprio" not in step
        image = step[camera].astype(float)
        expected = _lerobot_frame(episode, t).astype(float)
        assert np.abs(image.mean((0, 1)) - expected.mean((0, 1))).max() < tolerance


def test_lerobot_v21_images(tmp_path, caplog):
    root = tmp_path / "pick_dataset"
    _write_v21(root, "observation.images.image", "image", [(0, 8, 0), (1, 6, 1), (2, 5, 0), (3, 4, 1)])
    table = pq.read_table(root / "data" / "chunk-000" / "episode_000002.parquet")
    bad = table.column("action").to_pylist()
    bad[3][1] = float("nan")
    table = table.set_column(table.column_names.index("action"), "action",
                             pa.array(bad, type=pa.list_(pa.float32(), 3)))
    pq.write_table(table, root / "data" / "chunk-000" / "episode_000002.parquet")
    os.remove(root / "data" / "chunk-000" / "episode_000003.parquet")

    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        code = convert_main(["lerobot", "--root", str(root), "--out", str(out), "--max-horizon", "3",
                             "--no-norm-dims", "2"])
    assert code == 0
    meta = read_trajectory_meta(out)
    assert [e["id"] for e in meta["episodes"]] == ["episode_000000", "episode_000001"]
    assert meta["cameras"] == ["image"] and meta["camera_keys"] == {"image": "observation.images.image"}
    assert meta["control_hz"] == FPS and meta["dataset"] == "pick_dataset"
    assert meta["lerobot_version"] == "v2.1"
    assert meta["action_names"] == ACTION_NAMES
    assert meta["proprio_names"] == ["x", "y", "gripper", "gripper_3"]
    assert meta["action_norm_mask"] == [True, True, False]
    assert sorted(meta["skipped_episodes"]) == [f"{root} episode 2", f"{root} episode 3"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("episode 2" in m and "nan_value" in m and "episode_000002.parquet" in m for m in messages)
    assert any("episode 3" in m and "missing_file" in m and "episode_000003.parquet" in m for m in messages)
    episodes = _steps(out)
    _check_episode(episodes["episode_000000"], 0, 8, 0, "image", tolerance=1.5)
    _check_episode(episodes["episode_000001"], 1, 6, 1, "image", tolerance=1.5)

    with caplog.at_level(logging.ERROR):
        code = convert_main(["lerobot", "--root", str(root), "--out", str(tmp_path / "strict"), "--strict"])
    assert code == 2 and not os.path.exists(tmp_path / "strict" / "meta.json")
    bad_dim = ["--no-norm-dims", "3"]
    assert convert_main(["lerobot", "--root", str(root), "--out", str(tmp_path / "x"), *bad_dim]) == 2


def test_lerobot_v21_video(tmp_path, caplog):
    root = tmp_path / "video_dataset"
    camera = "observation.images.Front"
    _write_v21(root, camera, "video", [(0, 7, 1), (1, 6, 0), (2, 3, 0)])
    # Episode 1's video lacks its last two frames: the episode is skipped, not silently cut.
    _write_mp4(str(root / "videos" / "chunk-000" / camera / "episode_000001.mp4"),
               [_lerobot_frame(1, t) for t in range(4)])
    with open(root / "videos" / "chunk-000" / camera / "episode_000002.mp4", "wb") as f:
        f.write(b"not a video" * 50)
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        code = convert_main(["lerobot", "--root", str(root), "--out", str(out), "--no-state"])
    assert code == 0
    meta = read_trajectory_meta(out)
    assert meta["cameras"] == ["front"] and meta["proprio_dim"] == 0 and meta["num_episodes"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("episode 1" in m and "missing_frame" in m and "episode_000001.mp4" in m for m in messages)
    assert any("episode 2" in m and "unreadable_video" in m and "episode_000002.mp4" in m for m in messages)
    _check_episode(_steps(out)["episode_000000"], 0, 7, 1, "front", tolerance=6, proprio=False)


def test_lerobot_v30_video(tmp_path):
    root = tmp_path / "v3"
    camera = "observation.images.wrist"
    episodes = [(0, 5, 0), (1, 4, 1)]
    os.makedirs(root / "meta" / "episodes" / "chunk-000")
    (root / "meta" / "info.json").write_text(json.dumps(_info("v3.0", camera, "video", len(episodes))))
    pq.write_table(pa.table({"task_index": pa.array([0, 1], pa.int64()), "task": TASKS}),
                   root / "meta" / "tasks.parquet")
    os.makedirs(root / "data" / "chunk-000")
    pq.write_table(_data_table(episodes, None), root / "data" / "chunk-000" / "file-000.parquet")
    # Both episodes in one mp4: episode 1 starts at 0.5 s.
    _write_mp4(str(root / "videos" / camera / "chunk-000" / "file-000.mp4"),
               [_lerobot_frame(e, t) for e, n, _ in episodes for t in range(n)])
    prefix = f"videos/{camera}/"
    pq.write_table(pa.table({
        "episode_index": pa.array([0, 1], pa.int64()),
        "tasks": [[TASKS[0]], [TASKS[1]]],
        "length": pa.array([5, 4], pa.int64()),
        "data/chunk_index": pa.array([0, 0], pa.int64()), "data/file_index": pa.array([0, 0], pa.int64()),
        "dataset_from_index": pa.array([0, 5], pa.int64()), "dataset_to_index": pa.array([5, 9], pa.int64()),
        prefix + "chunk_index": pa.array([0, 0], pa.int64()),
        prefix + "file_index": pa.array([0, 0], pa.int64()),
        prefix + "from_timestamp": [0.0, 0.5], prefix + "to_timestamp": [0.5, 0.9],
    }), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    out = tmp_path / "shards"
    assert convert_main(["lerobot", "--root", str(root), "--out", str(out), "--cameras", "wrist"]) == 0
    meta = read_trajectory_meta(out)
    assert meta["lerobot_version"] == "v3.0" and [e["length"] for e in meta["episodes"]] == [5, 4]
    steps = _steps(out)
    _check_episode(steps["episode_000000"], 0, 5, 0, "wrist", tolerance=6)
    _check_episode(steps["episode_000001"], 1, 4, 1, "wrist", tolerance=6)
