"""Optimiser steps with a non-finite loss or gradient are skipped and counted; a run of them ends training."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning import Callback

log = logging.getLogger("dvlx.numerics")


class NonFiniteTrainingError(RuntimeError):
    """Too many optimiser steps in a row had a NaN or infinite loss or gradient."""


class NonFiniteGuard(Callback):
    """Before each optimiser step, after backward and gradient accumulation: if any gradient of the
    optimiser's parameters is NaN or infinite (a non-finite loss gives such gradients), every gradient is
    dropped, so the optimiser leaves weights and moments as they were, and the step is counted.

    `train/nonfinite_skipped` (total skipped) is logged every step; after `max_consecutive` skipped steps in
    a row `NonFiniteTrainingError` stops the run. Weights never take a non-finite update, so every checkpoint
    written holds the last finite weights. A skipped step still advances the step counter and LR schedule
    (as a skipped mixed-precision step does). All ranks take the same decision.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    @staticmethod
    def gradients_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(True)
        # The largest magnitude cannot overflow, and it is NaN or infinite exactly when some gradient is.
        return torch.nn.utils.get_total_norm(grads, norm_type=float("inf")).isfinite()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        finite = bool(self.gradients_finite(optimizer).item())
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self.consecutive = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "step %d: non-finite loss or gradient, optimiser step skipped (%d in a row, %d in total)",
                trainer.global_step,
                self.consecutive,
                self.skipped,
            )
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"step {trainer.global_step}: {self.consecutive} optimiser steps in a row had a non-finite "
                f"loss or gradient ({self.skipped} skipped in total), stopping "
                f"(trainer.max_consecutive_nonfinite {self.max_consecutive}); the checkpoints hold the last "
                "finite weights: lower optim.lr or check the data, then resume"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
