"""Qwen2-VL image preprocessing: smart resize, CLIP normalisation and patchification in merge-window order.

Matches transformers' `Qwen2VLImageProcessorPil` (PIL bicubic resize on uint8 RGB, rescale, normalise), which
the tests check. Pixel bounds are pixel counts, never token counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200

# Keys of a preprocessor config that must keep their Qwen2-VL meaning for this processor to apply.
_FIXED_KEYS = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": Image.Resampling.BICUBIC.value,
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Closest (height, width), both multiples of `factor`, with min_pixels <= height*width <= max_pixels."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got height={height}, width={width}"
        )
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # transformers keeps at least one factor per side here (the reference's floor could reach zero).
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels are composited onto white (as transformers does)."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """Turns PIL images into Qwen2-VL patch rows (`pixel_values`) and their grids (`image_grid_thw`)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = field(default=CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=CLIP_STD)

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessor.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"ImageProcessor: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("ImageProcessor.image_mean and image_std must have 3 values (RGB)")

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge window of patches."""
        return self.patch_size * self.merge_size

    @property
    def row_size(self) -> int:
        """Values per patch row: channels * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of a single image of the given size, without touching pixels."""
        new_h, new_w = self.resized_size(height, width)
        return 1, new_h // self.patch_size, new_w // self.patch_size

    def num_image_tokens(self, grid_thw_row: Sequence[int] | torch.Tensor) -> int:
        """Visual tokens after the merger: t*h*w / merge_size**2."""
        t, h, w = (int(v) for v in grid_thw_row)
        return t * h * w // (self.merge_size**2)

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> dict[str, torch.Tensor]:
        if isinstance(images, Image.Image):
            images = [images]
        rows, grids = [], []
        for image in images:
            image_rows, grid = self._process_one(image)
            rows.append(image_rows)
            grids.append(grid)
        if not rows:
            return {
                "pixel_values": torch.zeros(0, self.row_size),
                "image_grid_thw": torch.zeros(0, 3, dtype=torch.long),
            }
        return {
            "pixel_values": torch.from_numpy(np.concatenate(rows, axis=0)),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    def _process_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        if not isinstance(image, Image.Image):
            raise ValueError(f"ImageProcessor expects PIL images, got {type(image).__name__}")
        image = to_rgb(image)
        new_h, new_w = self.resized_size(image.height, image.width)
        # Resampling happens on uint8 like transformers' PIL path, so results match it bit for bit.
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float64) * (1.0 / 255.0)  # (height, width, channels)
        pixels = pixels.astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(2, 0, 1)  # (channels, height, width)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = new_h // p, new_w // p
        # (channels, grid_h / m, m, p, grid_w / m, m, p): split each side into merge windows of patches
        patches = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p)
        # (grid_h / m, grid_w / m, m, m, channels, p, p): rows of one 2x2 merge window become contiguous
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
        # (grid_h / m, grid_w / m, m, m, channels, t, p, p): a still image is repeated over t frames
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        # (N, channels * t * p * p) with N = grid_h * grid_w, features in (channels, t, p, p) order
        rows = np.ascontiguousarray(patches).reshape(grid_h * grid_w, self.row_size)
        return rows, (1, grid_h, grid_w)

    def to_dict(self) -> dict:
        config = asdict(self)
        config["image_mean"] = list(self.image_mean)
        config["image_std"] = list(self.image_std)
        return config

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageProcessor:
        """Read `preprocessor_config.json`; pixel bounds may sit at the top level or in `size`."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"image processor config {path} does not exist")
        config = json.loads(path.read_text(encoding="utf-8"))
        for key, expected in _FIXED_KEYS.items():
            if key in config and config[key] != expected:
                raise ValueError(f"{path}: key {key!r} is {config[key]!r}, expected {expected!r}")
        if "rescale_factor" in config and not math.isclose(config["rescale_factor"], 1 / 255):
            raise ValueError(f"{path}: key 'rescale_factor' is {config['rescale_factor']!r}, expected 1/255")
        size = config.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(
                f"{path}: key 'size' must be a dict with shortest_edge/longest_edge pixel counts"
            )
        kwargs = {}
        # Explicit min/max_pixels win over `size`, the precedence transformers applies.
        for name, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = config.get(name, size.get(size_key))
            if value is not None:
                kwargs[name] = value
        for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if name in config:
                kwargs[name] = config[name]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error
