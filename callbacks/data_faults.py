"""Adds up the corrupt samples that the data workers skipped and reports them."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning import Callback

from data_modules.faults import FAULT_KINDS, FaultTally

log = logging.getLogger("dvlx.data")


class DataFaultMonitor(Callback):
    """Takes `batch["faults"]` (counts per kind since the worker's previous batch) off every batch.

    Totals go to TensorBoard as `data/skipped_<kind>` and a one-line summary is logged at the end of every
    training epoch and of the run; the training totals are kept in checkpoints.
    """

    def __init__(self) -> None:
        self.train = FaultTally()
        self.val = FaultTally()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict) and batch.get("faults"):
            self.train.add(batch.pop("faults"))
            for kind, count in self.train.as_dict().items():
                pl_module.log(
                    f"data/skipped_{kind}",
                    float(count),
                    on_step=True,
                    on_epoch=False,
                    reduce_fx="sum",
                    sync_dist=False,
                )
        elif isinstance(batch, dict):
            batch.pop("faults", None)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict):
            self.val.add(batch.pop("faults", None) or {})

    def _report(self, trainer, pl_module, tally: FaultTally, what: str) -> None:
        counts = tally.as_dict()
        if trainer.world_size > 1:
            # Every rank reduces the same vector (all known kinds), whatever it saw itself.
            kinds = sorted(set(FAULT_KINDS) | set(counts))
            local = torch.tensor([float(counts.get(k, 0)) for k in kinds], device=pl_module.device)
            totals = trainer.strategy.reduce(local, reduce_op="sum")
            counts = {k: int(v) for k, v in zip(kinds, totals.tolist(), strict=True) if v}
        if trainer.is_global_zero:
            if counts:
                skipped = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                log.warning("%s data: skipped %s", what, skipped)
            else:
                log.info("%s data: no sample skipped", what)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, self.train, f"epoch {trainer.current_epoch} training")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, self.val, "validation")
        self.val = FaultTally()

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, self.train, "run total training")

    def state_dict(self) -> dict[str, Any]:
        """The training totals, so a resumed run keeps counting from them."""
        return {"train": self.train.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = FaultTally()
        self.train.add(state.get("train", {}))
