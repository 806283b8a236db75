"""LightningModules, one per training stage, registered by name (`stage.name` in the config)."""

from __future__ import annotations

from dvlx.stages.base import DiffusionStage, lr_factor
from dvlx.stages.vl_pretrain import VLPretrain

STAGES: dict[str, type[DiffusionStage]] = {
    "vl_pretrain": VLPretrain,
}

__all__ = ["STAGES", "DiffusionStage", "VLPretrain", "lr_factor"]
