"""Checkpoint files that are either complete or absent, the choice of the checkpoint to resume from, and the
free-space check before training."""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("dvlx.checkpoints")

# `.NAME.tmp-PID`: a file being written by process PID (see AtomicCheckpointIO).
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
# A zip archive (what torch.save writes) starts with a local file header.
_ZIP_MAGIC = b"PK\x03\x04"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temporary name, flushes it to disk, then renames it into place.

    A kill during the write leaves the previous file (for example `last.ckpt`) untouched. Remote paths go
    through Lightning's own transactional writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for step-based saving that only saves right after an optimiser step.

    Accumulated gradients are not part of a checkpoint, so one written between the micro-batches of a step
    would resume without them. Lightning's callback can write such a file: it postpones a save due on an
    epoch's last batch to the next batch when it expects validation (off here: `save_on_train_epoch_end`),
    and after a resume it does not know that the current step was saved already (set in `on_train_start`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_on_train_epoch_end", True)
        super().__init__(**kwargs)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        ready = progress.current.ready
        stepped = ready % trainer.accumulate_grad_batches == 0 or progress.is_last_batch
        if stepped or not pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it looks complete.

    A `torch.save` file is a zip archive: it must end with the zip directory (a truncated file does not),
    every member must lie inside the file, and the pickled object table must pass its CRC. A folder
    checkpoint (sharded strategies) must hold non-empty files, each zip archive among them complete. Tensor
    data are not read, so this costs a few reads, whatever the checkpoint's size.
    """
    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        if not files:
            return "empty checkpoint folder"
        for file in files:
            if file.stat().st_size == 0:
                return f"{file.relative_to(path)} is empty"
            with open(file, "rb") as handle:
                archive = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
            problem = checkpoint_problem(file) if archive else None
            if problem is not None:
                return f"{file.relative_to(path)}: {problem}"
        return None
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    if size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if not entries:
                return "empty archive"
            beyond = [e.filename for e in entries if e.header_offset + e.compress_size > size]
            if beyond:
                return f"truncated: member {beyond[0]} extends past the end of the file"
            tables = [e for e in entries if e.filename.endswith("/data.pkl") or e.filename == "data.pkl"]
            if not tables:
                return "no data.pkl: not a torch checkpoint"
            archive.read(tables[0])
    except zipfile.BadZipFile as err:
        return f"truncated or not a torch checkpoint ({err})"
    except (OSError, EOFError, zipfile.LargeZipFile) as err:
        return f"unreadable ({err})"
    return None


def _remove_stale_temporaries(folder: Path) -> None:
    """Deletes `.NAME.tmp-PID` files whose writer process is gone (a kill during a checkpoint write)."""
    for path in folder.iterdir():
        match = _TMP_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            os.kill(int(match["pid"]), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.info("removing %s, left by an interrupted checkpoint write", path)
        path.unlink(missing_ok=True)


def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (`*.ckpt`) in `folder`, and the newer ones rejected with the reason.

    `last.ckpt` is normally the newest; when it is cut short (a full disk, a copy interrupted) the most
    recent step checkpoint takes its place.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None, []
    _remove_stale_temporaries(folder)
    candidates = sorted(
        (p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")),
        key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"),
        reverse=True,
    )
    rejected: list[tuple[Path, str]] = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, rejected
        rejected.append((candidate, problem))
    return None, rejected


def estimate_checkpoint_bytes(module: torch.nn.Module) -> int:
    """Bytes of one checkpoint of `module`: its saved weights plus two fp32 AdamW moments per trainable
    parameter (what `DiffusionStage.on_save_checkpoint` keeps: only the trainable weights when the model is
    rebuilt from a pretrained folder)."""
    trainable_only = bool(getattr(module, "checkpoint_trainable_only", False))
    weights = sum(
        p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only
    )
    moments = sum(2 * 4 * p.numel() for p in module.parameters() if p.requires_grad)
    return weights + moments


def free_space_problem(folder: str | os.PathLike, needed: int) -> str | None:
    """Why `folder` cannot take `needed` more bytes (None when it can)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= needed:
        return None
    return f"{free / 2**30:.2f} GiB free, about {needed / 2**30:.2f} GiB needed"
