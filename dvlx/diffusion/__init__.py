"""Masked diffusion: corruption, shifted loss positions, CART weights and the loss."""

from dvlx.diffusion.masked_diffusion import (
    Corruption,
    DiffusionLoss,
    MaskedDiffusion,
    cart_weights,
    shifted_loss_positions,
)

__all__ = ["Corruption", "DiffusionLoss", "MaskedDiffusion", "cart_weights", "shifted_loss_positions"]
