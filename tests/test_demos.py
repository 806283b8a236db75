"""Scripted robosuite demonstrations: the generator's shards, replay from (seed, index), determinism across
worker counts, caching, the expert's success rate and the image orientation."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "robosuite",
    reason="robosuite is not installed (pip install 'robosuite==1.4.1' 'mujoco==3.2.3'); "
    "the simulator demonstrations cannot be generated",
)

from PIL import Image  # noqa: E402

from data_modules import demos, sim  # noqa: E402
from data_modules.shards import iter_shard_samples, list_shards  # noqa: E402
from data_modules.trajectory import decode_npy, parse_step_key, read_trajectory_meta  # noqa: E402

SIZE = 32
HORIZON = 8
TASKS = ("robosuite-lift", "robosuite-lift-color")


def _config(task: str, out, **kwargs) -> demos.DemoConfig:
    return demos.DemoConfig(task=task, episodes=2, out=str(out), seed=3, image_size=SIZE, max_horizon=HORIZON,
                            **kwargs)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """Both tasks, 2 episodes each; the colour task through a pool of 2 worker processes."""
    out = {}
    for task, workers in zip(TASKS, (1, 2), strict=True):
        directory = tmp_path_factory.mktemp(task)
        out[task] = (str(directory), demos.generate_demos(_config(task, directory, workers=workers)))
    return out


@pytest.fixture(scope="module")
def envs():
    """One environment per task, built with the generator's seed (which fixes Lift's cube size)."""
    built = {task: sim.make_env(task, seed=3, image_size=SIZE) for task in TASKS}
    yield built
    for env in built.values():
        env.close()


def _blocks(image: np.ndarray) -> np.ndarray:
    """Means of the luma (which JPEG keeps at full resolution) over 4x4 pixel blocks."""
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return luma.reshape(SIZE // 4, 4, SIZE // 4, 4).mean(axis=(1, 3))


def _steps(directory: str) -> list[dict]:
    steps = []
    for shard in list_shards(directory):
        for sample in iter_shard_samples(shard):
            assert "__bad__" not in sample
            steps.append({
                "key": parse_step_key(sample["__key__"]),
                "record": json.loads(sample["json"]),
                "actions": decode_npy(sample["actions.npy"]),
                "valid": decode_npy(sample["action_valid.npy"]),
                "proprio": decode_npy(sample["proprio.npy"]),
                "images": {c: np.asarray(Image.open(io.BytesIO(sample[f"{c}.jpg"]))) for c in sim.CAMERAS},
            })
    return steps


@pytest.mark.parametrize("task", TASKS)
def test_meta_describes_the_demonstrations(generated, task):
    directory, summary = generated[task]
    meta = read_trajectory_meta(directory)
    assert summary["cached"] is False and summary["episodes"] == 2
    assert meta["dataset"] == task
    assert (meta["action_dim"], meta["proprio_dim"]) == (7, 8)
    assert meta["cameras"] == ["agentview", "robot0_eye_in_hand"]
    assert meta["image_size"] == {c: [SIZE, SIZE] for c in sim.CAMERAS}
    assert meta["control_hz"] == 20.0 and meta["max_horizon"] == HORIZON
    assert meta["action_norm_mask"] == [True] * 6 + [False]
    assert meta["image_orientation"] == "upright"
    assert meta["num_episodes"] == 2
    for kind, dim in (("action", 7), ("proprio", 8)):
        stats = meta["stats"][kind]
        for key in ("q01", "q99", "mean", "std", "min", "max"):
            assert len(stats[key]) == dim
    assert meta["expert"]["episode_indices"] == [i for i in range(meta["expert"]["attempts"])
                                                 if i not in meta["expert"]["failed_indices"]]
    assert meta["simulator"]["robosuite"] == "1.4.1" and meta["simulator"]["mujoco"].startswith("3.")
    assert meta["generator"]["params"]["seed"] == 3


@pytest.mark.parametrize("task", TASKS)
def test_samples_hold_successful_episodes(generated, task):
    directory, _ = generated[task]
    steps = _steps(directory)
    by_episode: dict[int, list[dict]] = {}
    for step in steps:
        by_episode.setdefault(step["key"][0], []).append(step)
    assert sorted(by_episode) == [0, 1]
    for episode in by_episode.values():
        length = episode[0]["record"]["episode_length"]
        assert [s["key"][1] for s in episode] == list(range(length))
        for step in episode:
            assert step["actions"].shape == (HORIZON, 7) and step["proprio"].shape == (8,)
            assert np.all(np.abs(step["actions"]) <= 1.0)
            assert np.all(step["actions"][step["valid"], 6] ** 2 == 1.0)  # the gripper is a +-1 command
            assert step["valid"].sum() == min(HORIZON, length - step["key"][1])
            assert all(image.shape == (SIZE, SIZE, 3) for image in step["images"].values())
        instruction = episode[0]["record"]["instruction"]
        if task == "robosuite-lift":
            assert instruction == "lift the cube"
        else:
            assert instruction in ("lift the red cube", "lift the green cube")
        # The episode ends lifted: the hand is well above where it grasped, with the gripper closed.
        first, last = episode[0], episode[-1]
        assert last["proprio"][2] > min(s["proprio"][2] for s in episode) + 0.04
        assert first["actions"][0, 6] == -1.0 and last["actions"][0, 6] == 1.0




@pytest.mark.parametrize("task", TASKS)
def test_episodes_reproduce_from_seed_and_index_in_any_order(generated, envs, task):
    """The expert, rerun on episode (seed, index) in another process and in reverse order, gives the
    recorded instruction, proprio and actions exactly, and succeeds: what makes the output independent of
    the number of workers and rollouts reproducible."""
    directory, summary = generated[task]
    steps = _steps(directory)
    env = envs[task]
    for position, index in reversed(list(enumerate(summary["episode_indices"]))):
        episode = [s for s in steps if s["key"][0] == position]
        obs = sim.reset(env, seed=3, index=index)
        expert = sim.ScriptedLiftExpert()
        assert obs["instruction"] == episode[0]["record"]["instruction"]
        if task == "robosuite-lift-color":
            assert obs["instruction"] == f"lift the {env.target_color} cube"
        assert not sim.success(env)
        for step in episode:
            np.testing.assert_array_equal(obs["proprio"], step["proprio"])
            for camera, image in obs["images"].items():
                # Another environment exists in this process, so this fails when rendering goes through the
                # wrong OpenGL context (the cube loses its texture). 4x4 block means absorb the JPEG noise.
                assert np.abs(_blocks(image) - _blocks(step["images"][camera])).max() < 15
            action = expert.act(env)
            np.testing.assert_array_equal(action, step["actions"][0])
            obs = sim.step(env, action)
        assert sim.success(env)


def test_same_parameters_are_cached_and_other_ones_regenerate(generated, tmp_path):
    source, summary = generated["robosuite-lift"]
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    meta = read_trajectory_meta(tmp_path)
    stamp = os.stat(tmp_path / "meta.json").st_mtime_ns
    config = _config("robosuite-lift", tmp_path)
    again = demos.generate_demos(config)
    assert again["cached"] is True and again["episodes"] == 2
    assert again["episode_indices"] == summary["episode_indices"]
    assert os.stat(tmp_path / "meta.json").st_mtime_ns == stamp
    # Other parameters regenerate the set: the first episode again, cut 2 instead of 10 steps after success.
    demos.generate_demos(demos.DemoConfig(**{**config.__dict__, "episodes": 1, "post_success_steps": 2}))
    regenerated = read_trajectory_meta(tmp_path)
    assert regenerated["generator"]["params"]["post_success_steps"] == 2
    assert regenerated["num_frames"] == meta["episodes"][0]["length"] - 8
    assert len(list_shards(str(tmp_path))) == 1


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by data_modules.demos"):
        demos.generate_demos(_config("robosuite-lift", tmp_path))


@pytest.mark.parametrize("task", TASKS)
def test_expert_success_rate(envs, task):
    """The expert reads the simulator state, not the images, so this steps robosuite without rendering."""
    env = envs[task]
    successes = 0
    for index in range(10):
        sim.reset(env, seed=11, index=index)
        expert = sim.ScriptedLiftExpert()
        for _ in range(sim.MAX_EPISODE_STEPS):
            env.step(expert.act(env))
            if sim.success(env):
                successes += 1
                break
    assert successes / 10 >= 0.9


def test_images_are_upright(envs):
    obs = sim.reset(envs["robosuite-lift"], seed=0, index=0)
    wrist = obs["images"]["robot0_eye_in_hand"].astype(np.float64).mean(axis=2)
    agent = obs["images"]["agentview"].astype(np.float64).mean(axis=2)
    # Upright, the dark gripper fingers fill the bottom of the wrist view and the bright table the bottom of
    # the agent view, whose top shows the robot's base and the dark floor behind the table.
    rows = SIZE // 6
    assert wrist[-rows:].mean() < wrist[:rows].mean() - 40
    assert agent[-rows:].mean() > agent[:rows].mean() + 40
    assert sim.IMAGE_ORIENTATION == "upright"
    raw = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(sim.orient_image(raw), raw[::-1])


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="task must be one of"):
        demos.DemoConfig(task="lift", episodes=1, out="x")
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        demos.DemoConfig(task="robosuite-lift", episodes=0, out="x")
    with pytest.raises(ValueError, match="unknown simulator task"):
        sim.make_env("robosuite-stack", seed=0)
    assert sim.episode_seed(0, 1) != sim.episode_seed(1, 0)
    assert sim.episode_seed(5, 7) == sim.episode_seed(5, 7)
