"""Closed-loop rollouts: camera matching, the JPEG round trip, settings checks, a robosuite rollout through
`python -m dvlx.eval rollout` with worker processes (open-loop execution, seeds, swapped instructions,
videos, the report), and the training callback in a tiny Trainer run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "robosuite",
    reason="robosuite is not installed (pip install 'robosuite==1.4.1' 'mujoco==3.2.3'): nothing to roll out",
)

from vla_batch import make_batch, tiny_backbone, tiny_spec  # noqa: E402

from data_modules import sim  # noqa: E402
from dvlx.config import ExperimentConfig, ObjectiveConfig, RolloutConfig, StageConfig  # noqa: E402
from dvlx.eval import rollout  # noqa: E402
from dvlx.export import write_export  # noqa: E402
from dvlx.processing import ImageProcessor, build_tiny_tokenizer  # noqa: E402
from dvlx.processing.robot import ArrayStats, Normalizer  # noqa: E402
from dvlx.stages import VLA  # noqa: E402

IMAGE = 32
HORIZON = 4


def _stats(dim: int) -> ArrayStats:
    return ArrayStats(mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim, max=[1.0] * dim, q01=[-1.0] * dim,
                      q99=[1.0] * dim, count=10)


def robot_spec(cameras=sim.CAMERAS, action_names=sim.ACTION_NAMES):
    """A 7-D action, 8-D proprio spec of the simulators' shape (random statistics)."""
    return dataclasses.replace(
        tiny_spec(horizon=HORIZON, action_dim=7, proprio_dim=8, cameras=cameras, image_size=IMAGE),
        action_names=list(action_names), proprio_names=list(sim.PROPRIO_NAMES),
        action_normalizer=Normalizer("bounds_q99", _stats(7), [True] * 6 + [False]),
        proprio_normalizer=Normalizer("bounds_q99", _stats(8), [True] * 8), center_crop=0.9,
    )


def tiny_stage(spec, objective: str = "l1"):
    tokenizer = build_tiny_tokenizer()
    cfg = ExperimentConfig(stage=StageConfig(name="vla"), objective=ObjectiveConfig(name=objective))
    return VLA(cfg, tiny_backbone(tokenizer), tokenizer, spec), tokenizer


def tiny_export(folder: Path, spec) -> Path:
    """A random tiny VLA export for `spec` (untrained: it exercises the machinery, not success)."""
    stage, tokenizer = tiny_stage(spec)
    processor = ImageProcessor(min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE)
    return write_export(folder, stage.backbone, tokenizer, processor, stage="VLA", step=0,
                        objective=stage.objective, spec=spec)


def test_cameras_are_matched_by_name_then_by_role() -> None:
    env = ("agentview_image", "robot0_eye_in_hand_image")
    assert rollout.match_cameras(["agentview_rgb", "eye_in_hand_rgb"], env) == {
        "agentview_rgb": "agentview_image", "eye_in_hand_rgb": "robot0_eye_in_hand_image"}
    assert rollout.match_cameras(["robot0_eye_in_hand_image", "front"], env) == {
        "robot0_eye_in_hand_image": "robot0_eye_in_hand_image", "front": "agentview_image"}
    assert rollout.match_cameras(["wrist", "image"], env, {"image": "robot0_eye_in_hand_image"}) == {
        "wrist": "robot0_eye_in_hand_image", "image": "robot0_eye_in_hand_image"}
    with pytest.raises(ValueError, match="not a camera of the simulator"):
        rollout.match_cameras(["a"], env, {"a": "side"})
    with pytest.raises(ValueError, match="does not use"):
        rollout.match_cameras(["a"], env, {"b": "agentview_image"})


def test_jpeg_round_trip_matches_the_shard_encoding() -> None:
    # Smooth colour ramps, as camera images mostly are.
    rows, cols = np.meshgrid(np.linspace(40, 220, IMAGE), np.linspace(40, 220, IMAGE), indexing="ij")
    image = np.stack([rows, cols, 255 - rows], axis=-1).astype(np.uint8)
    assert rollout.jpeg_round_trip(image, 0) is image
    encoded = rollout.jpeg_round_trip(image, 95)
    assert encoded.shape == image.shape and encoded.dtype == np.uint8
    assert 0 < np.abs(encoded.astype(int) - image).mean() < 8
    assert np.abs(rollout.jpeg_round_trip(image, 10).astype(int) - image).mean() > np.abs(
        encoded.astype(int) - image).mean()


