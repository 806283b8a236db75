"""Closed-loop evaluation throughput: simulator steps/s with 1 and W worker processes, and policy queries/s
answered one by one against batched.

    python -m dvlx.bench rollout [--env robosuite-lift] [--workers 2] [--episodes 2] [--steps 50]
        [--image-size 64] [--batch 4] [--repeats 5] [--threads 1] [--policy EXPORT] [--libero-assets DIR]

Simulator: `--episodes` episodes of `--steps` steps per worker through `dvlx.eval.rollout.RolloutPool`, the
policy replaced by a constant chunk (zero motion), so the figure is the environments' own rate including the
worker round trips; every worker count starts a fresh pool, whose start-up and one warm-up episode per worker
(building the environment) are not timed. Policy: the
export given, else the tiny preset with random weights and a flow-matching head (4 Euler steps, chunk 8,
cameras of `--image-size`); `--batch` observations answered by one `predict_batch` call against as many
`predict` calls, median of `--repeats` rounds after a warm-up. The ratios say what W workers and batching buy
on this machine; other processes on it change the absolute figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from dvlx.eval.rollout import ENVS, RolloutPool, RolloutSettings, plan_rollout

SEED = 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="robosuite-lift", choices=ENVS)
    parser.add_argument("--workers", type=int, default=2, help="W: the parallel worker count compared with 1")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per worker")
    parser.add_argument("--steps", type=int, default=50, help="steps per episode")
    parser.add_argument("--image-size", type=int, default=64, help="camera size (and the random policy's)")
    parser.add_argument("--batch", type=int, default=4, help="observations per batched policy call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of policy calls (median)")
    parser.add_argument("--threads", type=int, default=1, help="policy CPU threads (0: torch's default)")
    parser.add_argument("--policy", default=None, help="a VLA export (default: a random tiny policy)")
    parser.add_argument("--libero-assets", default=None, help="LIBERO assets folder (LIBERO environments)")
    return parser


def random_policy(image_size: int, env: str):
    """The tiny preset, random weights, flow matching (4 steps), a spec of the simulators' shape."""
    from data_modules import libero_env
    from dvlx.backbone import DreamVL, preset_config
    from dvlx.config import ObjectiveConfig
    from dvlx.objectives import objective_class
    from dvlx.policy import Policy
    from dvlx.processing import ImageProcessor, build_tiny_tokenizer
    from dvlx.processing.robot import ActionSpec, ArrayStats, Normalizer

    def stats(dim: int) -> ArrayStats:
        return ArrayStats(mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim, max=[1.0] * dim,
                          q01=[-1.0] * dim, q99=[1.0] * dim, count=1)

    libero = env in libero_env.SUITES
    cameras = ["agentview_rgb", "eye_in_hand_rgb"] if libero else ["agentview", "robot0_eye_in_hand"]
    gripper = libero_env.GRIPPER_OPEN_NAME if libero else "gripper"
    spec = ActionSpec(
        horizon=8, max_horizon=8, action_dim=7, proprio_dim=8, cameras=cameras,
        action_names=[f"a{i}" for i in range(6)] + [gripper], proprio_names=[f"s{i}" for i in range(8)],
        control_hz=20.0, action_normalizer=Normalizer("bounds_q99", stats(7), [True] * 6 + [False]),
        proprio_normalizer=Normalizer("bounds_q99", stats(8), [True] * 8), image_size=image_size,
        center_crop=0.9,
    )
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    backbone = DreamVL(preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids()))
    backbone.config.attention = "prefix"
    cfg = ObjectiveConfig(name="flow_matching", steps=4)
    objective = objective_class(cfg.name)(spec, backbone.config.hidden_size, cfg, tokenizer)
    processor = ImageProcessor(min_pixels=image_size**2, max_pixels=image_size**2)
    return Policy(backbone, objective, tokenizer, processor, spec, source="random tiny policy")


def env_rate(settings: RolloutSettings, spec, workers: int, episodes: int) -> tuple[float, float]:
    """(environment steps per second, start-up seconds) of `workers` processes playing `episodes` each."""
    plan = plan_rollout(dataclasses.replace(settings, workers=workers, episodes=episodes * workers), spec)
    horizon, dim = spec.horizon, spec.action_dim

    def still(observations: list) -> np.ndarray:
        # Zero motion; the gripper stays open in both gripper conventions.
        chunk = np.zeros((len(observations), horizon, dim), dtype=np.float32)  # [B, H, A]
        chunk[..., -1] = 1.0 if plan.worker.gripper_open_convention else -1.0
        return chunk

    warm_up = [dataclasses.replace(e, index=e.index + len(plan.episodes)) for e in plan.episodes[:workers]]
    start = time.perf_counter()
    with RolloutPool(plan.worker, workers, settings.start_method) as pool:
        # One episode per worker builds its environment (and MuJoCo's renderer) outside the timed run.
        pool.run(warm_up, still)
        startup = time.perf_counter() - start
        results, stats = pool.run(plan.episodes, still)
    steps = sum(r.length for r in results)
    return steps / stats.seconds, startup


def policy_rates(policy, batch: int, repeats: int, image_size: int) -> tuple[float, float]:
    """(queries/s one observation per call, queries/s `batch` observations per call)."""
    rng = np.random.default_rng(SEED)
    observations = [
        {
            "images": {c: rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
                       for c in policy.spec.cameras},
            "proprio": rng.uniform(-1, 1, size=policy.spec.proprio_dim).astype(np.float32),
            "instruction": "lift the cube",
        }
        for _ in range(batch)
    ]

    def single() -> None:
        for obs in observations:
            policy.predict(obs)

    def batched() -> None:
        policy.predict_batch(observations)

    times: dict[str, list[float]] = {"single": [], "batched": []}
    single()
    batched()
    for _ in range(repeats):
        for name, call in (("single", single), ("batched", batched)):
            tic = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - tic)
    return batch / statistics.median(times["single"]), batch / statistics.median(times["batched"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for key in ("workers", "episodes", "steps", "image_size", "batch", "repeats"):
        if getattr(args, key) < 1:
            print(f"error: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.policy:
        from dvlx.policy import Policy

        policy = Policy.from_pretrained(args.policy)
    else:
        policy = random_policy(args.image_size, args.env)
    libero = args.env.startswith("libero")
    settings = RolloutSettings(env=args.env, max_steps=args.steps, camera_size=args.image_size,
                               libero_assets=args.libero_assets, tasks=(0,) if libero else None)
    print(f"$ python -m dvlx.bench rollout {shlex.join(argv)}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} policy thread(s); {args.env}, {args.image_size} px cameras, "
          f"{args.episodes} episodes x {args.steps} steps per worker")
    rates = {}
    for workers in sorted({1, args.workers}):
        rate, startup = env_rate(settings, policy.spec, workers, args.episodes)
        rates[workers] = rate
        print(f"workers {workers:2d}: {rate:8.1f} env steps/s   (start-up and one warm-up episode per worker "
              f"{startup:.1f} s, not timed)")
    if args.workers != 1:
        print(f"{args.workers} workers / 1 worker: {rates[args.workers] / rates[1]:.2f}x")
    single, batched = policy_rates(policy, args.batch, args.repeats, args.image_size)
    print(f"policy ({policy.source}): {single:8.1f} queries/s one by one, {batched:8.1f} queries/s in "
          f"batches of {args.batch}: {batched / single:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
