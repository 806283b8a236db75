"""Strategies from config: every 7B experiment builds its Lightning strategy (no GPU training is started),
batch layouts are derived and checked, activation checkpointing and regional compilation are applied."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from dvlx.backbone import DreamVL, preset_config
from dvlx.backbone.model import BLOCK_CLASSES
from dvlx.config import ConfigError, load_config
from dvlx.fit import _registries, build_trainer
from dvlx.processing import ImageProcessor, build_tiny_tokenizer
from dvlx.strategies import (
    DEEPSPEED_STAGES,
    batch_layout,
    build_strategy,
    compile_blocks,
    prepare_backbone,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS_7B = sorted((REPO / "experiments").glob("*_7b.yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def load(path: Path, *overrides: str):
    return load_config(path, list(overrides), **_registries())


def world_size(cfg) -> int:
    return int(cfg.trainer.devices) * cfg.trainer.num_nodes


def tiny_backbone() -> DreamVL:
    tok = build_tiny_tokenizer()
    return DreamVL(preset_config("tiny", vocab_size=len(tok), **tok.special_ids()))


def test_there_are_7b_experiments_with_each_kind_of_strategy() -> None:
    names = {load(p).trainer.strategy for p in EXPERIMENTS_7B}
    assert len(EXPERIMENTS_7B) >= 10
    assert {"ddp", "fsdp", "auto"} <= names
    qlora = load(REPO / "experiments" / "vla_libero_flow_matching_qlora_7b.yaml")
    assert (qlora.lora.quantize, qlora.optim.optimizer, qlora.trainer.devices) == ("nf4", "adamw8bit", 1)
    assert batch_layout(qlora, world_size=1).accumulate == 8


@pytest.mark.parametrize("path", EXPERIMENTS_7B, ids=lambda p: p.stem)
def test_every_7b_experiment_builds_its_strategy(path: Path) -> None:
    cfg = load(path)
    strategy = build_strategy(cfg)
    name = cfg.trainer.strategy
    layout = batch_layout(cfg, world_size(cfg))
    assert layout.global_batch == cfg.optim.global_batch_size
    assert cfg.trainer.precision in ("bf16-mixed", "bf16-true")
    if name == "ddp":
        assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        assert strategy._ddp_kwargs["find_unused_parameters"] is cfg.trainer.find_unused_parameters
    elif name == "fsdp":
        assert isinstance(strategy, FSDPStrategy)
        policy = strategy.kwargs["auto_wrap_policy"]
        assert set(policy._module_classes) == set(BLOCK_CLASSES)
        if cfg.backbone.gradient_checkpointing:
            ac_policy = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
            assert set(ac_policy._module_classes) == set(BLOCK_CLASSES)
        mp = strategy.mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (
            torch.bfloat16,
            torch.float32,
            torch.float32,
        )
        assert strategy._state_dict_type == cfg.trainer.fsdp_state_dict == "sharded"
    elif name in DEEPSPEED_STAGES:
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == DEEPSPEED_STAGES[name]
    else:
        # One device needs no distributed strategy (the QLoRA recipe); several must name theirs.
        assert name == "auto" and strategy == "auto" and world_size(cfg) == 1, path.name


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("name", sorted(DEEPSPEED_STAGES))
def test_deepspeed_stages_from_config(name: str) -> None:
    path = REPO / "experiments" / "vl_instruct_si_7b.yaml"
    cfg = load(path, f"trainer.strategy={name}", "trainer.cpu_offload=true")
    strategy = build_strategy(cfg)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == DEEPSPEED_STAGES[name]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == (name == "deepspeed_stage_3")
    assert strategy.config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert strategy.exclude_frozen_parameters  # built from a pretrained folder: keep what trains


def test_fsdp_precision_plugin_clips_through_the_root_module() -> None:
    cfg = load(REPO / "experiments" / "vl_instruct_si_7b.yaml")
    strategy = build_strategy(cfg)
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    plugin = strategy.precision_plugin
    assert isinstance(plugin, FSDPPrecision) and type(plugin) is not FSDPPrecision
    assert plugin.precision == "bf16-mixed" and plugin.strategy is strategy


def test_batch_layout_derivation_and_errors() -> None:
    path = REPO / "experiments" / "vla_libero_flow_matching_7b.yaml"
    cfg = load(path, "optim.global_batch_size=64", "data.batch_size=4")
    layout = batch_layout(cfg, world_size=8)
    assert (layout.per_device, layout.world_size, layout.accumulate, layout.global_batch) == (4, 8, 2, 64)
    assert layout.as_hparams()["batch/accumulate_grad_batches"] == 2
    with pytest.raises(ConfigError, match="optim.global_batch_size': 64 is not a multiple of .* 3 x 8"):
        batch_layout(load(path, "data.batch_size=3"), world_size=8)
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches': 4 disagrees"):
        batch_layout(load(path, "trainer.accumulate_grad_batches=4"), world_size=8)
    agree = load(path, "trainer.accumulate_grad_batches=2", "data.batch_size=4")
    assert batch_layout(agree, world_size=8).accumulate == 2
    free = load(path, "optim.global_batch_size=null", "trainer.accumulate_grad_batches=3")
    assert batch_layout(free, world_size=2).global_batch == 8 * 2 * 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=fsdb"], "'fsdb' is not one of .* \\(did you mean 'fsdp'\\?\\)"),
        (["trainer.fsdp_sharding=FULL"], "key 'trainer.fsdp_sharding'"),
        (["optim.optimizer=adam8"], "key 'optim.optimizer'"),
        (["lora.quantize=int3"], "key 'lora.quantize'"),
        (["lora.quantize=nf4", "lora.rank=0"], "need adapters"),
    ],
)
def test_bad_scaling_keys_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(REPO / "experiments" / "vla_libero_flow_matching_7b.yaml", *overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.quantize=nf4", "trainer.strategy=fsdp"], "cannot shard 4-bit base weights"),
        (["trainer.strategy=fsdp", "trainer.accelerator=cpu"], "'fsdp' needs GPUs"),
        (["trainer.strategy=fsdp", "trainer.fsdp_sharding=HYBRID_SHARD"], "HYBRID_SHARD needs num_nodes"),
    ],
)
def test_impossible_combinations_are_config_errors(overrides: list[str], message: str) -> None:
    cfg = load(REPO / "experiments" / "vla_libero_flow_matching_7b.yaml", *overrides)
    with pytest.raises(ConfigError, match=message):
        build_strategy(cfg)


def test_checkpointing_is_the_backbones_unless_fsdp_does_it() -> None:
    path = REPO / "experiments" / "vl_instruct_si_7b.yaml"
    for strategy, expected in (("ddp", True), ("deepspeed_stage_3", True), ("fsdp", False)):
        backbone = tiny_backbone()
        prepare_backbone(load(path, f"trainer.strategy={strategy}"), backbone)
        flags = {m.gradient_checkpointing for m in backbone.modules() if isinstance(m, BLOCK_CLASSES)}
        assert flags == {expected}, strategy
    backbone = tiny_backbone()
    prepare_backbone(load(path, "backbone.gradient_checkpointing=false"), backbone)
    assert not backbone.is_gradient_checkpointing


def test_compile_blocks_compiles_every_block_and_keeps_outputs(one_thread) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    eager = backbone(ids, mask).logits
    n_blocks = len(backbone.model.layers) + len(backbone.visual.blocks)
    # The `eager` backend traces with dynamo without generating kernels: the capture is tested, fast.
    assert compile_blocks(backbone, backend="eager", dynamic=True) == n_blocks
    assert all(m._compiled_call_impl is not None for m in backbone.modules() if isinstance(m, BLOCK_CLASSES))
    torch.testing.assert_close(backbone(ids, mask).logits, eager, atol=1e-5, rtol=1e-5)


def test_build_trainer_uses_the_strategy_and_the_derived_accumulation(tmp_path: Path) -> None:
    cfg = load(
        REPO / "experiments" / "tiny_vl_pretrain.yaml",
        f"output_dir={tmp_path}",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.batch_size=4",
        "optim.global_batch_size=24",
        "trainer.find_unused_parameters=true",
    )
    trainer = build_trainer(cfg, build_tiny_tokenizer(), ImageProcessor())
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert trainer.world_size == 2
    assert trainer.accumulate_grad_batches == 3


@pytest.mark.parametrize("vision_trains", [True, False])
def test_batch_flops_match_torch_flop_counter(vision_trains: bool, one_thread) -> None:
    """The throughput monitor's FLOPs per batch against torch's FLOP counter for one forward + backward
    (eager attention, so that the attention matmuls are counted too)."""
    import numpy as np
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from callbacks.throughput import BatchFlops

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=len(tok), **tok.special_ids())
    model = DreamVL(config, attn_implementation="eager")
    model.train().visual.requires_grad_(vision_trains)
    model.lm_head.requires_grad_(False)
    processor = ImageProcessor(min_pixels=112 * 112, max_pixels=112 * 112)
    rng = np.random.default_rng(0)
    vision = processor(images=[Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))] * 2)
    n_visual = processor.num_image_tokens(vision["image_grid_thw"][0])
    ids = torch.randint(0, 40, (2, 40))
    ids[:, 1 : 1 + n_visual] = model.config.image_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **vision}
    with FlopCounterMode(display=False) as counter:
        out = model(ids, batch["attention_mask"], vision["pixel_values"], vision["image_grid_thw"],
                    return_logits=False)
        out.last_hidden_state.sum().backward()
    # Exact when the tower trains; without, the projector's second layer gets an input gradient that the
    # per-module rule does not count (0.4 % here).
    assert BatchFlops(model)(batch) == pytest.approx(counter.get_total_flops(), rel=0.01)
