"""Dataset shards: finding them (paths, folders, brace ranges, remote URLs) and reading their samples.

Webdataset tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``) and
parquet files with image bytes (img2dataset's ``jpg`` column, Hugging Face's ``{"bytes", "path"}``
image struct). Remote URLs go through fsspec (``s3://`` with s3fs, ``gs://`` with gcsfs,
``hf://`` with huggingface_hub), else pyarrow's own filesystems. Nothing here imports torch.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from ..constants import DISTRIBUTION, IMAGE_MEMBER_EXTENSIONS
from ..errors import MissingExtraError, ShardError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
#: Where a caption is looked for when no column is named: parquet columns and webdataset .json fields.
CAPTION_FALLBACKS = ("caption", "text", "prompt")
#: Parquet image columns tried when none is named (img2dataset writes ``jpg``).
IMAGE_FALLBACKS = ("image", "jpg", "png", "webp")
#: Parquet columns that name a row; without one the key is the row number.
KEY_COLUMNS = ("key", "id")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key up to the basename's first dot
#: :attr:`Sample.cause` of a sample that has no image, or no caption.
NO_IMAGE = "no-image"
NO_CAPTION = "no-caption"


@dataclass(frozen=True)
class Shard:
    """One input shard: where it is (a path or URL, as expanded) and which reader it needs."""

    source: str
    kind: str  # "tar" or "parquet"

    @property
    def name(self) -> str:
        """The shard's file name without its suffix; its output is ``NAME.parquet``."""
        base = PurePosixPath(self.source.replace("\\", "/")).name
        for suffix in TAR_SUFFIXES + PARQUET_SUFFIXES:
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return base


@dataclass(frozen=True)
class Sample:
    """One row of a shard: its key, the encoded image, its prompt, or why it cannot be scored."""

    key: str
    label: str  # names the image in messages: SHARD:MEMBER or SHARD:KEY
    image: bytes | None
    prompt: str | None
    error: str | None = None
    cause: str | None = None  # NO_IMAGE, NO_CAPTION, or None (scorable, or another problem)


def _detail(exc: BaseException) -> str:
    """A library's error text on one line (tarfile's lists every compression it tried, one per line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def expand_braces(pattern: str) -> list[str]:
    """``a/{00000..00003}.tar`` and ``{train,test}.parquet`` as webdataset and img2dataset write them.

    Numeric ranges keep the zero padding of their first bound; several braces expand as a product.
    """
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos:m.start()]])
        body = m.group(1)
        rng = _RANGE.match(body)
        if rng:
            lo, hi = int(rng.group(1)), int(rng.group(2))
            width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
            step = 1 if hi >= lo else -1
            parts.append([str(i).zfill(width) for i in range(lo, hi + step, step)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            parts.append(["{" + body + "}"])
        pos = m.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _filesystem(url: str):
    """(filesystem, path, open) for a remote URL: fsspec's when it knows the protocol, else pyarrow's."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs, path, lambda p: fs.open(p, "rb")
    except ImportError as exc:
        fs_error: Exception = exc
    except ValueError as exc:  # fsspec knows no such protocol, or its package is missing
        fs_error = exc
    try:
        from pyarrow import fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        return fs, path, fs.open_input_file
    except Exception:
        proto = url.split("://", 1)[0]
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "az": "adlfs",
                "abfs": "adlfs"}.get(proto, f"an fsspec filesystem for {proto}://")
        raise MissingExtraError(f"{url}: cannot read {proto}:// URLs ({fs_error}); install {hint}") from None


def _folder_shards(names: list[str]) -> list[tuple[str, str]]:
    """(name, kind) of a folder's shards: its tars if it has any (img2dataset writes a metadata
    parquet beside each tar), else its parquet files."""
    found = [(n, _kind(n)) for n in sorted(names)]
    tars = [(n, k) for n, k in found if k == "tar"]
    return tars or [(n, k) for n, k in found if k == "parquet"]


def find_shards(sources: list[str]) -> tuple[list[Shard], list[tuple[str, str]]]:
    """Expand sources into shards, in order, without duplicates; and (source, problem) for those
    that name nothing readable (a missing file, a folder without shards, an unknown suffix)."""
    shards: list[Shard] = []
    problems: list[tuple[str, str]] = []
    for given in sources:
        for source in expand_braces(given):
            if is_remote(source):
                found, problem = _find_remote(source)
            else:
                found, problem = _find_local(source)
            if problem:
                problems.append((source, problem))
            shards.extend(found)
    return list(dict.fromkeys(shards)), problems


