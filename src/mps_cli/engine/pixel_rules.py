"""One decoded image, several preprocessing rules: the model input of every requested model.

Each model is fed exactly what its reference implementation feeds it (docs/judges.md, "Preprocessing"):

- ``clip``: MPS's rule (docs/mps-model.md §2), which is also transformers' ``CLIPImageProcessor``
  (PickScore): RGB, shorter side to 224 with PIL bicubic (long side floored), centre crop at floor offsets.
- ``open_clip``: open_clip's eval transform (CLIPScore): the same PIL resize but in the image's own mode,
  centre crop at *rounded* offsets (torchvision's ``CenterCrop``), RGB conversion after the crop.
- ``letterbox``: HPSv2's eval transform: RGB to float, longer side to 224 (rounded) with antialiased
  bicubic on floats (``torch.nn.functional.interpolate``, here in numpy), zero (black) padding to a
  square, left and top getting the smaller half.

What is identical is done once: the decode, the RGB conversion, and the PIL resize that ``clip`` and
``open_clip`` share for an RGB image. The arithmetic is numpy's (these run in decode threads beside the
model; see :func:`~mps_cli.engine.preprocess.pixels_from_image`).
"""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image

from .preprocess import crop_offsets, normalized_tensor, resized_size

CLIP = "clip"
OPEN_CLIP = "open_clip"
LETTERBOX = "letterbox"
RULES = (CLIP, OPEN_CLIP, LETTERBOX)


def rounded_crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre ``size`` square as torchvision's ``CenterCrop`` rounds them (half to even)."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def _resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    new = resized_size(w, h, size)
    return img if new == (w, h) else img.resize(new, resample=Image.Resampling.BICUBIC)


def _crop(img: Image.Image, left: int, top: int, size: int) -> Image.Image:
    return img.crop((left, top, left + size, top + size))


def pixels_by_rule(img: Image.Image, size: int, rules: Iterable[str]) -> dict:
    """``{rule: 3 x size x size float32 tensor}`` for one decoded image in its own mode (8-bit).

    ``img`` comes from :func:`~mps_cli.engine.preprocess.open_image` with ``keep_mode=True``.
    """
    rules = list(dict.fromkeys(rules))
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown preprocessing rule {unknown[0]!r}")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    resized = None
    out = {}
    for rule in rules:
        if resized is None and (rule == CLIP or (rule == OPEN_CLIP and img.mode == "RGB")):
            resized = _resize(rgb, size)
        if rule == CLIP:
            out[rule] = normalized_tensor(_crop(resized, *crop_offsets(*resized.size, size), size))
        elif rule == OPEN_CLIP:
            # open_clip resizes the image as decoded and converts to RGB last: for RGBA (premultiplied by
            # PIL's resize) and palette images (which PIL resizes nearest) that is another picture.
            r = resized if img.mode == "RGB" else _resize(img, size)
            r = _crop(r, *rounded_crop_offsets(*r.size, size), size)
            out[rule] = normalized_tensor(r if r.mode == "RGB" else r.convert("RGB"))
        else:
            out[rule] = normalized_tensor(letterbox(rgb, size))
    return out


def letterbox(rgb: Image.Image, size: int):
    """HPSv2's model input before normalisation: an H x W x 3 float32 array in [0, 1], ``size`` square.

    The longer side goes to ``size`` (``round``, as HPSv2 does), with the antialiased bicubic that
    ``torch.nn.functional.interpolate(..., antialias=True)`` computes on floats (no 8-bit rounding, no
    clamping), then zero padding. HPSv2 leaves an image whose longer side is already ``size`` unpadded
    (and a non-square one then fails in its model); here every image is padded to the square.
    """
    import numpy as np

    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    h, w = x.shape[:2]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = _aa_resize(_aa_resize(x, nw, axis=1), nh, axis=0)
    nh, nw = x.shape[:2]
    out = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = x[:size, :size]
    return out


def _cubic(x, a: float = -0.5):
    """The bicubic kernel of antialiased resizing (PIL's and torch's, a = -0.5)."""
    import numpy as np

    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_weights(in_size: int, out_size: int):
    """(indices, weights), each out_size x taps: torch's antialiased bicubic, align_corners=False.

    As ``aten/src/ATen/native/cpu/UpSampleKernel.cpp`` computes them for a float32 image, in float32
    (float64 weights differ from torch's output by up to 2e-5 of the pixel range; these by 1e-6): the
    kernel widened by the scale when shrinking, each output pixel's taps normalised to sum to one.
    """
    import numpy as np

    f = np.float32
    scale = f(in_size) / f(out_size)
    support = f(2.0) * scale if scale >= 1.0 else f(2.0)
    invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, taps), dtype=np.int64)
    wts = np.zeros((out_size, taps), dtype=np.float32)
    for i in range(out_size):
        center = scale * (f(i) + f(0.5))
        lo = max(int(center - support + f(0.5)), 0)
        n = min(int(center + support + f(0.5)), in_size) - lo
        j = np.arange(n)
        w = _cubic((j.astype(np.float32) + f(lo) - center + f(0.5)) * invscale).astype(np.float32)
        total = w.sum(dtype=np.float32)
        idx[i, :n] = lo + j
        wts[i, :n] = w / total if total != 0 else w
    return idx, wts


def _aa_resize(x, out_size: int, axis: int):
    """Resize float32 ``x`` along ``axis`` (0: rows, 1: columns) to ``out_size`` with :func:`aa_weights`."""
    import numpy as np

    idx, wts = aa_weights(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = np.zeros(x.shape[:axis] + (out_size,) + x.shape[axis + 1:], dtype=np.float32)
    for t in range(idx.shape[1]):
        acc += np.take(x, idx[:, t], axis=axis) * wts[:, t].reshape(shape)
    return acc


__all__ = ["CLIP", "LETTERBOX", "OPEN_CLIP", "RULES", "aa_weights", "letterbox", "pixels_by_rule",
           "rounded_crop_offsets"]
