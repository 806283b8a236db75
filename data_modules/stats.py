"""Normalisation statistics of trajectory data: a streaming accumulator and a pass over existing shards.

    python -m data_modules.stats DIR [--write] [--max-exact-rows N]

Method (per dimension): count, mean and population std are merged batch by batch with Chan et al.'s
parallel update in float64, min and max are running extremes; all four are exact. q01 and q99 are numpy's
default (linear-interpolation) quantiles of the float32 values. They are exact while at most
`max_exact_rows` rows have been seen (the accumulator keeps those rows, 4 bytes per value); beyond that it
keeps a uniform random sample of `max_exact_rows` rows (reservoir sampling, seeded) and the quantiles are
those of the sample, whose rank error is about sqrt(q (1 - q) / max_exact_rows): 5e-5 at q = 0.01 with the
default 2**22 rows. Trajectory shards store float32 actions, so exact quantiles here equal numpy's on the
stored arrays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_modules.shards import TruncatedShardError, iter_shard_samples
from dvlx.processing.robot import ArrayStats

DEFAULT_MAX_EXACT_ROWS = 1 << 22


class StatsAccumulator:
    """Streaming per-dimension statistics of [n, dim] batches of rows (see the module docstring)."""

    def __init__(self, dim: int, *, max_exact_rows: int = DEFAULT_MAX_EXACT_ROWS, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"StatsAccumulator needs dim >= 1, got {dim}")
        if max_exact_rows < 2:
            raise ValueError(f"max_exact_rows must be >= 2, got {max_exact_rows}")
        self.dim = dim
        self.max_exact_rows = max_exact_rows
        self.count = 0
        self._mean = np.zeros(dim)
        self._m2 = np.zeros(dim)
        self._min = np.full(dim, np.inf)
        self._max = np.full(dim, -np.inf)
        self._chunks: list[np.ndarray] = []
        self._reservoir: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    @property
    def quantiles_exact(self) -> bool:
        return self._reservoir is None

    def describe_quantiles(self) -> str:
        return "exact" if self.quantiles_exact else f"reservoir sample of {self.max_exact_rows} rows"

    def update(self, rows: np.ndarray) -> None:
        """Add rows [n, dim]; they must be finite (checked)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"StatsAccumulator over {self.dim} dims got rows of shape {rows.shape}")
        if rows.shape[0] == 0:
            return
        if not np.isfinite(rows).all():
            raise ValueError("StatsAccumulator got non-finite values")
        wide = rows.astype(np.float64)
        n_b = rows.shape[0]
        mean_b = wide.mean(0)
        m2_b = ((wide - mean_b) ** 2).sum(0)
        total = self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / total)
        self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / total)
        self._min = np.minimum(self._min, wide.min(0))
        self._max = np.maximum(self._max, wide.max(0))
        seen_before = self.count
        self.count = total
        narrow = rows.astype(np.float32)
        if self._reservoir is None:
            self._chunks.append(narrow)
            if self.count > self.max_exact_rows:
                self._start_reservoir()
        else:
            self._sample_into_reservoir(narrow, seen_before)

    def _start_reservoir(self) -> None:
        held = np.concatenate(self._chunks)
        self._chunks = []
        # A uniform subset of the rows so far is the state reservoir sampling would have reached.
        keep = self._rng.choice(held.shape[0], size=self.max_exact_rows, replace=False)
        self._reservoir = held[np.sort(keep)]

    def _sample_into_reservoir(self, rows: np.ndarray, seen_before: int) -> None:
        # Algorithm R, vectorised: the row with 1-based index i replaces slot j ~ U{0..i-1} when j < k.
        assert self._reservoir is not None
        k = self.max_exact_rows
        index = seen_before + 1 + np.arange(rows.shape[0])
        slots = self._rng.integers(0, index)
        hit = slots < k
        # Where several rows of this batch hit one slot, the last of them is the one that stays.
        slots_rev, rows_rev = slots[hit][::-1], rows[hit][::-1]
        unique, first = np.unique(slots_rev, return_index=True)
        self._reservoir[unique] = rows_rev[first]

    def result(self) -> ArrayStats:
        if self.count == 0:
            raise ValueError("no rows were added; statistics of an empty set are undefined")
        held = self._reservoir if self._reservoir is not None else np.concatenate(self._chunks)
        q01 = np.empty(self.dim)
        q99 = np.empty(self.dim)
        for d in range(self.dim):
            q01[d], q99[d] = np.quantile(held[:, d].astype(np.float64), [0.01, 0.99])
        std = np.sqrt(np.maximum(self._m2 / self.count, 0.0))
        return ArrayStats(
            mean=self._mean.tolist(),
            std=std.tolist(),
            min=self._min.tolist(),
            max=self._max.tolist(),
            q01=q01.tolist(),
            q99=q99.tolist(),
            count=self.count,
        )


