"""QLoRA (NF4 base weights under LoRA adapters) and 8-bit AdamW on the tiny VLA, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vla_batch import make_batch, tiny_backbone, tiny_spec

from dvlx.backbone import DreamVL
from dvlx.backbone.lora import lora_target_names, merge_lora
from dvlx.config import ExperimentConfig, LoraConfig, ObjectiveConfig, OptimConfig, StageConfig
from dvlx.processing import build_tiny_tokenizer
from dvlx.stages import VLA

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")


def build(
    rank: int = 4, quantize: str | None = "nf4", optimizer: str = "adamw8bit", lr: float = 3e-3, seed: int = 0
):
    tokenizer = build_tiny_tokenizer()
    spec = tiny_spec()
    cfg = ExperimentConfig(
        stage=StageConfig(name="vla"),
        objective=ObjectiveConfig(name="l1"),
        lora=LoraConfig(rank=rank, alpha=8, quantize=quantize),
        optim=OptimConfig(lr=lr, optimizer=optimizer, warmup_ratio=0.0, schedule="constant"),
    )
    return VLA(cfg, tiny_backbone(tokenizer, seed=seed), tokenizer, spec), tokenizer, spec


def backbone_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def test_nf4_replaces_every_adapted_linear_and_only_adapters_train() -> None:
    stage, tokenizer, _ = build()
    targets = lora_target_names(tiny_backbone(tokenizer), ["all-linear"])
    for name in targets:
        adapted = stage.backbone.get_submodule(name)
        base = adapted.get_base_layer()
        assert type(adapted).__module__ == "peft.tuners.lora.bnb", name  # peft's 4-bit LoRA layer
        assert isinstance(base, bnb.nn.Linear4bit) and base.compute_dtype == torch.bfloat16
        assert base.weight.quant_type == "nf4" and base.weight.dtype == torch.uint8
        assert base.weight.numel() * 2 == base.in_features * base.out_features  # two weights per byte
        assert not base.weight.requires_grad
    trainable = [n for n, p in stage.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("objective.") for n in trainable)


def test_nf4_forward_is_close_to_full_precision_at_init() -> None:
    quantized, tokenizer, spec = build()
    plain, _, _ = build(quantize=None)
    batch = make_batch(tokenizer, spec, batch_size=2)
    with torch.no_grad():
        a = quantized.backbone(**backbone_inputs(batch)).last_hidden_state
        b = plain.backbone(**backbone_inputs(batch)).last_hidden_state
    relative = float((a - b).norm() / b.norm())
    # LoRA starts at zero, so the difference is the NF4 rounding of the base weights alone (about 9 % per
    # random layer, compounded over the tower, projector and LM).
    assert 1e-3 < relative < 0.3, relative


def test_a_quantised_layer_computes_with_its_dequantised_weight() -> None:
    from dvlx.backbone.lora import quantize_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96))
    reference = model[0].weight.detach().clone()
    x = torch.randn(5, 64)
    quantize_linear(model, ["0"])
    layer = model[0]
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert weight.shape == reference.shape
    assert 0.01 < float((weight - reference).norm() / reference.norm()) < 0.15
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, atol=2e-2, rtol=2e-2)


def test_qlora_with_adamw8bit_learns_a_fixed_batch() -> None:
    stage, tokenizer, spec = build()
    stage.train()
    optimizer = stage.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    batch = make_batch(tokenizer, spec, batch_size=4)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = stage.training_step(batch, 0)
        loss.backward()
        if not losses:
            lora_b = [p.grad for n, p in stage.named_parameters() if "lora_B" in n]
            assert lora_b and all(g is not None for g in lora_b)
            assert any(float(g.abs().sum()) > 0 for g in lora_b)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_adamw8bit_keeps_8bit_states_for_large_tensors() -> None:
    stage, tokenizer, spec = build(rank=0, quantize=None, lr=1e-3)
    stage.train()
    optimizer = stage.configure_optimizers()["optimizer"]
    batch = make_batch(tokenizer, spec, batch_size=4)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = stage.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    large = [p for p in stage.parameters() if p.requires_grad and p.numel() >= 4096]
    small = [p for p in stage.parameters() if p.requires_grad and p.numel() < 4096]
    assert large and small
    assert all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    assert all(optimizer.state[p]["state1"].dtype == torch.float32 for p in small)
    assert losses[-1] < losses[0], losses


def test_merged_qlora_is_a_plain_model_with_the_same_outputs(tmp_path: Path) -> None:
    stage, tokenizer, spec = build()
    with torch.no_grad():
        for name, p in stage.backbone.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    batch = make_batch(tokenizer, spec, batch_size=2)
    with torch.no_grad():
        before = stage.backbone(**backbone_inputs(batch)).last_hidden_state
    assert merge_lora(stage.backbone) > 0
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in stage.backbone.modules())
    assert all(p.dtype == torch.float32 for p in stage.backbone.parameters())
    with torch.no_grad():
        after = stage.backbone(**backbone_inputs(batch)).last_hidden_state
    # The adapted model computes its base matmuls in bf16; the merged one in float32.
    assert float((after - before).norm() / before.norm()) < 2e-2
    stage.backbone.save_pretrained(tmp_path / "merged")
    reloaded = DreamVL.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = reloaded(**backbone_inputs(batch)).last_hidden_state
    torch.testing.assert_close(again, after, atol=1e-5, rtol=1e-5)


def test_quantized_stage_state_round_trips() -> None:
    """What a checkpoint holds (packed NF4 weights, their quantisation state, adapters) restores exactly."""
    stage, tokenizer, spec = build()
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    state = {k: v.clone() for k, v in stage.state_dict().items()}
    assert any(k.endswith("weight.absmax") for k in state)
    fresh, _, _ = build(seed=1)  # other base weights, hence other NF4 codes and scales
    fresh.load_state_dict(state)
    batch = make_batch(tokenizer, spec, batch_size=2)
    with torch.no_grad():
        expected = stage.backbone(**backbone_inputs(batch)).last_hidden_state
        got = fresh.backbone(**backbone_inputs(batch)).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
