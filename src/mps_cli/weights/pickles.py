"""Reading the authors' pickled checkpoints without ever executing code from them.

torch's own restricted loader, ``torch.load(weights_only=True)``, does all the unpickling, for
both formats that circulate: plain state dicts, and ``MPS_overall_checkpoint.pth``, a whole
pickled ``torch.nn.Module`` whose classes (the authors' ``trainer`` package, transformers' CLIP,
torch's layers) cannot be imported here and must not be. Before anything is loaded, the
pickle's globals are listed without running it (``get_unsafe_globals_in_checkpoint``): each class
or function of the model's own code becomes an inert stand-in that only records the state the
pickle gives it, handed to torch as a ``(stand-in, "module.name")`` pair through ``safe_globals``;
any other global torch does not allow (``os.system``, ``eval``, ``torch._dynamo``, ...) is refused
by name. Tensors are rebuilt by torch, on the CPU.

What torch's loader does not do is kept here, and why:

- :func:`check_archive`: zip members are checked against the file's size and deflate's limits
  before torch opens the archive. torch inflates a member whole before comparing it with the size
  the pickle gives (torch 2.14: 1 GiB of memory for a 1 MiB file), and reads a pickle of any size.
- :func:`_collect`: a whole-module pickle comes back as stand-ins, which are walked here into a
  state dict as ``Module.state_dict`` would: iteratively, refusing a module that contains itself,
  and within :data:`MAX_WALK_NODES` steps, since a few shared submodules can stand for 2^40 paths.
- :data:`MAX_GLOBALS`: torch's loader is pure Python and rebuilds its table of allowed globals
  at every step of the pickle, so the time a pickle takes grows with the number of stand-ins
  it names times its length; more than this many is refused. (The steps themselves stay
  torch's: a pickle near :data:`MAX_PICKLE_BYTES` of allowed steps costs it minutes, not memory.)
- :func:`_check_views`: torch rebuilds views larger than their storage (stride 0, expanded)
  faithfully from a few stored bytes; converting one would materialise its full size.
- A bare pickle (not written by ``torch.save``, so no archive) is read as the ``data.pkl`` of an
  in-memory archive, so that the same loader and checks apply and a hostile one is refused by the
  same rules. It holds no tensors (torch keeps their bytes beside the pickle, in the archive), so
  it can only ever be refused, but with the reason. torch's legacy (pre-1.6) format is read by
  ``torch.load`` as it is, state dicts only.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafePickleError

# Modules whose classes and functions become inert stand-ins: the model's own code, which a
# module pickle names but which is never run here.
_STAND_IN_PREFIXES = ("trainer.", "transformers.", "torch.nn.modules.", "open_clip.")
_STAND_IN_MODULES = {"torch._C._nn", "torch.nn.functional", "torch.nn.modules"}
# Containers a pickle may rebuild besides those torch allows (set, OrderedDict, ...).
_CONTAINERS = {"builtins.frozenset": frozenset, "builtins.dict": dict, "builtins.list": list,
               "builtins.tuple": tuple}

# The pickle of a checkpoint (names and structure, not tensor data) is a few MB at most.
MAX_PICKLE_BYTES = 256 << 20
# Deflate cannot compress better than about 1032:1; a member claiming more is lying.
MAX_INFLATE_RATIO = 1100
# Members inflating more than this ratio (runs of zeros) may hold at most MAX_DENSE_BYTES together.
DENSE_RATIO = 16
MAX_DENSE_BYTES = 256 << 20
# Storages in one archive: the published checkpoint holds about 4 GiB in fp32.
MAX_ARCHIVE_BYTES = 32 << 30
# Modules (and their parameter entries) a module walk may visit: the published model has about 1,000.
MAX_WALK_NODES = 200_000
# How deep a module tree may nest: the published model nests about 10 deep.
MAX_WALK_DEPTH = 1_000
# Classes and functions a pickle may name beside torch's own: the published model names 29. torch rebuilds
# its table of allowed globals at every step of the pickle (2,000 stand-ins: 4 s for a 44 kB pickle).
MAX_GLOBALS = 100

# torch's safe globals are one process-wide set: loads that add their stand-ins take turns.
_LOADING = threading.Lock()
# What _load reads, as its messages name it.
ARCHIVE, BARE, LEGACY = "torch checkpoint", "pickle", "legacy (pre-1.6) torch file"


class _Inert:
    """Base of the stand-ins: constructing or building one only records data."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_pickle_args", args)
        object.__setattr__(obj, "_pickle_state", None)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_pickle_state", state)

    def __repr__(self) -> str:
        return f"<stand-in {type(self).__module__}.{type(self).__qualname__}>"


def _is_stand_in(qualified: str) -> bool:
    module = qualified.rpartition(".")[0]
    return qualified.startswith(_STAND_IN_PREFIXES) or module in _STAND_IN_MODULES


