"""Local LeRobot datasets (v2.0/v2.1 and v3.0 layouts) -> trajectory shards.

    python -m data_modules.convert lerobot --root DIR --out DIR [--cameras KEY ...] [--max-horizon 16] \
        [--action-key action] [--state-key observation.state | --no-state] [--no-norm-dims 6 ...] \
        [--dataset-name NAME] [--strict] [--overwrite]

Reads `meta/info.json` (`features` with dtype/shape/names, `fps`, `data_path`/`video_path` templates,
`chunks_size`) and, by layout:
- v2.x (`data_path` holds `{episode_index}`): `meta/episodes.jsonl`, `meta/tasks.jsonl`,
  `data/chunk-XXX/episode_XXXXXX.parquet`, videos `videos/chunk-XXX/<key>/episode_XXXXXX.mp4`;
- v3.0: `meta/episodes/chunk-XXX/file-XXX.parquet` (per episode `data/chunk_index`, `data/file_index`,
  `videos/<key>/chunk_index`, `videos/<key>/file_index`, `videos/<key>/from_timestamp`), `meta/tasks.parquet`,
  `data/chunk-XXX/file-XXX.parquet` holding many episodes, `videos/<key>/chunk-XXX/file-XXX.mp4`.
Camera features of dtype "image" are parquet structs `{"bytes", "path"}`; dtype "video" frames are decoded
with PyAV: frame i of an episode is the video frame nearest to the row's `timestamp` (else
`frame_index / fps`), plus the episode's `from_timestamp` in v3, within 0.4 frame periods. Cameras are named
in the shards by the feature key without its `observation.images.` prefix (lower case). The instruction is
the task of the episode's first frame (`task_index`), else the first of the episode's `tasks`. Actions and
proprio are stored as they are; `--no-norm-dims` lists action dimensions left out of normalisation (a
gripper, for instance).

Bad episodes (missing files or columns, NaN/inf, mismatched lengths, undecodable frames) are skipped, counted
and logged with the file and episode; `--strict` makes the first one fatal. Exit code 0 when something was
written, 2 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from data_modules.convert import ConversionReport, register_converter
from data_modules.convert_libero import BadEpisode, Episode, add_writer_arguments, run_episodes

log = logging.getLogger(__name__)

CAMERA_DTYPES = ("image", "video")
CAMERA_PREFIX = "observation.images."
DEFAULT_STATE_KEY = "observation.state"
FRAME_TOLERANCE = 0.4
"""Largest distance between a wanted timestamp and the decoded frame, in frame periods (1 / fps)."""


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LeRobot metadata file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LeRobot metadata file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: not valid JSON ({error})") from None
    return rows


def _parquet():
    import pyarrow.parquet as pq

    return pq


def _read_parquet_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of metadata parquet files, without v3.0's per-episode `stats/...` columns."""
    pq = _parquet()
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            columns = [n for n in pq.read_schema(path).names if not n.startswith("stats/")]
            rows.extend(pq.read_table(path, columns=columns).to_pylist())
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
            raise ValueError(f"{path}: cannot read parquet ({type(error).__name__}: {error})") from None
    return rows


