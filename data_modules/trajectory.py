"""Robot trajectory shards (`dvlx.trajectory` v1): the writer every converter uses, and the streaming
`TrajectoryDataModule` that turns a weighted mixture of shard sets into VLA batches.

The streaming rules (shard order, (rank, worker) split, seeded shuffle buffer, equal batch counts per rank,
wrap-around, fault counting, epochs) are `ImageTextStream`'s; this module adds the per-sample decoding, the
episode-level validation split and the weighted interleaving of several datasets. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_modules.faults import FaultCounter, register_fault_kind
from data_modules.image_text import (
    EpochDataLoader,
    ImageTextStream,
    StreamingDataModule,
    _Skip,
    collate_image_text,
)
from data_modules.resume import POSITION_KEY
from data_modules.shards import ShardWriter, encode_image, list_shards, meta_is_complete, read_meta
from data_modules.stats import DEFAULT_MAX_EXACT_ROWS, StatsAccumulator
from dvlx.processing import DEFAULT_SYSTEM_PROMPT, ImageProcessor, Tokenizer
from dvlx.processing.robot import (
    CROP_AREA,
    DEFAULT_INSTRUCTION_TEMPLATE,
    NORMALIZATION_MODES,
    ActionPrompt,
    ActionSpec,
    ArrayStats,
    Normalizer,
    augment_image,
    encode_action_prompt,
    resize_image,
)

TRAJECTORY_FORMAT = "dvlx.trajectory"
TRAJECTORY_VERSION = 1
NAN_VALUE = register_fault_kind("nan_value")

# Sample key: zero-padded episode index and step, so keys sort in episode then time order.
_KEY_FORMAT = "{episode:08d}_{step:06d}"
_KEY_RE = re.compile(r"^(\d{8,})_(\d{6,})$")
_MAX_EPISODES = 10**8
_MAX_STEPS = 10**6
_CAMERA_RE = re.compile(r"^[a-z0-9_]+$")
_META_KEYS = (
    "dataset",
    "action_dim",
    "proprio_dim",
    "action_names",
    "proprio_names",
    "cameras",
    "image_size",
    "control_hz",
    "max_horizon",
    "num_episodes",
    "num_frames",
    "episodes",
    "stats",
    "action_norm_mask",
    "proprio_norm_mask",
)
# Tags that keep the seeded random streams of different purposes apart (ImageTextStream uses small ones).
_MIX_TAG = 10
_AUG_TAG = 11
# Dataset draws of the mixture are made this many at a time.
_MIX_CHUNK = 1024
_PROMPT_CACHE_SIZE = 4096


def step_key(episode: int, step: int) -> str:
    """Sample key of one time step."""
    return _KEY_FORMAT.format(episode=episode, step=step)


def parse_step_key(key: str) -> tuple[int, int] | None:
    """(episode index, step) of a sample key, None when the key is not a trajectory step key."""
    match = _KEY_RE.match(key)
    return (int(match.group(1)), int(match.group(2))) if match else None


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Array from `.npy` bytes; any parse problem is a ValueError."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError, ... on bad bytes
        raise ValueError(f"not a readable .npy array ({type(error).__name__}: {error})") from None


# ---- writing ---------------------------------------------------------------------------------------------


def _names(names: Sequence[str] | None, dim: int, default: str, key: str) -> list[str]:
    if names is None:
        return [f"{default}_{i}" for i in range(dim)]
    names = [str(n) for n in names]
    if len(names) != dim or len(set(names)) != dim:
        raise ValueError(f"{key} must be {dim} distinct names, got {names}")
    return names


def _mask(mask: Sequence[bool] | None, dim: int, key: str) -> list[bool]:
    if mask is None:
        return [True] * dim
    values = list(mask)
    if len(values) != dim or not all(isinstance(m, bool | np.bool_) for m in values):
        raise ValueError(f"{key} must be {dim} booleans, got {values}")
    return [bool(m) for m in values]


class TrajectoryShardWriter:
    """Write episodes as one sample per time step into trajectory shards, with statistics and `meta.json`.

    Per step `{key}.{camera}.jpg|png` for every camera, `{key}.json` (`episode`, `step`, `episode_length`,
    `instruction`, `dataset`), `{key}.actions.npy` float32 [max_horizon, A] (actions t.. t + max_horizon - 1,
    zeros past the episode end), `{key}.action_valid.npy` bool [max_horizon] and, when proprio_dim > 0,
    `{key}.proprio.npy` float32 [S]. Statistics of all actions and proprio (see `data_modules.stats`) and
    the episode list go into `meta.json` at `close()`. Use as a context manager: an exception inside the
    block leaves no `meta.json` (the set stays marked incomplete).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        action_dim: int,
        proprio_dim: int,
        cameras: Sequence[str],
        max_horizon: int,
        control_hz: float,
        dataset_name: str,
        action_names: Sequence[str] | None = None,
        proprio_names: Sequence[str] | None = None,
        action_norm_mask: Sequence[bool] | None = None,
        proprio_norm_mask: Sequence[bool] | None = None,
        max_samples_per_shard: int = 1000,
        max_bytes_per_shard: int = 1 << 30,
        image_format: str = "jpg",
        jpeg_quality: int = 95,
        extra_meta: Mapping[str, Any] | None = None,
        prefix: str = "train",
        overwrite: bool = False,
        max_exact_rows: int = DEFAULT_MAX_EXACT_ROWS,
    ) -> None:
        for name, value, low in (
            ("action_dim", action_dim, 1),
            ("proprio_dim", proprio_dim, 0),
            ("max_horizon", max_horizon, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"TrajectoryShardWriter: {name} must be an int >= {low}, got {value!r}")
        cameras = list(cameras)
        if (
            not cameras
            or len(set(cameras)) != len(cameras)
            or not all(isinstance(c, str) and _CAMERA_RE.match(c) for c in cameras)
        ):
            raise ValueError(
                f"TrajectoryShardWriter: cameras must be distinct names matching {_CAMERA_RE.pattern}, "
                f"got {cameras}"
            )
        if not isinstance(control_hz, int | float) or not control_hz > 0:
            raise ValueError(f"TrajectoryShardWriter: control_hz must be positive, got {control_hz!r}")
        if not isinstance(dataset_name, str) or not dataset_name:
            raise ValueError(
                f"TrajectoryShardWriter: dataset_name must be a non-empty string, got {dataset_name!r}"
            )
        fmt = image_format.lower()
        if fmt not in ("jpg", "jpeg", "png"):
            raise ValueError(
                f"TrajectoryShardWriter: image_format must be 'jpg' or 'png', got {image_format!r}"
            )
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"TrajectoryShardWriter: jpeg_quality must be in [1, 100], got {jpeg_quality}")
        extra = dict(extra_meta or {})
        clash = sorted(set(extra) & {*_META_KEYS, "format", "version", "num_samples", "shards"})
        if clash:
            raise ValueError(f"TrajectoryShardWriter: extra_meta may not set the reserved keys {clash}")
        self.out_dir = os.fspath(out_dir)
        self.action_dim = int(action_dim)
        self.proprio_dim = int(proprio_dim)
        self.cameras = cameras
        self.max_horizon = int(max_horizon)
        self.control_hz = float(control_hz)
        self.dataset_name = dataset_name
        self.action_names = _names(action_names, self.action_dim, "action", "action_names")
        self.proprio_names = _names(proprio_names, self.proprio_dim, "proprio", "proprio_names")
        self.action_norm_mask = _mask(action_norm_mask, self.action_dim, "action_norm_mask")
        self.proprio_norm_mask = _mask(proprio_norm_mask, self.proprio_dim, "proprio_norm_mask")
        self.image_format = "jpg" if fmt == "jpeg" else fmt
        self.jpeg_quality = jpeg_quality
        self.extra_meta = extra
        self.episodes: list[dict[str, Any]] = []
        self.num_frames = 0
        self.image_size: dict[str, list[int]] = {}
        self._episode_ids: set[str] = set()
        self._action_stats = StatsAccumulator(self.action_dim, max_exact_rows=max_exact_rows)
        self._proprio_stats = (
            StatsAccumulator(self.proprio_dim, max_exact_rows=max_exact_rows) if self.proprio_dim else None
        )
        self._writer = ShardWriter(
            self.out_dir,
            prefix=prefix,
            max_samples_per_shard=max_samples_per_shard,
            max_bytes_per_shard=max_bytes_per_shard,
            meta={"format": TRAJECTORY_FORMAT, "version": TRAJECTORY_VERSION},
            overwrite=overwrite,
        )
        self.meta: dict[str, Any] | None = None

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def __enter__(self) -> TrajectoryShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check_frames(self, camera: str, frames: Any, length: int, where: str) -> list[np.ndarray]:
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, Sequence):
            raise ValueError(
                f"{where}: key 'images.{camera}' must be a sequence of frames, got {type(frames).__name__}"
            )
        if len(frames) != length:
            raise ValueError(f"{where}: key 'images.{camera}' has {len(frames)} frames for {length} actions")
        out = []
        expected = self.image_size.get(camera)
        for t, frame in enumerate(frames):
            if isinstance(frame, Image.Image):
                frame = np.asarray(frame.convert("RGB"))
            if (
                not isinstance(frame, np.ndarray)
                or frame.dtype != np.uint8
                or frame.ndim != 3
                or (frame.shape[2] != 3)
            ):
                described = (
                    f"{frame.dtype} array of shape {frame.shape}"
                    if isinstance(frame, np.ndarray)
                    else type(frame).__name__
                )
                raise ValueError(
                    f"{where}: key 'images.{camera}' step {t} must be a uint8 [H, W, 3] array or "
                    f"a PIL image, got {described}"
                )
            size = [int(frame.shape[0]), int(frame.shape[1])]
            expected = expected or size
            if size != expected or min(size) == 0:
                raise ValueError(
                    f"{where}: key 'images.{camera}' step {t} is {size[0]}x{size[1]}, but this "
                    f"camera's frames are {expected[0]}x{expected[1]} (height x width)"
                )
            out.append(frame)
        return out

    def _check_array(self, value: Any, dim: int, length: int | None, key: str, where: str) -> np.ndarray:
        array = np.asarray(value)
        if array.ndim != 2 or array.shape[1] != dim or (length is not None and array.shape[0] != length):
            rows = "T" if length is None else str(length)
            raise ValueError(f"{where}: key '{key}' must have shape [{rows}, {dim}], got {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{where}: key '{key}' must hold real numbers, got dtype {array.dtype}")
        with np.errstate(over="ignore"):
            # Values beyond the float32 range become inf here and are reported below.
            narrow = array.astype(np.float32)
        bad = np.argwhere(~np.isfinite(narrow))
        if len(bad):
            t, d = (int(v) for v in bad[0])
            raise ValueError(
                f"{where}: key '{key}' has {len(bad)} non-finite float32 values, first at step {t} "
                f"dim {d} ({array[t, d]!r})"
            )
        return narrow

    def write_episode(
        self,
        images: Mapping[str, Sequence[np.ndarray | Image.Image]],
        actions: np.ndarray,
        instruction: str,
        proprio: np.ndarray | None = None,
        episode_id: str | None = None,
    ) -> str:
        """Validate one episode and write its steps; returns its episode id.

        Everything is checked before anything is written, so a ValueError (naming the episode and the key)
        leaves the writer usable for the next episode.
        """
        if self.meta is not None:
            raise RuntimeError(f"TrajectoryShardWriter for {self.out_dir} is closed")
        index = self.num_episodes
        episode = str(episode_id) if episode_id is not None else f"{index:06d}"
        where = f"{self.out_dir}: episode {episode!r} (index {index})"
        if episode in self._episode_ids:
            raise ValueError(f"{where}: key 'episode_id' repeats an earlier episode's id")
        if index >= _MAX_EPISODES:
            raise ValueError(f"{where}: at most {_MAX_EPISODES} episodes fit the key format")
        if np.asarray(actions).ndim == 2 and np.asarray(actions).shape[0] == 0:
            raise ValueError(f"{where}: key 'actions' is empty (an episode needs at least one step)")
        acts = self._check_array(actions, self.action_dim, None, "actions", where)
        length = acts.shape[0]
        if length >= _MAX_STEPS:
            raise ValueError(
                f"{where}: key 'actions' has {length} steps; at most {_MAX_STEPS - 1} fit the key"
            )
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{where}: key 'instruction' must be a non-empty string, got {instruction!r}")
        state = None
        if self.proprio_dim:
            if proprio is None:
                raise ValueError(f"{where}: key 'proprio' is required (proprio_dim={self.proprio_dim})")
            state = self._check_array(proprio, self.proprio_dim, length, "proprio", where)
        elif proprio is not None:
            raise ValueError(f"{where}: key 'proprio' given, but the writer has proprio_dim=0")
        if not isinstance(images, Mapping) or set(images) != set(self.cameras):
            got = sorted(images) if isinstance(images, Mapping) else type(images).__name__
            raise ValueError(f"{where}: key 'images' must have exactly the cameras {self.cameras}, got {got}")
        frames = {
            camera: self._check_frames(camera, images[camera], length, where) for camera in self.cameras
        }

        for camera in self.cameras:
            self.image_size.setdefault(
                camera, [int(frames[camera][0].shape[0]), int(frames[camera][0].shape[1])]
            )
        # Window t is padded[t : t + max_horizon]: the zero rows past the end are masked by action_valid.
        padded = np.zeros((length + self.max_horizon - 1, self.action_dim), dtype=np.float32)
        padded[:length] = acts
        for t in range(length):
            record = {
                "episode": episode,
                "step": t,
                "episode_length": length,
                "instruction": instruction,
                "dataset": self.dataset_name,
            }
            files: dict[str, bytes] = {}
            for camera in self.cameras:
                data, ext = encode_image(
                    Image.fromarray(frames[camera][t]), self.image_format, self.jpeg_quality
                )
                files[f"{camera}.{ext}"] = data
            files["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
            files["actions.npy"] = encode_npy(padded[t : t + self.max_horizon])
            files["action_valid.npy"] = encode_npy(np.arange(t, t + self.max_horizon) < length)
            if state is not None:
                files["proprio.npy"] = encode_npy(state[t])
            self._writer.write(step_key(index, t), files)
        self._action_stats.update(acts)
        if state is not None and self._proprio_stats is not None:
            self._proprio_stats.update(state)
        self._episode_ids.add(episode)
        self.episodes.append({"id": episode, "length": length, "instruction": instruction})
        self.num_frames += length
        return episode

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write `meta.json`; returns the metadata. Raises if none was written."""
        if self.meta is not None:
            return self.meta
        if not self.episodes:
            self._writer.abort()
            raise ValueError(f"{self.out_dir}: no episodes were written; no meta.json written")
        self._writer.meta.update(
            {
                "dataset": self.dataset_name,
                "action_dim": self.action_dim,
                "proprio_dim": self.proprio_dim,
                "action_names": self.action_names,
                "proprio_names": self.proprio_names,
                "cameras": self.cameras,
                "image_size": {camera: self.image_size[camera] for camera in self.cameras},
                "control_hz": self.control_hz,
                "max_horizon": self.max_horizon,
                "num_episodes": self.num_episodes,
                "num_frames": self.num_frames,
                "episodes": self.episodes,
                "stats": {
                    "action": self._action_stats.result().to_dict(),
                    "proprio": self._proprio_stats.result().to_dict() if self._proprio_stats else None,
                },
                "stats_quantiles": self._action_stats.describe_quantiles(),
                "action_norm_mask": self.action_norm_mask,
                "proprio_norm_mask": self.proprio_norm_mask,
                **self.extra_meta,
            }
        )
        self.meta = self._writer.close()
        return self.meta

    def abort(self) -> None:
        """Drop the unfinished shard and write no `meta.json`."""
        self._writer.abort()


def read_trajectory_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read `directory/meta.json` and check that it describes a trajectory shard set this code reads."""
    meta = read_meta(directory)
    path = os.path.join(os.fspath(directory), "meta.json")
    if meta["format"] != TRAJECTORY_FORMAT:
        raise ValueError(f"{path}: key 'format' is {meta['format']!r}, expected {TRAJECTORY_FORMAT!r}")
    if meta["version"] != TRAJECTORY_VERSION:
        raise ValueError(
            f"{path}: key 'version' is {meta['version']!r}, this code reads {TRAJECTORY_VERSION}"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if (
        len(meta["episodes"]) != meta["num_episodes"]
        or sum(e["length"] for e in meta["episodes"]) != meta["num_frames"]
        or meta["num_frames"] != meta["num_samples"]
    ):
        raise ValueError(f"{path}: keys 'episodes', 'num_episodes', 'num_frames' and 'num_samples' disagree")
    return meta


# ---- reading ---------------------------------------------------------------------------------------------


def combine_stats(stats: Sequence[ArrayStats]) -> ArrayStats:
    """Statistics of a mixture: count-weighted mean, pooled population std, overall min/max, and the most
    extreme q01/q99 (min of q01, max of q99): a range covering every dataset's central 98%, not the union's
    quantiles, which the per-dataset statistics do not determine."""
    if not stats:
        raise ValueError("combine_stats needs at least one ArrayStats")
    if len(stats) == 1:
        return stats[0]
    counts = np.asarray([s.count for s in stats], dtype=np.float64)[:, None]
    means = np.asarray([s.mean for s in stats])
    stds = np.asarray([s.std for s in stats])
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (stds**2 + (means - mean) ** 2)).sum(0) / total
    return ArrayStats(
        mean=mean.tolist(),
        std=np.sqrt(var).tolist(),
        min=np.min([s.min for s in stats], 0).tolist(),
        max=np.max([s.max for s in stats], 0).tolist(),
        q01=np.min([s.q01 for s in stats], 0).tolist(),
        q99=np.max([s.q99 for s in stats], 0).tolist(),
        count=int(total),
    )


def validation_episodes(
    episodes: Sequence[Mapping[str, Any]], val_episodes: float | int, where: str
) -> set[int]:
    """Indices of the held-out episodes: the first k in the order of sha256(episode id), k = val_episodes
    (an int count) or round(fraction * n) with at least one when the fraction is > 0 (a float in [0, 1))."""
    n = len(episodes)
    if isinstance(val_episodes, bool) or not isinstance(val_episodes, int | float):
        raise ValueError(
            f"key 'data.val_episodes' must be an int count or a float fraction, got {val_episodes!r}"
        )
    if isinstance(val_episodes, float):
        if not 0 <= val_episodes < 1:
            raise ValueError(f"key 'data.val_episodes': a fraction must be in [0, 1), got {val_episodes}")
        k = 0 if val_episodes == 0 else max(1, round(val_episodes * n))
    else:
        k = val_episodes
    if k < 0 or (k > 0 and k >= n):
        raise ValueError(
            f"key 'data.val_episodes': {val_episodes} holds out {k} of the {n} episodes of {where}; "
            "at least one must stay for training"
        )
    order = sorted(range(n), key=lambda i: hashlib.sha256(str(episodes[i]["id"]).encode("utf-8")).hexdigest())
    return set(order[:k])


class _EpisodeReader(ImageTextStream):
    """Raw samples of one dataset's shards restricted to a set of episodes, with ImageTextStream's shard
    order, (rank, worker) split, shuffle buffer and wrap-around (`_owned_samples`). Encoding is the mixture
    stream's job; only the raw-sample half of the parent is used."""

    def __init__(
        self,
        shards: Sequence[str],
        episodes: set[int],
        *,
        train: bool,
        seed: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            shards,
            tokenizer=tokenizer,
            image_processor=image_processor,
            template="plain",
            batch_size=1,
            train=train,
            num_batches=0 if train else None,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            rank=rank,
            world_size=world_size,
            counts=counts,
        )
        self.episodes = episodes

    def _accept(self, sample: Mapping[str, Any]) -> bool:
        parsed = parse_step_key(sample["__key__"])
        # A foreign key belongs to no split; the training stream alone reports it.
        return (parsed[0] in self.episodes) if parsed is not None else self.train


@dataclass(frozen=True)
class _DatasetInfo:
    path: str
    name: str
    max_horizon: int


def collate_trajectory(
    samples: Sequence[Mapping[str, Any]], pad_token_id: int, faults: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """`collate_image_text` (ids, labels, attention mask, pixels, grids, faults) plus the VLA keys:
    `action_slots`/`proprio_slots`/`prefix_mask` Bool[B, L] (False on padding), `actions` Float[B, H, A],
    `action_valid` Bool[B, H], `proprio` Float[B, S] and `dataset` Long[B]."""
    batch = collate_image_text(samples, pad_token_id, faults)
    size, length = batch["input_ids"].shape
    for out_key, key in (
        ("action_slots", "action_slots"),
        ("proprio_slots", "proprio_slots"),
        ("prefix_mask", "prefix"),
    ):
        mask = torch.zeros((size, length), dtype=torch.bool)
        for i, sample in enumerate(samples):
            mask[i, : len(sample[key])] = torch.as_tensor(sample[key], dtype=torch.bool)
        batch[out_key] = mask
    batch["actions"] = torch.from_numpy(np.stack([s["actions"] for s in samples])).float()
    batch["action_valid"] = torch.from_numpy(np.stack([s["action_valid"] for s in samples]))
    batch["proprio"] = torch.from_numpy(np.stack([s["proprio"] for s in samples])).float()
    batch["dataset"] = torch.as_tensor([s["dataset"] for s in samples], dtype=torch.long)
    return batch


class TrajectoryStream(ImageTextStream):
    """One rank's stream of collated VLA batches from a mixture of trajectory datasets
    (use with `DataLoader(batch_size=None)`).

    train=True: each worker draws the dataset of every sample with a generator seeded by (seed, epoch, slot)
    according to `weights`, and takes the next raw sample of that dataset's reader (its own shard split,
    shuffle buffer and wrap-around); exactly `num_batches` batches per rank. train=False: the datasets one
    after the other, one pass, no shuffle, last partial batch kept.
    """

    def __init__(
        self,
        readers: Sequence[_EpisodeReader],
        datasets: Sequence[_DatasetInfo],
        weights: Sequence[float],
        *,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        action_spec: ActionSpec,
        batch_size: int,
        train: bool,
        augment: bool,
        num_batches: int | None = None,
        seed: int = 0,
        max_fault_fraction: float = 0.1,
        fault_min_samples: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        shards = [path for reader in readers for path in reader.shards]
        super().__init__(
            shards,
            tokenizer=tokenizer,
            image_processor=image_processor,
            template="plain",
            batch_size=batch_size,
            train=train,
            num_batches=num_batches,
            seed=seed,
            shuffle_buffer=0,
            max_fault_fraction=max_fault_fraction,
            fault_min_samples=fault_min_samples,
            rank=rank,
            world_size=world_size,
        )
        if not (len(readers) == len(datasets) == len(weights)):
            raise ValueError("TrajectoryStream needs one reader, one dataset info and one weight per dataset")
        probabilities = np.asarray(weights, dtype=np.float64)
        if (probabilities <= 0).any() or not np.isfinite(probabilities).all():
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.readers = list(readers)
        self.datasets = list(datasets)
        self.probabilities = probabilities / probabilities.sum()
        self.spec = action_spec
        self.augment = augment and train
        grid = image_processor.grid_thw(action_spec.image_size, action_spec.image_size)
        self.num_image_tokens = [image_processor.num_image_tokens(grid)] * len(action_spec.cameras)
        self._prompts: dict[str, ActionPrompt] = {}

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for reader in self.readers:
            reader.set_epoch(epoch)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of one (rank, worker) slot for the current epoch (training batches carry their
        position, see `ImageTextStream.iter_worker`)."""
        if not self.train:
            return self._val_batches(worker, num_workers)
        logical, token = self.resume.start(worker, num_workers) if self.resume else (worker, {})
        return self._train_batches(logical, num_workers, token)

    def _train_batches(self, worker: int, num_workers: int, token: Mapping[str, Any]) -> Iterator[dict]:
        """Draw m picks the dataset of the worker's m-th sample; the position after a batch is the number of
        draws and each dataset reader's position, and each sample's augmentation is seeded by its draw."""
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        counter = FaultCounter(
            self.max_fault_fraction, self.fault_min_samples, where=f"rank {self.rank} worker {worker}"
        )
        quota = self.worker_num_batches(worker, num_workers)
        done = int(token.get("batches", 0))
        if done >= quota:
            return
        draws = int(token.get("draws", 0))
        positions = [int(p) for p in token.get("readers", [0] * len(self.readers))]
        streams = [
            reader._train_samples(slot, slots, counter, start)
            for reader, start in zip(self.readers, positions, strict=True)
        ]
        rng = np.random.default_rng([self.seed, self.epoch, _MIX_TAG, slot, slots])
        for _ in range(draws // _MIX_CHUNK):
            rng.choice(len(streams), size=_MIX_CHUNK, p=self.probabilities)
        chunk = rng.choice(len(streams), size=_MIX_CHUNK, p=self.probabilities)
        batch: list[dict[str, Any]] = []
        while True:
            dataset = int(chunk[draws % _MIX_CHUNK])
            augment_rng = np.random.default_rng([self.seed, self.epoch, _AUG_TAG, slot, slots, draws])
            draws += 1
            if draws % _MIX_CHUNK == 0:
                chunk = rng.choice(len(streams), size=_MIX_CHUNK, p=self.probabilities)
            sample = None
            while sample is None:
                sample = next(streams[dataset])
                positions[dataset] += 1
            encoded = self._encode_counted(sample, dataset, augment_rng, counter)
            if encoded is not None:
                batch.append(encoded)
            if len(batch) == self.batch_size:
                done += 1
                out = collate_trajectory(batch, self.tokenizer.pad_token_id, counter.take())
                out[POSITION_KEY] = {
                    "epoch": self.epoch,
                    "slot": worker,
                    "batches": done,
                    "draws": draws,
                    "readers": list(positions),
                }
                yield out
                batch = []
                if done >= quota:
                    return

    def _val_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The datasets one after the other, one pass, no shuffle or augmentation, last partial batch kept."""
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        counter = FaultCounter(
            self.max_fault_fraction, self.fault_min_samples, where=f"rank {self.rank} worker {worker}"
        )
        batch: list[dict[str, Any]] = []
        for dataset, reader in enumerate(self.readers):
            for sample in reader._owned_samples(slot, slots, counter):
                encoded = self._encode_counted(sample, dataset, None, counter)
                if encoded is not None:
                    batch.append(encoded)
                if len(batch) == self.batch_size:
                    yield collate_trajectory(batch, self.tokenizer.pad_token_id, counter.take())
                    batch = []
        if batch:
            yield collate_trajectory(batch, self.tokenizer.pad_token_id, counter.take())

    def _prompt(self, instruction: str) -> ActionPrompt:
        prompt = self._prompts.get(instruction)
        if prompt is None:
            if len(self._prompts) >= _PROMPT_CACHE_SIZE:
                self._prompts.clear()
            prompt = encode_action_prompt(
                self.tokenizer,
                instruction,
                self.num_image_tokens,
                self.spec.num_action_slots,
                use_proprio=self.spec.use_proprio,
                system_prompt=self.spec.system_prompt,
                instruction_template=self.spec.instruction_template,
            )
            self._prompts[instruction] = prompt
        return prompt

    def _encode_counted(
        self, sample: dict[str, Any], dataset: int, rng: np.random.Generator | None, counter: FaultCounter
    ) -> dict[str, Any] | None:
        """`encode_step`, or None for a bad sample (counted and logged); raises above the fault limit."""
        counter.seen()
        try:
            encoded = self.encode_step(sample, dataset, rng)
        except _Skip as skip:
            counter.record(skip.kind, sample["__shard__"], sample["__key__"], skip.reason)
            encoded = None
        counter.check(sample["__shard__"])
        return encoded

    def encode_step(
        self, sample: Mapping[str, Any], dataset: int, rng: np.random.Generator
    ) -> dict[str, Any]:
        """Decode, check, normalise, augment and tokenise one raw step; raises `_Skip` with the fault kind."""
        spec = self.spec
        info = self.datasets[dataset]
        if "__bad__" in sample:
            raise _Skip("bad_record", sample["__bad__"])
        if parse_step_key(sample["__key__"]) is None:
            raise _Skip("bad_record", f"key {sample['__key__']!r} is not EPISODE_STEP")
        image_names = {}
        for camera in spec.cameras:
            image_names[camera] = next(
                (f"{camera}.{ext}" for ext in ("jpg", "png") if f"{camera}.{ext}" in sample), None
            )
        needed = ["json", "actions.npy", "action_valid.npy"] + (["proprio.npy"] if spec.use_proprio else [])
        missing = [name for name in needed if name not in sample]
        missing += [f"{camera}.jpg|png" for camera, name in image_names.items() if name is None]
        if missing:
            raise _Skip(
                "missing_key",
                f"no {', '.join(missing)} (files: {sorted(k for k in sample if k[:2] != '__')})",
            )
        try:
            record = json.loads(sample["json"].decode("utf-8"))
            instruction = record["instruction"]
            if not isinstance(instruction, str):
                raise TypeError(f"'instruction' must be a string, got {type(instruction).__name__}")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise _Skip("bad_record", f"json: {type(error).__name__}: {error}") from None
        try:
            window = decode_npy(sample["actions.npy"])
            valid = decode_npy(sample["action_valid.npy"])
            state = decode_npy(sample["proprio.npy"]) if spec.use_proprio else np.zeros(0, np.float32)
        except ValueError as error:
            raise _Skip("bad_record", str(error)) from None
        if window.shape != (info.max_horizon, spec.action_dim) or valid.shape != (info.max_horizon,):
            raise _Skip(
                "bad_record",
                f"actions {window.shape} / action_valid {valid.shape}, expected "
                f"({info.max_horizon}, {spec.action_dim}) / ({info.max_horizon},)",
            )
        if state.shape != (spec.proprio_dim,):
            raise _Skip("bad_record", f"proprio has shape {state.shape}, expected ({spec.proprio_dim},)")
        actions = window[: spec.horizon].astype(np.float32)
        valid = valid[: spec.horizon].astype(bool)
        if not valid.any():
            raise _Skip("bad_record", f"no valid action among the first {spec.horizon} steps")
        if not np.isfinite(actions).all():
            raise _Skip(NAN_VALUE, "non-finite values in actions")
        if not np.isfinite(state).all():
            raise _Skip(NAN_VALUE, "non-finite values in proprio")
        images = []
        for camera in spec.cameras:
            name = image_names[camera]
            try:
                image = Image.open(io.BytesIO(sample[name]))
                image.load()
                image = resize_image(image, spec.image_size)
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                raise _Skip("corrupt_image", f"{name}: {type(error).__name__}: {error}") from None
            images.append(augment_image(image, rng) if self.augment else image)
        normalised = spec.action_normalizer.normalize(actions)
        # Steps past the episode end hold 0 in normalised space; losses must use `action_valid`.
        normalised[~valid] = 0.0
        if spec.proprio_normalizer is not None:
            state = spec.proprio_normalizer.normalize(state.astype(np.float32))
        prompt = self._prompt(instruction)
        processed = self.image_processor(images)
        return {
            "input_ids": prompt.input_ids,
            "labels": prompt.labels,
            "action_slots": prompt.action_slots,
            "proprio_slots": prompt.proprio_slots,
            "prefix": prompt.prefix,
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
            "actions": normalised,
            "action_valid": valid,
            "proprio": state.astype(np.float32),
            "dataset": dataset,
        }


@dataclass
class _Dataset:
    path: str
    weight: float
    meta: dict[str, Any]
    shards: list[str]
    val: set[int]

    @property
    def name(self) -> str:
        return str(self.meta["dataset"])

    def frames(self, val: bool) -> int:
        return sum(e["length"] for i, e in enumerate(self.meta["episodes"]) if (i in self.val) == val)

    def episodes(self, val: bool) -> set[int]:
        return {i for i in range(len(self.meta["episodes"])) if (i in self.val) == val}


def _dataset_entries(datasets: Any) -> list[tuple[str, float]]:
    """(path, weight) pairs from a path, a list of paths or a list of {"path", "weight"} mappings."""
    if isinstance(datasets, str | os.PathLike):
        return [(os.fspath(datasets), 1.0)]
    if not isinstance(datasets, Sequence) or isinstance(datasets, bytes) or not datasets:
        raise ValueError(
            f"key 'data.datasets' must be a path or a non-empty list of paths / "
            f"{{path, weight}} entries, got {datasets!r}"
        )
    entries = []
    for i, entry in enumerate(datasets):
        if isinstance(entry, str | os.PathLike):
            entries.append((os.fspath(entry), 1.0))
            continue
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ValueError(
                f"key 'data.datasets[{i}]' must be a path or a {{path, weight}} mapping, got {entry!r}"
            )
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            raise ValueError(
                f"key 'data.datasets[{i}]' has unknown keys {unknown}; known: ['path', 'weight']"
            )
        weight = entry.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ValueError(f"key 'data.datasets[{i}].weight' must be a positive number, got {weight!r}")
        entries.append((os.fspath(entry["path"]), float(weight)))
    return entries


class TrajectoryDataModule(StreamingDataModule):
    """Trajectory shard sets (a weighted mixture) -> VLA batches (docs/data.md, section "Trajectory data").

    The action spec (H from `horizon`, A, S, cameras, names and normalisation from the datasets' meta.json)
    is `action_spec`, available after `setup()` or `prepare()`. `rank`/`world_size` override the values taken
    from the trainer or torch.distributed (for tests); `generate` is called by `prepare_data` when a dataset
    does not exist yet.
    """

    def __init__(
        self,
        *,
        datasets: str | Sequence[str] | Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        horizon: int,
        batch_size: int,
        cameras: Sequence[str] | None = None,
        use_proprio: bool = True,
        normalization: str = "bounds_q99",
        image_size: int = 224,
        augment: bool = True,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_episodes: float | int = 0.05,
        balance: bool = True,
        max_fault_fraction: float = 0.1,
        fault_min_samples: int = 50,
        val_batch_size: int | None = None,
        instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        rank: int | None = None,
        world_size: int | None = None,
        generate: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"key 'data.horizon' must be an int >= 1, got {horizon!r}")
        if batch_size < 1:
            raise ValueError(f"key 'data.batch_size' must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"key 'data.val_batch_size' must be >= 1, got {val_batch_size}")
        if normalization not in NORMALIZATION_MODES:
            raise ValueError(
                f"key 'data.normalization' is {normalization!r}, expected one of {NORMALIZATION_MODES}"
            )
        if image_size < 1:
            raise ValueError(f"key 'data.image_size' must be >= 1, got {image_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if seed < 0:
            raise ValueError(f"key 'data.seed' must be >= 0, got {seed}")
        self.entries = _dataset_entries(datasets)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.horizon = horizon
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.cameras = list(cameras) if cameras is not None else None
        self.use_proprio = use_proprio
        self.normalization = normalization
        self.image_size = image_size
        self.augment = augment
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_episodes = val_episodes
        self.balance = balance
        self.max_fault_fraction = max_fault_fraction
        self.fault_min_samples = fault_min_samples
        self.instruction_template = instruction_template
        self.system_prompt = system_prompt
        self.rank_override = rank
        self.world_size_override = world_size
        self.generate = generate
        self.epoch = 0
        self._datasets: list[_Dataset] = []
        self._spec: ActionSpec | None = None

    # ---- metadata -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.generate is not None and not all(meta_is_complete(path) for path, _ in self.entries):
            self.generate()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def prepare(self) -> ActionSpec:
        """Read every dataset's meta.json, check that they mix, split episodes and build the action spec."""
        if self._spec is not None:
            return self._spec
        datasets = []
        for path, weight in self.entries:
            meta = read_trajectory_meta(path)
            val = validation_episodes(meta["episodes"], self.val_episodes, path)
            datasets.append(_Dataset(path=path, weight=weight, meta=meta, shards=list_shards(path), val=val))
        first = datasets[0]
        cameras = self.cameras if self.cameras is not None else list(first.meta["cameras"])
        if not cameras:
            raise ValueError("key 'data.cameras' must name at least one camera")
        for ds in datasets:
            absent = [c for c in cameras if c not in ds.meta["cameras"]]
            if absent:
                raise ValueError(
                    f"key 'data.cameras': dataset {ds.path} has no camera {absent} "
                    f"(it has {ds.meta['cameras']})"
                )
            if self.horizon > ds.meta["max_horizon"]:
                raise ValueError(
                    f"key 'data.horizon' is {self.horizon}, but dataset {ds.path} stores chunks of "
                    f"max_horizon {ds.meta['max_horizon']}"
                )
            if self.use_proprio and ds.meta["proprio_dim"] == 0:
                raise ValueError(f"key 'data.use_proprio' is true, but dataset {ds.path} has no proprio")
        keys = ["action_dim", "action_names", "action_norm_mask"]
        if self.use_proprio:
            keys += ["proprio_dim", "proprio_names", "proprio_norm_mask"]
        for ds in datasets[1:]:
            for key in keys:
                if ds.meta[key] != first.meta[key]:
                    raise ValueError(
                        f"datasets {first.path} and {ds.path} cannot be mixed: key '{key}' is "
                        f"{first.meta[key]} vs {ds.meta[key]}"
                    )
        action_normalizer = Normalizer(
            self.normalization,
            combine_stats([ArrayStats.from_dict(d.meta["stats"]["action"]) for d in datasets]),
            list(first.meta["action_norm_mask"]),
        )
        proprio_normalizer = None
        if self.use_proprio:
            proprio_normalizer = Normalizer(
                self.normalization,
                combine_stats([ArrayStats.from_dict(d.meta["stats"]["proprio"]) for d in datasets]),
                list(first.meta["proprio_norm_mask"]),
            )
        rates = {float(d.meta["control_hz"]) for d in datasets}
        self._spec = ActionSpec(
            horizon=self.horizon,
            max_horizon=min(int(d.meta["max_horizon"]) for d in datasets),
            action_dim=int(first.meta["action_dim"]),
            proprio_dim=int(first.meta["proprio_dim"]) if self.use_proprio else 0,
            cameras=cameras,
            action_names=list(first.meta["action_names"]),
            proprio_names=list(first.meta["proprio_names"]) if self.use_proprio else [],
            control_hz=rates.pop() if len(rates) == 1 else None,
            action_normalizer=action_normalizer,
            proprio_normalizer=proprio_normalizer,
            image_size=self.image_size,
            center_crop=CROP_AREA if self.augment else None,
            instruction_template=self.instruction_template,
            system_prompt=self.system_prompt,
            datasets=[d.name for d in datasets],
        )
        self._datasets = datasets
        return self._spec

    @property
    def action_spec(self) -> ActionSpec:
        return self.prepare()

    def mixture_weights(self) -> list[float]:
        """Sampling probability of each dataset in training: weight (times training frames when `balance`),
        normalised to sum to one."""
        self.prepare()
        raw = [d.weight * (d.frames(val=False) if self.balance else 1.0) for d in self._datasets]
        return [w / sum(raw) for w in raw]

    @property
    def num_train_frames(self) -> int:
        self.prepare()
        return sum(d.frames(val=False) for d in self._datasets)

    @property
    def num_val_frames(self) -> int:
        self.prepare()
        return sum(d.frames(val=True) for d in self._datasets)

    # ---- ranks and epochs (StreamingDataModule) ---------------------------------------------------------

    def num_batches(self, world_size: int | None = None) -> int:
        """Training batches per rank per epoch: floor(training frames of all datasets / (world * batch))."""
        world = world_size if world_size is not None else self.rank_and_world()[1]
        return self.num_train_frames // (world * self.batch_size)

    # ---- loaders --------------------------------------------------------------------------------------

    def _stream(self, train: bool) -> TrajectoryStream:
        spec = self.prepare()
        rank, world = self.rank_and_world()
        weights = self.mixture_weights()
        num_batches = None
        if train:
            num_batches = self.num_batches(world)
            if num_batches == 0:
                raise ValueError(
                    f"{self.num_train_frames} training frames are fewer than world_size {world} x "
                    f"batch_size {self.batch_size}: no full batch per rank"
                )
        readers = []
        for index, ds in enumerate(self._datasets):
            # Each dataset gets its own seed and a share of the shuffle buffer in proportion to its weight.
            seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
            buffer = max(1, round(self.shuffle_buffer * weights[index])) if self.shuffle_buffer > 1 else 0
            readers.append(
                _EpisodeReader(
                    ds.shards,
                    ds.episodes(val=not train),
                    train=train,
                    seed=seed,
                    shuffle_buffer=buffer,
                    rank=rank,
                    world_size=world,
                    tokenizer=self.tokenizer,
                    image_processor=self.image_processor,
                    counts=[int(s["num_samples"]) for s in ds.meta["shards"]],
                )
            )
        infos = [_DatasetInfo(ds.path, ds.name, int(ds.meta["max_horizon"])) for ds in self._datasets]
        return TrajectoryStream(
            readers,
            infos,
            weights,
            tokenizer=self.tokenizer,
            image_processor=self.image_processor,
            action_spec=spec,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            augment=self.augment,
            num_batches=num_batches,
            seed=self.seed,
            max_fault_fraction=self.max_fault_fraction,
            fault_min_samples=self.fault_min_samples,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> EpochDataLoader:
        return EpochDataLoader(
            self._stream(True), self.current_epoch, self.positions, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.num_val_frames == 0:
            return []
        return DataLoader(self._stream(False), batch_size=None, num_workers=self.num_workers)
