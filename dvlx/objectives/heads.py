"""Parts shared by the continuous objectives (`l1`, `diffusion`, `flow_matching`): the MLP-ResNet chunk head,
the noisy-action projector, the timestep embedding, the masked mean, and `SlotForward`, the one code path that
writes rows into the action slots, runs the backbone and reads the slot states with Dream's shift (with the
prompt's KV cache reused across sampling steps where that is exact).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dvlx.objectives.base import ActionObjective, scatter_rows

FREQUENCY_DIM = 256
"""Width of the sinusoidal timestep features fed to the timestep MLP."""
TIME_SCALE = 1000.0
"""Times in [0, 1] are scaled by this before the sinusoids: at scale 1 the highest frequency is 1 rad and the
embedding barely changes over [0, 1] (reference 7.16)."""
CACHED_MODES = ("prefix", "causal")
"""Attention modes in which prompt states never depend on the action slots: a prompt KV cache is exact."""


class ResidualBlock(nn.Module):
    """x + ReLU(Linear(LN(x)))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.linear(self.norm(x)))


class MLPResNet(nn.Module):
    """LN -> Linear(in -> width) -> ReLU -> blocks x ResidualBlock -> LN -> Linear(width -> out) (ref 2.1)."""

    def __init__(self, in_features: int, width: int, out_features: int, blocks: int) -> None:
        super().__init__()
        if blocks < 0:
            raise ValueError(f"dvlx/objectives/heads.py: head_blocks must be >= 0, got {blocks}")
        self.norm_in = nn.LayerNorm(in_features)
        self.linear_in = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.linear_in(self.norm_in(x)))
        for block in self.blocks:
            x = block(x)
        return self.linear_out(self.norm_out(x))


