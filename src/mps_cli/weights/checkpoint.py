"""Loading a checkpoint into the model: built on the meta device, checked strictly, then filled.

Loading never random-initialises anything: every tensor is assigned from the file, converted
one at a time to its final dtype and layout, so no full fp32 copy of an fp16 checkpoint is ever
made. A CPU load that converts goes through the prepared copy (:mod:`mps_cli.weights.prepared`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from . import prepared
from .config import CrossConfig, ModelConfig
from .reader import SafetensorsFile, TensorDict, TensorSource
from .remap import RemapPlan, check_against_model, cross_config_from_shapes, detect_prefix, plan_remap, target_shape

# Small tensors that stay fp32 whatever the model dtype: exp(logit_scale) scales every
# score (bf16 would move it by up to 3%), and rotary angles need the precision.
_KEEP_FP32 = re.compile(r"^(logit_scale|cross\.parallel\.\d+\.inv_freq)$")


def tensor_dtype(target: str, dtype):
    """The dtype model tensor ``target`` is loaded in, for a model running in ``dtype`` (a Precision)."""
    import torch

    return torch.float32 if _KEEP_FP32.match(target) else dtype.tensor_dtype(target)


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
        out = allocate(target, target_shape(op, shapes), tensor_dtype(target, dtype))
        if op == "t":
            fill(source, srcs[0], out.t())
        else:
            row = 0
            for src, shape in zip(srcs, shapes, strict=True):
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


def _freeze(model) -> None:
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)


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


def mps_layout(shapes, name: str):
    """MPS's published layout: (the cross model's geometry, the remap plan, how missing tensors are named)."""
    prefix = detect_prefix(shapes, name)
    return cross_config_from_shapes(shapes, prefix, name), plan_remap(shapes, prefix), None


def check_weights(model_factory: Callable, source: TensorSource, config: ModelConfig, layout: Callable = mps_layout):
    """The model built on meta for these weights and the remap plan, checked strictly (no tensor is read).

    ``layout(shapes, name)`` returns (what ``model_factory`` takes, the plan, the published namer or None).
    """
    import torch

    shapes = source.shapes()
    arg, plan, published = layout(shapes, source.name)
    with torch.device("meta"):
        model = model_factory(arg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_against_model(plan, shapes, expected, source.name, config.source, published)
    return model, plan, expected


def load_weights(model_factory: Callable[[CrossConfig], object], source: TensorSource,
                 config: ModelConfig, device, dtype, layout: Callable = mps_layout):
    """Build the model on meta for these weights, check it strictly, and load it in ``dtype`` (a Precision).

    A CPU load that converts the weights maps the converted copy cached by an earlier load,
    or writes one for the next (:func:`mps_cli.weights.prepared.obtain`). ``layout``: see :func:`check_weights`.
    """
    import torch

    model, plan, expected = check_weights(model_factory, source, config, layout)
    # Only reduced precision gains from the transposed layout (oneDNN repacks bf16/fp16
    # weights per call); fp32 runs as fast either way and loads faster without it.
    on_cpu = torch.device(device).type == "cpu"
    transposed = frozenset(model.transposed_weights()) if on_cpu and dtype.reduced else frozenset()
    state = None
    if on_cpu and isinstance(source, SafetensorsFile) and prepared.enabled() \
            and _converts(source, plan, dtype, transposed):
        specs = {k: (shape, tensor_dtype(k, dtype)) for k, shape in expected.items()}

        def convert(writer) -> None:
            convert_each(source, plan, dtype, lambda target, shape, want: writer.buffer(target), writer.write)

        state = prepared.obtain(source, specs, transposed, dtype.key, convert)
    if state is not None:
        model.load_state_dict(state, strict=True, assign=True)
        _freeze(model)
    else:
        load_into(model, source, plan, device, dtype, transposed)
    model.eval()
    _release_free_memory()
    return model


def _converts(source: SafetensorsFile, plan: RemapPlan, dtype, transposed: frozenset[str]) -> bool:
    """Whether loading changes any tensor's dtype or layout (only then is a prepared copy worth it)."""
    return bool(transposed) or any(source.dtype_of(srcs[0]) != tensor_dtype(t, dtype)
                                   for t, (_, srcs) in plan.targets.items())


__all__ = ["SafetensorsFile", "TensorDict", "TensorSource", "check_weights", "convert_each", "fill", "load_into",
           "load_weights", "mps_layout",
           "tensor_dtype"]