def _find_local(source: str) -> tuple[list[Shard], str | None]:
    path = _local(source)
    if any(c in path for c in "*?[") and not os.path.exists(path):
        matches = sorted(glob.glob(path))
        found = [Shard(m, k) for m in matches if (k := _kind(m))]
        return found, None if found else "no .tar or .parquet shard matches this pattern"
    if os.path.isdir(path):
        found = [Shard(os.path.join(source, n), k) for n, k in _folder_shards(os.listdir(path))]
        return found, None if found else "no .tar or .parquet shards in this folder"
    kind = _kind(path)
    if kind is None:
        return [], "not a shard: expected .tar, .tar.gz, .tgz or .parquet"
    if not os.path.exists(path):
        return [], "no such file"
    return [Shard(source, kind)], None


def _find_remote(source: str) -> tuple[list[Shard], str | None]:
    fs, path, _ = _filesystem(source)
    proto = source.split("://", 1)[0]
    try:
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
            found = [Shard(f"{proto}://{m}", k) for m in matches if (k := _kind(m))]
            return found, None if found else "no .tar or .parquet shard matches this pattern"
        if _kind(path) is None and fs.isdir(path):
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
            found = [Shard(source.rstrip("/") + "/" + n, k) for n, k in _folder_shards(names)]
            return found, None if found else "no .tar or .parquet shards in this folder"
    except Exception as exc:  # listing a remote folder: network, permissions
        return [], f"cannot list ({_detail(exc)})"
    kind = _kind(path)
    if kind is None:
        return [], "not a shard: expected .tar, .tar.gz, .tgz or .parquet"
    return [Shard(source, kind)], None


@contextmanager
def open_source(source: str) -> Iterator[BinaryIO]:
    """A shard's bytes as a seekable binary file, local or remote."""
    if is_remote(source):
        _, path, open_file = _filesystem(source)
        try:
            f = open_file(path)
        except Exception as exc:
            raise ShardError(f"{source}: cannot open ({_detail(exc)})") from None
    else:
        try:
            f = open(_local(source), "rb")
        except FileNotFoundError:
            raise ShardError(f"{source}: no such file") from None
        except OSError as exc:
            raise ShardError(f"{source}: cannot open ({exc.strerror or exc})") from None
    with f:
        yield f


def read_shard(shard: Shard, caption_column: str | None = None, image_column: str | None = None,
               prompt: str | None = None, *, image_ext: str | None = None,
               caption_ext: str | None = None) -> list[Sample]:
    """Every sample of one shard, in order. Raises :class:`ShardError` when the shard as a whole
    cannot be read (missing, truncated, not a tar/parquet, no image column); a sample without an
    image or caption comes back with ``error`` (and ``cause``) set instead.

    ``image_column``/``caption_column`` name parquet columns; ``image_ext``/``caption_ext`` name
    webdataset member extensions. Each applies to its own kind of shard only, so one set of
    options reads a mix of tars and parquet files."""
    if shard.kind == "tar":
        return _read_tar(shard.source, caption_column, prompt, _ext(image_ext), _ext(caption_ext))
    return _read_parquet(shard.source, caption_column, image_column, prompt)


def _ext(value: str | None) -> str | None:
    """A member extension as given (``jpg``, ``.jpg``, ``seg.png``), lowercased without its leading dot."""
    return value.strip().lstrip(".").lower() or None if value else None


def _candidates(named: str | None, fallbacks: tuple[str, ...]) -> tuple[str, ...]:
    return (named,) if named else fallbacks


