"""Reading MPS checkpoints: detect the key prefix, remap once to our module names, load strictly.

The published layout (mps-model.md §5) is a transformers-style CLIP state dict plus the
cross model. Loading never random-initialises anything: the model is built on the meta
device and every tensor is assigned from the file, converted one at a time to the target
dtype so no full fp32 copy of an fp16 checkpoint is ever made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

from .config import CrossConfig, ModelConfig
from .errors import CheckpointError

KNOWN_PREFIXES = ("", "mps.", "module.")
_ANCHOR = "model.text_model.embeddings.token_embedding.weight"

# Keys present in published files that the model does not use.
_IGNORED = (
    re.compile(r".*\.position_ids$"),
    re.compile(r"^model\.vision_model\.post_layernorm\.(weight|bias)$"),
)

_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_SIMPLE = {
    "model.text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "model.text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "model.text_model.final_layer_norm.weight": "text.ln_final.weight",
    "model.text_model.final_layer_norm.bias": "text.ln_final.bias",
    "model.vision_model.embeddings.class_embedding": "visual.class_embedding",
    "model.vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "model.vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "model.vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "model.vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "model.logit_scale": "logit_scale",
}
# Linear (out, in) weights that open_clip keeps as (in, out) projection matrices.
_TRANSPOSED = {
    "model.text_projection.weight": "text.text_projection",
    "model.visual_projection.weight": "visual.proj",
}
_CROSS_RENAMES = {
    "0.fn.norm.weight": "cross.{i}.norm.weight",
    "0.fn.norm.bias": "cross.{i}.norm.bias",
    "0.fn.to_q.weight": "cross.{i}.to_q.weight",
    "0.fn.to_kv.weight": "cross.{i}.to_kv.weight",
    "0.fn.to_out.weight": "cross.{i}.to_out.weight",
    "0.fn.ff.0.weight": "cross.{i}.ff_in.weight",
    "0.fn.ff.2.weight": "cross.{i}.ff_out.weight",
    "1.fn.norm.weight": "parallel.{i}.norm.weight",
    "1.fn.norm.bias": "parallel.{i}.norm.bias",
    "1.fn.rotary_emb.inv_freq": "parallel.{i}.inv_freq",
    "1.fn.fused_attn_ff_proj.weight": "parallel.{i}.fused.weight",
    "1.fn.attn_out.weight": "parallel.{i}.attn_out.weight",
    "1.fn.ff_out.1.weight": "parallel.{i}.ff_out.weight",
}
_TOWER_LAYER = re.compile(r"^model\.(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CROSS_LAYER = re.compile(r"^cross_model\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^self_attn\.([qkv])_proj$")
# Small tensors that stay fp32 whatever the model dtype: exp(logit_scale) scales every
# score (bf16 would move it by up to 3%), and rotary angles need the precision.
_KEEP_FP32 = re.compile(r"^(logit_scale|cross\.parallel\.\d+\.inv_freq)$")

_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class TensorSource(Protocol):
    """A read-only mapping of tensor names to shapes, loaded one tensor at a time."""

    name: str

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str): ...


@dataclass
class SafetensorsFile:
    """A validated ``.safetensors`` file whose tensors are read one at a time.

    Tensors are read with plain file reads into fresh buffers rather than through a memory
    map, so the file's pages never count towards the process's resident memory.
    """

    path: Path
    header: dict = field(repr=False)
    header_size: int = 0

    @property
    def name(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SafetensorsFile":
        path = Path(path)
        header, header_size = read_safetensors_header(path)
        return cls(path=path, header=header, header_size=header_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read_into(self, key: str, out) -> None:
        """Fill ``out`` (any layout, dtype or device) with tensor ``key``.

        Straight from the file when dtype and layout agree; otherwise a few rows at a time
        through small reused per-thread buffers, so loading never holds (or fragments the
        heap with) a second copy of a large tensor.
        """
        import ctypes

        import torch

        info = self.header[key]
        src_dtype = getattr(torch, _TORCH_DTYPES.get(info["dtype"], ""), None)
        if src_dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
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
        with self._opened(key) as f:
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

    def _opened(self, key: str):
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read weights ({exc})") from None

    def _readinto(self, f, key: str, start: int, buffer) -> None:
        try:
            f.seek(8 + self.header_size + start)
            got = f.readinto(buffer)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read weights ({exc})") from None
        if got != len(buffer):
            raise CheckpointError(f"{self.path}: truncated while reading {key!r}")

    def _read(self, key: str, start: int, buffer) -> None:
        with self._opened(key) as f:
            self._readinto(f, key, start, buffer)

    def get(self, key: str):
        import ctypes

        import torch

        info = self.header[key]
        dtype = getattr(torch, _TORCH_DTYPES.get(info["dtype"], ""), None)
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
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


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header: a truncated or corrupt file fails here, by name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated weights file ({size} bytes); delete it and fetch again")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100 * 2**20 or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file, or truncated (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a weights file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for s in shape:
                count *= int(s)
            if _ST_DTYPES[dtype] * count != stop - start or start < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated weights file ({size:,} of {expected:,} bytes); "
            "delete it and fetch or copy it again"
        )
    return header, n


def fingerprint(path: str | os.PathLike, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A cheap identity of a weights file: its size, header and evenly spaced data samples."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        h.update(f.read(min(n, 100 * 2**20)))
        for i in range(samples):
            f.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def detect_prefix(keys: Iterable[str], name: str = "checkpoint") -> str:
    """The prefix the published keys sit under: none, ``mps.`` or ``module.``."""
    keys = list(keys)
    anchors = [k for k in keys if k.endswith(_ANCHOR)]
    if not anchors:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise CheckpointError(
            f"{name}: not an MPS checkpoint: no '{_ANCHOR}' tensor (first keys: {sample})"
        )
    prefix = anchors[0][: -len(_ANCHOR)]
    if prefix not in KNOWN_PREFIXES:
        raise CheckpointError(
            f"{name}: unknown key prefix {prefix!r} (expected keys under none, 'mps.' or 'module.')"
        )
    return prefix


@dataclass
class RemapPlan:
    """How each of our parameter names is built from the checkpoint's tensors."""

    targets: dict[str, tuple[str, list[str]]]  # ours -> (op, source keys), op in copy|cat|t
    unexpected: list[str]
    ignored: list[str]

    def source_of(self, target: str) -> str:
        return self.targets[target][1][0]


