"""Writes `export/` when training ends: everything inference needs, in the official layout."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback

from dvlx.backbone.lora import merge_lora
from dvlx.export import write_export


class ExportOnTrainEnd(Callback):
    """At the end of training (rank 0): LoRA adapters are merged into the weights in place (training is over)
    and the export is written; a VLA export also carries the objective's heads and the action spec."""

    def __init__(self, folder: Path, tokenizer, image_processor, config_yaml: str) -> None:
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config_yaml = config_yaml

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        merge_lora(pl_module.backbone)
        write_export(
            self.folder,
            pl_module.backbone,
            self.tokenizer,
            self.image_processor,
            stage=type(pl_module).__name__,
            step=trainer.global_step,
            config_yaml=self.config_yaml,
            objective=getattr(pl_module, "objective", None),
            spec=getattr(pl_module, "spec", None),
        )
