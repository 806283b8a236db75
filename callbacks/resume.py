"""Training randomness that depends only on where a batch is in the run, and the RNG states in checkpoints."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback


def step_seeds(seed: int, rank: int, epoch: int, batch_idx: int) -> tuple[int, int]:
    """(64-bit seed for torch and random, 32-bit seed for numpy) of one training batch."""
    words = np.random.SeedSequence([seed, rank, epoch, batch_idx]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1]), int(words[0])


class StepSeed(Callback):
    """Seeds torch (CPU and CUDA), numpy and `random` before every training batch from (seed, rank, epoch,
    batch index in the epoch).

    The masks, noise and dropout of a training step then depend on nothing that ran before it (validation
    sampling, a dataloader starting its workers, a restart from a checkpoint), which is what makes a resumed
    run repeat the uninterrupted one exactly. The global RNG states are also saved in checkpoints and restored
    (`state_dict`), for code that draws between steps.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        wide, narrow = step_seeds(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx)
        torch.manual_seed(wide)
        np.random.seed(narrow)
        random.seed(wide)

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            # Plain ints and tensors only: Lightning loads checkpoints with torch.load(weights_only=True).
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class SpecOnResume(Callback):
    """On resume, refuses a checkpoint whose action spec (dims, cameras, normalisation statistics) differs
    from the one built from the data now: the model learned in the checkpoint's normalised units."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from dvlx.config import ConfigError
        from dvlx.policy import spec_differences
        from dvlx.processing.robot import ActionSpec

        saved, spec = checkpoint.get("action_spec"), getattr(pl_module, "spec", None)
        if saved is None or spec is None:
            return
        differences = spec_differences(ActionSpec.from_dict(saved), spec)
        if differences:
            raise ConfigError(
                f"{trainer.ckpt_path}: the data's action spec differs from the checkpoint's (the datasets or "
                f"their statistics changed since): {'; '.join(differences)}"
            )
