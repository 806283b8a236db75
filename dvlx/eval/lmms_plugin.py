"""lmms-eval model `dvlx`: stock lmms-eval evaluates a dvlx export or an official Dream-VL folder.

    lmms-eval --model dvlx --model_args pretrained=DIR[,key=value...] --tasks T \\
        --gen_kwargs max_new_tokens=16,steps=16 --batch_size 1

lmms-eval (0.6 and later) finds the model through the entry point group `lmms_eval.models`
(`dvlx = "dvlx.eval.lmms_plugin:lmms_eval_manifest"`). `python -m dvlx.eval.lmms_plugin ARGS` registers the
model in-process and runs the lmms-eval command line with ARGS, which also works for older lmms-eval
releases. See docs/evaluation.md for the installation recipe.

Only `generate_until` is implemented. Per request: `<image>` is removed from the context, the images from
`doc_to_visual` go in front of it, and the prompt is the qwen_2_5 chat layout; `prompt_layout=official`
(default) reproduces the reference evaluation (image tokens directly followed by the text), `training` puts
`\\n` after each image as training does. The answer is cut at the task's `until` strings and `<|im_end|>`.
Importing this module never requires lmms-eval; the class subclasses lmms-eval's base only when it exists.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dvlx.diffusion.generate import decode_generated
from dvlx.eval.vl import GenerationSettings, generate_with
from dvlx.processing import IMAGE_PLACEHOLDER, ImageProcessor, Tokenizer, generation_prompt

try:
    from lmms_eval.api.model import lmms as _LmmsBase

    HAS_LMMS_EVAL = True
except ImportError:
    _LmmsBase = object
    HAS_LMMS_EVAL = False

MODEL_NAME = "dvlx"
CLASS_PATH = "dvlx.eval.lmms_plugin.DvlxLMMS"
PROMPT_LAYOUTS = ("official", "training")
IM_END = "<|im_end|>"
EOS = "<|endoftext|>"
# gen_kwargs keys passed on to `generate` (values converted to these types); lmms-eval task keys such as
# do_sample or num_beams have no meaning for diffusion decoding and are ignored.
_GEN_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_new_tokens": int,
    "steps": int,
    "alg": str,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "alg_temp": float,
    "schedule": str,
    "use_cache": bool,
}

LOGLIKELIHOOD_MESSAGE = (
    "dvlx: loglikelihood is not implemented. Dream-VL is a masked-diffusion model and has no left-to-right "
    "token likelihood; evaluate tasks whose output_type is generate_until."
)


def lmms_eval_manifest():
    """Entry point payload for lmms-eval's `lmms_eval.models` group (lmms-eval >= 0.6)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `--model dvlx` known to the lmms-eval imported in this process (any release with a registry)."""
    import lmms_eval.models as registry

    if hasattr(registry, "MODEL_REGISTRY_V2"):
        registry.MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    for table in ("AVAILABLE_SIMPLE_MODELS", "AVAILABLE_MODELS"):
        if isinstance(getattr(registry, table, None), dict):
            getattr(registry, table)[MODEL_NAME] = CLASS_PATH


def generation_settings(
    gen_kwargs: dict[str, Any], defaults: GenerationSettings
) -> tuple[GenerationSettings, list[str]]:
    """Settings for one request from its gen_kwargs over `defaults`, and its stop strings.

    Stop strings: the task's `until` (a string or a list; EOS when absent) plus `<|im_end|>`, as the
    reference evaluation does.
    """
    updates = {
        key: cast(gen_kwargs[key]) for key, cast in _GEN_KEYS.items() if gen_kwargs.get(key) is not None
    }
    if "use_cache" in updates:
        updates["use_cache"] = str(gen_kwargs["use_cache"]).lower() in ("1", "true")
    if "top_p" in updates and updates["top_p"] >= 1.0:
        updates["top_p"] = None
    until = gen_kwargs.get("until", [EOS])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"dvlx: gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    stops = [s for s in until if s]
    if IM_END not in stops:
        stops.append(IM_END)
    return replace(defaults, **updates, stop_strings=stops), stops


