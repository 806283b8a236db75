"""Scale-out from the config: Lightning strategies, activation checkpointing, torch.compile, the batch layout.

`trainer.strategy` picks one of Lightning's strategies; nothing here is a home-made distributed loop:
- `auto`: Lightning's choice (one device: none; several: DDP).
- `ddp`: `DDPStrategy` (`trainer.find_unused_parameters`), gradients bucketed as views.
- `fsdp`: `FSDPStrategy` wrapping every LM decoder layer and every vision block (`BLOCK_CLASSES`) in its own
  FSDP unit; activation checkpointing (`backbone.gradient_checkpointing`) through the strategy's policy on
  the same blocks; bf16 parameters with float32 gradient reduction and float32 buffers (the rotary tables
  must not be narrowed); checkpoints sharded per rank (`trainer.fsdp_state_dict`).
- `deepspeed_stage_2` / `deepspeed_stage_3`: `DeepSpeedStrategy` (ZeRO-2: gradients and optimiser states
  sharded; ZeRO-3: parameters too), optional CPU offload.
Without FSDP, activation checkpointing is the backbone's own (`DreamVL.gradient_checkpointing_enable`: every
decoder layer and vision block). The global batch is `data.batch_size x world size x accumulation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dvlx.backbone.model import BLOCK_CLASSES
from dvlx.config import ConfigError, ExperimentConfig

DEEPSPEED_STAGES = {"deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
_BF16_PRECISIONS = ("bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class BatchLayout:
    """How one optimiser step's samples are spread: per device, over devices x nodes, over micro-batches."""

    per_device: int
    world_size: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world_size * self.accumulate

    def as_hparams(self) -> dict[str, int]:
        return {
            "batch/global": self.global_batch,
            "batch/per_device": self.per_device,
            "batch/world_size": self.world_size,
            "batch/accumulate_grad_batches": self.accumulate,
        }


def batch_layout(cfg: ExperimentConfig, world_size: int) -> BatchLayout:
    """Gradient accumulation from `optim.global_batch_size` (when set) or `trainer.accumulate_grad_batches`.

    Setting both is allowed only when they agree; a global batch that is not a multiple of the per-device
    batch times the world size is an error.
    """
    per_device = cfg.data.batch_size
    accumulate = cfg.trainer.accumulate_grad_batches
    wanted = cfg.optim.global_batch_size
    if wanted is not None:
        per_step = per_device * world_size
        if wanted % per_step:
            raise ConfigError(
                f"key 'optim.global_batch_size': {wanted} is not a multiple of data.batch_size x world size "
                f"= {per_device} x {world_size}"
            )
        derived = wanted // per_step
        if accumulate not in (1, derived):
            raise ConfigError(
                f"key 'trainer.accumulate_grad_batches': {accumulate} disagrees with optim.global_batch_size "
                f"{wanted} = {per_device} per device x {world_size} devices x {derived}; set only one"
            )
        accumulate = derived
    return BatchLayout(per_device=per_device, world_size=world_size, accumulate=accumulate)


def fsdp_mixed_precision(precision: str):
    """FSDP's MixedPrecision for a Lightning precision flag: bf16 parameters in compute, float32 gradient
    reduction and float32 buffers; None (Lightning's default) for other flags."""
    if precision not in _BF16_PRECISIONS:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def strategy_checkpoints_activations(cfg: ExperimentConfig) -> bool:
    """True when the strategy (FSDP's policy), not the backbone, recomputes the blocks in backward."""
    return cfg.trainer.strategy == "fsdp" and cfg.backbone.gradient_checkpointing


def _check_combination(cfg: ExperimentConfig) -> None:
    t = cfg.trainer
    if cfg.lora.quantize is not None and t.strategy in ("fsdp", *DEEPSPEED_STAGES):
        raise ConfigError(
            f"key 'trainer.strategy': '{t.strategy}' cannot shard 4-bit base weights (lora.quantize="
            f"{cfg.lora.quantize}); QLoRA runs on one device or with 'ddp'"
        )
    if t.strategy == "fsdp" and t.accelerator == "cpu":
        raise ConfigError("key 'trainer.strategy': 'fsdp' needs GPUs (FSDP has no CPU backend); use 'ddp'")
    if t.fsdp_sharding == "HYBRID_SHARD" and t.strategy == "fsdp" and t.num_nodes < 2:
        raise ConfigError("key 'trainer.fsdp_sharding': HYBRID_SHARD needs num_nodes >= 2")


