"""Action tokens: uniform bins over the normalised action range, written as `<|action_k|>` tokens.

Convention (compatible with the official Dream-VLA tokenizer, reference section 3): with n bins,
`edges = linspace(-1, 1, n)` and `centres` the n - 1 midpoints of neighbouring edges. A value x is clipped to
[-1, 1] and gets `d = digitize(x, edges)` in 1..n (edges[d - 1] <= x < edges[d]; d = n only for x = 1).
The token is `<|action_k|>` with k = n - d, so the order is reversed: `<|action_0|>` is the top bin. A token
decodes to `centres[clip(d - 1, 0, n - 2)]`, which is within half a bin width (1 / (n - 1)) of every value
that encodes to it.

In the official tokenizer the n tokens follow `<|mask|>` with increasing k, so the id is len(tokenizer) - d.
Nothing here relies on that: ids are looked up by token string.

Two index spaces appear: the token index k (the column of `token_ids`, used by restricted softmaxes) and the
bin index b = d - 1 (0 = lowest values, n - 1 = exactly 1.0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dvlx.processing.tokenizer import Tokenizer

_FILE = "dvlx/processing/action_tokens.py"


def action_token(k: int) -> str:
    """The token string of action index k."""
    return f"<|action_{k}|>"


class ActionTokenizer:
    """Maps normalised action values to and from the ids of `<|action_k|>` tokens of `tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, num_bins: int = 256) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"{_FILE}: ActionTokenizer num_bins must be an int >= 2, got {num_bins!r}")
        self.tokenizer = tokenizer
        self.num_bins = num_bins
        self.tokens = [action_token(k) for k in range(num_bins)]
        # numpy's float64 linspace (torch's rounds some points differently): the reference's exact edges.
        self.edges = torch.from_numpy(np.linspace(-1.0, 1.0, num_bins))
        self.centres = (self.edges[:-1] + self.edges[1:]) / 2
        self._token_ids: Tensor | None = None
        self._lookup: Tensor | None = None

    @property
    def bin_width(self) -> float:
        return 2.0 / (self.num_bins - 1)

    # ------------------------------------------------------------------------------------- vocabulary
    def _present(self) -> list[bool]:
        backend = self.tokenizer.hf.backend_tokenizer
        return [backend.token_to_id(token) is not None for token in self.tokens]

    def ensure_tokens(self) -> int:
        """Add the n action tokens (special, in order k = 0..n-1) when the tokenizer has none of them.

        Returns how many were added: n or 0. A tokenizer holding only some of them is an error, because
        appending the rest would not give the official layout.
        """
        present = self._present()
        if all(present):
            return 0
        if any(present):
            missing = [t for t, p in zip(self.tokens, present, strict=True) if not p]
            raise ValueError(
                f"{_FILE}: the tokenizer from {self.tokenizer.source} holds {sum(present)} of the "
                f"{self.num_bins} action tokens; missing e.g. {missing[:3]}. Expected all or none."
            )
        added = self.tokenizer.add_tokens(self.tokens, special=True)
        self._token_ids = None
        self._lookup = None
        return added

    @property
    def token_ids(self) -> Tensor:
        """Long[bins]: the id of `<|action_k|>` for k = 0..n-1 (CPU)."""
        if self._token_ids is None:
            backend = self.tokenizer.hf.backend_tokenizer
            ids = [backend.token_to_id(token) for token in self.tokens]
            if any(i is None for i in ids):
                raise ValueError(
                    f"{_FILE}: the tokenizer from {self.tokenizer.source} lacks the action tokens "
                    f"<|action_0|>..<|action_{self.num_bins - 1}|>; call ActionTokenizer(tokenizer)."
                    "ensure_tokens() and resize the backbone's embeddings to len(tokenizer)"
                )
            self._token_ids = torch.tensor(ids, dtype=torch.long)
        return self._token_ids

    def _index_lookup(self) -> Tensor:
        """Long[max id + 1]: token index k at each action id, -1 elsewhere (CPU)."""
        if self._lookup is None:
            ids = self.token_ids
            lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
            lookup[ids] = torch.arange(self.num_bins)
            self._lookup = lookup
        return self._lookup

    def is_action(self, ids: Tensor) -> Tensor:
        """Bool of the shape of `ids`: which ids are action tokens."""
        lookup = self._index_lookup().to(ids.device)
        inside = (ids >= 0) & (ids < lookup.shape[0])
        return inside & (lookup[ids.clamp(0, lookup.shape[0] - 1)] >= 0)

    # ------------------------------------------------------------------------------ index <-> values
    def index_of(self, values: Tensor) -> Tensor:
        """Token index k (Long, shape of `values`) of normalised values; values are clipped to [-1, 1]."""
        if not values.is_floating_point():
            raise ValueError(f"{_FILE}: ActionTokenizer values must be floating point, got {values.dtype}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{_FILE}: ActionTokenizer values must be finite")
        edges = self.edges.to(values.device)
        # right=True: edges[d - 1] <= x < edges[d], numpy's digitize.
        d = torch.bucketize(values.double().clamp(-1.0, 1.0), edges, right=True)
        return self.num_bins - d

    def values_of(self, index: Tensor) -> Tensor:
        """Float32 bin centres of token indices k (the inverse of `index_of` up to half a bin width)."""
        if bool(((index < 0) | (index >= self.num_bins)).any()):
            bad = index[(index < 0) | (index >= self.num_bins)].unique()[:8].tolist()
            raise ValueError(f"{_FILE}: token indices must be in [0, {self.num_bins}), got {bad}")
        b = (self.num_bins - 1 - index).clamp(max=self.num_bins - 2)
        return self.centres.to(index.device)[b].float()

    # -------------------------------------------------------------------------------- ids <-> values
    def encode(self, values: Tensor) -> Tensor:
        """Ids (Long, shape of `values`, e.g. [..., A]) of the action tokens of normalised values."""
        return self.token_ids.to(values.device)[self.index_of(values)]

    def token_index(self, ids: Tensor) -> Tensor:
        """Token index k of action ids; any id that is not an action token raises ValueError."""
        is_action = self.is_action(ids)
        if not bool(is_action.all()):
            bad = ids[~is_action].unique()[:8].tolist()
            raise ValueError(f"{_FILE}: ids {bad} are not action tokens <|action_k|>")
        return self._index_lookup().to(ids.device)[ids]

    def bin_index(self, ids: Tensor) -> Tensor:
        """Ascending bin index b = d - 1 in [0, n) of action ids (0 = lowest values); others raise."""
        return self.num_bins - 1 - self.token_index(ids)

    def decode(self, ids: Tensor) -> Tensor:
        """Float32 normalised values of action ids; any id that is not an action token raises ValueError
        (decoding is restricted to the action vocabulary, never clipped into an extreme bin)."""
        return self.values_of(self.token_index(ids))


__all__ = ["ActionTokenizer", "action_token"]
