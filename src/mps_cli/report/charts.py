"""The geometry of the report's SVG charts, as numbers for the templates (which hold the markup)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .results import is_number


@dataclass(frozen=True)
class HistogramBar:
    x: float
    y: float
    width: float
    height: float
    lo: float  # the bin's score range
    hi: float
    count: int


@dataclass(frozen=True)
class Histogram:
    """One dimension's scores binned on a ``width`` x ``height`` canvas; ``left``/``right``/``top``/``base`` frame
    the plot, ``lo``/``hi`` are the score range, ``median_x`` where the median's line goes."""

    dim: str
    n: int
    mean: float
    sd: float
    median: float
    lo: float
    hi: float
    bars: tuple[HistogramBar, ...]
    median_x: float
    width: int = 320
    height: int = 118
    left: int = 8
    top: int = 6
    bottom: int = 24

    @property
    def right(self) -> int:
        return self.width - self.left

    @property
    def base(self) -> int:
        return self.height - self.bottom


def histogram(dim: str, values) -> Histogram | None:
    """The histogram of the finite ``values`` (None when there are none): sqrt(n) bins, 8 to 40."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    frame = Histogram(dim, 0, 0.0, 0.0, 0.0, 0.0, 0.0, (), 0.0)
    bins = int(min(40, max(8, math.sqrt(v.size))))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    tallest = counts.max() or 1
    plot_w, plot_h = frame.width - 2 * frame.left, frame.base - frame.top
    bw = plot_w / bins
    bars = tuple(HistogramBar(x=frame.left + i * bw + 0.5, y=frame.top + plot_h * (1 - c / tallest),
                              width=max(bw - 1, 0.5), height=plot_h * c / tallest, lo=float(edges[i]),
                              hi=float(edges[i + 1]), count=int(c)) for i, c in enumerate(counts))
    median = float(np.median(v))
    return Histogram(dim=dim, n=int(v.size), mean=float(v.mean()), sd=float(v.std()), median=median, lo=lo, hi=hi,
                     bars=bars, median_x=frame.left + plot_w * (median - lo) / (hi - lo))


@dataclass(frozen=True)
class GridLine:
    x: float
    label: str
    half: bool  # the 50% line


@dataclass(frozen=True)
class WinRateRow:
    """One dimension: ``side`` is a (the interval is above 50%), b (below) or even."""

    dim: str
    side: str
    y: float
    lo_x: float
    hi_x: float
    rate_x: float
    text: str

    @property
    def ci_width(self) -> float:
        return max(self.hi_x - self.lo_x, 1)


@dataclass(frozen=True)
class WinRateChart:
    rows: tuple[WinRateRow, ...]
    grid: tuple[GridLine, ...]
    width: int
    height: int
    grid_top: int
    grid_bottom: int
    label_y: int
    dim_x: int
    value_x: int


_LABEL_W, _PLOT_W, _RIGHT_W, _ROW_H, _TOP_PAD = 110, 400, 250, 34, 26


def winrate_chart(results: dict[str, dict]) -> WinRateChart | None:
    """The chart of A's win rate per dimension, with its interval and mean difference (None: no win rate)."""
    rows = [(d, r) for d, r in results.items() if is_number(r.get("win_rate"))]
    if not rows:
        return None
    height = _TOP_PAD + _ROW_H * len(rows) + 10

    def x(p: float) -> float:
        return _LABEL_W + _PLOT_W * min(max(p, 0.0), 1.0)

    drawn = []
    for i, (d, r) in enumerate(rows):
        wr = float(r["win_rate"])
        ci = r.get("ci95") if isinstance(r.get("ci95"), (list, tuple)) and len(r["ci95"]) == 2 else None
        lo, hi = (float(ci[0]), float(ci[1])) if ci and all(is_number(c) for c in ci) else (wr, wr)
        diff = r.get("mean_diff")
        text = f"{wr:.1%}" + (f" [{lo:.1%}, {hi:.1%}]" if ci else "") + (f"  Δ {diff:+.3f}" if is_number(diff) else "")
        drawn.append(WinRateRow(dim=d, side="a" if lo > 0.5 else "b" if hi < 0.5 else "even",
                                y=_TOP_PAD + _ROW_H * i + _ROW_H / 2, lo_x=x(lo), hi_x=x(hi), rate_x=x(wr), text=text))
    grid = tuple(GridLine(x(t), f"{t:.0%}", t == 0.5) for t in (0, 0.25, 0.5, 0.75, 1))
    return WinRateChart(rows=tuple(drawn), grid=grid, width=_LABEL_W + _PLOT_W + _RIGHT_W, height=height,
                        grid_top=_TOP_PAD - 6, grid_bottom=height - 8, label_y=_TOP_PAD - 10, dim_x=_LABEL_W - 10,
                        value_x=_LABEL_W + _PLOT_W + 12)


@dataclass(frozen=True)
class TrendPoint:
    """One checkpoint on a trend panel: where its value and interval go, and whether it was flagged."""

    x: float
    y: float
    lo_y: float
    hi_y: float
    label: str  # the checkpoint's number, 1 first
    text: str  # the hover text: checkpoint, value, interval
    flagged: bool


@dataclass(frozen=True)
class TrendPanel:
    """One key's or statistic's value per checkpoint, in order, on a ``width`` x ``height`` canvas; ``band`` is
    the first checkpoint's range (top and bottom y) where there is one."""

    title: str
    points: tuple[TrendPoint, ...]
    band: tuple[float, float] | None
    y_top: str  # the axis' labels: the largest and the smallest value drawn
    y_bottom: str
    width: int = 260
    height: int = 132
    left: int = 54
    right: int = 252
    top: int = 10
    base: int = 108

    @property
    def line(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)

    @property
    def band_height(self) -> float:
        return max(self.band[1] - self.band[0], 1.0) if self.band else 0.0


def trend_panel(title: str, sides: list[str], values: list[tuple[float, float, float] | None],
                band: tuple[float, float] | None = None, flagged: frozenset[int] = frozenset()) -> TrendPanel | None:
    """The panel of ``values`` ((value, low, high) per checkpoint, None where there is none), with the first
    checkpoint's ``band`` (low, high) shaded; None when no checkpoint has a value."""
    frame = TrendPanel(title, (), None, "", "")
    drawn = [(i, v) for i, v in enumerate(values) if v is not None and all(math.isfinite(x) for x in v)]
    if not drawn:
        return None
    span = [x for _, v in drawn for x in v] + (list(band) if band else [])
    lo, hi = min(span), max(span)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return frame.base - (frame.base - frame.top) * (v - lo) / (hi - lo)

    n = len(values)
    step = (frame.right - frame.left - 16) / max(n - 1, 1)
    points = tuple(TrendPoint(x=frame.left + 8 + step * i if n > 1 else (frame.left + frame.right) / 2, y=y(v[0]),
                              lo_y=y(v[1]), hi_y=y(v[2]), label=str(i + 1),
                              text=f"{i + 1}. {sides[i]}: {v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]", flagged=i in flagged)
                   for i, v in drawn)
    return TrendPanel(title, points, (y(band[1]), y(band[0])) if band else None, f"{hi - pad:.3g}", f"{lo + pad:.3g}")


__all__ = ["GridLine", "Histogram", "HistogramBar", "TrendPanel", "TrendPoint", "WinRateChart", "WinRateRow",
           "histogram", "trend_panel", "winrate_chart"]