def test_settings_refuse_impossible_protocols() -> None:
    with pytest.raises(ValueError, match="unknown environment"):
        rollout.RolloutSettings(env="robosuite-stack")
    with pytest.raises(ValueError, match="one instruction"):
        rollout.RolloutSettings(env="robosuite-lift", instruction="swap")
    with pytest.raises(ValueError, match="LIBERO tasks"):
        rollout.RolloutSettings(env="robosuite-lift", tasks=(1,))
    with pytest.raises(ValueError, match="episodes"):
        rollout.RolloutSettings(env="libero_goal", episodes=0)
    with pytest.raises(ValueError, match="exceeds the policy's chunk length"):
        rollout.plan_rollout(rollout.RolloutSettings(env="robosuite-lift", open_loop_steps=HORIZON + 1),
                             robot_spec())
    six = dataclasses.replace(robot_spec(), action_dim=6, action_names=list(sim.ACTION_NAMES[:6]),
                              action_normalizer=Normalizer("bounds_q99", _stats(6), [True] * 6))
    with pytest.raises(ValueError, match="6-D actions .*robosuite-lift takes 7-D actions"):
        rollout.plan_rollout(rollout.RolloutSettings(env="robosuite-lift"), six)
    nine = dataclasses.replace(robot_spec(), proprio_dim=9, proprio_names=[*sim.PROPRIO_NAMES, "extra"],
                               proprio_normalizer=Normalizer("bounds_q99", _stats(9), [True] * 9))
    with pytest.raises(ValueError, match="9-D proprio .*gives 8-D proprio"):
        rollout.plan_rollout(rollout.RolloutSettings(env="robosuite-lift"), nine)


def test_plan_indexes_episodes_and_records_the_protocol() -> None:
    settings = rollout.RolloutSettings(env="robosuite-lift-color", episodes=3, start_index=5, seed=11,
                                       instruction="swap")
    plan = rollout.plan_rollout(settings, robot_spec(), keep_frames=4)
    assert [(e.number, e.task_id, e.index) for e in plan.episodes] == [(0, 0, 5), (1, 0, 6), (2, 0, 7)]
    assert [e.keep_frames for e in plan.episodes] == [4, 0, 0]
    assert plan.worker.max_steps == sim.MAX_EPISODE_STEPS and plan.worker.open_loop_steps == HORIZON
    assert plan.worker.camera_size == IMAGE and plan.worker.swap_instruction
    protocol = plan.protocol
    assert protocol["tasks"][0]["episode_indices"] == [5, 6, 7] and protocol["seed"] == 11
    assert protocol["simulator"] == sim.SIM_VERSIONS
    assert protocol["image_preprocessing"]["center_crop_area"] == 0.9
    json.dumps(protocol)


def test_summary_counts_tasks_instructions_and_cubes() -> None:
    def result(n, success, length, instruction, named, lifted, error=None):
        info = {"target_color": "red", "named_color": named, "lifted_colors": lifted}
        return rollout.EpisodeResult(n, 0, n, success, length, instruction, 1.0, 3, error=error, info=info)

    results = [
        result(0, True, 30, "lift the red cube", "red", ["red"]),
        result(1, False, 150, "lift the red cube", "red", []),
        result(2, False, 150, "lift the green cube", "green", ["red"]),
        result(3, False, 12, "lift the green cube", "green", [], error="RuntimeError: boom"),
    ]
    summary = rollout.summarize(results, [rollout.TaskInfo(0, "robosuite-lift-color", "...")])
    assert summary["episodes"] == 4 and summary["successes"] == 1 and summary["success_rate"] == 0.25
    assert summary["mean_length"] == (30 + 150 + 150 + 12) / 4 and summary["mean_length_success"] == 30
    assert summary["errors"] == 1
    assert summary["named_cube_lifted_rate"] == 0.25 and summary["other_cube_lifted_rate"] == 0.25
    assert [t["episodes"] for t in summary["per_task"]] == [4]
    assert summary["per_instruction"]["lift the green cube"]["other_cube_lifted_rate"] == 0.5
    assert summary["per_instruction"]["lift the red cube"]["success_rate"] == 0.5


