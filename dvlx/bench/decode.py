"""Action decoding latency: milliseconds per action chunk for every objective and step count.

    python -m dvlx.bench decode [--repeats 5] [--threads 1] [--image-size 224] [--horizon 8] [--action-dim 7]
        [--proprio-dim 8]

Model: the tiny preset with random weights, `prefix` attention (`ar` runs causal by itself), two cameras,
a proprio token and batch size 1. Each variant times `objective.sample(backbone, batch, steps=k)` (the
vision tower runs inside every call); `bare forward` is one backbone pass over the same tokens, hidden
states only. Ratios reported against the targets of issue 5 item 7:
- `ar` token by token (KV cache) / one-step parallel decoding (`discrete`): at least 20x;
- `flow_matching` K=4 with the prefix cache / K=1: at most 1.5x;
- one-step parallel decoding / bare forward: the floor (no target).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from dvlx.backbone import DreamVL, preset_config
from dvlx.config import ObjectiveConfig
from dvlx.objectives import OBJECTIVES, objective_class
from dvlx.processing import ImageProcessor, build_tiny_tokenizer
from dvlx.processing.action_tokens import ActionTokenizer
from dvlx.processing.robot import ActionSpec, ArrayStats, Normalizer, encode_action_prompt

SEED = 0
CAMERAS = ("front", "wrist")
INSTRUCTION = "put the red block in the basket"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--image-size", type=int, default=224, help="side of each square camera image")
    parser.add_argument("--horizon", type=int, default=8, help="H: action chunk length")
    parser.add_argument("--action-dim", type=int, default=7, help="A: action dimensions")
    parser.add_argument("--proprio-dim", type=int, default=8, help="S: proprio dims (0: no proprio token)")
    return parser


def _spec(args: argparse.Namespace) -> ActionSpec:
    def stats(dim: int) -> ArrayStats:
        return ArrayStats(mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim, max=[1.0] * dim,
                          q01=[-1.0] * dim, q99=[1.0] * dim, count=1)

    a, s = args.action_dim, args.proprio_dim
    return ActionSpec(
        horizon=args.horizon, max_horizon=args.horizon, action_dim=a, proprio_dim=s, cameras=list(CAMERAS),
        action_names=[f"a{i}" for i in range(a)], proprio_names=[f"s{i}" for i in range(s)], control_hz=20.0,
        action_normalizer=Normalizer("bounds_q99", stats(a), [True] * a),
        proprio_normalizer=Normalizer("bounds_q99", stats(s), [True] * s) if s else None,
        image_size=args.image_size,
    )


def _batch(tokenizer, spec: ActionSpec) -> dict:
    """One observation (batch size 1) in the batch layout of dvlx/objectives/base.py."""
    rng = np.random.default_rng(SEED)
    side = spec.image_size
    processor = ImageProcessor(min_pixels=side**2, max_pixels=side**2)
    images = [Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)) for _ in CAMERAS]
    vision = processor(images=images)
    counts = [processor.num_image_tokens(g) for g in vision["image_grid_thw"]]
    prompt = encode_action_prompt(tokenizer, INSTRUCTION, counts, spec.horizon * spec.action_dim,
                                  use_proprio=spec.proprio_dim > 0)
    return {
        "input_ids": torch.tensor([prompt.input_ids]),
        "attention_mask": torch.ones(1, len(prompt.input_ids), dtype=torch.long),
        "action_slots": torch.tensor([prompt.action_slots], dtype=torch.bool),
        "proprio_slots": torch.tensor([prompt.proprio_slots], dtype=torch.bool),
        "prefix_mask": torch.tensor([prompt.prefix], dtype=torch.bool),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "proprio": torch.tensor(rng.uniform(-1, 1, size=(1, spec.proprio_dim)), dtype=torch.float32),
    }


def _variants(horizon: int, action_dim: int) -> list[tuple[str, int, bool]]:
    """(objective, steps, use_cache) in table order."""
    rows = [("discrete", 1, True)]
    rows += [("discrete_diffusion", k, True) for k in sorted({1, 4, horizon * action_dim})]
    rows += [("l1", 1, True), ("diffusion", 10, True), ("diffusion", 50, True)]
    rows += [("flow_matching", k, True) for k in (1, 4, 10)] + [("flow_matching", 4, False)]
    rows += [("ar", horizon * action_dim, True), ("ar", horizon * action_dim, False)]
    missing = sorted({name for name, _, _ in rows} - set(OBJECTIVES))
    if missing:
        raise ValueError(
            f"dvlx/bench/decode.py: objectives {missing} are not registered; have {sorted(OBJECTIVES)}"
        )
    return rows


def _time_calls(calls: dict, repeats: int) -> dict:
    """Median seconds per call; one warm-up call each, then rounds over all calls so that every variant
    gets the same share of whatever else the machine is doing."""
    for call in calls.values():
        call()
    times: dict = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def _verdict(ratio: float, target: float, at_least: bool) -> str:
    met = ratio >= target if at_least else ratio <= target
    sign = ">=" if at_least else "<="
    return f"target {sign} {target:g}x: {'met' if met else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = build_tiny_tokenizer()
    ActionTokenizer(tokenizer).ensure_tokens()
    spec = _spec(args)
    torch.manual_seed(SEED)
    backbone = DreamVL(preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids())).eval()
    backbone.config.attention = "prefix"
    hidden = backbone.config.hidden_size
    batch = _batch(tokenizer, spec)
    variants = _variants(spec.horizon, spec.action_dim)

    calls = {}
    for name, steps, cached in variants:
        torch.manual_seed(SEED)
        cfg = ObjectiveConfig(name=name, steps=steps, use_cache=cached)
        objective = objective_class(name)(spec, hidden, cfg, tokenizer).eval()

        def sample(objective=objective, steps=steps) -> torch.Tensor:
            with torch.no_grad():
                return objective.sample(backbone, batch, steps=steps)

        calls[(name, steps, cached)] = sample

    def bare() -> torch.Tensor:
        with torch.no_grad():
            return backbone(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                prefix_mask=batch["prefix_mask"], return_logits=False,
            ).last_hidden_state

    calls[("bare forward", 1, False)] = bare

    n_visual = int(batch["input_ids"].eq(tokenizer.image_token_id).sum())
    length = batch["input_ids"].shape[1]
    print(f"command: python -m dvlx.bench decode {shlex.join(argv)}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    cfg = backbone.config
    print(f"model: tiny preset, random weights ({cfg.num_hidden_layers} layers, D {hidden}, "
          f"V {cfg.vocab_size}, ViT depth {cfg.vision_config.depth}), float32, attention prefix (ar: causal)")
    print(f"chunk: H {spec.horizon} x A {spec.action_dim} = {spec.horizon * spec.action_dim} action slots, "
          f"{len(CAMERAS)} cameras {args.image_size}x{args.image_size}, proprio {spec.proprio_dim}; "
          f"L {length} tokens ({n_visual} visual); batch 1")
    print(f"time: median of {args.repeats} calls after one warm-up call, variants timed in turn; "
          "vision tower included in every call")
    seconds = _time_calls(calls, args.repeats)
    ms = {key: 1000 * s for key, s in seconds.items()}
    header = f"{'objective':<20} {'steps':>5} {'cache':>5} {'ms/chunk':>10}"
    print(header)
    print("-" * len(header))
    for (name, steps, cached), value in ms.items():
        cache = "-" if name == "bare forward" else ("yes" if cached else "no")
        print(f"{name:<20} {steps:>5} {cache:>5} {value:>10.1f}")

    n_tokens = spec.horizon * spec.action_dim
    one_step = ms[("discrete", 1, True)]
    ar_ratio = ms[("ar", n_tokens, True)] / one_step
    flow_ratio = ms[("flow_matching", 4, True)] / ms[("flow_matching", 1, True)]
    floor = one_step / ms[("bare forward", 1, False)]
    print()
    print(f"ar token by token (cached) / discrete one step: {ar_ratio:7.2f}x  "
          f"({_verdict(ar_ratio, 20, True)})")
    print(f"flow_matching K=4 cached / K=1:                 {flow_ratio:7.2f}x  "
          f"({_verdict(flow_ratio, 1.5, False)})")
    print(f"discrete one step / bare forward (floor):       {floor:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
