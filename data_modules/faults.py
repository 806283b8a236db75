"""Counting of skipped samples ("faults") in streaming dataloaders.

Each dataloader worker owns a `FaultCounter`. Every batch it yields carries
`batch["faults"] = {kind: count since this worker's previous batch}` (plain ints), so the training process
can add them up across workers and ranks with a `FaultTally`. Bad samples are skipped and counted, never
silently dropped, and a worker whose stream is mostly broken stops the run with a `TooManyFaultsError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

FAULT_KINDS: list[str] = ["truncated_tar", "corrupt_image", "missing_key", "bad_record", "too_long"]
"""Known fault kinds. `truncated_tar` is a shard-level event (a tar that ends early or cannot be read);
the others each skip one sample."""

SHARD_LEVEL_KINDS: set[str] = {"truncated_tar"}


def register_fault_kind(kind: str, *, shard_level: bool = False) -> str:
    """Add a fault kind (e.g. `nan_value` for trajectory data); registering an existing kind is a no-op."""
    if not kind or not kind.replace("_", "").isalnum():
        raise ValueError(f"fault kind must be a non-empty identifier, got {kind!r}")
    if kind not in FAULT_KINDS:
        FAULT_KINDS.append(kind)
    if shard_level:
        SHARD_LEVEL_KINDS.add(kind)
    return kind


class TooManyFaultsError(RuntimeError):
    """More than `max_fault_fraction` of a worker's samples were bad; the message names the shard."""


class FaultCounter:
    """Per-worker fault counts, rate-limited warnings and the `max_fault_fraction` guard.

    `seen()` counts samples the worker was responsible for, `record()` counts one fault. Sample-level faults
    divided by seen samples may not exceed `max_fault_fraction` once at least `min_samples` were seen.
    """

    def __init__(
        self,
        max_fault_fraction: float = 0.1,
        min_samples: int = 50,
        max_warnings_per_shard: int = 3,
        where: str = "",
    ) -> None:
        if not 0.0 <= max_fault_fraction <= 1.0:
            raise ValueError(f"max_fault_fraction must be in [0, 1], got {max_fault_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_fault_fraction = max_fault_fraction
        self.min_samples = min_samples
        self.max_warnings_per_shard = max_warnings_per_shard
        self.where = where
        self.num_seen = 0
        self.num_skipped = 0
        self.totals: dict[str, int] = {}
        self.per_shard: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._warned: dict[str, int] = {}

    def seen(self, n: int = 1) -> None:
        self.num_seen += n

    def record(self, kind: str, shard: str, key: str | None, reason: str) -> None:
        """Count one fault of `kind` in `shard` (sample `key`) and log it, at most a few times per shard."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {FAULT_KINDS} (see register_fault_kind)")
        self.totals[kind] = self.totals.get(kind, 0) + 1
        self._pending[kind] = self._pending.get(kind, 0) + 1
        self.per_shard[shard] = self.per_shard.get(shard, 0) + 1
        if kind not in SHARD_LEVEL_KINDS:
            self.num_skipped += 1
        warned = self._warned.get(shard, 0)
        if warned < self.max_warnings_per_shard:
            sample = f", sample {key}" if key is not None else ""
            log.warning("skipped %s in shard %s%s: %s%s", kind, shard, sample, reason, self._where())
        elif warned == self.max_warnings_per_shard:
            log.warning("more faults in shard %s; further warnings for this shard suppressed%s", shard,
                        self._where())
        self._warned[shard] = warned + 1

    def check(self, shard: str) -> None:
        """Raise `TooManyFaultsError` if the fraction of skipped samples is above `max_fault_fraction`."""
        if self.num_seen < self.min_samples or self.num_seen == 0:
            return
        fraction = self.num_skipped / self.num_seen
        if fraction > self.max_fault_fraction:
            worst = sorted(self.per_shard.items(), key=lambda kv: -kv[1])[:3]
            raise TooManyFaultsError(
                f"too many bad samples: {self.num_skipped} of {self.num_seen} skipped ({fraction:.1%} > "
                f"max_fault_fraction {self.max_fault_fraction:.1%}) while reading shard {shard}"
                f"{self._where()}; "
                f"faults by kind {self.totals}; shards with most faults {worst}"
            )

    def take(self) -> dict[str, int]:
        """Counts of every known kind since the previous call (zeros included), then reset them."""
        out = {kind: self._pending.get(kind, 0) for kind in FAULT_KINDS}
        self._pending = {}
        return out

    def _where(self) -> str:
        return f" ({self.where})" if self.where else ""


class FaultTally:
    """Main-process sum of the `batch["faults"]` dicts of all workers (and ranks, after a reduction)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, faults: Mapping[str, int]) -> None:
        for kind, count in faults.items():
            self._counts[kind] = self._counts.get(kind, 0) + int(count)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        return {kind: count for kind, count in sorted(self._counts.items()) if count}

    def reset(self) -> None:
        self._counts = {}

    def summary(self) -> str:
        counts = self.as_dict()
        if not counts:
            return "faults: none"
        parts = ", ".join(f"{kind}={count}" for kind, count in counts.items())
        return f"faults: {self.total} ({parts})"
