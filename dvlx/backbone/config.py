"""Typed configuration of the Dream-VL backbone, read from and written to the official config.json."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTENTION_MODES = ("full", "prefix", "causal")
"""`full`: bidirectional (Dream); `prefix`: prompt tokens never see answer tokens; `causal`: AR baseline."""

TORCH_DTYPES = ("float32", "bfloat16", "float16")

# Keys the official config.json carries that dvlx does not model; they are written back (adjusted to the
# model's sizes) so the official tooling can read an export. `mrope_section` is inert for Dream-VL because
# its template never emits <|vision_start|>, but the official code splits head_dim/2 by it.
_OFFICIAL_CONSTANTS: dict[str, Any] = {
    "model_type": "dream-vl",
    "full_attn_mask": True,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "use_cache": False,
}


SPECIAL_TOKEN_FIELDS = (
    "mask_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
)


class CheckpointError(ValueError):
    """A checkpoint folder or config file does not match what Dream-VL expects."""


@dataclass(kw_only=True)
class VisionConfig:
    """Qwen2-VL vision tower: ViT over 14x14x2 patches, 2x2 patch merger to `hidden_size`."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: int
    hidden_size: int
    """Width of the merger output (the projector input)."""
    patch_size: int = 14
    spatial_patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_chans: int = 3
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"vision_config.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                "vision_config head dim must be a multiple of 4 (2-D rotary over rows and columns)"
            )
        if self.spatial_patch_size != self.patch_size:
            raise ValueError(
                f"vision_config.spatial_patch_size {self.spatial_patch_size} must equal patch_size "
                f"{self.patch_size}"
            )

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row fed to the tower: channels x frames x patch x patch (1176 for 7b)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(kw_only=True)
class DreamVLConfig:
    """Dream-VL backbone: Qwen2.5-style decoder (bidirectional), Qwen2-VL ViT, 2-layer GELU projector.

    Field names are the official config.json keys; special token ids always come from the checkpoint or the
    tokenizer.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    mask_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    vision_token_id: int
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int
    vision_config: VisionConfig
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    projector_hidden_act: str = "gelu"
    torch_dtype: str = "bfloat16"
    attention: str = "full"
    """Default attention mode (one of ATTENTION_MODES); a forward call may override it."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype must be one of {TORCH_DTYPES}, got {self.torch_dtype!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be false: Dream-VL has a separate lm_head")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act must be 'gelu', got {self.projector_hidden_act!r}")
        for name in SPECIAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> DreamVLConfig:
        """Build from an official-layout dict; unknown keys are ignored, bad ones raise CheckpointError."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(d).__name__}")
        vision_raw = d.get("vision_config")
        if not isinstance(vision_raw, dict):
            what = "missing" if vision_raw is None else f"a {type(vision_raw).__name__}"
            raise CheckpointError(f"{source}: key 'vision_config' must be an object, got {what}")
        vision = _build(VisionConfig, vision_raw, source, prefix="vision_config.")
        return _build(cls, {**d, "vision_config": vision}, source, prefix="")

    @classmethod
    def from_json(cls, path: str | Path) -> DreamVLConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: invalid JSON ({err})") from err
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Official key names (plus dvlx's `attention`), readable by the official tooling."""
        out: dict[str, Any] = dict(_OFFICIAL_CONSTANTS)
        out.update(dataclasses.asdict(self))
        half = self.head_dim // 2
        spatial = (half - self.head_dim // 8) // 2
        out["mrope_section"] = [half - 2 * spatial, spatial, spatial]
        out["max_window_layers"] = self.num_hidden_layers
        return dict(sorted(out.items()))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str) -> Any:
    """Type-check `raw` against the dataclass `cls` and construct it; errors name `source` and the key."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CheckpointError(f"{source}: required key '{prefix}{f.name}' is missing")
            continue
        kwargs[f.name] = _check_type(raw[f.name], hints[f.name], source, prefix + f.name)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _check_type(value: Any, hint: Any, source: str, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, hint):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise CheckpointError(f"{source}: key '{key}' must be {expected}, got {value!r} ({type(value).__name__})")


__all__ = ["ATTENTION_MODES", "CheckpointError", "DreamVLConfig", "VisionConfig", "SPECIAL_TOKEN_FIELDS"]
