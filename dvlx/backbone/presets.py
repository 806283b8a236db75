"""Named architecture presets: `7b` (the official Dream-VL-7B config), `tiny` (CPU tests and demos) and
`small` (CPU demos that need a little more capacity)."""

from __future__ import annotations

import dataclasses
import difflib
import json
from importlib import resources
from typing import Any

from dvlx.backbone.config import SPECIAL_TOKEN_FIELDS, DreamVLConfig, VisionConfig

_OFFICIAL_7B = "dream_vl_7b.json"


def _config_7b(overrides: dict[str, Any]) -> DreamVLConfig:
    raw = json.loads(resources.files("dvlx.backbone").joinpath(_OFFICIAL_7B).read_text())
    official = DreamVLConfig.from_dict(raw, source=f"dvlx/backbone/{_OFFICIAL_7B}")
    return dataclasses.replace(official, **overrides)


def _config_tiny(overrides: dict[str, Any]) -> DreamVLConfig:
    # The vocabulary and special ids belong to the tokenizer, so the caller must pass them.
    required = ("vocab_size", *SPECIAL_TOKEN_FIELDS)
    missing = [name for name in required if name not in overrides]
    if missing:
        raise ValueError(f"preset 'tiny' needs these from the tokenizer: {', '.join(missing)}")
    hidden = overrides.get("hidden_size", 64)
    vision = VisionConfig(
        depth=2,
        embed_dim=32,
        num_heads=2,
        mlp_ratio=2,
        hidden_size=hidden,
        patch_size=14,
        spatial_patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
    )
    base: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
        # 0.02 (the 7B value) is small for width 64: the random tower and projector then hand the LM image
        # features about 50x smaller than the text embeddings, and a tiny model learns to ignore them.
        "initializer_range": 0.05,
        "vision_config": vision,
    }
    return DreamVLConfig(**{**base, **overrides})


def _config_small(overrides: dict[str, Any]) -> DreamVLConfig:
    # Twice the tiny width and depth, for CPU demos that need two-hop grounding (find the shape a question
    # names, then read its position); tests keep using `tiny`.
    missing = [name for name in ("vocab_size", *SPECIAL_TOKEN_FIELDS) if name not in overrides]
    if missing:
        raise ValueError(f"preset 'small' needs these from the tokenizer: {', '.join(missing)}")
    hidden = overrides.get("hidden_size", 128)
    vision = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2, "hidden_size": hidden}
    base = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vision_config": VisionConfig(**vision),
    }
    return _config_tiny({**base, **overrides})


_PRESETS = {"7b": _config_7b, "tiny": _config_tiny, "small": _config_small}


def preset_config(name: str, **overrides: Any) -> DreamVLConfig:
    """Config of a named preset with field overrides (`vision_config` may be a VisionConfig or a dict)."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(_PRESETS)}.{hint}")
    field_names = {f.name for f in dataclasses.fields(DreamVLConfig)}
    for key in overrides:
        if key not in field_names:
            close = difflib.get_close_matches(key, sorted(field_names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown DreamVLConfig field {key!r} in preset overrides.{hint}")
    if isinstance(overrides.get("vision_config"), dict):
        overrides["vision_config"] = VisionConfig(**overrides["vision_config"])
    return _PRESETS[name](overrides)


__all__ = ["preset_config"]
