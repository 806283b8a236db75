"""What every action objective shares: the registry, the output type and the action-slot plumbing.

An objective owns its heads, its input corruption, its loss and its sampler under one stated convention
(see each class's docstring). Interface (B batch, L length, D width, H horizon, A action dim, S proprio dim):

    objective.loss(backbone, batch) -> ObjectiveOutput(loss: scalar, metrics: dict)
    objective.sample(backbone, batch, steps=None) -> Tensor[B, H, A]   # normalised actions

The batch is what `data_modules.trajectory.TrajectoryDataModule` yields: `input_ids` [B, L] whose action
slots (`action_slots` [B, L], exactly H*A per row, chunk-major: slot k*A + d is step k, dimension d) and
proprio slot (`proprio_slots` [B, L]) hold placeholder ids, `attention_mask`, `prefix_mask` (True before the
first action slot), `pixel_values`, `image_grid_thw`, `actions` [B, H, A] (normalised), `action_valid` [B, H],
`proprio` [B, S]. Objectives never read the command line: H, A, S come from the `ActionSpec`.

Shift: Dream keeps the AR alignment (the output at position i predicts the token at i+1), so the hidden state
or logits for action slot p are read at position p - 1, in training and in sampling alike.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dvlx.config import ObjectiveConfig
from dvlx.processing.robot import ActionSpec


@dataclass
class ObjectiveOutput:
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


OBJECTIVES: dict[str, type[ActionObjective]] = {}


def register(name: str):
    """Class decorator: makes an objective available as `objective.name: NAME` in the config."""

    def wrap(cls: type[ActionObjective]) -> type[ActionObjective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective name '{name}' is registered twice")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return wrap


def objective_class(name: str) -> type[ActionObjective]:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown objective '{name}'; choose one of {sorted(OBJECTIVES)}{hint}")
    return OBJECTIVES[name]


class ActionObjective(nn.Module):
    """Base class. Subclasses set `attention` when they need a particular attention mode (`ar`: causal)."""

    name: str = ""
    attention: str | None = None
    """Attention mode the objective requires, or None to use the backbone's configured mode."""

    def __init__(self, spec: ActionSpec, hidden_size: int, cfg: ObjectiveConfig, tokenizer=None) -> None:
        super().__init__()
        self.spec = spec
        self.hidden_size = hidden_size
        self.cfg = cfg
        # The proprio state enters as one token: Linear -> GELU -> Linear into its slot (reference 1.4).
        self.proprio_projector = None
        if spec.proprio_dim > 0:
            self.proprio_projector = nn.Sequential(
                nn.Linear(spec.proprio_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )

    def loss(self, backbone, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, backbone, batch: dict, steps: int | None = None) -> Tensor:
        raise NotImplementedError

    def embed_inputs(self, backbone, batch: dict, input_ids: Tensor | None = None) -> Tensor:
        """Input embeddings [B, L, D]: token embeddings (of `input_ids`, default the batch's), image features
        spliced in, and the projected proprio state written into the proprio slot."""
        ids = batch["input_ids"] if input_ids is None else input_ids
        embeds = backbone.embed(ids, batch.get("pixel_values"), batch.get("image_grid_thw"))
        if self.proprio_projector is None:
            return embeds
        slots = batch["proprio_slots"]
        if not bool((slots.sum(dim=1) == 1).all()):
            raise ValueError("every row needs exactly one proprio slot when the spec has proprio")
        rows = self.proprio_projector(batch["proprio"].to(embeds.dtype)).unsqueeze(1)  # [B, 1, D]
        positions = slots.float().argmax(dim=1, keepdim=True)  # [B, 1]
        return scatter_rows(embeds, positions, rows)

    # ------------------------------------------------------------------------------ slot plumbing
    def slot_positions(self, batch: dict) -> Tensor:
        """Long[B, H*A]: the sequence index of every action slot, chunk-major."""
        slots = batch["action_slots"]
        horizon, dim = self.spec.horizon, self.spec.action_dim
        counts = slots.sum(dim=1)
        if not bool((counts == horizon * dim).all()):
            raise ValueError(f"every row needs {horizon * dim} action slots (H={horizon} x A={dim}), "
                             f"got {counts.tolist()}")
        batch_size = slots.shape[0]
        # [B, H*A]: column indices of the True entries, in order
        return slots.nonzero()[:, 1].view(batch_size, horizon * dim)

    def gather_shifted(self, states: Tensor, positions: Tensor) -> Tensor:
        """States [B, L, D] read at positions - 1 (Dream's shift) -> [B, H*A, D]."""
        index = (positions - 1).unsqueeze(-1).expand(-1, -1, states.shape[-1])  # [B, H*A, D]
        return states.gather(1, index)


def scatter_rows(embeds: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
    """Copy of `embeds` [B, L, D] with rows [B, N, D] written at `positions` [B, N]."""
    index = positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # [B, N, D]
    return embeds.scatter(1, index, rows.to(embeds.dtype))
