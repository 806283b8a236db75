"""`discrete`: action tokens predicted in one parallel pass from empty action slots; and the plumbing that all
objectives over action tokens share (`TokenObjective`).

Convention (`discrete`): every action value is one `<|action_k|>` token (`dvlx.processing.action_tokens`,
num_bins uniform bins over the normalised range [-1, 1]). The action slots of the input keep the `<|mask|>`
placeholder in training and in sampling alike; the reference instead zeroes the slot embeddings, but a zero
vector is an input Dream never saw, while `<|mask|>` is what Dream-VL reads as "to be predicted". The logits
for slot p are read at p - 1 (Dream's shift) over the action-token rows of `lm_head` only: a num_bins-way
softmax, so a prediction is always an action token (the reference decodes from the full vocabulary and clips
stray ids into an extreme bin). Loss: cross-entropy over the valid chunk steps (`action_valid`); with
`supervise_suffix` also over the two structural tokens after the actions (`<|im_end|>`, newline: their
labels in the batch), with full-vocabulary logits at those positions only; the sum is divided by the number
of supervised tokens. Sampling is the same pass with an argmax per slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvlx.backbone.model import DreamVLOutput
from dvlx.config import ObjectiveConfig
from dvlx.objectives.base import ActionObjective, ObjectiveOutput, register
from dvlx.processing.action_tokens import ActionTokenizer
from dvlx.processing.robot import ActionSpec
from dvlx.processing.templates import IGNORE_INDEX


class TokenObjective(ActionObjective):
    """Shared by the objectives over action tokens (`discrete`, `discrete_diffusion`, `ar`); not registered.

    Holds the `ActionTokenizer` (`action_tokens`), the ids of the action tokens (`action_ids`, Long[bins];
    index k is the column of every restricted logit tensor) and the mask id, all read from the tokenizer.
    """

    uses_action_tokens = True
    """The tokenizer needs `<|action_k|>` (`ActionTokenizer.ensure_tokens`) before the backbone is built."""
    feeds_action_tokens = True
    """Action tokens are inputs (so their embedding rows train), not only outputs."""

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__(spec, hidden_size, cfg, tokenizer)
        where = f"dvlx/objectives/{self.name or type(self).__name__}.py"
        if tokenizer is None:
            raise ValueError(
                f"{where}: objective '{self.name}' needs the tokenizer (for its action tokens <|action_k|>), "
                "got None"
            )
        self.action_tokens = ActionTokenizer(tokenizer, cfg.num_bins)
        try:
            action_ids = self.action_tokens.token_ids
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        # Not persistent: ids belong to the tokenizer saved with the checkpoint, not to the weights.
        self.register_buffer("action_ids", action_ids.clone(), persistent=False)
        self.mask_token_id = tokenizer.mask_token_id
        self.num_bins = cfg.num_bins

    # ------------------------------------------------------------------------------------ backbone
    def run_backbone(
        self, backbone, batch: dict, embeds: Tensor, columns: slice | None = None, **kwargs
    ) -> DreamVLOutput:
        """Backbone over `embeds` (hidden states only) in the objective's attention mode.

        `columns` is the span of the batch's masks that the call covers, cache included (default: all).
        """
        columns = columns or slice(None)
        prefix = batch.get("prefix_mask")
        return backbone(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"][:, columns],
            prefix_mask=None if prefix is None else prefix[:, columns],
            attention_mode=self.attention,
            return_logits=False,
            **kwargs,
        )

    def attention_mode(self, backbone) -> str:
        return self.attention or backbone.config.attention

    def restricted_logits(self, backbone, states: Tensor, ids: Tensor) -> Tensor:
        """Logits [..., len(ids)] of `states` [..., D] over the `lm_head` rows of `ids` only."""
        head = backbone.lm_head
        if isinstance(head, nn.Linear):
            return F.linear(states, head.weight[ids])
        # A wrapped head (e.g. peft) may change its rows in forward: apply it, then select.
        return head(states)[..., ids]

    def action_logits(self, backbone, states: Tensor) -> Tensor:
        """Logits [..., bins] over the action tokens; column k is `<|action_k|>`."""
        return self.restricted_logits(backbone, states, self.action_ids)

    # -------------------------------------------------------------------------------------- batch
    def placeholder_ids(self, batch: dict) -> Tensor:
        """input_ids [B, L] with `<|mask|>` in every action slot."""
        return batch["input_ids"].masked_fill(batch["action_slots"], self.mask_token_id)

    def slot_targets(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(token index k Long[B, H*A], valid Bool[B, H*A]) of the batch's actions, chunk-major."""
        actions = batch["actions"]
        horizon, dim = self.spec.horizon, self.spec.action_dim
        if actions.dim() != 3 or tuple(actions.shape[1:]) != (horizon, dim):
            raise ValueError(
                f"dvlx/objectives/{self.name}.py: batch key 'actions' must be [B, {horizon}, {dim}], "
                f"got {list(actions.shape)}"
            )
        batch_size = actions.shape[0]
        target = self.action_tokens.index_of(actions).reshape(batch_size, horizon * dim)  # [B, H*A]
        valid = batch.get("action_valid")
        if valid is None:
            valid = torch.ones(batch_size, horizon, dtype=torch.bool, device=actions.device)
        return target, valid.bool().repeat_interleave(dim, dim=1)  # [B, H*A]

    def suffix_positions(self, batch: dict) -> Tensor:
        """Bool[B, L]: the supervised structural tokens after the actions (labels set, not an action slot)."""
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(
                f"dvlx/objectives/{self.name}.py: batch key 'labels' is needed when supervise_suffix is true"
            )
        return (labels != IGNORE_INDEX) & ~batch["action_slots"]

    def suffix_loss(self, backbone, hidden: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
        """(summed full-vocabulary CE, count) of the suffix labels, each read at p - 1."""
        reads = self.suffix_positions(batch)[:, 1:]  # [B, L - 1]: state at p - 1 predicts token p
        rows = hidden[:, :-1][reads]  # [rows, D]
        logits = backbone.lm_head(rows).float()  # [rows, V]
        targets = batch["labels"][:, 1:][reads]
        return F.cross_entropy(logits, targets, reduction="sum"), reads.sum()

    def token_loss(
        self, backbone, batch: dict, hidden: Tensor, logits: Tensor, target: Tensor, valid: Tensor
    ) -> Tensor:
        """Cross-entropy of the restricted slot logits [B, H*A, bins] at the valid slots, plus the suffix
        labels when `supervise_suffix`, divided by the number of supervised tokens."""
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")  # [B*H*A]
        total = (ce * valid.flatten()).sum()  # valid.flatten(): [B*H*A]
        count = valid.sum()
        if self.cfg.supervise_suffix:
            suffix_total, suffix_count = self.suffix_loss(backbone, hidden, batch)
            total, count = total + suffix_total, count + suffix_count
        return total / count.clamp(min=1)

    def values(self, index: Tensor) -> Tensor:
        """Normalised actions [B, H, A] from token indices k [B, H*A]."""
        values = self.action_tokens.values_of(index)  # [B, H*A]
        return values.view(-1, self.spec.horizon, self.spec.action_dim)  # [B, H, A]

    @torch.no_grad()
    def token_metrics(
        self, logits: Tensor, target: Tensor, counted: Tensor, actions: Tensor
    ) -> dict[str, Tensor]:
        """accuracy (argmax == target), l1_current (step 0) and l1_future (steps 1..H-1, when H > 1) of the
        decoded argmax against the true normalised actions, over the `counted` slots Bool[B, H*A]."""
        predicted = logits.argmax(dim=-1)  # [B, H*A]
        counted = counted.float()
        metrics = {"accuracy": ((predicted == target).float() * counted).sum() / counted.sum().clamp(min=1)}
        weight = counted.view(-1, self.spec.horizon, self.spec.action_dim)  # [B, H, A]
        error = (self.values(predicted) - actions.float()).abs() * weight  # [B, H, A]
        metrics["l1_current"] = error[:, 0].sum() / weight[:, 0].sum().clamp(min=1)
        if self.spec.horizon > 1:
            metrics["l1_future"] = error[:, 1:].sum() / weight[:, 1:].sum().clamp(min=1)
        return metrics


@register("discrete")
class DiscreteObjective(TokenObjective):
    """Action tokens in one parallel pass from `<|mask|>` slots (see the module docstring)."""

    feeds_action_tokens = False

    def slot_logits(self, backbone, batch: dict) -> tuple[Tensor, Tensor]:
        """(restricted logits [B, H*A, bins] of the action slots, last hidden states [B, L, D])."""
        embeds = self.embed_inputs(backbone, batch, self.placeholder_ids(batch))
        hidden = self.run_backbone(backbone, batch, embeds).last_hidden_state
        states = self.gather_shifted(hidden, self.slot_positions(batch))  # [B, H*A, D]
        return self.action_logits(backbone, states).float(), hidden

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        logits, hidden = self.slot_logits(backbone, batch)
        target, valid = self.slot_targets(batch)
        loss = self.token_loss(backbone, batch, hidden, logits, target, valid)
        return ObjectiveOutput(loss, self.token_metrics(logits, target, valid, batch["actions"]))

    @torch.no_grad()
    def sample(self, backbone, batch: dict, steps: int | None = None) -> Tensor:
        """Normalised actions [B, H, A]: argmax per slot of one pass (`steps` is ignored)."""
        logits, _ = self.slot_logits(backbone, batch)
        return self.values(logits.argmax(dim=-1))


__all__ = ["DiscreteObjective", "TokenObjective"]
