"""robosuite environments for demonstrations and closed-loop evaluation: construction, seeding, observations
and the scripted expert.

Two tasks, both a Panda arm with robosuite's OSC_POSE controller at 20 Hz on a table:

- `robosuite-lift`: robosuite's Lift (one red cube, placed within +-3 cm of the table centre with a random
  yaw); instruction "lift the cube".
- `robosuite-lift-color`: a red and a green cube, placed independently over a wider area at least
  `MIN_CUBE_DISTANCE` apart, with random yaws; one of them, drawn per episode, is the target and the
  instruction names it ("lift the green cube"). Success means the named cube is lifted.

Success in both is robosuite's Lift test: the (target) cube's centre more than 4 cm above the table top.

Seeding: `make_env(name, seed=S, ...)` seeds numpy's global generator before building the model, which fixes
the construction-time draws (Lift's cube size); `reset(env, seed=S, index=i)` seeds it with
`episode_seed(S, i)` before robosuite's reset, which draws the robot's initial joint noise, the cube poses
and the target colour from it. Environments are built with `hard_reset=False`, so a reset restores the
simulator state without rebuilding the model, and episode (S, i) starts from the same state whatever ran
before it in the process.

Observations (`observation(env)`) are read from the simulator state at the time of the call. robosuite's own
observation dict is not used: robosuite 1.4 samples it at the first physics substep of a control step.
Images are rendered offscreen with EGL (`MUJOCO_GL=egl`, the default set here) and flipped to the `upright`
orientation (row 0 is the top of the view): MuJoCo reads OpenGL pixels bottom row first. Multisampling and
floor reflections are off, which halves the rendering time on a CPU renderer.

robosuite 1.4.1 works with mujoco 3.1.6 to 3.7 (3.8 renamed `MjData.qM`; from 3.12 robosuite's joint-type
assertion fails); this package pins mujoco 3.2.3.
"""

from __future__ import annotations

import logging
import os

# The renderer is chosen when mujoco and robosuite are imported; EGL renders without a display.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
# robosuite takes the EGL device from CUDA_VISIBLE_DEVICES unless MUJOCO_EGL_DEVICE_ID is set, and fails on a
# value that is not a list of device numbers (an empty one hides the GPUs from torch): use the first device.
if not os.environ.get("CUDA_VISIBLE_DEVICES", "0").replace(",", "").isdigit():
    os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# robosuite warns at import that no private macro file exists; the defaults are what this module wants.
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())

try:
    import mujoco
    from robosuite.controllers import load_controller_config
    from robosuite.environments.manipulation.lift import Lift
    from robosuite.environments.manipulation.manipulation_env import ManipulationEnv
    from robosuite.models.arenas import TableArena
    from robosuite.models.objects import BoxObject
    from robosuite.models.tasks import ManipulationTask
    from robosuite.utils import transform_utils
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "data_modules.sim needs robosuite 1.4.1 and mujoco 3.2.3: "
        "pip install 'robosuite==1.4.1' 'mujoco==3.2.3'"
    ) from error

ENV_NAMES = ("robosuite-lift", "robosuite-lift-color")
CAMERAS = ("agentview", "robot0_eye_in_hand")
CONTROL_HZ = 20
DEFAULT_IMAGE_SIZE = 84
MAX_EPISODE_STEPS = 150
IMAGE_ORIENTATION = "upright"
IMAGE_ORIENTATION_NOTE = (
    "row 0 is the top of the camera view, column 0 its left (MuJoCo's OpenGL readout flipped vertically)"
)
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
# Position deltas and rotation deltas are normalised by robosuite to [-1, 1]; the gripper (-1 open,
# +1 close) is a command, not a quantity, and stays out of normalisation.
ACTION_NORM_MASK = (True, True, True, True, True, True, False)
PROPRIO_NAMES = ("eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
                 "gripper_qpos_left", "gripper_qpos_right")
CUBE_COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.10, 1.0),
    "green": (0.12, 0.70, 0.18, 1.0),
}
CUBE_HALF_SIZE = 0.02
COLOR_X_RANGE = (-0.08, 0.08)
COLOR_Y_RANGE = (-0.14, 0.14)
MIN_CUBE_DISTANCE = 0.10
LIFT_INSTRUCTION = "lift the cube"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


SIM_VERSIONS: dict[str, str | None] = {
    "robosuite": _version("robosuite"),
    "mujoco": _version("mujoco"),
    "renderer": os.environ["MUJOCO_GL"],
}