def feature_names(feature: dict[str, Any], dim: int) -> list[str] | None:
    """The per-dimension names of an info.json feature (a list, or a dict holding one list), if they fit;
    a repeated name gets its index appended (`gripper`, `gripper_7`) since shard names must be distinct."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if not (isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names)):
        return None
    return [n if n not in names[:i] else f"{n}_{i}" for i, n in enumerate(names)]


def camera_name(key: str) -> str:
    """Shard camera name of a feature key: `observation.images.wrist_image` -> `wrist_image`."""
    short = key[len(CAMERA_PREFIX):] if key.startswith(CAMERA_PREFIX) else key
    return re.sub(r"[^a-z0-9_]", "_", short.lower())


class LeRobotDataset:
    """Metadata and per-episode reads of one local LeRobot dataset folder (no hub access)."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"LeRobot dataset folder {root} does not exist")
        self.root = root
        self.info_path = os.path.join(root, "meta", "info.json")
        self.info = _read_json(self.info_path)
        for key, kind in (("features", dict), ("fps", (int, float)), ("data_path", str)):
            if not isinstance(self.info.get(key), kind):
                raise ValueError(f"{self.info_path}: key {key!r} missing or of the wrong type "
                                 f"({self.info.get(key)!r})")
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.fps = float(self.info["fps"])
        self.version = str(self.info.get("codebase_version", "unknown"))
        # v2.x templates name the episode; v3.0 templates name a chunk file holding many episodes.
        self.per_episode_files = "{episode_index" in self.info["data_path"]
        self.chunks_size = int(self.info.get("chunks_size", 1000))
        self.tasks = self._load_tasks()
        self.episodes = self._load_episodes()
        self._table_cache: tuple[str, Any] | None = None

    def _load_tasks(self) -> dict[int, str]:
        jsonl = os.path.join(self.root, "meta", "tasks.jsonl")
        table = os.path.join(self.root, "meta", "tasks.parquet")
        if os.path.isfile(jsonl):
            rows, where = _read_jsonl(jsonl), jsonl
        elif os.path.isfile(table):
            rows, where = _read_parquet_rows([table]), table
        else:
            raise FileNotFoundError(f"{self.root}: neither meta/tasks.jsonl nor meta/tasks.parquet exists")
        tasks = {}
        for row in rows:
            # tasks.parquet is written from a pandas frame indexed by the task string.
            text = row.get("task", row.get("__index_level_0__"))
            if not isinstance(text, str) or not isinstance(row.get("task_index"), int):
                raise ValueError(f"{where}: each row needs 'task_index' (int) and 'task' (str), got {row}")
            tasks[row["task_index"]] = text
        return tasks

    def _load_episodes(self) -> list[dict[str, Any]]:
        if self.per_episode_files:
            rows = _read_jsonl(os.path.join(self.root, "meta", "episodes.jsonl"))
        else:
            folder = os.path.join(self.root, "meta", "episodes")
            paths = sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
                           if n.endswith(".parquet"))
            if not paths:
                raise FileNotFoundError(f"{folder}: no episode metadata parquet files")
            rows = _read_parquet_rows(paths)
        for row in rows:
            if not isinstance(row.get("episode_index"), int):
                raise ValueError(f"{self.root}/meta: episode row without an integer 'episode_index': "
                                 f"{ {k: v for k, v in row.items() if not k.startswith('stats/')} }")
        return sorted(rows, key=lambda r: r["episode_index"])

    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]

    def data_file(self, episode: dict[str, Any]) -> str:
        index = episode["episode_index"]
        if self.per_episode_files:
            relative = self.info["data_path"].format(episode_chunk=index // self.chunks_size,
                                                     episode_index=index)
        else:
            relative = self.info["data_path"].format(chunk_index=_meta_int(episode, "data/chunk_index"),
                                                     file_index=_meta_int(episode, "data/file_index"))
        return os.path.join(self.root, relative)

    def video_file(self, episode: dict[str, Any], key: str) -> tuple[str, float]:
        """(mp4 path, time of the episode's first frame in it) of camera `key`."""
        template = self.info.get("video_path")
        if not isinstance(template, str):
            raise ValueError(f"{self.info_path}: feature {key!r} is a video but 'video_path' is missing")
        index = episode["episode_index"]
        if self.per_episode_files:
            relative = template.format(episode_chunk=index // self.chunks_size, video_key=key,
                                       episode_index=index)
            return os.path.join(self.root, relative), 0.0
        relative = template.format(video_key=key, chunk_index=_meta_int(episode, f"videos/{key}/chunk_index"),
                                   file_index=_meta_int(episode, f"videos/{key}/file_index"))
        start = episode.get(f"videos/{key}/from_timestamp")
        if not isinstance(start, int | float):
            raise BadEpisode("missing_key", f"episode metadata lacks 'videos/{key}/from_timestamp'")
        return os.path.join(self.root, relative), float(start)

    def episode_table(self, episode: dict[str, Any], columns: Sequence[str]) -> Any:
        """The episode's rows (pyarrow Table, ordered by frame_index) with `columns` (missing ones raise)."""
        import pyarrow.compute as pc

        path = self.data_file(episode)
        if not os.path.isfile(path):
            raise BadEpisode("missing_file", f"data file {path} does not exist")
        if self._table_cache is not None and self._table_cache[0] == path:
            table = self._table_cache[1]
        else:
            try:
                table = _parquet().read_table(path)
            except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
                raise BadEpisode("unreadable_file", f"{path}: {type(error).__name__}: {error}") from None
            self._table_cache = (path, table)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise BadEpisode("missing_key", f"{path}: missing columns {missing} (has {table.column_names})")
        if "episode_index" in table.column_names:
            table = table.filter(pc.equal(table["episode_index"], episode["episode_index"]))
        elif not self.per_episode_files:
            raise BadEpisode("missing_key", f"{path}: no 'episode_index' column to select the episode")
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        return table


