"""Closed-loop rollouts during VLA training (`rollout:` in the experiment, `dvlx.config.RolloutConfig`).

Every `rollout.every_n_steps` optimiser steps, and when training ends with `rollout.at_end`, the current
weights drive `rollout.episodes` episodes per task in simulator worker processes (`dvlx.eval.rollout`).
`rollout/success_rate` and `rollout/mean_length` go to every logger, a frame strip of the first episode
(cameras side by side, time downwards) to TensorBoard as `rollout/frames`, and the JSON report to
`<run>/rollouts/step-<step>.json`. The same seed gives the same episodes at every step, so the curve compares
weights, not luck of the draw.

The policy is a `dvlx.policy.Policy` around the module's own backbone and objective: nothing is exported or
copied, and the modules' train/eval flags are restored afterwards. The simulator processes start at the
first rollout and stay until training ends. With several processes only rank 0 plays and the rate is
broadcast, so `ModelCheckpoint(monitor="rollout/success_rate")` (`best_rollout_checkpoint`, enabled by
`rollout.monitor`) works on every rank.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from dvlx.config import RolloutConfig

log = logging.getLogger(__name__)

METRIC = "rollout/success_rate"
STRIP_FRAMES = 8


def best_rollout_checkpoint(run_dir: Path, cfg: RolloutConfig) -> ModelCheckpoint:
    """Keeps the checkpoint with the highest `rollout/success_rate` (`checkpoints/best-rollout-*.ckpt`)."""
    return ModelCheckpoint(
        dirpath=Path(run_dir) / "checkpoints",
        filename="best-rollout-step-{step:07d}",
        monitor=METRIC,
        mode="max",
        save_top_k=1,
        every_n_train_steps=cfg.every_n_steps,
        auto_insert_metric_name=False,
    )


class RolloutMonitor(Callback):
    def __init__(self, cfg: RolloutConfig, tokenizer, image_processor, run_dir: Path,
                 sampling_steps: int | None = None, progress: bool = False) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.run_dir = Path(run_dir)
        self.sampling_steps = sampling_steps
        self.progress = progress
        self.pool = None
        self.last_step = -1
        self.last_outcome = None
        self.policy_info: dict = {}

    def settings(self):
        from dvlx.eval.rollout import RolloutSettings

        c = self.cfg
        return RolloutSettings(env=c.env, episodes=c.episodes, workers=c.workers,
                               open_loop_steps=c.open_loop_steps, max_steps=c.max_steps, seed=c.seed,
                               sampling_steps=self.sampling_steps, libero_assets=c.libero_assets)

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every, step = self.cfg.every_n_steps, trainer.global_step
        if not every or step % every or step == self.last_step:
            return
        rate = self._evaluate(trainer, pl_module, step, final=False)
        # Not for the loggers (they got it already): for ModelCheckpoint's monitor and the progress bar.
        pl_module.log(METRIC, rate, on_step=True, on_epoch=False, logger=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        try:
            if self.cfg.at_end and trainer.global_step != self.last_step:
                rate = self._evaluate(trainer, pl_module, trainer.global_step, final=True)
                # `dvlx.fit` reports the final `rollout/` metrics with the validation ones.
                trainer.callback_metrics[METRIC] = torch.tensor(rate)
        finally:
            self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    # ------------------------------------------------------------------------------------------ work
    def _evaluate(self, trainer, pl_module, step: int, final: bool) -> float:
        self.last_step = step
        rate = torch.tensor(float("nan"))
        if trainer.is_global_zero:
            outcome = self._play(pl_module, step, final)
            rate = torch.tensor(outcome.success_rate)
            self._record(trainer, outcome, step, final)
        return float(trainer.strategy.broadcast(rate, src=0))

    def _play(self, pl_module, step: int, final: bool):
        from dvlx.eval.rollout import RolloutPool, plan_rollout, policy_info, run_rollout
        from dvlx.policy import Policy

        settings = self.settings()
        keep = STRIP_FRAMES if self.cfg.video else 0
        if self.pool is None:
            plan = plan_rollout(settings, pl_module.spec, keep_frames=keep)
            self.pool = RolloutPool(plan.worker, settings.workers, settings.start_method)
        modes = {name: module.training for name, module in pl_module.named_modules()}
        try:
            source = str(self.run_dir / "export") if final else f"in-memory weights at step {step}"
            policy = Policy(pl_module.backbone, pl_module.objective, self.tokenizer, self.image_processor,
                            pl_module.spec, source=source)
            outcome = run_rollout(policy, settings, pool=self.pool, progress=self.progress, keep_frames=keep)
        finally:
            for name, module in pl_module.named_modules():
                module.training = modes[name]
        self.last_outcome = outcome
        self.policy_info = {**policy_info(policy), "step": step}
        return outcome

    def _record(self, trainer, outcome, step: int, final: bool) -> None:
        from dvlx.eval.rollout import format_summary
        from dvlx.fit import write_atomic

        summary = outcome.summary
        metrics = {METRIC: summary["success_rate"], "rollout/mean_length": summary["mean_length"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        frames = outcome.results[0].frames if outcome.results else None
        if frames:
            strip = np.concatenate(frames[:STRIP_FRAMES], axis=0)  # [frames x height, cameras x width, 3]
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image("rollout/frames", strip, step, dataformats="HWC")
        path = self.run_dir / "rollouts" / f"step-{step:07d}.json"
        write_atomic(path, json.dumps(outcome.report(self.policy_info), indent=1) + "\n")
        if final:
            print(format_summary(outcome))
            print(f"rollout report: {path}")
        else:
            log.info("step %d: %s success rate %.3f (%d/%d), report %s", step, outcome.plan.settings.env,
                     summary["success_rate"], summary["successes"], summary["episodes"], path)