def color_instruction(color: str) -> str:
    return f"lift the {color} cube"


def episode_seed(seed: int, index: int) -> int:
    """The seed of episode `index` of a run seeded `seed` (a uint32; independent of everything else)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def orient_image(raw: np.ndarray) -> np.ndarray:
    """MuJoCo's offscreen readout (bottom row first) in the `upright` orientation (`IMAGE_ORIENTATION`)."""
    return np.ascontiguousarray(raw[::-1])


class _CpuRenderingMixin:
    """Offscreen rendering settings for a CPU (llvmpipe) renderer: no multisampling, a framebuffer of the
    camera size and no floor reflections (each reflection renders the scene a second time)."""

    def _initialize_sim(self, xml_string=None):
        super()._initialize_sim(xml_string)
        visual = self.sim.model._model.vis
        visual.quality.offsamples = 0
        visual.global_.offwidth = max(self.camera_widths)
        visual.global_.offheight = max(self.camera_heights)

    def _reset_internal(self):
        super()._reset_internal()
        self._tune_renderer()

    def _tune_renderer(self):
        context = self.sim._render_context_offscreen
        if context is not None:
            context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


class DvlxLift(_CpuRenderingMixin, Lift):
    """robosuite's Lift with the CPU rendering settings."""

    instruction = LIFT_INSTRUCTION


class ColorCubeLift(_CpuRenderingMixin, Lift):
    """Two cubes of different colours; the episode's target colour is drawn at reset and named by
    `instruction`. `self.cube` and `self.cube_body_id` point at the target, so Lift's reward and success
    test apply to it."""

    def __init__(self, *args: Any, colors: Sequence[str] = ("red", "green"), **kwargs: Any) -> None:
        unknown = [c for c in colors if c not in CUBE_COLORS]
        if len(colors) < 2 or unknown or len(set(colors)) != len(colors):
            raise ValueError(f"ColorCubeLift: colors must be >= 2 distinct names of {sorted(CUBE_COLORS)}, "
                             f"got {list(colors)}")
        self.colors = tuple(colors)
        self.target_color = self.colors[0]
        super().__init__(*args, **kwargs)

    @property
    def instruction(self) -> str:
        return color_instruction(self.target_color)

    def _load_model(self):
        ManipulationEnv._load_model(self)
        xpos = self.robots[0].robot_model.base_xpos_offset["table"](self.table_full_size[0])
        self.robots[0].robot_model.set_base_xpos(xpos)
        arena = TableArena(
            table_full_size=self.table_full_size,
            table_friction=self.table_friction,
            table_offset=self.table_offset,
        )
        arena.set_origin([0, 0, 0])
        half = [CUBE_HALF_SIZE] * 3
        self.cubes = {
            color: BoxObject(name=f"{color}_cube", size=half, rgba=list(CUBE_COLORS[color]))
            for color in self.colors
        }
        self.cube = self.cubes[self.target_color]
        self.model = ManipulationTask(
            mujoco_arena=arena,
            mujoco_robots=[robot.robot_model for robot in self.robots],
            mujoco_objects=list(self.cubes.values()),
        )

    def _setup_references(self):
        ManipulationEnv._setup_references(self)
        self.cube_body_ids = {
            color: self.sim.model.body_name2id(cube.root_body) for color, cube in self.cubes.items()
        }
        self.cube_body_id = self.cube_body_ids[self.target_color]

    def _reset_internal(self):
        # Lift's own reset would place only its single cube, so the chain skips it.
        ManipulationEnv._reset_internal(self)
        self._tune_renderer()
        if self.deterministic_reset:
            return
        positions: list[np.ndarray] = []
        while len(positions) < len(self.colors):
            xy = np.random.uniform([COLOR_X_RANGE[0], COLOR_Y_RANGE[0]], [COLOR_X_RANGE[1], COLOR_Y_RANGE[1]])
            if all(np.linalg.norm(xy - p) >= MIN_CUBE_DISTANCE for p in positions):
                positions.append(xy)
        for color, xy in zip(self.colors, positions, strict=True):
            yaw = np.random.uniform(0.0, 2.0 * np.pi)
            # Free-joint pose: position, then the quaternion (w, x, y, z) of a rotation about z.
            pose = np.concatenate([
                self.table_offset[:2] + xy,
                [self.table_offset[2] + CUBE_HALF_SIZE + 0.002],
                [np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)],
            ])
            self.sim.data.set_joint_qpos(self.cubes[color].joints[0], pose)
        self.target_color = self.colors[int(np.random.randint(len(self.colors)))]
        self.cube = self.cubes[self.target_color]
        self.cube_body_id = self.cube_body_ids[self.target_color]


