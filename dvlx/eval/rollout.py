"""`python -m dvlx.eval rollout`: closed-loop evaluation of a VLA export in robosuite or LIBERO.

    python -m dvlx.eval rollout --policy EXPORT --env ENV --episodes N --workers W [--open-loop-steps K]
        [--video DIR] [--seed 7] [--max-steps T] [--tasks 0 3 ...] [--start-index J] [--instruction swap]
        [--libero-assets DIR] [--out REPORT.json]

ENV is `robosuite-lift`, `robosuite-lift-color` (`data_modules.sim`) or a LIBERO suite (`libero_spatial`,
`libero_object`, `libero_goal`, `libero_10`, `libero_90`; `data_modules.libero_env`, which states the
protocol). `--episodes` counts per task: robosuite has one task whose episode i starts from the seed
(SEED, START + i); a LIBERO task's episode j starts from its fixed initial state START + j.

The environments run in W worker processes (forked from a forkserver that imported torch and the simulators
once, or spawned with `--start-method spawn`; MuJoCo renders with EGL). Each worker plays whole episodes with
a `dvlx.policy.ChunkExecutor`: when its queue of actions is empty it sends the observation to the main
process, which holds the policy and answers every worker waiting at that moment with one
`Policy.predict_batch` call. A worker executes the first K actions of each chunk (K = `--open-loop-steps`,
default the chunk length), so it talks to the main process once per chunk. Simulator errors inside an
episode count as failures (recorded with the error); a missing asset or package stops the run.

Observations reach the policy as in training: simulator frames in the data's orientation (robosuite upright,
LIBERO turned 180 degrees), a JPEG round trip at the training data's quality (`--jpeg-quality`, 0 = off;
trajectory shards store JPEG frames), then the policy's own resize to the trained size and centre crop.

The JSON report (`--out`) records the protocol (suite, task ids, initial-state or episode indices, seeds,
step limits, wait steps, open-loop steps, image preprocessing, gripper post-processing, simulator and
renderer versions), the policy (export path, action spec and fingerprint), per-task and overall success
rates and episode lengths, and one entry per episode. `--video DIR` writes one MP4 per episode (all cameras
side by side, as the policy sees them before resizing).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import shlex
import sys
import time
import traceback
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from data_modules import libero_env

log = logging.getLogger(__name__)

ROBOSUITE_ENVS = ("robosuite-lift", "robosuite-lift-color")
ENVS = (*ROBOSUITE_ENVS, *libero_env.SUITES)
DEFAULT_SEED = 7
DEFAULT_EPISODES = 50
DEFAULT_JPEG_QUALITY = 95
INSTRUCTION_MODES = ("env", "swap")
ROBOSUITE_CAMERAS = ("agentview", "robot0_eye_in_hand")
WRIST_WORDS = ("eye_in_hand", "wrist", "hand")
START_METHODS = ("forkserver", "spawn")
# Environment variables a worker takes from the main process at each run: a forkserver's children otherwise
# see the environment of the moment the server started.
WORKER_ENV_KEYS = ("LIBERO_CONFIG_PATH", libero_env.ASSETS_ENV, libero_env.CACHE_ENV)
FORKSERVER_PRELOAD = ("dvlx.eval.rollout", "dvlx.policy", "data_modules.sim")
# Frames of an episode kept for a TensorBoard strip are sampled from at most this many stored frames.
_MAX_STORED_FRAMES = 64


class RolloutError(RuntimeError):
    """The rollout cannot go on: a worker failed to start, lost its environment or died."""


def is_libero(env: str) -> bool:
    return env in libero_env.SUITES


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RolloutSettings:
    """What to run; `None` fields take the environment's or the policy's default (see `resolve`)."""

    env: str
    episodes: int = DEFAULT_EPISODES
    """Per task."""
    workers: int = 1
    open_loop_steps: int | None = None
    """Actions executed from each chunk; None = the whole chunk."""
    max_steps: int | None = None
    """Policy steps per episode; None = the suite's limit (LIBERO) or `sim.MAX_EPISODE_STEPS`."""
    seed: int = DEFAULT_SEED
    tasks: tuple[int, ...] | None = None
    """LIBERO task ids to run (None = all)."""
    start_index: int = 0
    camera_size: int | None = None
    """Rendered square size; None = 256 (LIBERO, the reference) or the policy's image size (robosuite)."""
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    instruction: str = "env"
    """`env` (the task's) or `swap` (another task's / the other cube's, to test language conditioning)."""
    sampling_steps: int | None = None
    libero_assets: str | None = None
    video_dir: str | None = None
    camera_map: Mapping[str, str] | None = None
    """Policy camera -> simulator camera overrides (default: `match_cameras`)."""
    start_method: str = "forkserver"

    def __post_init__(self) -> None:
        if self.env not in ENVS:
            raise ValueError(f"unknown environment {self.env!r}; expected one of {list(ENVS)}")
        for key, low in (("episodes", 1), ("workers", 1), ("start_index", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")
        for key in ("open_loop_steps", "max_steps", "camera_size", "sampling_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {list(START_METHODS)}, got {self.start_method!r}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [0, 100] (0 = off), got {self.jpeg_quality}")
        if self.instruction not in INSTRUCTION_MODES:
            raise ValueError(f"instruction must be one of {list(INSTRUCTION_MODES)}, got "
                             f"{self.instruction!r}")
        if self.instruction == "swap" and self.env == "robosuite-lift":
            raise ValueError("robosuite-lift has one instruction: swap needs robosuite-lift-color or LIBERO")
        if self.tasks is not None and not is_libero(self.env):
            raise ValueError(f"--tasks selects LIBERO tasks; {self.env} has one task")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs (pickled to it)."""

    env: str
    camera_map: dict[str, str]
    camera_size: int
    seed: int
    max_steps: int
    open_loop_steps: int
    jpeg_quality: int
    instructions: dict[int, str] | None
    """LIBERO: the instruction given per task id (swapped ones); None = each task's own."""
    swap_instruction: bool
    libero_assets: str | None
    gripper_open_convention: bool
    video_dir: str | None
    video_fps: int
    environ: dict[str, str] = field(default_factory=dict)
    """`WORKER_ENV_KEYS` as set in the main process."""


@dataclass(frozen=True)
class EpisodeSpec:
    number: int
    """Position in the plan (reports list episodes in this order)."""
    task_id: int
    index: int
    """robosuite: the episode index of the seed (seed, index); LIBERO: the initial-state index."""
    keep_frames: int = 0
    """Frames returned for a TensorBoard strip (0 = none)."""


@dataclass
class EpisodeResult:
    number: int
    task_id: int
    index: int
    success: bool
    length: int
    """Policy steps executed (LIBERO wait steps excluded)."""
    instruction: str
    seconds: float
    queries: int
    error: str | None = None
    video: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    frames: list[np.ndarray] | None = None


def match_cameras(
    policy_cameras: Sequence[str], env_cameras: tuple[str, str], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Policy camera -> simulator camera (`env_cameras` = (third-person, wrist)): an override, else the same
    name, else the wrist camera for names with `eye_in_hand`/`wrist`/`hand`, else the third-person camera."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(policy_cameras))
    if unknown:
        raise ValueError(f"camera map names cameras {unknown} the policy does not use "
                         f"({list(policy_cameras)})")
    out = {}
    for name in policy_cameras:
        if name in overrides:
            if overrides[name] not in env_cameras:
                raise ValueError(f"camera map: {overrides[name]!r} is not a camera of the simulator "
                                 f"{list(env_cameras)}")
            out[name] = overrides[name]
        elif name in env_cameras:
            out[name] = name
        else:
            wrist = any(word in name.lower() for word in WRIST_WORDS)
            out[name] = env_cameras[1] if wrist else env_cameras[0]
    return out


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """The frame after the JPEG encoding the trajectory shards apply (quality 0: unchanged)."""
    if quality == 0:
        return image
    from PIL import Image

    from data_modules.shards import encode_image

    data, _ = encode_image(Image.fromarray(image), "jpeg", quality)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------ worker side
class _Aborted(Exception):
    """The main process stopped the run while this worker waited for a chunk."""


class _Fatal(Exception):
    """An error that every later episode would hit as well (missing assets, a broken installation)."""


class _VideoWriter:
    """MP4 (H.264 through PyAV, yuv420p) of an episode's frames, renamed into place when closed."""

    def __init__(self, path: Path, fps: int) -> None:
        import av

        self.path = path
        self.tmp = path.with_name(path.name + ".part")
        self.fps = fps
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.started = False

    def add(self, frame: np.ndarray) -> None:
        import av

        # yuv420p needs even sides.
        frame = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]
        if not self.started:
            self.stream.height, self.stream.width = frame.shape[:2]
            self.started = True
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(picture):
            self.container.mux(packet)

    def close(self, final: Path | None = None) -> Path | None:
        """Finish the file and move it to `final` (default its path); None (and no file) without frames."""
        if not self.started:
            self.discard()
            return None
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        final = final or self.path
        os.replace(self.tmp, final)
        return final

    def discard(self) -> None:
        self.container.close()
        self.tmp.unlink(missing_ok=True)


class _EpisodeRunner:
    """A worker's episodes: builds (and keeps) the environment of the current task, runs the closed loop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.env = None
        self.env_task: int | None = None
        self.tasks: dict[int, libero_env.LiberoTask] = {}
        if is_libero(config.env):
            try:
                libero_env.configure(config.libero_assets)
                self.tasks = {t.task_id: t for t in libero_env.suite_tasks(config.env)}
            except libero_env.LiberoSetupError as error:
                raise _Fatal(str(error)) from error

    def _env_for(self, task_id: int):
        if self.env is not None and self.env_task == task_id:
            return self.env
        self.close()
        cfg = self.config
        try:
            if is_libero(cfg.env):
                instruction = None if cfg.instructions is None else cfg.instructions[task_id]
                self.env = libero_env.LiberoEpisodeEnv(
                    self.tasks[task_id], camera_map=cfg.camera_map, camera_size=cfg.camera_size,
                    gripper_open_convention=cfg.gripper_open_convention, instruction=instruction,
                )
            else:
                from data_modules import sim

                self.env = sim.SimEpisodeEnv(cfg.env, seed=cfg.seed, image_size=cfg.camera_size,
                                             camera_map=cfg.camera_map, swap_instruction=cfg.swap_instruction)
        except libero_env.LiberoSetupError as error:
            raise _Fatal(str(error)) from error
        self.env_task = task_id
        return self.env

    def _prepare(self, obs: dict[str, Any]) -> dict[str, Any]:
        quality = self.config.jpeg_quality
        return {**obs, "images": {c: jpeg_round_trip(img, quality) for c, img in obs["images"].items()}}

    def run(self, episode: EpisodeSpec, conn: Connection) -> EpisodeResult:
        from dvlx.policy import ChunkExecutor

        cfg = self.config
        start = time.perf_counter()
        queries = 0

        def remote_predict(observation: dict[str, Any]) -> np.ndarray:
            nonlocal queries
            queries += 1
            conn.send(("obs", observation))
            kind, payload = conn.recv()
            if kind != "chunk":
                raise _Aborted()
            return payload

        executor = ChunkExecutor(remote_predict, cfg.open_loop_steps)
        frames: list[np.ndarray] = []
        stride = max(1, cfg.max_steps // _MAX_STORED_FRAMES)
        video = None
        if cfg.video_dir:
            name = f"{cfg.env}_task{episode.task_id:02d}_ep{episode.index:03d}"
            video = _VideoWriter(Path(cfg.video_dir) / f"{name}.mp4", cfg.video_fps)

        def record(obs: dict[str, Any], t: int) -> None:
            if video is None and not episode.keep_frames:
                return
            frame = np.concatenate([obs["images"][c] for c in cfg.camera_map], axis=1)
            if video is not None:
                video.add(frame)
            if episode.keep_frames and t % stride == 0:
                frames.append(frame)

        env = self._env_for(episode.task_id)
        success, length, error, instruction, info = False, 0, None, "", {}
        try:
            obs = env.start(episode.index)
            instruction = obs["instruction"]
            record(obs, 0)
            while length < cfg.max_steps and not success:
                action = executor.act(self._prepare(obs))
                obs, success = env.step(action)
                length += 1
                record(obs, length)
            info = env.info()
        except (_Aborted, _Fatal):
            if video is not None:
                video.discard()
            raise
        except Exception as exc:  # the reference counts a simulator error as a failed episode
            error = f"{type(exc).__name__}: {exc}"
            success = False
        path = None
        if video is not None:
            outcome = "success" if success else "failure"
            written = video.close(video.path.with_name(f"{video.path.stem}_{outcome}.mp4"))
            path = None if written is None else str(written)
        kept = None
        if episode.keep_frames and frames:
            picks = np.linspace(0, len(frames) - 1, min(episode.keep_frames, len(frames))).round().astype(int)
            kept = [frames[i] for i in picks]
        return EpisodeResult(
            number=episode.number, task_id=episode.task_id, index=episode.index, success=bool(success),
            length=length, instruction=instruction, seconds=time.perf_counter() - start, queries=queries,
            error=error, video=path, info=info, frames=kept,
        )

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env = None
        self.env_task = None


def _worker_main(conn: Connection, config: WorkerConfig) -> None:
    """A worker process: build the runner, then run the episodes the main process sends until `close`."""
    runner = None
    try:
        import torch

        # Workers run no tensor maths; one thread keeps them off the cores the policy uses.
        torch.set_num_threads(1)
        for key in WORKER_ENV_KEYS:
            if key in config.environ:
                os.environ[key] = config.environ[key]
            else:
                os.environ.pop(key, None)
        runner = _EpisodeRunner(config)
        conn.send(("ready", None))
        while True:
            message = conn.recv()
            if message[0] != "episode":
                break
            conn.send(("result", runner.run(message[1], conn)))
    except _Fatal as error:
        conn.send(("fatal", str(error)))
    except (_Aborted, EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:
        try:
            conn.send(("fatal", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if runner is not None:
            runner.close()
        conn.close()


# -------------------------------------------------------------------------------------------- main side
@dataclass
class RunStats:
    queries: int = 0
    batches: int = 0
    policy_seconds: float = 0.0
    seconds: float = 0.0
    batch_sizes: Counter = field(default_factory=Counter)


class RolloutPool:
    """W worker processes holding simulators; `run` plays a list of episodes with a batched policy.

    The pool may serve several `run` calls (the training callback keeps one); `close` ends the workers.
    Episodes of the task a worker played last are given to it first, so it keeps its environment.
    """

    def __init__(self, config: WorkerConfig, workers: int, start_method: str = "forkserver") -> None:
        self.config = config
        self.num_workers = workers
        self.start_method = start_method
        self.conns: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> RolloutPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.conns:
            return
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # The server imports these once; every worker forked from it starts without importing them
            # again (a fresh interpreter spends seconds on torch, transformers and robosuite).
            context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        for i in range(self.num_workers):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child, self.config), daemon=True,
                                      name=f"dvlx-rollout-{i}")
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)
        try:
            for i in range(len(self.conns)):
                kind, payload = self._recv(i)
                if kind != "ready":
                    raise RolloutError(f"rollout worker {i} could not start: {payload}")
        except BaseException:
            self.close()
            raise

    def _recv(self, i: int) -> tuple[str, Any]:
        try:
            return self.conns[i].recv()
        except (EOFError, ConnectionResetError):
            self.processes[i].join(timeout=5)
            raise RolloutError(
                f"rollout worker {i} exited (exit code {self.processes[i].exitcode}) without a reply"
            ) from None

    def run(
        self,
        episodes: Sequence[EpisodeSpec],
        predict: Callable[[list[dict[str, Any]]], np.ndarray],
        on_result: Callable[[EpisodeResult], None] | None = None,
    ) -> tuple[list[EpisodeResult], RunStats]:
        """Play `episodes`; `predict(observations)` returns [B, H, A] chunks in robot units."""
        self.start()
        start = time.perf_counter()
        stats = RunStats()
        pending: dict[int, deque[EpisodeSpec]] = defaultdict(deque)
        for episode in episodes:
            pending[episode.task_id].append(episode)
        last_task: dict[int, int] = {}
        busy: dict[int, EpisodeSpec] = {}
        results: dict[int, EpisodeResult] = {}

        def assign(i: int) -> None:
            if not pending:
                return
            task = last_task.get(i)
            if task not in pending:
                # Spread workers over tasks: the one with the most episodes left.
                task = max(pending, key=lambda t: len(pending[t]))
            episode = pending[task].popleft()
            if not pending[task]:
                del pending[task]
            last_task[i] = task
            busy[i] = episode
            self.conns[i].send(("episode", episode))

        index = {id(conn): i for i, conn in enumerate(self.conns)}
        try:
            for i in range(len(self.conns)):
                assign(i)
            while busy:
                ready = wait([self.conns[i] for i in busy])
                requests: list[tuple[int, dict[str, Any]]] = []
                for conn in ready:
                    i = index[id(conn)]
                    kind, payload = self._recv(i)
                    if kind == "obs":
                        requests.append((i, payload))
                    elif kind == "result":
                        results[payload.number] = payload
                        del busy[i]
                        if on_result is not None:
                            on_result(payload)
                        assign(i)
                    else:
                        raise RolloutError(f"rollout worker {i} failed in episode {busy.get(i)}: {payload}")
                if requests:
                    tic = time.perf_counter()
                    chunks = np.asarray(predict([obs for _, obs in requests]))  # [B, H, A]
                    stats.policy_seconds += time.perf_counter() - tic
                    stats.queries += len(requests)
                    stats.batches += 1
                    stats.batch_sizes[len(requests)] += 1
                    for (i, _), chunk in zip(requests, chunks, strict=True):
                        self.conns[i].send(("chunk", chunk))
        except BaseException:
            self.close()
            raise
        stats.seconds = time.perf_counter() - start
        return [results[n] for n in sorted(results)], stats

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []


# ------------------------------------------------------------------------------------- plan and report
@dataclass
class TaskInfo:
    task_id: int
    name: str
    instruction: str
    num_init_states: int | None = None


@dataclass
class RolloutPlan:
    """The resolved protocol of one evaluation: worker settings, tasks, episodes, report fields."""

    settings: RolloutSettings
    worker: WorkerConfig
    tasks: list[TaskInfo]
    episodes: list[EpisodeSpec]
    protocol: dict[str, Any]


def _robosuite_tasks(env: str) -> list[TaskInfo]:
    from data_modules import sim

    if env == "robosuite-lift":
        return [TaskInfo(0, env, sim.LIFT_INSTRUCTION)]
    names = " / ".join(sim.color_instruction(c) for c in sim.CUBE_COLORS)
    return [TaskInfo(0, env, names)]


def check_policy_dims(spec, env: str, action_dim: int, proprio_dim: int) -> None:
    """Refuse, before any process starts, a policy whose action or proprio size is not the environment's
    (a policy without proprio ignores the environment's)."""
    if spec.action_dim != action_dim:
        raise ValueError(f"the policy outputs {spec.action_dim}-D actions ({', '.join(spec.action_names)}); "
                         f"{env} takes {action_dim}-D actions")
    if spec.proprio_dim and spec.proprio_dim != proprio_dim:
        raise ValueError(f"the policy reads {spec.proprio_dim}-D proprio ({', '.join(spec.proprio_names)}); "
                         f"{env} gives {proprio_dim}-D proprio")


def plan_rollout(settings: RolloutSettings, spec, *, keep_frames: int = 0) -> RolloutPlan:
    """Resolve defaults against the policy's `spec` (an `ActionSpec`) and list the episodes."""
    libero = is_libero(settings.env)
    chunk = spec.horizon
    open_loop = settings.open_loop_steps or chunk
    if open_loop > chunk:
        raise ValueError(f"open_loop_steps {open_loop} exceeds the policy's chunk length {chunk}")
    swap = settings.instruction == "swap"
    instructions = None
    if libero:
        assets = libero_env.configure(settings.libero_assets)
        suite = libero_env.suite_tasks(settings.env)
        tasks = [TaskInfo(t.task_id, t.name, t.instruction, t.num_init_states) for t in suite]
        if settings.tasks is not None:
            unknown = sorted(set(settings.tasks) - {t.task_id for t in tasks})
            if unknown:
                raise ValueError(f"--tasks {unknown}: {settings.env} has tasks 0..{len(tasks) - 1}")
            tasks = [t for t in tasks if t.task_id in set(settings.tasks)]
        if swap:
            # Task i is told the instruction of task i + 1 of the suite (in the suite's order).
            instructions = {t.task_id: suite[(t.task_id + 1) % len(suite)].instruction for t in suite}
        max_steps = settings.max_steps or libero_env.SUITE_MAX_STEPS[settings.env]
        camera_size = settings.camera_size or libero_env.CAMERA_SIZE
        env_cameras = libero_env.ENV_CAMERAS
        versions = libero_env.libero_versions(assets)
        gripper_open = bool(spec.action_names) and spec.action_names[-1] == libero_env.GRIPPER_OPEN_NAME
        env_dims = (libero_env.ACTION_DIM, libero_env.PROPRIO_DIM)
    else:
        from data_modules import sim

        tasks = _robosuite_tasks(settings.env)
        max_steps = settings.max_steps or sim.MAX_EPISODE_STEPS
        camera_size = settings.camera_size or spec.image_size
        env_cameras = ROBOSUITE_CAMERAS
        versions = dict(sim.SIM_VERSIONS)
        gripper_open = False
        env_dims = (len(sim.ACTION_NAMES), len(sim.PROPRIO_NAMES))
    check_policy_dims(spec, settings.env, *env_dims)
    camera_map = match_cameras(spec.cameras, env_cameras, settings.camera_map)
    worker = WorkerConfig(
        env=settings.env, camera_map=camera_map, camera_size=camera_size, seed=settings.seed,
        max_steps=max_steps, open_loop_steps=open_loop, jpeg_quality=settings.jpeg_quality,
        instructions=instructions, swap_instruction=swap and not libero,
        libero_assets=settings.libero_assets, gripper_open_convention=gripper_open,
        video_dir=settings.video_dir, video_fps=int(round(spec.control_hz or 20)),
        environ={key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ},
    )
    episodes: list[EpisodeSpec] = []
    task_indices: dict[int, list[int]] = {}
    for task in tasks:
        if libero:
            indices = libero_env.init_state_indices(settings.episodes, task.num_init_states,
                                                    settings.start_index)
        else:
            indices = list(range(settings.start_index, settings.start_index + settings.episodes))
        task_indices[task.task_id] = indices
        for index in indices:
            episodes.append(EpisodeSpec(len(episodes), task.task_id, index,
                                        keep_frames=keep_frames if not episodes else 0))
    protocol = _protocol(settings, spec, worker, tasks, task_indices, instructions, versions)
    return RolloutPlan(settings, worker, tasks, episodes, protocol)


def _protocol(settings, spec, worker: WorkerConfig, tasks, task_indices, instructions, versions) -> dict:
    libero = is_libero(settings.env)
    out: dict[str, Any] = {
        "env": settings.env,
        "suite": settings.env if libero else None,
        "tasks": [
            {
                "task_id": t.task_id,
                "name": t.name,
                "instruction": t.instruction,
                **({"instruction_given": instructions[t.task_id]} if instructions else {}),
                ("initial_state_indices" if libero else "episode_indices"): task_indices[t.task_id],
            }
            for t in tasks
        ],
        "episodes_per_task": settings.episodes,
        "start_index": settings.start_index,
        "seed": settings.seed,
        "max_steps": worker.max_steps,
        "open_loop_steps": worker.open_loop_steps,
        "chunk_length": spec.horizon,
        "sampling_steps": settings.sampling_steps,
        "instruction_mode": settings.instruction,
        "image_preprocessing": {
            "camera_size": worker.camera_size,
            "camera_map": worker.camera_map,
            "orientation": libero_env.IMAGE_ORIENTATION if libero else "upright (data_modules.sim)",
            "jpeg_round_trip_quality": settings.jpeg_quality or None,
            "resize": f"{spec.image_size} x {spec.image_size}, Lanczos (dvlx.processing.robot.resize_image)",
            "center_crop_area": spec.center_crop,
        },
        "proprio": list(spec.proprio_names),
        "workers": settings.workers,
        "start_method": settings.start_method,
        "policy_batching": "one predict_batch call for all workers waiting for a chunk",
        "simulator": versions,
    }
    if libero:
        out.update({
            "task_order_index": libero_env.TASK_ORDER_INDEX,
            "env_seed": libero_env.ENV_SEED,
            "wait_steps": libero_env.WAIT_STEPS,
            "wait_action": list(libero_env.NOOP_ACTION),
            "episode_start": "env.reset(); env.set_init_state(init_states[j]); wait steps with the no-op",
            "success": "the environment's done (all goal predicates of the task's BDDL hold)",
            "gripper_postprocessing": (
                "policy 1=open/0=close -> LIBERO -1 if g >= 0.5 else +1 (binarised, sign-flipped)"
                if worker.gripper_open_convention else "LIBERO command convention -> +1 if g > 0 else -1"
            ),
            "proprio_source": "robot0_eef_pos, axis-angle of robot0_eef_quat, robot0_gripper_qpos",
            "policy_seed": "torch.manual_seed(seed) before the run (sampling noise)",
        })
    else:
        out.update({
            "episode_start": "data_modules.sim.reset(env, seed=seed, index=i): numpy seeded with "
                             "SeedSequence([seed, i]) before robosuite's reset",
            "success": "the (target) cube's centre more than 4 cm above the table; the episode ends there",
            "gripper_postprocessing": "none (the policy predicts robosuite's command, clipped to [-1, 1])",
            "proprio_source": "data_modules.sim.observation",
            "swap": "the policy is told to lift the other cube; success still means the episode's target"
                    if worker.swap_instruction else None,
        })
    return out


def _rates(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    n = len(results)
    wins = [r for r in results if r.success]
    out: dict[str, Any] = {
        "episodes": n,
        "successes": len(wins),
        "success_rate": len(wins) / n if n else None,
        "mean_length": float(np.mean([r.length for r in results])) if n else None,
        "mean_length_success": float(np.mean([r.length for r in wins])) if wins else None,
        "errors": sum(r.error is not None for r in results),
    }
    if n and all("lifted_colors" in r.info for r in results):
        # robosuite-lift-color: which cubes went up, against the one named in the instruction.
        lifted = [(r.info["named_color"], r.info["lifted_colors"]) for r in results]
        out["named_cube_lifted_rate"] = float(np.mean([named in up for named, up in lifted]))
        out["other_cube_lifted_rate"] = float(np.mean([any(c != named for c in up) for named, up in lifted]))
    return out


def summarize(results: Sequence[EpisodeResult], tasks: Sequence[TaskInfo]) -> dict[str, Any]:
    """Overall and per-task rates (and per instruction where a task has several)."""
    by_task = defaultdict(list)
    by_instruction = defaultdict(list)
    for r in results:
        by_task[r.task_id].append(r)
        by_instruction[r.instruction].append(r)
    out = _rates(results)
    out["per_task"] = [
        {"task_id": t.task_id, "name": t.name, **_rates(by_task[t.task_id])}
        for t in tasks if by_task[t.task_id]
    ]
    if len(by_instruction) > len(out["per_task"]):
        out["per_instruction"] = {k: _rates(v) for k, v in sorted(by_instruction.items())}
    return out


@dataclass
class RolloutOutcome:
    plan: RolloutPlan
    results: list[EpisodeResult]
    stats: RunStats
    summary: dict[str, Any]

    @property
    def success_rate(self) -> float:
        return float(self.summary["success_rate"])

    def report(self, policy_info: dict[str, Any], command: str | None = None) -> dict[str, Any]:
        s = self.stats
        steps = sum(r.length for r in self.results)
        metrics = {
            **self.summary,
            "seconds": s.seconds,
            "env_steps_per_second": steps / s.seconds if s.seconds else None,
            "policy_queries": s.queries,
            "policy_batches": s.batches,
            "mean_policy_batch": s.queries / s.batches if s.batches else None,
            "policy_seconds": s.policy_seconds,
        }
        episodes = [{k: v for k, v in asdict(r).items() if k != "frames"} for r in self.results]
        return {"command": command, "policy": policy_info, "protocol": self.plan.protocol, "metrics": metrics,
                "episodes": episodes}


def policy_info(policy, path: str | None = None) -> dict[str, Any]:
    """The report's `policy` entry: export path, its dvlx.json, the action spec and its fingerprint."""
    from dvlx.export import EXPORT_MARKER

    folder = path or getattr(policy, "source", "") or None
    meta = None
    if folder and Path(folder, EXPORT_MARKER).is_file():
        meta = json.loads(Path(folder, EXPORT_MARKER).read_text())
    return {"path": folder, "export": meta, "spec_fingerprint": policy.spec.fingerprint(),
            "spec": policy.spec.to_dict(), "objective": asdict(policy.objective.cfg)}


def run_rollout(
    policy,
    settings: RolloutSettings,
    *,
    pool: RolloutPool | None = None,
    progress: bool = True,
    keep_frames: int = 0,
) -> RolloutOutcome:
    """Evaluate `policy` (a `dvlx.policy.Policy`) in closed loop; a given `pool` is reused, not closed."""
    import torch
    from tqdm import tqdm

    plan = plan_rollout(settings, policy.spec, keep_frames=keep_frames)
    torch.manual_seed(settings.seed)
    bar = tqdm(total=len(plan.episodes), desc=settings.env, unit="episode", disable=not progress,
               dynamic_ncols=True)
    wins = 0

    def on_result(result: EpisodeResult) -> None:
        nonlocal wins
        wins += result.success
        bar.update(1)
        bar.set_postfix(success=f"{wins}/{bar.n}")
        if result.error:
            log.warning("episode %d (task %d, index %d) failed with an error: %s", result.number,
                        result.task_id, result.index, result.error)

    def predict(observations: list[dict[str, Any]]) -> np.ndarray:
        return policy.predict_batch(observations, steps=settings.sampling_steps)

    if settings.video_dir:
        Path(settings.video_dir).mkdir(parents=True, exist_ok=True)
    own = pool is None
    pool = pool or RolloutPool(plan.worker, settings.workers, settings.start_method)
    if pool.config != plan.worker:
        raise ValueError("the rollout pool was built for other worker settings")
    try:
        results, stats = pool.run(plan.episodes, predict, on_result)
    finally:
        bar.close()
        if own:
            pool.close()
    return RolloutOutcome(plan, results, stats, summarize(results, plan.tasks))


def format_summary(outcome: RolloutOutcome) -> str:
    lines = []
    for task in outcome.summary["per_task"]:
        lines.append(f"  task {task['task_id']:2d} {task['success_rate']:.3f} ({task['successes']}/"
                     f"{task['episodes']}) mean length {task['mean_length']:.1f}  {task['name']}")
    for name, rates in outcome.summary.get("per_instruction", {}).items():
        lines.append(f"  {name!r}: {rates['success_rate']:.3f} ({rates['successes']}/{rates['episodes']})")
    s = outcome.summary
    lines.append(f"{outcome.plan.settings.env}: success rate {s['success_rate']:.3f} ({s['successes']}/"
                 f"{s['episodes']} episodes), mean length {s['mean_length']:.1f}, "
                 f"{outcome.stats.seconds:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def _camera_map(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--camera-map takes POLICY_CAMERA=SIM_CAMERA, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dvlx.eval rollout",
        description="Closed-loop evaluation of a VLA export (docs/evaluation.md).",
    )
    parser.add_argument("--policy", required=True, help="VLA export folder (runs/EXPERIMENT/VARIANT/export)")
    parser.add_argument("--env", required=True, choices=ENVS)
    parser.add_argument("--episodes", type=int, default=DEFAULT_EPISODES, help="episodes per task")
    parser.add_argument("--workers", type=int, default=1, help="simulator processes")
    parser.add_argument("--open-loop-steps", type=int, default=None,
                        help="actions run from each chunk before re-planning (default: the chunk length)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the objective's)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="policy steps per episode (default: per environment)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="robosuite episode seeds (seed, index) and the policy's sampling noise")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="LIBERO task ids (default: all)")
    parser.add_argument("--start-index", type=int, default=0, help="first initial-state / episode index")
    parser.add_argument("--camera-size", type=int, default=None,
                        help="rendered size (default: 256 for LIBERO, the policy's image size for robosuite)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="JPEG round trip of each frame as in the shards (0 = off)")
    parser.add_argument("--instruction", choices=INSTRUCTION_MODES, default="env",
                        help="swap: tell the policy another task's instruction (language-conditioning test)")
    parser.add_argument("--camera-map", nargs="+", default=None, metavar="POLICY=SIM",
                        help="policy camera -> simulator camera (default: by name)")
    parser.add_argument("--libero-assets", default=None,
                        help=f"LIBERO assets folder (default: ${libero_env.ASSETS_ENV}, else the package's)")
    parser.add_argument("--video", default=None, metavar="DIR", help="write one MP4 per episode into DIR")
    parser.add_argument("--out", default=None, help="JSON report (default: rollout_<env>.json)")
    parser.add_argument("--device", default=None, help="policy device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                        help="how worker processes start")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("OpenGL").setLevel(logging.WARNING)
    import torch

    from dvlx.fit import write_atomic
    from dvlx.policy import Policy

    try:
        settings = RolloutSettings(
            env=args.env, episodes=args.episodes, workers=args.workers, open_loop_steps=args.open_loop_steps,
            max_steps=args.max_steps, seed=args.seed, tasks=tuple(args.tasks) if args.tasks else None,
            start_index=args.start_index, camera_size=args.camera_size, jpeg_quality=args.jpeg_quality,
            instruction=args.instruction, sampling_steps=args.steps, libero_assets=args.libero_assets,
            video_dir=args.video, camera_map=_camera_map(args.camera_map), start_method=args.start_method,
        )
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        policy = Policy.from_pretrained(args.policy, device=device, dtype=dtype)
        outcome = run_rollout(policy, settings, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, libero_env.LiberoSetupError, RolloutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or f"rollout_{args.env}.json")
    command = "python -m dvlx.eval rollout " + shlex.join(argv)
    report = outcome.report(policy_info(policy, args.policy), command)
    write_atomic(out, json.dumps(report, indent=1) + "\n")
    print(format_summary(outcome))
    print(f"report: {out}")
    return 0


__all__ = [
    "ENVS",
    "EpisodeResult",
    "EpisodeSpec",
    "RolloutError",
    "RolloutOutcome",
    "RolloutPlan",
    "RolloutPool",
    "RolloutSettings",
    "WorkerConfig",
    "format_summary",
    "jpeg_round_trip",
    "match_cameras",
    "plan_rollout",
    "policy_info",
    "run_rollout",
    "summarize",
]

if __name__ == "__main__":
    sys.exit(main())
