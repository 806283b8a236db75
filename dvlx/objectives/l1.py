"""`l1`: regression of the action chunk with an MLP-ResNet head, L1 loss (reference 2.4).

Convention: the action slots keep their `<|mask|>` placeholder ids (empty-action inputs: the model sees the
learned mask embedding there, where the reference zeroed the slot embeddings); the head reads the slot states
with Dream's shift (position p - 1 for slot p), concatenates the A states of each chunk step and predicts that
step's A normalised values. Loss: mean |a_hat - a| over the valid chunk steps. Sampling is one forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.config import ObjectiveConfig
from dvlx.objectives.base import ActionObjective, ObjectiveOutput, register
from dvlx.objectives.heads import ActionChunkHead, SlotForward, check_actions, masked_mean
from dvlx.processing.robot import ActionSpec


@register("l1")
class L1Regression(ActionObjective):
    """MLP-ResNet head on the shifted action-slot states, L1 loss; metrics `l1_current` (step 0) and
    `l1_future` (steps 1..H-1, when H > 1)."""

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__(spec, hidden_size, cfg, tokenizer)
        self.head = ActionChunkHead(hidden_size, spec.action_dim, cfg.head_blocks)

    def predict(self, backbone, batch: dict) -> Tensor:
        """Float32[B, H, A]: the head's normalised actions from one forward pass."""
        return self.head(SlotForward(self, backbone, batch)()).float()

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        actions = check_actions(self, batch)
        valid = batch["action_valid"].bool()
        error = (self.predict(backbone, batch) - actions).abs()  # [B, H, A]
        metrics = {"l1_current": masked_mean(error[:, :1], valid[:, :1]).detach()}
        if self.spec.horizon > 1:
            metrics["l1_future"] = masked_mean(error[:, 1:], valid[:, 1:]).detach()
        return ObjectiveOutput(loss=masked_mean(error, valid), metrics=metrics)

    @torch.no_grad()
    def sample(
        self,
        backbone,
        batch: dict,
        steps: int | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """One forward pass. `steps`, `generator` and `noise` exist for the common sampler signature and are
        ignored: the prediction is deterministic."""
        return self.predict(backbone, batch)