_ENV_CLASSES = {"robosuite-lift": DvlxLift, "robosuite-lift-color": ColorCubeLift}


def make_env(name: str, *, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, cameras: Sequence[str] = CAMERAS):
    """A robosuite environment for task `name` (one of `ENV_NAMES`) rendering `cameras` at
    image_size x image_size. `seed` fixes the construction-time random draws; call `reset` before use."""
    if name not in _ENV_CLASSES:
        raise ValueError(f"unknown simulator task {name!r}; expected one of {list(ENV_NAMES)}")
    if not 8 <= int(image_size) <= 1024:
        raise ValueError(f"image_size must be in [8, 1024], got {image_size}")
    np.random.seed(int(seed) % 2**32)
    env = _ENV_CLASSES[name](
        robots="Panda",
        controller_configs=load_controller_config(default_controller="OSC_POSE"),
        has_renderer=False,
        has_offscreen_renderer=True,
        # Cameras are rendered by `observation` at the current state instead (see the module docstring).
        use_camera_obs=False,
        camera_names=list(cameras),
        camera_heights=int(image_size),
        camera_widths=int(image_size),
        control_freq=CONTROL_HZ,
        horizon=MAX_EPISODE_STEPS,
        ignore_done=True,
        hard_reset=False,
        reward_shaping=False,
    )
    env.dvlx_task = name
    env.dvlx_cameras = tuple(cameras)
    env.dvlx_image_size = int(image_size)
    return env


def observation(env) -> dict[str, Any]:
    """The current observation: `images` {camera: uint8 [size, size, 3], upright}, `proprio` float32 [8]
    (end-effector position, end-effector orientation as axis-angle, the two gripper finger joints) and the
    episode's `instruction`."""
    sim = env.sim
    size = env.dvlx_image_size
    # robosuite renders into whichever OpenGL context is current: with several environments in a process,
    # that is the one created last unless this environment's is made current.
    sim._render_context_offscreen.gl_ctx.make_current()
    images = {
        camera: orient_image(sim.render(camera_name=camera, width=size, height=size))
        for camera in env.dvlx_cameras
    }
    robot = env.robots[0]
    eef_pos = np.array(sim.data.site_xpos[robot.eef_site_id])
    # robosuite's eef_quat observable: the hand body's orientation, (x, y, z, w).
    eef_quat = transform_utils.convert_quat(sim.data.get_body_xquat(robot.robot_model.eef_name), to="xyzw")
    gripper = np.array([sim.data.qpos[i] for i in robot._ref_gripper_joint_pos_indexes])
    proprio = np.concatenate([eef_pos, transform_utils.quat2axisangle(eef_quat), gripper]).astype(np.float32)
    return {"images": images, "proprio": proprio, "instruction": env.instruction}


def reset(env, *, seed: int, index: int) -> dict[str, Any]:
    """Start episode `index` of a run seeded `seed` (see the module docstring) and return its observation."""
    np.random.seed(episode_seed(seed, index))
    env.reset()
    return observation(env)


def step(env, action: np.ndarray) -> dict[str, Any]:
    """Apply one normalised 7-D OSC_POSE action (clipped to [-1, 1]) and return the new observation."""
    action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
    if action.shape != (len(ACTION_NAMES),):
        raise ValueError(f"action must have {len(ACTION_NAMES)} values, got shape {np.shape(action)}")
    env.step(action)
    return observation(env)


def success(env) -> bool:
    """Whether the (target) cube is lifted more than 4 cm above the table."""
    return bool(env._check_success())


def target_cube_pos(env) -> np.ndarray:
    return np.array(env.sim.data.body_xpos[env.cube_body_id])


