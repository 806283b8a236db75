"""Masked diffusion: corruption, shifted loss positions, CART weights and the loss."""

from dvlx.diffusion.generate import DEFAULT_STOP_STRINGS, decode_generated, generate
from dvlx.diffusion.masked_diffusion import (
    Corruption,
    DiffusionLoss,
    MaskedDiffusion,
    cart_weights,
    shifted_loss_positions,
)
from dvlx.diffusion.sampling import ALGORITHMS, SCHEDULES, schedule_counts

__all__ = ["Corruption", "DiffusionLoss", "MaskedDiffusion", "cart_weights", "shifted_loss_positions"]
__all__ += ["ALGORITHMS", "DEFAULT_STOP_STRINGS", "SCHEDULES", "schedule_counts"]
__all__ += ["decode_generated", "generate"]
