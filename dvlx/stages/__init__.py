"""LightningModules, one per training stage, registered by name (`stage.name` in the config)."""

from __future__ import annotations

from dvlx.stages.base import DiffusionStage, lr_factor
from dvlx.stages.vl_instruct import VLInstruct
from dvlx.stages.vl_pretrain import VLPretrain
from dvlx.stages.vla import VLA

STAGES: dict[str, type] = {
    "vl_pretrain": VLPretrain,
    "vl_instruct": VLInstruct,
    "vla": VLA,
}

__all__ = ["STAGES", "VLA", "DiffusionStage", "VLInstruct", "VLPretrain", "lr_factor"]
