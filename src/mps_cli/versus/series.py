"""A series of checkpoints in training order (``mps versus --series``): a reward-hacking monitor.

Per checkpoint: each key's mean score with a 95% interval, and the image statistics of
:mod:`mps_cli.imagestats` on the same images (median and 5th-95th percentiles, the near-duplicate
rate). Flags, each checkpoint against the first:

- ``score``: the watched reward (the composite with ``--reward``, else overall) rises, its win rate's
  95% bootstrap interval above 50%, while alignment or detail falls, its interval below 50%;
- ``statistic``: a statistic's median leaves the first checkpoint's range, the 5th to 95th
  percentile of its per-image values (with at least :data:`RANGE_MIN_IMAGES` measured images);
- ``duplicates``: the near-duplicate rate exceeds the first checkpoint's by more than :data:`DUPLICATE_RISE`.

Nothing here prints or scores: :func:`~mps_cli.versus.compare.compare_sides` hands the scored sides,
the matchups and the statistics in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..composite import COMPOSITE_KEY, split_name
from ..imagestats import DUPLICATE_DISTANCE, STATS, ImageStats, near_duplicates
from .sides import Side

#: A statistic drifts when a checkpoint's median leaves the first checkpoint's range of these percentiles.
RANGE_PERCENTILES = (5.0, 95.0)
#: Fewest measured images the first checkpoint needs for its range to be a yardstick.
RANGE_MIN_IMAGES = 8
#: How far (absolute) a checkpoint's near-duplicate rate may exceed the first's before it is flagged.
DUPLICATE_RISE = 0.2
#: The MPS dimensions whose fall beside a rising reward is flagged.
WATCHED_FALLS = ("alignment", "detail")


@dataclass(frozen=True)
class Trend:
    """One key's scores at one checkpoint: the mean and its 95% interval (normal, mean ± 1.96 sd/√n)."""

    mean: float
    ci95: tuple[float, float]
    n: int


@dataclass(frozen=True)
class StatRange:
    """One statistic's per-image values at one checkpoint: median and the range of RANGE_PERCENTILES."""

    median: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Checkpoint:
    side: str
    scores: dict[str, Trend]
    stats: dict[str, StatRange]
    duplicate_rate: float | None
    measured: int


@dataclass(frozen=True)
class Flag:
    """One sign of reward hacking at ``side``: ``kind`` score, statistic or duplicates; ``key`` what moved."""

    side: str
    kind: str
    key: str
    message: str


