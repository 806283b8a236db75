"""LIBERO / robomimic HDF5 demonstrations -> trajectory shards; `python -m data_modules.convert libero ...`.

    python -m data_modules.convert libero --hdf5 FILE [FILE ...] --out DIR [--max-horizon 16] \
        [--keep-noops] [--cameras agentview_rgb eye_in_hand_rgb] [--image-size N] [--dataset-name NAME] \
        [--instruction TEXT] [--strict] [--overwrite]

Input layout (one file per task; demos `data/demo_0`, `data/demo_1`, ... taken in numeric order):
`actions` [T, A] (last dimension = gripper, raw -1 open / +1 close), camera frames `obs/<camera>`
[T, H, W, 3] uint8, end-effector pose and gripper joints. LIBERO keys: `obs/ee_states` (position +
axis-angle, or position + quaternion x,y,z,w), or `obs/ee_pos` + `obs/ee_ori`, and `obs/gripper_states`
[T, 2]; robomimic keys: `obs/robot0_eef_pos`, `obs/robot0_eef_quat`, `obs/robot0_gripper_qpos`. Default
cameras: `agentview_rgb` and `eye_in_hand_rgb` (LIBERO), else `agentview_image` and
`robot0_eye_in_hand_image` (robomimic).

Conventions follow the reference (openvla's `modified_libero_rlds` data, which Dream-VLA trains on):
- **No-op steps** are dropped: a step whose action has ||a[:-1]|| < 1e-4 and whose gripper action equals
  that of the previous kept step (the first kept step only needs the first test). The reference re-renders
  the demo without them; here the step's frames, proprio and action are removed (a no-op does not move
  the robot).
- **Images** are stored rotated 180 degrees from the raw simulator frames (robosuite/LIBERO frames in the
  default OpenGL convention are upside down). Evaluation must apply the same 180-degree flip to simulator
  frames. Files recorded with robosuite's "opencv" image convention (`data.attrs["macros_image_convention"]`)
  are already flipped vertically, so only a horizontal flip is applied to reach the same orientation.
- **Gripper action** is mapped from raw -1 = open / +1 = close to 1 = open / 0 = close by `1 - clip(a, 0, 1)`
  and is left out of normalisation (`action_norm_mask` False on that dimension).
- **Proprio** is 8-D: end-effector position (3), axis-angle (3; converted from robosuite's x,y,z,w
  quaternion where the file stores one), gripper joint positions (2).
- **Instruction**: `data.attrs["problem_info"]` JSON `language_instruction`; else, for LIBERO file names
  ending in `_demo.hdf5`, the words after the scene tag (`KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5` ->
  "turn on the stove"; names without a scene tag give all their words); else `--instruction` is required.

Bad episodes (missing keys, mismatched lengths, NaN/inf, nothing left after filtering) and unreadable files
are skipped, counted and logged with file and episode; `--strict` makes the first one fatal. The exit code
is 0 when something was written, 2 otherwise. `BadEpisode`, `Episode` and `run_episodes` are shared with
`convert_lerobot`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from PIL import Image

from data_modules.convert import ConversionReport, register_converter

if TYPE_CHECKING:
    from data_modules.trajectory import TrajectoryShardWriter

log = logging.getLogger(__name__)

CONTROL_HZ = 20
NOOP_THRESHOLD = 1e-4
LIBERO_CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
ROBOMIMIC_CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
POSE_ACTION_NAMES = ("delta_pos_x", "delta_pos_y", "delta_pos_z", "delta_rot_x", "delta_rot_y", "delta_rot_z")
GRIPPER_ACTION_NAME = "gripper_open"
PROPRIO_NAMES = (
    "eef_pos_x", "eef_pos_y", "eef_pos_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
    "gripper_qpos_0", "gripper_qpos_1",
)
IMAGE_ORIENTATION = "rotated_180_from_raw_sim"
GRIPPER_CONVENTION = "1=open, 0=close (raw -1=open/+1=close mapped by 1 - clip(a, 0, 1))"

_DEMO_RE = re.compile(r"^demo_(\d+)$")
_SCENE_RE = re.compile(r"^SCENE\d+$")


class BadEpisode(Exception):
    """One episode (or a whole source file) that cannot be converted; `kind` is the count bucket."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class Episode:
    """One episode ready for `TrajectoryShardWriter.write_episode`; `info` is for the converter's report."""

    episode_id: str
    images: dict[str, list[np.ndarray]]
    actions: np.ndarray
    instruction: str
    proprio: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_episodes(
    episodes: Iterable[tuple[str, Callable[[], Episode]]],
    writer: TrajectoryShardWriter,
    report: ConversionReport,
    strict: bool,
    on_written: Callable[[Episode], None] | None = None,
    meta_at_close: Callable[[dict[str, str]], dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Build and write each `(label, build)` episode; bad ones are skipped, counted in `report` and logged.

    `label` names the file and episode. With `strict` the first bad episode raises ValueError naming it.
    At the end `meta_at_close(skipped)` is merged into the writer's extra meta and the writer is closed if
    anything was written, aborted otherwise (no meta.json). Returns `{label: reason}` of skipped episodes.
    """
    skipped: dict[str, str] = {}
    try:
        for label, build in episodes:
            report.records += 1
            try:
                episode = build()
                try:
                    writer.write_episode(images=episode.images, actions=episode.actions,
                                         instruction=episode.instruction, proprio=episode.proprio,
                                         episode_id=episode.episode_id)
                except ValueError as error:
                    # The writer checks everything before writing, so the set stays consistent.
                    raise BadEpisode("invalid_episode", str(error)) from None
            except BadEpisode as bad:
                if strict:
                    raise ValueError(f"{label}: {bad.kind}: {bad.reason}") from None
                report.skipped[bad.kind] = report.skipped.get(bad.kind, 0) + 1
                skipped[label] = f"{bad.kind}: {bad.reason}"
                log.warning("%s: skipped, %s: %s", label, bad.kind, bad.reason)
                continue
            report.written += 1
            if on_written is not None:
                on_written(episode)
    except BaseException:
        writer.abort()
        raise
    if report.written == 0:
        writer.abort()
        return skipped
    if meta_at_close is not None:
        writer.extra_meta.update(meta_at_close(skipped))
    report.shards = len(writer.close()["shards"])
    return skipped


def keep_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """[T] bool, False at the reference's no-ops: ||a[:-1]|| < threshold and gripper == last kept gripper."""
    still = np.linalg.norm(actions[:, :-1], axis=1) < threshold
    keep = np.ones(len(actions), dtype=bool)
    last_gripper: float | None = None
    for t in range(len(actions)):
        if still[t] and (last_gripper is None or actions[t, -1] == last_gripper):
            keep[t] = False
            continue
        last_gripper = actions[t, -1]
    return keep


def gripper_open_fraction(raw: np.ndarray) -> np.ndarray:
    """Raw gripper action (-1 open, +1 close) -> 1 open, 0 close, as the reference's LIBERO transform."""
    return 1.0 - np.clip(raw, 0.0, 1.0)


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """[..., 4] quaternions (x, y, z, w; robosuite's order) -> [..., 3] axis-angle, as robosuite does."""
    w = np.clip(quat[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    # No rotation (den ~ 0) gives the zero vector, as in robosuite.
    zero = np.isclose(den, 0.0)
    scale = np.where(zero, 0.0, 2.0 * np.arccos(w) / np.where(zero, 1.0, den))
    return quat[..., :3] * scale[..., None]


def to_reference_orientation(frames: np.ndarray, image_convention: str | None) -> np.ndarray:
    """[T, H, W, 3] simulator frames -> the reference's storage orientation (see the module docstring)."""
    if image_convention == "opencv":
        return np.ascontiguousarray(frames[:, :, ::-1])
    return np.ascontiguousarray(frames[:, ::-1, ::-1])


def instruction_from_filename(path: str) -> str | None:
    """`.../KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5` -> "turn on the stove"; None without `_demo`."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if not stem.endswith("_demo"):
        return None
    words = [w for w in stem[: -len("_demo")].split("_") if w]
    scene_tags = [i for i, w in enumerate(words) if _SCENE_RE.match(w)]
    words = words[scene_tags[-1] + 1:] if scene_tags else words
    return " ".join(words) or None


def suite_from_path(path: str) -> str | None:
    """The LIBERO suite folder in a path: `.../libero_goal_no_noops/x.hdf5` -> "libero_goal_no_noops"."""
    for part in reversed(os.path.abspath(path).split(os.sep)):
        for suite in LIBERO_SUITES:
            if re.fullmatch(rf"{suite}(_no_noops)?", part):
                return part
    return None


def default_dataset_name(paths: Sequence[str]) -> str:
    """The suite shared by all paths, else the file name of a single file, else "libero"."""
    suites = {suite_from_path(p) for p in paths}
    if len(suites) == 1 and None not in suites:
        return suites.pop()
    if len(paths) == 1:
        return re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.splitext(os.path.basename(paths[0]))[0])
    return "libero"


def _attr_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def file_instruction(data_attrs: Any, path: str) -> tuple[str, str]:
    """(instruction, where it came from) of one file: `problem_info` JSON, else the file name."""
    if "problem_info" in data_attrs:
        try:
            info = json.loads(_attr_text(data_attrs["problem_info"]))
        except json.JSONDecodeError as error:
            raise BadEpisode("bad_file", f"data.attrs['problem_info'] is not JSON ({error})") from None
        text = info.get("language_instruction") if isinstance(info, dict) else None
        if isinstance(text, str) and text.strip():
            return text.strip(), "problem_info"
    text = instruction_from_filename(path)
    if text is None:
        raise BadEpisode("missing_instruction", "no language_instruction in data.attrs['problem_info'] and "
                                                "no LIBERO '<task>_demo.hdf5' file name; pass --instruction")
    return text, "file name"


def _read(group: Any, key: str, where: str) -> np.ndarray:
    if key not in group:
        raise BadEpisode("missing_key", f"missing dataset '{where}{key}'")
    return np.asarray(group[key][()])


def _first_bad_row(values: np.ndarray) -> int | None:
    bad = np.argwhere(~np.isfinite(values))
    return int(bad[0, 0]) if len(bad) else None


def read_proprio(obs: Any) -> np.ndarray:
    """[T, 8] proprio from whichever pose keys the demo's `obs` group has (see the module docstring)."""
    if "ee_states" in obs:
        ee = _read(obs, "ee_states", "obs/")
        if ee.ndim != 2 or ee.shape[1] not in (6, 7):
            raise BadEpisode("bad_shape", f"obs/ee_states must be [T, 6] (position + axis-angle) or [T, 7] "
                                          f"(position + quaternion), got {ee.shape}")
        pos, ori = ee[:, :3], ee[:, 3:]
    elif "ee_pos" in obs:
        pos, ori = _read(obs, "ee_pos", "obs/"), _read(obs, "ee_ori", "obs/")
    elif "robot0_eef_pos" in obs:
        pos, ori = _read(obs, "robot0_eef_pos", "obs/"), _read(obs, "robot0_eef_quat", "obs/")
    else:
        raise BadEpisode("missing_key", "no end-effector pose: need obs/ee_states, obs/ee_pos + obs/ee_ori "
                                        "or obs/robot0_eef_pos + obs/robot0_eef_quat")
    gripper_key = next((k for k in ("gripper_states", "robot0_gripper_qpos") if k in obs), None)
    if gripper_key is None:
        raise BadEpisode("missing_key", "no gripper joints: need obs/gripper_states or "
                                        "obs/robot0_gripper_qpos")
    gripper = _read(obs, gripper_key, "obs/")
    if pos.ndim != 2 or ori.ndim != 2 or pos.shape[1] != 3 or ori.shape[1] not in (3, 4):
        raise BadEpisode("bad_shape", f"end-effector pose must be [T, 3] position and [T, 3] axis-angle or "
                                      f"[T, 4] quaternion, got {pos.shape} and {ori.shape}")
    if gripper.ndim != 2 or gripper.shape[1] != 2:
        raise BadEpisode("bad_shape", f"obs/{gripper_key} must be [T, 2], got {gripper.shape}")
    if not len(pos) == len(ori) == len(gripper):
        raise BadEpisode("length_mismatch", f"pose and obs/{gripper_key} lengths differ "
                                            f"({len(pos)}, {len(ori)}, {len(gripper)})")
    axis_angle = quat_to_axis_angle(ori.astype(np.float64)) if ori.shape[1] == 4 else ori
    return np.concatenate([pos, axis_angle, gripper], axis=1).astype(np.float32)


@dataclass
class LiberoOptions:
    """Settings of one LIBERO/robomimic conversion."""

    cameras: tuple[str, ...]
    action_dim: int
    keep_noops: bool = False
    image_size: int | None = None
    instruction: str | None = None


def read_demo(
    group: Any, episode_id: str, options: LiberoOptions, instruction: str, image_convention: str | None,
) -> Episode:
    """One `data/demo_N` group as an `Episode` (no-ops removed unless `keep_noops`); raises BadEpisode."""
    actions = _read(group, "actions", "")
    if actions.ndim != 2 or actions.shape[1] != options.action_dim:
        raise BadEpisode("bad_shape", f"actions must be [T, {options.action_dim}], got {actions.shape}")
    if len(actions) == 0:
        raise BadEpisode("empty_episode", "no steps")
    if (t := _first_bad_row(actions)) is not None:
        raise BadEpisode("nan_value", f"actions hold NaN/inf (first at step {t})")
    if "obs" not in group:
        raise BadEpisode("missing_key", "missing group 'obs'")
    obs = group["obs"]
    proprio = read_proprio(obs)
    if (t := _first_bad_row(proprio)) is not None:
        raise BadEpisode("nan_value", f"proprio holds NaN/inf (first at step {t})")
    videos: dict[str, np.ndarray] = {}
    for camera in options.cameras:
        video = _read(obs, camera, "obs/")
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise BadEpisode("bad_shape", f"obs/{camera} must be [T, H, W, 3] uint8, got {video.shape} "
                                          f"{video.dtype}")
        videos[camera] = video
    lengths = {"actions": len(actions), "proprio": len(proprio), **{c: len(v) for c, v in videos.items()}}
    if len(set(lengths.values())) != 1:
        raise BadEpisode("length_mismatch", f"lengths differ {lengths}")
    keep = np.ones(len(actions), dtype=bool) if options.keep_noops else keep_mask(actions)
    if not keep.any():
        raise BadEpisode("empty_episode", f"all {len(actions)} steps are no-ops")
    actions = actions[keep].astype(np.float32)
    actions[:, -1] = gripper_open_fraction(actions[:, -1])
    images = {
        camera: [_resize(frame, options.image_size)
                 for frame in to_reference_orientation(video[keep], image_convention)]
        for camera, video in videos.items()
    }
    return Episode(episode_id=episode_id, images=images, actions=actions, proprio=proprio[keep],
                   instruction=instruction, info={"steps": len(keep), "noops": int((~keep).sum())})


def _resize(frame: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or frame.shape[:2] == (size, size):
        return frame
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.LANCZOS))


def _demo_names(data: Any, path: str, warn: bool) -> list[str]:
    """`data/demo_N` keys in numeric order (demo_2 before demo_10)."""
    numbered = []
    for key in data.keys():
        match = _DEMO_RE.match(key)
        if match is None:
            if warn:
                log.warning("%s: ignoring data/%s (not a demo_N group)", path, key)
            continue
        numbered.append((int(match.group(1)), key))
    return [key for _, key in sorted(numbered)]


def _raiser(kind: str, reason: str) -> Callable[[], Episode]:
    def build() -> Episode:
        raise BadEpisode(kind, reason)

    return build


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError("the libero converter needs h5py (pip install h5py)") from error
    return h5py


def iter_file_episodes(path: str, options: LiberoOptions) -> Iterator[tuple[str, Callable[[], Episode]]]:
    """(label, build) per demo of one file; a file that cannot be used yields one entry that raises."""
    try:
        handle = _h5py().File(path, "r")
    except OSError as error:
        yield path, _raiser("unreadable_file", f"cannot open as HDF5 ({error})")
        return
    with handle:
        if "data" not in handle:
            yield path, _raiser("bad_file", "no top-level 'data' group (expected data/demo_N)")
            return
        data = handle["data"]
        if options.instruction:
            instruction, source = options.instruction, "--instruction"
        else:
            try:
                instruction, source = file_instruction(data.attrs, path)
            except BadEpisode as bad:
                yield path, _raiser(bad.kind, bad.reason)
                return
        convention = data.attrs.get("macros_image_convention")
        convention = None if convention is None else _attr_text(convention)
        demos = _demo_names(data, path, warn=True)
        if not demos:
            yield path, _raiser("empty_file", "no data/demo_N groups")
            return
        log.info("%s: %d demos, instruction %r (from %s)", path, len(demos), instruction, source)
        stem = os.path.splitext(os.path.basename(path))[0]
        for demo in demos:

            def build(demo: str = demo) -> Episode:
                return read_demo(data[demo], f"{stem}/{demo}", options, instruction, convention)

            yield f"{path}:{demo}", build


def probe_layout(paths: Sequence[str], cameras: Sequence[str] | None) -> tuple[tuple[str, ...], int]:
    """(cameras, action dim) of the first demo with 2-D `actions` and `obs`; default cameras per layout."""
    for path in paths:
        try:
            with _h5py().File(path, "r") as handle:
                data = handle.get("data")
                for demo in _demo_names(data, path, warn=False) if data is not None else []:
                    group = data[demo]
                    if "actions" not in group or "obs" not in group or group["actions"].ndim != 2:
                        continue
                    action_dim = int(group["actions"].shape[1])
                    if cameras:
                        return tuple(cameras), action_dim
                    obs = group["obs"]
                    for layout in (LIBERO_CAMERAS, ROBOMIMIC_CAMERAS):
                        found = tuple(c for c in layout if c in obs)
                        if found:
                            return found, action_dim
                    raise ValueError(f"{path}:{demo}: obs has none of the default cameras "
                                     f"{LIBERO_CAMERAS + ROBOMIMIC_CAMERAS} (it has {sorted(obs.keys())}); "
                                     "pass --cameras")
        except OSError:
            continue
    raise ValueError(f"no readable demo with 2-D 'actions' and an 'obs' group in {list(paths)}")


def action_names(action_dim: int) -> list[str]:
    pose = list(POSE_ACTION_NAMES) if action_dim == 7 else [f"action_{i}" for i in range(action_dim - 1)]
    return pose + [GRIPPER_ACTION_NAME]


def convert_libero(
    paths: Sequence[str],
    out_dir: str,
    *,
    max_horizon: int = 16,
    cameras: Sequence[str] | None = None,
    keep_noops: bool = False,
    image_size: int | None = None,
    dataset_name: str | None = None,
    instruction: str | None = None,
    strict: bool = False,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
    out: TextIO | None = None,
) -> ConversionReport:
    """Convert LIBERO/robomimic HDF5 files into one trajectory shard set; see the module docstring.

    Prints one line per written episode (steps, no-ops dropped) and a summary to `out` (stdout by default).
    """
    out = sys.stdout if out is None else out
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HDF5 file {path} does not exist")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    camera_names, action_dim = probe_layout(paths, cameras)
    options = LiberoOptions(cameras=camera_names, action_dim=action_dim, keep_noops=keep_noops,
                            image_size=image_size, instruction=instruction)
    norm_mask = [True] * action_dim
    norm_mask[-1] = False
    # Imported here: the trajectory module pulls in torch and Lightning, which `convert llava` does not need.
    from data_modules.trajectory import TrajectoryShardWriter

    writer = TrajectoryShardWriter(
        out_dir, action_dim=action_dim, proprio_dim=len(PROPRIO_NAMES), cameras=list(camera_names),
        max_horizon=max_horizon, control_hz=CONTROL_HZ,
        dataset_name=dataset_name or default_dataset_name(paths), action_names=action_names(action_dim),
        proprio_names=list(PROPRIO_NAMES), action_norm_mask=norm_mask,
        max_samples_per_shard=max_samples_per_shard, overwrite=overwrite,
    )
    report = ConversionReport(source=", ".join(paths), out_dir=out_dir)
    steps: dict[str, int] = {}
    noops: dict[str, int] = {}

    def on_written(episode: Episode) -> None:
        steps[episode.episode_id] = episode.info["steps"]
        noops[episode.episode_id] = episode.info["noops"]
        print(f"{episode.episode_id}: {episode.info['steps']} steps, {episode.info['noops']} no-ops dropped, "
              f"{len(episode.actions)} written", file=out)

    def meta_at_close(skipped: dict[str, str]) -> dict[str, Any]:
        return {
            "source": "libero_hdf5",
            "source_files": [os.path.abspath(p) for p in paths],
            "image_orientation": IMAGE_ORIENTATION,
            "gripper_convention": GRIPPER_CONVENTION,
            "proprio_layout": "eef position (3) + eef axis-angle (3) + gripper joint positions (2)",
            "noop_filter": {"enabled": not keep_noops, "threshold": NOOP_THRESHOLD,
                            "dropped_total": sum(noops.values()), "dropped_per_episode": noops},
            "skipped_episodes": skipped,
        }

    episodes = (item for path in paths for item in iter_file_episodes(path, options))
    run_episodes(episodes, writer, report, strict, on_written, meta_at_close)
    print(f"{report.summary()}; no-ops dropped: {sum(noops.values())} of {sum(steps.values())} steps of the "
          "written episodes", file=out)
    return report


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every trajectory converter shares (output folder, chunk length, shard size, error policy)."""
    parser.add_argument("--out", required=True, help="output trajectory shard folder (gets meta.json)")
    parser.add_argument("--max-horizon", type=int, default=16, help="actions stored per step (chunk length)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad episode or file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hdf5", nargs="+", required=True, help="LIBERO/robomimic HDF5 files (one per task)")
    add_writer_arguments(parser)
    parser.add_argument("--keep-noops", action="store_true", help="keep the no-op steps the reference drops")
    parser.add_argument("--cameras", nargs="+", help="obs keys of the cameras (default: per layout)")
    parser.add_argument("--image-size", type=int, help="resize frames to N x N (default: as stored)")
    parser.add_argument("--dataset-name", help="default: the LIBERO suite folder, else the file name")
    parser.add_argument("--instruction", help="instruction of every episode (robomimic files have none)")


def _run(args: argparse.Namespace) -> int:
    report = convert_libero(
        args.hdf5, args.out, max_horizon=args.max_horizon, cameras=args.cameras, keep_noops=args.keep_noops,
        image_size=args.image_size, dataset_name=args.dataset_name, instruction=args.instruction,
        strict=args.strict, max_samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
    )
    if report.written == 0:
        log.error("no episode of %s could be converted; nothing was written to %s", report.source, args.out)
        return 2
    return 0


register_converter("libero", "LIBERO/robomimic HDF5 demonstrations -> trajectory shards", _arguments, _run)
