"""A self-contained inference folder: weights in the official layout, tokenizer, processor settings, metadata.

Layout: `config.json` + safetensors (what `DreamVL.from_pretrained` reads), the tokenizer files,
`preprocessor_config.json`, `experiment.yaml` (the resolved training config), and for VLA exports
`action_spec.json` (dims, cameras, normalisation statistics) and `objective.safetensors` (heads and
projectors of the action objective). `dvlx.json` (stage, step, objective settings, dvlx version, and for VLA
the fingerprints of the action spec and of its statistics, `stats_hash`) is written last, so its presence
marks a complete export. The folder is assembled under a temporary name and renamed into place. LoRA
adapters must be merged before (`dvlx.backbone.lora.merge_lora`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

import dvlx

EXPORT_MARKER = "dvlx.json"
ACTION_SPEC_FILE = "action_spec.json"
OBJECTIVE_FILE = "objective.safetensors"


def stats_hash(spec) -> str:
    """Short sha256 of an action spec's normalisation (mode, statistics and mask of actions and proprio)."""
    proprio = spec.proprio_normalizer.to_dict() if spec.proprio_normalizer is not None else None
    text = json.dumps({"action": spec.action_normalizer.to_dict(), "proprio": proprio}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_export(
    folder: str | Path,
    backbone,
    tokenizer,
    image_processor,
    *,
    stage: str,
    step: int,
    config_yaml: str = "",
    objective=None,
    spec=None,
) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    if config_yaml:
        (tmp / "experiment.yaml").write_text(config_yaml)
    meta = {
        "dvlx_version": dvlx.__version__,
        "stage": stage,
        "step": step,
        "attention": backbone.config.attention,
    }
    if spec is not None:
        spec.save(tmp / ACTION_SPEC_FILE)
        meta["action_spec_fingerprint"] = spec.fingerprint()
        meta["stats_hash"] = stats_hash(spec)
    if objective is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
        save_file(tensors, str(tmp / OBJECTIVE_FILE))
        meta["objective"] = asdict(objective.cfg)
    (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder
