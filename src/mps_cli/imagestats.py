"""Simple image statistics for watching reward hacking: what a reward can push up while images get worse.

Per image, in numpy on the decoded pixels (reduced first so the shorter side is at most
:data:`STATS_SIZE`, so that the numbers do not depend on the resolution a checkpoint renders at):

- ``colourfulness``: Hasler and Süsstrunk's M (2003) on 0-255 RGB: with ``rg = R - G`` and
  ``yb = (R + G) / 2 - B``, ``M = sqrt(sd(rg)² + sd(yb)²) + 0.3 sqrt(mean(rg)² + mean(yb)²)``;
- ``saturation``: the mean HSV saturation ``(max - min) / max`` of the pixels (0 for black), in [0, 1];
- ``high_frequency``: the share of the luma's spectral power (mean removed, Hann-windowed, 2-D FFT)
  at spatial frequencies above a quarter cycle per pixel, in [0, 1]: repeated fine textures and
  over-sharpening raise it;
- ``brightness``: the mean luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B), in [0, 1];
- ``dhash``: a 64-bit difference hash (9 x 8 grey thumbnail, one bit per horizontally adjacent pair),
  for the near-duplicate rate: images within :data:`DUPLICATE_DISTANCE` bits of another.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The per-image statistics, in the order reports show them.
STATS: tuple[str, ...] = ("colourfulness", "saturation", "high_frequency", "brightness")
#: Bumped whenever a definition above changes: it keys the statistics kept in the score cache.
STATS_VERSION = 1
#: Images are reduced (box filter) so that their shorter side is at most this before measuring.
STATS_SIZE = 256
#: Spatial frequency (cycles per pixel, of at most 0.5 per axis) above which power counts as high.
HIGH_FREQUENCY_CUTOFF = 0.25
#: Two images whose dHashes differ in at most this many of 64 bits are near-duplicates.
DUPLICATE_DISTANCE = 6


# Set bits per byte value (numpy's own bit count needs numpy 2).
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class ImageStats:
    """One image's statistics (see the module's docstring for each definition)."""

    colourfulness: float
    saturation: float
    high_frequency: float
    brightness: float
    dhash: int

    def values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in STATS}


def measure(img) -> ImageStats:
    """The statistics of a decoded PIL image (any mode; measured as RGB)."""
    from PIL import Image

    rgb = img.convert("RGB")
    w, h = rgb.size
    scale = STATS_SIZE / min(w, h)
    if scale < 1:
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    px = np.asarray(rgb, dtype=np.float64)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    hi, lo = px.max(axis=-1), px.min(axis=-1)
    saturation = float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)))
    luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
    return ImageStats(colourfulness=colourfulness, saturation=saturation, high_frequency=_high_share(luma),
                      brightness=float(luma.mean()), dhash=dhash(rgb))


def _high_share(luma: np.ndarray) -> float:
    h, w = luma.shape
    if h < 2 or w < 2:
        return 0.0
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((luma - luma.mean()) * window)) ** 2
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    total = float(power[radius > 0].sum())
    return float(power[radius > HIGH_FREQUENCY_CUTOFF].sum()) / total if total > 0 else 0.0


def dhash(img) -> int:
    """The 64-bit difference hash of a PIL image: bit i is set where pixel i of a 9 x 8 grey thumbnail is
    brighter than its right-hand neighbour."""
    from PIL import Image

    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, :-1] > small[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def near_duplicates(hashes: Sequence[int], max_distance: int = DUPLICATE_DISTANCE) -> np.ndarray:
    """Per image, whether another image's hash is within ``max_distance`` bits of its own (booleans)."""
    n = len(hashes)
    if n < 2:
        return np.zeros(n, dtype=bool)
    h = np.asarray([x & (2**64 - 1) for x in hashes], dtype=np.uint64)
    out = np.zeros(n, dtype=bool)
    for start in range(0, n, 1024):  # blocks keep the n x n table's memory bounded
        block = h[start:start + 1024, None] ^ h[None, :]
        close = _POPCOUNT[block.view(np.uint8)].reshape(*block.shape, 8).sum(axis=-1) <= max_distance
        close[np.arange(close.shape[0]), np.arange(start, start + close.shape[0])] = False  # not itself
        out[start:start + 1024] = close.any(axis=1)
    return out


__all__ = ["DUPLICATE_DISTANCE", "STATS", "STATS_SIZE", "STATS_VERSION", "ImageStats", "dhash", "measure",
           "near_duplicates"]
