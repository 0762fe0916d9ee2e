"""The fast decode paths beside the exact one: JPEGs decoded in batches on the scorer's device and resized
there in torch (the *tensor* path: nvJPEG on CUDA, libjpeg-turbo on CPU, through torchcodec or
torchvision), and the two-pass bicubic resize in torch that it shares with the differentiable reward.

The exact path (PIL decode, PIL's two-pass bicubic, :mod:`.preprocess`) stays the reference; PIL's
JPEG draft (the *draft* path) lives there too, since it is a way of opening a file. Which path runs is
decided once, at load (:func:`mps_cli.devices.resolve_decode`). An image the tensor path cannot take
(not a JPEG, a CMYK or truncated one, one its decoder refuses) goes the exact way on its own, so one
odd file never fails its batch.

The decoder is optional (the ``gpu`` extra: torchcodec, or torchvision, whose image decoding is
deprecated from 0.29 in torchcodec's favour): :func:`find_jpeg_decoder` finds one that runs on a device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..constants import IMAGE_MEAN, IMAGE_STD, MAX_IMAGE_PIXELS
from ..errors import ImageError
from .pixel_rules import rounded_crop_offsets
from .preprocess import EncodedImage, ImageInput, crop_offsets, load_pixels, resized_size

#: JPEG modes the tensor path decodes as PIL would (CMYK and others go the exact way).
_TENSOR_MODES = {"RGB", "L"}
#: Images resized in one torch call: bounds the float copies of large decoded images.
RESIZE_CHUNK = 32


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header passed the checks, left encoded for a batched decode on the scorer's device.

    ``source`` is what the exact path reopens if the device decode refuses it.
    """

    data: bytes
    label: str
    width: int
    height: int
    source: ImageInput


def find_jpeg_decoder(device):
    """A JPEG decoder that runs on ``device``, or None: ``decode(list of encoded uint8 tensors, device)``
    gives a list of 3 x H x W uint8 RGB tensors there.

    torchcodec's ``decode_jpeg`` when it decodes on ``device``, else torchvision's (the decoder's
    ``backend`` attribute says which); both decode a list in one nvJPEG call on CUDA and raise
    RuntimeError for data they refuse. Each is tried on a 16 x 16 JPEG on the device, so an absent
    or broken package, or a CPU-only build on a GPU machine, all mean: not this one.
    """
    import torch

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "JPEG")
    sample = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    for make in (_torchcodec_decoder, _torchvision_decoder):
        try:
            decode = make()
            if tuple(decode([sample], device)[0].shape) == (3, 16, 16):
                return decode
        except Exception:  # not installed, not built for this device, or broken: try the next
            continue
    return None


def _torchcodec_decoder():
    from torchcodec.decoders import decode_jpeg

    def decode(data, device):
        return decode_jpeg(data, mode="RGB", device=device)

    decode.backend = "torchcodec"
    return decode


def _torchvision_decoder():
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data, device):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    decode.backend = "torchvision"
    return decode


def checked_jpeg(source: ImageInput, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> EncodedJpeg | None:
    """``source`` as an :class:`EncodedJpeg` when the tensor path can decode it, else None (the exact path).

    Only the header is parsed: baseline or progressive JPEGs in RGB or grey, whole (ending in the
    end-of-image marker) and within the pixel limit. Anything else, including a file that cannot
    be read, is left to the exact path, which names the problem.
    """
    if isinstance(source, Image.Image):
        return None
    try:
        data = source.data if isinstance(source, EncodedImage) else Path(source).read_bytes()
    except (OSError, ValueError):
        return None
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in _TENSOR_MODES:
                return None
            w, h = img.size
    except Exception:  # whatever PIL makes of a bad header, the exact path reports it
        return None
    if w <= 0 or h <= 0 or w * h > max_pixels:
        return None
    return EncodedJpeg(data, label, w, h, source)


def resize_crop_normalise(x, size: int, round_pixels: bool = False, rounded_crop: bool = False):
    """B x 3 x H x W floats in [0, 1] to normalised B x 3 x size x size model input, differentiably.

    PIL's path in torch: bicubic with antialiasing (PIL's kernel) so that the shorter side is
    ``size`` and the longer side floored, width first, then height, the overshoot clipped to
    [0, 1] after each pass as PIL's 8-bit store does; centre crop at floor offsets (``rounded_crop``:
    rounded as torchvision's ``CenterCrop`` does, open_clip's transform); CLIP mean/std.
    ``round_pixels`` also rounds to 8 bits after each pass, as PIL does (straight-through: the
    gradient is the unrounded path's).
    """
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    new_w, new_h = resized_size(w, h, size)
    if new_w != w:
        x = F.interpolate(x, size=(h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = round_to_8_bits(x) if round_pixels else x
    if new_h != h:
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = round_to_8_bits(x) if round_pixels else x
    left, top = (rounded_crop_offsets if rounded_crop else crop_offsets)(new_w, new_h, size)
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def round_to_8_bits(x):
    """``round(255 x) / 255`` forward, identity backward."""
    return x + ((x * 255).round() / 255 - x).detach()


def decode_jpegs(items: list[EncodedJpeg], size: int, device, decode) -> list:
    """The model input (3 x size x size fp32 on ``device``) of each JPEG, or the :class:`ImageError` it raised.

    One batched call of ``decode`` (:func:`find_jpeg_decoder`) on ``device`` (nvJPEG on CUDA); a batch it refuses
    is retried image by image, and an image it still refuses goes the exact way (PIL on the
    host), so only a file that no path can read comes back as an error. Resized in torch with
    PIL's rounding after each pass, in groups of equal size.
    """
    import torch

    encoded = [torch.frombuffer(bytearray(it.data), dtype=torch.uint8) for it in items]
    try:
        decoded = decode(encoded, device)
    except RuntimeError:
        decoded = [_decode_one(decode, data, device) for data in encoded]
    out: list = [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (it, img) in enumerate(zip(items, decoded, strict=True)):
        if img is not None and tuple(img.shape) == (3, it.height, it.width):
            groups.setdefault((it.height, it.width), []).append(i)
        else:
            out[i] = _exact(it, size, device)
    for members in groups.values():
        for start in range(0, len(members), RESIZE_CHUNK):
            chunk = members[start:start + RESIZE_CHUNK]
            x = torch.stack([decoded[i] for i in chunk]).to(torch.float32).div_(255)
            for i, px in zip(chunk, resize_crop_normalise(x, size, round_pixels=True), strict=True):
                out[i] = px
    return out


def _decode_one(decode, data, device):
    try:
        return decode([data], device)[0]
    except RuntimeError:
        return None


def _exact(item: EncodedJpeg, size: int, device):
    try:
        return load_pixels(item.source, size).to(device)
    except ImageError as exc:
        return exc
    except Exception as exc:  # whatever else one file does to a decoder, it fails alone
        return ImageError(f"{item.label}: cannot read image ({type(exc).__name__}: {' '.join(str(exc).split())})")
