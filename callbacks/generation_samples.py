"""Generation on held-out image-text data during training: accuracy, and a few samples in TensorBoard."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import torch
from lightning import Callback

from dvlx.eval.vl import GenerationSettings, evaluate, read_shards

log = logging.getLogger("dvlx.generation")


class GenerationMonitor(Callback):
    """After every validation run (rank 0): answers the first `num_samples` records of the validation shards
    with diffusion generation, logs `val/gen_exact_match`, and writes `num_logged` samples to TensorBoard
    (image, prompt, reference and generated answer)."""

    def __init__(
        self,
        val_spec: str,
        tokenizer,
        image_processor,
        settings: GenerationSettings,
        num_samples: int = 64,
        num_logged: int = 4,
    ) -> None:
        self.val_spec = val_spec
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.num_samples = num_samples
        self.num_logged = num_logged
        self._records = None

    def records(self):
        if self._records is None:
            skipped: Counter = Counter()
            self._records = list(itertools.islice(read_shards(self.val_spec, skipped), self.num_samples))
            if skipped:
                log.warning("generation samples: skipped %s", dict(skipped))
        return self._records

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.records():
            return
        backbone = pl_module.backbone
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            report = evaluate(backbone, self.tokenizer, self.image_processor, self.records(), self.settings)
        backbone.train(was_training)
        accuracy = report["metrics"]["exact_match"]
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({"val/gen_exact_match": accuracy}, step=step)
        log.info(
            "step %d: generation exact match %.3f on %d held-out questions (%d steps, %d tokens)",
            step,
            accuracy,
            len(report["samples"]),
            self.settings.steps,
            self.settings.max_new_tokens,
        )
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        for i, (record, sample) in enumerate(zip(self.records(), report["samples"][: self.num_logged])):
            text = (
                f"**prompt:** {record.question}  \n**reference:** {sample['answer']}  \n"
                f"**generated:** {sample['prediction']}"
            )
            experiment.add_text(f"generation/sample_{i}", text, global_step=step)
            if record.images:
                image = np.asarray(record.images[0].convert("RGB"))
                experiment.add_image(f"generation/image_{i}", image, global_step=step, dataformats="HWC")
