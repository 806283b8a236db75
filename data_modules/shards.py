"""WebDataset tar shards: a generic writer, shard listing, `meta.json`, and a per-shard sample reader.

A shard directory holds `PREFIX-000000.tar`, `PREFIX-000001.tar`, ... and one `meta.json`:
`{"format": ..., "version": ..., "num_samples": N, "shards": [{"name": ..., "num_samples": n}, ...], ...}`.
Inside a tar, the files of one sample are stored next to each other as `{key}.{ext}`; `ext` may itself
contain dots (`img0.jpg`), so keys may not. See docs/data.md for the formats built on top of this.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

IMAGE_TEXT_FORMAT = "dvlx.image_text"
IMAGE_TEXT_VERSION = 1
META_NAME = "meta.json"
SHARD_PATTERN = "{prefix}-{index:06d}.tar"
IMAGE_EXTENSIONS = ("jpg", "png")

# Tar end-of-archive marker: two zero blocks.
_END_OF_ARCHIVE = b"\0" * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardWriter:
    """Write samples (`{ext: bytes}` per key) into numbered tar shards plus `meta.json` at close.

    A shard is written under a temporary name and renamed when complete; `meta.json` is written last, so its
    presence means the whole set is complete. Member headers carry no time or owner, so the same samples
    give byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "train",
        max_samples_per_shard: int = 1000,
        max_bytes_per_shard: int = 1 << 30,
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if max_bytes_per_shard < 1:
            raise ValueError(f"max_bytes_per_shard must be >= 1, got {max_bytes_per_shard}")
        if not _KEY_RE.match(prefix):
            raise ValueError(f"shard prefix must match {_KEY_RE.pattern}, got {prefix!r}")
        self.out_dir = os.fspath(out_dir)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.max_bytes_per_shard = max_bytes_per_shard
        self.meta = {"format": IMAGE_TEXT_FORMAT, "version": IMAGE_TEXT_VERSION, **dict(meta or {})}
        os.makedirs(self.out_dir, exist_ok=True)
        existing = self._existing_outputs()
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {existing[0]} (and {len(existing) - 1} more); "
                "pass overwrite=True to replace them"
            )
        for name in existing:
            os.remove(os.path.join(self.out_dir, name))
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
        self._shard_samples = 0
        self._shard_bytes = 0
        self._closed = False

    def _existing_outputs(self) -> list[str]:
        names = sorted(os.listdir(self.out_dir))
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar(\.tmp)?$")
        return [n for n in names if n == META_NAME or pattern.match(n)]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        """Add one sample; `files` maps extensions (`"json"`, `"img0.jpg"`) to their bytes."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")
        if not _KEY_RE.match(key) or key.startswith("__"):
            raise ValueError(f"sample key must match {_KEY_RE.pattern} and not start with '__', got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.out_dir}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        for ext, data in files.items():
            if not ext or "/" in ext or ext.startswith(".") or ext != ext.lower():
                raise ValueError(
                    f"sample {key!r}: extension {ext!r} must be lower case without '/' or a leading '.'"
                )
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"sample {key!r}, file {ext!r}: expected bytes, got {type(data).__name__}")
        size = sum(len(d) for d in files.values())
        if self._tar is not None and (
            self._shard_samples >= self.max_samples_per_shard
            or self._shard_bytes + size > self.max_bytes_per_shard
        ):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        assert self._tar is not None
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(bytes(data)))
        self._keys.add(key)
        self._shard_samples += 1
        self._shard_bytes += size
        self.num_samples += 1

    def _start_shard(self) -> None:
        name = SHARD_PATTERN.format(prefix=self.prefix, index=len(self.shards))
        self._tmp_path = os.path.join(self.out_dir, name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)
        self._shard_samples = 0
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        final = self._tmp_path[: -len(".tmp")]
        os.replace(self._tmp_path, final)
        self.shards.append({"name": os.path.basename(final), "num_samples": self._shard_samples})
        self._tar = None

    def close(self) -> dict[str, Any]:
        """Finish the open shard and write `meta.json`; returns the metadata written."""
        if self._closed:
            return self.metadata()
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        meta = self.metadata()
        tmp = os.path.join(self.out_dir, META_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(tmp, os.path.join(self.out_dir, META_NAME))
        return meta

    def abort(self) -> None:
        """Drop the unfinished shard and write no `meta.json` (the set stays marked incomplete)."""
        if self._tar is not None:
            self._tar.close()
            os.remove(self._tmp_path)
            self._tar = None
        self._closed = True

    def metadata(self) -> dict[str, Any]:
        return {**self.meta, "num_samples": self.num_samples, "shards": list(self.shards)}


def count_placeholders(conversations: Sequence[Mapping[str, Any]], placeholder: str) -> int:
    """Number of `placeholder` strings over all turns' `value`."""
    return sum(str(turn.get("value", "")).count(placeholder) for turn in conversations)


