"""Stages 2 and 3 of Dream-VL: instruction tuning on `qwen_2_5` conversations (single- and multi-image, video
frames as images). Every token of every assistant turn, plus the fixed `data.num_eos` EOS tokens after the
last turn, is a diffusion target; the system and user turns are clean context."""

from __future__ import annotations

from dvlx.stages.base import DiffusionStage


class VLInstruct(DiffusionStage):
    """Trains the projector, the LM and the vision tower from `stage.vision_from_block` on by default (the
    paper unfreezes blocks 16-31 and the merger at lr 2e-6: `optim.lr_vision`).

    Text-only samples need no dummy image: the backbone skips the tower when a batch has no image. Under
    FSDP/DeepSpeed ZeRO-3 every rank must run the same modules, so mixed text-only/image data there should
    keep at least one image per batch (docs/instruct.md, docs/scaling.md).
    """

    default_trainable = ("projector", "lm", "vision")
