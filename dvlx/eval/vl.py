"""`python -m dvlx.eval vl`: answer image-question records with a DreamVL folder and score them locally.

Data is either an image-text shard set (docs/data.md: the last assistant turn is the reference answer, the
turns before it are the prompt) or a JSONL file of
`{"image": path | [paths], "question": str, "answer": str, "choices": [str, ...], "id": str}` (image paths
relative to the JSONL; `image`, `choices` and `id` optional).

Scores: exact match after `normalize_answer` (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed), and for records with choices the multiple-choice accuracy: the prediction's choice
(`match_choice`: its whole text equal to a choice, else a leading letter such as `B`, `(B)` or `B.`, else
the only choice whose text it contains) against the answer's choice (a letter or a choice's text).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import string
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dvlx.backbone import CheckpointError
from dvlx.chat import add_generation_arguments, load_components, sampler_kwargs
from dvlx.diffusion.generate import decode_generated, generate
from dvlx.processing import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    ImageProcessor,
    Tokenizer,
    encode_conversation,
    generation_prompt,
)
from dvlx.processing.tokenizer import IM_START

CHOICE_LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# A leading option letter: "B", "B.", "B)", "(B)", "B: text", "B text".
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")


# ---------------------------------------------------------------------------------------------- scoring
def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles a/an/the removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def match_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice `text` names, or None: equal text, else a leading letter, else sole containment."""
    normalized = normalize_answer(text)
    texts = [normalize_answer(choice) for choice in choices]
    if normalized and normalized in texts:
        return texts.index(normalized)
    letter = _LETTER.match(text.strip())
    if letter is not None:
        index = CHOICE_LETTERS.index(letter.group(1))
        if index < len(choices):
            return index
    contained = [
        i for i, choice in enumerate(texts) if choice and re.search(rf"\b{re.escape(choice)}\b", normalized)
    ]
    return contained[0] if len(contained) == 1 else None


def format_choices(question: str, choices: Sequence[str]) -> str:
    """The question followed by one `A. choice` line per choice and the letter instruction."""
    lines = [f"{CHOICE_LETTERS[i]}. {choice}" for i, choice in enumerate(choices)]
    return "\n".join([question, *lines, MC_INSTRUCTION])


# ----------------------------------------------------------------------------------------------- records
@dataclass
class VLRecord:
    """One question: prompt turns (LLaVA keys, images as `<image>`), its images and the reference answer."""

    id: str
    turns: list[dict[str, str]]
    images: list[Image.Image]
    answer: str
    choices: list[str] | None = None
    correct_choice: int | None = None

    @property
    def question(self) -> str:
        return self.turns[-1]["value"]


def _load_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except OSError as error:
        raise ValueError(f"{where}: cannot read image {path}: {error}") from error
    return image


def _with_choices(record: VLRecord, where: str) -> VLRecord:
    if record.choices is None:
        return record
    if not record.choices or len(record.choices) > len(CHOICE_LETTERS):
        raise ValueError(f"{where}: key 'choices' must hold 1 to {len(CHOICE_LETTERS)} strings")
    record.correct_choice = match_choice(record.answer, record.choices)
    if record.correct_choice is None:
        raise ValueError(
            f"{where}: key 'answer' {record.answer!r} is neither a choice letter nor one of the choices "
            f"{record.choices}"
        )
    return record


