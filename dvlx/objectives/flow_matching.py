"""`flow_matching`: a straight path between noise and actions with a velocity target (reference 2.2, fixed).

Convention (openpi's; the maths is `dvlx.diffusion.flow`): t = 1 is pure noise, t = 0 the actions.
Corruption x_t = t * noise + (1 - t) * actions, target u = noise - actions, loss MSE(v_hat, u) over the valid
chunk steps; sampling integrates from t = 1 to t = 0 with K explicit Euler steps x <- x - v_hat / K in float32
over an integer loop (t_i = 1 - i / K), K = 4 by default. Training times: t = 0.999 * s + 0.001 with s a true
Beta(1.5, 1) draw, leaning towards noisy times (`cfg.time_sampler = "beta"`), or s ~ U(0, 1) (`"uniform"`).

Inputs: each noisy scalar of x_t becomes its action slot's embedding (NoisyActionProjector), and the timestep
embedding of t is added to every action-slot row, so the sequence layout is the data module's and the prompt
never depends on t (its KV cache stays valid across steps). The reference instead prepended a raw sinusoid
of t in [0, 1] as an extra token. The head reads the shifted slot states (slot p at p - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.config import ObjectiveConfig
from dvlx.diffusion.flow import TIME_SAMPLERS, euler_integrate, interpolate, sample_times, velocity_target
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

DEFAULT_STEPS = 4


@register("flow_matching")
class FlowMatching(ActionObjective):
    """Velocity prediction on the straight noise-to-action path; Euler sampling with the prompt KV cache."""

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__(spec, hidden_size, cfg, tokenizer)
        if cfg.time_sampler not in TIME_SAMPLERS:
            raise ValueError(
                f"objective.time_sampler must be one of {TIME_SAMPLERS} for flow_matching, "
                f"got {cfg.time_sampler!r}"
            )
        self.head = ActionChunkHead(hidden_size, spec.action_dim, cfg.head_blocks)
        self.action_projector = NoisyActionProjector(hidden_size)
        self.time_embedding = TimestepEmbedding(hidden_size)

    def slot_rows(self, x: Tensor, t: Tensor) -> Tensor:
        """Noisy actions x [B, H, A] at times t [B] -> action-slot rows [B, H*A, D]."""
        return self.action_projector(x) + self.time_embedding(t)[:, None, :]  # [B, 1, D] over the slots

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        actions = check_actions(self, batch)
        noise = torch.randn_like(actions)
        t = sample_times(actions.shape[0], self.cfg.time_sampler, device=actions.device)
        x_t = interpolate(actions, noise, t)
        states = SlotForward(self, backbone, batch)(self.slot_rows(x_t, t))
        velocity = self.head(states).float()
        error = (velocity - velocity_target(actions, noise)) ** 2  # [B, H, A]
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
        """Float32[B, H, A]: K Euler steps from `noise` (default N(0, I) drawn from `generator`)."""
        steps = resolve_steps(self, steps, DEFAULT_STEPS)
        # With one step there is nothing to reuse, and one full pass is cheaper than prompt + suffix.
        forward = SlotForward(self, backbone, batch, use_cache=self.cfg.use_cache and steps > 1)
        if noise is None:
            shape = (batch["input_ids"].shape[0], self.spec.horizon, self.spec.action_dim)
            noise = initial_noise(shape, forward.embeds.device, generator)
        return euler_integrate(lambda x, t: self.head(forward(self.slot_rows(x, t))), noise, steps)
