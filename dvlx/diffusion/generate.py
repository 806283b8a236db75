"""Masked-diffusion generation with a DreamVL backbone: the denoising loop and answer decoding.

The canvas is the prompt followed by `max_new_tokens` mask tokens. At every step the backbone runs on the
canvas; the prediction for slot j is read from position j - 1 (Dream's shift), and a number of masked slots
given by the schedule is revealed (see `dvlx.diffusion.sampling`). Revealed tokens are never masked again.
Batch prompts must be LEFT padded (attention_mask 0 on the left), so every row generates in the same slots.

The vision tower runs once: the canvas embeddings are computed once and only revealed slots are refreshed.
With `use_cache=True` the first step also fills a KV cache, kept for the first L - 1 prompt positions, and
later steps feed only the last prompt token and the generation slots. That is exact when prompt positions
never attend to the answer (`prefix` or `causal` attention); under `full` attention it is an approximation,
because the cached prompt keys and values were computed while every answer slot was a mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dvlx.backbone.config import ATTENTION_MODES
from dvlx.diffusion.sampling import (
    ALGORITHMS,
    SCHEDULES,
    check_choice,
    confidence,
    draw_tokens,
    filter_logits,
    origin_positions,
    random_positions,
    reveal_counts,
    reveal_fraction,
    select_positions,
)

DEFAULT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>")


def _check_arguments(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    steps: int,
    alg: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    alg_temp: float | None,
    eps: float,
    schedule: str,
    mode: str,
) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype != torch.long:
        raise ValueError(
            f"generate: input_ids must be a Long tensor [B, L] with L >= 1, got {input_ids.dtype} "
            f"{list(input_ids.shape)}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"generate: attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                f"got {list(attention_mask.shape)}"
            )
        valid = attention_mask.bool()
        # Left padding: zeros then ones in every row, and the last prompt position valid.
        left_padded = bool((valid[:, 1:] >= valid[:, :-1]).all()) and bool(valid[:, -1].all())
        if not left_padded:
            raise ValueError(
                "generate: prompts must be LEFT padded (attention_mask 0s first, then 1s up to the last "
                "column) so that every row generates in the same slots"
            )
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if steps < 1:
        raise ValueError(f"generate: steps must be >= 1, got {steps}")
    check_choice("alg", alg, ALGORITHMS)
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("attention_mode", mode, ATTENTION_MODES)
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1, got {top_k}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"generate: alg_temp must be >= 0, got {alg_temp}")
    if not 0 < eps < 1:
        raise ValueError(f"generate: eps must be in (0, 1), got {eps}")


def allowed_tokens(restrict_to: Tensor, vocab_size: int, device: torch.device) -> Tensor:
    """Bool[V] of allowed ids from a Bool[V] mask or a Long tensor of ids; at least one must be allowed."""
    if restrict_to.dtype == torch.bool:
        if tuple(restrict_to.shape) != (vocab_size,):
            raise ValueError(
                f"generate: a boolean restrict_to must have shape [V] = [{vocab_size}], "
                f"got {list(restrict_to.shape)}"
            )
        allowed = restrict_to.to(device)
    else:
        ids = restrict_to.reshape(-1).long()  # [n_ids]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"generate: restrict_to ids must be in [0, {vocab_size}), got {ids.tolist()[:10]}"
            )
        allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        allowed[ids.to(device)] = True
    if not bool(allowed.any()):
        raise ValueError("generate: restrict_to allows no token")
    return allowed


def _stop_ids(eos_token_id: int | Sequence[int] | Tensor | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)  # [n_ids]
    if ids.numel() == 0:
        raise ValueError("generate: eos_token_id must name at least one id")
    return ids


def _finished(canvas: Tensor, mask_token_id: int, stop_ids: Tensor) -> Tensor:
    """Bool[B]: rows whose answer is final: no masked slot before the first stop token (or none at all)."""
    length = canvas.shape[1]
    is_stop = torch.isin(canvas, stop_ids)
    first_stop = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1), length)
    before = torch.arange(length, device=canvas.device)[None, :] < first_stop[:, None]
    return ~((canvas == mask_token_id) & before).any(dim=1)


def _logits(model, hidden: Tensor, slots: Tensor, allowed: Tensor | None) -> Tensor:
    """Logits [masked, V] of hidden [B, slots, D] at the Bool[B, slots] `slots` (row-major), restricted."""
    logits = model.lm_head(hidden[slots])
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    image_grid_thw: Tensor | None = None,
    max_new_tokens: int = 128,
    steps: int = 128,
    alg: str = "origin",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    *,
    schedule: str = "original",
    use_cache: bool = False,
    attention_mode: str | None = None,
    eos_token_id: int | Sequence[int] | Tensor | None = None,
    restrict_to: Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Generate `max_new_tokens` tokens per row by masked diffusion; returns Long[B, L + max_new_tokens].

    model: a `dvlx.backbone.DreamVL` (mask id from `model.config`); put it in eval mode first.
    input_ids / attention_mask: [B, L] prompts, LEFT padded (attention_mask 0 on the padding).
    pixel_values / image_grid_thw: the images of all rows in row order (see `DreamVL.embed`).
    alg: origin | maskgit_plus | topk_margin | entropy; schedule: original (the reference's integer rule) |
    even. temperature 0 is greedy. alg_temp > 0 samples the positions to reveal from softmax(conf/alg_temp).
    use_cache: prefix KV cache (exact under `prefix`/`causal` attention, approximate under `full`).
    attention_mode: full | prefix | causal (default: `model.config.attention`).
    eos_token_id: id(s) that end an answer. When given, generation stops early once every row has no mask
    before its first such id; remaining masks are then filled with the first id (the decoded answers are
    unchanged; the canvas after the stop differs). None runs every step, as the reference does.
    restrict_to: Bool[V] or ids; other tokens get -inf logits. generator: on the model's device.
    stream: called as stream(step, sequences) after each step (0-based index; do not modify `sequences`).
    """
    config = model.config
    mode = attention_mode or config.attention
    _check_arguments(
        input_ids,
        attention_mask,
        max_new_tokens,
        steps,
        alg,
        temperature,
        top_p,
        top_k,
        alg_temp,
        eps,
        schedule,
        mode,
    )
    device = model.device
    mask_id = config.mask_token_id
    batch, prompt_length = input_ids.shape
    total = prompt_length + max_new_tokens
    x = torch.cat(
        [input_ids.to(device), torch.full((batch, max_new_tokens), mask_id, dtype=torch.long, device=device)],
        dim=1,
    )
    full_mask = None
    if attention_mask is not None:
        ones = torch.ones(batch, max_new_tokens, dtype=attention_mask.dtype, device=device)
        full_mask = torch.cat([attention_mask.to(device), ones], dim=1)
    prefix_mask = None
    if mode == "prefix":
        prefix_mask = (torch.arange(total, device=device) < prompt_length)[None, :].expand(batch, -1)
    allowed = None if restrict_to is None else allowed_tokens(restrict_to, config.vocab_size, device)
    stop_ids = _stop_ids(eos_token_id, device)
    pixel_values = None if pixel_values is None else pixel_values.to(device)
    image_grid_thw = None if image_grid_thw is None else image_grid_thw.to(device)

    # The vision tower runs here only; later steps refresh the embeddings of revealed slots.
    embeds = model.embed(x, pixel_values, image_grid_thw)
    forward = {"attention_mask": full_mask, "attention_mode": mode, "prefix_mask": prefix_mask}
    cache = None
    for step in range(steps):
        canvas = x[:, prompt_length:]  # [B, slots] view
        masked = canvas == mask_id
        if not bool(masked.any()):
            break
        if use_cache and cache is not None:
            out = model(
                inputs_embeds=embeds[:, prompt_length - 1 :],
                past_key_values=cache,
                use_cache=False,
                return_logits=False,
                **forward,
            )
            hidden = out.last_hidden_state[:, :max_new_tokens]  # [B, slots, D]
        else:
            out = model(inputs_embeds=embeds, use_cache=use_cache, return_logits=False, **forward)
            if use_cache:
                # Keep the first L - 1 prompt positions; the last one is re-fed because it predicts slot 0.
                cache = out.past_key_values
                cache.crop(-(max_new_tokens + 1))
            hidden = out.last_hidden_state[:, prompt_length - 1 : total - 1]  # [B, slots, D]
        # Position j - 1 predicts slot j: hidden[:, j] is the state that predicts canvas slot j.
        if alg == "origin":
            if schedule == "original":
                reveal = origin_positions(masked, reveal_fraction(step, steps, eps), generator)
            else:
                counts = reveal_counts(masked.sum(dim=1), step, steps, schedule, eps)
                reveal = random_positions(masked, counts, generator)
            probs = torch.softmax(
                filter_logits(_logits(model, hidden, reveal, allowed), temperature, top_p, top_k), dim=-1
            )
            tokens, _ = draw_tokens(probs, temperature, generator)
            canvas[reveal] = tokens
        else:
            probs = torch.softmax(
                filter_logits(_logits(model, hidden, masked, allowed), temperature, top_p, top_k), dim=-1
            )
            tokens, chosen_probs = draw_tokens(probs, temperature, generator)
            scores = torch.zeros(masked.shape, dtype=probs.dtype, device=device)
            scores = scores.masked_scatter(masked, confidence(probs, chosen_probs, alg))
            counts = reveal_counts(masked.sum(dim=1), step, steps, schedule, eps)
            reveal = select_positions(scores, masked, counts, alg_temp, generator)
            proposal = torch.zeros(masked.shape, dtype=torch.long, device=device)
            proposal = proposal.masked_scatter(masked, tokens)
            canvas[reveal] = proposal[reveal]
        embeds[:, prompt_length:][reveal] = model.model.embed_tokens(canvas[reveal]).to(embeds.dtype)

        done = stop_ids is not None and bool(_finished(canvas, mask_id, stop_ids).all())
        if done:
            canvas.masked_fill_(canvas == mask_id, int(stop_ids[0]))
        if stream is not None:
            stream(step, x)
        if done:
            break
    return x


def decode_generated(
    tokenizer,
    sequences: Tensor,
    prompt_length: int,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
) -> list[str]:
    """Text of each row's generated slots (special tokens kept), cut at the first of `stop_strings`."""
    texts = []
    for row in sequences[:, prompt_length:].tolist():
        text = tokenizer.decode(row, skip_special_tokens=False)
        cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts


__all__ = ["DEFAULT_STOP_STRINGS", "allowed_tokens", "decode_generated", "generate"]
