"""Images and prompts into tensors, exactly as the original evaluation prepared them (CLIP preprocessing and BPE)."""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..constants import CONTEXT_LENGTH, EOT_ID, IMAGE_MEAN, IMAGE_STD, MAX_IMAGE_PIXELS, SOT_ID
from ..errors import ImageError


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (a tar member, a parquet cell) and the name messages use."""

    data: bytes
    filename: str


ImageInput = str | Path | Image.Image | EncodedImage

_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def open_image(source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, keep_mode: bool = False,
               draft: int | None = None) -> Image.Image:
    """Open and decode one image as RGB, refusing bombs before allocating pixels.

    With ``keep_mode`` the image keeps its own mode (RGBA, P, L, ...; 16-bit grey still comes down to 8 bits),
    for preprocessing rules that convert to RGB after resizing (see :mod:`mps_cli.engine.pixel_rules`).
    With ``draft`` (the model's image size; RGB only), a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that keeps it at least as large as its resized size and is resized to that
    size at once: the fast host path, within a few grey levels of the exact one. Other formats
    decode as always. Raises :class:`ImageError` naming the file and what is wrong with it.
    """
    if isinstance(source, Image.Image):
        return _eight_bit(source) if keep_mode else _to_rgb(source)
    if isinstance(source, EncodedImage):
        # Bytes decode exactly as the same file on disk would: same checks, same conversion.
        fp, path = io.BytesIO(source.data), None
        source = source.filename
    else:
        fp = path = Path(source)
    try:
        img = Image.open(fp)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise file_error(source, exc) from None
    except Image.DecompressionBombError:
        raise ImageError(f"{source}: image is too large to decode safely (decompression bomb?)") from None
    except ValueError as exc:
        # PIL refuses metadata that would inflate past its limits (an iTXt chunk of 50 MB).
        raise ImageError(f"{source}: image metadata too large to read safely ({exc})") from None
    except UnidentifiedImageError:
        size = fp.getbuffer().nbytes if path is None else path.stat().st_size if path.exists() else 0
        what = "empty file" if size == 0 else "not an image PIL can read"
        raise ImageError(f"{source}: {what}") from None
    except OSError as exc:
        raise ImageError(f"{source}: cannot open ({exc})") from None
    return _decode(img, str(source), max_pixels, keep_mode, draft)


def file_error(source: ImageInput, exc: OSError) -> ImageError:
    """The one-line error for an image file that cannot be opened at all."""
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{source}: no such file")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{source}: is a directory, not an image")
    if isinstance(exc, PermissionError):
        return ImageError(f"{source}: permission denied")
    return ImageError(f"{source}: cannot open ({exc})")


def open_image_bytes(data: bytes, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """:func:`open_image` for an encoded image held in memory (an upload); ``label`` names it in errors."""
    return open_image(EncodedImage(data, label), max_pixels)


#: Raw pixel arrays: channels (the last axis) to the PIL mode they are.
ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def image_from_array(data: bytes, shape, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A raw uint8 array, H x W x C (C 1, 3 or 4) in row-major order, as the PIL image it is; raises
    :class:`ImageError` for a shape that does not fit the bytes or is over the pixel limit (checked before
    any pixel is copied). Scored as the same pixels saved losslessly and decoded would be."""
    if (not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3)
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise ImageError(f"{label}: an array's shape is [height, width, channels], got {shape!r}")
    h, w, c = (*shape, 1) if len(shape) == 2 else shape
    if c not in ARRAY_MODES or h <= 0 or w <= 0:
        raise ImageError(f"{label}: an array's shape is [height, width, 1|3|4], got {list(shape)}")
    if h * w > max_pixels:
        limit = f"{max_pixels // 1_000_000} Mpx" if max_pixels >= 1_000_000 else f"{max_pixels} pixel"
        raise ImageError(f"{label}: {w}x{h} pixels is over the {limit} limit")
    if len(data) != h * w * c:
        raise ImageError(f"{label}: shape {list(shape)} needs {h * w * c} bytes of uint8, got {len(data)}")
    return Image.frombytes(ARRAY_MODES[c], (w, h), bytes(data))


def _decode(img: Image.Image, label: str, max_pixels: int, keep_mode: bool = False,
            draft: int | None = None) -> Image.Image:
    with img:
        w, h = img.size
        if w * h > max_pixels or w <= 0 or h <= 0:
            limit = f"{max_pixels // 1_000_000} Mpx" if max_pixels >= 1_000_000 else f"{max_pixels} pixel"
            raise ImageError(f"{label}: {w}x{h} pixels is over the {limit} limit; "
                             "refusing to decode (decompression bomb?)")
        try:
            img.seek(0)  # animated images: the first frame
            reduce = draft and not keep_mode and img.format == "JPEG"
            box = img.draft(img.mode, resized_size(w, h, draft)) if reduce else None
            img.load()
            if keep_mode:
                kept = _eight_bit(img)
                # Closing the file releases the decoded pixels too: keep a copy.
                return kept.copy() if kept is img else kept
            if box is not None:
                # The reduced image spans the original's box (its size rounds up): resize that box
                # to the exact target so the geometry, hence the crop, is the exact path's.
                return _to_rgb(img).resize(resized_size(w, h, draft), Image.Resampling.BICUBIC, box=box[1])
            return _to_rgb(img)
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: image is too large to decode safely (decompression bomb?)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ImageError(f"{label}: corrupt or truncated image ({detail})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    # Every mode but 16-bit grey goes through convert("RGB") as the original did.
    return _eight_bit(img).convert("RGB")


def _eight_bit(img: Image.Image) -> Image.Image:
    # PIL clips 16-bit grey to 0..255 on convert("RGB"), turning most pixels white; scale it down instead.
    if img.mode in _HIGH_BIT_MODES:
        return img.convert("I").point(lambda v: v / 256).convert("L")
    return img


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
    return normalized_tensor(resize_crop(img, size))


def pixel_array(img: Image.Image, size: int):
    """:func:`pixels_from_image` as a numpy array, for processes that decode and never import torch (Ray's
    CPU tasks: torch is 1.5 s of start-up and 300 MB per process)."""
    return normalized_array(resize_crop(img, size))


def normalized_array(img):
    """A cropped RGB image (or an H x W x 3 float32 array in [0, 1]) as the normalised ``3 x H x W`` float32
    array (C-contiguous)."""
    import numpy as np

    x = img if isinstance(img, np.ndarray) else np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGE_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGE_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def normalized_tensor(img):
    """:func:`normalized_array` as a torch tensor (sharing its memory)."""
    import torch

    return torch.from_numpy(normalized_array(img))


def load_pixels(source: ImageInput, size: int, draft: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode, convert and preprocess one image (``draft``: JPEGs the fast way); raises :class:`ImageError`."""
    return pixels_from_image(open_image(source, max_pixels, draft=size if draft else None), size)


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
                from .bpe import BPE

                cls._bpe = BPE()
            return cls._bpe

    def __call__(self, text: str) -> Tokens:
        body = self._body(text, self.context_length - 1)
        ids = [SOT_ID, *body, EOT_ID]
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[: self.context_length]
            ids[-1] = EOT_ID
        eot_index = len(ids) - 1
        ids += [EOT_ID] * (self.context_length - len(ids))
        return Tokens(ids=tuple(ids), eot_index=eot_index, truncated=truncated)

    def _body(self, text: str, enough: int) -> list[int]:
        """The BPE ids of ``text``, or at least its first ``enough`` of them, whichever is shorter.

        Only a prefix is encoded when that already gives ``enough`` ids, so a megabyte prompt
        costs what its first words cost. The prefix ends at whitespace, which no token spans,
        so its ids are exactly the first ids of the whole text; only a single word longer than
        :data:`_MAX_WORD` characters is cut inside (the full BPE of such a word is quadratic).
        """
        encode = self._encoder().encode
        n = 32 * enough
        while len(text) > n:
            cut = _WHITESPACE.search(text, n, n + _MAX_WORD)
            prefix = text[: cut.start() if cut else n + _MAX_WORD]
            body = encode(prefix)
            if len(body) >= enough:
                return body
            n *= 4
        return encode(text)


_WHITESPACE = re.compile(r"\s")
_MAX_WORD = 4096