@pytest.fixture(scope="module")
def color_report(tmp_path_factory, one_thread) -> tuple[dict, Path]:
    """`python -m dvlx.eval rollout` on robosuite-lift-color with swapped instructions: 2 workers, 3 short
    episodes, 3 actions of each 4-step chunk, videos."""
    root = tmp_path_factory.mktemp("rollout")
    export = tiny_export(root / "export", robot_spec())
    out = root / "report.json"
    code = rollout.main([
        "--policy", str(export), "--env", "robosuite-lift-color", "--episodes", "3", "--workers", "2",
        "--max-steps", "7", "--open-loop-steps", "3", "--instruction", "swap",
        "--video", str(root / "videos"), "--out", str(out), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    return json.loads(out.read_text()), root


def test_rollout_report_records_protocol_and_results(color_report) -> None:
    report, root = color_report
    protocol, metrics, episodes = report["protocol"], report["metrics"], report["episodes"]
    assert protocol["env"] == "robosuite-lift-color" and protocol["workers"] == 2
    assert protocol["open_loop_steps"] == 3 and protocol["chunk_length"] == HORIZON
    assert protocol["max_steps"] == 7 and protocol["seed"] == rollout.DEFAULT_SEED
    assert protocol["tasks"][0]["episode_indices"] == [0, 1, 2]
    assert protocol["simulator"]["mujoco"] == sim.SIM_VERSIONS["mujoco"]
    assert report["policy"]["spec_fingerprint"] == robot_spec().fingerprint()
    assert report["command"].startswith("python -m dvlx.eval rollout --policy")
    assert metrics["episodes"] == 3 and metrics["errors"] == 0
    assert metrics["per_task"][0]["episodes"] == 3
    assert [e["index"] for e in episodes] == [0, 1, 2]
    for episode in episodes:
        # An untrained policy does not lift the cube in 7 steps: every episode runs to the limit, asking for a
        # chunk every 3 actions.
        assert not episode["success"] and episode["length"] == 7
        assert episode["queries"] == math.ceil(7 / 3)
    assert metrics["policy_queries"] == 3 * math.ceil(7 / 3)
    assert 1 <= metrics["mean_policy_batch"] <= 2


def test_swapped_instruction_names_the_other_cube(color_report) -> None:
    report, _ = color_report
    for episode in report["episodes"]:
        info = episode["info"]
        assert info["named_color"] != info["target_color"]
        assert episode["instruction"] == sim.color_instruction(info["named_color"])
    # Episode seeds (7, i) draw the targets: the same draw as a reset in this process.
    env = sim.make_env("robosuite-lift-color", seed=rollout.DEFAULT_SEED, image_size=IMAGE)
    try:
        targets = []
        for i in range(3):
            sim.reset(env, seed=rollout.DEFAULT_SEED, index=i)
            targets.append(env.target_color)
    finally:
        env.close()
    assert [e["info"]["target_color"] for e in report["episodes"]] == targets


def test_rollout_videos_hold_every_step(color_report) -> None:
    import av

    report, root = color_report
    for episode in report["episodes"]:
        path = Path(episode["video"])
        assert path.parent == root / "videos" and path.name.endswith("_failure.mp4")
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        # The first observation and one per step; both cameras side by side.
        assert len(frames) == 7 + 1 and frames[0].shape == (IMAGE, 2 * IMAGE, 3)


def test_rollout_callback_logs_success_and_selects_checkpoints(tmp_path, one_thread) -> None:
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.rollouts import METRIC, RolloutMonitor, best_rollout_checkpoint

    spec = robot_spec()
    stage, tokenizer = tiny_stage(spec)
    batches = [make_batch(tokenizer, spec, batch_size=2, seed=s) for s in range(3)]
    cfg = RolloutConfig(enabled=True, env="robosuite-lift", every_n_steps=2, episodes=1, workers=1,
                        max_steps=3, monitor=True)
    processor = ImageProcessor(min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE)
    monitor = RolloutMonitor(cfg, tokenizer, processor, tmp_path)
    frozen = stage.backbone.lm_head
    frozen.eval()
    trainer = Trainer(max_steps=3, accelerator="cpu",
                      logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                      callbacks=[monitor, best_rollout_checkpoint(tmp_path, cfg)], enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    # A rollout at step 2 (every_n_steps) and one at the end (step 3); the pool is closed afterwards.
    reports = sorted(p.name for p in (tmp_path / "rollouts").iterdir())
    assert reports == ["step-0000002.json", "step-0000003.json"]
    assert monitor.pool is None
    step2 = json.loads((tmp_path / "rollouts" / "step-0000002.json").read_text())
    assert step2["metrics"]["episodes"] == 1 and step2["policy"]["step"] == 2
    step3 = json.loads((tmp_path / "rollouts" / "step-0000003.json").read_text())
    assert float(trainer.callback_metrics[METRIC]) == step3["metrics"]["success_rate"]
    best = list((tmp_path / "checkpoints").glob("best-rollout-step-*.ckpt"))
    assert [p.name for p in best] == ["best-rollout-step-0000002.ckpt"]
    # Train/eval flags are as before each rollout: the module trains, the frozen head stays in eval mode.
    assert stage.training and not frozen.training
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert METRIC in events.Tags()["scalars"] and "rollout/frames" in events.Tags()["images"]
    assert [e.step for e in events.Scalars(METRIC)] == [2, 3]
