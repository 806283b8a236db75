"""The VLA stage: Dream-VL(A) fine-tuned (LoRA or full) to output action chunks with one action objective.

The objective (chosen by `objective.name`) owns its heads, corruption, loss and sampler; this module owns
the step, the optimiser (every parameter with `requires_grad`, heads and projectors included: the reference
never trained its flow-matching head), the metrics and what goes into checkpoints (the action spec).
"""

from __future__ import annotations

import numpy as np
import torch
from lightning import LightningModule
from torch import Tensor
from torchmetrics import MeanMetric

from dvlx.backbone import DreamVL
from dvlx.backbone.lora import apply_lora
from dvlx.config import ExperimentConfig
from dvlx.objectives import objective_class
from dvlx.processing.robot import ActionSpec
from dvlx.stages.base import build_optimizer, unfreeze_parts

TRAINABLE_PARTS_ALL = ("projector", "lm", "vision")


class VLA(LightningModule):
    def __init__(self, cfg: ExperimentConfig, backbone: DreamVL, tokenizer, spec: ActionSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.backbone = backbone
        cls = objective_class(cfg.objective.name)
        self.objective = cls(spec, backbone.config.hidden_size, cfg.objective, tokenizer)
        # The objective's own attention needs (the `ar` baseline is causal) win over the configured mode.
        backbone.config.attention = self.objective.attention or cfg.backbone.attention
        self.configure_trainable(tokenizer)
        self.sampled_l1 = MeanMetric()
        self.baseline_l1 = MeanMetric()
        # The training-set mean action (normalised): the baseline a policy must beat (`val/l1_mean_baseline`).
        mean = np.asarray(spec.action_normalizer.stats.mean, dtype=np.float32)
        self.register_buffer(
            "mean_action", torch.as_tensor(spec.action_normalizer.normalize(mean)), persistent=False
        )
        self.last_val_sample: dict[str, Tensor] | None = None

    def configure_trainable(self, tokenizer) -> None:
        lora = self.cfg.lora
        if lora.rank > 0:
            outputs = inputs = None
            if lora.train_action_rows and getattr(self.objective, "uses_action_tokens", False):
                outputs = self.objective.action_tokens.token_ids.tolist()
                inputs = outputs if self.objective.feeds_action_tokens else None
            apply_lora(
                self.backbone,
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                targets=lora.targets,
                output_token_ids=outputs,
                input_token_ids=inputs,
                quantize=lora.quantize,
            )
        else:
            parts = self.cfg.stage.trainable if self.cfg.stage.trainable is not None else TRAINABLE_PARTS_ALL
            unfreeze_parts(self.backbone, parts, self.cfg.stage.vision_from_block)
            if not getattr(self.objective, "uses_action_tokens", False):
                # Continuous heads never read the LM's logits: a trainable lm_head would get no gradient
                # (and DDP would wait for it).
                self.backbone.lm_head.requires_grad_(False)
        self.objective.requires_grad_(True)

    # ------------------------------------------------------------------------------------------ steps
    @staticmethod
    def masked_l1(predicted: Tensor, batch: dict) -> Tensor:
        """Mean |predicted - actions| over the valid chunk steps ([B, H, A] normalised)."""
        valid = batch["action_valid"].unsqueeze(-1).to(predicted.dtype)  # [B, H, 1]
        error = (predicted - batch["actions"]).abs() * valid
        return error.sum() / (valid.sum() * predicted.shape[-1]).clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.objective.loss(self.backbone, batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        for name, value in out.metrics.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.objective.loss(self.backbone, batch)
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in out.metrics.items():
            self.log(f"val/{name}", value, batch_size=bs, sync_dist=True)
        if batch_idx < self.cfg.stage.val_sample_batches:
            predicted = self.objective.sample(self.backbone, batch)  # [B, H, A] normalised
            self.sampled_l1.update(self.masked_l1(predicted, batch), weight=bs)
            mean = self.mean_action.to(predicted.dtype).expand_as(predicted)  # [B, H, A]
            self.baseline_l1.update(self.masked_l1(mean, batch), weight=bs)
            if batch_idx == 0:
                self.last_val_sample = {
                    "predicted": predicted.detach().cpu(),
                    "target": batch["actions"].detach().cpu(),
                }

    def on_validation_epoch_end(self) -> None:
        if self.sampled_l1.update_count:
            self.log("val/l1_sampled", self.sampled_l1.compute(), prog_bar=True)
            self.log("val/l1_mean_baseline", self.baseline_l1.compute())
            self.sampled_l1.reset()
            self.baseline_l1.reset()

    # --------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        groups = [{"params": [p for p in self.parameters() if p.requires_grad], "name": "trainable"}]
        return build_optimizer(self, groups, self.cfg.optim, self.cfg.trainer.max_steps)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["action_spec"] = self.spec.to_dict()
        checkpoint["objective"] = self.cfg.objective.name
