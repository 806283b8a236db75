"""Training step time: dvlx's masked-diffusion step against a plain transformers Qwen2 step of equal shapes.

    python -m dvlx.bench train [--presets tiny,small] [--repeats 5] [--threads 1] [--no-compile]

Per preset, on random text-only batches (B x L, every token attended, the second half of each row the
answer): `dvlx` is `VLInstruct._diffusion_loss` (masking, backbone forward with bidirectional attention,
CART-weighted cross-entropy at masked positions only) + backward; `transformers` is `Qwen2ForCausalLM` with
the same sizes and `is_causal=False` (the same attention work), `labels` on the answer half, + backward.
Reported: median seconds per step, the ratio dvlx / transformers (target <= 1.15x), and dvlx with activation
checkpointing and with `torch.compile` of every block (regional) as ratios to dvlx eager. A `vision` row adds
one 224x224 image per sample to the dvlx step (no transformers counterpart).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from dvlx.backbone import DreamVL, preset_config
from dvlx.config import ExperimentConfig, StageConfig
from dvlx.processing import IGNORE_INDEX, build_tiny_tokenizer

SEED = 0
SIZES = {
    # name: (config overrides, batch, length)
    "tiny": ({}, 8, 64),
    "small": (
        {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 32000},
        4,
        128,
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    return parser


def build_models(size: str):
    """(dvlx stage, transformers Qwen2ForCausalLM) with equal LM sizes and equal initial LM weights."""
    from transformers import Qwen2ForCausalLM

    from dvlx.backbone.model import qwen2_text_config
    from dvlx.stages import VLInstruct

    overrides, _, _ = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.special_ids()
    config = preset_config("tiny", **{"vocab_size": len(tokenizer), **ids, **overrides})
    torch.manual_seed(SEED)
    backbone = DreamVL(config)
    cfg = ExperimentConfig(stage=StageConfig(name="vl_instruct", trainable=["projector", "lm", "vision"]))
    stage = VLInstruct(cfg, backbone).train()
    reference = Qwen2ForCausalLM(qwen2_text_config(config)).train()
    for layer in reference.model.layers:
        layer.self_attn.is_causal = False  # bidirectional, as dvlx: the same attention work
    reference.model.load_state_dict(backbone.model.state_dict())
    reference.lm_head.load_state_dict(backbone.lm_head.state_dict())
    return stage, reference


def text_batch(config, batch: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(SEED)
    special = max(config.mask_token_id, config.image_token_id, config.pad_token_id) + 1
    ids = torch.randint(special, config.vocab_size, (batch, length), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, length // 2 :] = ids[:, length // 2 :]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def image_batch(config, batch: int, length: int) -> dict:
    """`text_batch` with one 224x224 image (its merged tokens at the start of each row) per sample."""
    import numpy as np
    from PIL import Image

    from dvlx.processing import ImageProcessor

    processor = ImageProcessor(min_pixels=224 * 224, max_pixels=224 * 224)
    rng = np.random.default_rng(SEED)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    vision = processor(images=images)
    tokens = processor.num_image_tokens(vision["image_grid_thw"][0])
    out = text_batch(config, batch, length + tokens)
    out["input_ids"][:, :tokens] = config.image_token_id
    out["pixel_values"] = vision["pixel_values"]
    out["image_grid_thw"] = vision["image_grid_thw"]
    return out


def time_steps(steps: dict, repeats: int) -> dict:
    """Median seconds per call; two warm-up calls each, then rounds over all steps, so that every variant
    gets the same share of whatever else the machine is doing."""
    for step in steps.values():
        step()
        step()
    times: dict = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def dvlx_step(stage, batch: dict):
    def step() -> None:
        stage.zero_grad(set_to_none=True)
        result, _ = stage._diffusion_loss(batch)
        result.loss.backward()

    return step


def reference_step(model, batch: dict):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    return step


def backbone_step(forward, module):
    """Forward to the final hidden states and back (no vocabulary projection): the layers alone."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        forward().float().square().mean().backward()

    return step


def run_size(size: str, repeats: int, with_compile: bool) -> dict:
    import copy

    from dvlx.strategies import compile_blocks

    _, batch_size, length = SIZES[size]
    stage, reference = build_models(size)
    config = stage.backbone.config
    batch = text_batch(config, batch_size, length)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    checkpointed = copy.deepcopy(stage)
    checkpointed.backbone.gradient_checkpointing_enable()
    steps = {
        "dvlx": dvlx_step(stage, batch),
        "transformers": reference_step(reference, batch),
        "dvlx_layers": backbone_step(
            lambda: stage.backbone(ids, mask, return_logits=False).last_hidden_state, stage
        ),
        "transformers_layers": backbone_step(
            lambda: reference.model(input_ids=ids, attention_mask=mask).last_hidden_state, reference
        ),
        "vision": dvlx_step(stage, image_batch(config, batch_size, length)),
        "checkpointing": dvlx_step(checkpointed, batch),
    }
    result = {"size": size, "batch": batch_size, "length": length, **time_steps(steps, repeats)}
    if with_compile:
        # Timed after the eager variants, in rounds of its own: once dynamo is active, eager steps in the
        # same process were seen to slow down by up to 20 %, which would flatter the compiled ratio.
        compiled = copy.deepcopy(stage)
        compile_blocks(compiled.backbone, dynamic=True)  # as `trainer.compile` does
        start = time.perf_counter()
        dvlx_step(compiled, batch)()
        result["compile_s"] = time.perf_counter() - start
        pair = time_steps({"eager": dvlx_step(stage, batch), "compiled": dvlx_step(compiled, batch)}, repeats)
        result["compiled_x"] = pair["compiled"] / pair["eager"]
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.presets.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"error: --presets: {unknown} not in {sorted(SIZES)}", file=sys.stderr)
        return 2
    print(f"command: python -m dvlx.bench train {shlex.join(argv)}".rstrip())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32"
    )
    header = (
        f"{'preset':6s} {'B x L':>9s} {'dvlx ms':>8s} {'hf ms':>8s} {'step x':>7s} {'layers x':>8s} "
        f"{'+vision ms':>10s} {'ckpt x':>7s} {'compiled x':>10s} {'compile s':>9s}"
    )
    print(header)
    verdicts = []
    for size in sizes:
        r = run_size(size, args.repeats, not args.no_compile)
        ratio = r["dvlx"] / r["transformers"]
        layers = r["dvlx_layers"] / r["transformers_layers"]
        compiled = f"{r['compiled_x']:10.2f}" if "compiled_x" in r else f"{'-':>10s}"
        compile_s = f"{r['compile_s']:9.1f}" if "compile_s" in r else f"{'-':>9s}"
        print(
            f"{size:6s} {r['batch']:>3d} x {r['length']:<4d} {1e3 * r['dvlx']:8.1f} "
            f"{1e3 * r['transformers']:8.1f} {ratio:7.2f} {layers:8.2f} {1e3 * r['vision']:10.1f} "
            f"{r['checkpointing'] / r['dvlx']:7.2f} {compiled} {compile_s}"
        )
        for what, value in (("step", ratio), ("layers", layers)):
            verdict = "met" if value <= 1.15 else "NOT met"
            verdicts.append(f"{size} {what}: dvlx / transformers = {value:.2f}x (target <= 1.15x: {verdict})")
    print()
    print("\n".join(verdicts))
    print(
        "step x: whole training step (dvlx: masking + diffusion loss at masked positions; transformers: "
        "logits and CE on the answer half); layers x: decoder layers only (hidden states, no vocabulary); "
        "ckpt x, compiled x: dvlx with activation checkpointing / torch.compile of every block, over eager."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
