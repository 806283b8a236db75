"""Robot-action processing shared by training and inference: statistics, normalisation, the action spec,
instruction normalisation, image augmentation and the VLA prompt layout.

Nothing here reads shards (that is `data_modules.trajectory`); the Policy loads an `ActionSpec` from a
checkpoint and needs only this module to prepare observations and un-normalise actions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from dvlx.processing.templates import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX
from dvlx.processing.tokenizer import IM_END, IM_START, Tokenizer

NORMALIZATION_MODES = ("bounds_q99", "bounds", "mean_std")
DEFAULT_INSTRUCTION_TEMPLATE = "What action should the robot take to {instruction}?"
CROP_AREA = 0.9
"""Area fraction of the random crop in training and of the centre crop at inference (reference 4.2, 6.3)."""
COLOR_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}
"""Half-widths of the uniform jitter ranges: factors in [1 - w, 1 + w], hue shift in [-w, w] turns."""

# Added to a range or a standard deviation before dividing (the reference's constant).
_EPS = 1e-8
_STAT_FIELDS = ("mean", "std", "min", "max", "q01", "q99")

Array = np.ndarray | torch.Tensor


def _canonical_sha256(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _mode_error(mode: str) -> ValueError:
    close = difflib.get_close_matches(str(mode), NORMALIZATION_MODES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown normalization mode {mode!r}, expected one of {NORMALIZATION_MODES}{hint}")


@dataclass
class ArrayStats:
    """Per-dimension statistics of a set of vectors (population std, numpy's linear quantiles)."""

    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]
    count: int

    def __post_init__(self) -> None:
        for name in _STAT_FIELDS:
            values = [float(v) for v in getattr(self, name)]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"ArrayStats.{name} must be finite, got {values}")
            setattr(self, name, values)
        dims = {len(getattr(self, name)) for name in _STAT_FIELDS}
        if len(dims) != 1:
            sizes = {name: len(getattr(self, name)) for name in _STAT_FIELDS}
            raise ValueError(f"ArrayStats fields must have one length, got {sizes}")
        if isinstance(self.count, bool) or int(self.count) != self.count or self.count < 0:
            raise ValueError(f"ArrayStats.count must be a non-negative int, got {self.count!r}")
        self.count = int(self.count)

    @property
    def dim(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {**{name: list(getattr(self, name)) for name in _STAT_FIELDS}, "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArrayStats:
        missing = [name for name in (*_STAT_FIELDS, "count") if name not in data]
        if missing:
            raise ValueError(f"statistics are missing keys {missing} (have {sorted(data)})")
        return cls(**{name: data[name] for name in (*_STAT_FIELDS, "count")})

    @classmethod
    def from_array(cls, x: np.ndarray) -> ArrayStats:
        """Exact statistics of the rows of `x` [n, dim] (computed in float64)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"ArrayStats.from_array needs a non-empty [n, dim] array, got shape {x.shape}")
        q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
        return cls(
            mean=x.mean(0).tolist(),
            std=x.std(0).tolist(),
            min=x.min(0).tolist(),
            max=x.max(0).tolist(),
            q01=q01.tolist(),
            q99=q99.tolist(),
            count=x.shape[0],
        )


@dataclass
class Normalizer:
    """Per-dimension normalisation of the last axis of numpy arrays or torch tensors.

    bounds_q99: x_hat = clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1); bounds: the same with min/max;
    mean_std: x_hat = (x - mean) / (std + 1e-8), not clipped. Dimensions whose range (or std) is zero map to 0
    and back to q01/min/mean. Dimensions with mask False pass through both ways unchanged. `unnormalize` is
    the affine inverse without clipping, so unnormalize(normalize(x)) is x clipped to the bounds.
    """

    mode: str
    stats: ArrayStats
    mask: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATION_MODES:
            raise _mode_error(self.mode)
        if isinstance(self.stats, dict):
            self.stats = ArrayStats.from_dict(self.stats)
        if not self.mask:
            self.mask = [True] * self.stats.dim
        if len(self.mask) != self.stats.dim or not all(isinstance(m, bool | np.bool_) for m in self.mask):
            raise ValueError(f"Normalizer.mask must be {self.stats.dim} booleans, got {self.mask}")
        self.mask = [bool(m) for m in self.mask]

    @property
    def dim(self) -> int:
        return self.stats.dim

    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) in float64: x_hat = (x - offset) / scale before the bounds modes' affine map."""
        s = self.stats
        if self.mode == "mean_std":
            return np.asarray(s.mean), np.asarray(s.std)
        lo, hi = (s.q01, s.q99) if self.mode == "bounds_q99" else (s.min, s.max)
        lo = np.asarray(lo)
        return lo, np.asarray(hi) - lo

    def normalize(self, x: Array) -> Array:
        return self._apply(x, inverse=False)

    def unnormalize(self, x: Array) -> Array:
        return self._apply(x, inverse=True)

    def _apply(self, x: Array, inverse: bool) -> Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"Normalizer over {self.dim} dims got an array of shape {tuple(x.shape)}")
        offset, scale = self._params()
        degenerate = scale <= 0
        use = np.asarray(self.mask) & ~degenerate
        zero = np.asarray(self.mask) & degenerate
        bounded = self.mode != "mean_std"
        if isinstance(x, torch.Tensor):
            work = x.float() if not x.is_floating_point() or x.element_size() < 4 else x

            def const(v: np.ndarray) -> torch.Tensor:
                dtype = work.dtype if v.dtype != bool else torch.bool
                return torch.as_tensor(v, dtype=dtype, device=x.device)

            where, clip = torch.where, torch.clamp
        else:
            # numpy computes in float64 and returns the input's float dtype (float32 for other inputs).
            work = np.asarray(x, dtype=np.float64)

            def const(v: np.ndarray) -> np.ndarray:
                return v

            where, clip = np.where, np.clip
        denom = const(scale + _EPS)
        off = const(offset)
        if not inverse:
            y = (work - off) / denom
            if bounded:
                y = clip(2 * y - 1, -1, 1)
            out = where(const(zero), 0 * work, y)
        else:
            y = (work + 1) / 2 if bounded else work
            out = where(const(zero), off + 0 * work, y * denom + off)
        out = where(const(use | zero), out, work)
        if isinstance(x, torch.Tensor):
            return out.to(x.dtype) if x.is_floating_point() else out
        return out.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "stats": self.stats.to_dict(), "mask": list(self.mask)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        missing = [k for k in ("mode", "stats", "mask") if k not in data]
        if missing:
            raise ValueError(f"normalizer is missing keys {missing} (have {sorted(data)})")
        return cls(mode=data["mode"], stats=ArrayStats.from_dict(data["stats"]), mask=list(data["mask"]))

    def fingerprint(self) -> str:
        """Short sha256 of the canonical JSON of mode, stats and mask."""
        return _canonical_sha256(self.to_dict())


