"""LIBERO environments for closed-loop evaluation, following the reference protocol (Dream-VLA's LIBERO
evaluation, `../shared/reference/dream_vla_reference_spec.md` section 6).

- **Suites**: `SUITE_MAX_STEPS` (libero_spatial 220, libero_object 280, libero_goal 300, libero_10 520,
  libero_90 400 policy steps); 10 tasks per suite (90 in libero_90) in the benchmark's task order 0, each with
  50 fixed initial states (`LiberoTask.init_states`); episode j of a task starts from initial state j.
- **Episode**: `env.seed(seed)` once per environment, `reset()`, `set_init_state(init_states[j])`, then
  `WAIT_STEPS` steps of `NOOP_ACTION` (objects settle; not counted and never successes), then at most the
  suite's step limit of policy actions. Success is the environment's `done`.
- **Observations** (`observation`): both cameras turned 180 degrees (`[::-1, ::-1]`, the orientation of the
  training data, see `data_modules.convert_libero`), proprio = end-effector position (3), axis-angle of the
  end-effector quaternion (3) and the two gripper joints (2), the task's language instruction.
- **Actions** (`postprocess_action`): dims 0-5 unchanged; the gripper is binarised and brought to LIBERO's
  -1 = open / +1 = close. Policies trained on `convert_libero` data predict 1 = open / 0 = close
  (`GRIPPER_OPEN_NAME` as the last action name): g -> -1 when g >= 0.5, else +1 (the reference's
  -sign(2g - 1), except that g = 0.5 opens instead of sending 0). Otherwise the policy predicts LIBERO's raw
  command and g -> +1 when g > 0, else -1.

**Assets.** hf-libero downloads its scene and object meshes from a model hub on first use. dvlx never does:
the assets folder is `--libero-assets`, else `$DVLX_LIBERO_ASSETS`, else the package's own
`libero/libero/assets`, and `configure` fails with a clear message when none holds them. `configure` also
writes the `config.yaml` hf-libero asks for on the terminal at first import (into a cache folder of ours,
`$DVLX_CACHE_DIR/libero` or `~/.cache/dvlx/libero`) and points `LIBERO_CONFIG_PATH` at it, unless the caller
set `LIBERO_CONFIG_PATH` already.

**Versions.** Pinned: hf-libero 0.1.4 (installed with `--no-deps`), robosuite 1.4.1 (as in OpenVLA's and
Dream-VLA's LIBERO requirements; hf-libero itself asks for 1.4.0) and mujoco 3.2.3; `libero_versions()`
records them, the renderer and the assets folder in every report. Renderer and MuJoCo changes are known to
shift LIBERO success rates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from data_modules.convert_libero import GRIPPER_ACTION_NAME, quat_to_axis_angle

SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(SUITE_MAX_STEPS)
WAIT_STEPS = 10
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ACTION_DIM = len(NOOP_ACTION)
PROPRIO_DIM = 8  # proprio_from_obs: end-effector position (3), axis-angle (3), gripper joints (2)
CAMERA_SIZE = 256
ENV_SEED = 0
TASK_ORDER_INDEX = 0
ENV_CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")
GRIPPER_OPEN_NAME = GRIPPER_ACTION_NAME
IMAGE_ORIENTATION = "rotated 180 degrees from the simulator frame ([::-1, ::-1]), as the training data"
PINNED_VERSIONS = {"hf-libero": "0.1.4", "robosuite": "1.4.1", "mujoco": "3.2.3"}
ASSETS_ENV = "DVLX_LIBERO_ASSETS"
CACHE_ENV = "DVLX_CACHE_DIR"
# Top-level folders of LIBERO's asset tree that the four main suites read.
ASSET_FOLDERS = ("scenes", "stable_scanned_objects", "textures", "turbosquid_objects")
_INSTALL_HINT = (
    "pip install --no-deps 'hf-libero==0.1.4' && pip install 'bddl==1.0.1' --no-deps && "
    "pip install future easydict cloudpickle gymnasium"
)


class LiberoSetupError(RuntimeError):
    """LIBERO cannot run here: the package, its light dependencies or the assets are missing."""


@dataclass(frozen=True)
class LiberoTask:
    """One task of a suite: its index in the suite (task order 0), names and fixed initial states."""

    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    init_states_file: str
    num_init_states: int


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _package_root() -> Path:
    """`<site-packages>/libero/libero` without importing it (its import asks for input without a config)."""
    try:
        spec = importlib.util.find_spec("libero.libero")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        raise LiberoSetupError(f"the LIBERO package (hf-libero) is not installed: {_INSTALL_HINT}")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dvlx"
    )
    return Path(base) / "libero"


def resolve_assets(assets: str | os.PathLike | None = None) -> Path:
    """The assets folder: `assets`, else `$DVLX_LIBERO_ASSETS`, else the package's own; checked to hold the
    asset tree (raises LiberoSetupError naming what was tried)."""
    tried = []
    explicit = [("--libero-assets", assets), (f"${ASSETS_ENV}", os.environ.get(ASSETS_ENV))]
    given = [(source, path) for source, path in explicit if path]
    # An explicit folder that is wrong is an error, not a reason to look elsewhere.
    candidates = given[:1] or [("the hf-libero package", _package_root() / "assets")]
    for source, path in candidates:
        path = Path(path).expanduser().resolve()
        missing = [name for name in ASSET_FOLDERS if not (path / name).is_dir()]
        if not missing:
            return path
        tried.append(f"{source}: {path} (missing {', '.join(missing)})")
    raise LiberoSetupError(
        "LIBERO scene and object assets not found; tried " + "; ".join(tried) + ". Point --libero-assets or "
        f"${ASSETS_ENV} at a copy of LIBERO's libero/libero/assets folder (folders {', '.join(ASSET_FOLDERS)}"
        "); dvlx does not download them"
    )


def write_config(folder: Path, root: Path, assets: Path) -> Path:
    """hf-libero's `config.yaml` in `folder`: benchmark files from the installed package, our assets."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "benchmark_root": str(root),
        "bddl_files": str(root / "bddl_files"),
        "init_states": str(root / "init_files"),
        "datasets": str(folder / "datasets"),
        "assets": str(assets),
    }
    path = folder / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f"config.yaml.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def configure(assets: str | os.PathLike | None = None) -> Path:
    """Make `import libero.libero` work offline here: config file, assets path, dependencies. Returns the
    assets folder. Safe to call in every process (worker processes call it again)."""
    root = _package_root()
    folder = resolve_assets(assets)
    user_config = os.environ.get("LIBERO_CONFIG_PATH")
    if not (user_config and Path(user_config, "config.yaml").is_file()):
        config_dir = cache_dir()
        write_config(config_dir, root, folder)
        os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)
    # Child processes find the same folder through the environment.
    os.environ[ASSETS_ENV] = str(folder)
    try:
        # data_modules.sim sets the renderer's environment (EGL, its device) before robosuite is imported.
        import data_modules.sim  # noqa: F401

        # hf-libero prints configuration notes on import; they are not ours to show.
        with contextlib.redirect_stdout(io.StringIO()):
            import libero.libero as libero_root
            import libero.libero.benchmark  # noqa: F401
            import libero.libero.envs  # noqa: F401
    except ImportError as error:
        raise LiberoSetupError(
            f"hf-libero is installed but cannot be imported ({error}); install its light dependencies: "
            f"{_INSTALL_HINT}"
        ) from error
    # get_assets_path() returns this cached value before trying the package folder or the hub.
    libero_root._assets_path_cache = str(folder)
    return folder


