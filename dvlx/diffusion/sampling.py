"""Reverse-process pieces of masked-diffusion generation, as small pure functions on tensors.

Time runs from noise to data: the grid is t_0 = 1 > t_1 > ... > t_steps = eps (the reference's
`linspace(1, eps, steps + 1)`), and step i moves from t_i to s = t_(i+1). Nothing here runs the model; the
loop is `dvlx.diffusion.generate`.

- Schedules (how many masked slots a row reveals at step i, given the n it still has masked):
  `original` is the reference's integer rule k = floor(n (1 - s / t)) in float32, with every remaining slot at
  the last step; `even` spreads the remaining slots over the remaining steps, k = ceil(n / (steps - i)).
- Tokens: logits are divided by the temperature (when > 0), nucleus-filtered (top-p, keeping the first token
  that crosses the threshold), top-k filtered, then softmax; greedy takes the argmax, otherwise one draw.
- Confidence (higher = more certain): `maskgit_plus` the probability of the chosen token, `topk_margin` top-1
  minus top-2 probability, `entropy` sum p log p (the negative entropy).
- Positions: the k most confident masked slots of each row (per row, unlike the reference's exported sampler
  which ranks across the whole batch), or with alg_temp > 0 k slots drawn without replacement from
  softmax(confidence / alg_temp) via the Gumbel-top-k trick (no -inf ever reaches a multinomial).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.config import did_you_mean

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
SCHEDULES = ("original", "even")
_CONFIDENCE_OF = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "neg_entropy"}
# The reference adds this inside the log of its entropy confidence.
_ENTROPY_EPS = 1e-10


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming `name` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {list(choices)}, got {value!r}{did_you_mean(value, choices)}"
        )


# ------------------------------------------------------------------------------------------ schedules
def timesteps(steps: int, eps: float) -> Tensor:
    """The reference's float32 time grid [steps + 1]: linspace(1, eps, steps + 1), on the CPU."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)


def reveal_fraction(step: int, steps: int, eps: float) -> Tensor:
    """1 - s / t for step `step` (float32, 0-dim), and exactly 1 at the last step."""
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")
    if step == steps - 1:
        return torch.ones((), dtype=torch.float32)
    grid = timesteps(steps, eps)
    return 1 - grid[step + 1] / grid[step]


def reveal_counts(
    n_masked: Tensor, step: int, steps: int, schedule: str = "original", eps: float = 1e-3
) -> Tensor:
    """How many slots each row reveals at `step`: Long[B] from the rows' masked counts Long[B].

    original: floor(n * (1 - s / t)) computed in float32 exactly as the reference (so n = steps gives 0 at
    step 0), all n at the last step. even: ceil(n / (steps - step)), so a row with n >= steps - step reveals
    at least one slot at every step and everything by the last one.
    """
    check_choice("schedule", schedule, SCHEDULES)
    n = n_masked.long()
    if schedule == "original":
        if step == steps - 1:
            return n.clone()
        # Long[B] * float32 0-dim -> float32[B]: the same promotion and rounding as the reference.
        counts = (n.cpu() * reveal_fraction(step, steps, eps)).floor().long().to(n.device)
    else:
        if not 0 <= step < steps:
            raise ValueError(f"step must be in [0, {steps}), got {step}")
        remaining = steps - step
        counts = torch.div(n + remaining - 1, remaining, rounding_mode="floor")
    return torch.minimum(counts.clamp(min=0), n)


def schedule_counts(n: int, steps: int, schedule: str = "original", eps: float = 1e-3) -> list[int]:
    """Slots revealed at each step by a row that starts with n masked slots and reveals exactly its counts."""
    remaining = torch.tensor([n])
    counts = []
    for step in range(steps):
        k = int(reveal_counts(remaining, step, steps, schedule, eps)[0])
        counts.append(k)
        remaining -= k
    return counts


# ---------------------------------------------------------------------------------------------- tokens
def filter_logits(
    logits: Tensor, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None
) -> Tensor:
    """Temperature, then top-p, then top-k on logits [..., V]; removed entries become the dtype's minimum.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p, including the first
    token that crosses it (the reference's rule); top-k keeps every token at least as likely as the k-th.
    """
    if temperature > 0:
        logits = logits / temperature
    floor = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        # Shift right by one so the token that crosses the threshold stays; the top token always stays.
        remove_sorted = torch.cat([torch.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], dim=-1)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, floor)
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, floor)
    return logits


