"""Writes `export/` when training ends: everything inference needs, in the official layout."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback

from dvlx.export import write_export


class ExportOnTrainEnd(Callback):
    def __init__(self, folder: Path, tokenizer, image_processor, config_yaml: str) -> None:
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config_yaml = config_yaml

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_export(
                self.folder, pl_module.backbone, self.tokenizer, self.image_processor,
                stage=type(pl_module).__name__, step=trainer.global_step, config_yaml=self.config_yaml,
            )
