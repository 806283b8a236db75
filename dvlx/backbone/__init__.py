"""Dream-VL backbone: bidirectional Qwen2 LM + Qwen2-VL vision tower + projector, official layout."""

from dvlx.backbone.config import ATTENTION_MODES, CheckpointError, DreamVLConfig, VisionConfig
from dvlx.backbone.model import DreamVL, DreamVLOutput
from dvlx.backbone.presets import preset_config

__all__ = [
    "ATTENTION_MODES",
    "CheckpointError",
    "DreamVL",
    "DreamVLConfig",
    "DreamVLOutput",
    "VisionConfig",
    "preset_config",
]
