"""Flow-matching and DDIM maths: conventions, Euler loop, time sampler, cosine schedule, DDIM steps."""

from __future__ import annotations

import math

import pytest
import torch

from dvlx.diffusion.ddim import DDIMSchedule, cosine_alpha_bar, cosine_betas
from dvlx.diffusion.flow import euler_integrate, euler_times, interpolate, sample_times, velocity_target

pytestmark = pytest.mark.usefixtures("one_thread")


def dyadic(shape, seed: int) -> torch.Tensor:
    """Random values on a 2^-8 grid in [-4, 4]: sums of them and of their quarters are exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1024, 1025, shape, generator=gen).float() / 256


# ------------------------------------------------------------------------------------------ flow matching
def test_interpolation_endpoints_and_velocity():
    actions, noise = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert torch.equal(interpolate(actions, noise, ones), noise)  # t = 1 is noise
    assert torch.equal(interpolate(actions, noise, zeros), actions)  # t = 0 is data
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    u = velocity_target(actions, noise)
    torch.testing.assert_close(u, noise - actions)
    # the path is straight: d x_t / dt = u everywhere, and x_t - t * u lands on the data
    h = 1e-3
    finite = (interpolate(actions, noise, t + h) - interpolate(actions, noise, t - h)) / (2 * h)
    torch.testing.assert_close(finite, u, atol=2e-3, rtol=0)
    torch.testing.assert_close(interpolate(actions, noise, t) - t[:, None, None] * u, actions)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_constant_velocity_gives_noise_minus_c_exactly(steps):
    noise, c = dyadic((3, 4, 5), 0), dyadic((3, 4, 5), 1)
    out = euler_integrate(lambda x, t: c, noise, steps)
    assert torch.equal(out, noise - c)


def test_constant_velocity_non_dyadic_steps():
    noise, c = torch.randn(2, 8, 7), torch.randn(2, 8, 7)
    for steps in (3, 5, 12, 50):
        torch.testing.assert_close(euler_integrate(lambda x, t: c, noise, steps), noise - c)


@pytest.mark.parametrize("steps", [1, 3, 4, 12, 50])
def test_euler_runs_exactly_k_fp32_steps_under_bf16_autocast(steps):
    layer = torch.nn.Linear(5, 5)
    seen_t, seen_dtype = [], []

    def velocity(x, t):
        seen_t.append(t.clone())
        seen_dtype.append(x.dtype)
        return layer(x)  # bf16 under autocast

    noise = torch.randn(2, 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = euler_integrate(velocity, noise, steps)
    assert len(seen_t) == steps  # the reference ran 13 steps for 12 and 51 for 50 (bf16 accumulated t)
    assert out.dtype == torch.float32 and all(d == torch.float32 for d in seen_dtype)
    expected = torch.tensor([1.0 - i / steps for i in range(steps)], dtype=torch.float32)
    assert torch.equal(torch.stack([t[0] for t in seen_t]), expected)
    assert torch.equal(euler_times(steps), expected)
    assert all(t.shape == (2,) and t.dtype == torch.float32 for t in seen_t)


def test_euler_rejects_bad_steps():
    for steps in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            euler_integrate(lambda x, t: x, torch.zeros(1, 2), steps)


def test_beta_time_sampler_is_beta_and_leans_to_noise():
    torch.manual_seed(0)
    t = sample_times(200_000, "beta")
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - (0.999 * 0.6 + 0.001)) < 0.004  # Beta(1.5, 1) has mean 0.6
    s = (t - 0.001) / 0.999
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # CDF of Beta(1.5, 1) is q^1.5
        assert abs(float((s <= q).float().mean()) - q ** 1.5) < 0.005
    assert float((t > 0.5).float().mean()) > 0.62  # more noisy (t near 1) than clean times


def test_uniform_time_sampler_and_unknown_name():
    torch.manual_seed(0)
    t = sample_times(100_000, "uniform")
    assert abs(float(t.mean()) - 0.5) < 0.005 and float(t.min()) >= 0.001
    with pytest.raises(ValueError, match="time sampler"):
        sample_times(4, "logit_normal")


# ---------------------------------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("train_steps", [50, 1000])
def test_cosine_schedule_matches_closed_form(train_steps):
    schedule = DDIMSchedule(train_steps)
    # abar_k telescopes to f((k+1)/T) / f(0) while no beta is capped (all but the last step here)
    closed = torch.tensor(
        [cosine_alpha_bar((k + 1) / train_steps) / cosine_alpha_bar(0.0) for k in range(train_steps - 1)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], closed, rtol=1e-10, atol=1e-12)
    betas = cosine_betas(train_steps)
    assert float(betas[-1]) == pytest.approx(0.999)  # f(1) = 0: the cap
    assert float(betas[:-1].max()) < 0.999
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(float(closed[-1]) * 0.001, rel=1e-9)
    assert cosine_alpha_bar(0.0) == pytest.approx(math.cos(0.008 / 1.008 * math.pi / 2) ** 2)


def test_leading_timesteps():
    schedule = DDIMSchedule(50)
    assert schedule.timesteps(50) == list(range(49, -1, -1))
    assert schedule.timesteps(10) == [45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
    assert schedule.timesteps(3) == [32, 16, 0]  # T // N = 16
    assert schedule.timesteps(1) == [0]
    for steps in (0, 51, 2.5):
        with pytest.raises(ValueError, match="DDIM steps"):
            schedule.timesteps(steps)


def test_add_noise_formula():
    schedule = DDIMSchedule(50)
    x0, eps = torch.rand(3, 4, 2) * 2 - 1, torch.randn(3, 4, 2)
    k = torch.tensor([0, 17, 49])
    abar = schedule.alphas_cumprod[k].float()[:, None, None]
    torch.testing.assert_close(schedule.add_noise(x0, eps, k), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


@pytest.mark.parametrize("steps", [50, 10, 3])
def test_ddim_step_with_true_epsilon_follows_the_noising_path(steps):
    schedule = DDIMSchedule(50)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 8, 7, generator=gen) * 2 - 1
    eps = torch.randn(4, 8, 7, generator=gen)
    ratio = 50 // steps
    for k in schedule.timesteps(steps):
        x_k = schedule.add_noise(x0, eps, torch.full((4,), k))
        prev = schedule.step(eps, k, x_k, steps)
        expected = x0 if k - ratio < 0 else schedule.add_noise(x0, eps, torch.full((4,), k - ratio))
        # the x0 estimate divides by sqrt(abar_k), about 1e-3 at k = 49
        torch.testing.assert_close(prev, expected, atol=2e-4, rtol=0)
    # the whole deterministic chain with the true epsilon lands on x0; float32 x_49 holds x0 only at
    # sqrt(abar_49) ~ 1e-3 next to eps ~ 1, so about 1e-4 of x0 is lost when it is stored
    x = schedule.add_noise(x0, eps, torch.full((4,), schedule.timesteps(steps)[0]))
    for k in schedule.timesteps(steps):
        x = schedule.step(eps, k, x, steps)
    torch.testing.assert_close(x, x0, atol=1e-3, rtol=0)


def test_ddim_clips_predicted_x0():
    schedule = DDIMSchedule(50)
    x = torch.full((1, 2), 5.0)
    out = schedule.step(torch.zeros(1, 2), 0, x, 50)  # last step: abar_prev = 1, so out = clip(x0_hat)
    assert torch.equal(out, torch.ones(1, 2))
    unclipped = DDIMSchedule(50, clip_sample=None).step(torch.zeros(1, 2), 0, x, 50)
    assert float(unclipped[0, 0]) > 5.0


def test_ddim_step_is_float32_under_bf16_inputs():
    schedule = DDIMSchedule(50)
    out = schedule.step(torch.randn(2, 3).bfloat16(), 20, torch.randn(2, 3).bfloat16(), 10)
    assert out.dtype == torch.float32
