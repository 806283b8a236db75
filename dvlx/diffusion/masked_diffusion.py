"""Masked diffusion objective of Dream-VL: corruption, shifted loss positions, CART weights, chunked loss.

Convention: Dream keeps the alignment of its autoregressive initialisation, so the output at position i
predicts the token at position i + 1. A token masked at position j is supervised from the hidden state at
j - 1, and a token masked at position 0 is never supervised. Loss positions live in this "shifted index
space": S = {i : masked[i + 1]}. CART context and distances are measured in the same space.

Time runs from clean to noise: t = 0 is the data, t = 1 masks every maskable token. The masking rate of a
sequence is p = (1 - eps) t + eps. The network is never given t.

Deviations from the reference implementation (Dream-VL `LlavaDream.forward`):
- CART weights are computed exactly in O(L) (`cart_weights`) instead of slicing a 50k x 50k table.
- Attention-masked padding is not counted as CART context (the reference counts it).
- A micro-batch with no masked token gives a loss of 0 that is still part of the graph, not 0/0 = NaN.
- Vocabulary logits are computed only at loss positions, in chunks that are recomputed in backward, never
  as a full [B, L, V] tensor.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_FILE = "dvlx/diffusion/masked_diffusion.py"
WEIGHTINGS = ("cart", "none")

# The rescaled cumulative sum inside a chunk multiplies terms by up to q^-(chunk - 1); this bound keeps
# those factors and their inverses far from float32 overflow and underflow.
_MAX_RESCALE = 2.0**24
# A cap on the chunk length bounds the float32 rounding of a sequential cumulative sum (~chunk * 6e-8).
_MAX_CHUNK = 64


def _chunk_length(q: float) -> int:
    """Longest chunk whose rescaling factor q^-(chunk - 1) stays below `_MAX_RESCALE`."""
    if q <= 0.0:
        return 1
    if q >= 1.0:
        return _MAX_CHUNK
    return max(1, min(_MAX_CHUNK, 1 + int(math.log(_MAX_RESCALE) / -math.log(q))))


def _left_geometric_sums(c: Tensor, q: float) -> Tensor:
    """A_i = sum_{k < i} c_k q^(i - 1 - k) for every row of c (float32, shape (B, L)), in O(L).

    Within a chunk the sum is a cumulative sum of c_k q^-k rescaled by q^(i - 1); all terms are
    non-negative, so the rescaling costs no precision. Chunk totals are carried across chunks with a
    log-depth (Hillis-Steele) scan whose decay per chunk is q^chunk.
    """
    batch, length = c.shape
    chunk = min(_chunk_length(q), length)
    n_chunks = -(-length // chunk)
    x = F.pad(c, (0, n_chunks * chunk - length)).view(batch, n_chunks, chunk)  # (B, n_chunks, chunk)
    steps = torch.arange(chunk, device=c.device, dtype=torch.float64)
    q64 = torch.full((), q, dtype=torch.float64, device=c.device)
    down = q64.pow(-steps).float() if q > 0.0 else (steps == 0).float()  # q^-j, j < chunk
    up = q64.pow(steps).float()  # q^j, j < chunk (0^0 = 1)

    prefix = torch.cumsum(x * down, dim=-1)  # (B, n_chunks, chunk): sum_{m <= j} x_m q^-m
    # Position j sees the chunk's prefix up to j - 1, brought back by q^(j - 1).
    local = F.pad(prefix[..., :-1] * up[:-1], (1, 0))  # (B, n_chunks, chunk)

    # carry[c] = A at the first position of chunk c; carry[c + 1] = q^chunk carry[c] + total[c].
    total = prefix[..., -1] * up[-1]  # (B, n_chunks): sum_m x_m q^(chunk - 1 - m)
    scan = total
    shift = 1
    while shift < n_chunks:
        decay = float(q) ** (chunk * shift)
        scan = torch.cat([scan[:, :shift], scan[:, shift:] + decay * scan[:, :-shift]], dim=1)
        shift *= 2
    carry = F.pad(scan[:, :-1], (1, 0))  # (B, n_chunks)
    out = local + carry.unsqueeze(-1) * up  # (B, n_chunks, chunk)
    return out.view(batch, n_chunks * chunk)[:, :length]  # (B, L)


def cart_weights(context: Tensor, p: float = 0.1) -> Tensor:
    """CART weights w_i = sum_{k != i, context_k} 0.5 p (1 - p)^(|i - k| - 1), exactly, in O(L).

    `context` is Bool[B, L]; the result is float32 [B, L] (computed in float32 under autocast too), with a
    weight at every position, context or not. Nothing of size L x L is built.
    """
    if context.dtype != torch.bool or context.dim() != 2:
        raise ValueError(
            f"{_FILE}: cart_weights `context` must be a bool tensor of shape [B, L], "
            f"got {context.dtype} of shape {tuple(context.shape)}"
        )
    if not 0.0 < p <= 1.0:
        raise ValueError(f"{_FILE}: cart_weights `p` must be in (0, 1], got {p}")
    if context.shape[1] == 0:
        return torch.zeros(context.shape, dtype=torch.float32, device=context.device)
    q = 1.0 - p
    with torch.autocast(device_type=context.device.type, enabled=False):
        c = context.float()
        # Right sums are left sums of the reversed rows; one pass over (2 B, L) computes both.
        both = _left_geometric_sums(torch.cat([c, c.flip(-1)]), q)  # (2 B, L)
        left, right = both.chunk(2)
        return (0.5 * p) * (left + right.flip(-1))


def shifted_loss_positions(masked: Tensor) -> Tensor:
    """Loss positions S[:, i] = masked[:, i + 1] (Bool[B, L]); the last column is False."""
    if masked.dtype != torch.bool or masked.dim() != 2:
        raise ValueError(
            f"{_FILE}: shifted_loss_positions `masked` must be a bool tensor of shape [B, L], "
            f"got {masked.dtype} of shape {tuple(masked.shape)}"
        )
    return F.pad(masked[:, 1:], (0, 1), value=False)


def chunked_cross_entropy(
    rows: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    weights: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Weighted float32 cross-entropy summed over rows, computing logits for `chunk_size` rows at a time.

    rows: (rows, D) hidden states; targets: Long[rows]; weights: Float[rows] or None (weight 1). Returns
    (sum of weight * CE, number of rows whose argmax equals the target). With gradients enabled each chunk
    is recomputed in backward, so at most one chunk of logits is alive at any time. Zero rows still run
    `lm_head` once, so the result stays connected to the graph.
    """

    def chunk_loss(r: Tensor, y: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = lm_head(r).float()  # (rows, V)
        ce = F.cross_entropy(logits, y, reduction="none")
        if w is not None:
            ce = ce * w
        return ce.sum(), (logits.argmax(dim=-1) == y).sum()

    n_rows = rows.shape[0]
    total = rows.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=rows.device)
    for start in range(0, max(n_rows, 1), chunk_size):
        part = slice(start, start + chunk_size)
        w = None if weights is None else weights[part]
        if torch.is_grad_enabled():
            s, k = checkpoint(chunk_loss, rows[part], targets[part], w, use_reentrant=False)
        else:
            s, k = chunk_loss(rows[part], targets[part], w)
        total = total + s
        correct = correct + k
    return total, correct