def _meta_int(episode: dict[str, Any], key: str) -> int:
    value = episode.get(key)
    if not isinstance(value, int):
        raise BadEpisode("missing_key", f"episode metadata lacks integer {key!r}")
    return value


def _float_rows(table: Any, key: str, where: str) -> np.ndarray:
    """Column `key` as [T, D] float32; nulls, ragged rows and NaN/inf raise BadEpisode."""
    column = table.column(key)
    if column.null_count:
        raise BadEpisode("missing_value", f"{where}: column {key!r} has {column.null_count} null rows")
    try:
        values = np.asarray(column.to_pylist(), dtype=np.float32)
    except (ValueError, TypeError) as error:
        raise BadEpisode("bad_shape", f"{where}: column {key!r} is not a [T, D] numeric array "
                                      f"({error})") from None
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise BadEpisode("bad_shape", f"{where}: column {key!r} has shape {values.shape}, expected [T, D]")
    if not np.isfinite(values).all():
        t = int(np.argwhere(~np.isfinite(values))[0, 0])
        raise BadEpisode("nan_value", f"{where}: column {key!r} holds NaN/inf (first at row {t})")
    return values


def _decode_image_cells(cells: list[Any], root: str, where: str) -> list[np.ndarray]:
    frames = []
    for t, cell in enumerate(cells):
        data = cell.get("bytes") if isinstance(cell, dict) else None
        path = cell.get("path") if isinstance(cell, dict) else None
        try:
            if data:
                image = Image.open(io.BytesIO(data))
            elif path:
                image = Image.open(path if os.path.isabs(path) else os.path.join(root, path))
            else:
                raise BadEpisode("missing_value", f"{where}: row {t} has neither image bytes nor a path")
            frames.append(np.asarray(image.convert("RGB")))
        except BadEpisode:
            raise
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise BadEpisode("unreadable_image",
                             f"{where}: row {t}: {type(error).__name__}: {error}") from None
    return frames


