"""`discrete_diffusion`: masked diffusion over the action tokens (Dream-VLA's objective).

Convention: the response is the H*A action tokens (`<|action_k|>`, see `dvlx.processing.action_tokens`) and,
with `supervise_suffix`, the two structural tokens after them (their labels in the batch). Training uses the
shared `dvlx.diffusion.MaskedDiffusion`: t ~ U(0, 1) per row, every response token of a valid chunk step is
replaced by `<|mask|>` with probability (1 - eps) t + eps, cross-entropy at the masked tokens read at p - 1
(Dream's shift), weighted per `cfg.weighting` (CART over the attended, unmasked context) and divided by the
number of masked tokens. Slots of invalid chunk steps (`action_valid` False) always hold `<|mask|>` and are
never supervised. The softmax runs over the response vocabulary only: the action tokens plus, with
`supervise_suffix`, the two suffix tokens (`<|im_end|>`, newline), at every supervised position; targets are
indices into that vocabulary, so `MaskedDiffusion.loss` is used as it is.

Sampling: every action slot starts as `<|mask|>` (the suffix tokens stay as given); at each of `steps`
(default 1) steps the slots' logits over the action tokens only are computed, and the slots to reveal are
chosen per row with the shared sampler functions of `dvlx.diffusion.sampling` (`alg`, `schedule`,
`temperature` below; greedy maskgit_plus with the `even` schedule, so steps = H*A reveals one slot per step).
Vision features are computed once. Under `prefix` (or `causal`) attention with `cfg.use_cache`, the prompt
columns that every row shares are encoded once into a KV cache that later steps only read: exact, because
prompt positions never attend to the slots. Returns normalised actions [B, H, A].
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.config import ObjectiveConfig
from dvlx.diffusion import MaskedDiffusion
from dvlx.diffusion.sampling import confidence, draw_tokens, filter_logits, reveal_counts, select_positions
from dvlx.objectives.base import ObjectiveOutput, register, scatter_rows
from dvlx.objectives.discrete import TokenObjective
from dvlx.processing.robot import ActionSpec


@register("discrete_diffusion")
class DiscreteDiffusionObjective(TokenObjective):
    """Masked diffusion over action tokens (see the module docstring)."""

    alg: str = "maskgit_plus"
    """Confidence used to pick the slots revealed at a sampling step (`dvlx.diffusion.sampling`)."""
    schedule: str = "even"
    """How many slots a step reveals: `even` spreads them over the steps; `original` is the reference rule."""
    temperature: float = 0.0
    """0 = greedy tokens."""
    default_steps: int = 1

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__(spec, hidden_size, cfg, tokenizer)
        self.diffusion = MaskedDiffusion(mask_token_id=self.mask_token_id, weighting=cfg.weighting)
        suffix = [tokenizer.im_end_token_id, tokenizer.newline_token_id] if cfg.supervise_suffix else []
        response = torch.cat([self.action_ids, torch.tensor(suffix, dtype=torch.long)])
        self.register_buffer("response_ids", response, persistent=False)

    def response_index(self, labels: Tensor) -> Tensor:
        """Index of suffix label ids in the response vocabulary (after the `bins` action tokens)."""
        suffix_ids = self.response_ids[self.num_bins :]
        hits = labels[:, None] == suffix_ids[None, :]  # [rows, 2]
        if not bool(hits.any(dim=1).all()):
            bad = labels[~hits.any(dim=1)].unique().tolist()
            raise ValueError(
                f"dvlx/objectives/discrete_diffusion.py: suffix labels {bad} are not <|im_end|> or the "
                f"newline {suffix_ids.tolist()}"
            )
        return self.num_bins + hits.long().argmax(dim=1)

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        slots = batch["action_slots"]
        positions = self.slot_positions(batch)  # [B, H*A]
        target, valid = self.slot_targets(batch)
        mask = torch.full_like(target, self.mask_token_id)
        slot_ids = torch.where(valid, self.action_ids[target], mask)  # [B, H*A]
        clean = self.placeholder_ids(batch).scatter(1, positions, slot_ids)
        maskable = torch.zeros_like(slots).scatter(1, positions, valid)
        # Targets in the response vocabulary; positions that are never masked are never read.
        targets = torch.zeros_like(clean).scatter(1, positions, target)
        if self.cfg.supervise_suffix:
            suffix = self.suffix_positions(batch)
            maskable = maskable | suffix
            targets[suffix] = self.response_index(batch["labels"][suffix])
        corruption = self.diffusion.corrupt(clean, maskable)
        embeds = self.embed_inputs(backbone, batch, corruption.noisy_ids)
        hidden = self.run_backbone(backbone, batch, embeds).last_hidden_state
        result = self.diffusion.loss(
            hidden,
            lambda rows: self.restricted_logits(backbone, rows, self.response_ids),
            targets,
            corruption.masked,
            batch["attention_mask"],
        )
        with torch.no_grad():
            states = self.gather_shifted(hidden, positions)  # [B, H*A, D]
            logits = self.action_logits(backbone, states).float()  # [B, H*A, bins]
            masked_slots = corruption.masked.gather(1, positions)  # [B, H*A]
            metrics = self.token_metrics(logits, target, masked_slots, batch["actions"])
        metrics["masked_tokens"] = result.n_supervised.float()
        return ObjectiveOutput(result.loss, metrics)

    @torch.no_grad()
    def sample(self, backbone, batch: dict, steps: int | None = None) -> Tensor:
        """Normalised actions [B, H, A] after `steps` unmasking steps (default cfg.steps, else 1)."""
        steps = steps or self.cfg.steps or self.default_steps
        positions = self.slot_positions(batch)  # [B, H*A]
        embeds = self.embed_inputs(backbone, batch, self.placeholder_ids(batch))
        length = embeds.shape[1]
        # Columns [0, keep) are prompt in every row, and slot 0 of the shortest prompt is read at column keep.
        keep = int(positions[:, 0].min()) - 1
        cached = self.cfg.use_cache and self.attention_mode(backbone) in ("prefix", "causal") and keep > 0
        canvas = torch.full_like(positions, -1)  # token index k per slot, -1 while masked
        cache = None
        for step in range(steps):
            masked = canvas < 0
            if not bool(masked.any()):
                break
            if cache is None:
                out = self.run_backbone(backbone, batch, embeds, use_cache=cached)
                hidden, offset = out.last_hidden_state, 0
                if cached:
                    cache = out.past_key_values
                    cache.crop(-(length - keep))
            else:
                window = slice(keep, None)
                out = self.run_backbone(backbone, batch, embeds[:, window], past_key_values=cache)
                hidden, offset = out.last_hidden_state, keep
            states = self.gather_shifted(hidden, positions - offset)  # [B, H*A, D]
            logits = self.action_logits(backbone, states)[masked].float()  # [rows, bins]
            probs = torch.softmax(filter_logits(logits, self.temperature), dim=-1)  # [rows, bins]
            tokens, chosen = draw_tokens(probs, self.temperature)
            scores = torch.zeros(masked.shape, dtype=probs.dtype, device=probs.device)
            scores = scores.masked_scatter(masked, confidence(probs, chosen, self.alg))
            counts = reveal_counts(masked.sum(dim=1), step, steps, self.schedule, self.diffusion.eps)
            reveal = select_positions(scores, masked, counts)
            proposal = torch.zeros_like(canvas).masked_scatter(masked, tokens)
            canvas = torch.where(reveal, proposal, canvas)
            # Revealed slots enter the next step as their action tokens.
            index = positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # [B, H*A, D]
            current = embeds.gather(1, index)  # [B, H*A, D]
            revealed = backbone.embed(self.action_ids[proposal]).to(embeds.dtype)  # [B, H*A, D]
            keep_new = reveal.unsqueeze(-1)  # [B, H*A, 1]
            embeds = scatter_rows(embeds, positions, torch.where(keep_new, revealed, current))
        return self.values(canvas)


__all__ = ["DiscreteDiffusionObjective"]
