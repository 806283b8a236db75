"""Streaming image-text (conversation) data over WebDataset shards, as a LightningDataModule.

Every worker's stream is a pure function of (seed, epoch, rank, world size, worker, number of workers):
shard order, the (rank, worker) split, the sample shuffle buffer and the wrap-around are all seeded and
computed from the meta.json sample counts, so a run resumes mid-epoch from the position each training batch
carries (data_modules/resume.py, docs/reliability.md). See docs/data.md for the format and the rules.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_modules.faults import FaultCounter
from data_modules.resume import (
    POSITION_KEY,
    StreamPositions,
    StreamResume,
    TarSampleIndex,
    reservoir_order,
    skip_reservoir,
)
from data_modules.shards import (
    TruncatedShardError,
    iter_shard_samples,
    list_shards,
    meta_is_complete,
    required_sample_counts,
)
from dvlx.processing import IGNORE_INDEX, IMAGE_PLACEHOLDER, ImageProcessor, Tokenizer, encode_conversation

# Tags that keep the seeded random streams of different purposes apart.
_SHARD_ORDER_TAG = 0
_SHUFFLE_TAG = 1
_GROUPING_TAG = 2
# Tar indexes kept per worker for random access on resume.
_INDEX_CACHE_SIZE = 64


def collate_image_text(
    samples: Sequence[Mapping[str, Any]], pad_token_id: int, faults: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Right-pad encoded samples into one batch.

    Returns `input_ids`/`labels`/`attention_mask` Long[B, L] (padding: `pad_token_id` / IGNORE_INDEX / 0),
    `pixel_values` Float[N, row] with all images of the batch in sample order, `image_grid_thw` Long[n_img, 3]
    and `faults` (counts of skipped samples since the worker's previous batch).
    """
    if not samples:
        raise ValueError("collate_image_text needs at least one sample")
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, sample in enumerate(samples):
        n = len(sample["input_ids"])
        if len(sample["labels"]) != n:
            raise ValueError(f"sample {i}: {n} input_ids but {len(sample['labels'])} labels")
        input_ids[i, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]).float(),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]).long(),
        "faults": dict(faults or {}),
    }