def decode_video_frames(path: str, timestamps: np.ndarray, tolerance_s: float) -> list[np.ndarray]:
    """RGB frames [H, W, 3] of the mp4 at `path` nearest to each of `timestamps` (seconds).

    Seeks to the first wanted time and decodes up to the last one. A timestamp with no frame within
    `tolerance_s` raises BadEpisode, as does a file PyAV cannot read.
    """
    import av

    if not os.path.isfile(path):
        raise BadEpisode("missing_file", f"video file {path} does not exist")
    start, end = float(timestamps.min()), float(timestamps.max())
    times: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if start - tolerance_s > 0:
                container.seek(int((start - tolerance_s) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if t < start - tolerance_s:
                    continue
                if t > end + tolerance_s:
                    break
                times.append(t)
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.FFmpegError, OSError, IndexError) as error:
        raise BadEpisode("unreadable_video", f"{path}: {type(error).__name__}: {error}") from None
    if not times:
        raise BadEpisode("missing_frame", f"{path}: no frame between {start:.3f} s and {end:.3f} s")
    decoded = np.asarray(times)
    out = []
    for wanted in timestamps:
        i = int(np.argmin(np.abs(decoded - wanted)))
        if abs(decoded[i] - wanted) > tolerance_s:
            raise BadEpisode("missing_frame", f"{path}: no frame within {tolerance_s:.4f} s of "
                                              f"{wanted:.4f} s (nearest {decoded[i]:.4f} s)")
        out.append(frames[i])
    return out


def read_episode(
    dataset: LeRobotDataset,
    episode: dict[str, Any],
    cameras: Sequence[str],
    action_key: str,
    state_key: str | None,
) -> Episode:
    """One episode as an `Episode` (camera names shortened by `camera_name`); raises BadEpisode."""
    index = episode["episode_index"]
    columns = [action_key] + ([state_key] if state_key else [])
    columns += [c for c in cameras if dataset.features[c]["dtype"] == "image"]
    table = dataset.episode_table(episode, columns)
    where = dataset.data_file(episode)
    if table.num_rows == 0:
        raise BadEpisode("empty_episode", f"{where}: no rows")
    actions = _float_rows(table, action_key, where)
    proprio = _float_rows(table, state_key, where) if state_key else None
    if "timestamp" in table.column_names:
        times = np.asarray(table.column("timestamp").to_pylist(), dtype=np.float64)
    elif "frame_index" in table.column_names:
        times = np.asarray(table.column("frame_index").to_pylist(), dtype=np.float64) / dataset.fps
    else:
        times = np.arange(table.num_rows) / dataset.fps
    images: dict[str, list[np.ndarray]] = {}
    for key in cameras:
        if dataset.features[key]["dtype"] == "image":
            images[camera_name(key)] = _decode_image_cells(table.column(key).to_pylist(), dataset.root,
                                                           f"{where} column {key!r}")
        else:
            path, offset = dataset.video_file(episode, key)
            tolerance = FRAME_TOLERANCE / dataset.fps
            images[camera_name(key)] = decode_video_frames(path, times + offset, tolerance)
    lengths = {"rows": table.num_rows, **{c: len(v) for c, v in images.items()}}
    if len(set(lengths.values())) != 1:
        raise BadEpisode("length_mismatch", f"{where}: lengths differ {lengths}")
    instruction = None
    if "task_index" in table.column_names:
        instruction = dataset.tasks.get(table.column("task_index")[0].as_py())
    if instruction is None and episode.get("tasks"):
        instruction = episode["tasks"][0]
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadEpisode("missing_instruction", f"{where}: no task for the episode")
    return Episode(episode_id=f"episode_{index:06d}", images=images, actions=actions, proprio=proprio,
                   instruction=instruction.strip())


def _resolve_cameras(dataset: LeRobotDataset, cameras: Sequence[str] | None) -> list[str]:
    available = dataset.camera_keys()
    if not cameras:
        if not available:
            raise ValueError(f"{dataset.info_path}: no feature of dtype {CAMERA_DTYPES}")
        return available
    chosen = []
    for wanted in cameras:
        matches = [k for k in available if wanted in (k, camera_name(k))]
        if not matches:
            raise ValueError(f"{dataset.info_path}: camera {wanted!r} is not an image/video feature "
                             f"(available: {available})")
        chosen.append(matches[0])
    return chosen


def _feature_dim(dataset: LeRobotDataset, key: str) -> int:
    feature = dataset.features.get(key)
    if feature is None:
        raise ValueError(f"{dataset.info_path}: no feature {key!r} (features: {list(dataset.features)})")
    shape = feature.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int):
        raise ValueError(f"{dataset.info_path}: feature {key!r} must have a 1-D shape, got {shape!r}")
    return shape[0]