def plan_remap(keys: Iterable[str], prefix: str) -> RemapPlan:
    """Map published key names (under ``prefix``) onto our module's names."""
    targets: dict[str, tuple[str, list[str]]] = {}
    qkv: dict[str, dict[str, str]] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for full in keys:
        if not full.startswith(prefix):
            unexpected.append(full)
            continue
        key = full[len(prefix):]
        if any(p.match(key) for p in _IGNORED):
            ignored.append(full)
        elif key in _SIMPLE:
            targets[_SIMPLE[key]] = ("copy", [full])
        elif key in _TRANSPOSED:
            targets[_TRANSPOSED[key]] = ("t", [full])
        elif m := _TOWER_LAYER.match(key):
            tower = "text" if m[1] == "text" else "visual"
            base = f"{tower}.transformer.resblocks.{m[2]}"
            module, kind = m[3], m[4]
            if q := _QKV.match(module):
                suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
                qkv.setdefault(f"{base}.attn.{suffix}", {})[q[1]] = full
            elif module in _LAYER_RENAMES:
                targets[f"{base}.{_LAYER_RENAMES[module]}.{kind}"] = ("copy", [full])
            else:
                unexpected.append(full)
        elif (m := _CROSS_LAYER.match(key)) and m[2] in _CROSS_RENAMES:
            targets["cross." + _CROSS_RENAMES[m[2]].format(i=m[1])] = ("copy", [full])
        else:
            unexpected.append(full)
    for target, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            targets[target] = ("cat", [parts["q"], parts["k"], parts["v"]])
        else:
            # An incomplete q/k/v group: name the absent member as the file would have.
            present = next(iter(parts.items()))
            targets[target] = ("cat", [
                parts.get(c, present[1].replace(f"self_attn.{present[0]}_proj", f"self_attn.{c}_proj"))
                for c in "qkv"
            ])
    return RemapPlan(targets=targets, unexpected=sorted(unexpected), ignored=ignored)


