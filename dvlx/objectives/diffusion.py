"""`diffusion`: DDIM with epsilon prediction on the action chunk (reference 2.3; maths in
`dvlx.diffusion.ddim`).

Convention: integer noise levels k = 0..T-1 (T = `cfg.train_timesteps`, 50), k = 0 the least noisy, cosine
("squaredcos_cap_v2") schedule. Training: k ~ U{0..T-1} and eps ~ N(0, I) per sample,
x_k = sqrt(abar_k) * actions + sqrt(1 - abar_k) * eps, loss MSE(eps_hat, eps) over the valid chunk steps.
Sampling: N deterministic DDIM steps (eta 0, "leading" timesteps, predicted x0 clipped to [-1, 1], final
abar = 1) from N(0, I); N = T by default.

Inputs: each noisy scalar of x_k becomes its action slot's embedding (NoisyActionProjector), and the timestep
embedding of k / T is added to every action-slot row, so the sequence layout is the data module's and the
prompt never depends on k (its KV cache stays valid across steps). The reference instead prepended a raw
sinusoid of k as an extra token. The head reads the shifted slot states (slot p at p - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.config import ObjectiveConfig
from dvlx.diffusion.ddim import DDIMSchedule
from dvlx.objectives.base import ActionObjective, ObjectiveOutput, register
from dvlx.objectives.heads import (
    ActionChunkHead,
    NoisyActionProjector,
    SlotForward,
    TimestepEmbedding,
    check_actions,
    initial_noise,
    masked_mean,
    resolve_steps,
)
from dvlx.processing.robot import ActionSpec


@register("diffusion")
class DDIMDiffusion(ActionObjective):
    """Epsilon prediction under the cosine schedule; deterministic DDIM sampling with the prompt KV cache."""

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__(spec, hidden_size, cfg, tokenizer)
        self.schedule = DDIMSchedule(cfg.train_timesteps)
        self.head = ActionChunkHead(hidden_size, spec.action_dim, cfg.head_blocks)
        self.action_projector = NoisyActionProjector(hidden_size)
        self.time_embedding = TimestepEmbedding(hidden_size)

    def slot_rows(self, x: Tensor, k: Tensor) -> Tensor:
        """Noisy actions x [B, H, A] at integer levels k [B] -> action-slot rows [B, H*A, D]."""
        level = k.float() / self.schedule.train_steps
        return self.action_projector(x) + self.time_embedding(level)[:, None, :]  # [B, 1, D] over the slots

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        actions = check_actions(self, batch)
        noise = torch.randn_like(actions)
        k = torch.randint(0, self.schedule.train_steps, (actions.shape[0],), device=actions.device)
        x_k = self.schedule.add_noise(actions, noise, k)
        states = SlotForward(self, backbone, batch)(self.slot_rows(x_k, k))
        error = (self.head(states).float() - noise) ** 2  # [B, H, A]
        return ObjectiveOutput(loss=masked_mean(error, batch["action_valid"].bool()))

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
        """Float32[B, H, A]: N DDIM steps from `noise` (default N(0, I) drawn from `generator`)."""
        steps = resolve_steps(self, steps, self.schedule.train_steps)
        timesteps = self.schedule.timesteps(steps)
        forward = SlotForward(self, backbone, batch, use_cache=self.cfg.use_cache and steps > 1)
        batch_size = batch["input_ids"].shape[0]
        if noise is None:
            shape = (batch_size, self.spec.horizon, self.spec.action_dim)
            noise = initial_noise(shape, forward.embeds.device, generator)
        x = noise.float()
        for k in timesteps:
            level = torch.full((batch_size,), k, device=x.device)
            eps = self.head(forward(self.slot_rows(x, level)))
            x = self.schedule.step(eps, k, x, steps)
        return x
