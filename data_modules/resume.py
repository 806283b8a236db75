"""Exact data positions of the streaming DataModules, so a run resumes mid-epoch without re-reading its data.

A training slot (one (rank, worker) of an epoch) reads a fixed list of references per pass: (shard index,
sample ordinal in the shard) built from the `meta.json` sample counts, never from the data. Its seeded shuffle
buffer is therefore a permutation of that list (`reservoir_order`), computed from the seed alone. The slot's
position is the number of references it has handed out; from a position a resumed worker recomputes the
permutation, reads the few samples that were still held in the buffer by random access (`TarSampleIndex`:
member headers only, no data before them), and streams the rest from where the original run stopped reading.

`StreamPositions` lives in the training process: it keeps the position carried by the last batch that a
training step consumed from each worker (Lightning prefetches, so what a loader produced is not what was
trained on) and is saved in the checkpoint as the train loader's state.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

POSITION_KEY = "stream_position"
"""Batch key of a training batch's position: `{"epoch", "slot", "batches", ...}` (plain ints)."""

STATE_VERSION = 1


def reservoir_order(num: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order (input indices) of the seeded shuffle buffer over `num` inputs; Long[num].

    The buffer fills with the first `buffer_size` inputs; each further input replaces the held item at a
    uniformly drawn slot, which is emitted; at the end the buffer drains in a random permutation. The draws
    are `rng.integers(buffer_size, size=num - buffer_size)` then `rng.permutation(min(num, buffer_size))`;
    `buffer_size <= 1` is no shuffle and draws nothing.
    """
    if buffer_size <= 1 or num == 0:
        return np.arange(num)
    replaced = max(0, num - buffer_size)
    draws = rng.integers(buffer_size, size=replaced)
    drain = rng.permutation(min(num, buffer_size))
    if replaced == 0:
        return drain
    times = np.arange(replaced)
    # Sorted by slot, then time: the previous write to the same slot is the item that an emission takes.
    by_slot = np.lexsort((times, draws))
    slots = draws[by_slot]
    same = slots[1:] == slots[:-1]
    previous = np.full(replaced, -1)
    previous[by_slot[1:][same]] = by_slot[:-1][same]
    emitted = np.where(previous >= 0, buffer_size + previous, draws)
    final = np.arange(buffer_size)
    last = np.append(~same, True)
    final[slots[last]] = buffer_size + by_slot[last]
    return np.concatenate([emitted, final[drain]])


def skip_reservoir(num: int, buffer_size: int, rng: np.random.Generator) -> None:
    """Advance `rng` past one `reservoir_order` call without computing the order."""
    if buffer_size <= 1 or num == 0:
        return
    rng.integers(buffer_size, size=max(0, num - buffer_size))
    rng.permutation(min(num, buffer_size))


class TarSampleIndex:
    """The member headers of each sample of one tar shard, for reading single samples by ordinal.

    Only headers are read (`tarfile` seeks past the data). Members are grouped into samples as
    `data_modules.shards.iter_shard_samples` does: a new sample starts where the key changes, a key seen
    before or an extension repeated marks it bad (`__bad__`), and a sample whose data is cut off by the end
    of the file is dropped, together with everything after it. `read(k)` gives what `iter_shard_samples`
    yields as its k-th sample, or None when the shard has no k-th sample.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.samples: list[dict[str, Any]] = []
        size = os.path.getsize(path)
        done: set[str] = set()
        current: dict[str, Any] | None = None
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, ext = base_plus_ext(info.name)
                    if key is None or os.path.basename(info.name).startswith("__"):
                        continue
                    if info.offset_data + info.size > size:
                        # The cut member's sample is dropped; the one before it, if another, is complete.
                        if current is not None and key == current["key"]:
                            current = None
                        break
                    ext = ext.lower()
                    if current is not None and key != current["key"]:
                        done.add(current["key"])
                        self.samples.append(current)
                        current = None
                    if current is None:
                        current = {"key": key, "members": [], "bad": None}
                        if key in done:
                            current["bad"] = f"files of key {key!r} are not contiguous in the tar"
                    if any(e == ext for e, _, _ in current["members"]):
                        current["bad"] = f"extension {ext!r} repeated for key {key!r}"
                    current["members"].append((ext, info.offset_data, info.size))
        except (tarfile.TarError, OSError, EOFError):
            pass
        if current is not None:
            self.samples.append(current)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, ordinals: Iterable[int]) -> Iterator[dict[str, Any] | None]:
        """The samples at `ordinals` (in the order given), each `{"__key__", "__shard__", ext: bytes}`."""
        with open(self.path, "rb") as handle:
            for ordinal in ordinals:
                if not 0 <= ordinal < len(self.samples):
                    yield None
                    continue
                entry = self.samples[ordinal]
                sample: dict[str, Any] = {"__key__": entry["key"], "__shard__": self.path}
                for ext, offset, length in entry["members"]:
                    handle.seek(offset)
                    sample[ext] = handle.read(length)
                if entry["bad"] is not None:
                    sample["__bad__"] = entry["bad"]
                yield sample