def cross_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str, name: str) -> CrossConfig:
    """Read the cross model's geometry (width, heads, head size, layers, FF sizes) off its weights."""
    p = prefix + "cross_model.layers."
    layers = sorted({int(k[len(p):].split(".")[0]) for k in shapes if k.startswith(p)})
    if not layers:
        raise CheckpointError(f"{name}: no cross model ('{p}N...' tensors) in this checkpoint")
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{name}: cross model layers are not numbered 0..N-1 ({layers})")

    def shape(suffix: str) -> tuple[int, ...]:
        key = f"{p}0.{suffix}"
        if key not in shapes:
            raise CheckpointError(f"{name}: missing tensor {key}")
        return shapes[key]

    inner, width = shape("0.fn.to_q.weight")
    head_dim = shape("0.fn.to_kv.weight")[0] // 2
    if head_dim == 0 or inner % head_dim:
        raise CheckpointError(f"{name}: cross model to_q/to_kv shapes are inconsistent")
    cross_ff = shape("0.fn.ff.0.weight")[0] // 2
    fused = shape("1.fn.fused_attn_ff_proj.weight")[0]
    return CrossConfig(
        width=width, layers=len(layers), heads=inner // head_dim, head_dim=head_dim,
        cross_ff=cross_ff, parallel_ff=(fused - inner - 2 * head_dim) // 2,
    )


def _target_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if op == "t":
        return tuple(reversed(shapes[0]))
    if op == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


