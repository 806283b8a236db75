"""Masked diffusion: corruption, shifted loss positions, CART weights and the loss."""

from dvlx.diffusion.ddim import DDIMSchedule
from dvlx.diffusion.flow import euler_integrate, interpolate, sample_times, velocity_target
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
__all__ += ["DDIMSchedule", "euler_integrate", "interpolate", "sample_times", "velocity_target"]