def read_jsonl(path: str | Path) -> Iterator[VLRecord]:
    """Records of a JSONL file (see the module docstring); errors name the file, line and key."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from error
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            for key in ("question", "answer"):
                if not isinstance(raw.get(key), str):
                    raise ValueError(f"{where}: key {key!r} must be a string, got {raw.get(key)!r}")
            image_paths = raw.get("image", [])
            image_paths = [image_paths] if isinstance(image_paths, str) else image_paths
            if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
                raise ValueError(
                    f"{where}: key 'image' must be a path or a list of paths, got {image_paths!r}"
                )
            choices = raw.get("choices")
            if choices is not None and (
                not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
            ):
                raise ValueError(f"{where}: key 'choices' must be a list of strings, got {choices!r}")
            images = [_load_image(path.parent / p, where) for p in image_paths]
            record = VLRecord(
                id=str(raw.get("id", f"{path.name}:{number}")),
                turns=[{"from": "human", "value": raw["question"]}],
                images=images,
                answer=raw["answer"],
                choices=choices,
            )
            yield _with_choices(record, where)


def _llava_turn(turn: dict[str, Any]) -> dict[str, str]:
    """A turn with LLaVA keys (from/value) from either LLaVA or OpenAI (role/content) keys."""
    speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if not isinstance(speaker, str) or not isinstance(text, str):
        raise ValueError(f"a turn needs string from/value (or role/content), got {turn!r}")
    return {"from": speaker, "value": text}


def read_shards(spec: str, skipped: Counter) -> Iterator[VLRecord]:
    """Records of an image-text shard set; samples that cannot be used are counted in `skipped` by reason."""
    # Imported here: dvlx library code does not depend on data_modules, only this entry point does.
    from data_modules.shards import iter_shard_samples, list_shards

    for shard in list_shards(spec):
        for sample in iter_shard_samples(shard):
            where = f"{shard}:{sample['__key__']}"
            if "__bad__" in sample or "json" not in sample:
                skipped["bad_record"] += 1
                continue
            try:
                raw = json.loads(sample["json"].decode("utf-8"))
                turns = [_llava_turn(turn) for turn in raw["conversations"]]
                last = max(i for i, turn in enumerate(turns) if turn["from"] in ("gpt", "assistant"))
                prompt, answer = turns[:last], turns[last]["value"]
                if not prompt:
                    raise ValueError("no prompt turn before the answer")
                images = []
                for k in range(sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in prompt)):
                    name = next(key for key in sample if key.startswith(f"img{k}."))
                    image = Image.open(io.BytesIO(sample[name]))
                    image.load()
                    images.append(image)
                record = VLRecord(
                    id=str(raw.get("id", sample["__key__"])),
                    turns=prompt,
                    images=images,
                    answer=answer,
                    choices=raw.get("choices"),
                )
                yield _with_choices(record, where)
            except (ValueError, KeyError, TypeError, StopIteration, OSError, AttributeError):
                skipped["bad_record"] += 1


def prompt_ids(
    tokenizer: Tokenizer, record: VLRecord, template: str, num_image_tokens: Sequence[int]
) -> list[int]:
    """Prompt ids of a record: its turns laid out as in training, up to the assistant's answer."""
    if len(record.turns) == 1 or template == "plain":
        return generation_prompt(tokenizer, record.turns[-1]["value"], template, num_image_tokens)
    encoded = encode_conversation(tokenizer, record.turns, template, num_image_tokens)
    return encoded.input_ids + tokenizer.encode(f"{IM_START}assistant\n")


# -------------------------------------------------------------------------------------------- evaluation
@dataclass
class GenerationSettings:
    """What `generate` is called with (the evaluation settings recorded in the report)."""

    steps: int = 128
    max_new_tokens: int = 128
    alg: str = "maskgit_plus"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    schedule: str = "original"
    use_cache: bool = False
    attention_mode: str | None = None
    template: str = "qwen_2_5"
    batch_size: int = 8
    seed: int = 0
    stop_strings: list[str] = field(default_factory=lambda: ["<|im_end|>", "<|endoftext|>"])


def generate_with(
    settings: GenerationSettings,
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixels: Sequence[torch.Tensor],
    grids: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`generate` on left-padded prompts with the images of their rows (lists concatenated in row order)."""
    return generate(
        model,
        input_ids,
        attention_mask,
        pixel_values=torch.cat(list(pixels)) if pixels else None,
        image_grid_thw=torch.cat(list(grids)) if grids else None,
        max_new_tokens=settings.max_new_tokens,
        steps=settings.steps,
        alg=settings.alg,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        alg_temp=settings.alg_temp,
        schedule=settings.schedule,
        use_cache=settings.use_cache,
        attention_mode=settings.attention_mode,
        generator=generator,
    )


def _batches(records: Iterable[VLRecord], size: int) -> Iterator[list[VLRecord]]:
    batch: list[VLRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def answer_batch(
    model,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    records: Sequence[VLRecord],
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Generated answers for records, prompts left-padded into one batch, images in row order."""
    rows, pixels, grids = [], [], []
    for record in records:
        counts: list[int] = []
        if record.images:
            processed = processor(record.images)
            pixels.append(processed["pixel_values"])
            grids.append(processed["image_grid_thw"])
            counts = [processor.num_image_tokens(row) for row in processed["image_grid_thw"]]
        rows.append(prompt_ids(tokenizer, record, settings.template, counts))
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, length - len(row) :] = 1
    sequences = generate_with(settings, model, input_ids, attention_mask, pixels, grids, generator)
    return [text.strip() for text in decode_generated(tokenizer, sequences, length, settings.stop_strings)]


