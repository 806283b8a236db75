"""Predicted against true action chunks of a few validation samples, as a figure in TensorBoard."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures are only rendered into TensorBoard

import matplotlib.pyplot as plt  # noqa: E402
from lightning import Callback  # noqa: E402


class ActionChunkPlot(Callback):
    """After each validation run, plots `pl_module.last_val_sample` (normalised chunks [B, H, A] kept by the
    VLA stage): one panel per action dimension, true as solid lines and sampled as dashed, for `num_samples`
    samples."""

    def __init__(self, num_samples: int = 3) -> None:
        self.num_samples = num_samples

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        sample = getattr(pl_module, "last_val_sample", None)
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.sanity_checking or not trainer.is_global_zero or sample is None:
            return
        if experiment is None or not hasattr(experiment, "add_figure"):
            return
        predicted, target = sample["predicted"].float().numpy(), sample["target"].float().numpy()
        names = pl_module.spec.action_names
        dims = predicted.shape[-1]
        fig, axes = plt.subplots(1, dims, figsize=(2.2 * dims, 2.2), squeeze=False)
        for d in range(dims):
            ax = axes[0, d]
            for b in range(min(self.num_samples, predicted.shape[0])):
                (line,) = ax.plot(target[b, :, d], linewidth=1.2)
                ax.plot(predicted[b, :, d], linestyle="--", color=line.get_color(), linewidth=1.2)
            ax.set_title(names[d] if d < len(names) else f"dim {d}", fontsize=8)
            ax.set_ylim(-1.1, 1.1)
            ax.tick_params(labelsize=6)
        fig.suptitle("validation chunks: true (solid) vs sampled (dashed), normalised", fontsize=8)
        fig.tight_layout()
        experiment.add_figure("val/action_chunks", fig, global_step=trainer.global_step)
        plt.close(fig)