@dataclass
class ActionSpec:
    """What a VLA checkpoint predicts and how its inputs are prepared; stored in every checkpoint and export.

    horizon H is the chunk trained on (at most max_horizon, the chunk stored in the shards), action_dim A,
    proprio_dim S (0 when proprio is not used). `center_crop` is the crop area fraction used at inference when
    training used random crops (None: no crop).
    """

    horizon: int
    max_horizon: int
    action_dim: int
    proprio_dim: int
    cameras: list[str]
    action_names: list[str]
    proprio_names: list[str]
    control_hz: float | None
    action_normalizer: Normalizer
    proprio_normalizer: Normalizer | None
    image_size: int
    center_crop: float | None = None
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    datasets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("horizon", "max_horizon", "action_dim", "proprio_dim", "image_size"):
            value = getattr(self, name)
            low = 0 if name == "proprio_dim" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ActionSpec.{name} must be an int >= {low}, got {value!r}")
        if self.horizon > self.max_horizon:
            raise ValueError(f"ActionSpec.horizon {self.horizon} > max_horizon {self.max_horizon}")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"ActionSpec.cameras must be distinct names, at least one, got {self.cameras}")
        if len(self.action_names) != self.action_dim:
            raise ValueError(
                f"ActionSpec.action_names has {len(self.action_names)} names for A={self.action_dim}"
            )
        if len(self.proprio_names) != self.proprio_dim:
            raise ValueError(
                f"ActionSpec.proprio_names has {len(self.proprio_names)} names for S={self.proprio_dim}"
            )
        if self.action_normalizer.dim != self.action_dim:
            raise ValueError(
                f"ActionSpec.action_normalizer has {self.action_normalizer.dim} dims, A={self.action_dim}"
            )
        if (self.proprio_normalizer is None) != (self.proprio_dim == 0):
            raise ValueError("ActionSpec.proprio_normalizer must be given exactly when proprio_dim > 0")
        if self.proprio_normalizer is not None and self.proprio_normalizer.dim != self.proprio_dim:
            raise ValueError(
                f"ActionSpec.proprio_normalizer has {self.proprio_normalizer.dim} dims, S={self.proprio_dim}"
            )
        if self.control_hz is not None and not float(self.control_hz) > 0:
            raise ValueError(f"ActionSpec.control_hz must be positive or None, got {self.control_hz!r}")
        if self.center_crop is not None and not 0 < float(self.center_crop) <= 1:
            raise ValueError(f"ActionSpec.center_crop must be in (0, 1] or None, got {self.center_crop!r}")
        if "{instruction}" not in self.instruction_template:
            raise ValueError(
                "ActionSpec.instruction_template must contain '{instruction}', got "
                f"{self.instruction_template!r}"
            )

    @property
    def num_action_slots(self) -> int:
        """H * A action positions in the sequence (chunk-major)."""
        return self.horizon * self.action_dim

    @property
    def use_proprio(self) -> bool:
        return self.proprio_dim > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "max_horizon": self.max_horizon,
            "action_dim": self.action_dim,
            "proprio_dim": self.proprio_dim,
            "cameras": list(self.cameras),
            "action_names": list(self.action_names),
            "proprio_names": list(self.proprio_names),
            "control_hz": None if self.control_hz is None else float(self.control_hz),
            "action_normalizer": self.action_normalizer.to_dict(),
            "proprio_normalizer": (
                None if self.proprio_normalizer is None else self.proprio_normalizer.to_dict()
            ),
            "image_size": self.image_size,
            "center_crop": None if self.center_crop is None else float(self.center_crop),
            "instruction_template": self.instruction_template,
            "system_prompt": self.system_prompt,
            "datasets": list(self.datasets),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionSpec:
        data = dict(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"action spec has unknown keys {unknown}; known: {sorted(known)}")
        if "action_normalizer" not in data:
            raise ValueError("action spec is missing key 'action_normalizer'")
        data["action_normalizer"] = Normalizer.from_dict(data["action_normalizer"])
        if data.get("proprio_normalizer") is not None:
            data["proprio_normalizer"] = Normalizer.from_dict(data["proprio_normalizer"])
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"action spec: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ActionSpec:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"action spec {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def fingerprint(self) -> str:
        """Short sha256 of the canonical JSON of the whole spec (statistics included)."""
        return _canonical_sha256(self.to_dict())


_SPACES = re.compile(r"\s+")


def normalize_instruction(text: str) -> str:
    """Training and inference form of an instruction: stripped, lower-cased, runs of whitespace collapsed to
    one space, one trailing period removed ("Pick up the cup. " -> "pick up the cup")."""
    text = _SPACES.sub(" ", str(text).strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


# ---- images -------------------------------------------------------------------------------------------

Rng = np.random.Generator | torch.Generator


def _uniform(rng: Rng, low: float, high: float) -> float:
    if isinstance(rng, torch.Generator):
        return low + (high - low) * float(torch.rand((), generator=rng, dtype=torch.float64))
    if isinstance(rng, np.random.Generator):
        return float(rng.uniform(low, high))
    raise TypeError(f"rng must be a numpy Generator or a torch.Generator, got {type(rng).__name__}")


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """RGB image resized to size x size with PIL's Lanczos filter (the reference resizes with lanczos3)."""
    img = _rgb(img)
    if img.size == (size, size):
        return img
    return img.resize((size, size), resample=Image.Resampling.LANCZOS)


def _crop_resize(img: Image.Image, area: float, fx: float, fy: float) -> Image.Image:
    """Crop of `area` of the image, sqrt(area) of each side, at relative position (fx, fy) in [0, 1] of the
    free margin, resized back to the input size (bilinear, sub-pixel box)."""
    if not 0 < area <= 1:
        raise ValueError(f"crop area must be in (0, 1], got {area}")
    width, height = img.size
    side = math.sqrt(area)
    cw, ch = side * width, side * height
    x0, y0 = fx * (width - cw), fy * (height - ch)
    return img.resize((width, height), resample=Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def center_crop(img: Image.Image, area: float = CROP_AREA) -> Image.Image:
    """Centre crop of `area` (sqrt(area) of each side) resized back: the inference twin of the random crop."""
    return _crop_resize(_rgb(img), area, 0.5, 0.5)


def _shift_hue(img: Image.Image, turns: float) -> Image.Image:
    # PIL's HSV has 256 hue steps per turn; the shift is a lookup table on the hue band.
    hue, saturation, value = img.convert("HSV").split()
    shift = round(turns * 256)
    hue = hue.point([(level + shift) % 256 for level in range(256)])
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def augment_image(img: Image.Image, rng: Rng, area: float = CROP_AREA) -> Image.Image:
    """Training augmentation (reference 4.2), in order: random crop of `area` with the image's aspect ratio
    (sqrt(area) of each side, uniform position) resized back, then brightness, contrast and saturation factors
    uniform in [0.8, 1.2] (PIL ImageEnhance) and a hue shift uniform in [-0.05, 0.05] of the hue circle.

    Deterministic given the generator's state; six draws per image.
    """
    img = _crop_resize(_rgb(img), area, _uniform(rng, 0, 1), _uniform(rng, 0, 1))
    for enhancer, name in (
        (ImageEnhance.Brightness, "brightness"),
        (ImageEnhance.Contrast, "contrast"),
        (ImageEnhance.Color, "saturation"),
    ):
        width = COLOR_JITTER[name]
        img = enhancer(img).enhance(_uniform(rng, 1 - width, 1 + width))
    hue = COLOR_JITTER["hue"]
    return _shift_hue(img, _uniform(rng, -hue, hue))


# ---- prompt -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionPrompt:
    """Token ids of one VLA sample and its position masks (all lists have the sequence length)."""

    input_ids: list[int]
    labels: list[int]
    action_slots: list[bool]
    proprio_slots: list[bool]
    prefix: list[bool]


def encode_action_prompt(
    tokenizer: Tokenizer,
    instruction: str,
    num_image_tokens: Sequence[int],
    num_action_slots: int,
    *,
    use_proprio: bool,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
) -> ActionPrompt:
    """The VLA sequence (Qwen chat layout, reference 1.3 with the proprio slot inside the sequence):

    system turn, `<|im_start|>user\\n`, per camera `<|vision_start|>` + image tokens + `<|vision_end|>`,
    one proprio slot if `use_proprio`, the instruction (normalised, put into `instruction_template`),
    `<|im_end|>\\n<|im_start|>assistant\\n`, `num_action_slots` action slots in chunk-major order
    (slot k*A + d is action k, dim d), then `<|im_end|>` and `\\n`.

    Slots hold `tokenizer.mask_token_id`; the objective writes ids or embeddings into them. Labels are
    IGNORE_INDEX except the two trailing structural tokens (the objective decides whether to use them).
    `prefix` is True before the first action slot: the prompt at inference.
    """
    if num_action_slots < 1:
        raise ValueError(f"num_action_slots must be >= 1, got {num_action_slots}")
    if not num_image_tokens or any(isinstance(n, bool) or int(n) != n or n < 1 for n in num_image_tokens):
        raise ValueError(
            f"num_image_tokens must be positive ints, one per camera, got {list(num_image_tokens)}"
        )
    if "{instruction}" not in instruction_template:
        raise ValueError(f"instruction_template must contain '{{instruction}}', got {instruction_template!r}")
    slot = tokenizer.mask_token_id
    header = tokenizer.encode(f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n")
    images: list[int] = []
    for count in num_image_tokens:
        images += [tokenizer.vision_start_token_id] + [tokenizer.image_token_id] * int(count)
        images.append(tokenizer.vision_end_token_id)
    proprio = [slot] if use_proprio else []
    question = instruction_template.format(instruction=normalize_instruction(instruction))
    tail = tokenizer.encode(f"{question}{IM_END}\n{IM_START}assistant\n")
    prompt = header + images + proprio + tail
    suffix = [tokenizer.im_end_token_id, tokenizer.newline_token_id]
    input_ids = prompt + [slot] * num_action_slots + suffix
    n_prompt = len(prompt)
    proprio_at = len(header) + len(images) if use_proprio else -1
    return ActionPrompt(
        input_ids=input_ids,
        labels=[IGNORE_INDEX] * (n_prompt + num_action_slots) + suffix,
        action_slots=[n_prompt <= i < n_prompt + num_action_slots for i in range(len(input_ids))],
        proprio_slots=[i == proprio_at for i in range(len(input_ids))],
        prefix=[i < n_prompt for i in range(len(input_ids))],
    )
