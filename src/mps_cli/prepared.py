"""Weights already converted for this machine, kept on disk and mapped where they lie.

Loading an fp16 checkpoint for the CPU converts about a billion values into freshly allocated
memory, and most of the seconds that takes go to faulting that memory in. So after the first
such load the converted tensors (final dtype, final layout) are written once to a cache file.
Later loads map that file privately and use it in place: it is already in the page cache, so
loading is building page tables, and every process scoring at the same time shares one copy.

The file is safetensors written by us (tensors 64-byte aligned with padding entries), keyed
by the source file's identity, the dtype and the layout; anything that does not match exactly
is ignored and rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

from .checkpoint import _TORCH_DTYPES, fingerprint, read_safetensors_header
from .constants import CACHE_ENV, PREPARED_ENV as SWITCH_ENV
from .errors import CheckpointError

log = logging.getLogger("mps_cli")

FORMAT = "mps-cli-prepared"
# Bump when the meaning of a stored tensor changes (names, layout), so old files are not read.
VERSION = "1"
ALIGN = 64
# Leave this much free on the cache's disk after writing, or do not write.
MIN_FREE_AFTER = 1 << 30
# Temporary files left by a killed writer are removed after this long.
STALE_TMP_S = 3600
# The seal hashes this many samples of this many bytes, spread over the data.
SEAL_SAMPLES, SEAL_BYTES = 256, 4096

_ST_NAME = {v: k for k, v in _TORCH_DTYPES.items()}


def enabled() -> bool:
    """Whether prepared weights are used, per ``$MPS_PREPARED_WEIGHTS`` (default on, where the OS has pwrite)."""
    return hasattr(os, "pwrite") and os.environ.get(SWITCH_ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


def cache_dir() -> Path:
    """``$MPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mps-cli``, else ``~/.cache/mps-cli``; then ``prepared/``."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "mps-cli") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "mps-cli")
    return Path(base) / "prepared"


def prepared_path(source: Path, dtype_name: str, transposed: frozenset[str], folder: Path | None = None) -> Path:
    """The cache file for ``source`` converted to ``dtype_name`` with ``transposed`` stored (in, out)."""
    st = source.stat()
    ident = json.dumps([FORMAT, VERSION, fingerprint(source), st.st_size, st.st_mtime_ns,
                        dtype_name, sorted(transposed)])
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return (folder or cache_dir()) / f"{key}-{dtype_name}.safetensors"


def _st_dtype(dtype) -> str:
    return _ST_NAME[str(dtype).removeprefix("torch.")]