def request_prompt(
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    context: str,
    images: Sequence[Image.Image],
    layout: str = "official",
    template: str = "qwen_2_5",
) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(prompt ids, pixel_values, image_grid_thw) of one lmms-eval request."""
    if layout not in PROMPT_LAYOUTS:
        raise ValueError(f"dvlx: prompt_layout must be one of {list(PROMPT_LAYOUTS)}, got {layout!r}")
    text = context.replace(IMAGE_PLACEHOLDER, "")
    pixel_values = image_grid_thw = None
    counts: list[int] = []
    if images:
        processed = processor(list(images))
        pixel_values, image_grid_thw = processed["pixel_values"], processed["image_grid_thw"]
        counts = [processor.num_image_tokens(row) for row in image_grid_thw]
        if layout == "official":
            # The reference chat template: image tokens, then the text, no separator.
            text = IMAGE_PLACEHOLDER * len(counts) + text
        else:
            # generation_prompt puts "<image>\n" per image in front; a newline left by a removed
            # placeholder would double it.
            text = text.lstrip()
    return generation_prompt(tokenizer, text, template, counts), pixel_values, image_grid_thw


def answer_requests(
    model,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    requests: Sequence[tuple[str, Sequence[Image.Image], dict[str, Any]]],
    defaults: GenerationSettings,
    layout: str = "official",
    generator: torch.Generator | None = None,
) -> list[str]:
    """Answers to (context, images, gen_kwargs) requests, in order.

    Requests with equal gen_kwargs are batched (up to `defaults.batch_size`, prompts left-padded).
    """
    answers: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, (_, _, gen_kwargs) in enumerate(requests):
        groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
    for indices in groups.values():
        settings, stops = generation_settings(dict(requests[indices[0]][2]), defaults)
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            prompts = [
                request_prompt(
                    tokenizer, processor, requests[i][0], requests[i][1], layout, settings.template
                )
                for i in chunk
            ]
            length = max(len(ids) for ids, _, _ in prompts)
            input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, (ids, _, _) in enumerate(prompts):
                input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, length - len(ids) :] = 1
            pixels = [p for _, p, _ in prompts if p is not None]
            grids = [g for _, _, g in prompts if g is not None]
            sequences = generate_with(settings, model, input_ids, attention_mask, pixels, grids, generator)
            for i, text in zip(chunk, decode_generated(tokenizer, sequences, length, stops), strict=True):
                answers[i] = text
    return [text if text is not None else "" for text in answers]


def visual_images(visuals: Any) -> list[Image.Image]:
    """PIL images from what a task's doc_to_visual returns: images, image paths, or (nested) lists of them."""
    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals]
    if isinstance(visuals, str | Path):
        if str(visuals).lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):
            raise NotImplementedError(f"dvlx: video inputs are not supported, got {visuals}")
        image = Image.open(visuals)
        image.load()
        return [image]
    if isinstance(visuals, list | tuple):
        return [image for item in visuals for image in visual_images(item)]
    raise ValueError(
        f"dvlx: unsupported visual of type {type(visuals).__name__}; expected PIL images or paths"
    )


class DvlxLMMS(_LmmsBase):
    """lmms-eval `simple` model over `dvlx.diffusion.generate`; model_args are its keyword arguments."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        dtype: str | None = None,
        steps: int = 128,
        max_new_tokens: int = 128,
        alg: str = "maskgit_plus",
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        alg_temp: float | None = None,
        schedule: str = "original",
        use_cache: bool = False,
        attention: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompt_layout: str = "official",
        template: str = "qwen_2_5",
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        if HAS_LMMS_EVAL:
            super().__init__()
        if unknown:
            raise ValueError(f"dvlx: unknown model_args {sorted(unknown)}")
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(
                f"dvlx: prompt_layout must be one of {list(PROMPT_LAYOUTS)}, got {prompt_layout!r}"
            )
        from dvlx.chat import load_components

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self._model, self._tokenizer, self.processor = load_components(
            pretrained, device, dtype, min_pixels, max_pixels
        )
        self.prompt_layout = prompt_layout
        self.defaults = GenerationSettings(
            steps=int(steps),
            max_new_tokens=int(max_new_tokens),
            alg=alg,
            temperature=float(temperature),
            top_p=top_p,
            top_k=top_k,
            alg_temp=alg_temp,
            schedule=schedule,
            use_cache=bool(use_cache),
            attention_mode=attention,
            template=template,
            batch_size=int(batch_size),
            seed=int(seed),
        )
        self.generator = torch.Generator(device=self._model.device).manual_seed(int(seed))
        # lmms-eval overwrites these under torchrun/accelerate; they only matter for logging here.
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.task_dict = getattr(self, "task_dict", {})

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.defaults.batch_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError(LOGLIKELIHOOD_MESSAGE)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dvlx: multi-round generation is not implemented")

    def generate_until(self, requests) -> list[str]:
        items = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            items.append((context, visual_images(visuals), dict(gen_kwargs)))
        answers = answer_requests(
            self._model,
            self._tokenizer,
            self.processor,
            items,
            self.defaults,
            self.prompt_layout,
            self.generator,
        )
        hook = getattr(self, "cache_hook", None)
        for (context, _, gen_kwargs), answer in zip(items, answers, strict=True):
            if hook is not None:
                hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers


def main(argv: Sequence[str] | None = None) -> int:
    """Register `dvlx` and run the lmms-eval command line with `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not HAS_LMMS_EVAL:
        print("error: lmms-eval is not installed; see docs/evaluation.md for the recipe", file=sys.stderr)
        return 2
    register()
    sys.argv = ["lmms-eval", *argv]
    try:
        from lmms_eval.cli.dispatch import main as lmms_main
    except ImportError:
        from lmms_eval.__main__ import cli_evaluate as lmms_main
    lmms_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
