"""The original Dream-VL sampler (`diffusion_generate` -> `_sample`) in plain torch, for token-parity tests.

Written from ../shared/reference/dream_vl_reference_spec.md §6 (not from dvlx): every step recomputes the
whole canvas (prompt, image and slots), shifts the logits right by one (slot j is read at position j - 1),
and reveals masked slots on the float32 grid linspace(1, eps, steps + 1):

- origin: one uniform per masked slot; a slot is revealed when it is below 1 - s/t (1 at the last step), and
  only revealed slots draw a token.
- maskgit_plus / topk_margin / entropy: a token and a confidence for every masked slot, then
  k = int(n_masked * (1 - s/t)) (every remaining slot at the last step) slots with the highest confidence,
  or with alg_temp > 0 k slots drawn without replacement from softmax(confidence / alg_temp).

Random numbers come from torch's global generator in the reference's order (uniforms, then
`Categorical(probs).sample()`, then the position multinomial). The masked slots of all rows are flattened
and ranked together, as in the exported sampler: for batch size 1 this is the reference, for larger batches
it shows the reference's cross-row ranking, which dvlx replaces by a per-row schedule and top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    drop = cumulative > top_p
    # The first token above the threshold stays, and so does the most likely one.
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    remove = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _top_k(logits: Tensor, top_k: int) -> Tensor:
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1, None]  # [masked, 1]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence: str = "probability",
) -> tuple[Tensor, Tensor]:
    """(confidence, tokens), each [masked], for logits [masked, V]; confidence: probability|margin|entropy."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = torch.distributions.Categorical(probs=probs).sample()
        conf = probs.gather(-1, tokens[:, None])[:, 0]
    else:
        conf, tokens = probs.max(dim=-1)
    if confidence == "margin":
        ranked = torch.sort(probs, dim=-1, descending=True).values
        conf = ranked[:, 0] - ranked[:, 1]
    elif confidence == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return conf, tokens


_CONFIDENCE = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "entropy"}


@torch.no_grad()
def reference_generate(
    logits_fn: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    mask_token_id: int,
    max_new_tokens: int,
    steps: int,
    alg: str = "origin",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
) -> Tensor:
    """Long[B, L + max_new_tokens]: the prompt and its generated slots.

    logits_fn(canvas Long[B, L + max_new_tokens]) -> logits [B, L + max_new_tokens, V] of the full model.
    """
    batch = input_ids.shape[0]
    masks = torch.full((batch, max_new_tokens), mask_token_id, dtype=torch.long, device=input_ids.device)
    x = torch.cat([input_ids, masks], dim=1)
    grid = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = logits_fn(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]  # [masked, V], rows of the batch one after another
        t, s = grid[i], grid[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full_like(x[mask_index], mask_token_id)
            transfer = torch.rand(x0.shape) < p_transfer
            _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature, top_p, top_k)
            x[mask_index] = x0
            continue
        conf, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, _CONFIDENCE[alg])
        n_masked = mask_index.sum()
        k = int(n_masked * (1 - s / t)) if i < steps - 1 else int(n_masked)
        if k == 0:
            continue
        if alg_temp is None or alg_temp == 0:
            chosen = torch.topk(conf, k).indices
        else:
            chosen = torch.multinomial(torch.softmax(conf / alg_temp, dim=-1), k)
        update = torch.full_like(x0, mask_token_id)
        update[chosen] = x0[chosen]
        x[mask_index] = update
    return x
