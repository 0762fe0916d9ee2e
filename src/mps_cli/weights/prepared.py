"""Weights already converted for this machine, kept on disk and mapped where they lie.

Loading an fp16 checkpoint for the CPU converts about a billion values into freshly allocated
memory, and most of the seconds that takes go to faulting that memory in. So after the first
such load the converted tensors (final dtype, final layout) are written once to a cache file.
Later loads map that file privately and use it in place: it is already in the page cache, so
loading is building page tables, and every process scoring at the same time shares one copy.

The file is safetensors written by us (tensors 64-byte aligned with padding entries). It is
named after the source's path, its SHA-256, the dtype and the layout, and records them; its
header and every data byte are sealed with CRC-32 checksums, verified in full (in parallel
chunks) on the first load after the file was written or changed, and by :func:`verify_all`.
Anything that does not match exactly (another source, a changed source, a damaged or
substituted file, a symlink, a FIFO) is deleted and rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..constants import CACHE_ENV
from ..constants import PREPARED_ENV as SWITCH_ENV
from ..errors import CheckpointError
from ..files import remove_stale_temps, temp_path
from ..switches import env_flag
from .cachedir import prepared_dir, version_of, weights_sha256, write_small
from .reader import TORCH_DTYPES, SafetensorsFile, header_from_file

log = logging.getLogger("mps_cli")

FORMAT = "mps-cli-prepared"
# Bump when the meaning of a stored tensor changes (names, layout, seal), so old files are not read.
VERSION = "2"
ALIGN = 64
# Leave this much free on the cache's disk after writing, or do not write.
MIN_FREE_AFTER = 1 << 30
# The data is sealed in chunks of this many bytes, each with its own CRC-32, so chunks verify in parallel.
SEAL_CHUNK = 64 << 20
_BLANK_CRC = "00000000"

_ST_NAME = {v: k for k, v in TORCH_DTYPES.items()}
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

Specs = Mapping[str, tuple[tuple[int, ...], object]]  # name -> (logical shape, torch dtype)


class Unusable(CheckpointError):
    """A prepared file that must not be used (it is deleted and rebuilt)."""


def enabled() -> bool:
    """Whether prepared weights are used, per ``$MPS_PREPARED_WEIGHTS`` (default on, where the OS has pwrite)."""
    return hasattr(os, "pwrite") and env_flag(SWITCH_ENV, default=True)


def cache_dir() -> Path:
    """The folder of prepared weights: ``prepared/`` in mps-cli's cache folder."""
    return prepared_dir()


@dataclass(frozen=True)
class SourceIdentity:
    """What a prepared file was made from: the source's real path and the SHA-256 of its bytes."""

    path: str
    sha256: str


def source_identity(path: Path) -> SourceIdentity:
    """The identity of a source weights file (its SHA-256 is computed once per version of the file)."""
    return SourceIdentity(os.path.realpath(path), weights_sha256(path))


def prepared_path(source: SourceIdentity, dtype_name: str, transposed: frozenset[str],
                  folder: Path | None = None) -> Path:
    """The cache file for ``source`` converted to ``dtype_name`` with ``transposed`` stored (in, out)."""
    ident = json.dumps([FORMAT, VERSION, source.path, source.sha256, dtype_name, sorted(transposed)])
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return (folder or cache_dir()) / f"{key}-{dtype_name}.safetensors"


def obtain(source: SafetensorsFile, specs: Specs, transposed: frozenset[str], dtype_name: str,
           convert: Callable[[PreparedWriter], None]) -> dict | None:
    """The converted state dict, mapped from the prepared copy (written first by ``convert`` if needed).

    ``convert(writer)`` fills every tensor through :meth:`PreparedWriter.buffer` and
    :meth:`PreparedWriter.write`. None (after a log line) when there is no usable copy and
    none can be written; the caller then converts into memory.
    """
    try:
        ident = source_identity(source.path)
        if source.stat is not None and version_of(os.stat(source.path)) != version_of(source.stat):
            return None  # changed since it was opened: this load reads it directly
        path = prepared_path(ident, dtype_name, transposed)
    except (OSError, CheckpointError):
        return None
    state = _map_or_discard(path, specs, transposed, ident)
    if state is not None:
        return state
    writer = open_writer(path, specs, transposed, ident)
    if writer is None:
        return None
    try:
        convert(writer)
        writer.commit()
    except OSError as exc:
        writer.abort()
        log.warning("not caching prepared weights in %s: %s", path.parent, exc.strerror or exc)
        return None
    except BaseException:
        writer.abort()
        raise
    return _map_or_discard(path, specs, transposed, ident)


