"""A self-contained inference folder: weights in the official layout, tokenizer, processor settings, metadata.

Layout: `config.json` + safetensors (what `DreamVL.from_pretrained` reads), the tokenizer files,
`preprocessor_config.json`, `dvlx.json` (stage, step, dvlx version; written last, so its presence marks a
complete export) and `experiment.yaml` (the resolved training config). The folder is assembled under a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dvlx

EXPORT_MARKER = "dvlx.json"


def write_export(folder: str | Path, backbone, tokenizer, image_processor, *, stage: str, step: int,
                 config_yaml: str = "", extra: dict | None = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    if config_yaml:
        (tmp / "experiment.yaml").write_text(config_yaml)
    meta = {"dvlx_version": dvlx.__version__, "stage": stage, "step": step, **(extra or {})}
    (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder
