"""Test helper: a tiny VLA problem (tokenizer, action spec, backbone, batch) made without data files.

The batch has the layout of `data_modules.trajectory.TrajectoryDataModule` (see dvlx/objectives/base.py).
Images are random; `actions` depend on the first image's mean colour and on the proprio, so a model that
looks can fit them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dvlx.backbone import DreamVL, preset_config
from dvlx.processing import IGNORE_INDEX, ImageProcessor, build_tiny_tokenizer
from dvlx.processing.robot import ActionSpec, ArrayStats, Normalizer, encode_action_prompt


def tiny_spec(horizon: int = 4, action_dim: int = 3, proprio_dim: int = 2, cameras=("front", "wrist"),
              image_size: int = 56) -> ActionSpec:
    def stats(dim: int) -> ArrayStats:
        return ArrayStats(mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim, max=[1.0] * dim,
                          q01=[-1.0] * dim, q99=[1.0] * dim, count=100)

    return ActionSpec(
        horizon=horizon, max_horizon=horizon * 2, action_dim=action_dim, proprio_dim=proprio_dim,
        cameras=list(cameras), action_names=[f"a{i}" for i in range(action_dim)],
        proprio_names=[f"s{i}" for i in range(proprio_dim)], control_hz=20.0,
        action_normalizer=Normalizer("bounds_q99", stats(action_dim), [True] * action_dim),
        proprio_normalizer=(
            Normalizer("bounds_q99", stats(proprio_dim), [True] * proprio_dim) if proprio_dim else None
        ),
        image_size=image_size,
    )


def tiny_backbone(tokenizer, seed: int = 0, **overrides) -> DreamVL:
    torch.manual_seed(seed)
    return DreamVL(preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids(), **overrides))


def make_batch(tokenizer, spec: ActionSpec, batch_size: int = 3, seed: int = 0,
               instructions: list[str] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    processor = ImageProcessor(min_pixels=spec.image_size ** 2, max_pixels=spec.image_size ** 2)
    rows, pixel_values, grids, actions, proprio = [], [], [], [], []
    for b in range(batch_size):
        colour = rng.integers(0, 256, size=3)
        images = []
        for _ in spec.cameras:
            pixels = np.clip(colour + rng.normal(0, 20, size=(spec.image_size, spec.image_size, 3)), 0, 255)
            images.append(Image.fromarray(pixels.astype(np.uint8)))
        vision = processor(images=images)
        pixel_values.append(vision["pixel_values"])
        grids.append(vision["image_grid_thw"])
        counts = [processor.num_image_tokens(g) for g in vision["image_grid_thw"]]
        instruction = instructions[b] if instructions else "pick up the block"
        prompt = encode_action_prompt(tokenizer, instruction, counts, spec.horizon * spec.action_dim,
                                      use_proprio=spec.proprio_dim > 0)
        rows.append(prompt)
        state = rng.uniform(-1, 1, size=spec.proprio_dim)
        base = (colour / 127.5 - 1.0)[: spec.action_dim]
        base = np.resize(base, spec.action_dim)
        chunk = np.stack([np.clip(base * (1 - 0.1 * k) + 0.1 * np.resize(state, spec.action_dim), -1, 1)
                          for k in range(spec.horizon)])
        actions.append(chunk)
        proprio.append(state)
    length = max(len(r.input_ids) for r in rows)

    def pad(values, fill):
        return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values])

    return {
        "input_ids": pad([r.input_ids for r in rows], tokenizer.pad_token_id),
        "labels": pad([r.labels for r in rows], IGNORE_INDEX),
        "attention_mask": pad([[1] * len(r.input_ids) for r in rows], 0),
        "action_slots": pad([r.action_slots for r in rows], False).bool(),
        "proprio_slots": pad([r.proprio_slots for r in rows], False).bool(),
        "prefix_mask": pad([r.prefix for r in rows], False).bool(),
        "pixel_values": torch.cat(pixel_values),
        "image_grid_thw": torch.cat(grids),
        "actions": torch.tensor(np.stack(actions), dtype=torch.float32),
        "action_valid": torch.ones(batch_size, spec.horizon, dtype=torch.bool),
        "proprio": torch.tensor(np.stack(proprio), dtype=torch.float32),
        "dataset": torch.zeros(batch_size, dtype=torch.long),
    }


def tiny_problem(batch_size: int = 3, **spec_kwargs):
    tokenizer = build_tiny_tokenizer()
    spec = tiny_spec(**spec_kwargs)
    return tokenizer, spec, make_batch(tokenizer, spec, batch_size)