def _map_or_discard(path: Path, specs: Specs, transposed: frozenset[str], ident: SourceIdentity) -> dict | None:
    try:
        return map_prepared(path, specs, transposed, ident)
    except (CheckpointError, OSError, ValueError) as exc:
        discard(path, str(exc))
        return None


def _st_dtype(dtype) -> str:
    return _ST_NAME[str(dtype).removeprefix("torch.")]


def _open_regular(path: Path):
    """An open file object for ``path``; None when absent; :class:`Unusable` for a link, FIFO or device.

    Never follows a symlink, and never blocks on a FIFO.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"{path}: not a regular file (a symlink, pipe or device)")
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise Unusable(f"{path}: not a regular file")
    return f


def map_prepared(path: Path, expected: Specs, transposed: frozenset[str], source: SourceIdentity | None = None,
                 verify: bool = False) -> dict | None:
    """The state dict stored at ``path``, as views of a private mapping of the file.

    ``expected``: name -> (shape, torch dtype) the model needs; ``source``: what the copy must
    have been made from. Returns None when there is no such file; raises :class:`Unusable`
    when there is one that does not match. The data is checked against its seal in full on the
    first use of each version of the file, or always with ``verify``.
    """
    import mmap

    import torch

    f = _open_regular(path)
    if f is None:
        return None
    with f:
        st = os.fstat(f.fileno())
        header, header_size, meta, raw = header_from_file(f, st.st_size, str(path))
        _check_header_seal(path, raw, meta)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise Unusable(f"{path}: not prepared weights of this version")
        if source is not None and (meta.get("source") != source.path or meta.get("source_sha256") != source.sha256):
            raise Unusable(f"{path}: made from other weights than {source.path}")
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + header_size + end != st.st_size:
            raise Unusable(f"{path}: {st.st_size:,} bytes where its header describes {8 + header_size + end:,}")
        names = {k for k in header if not k.startswith("__pad")}
        if names != set(expected):
            raise Unusable(f"{path}: tensor names differ from the model's")
        # Private and writable: nothing writes to weights, and if something did it would
        # get its own copy of the page instead of changing the cache.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_size
    marker = _marker(path)
    if verify or _read_small(marker) != json.dumps(version_of(st)):
        view = memoryview(mapped)
        try:
            _check_data_seal(path, view[base:], meta)
        finally:
            _release(view)
        write_small(marker, json.dumps(version_of(st)))
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    state = {}
    for name in names:
        info = header[name]
        shape, dtype = expected[name]
        stored = tuple(reversed(shape)) if name in transposed else tuple(shape)
        if tuple(info["shape"]) != stored or info["dtype"] != _st_dtype(dtype):
            raise Unusable(f"{path}: {name} is stored as {info['dtype']} {info['shape']}")
        start, stop = info["data_offsets"]
        if start % ALIGN:
            raise Unusable(f"{path}: {name} is not aligned")
        t = data[base + start: base + stop].view(dtype).view(stored)
        state[name] = t.t() if name in transposed else t
    return state


def _check_header_seal(path: Path, raw: bytes, meta: dict) -> None:
    sealed = meta.get("header_crc")
    field = f'"header_crc":"{sealed}"'.encode()
    if not isinstance(sealed, str) or raw.count(field) != 1:
        raise Unusable(f"{path}: header has no seal")
    blank = f'"header_crc":"{_BLANK_CRC}"'.encode()
    if f"{zlib.crc32(raw.replace(field, blank)):08x}" != sealed:
        raise Unusable(f"{path}: header does not match its seal")


def _chunk_crcs(data: memoryview) -> list[str]:
    """CRC-32 of each :data:`SEAL_CHUNK` of ``data``, computed in parallel (zlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, len(data), SEAL_CHUNK)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda s: f"{zlib.crc32(data[s:s + SEAL_CHUNK]):08x}", starts))