@dataclass(frozen=True)
class Corruption:
    """Result of `MaskedDiffusion.corrupt`: noisy ids, where masked, and each sequence's t and rate p."""

    noisy_ids: Tensor  # Long[B, L]
    masked: Tensor  # Bool[B, L], never True where not maskable
    t: Tensor  # Float[B]
    p: Tensor  # Float[B], masking probability (1 - eps) t + eps


@dataclass(frozen=True)
class DiffusionLoss:
    """Result of `MaskedDiffusion.loss`."""

    loss: Tensor  # scalar, float32
    n_supervised: Tensor  # Long scalar: number of loss positions in the micro-batch
    correct: Tensor  # Long scalar: loss positions whose argmax equals the target (no grad)

    @property
    def accuracy(self) -> Tensor:
        """Fraction of supervised tokens predicted correctly (0 when none is supervised)."""
        return self.correct.float() / self.n_supervised.clamp(min=1).float()


@dataclass(frozen=True)
class MaskedDiffusion:
    """Masked diffusion objective (see the module docstring for the conventions).

    mask_token_id: id that replaces masked tokens. eps: smallest masking rate. weighting: "cart" (CART
    context-adaptive weights) or "none" (weight 1). cart_p: CART geometric parameter. ce_chunk_size: most
    loss positions whose vocabulary logits exist at once.
    """

    mask_token_id: int
    eps: float = 1e-3
    weighting: str = "cart"
    cart_p: float = 0.1
    ce_chunk_size: int = 8192

    def __post_init__(self) -> None:
        name = "MaskedDiffusion"
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int):
            raise ValueError(f"{_FILE}: {name}.mask_token_id must be an int, got {self.mask_token_id!r}")
        if self.mask_token_id < 0:
            raise ValueError(f"{_FILE}: {name}.mask_token_id must be >= 0, got {self.mask_token_id}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"{_FILE}: {name}.eps must be in [0, 1), got {self.eps}")
        if self.weighting not in WEIGHTINGS:
            close = difflib.get_close_matches(str(self.weighting), WEIGHTINGS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{_FILE}: {name}.weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}.{hint}"
            )
        if not 0.0 < self.cart_p <= 1.0:
            raise ValueError(f"{_FILE}: {name}.cart_p must be in (0, 1], got {self.cart_p}")
        if isinstance(self.ce_chunk_size, bool) or not isinstance(self.ce_chunk_size, int):
            raise ValueError(f"{_FILE}: {name}.ce_chunk_size must be an int, got {self.ce_chunk_size!r}")
        if self.ce_chunk_size < 1:
            raise ValueError(f"{_FILE}: {name}.ce_chunk_size must be >= 1, got {self.ce_chunk_size}")

    def corrupt(
        self,
        input_ids: Tensor,
        maskable: Tensor,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Corruption:
        """Mask each maskable token independently with probability p = (1 - eps) t + eps, t ~ U(0, 1) per row.

        Random numbers are drawn on the generator's device (the input's device when no generator is given)
        and then moved to the input's device, so a CPU generator also reproduces CUDA runs.
        """
        _check_2d("corrupt", "input_ids", input_ids, None)
        _check_2d("corrupt", "maskable", maskable, input_ids.shape, dtype=torch.bool)
        batch = input_ids.shape[0]
        device = input_ids.device
        draw_device = generator.device if generator is not None else device
        if t is None:
            t = torch.rand(batch, generator=generator, device=draw_device).to(device)
        else:
            if t.shape != (batch,) or not t.is_floating_point():
                raise ValueError(
                    f"{_FILE}: MaskedDiffusion.corrupt `t` must be a float tensor of shape [{batch}], "
                    f"got {t.dtype} of shape {tuple(t.shape)}"
                )
            if bool(((t < 0) | (t > 1)).any()):
                raise ValueError(f"{_FILE}: MaskedDiffusion.corrupt `t` must lie in [0, 1]")
            t = t.to(device=device, dtype=torch.float32)
        p = (1.0 - self.eps) * t + self.eps
        u = torch.rand(input_ids.shape, generator=generator, device=draw_device).to(device)  # (B, L)
        masked = (u < p.unsqueeze(1)) & maskable
        noisy_ids = input_ids.masked_fill(masked, self.mask_token_id)
        return Corruption(noisy_ids=noisy_ids, masked=masked, t=t, p=p)

    def position_weights(self, loss_positions: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        """Per-position loss weights Float[B, L] in shifted index space, or None for weight 1.

        CART context is every attended position that is not a loss position.
        """
        if self.weighting == "none":
            return None
        context = ~loss_positions
        if attention_mask is not None:
            context = context & (attention_mask == 1)
        return cart_weights(context, self.cart_p)

    def loss(
        self,
        hidden: Tensor,
        lm_head: Callable[[Tensor], Tensor],
        targets: Tensor,
        masked: Tensor,
        attention_mask: Tensor | None = None,
    ) -> DiffusionLoss:
        """Weighted cross-entropy at the loss positions, divided by the number of supervised tokens.

        hidden: Float[B, L, D] final hidden states; lm_head maps (rows, D) to (rows, V) and is applied only
        to loss positions; targets: Long[B, L] clean token ids (loss position i is scored on targets[:, i+1]);
        masked: Bool[B, L] from `corrupt`; attention_mask: [B, L] with 1 for attended positions.
        """
        if hidden.dim() != 3:
            raise ValueError(
                f"{_FILE}: MaskedDiffusion.loss `hidden` must have shape [B, L, D], got {tuple(hidden.shape)}"
            )
        shape = hidden.shape[:2]
        _check_2d("loss", "targets", targets, shape)
        _check_2d("loss", "masked", masked, shape, dtype=torch.bool)
        if attention_mask is not None:
            _check_2d("loss", "attention_mask", attention_mask, shape)

        loss_positions = shifted_loss_positions(masked)
        weights = self.position_weights(loss_positions, attention_mask)
        shifted_targets = F.pad(targets[:, 1:], (0, 1))  # (B, L); the last column is never a loss position
        rows = hidden[loss_positions]  # (rows, D)
        total, correct = chunked_cross_entropy(
            rows,
            lm_head,
            shifted_targets[loss_positions],
            None if weights is None else weights[loss_positions],
            self.ce_chunk_size,
        )
        n_supervised = loss_positions.sum()
        loss = total / n_supervised.clamp(min=1).float()
        return DiffusionLoss(loss=loss, n_supervised=n_supervised, correct=correct.detach())


def _check_2d(
    method: str, key: str, value: Tensor, shape: torch.Size | None, dtype: torch.dtype | None = None
) -> None:
    """Raise a ValueError naming `key` unless `value` is a [B, L] tensor of the expected shape and dtype."""
    where = f"{_FILE}: MaskedDiffusion.{method} `{key}`"
    if not isinstance(value, Tensor) or value.dim() != 2:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{where} must be a tensor of shape [B, L], got {got}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{where} must have shape {list(shape)}, got {list(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{where} must have dtype {dtype}, got {value.dtype}")
