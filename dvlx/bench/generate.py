"""Generation throughput: generated tokens/s with and without the prefix KV cache.

    python -m dvlx.bench generate [--max-new-tokens 64] [--image-size 224] [--batch 1] [--repeats 5]
        [--hidden-size D --layers K] [--model DIR] [--threads 1]

Model: the tiny preset with random weights (or `--model DIR`), one image and a short question in the
qwen_2_5 layout, maskgit_plus greedy. For steps = max_new_tokens, a quarter of it and 1 it times
`generate` (the vision tower runs once per call either way) in four variants:
- `full`, uncached: what the reference does, the whole sequence recomputed at every step (the baseline);
- `full`, cached: the approximate prefix cache under full attention;
- `prefix`, uncached and cached: the exact cache (the tokens must be identical, which is checked).
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
from PIL import Image

from dvlx.backbone import DreamVL, preset_config
from dvlx.diffusion.generate import generate
from dvlx.processing import ImageProcessor, Tokenizer, build_tiny_tokenizer, generation_prompt

QUESTION = "What colour is the shape at the top left? Answer with a single word or a short phrase."
SEED = 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dvlx.bench generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default=None, help="model folder; default: tiny preset, random weights")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, nargs="+", default=None, help="default: max_new_tokens, a quarter of it, 1"
    )
    parser.add_argument("--image-size", type=int, default=224, help="side of the square test image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--hidden-size", type=int, default=None, help="tiny preset: LM width override")
    parser.add_argument("--layers", type=int, default=None, help="tiny preset: LM depth override")
    return parser


def _model(args: argparse.Namespace) -> tuple[DreamVL, Tokenizer, ImageProcessor, str]:
    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        from dvlx.chat import load_components

        model, tokenizer, processor = load_components(args.model, args.device, args.dtype)
        return model, tokenizer, processor, f"{args.model} ({args.dtype})"
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    overrides = {"vocab_size": len(tokenizer), **tokenizer.special_ids()}
    if args.hidden_size is not None:
        overrides.update(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size)
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    config = preset_config("tiny", **overrides)
    model = DreamVL(config).to(device=args.device, dtype=dtype).eval()
    described = (
        f"tiny preset, random weights ({config.num_hidden_layers} layers, D {config.hidden_size}, "
        f"V {config.vocab_size}, ViT depth {config.vision_config.depth}), {args.dtype}"
    )
    return model, tokenizer, ImageProcessor(), described


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_variants(calls: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Median seconds per variant and its output; one warm-up call each, then rounds over all variants.

    Round-robin timing gives every variant the same share of whatever else the machine is doing.
    """
    outputs = {name: call() for name, call in calls.items()}
    times: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            outputs[name] = call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, tokenizer, processor, described = _model(args)
    image = Image.new("RGB", (args.image_size, args.image_size), (200, 40, 40))
    processed = processor([image])
    n_visual = processor.num_image_tokens(processed["image_grid_thw"][0])
    ids = generation_prompt(tokenizer, QUESTION, "qwen_2_5", [n_visual])
    input_ids = torch.tensor([ids] * args.batch, dtype=torch.long)
    pixel_values = processed["pixel_values"].repeat(args.batch, 1)  # [B * N_patches, patch_dim]
    grids = processed["image_grid_thw"].repeat(args.batch, 1)  # [B, 3]
    n = args.max_new_tokens
    steps_list = args.steps or sorted({n, max(1, n // 4), 1}, reverse=True)
    device = torch.device(args.device)

    threads = torch.get_num_threads()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads"
    machine += f", device {args.device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    print(f"command: python -m dvlx.bench generate {shlex.join(argv)}".rstrip())
    print(f"machine: {machine}")
    print(f"model: {described}")
    print(
        f"prompt: 1 image {args.image_size}x{args.image_size} = {n_visual} visual tokens + "
        f"{len(ids) - n_visual} text tokens = {len(ids)}; batch {args.batch}; max_new_tokens {n}; "
        "maskgit_plus, greedy"
    )
    print(
        f"time: median of {args.repeats} generate() calls after one warm-up call, variants timed in turn; "
        "tok/s = batch * max_new_tokens / seconds per call (vision tower once per call, included)"
    )
    print("baseline = full attention, uncached: the reference's full recomputation at every step")
    header = (
        f"{'steps':>6} {'attention':>9} {'uncached tok/s':>15} {'cached tok/s':>13} {'cached/uncached':>16} "
        f"{'vs baseline':>12}  tokens"
    )
    print(header)
    print("-" * len(header))
    variants = [(mode, cached) for mode in ("full", "prefix") for cached in (False, True)]
    for steps in steps_list:

        def make_call(mode: str, cached: bool, steps: int = steps):
            def call() -> torch.Tensor:
                return generate(
                    model,
                    input_ids,
                    pixel_values=pixel_values,
                    image_grid_thw=grids,
                    max_new_tokens=n,
                    steps=steps,
                    alg="maskgit_plus",
                    use_cache=cached,
                    attention_mode=mode,
                )

            return call

        calls = {variant: make_call(*variant) for variant in variants}
        seconds, outputs = _time_variants(calls, args.repeats, device)
        rate = {variant: args.batch * n / s for variant, s in seconds.items()}
        baseline = rate[("full", False)]
        for mode in ("full", "prefix"):
            uncached, cached = rate[(mode, False)], rate[(mode, True)]
            same = torch.equal(outputs[(mode, False)], outputs[(mode, True)])
            agreement = "identical" if same else "differ"
            if mode == "full":
                agreement += " (approximate cache)"
            row = f"{steps:>6} {mode:>9} {uncached:>15.1f} {cached:>13.1f} "
            row += f"{cached / uncached:>15.2f}x {cached / baseline:>11.2f}x  {agreement}"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