def check_against_model(plan: RemapPlan, source_shapes: Mapping[str, tuple[int, ...]],
                        expected: Mapping[str, tuple[int, ...]], name: str, config_source: str) -> None:
    """Strict comparison of the remapped checkpoint with the model; one error listing every problem."""
    problems: list[str] = []
    missing_src = [s for op, srcs in plan.targets.values() for s in srcs if s not in source_shapes]
    missing = sorted(set(expected) - set(plan.targets))
    unexpected = list(plan.unexpected) + sorted(
        s for t, (_, srcs) in plan.targets.items() if t not in expected for s in srcs
    )
    mismatched = []
    for target, (op, srcs) in sorted(plan.targets.items()):
        if target not in expected or any(s not in source_shapes for s in srcs):
            continue
        want = tuple(expected[target])
        if op == "cat":
            # q, k and v are stored apart: name each one that is off, with its own expected shape.
            part = (want[0] // len(srcs), *want[1:])
            mismatched.extend(f"{s} {tuple(source_shapes[s])} (model expects {part})"
                              for s in srcs if tuple(source_shapes[s]) != part)
            continue
        if _target_shape(op, [source_shapes[srcs[0]]]) != want:
            shown = _target_shape(op, [want]) if op == "t" else want
            mismatched.append(f"{srcs[0]} {tuple(source_shapes[srcs[0]])} (model expects {shown})")

    def listing(label: str, items: list[str]) -> None:
        if items:
            head = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {head}")

    # Report our own names only where there is no published name to show.
    missing_published = sorted(set(missing_src) | {_published_name(m) for m in missing})
    listing("missing", missing_published)
    listing("unexpected", unexpected)
    listing("wrong shape", mismatched)
    if problems:
        hint = ""
        if mismatched:
            # Shapes that disagree mean another architecture (a smaller or larger CLIP), even
            # when its layer count also leaves tensors missing.
            hint = f"; the architecture ({config_source}) does not fit these weights: pass their config.json with --config"
        raise CheckpointError(f"{name}: weights do not match the model: " + "; ".join(problems) + hint)


def _published_name(target: str) -> str:
    reverse = {v: k for k, v in {**_SIMPLE, **_TRANSPOSED}.items()}
    if target in reverse:
        return reverse[target]
    if m := re.match(r"^(text|visual)\.transformer\.resblocks\.(\d+)\.(.+)$", target):
        tower = "text" if m[1] == "text" else "vision"
        rest = m[3]
        for pub, ours in _LAYER_RENAMES.items():
            rest = rest.replace(ours, pub)
        rest = rest.replace("attn.in_proj_weight", "self_attn.{q,k,v}_proj.weight").replace(
            "attn.in_proj_bias", "self_attn.{q,k,v}_proj.bias")
        return f"model.{tower}_model.encoder.layers.{m[2]}.{rest}"
    if m := re.match(r"^cross\.(cross|parallel)\.(\d+)\.(.+)$", target):
        for pub, ours in _CROSS_RENAMES.items():
            if ours.format(i=m[2]) == f"{m[1]}.{m[2]}.{m[3]}":
                return f"cross_model.layers.{m[2]}.{pub}"
    return target


def convert_each(source: TensorSource, plan: RemapPlan, dtype,
                 allocate: Callable[[str, tuple[int, ...], object], object],
                 done: Callable[[str, object], None]) -> None:
    """Fill every target tensor in its final dtype and layout: ``allocate`` it, fill it, pass it to ``done``.

    Each target is filled in a single pass (read, or read then one converting copy that
    also transposes or places a q/k/v slice), a few at a time in threads so file reads
    overlap conversion. ``allocate(target, shape, dtype)`` returns a tensor of the target's
    logical shape, in whatever memory layout the caller wants.
    """
    def build(item):
        target, (op, srcs) = item
        shapes = [source.shape(s) for s in srcs]
        out = allocate(target, _target_shape(op, shapes), _target_dtype(target, dtype))
        if op == "t":
            fill(source, srcs[0], out.t())
        else:
            row = 0
            for src, shape in zip(srcs, shapes):
                if op == "cat":
                    fill(source, src, out[row:row + shape[0]])
                    row += shape[0]
                else:
                    fill(source, src, out)
        done(target, out)

    workers = min(4, os.cpu_count() or 1)
    items = sorted(plan.targets.items(), key=lambda kv: -_numel(source.shape(kv[1][1][0])))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mps-load") as pool:
            for _ in pool.map(build, items):
                pass
    else:
        for item in items:
            build(item)


def load_into(model, source: TensorSource, plan: RemapPlan, device, dtype,
              transposed: frozenset[str] = frozenset()) -> None:
    """Assign every tensor, allocated once in its final dtype and layout (see :func:`convert_each`)."""
    import torch

    def allocate(target, shape, want):
        if target in transposed:
            return torch.empty(tuple(reversed(shape)), dtype=want, device=device).t()
        return torch.empty(shape, dtype=want, device=device)

    state: dict = {}
    convert_each(source, plan, dtype, allocate, state.__setitem__)
    model.load_state_dict(state, strict=True, assign=True)
    _freeze(model)


def write_prepared(writer, source: TensorSource, plan: RemapPlan, dtype) -> None:
    """Convert every target into ``writer``'s scratch buffers and write it to the prepared file."""
    convert_each(source, plan, dtype, lambda target, shape, want: writer.buffer(target), writer.write)


def _freeze(model) -> None:
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)


def _target_dtype(target: str, dtype):
    """The dtype tensor ``target`` is loaded in; ``dtype`` is the load's :class:`mps_cli.devices.Precision`."""
    import torch

    return torch.float32 if _KEEP_FP32.match(target) else dtype.tensor_dtype(target)


def _release_free_memory() -> None:
    # glibc keeps freed small blocks in its arenas; hand them back so the resident size
    # after loading is the weights plus the runtime, not plus loading's leftovers.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fill(source: TensorSource, key: str, out) -> None:
    """Copy one source tensor into ``out`` (converting dtype/device in the same pass)."""
    if isinstance(source, SafetensorsFile):
        source.read_into(key, out)
    else:
        out.copy_(source.get(key))


