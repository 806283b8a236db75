"""Scripted demonstrations in robosuite (see `data_modules.sim`), written as trajectory shards.

    python -m data_modules.demos robosuite-lift --episodes N --out DIR [--seed S] [--image-size P]
        [--max-horizon H] [--workers W] [--action-noise SIGMA]
    python -m data_modules.demos robosuite-lift-color --episodes N --out DIR ...

Episode i of a run seeded S starts from `sim.reset(env, seed=S, index=i)`; the scripted expert drives it for
at most `max_steps` control steps and it ends `post_success_steps` steps after the task first succeeds.
Episodes that end without success are dropped; the run attempts indices 0, 1, 2, ... until N episodes have
succeeded and writes those, in index order, so the output does not depend on the number of worker processes.
`action_noise` > 0 adds Gaussian noise (seeded per episode) to the executed position deltas while the
recorded actions stay the expert's commands, which shows the learner how to recover from small errors.

A directory whose complete `meta.json` records the same parameters is left as it is.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_modules import sim
from data_modules.shards import meta_is_complete, read_meta

log = logging.getLogger(__name__)

GENERATOR = "data_modules.demos"
# Separates the action-noise stream of an episode from its reset seed.
_NOISE_TAG = 1


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of one demonstration set (all but `workers` are recorded in meta.json)."""

    task: str
    episodes: int
    out: str
    seed: int = 0
    image_size: int = sim.DEFAULT_IMAGE_SIZE
    max_horizon: int = 16
    workers: int = 1
    max_steps: int = sim.MAX_EPISODE_STEPS
    post_success_steps: int = 10
    action_noise: float = 0.0
    jpeg_quality: int = 95
    max_attempts: int | None = None
    """Episode indices tried before giving up (default max(2 N, N + 20))."""

    def __post_init__(self) -> None:
        if self.task not in sim.ENV_NAMES:
            raise ValueError(f"task must be one of {list(sim.ENV_NAMES)}, got {self.task!r}")
        for key, low in (("episodes", 1), ("seed", 0), ("image_size", 8), ("max_horizon", 1), ("workers", 1),
                         ("max_steps", 1), ("post_success_steps", 0), ("jpeg_quality", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        if self.max_attempts is not None and self.max_attempts < self.episodes:
            raise ValueError(f"max_attempts ({self.max_attempts}) must be >= episodes ({self.episodes})")

    @property
    def attempts(self) -> int:
        return self.max_attempts or max(2 * self.episodes, self.episodes + 20)

    def params(self) -> dict[str, Any]:
        """What determines the output (compared for caching)."""
        out = asdict(self)
        for key in ("out", "workers", "max_attempts"):
            out.pop(key)
        return out


@dataclass
class Episode:
    """One expert episode: observation t (images, proprio) and the expert's action t, for t < steps."""

    index: int
    success: bool
    steps: int
    instruction: str
    seconds: float
    actions: np.ndarray
    proprio: np.ndarray
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)


def episode_id(seed: int, index: int) -> str:
    return f"seed{seed}_ep{index:06d}"


def record_episode(env, config: DemoConfig, index: int) -> Episode:
    """Run the scripted expert on episode `index` of `env` (built by `sim.make_env`) and record it."""
    start = time.perf_counter()
    obs = sim.reset(env, seed=config.seed, index=index)
    expert = sim.ScriptedLiftExpert()
    noise = np.random.default_rng([config.seed, index, _NOISE_TAG])
    images: dict[str, list[np.ndarray]] = {camera: [] for camera in obs["images"]}
    proprio, actions = [], []
    succeeded_at = None
    for t in range(config.max_steps):
        action = expert.act(env)
        for camera, frame in obs["images"].items():
            images[camera].append(frame)
        proprio.append(obs["proprio"])
        actions.append(action)
        executed = action.copy()
        if config.action_noise > 0:
            executed[:3] += noise.normal(0.0, config.action_noise, size=3)
        obs = sim.step(env, executed)
        if succeeded_at is None and sim.success(env):
            succeeded_at = t
        if succeeded_at is not None and t - succeeded_at >= config.post_success_steps:
            break
    ok = succeeded_at is not None and sim.success(env)
    return Episode(
        index=index,
        success=ok,
        steps=len(actions),
        instruction=obs["instruction"],
        seconds=time.perf_counter() - start,
        actions=np.stack(actions).astype(np.float32),
        proprio=np.stack(proprio).astype(np.float32),
        # Failed episodes are not written, so their frames need not travel back from a worker.
        images=images if ok else {},
    )


_WORKER: dict[str, Any] = {}


def _init_worker(config: DemoConfig) -> None:
    _WORKER["config"] = config
    _WORKER["env"] = sim.make_env(config.task, seed=config.seed, image_size=config.image_size)


def _worker_episode(index: int) -> Episode:
    return record_episode(_WORKER["env"], _WORKER["config"], index)


def _episodes(config: DemoConfig) -> Iterator[Episode]:
    """Episodes 0, 1, ... (up to `config.attempts`) in index order, from one process or a pool."""
    indices = range(config.attempts)
    if config.workers == 1:
        env = sim.make_env(config.task, seed=config.seed, image_size=config.image_size)
        try:
            for index in indices:
                yield record_episode(env, config, index)
        finally:
            # Freeing the renderer now, while the EGL display is alive, avoids errors at interpreter exit.
            env.close()
        return
    # Fresh interpreters: a forked child would share the parent's OpenGL and numba state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        # Leaving the block (enough episodes, or an error) terminates the workers and their extra episodes.
        yield from pool.imap(_worker_episode, indices)


def _existing(out: str, params: dict[str, Any]) -> str:
    """'none', 'same' (complete with these parameters), 'ours' (ours, other parameters or unfinished) or
    'foreign'."""
    if meta_is_complete(out):
        generator = read_meta(out).get("generator") or {}
        if generator.get("name") != GENERATOR:
            return "foreign"
        return "same" if generator.get("params") == params else "ours"
    if not os.path.isdir(out) or not os.listdir(out):
        return "none"
    # An interrupted run leaves shards (and maybe an unreadable meta.json) behind.
    names = os.listdir(out)
    return "ours" if all(n.startswith("train-") or n == "meta.json" for n in names) else "foreign"


def generate_demos(config: DemoConfig) -> dict[str, Any]:
    """Write `config.episodes` successful expert episodes to `config.out` (see the module docstring).

    Returns a summary: out, cached, episodes, attempts, expert_success_rate, failed_indices, episode_indices
    and, unless cached, seconds, seconds_per_episode (wall time per attempted episode), steps_per_second and
    workers."""
    params = config.params()
    state = _existing(config.out, params)
    if state == "same":
        meta = read_meta(config.out)
        log.info("%s already holds these %d episodes; nothing to do", config.out, meta["num_episodes"])
        return {"out": config.out, "cached": True, "episodes": meta["num_episodes"], **meta["expert"]}
    # Imported here: worker processes import this module and need neither torch nor the writer.
    from data_modules.trajectory import TrajectoryShardWriter

    if state == "foreign":
        raise FileExistsError(
            f"{config.out} holds files not written by {GENERATOR}; refusing to overwrite them"
        )
    instructions = (
        [sim.LIFT_INSTRUCTION]
        if config.task == "robosuite-lift"
        else [sim.color_instruction(c) for c in sim.CUBE_COLORS]
    )
    extra_meta = {
        "image_orientation": sim.IMAGE_ORIENTATION,
        "image_orientation_note": sim.IMAGE_ORIENTATION_NOTE,
        "instructions": instructions,
        "generator": {"name": GENERATOR, "params": params},
        "simulator": {
            **sim.SIM_VERSIONS,
            "robot": "Panda",
            "controller": "OSC_POSE",
            "max_episode_steps": config.max_steps,
            "episode_seeds": "numpy.random.SeedSequence([seed, index]) (data_modules.sim.episode_seed)",
        },
    }
    start = time.perf_counter()
    attempts, steps, indices = 0, 0, []
    failed: list[int] = []
    with TrajectoryShardWriter(
        config.out,
        action_dim=len(sim.ACTION_NAMES),
        proprio_dim=len(sim.PROPRIO_NAMES),
        cameras=list(sim.CAMERAS),
        max_horizon=config.max_horizon,
        control_hz=float(sim.CONTROL_HZ),
        dataset_name=config.task,
        action_names=sim.ACTION_NAMES,
        proprio_names=sim.PROPRIO_NAMES,
        action_norm_mask=sim.ACTION_NORM_MASK,
        jpeg_quality=config.jpeg_quality,
        extra_meta=extra_meta,
        overwrite=state == "ours",
    ) as writer:
        episodes = _episodes(config)
        try:
            for episode in episodes:
                attempts += 1
                steps += episode.steps
                if episode.success:
                    writer.write_episode(
                        images=episode.images,
                        actions=episode.actions,
                        instruction=episode.instruction,
                        proprio=episode.proprio,
                        episode_id=episode_id(config.seed, episode.index),
                    )
                    indices.append(episode.index)
                else:
                    failed.append(episode.index)
                log.info(
                    "episode %d: %s in %d steps (%.1f s); %d/%d written",
                    episode.index, "success" if episode.success else "FAILED", episode.steps, episode.seconds,
                    len(indices), config.episodes,
                )
                if len(indices) == config.episodes:
                    break
        finally:
            episodes.close()
        if len(indices) < config.episodes:
            raise RuntimeError(
                f"{config.task}: the expert succeeded in only {len(indices)} of {attempts} episodes "
                f"(seed {config.seed}); {config.episodes} were asked for"
            )
        expert = {
            "attempts": attempts,
            "expert_success_rate": len(indices) / attempts,
            "failed_indices": failed,
            "episode_indices": indices,
        }
        # Known only now; the writer merges extra_meta into meta.json when the block closes. Timings stay
        # out of meta.json so that the same parameters give the same file.
        writer.extra_meta["expert"] = expert
    seconds = time.perf_counter() - start
    timing = {
        "seconds": seconds,
        "seconds_per_episode": seconds / attempts,
        "steps_per_second": steps / seconds,
        "workers": config.workers,
    }
    log.info(
        "wrote %d episodes to %s: expert success %d/%d, %.1f s (%.2f s per episode, %d workers)",
        len(indices), config.out, len(indices), attempts, seconds, seconds / attempts, config.workers,
    )
    return {"out": config.out, "cached": False, "episodes": len(indices), **expert, **timing}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.demos",
        description="Record scripted robosuite demonstrations as trajectory shards.",
    )
    parser.add_argument("task", choices=sim.ENV_NAMES)
    parser.add_argument("--episodes", type=int, required=True, help="number of successful episodes to write")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--seed", type=int, default=0, help="episode i starts from the seed (SEED, i)")
    parser.add_argument("--image-size", type=int, default=sim.DEFAULT_IMAGE_SIZE,
                        help="side of the square camera images (px)")
    parser.add_argument("--max-horizon", type=int, default=16, help="actions stored per step")
    parser.add_argument("--workers", type=int, default=1,
                        help="simulator processes (the output does not depend on it)")
    parser.add_argument("--max-steps", type=int, default=sim.MAX_EPISODE_STEPS, help="episode length cap")
    parser.add_argument("--post-success-steps", type=int, default=10, help="steps recorded after success")
    parser.add_argument("--action-noise", type=float, default=0.0,
                        help="std of Gaussian noise on the executed (not recorded) position deltas")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DemoConfig(
        task=args.task, episodes=args.episodes, out=args.out, seed=args.seed, image_size=args.image_size,
        max_horizon=args.max_horizon, workers=args.workers, max_steps=args.max_steps,
        post_success_steps=args.post_success_steps, action_noise=args.action_noise,
        jpeg_quality=args.jpeg_quality,
    )
    generate_demos(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
