"""One decoded image, several preprocessing rules: the model input of every requested model.

Each model is fed exactly what its reference implementation feeds it (docs/judges.md, "Preprocessing"):

- ``clip``: MPS's rule (docs/mps-model.md §2), which is also transformers' ``CLIPImageProcessor``
  (PickScore): RGB, shorter side to 224 with PIL bicubic (long side floored), centre crop at floor offsets.
- ``open_clip``: open_clip's eval transform (CLIPScore): the same PIL resize but in the image's own mode,
  centre crop at *rounded* offsets (torchvision's ``CenterCrop``), RGB conversion after the crop.
- ``letterbox``: HPSv2's eval transform: RGB to float, longer side to 224 (rounded) with antialiased
  bicubic on floats (``torch.nn.functional.interpolate``, which torchvision's tensor ``Resize`` calls),
  zero (black) padding to a square, left and top getting the smaller half.

What is identical is done once: the decode, the RGB conversion, and the PIL resize that ``clip`` and
``open_clip`` share for an RGB image. The PIL rules run in the decode threads with numpy arithmetic (see
:func:`~mps_cli.engine.preprocess.pixels_from_image`); ``letterbox`` keeps the decoded RGB pixels there and
finishes with torch's own op in the model's thread, per batch (:func:`letterbox_batch`): a torch op in a
decode thread would start its own team of compute threads, and numpy's equivalent is 5-8x slower.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from ..constants import IMAGE_MEAN, IMAGE_STD
from .preprocess import crop_offsets, normalized_array, normalized_tensor, resized_size

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
    return _by_rule(img, size, rules, normalized_tensor)


def arrays_by_rule(img: Image.Image, size: int, rules: Iterable[str]) -> dict:
    """:func:`pixels_by_rule` as numpy arrays, for processes that decode and never import torch."""
    return _by_rule(img, size, rules, normalized_array)


def _by_rule(img: Image.Image, size: int, rules: Iterable[str], normalized) -> dict:
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
            out[rule] = normalized(_crop(resized, *crop_offsets(*resized.size, size), size))
        elif rule == OPEN_CLIP:
            # open_clip resizes the image as decoded and converts to RGB last: for RGBA (premultiplied by
            # PIL's resize) and palette images (which PIL resizes nearest) that is another picture.
            r = resized if img.mode == "RGB" else _resize(img, size)
            r = _crop(r, *rounded_crop_offsets(*r.size, size), size)
            out[rule] = normalized(r if r.mode == "RGB" else r.convert("RGB"))
        else:
            # Finished per batch by letterbox_batch, in the model's thread.
            out[rule] = np.array(rgb)  # a writable copy: torch.from_numpy takes it as is
    return out


def letterbox_images(images, size: int, input_range: tuple[float, float] = (0.0, 1.0)):
    """HPSv2's eval transform on a B x 3 x H x W float tensor (differentiable): normalised B x 3 x size x size.

    Longer side to ``size`` (``round``, as HPSv2 does) with ``interpolate(mode="bicubic", antialias=True)``
    on floats (no 8-bit rounding, no clamping), zero padding, CLIP mean/std. HPSv2 leaves an image whose
    longer side is already ``size`` unpadded (a non-square one then fails in its model); here it is padded.
    """
    import torch
    import torch.nn.functional as F

    lo, hi = input_range
    x = images.float() if images.dtype not in (torch.float32, torch.float64) else images
    x = (x - lo) / (hi - lo)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True,
                          align_corners=False)
    nh, nw = x.shape[-2:]
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top))
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def letterbox_batch(arrays, size: int, device=None):
    """A B x 3 x size x size float32 batch from the decoded H x W x 3 uint8 RGB arrays ``letterbox`` leaves.

    Each image goes to ``device`` as bytes and is transformed there, as HPSv2's ``ToTensor`` then
    ``ResizeMaxSize`` do (``ToTensor`` divides by 255 in float32).
    """
    import torch

    out = []
    for arr in arrays:
        x = torch.from_numpy(arr).to(device).permute(2, 0, 1)[None]
        out.append(letterbox_images(x.float().div(255), size))
    return torch.cat(out)


__all__ = ["CLIP", "LETTERBOX", "OPEN_CLIP", "RULES", "arrays_by_rule", "letterbox_batch", "letterbox_images",
           "pixels_by_rule", "rounded_crop_offsets"]
