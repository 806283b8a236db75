"""`python -m dvlx.chat --model DIR --image a.jpg "question"`: answer one question about images.

The model folder is a dvlx export or an official Hugging Face folder: config.json + safetensors, tokenizer
files and preprocessor_config.json. `--stream` prints the canvas after every denoising step, masked slots
shown as `--mask-char`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from dvlx.backbone import ATTENTION_MODES, CheckpointError, DreamVL
from dvlx.diffusion.generate import decode_generated, generate
from dvlx.diffusion.sampling import ALGORITHMS, SCHEDULES
from dvlx.processing import TEMPLATES, ImageProcessor, Tokenizer, generation_prompt


def render_canvas(
    tokenizer: Tokenizer, canvas: Sequence[int], mask_token_id: int, mask_char: str = "_"
) -> str:
    """Generated slots as text: runs of revealed tokens decoded together, one `mask_char` per masked slot."""
    pieces: list[str] = []
    run: list[int] = []
    for token in canvas:
        if token == mask_token_id:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
                run = []
            pieces.append(mask_char)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


def add_generation_arguments(parser: argparse.ArgumentParser, length_required: bool = False) -> None:
    """The model and sampler options shared by `dvlx.chat` and `dvlx.eval vl` (see `sampler_kwargs`)."""
    parser.add_argument("--model", required=True, help="model folder (weights, tokenizer, preprocessor)")
    default = None if length_required else 128
    parser.add_argument("--steps", type=int, default=default, required=length_required,
                        help="denoising steps")
    parser.add_argument("--max-new-tokens", type=int, default=default, required=length_required,
                        help="answer slots")
    parser.add_argument("--alg", default="maskgit_plus", choices=ALGORITHMS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--alg-temp", type=float, default=None, help="> 0: sample positions to reveal")
    parser.add_argument("--schedule", default="original", choices=SCHEDULES)
    parser.add_argument("--use-cache", action="store_true", help="prefix KV cache (approximate under full)")
    parser.add_argument("--attention", default=None, choices=ATTENTION_MODES, help="default: the config's")
    parser.add_argument("--min-pixels", type=int, default=None, help="override the folder's image processor")
    parser.add_argument("--max-pixels", type=int, default=None, help="override the folder's image processor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: the checkpoint's torch_dtype",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")


def sampler_kwargs(args: argparse.Namespace) -> dict:
    """`generate` keyword arguments from the options of `add_generation_arguments`."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "alg": args.alg,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "alg_temp": args.alg_temp,
        "schedule": args.schedule,
        "use_cache": args.use_cache,
        "attention_mode": args.attention,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.chat", description=__doc__.splitlines()[0])
    parser.add_argument("question", help="the question; '<image>' marks where images go (default: in front)")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    add_generation_arguments(parser)
    parser.add_argument(
        "--template", default="qwen_2_5", choices=TEMPLATES, help="plain for a pre-training export"
    )
    parser.add_argument("--stream", action="store_true", help="print the canvas after every step")
    parser.add_argument("--mask-char", default="_", help="how --stream shows a masked slot")
    return parser


def load_components(
    model_dir: str | Path,
    device: str = "cpu",
    dtype: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[DreamVL, Tokenizer, ImageProcessor]:
    """DreamVL (eval mode), Tokenizer and ImageProcessor from one folder; pixel bounds may be overridden."""
    model = DreamVL.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    processor = ImageProcessor.from_pretrained(model_dir)
    if min_pixels is not None or max_pixels is not None:
        settings = processor.to_dict()
        settings["min_pixels"] = processor.min_pixels if min_pixels is None else min_pixels
        settings["max_pixels"] = processor.max_pixels if max_pixels is None else max_pixels
        processor = ImageProcessor(**settings)
    return model, tokenizer, processor


def prepare_inputs(
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    question: str,
    images: Sequence[Image.Image],
    template: str = "qwen_2_5",
) -> dict[str, Tensor | None]:
    """input_ids Long[1, L] (+ pixel_values, image_grid_thw, or None without images) for one question."""
    pixel_values = image_grid_thw = None
    counts: list[int] = []
    if images:
        processed = processor(list(images))
        pixel_values, image_grid_thw = processed["pixel_values"], processed["image_grid_thw"]
        counts = [processor.num_image_tokens(row) for row in image_grid_thw]
    ids = generation_prompt(tokenizer, question, template, counts)
    if not ids:
        raise ValueError(f"the {template!r} template gives an empty prompt without images")
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        print(f"error: model folder {model_dir} does not exist", file=sys.stderr)
        return 2
    for path in args.image:
        if not Path(path).is_file():
            print(f"error: image file {path} does not exist", file=sys.stderr)
            return 2
    try:
        images = [Image.open(path) for path in args.image]
        for image in images:
            image.load()
    except OSError as error:
        print(f"error: cannot read image: {error}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, processor = load_components(
            model_dir, args.device, args.dtype, args.min_pixels, args.max_pixels
        )
        inputs = prepare_inputs(tokenizer, processor, args.question, images, args.template)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    prompt_length = inputs["input_ids"].shape[1]
    mask_id = model.config.mask_token_id

    def show(step: int, sequences: Tensor) -> None:
        canvas = sequences[0, prompt_length:].tolist()
        # One line per step: a revealed newline is shown escaped.
        text = render_canvas(tokenizer, canvas, mask_id, args.mask_char).replace("\n", "\\n")
        print(f"[{step + 1:>4}/{args.steps}] {text}", flush=True)

    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    try:
        sequences = generate(
            model,
            inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            **sampler_kwargs(args),
            generator=generator,
            stream=show if args.stream else None,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(decode_generated(tokenizer, sequences, prompt_length)[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
