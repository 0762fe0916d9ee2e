"""Prepared-weights files: safetensors written by us, every tensor 64-byte aligned, header and data sealed with
CRC-32 checksums; written tensor by tensor as loading converts them, mapped privately and used in place.

The header records what the file was made from (the source's real path and SHA-256). Its seal is
checked on every open, the data's in full (in parallel chunks) on the first use of each version of
the file and by :func:`verify_file`; anything that does not match exactly, a symlink or a FIFO
raises :class:`Unusable`. Where these files live and when they are made is :mod:`.prepared`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..files import remove_stale_temps, temp_path
from .cachedir import version_of, write_small
from .reader import TORCH_DTYPES, header_from_file

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


@dataclass(frozen=True)
class SourceIdentity:
    """What a prepared file was made from: the source's real path and the SHA-256 of its bytes."""

    path: str
    sha256: str


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
    verified_at = marker(path)
    if verify or _read_small(verified_at) != json.dumps(version_of(st)):
        view = memoryview(mapped)
        try:
            _check_data_seal(path, view[base:], meta)
        finally:
            _release(view)
        write_small(verified_at, json.dumps(version_of(st)))
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


def marker(path: Path) -> Path:
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
        write_small(marker(self.path), json.dumps(version_of(os.stat(self.path))))

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._local = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def metadata(path: Path) -> dict:
    f = _open_regular(path)
    if f is None:
        return {}
    with f:
        _, _, meta, _ = header_from_file(f, os.fstat(f.fileno()).st_size, str(path))
    return meta


def verify_file(path: Path) -> None:
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
    write_small(marker(path), json.dumps(version_of(st)))


__all__ = ["ALIGN", "FORMAT", "MIN_FREE_AFTER", "SEAL_CHUNK", "VERSION", "PreparedWriter", "SourceIdentity",
           "Specs", "Unusable", "map_prepared", "marker", "metadata", "verify_file"]
