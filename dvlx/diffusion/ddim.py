"""DDIM maths with the reference's settings (diffusers' DDIMScheduler with beta_schedule="squaredcos_cap_v2",
prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading", eta=0).

Convention: integer timesteps k = 0..T-1, k = 0 the least noisy; abar_k = prod_{i<=k} (1 - beta_i) with the
cosine ("squaredcos_cap_v2") betas beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999),
f(s) = cos^2((s + 0.008) / 1.008 * pi / 2).

    forward noising:  x_k = sqrt(abar_k) * x0 + sqrt(1 - abar_k) * eps
    DDIM step (eta 0) from k to k' = k - T // N:
        x0_hat = clip((x_k - sqrt(1 - abar_k) * eps_hat) / sqrt(abar_k), -1, 1)
        x_k'   = sqrt(abar_k') * x0_hat + sqrt(1 - abar_k') * eps_hat,   abar_{k' < 0} = 1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_BETA = 0.999
COSINE_OFFSET = 0.008


def cosine_alpha_bar(s: float) -> float:
    """f(s) = cos^2((s + 0.008) / 1.008 * pi / 2) for s in [0, 1] (the "squaredcos_cap_v2" curve)."""
    return math.cos((s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2


def cosine_betas(train_steps: int, max_beta: float = MAX_BETA) -> Tensor:
    """Float64[T]: beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta)."""
    return torch.tensor(
        [
            min(1.0 - cosine_alpha_bar((i + 1) / train_steps) / cosine_alpha_bar(i / train_steps), max_beta)
            for i in range(train_steps)
        ],
        dtype=torch.float64,
    )


class DDIMSchedule:
    """The cosine schedule with T training steps, forward noising and the deterministic DDIM step.

    Holds its tables on the CPU in float64 (not module buffers, so casting a model to bf16 leaves them
    alone); every method works in float32 on the device of its inputs.
    """

    def __init__(self, train_steps: int = 50, clip_sample: float | None = 1.0, set_alpha_to_one: bool = True):
        if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 1:
            raise ValueError(f"dvlx/diffusion/ddim.py: train_steps must be an int >= 1, got {train_steps!r}")
        self.train_steps = train_steps
        self.clip_sample = clip_sample
        self.betas = cosine_betas(train_steps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def _abar(self, k: Tensor, like: Tensor) -> Tensor:
        """abar_k for integer timesteps k [B] (k < 0 means "after the last step"), as [B, 1, ..., 1]."""
        table = self.alphas_cumprod.to(device=like.device, dtype=torch.float32)
        k = k.to(like.device).long()
        abar = torch.where(
            k >= 0, table[k.clamp(min=0)], torch.tensor(self.final_alpha_cumprod, device=like.device)
        )
        return abar.view(-1, *([1] * (like.dim() - 1)))  # [B, 1, ..., 1]

    def add_noise(self, x0: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        """x_k = sqrt(abar_k) * x0 + sqrt(1 - abar_k) * noise, with k an integer tensor [B]."""
        abar = self._abar(k, x0)
        return abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise.float()

    def timesteps(self, steps: int) -> list[int]:
        """The N inference timesteps with "leading" spacing: (N-1, ..., 0) * (T // N), largest first."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.train_steps:
            raise ValueError(
                f"dvlx/diffusion/ddim.py: DDIM steps must be an int in [1, {self.train_steps}], got {steps!r}"
            )
        ratio = self.train_steps // steps
        return [i * ratio for i in reversed(range(steps))]

    def step(self, eps: Tensor, k: int, x: Tensor, steps: int) -> Tensor:
        """One deterministic DDIM step (eta 0) from timestep k to k - T // steps; float32 [B, ...]."""
        prev = k - self.train_steps // steps
        batch = x.shape[0]
        x = x.float()
        eps = eps.float()
        abar = self._abar(torch.full((batch,), k), x)
        abar_prev = self._abar(torch.full((batch,), prev), x)
        x0 = (x - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        return abar_prev.sqrt() * x0 + (1.0 - abar_prev).sqrt() * eps


__all__ = ["DDIMSchedule", "cosine_alpha_bar", "cosine_betas"]
