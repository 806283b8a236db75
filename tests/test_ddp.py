"""DDP on CPU: two gloo processes train the tiny VL experiment through dvlx's builders and Lightning.

Checked: the ranks read disjoint samples; gradients are averaged, so both ranks hold identical weights after
every step; the first DDP step equals a single process replaying both ranks' micro-batches (same masks) with
their losses averaged, and that single process's loss over the union batch (the same global batch) matches
the DDP loss within tolerance.

Run as a script (`python tests/test_ddp.py OUT_DIR key=value ...`) this file is the training worker that
Lightning launches once per rank.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "tiny_vl_pretrain.yaml"
STEPS = 3
PER_DEVICE = 4
TENSOR_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw")


def sample_ids(batch: dict) -> list[str]:
    """One fingerprint per sample: its token row and its image's pixel rows."""
    sizes = batch["image_grid_thw"].prod(dim=-1).tolist()
    images = batch["pixel_values"].split(sizes)
    ids = []
    for row, mask, image in zip(batch["input_ids"], batch["attention_mask"], images, strict=True):
        digest = hashlib.sha1(row[mask.bool()].numpy().tobytes())
        digest.update(image.numpy().tobytes())
        ids.append(digest.hexdigest())
    return ids


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def worker(out_dir: Path, overrides: list[str]) -> None:
    """Trains like `dvlx.fit.run` with one extra callback that records what this rank saw and holds."""
    import lightning as L
    from lightning import Callback

    from dvlx import fit
    from dvlx.config import load_config

    class Recorder(Callback):
        def __init__(self) -> None:
            self.samples: list[str] = []
            self.losses: list[float] = []
            self.first: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.samples.extend(sample_ids(batch))
            if batch_idx == 0:
                # The corruption draws from the global generator right after this hook.
                self.first = {
                    "batch": {k: batch[k].clone() for k in TENSOR_KEYS},
                    "rng": torch.get_rng_state(),
                    "init": trainable(pl_module),
                }

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if "grads" not in self.first:  # after DDP's all-reduce of the first backward
                grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
                self.first["grads"] = grads

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            if batch_idx == 0:
                self.first["after_step"] = trainable(pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            record = {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "accumulate": trainer.accumulate_grad_batches,
                "samples": self.samples,
                "losses": self.losses,
                "final": trainable(pl_module),
                **self.first,
            }
            torch.save(record, out_dir / f"rank{trainer.global_rank}.pt")

    torch.set_num_threads(1)
    cfg = load_config(EXPERIMENT, overrides, **fit._registries())
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tokenizer = fit.build_tokenizer(cfg)
    image_processor = fit.build_image_processor(cfg)
    backbone = fit.build_backbone(cfg, tokenizer)
    datamodule = fit.build_datamodule(cfg, tokenizer, image_processor)
    stage = fit.build_stage(cfg, backbone)
    trainer = fit.build_trainer(cfg, tokenizer, image_processor)
    trainer.callbacks.append(Recorder())
    trainer.fit(stage, datamodule=datamodule)


def overrides(tmp: Path) -> list[str]:
    return [
        f"output_dir={tmp / 'runs'}",
        f"data.synthetic_dir={tmp / 'data'}",
        "data.synthetic.num_train=64",
        "data.synthetic.num_val=8",
        f"data.batch_size={PER_DEVICE}",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"trainer.max_steps={STEPS}",
        "trainer.val_every_n_steps=1000",
        "trainer.checkpoint_every_n_steps=1000",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "optim.warmup_ratio=0.0",
        # Clipping would rescale the averaged gradient; the replay below compares the plain update.
        "optim.grad_clip=0.0",
    ]


def run_ddp(tmp: Path) -> list[dict]:
    out = tmp / "records"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, __file__, str(out), *overrides(tmp)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def pad_cat(batches: list[dict], pad_id: int) -> dict:
    """Row-concatenate collated batches, right-padding to the longest (the collate function's rule)."""
    from dvlx.processing import IGNORE_INDEX

    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key, value in fill.items():
        rows = [torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=value) for b in batches]
        out[key] = torch.cat(rows)
    out["pixel_values"] = torch.cat([b["pixel_values"] for b in batches])
    out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in batches])
    return out


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    import lightning as L

    from dvlx import fit
    from dvlx.config import load_config
    from dvlx.processing import IGNORE_INDEX

    records = run_ddp(tmp_path)
    r0, r1 = records
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["accumulate"]) == (0, 1, 2, 1)

    # Each rank reads its own samples: disjoint, PER_DEVICE new ones per step.
    assert len(r0["samples"]) == len(r1["samples"]) == STEPS * PER_DEVICE
    assert len(set(r0["samples"])) == len(r0["samples"])
    assert not set(r0["samples"]) & set(r1["samples"])

    # Gradients are synchronised: identical weights on both ranks after the first step and at the end.
    for key in ("init", "grads", "after_step", "final"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][n], r1[key][n]) for n in r0[key]), key
    assert any(not torch.equal(r0["init"][n], r0["final"][n]) for n in r0["init"])

    # One process replays both ranks' first micro-batches from the same initial weights and masks.
    torch.set_num_threads(1)
    cfg = load_config(EXPERIMENT, [o for o in overrides(tmp_path) if not o.startswith("trainer.")])
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tokenizer = fit.build_tokenizer(cfg)
    stage = fit.build_stage(cfg, fit.build_backbone(cfg, tokenizer))
    stage.train()
    stage._frozen_eval()
    assert all(torch.equal(p, r0["init"][n]) for n, p in trainable(stage).items())

    losses, corruptions = [], []
    for record in records:
        torch.set_rng_state(record["rng"])
        batch = record["batch"]
        result, corruption = stage._diffusion_loss(batch)
        losses.append(result.loss)
        corruptions.append(corruption.masked)
        torch.testing.assert_close(float(result.loss.detach()), record["losses"][0], atol=1e-5, rtol=1e-5)
    ddp_loss = (losses[0] + losses[1]) / 2  # DDP averages the ranks' gradients, i.e. of this mean

    optimizer = stage.configure_optimizers()["optimizer"]
    optimizer.zero_grad()
    ddp_loss.backward()
    grads = {n: p.grad for n, p in stage.named_parameters() if p.grad is not None}
    assert grads.keys() == r0["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, r0["grads"][name], atol=1e-7, rtol=1e-4, msg=name)
    optimizer.step()
    for name, param in trainable(stage).items():
        torch.testing.assert_close(param, r0["after_step"][name], atol=1e-6, rtol=1e-5, msg=name)

    # The same global batch in one process (the union, same masks): one loss normalised over all targets.
    union = pad_cat([r["batch"] for r in records], tokenizer.pad_token_id)
    width = union["input_ids"].shape[1]
    masked = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in corruptions])
    assert not bool((masked & (union["labels"] == IGNORE_INDEX)).any())
    # The replay above stepped the optimiser; the union loss is taken at the initial weights.
    with torch.no_grad():
        for name, param in stage.named_parameters():
            if name in r0["init"]:
                param.copy_(r0["init"][name])
        hidden = stage.backbone(
            input_ids=union["input_ids"].masked_fill(masked, stage.backbone.config.mask_token_id),
            attention_mask=union["attention_mask"],
            pixel_values=union["pixel_values"],
            image_grid_thw=union["image_grid_thw"],
            return_logits=False,
        ).last_hidden_state
        single = stage.diffusion.loss(
            hidden, stage.backbone.lm_head, union["input_ids"], masked, union["attention_mask"]
        ).loss
    reference = float(ddp_loss.detach())
    assert abs(float(single) - reference) / reference < 0.02, (float(single), reference)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