def draw_tokens(
    probs: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Tokens Long[masked] and their probabilities [masked] from probs [masked, V].

    Greedy (argmax) at temperature 0, otherwise one draw per row.
    """
    if temperature > 0 and probs.shape[0] > 0:
        tokens = torch.multinomial(probs.float(), 1, generator=generator)  # [masked, 1]
        return tokens[:, 0], probs.gather(-1, tokens)[:, 0]
    chosen, tokens = probs.max(dim=-1)
    return tokens, chosen


def confidence(probs: Tensor, chosen: Tensor, alg: str) -> Tensor:
    """Confidence [masked] of each slot for `alg` (maskgit_plus, topk_margin, entropy); higher = surer."""
    check_choice("alg", alg, tuple(_CONFIDENCE_OF))
    kind = _CONFIDENCE_OF[alg]
    if kind == "probability":
        return chosen
    if kind == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values  # [masked, 2]
        return top2[:, 0] - top2[:, -1] if top2.shape[-1] == 2 else top2[:, 0]
    return (probs * torch.log(probs + _ENTROPY_EPS)).sum(dim=-1)


# ------------------------------------------------------------------------------------------- positions
def select_positions(
    scores: Tensor,
    masked: Tensor,
    counts: Tensor,
    alg_temp: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool[B, slots]: for each row b, `counts[b]` of its masked slots, the highest `scores` first.

    scores [B, slots] (entries at unmasked slots are ignored), masked Bool[B, slots], counts Long[B] at most
    each row's masked count.
    alg_temp > 0 draws the slots without replacement from softmax(scores / alg_temp) instead (Gumbel-top-k).
    Ranking runs over each row's masked slots in position order, so for one row it is exactly
    `topk(scores[masked], k)` as in the reference.
    """
    batch, length = masked.shape
    n_masked = masked.sum(dim=1)
    if bool((counts > n_masked).any()) or bool((counts < 0).any()):
        raise ValueError(f"counts {counts.tolist()} must be in [0, masked count {n_masked.tolist()}] per row")
    reveal = torch.zeros_like(masked)
    k_max = int(counts.max()) if counts.numel() else 0
    if k_max == 0:
        return reveal
    if alg_temp is not None and alg_temp > 0:
        uniform = torch.rand(batch, length, generator=generator, device=masked.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        scores = scores.float() / alg_temp + gumbel
    # Masked slots first, in position order: idx[b, :n_b] are row b's masked positions.
    idx = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)  # [B, slots]
    n_max = int(n_masked.max())
    idx = idx[:, :n_max]
    compact = scores.gather(1, idx)  # [B, n_max]
    valid = torch.arange(n_max, device=masked.device)[None, :] < n_masked[:, None]
    compact = compact.masked_fill(~valid, float("-inf"))
    top = torch.topk(compact, k_max, dim=1).indices  # [B, k_max]
    keep = torch.arange(k_max, device=masked.device)[None, :] < counts[:, None]
    # topk indices are distinct within a row, so every target position is written once.
    return reveal.scatter(1, idx.gather(1, top), keep)


def random_positions(masked: Tensor, counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Bool[B, slots]: `counts[b]` masked slots of row b chosen uniformly at random without replacement."""
    uniform = torch.rand(masked.shape, generator=generator, device=masked.device)
    return select_positions(uniform, masked, counts)


def origin_positions(
    masked: Tensor, fraction: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Bool[B, slots]: each masked slot independently with probability `fraction` (reference `origin`)."""
    uniform = torch.rand(masked.shape, generator=generator, device=masked.device)
    if isinstance(fraction, Tensor):
        fraction = fraction.to(masked.device)
    return masked & (uniform < fraction)


__all__ = [
    "ALGORITHMS",
    "SCHEDULES",
    "check_choice",
    "confidence",
    "draw_tokens",
    "filter_logits",
    "origin_positions",
    "random_positions",
    "reveal_counts",
    "reveal_fraction",
    "schedule_counts",
    "select_positions",
    "timesteps",
]