def load_weights(model_factory: Callable[[CrossConfig], object], source: TensorSource,
                 config: ModelConfig, device, dtype, prepared: bool = True):
    """Build the model on meta for these weights, check it strictly, and load it in ``dtype`` (a Precision).

    With ``prepared`` (and :mod:`mps_cli.prepared` enabled), a CPU load that converts the
    weights maps the converted copy cached by an earlier load, or writes one for the next.
    """
    import torch

    shapes = source.shapes()
    prefix = detect_prefix(shapes, source.name)
    cross = cross_config_from_shapes(shapes, prefix, source.name)
    plan = plan_remap(shapes, prefix)
    with torch.device("meta"):
        model = model_factory(cross)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_against_model(plan, shapes, expected, source.name, config.source)
    # Only reduced precision gains from the transposed layout (oneDNN repacks bf16/fp16
    # weights per call); fp32 runs as fast either way and loads faster without it.
    transposed = frozenset(model.transposed_weights()) if torch.device(device).type == "cpu" and dtype.reduced \
        else frozenset()
    cache = _prepared_file(source, plan, device, dtype, transposed) if prepared else None
    if cache is not None and _load_prepared(model, cache, expected, dtype, transposed):
        model.finish_loading(torch.device(device))
        return model.eval()
    if cache is not None and _write_prepared(cache, source, plan, expected, dtype, transposed) \
            and _load_prepared(model, cache, expected, dtype, transposed):
        model.finish_loading(torch.device(device))
        _release_free_memory()
        return model.eval()
    load_into(model, source, plan, device, dtype, transposed)
    model.finish_loading(torch.device(device))
    model.eval()
    _release_free_memory()
    return model


def _write_prepared(cache: Path, source: TensorSource, plan: RemapPlan, expected: Mapping[str, tuple[int, ...]],
                    dtype, transposed: frozenset[str]) -> bool:
    """Convert the weights into a new prepared file; False (logged) where it cannot be written."""
    from .prepared import log, open_writer

    specs = {k: (shape, _target_dtype(k, dtype)) for k, shape in expected.items()}
    writer = open_writer(cache, specs, transposed, source.path)
    if writer is None:
        return False
    try:
        write_prepared(writer, source, plan, dtype)
        writer.commit()
    except OSError as exc:
        writer.abort()
        log.warning("mps: not caching prepared weights in %s: %s", cache.parent, exc.strerror or exc)
        return False
    except BaseException:
        writer.abort()
        raise
    return True


def _prepared_file(source: TensorSource, plan: RemapPlan, device, dtype, transposed: frozenset[str]):
    """The prepared-weights file for this load, or None when loading needs no conversion."""
    import torch

    from . import prepared

    if not isinstance(source, SafetensorsFile) or torch.device(device).type != "cpu" or not prepared.enabled():
        return None
    converts = bool(transposed) or any(
        getattr(torch, _TORCH_DTYPES.get(source.header[srcs[0]]["dtype"], ""), None) != _target_dtype(t, dtype)
        for t, (_, srcs) in plan.targets.items()
    )
    if not converts:
        return None
    try:
        return prepared.prepared_path(source.path, dtype.key, transposed)
    except OSError:
        return None


def _load_prepared(model, path: Path, expected: Mapping[str, tuple[int, ...]], dtype,
                   transposed: frozenset[str]) -> bool:
    from . import prepared

    want = {k: (shape, _target_dtype(k, dtype)) for k, shape in expected.items()}
    try:
        state = prepared.map_prepared(path, want, transposed)
    except (CheckpointError, OSError, ValueError) as exc:
        prepared.discard(path, str(exc))
        return False
    if state is None:
        return False
    model.load_state_dict(state, strict=True, assign=True)
    _freeze(model)
    return True
