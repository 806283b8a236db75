"""Data pipeline throughput: samples/s per worker against a plain tar + JPEG decode loop.

    python -m dvlx.bench.data [--samples 2000] [--image-size 224] [--batch-size 8] [--workers 1,2]
    python -m dvlx.bench.data --kind trajectory [--episodes 40] [--steps 50] [--horizon 8] ...

Both are measured in the same run on the same shards (synthetic captions, or synthetic two-camera
trajectories, JPEG), so the ratio says what the image processor, chat template, tokenizer, collate (and for
trajectories: resize, augmentation, normalisation, the mixture stream) cost on top of reading and decoding.
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


def trajectory_data(out_dir: str, episodes: int, steps: int, image_size: int, max_horizon: int) -> bool:
    """Synthetic two-camera JPEG trajectories (a moving square over a gradient); returns True if reused."""
    import numpy as np

    from data_modules.shards import meta_is_complete, read_meta
    from data_modules.trajectory import TrajectoryShardWriter

    params = {"episodes": episodes, "steps": steps, "image_size": image_size, "max_horizon": max_horizon}
    if meta_is_complete(out_dir) and read_meta(out_dir).get("bench_params") == params:
        return True
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, image_size)
    background = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (image_size, 1)),
                           np.tile(ramp[:, None], (1, image_size))], axis=-1)  # (height, width, 3)
    side = image_size // 6
    with TrajectoryShardWriter(
        out_dir, action_dim=7, proprio_dim=8, cameras=["agent", "wrist"], max_horizon=max_horizon,
        control_hz=20.0, dataset_name="bench", action_norm_mask=[True] * 6 + [False],
        max_samples_per_shard=250, extra_meta={"bench_params": params}, overwrite=True,
    ) as writer:
        for _ in range(episodes):
            start, velocity = rng.uniform(0, image_size - side, 2), rng.uniform(-2, 2, 2)
            frames: dict[str, list] = {"agent": [], "wrist": []}
            for t in range(steps):
                y, x = (np.clip(start + velocity * t, 0, image_size - side)).astype(int)
                for k, camera in enumerate(("agent", "wrist")):
                    pixels = background.copy() if k == 0 else background[::-1].copy()
                    pixels[y:y + side, x:x + side] = (200, 40, 40)
                    pixels += rng.normal(0, 4, pixels.shape)
                    frames[camera].append(np.clip(pixels, 0, 255).astype(np.uint8))
            actions = np.concatenate([rng.normal(0, 0.3, (steps, 6)), rng.integers(0, 2, (steps, 1))], axis=1)
            proprio = rng.normal(size=(steps, 8))
            writer.write_episode(frames, actions, "pick up the red block", proprio=proprio)
    return False


def decode_only_trajectory(shards: list[str]) -> tuple[int, float]:
    """Read every step of `shards`, decode its JPEGs with PIL and its arrays; returns (samples, seconds)."""
    import json

    from data_modules.trajectory import decode_npy

    start = time.perf_counter()
    count = 0
    for path in shards:
        for sample in iter_shard_samples(path):
            for name, data in sample.items():
                if name.endswith(".jpg"):
                    Image.open(io.BytesIO(data)).convert("RGB")
                elif name.endswith(".npy"):
                    decode_npy(data)
            json.loads(sample["json"])
            count += 1
    return count, time.perf_counter() - start


def trajectory_pipeline(data: str, workers: int, batch_size: int, horizon: int, image_size: int
                        ) -> tuple[int, int, float, float]:
    """One training epoch of TrajectoryDataModule with augmentation: (samples, batches, s, s to 1st batch)."""
    from data_modules.trajectory import TrajectoryDataModule

    dm = TrajectoryDataModule(
        datasets=data, tokenizer=build_tiny_tokenizer(), image_processor=ImageProcessor(), horizon=horizon,
        batch_size=batch_size, image_size=image_size, augment=True, num_workers=workers, shuffle_buffer=256,
        val_episodes=0,
    )
    dm.setup()
    loader = dm.train_dataloader()
    start = time.perf_counter()
    first = 0.0
    samples = batches = 0
    for batch in loader:
        if batches == 0:
            first = time.perf_counter() - start
        samples += batch["input_ids"].shape[0]
        batches += 1
    return samples, batches, time.perf_counter() - start, first


def trajectory_main(args: argparse.Namespace, workers: list[int]) -> int:
    data = args.data or os.path.join(
        tempfile.gettempdir(), f"dvlx-bench-trajectory-{args.episodes}x{args.steps}-{args.image_size}"
    )
    start = time.perf_counter()
    reused = trajectory_data(data, args.episodes, args.steps, args.image_size, max(args.horizon, 8))
    state = "reused" if reused else f"generated in {time.perf_counter() - start:.1f} s"
    frames = args.episodes * args.steps
    size = f"{args.image_size}x{args.image_size}"
    print(f"data: {data} ({frames} steps, 2 cameras {size} JPEG, A=7, S=8, {state})")
    n, seconds = decode_only_trajectory(list_shards(data))
    baseline = n / seconds / args.batch_size
    print(f"tar read + PIL decode of 2 JPEGs + arrays, main process: {n} steps in {seconds:.2f} s = "
          f"{n / seconds:.1f} samples/s = {baseline:.2f} batches/s of {args.batch_size}")
    for w in workers:
        n, batches, seconds, first = trajectory_pipeline(
            data, w, args.batch_size, args.horizon, args.image_size
        )
        total = batches / seconds
        per_worker = total / w
        print(
            f"TrajectoryDataModule (augment, H={args.horizon}), {w} worker(s), batch {args.batch_size}: "
            f"{batches} batches ({n} samples) in {seconds:.2f} s (first batch after {first:.2f} s) = "
            f"{total:.2f} batches/s, {per_worker:.2f} per worker; per-worker / decode-only = "
            f"{per_worker / baseline:.2f}, total / decode-only = {total / baseline:.2f}"
        )
    return 0


def machine() -> str:
    return (f"{platform.node()} | {platform.platform()} | {platform.processor() or platform.machine()} | "
            f"{os.cpu_count()} CPUs | python {platform.python_version()} | torch {torch.__version__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("image_text", "trajectory"), default="image_text",
                        help="which pipeline to measure")
    parser.add_argument("--samples", type=int, default=2000, help="synthetic training samples (image_text)")
    parser.add_argument("--episodes", type=int, default=40, help="synthetic episodes (trajectory)")
    parser.add_argument("--steps", type=int, default=50, help="steps per synthetic episode (trajectory)")
    parser.add_argument("--horizon", type=int, default=8, help="action chunk H (trajectory)")
    parser.add_argument("--image-size", type=int, default=224, help="square image side (JPEG, quality 95)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="comma-separated dataloader worker counts")
    parser.add_argument("--data", default=None, help="shard folder to reuse (default: one in the temp dir)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1:
        parser.error(f"--workers needs positive worker counts, got {args.workers!r}")
    command = "python -m dvlx.bench.data " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    print(f"command: {command}")
    print(f"machine: {machine()}")
    if args.kind == "trajectory":
        return trajectory_main(args, workers)
    data = args.data or os.path.join(
        tempfile.gettempdir(), f"dvlx-bench-data-{args.samples}-{args.image_size}"
    )
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
