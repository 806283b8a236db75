"""The VLA stage (optimiser coverage, LoRA), exports and the Policy API on a tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from vla_batch import make_batch, tiny_backbone, tiny_spec

from dvlx.backbone import DreamVL
from dvlx.backbone.lora import merge_lora
from dvlx.config import ExperimentConfig, LoraConfig, ObjectiveConfig, StageConfig
from dvlx.export import write_export
from dvlx.objectives import OBJECTIVES
from dvlx.policy import ChunkExecutor, Policy, SpecMismatchError
from dvlx.processing import ImageProcessor, build_tiny_tokenizer
from dvlx.processing.action_tokens import ActionTokenizer
from dvlx.processing.robot import ArrayStats, Normalizer
from dvlx.stages import VLA


def build(objective: str, lora_rank: int = 0, spec=None):
    tokenizer = build_tiny_tokenizer()
    ActionTokenizer(tokenizer).ensure_tokens()
    spec = spec or tiny_spec()
    cfg = ExperimentConfig(
        stage=StageConfig(name="vla"),
        objective=ObjectiveConfig(name=objective),
        lora=LoraConfig(rank=lora_rank, alpha=8),
    )
    stage = VLA(cfg, tiny_backbone(tokenizer), tokenizer, spec)
    return stage, tokenizer, spec


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_every_trainable_parameter_is_optimised(objective: str, lora_rank: int) -> None:
    stage, tokenizer, spec = build(objective, lora_rank)
    optimizer = stage.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {name for name, p in stage.named_parameters() if p.requires_grad}
    assert {
        name for name, p in stage.named_parameters() if p.requires_grad and id(p) not in optimised
    } == set()
    assert any(name.startswith("objective.") for name in trainable)
    if lora_rank:
        backbone_trainable = {n for n in trainable if n.startswith("backbone.")}
        assert backbone_trainable and all("lora_" in n or "trainable_tokens" in n for n in backbone_trainable)
    batch = make_batch(tokenizer, spec, batch_size=2)
    loss = stage.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = [p for n, p in stage.named_parameters() if "lora_B" in n]
    assert not lora_rank or any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_lora_merge_restores_official_names_and_outputs(tmp_path: Path) -> None:
    stage, tokenizer, spec = build("l1", lora_rank=4)
    with torch.no_grad():
        for name, p in stage.backbone.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    batch = make_batch(tokenizer, spec, batch_size=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    before = stage.backbone(**inputs).logits
    assert merge_lora(stage.backbone) > 0
    after = stage.backbone(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    stage.backbone.save_pretrained(tmp_path / "merged")
    reloaded = DreamVL.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(**inputs).logits, before, atol=1e-4, rtol=1e-4)


def export_policy(tmp_path: Path, objective: str = "l1"):
    stats = ArrayStats(
        mean=[0.0] * 3,
        std=[1.0] * 3,
        min=[-2.0, 0.0, -1.0],
        max=[2.0, 10.0, 1.0],
        q01=[-2.0, 0.0, -1.0],
        q99=[2.0, 10.0, 1.0],
        count=10,
    )
    spec = dataclasses.replace(
        tiny_spec(), action_normalizer=Normalizer("bounds_q99", stats, [True, True, False]), center_crop=0.9
    )
    stage, tokenizer, spec = build(objective, spec=spec)
    processor = ImageProcessor(min_pixels=spec.image_size**2, max_pixels=spec.image_size**2)
    folder = write_export(
        tmp_path / "export",
        stage.backbone,
        tokenizer,
        processor,
        stage="VLA",
        step=1,
        objective=stage.objective,
        spec=spec,
    )
    return stage, folder, spec


def observation(spec, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 255, size=(80, 96, 3), dtype=np.uint8) for c in spec.cameras},
        "proprio": rng.uniform(-1, 1, size=spec.proprio_dim).astype(np.float32),
        "instruction": "Pick up the block.",
    }


@pytest.mark.parametrize("objective", ["l1", "flow_matching", "discrete"])
def test_policy_predicts_in_robot_units(tmp_path: Path, objective: str) -> None:
    stage, folder, spec = export_policy(tmp_path, objective)
    policy = Policy.from_pretrained(folder)
    obs = observation(spec)
    chunk = policy.predict(obs)
    assert chunk.shape == (spec.horizon, spec.action_dim) and chunk.dtype == np.float32
    torch.manual_seed(0)
    batch = policy.make_batch([obs])
    normalised = stage.objective.eval().sample(stage.backbone.eval(), batch).numpy()[0]
    expected = spec.action_normalizer.unnormalize(np.clip(normalised, -1, 1))
    if objective != "flow_matching":  # flow samples noise; the others are deterministic
        np.testing.assert_allclose(chunk, expected, atol=1e-5)
    # Dim 1 is normalised from [0, 10]: robot units leave [-1, 1]; dim 2 is not normalised. Predictions are
    # clipped to the training range before un-normalising.
    low, high = spec.action_normalizer.unnormalize(np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    assert np.all(chunk >= low - 1e-4) and np.all(chunk <= high + 1e-4)
    assert policy.predict_batch([obs, observation(spec, 1)]).shape == (2, spec.horizon, spec.action_dim)


def test_policy_refuses_mismatched_inputs(tmp_path: Path) -> None:
    _, folder, spec = export_policy(tmp_path)
    policy = Policy.from_pretrained(folder)
    obs = observation(spec)
    with pytest.raises(SpecMismatchError, match="lacks cameras"):
        policy.predict({**obs, "images": {spec.cameras[0]: obs["images"][spec.cameras[0]]}})
    with pytest.raises(SpecMismatchError, match="proprio"):
        policy.predict({**obs, "proprio": np.zeros(spec.proprio_dim + 1)})
    with pytest.raises(SpecMismatchError, match="uint8"):
        policy.predict({**obs, "images": {c: np.zeros((8, 8, 3), np.float32) for c in spec.cameras}})
    with pytest.raises(SpecMismatchError, match="fingerprint"):
        Policy.from_pretrained(folder, expected_spec_fingerprint="0" * 16)
    assert Policy.from_pretrained(folder, expected_spec_fingerprint="0" * 16, allow_spec_mismatch=True)
    with pytest.raises(FileNotFoundError, match="objective.safetensors"):
        (folder / "objective.safetensors").unlink()
        Policy.from_pretrained(folder)


def test_chunk_executor_runs_the_front_of_each_chunk() -> None:
    calls = []

    def predict(obs):
        calls.append(obs)
        return np.arange(8 * 2, dtype=np.float32).reshape(8, 2) + 100 * len(calls)

    executor = ChunkExecutor(predict, open_loop_steps=3)
    actions = [executor.act({"t": t}) for t in range(7)]
    assert [a[0] for a in actions] == [100, 102, 104, 200, 202, 204, 300]
    assert [c["t"] for c in calls] == [0, 3, 6]
    with pytest.raises(ValueError):
        ChunkExecutor(predict, 0)