def _allowed_globals(names: list[str], path: Path) -> list[tuple[Any, str]]:
    """``safe_globals`` pairs for the globals torch does not allow by itself; refuses any that could run code."""
    if len(names) > MAX_GLOBALS:
        raise CheckpointError(f"{path}: the pickle names {len(names):,} classes and functions, more than "
                              f"{MAX_GLOBALS:,}: not a checkpoint")
    refused = sorted(n for n in names if not _is_stand_in(n) and n not in _CONTAINERS)
    if refused:
        raise UnsafePickleError(
            f"{path}: refusing to load: the pickle asks for {', '.join(refused)}, which is neither tensor "
            "data nor a known model class and could run code; only load checkpoints you trust, "
            "and prefer .safetensors"
        )
    pairs = []
    for name in names:
        if name in _CONTAINERS:
            pairs.append((_CONTAINERS[name], name))
        else:
            module, _, qualname = name.rpartition(".")
            pairs.append((type(qualname, (_Inert,), {"__module__": module, "__qualname__": qualname}), name))
    return pairs


def check_archive(archive: zipfile.ZipFile, size: int, path: Path) -> None:
    """Refuse a zip whose members could not be what they claim, before anything is inflated.

    A stored member must fit in the file (``size`` bytes); a deflated one must not inflate beyond
    what deflate can reach, and highly compressed members (torch itself never compresses) share a
    small budget; all members together stay within :data:`MAX_ARCHIVE_BYTES`, the pickle within
    :data:`MAX_PICKLE_BYTES`.
    """
    total = dense = 0
    for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size or info.header_offset + info.compress_size > size:
                raise CheckpointError(f"{path}: archive member {info.filename} claims {info.file_size:,} bytes, "
                                      f"more than the file holds ({size:,} bytes)")
        else:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_INFLATE_RATIO:
                raise CheckpointError(f"{path}: archive member {info.filename} would inflate "
                                      f"{info.compress_size:,} bytes to {info.file_size:,} (a zip bomb?)")
            if ratio > DENSE_RATIO:
                dense += info.file_size
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: its pickle claims {info.file_size:,} bytes, too large to be a checkpoint's")
        total += info.file_size
        if dense > MAX_DENSE_BYTES or total > MAX_ARCHIVE_BYTES:
            raise CheckpointError(f"{path}: archive members would inflate to more than "
                                  f"{(MAX_DENSE_BYTES if dense > MAX_DENSE_BYTES else MAX_ARCHIVE_BYTES) / 2**20:,.0f} "
                                  "MiB (a zip bomb?)")


def _bare_pickle_as_archive(path: Path) -> io.BytesIO:
    """A pickle that is no torch archive, as the ``data.pkl`` of one holding nothing else."""
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: a {size:,}-byte pickle, too large to be a checkpoint's")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if not head:
        raise CheckpointError(f"{path}: an empty file, not weights")
    if head[0] == pickle.PROTO[0] and len(head) == 2 and head[1] > 2:
        raise CheckpointError(f"{path}: a protocol-{head[1]} pickle (Python's pickle.dump), which torch's restricted "
                              "loader does not read; save weights with torch.save, or better as .safetensors")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/data.pkl", path.read_bytes())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    buf.seek(0)
    return buf


def _is_legacy_torch_file(path: Path) -> bool:
    """torch.save's pre-1.6 format: a sequence of pickles that opens with torch's magic number."""
    import torch.serialization

    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    with open(path, "rb") as fh:
        return fh.read(len(magic)) == magic


def _opens_like_a_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _load(source: Path | io.BytesIO, path: Path, what: str) -> Any:
    """torch's restricted loader on ``what`` (an archive, a bare pickle in one, or torch's legacy format),
    with stand-ins for the model's classes in an archive."""
    import torch
    import torch.serialization

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source) if what != LEGACY else []
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with _LOADING, torch.serialization.safe_globals(_allowed_globals(names, path)):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=False)
    except (UnsafePickleError, CheckpointError):
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc.strerror or exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the pickle nests too deeply to read") from None
    except pickle.UnpicklingError as exc:
        if what == LEGACY:  # torch refused a global: no stand-ins here (torch lists globals only in archives)
            raise CheckpointError(f"{path}: a legacy (pre-1.6) torch file holding more than tensors, which is not "
                                  "read here; re-save it with a current torch (or as .safetensors)") from None
        if what == BARE:
            raise CheckpointError(f"{path}: neither a torch checkpoint nor a pickle torch's restricted loader "
                                  f"reads ({_first_line(exc)})") from None
        raise CheckpointError(f"{path}: unreadable {what} ({_first_line(exc)})") from None
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError,
            zipfile.BadZipFile, MemoryError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _module_state(obj) -> dict | None:
    if isinstance(obj, _Inert):
        state = obj._pickle_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict) and ("_parameters" in state or "_modules" in state):
            return state
    return None


