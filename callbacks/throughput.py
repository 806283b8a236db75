"""Samples/s and tokens/s (and MFU where the device's peak FLOP/s is known) through Lightning's monitor."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    return ThroughputMonitor(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)