def libero_versions(assets: Path | None = None) -> dict[str, Any]:
    """Simulator, renderer and benchmark versions (and the assets used) for reports."""
    out: dict[str, Any] = {
        "hf-libero": _version("hf-libero"),
        "robosuite": _version("robosuite"),
        "mujoco": _version("mujoco"),
        "bddl": _version("bddl"),
        "renderer": os.environ.get("MUJOCO_GL"),
        "egl_device": os.environ.get("MUJOCO_EGL_DEVICE_ID"),
        "pinned": dict(PINNED_VERSIONS),
        "task_order_index": TASK_ORDER_INDEX,
    }
    if assets is not None:
        out["assets"] = str(assets)
        placeholders = Path(assets) / "PLACEHOLDERS.txt"
        out["assets_placeholders"] = placeholders.is_file()
        if placeholders.is_file():
            out["assets_note"] = (
                "stand-in visual assets (PLACEHOLDERS.txt): renders differ from real LIBERO, success rates "
                "are not comparable with published ones"
            )
    return out


def suite_tasks(suite: str) -> list[LiberoTask]:
    """The tasks of `suite` in the benchmark's task order 0 (call `configure` first)."""
    if suite not in SUITE_MAX_STEPS:
        raise ValueError(f"unknown LIBERO suite {suite!r}; expected one of {list(SUITES)}")
    from libero.libero import benchmark, get_libero_path

    with contextlib.redirect_stdout(io.StringIO()):
        bench = benchmark.get_benchmark_dict()[suite](task_order_index=TASK_ORDER_INDEX)
    tasks = []
    for i in range(bench.get_num_tasks()):
        task = bench.get_task(i)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        init = os.path.join(get_libero_path("init_states"), task.problem_folder, task.init_states_file)
        tasks.append(LiberoTask(suite=suite, task_id=i, name=task.name, instruction=task.language,
                                bddl_file=bddl, init_states_file=init,
                                num_init_states=len(load_init_states(init))))
    return tasks


