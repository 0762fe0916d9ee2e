"""Reading the authors' pickled checkpoints without ever executing code from them.

Two formats circulate: plain state-dict pickles, which torch's own
``weights_only`` loader reads, and ``MPS_overall_checkpoint.pth``, a whole pickled
``torch.nn.Module`` whose classes (the authors' ``trainer`` package, transformers' CLIP)
cannot be imported here and must not be. For the latter, every class the pickle names
becomes an inert stand-in that only records the state the pickle gives it; tensors are
rebuilt by torch from the archive's raw storage bytes, on the CPU; and any other global
(``os.system``, ``eval``, ...) is refused before it can be called.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafePickleError

# Modules whose classes and functions become inert stand-ins: the model's own code, which a
# module pickle names but which is never run here.
_STAND_IN_PREFIXES = ("trainer.", "transformers.", "torch.nn.modules.", "open_clip.")
_STAND_IN_MODULES = {"torch._C._nn", "torch.nn.functional", "torch.nn.modules"}

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

_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _Inert:
    """Base of the stand-ins: constructing, reducing or building one only records data."""

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


class _StorageType:
    """What ``torch.HalfStorage`` and friends unpickle to: just the element type's name."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler whose globals are data types, torch's tensor rebuilders, or inert stand-ins."""

    def __init__(self, file, path: Path, load_storage=None):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        qualified = f"{module}.{name}"
        if (module, name) in (("collections", "OrderedDict"),):
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "dict", "list", "tuple"):
            return {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}[name]
        if module == "torch._utils" and name in _REBUILDERS:
            return _REBUILDERS[name]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        # torch.__dict__, not getattr: torch imports submodules (torch._dynamo: ~900 modules)
        # on first attribute access, and a refused name must cost nothing.
        if module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):
            return torch.__dict__[name]
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module.startswith(_STAND_IN_PREFIXES) or module in _STAND_IN_MODULES:
            key = (module, name)
            if key not in self._stand_ins:
                self._stand_ins[key] = type(name, (_Inert,), {"__module__": module, "__qualname__": name})
            return self._stand_ins[key]
        raise UnsafePickleError(
            f"{self._path}: refusing to load: the pickle asks for {qualified}, which is neither tensor "
            "data nor a known model class and could run code; only load checkpoints you trust, "
            "and prefer .safetensors"
        )

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise CheckpointError(
                f"{self._path}: a legacy (pre-1.6) torch file holding model objects is not supported; "
                "re-save it as a state dict or convert it where it was made"
            )
        return self._load_storage(pid)


def _reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, _Inert):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__setstate__(state)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor called on {cls!r}: refusing to construct it")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"a tensor in the pickle has no storage (got {type(storage).__name__})")
    tensor = torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                             OrderedDict(), None)
    if isinstance(metadata, dict) and metadata:
        torch._utils.set_tensor_metadata(tensor, {k: bool(v) for k, v in metadata.items()})
    return tensor


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    import torch

    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"a parameter in the pickle is not a tensor (got {type(data).__name__})")
    return data


_REBUILDERS = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


class _ZipStorages:
    """Rebuilds the storages a torch zip archive's pickle refers to, from the archive's bytes, on CPU."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path):
        self.archive = archive
        self.prefix = prefix
        self.path = path
        self.cache: dict[str, Any] = {}

    def __call__(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unknown persistent id in the pickle ({type(pid).__name__})")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: storage {key!r} has no known element type")
        dtype = getattr(torch, storage_type.dtype)
        key = str(key)
        if key not in self.cache:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise CheckpointError(
                    f"{self.path}: storage {key} is missing from the archive (truncated file?)") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise CheckpointError(f"{self.path}: storage {key} has no valid size ({numel!r})")
            need = numel * itemsize
            self._check_member(info, key, need if storage_type.name != "UntypedStorage" else None)
            buf = bytearray(info.file_size)
            with self.archive.open(info) as fh:
                got = fh.readinto(buf)
            if got != info.file_size:
                raise CheckpointError(f"{self.path}: storage {key} holds {got} bytes, expected {info.file_size}")
            if got:
                untyped = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()
            else:
                untyped = torch.UntypedStorage(0)
            self.cache[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.cache[key]


    def _check_member(self, info: zipfile.ZipInfo, key: str, need: int | None) -> None:
        """Refuse a storage before inflating it when its declared size is not what the pickle asks for."""
        if need is not None and info.file_size != need:
            raise CheckpointError(f"{self.path}: storage {key} holds {info.file_size:,} bytes, expected {need:,}")


def check_archive(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse a zip whose members could not be what they claim, before anything is inflated.

    A stored member must fit in the file; a deflated one must not inflate beyond what deflate
    can reach, and highly compressed members (torch itself never compresses) share a small
    budget; all members together stay within :data:`MAX_ARCHIVE_BYTES`.
    """
    size = path.stat().st_size
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
        total += info.file_size
        if dense > MAX_DENSE_BYTES or total > MAX_ARCHIVE_BYTES:
            raise CheckpointError(f"{path}: archive members would inflate to more than "
                                  f"{(MAX_DENSE_BYTES if dense > MAX_DENSE_BYTES else MAX_ARCHIVE_BYTES) / 2**20:,.0f} "
                                  "MiB (a zip bomb?)")


def _check_little_endian(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    name = f"{prefix}byteorder"
    if name in archive.namelist() and (archive.getinfo(name).file_size > 16
                                       or archive.read(name).strip() not in (b"little", b"")):
        raise CheckpointError(f"{path}: big-endian torch archive; re-save it on a little-endian machine")


def _unpickle_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    with archive:
        check_archive(archive, path)
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pickles:
            raise CheckpointError(f"{path}: a zip file, but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        _check_little_endian(archive, prefix, path)
        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES or info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
            raise CheckpointError(f"{path}: its pickle claims {info.file_size:,} bytes, too large to be a checkpoint's")
        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: corrupt torch checkpoint ({exc})") from None
        unpickler = _SafeUnpickler(io.BytesIO(data), path, _ZipStorages(archive, prefix, path))
        return _run(unpickler, path)


def _unpickle_plain(path: Path) -> Any:
    with open(path, "rb") as fh:
        return _run(_SafeUnpickler(fh, path), path)


def _run(unpickler: _SafeUnpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: the pickle nests too deeply to read") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, RuntimeError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable pickle ({type(exc).__name__}: {_first_line(exc)})") from None


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


def _torch_load_weights_only(path: Path):
    """torch's restricted loader; None when it refuses the file (whole-module pickles, or anything odd),
    so the project's own reader reads it or explains what is wrong. A read error is an error here."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc.strerror or exc})") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, RecursionError):
        return None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pickled checkpoint (state dict or whole module) into a CPU state dict, never running its code.

    Raises :class:`UnsafePickleError` when the pickle names anything that could run code,
    and :class:`CheckpointError` when the file is unreadable, hostile (a zip bomb, a cycle,
    an expanded view) or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                check_archive(archive, path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    loaded = _torch_load_weights_only(path)
    if loaded is None:
        loaded = _unpickle_zip(path) if is_zip else _unpickle_plain(path)
    state = _state_dict_of(loaded, path)
    if not state:
        raise CheckpointError(f"{path}: no tensors in this checkpoint")
    _check_views(state, path)
    return {k: (v.detach() if v.requires_grad else v) for k, v in state.items()}