def map_prepared(path: Path, expected: Mapping[str, tuple[tuple[int, ...], object]],
                 transposed: frozenset[str]) -> dict | None:
    """The state dict stored at ``path``, as views of a private mapping of the file.

    ``expected``: name -> (shape, torch dtype) the model needs. Returns None when there is no
    such file; raises :class:`CheckpointError` when there is one that does not match.
    """
    import mmap

    import torch

    if not path.is_file():
        return None
    header, header_size = read_safetensors_header(path)
    meta = _metadata(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not prepared weights of this version")
    names = {k for k in header if not k.startswith("__pad")}
    if names != set(expected):
        raise CheckpointError(f"{path}: tensor names differ from the model's")
    with open(path, "rb") as f:
        # Private and writable: nothing writes to weights, and if something did it would
        # get its own copy of the page instead of changing the cache.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    base = 8 + header_size
    region = data[base:]
    if meta.get("seal") != _seal(region.numel(), lambda off, n: region[off:off + n].numpy().tobytes()):
        raise CheckpointError(f"{path}: contents do not match their seal (an interrupted write?)")
    state = {}
    for name in names:
        info = header[name]
        shape, dtype = expected[name]
        stored = tuple(reversed(shape)) if name in transposed else tuple(shape)
        if tuple(info["shape"]) != stored or info["dtype"] != _st_dtype(dtype):
            raise CheckpointError(f"{path}: {name} is stored as {info['dtype']} {info['shape']}")
        start, stop = info["data_offsets"]
        t = data[base + start: base + stop].view(dtype).view(stored)
        state[name] = t.t() if name in transposed else t
    return state


def _seal(size: int, read: Callable[[int, int], bytes]) -> str:
    """A hash of evenly spaced samples of the data: catches a file whose pages never reached disk.

    ``read(offset, n)`` returns ``n`` bytes of the data region from ``offset``.
    """
    h = hashlib.sha256(str(size).encode())
    step = max(1, size // SEAL_SAMPLES)
    for start in range(0, size, step):
        h.update(read(start, min(SEAL_BYTES, size - start)))
    return h.hexdigest()


class PreparedWriter:
    """A new prepared file, written tensor by tensor as loading converts them.

    :meth:`buffer` hands out a per-thread scratch tensor to convert one weight into,
    :meth:`write` stores it at its place in the file; :meth:`commit` seals the file and
    renames it into place; :meth:`abort` removes it. Plain writes, not a writable mapping:
    a full disk is then an error, not a SIGBUS, and the kernel fills its page cache faster.
    """

    def __init__(self, path: Path, specs: Mapping[str, tuple[tuple[int, ...], object]],
                 transposed: frozenset[str], source: Path):
        import threading

        self.path, self.transposed, self.specs = path, transposed, specs
        header: dict = {"__metadata__": {"format": FORMAT, "version": VERSION, "source": str(source),
                                         "seal": "0" * 64}}
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
        raw = self._header_bytes()
        # Space-padded (the format allows it) so the data starts page-aligned.
        self._header_len = len(raw) + (-(8 + len(raw)) % 4096)
        self._data_start = 8 + self._header_len
        self._total = self._data_start + offset
        self._local = threading.local()

        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(folder)
        free = shutil.disk_usage(folder).free
        if free - self._total < MIN_FREE_AFTER:
            raise OSError(f"{free / 2**30:.1f} GiB free, {(self._total + MIN_FREE_AFTER) / 2**30:.1f} GiB needed")
        self.tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_header()
            os.ftruncate(self._fd, self._total)  # the pads read back as zeros
        except BaseException:
            self.abort()
            raise

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header, separators=(",", ":")).encode()

    def _write_header(self) -> None:
        raw = self._header_bytes()
        raw += b" " * (self._header_len - len(raw))
        self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)

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
        """Seal the written file and move it into place."""
        self._local = None  # the threads' scratch buffers
        size = self._total - self._data_start
        seal = _seal(size, lambda off, n: os.pread(self._fd, n, self._data_start + off))
        self._header["__metadata__"]["seal"] = seal
        self._write_header()
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        _remove_superseded(self.path, self._header["__metadata__"]["source"])

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._local = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def open_writer(path: Path, specs: Mapping[str, tuple[tuple[int, ...], object]], transposed: frozenset[str],
                source: Path) -> PreparedWriter | None:
    """A :class:`PreparedWriter`, or None (with a log line saying why) when the cache is unwritable."""
    try:
        writer = PreparedWriter(path, specs, transposed, source)
        log.info("writing %.1f GiB of prepared weights to %s once; later loads map it (%s=0 turns this off)",
                 writer._total / 2**30, path.parent, SWITCH_ENV, extra={"nbytes": writer._total})
        return writer
    except OSError as exc:
        log.warning("mps: not caching prepared weights in %s: %s (set %s=0 to stop trying)",
                    path.parent, exc.strerror or exc, SWITCH_ENV)
        return None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def discard(path: Path, why: str) -> None:
    """Remove an unusable prepared file (it is rebuilt on the next load)."""
    log.warning("mps: rebuilding prepared weights: %s", why)
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _remove_superseded(current: Path, source: str) -> None:
    """Delete older copies of the same source file at the same dtype: its contents changed since."""
    suffix = current.name.split("-", 1)[1]
    for p in current.parent.glob(f"*-{suffix}"):
        if p == current:
            continue
        try:
            if _metadata(p).get("source") == source:
                p.unlink()
        except (OSError, ValueError):
            pass


def _remove_stale_tmp(folder: Path) -> None:
    now = time.time()
    for p in folder.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


__all__ = ["CACHE_ENV", "SWITCH_ENV", "PreparedWriter", "cache_dir", "enabled", "map_prepared", "open_writer",
           "prepared_path"]