@dataclass
class ScriptedLiftExpert:
    """Privileged-state expert for both tasks: move above the target cube, descend, close the gripper, lift.

    `act(env)` returns the normalised OSC_POSE command: position deltas aim the controller's goal at the
    phase's target point (so they shrink to zero on arrival), rotation deltas are zero, the gripper is -1
    (open) before the grasp and +1 (closed) after. When the cube falls out of the closed gripper during the
    lift the expert starts over.
    """

    hover: float = 0.07
    """Height above the cube centre from which the descent starts (m)."""
    grasp_offset: float = -0.005
    """Grip site height relative to the cube centre when closing (m)."""
    align_tolerance: float = 0.012
    """Horizontal distance to the cube under which the descent starts (m)."""
    close_steps: int = 8
    """Control steps the gripper closes before lifting."""
    lift_height: float = 0.15
    """Height above the grasp point of the lift target (m)."""

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.phase = "reach"
        self._closing = 0
        self._grasp_z = 0.0

    def act(self, env) -> np.ndarray:
        robot = env.robots[0]
        eef = np.array(env.sim.data.site_xpos[robot.eef_site_id])
        cube = target_cube_pos(env)
        horizontal = float(np.linalg.norm((cube - eef)[:2]))
        if self.phase == "lift" and eef[2] - cube[2] > 0.04:
            self.reset()
        if self.phase == "reach" and horizontal < self.align_tolerance:
            self.phase = "descend"
        if self.phase == "descend":
            if horizontal > 2 * self.align_tolerance:
                self.phase = "reach"
            elif eef[2] - cube[2] < self.grasp_offset + 0.01:
                self.phase = "close"
                self._grasp_z = float(eef[2])
        if self.phase == "close":
            self._closing += 1
            if self._closing > self.close_steps:
                self.phase = "lift"

        if self.phase == "reach":
            target = cube + np.array([0.0, 0.0, self.hover])
        elif self.phase == "descend":
            target = cube + np.array([0.0, 0.0, self.grasp_offset])
        elif self.phase == "close":
            target = np.array([eef[0], eef[1], self._grasp_z])
        else:
            target = np.array([eef[0], eef[1], self._grasp_z + self.lift_height])
        scale = np.asarray(robot.controller.output_max[:3], dtype=np.float64)
        action = np.zeros(len(ACTION_NAMES), dtype=np.float64)
        action[:3] = np.clip((target - eef) / scale, -1.0, 1.0)
        action[6] = 1.0 if self.phase in ("close", "lift") else -1.0
        return action.astype(np.float32)


# robosuite's Lift._check_success: the cube centre this far above the table top (m).
LIFT_SUCCESS_HEIGHT = 0.04


def lifted_colors(env) -> list[str]:
    """The colours of `ColorCubeLift` cubes that are lifted by Lift's success criterion."""
    table = float(env.model.mujoco_arena.table_offset[2])
    return [color for color, body in env.cube_body_ids.items()
            if env.sim.data.body_xpos[body][2] > table + LIFT_SUCCESS_HEIGHT]


def other_color(env) -> str:
    """The first colour of a `ColorCubeLift` that is not the episode's target."""
    return next(color for color in env.colors if color != env.target_color)


class SimEpisodeEnv:
    """Closed-loop episodes of one task: `start(index)` -> first observation, `step(action)` ->
    (observation, success). Episode `index` starts from `reset(env, seed=seed, index=index)`.

    `camera_map` maps the policy's camera names to this module's cameras. With `swap_instruction`
    (`robosuite-lift-color` only) the policy is told to lift the other cube while success still means lifting
    the episode's target: a policy that follows the instruction then fails.
    """

    def __init__(self, name: str, *, seed: int, image_size: int, camera_map: dict[str, str],
                 swap_instruction: bool = False) -> None:
        if swap_instruction and name != "robosuite-lift-color":
            raise ValueError(f"{name} has a single instruction: there is none to swap it with")
        self.seed = seed
        self.camera_map = dict(camera_map)
        self.swap_instruction = swap_instruction
        self.env = make_env(name, seed=seed, image_size=image_size, cameras=sorted(set(camera_map.values())))

    def _policy_observation(self, obs: dict[str, Any]) -> dict[str, Any]:
        instruction = obs["instruction"]
        if self.swap_instruction:
            instruction = color_instruction(other_color(self.env))
        return {
            "images": {name: obs["images"][camera] for name, camera in self.camera_map.items()},
            "proprio": obs["proprio"],
            "instruction": instruction,
        }

    def start(self, index: int) -> dict[str, Any]:
        return self._policy_observation(reset(self.env, seed=self.seed, index=index))

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        return self._policy_observation(step(self.env, action)), success(self.env)

    def info(self) -> dict[str, Any]:
        """Per-episode facts for reports (`robosuite-lift-color`): the target cube, the cube the policy was
        told to lift and the cubes lifted."""
        if not isinstance(self.env, ColorCubeLift):
            return {}
        named = other_color(self.env) if self.swap_instruction else self.env.target_color
        return {"target_color": self.env.target_color, "named_color": named,
                "lifted_colors": lifted_colors(self.env)}

    def close(self) -> None:
        self.env.close()