def convert_lerobot(
    root: str,
    out_dir: str,
    *,
    max_horizon: int = 16,
    cameras: Sequence[str] | None = None,
    action_key: str = "action",
    state_key: str | None = DEFAULT_STATE_KEY,
    no_norm_dims: Sequence[int] = (),
    dataset_name: str | None = None,
    strict: bool = False,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
    out: TextIO | None = None,
) -> ConversionReport:
    """Convert one local LeRobot dataset folder into a trajectory shard set; see the module docstring.

    `state_key=None` writes no proprio; the default state key is used only when the dataset has it.
    """
    dataset = LeRobotDataset(root)
    camera_keys = _resolve_cameras(dataset, cameras)
    names = [camera_name(k) for k in camera_keys]
    if len(set(names)) != len(names):
        raise ValueError(f"cameras {camera_keys} give clashing shard names {names}")
    action_dim = _feature_dim(dataset, action_key)
    if state_key == DEFAULT_STATE_KEY and state_key not in dataset.features:
        log.info("%s: no %r feature; writing no proprio", dataset.info_path, state_key)
        state_key = None
    proprio_dim = _feature_dim(dataset, state_key) if state_key else 0
    mask = [True] * action_dim
    for dim in no_norm_dims:
        if not 0 <= dim < action_dim:
            raise ValueError(f"--no-norm-dims {dim} is outside the {action_dim} action dimensions of "
                             f"{action_key!r}")
        mask[dim] = False
    # Imported here: the trajectory module pulls in torch and Lightning, which `convert llava` does not need.
    from data_modules.trajectory import TrajectoryShardWriter

    writer = TrajectoryShardWriter(
        out_dir, action_dim=action_dim, proprio_dim=proprio_dim, cameras=names, max_horizon=max_horizon,
        control_hz=dataset.fps, dataset_name=dataset_name or _default_name(root),
        action_names=feature_names(dataset.features[action_key], action_dim),
        proprio_names=feature_names(dataset.features[state_key], proprio_dim) if state_key else None,
        action_norm_mask=mask, max_samples_per_shard=max_samples_per_shard, overwrite=overwrite,
    )
    report = ConversionReport(source=root, out_dir=out_dir)

    def meta_at_close(skipped: dict[str, str]) -> dict[str, Any]:
        return {
            "source": "lerobot",
            "source_root": os.path.abspath(root),
            "lerobot_version": dataset.version,
            "robot_type": dataset.info.get("robot_type"),
            "action_key": action_key,
            "state_key": state_key,
            "camera_keys": dict(zip(names, camera_keys, strict=True)),
            "skipped_episodes": skipped,
        }

    def episodes() -> Iterator[tuple[str, Callable[[], Episode]]]:
        for episode in dataset.episodes:

            def build(episode: dict[str, Any] = episode) -> Episode:
                return read_episode(dataset, episode, camera_keys, action_key, state_key)

            yield f"{root} episode {episode['episode_index']}", build

    run_episodes(episodes(), writer, report, strict, meta_at_close=meta_at_close)
    print(report.summary(), file=sys.stdout if out is None else out)
    return report


def _default_name(root: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.basename(os.path.normpath(os.path.abspath(root))))


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="local LeRobot dataset folder (meta/, data/, videos/)")
    add_writer_arguments(parser)
    parser.add_argument("--cameras", nargs="+", help="image/video feature keys (default: all of them)")
    parser.add_argument("--action-key", default="action")
    parser.add_argument("--state-key", default=DEFAULT_STATE_KEY,
                        help="proprio feature (the default is skipped when the dataset lacks it)")
    parser.add_argument("--no-state", action="store_true", help="write no proprio")
    parser.add_argument("--no-norm-dims", type=int, nargs="+", default=[],
                        help="action dimensions left out of normalisation, e.g. a gripper")
    parser.add_argument("--dataset-name", help="default: the name of the --root folder")


def _run(args: argparse.Namespace) -> int:
    report = convert_lerobot(
        args.root, args.out, max_horizon=args.max_horizon, cameras=args.cameras, action_key=args.action_key,
        state_key=None if args.no_state else args.state_key, no_norm_dims=args.no_norm_dims,
        dataset_name=args.dataset_name, strict=args.strict, max_samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
    )
    if report.written == 0:
        log.error("no episode of %s could be converted; nothing was written to %s", args.root, args.out)
        return 2
    return 0


register_converter("lerobot", "local LeRobot dataset (v2.x or v3.0) -> trajectory shards", _arguments, _run)