def encode_image(image: Image.Image | tuple[bytes, str], image_format: str = "png", quality: int = 95
                 ) -> tuple[bytes, str]:
    """Bytes and extension (`jpg`/`png`) of a PIL image or of already encoded `(bytes, ext)`."""
    if isinstance(image, Image.Image):
        fmt = image_format.lower()
        buf = io.BytesIO()
        if fmt in ("jpg", "jpeg"):
            image.convert("RGB").save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), "jpg"
        if fmt == "png":
            image.save(buf, format="PNG")
            return buf.getvalue(), "png"
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    data, ext = image
    ext = ext.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"encoded images must be one of {IMAGE_EXTENSIONS}, got extension {ext!r}")
    return bytes(data), ext


def write_image_text_sample(
    writer: ShardWriter,
    key: str,
    images: Sequence[Image.Image | tuple[bytes, str]],
    conversations: Sequence[Mapping[str, Any]],
    id: str,
    extra: Mapping[str, Any] | None = None,
    image_format: str = "png",
    placeholder: str = "<image>",
) -> None:
    """Write one image-text sample: `{key}.img{k}.{jpg|png}` in conversation order plus `{key}.json`.

    `images` are PIL images (encoded as `image_format`) or `(bytes, ext)` pairs stored as they are. The
    number of `placeholder` strings in the conversation must equal the number of images.
    """
    n = count_placeholders(conversations, placeholder)
    if n != len(images):
        raise ValueError(f"sample {key!r} (id {id!r}): {n} {placeholder} placeholders, {len(images)} images")
    record = {**dict(extra or {}), "id": str(id), "conversations": [dict(t) for t in conversations],
              "num_images": len(images)}
    files: dict[str, bytes] = {}
    for k, image in enumerate(images):
        data, ext = encode_image(image, image_format)
        files[f"img{k}.{ext}"] = data
    files["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
    writer.write(key, files)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check `directory/meta.json`."""
    path = os.path.join(os.fspath(directory), META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {META_NAME} in shard directory {directory} (expected {path})")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    for field, kind in (("format", str), ("version", int), ("num_samples", int), ("shards", list)):
        if not isinstance(meta.get(field), kind):
            raise ValueError(f"{path}: key {field!r} must be a {kind.__name__}, got {meta.get(field)!r}")
    for i, shard in enumerate(meta["shards"]):
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or not isinstance(
                shard.get("num_samples"), int):
            raise ValueError(f"{path}: shards[{i}] must be {{'name': str, 'num_samples': int}}, got {shard}")
    total = sum(s["num_samples"] for s in meta["shards"])
    if total != meta["num_samples"]:
        raise ValueError(f"{path}: num_samples {meta['num_samples']} != sum over shards {total}")
    return meta


def meta_is_complete(directory: str | os.PathLike) -> bool:
    """True when `directory/meta.json` exists, parses and all its shards exist."""
    try:
        meta = read_meta(directory)
    except (FileNotFoundError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(os.fspath(directory), s["name"])) for s in meta["shards"])


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a directory with meta.json, a glob, a brace pattern `a-{000000..000009}.tar`, a file,
    or a list of any of these. A missing path raises FileNotFoundError naming it."""
    if isinstance(spec, list | tuple):
        out: list[str] = []
        for item in spec:
            out.extend(list_shards(item))
        return out
    spec = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(spec):
        meta = read_meta(spec)
        paths = [os.path.join(spec, s["name"]) for s in meta["shards"]]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} listed in {spec}/{META_NAME} does not exist")
        return paths
    if "{" in spec and ".." in spec:
        paths = list(braceexpand.braceexpand(spec))
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} (from pattern {spec}) does not exist")
        return paths
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"no shards match {spec}")
        return paths
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"shard path {spec} does not exist")
    return [spec]


