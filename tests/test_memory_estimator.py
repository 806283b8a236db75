"""The memory estimator (`python -m dvlx.bench memory`) against memory measured on CPU with the tiny model.

Weights, gradients and optimiser states must match the real tensors' bytes exactly; activations, measured on
the meta device per block, must match the bytes a real CPU forward leaves allocated for the backward
(torch.profiler's memory accounting) within 5 %.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from dvlx.bench import memory
from dvlx.bench.memory import Job, build_stage, count_parameters, measure_activations, sequence_shape
from dvlx.processing import IGNORE_INDEX, ImageProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

WIDER = {"hidden_size": 128, "intermediate_size": 256}


def job(**changes) -> Job:
    base = dict(
        preset="tiny", stage="vl_instruct", batch=2, images=1, image_size=112, text_tokens=40, loss_tokens=20,
        precision="32-true", horizon=2, action_dim=3, proprio_dim=0, preset_overrides=WIDER,
    )
    return Job(**{**base, **changes})


def real_stage(j: Job, quantize: bool = False):
    torch.manual_seed(0)
    stage = build_stage(j, "cpu", quantize=quantize).train()
    if hasattr(stage, "_frozen_eval"):
        stage._frozen_eval()
    return stage


def real_batch(stage, j: Job) -> dict:
    """A batch of the job's shapes: `images` images of image_size^2 per sample, padding in the last row."""
    config = stage.backbone.config
    length, visual, _ = sequence_shape(config, j)
    rng = np.random.default_rng(0)
    size = j.image_size
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(j.batch)]
    vision = ImageProcessor(min_pixels=size**2, max_pixels=size**2)(images=images * j.images)
    ids = torch.randint(0, 40, (j.batch, length))
    ids[:, 2 : 2 + visual] = config.image_token_id
    answer = slice(length - j.loss_tokens - 1, length - 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, answer] = ids[:, answer]
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # padding, so the additive attention bias exists as in real batches
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def allocated_by(fn) -> int:
    """Bytes allocated and not freed while `fn` runs (torch.profiler's CPU memory accounting)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    net = sum(event.self_cpu_memory_usage for event in prof.key_averages())
    del result
    return net


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_weights_gradients_and_optimizer_states_are_exact(optimizer: str) -> None:
    j = job(stage="vla", lora_rank=4, optimizer=optimizer)
    counts = count_parameters(build_stage(j, "meta"), j)
    stage = real_stage(j)
    assert counts.parameters == sum(p.numel() for p in stage.parameters())
    assert counts.trainable == sum(p.numel() for p in stage.parameters() if p.requires_grad)
    weights, grads, states = memory.state_bytes(counts, j, "ddp", 1)
    assert weights == sum(p.numel() * p.element_size() for p in stage.parameters())

    optim = stage.configure_optimizers()["optimizer"]
    for p in stage.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optim.step()
    real_grads = [p.grad for p in stage.parameters() if p.grad is not None]
    assert grads == sum(g.numel() * g.element_size() for g in real_grads)
    tensors = {
        t.untyped_storage()._cdata: t
        for state in optim.state.values()
        for key, t in state.items()
        if torch.is_tensor(t) and key != "step"
    }
    assert states == sum(t.untyped_storage().nbytes() for t in tensors.values())


def test_nf4_weight_bytes_match_the_quantised_model() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    j = job(stage="vla", lora_rank=4, quantize="nf4", precision="bf16-true")
    counts = count_parameters(build_stage(j, "meta"), j)
    stage = real_stage(j, quantize=True)
    real = quantized = 0
    for module in stage.backbone.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        quantized += module.in_features * module.out_features
        weight = module.weight
        state = weight.quant_state
        real += weight.numel() * weight.element_size() + state.absmax.numel() + 4  # uint8 scales, offset
        real += (state.code.numel() + state.state2.code.numel() + state.state2.absmax.numel()) * 4
    assert counts.quantized_bytes == real
    assert counts.quantized == quantized > 0


@pytest.mark.parametrize(
    ("changes", "checkpointing"),
    [
        ({}, False),
        ({}, True),
        ({"stage": "vla", "lora_rank": 4}, False),
        ({"stage": "vl_pretrain", "trainable": ["projector"]}, False),
    ],
    ids=["vl_instruct", "vl_instruct-checkpointing", "vla-lora", "vl_pretrain-projector"],
)
def test_activation_estimate_matches_the_cpu_measurement(changes: dict, checkpointing: bool) -> None:
    j = job(**changes)
    estimate = measure_activations(build_stage(j, "meta"), j).retained(checkpointing)
    stage = real_stage(j)
    if checkpointing:
        stage.backbone.gradient_checkpointing_enable()
    batch = real_batch(stage, j)
    if j.stage == "vla":

        def forward():
            out = stage.backbone(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                return_logits=False,
            )
            return out.last_hidden_state

    else:

        def forward():
            return stage._diffusion_loss(batch, t=torch.ones(j.batch))  # every answer token masked

    forward()  # first calls allocate lazily built tables (rotary caches)
    measured = allocated_by(forward)
    # The VLA forward's output (the final hidden states) is alive but is not an activation.
    if j.stage == "vla":
        length = batch["input_ids"].shape[1]
        measured -= j.batch * length * stage.backbone.config.hidden_size * 4
    assert measured > 0
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)


def test_checkpointing_and_batch_scale_the_estimate() -> None:
    small, large = job(batch=2), job(batch=4)
    a = measure_activations(build_stage(small, "meta"), small)
    b = measure_activations(build_stage(large, "meta"), large)
    assert a.retained(True) < a.retained(False) / 2
    # Everything but the logits workspace scales with the batch.
    assert b.retained(False) == pytest.approx(2 * a.retained(False), rel=1e-6)


def test_7b_vla_qlora_report(capsys: pytest.CaptureFixture) -> None:
    argv = ["--preset", "7b", "--stage", "vla", "--lora", "32", "--batch", "8", "--quantize", "nf4",
            "--optimizer", "adamw8bit", "--precision", "bf16-true", "--world-sizes", "1"]
    assert memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "OpenVLA-OFT" in out and "62 GB" in out
    assert "trainable" in out and "NF4 7." in out
    row = next(line for line in out.splitlines() if line.startswith("ddp"))
    assert row.split()[-1] in ("yes", "no")
    assert memory.main(["--preset", "7b", "--quantize", "nf4"]) == 2  # QLoRA needs adapters
    assert memory.main(["--preset", "7b", "--stage", "vl_instruct", "--lora", "8"]) == 2  # vla only
    assert memory.main(["--preset", "7b", "--lora", "8", "--quantize", "nf4", "--strategies", "fsdp"]) == 0
    assert "fsdp" not in [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