class _Skip(Exception):
    """A sample to skip, with its fault kind and reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _turn_text(turn: Mapping[str, Any]) -> str:
    text = turn.get("value", turn.get("content", ""))
    return text if isinstance(text, str) else ""


class ImageTextStream(IterableDataset):
    """One rank's stream of collated image-text batches (use with `DataLoader(batch_size=None)`).

    train=True: shards shuffled per (seed, epoch), seeded sample shuffle buffer, exactly `num_batches` full
    batches per rank split over the workers, each worker wrapping around its own stream when it runs out.
    train=False: shards in order, no shuffle, one pass, the last partial batch of each worker kept.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        template: str,
        batch_size: int,
        train: bool,
        num_batches: int | None = None,
        max_length: int = 8192,
        num_eos: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_fault_fraction: float = 0.1,
        fault_min_samples: int = 50,
        rank: int = 0,
        world_size: int = 1,
        length_grouping: int = 0,
        counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ImageTextStream needs at least one shard")
        if counts is not None and len(counts) != len(shards):
            raise ValueError(f"counts must hold one sample count per shard: {len(counts)} for {len(shards)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if train and (num_batches is None or num_batches < 0):
            raise ValueError(f"a training stream needs num_batches >= 0, got {num_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shards = list(shards)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.batch_size = batch_size
        self.train = train
        self.num_batches = num_batches
        self.max_length = max_length
        self.num_eos = num_eos
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_fault_fraction = max_fault_fraction
        self.fault_min_samples = fault_min_samples
        self.rank = rank
        self.world_size = world_size
        self.length_grouping = length_grouping if train else 0
        self.epoch = 0
        self.counts = [int(n) for n in counts] if counts is not None else None
        self.resume: StreamResume | None = None
        self._indexes: dict[int, TarSampleIndex] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a validation stream has no fixed length")
        return self.num_batches

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices in reading order: seeded permutation for training, file order otherwise."""
        if not self.train:
            return list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, epoch, _SHARD_ORDER_TAG])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def worker_num_batches(self, worker: int, num_workers: int) -> int | None:
        """Batches this worker yields in a training epoch: the rank's count split as evenly as possible."""
        if self.num_batches is None:
            return None
        return self.num_batches // num_workers + (1 if worker < self.num_batches % num_workers else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of one (rank, worker) slot for the current epoch.

        In training every batch carries `batch[POSITION_KEY]`, the slot's position after it; with `resume` set
        (by the loader, from a checkpoint) worker `worker` continues the stream of the logical worker
        `resume.start` names from its position.
        """
        if not self.train:
            return self._val_batches(worker, num_workers)
        logical, token = self.resume.start(worker, num_workers) if self.resume else (worker, {})
        return self._train_batches(logical, num_workers, token)

    def _train_batches(self, worker: int, num_workers: int, token: Mapping[str, Any]) -> Iterator[dict]:
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        counter = FaultCounter(
            self.max_fault_fraction, self.fault_min_samples, where=f"rank {self.rank} worker {worker}"
        )
        quota = self.worker_num_batches(worker, num_workers)
        done = int(token.get("batches", 0))
        if done >= quota:
            return
        position = int(token.get("position", 0))
        skip = int(token.get("skip", 0))
        samples = self._train_samples(slot, slots, counter, position)
        group_size = self.batch_size * max(1, self.length_grouping)
        while True:
            # A group is a pure function of where it starts, so a resumed worker rebuilds a partly consumed
            # group from its first sample and drops the batches already trained on.
            start = position
            group: list[dict[str, Any]] = []
            while len(group) < group_size:
                sample = next(samples)
                position += 1
                encoded = self._encode_counted(sample, counter)
                if encoded is not None:
                    group.append(encoded)
            rng = np.random.default_rng([self.seed, self.epoch, _GROUPING_TAG, slot, slots, start])
            batches = _arrange_group(group, self.batch_size, self.length_grouping, rng)
            if skip:
                # A rebuilt group's bad samples went out with its first batch, before the resume.
                counter.take()
            for i, items in enumerate(batches[skip:], start=skip):
                done += 1
                last = i == len(batches) - 1
                batch = collate_image_text(items, self.tokenizer.pad_token_id, counter.take())
                batch[POSITION_KEY] = {
                    "epoch": self.epoch,
                    "slot": worker,
                    "batches": done,
                    "position": position if last else start,
                    "skip": 0 if last else i + 1,
                }
                yield batch
                if done >= quota:
                    return
            skip = 0

    def _val_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        counter = FaultCounter(
            self.max_fault_fraction, self.fault_min_samples, where=f"rank {self.rank} worker {worker}"
        )
        encoded = (self._encode_counted(s, counter) for s in self._owned_samples(slot, slots, counter))
        batches = _group_by_length(
            (e for e in encoded if e is not None), self.batch_size, 0, np.random.default_rng(0)
        )
        for batch in batches:
            yield collate_image_text(batch, self.tokenizer.pad_token_id, counter.take())

    def _encode_counted(self, sample: Mapping[str, Any] | None, counter: FaultCounter) -> dict | None:
        """`encode(sample)`, or None for a missing sample and for a bad one (counted and logged)."""
        if sample is None:
            return None
        counter.seen()
        try:
            encoded = self.encode(sample)
        except _Skip as skip:
            counter.record(skip.kind, sample["__shard__"], sample["__key__"], skip.reason)
            encoded = None
        counter.check(sample["__shard__"])
        return encoded

    def _accept(self, sample: Mapping[str, Any]) -> bool:
        """Whether a raw sample belongs to this stream (subclasses hold out some)."""
        return True

    def _owned_samples(
        self, slot: int, slots: int, counter: FaultCounter, start: int = 0
    ) -> Iterator[dict[str, Any] | None]:
        """Raw samples of this slot: for training `_train_samples` (from position `start`), otherwise one pass
        over its shards in order."""
        if self.train:
            return self._train_samples(slot, slots, counter, start)
        order = self.shard_order(self.epoch)
        by_shard = len(order) >= slots
        return self._one_pass(order[slot::slots] if by_shard else order, slot, slots, by_shard, counter)

    def slot_references(self, slot: int, slots: int) -> np.ndarray:
        """One training pass of a slot as references Long[n, 2]: (shard index, sample ordinal in the shard).

        With at least as many shards as slots, slot s reads shards s, s + slots, ... of the epoch's order.
        Otherwise every slot reads all shards and keeps the samples whose running index (over the pass, from
        the meta.json counts) modulo the number of slots is s. Either way the slots are disjoint.
        """
        counts = self.sample_counts()
        order = self.shard_order(self.epoch)
        by_shard = len(order) >= slots
        mine = order[slot::slots] if by_shard else order
        refs = [np.stack([np.full(counts[i], i), np.arange(counts[i])], 1) for i in mine]
        refs = np.concatenate(refs) if refs else np.zeros((0, 2), dtype=np.int64)
        return refs if by_shard else refs[slot::slots]

    def sample_counts(self) -> list[int]:
        if self.counts is None:
            self.counts = required_sample_counts(
                self.shards, "training streams need the sample counts of every shard"
            )
        return self.counts

    def _train_samples(
        self, slot: int, slots: int, counter: FaultCounter, start: int = 0
    ) -> Iterator[dict[str, Any] | None]:
        """The slot's raw samples from position `start` on, pass after pass, shuffled; one item per reference
        (None where the shard lacks the sample or it belongs to another split).

        The shuffle buffer drains at the end of each pass, so a slot sees all of its samples once before any
        of them again.
        """
        refs = self.slot_references(slot, slots)
        if len(refs) == 0:
            raise RuntimeError(f"rank {self.rank} slot {slot}: its shards hold no samples for its batches")
        rng = np.random.default_rng([self.seed, self.epoch, _SHUFFLE_TAG, slot, slots])
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        passes, offset = divmod(start, len(refs))
        for _ in range(passes):
            skip_reservoir(len(refs), size, rng)
        order = self.shard_order(self.epoch)
        # A truncated shard read by several slots (sharing mode) is counted by one of them.
        counted = set(order) if len(order) >= slots else {s for p, s in enumerate(order) if p % slots == slot}
        while True:
            order = reservoir_order(len(refs), size, rng)
            useful = 0
            for sample in self._pass_items(refs, order, offset, counter, counted):
                useful += sample is not None
                yield sample
            if useful == 0 and offset == 0:
                names = sorted({self.shards[int(i)] for i in refs[:, 0]})
                raise RuntimeError(
                    f"rank {self.rank} slot {slot}: no readable samples in its shards {names[:5]}"
                    f"{' ...' if len(names) > 5 else ''}; cannot fill its batches"
                )
            offset = 0

    def _pass_items(
        self, refs: np.ndarray, order: np.ndarray, start: int, counter: FaultCounter, counted: set[int]
    ) -> Iterator[dict[str, Any] | None]:
        """Samples of `refs` in `order` from output `start` on, reading the references in sequence.

        The original reading had reached max(order[:start]) + 1 references; the ones below that still to be
        emitted are read by random access, everything else in sequence, so nothing before is read again.
        """
        frontier = int(order[:start].max()) + 1 if start else 0
        # Samples read but not yet emitted (the shuffle buffer); another split's samples are held as None.
        held: dict[int, dict[str, Any] | None] = {}
        early = [int(r) for r in order[start:] if r < frontier]
        for shard in sorted({int(refs[r, 0]) for r in early}):
            mine = [r for r in early if refs[r, 0] == shard]
            for r, sample in zip(mine, self._index(shard).read(int(refs[r, 1]) for r in mine), strict=True):
                held[r] = sample if sample is not None and self._accept(sample) else None
        sequence = self._read_sequence(refs, frontier, counter, counted)
        for r in order[start:]:
            r = int(r)
            while r not in held:
                index, sample = next(sequence)
                held[index] = sample if sample is not None and self._accept(sample) else None
            yield held.pop(r)

    def _read_sequence(
        self, refs: np.ndarray, start: int, counter: FaultCounter, counted: set[int]
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(reference index, sample or None) for references start, start + 1, ... of one pass."""
        i = start
        while i < len(refs):
            shard = int(refs[i, 0])
            j = i
            while j < len(refs) and refs[j, 0] == shard:
                j += 1
            ordinals = [int(k) for k in refs[i:j, 1]]
            if i == start and i > 0 and refs[i - 1, 0] == shard:
                # Resumed inside this shard: the rest is read by index. The original reading counts a
                # truncation when it meets the first missing sample, so it is still to count if the last
                # sample read before the resume exists.
                count = shard in counted and int(refs[i - 1, 1]) < len(self._index(shard))
                samples = self._read_indexed(shard, ordinals, counter, count)
            else:
                samples = self._read_shard(shard, ordinals, counter, shard in counted)
            yield from zip(range(i, j), samples, strict=True)
            i = j

    def _read_shard(
        self, shard: int, ordinals: list[int], counter: FaultCounter, count_truncation: bool
    ) -> Iterator[dict[str, Any] | None]:
        """The samples at `ordinals` (ascending) of one shard, read in one streaming pass; None for each one
        the shard lacks (a truncated tar, or a complete one with fewer samples than its meta.json entry),
        counted once per pass by the slot that owns the shard."""
        path = self.shards[shard]
        wanted = iter(ordinals)
        target = next(wanted, None)
        read = 0
        try:
            for ordinal, sample in enumerate(iter_shard_samples(path)):
                read = ordinal + 1
                if ordinal == target:
                    yield sample
                    target = next(wanted, None)
        except TruncatedShardError as error:
            if count_truncation:
                counter.record("truncated_tar", path, None, error.reason)
        else:
            if target is not None and count_truncation:
                reason = f"holds {read} samples, its meta.json entry says {self.counts[shard]}"
                counter.record("truncated_tar", path, None, reason)
        while target is not None:
            yield None
            target = next(wanted, None)

    def _read_indexed(
        self, shard: int, ordinals: list[int], counter: FaultCounter, count_truncation: bool
    ) -> Iterator[dict[str, Any] | None]:
        """`_read_shard` by random access: the same samples, a missing one counted like a truncation."""
        index = self._index(shard)
        for sample in index.read(ordinals):
            if sample is None and count_truncation:
                reason = f"holds {len(index)} readable samples, its meta.json entry says {self.counts[shard]}"
                counter.record("truncated_tar", self.shards[shard], None, reason)
                count_truncation = False
            yield sample

    def _index(self, shard: int) -> TarSampleIndex:
        index = self._indexes.get(shard)
        if index is None:
            if len(self._indexes) >= _INDEX_CACHE_SIZE:
                self._indexes.clear()
            index = self._indexes[shard] = TarSampleIndex(self.shards[shard])
        return index

    def _one_pass(
        self, mine: list[int], slot: int, slots: int, by_shard: bool, counter: FaultCounter
    ) -> Iterator[dict[str, Any]]:
        running = 0
        for position, index in enumerate(mine):
            path = self.shards[index]
            try:
                for sample in iter_shard_samples(path):
                    if (by_shard or running % slots == slot) and self._accept(sample):
                        yield sample
                    running += 1
            except TruncatedShardError as error:
                # Every slot sees a truncation in the sharing mode; only one of them counts it.
                if by_shard or position % slots == slot:
                    counter.record("truncated_tar", path, None, error.reason)

    def encode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Decode and encode one raw sample; raises `_Skip` with the fault kind when it cannot be used."""
        if "__bad__" in sample:
            raise _Skip("bad_record", sample["__bad__"])
        if "json" not in sample:
            raise _Skip("missing_key", f"no .json file (files: {sorted(k for k in sample if k[:2] != '__')})")
        try:
            record = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _Skip("bad_record", f"json does not parse: {error}") from None
        if not isinstance(record, dict):
            raise _Skip("bad_record", f"json must be an object, got {type(record).__name__}")
        conversations = record.get("conversations")
        if (
            not isinstance(conversations, list)
            or not conversations
            or not all(isinstance(t, dict) for t in conversations)
        ):
            raise _Skip("bad_record", "'conversations' must be a non-empty list of turn objects")
        image_keys = {k.split(".", 1)[0]: k for k in sample if k.startswith("img")}
        num_images = record.get("num_images", len(image_keys))
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise _Skip("bad_record", f"'num_images' must be a non-negative int, got {num_images!r}")
        placeholders = sum(_turn_text(t).count(IMAGE_PLACEHOLDER) for t in conversations)
        if placeholders != num_images:
            raise _Skip("bad_record", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders, {num_images} images")
        images = []
        for k in range(num_images):
            name = image_keys.get(f"img{k}")
            if name is None:
                raise _Skip("missing_key", f"no img{k}.* file for image {k} of {num_images}")
            try:
                image = Image.open(io.BytesIO(sample[name]))
                image.load()
                grid = self.image_processor.grid_thw(image.height, image.width)
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                raise _Skip("corrupt_image", f"{name}: {type(error).__name__}: {error}") from None
            images.append((image, grid))
        num_tokens = [self.image_processor.num_image_tokens(grid) for _, grid in images]
        try:
            encoded = encode_conversation(
                self.tokenizer, conversations, self.template, num_tokens, num_eos=self.num_eos
            )
        except (ValueError, KeyError, TypeError) as error:
            raise _Skip("bad_record", f"conversation does not encode: {error}") from None
        if len(encoded.input_ids) > self.max_length:
            raise _Skip("too_long", f"{len(encoded.input_ids)} tokens > max_length {self.max_length}")
        processed = self.image_processor([image for image, _ in images])
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
        }


def _arrange_group(
    items: list[dict[str, Any]], batch_size: int, grouping: int, rng: np.random.Generator
) -> list[list[dict[str, Any]]]:
    """Cut one group of samples into batches of `batch_size` (the last may be partial).

    With `grouping` > 1 the samples are first sorted by token count (image tokens included, since they are
    expanded in `input_ids`) and the full batches come in a random order from `rng`, so padding shrinks while
    batch lengths stay mixed over time.
    """
    if grouping > 1:
        items = sorted(items, key=lambda s: len(s["input_ids"]))
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if grouping > 1:
        full = [c for c in chunks if len(c) == batch_size]
        partial = [c for c in chunks if len(c) < batch_size]
        chunks = [full[int(i)] for i in rng.permutation(len(full))] + partial
    return chunks


def _group_by_length(
    samples: Iterator[dict[str, Any]], batch_size: int, grouping: int, rng: np.random.Generator
) -> Iterator[list[dict[str, Any]]]:
    """Batches of `batch_size` samples from groups of `batch_size * grouping` (`_arrange_group`); the last
    batch may be partial."""
    group = batch_size * max(1, grouping)
    pending: list[dict[str, Any]] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == group:
            yield from _arrange_group(pending, batch_size, grouping, rng)
            pending = []
    if pending:
        yield from _arrange_group(pending, batch_size, grouping, rng)


class EpochDataLoader(DataLoader):
    """DataLoader that hands the current epoch (and, after a resume, each worker's start) to its dataset
    each time iteration starts.

    Lightning only calls `set_epoch` on samplers, and an IterableDataset has none of its own, so the epoch
    is read from `epoch_fn` right before workers are started (they receive the dataset then). Workers must
    not be persistent, or they would keep the first epoch's copy. `state_dict`/`load_state_dict` are the
    data position that Lightning stores with the training loop (`positions`, see data_modules.resume).
    """

    def __init__(
        self,
        dataset: ImageTextStream,
        epoch_fn: Callable[[], int],
        positions: StreamPositions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_fn = epoch_fn
        self.positions = positions

    def _layout(self) -> tuple[int, int, int]:
        return self.dataset.rank, self.dataset.world_size, max(1, self.num_workers)

    def __iter__(self):
        epoch = self.epoch_fn()
        resume = self.positions.resume(epoch, *self._layout()) if self.positions else None
        if resume is not None and resume.batches >= len(self.dataset):
            # Saved on the epoch's last batch: Lightning restores the finished epoch's number before this
            # iterator is made and trains the next epoch with it.
            epoch, resume = epoch + 1, None
        self.dataset.set_epoch(epoch)
        self.dataset.resume = resume
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self.positions.state_dict(*self._layout()) if self.positions else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.positions is not None:
            self.positions.load_state_dict(state)


class StreamingDataModule(LightningDataModule):
    """Rank, world size, epoch and data position for the streaming DataModules (`rank_override`/
    `world_size_override` are set by the subclass from its `rank`/`world_size` arguments, for tests).

    Every training batch that reaches a training step passes `on_before_batch_transfer`, which takes its
    position off (`POSITION_KEY`) into `positions`; the train loader saves them with the checkpoint.
    """

    rank_override: int | None = None
    world_size_override: int | None = None
    epoch: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.positions = StreamPositions(self._loop_batches)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when no trainer is attached (a trainer's `current_epoch` wins)."""
        self.epoch = int(epoch)

    def current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else self.epoch

    def rank_and_world(self) -> tuple[int, int]:
        if self.rank_override is not None and self.world_size_override is not None:
            return self.rank_override, self.world_size_override
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            position = batch.pop(POSITION_KEY, None)
            if position is not None and self.trainer is not None and self.trainer.training:
                self.positions.record(position)
        return batch

    def _loop_batches(self) -> int | None:
        """Batches of the current epoch that the trainer's loop has consumed (its restored count)."""
        if self.trainer is None:
            return None
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class ImageTextDataModule(StreamingDataModule):
    """Image-text conversation shards -> batches for the VL stages (see docs/data.md).

    `rank`/`world_size` override the values taken from the trainer or torch.distributed (for tests).
    `drop_last=True` gives every rank floor(N / (world * batch_size)) training batches per epoch, False gives
    the ceiling (the last batches wrap around). `generate` is called by `prepare_data` when `train` does not
    exist yet.
    """

    def __init__(
        self,
        *,
        train: str | list[str],
        val: str | list[str] | None = None,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        template: str = "plain",
        batch_size: int,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        max_length: int = 8192,
        num_eos: int = 0,
        seed: int = 0,
        max_fault_fraction: float = 0.1,
        fault_min_samples: int = 50,
        val_batch_size: int | None = None,
        drop_last: bool = True,
        generate: Callable[[], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        length_grouping: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.train_spec = train
        self.val_spec = val
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.max_length = max_length
        self.num_eos = num_eos
        self.seed = seed
        self.max_fault_fraction = max_fault_fraction
        self.fault_min_samples = fault_min_samples
        self.val_batch_size = val_batch_size or batch_size
        self.drop_last = drop_last
        self.generate = generate
        self.rank_override = rank
        self.world_size_override = world_size
        self.length_grouping = length_grouping
        self.epoch = 0
        self.train_shards: list[str] = []
        self.val_shards: list[str] = []
        self.train_counts: list[int] = []
        self.num_train_samples = 0

    def prepare_data(self) -> None:
        if self.generate is not None and not _spec_exists(self.train_spec):
            self.generate()

    def setup(self, stage: str | None = None) -> None:
        self.train_shards = list_shards(self.train_spec)
        self.train_counts = required_sample_counts(
            self.train_shards,
            "training needs the sample counts of every shard to give all ranks the same number of batches",
        )
        self.num_train_samples = sum(self.train_counts)
        self.val_shards = list_shards(self.val_spec) if self.val_spec is not None else []

    def num_batches(self, world_size: int | None = None) -> int:
        """Training batches per rank per epoch."""
        world = world_size if world_size is not None else self.rank_and_world()[1]
        per_rank = self.num_train_samples / (world * self.batch_size)
        return math.floor(per_rank) if self.drop_last else math.ceil(per_rank)

    def _stream(self, shards: list[str], train: bool) -> ImageTextStream:
        rank, world = self.rank_and_world()
        num_batches = None
        if train:
            num_batches = self.num_batches(world)
            if num_batches == 0:
                raise ValueError(
                    f"{self.num_train_samples} training samples in {self.train_spec} are fewer than "
                    f"world_size {world} x batch_size {self.batch_size}: no full batch per rank"
                )
        return ImageTextStream(
            shards,
            tokenizer=self.tokenizer,
            image_processor=self.image_processor,
            template=self.template,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            num_batches=num_batches,
            max_length=self.max_length,
            num_eos=self.num_eos,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_fault_fraction=self.max_fault_fraction,
            fault_min_samples=self.fault_min_samples,
            rank=rank,
            world_size=world,
            length_grouping=self.length_grouping,
            counts=self.train_counts if train else None,
        )

    def train_dataloader(self) -> EpochDataLoader:
        if not self.train_shards:
            self.setup("fit")
        return EpochDataLoader(
            self._stream(self.train_shards, True),
            self.current_epoch,
            self.positions,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_spec is None:
            return []
        if not self.val_shards:
            self.setup("validate")
        return DataLoader(self._stream(self.val_shards, False), batch_size=None, num_workers=self.num_workers)


def _spec_exists(spec: str | list[str]) -> bool:
    if isinstance(spec, str) and os.path.isdir(spec):
        return meta_is_complete(spec)
    try:
        list_shards(spec)
    except (FileNotFoundError, ValueError):
        return False
    return True
