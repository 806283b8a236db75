"""Converters from other dataset formats into dvlx shards; `python -m data_modules.convert SUBCOMMAND ...`.

    python -m data_modules.convert llava --json X.json --images DIR --out DIR \
        [--samples-per-shard N] [--prefix P]

Each subcommand registers an argument builder and a runner with `register_converter`; modules listed in
`CONVERTER_MODULES` are imported by `main` so that they can register theirs.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from data_modules.shards import ShardWriter, count_placeholders, write_image_text_sample
from dvlx.processing import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

# Modules that define more subcommands (each calls `register_converter` at import).
CONVERTER_MODULES: tuple[str, ...] = ("data_modules.convert_libero", "data_modules.convert_lerobot")

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
_CONVERTERS: dict[str, tuple[str, AddArguments, Run]] = {}

LLAVA_SKIP_KINDS = (
    "bad_json_line", "missing_conversations", "unsupported_video", "missing_image", "unreadable_image",
    "placeholder_mismatch",
)


def register_converter(
    name: str,
    help: str,
    add_arguments: AddArguments,
    run: Run,
) -> None:
    """Add subcommand `name`; `run(args)` returns the process exit code."""
    if name in _CONVERTERS:
        raise ValueError(f"converter {name!r} is already registered")
    _CONVERTERS[name] = (help, add_arguments, run)


class _BadRecord(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class ConversionReport:
    """What a conversion wrote and skipped."""

    source: str
    out_dir: str
    records: int = 0
    written: int = 0
    shards: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        return (f"converted {self.written} of {self.records} records from {self.source} into {self.shards} "
                f"shards in {self.out_dir}; skipped: {skipped}")


def _read_llava_records(path: str) -> Iterator[tuple[int, Any]]:
    """(index, record) pairs of a LLaVA .json list or .jsonl file; a bad .jsonl line gives an exception."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as error:
                    yield index, _BadRecord("bad_json_line", f"line does not parse: {error}")
        return
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    yield from enumerate(records)


def _load_image(images_dir: str, relative: Any) -> tuple[bytes, str]:
    """Bytes and extension of one image: JPEG and PNG as they are, anything else re-encoded as PNG."""
    if not isinstance(relative, str) or not relative:
        raise _BadRecord("missing_image", f"image path must be a non-empty string, got {relative!r}")
    path = os.path.join(images_dir, relative)
    if not os.path.isfile(path):
        raise _BadRecord("missing_image", f"image file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _BadRecord("unreadable_image", f"{path}: {type(error).__name__}: {error}") from None
    if image.format == "JPEG":
        return data, "jpg"
    if image.format == "PNG":
        return data, "png"
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _convert_record(record: Any, images_dir: str) -> tuple[str | None, list[tuple[bytes, str]], list, dict]:
    if not isinstance(record, dict):
        raise _BadRecord("missing_conversations", f"record must be an object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations or not all(
            isinstance(t, dict) and isinstance(t.get("value", t.get("content")), str) for t in conversations):
        raise _BadRecord("missing_conversations", "'conversations' must be a non-empty list of text turns")
    if "video" in record:
        raise _BadRecord("unsupported_video", "video records are not supported")
    image_field = record.get("image")
    relatives = [] if image_field is None else image_field if isinstance(image_field, list) else [image_field]
    placeholders = count_placeholders([{"value": t.get("value", t.get("content"))} for t in conversations],
                                      IMAGE_PLACEHOLDER)
    if placeholders != len(relatives):
        raise _BadRecord("placeholder_mismatch",
                         f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(relatives)} images")
    images = [_load_image(images_dir, relative) for relative in relatives]
    extra = {k: v for k, v in record.items() if k not in ("id", "image", "conversations", "num_images")}
    if relatives:
        extra["source_images"] = relatives
    record_id = record.get("id")
    return (None if record_id is None else str(record_id)), images, conversations, extra


def convert_llava(
    json_path: str,
    images_dir: str,
    out_dir: str,
    samples_per_shard: int = 1000,
    prefix: str = "train",
    max_bytes_per_shard: int = 1 << 30,
    overwrite: bool = False,
) -> ConversionReport:
    """Write the records of a LLaVA JSON/JSONL file (images relative to `images_dir`) as image-text shards.

    Bad records are skipped, logged with file, index and id, and counted per kind in the report. If nothing
    could be written, no meta.json is written either.
    """
    report = ConversionReport(source=json_path, out_dir=out_dir, skipped=dict.fromkeys(LLAVA_SKIP_KINDS, 0))
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"LLaVA JSON file {json_path} does not exist")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    meta = {"source": f"LLaVA records {os.path.abspath(json_path)}, images {os.path.abspath(images_dir)}"}
    writer = ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard,
                         max_bytes_per_shard=max_bytes_per_shard, meta=meta, overwrite=overwrite)
    try:
        for index, record in _read_llava_records(json_path):
            report.records += 1
            record_id = record.get("id") if isinstance(record, dict) else None
            try:
                if isinstance(record, _BadRecord):
                    raise record
                record_id, images, conversations, extra = _convert_record(record, images_dir)
            except _BadRecord as bad:
                report.skipped[bad.kind] += 1
                log.warning("%s record %d (id %s): skipped, %s: %s", json_path, index, record_id, bad.kind,
                            bad.reason)
                continue
            if record_id is None:
                record_id = f"{os.path.basename(json_path)}:{index}"
            write_image_text_sample(writer, f"{report.written:09d}", images, conversations, record_id,
                                    extra=extra)
            report.written += 1
    except BaseException:
        writer.abort()
        raise
    if report.written == 0:
        writer.abort()
    else:
        report.shards = len(writer.close()["shards"])
    return report


def _llava_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="LLaVA records: a .json list or a .jsonl file")
    parser.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, help="output shard folder (gets meta.json)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")


def _llava_run(args: argparse.Namespace) -> int:
    report = convert_llava(
        args.json, args.images, args.out, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
        max_bytes_per_shard=args.max_shard_bytes, overwrite=args.overwrite,
    )
    log.info("%s", report.summary())
    if report.written == 0:
        log.error("no record of %s could be converted; nothing was written to %s", args.json, args.out)
        return 2
    return 0


register_converter("llava", "LLaVA JSON/JSONL records + image folder -> image-text shards", _llava_arguments,
                   _llava_run)


def main(argv: Sequence[str] | None = None) -> int:
    for module in CONVERTER_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="python -m data_modules.convert",
                                     description="Convert datasets into dvlx WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in _CONVERTERS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _CONVERTERS[args.command][2](args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    # Run the imported module's main, whose registry is the one other converter modules register into.
    from data_modules.convert import main as _main

    sys.exit(_main())