def _clean_caption(value) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _read_tar_members(source: str, wanted) -> tuple[dict[str, dict[str, tuple[str, bytes]]], dict[str, set[str]]]:
    """``{key: {extension: (member name, bytes)}}`` of the members whose extension ``wanted`` accepts,
    in archive order, and ``{key: extensions}`` of the others (for messages).

    Member names are only split into key and extension, never used as paths: nothing is extracted."""
    members: dict[str, dict[str, tuple[str, bytes]]] = {}
    others: dict[str, set[str]] = {}
    with open_source(source) as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    match = _WDS_KEY.match(m.name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if wanted(ext):
                        fh = tf.extractfile(m)
                        data = fh.read() if fh is not None else b""
                        if len(data) != m.size:
                            raise tarfile.ReadError("unexpected end of data")
                        members.setdefault(key, {})[ext] = (m.name, data)
                    else:
                        members.setdefault(key, {})
                        others.setdefault(key, set()).add(ext)
                compressed = tf.fileobj is not f
                end = tf.offset
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
            raise ShardError(f"{source}: truncated or not a tar file ({_detail(exc)})") from None
        # A tar cut at a member boundary reads as a shorter archive; its end-of-archive block is missing.
        if not compressed:
            f.seek(end)
            if size < end + 512 or f.read(512).strip(b"\0"):
                raise ShardError(f"{source}: truncated tar (no end-of-archive block after {end} bytes)")
    return members, others


def _read_tar(source: str, caption_column: str | None, prompt: str | None, image_ext: str | None,
              caption_ext: str | None) -> list[Sample]:
    image_exts = (image_ext,) if image_ext else IMAGE_MEMBER_EXTENSIONS
    caption_exts = (caption_ext,) if caption_ext else ("txt", "json")
    members, others = _read_tar_members(source, lambda e: e in image_exts or (prompt is None and e in caption_exts))
    samples = []
    for key, exts in members.items():
        image = next((exts[e] for e in image_exts if e in exts), None)
        label = f"{source}:{image[0] if image else key}"
        if image is None:
            has = sorted(others.get(key, set()) | set(exts))
            samples.append(Sample(key, label, None, None,
                                  f"{label}: no image member (looked for .{', .'.join(image_exts)}; it has "
                                  f"{', '.join('.' + e for e in has) if has else 'no other member'})", NO_IMAGE))
            continue
        text = prompt
        if text is None:
            text = _tar_caption(exts, caption_exts, caption_column)
        if text is not None:
            samples.append(Sample(key, label, image[1], text))
            continue
        fields = "/".join(dict.fromkeys((*((caption_column,) if caption_column else ()), *CAPTION_FALLBACKS)))
        where = " or ".join(f"a .{e} member" if e != "json" else f"a {fields} field in a .json member"
                            for e in caption_exts)
        samples.append(Sample(key, label, image[1], None, f"{label}: no caption (no {where})", NO_CAPTION))
    return samples


def _tar_caption(exts: dict[str, tuple[str, bytes]], caption_exts: tuple[str, ...],
                 caption_column: str | None) -> str | None:
    for ext in caption_exts:
        if ext not in exts:
            continue
        data = exts[ext][1]
        if ext != "json" and not ext.endswith(".json"):
            text = _clean_caption(data.decode("utf-8", errors="replace"))
            if text is not None:
                return text
            continue
        try:
            meta = json.loads(data)
        except ValueError:
            continue
        if isinstance(meta, dict):
            for field in dict.fromkeys((*((caption_column,) if caption_column else ()), *CAPTION_FALLBACKS)):
                value = meta.get(field)
                text = _clean_caption(value) if isinstance(value, (str, int, float)) else None
                if text is not None:
                    return text
    return None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f'reading parquet needs pyarrow: pip install "{DISTRIBUTION}[dataset]"') from None
    return pq


def _read_parquet(source: str, caption_column: str | None, image_column: str | None,
                  prompt: str | None) -> list[Sample]:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    with open_source(source) as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            image_col = next((c for c in _candidates(image_column, IMAGE_FALLBACKS) if c in names), None)
            if image_col is None:
                tried = ", ".join(_candidates(image_column, IMAGE_FALLBACKS))
                raise ShardError(f"{source}: no image column (tried {tried}; it has {', '.join(names)})")
            caption_col = None
            if prompt is None:
                caption_col = next((c for c in _candidates(caption_column, CAPTION_FALLBACKS) if c in names), None)
                if caption_col is None:
                    tried = ", ".join(_candidates(caption_column, CAPTION_FALLBACKS))
                    raise ShardError(f"{source}: no caption column (tried {tried}; it has {', '.join(names)})")
            key_col = next((c for c in KEY_COLUMNS if c in names), None)
            cols = [c for c in dict.fromkeys((image_col, caption_col, key_col)) if c is not None]
            table = pf.read(columns=cols)
        except ShardError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ShardError(f"{source}: unreadable parquet file ({_detail(exc)})") from None
    images = table.column(image_col).to_pylist()
    captions = table.column(caption_col).to_pylist() if caption_col else [prompt] * len(images)
    keys = [str(k) for k in table.column(key_col).to_pylist()] if key_col else [str(i) for i in range(len(images))]
    samples = []
    for key, cell, caption in zip(keys, images, captions, strict=True):
        label = f"{source}:{key}"
        data, error = _image_bytes(cell, image_col)
        cause = NO_IMAGE if error else None
        text = _clean_caption(caption) if isinstance(caption, (str, int, float)) else None
        if error is None and text is None:
            error, cause = f"no caption in column {caption_col}", NO_CAPTION
        samples.append(Sample(key, label, data, text, f"{label}: {error}" if error else None, cause))
    return samples


def _image_bytes(cell, column: str) -> tuple[bytes | None, str | None]:
    """The encoded image in a parquet cell: raw bytes, or Hugging Face's ``{"bytes", "path"}`` struct."""
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data is None:
            where = f" (only a path: {cell['path']})" if cell.get("path") else ""
            return None, f"no image bytes in column {column}{where}"
        return bytes(data), None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell), None
    if cell is None:
        return None, f"no image in column {column}"
    return None, f"column {column} holds {type(cell).__name__}, not image bytes"