class ActionChunkHead(nn.Module):
    """Slot states [B, H*A, D] (chunk-major) -> [B, H, A]: the A states of one chunk step are concatenated and
    an MLP-ResNet of width D maps them to that step's A values."""

    def __init__(self, hidden_size: int, action_dim: int, blocks: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.mlp = MLPResNet(action_dim * hidden_size, hidden_size, action_dim, blocks)

    def forward(self, slot_states: Tensor) -> Tensor:
        batch, slots, width = slot_states.shape
        steps = slots // self.action_dim
        x = slot_states.to(self.mlp.linear_in.weight.dtype)
        x = x.reshape(batch, steps, self.action_dim * width)  # [B, H*A, D] -> [B, H, A*D]
        return self.mlp(x)  # [B, H, A]


class NoisyActionProjector(nn.Module):
    """Each scalar action value becomes one slot embedding: Linear(1 -> D) -> GELU -> Linear(D -> D)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(1, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, actions: Tensor) -> Tensor:
        batch = actions.shape[0]
        x = actions.to(self.linear_1.weight.dtype).reshape(batch, -1, 1)  # [B, H, A] -> [B, H*A, 1]
        return self.linear_2(self.act(self.linear_1(x)))  # [B, H*A, D]


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Float32[B, dim]: [sin(v * f_k), cos(v * f_k)] with f_k = max_period^(-k / (dim/2)), k = 0..dim/2-1."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[:, None] * freqs[None, :]  # [B, dim/2]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # [B, dim rounded down to even]
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Noise level in [0, 1] (flow time t, or k / T for DDIM) -> [B, D]: sinusoids of TIME_SCALE * t, then
    Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = nn.Linear(frequency_dim, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_embedding(t * TIME_SCALE, self.frequency_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(features)))


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of values [B, H, A] over the chunk steps where valid [B, H] is True (0 when none is)."""
    weights = valid.to(values.dtype)[..., None].expand_as(values)  # [B, H, 1] -> [B, H, A]
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def initial_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Float32 N(0, I) of `shape` on `device`, drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def resolve_steps(objective: ActionObjective, steps: int | None, default: int) -> int:
    """The step count of a sampler call: the argument, else `cfg.steps`, else the objective's default."""
    chosen = steps if steps is not None else objective.cfg.steps
    if chosen is None:
        chosen = default
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 1:
        raise ValueError(f"objective '{objective.name}': sampling steps must be an int >= 1, got {chosen!r}")
    return chosen


def check_actions(objective: ActionObjective, batch: dict) -> Tensor:
    """The batch's normalised actions as float32 [B, H, A], checked against the spec."""
    actions = batch["actions"]
    expected = (objective.spec.horizon, objective.spec.action_dim)
    if actions.dim() != 3 or tuple(actions.shape[1:]) != expected:
        raise ValueError(
            f"objective '{objective.name}': batch['actions'] must be [B, {expected[0]}, {expected[1]}] "
            f"(H, A from the ActionSpec), got {list(actions.shape)}"
        )
    return actions.float()


class SlotForward:
    """Runs the backbone with given rows in the action slots and returns the slot states [B, H*A, D], read at
    p - 1 for slot p (Dream's shift). Built once per loss or sampler call; image features are computed once.

    With `use_cache` under an attention mode in CACHED_MODES, the prompt (every token before the first action
    slot) is encoded once into a KV cache and each call runs only the suffix (action slots, the trailing
    tokens) against it. Rows with prompts of different lengths are re-laid out for this: prompts left-padded
    to the longest, suffixes right-padded, with the original positions and masks carried along, so every valid
    query sees the same keys at the same positions as in the full sequence. Under `full` attention (or without
    the cache) every call runs the whole sequence.
    """

    def __init__(self, objective: ActionObjective, backbone, batch: dict, *, use_cache: bool = False) -> None:
        self.objective = objective
        self.backbone = backbone
        self.mode = objective.attention or backbone.config.attention
        self.positions = objective.slot_positions(batch)  # [B, H*A]
        self.embeds = objective.embed_inputs(backbone, batch)  # [B, L, D]
        self.attention_mask = batch["attention_mask"]
        self.prefix_mask = batch["prefix_mask"]
        self.cached = use_cache and self.mode in CACHED_MODES
        if self.cached:
            self._encode_prompt()

    def __call__(self, rows: Tensor | None = None) -> Tensor:
        """rows [B, H*A, D] written into the action slots (None: keep the placeholder embeddings)."""
        if self.cached:
            return self._suffix_states(rows)
        embeds = self.embeds if rows is None else scatter_rows(self.embeds, self.positions, rows)
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=self.attention_mask,
            attention_mode=self.mode,
            prefix_mask=self.prefix_mask,
            return_logits=False,
        )
        return self.objective.gather_shifted(out.last_hidden_state, self.positions)

    # ------------------------------------------------------------------------------ prompt cache
    def _encode_prompt(self) -> None:
        valid = self.attention_mask.bool()
        batch, length = valid.shape
        device = valid.device
        columns = torch.arange(length, device=device)[None, :]  # [1, L]
        first = self.positions[:, 0]  # [B]: prompt length of each row
        lengths = valid.sum(dim=1)  # [B]
        if not bool((valid == (columns < lengths[:, None])).all()):
            raise ValueError("dvlx/objectives/heads.py: the prompt cache needs right padding "
                             "(attention_mask 1 on a leading run of tokens, then 0)")
        if not bool((self.prefix_mask.bool() == (columns < first[:, None])).all()):
            raise ValueError("dvlx/objectives/heads.py: the prompt cache needs prefix_mask True exactly on "
                             "the tokens before the first action slot")
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, L]: the backbone's 1-D positions
        n_prompt = int(first.max())
        n_suffix = int((lengths - first).max())
        # Prompt column j takes source j - (n_prompt - first): left padding up to the longest prompt.
        prompt_cols = torch.arange(n_prompt, device=device)[None, :]  # [1, prompt]
        prompt_src = prompt_cols - (n_prompt - first)[:, None]  # [B, prompt]
        prompt_valid = prompt_src >= 0
        prompt_src = prompt_src.clamp(min=0)
        # Suffix columns j take source first + j; columns past the row's last valid token are padding.
        suffix_cols = torch.arange(n_suffix, device=device)[None, :]  # [1, suffix]
        suffix_src = first[:, None] + suffix_cols  # [B, suffix]
        suffix_valid = suffix_cols < (lengths - first)[:, None]
        suffix_src = suffix_src.clamp(max=length - 1)

        prompt = self.backbone(
            inputs_embeds=_gather_rows(self.embeds, prompt_src),
            attention_mask=prompt_valid.long(),
            position_ids=positions.gather(1, prompt_src),
            attention_mode=self.mode,
            prefix_mask=torch.ones_like(prompt_valid),
            use_cache=True,
            return_logits=False,
        )
        self.cache = prompt.past_key_values
        self.last_prompt_state = prompt.last_hidden_state[:, -1:]  # [B, 1, D]: read for the first slot
        self.suffix_embeds = _gather_rows(self.embeds, suffix_src)  # [B, suffix, D]
        self.suffix_positions = positions.gather(1, suffix_src)  # [B, suffix]
        self.suffix_slots = self.positions - first[:, None]  # [B, H*A]: slot columns in the suffix
        self.full_mask = torch.cat([prompt_valid, suffix_valid], dim=1).long()  # [B, prompt + suffix]
        self.full_prefix = torch.cat([torch.ones_like(prompt_valid), torch.zeros_like(suffix_valid)], dim=1)

    def _suffix_states(self, rows: Tensor | None) -> Tensor:
        embeds = self.suffix_embeds
        if rows is not None:
            embeds = scatter_rows(embeds, self.suffix_slots, rows)
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=self.full_mask,
            position_ids=self.suffix_positions,
            attention_mode=self.mode,
            prefix_mask=self.full_prefix,
            past_key_values=self.cache,
            use_cache=False,
            return_logits=False,
        )
        # Column c of [last prompt state, suffix states] is the state at suffix column c - 1, so slot column s
        # is read at index s: Dream's shift, with the first slot reading the prompt's last token.
        states = torch.cat([self.last_prompt_state, out.last_hidden_state], dim=1)  # [B, 1 + suffix, D]
        return _gather_rows(states, self.suffix_slots)  # [B, H*A, D]


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, D] at index [B, rows] -> [B, rows, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [B, rows, D]


__all__ = [
    "ActionChunkHead",
    "MLPResNet",
    "NoisyActionProjector",
    "SlotForward",
    "TimestepEmbedding",
    "check_actions",
    "initial_noise",
    "masked_mean",
    "resolve_steps",
    "sinusoidal_embedding",
]
