"""Image-text data pipeline throughput: samples/s per worker against a plain tar + JPEG decode loop.

    python -m dvlx.bench.data [--samples 2000] [--image-size 224] [--batch-size 8] [--workers 1,2]

Both are measured in the same run on the same shards (synthetic captions, JPEG), so the ratio says what the
image processor, chat template, tokenizer and collate cost on top of reading and decoding.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from PIL import Image

from data_modules.image_text import ImageTextDataModule
from data_modules.shards import iter_shard_samples, list_shards
from data_modules.synthetic import generate_captions
from dvlx.processing import ImageProcessor, build_tiny_tokenizer


def decode_only(shards: list[str]) -> tuple[int, float]:
    """Read every sample of `shards` and decode its JPEGs with PIL; returns (samples, seconds)."""
    start = time.perf_counter()
    count = 0
    for path in shards:
        for sample in iter_shard_samples(path):
            for name, data in sample.items():
                if name.startswith("img"):
                    Image.open(io.BytesIO(data)).convert("RGB")
            count += 1
    return count, time.perf_counter() - start


def full_pipeline(train_dir: str, workers: int, batch_size: int) -> tuple[int, float, float]:
    """One training epoch of ImageTextDataModule; returns (samples, seconds, seconds to the first batch)."""
    dm = ImageTextDataModule(
        train=train_dir, tokenizer=build_tiny_tokenizer(), image_processor=ImageProcessor(), template="plain",
        batch_size=batch_size, num_workers=workers, shuffle_buffer=256,
    )
    dm.setup()
    loader = dm.train_dataloader()
    start = time.perf_counter()
    first = 0.0
    count = 0
    for batch in loader:
        if count == 0:
            first = time.perf_counter() - start
        count += batch["input_ids"].shape[0]
    return count, time.perf_counter() - start, first


def machine() -> str:
    return (f"{platform.node()} | {platform.platform()} | {platform.processor() or platform.machine()} | "
            f"{os.cpu_count()} CPUs | python {platform.python_version()} | torch {torch.__version__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="synthetic training samples")
    parser.add_argument("--image-size", type=int, default=224, help="square image side (JPEG, quality 95)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="comma-separated dataloader worker counts")
    parser.add_argument("--data", default=None, help="shard folder to reuse (default: one in the temp dir)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1:
        parser.error(f"--workers needs positive worker counts, got {args.workers!r}")
    data = args.data or os.path.join(
        tempfile.gettempdir(), f"dvlx-bench-data-{args.samples}-{args.image_size}"
    )
    command = "python -m dvlx.bench.data " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    print(f"command: {command}")
    print(f"machine: {machine()}")
    start = time.perf_counter()
    result = generate_captions(data, num_train=args.samples, num_val=0, image_size=args.image_size, seed=0,
                               samples_per_shard=250, image_format="jpeg")
    state = "reused" if result["cached"] else f"generated in {time.perf_counter() - start:.1f} s"
    size = f"{args.image_size}x{args.image_size}"
    print(f"data: {result['train']} ({args.samples} samples, {size} JPEG, {state})")

    n, seconds = decode_only(list_shards(result["train"]))
    baseline = n / seconds
    print(f"tar read + PIL decode, main process: {n} samples in {seconds:.2f} s = {baseline:.1f} samples/s")
    for w in workers:
        n, seconds, first = full_pipeline(result["train"], w, args.batch_size)
        total = n / seconds
        per_worker = total / w
        print(
            f"ImageTextDataModule, {w} worker(s), batch {args.batch_size}: {n} samples in {seconds:.2f} s "
            f"(first batch after {first:.2f} s) = {total:.1f} samples/s, {per_worker:.1f} per worker; "
            f"per-worker / decode-only = {per_worker / baseline:.2f}, "
            f"total / decode-only = {total / baseline:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