def _check_data_seal(path: Path, data: memoryview, meta: dict) -> None:
    sealed = meta.get("data_crc", "")
    ok = isinstance(sealed, str) and sealed == ",".join(_chunk_crcs(data))
    del data  # not kept alive by the traceback: the caller unmaps the file
    if not ok:
        raise Unusable(f"{path}: contents do not match their seal (damaged, or an interrupted write)")


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:  # a slice still held by a traceback: garbage collection releases it
        pass


def _marker(path: Path) -> Path:
    """Where the version of ``path`` last verified in full is recorded."""
    return path.with_name(path.name + ".verified")


def _read_small(path: Path) -> str | None:
    try:
        f = _open_regular(path)
    except (OSError, Unusable):
        return None
    if f is None:
        return None
    with f:
        return f.read(4096).decode("ascii", "replace")


class PreparedWriter:
    """A new prepared file, written tensor by tensor as loading converts them.

    :meth:`buffer` hands out a per-thread scratch tensor to convert one weight into,
    :meth:`write` stores it at its place in the file; :meth:`commit` seals the file and
    renames it into place; :meth:`abort` removes it. Plain writes, not a writable mapping:
    a full disk is then an error, not a SIGBUS, and the kernel fills its page cache faster.
    The temporary file is named by :func:`mps_cli.files.temp_path`, so the leftovers of a killed
    writer are recognised and removed at once.
    """

    def __init__(self, path: Path, specs: Specs, transposed: frozenset[str], source: SourceIdentity):
        import threading

        self.path, self.transposed, self.specs = path, transposed, specs
        header: dict = {"__metadata__": {"format": FORMAT, "version": VERSION, "source": source.path,
                                         "source_sha256": source.sha256, "header_crc": _BLANK_CRC,
                                         "data_crc": ""}}
        order = sorted(specs, key=lambda k: (-specs[k][1].itemsize, -_numel(specs[k][0]), k))
        offset, pads, self._places = 0, 0, {}
        for name in order:
            shape, dtype = specs[name]
            stored = tuple(reversed(shape)) if name in transposed else tuple(shape)
            if offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                header[f"__pad{pads}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
                pads += 1
                offset += pad
            nbytes = _numel(stored) * dtype.itemsize
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(stored), "data_offsets": [offset, offset + nbytes]}
            self._places[name] = (offset, nbytes, stored, dtype)
            offset += nbytes
        self._header = header
        # Room for the data seal: one 8-hex CRC and a comma per chunk.
        raw = self._header_bytes()
        room = len(raw) + 9 * (offset // SEAL_CHUNK + 1)
        # Space-padded (the format allows it) so the data starts page-aligned.
        self._header_len = room + (-(8 + room) % 4096)
        self._data_start = 8 + self._header_len
        self._total = self._data_start + offset
        self._local = threading.local()
        self._fd = None

        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        free = shutil.disk_usage(folder).free
        if free - self._total < MIN_FREE_AFTER:
            raise OSError(f"{free / 2**30:.1f} GiB free, {(self._total + MIN_FREE_AFTER) / 2**30:.1f} GiB needed")
        self.tmp = temp_path(path)
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW, 0o644)
        try:
            self._write_header()
            os.ftruncate(self._fd, self._total)  # the pads read back as zeros
        except BaseException:
            self.abort()
            raise

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header, separators=(",", ":")).encode()

    def _write_header(self) -> bytes:
        raw = self._header_bytes()
        raw += b" " * (self._header_len - len(raw))
        self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)
        return raw

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def buffer(self, name: str):
        """A scratch tensor, reused by this thread, to convert weight ``name`` into (logical shape)."""
        import torch

        _, nbytes, stored, dtype = self._places[name]
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < nbytes:
            self._local.scratch = scratch = None  # free the smaller one before allocating
            scratch = self._local.scratch = torch.empty(nbytes, dtype=torch.uint8)
        t = scratch[:nbytes].view(dtype).view(stored)
        return t.t() if name in self.transposed else t

    def write(self, name: str, tensor) -> None:
        """Store the converted weight (a tensor from :meth:`buffer`) at its place in the file."""
        import ctypes

        offset, nbytes, _, _ = self._places[name]
        stored = tensor.t() if name in self.transposed else tensor
        if nbytes:
            self._pwrite((ctypes.c_char * nbytes).from_address(stored.data_ptr()), self._data_start + offset)

    def commit(self) -> None:
        """Seal the written file (every data byte, then the header) and move it into place."""
        import mmap

        self._local = None  # the threads' scratch buffers
        if self._total > self._data_start:
            with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    crcs = _chunk_crcs(view[self._data_start:])
                finally:
                    _release(view)
        else:
            crcs = []
        meta = self._header["__metadata__"]
        meta["data_crc"] = ",".join(crcs)
        meta["header_crc"] = _BLANK_CRC
        raw = self._write_header()
        meta["header_crc"] = f"{zlib.crc32(raw):08x}"
        self._write_header()
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        write_small(_marker(self.path), json.dumps(version_of(os.stat(self.path))))
        _remove_superseded(self.path, meta["source"])

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._local = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def open_writer(path: Path, specs: Specs, transposed: frozenset[str], source: SourceIdentity) -> PreparedWriter | None:
    """A :class:`PreparedWriter`, or None (with a log line saying why) when the cache is unwritable."""
    try:
        writer = PreparedWriter(path, specs, transposed, source)
        log.info("writing %.1f GiB of prepared weights to %s once; later loads map it (%s=0 turns this off)",
                 writer._total / 2**30, path.parent, SWITCH_ENV, extra={"nbytes": writer._total})
        return writer
    except OSError as exc:
        log.warning("not caching prepared weights in %s: %s (set %s=0 to stop trying)",
                    path.parent, exc.strerror or exc, SWITCH_ENV)
        return None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def discard(path: Path, why: str) -> None:
    """Remove an unusable prepared file (a link is removed, not followed); it is rebuilt on the next load."""
    log.warning("rebuilding prepared weights: %s", why)
    for p in (path, _marker(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _metadata(path: Path) -> dict:
    f = _open_regular(path)
    if f is None:
        return {}
    with f:
        _, _, meta, _ = header_from_file(f, os.fstat(f.fileno()).st_size, str(path))
    return meta


def _remove_superseded(current: Path, source: str) -> None:
    """Delete older copies of the same source file at the same dtype: its contents changed since."""
    suffix = current.name.split("-", 1)[1]
    for p in current.parent.glob(f"*-{suffix}"):
        if p == current:
            continue
        try:
            if _metadata(p).get("source") == source:
                p.unlink()
                _marker(p).unlink(missing_ok=True)
        except (OSError, ValueError, CheckpointError):
            pass


@dataclass(frozen=True)
class Summary:
    """What the prepared folder holds: usable-looking copies and their size."""

    folder: Path
    files: int
    bytes: int


def summary() -> Summary:
    """Count the prepared files (regular files only; leftovers of dead writers are removed first)."""
    folder = cache_dir()
    files = total = 0
    if folder.is_dir():
        remove_stale_temps(folder)
        for p in folder.glob("*.safetensors"):
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return Summary(folder, files, total)


def verify_all() -> list[tuple[Path, str | None]]:
    """Check every prepared file against its seal in full; delete those that fail.

    Returns ``(path, None)`` for a good file and ``(path, why)`` for one deleted.
    """
    folder = cache_dir()
    out: list[tuple[Path, str | None]] = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.safetensors")):
        try:
            _verify_file(p)
            out.append((p, None))
        except (CheckpointError, OSError, ValueError) as exc:
            discard(p, str(exc))
            out.append((p, str(exc)))
    return out


def _verify_file(path: Path) -> None:
    import mmap

    f = _open_regular(path)
    if f is None:
        raise Unusable(f"{path}: vanished")
    with f:
        st = os.fstat(f.fileno())
        header, n, meta, raw = header_from_file(f, st.st_size, str(path))
        _check_header_seal(path, raw, meta)
        if st.st_size > 8 + n:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    _check_data_seal(path, view[8 + n:], meta)
                finally:
                    _release(view)
    write_small(_marker(path), json.dumps(version_of(st)))


__all__ = ["CACHE_ENV", "SWITCH_ENV", "PreparedWriter", "SourceIdentity", "Summary", "Unusable", "cache_dir",
           "enabled", "map_prepared", "obtain", "open_writer", "prepared_path", "summary",
           "verify_all"]
