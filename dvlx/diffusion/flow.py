"""Flow matching maths: the time sampler, the straight path, the velocity target and the Euler sampler.

Convention (openpi's, used by every caller): t = 1 is pure noise and t = 0 is the data.

    x_t = t * noise + (1 - t) * actions          (interpolate)
    u   = d x_t / d t = noise - actions          (velocity_target)
    sampling integrates from t = 1 to t = 0:  x <- x - dt * v(x, t)

The training sampler draws s ~ Beta(1.5, 1) (a true Beta variate, density proportional to sqrt(s)) and uses
t = 0.999 * s + 0.001, so under this convention it leans towards NOISY times (mean 0.6). The reference drew a
ratio of powered uniforms that is not Beta-distributed, under the opposite convention (reference 2.2, 7.16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TIME_SAMPLERS = ("beta", "uniform")
BETA_ALPHA = 1.5
BETA_BETA = 1.0
T_MIN = 0.001
"""Smallest training time: t = (1 - T_MIN) * s + T_MIN keeps a trace of noise in every sample."""


def sample_times(
    batch_size: int,
    sampler: str = "beta",
    *,
    device: torch.device | str | None = None,
    alpha: float = BETA_ALPHA,
    beta: float = BETA_BETA,
    t_min: float = T_MIN,
) -> Tensor:
    """Float32[B] training times in [t_min, 1]: `beta` draws Beta(alpha, beta), `uniform` draws U(0, 1),
    then t = (1 - t_min) * s + t_min. Uses the global torch generator."""
    if sampler == "beta":
        dist = torch.distributions.Beta(
            torch.tensor(alpha, dtype=torch.float32, device=device),
            torch.tensor(beta, dtype=torch.float32, device=device),
        )
        s = dist.sample((batch_size,))
    elif sampler == "uniform":
        s = torch.rand(batch_size, dtype=torch.float32, device=device)
    else:
        raise ValueError(
            f"dvlx/diffusion/flow.py: time sampler must be one of {TIME_SAMPLERS}, got {sampler!r}"
        )
    return (1.0 - t_min) * s + t_min


def _expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Times [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))  # [B, 1, ..., 1]


def interpolate(actions: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t * noise + (1 - t) * actions, with t [B] broadcast over the remaining dims."""
    t = _expand_time(t, actions)
    return t * noise + (1.0 - t) * actions


def velocity_target(actions: Tensor, noise: Tensor) -> Tensor:
    """u = d x_t / d t = noise - actions (constant along the straight path)."""
    return noise - actions


def euler_times(steps: int) -> Tensor:
    """Float32[steps]: the times t_i = 1 - i / steps, i = 0..steps-1, at which the velocity is evaluated."""
    _check_steps(steps)
    return torch.tensor([1.0 - i / steps for i in range(steps)], dtype=torch.float32)


def euler_integrate(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 with exactly `steps` Euler steps.

    The loop runs over integers (t_i = 1 - i / steps, dt = 1 / steps) and keeps x in float32 whatever the
    autocast state or the dtype `velocity` returns, so the step count and the times are exact
    (the reference accumulated t in bf16 and ran extra steps, reference 7.13). velocity(x [B, ...] float32,
    t [B] float32) -> [B, ...]. With a constant velocity c the result is noise - c.
    """
    times = euler_times(steps).to(noise.device)
    dt = 1.0 / steps
    x = noise.float()
    batch = x.shape[0]
    for i in range(steps):
        t = times[i].expand(batch)  # [B]
        x = x - dt * velocity(x, t).float()
    return x


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"dvlx/diffusion/flow.py: steps must be an int >= 1, got {steps!r}")


__all__ = [
    "TIME_SAMPLERS",
    "euler_integrate",
    "euler_times",
    "interpolate",
    "sample_times",
    "velocity_target",
]
