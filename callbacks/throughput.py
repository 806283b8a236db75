"""Samples/s, tokens/s and MFU through Lightning's ThroughputMonitor.

Tokens are the attended positions of a batch (images spliced in). The monitor reads the stage's
`flops_per_batch`; `BatchFlops` sets it before every update from the batch's shapes, so MFU is logged on
devices whose peak FLOP/s Lightning knows (`train/device/mfu`; none on CPU).

FLOPs per batch: 2 per multiply-add of every matmul (linear layers, the patch embedding, the attention
scores and weighted sums), each counted once for the forward, once more for the weight gradient when the
weight trains and once more for the input gradient when the input carries one (LM layers always do: something
below them trains in every stage; vision blocks only when the tower trains). The vocabulary projection is
left out: the losses compute it only at supervised positions.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn


def _batch_size(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def _matmul_params(module: nn.Module) -> tuple[int, int]:
    """(trained, frozen) multiply-adds per row of the linear layers under `module`, LoRA adapters included."""
    trained = frozen = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            n = sub.in_features * sub.out_features
            if sub.weight.requires_grad:
                trained += n
            else:
                frozen += n
    return trained, frozen


def _cost(params: tuple[int, int], rows: float, grad_in: bool) -> float:
    """2 x rows x weights, times 1 (forward) + 1 (weight gradient, trained only) + 1 (input gradient)."""
    trained, frozen = params
    return 2 * rows * ((2 + grad_in) * trained + (1 + grad_in) * frozen)


class BatchFlops:
    """Training FLOPs of one batch for a DreamVL backbone (see the module docstring)."""

    def __init__(self, backbone: nn.Module) -> None:
        config = backbone.config
        visual = backbone.visual
        self.width = config.hidden_size
        self.layers = config.num_hidden_layers
        self.vision_width = config.vision_config.embed_dim
        self.vision_depth = config.vision_config.depth
        self.merge = config.vision_config.spatial_merge_size**2
        self.lm = _matmul_params(backbone.model)
        self.vision = _matmul_params(visual.blocks)
        self.merger = _matmul_params(visual.merger)
        self.projector = _matmul_params(backbone.projector)
        patch = visual.patch_embed.proj.weight
        self.patch = (patch.numel(), 0) if patch.requires_grad else (0, patch.numel())
        self.vision_trains = any(p.requires_grad for p in visual.parameters())

    def __call__(self, batch: dict) -> float:
        lengths = batch["attention_mask"].sum(dim=-1).double()  # [B]
        flops = _cost(self.lm, float(lengths.sum()), grad_in=True)
        # Scores and weighted values: two L x L x D matmuls per layer and sequence, 2 FLOPs per multiply-add.
        flops += 3 * 4 * self.width * self.layers * float((lengths**2).sum())
        grid = batch.get("image_grid_thw")
        if grid is None or not len(grid):
            return flops
        patches = grid.prod(dim=-1).double()  # [n_images]
        rows = float(patches.sum())
        trains = self.vision_trains
        flops += _cost(self.patch, rows, grad_in=False)
        flops += _cost(self.vision, rows, grad_in=trains)
        flops += (1 + 2 * trains) * 4 * self.vision_width * self.vision_depth * float((patches**2).sum())
        flops += _cost(self.merger, rows / self.merge, grad_in=trains)
        flops += _cost(self.projector, rows / self.merge, grad_in=trains)
        return flops


class DvlxThroughputMonitor(ThroughputMonitor):
    """Lightning's monitor, with the stage's `flops_per_batch` set from each batch's shapes."""

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size)
        self._flops: BatchFlops | None = None

    @torch.inference_mode()
    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is not None and isinstance(batch, dict) and "attention_mask" in batch:
            if self._flops is None:
                self._flops = BatchFlops(backbone)
            pl_module.flops_per_batch = self._flops(batch)
        super()._update(trainer, pl_module, batch, iter_num)


def throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    return DvlxThroughputMonitor(window_size=window_size)