def evaluate(
    model,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    records: Iterable[VLRecord],
    settings: GenerationSettings,
) -> dict[str, Any]:
    """Generate and score every record; returns {"metrics": ..., "samples": [...]}."""
    generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    for batch in _batches(records, settings.batch_size):
        predictions = answer_batch(model, tokenizer, processor, batch, settings, generator)
        for record, prediction in zip(batch, predictions, strict=True):
            sample: dict[str, Any] = {
                "id": record.id,
                "question": record.question,
                "num_images": len(record.images),
                "answer": record.answer,
                "prediction": prediction,
                "exact_match": exact_match(prediction, record.answer),
            }
            if record.choices is not None:
                predicted = match_choice(prediction, record.choices)
                sample.update(
                    choices=record.choices,
                    correct_choice=record.correct_choice,
                    predicted_choice=predicted,
                    choice_correct=predicted == record.correct_choice,
                )
            samples.append(sample)
    seconds = time.perf_counter() - start
    scored = [s for s in samples if "choices" in s]
    metrics = {
        "num_samples": len(samples),
        "exact_match": sum(s["exact_match"] for s in samples) / len(samples) if samples else None,
        "num_multiple_choice": len(scored),
        "multiple_choice_accuracy": sum(s["choice_correct"] for s in scored) / len(scored)
        if scored
        else None,
        "seconds": round(seconds, 3),
        "samples_per_second": round(len(samples) / seconds, 3) if seconds > 0 else None,
    }
    return {"metrics": metrics, "samples": samples}


# ------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.eval vl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="image-text shard set (dir/glob/pattern) or a .jsonl file"
    )
    add_generation_arguments(parser, length_required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", default="qwen_2_5", choices=TEMPLATES)
    parser.add_argument(
        "--format-choices",
        action="store_true",
        help="append 'A. choice' lines and a letter instruction to questions with choices",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--out", default="eval_vl.json", help="JSON report path")
    return parser


def _records(data: str, limit: int | None, format_mc: bool, skipped: Counter) -> Iterator[VLRecord]:
    records = read_jsonl(data) if data.endswith(".jsonl") else read_shards(data, skipped)
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            return
        if format_mc and record.choices is not None:
            record.turns[-1] = {**record.turns[-1], "value": format_choices(record.question, record.choices)}
        yield record


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not Path(args.model).is_dir():
        print(f"error: model folder {args.model} does not exist", file=sys.stderr)
        return 2
    if not (Path(args.data).exists() or any(c in args.data for c in "*?[{")):
        print(f"error: data {args.data} does not exist", file=sys.stderr)
        return 2
    if args.batch_size < 1 or (args.limit is not None and args.limit < 0):
        print("error: --batch-size must be >= 1 and --limit >= 0", file=sys.stderr)
        return 2
    settings = GenerationSettings(
        **sampler_kwargs(args),
        template=args.template,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    skipped: Counter = Counter()
    try:
        model, tokenizer, processor = load_components(
            args.model, args.device, args.dtype, args.min_pixels, args.max_pixels
        )
        records = _records(args.data, args.limit, args.format_choices, skipped)
        result = evaluate(model, tokenizer, processor, records, settings)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result["metrics"]["skipped"] = dict(skipped)
    report = {
        "command": "python -m dvlx.eval vl " + shlex.join(argv),
        "model": str(args.model),
        "data": args.data,
        "settings": {
            **asdict(settings),
            "attention_mode": settings.attention_mode or model.config.attention,
            "limit": args.limit,
            "format_choices": args.format_choices,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "min_pixels": processor.min_pixels,
            "max_pixels": processor.max_pixels,
        },
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    metrics = result["metrics"]
    summary = f"exact match {_fmt(metrics['exact_match'])} over {metrics['num_samples']} records"
    if metrics["num_multiple_choice"]:
        summary += (
            f"; multiple choice {_fmt(metrics['multiple_choice_accuracy'])} "
            f"over {metrics['num_multiple_choice']}"
        )
    if skipped:
        summary += f"; skipped {dict(skipped)}"
    print(f"{summary}; report: {out}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


__all__ = [
    "GenerationSettings",
    "VLRecord",
    "answer_batch",
    "evaluate",
    "exact_match",
    "format_choices",
    "main",
    "match_choice",
    "normalize_answer",
    "prompt_ids",
    "read_jsonl",
    "read_shards",
]