def _fsdp_strategy_class():
    """Lightning's FSDPStrategy with working `gradient_clip_val`: Lightning's FSDP precision plugin refuses to
    clip by norm because it cannot reach the root FSDP module; the strategy can, and FSDP's own
    `clip_grad_norm_` computes the norm over all shards."""
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    class RootClipPrecision(FSDPPrecision):
        def __init__(self, precision, scaler, strategy: FSDPStrategy) -> None:
            super().__init__(precision, scaler)
            self.strategy = strategy

        def clip_grad_by_norm(self, optimizer, clip_val) -> None:
            self.strategy.model.clip_grad_norm_(clip_val)

    class ClippingFSDPStrategy(FSDPStrategy):
        @property
        def precision_plugin(self) -> FSDPPrecision:
            return FSDPStrategy.precision_plugin.fget(self)

        @precision_plugin.setter
        def precision_plugin(self, plugin) -> None:
            if plugin is not None and type(plugin) is FSDPPrecision:
                plugin = RootClipPrecision(plugin.precision, plugin.scaler, self)
            FSDPStrategy.precision_plugin.fset(self, plugin)

    return ClippingFSDPStrategy


def build_strategy(cfg: ExperimentConfig):
    """The `strategy` argument of `lightning.Trainer` for `cfg.trainer.strategy` (a string for `auto`)."""
    _check_combination(cfg)
    t = cfg.trainer
    name = t.strategy
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=t.find_unused_parameters, gradient_as_bucket_view=True)
    if name == "fsdp":
        blocks = set(BLOCK_CLASSES)
        return _fsdp_strategy_class()(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if cfg.backbone.gradient_checkpointing else None,
            mixed_precision=fsdp_mixed_precision(t.precision),
            sharding_strategy=t.fsdp_sharding,
            state_dict_type=t.fsdp_state_dict,
            cpu_offload=t.cpu_offload,
            limit_all_gathers=True,
        )
    if name in DEEPSPEED_STAGES:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        stage = DEEPSPEED_STAGES[name]
        return DeepSpeedStrategy(
            stage=stage,
            offload_optimizer=t.cpu_offload,
            offload_parameters=t.cpu_offload and stage == 3,
            logging_batch_size_per_gpu=cfg.data.batch_size,
            # A run built from a pretrained folder checkpoints only what trains (as without DeepSpeed).
            exclude_frozen_parameters=cfg.backbone.pretrained is not None,
        )
    raise ConfigError(f"key 'trainer.strategy': unknown strategy '{name}'")


def compile_blocks(backbone: nn.Module, **options) -> int:
    """`torch.compile` every decoder layer and vision block in place (regional compilation: one small graph
    reused by all blocks of a kind, compiled once, and FSDP units and checkpoint wrappers stay as they are).
    Returns how many blocks were compiled."""
    count = 0
    for module in backbone.modules():
        if isinstance(module, BLOCK_CLASSES):
            module.compile(**options)
            count += 1
    return count


def prepare_backbone(cfg: ExperimentConfig, backbone) -> None:
    """Activation checkpointing (unless FSDP's policy does it) and regional torch.compile, from the config."""
    if cfg.backbone.gradient_checkpointing and not strategy_checkpoints_activations(cfg):
        backbone.gradient_checkpointing_enable()
    if cfg.trainer.compile:
        # Sequence lengths vary from batch to batch; dynamic shapes avoid one recompilation per length.
        compile_blocks(backbone, dynamic=True)


__all__ = [
    "BatchLayout",
    "DEEPSPEED_STAGES",
    "batch_layout",
    "build_strategy",
    "compile_blocks",
    "fsdp_mixed_precision",
    "prepare_backbone",
    "strategy_checkpoints_activations",
]
