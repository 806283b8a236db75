"""Checkpoint I/O in the official Hugging Face layout: config.json + model.safetensors, or shards + index.

Loading builds the model on the meta device and assigns the stored tensors (no random init, no second copy).
Saving writes into a temporary folder beside the destination and swaps it in at the end, so an interrupted
save never leaves a half-written folder in place.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dvlx.backbone.config import CheckpointError, DreamVLConfig

if TYPE_CHECKING:
    from dvlx.backbone.model import DreamVL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_REPORT_LIMIT = 10

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Safetensors files of a checkpoint folder -> the keys the index assigns to each (None: unsharded)."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{index_path}: not a safetensors index with a 'weight_map' ({err})"
            ) from err
        files: dict[Path, list[str] | None] = {}
        for key, name in weight_map.items():
            files.setdefault(folder / name, []).append(key)
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index_path} lists {path.name}, which does not exist")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}")


def stored_shapes(files: dict[Path, list[str] | None]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Key -> (file, shape) read from the safetensors headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path, indexed in files.items():
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
        if indexed is not None:
            absent = sorted(set(indexed) - set(keys))
            if absent:
                raise CheckpointError(
                    f"{path}: the index assigns {len(absent)} key(s) to this file that it lacks, "
                    f"e.g. {absent[0]}"
                )
    return found


def mismatch_report(
    folder: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> str | None:
    """A readable report of missing / unexpected / mis-shaped keys, or None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return None
    lines = [
        f"checkpoint {folder} does not match the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped parameter(s)"
    ]
    for title, keys, fmt in (
        ("missing", missing, lambda k: f"{k} (model {list(expected[k])})"),
        ("unexpected", unexpected, lambda k: f"{k} (checkpoint {list(found[k])})"),
        ("mis-shaped", misshaped, lambda k: f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"),
    ):
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines += [f"    {fmt(k)}" for k in keys[:_REPORT_LIMIT]]
            if len(keys) > _REPORT_LIMIT:
                lines.append(f"    ... and {len(keys) - _REPORT_LIMIT} more")
    return "\n".join(lines)


def load_pretrained(
    cls: type[DreamVL],
    folder: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
) -> DreamVL:
    """Build `cls` on the meta device from folder/config.json and assign the stored weights (eval mode)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    config = DreamVLConfig.from_json(folder / CONFIG_NAME)
    target_dtype = resolve_dtype(config.torch_dtype if dtype is None else dtype)
    target_device = torch.device("cpu" if device is None else device)
    files = weight_files(folder)
    stored = stored_shapes(files)

    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = mismatch_report(folder, expected, {k: shape for k, (_, shape) in stored.items()})
    if report:
        raise CheckpointError(report)

    for path in files:
        with safe_open(path, framework="pt", device=str(target_device)) as f:
            tensors = {}
            for key in f.keys():
                tensor = f.get_tensor(key)
                tensors[key] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors
    model.materialize_rotary_buffers(target_device)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(
            f"checkpoint {folder}: tensors left uninitialised after loading: {left[:_REPORT_LIMIT]}"
        )
    return model.eval()


_MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def save_pretrained(
    model: DreamVL,
    folder: str | Path,
    max_shard_size_bytes: int = 5 * 2**30,
    dtype: torch.dtype | str | None = None,
) -> None:
    """Write config.json + safetensors (sharded with an index above `max_shard_size_bytes`), official keys.

    `dtype=None` keeps the parameters' dtype; config.json records the dtype written. Files already in `folder`
    that are not model files (tokenizer, processor settings) are kept.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: it is a file")
    target_dtype = resolve_dtype(model.dtype if dtype is None else dtype)
    state = model.state_dict()
    config = dataclasses.replace(model.config, torch_dtype=_dtype_name(target_dtype))

    def nbytes(t: torch.Tensor) -> int:
        itemsize = target_dtype.itemsize if t.is_floating_point() else t.element_size()
        return t.numel() * itemsize

    shards: list[list[str]] = [[]]
    shard_size = 0
    for key, tensor in state.items():
        size = nbytes(tensor)
        if shards[-1] and shard_size + size > max_shard_size_bytes:
            shards.append([])
            shard_size = 0
        shards[-1].append(key)
        shard_size += size

    token = uuid.uuid4().hex[:8]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{token}"
    tmp.mkdir()
    try:
        config.to_json(tmp / CONFIG_NAME)
        names = (
            [WEIGHTS_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map: dict[str, str] = {}
        for name, keys in zip(names, shards, strict=True):
            tensors = {}
            for key in keys:
                t = state[key].detach()
                t = t.to("cpu", target_dtype, copy=True) if t.is_floating_point() else t.to("cpu", copy=True)
                tensors[key] = t.contiguous()
                weight_map[key] = name
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(nbytes(t) for t in state.values())},
                "weight_map": weight_map,
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():
            for entry in folder.iterdir():
                if _is_model_file(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
            old = folder.parent / f".{folder.name}.old-{token}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "mismatch_report", "weight_files"]
