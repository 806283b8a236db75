"""Small real image-text datasets whose answers can only be read off the image.

captions: one shape (circle / square / triangle) of one colour in one of four quadrants on a grey, lightly
noisy background, captioned e.g. "a red circle at the top left". Shape, colour and quadrant are drawn
uniformly and independently, so text alone scores at chance.
vqa: one to three shapes in distinct quadrants and a two-turn conversation of short questions about them
(how many, what colour / shape is at a position, where a given shape is).

Every sample is a pure function of (seed, split, index); its JSON also records the objects and their centres.

    python -m data_modules.synthetic captions --out DIR --train N --val M [--seed S] [--image-size P]
    python -m data_modules.synthetic vqa --out DIR --train N --val M [--seed S] [--image-size P]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_modules.shards import (
    ShardWriter,
    iter_shard_samples,
    list_shards,
    meta_is_complete,
    read_meta,
    write_image_text_sample,
)

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
CAPTION_PROMPT = "Describe the image in one sentence."
GENERATOR_PREFIX = "data_modules.synthetic."
# Recorded in meta.json params; bumped when a kind's samples change, so that cached splits are rewritten.
SAMPLE_VERSIONS = {"captions": 1, "vqa": 2, "vqa-blank": 2}
_SPLIT_TAGS = {"train": 0, "val": 1}

SceneObject = tuple[str, str, str]
"""(colour, shape, position)"""


def caption_text(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} at the {position}"


def draw_scene(
    rng: np.random.Generator, image_size: int, objects: Sequence[SceneObject]
) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Shapes on a noisy grey background, one per quadrant; returns the image and each centre (x, y)."""
    grey = int(rng.integers(70, 111))
    noise = rng.normal(0.0, 6.0, size=(image_size, image_size, 1))
    background = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)  # (height, width, rgb)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    half = image_size // 2
    centres = []
    for colour, shape, position in objects:
        row, col = position.split()
        # Radius and jitter scale with the image so the shape stays inside its quadrant at any size; a shape
        # spans two to three 14-pixel patches at 112 pixels, enough for a small vision tower to tell it.
        radius = int(rng.integers(max(2, image_size // 7), max(3, image_size // 5) + 1))
        jitter = max(0, half // 2 - radius - 1)
        cx = (half if col == "right" else 0) + half // 2 + int(rng.integers(-jitter, jitter + 1))
        cy = (half if row == "bottom" else 0) + half // 2 + int(rng.integers(-jitter, jitter + 1))
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif shape == "square":
            # As wide as the circle: the two differ only in their corners.
            side = radius
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
        else:
            corners = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
            draw.polygon(corners, fill=fill)
        centres.append((cx, cy))
    return image, centres


def _random_object(rng: np.random.Generator, position: str) -> SceneObject:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return colour, shape, position


def caption_sample(seed: int, split: str, index: int, image_size: int) -> tuple[Image.Image, dict[str, Any]]:
    """The image and JSON record of captioning sample `index` of `split`."""
    rng = np.random.default_rng([seed, _SPLIT_TAGS[split], index])
    colour, shape, _ = _random_object(rng, "")
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    image, (centre,) = draw_scene(rng, image_size, [(colour, shape, position)])
    record = {
        "id": f"captions-{split}-{index:08d}",
        "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption_text(colour, shape, position)},
        ],
        "colour": colour,
        "shape": shape,
        "position": position,
        "center": list(centre),
    }
    return image, record


QUESTION_TYPES = ("count", "colour", "shape", "position")


def question_type(question: str) -> str:
    """The type (one of QUESTION_TYPES) of a question written by `vqa_sample`; `other` for anything else."""
    question = question.removeprefix("<image>\n")
    prefixes = {"How many ": "count", "What colour ": "colour", "What shape ": "shape",
                "Where is ": "position"}
    return next((kind for prefix, kind in prefixes.items() if question.startswith(prefix)), "other")


def _question(kind: str, objects: Sequence[SceneObject], target: SceneObject) -> tuple[str, str]:
    colour, shape, position = target
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(objects)]
    if kind == "colour":
        return f"What colour is the shape at the {position}?", colour
    # Nouns keep their article: the content word then follows a space, as in the captions, and is the same
    # token the caption pre-training grounded (the tiny tokenizer has other tokens for line-initial words).
    # Exact match drops articles, so "circle" still matches "a circle".
    if kind == "shape":
        return f"What shape is at the {position}?", f"a {shape}"
    return f"Where is the {colour} {shape}?", f"the {position}"


def vqa_sample(
    seed: int, split: str, index: int, image_size: int, blank: bool = False
) -> tuple[Image.Image, dict[str, Any]]:
    """The image and JSON record of VQA sample `index` of `split`: one question and its answer.

    One to three shapes with distinct (colour, shape) pairs sit in distinct quadrants. The question's type is
    drawn uniformly from QUESTION_TYPES and its object uniformly from the scene, so an image-blind model can
    do no better than the most frequent answer of each question type. The question directly follows the
    image: the LM knows where an image token lies only through its RoPE distance to the text (the vision tower
    has no absolute positions either), and a fixed distance per question type lets a tiny model learn which
    image tokens a quadrant names. `blank=True` keeps the conversation and replaces the image by a uniform
    grey one (the text-only control).
    """
    rng = np.random.default_rng([seed, _SPLIT_TAGS[split] + 2, index])
    count = int(rng.integers(1, 4))
    positions = [POSITIONS[int(i)] for i in sorted(rng.choice(len(POSITIONS), size=count, replace=False))]
    pairs = rng.choice(len(COLOURS) * len(SHAPES), size=count, replace=False)
    objects = [(list(COLOURS)[int(p) // len(SHAPES)], SHAPES[int(p) % len(SHAPES)], position)
               for p, position in zip(pairs, positions, strict=True)]
    image, centres = draw_scene(rng, image_size, objects)
    kind = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    question, answer = _question(kind, objects, objects[int(rng.integers(count))])
    if blank:
        image = Image.new("RGB", image.size, (90, 90, 90))
    conversations = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    record = {
        "id": f"vqa-{split}-{index:08d}",
        "conversations": conversations,
        "question_type": kind,
        "blank": blank,
        "objects": [
            {"colour": c, "shape": s, "position": p, "center": list(centre)}
            for (c, s, p), centre in zip(objects, centres, strict=True)
        ],
    }
    return image, record


def vqa_blank_sample(
    seed: int, split: str, index: int, image_size: int
) -> tuple[Image.Image, dict[str, Any]]:
    """`vqa_sample` with the same conversation and a uniform grey image."""
    return vqa_sample(seed, split, index, image_size, blank=True)


_SAMPLERS: dict[str, Callable[[int, str, int, int], tuple[Image.Image, dict[str, Any]]]] = {
    "captions": caption_sample,
    "vqa": vqa_sample,
    "vqa-blank": vqa_blank_sample,
}


def _write_split(kind: str, out_dir: str, split: str, num: int, params: dict[str, Any]) -> None:
    meta = {"source": f"synthetic {kind} ({split})", "generator": GENERATOR_PREFIX + kind, "params": params}
    with ShardWriter(out_dir, prefix=split, max_samples_per_shard=params["samples_per_shard"], meta=meta,
                     overwrite=True) as writer:
        for index in range(num):
            image, record = _SAMPLERS[kind](params["seed"], split, index, params["image_size"])
            extra = {k: v for k, v in record.items() if k not in ("id", "conversations")}
            write_image_text_sample(writer, f"{index:08d}", [image], record["conversations"], record["id"],
                                    extra=extra, image_format=params["image_format"])


def _generate(
    kind: str, out_dir: str | os.PathLike, num_train: int, num_val: int, image_size: int, seed: int,
    samples_per_shard: int, image_format: str,
) -> dict[str, Any]:
    out_dir = os.fspath(out_dir)
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28 (one merged patch), got {image_size}")
    result: dict[str, Any] = {"cached": True}
    for split, num in (("train", num_train), ("val", num_val)):
        if num < 0:
            raise ValueError(f"number of {split} samples must be >= 0, got {num}")
        directory = os.path.join(out_dir, split)
        params = {"num": num, "image_size": image_size, "seed": seed, "samples_per_shard": samples_per_shard,
                  "image_format": image_format, "version": SAMPLE_VERSIONS[kind]}
        result[split] = directory
        result[f"num_{split}"] = num
        if meta_is_complete(directory) and read_meta(directory).get("params") == params:
            continue
        if os.path.isdir(directory) and os.listdir(directory):
            owner = _generator_of(directory)
            if owner not in (GENERATOR_PREFIX + kind, GENERATOR_PREFIX + "unknown"):
                raise FileExistsError(f"{directory} exists and was not written by {GENERATOR_PREFIX + kind}; "
                                      "refusing to overwrite it")
        result["cached"] = False
        log.info("writing %d synthetic %s samples (%s) to %s", num, kind, split, directory)
        _write_split(kind, directory, split, num, params)
    return result


def generate_captions(
    out_dir: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 112,
    seed: int = 0,
    samples_per_shard: int = 500,
    image_format: str = "png",
) -> dict[str, Any]:
    """Write `out_dir/train/` and `out_dir/val/` captioning shard sets (each with meta.json).

    A split whose complete meta.json records the same parameters is kept as it is (cached). A split
    directory written by this generator with other parameters is regenerated; any other existing content
    raises FileExistsError. Returns the split directories, their sizes and whether all was cached.
    """
    return _generate("captions", out_dir, num_train, num_val, image_size, seed, samples_per_shard,
                     image_format)


def generate_vqa(
    out_dir: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 112,
    seed: int = 0,
    samples_per_shard: int = 500,
    image_format: str = "png",
) -> dict[str, Any]:
    """Like `generate_captions`, for the one-question VQA samples (use the qwen_2_5 template)."""
    return _generate("vqa", out_dir, num_train, num_val, image_size, seed, samples_per_shard, image_format)


def generate_vqa_blank(
    out_dir: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 112,
    seed: int = 0,
    samples_per_shard: int = 500,
    image_format: str = "png",
) -> dict[str, Any]:
    """Like `generate_vqa` (the same conversations for the same seed), every image a uniform grey."""
    return _generate("vqa-blank", out_dir, num_train, num_val, image_size, seed, samples_per_shard,
                     image_format)


def graded_answers(spec: str | os.PathLike) -> list[tuple[str, str]]:
    """(question, answer) of the last turn of every sample of a shard set."""
    pairs = []
    for shard in list_shards(spec):
        for sample in iter_shard_samples(shard):
            if "json" not in sample:
                raise ValueError(f"{shard}: sample {sample.get('__key__')!r} has no json record")
            turns = json.loads(sample["json"])["conversations"]
            pairs.append((turns[-2]["value"], turns[-1]["value"]))
    return pairs


def score_by_question_type(report: dict[str, Any], train: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Exact match of a `python -m dvlx.eval vl` report per question type, next to image-blind answers.

    chance: the accuracy of always giving the most frequent training answer of the question's type (what an
    image-blind model should do on `vqa` data); `best_constant`: the accuracy of the one answer per type that
    scores best on these very samples (chosen with hindsight, so an upper bound for any model that gives one
    answer per type; it exceeds `chance` by the sampling noise of the evaluated set); `uniform`: one over the
    number of answers of the type. Rows: each type in the report, then `all`.
    """
    answers: dict[str, Counter] = {}
    for question, answer in graded_answers(train):
        answers.setdefault(question_type(question), Counter())[answer.strip().lower()] += 1
    rows: dict[str, dict[str, Any]] = {}
    evaluated: dict[str, Counter] = {}
    for sample in report["samples"]:
        kind = question_type(sample["question"])
        counts = answers.get(kind, Counter())
        majority = counts.most_common(1)[0][0] if counts else ""
        row = rows.setdefault(kind, {"n": 0, "exact_match": 0, "chance": 0, "majority_answer": majority,
                                     "uniform": 1 / len(counts) if counts else 0.0})
        row["n"] += 1
        row["exact_match"] += bool(sample["exact_match"])
        row["chance"] += sample["answer"].strip().lower() == majority
        evaluated.setdefault(kind, Counter())[sample["answer"].strip().lower()] += 1
    for kind, row in rows.items():
        row["best_constant"] = evaluated[kind].most_common(1)[0][1]
    total = {"n": sum(r["n"] for r in rows.values()), "majority_answer": "-"}
    for key in ("exact_match", "chance", "best_constant"):
        total[key] = sum(r[key] for r in rows.values())
    total["uniform"] = sum(r["uniform"] * r["n"] for r in rows.values()) / max(1, total["n"])
    rows = {kind: rows[kind] for kind in sorted(rows)}
    rows["all"] = total
    for row in rows.values():
        for key in ("exact_match", "chance", "best_constant"):
            row[key] = row[key] / max(1, row["n"])
    return rows


def format_scores(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of `score_by_question_type`."""
    lines = ["| question type | n | exact match | chance (majority answer) | best constant | uniform |",
             "|---|---|---|---|---|---|"]
    for kind, row in rows.items():
        lines.append(f"| {kind} | {row['n']} | {row['exact_match']:.3f} | {row['chance']:.3f} "
                     f"({row['majority_answer']}) | {row['best_constant']:.3f} | {row['uniform']:.3f} |")
    return "\n".join(lines)


def _generator_of(directory: str) -> str | None:
    try:
        return read_meta(directory).get("generator")
    except (FileNotFoundError, ValueError):
        # An interrupted earlier run leaves shards but no meta.json; those are ours if they carry our prefix
        # (the generator kind cannot be told then, and either may overwrite them).
        names = os.listdir(directory)
        if names and all(n.startswith(("train-", "val-")) for n in names):
            return GENERATOR_PREFIX + "unknown"
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_modules.synthetic",
                                     description="Generate small synthetic image-text shard sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"captions": "one shape per image, captioned with its colour, shape and quadrant",
             "vqa": "one to three shapes per image, one question about them and its answer",
             "vqa-blank": "the vqa conversations with uniform grey images (text-only control)"}
    for kind, help_text in helps.items():
        command = sub.add_parser(kind, help=help_text, description=help_text)
        command.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
        command.add_argument("--train", type=int, default=2000, help="number of training samples")
        command.add_argument("--val", type=int, default=200, help="number of validation samples")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
        command.add_argument("--samples-per-shard", type=int, default=500)
        command.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding")
    score = sub.add_parser("score", help="exact match of a dvlx.eval vl report per question type and chance",
                           description=score_by_question_type.__doc__.splitlines()[0])
    score.add_argument("report", help="JSON report of python -m dvlx.eval vl on vqa data")
    score.add_argument("--train", required=True, help="the training shards (for the majority answers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "score":
        try:
            with open(args.report, encoding="utf-8") as f:
                report = json.load(f)
            rows = score_by_question_type(report, args.train)
        except (OSError, ValueError, KeyError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(format_scores(rows))
        return 0
    result = _generate(args.command, args.out, args.train, args.val, args.image_size, args.seed,
                       args.samples_per_shard, args.format)
    state = "already complete" if result["cached"] else "written"
    log.info("%s %s: %s (%d), %s (%d)", args.command, state, result["train"], result["num_train"],
             result["val"], result["num_val"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
