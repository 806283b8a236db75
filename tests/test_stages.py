"""Stage behaviour: what trains, what stays frozen, and the LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_modules.image_text import collate_image_text
from dvlx.config import OptimConfig, load_config
from dvlx.fit import build_backbone, build_image_processor, build_stage, build_tokenizer
from dvlx.processing import encode_conversation
from dvlx.stages import lr_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(REPO / "experiments" / "tiny_vl_pretrain.yaml", ["stage.trainable=null"])
    tokenizer = build_tokenizer(cfg)
    processor = build_image_processor(cfg)
    torch.manual_seed(0)
    stage = build_stage(cfg, build_backbone(cfg, tokenizer))
    samples = []
    for colour, caption in [((255, 0, 0), "a red square at the top left"), ((0, 0, 255), "a blue circle")]:
        image = Image.new("RGB", (112, 112), colour)
        vision = processor(images=[image])
        n = processor.num_image_tokens(vision["image_grid_thw"][0])
        conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]
        enc = encode_conversation(tokenizer, conv, "plain", num_image_tokens=[n], num_eos=1)
        samples.append({"input_ids": enc.input_ids, "labels": enc.labels, **vision})
    batch = collate_image_text(samples, pad_token_id=tokenizer.pad_token_id)
    return cfg, stage, batch


def test_vl_pretrain_trains_only_the_projector(setup) -> None:
    _, stage, batch = setup
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("backbone.projector.") for n in trainable)
    optimizer = stage.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in stage.parameters() if p.requires_grad}

    seen = {}

    def record(module, inputs, output) -> None:
        seen["requires_grad"] = output.pooler_output.requires_grad

    handle = stage.backbone.visual.register_forward_hook(record)
    try:
        loss = stage._diffusion_loss(dict(batch))[0].loss
    finally:
        handle.remove()
    loss.backward()
    assert seen["requires_grad"] is False  # the frozen tower ran without autograd
    for name, p in stage.named_parameters():
        if name.startswith("backbone.projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    stage.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("trainable", "expected_prefixes"),
    [
        ("[projector,lm]", ("backbone.projector.", "backbone.model.", "backbone.lm_head.")),
        ("[vision]", ("backbone.visual.blocks.1.", "backbone.visual.merger.")),
        ("[merger]", ("backbone.visual.merger.",)),
    ],
)
def test_trainable_parts(trainable: str, expected_prefixes: tuple[str, ...]) -> None:
    cfg = load_config(
        REPO / "experiments" / "tiny_vl_pretrain.yaml",
        [f"stage.trainable={trainable}", "stage.vision_from_block=1"],
    )
    tokenizer = build_tokenizer(cfg)
    stage = build_stage(cfg, build_backbone(cfg, tokenizer))
    trainable_names = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert all(n.startswith(expected_prefixes) for n in trainable_names)
    for prefix in expected_prefixes:
        assert any(n.startswith(prefix) for n in trainable_names), prefix
    assert not any(n.startswith("backbone.visual.blocks.0.") for n in trainable_names)


def test_lr_schedule() -> None:
    optim = OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    total = 100
    values = [lr_factor(s, optim, total) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(total, optim, total) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    constant = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_factor(s, constant, 10) for s in range(10)} == {1.0}
