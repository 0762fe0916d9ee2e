"""Images and prompts into tensors, exactly as the original evaluation prepared them (mps-model.md §2)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from .constants import CONTEXT_LENGTH, EOT_ID, IMAGE_MEAN, IMAGE_STD, MAX_IMAGE_PIXELS, SOT_ID
from .errors import ImageError

ImageInput = Union[str, Path, Image.Image]

_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def open_image(source: ImageInput) -> Image.Image:
    """Open and decode one image as RGB, refusing bombs before allocating pixels.

    Raises :class:`ImageError` naming the file and what is wrong with it.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    path = Path(source)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{source}: permission denied") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{source}: image is too large to decode safely (decompression bomb?)") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        what = "empty file" if size == 0 else "not an image PIL can read"
        raise ImageError(f"{source}: {what}") from None
    except OSError as exc:
        raise ImageError(f"{source}: cannot open ({exc})") from None
    with img:
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS or w <= 0 or h <= 0:
            raise ImageError(
                f"{source}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS // 1_000_000} Mpx limit; "
                "refusing to decode (decompression bomb?)"
            )
        try:
            img.seek(0)  # animated images: the first frame
            img.load()
            return _to_rgb(img)
        except Image.DecompressionBombError:
            raise ImageError(f"{source}: image is too large to decode safely (decompression bomb?)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ImageError(f"{source}: corrupt or truncated image ({detail})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    # PIL clips 16-bit grey to 0..255 on convert("RGB"), turning most pixels white; scale it
    # down instead. Every other mode goes through convert("RGB") as the original did.
    if img.mode in _HIGH_BIT_MODES:
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side at ``size`` and the longer side floored."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre ``size`` square, rounded down as the original does."""
    return (w - size) // 2, (h - size) // 2


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic, long side floored), then a floor-offset centre crop."""
    w, h = img.size
    new_w, new_h = resized_size(w, h, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = crop_offsets(new_w, new_h, size)
    return img.crop((left, top, left + size, top + size))


def pixels_from_image(img: Image.Image, size: int):
    """A normalised float32 ``3 x size x size`` tensor from an RGB image.

    The arithmetic is numpy's, not torch's: this runs in decode threads beside the model,
    and a torch op there would start its own team of compute threads and crowd the model's.
    """
    import numpy as np
    import torch

    img = resize_crop(img, size)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGE_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_pixels(source: ImageInput, size: int):
    """Decode, convert and preprocess one image; raises :class:`ImageError`."""
    return pixels_from_image(open_image(source), size)


@dataclass(frozen=True)
class Tokens:
    """A prompt's 77 token ids (EOT-padded), where its EOT sits, and whether it was cut."""

    ids: tuple[int, ...]
    eot_index: int
    truncated: bool


class Tokenizer:
    """CLIP BPE with the original's layout: ``[SOT] text [EOT]``, cut at 77, padded with EOT."""

    _lock = threading.Lock()
    _bpe = None

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length

    @classmethod
    def _encoder(cls):
        with cls._lock:
            if cls._bpe is None:
                from open_clip.tokenizer import SimpleTokenizer

                cls._bpe = SimpleTokenizer()
            return cls._bpe

    def __call__(self, text: str) -> Tokens:
        body = self._encoder().encode(text)
        ids = [SOT_ID, *body, EOT_ID]
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[: self.context_length]
            ids[-1] = EOT_ID
        eot_index = len(ids) - 1
        ids += [EOT_ID] * (self.context_length - len(ids))
        return Tokens(ids=tuple(ids), eot_index=eot_index, truncated=truncated)
