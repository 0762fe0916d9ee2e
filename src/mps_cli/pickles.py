"""Reading the authors' pickled checkpoints without ever executing code from them.

Two formats circulate (mps-model.md §5): plain state-dict pickles, which torch's own
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

from .errors import CheckpointError, UnsafePickleError

# Modules whose classes and functions become inert stand-ins: the model's own code, which a
# module pickle names but which is never run here.
_STAND_IN_PREFIXES = ("trainer.", "transformers.", "torch.nn.modules.", "open_clip.")
_STAND_IN_MODULES = {"torch._C._nn", "torch.nn.functional", "torch.nn.modules"}

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
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
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
                raise CheckpointError(f"{self.path}: storage {key} is missing from the archive (truncated file?)") from None
            buf = bytearray(info.file_size)
            with self.archive.open(info) as fh:
                got = fh.readinto(buf)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if got != info.file_size or (storage_type.name != "UntypedStorage" and got != int(numel) * itemsize):
                raise CheckpointError(
                    f"{self.path}: storage {key} holds {got} bytes, expected {int(numel) * itemsize}"
                )
            if got:
                untyped = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()
            else:
                untyped = torch.UntypedStorage(0)
            self.cache[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.cache[key]


def _check_little_endian(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    name = f"{prefix}byteorder"
    if name in archive.namelist() and archive.read(name).strip() not in (b"little", b""):
        raise CheckpointError(f"{path}: big-endian torch archive; re-save it on a little-endian machine")


def _unpickle_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pickles:
            raise CheckpointError(f"{path}: a zip file, but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        _check_little_endian(archive, prefix, path)
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


def _collect(module, prefix: str, out: dict, path: Path, active: set[int]) -> None:
    """Walk ``_parameters``, persistent ``_buffers`` and ``_modules`` as ``Module.state_dict`` would."""
    state = _module_state(module)
    if state is None:
        raise CheckpointError(
            f"{path}: {prefix.rstrip('.') or 'the root object'} is not a torch module "
            f"({type(module).__module__}.{type(module).__qualname__})"
        )
    if id(module) in active:
        raise CheckpointError(f"{path}: the module tree loops back on itself at {prefix.rstrip('.')}")
    active.add(id(module))
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise CheckpointError(f"{path}: {prefix}{group} is not a dict")
        for name, value in entries.items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not _is_tensor(value):
                raise CheckpointError(f"{path}: {prefix}{name} is not a tensor ({type(value).__name__})")
            out[f"{prefix}{name}"] = value
    children = state.get("_modules") or {}
    if not isinstance(children, dict):
        raise CheckpointError(f"{path}: {prefix}_modules is not a dict")
    for name, child in children.items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, path, active)
    active.discard(id(module))


def _state_dict_of(obj, path: Path) -> dict:
    if _module_state(obj) is not None:
        out: dict = {}
        _collect(obj, "", out, path, set())
        return out
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if inner is not None and (isinstance(inner, dict) or _module_state(inner) is not None):
                return _state_dict_of(inner, path)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise CheckpointError(f"{path}: holds neither a model nor a state dict of tensors (found {kind})")


def _torch_load_weights_only(path: Path):
    """torch's restricted loader; None when the file holds more than plain tensor data."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError:
        return None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile):
        return None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pickled checkpoint (state dict or whole module) into a CPU state dict, never running its code.

    Raises :class:`UnsafePickleError` when the pickle names anything that could run code,
    and :class:`CheckpointError` when the file is unreadable or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    loaded = _torch_load_weights_only(path)
    if loaded is None:
        loaded = _unpickle_zip(path) if zipfile.is_zipfile(path) else _unpickle_plain(path)
    state = _state_dict_of(loaded, path)
    if not state:
        raise CheckpointError(f"{path}: no tensors in this checkpoint")
    return {k: (v.detach() if v.requires_grad else v) for k, v in state.items()}