class StreamResume:
    """Where each worker of a resumed epoch starts, after `batches` batches of the rank were trained on:
    worker w of the new loader plays logical worker (w + batches) % num_workers, so the loader's round robin
    continues the original order of batches."""

    def __init__(self, batches: int, num_workers: int, tokens: dict[int, dict[str, Any]]) -> None:
        self.batches = batches
        self.offset = batches % num_workers
        self.tokens = tokens

    def start(self, worker: int, num_workers: int) -> tuple[int, dict[str, Any]]:
        """(logical worker, its position token; empty when it had not yielded a batch)."""
        logical = (worker + self.offset) % num_workers
        return logical, dict(self.tokens.get(logical, {}))


class StreamPositions:
    """The training process's record of how far each worker's stream was consumed in the current epoch.

    `record` takes the position of every batch a training step consumes; `state_dict` (all ranks'
    positions, gathered) goes into the checkpoint; after `load_state_dict`, `resume(epoch, ...)` tells the
    next loader iterator where to start. `loop_batches` may return the trainer's count of batches consumed in
    the epoch, which must agree with the saved one.
    """

    def __init__(self, loop_batches: Callable[[], int | None] | None = None) -> None:
        self.loop_batches = loop_batches
        self.epoch: int | None = None
        self.batches = 0
        self.tokens: dict[int, dict[str, Any]] = {}
        self.loaded: dict[str, Any] | None = None

    def record(self, position: dict[str, Any]) -> None:
        epoch = int(position["epoch"])
        if epoch != self.epoch:
            self.epoch, self.batches, self.tokens = epoch, 0, {}
        self.tokens[int(position["slot"])] = {k: v for k, v in position.items() if k not in ("epoch", "slot")}
        self.batches += 1
        self.loaded = None

    def state_dict(self, rank: int, world_size: int, num_workers: int) -> dict[str, Any]:
        if self.epoch is None:
            return {}
        tokens = {rank: self.tokens}
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, self.tokens)
            tokens = dict(enumerate(gathered))
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": num_workers,
            "world_size": world_size,
            "tokens": tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state) if state else None

    def resume(self, epoch: int, rank: int, world_size: int, num_workers: int) -> StreamResume | None:
        """The start of each worker for a loader iterator over `epoch`, or None to start the epoch afresh."""
        state = self.loaded
        if state is None or int(state.get("epoch", -1)) != epoch:
            return None
        saved = (int(state["world_size"]), int(state["num_workers"]))
        if saved != (world_size, num_workers):
            log.warning(
                "checkpoint's data position is for %d ranks x %d workers, this run has %d x %d "
                "(data.num_workers or the devices changed): epoch %d's data start again from its beginning",
                *saved,
                world_size,
                num_workers,
                epoch,
            )
            return None
        batches = int(state["batches"])
        trained = self.loop_batches() if self.loop_batches is not None else None
        if trained is not None and trained != batches:
            log.warning(
                "checkpoint's data position counts %d batches of epoch %d, the training loop %d: "
                "epoch %d's data start again from its beginning",
                batches,
                epoch,
                trained,
                epoch,
            )
            return None
        tokens = {int(k): dict(v) for k, v in state["tokens"].get(rank, {}).items()}
        self.epoch, self.batches, self.tokens = epoch, batches, {k: dict(v) for k, v in tokens.items()}
        return StreamResume(batches, num_workers, tokens)