def shard_sample_counts(paths: Sequence[str]) -> list[int | None]:
    """Sample count of each shard from the meta.json in its directory (None when it has no entry)."""
    metas: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in metas:
            try:
                meta = read_meta(directory)
                metas[directory] = {s["name"]: s["num_samples"] for s in meta["shards"]}
            except FileNotFoundError:
                metas[directory] = {}
        counts.append(metas[directory].get(os.path.basename(path)))
    return counts


def required_sample_counts(paths: Sequence[str], needed_for: str) -> list[int]:
    """`shard_sample_counts`, raising ValueError that names the first shard without a meta.json entry and
    what the counts are `needed_for`."""
    counts = shard_sample_counts(paths)
    missing = [path for path, n in zip(paths, counts, strict=True) if n is None]
    if missing:
        raise ValueError(f"shard {missing[0]} has no entry in a meta.json next to it; {needed_for}")
    return [int(n) for n in counts if n is not None]


class TruncatedShardError(Exception):
    """A tar that ended early or could not be read; the complete samples before it were yielded."""

    def __init__(self, shard: str, reason: str, samples_read: int) -> None:
        super().__init__(f"{shard}: {reason} after {samples_read} samples")
        self.shard = shard
        self.reason = reason
        self.samples_read = samples_read


def iter_shard_samples(path: str) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as `{"__key__", "__shard__", ext: bytes, ...}`, in file order.

    A sample whose files are split by another key, or that repeats an extension, gets `"__bad__"` (a reason)
    so the caller can count it. If the tar is truncated or unreadable, the samples before the damage are
    yielded and `TruncatedShardError` is raised at the end. A sample whose file was cut is dropped; when the
    cut falls exactly between members, the last sample is yielded with the files it has, and the caller's
    check for missing files decides whether it is usable.
    """
    current: dict[str, Any] | None = None
    done_keys: set[str] = set()
    read = 0
    reading_key: str | None = None
    error: Exception | None = None
    ends_cleanly = False
    try:
        with open(path, "rb") as f:
            # Member by member (not webdataset's tar_file_iterator): a read error must tell which sample it
            # hit, and a cut between members must be noticed (tarfile stops there without an error).
            stream = tarfile.open(fileobj=f, mode="r|*")
            for info in stream:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or os.path.basename(info.name).startswith("__"):
                    continue
                ext = ext.lower()
                if current is not None and key != current["__key__"]:
                    done_keys.add(current["__key__"])
                    read += 1
                    yield current
                    current = None
                reading_key = key
                extracted = stream.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                reading_key = None
                # Streaming mode keeps every TarInfo otherwise.
                stream.members = []
                if current is None:
                    current = {"__key__": key, "__shard__": path}
                    if key in done_keys:
                        current["__bad__"] = f"files of key {key!r} are not contiguous in the tar"
                if ext in current:
                    current["__bad__"] = f"extension {ext!r} repeated for key {key!r}"
                current[ext] = data
            ends_cleanly = _ends_with_marker(f)
    except (tarfile.TarError, OSError, EOFError) as exn:
        error = exn
    if current is not None and not (error is not None and reading_key == current["__key__"]):
        read += 1
        yield current
    if error is not None:
        raise TruncatedShardError(path, f"tar read error ({error})", read)
    if not ends_cleanly:
        raise TruncatedShardError(path, "no end-of-archive marker (file cut between members)", read)


def _ends_with_marker(f: io.BufferedReader) -> bool:
    # tarfile's stream reader stops silently when a file is cut exactly between members; a complete tar
    # always ends with two zero blocks (plus zero padding), so check the tail.
    size = f.seek(0, os.SEEK_END)
    if size < len(_END_OF_ARCHIVE):
        return False
    f.seek(size - len(_END_OF_ARCHIVE))
    return f.read(len(_END_OF_ARCHIVE)) == _END_OF_ARCHIVE
