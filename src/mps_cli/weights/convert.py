"""Convert an MPS checkpoint (the authors' pickles, or safetensors under a prefix) to the published layout.

A CLIP judge's checkpoint (HPSv2.1's pickle, see :mod:`mps_cli.weights.layouts`) converts the same way,
to safetensors in its own layout.

The output is the layout of the published safetensors: the same key names with no
``mps.``/``module.`` prefix, every tensor kept except the ``position_ids``
buffers. It is written under a temporary name beside the destination and renamed only
once it has been read back and checked, so a failed conversion leaves no output file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..devices import DTYPES, dtype_name, parse_dtype, torch_dtype
from ..errors import CheckpointError, DeviceError
from ..files import replacing
from .layouts import detect_layout, plan_judge_remap
from .reader import read_safetensors_header
from .remap import cross_config_from_shapes, detect_prefix, plan_remap

# Buffers no model reads from a file: transformers' position ids, open_clip's causal mask.
_DROPPED = re.compile(r"(^|\.)position_ids$|^attn_mask$")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` wrote."""

    dst: Path
    tensors: int
    bytes: int
    dtype: str  # fp32, fp16, bf16, or "mixed" when the floating tensors differ


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None) -> ConvertResult:
    """Write ``src`` (``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``) to ``dst`` in the published layout.

    ``dtype`` (fp32, fp16 or bf16) casts the floating-point tensors; None keeps them as they are.
    """
    from .sources import open_source

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the output must be a .safetensors file")
    target = None
    if dtype is not None:
        try:
            name = parse_dtype(dtype)
        except DeviceError:
            name = "auto"
        if name not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}: expected {', '.join(DTYPES)}")
        target = torch_dtype(name)
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst}: folder {dst.parent} does not exist")

    source = open_source(src)
    shapes = source.shapes()
    layout, prefix = _layout_of(shapes, str(src))
    stray = sorted(k for k in shapes if not k.startswith(prefix))
    if stray:
        raise CheckpointError(f"{src}: tensors outside the '{prefix}' prefix: {', '.join(stray[:5])}")
    kept = {k[len(prefix):]: k for k in shapes if not _DROPPED.search(k)}
    plan = plan_remap(kept, "") if layout is None else plan_judge_remap(kept, layout, "")
    if plan.unexpected:
        more = f", ... ({len(plan.unexpected)} in all)" if len(plan.unexpected) > 6 else ""
        shown = ", ".join(plan.unexpected[:6]) + more
        what = "an MPS checkpoint" if layout is None else f"a CLIP checkpoint in {layout}'s layout"
        raise CheckpointError(f"{src}: tensors that are not part of {what}: {shown}")
    if layout is None:
        cross_config_from_shapes({k: shapes[v] for k, v in kept.items()}, "", str(src))

    tensors = {}
    seen_storage: set[int] = set()
    for name, original in sorted(kept.items()):
        t = source.get(original)
        if target is not None and t.is_floating_point():
            t = t.to(target)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            # safetensors refuses tensors that share memory; a pickle may tie weights together.
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t

    floating = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    label = _short_name(next(iter(floating))) if len(floating) == 1 else "mixed"
    _write_atomically(tensors, dst, src, layout)
    return ConvertResult(dst=dst, tensors=len(tensors), bytes=dst.stat().st_size, dtype=label)


def _short_name(torch_name: str) -> str:
    try:
        return dtype_name(torch_name)
    except DeviceError:
        return torch_name


def _layout_of(shapes, name: str) -> tuple[str | None, str]:
    """(None, prefix) for an MPS checkpoint, else (the judge layout, prefix) of a CLIP judge's."""
    try:
        return None, detect_prefix(shapes, name)
    except CheckpointError as not_mps:
        try:
            return detect_layout(shapes, name)
        except CheckpointError:
            raise not_mps from None


def _write_atomically(tensors: dict, dst: Path, src: Path, layout: str | None = None) -> None:
    from safetensors.torch import save_file

    try:
        with replacing(dst) as tmp:
            try:
                # Created like any new file (umask applies), and never over an existing one.
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except OSError as exc:
                raise CheckpointError(f"{dst}: cannot write in {dst.parent} ({exc.strerror or exc})") from None
            try:
                save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": src.name})
            except OSError as exc:
                raise CheckpointError(f"{dst}: cannot write ({exc.strerror or exc})") from None
            except Exception as exc:  # safetensors raises untyped errors
                raise CheckpointError(f"{dst}: cannot write ({exc})") from None
            header, _ = read_safetensors_header(tmp)
            if set(header) != set(tensors):
                raise CheckpointError(f"{dst}: the written file does not hold the {len(tensors)} tensors it should")
            if _layout_of(header, str(dst)) != (layout, ""):
                raise CheckpointError(f"{dst}: the written file is not in the published layout")
    except OSError as exc:  # the rename into place
        raise CheckpointError(f"{dst}: cannot write ({exc.strerror or exc})") from None