def compute_stats(
    shard_dir: str | os.PathLike, *, max_exact_rows: int = DEFAULT_MAX_EXACT_ROWS, seed: int = 0
) -> dict[str, Any]:
    """Statistics of the actions and proprio of a trajectory shard set, by one pass over its shards.

    The action of frame t is row 0 of its `actions.npy` window (always valid), so the frames give every
    action of every episode once. Frames with missing or unreadable arrays or non-finite values are skipped
    and counted. Returns `{"action": ArrayStats dict, "proprio": dict | None, "num_frames", "skipped":
    {kind: n}, "quantiles": "exact" | "reservoir sample of N rows"}`.
    """
    # Imported here because trajectory.py imports this module's accumulator.
    from data_modules.trajectory import decode_npy, read_trajectory_meta

    directory = os.fspath(shard_dir)
    meta = read_trajectory_meta(directory)
    action_dim, proprio_dim = meta["action_dim"], meta["proprio_dim"]
    actions = StatsAccumulator(action_dim, max_exact_rows=max_exact_rows, seed=seed)
    proprio = StatsAccumulator(proprio_dim, max_exact_rows=max_exact_rows, seed=seed) if proprio_dim else None
    skipped: dict[str, int] = {}

    def skip(kind: str) -> None:
        skipped[kind] = skipped.get(kind, 0) + 1

    for shard in meta["shards"]:
        path = os.path.join(directory, shard["name"])
        try:
            for sample in iter_shard_samples(path):
                needed = ["actions.npy", "action_valid.npy"] + (["proprio.npy"] if proprio_dim else [])
                if "__bad__" in sample or any(name not in sample for name in needed):
                    skip("missing_key" if "__bad__" not in sample else "bad_record")
                    continue
                try:
                    window = decode_npy(sample["actions.npy"])
                    valid = decode_npy(sample["action_valid.npy"])
                    state = decode_npy(sample["proprio.npy"]) if proprio_dim else None
                except ValueError:
                    skip("bad_record")
                    continue
                if (
                    window.ndim != 2
                    or window.shape[1] != action_dim
                    or valid.ndim != 1
                    or not len(valid)
                    or not bool(valid[0])
                    or (state is not None and state.shape != (proprio_dim,))
                ):
                    skip("bad_record")
                    continue
                if not np.isfinite(window[0]).all() or (state is not None and not np.isfinite(state).all()):
                    skip("nan_value")
                    continue
                actions.update(window[:1])
                if proprio is not None and state is not None:
                    proprio.update(state[None])
        except TruncatedShardError:
            skip("truncated_tar")
    return {
        "action": actions.result().to_dict(),
        "proprio": proprio.result().to_dict() if proprio is not None else None,
        "num_frames": actions.count,
        "skipped": skipped,
        "quantiles": actions.describe_quantiles(),
    }


def _table(name: str, stats: dict[str, Any], names: Sequence[str]) -> str:
    lines = [
        f"{name} ({stats['count']} rows)",
        f"  {'dim':<16} {'q01':>11} {'q99':>11} {'mean':>11} {'std':>11} {'min':>11} {'max':>11}",
    ]
    for d, label in enumerate(names):
        values = " ".join(f"{stats[k][d]:>11.5g}" for k in ("q01", "q99", "mean", "std", "min", "max"))
        lines.append(f"  {label:<16} {values}")
    return "\n".join(lines)


def _max_difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return max(
        abs(x - y)
        for k in ("mean", "std", "min", "max", "q01", "q99")
        for x, y in zip(a[k], b[k], strict=True)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.stats",
        description="Recompute the action/proprio statistics of trajectory shards.",
    )
    parser.add_argument("dir", help="trajectory shard directory (with meta.json)")
    parser.add_argument("--write", action="store_true", help="store the recomputed statistics in meta.json")
    parser.add_argument(
        "--max-exact-rows",
        type=int,
        default=DEFAULT_MAX_EXACT_ROWS,
        help="rows kept for exact quantiles before switching to a reservoir sample",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    from data_modules.trajectory import read_trajectory_meta

    meta = read_trajectory_meta(args.dir)
    result = compute_stats(args.dir, max_exact_rows=args.max_exact_rows)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{args.dir}: {result['num_frames']} frames, quantiles {result['quantiles']}, "
            f"skipped {result['skipped'] or 'none'}"
        )
        print(_table("action", result["action"], meta["action_names"]))
        if result["proprio"] is not None:
            print(_table("proprio", result["proprio"], meta["proprio_names"]))
        stored = meta.get("stats", {})
        diff = max(
            _max_difference(stored.get("action"), result["action"]),
            _max_difference(stored.get("proprio"), result["proprio"]),
        )
        print(f"largest difference to the statistics in meta.json: {diff:.3g}")
    if args.write:
        meta["stats"] = {"action": result["action"], "proprio": result["proprio"]}
        meta["stats_quantiles"] = result["quantiles"]
        path = os.path.join(args.dir, "meta.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        print(f"wrote the statistics into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
