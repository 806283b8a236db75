"""The LIBERO protocol: image flip, proprio layout, gripper post-processing, initial-state indexing, the
offline configuration and asset checks, and (with hf-libero and the offline assets in ../shared) environment
creation, reset, wait steps and a short closed-loop rollout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from data_modules import libero_env

HAS_LIBERO = importlib.util.find_spec("libero") is not None


def test_suites_follow_the_reference_protocol() -> None:
    assert libero_env.SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                          "libero_10": 520, "libero_90": 400}
    assert libero_env.WAIT_STEPS == 10 and libero_env.NOOP_ACTION == (0, 0, 0, 0, 0, 0, -1)
    assert libero_env.CAMERA_SIZE == 256


def test_frames_are_turned_180_degrees() -> None:
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flipped = libero_env.flip_180(frame)
    assert flipped.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(flipped[0, 0], frame[1, 2])
    np.testing.assert_array_equal(flipped[1, 2], frame[0, 0])
    np.testing.assert_array_equal(libero_env.flip_180(flipped), frame)


def test_proprio_is_position_axis_angle_and_gripper() -> None:
    half = np.pi / 4  # a quarter turn about z: quaternion (x, y, z, w) = (0, 0, sin 45, cos 45)
    obs = {"robot0_eef_pos": np.array([0.1, -0.2, 1.0]),
           "robot0_eef_quat": np.array([0.0, 0.0, np.sin(half), np.cos(half)]),
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    proprio = libero_env.proprio_from_obs(obs)
    assert proprio.dtype == np.float32 and proprio.shape == (8,)
    np.testing.assert_allclose(proprio, [0.1, -0.2, 1.0, 0.0, 0.0, np.pi / 2, 0.04, -0.04], atol=1e-6)
    obs["robot0_eef_quat"] = np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(libero_env.proprio_from_obs(obs)[3:6], 0.0)


def test_gripper_is_binarised_and_flipped() -> None:
    action = np.array([0.1, 0.2, 0.3, 0.0, 0.0, 0.5, 0.0])

    def gripper(g: float, open_convention: bool) -> float:
        out = libero_env.postprocess_action(np.r_[action[:6], g], open_convention)
        np.testing.assert_array_equal(out[:6], action[:6])
        return out[-1]

    # Trained on 1 = open / 0 = close: LIBERO wants -1 = open, +1 = close.
    assert [gripper(g, True) for g in (1.0, 0.9, 0.5, 0.4, 0.0, -0.3)] == [-1, -1, -1, 1, 1, 1]
    # Trained on LIBERO's own command: binarised only.
    assert [gripper(g, False) for g in (1.0, 0.2, 0.0, -0.7)] == [1, 1, -1, -1]
    assert action[-1] == 0.0


def test_initial_states_are_indexed_from_the_start() -> None:
    assert libero_env.init_state_indices(3, 50) == [0, 1, 2]
    assert libero_env.init_state_indices(2, 50, start=48) == [48, 49]
    with pytest.raises(ValueError, match="beyond the 50"):
        libero_env.init_state_indices(3, 50, start=48)
    with pytest.raises(ValueError, match=">= 1"):
        libero_env.init_state_indices(0, 50)


@pytest.mark.skipif(not HAS_LIBERO, reason="hf-libero is not installed (pip install --no-deps hf-libero)")
def test_missing_assets_give_a_clear_error(tmp_path, monkeypatch) -> None:
    (tmp_path / "scenes").mkdir()
    with pytest.raises(libero_env.LiberoSetupError, match=r"--libero-assets.*missing stable_scanned_objects"):
        libero_env.resolve_assets(tmp_path)
    monkeypatch.setenv(libero_env.ASSETS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(libero_env.LiberoSetupError, match=r"\$DVLX_LIBERO_ASSETS"):
        libero_env.resolve_assets()


@pytest.fixture(scope="module")
def assets(shared_dir) -> Path:
    if not HAS_LIBERO:
        pytest.skip("hf-libero is not installed (pip install --no-deps hf-libero==0.1.4 and its light deps)")
    folder = shared_dir / "libero_assets"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: no offline copy of the LIBERO assets")
    return folder


@pytest.fixture
def configured(assets, tmp_path, monkeypatch) -> Path:
    """`configure` in a private cache folder; the environment variables it sets are undone afterwards."""
    monkeypatch.setenv(libero_env.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    monkeypatch.delenv(libero_env.ASSETS_ENV, raising=False)
    return libero_env.configure(assets)


def test_configure_writes_the_config_hf_libero_asks_for(configured, assets, tmp_path) -> None:
    import yaml

    config = yaml.safe_load((tmp_path / "cache" / "libero" / "config.yaml").read_text())
    assert Path(config["bddl_files"], "libero_goal").is_dir() and Path(config["init_states"]).is_dir()
    import libero.libero as root

    assert root.get_assets_path() == str(assets.resolve()) == str(configured)
    versions = libero_env.libero_versions(configured)
    assert versions["hf-libero"] == "0.1.4" and versions["assets_placeholders"] is True
    json.dumps(versions)


def test_suite_tasks_have_fifty_initial_states(configured) -> None:
    tasks = libero_env.suite_tasks("libero_goal")
    assert len(tasks) == 10 and [t.task_id for t in tasks] == list(range(10))
    assert all(t.num_init_states == 50 for t in tasks)
    assert tasks[0].instruction == tasks[0].name.replace("_", " ")
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        libero_env.suite_tasks("libero_100")


def test_environment_resets_waits_and_steps(configured, one_thread) -> None:
    task = libero_env.suite_tasks("libero_spatial")[0]
    env = libero_env.LiberoEpisodeEnv(
        task, camera_size=64, gripper_open_convention=True,
        camera_map={"image": "agentview_image", "wrist_image": "robot0_eye_in_hand_image"},
    )
    try:
        obs = env.start(3)
        assert set(obs["images"]) == {"image", "wrist_image"} and obs["instruction"] == task.instruction
        assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in obs["images"].values())
        # A fresh render of the current state (robosuite's own observation of a step is taken at its first
        # physics substep, so a few pixels differ).
        raw = env.env.env._get_observations(force_update=True)
        image = obs["images"]["image"].astype(float)
        assert np.abs(image - raw["agentview_image"][::-1, ::-1]).mean() < 0.5
        assert np.abs(image - raw["agentview_image"]).mean() > 5
        np.testing.assert_allclose(obs["proprio"], libero_env.proprio_from_obs(raw), atol=1e-3)
        # The wait steps let the objects settle: the scene is no longer the stored initial state.
        assert not np.allclose(env.env.get_sim_state(), env.init_states[3])
        z, finger = obs["proprio"][2], obs["proprio"][6]
        for _ in range(5):
            # Up, and the policy's 0 = close, which LIBERO receives as +1.
            obs, success = env.step(np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
            assert success is False
        assert obs["proprio"][2] > z + 0.01
        assert obs["proprio"][6] < finger - 0.005
    finally:
        env.close()


def test_rollout_runs_a_libero_task(configured, tmp_path, one_thread) -> None:
    from test_rollout import robot_spec, tiny_export

    from dvlx.eval import rollout

    spec = robot_spec(cameras=("agentview_rgb", "eye_in_hand_rgb"),
                      action_names=[f"a{i}" for i in range(6)] + [libero_env.GRIPPER_OPEN_NAME])
    export = tiny_export(tmp_path / "export", spec)
    out = tmp_path / "report.json"
    code = rollout.main(["--policy", str(export), "--env", "libero_object", "--tasks", "2", "--episodes", "1",
                         "--start-index", "7", "--max-steps", "4", "--camera-size", "64", "--out", str(out),
                         "--no-progress", "--libero-assets", str(configured)])
    assert code == 0
    report = json.loads(out.read_text())
    protocol = report["protocol"]
    assert protocol["suite"] == "libero_object" and protocol["wait_steps"] == 10
    assert protocol["tasks"] == [{"task_id": 2, "name": protocol["tasks"][0]["name"],
                                  "instruction": protocol["tasks"][0]["instruction"],
                                  "initial_state_indices": [7]}]
    assert "binarised" in protocol["gripper_postprocessing"]
    assert protocol["image_preprocessing"]["camera_map"] == {"agentview_rgb": "agentview_image",
                                                             "eye_in_hand_rgb": "robot0_eye_in_hand_image"}
    assert protocol["simulator"]["assets"] == str(configured)
    assert report["episodes"][0]["length"] == 4 and report["episodes"][0]["error"] is None