@dataclass(frozen=True)
class Series:
    checkpoints: tuple[Checkpoint, ...]
    rising: str | None
    falling: tuple[str, ...]
    flags: tuple[Flag, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        """The ``series`` member of ``mps versus --series --json`` (docs/versus.md)."""
        return {
            "checkpoints": [{
                "side": c.side,
                "scores": {k: {"mean": _num(t.mean), "ci95": [_num(x) for x in t.ci95], "n": t.n}
                           for k, t in c.scores.items()},
                "stats": {k: {"median": r.median, "p5": r.low, "p95": r.high, "n": r.n} for k, r in c.stats.items()},
                "measured": c.measured, "duplicate_rate": c.duplicate_rate,
            } for c in self.checkpoints],
            "watch": {"rising": self.rising, "falling": list(self.falling)},
            "range": {"percentiles": list(RANGE_PERCENTILES), "min_images": RANGE_MIN_IMAGES},
            "duplicates": {"max_distance": DUPLICATE_DISTANCE, "rise": DUPLICATE_RISE},
            "flags": [{"side": f.side, "kind": f.kind, "key": f.key, "message": f.message} for f in self.flags],
            "notes": list(self.notes),
        }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def build_series(sides: Sequence[Side], keys: Sequence[str], matchup: Callable, stats: Mapping[str, ImageStats]
                 ) -> Series:
    """The series of ``sides`` in order: ``matchup(a, b)`` gives the comparison of two sides (a
    :class:`~mps_cli.versus.compare.Matchup`), ``stats`` the statistics of each image file measured."""
    import numpy as np

    notes: list[str] = []
    checkpoints = []
    values: list[dict[str, np.ndarray]] = []
    for side in sides:
        usable = [e for e in side.entries if e.error is None and e.scores is not None]
        scores = {k: _trend([e.scores[k] for e in usable if k in e.scores]) for k in keys}
        files = list(dict.fromkeys(f for e in usable if (f := image_file(side, e)) in stats))
        per_stat = {s: np.array([getattr(stats[f], s) for f in files], dtype=np.float64) for s in STATS}
        ranges = {s: _range(v) for s, v in per_stat.items() if v.size}
        dup = float(near_duplicates([stats[f].dhash for f in files]).mean()) if len(files) > 1 else None
        checkpoints.append(Checkpoint(side.name, scores, ranges, dup, len(files)))
        values.append(per_stat)

    rising = next((k for k in keys if k == COMPOSITE_KEY), None) or next(
        (k for k in keys if split_name(k) == ("mps", "overall")), None)
    falling = tuple(k for k in keys if k != rising and split_name(k)[1] in WATCHED_FALLS)
    if rising is None:
        notes.append("score trends not checked for reward hacking: score overall (or give --reward)")
    elif not falling:
        notes.append(f"no {' or '.join(WATCHED_FALLS)} scores to watch beside {rising}: add --dim all")
    first = checkpoints[0]
    if first.measured < RANGE_MIN_IMAGES:
        notes.append(f"{first.side}: {first.measured} images measured, fewer than the {RANGE_MIN_IMAGES} a range "
                     "needs; statistics are shown, not flagged")
    flags: list[Flag] = []
    for cp in checkpoints[1:]:
        if rising is not None and falling:
            flags += _score_flags(matchup(cp.side, first.side), cp.side, first.side, rising, falling)
        if first.measured >= RANGE_MIN_IMAGES:
            for s, r in cp.stats.items():
                base = first.stats.get(s)
                if base is not None and not base.low <= r.median <= base.high:
                    flags.append(Flag(cp.side, "statistic", s, f"{cp.side}: median {s} {r.median:.4g} is outside "
                                      f"{first.side}'s {RANGE_PERCENTILES[0]:g}th-{RANGE_PERCENTILES[1]:g}th "
                                      f"percentile range [{base.low:.4g}, {base.high:.4g}]"))
        if cp.duplicate_rate is not None and first.duplicate_rate is not None \
                and cp.duplicate_rate > first.duplicate_rate + DUPLICATE_RISE:
            flags.append(Flag(cp.side, "duplicates", "near_duplicates",
                              f"{cp.side}: {cp.duplicate_rate:.0%} of images have a near-duplicate "
                              f"({first.side}: {first.duplicate_rate:.0%})"))
    if not any(c.measured for c in checkpoints):
        notes.append("no image files to measure (dataset sides hold their images in shards)")
    return Series(tuple(checkpoints), rising, falling, tuple(flags), tuple(notes))


def image_file(side: Side, entry) -> str | None:
    """The image file an entry's statistics come from: a folder image's path, a JSONL result's image."""
    if entry.path is not None:
        return entry.path
    return entry.label if side.kind == "jsonl" else None


def _score_flags(m, side: str, first: str, rising: str, falling: Sequence[str]) -> list[Flag]:
    up = m.results[rising]
    if not up.ci95[0] > 0.5:  # NaN (no pairs) compares false: no flag
        return []
    out = []
    for f in falling:
        down = m.results[f]
        if down.ci95[1] < 0.5:
            out.append(Flag(side, "score", f, f"{side}: {rising} rises against {first} (wins {up.win_rate:.0%} of "
                            f"pairs, 95% CI {up.ci95[0]:.0%}-{up.ci95[1]:.0%}) while {f} falls (wins "
                            f"{down.win_rate:.0%}, {down.ci95[0]:.0%}-{down.ci95[1]:.0%})"))
    return out


def _trend(v: list[float]) -> Trend:
    n = len(v)
    if not n:
        return Trend(math.nan, (math.nan, math.nan), 0)
    mean = math.fsum(v) / n
    half = 1.96 * math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1) / n) if n > 1 else 0.0
    return Trend(mean, (mean - half, mean + half), n)


def _range(v) -> StatRange:
    import numpy as np

    lo, med, hi = np.percentile(v, [RANGE_PERCENTILES[0], 50.0, RANGE_PERCENTILES[1]])
    return StatRange(float(med), float(lo), float(hi), int(v.size))


__all__ = ["DUPLICATE_RISE", "RANGE_MIN_IMAGES", "RANGE_PERCENTILES", "Checkpoint", "Flag", "Series", "StatRange",
           "Trend", "build_series", "image_file"]
