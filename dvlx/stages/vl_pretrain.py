"""Stage 1 of Dream-VL: align the projector with the LM on image-caption pairs (`plain` template)."""

from __future__ import annotations

from dvlx.stages.base import DiffusionStage


class VLPretrain(DiffusionStage):
    """By default only the projector trains; the vision tower and the LM are frozen, and the frozen tower
    runs without autograd. `stage.trainable` widens this (the tiny demo has no pretrained LM to align to)."""

    default_trainable = ("projector",)
