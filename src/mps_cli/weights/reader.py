"""Reading safetensors files: the header checked in full before any tensor is built, then one tensor at a time.

Also the file-level facts every cache relies on: the dtype tables, a file's SHA-256, and the
refusal to open anything that is not a regular file (a FIFO would block a reader forever).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import CheckpointError

#: safetensors dtype name -> torch dtype attribute name, for the dtypes tensors can be loaded from.
TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
#: Every dtype the safetensors format defines, with its size in bytes.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
#: A header larger than this is refused unread (the published one is about 100 KB).
MAX_HEADER_BYTES = 100 * 2**20
#: JSON nesting a header may have: the format needs 3 (entry, field, list).
MAX_HEADER_DEPTH = 8
#: Dimensions a tensor may have.
MAX_RANK = 8


class TensorSource(Protocol):
    """A read-only mapping of tensor names to shapes, loaded one tensor at a time."""

    name: str

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str): ...


def check_regular_file(path: Path, what: str = "weights file") -> os.stat_result:
    """The file's stat, refusing (without opening it) a missing path, a folder, a FIFO or a device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a pipe, socket or device), so not a {what}")
    return st


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of brackets outside strings, found without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_HEADER_DEPTH:
                    return deepest
        elif byte in (0x7D, 0x5D):
            depth -= 1
    return deepest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_header(header: object, data_size: int, name: str, data_start: int = 0) -> dict:
    """Check every entry of a parsed header against the format; returns the tensor entries.

    Each entry must be an object with a known dtype, a shape of non-negative integers and
    integer ``data_offsets`` inside the data area, whose length is the shape's element count
    times the dtype's size; entries must be sorted by offset and must not overlap.
    """
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{name}: corrupt safetensors header (__metadata__ is not a map of strings)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for key, info in entries.items():
        def bad(why: str, key: str = key) -> CheckpointError:
            return CheckpointError(f"{name}: corrupt safetensors header entry for {key!r}: {why}")

        if not isinstance(info, dict):
            raise bad("not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
            raise bad(f"shape {shape!r} is not a list of at most {MAX_RANK} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"data_offsets {offsets!r} is not two integers")
        start, stop = offsets
        if not 0 <= start <= stop:
            raise bad(f"data_offsets {offsets} are not an ascending pair of non-negative integers")
        count = 1
        for s in shape:
            count *= s
        if count * ITEMSIZE[dtype] != stop - start:
            raise bad(f"{stop - start} bytes for {dtype} {shape} ({count * ITEMSIZE[dtype]} needed)")
        spans.append((start, stop, key))
    spans.sort()
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_size:
        # A file cut short: name the sizes, which says what happened better than any entry.
        raise CheckpointError(f"{name}: truncated weights file ({data_start + data_size:,} of "
                              f"{data_start + end:,} bytes)")
    for (_, stop, before), (start, _, key) in itertools.pairwise(spans):
        if start < stop:
            raise CheckpointError(f"{name}: corrupt safetensors header entry for {key!r}: its data overlaps {before!r}")
    return entries


def read_header(path: Path) -> tuple[dict, int, dict, os.stat_result]:
    """Parse and check a safetensors header: ``(tensor entries, header length, metadata, stat)``.

    A truncated, corrupt or hostile file fails here, naming the file and the entry.
    """
    st = check_regular_file(path)
    try:
        with open(path, "rb") as f:
            entries, n, meta, _ = header_from_file(f, st.st_size, str(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc.strerror or exc})") from exc
    return entries, n, meta, st


def header_from_file(f: BinaryIO, size: int, name: str) -> tuple[dict, int, dict, bytes]:
    """Read and check the header of an open safetensors file of ``size`` bytes.

    Returns the tensor entries, the header's length, its ``__metadata__`` and its raw bytes.
    """
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{name}: truncated weights file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{name}: not a safetensors file, or truncated (header length {n}, file {size} bytes)")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{name}: truncated weights file (header cut short)")
    if _json_depth(raw) > MAX_HEADER_DEPTH:
        raise CheckpointError(f"{name}: corrupt safetensors header (JSON nested more than {MAX_HEADER_DEPTH} deep)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{name}: corrupt safetensors header (not valid JSON)") from None
    entries = validate_header(header, size - 8 - n, name, data_start=8 + n)
    return entries, n, header.get("__metadata__") or {}, raw


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The checked tensor entries of a safetensors file and its header length."""
    entries, n, _, _ = read_header(Path(path))
    return entries, n


_local = threading.local()
# Converting reads go through this many bytes at a time: small enough that the raw rows
# and their fp32 stage stay in a core's L2 cache.
_CHUNK_BYTES = 512 << 10


def _chunk_buffer(name: str, nbytes: int, dtype):
    """A per-thread reusable buffer for converting reads."""
    import torch

    buf = getattr(_local, name, None)
    if buf is None:
        buf = torch.empty(nbytes // dtype.itemsize, dtype=dtype)
        setattr(_local, name, buf)
    return buf


def torch_dtype(st_dtype: str, key: str, name: str):
    """The torch dtype of a safetensors dtype name; a :class:`CheckpointError` for one torch cannot load."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES.get(st_dtype, ""), None)
    if dtype is None:
        raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {st_dtype}")
    return dtype


@dataclass
class SafetensorsFile:
    """A validated ``.safetensors`` file whose tensors are read one at a time.

    Tensors are read with plain file reads into fresh buffers rather than through a memory
    map, so the file's pages never count towards the process's resident memory.
    """

    path: Path
    header: dict = field(repr=False)
    header_size: int = 0
    metadata: dict = field(default_factory=dict, repr=False)
    stat: os.stat_result | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsFile:
        path = Path(path)
        header, header_size, meta, st = read_header(path)
        return cls(path=path, header=header, header_size=header_size, metadata=meta, stat=st)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype_of(self, key: str):
        """The torch dtype tensor ``key`` is stored in."""
        return torch_dtype(self.header[key]["dtype"], key, self.name)

    def read_into(self, key: str, out) -> None:
        """Fill ``out`` (any layout, dtype or device) with tensor ``key``.

        Straight from the file when dtype and layout agree; otherwise a few rows at a time
        through small reused per-thread buffers, so loading never holds (or fragments the
        heap with) a second copy of a large tensor.
        """
        import ctypes

        import torch

        info = self.header[key]
        src_dtype = self.dtype_of(key)
        start, stop = info["data_offsets"]
        if stop == start:
            return
        if out.device.type == "cpu" and out.is_contiguous() and out.dtype == src_dtype:
            self._read(key, start, (ctypes.c_char * (stop - start)).from_address(out.data_ptr()))
            return
        raw = _chunk_buffer("raw", _CHUNK_BYTES, torch.uint8)
        rows = out.shape[0] if out.dim() else 1
        row_bytes = (stop - start) // rows
        if out.dim() == 0 or row_bytes > raw.numel():
            out.copy_(self.get(key))
            return
        # torch converts fp16 <-> bf16 element by element, about 3x slower than going
        # through fp32, which both directions vectorise; the fp32 stage stays in cache.
        staged = out.device.type == "cpu" and {src_dtype, out.dtype} == {torch.float16, torch.bfloat16}
        per_chunk = raw.numel() // row_bytes
        with self._opened() as f:
            for first in range(0, rows, per_chunk):
                n = min(per_chunk, rows - first)
                view = raw[: n * row_bytes]
                self._readinto(f, key, start + first * row_bytes,
                               (ctypes.c_char * (n * row_bytes)).from_address(view.data_ptr()))
                src = view.view(src_dtype).view(n, *out.shape[1:])
                if staged:
                    stage = _chunk_buffer("stage", _CHUNK_BYTES * 2, torch.float32)
                    src = stage[: src.numel()].view(src.shape).copy_(src)
                out[first:first + n].copy_(src)

    def _opened(self):
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read weights ({exc.strerror or exc})") from exc

    def _readinto(self, f, key: str, start: int, buffer) -> None:
        try:
            f.seek(8 + self.header_size + start)
            got = f.readinto(buffer)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read weights ({exc.strerror or exc})") from exc
        if got != len(buffer):
            raise CheckpointError(f"{self.path}: truncated while reading {key!r}")

    def _read(self, key: str, start: int, buffer) -> None:
        with self._opened() as f:
            self._readinto(f, key, start, buffer)

    def get(self, key: str):
        import ctypes

        import torch

        info = self.header[key]
        dtype = self.dtype_of(key)
        start, stop = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtype)
        if stop > start:
            self._read(key, start, (ctypes.c_char * (stop - start)).from_address(out.data_ptr()))
        return out


@dataclass
class TensorDict:
    """An in-memory state dict (for example one read from a pickle) as a tensor source."""

    tensors: Mapping
    name: str = "state dict"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def get(self, key: str):
        return self.tensors[key]


__all__ = ["ITEMSIZE", "TORCH_DTYPES", "SafetensorsFile", "TensorDict", "TensorSource", "check_regular_file",
           "file_sha256", "header_from_file", "read_header", "read_safetensors_header", "validate_header"]
