"""Shared LightningModule machinery: the masked-diffusion step, optimiser groups and LR schedules.

Stages own their steps, losses and optimisers; the backbone is injected and holds no training logic.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from lightning import LightningModule
from torch import Tensor

from dvlx.backbone import DreamVL
from dvlx.config import ExperimentConfig, OptimConfig
from dvlx.diffusion import MaskedDiffusion
from dvlx.processing import IGNORE_INDEX


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    if optim.warmup_steps is not None:
        return optim.warmup_steps
    return int(round(optim.warmup_ratio * total_steps))


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base LR at optimiser step `step`: linear warm-up, then the configured decay."""
    warm = warmup_steps(optim, total_steps)
    if step < warm:
        return (step + 1) / warm
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if optim.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay


def part_modules(backbone: DreamVL, vision_from_block: int) -> dict[str, list[torch.nn.Module]]:
    """The modules behind each name of `stage.trainable`."""
    return {
        "projector": [backbone.projector],
        "lm": [backbone.model, backbone.lm_head],
        "vision": [*backbone.visual.blocks[vision_from_block:], backbone.visual.merger],
        "merger": [backbone.visual.merger],
    }


def unfreeze_parts(backbone: DreamVL, parts, vision_from_block: int) -> None:
    """Freezes the backbone, then unfreezes the named parts."""
    backbone.requires_grad_(False)
    modules = part_modules(backbone, vision_from_block)
    for part in parts:
        for module in modules[part]:
            module.requires_grad_(True)


def build_optimizer(
    module: torch.nn.Module, groups: list[dict], optim: OptimConfig, total_steps: int
) -> dict:
    """AdamW (`optim.optimizer`: torch's or bitsandbytes' 8-bit) over `groups` (every trainable parameter of
    `module` must be in one) with the LR schedule."""
    grouped = {id(p) for g in groups for p in g["params"]}
    missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in grouped]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameters are in no optimiser group: {missing[:5]}")
    adamw = torch.optim.AdamW
    if optim.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit  # 8-bit block-wise states for tensors of >= 4096 elements
    optimizer = adamw(
        groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    # LambdaLR scales each group's own base LR, so per-part learning rates keep their ratios.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DiffusionStage(LightningModule):
    """A stage trained with the masked-diffusion loss over the tokens whose label is not IGNORE_INDEX.

    The parts named in `stage.trainable` train (`default_trainable` when it is None) and everything else is
    frozen. Subclasses may split the trainable parameters into groups with their own learning rates
    (`param_groups`).
    """

    default_trainable: tuple[str, ...] = ("projector",)

    def __init__(self, cfg: ExperimentConfig, backbone: DreamVL) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dcfg = cfg.stage.diffusion
        self.diffusion = MaskedDiffusion(
            mask_token_id=backbone.config.mask_token_id,
            eps=dcfg.eps,
            weighting=dcfg.weighting,
            cart_p=dcfg.cart_p,
            ce_chunk_size=dcfg.ce_chunk_size,
        )
        # A model initialised from a pretrained folder is rebuilt from that folder on resume, so its
        # checkpoints hold only what trains; a random-init model keeps everything.
        self.checkpoint_trainable_only = cfg.backbone.pretrained is not None
        self.strict_loading = not self.checkpoint_trainable_only
        self.configure_trainable()
        self._val_text_only: Counter = Counter()
        self._val_positions: dict[tuple[int, int], Counter] = {}

    def configure_trainable(self) -> None:
        parts = self.cfg.stage.trainable if self.cfg.stage.trainable is not None else self.default_trainable
        unfreeze_parts(self.backbone, parts, self.cfg.stage.vision_from_block)
        self._frozen_eval()

    def _frozen_eval(self) -> None:
        """Modules without a trainable parameter stay in eval mode (no dropout) through training."""
        backbone = self.backbone
        for module in (backbone.model, backbone.visual, backbone.projector, backbone.lm_head):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def on_train_epoch_start(self) -> None:
        self._frozen_eval()

    def param_groups(self) -> list[dict]:
        """Trainable parameters split by part, each group with its configured learning rate."""
        optim = self.cfg.optim
        groups: dict[str, dict] = {
            "vision": {"params": [], "name": "vision", "lr": optim.lr_vision or optim.lr},
            "projector": {"params": [], "name": "projector", "lr": optim.lr_projector or optim.lr},
            "other": {"params": [], "name": "other", "lr": optim.lr},
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone.visual."):
                groups["vision"]["params"].append(param)
            elif name.startswith("backbone.projector."):
                groups["projector"]["params"].append(param)
            else:
                groups["other"]["params"].append(param)
        return [g for g in groups.values() if g["params"]]

    # ----------------------------------------------------------------------------------------- steps
    def _diffusion_loss(self, batch: dict, t: Tensor | None = None, generator: torch.Generator | None = None):
        maskable = batch["labels"] != IGNORE_INDEX
        corruption = self.diffusion.corrupt(batch["input_ids"], maskable, t=t, generator=generator)
        out = self.backbone(
            input_ids=corruption.noisy_ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mode=self.cfg.backbone.attention,
            return_logits=False,
        )
        result = self.diffusion.loss(
            out.last_hidden_state,
            self.backbone.lm_head,
            batch["input_ids"],
            corruption.masked,
            batch["attention_mask"],
        )
        return result, corruption

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        result, _ = self._diffusion_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", result.loss, prog_bar=True, batch_size=bs)
        self.log("train/acc_masked", result.accuracy, prog_bar=True, batch_size=bs)
        self.log("train/n_masked", result.n_supervised.float(), batch_size=bs)
        return result.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bs = batch["input_ids"].shape[0]
        t = torch.full((bs,), self.cfg.stage.val_t, device=self.device)
        # A fixed generator per batch makes validation masks identical across evaluations.
        seed = int(np.random.SeedSequence([self.cfg.trainer.seed, batch_idx]).generate_state(1)[0])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        result, corruption = self._diffusion_loss(batch, t=t, generator=generator)
        self.log("val/loss", result.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/acc_masked", result.accuracy, prog_bar=True, batch_size=bs, sync_dist=True)
        if self.cfg.stage.val_t == 1.0:
            self._count_text_only(batch, corruption.masked)

    def _count_text_only(self, batch: dict, masked: Tensor) -> None:
        """Tallies targets by (answer length, position) for the best accuracy any text-only model can reach.

        With every target masked, a model that ignores the image sees only how many tokens are masked; its
        best guess at each position is the most frequent token there among answers of that length.
        """
        for row_ids, row_mask in zip(batch["input_ids"].tolist(), masked.tolist(), strict=True):
            targets = [tok for tok, m in zip(row_ids, row_mask, strict=True) if m]
            for pos, tok in enumerate(targets):
                self._val_positions.setdefault((len(targets), pos), Counter())[tok] += 1

    def on_validation_epoch_end(self) -> None:
        if self._val_positions:
            total = sum(sum(c.values()) for c in self._val_positions.values())
            best = sum(c.most_common(1)[0][1] for c in self._val_positions.values())
            self.log("val/acc_text_only_bound", best / total, sync_dist=True)
        self._val_positions = {}

    # ------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        return build_optimizer(self, self.param_groups(), self.cfg.optim, self.cfg.trainer.max_steps)

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.checkpoint_trainable_only:
            keep = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
