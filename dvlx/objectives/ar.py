"""`ar`: the autoregressive baseline over action tokens (the paper's AR comparison).

Convention: the same action tokens as `discrete` (`dvlx.processing.action_tokens`), with `causal` attention
(the class attribute `attention`; the backbone runs every call of this objective in that mode). Training is
teacher forcing: the action slots hold the TRUE action token ids and, with Dream's shift, the output at
position p - 1 predicts slot p, so the first action is predicted from the last prompt token. Cross-entropy
over the action tokens only (a num_bins-way softmax) at the valid chunk steps; with `supervise_suffix` also
full-vocabulary cross-entropy for the two structural tokens after the actions; divided by the number of
supervised tokens. Invalid chunk steps sit at the end of the chunk, so under causal attention they never
influence a supervised action.

Sampling is greedy token-by-token decoding of the H*A slots restricted to action tokens. With
`cfg.use_cache` the prompt columns shared by every row are encoded once with a KV cache and each later column
is fed alone, extending the cache; rows whose prompt is longer keep feeding their own prompt tokens until
their first slot. Without it every token is decoded by a full forward (same result, for checking).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvlx.objectives.base import ObjectiveOutput, register
from dvlx.objectives.discrete import TokenObjective


@register("ar")
class AutoregressiveObjective(TokenObjective):
    """Next-token prediction of action tokens under causal attention (see the module docstring)."""

    attention = "causal"

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        positions = self.slot_positions(batch)  # [B, H*A]
        target, valid = self.slot_targets(batch)
        ids = batch["input_ids"].scatter(1, positions, self.action_ids[target])
        embeds = self.embed_inputs(backbone, batch, ids)
        hidden = self.run_backbone(backbone, batch, embeds).last_hidden_state
        states = self.gather_shifted(hidden, positions)  # [B, H*A, D]
        logits = self.action_logits(backbone, states).float()  # [B, H*A, bins]
        loss = self.token_loss(backbone, batch, hidden, logits, target, valid)
        return ObjectiveOutput(loss, self.token_metrics(logits, target, valid, batch["actions"]))

    @torch.no_grad()
    def sample(self, backbone, batch: dict, steps: int | None = None) -> Tensor:
        """Normalised actions [B, H, A] by greedy decoding of H*A tokens (`steps` is ignored)."""
        slots = batch["action_slots"]
        positions = self.slot_positions(batch)  # [B, H*A]
        first = positions[:, 0]
        embeds = self.embed_inputs(backbone, batch, self.placeholder_ids(batch))
        start, stop = int(first.min()), int(positions[:, -1].max())
        cached = bool(self.cfg.use_cache)
        cache = None
        if cached:
            prompt = slice(0, start)
            out = self.run_backbone(backbone, batch, embeds[:, prompt], columns=prompt, use_cache=True)
            state, cache = out.last_hidden_state[:, -1], out.past_key_values  # state [B, D] predicts `start`
        index = torch.full_like(positions, -1)  # token index k per slot
        rows = torch.arange(slots.shape[0], device=slots.device)
        for column in range(start, stop + 1):
            if not cached:
                state = self.run_backbone(backbone, batch, embeds).last_hidden_state[:, column - 1]  # [B, D]
            is_slot = slots[:, column]  # [B]
            if bool(is_slot.any()):
                k = self.action_logits(backbone, state).argmax(dim=-1)  # [B]
                slot = (column - first).clamp(0, positions.shape[1] - 1)  # [B]: slot number where is_slot
                index[rows[is_slot], slot[is_slot]] = k[is_slot]
                token = backbone.embed(self.action_ids[k][:, None])[:, 0].to(embeds.dtype)  # [B, D]
                embeds[is_slot, column] = token[is_slot]
            if cached and column < stop:
                span = slice(column, column + 1)
                out = self.run_backbone(
                    backbone, batch, embeds[:, span], columns=slice(0, column + 1), past_key_values=cache,
                    use_cache=True,
                )
                state, cache = out.last_hidden_state[:, -1], out.past_key_values
        return self.values(index)


__all__ = ["AutoregressiveObjective"]