def load_init_states(path: str) -> np.ndarray:
    """[N, state] fixed initial simulator states of one task (LIBERO stores them with torch.save)."""
    import torch

    states = torch.load(path, weights_only=False)
    return np.asarray(states)


def init_state_indices(num_episodes: int, num_init_states: int, start: int = 0) -> list[int]:
    """Initial states used by `num_episodes` episodes of a task: start, start + 1, ...; never wraps."""
    if num_episodes < 1:
        raise ValueError(f"episodes per task must be >= 1, got {num_episodes}")
    if start < 0 or start + num_episodes > num_init_states:
        raise ValueError(
            f"episodes {start}..{start + num_episodes - 1} need initial states beyond the {num_init_states} "
            "this task has"
        )
    return list(range(start, start + num_episodes))


def flip_180(image: np.ndarray) -> np.ndarray:
    """A simulator frame in the training data's orientation (turned 180 degrees)."""
    return np.ascontiguousarray(image[::-1, ::-1])


def proprio_from_obs(obs: dict[str, np.ndarray]) -> np.ndarray:
    """[8] end-effector position, end-effector axis-angle, gripper joints (the training layout)."""
    quat = np.asarray(obs["robot0_eef_quat"], dtype=np.float64)
    return np.concatenate([
        np.asarray(obs["robot0_eef_pos"], dtype=np.float64), quat_to_axis_angle(quat),
        np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
    ]).astype(np.float32)


def postprocess_action(action: np.ndarray, gripper_open_convention: bool) -> np.ndarray:
    """A policy action in LIBERO's command convention (see the module docstring)."""
    out = np.asarray(action, dtype=np.float64).reshape(-1).copy()
    g = out[-1]
    if gripper_open_convention:
        out[-1] = -1.0 if g >= 0.5 else 1.0
    else:
        out[-1] = 1.0 if g > 0.0 else -1.0
    return out


class LiberoEpisodeEnv:
    """One task's environment driven by the protocol above: `start(j)` -> first policy observation,
    `step(action)` -> (observation, success). `camera_map` maps the policy's camera names to `ENV_CAMERAS`;
    `instruction` replaces the task's own (e.g. another task's, to test language conditioning)."""

    def __init__(self, task: LiberoTask, *, camera_map: dict[str, str], gripper_open_convention: bool,
                 camera_size: int = CAMERA_SIZE, seed: int = ENV_SEED,
                 instruction: str | None = None) -> None:
        from libero.libero.envs import OffScreenRenderEnv

        self.task = task
        self.instruction = task.instruction if instruction is None else instruction
        self.camera_map = dict(camera_map)
        self.gripper_open_convention = gripper_open_convention
        self.init_states = load_init_states(task.init_states_file)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.env = OffScreenRenderEnv(
                    bddl_file_name=task.bddl_file, camera_heights=camera_size, camera_widths=camera_size
                )
        except FileNotFoundError as error:
            raise LiberoSetupError(f"{task.suite} task {task.task_id} ({task.name}): a LIBERO asset is "
                                   f"missing: {error}") from error
        except ValueError as error:
            # MuJoCo reports a missing mesh or texture file as an XML error.
            if "file" in str(error).lower():
                raise LiberoSetupError(f"{task.suite} task {task.task_id} ({task.name}): a LIBERO asset "
                                       f"cannot be loaded: {error}") from error
            raise
        self.env.seed(seed)

    def observation(self, raw: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            "images": {name: flip_180(raw[key]) for name, key in self.camera_map.items()},
            "proprio": proprio_from_obs(raw),
            "instruction": self.instruction,
        }

    def start(self, init_index: int) -> dict[str, Any]:
        if not 0 <= init_index < len(self.init_states):
            raise IndexError(f"initial state {init_index} of {len(self.init_states)}")
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[init_index])
        for _ in range(WAIT_STEPS):
            raw, _, _, _ = self.env.step(np.asarray(NOOP_ACTION))
        return self.observation(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        raw, _, done, _ = self.env.step(postprocess_action(action, self.gripper_open_convention))
        return self.observation(raw), bool(done)

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.env.close()