def _collect(root, path: Path) -> dict:
    """Walk ``_parameters``, persistent ``_buffers`` and ``_modules`` as ``Module.state_dict`` would.

    Iterative, so depth costs no stack; a module that contains itself is refused, and so is a
    tree that would take more than :data:`MAX_WALK_NODES` steps (a small DAG whose nodes are
    shared by many parents can stand for an exponential number of paths).
    """
    out: dict = {}
    stack: list[tuple[object, str, tuple[int, ...]]] = [(root, "", ())]
    steps = 0
    while stack:
        module, prefix, ancestors = stack.pop()
        where = prefix.rstrip(".") or "the root object"
        state = _module_state(module)
        if state is None:
            raise CheckpointError(
                f"{path}: {where} is not a torch module ({type(module).__module__}.{type(module).__qualname__})"
            )
        if id(module) in ancestors:
            raise CheckpointError(f"{path}: the module tree loops back on itself at {where}")
        if len(ancestors) > MAX_WALK_DEPTH:
            raise CheckpointError(f"{path}: the module tree nests more than {MAX_WALK_DEPTH} deep at {where[:200]}")
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise CheckpointError(f"{path}: {prefix}_non_persistent_buffers_set is not a set")
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise CheckpointError(f"{path}: {prefix}{group} is not a dict")
            for name, value in entries.items():
                steps += 1
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not _is_tensor(value):
                    raise CheckpointError(f"{path}: {prefix}{name} is not a tensor ({type(value).__name__})")
                out[f"{prefix}{name}"] = value
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise CheckpointError(f"{path}: {prefix}_modules is not a dict")
        steps += 1 + len(children)
        if steps > MAX_WALK_NODES:
            raise CheckpointError(f"{path}: the module tree has more than {MAX_WALK_NODES:,} entries "
                                  "(shared submodules standing for too many paths)")
        inner = (*ancestors, id(module))
        for name, child in reversed(list(children.items())):
            if child is not None:
                stack.append((child, f"{prefix}{name}.", inner))
    return out


def _state_dict_of(obj, path: Path) -> dict:
    seen: set[int] = set()
    while True:
        if _module_state(obj) is not None:
            return _collect(obj, path)
        if isinstance(obj, dict) and id(obj) not in seen:
            seen.add(id(obj))
            if obj and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items()):
                return dict(obj)
            inner = next((obj[k] for k in ("state_dict", "model_state_dict", "model", "module")
                          if isinstance(obj.get(k), dict) or _module_state(obj.get(k)) is not None), None)
            if inner is not None:
                obj = inner
                continue
        if isinstance(obj, dict) and id(obj) in seen:
            raise CheckpointError(f"{path}: the checkpoint's dict contains itself")
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise CheckpointError(f"{path}: holds neither a model nor a state dict of tensors (found {kind})")


def _check_views(state: dict, path: Path) -> None:
    """Refuse tensors that are views larger than their data (stride 0, expanded), and ties past all reason.

    Copying such a view out (to convert or save it) would materialise its full size from a
    few stored bytes.
    """
    stored: dict[int, int] = {}
    total = 0
    for name, t in state.items():
        storage = t.untyped_storage()
        nbytes = t.numel() * t.element_size()
        if nbytes > storage.nbytes():
            raise CheckpointError(f"{path}: tensor {name!r} is a view of {storage.nbytes():,} stored bytes that "
                                  f"would take {nbytes:,} bytes (stride 0 or expanded); refusing to materialise it")
        stored[storage.data_ptr()] = storage.nbytes()
        total += nbytes
    if total > 2 * sum(stored.values()) + (64 << 20):
        raise CheckpointError(f"{path}: its tensors would take {total:,} bytes from {sum(stored.values()):,} stored "
                              "(the same data tied under too many names)")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pickled checkpoint (state dict or whole module) into a CPU state dict, never running its code.

    Raises :class:`UnsafePickleError` when the pickle names anything that could run code,
    and :class:`CheckpointError` when the file is unreadable, hostile (a zip bomb, a cycle,
    an expanded view) or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                check_archive(archive, path.stat().st_size, path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
        loaded = _load(path, path, ARCHIVE)
    elif _opens_like_a_zip(path):
        raise CheckpointError(f"{path}: a damaged torch checkpoint: a zip archive without its directory (truncated?)")
    elif _is_legacy_torch_file(path):
        loaded = _load(path, path, LEGACY)
    else:
        loaded = _load(_bare_pickle_as_archive(path), path, BARE)
    state = _state_dict_of(loaded, path)
    if not state:
        raise CheckpointError(f"{path}: no tensors in this checkpoint")
    _check_views(state, path)
    return {k: (v.detach() if v.requires_grad else v) for k, v in state.items()}
