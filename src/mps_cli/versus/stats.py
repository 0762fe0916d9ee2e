"""The statistics of a versus: percentile bootstrap intervals over groups of pair outcomes, and Bradley-Terry
strengths by Zermelo's (Hunter's MM) iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_SAMPLES = 1000
DEFAULT_SEED = 0


def bootstrap_interval(outcomes: Sequence[Sequence[float]], samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean of ``outcomes``, resampling its groups.

    ``outcomes[g]`` are the pair outcomes (1, 0.5, 0) of group g. The same seed gives the same interval.
    """
    return bootstrap_intervals([outcomes], samples, seed, level)[0]


def bootstrap_intervals(per_dim: list[Sequence[Sequence[float]]], samples: int, seed: int, level: float
               ) -> list[tuple[float, float]]:
    # One set of resamples serves every dimension, so the dimensions' intervals are comparable.
    import numpy as np

    groups = len(per_dim[0])
    if groups == 0:
        return [(math.nan, math.nan)] * len(per_dim)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=samples).astype(np.float64)
    sizes = counts @ np.array([len(g) for g in per_dim[0]], dtype=np.float64)
    tail = (1.0 - level) / 2
    out = []
    for outcomes in per_dim:
        sums = np.array([math.fsum(g) for g in outcomes], dtype=np.float64)
        rates = (counts @ sums) / sizes
        lo, hi = np.quantile(rates, [tail, 1.0 - tail])
        out.append((float(lo), float(hi)))
    return out


def bradley_terry(wins, iterations: int = 10_000, tol: float = 1e-12):
    """Bradley-Terry strengths (summing to 1) from ``wins[i][j]``, the pairs side i won against j (ties as half).

    Zermelo's (Hunter's MM) iteration. One virtual tie is added between every two sides that met,
    so a side that won every pair still gets a finite strength; a side that met none gets 0.
    """
    import numpy as np

    w = np.asarray(wins, dtype=np.float64)
    met = (w + w.T) > 0
    w = w + 0.5 * met
    games = w + w.T
    total = w.sum(axis=1)
    active = met.any(axis=1)
    p = np.where(active, 1.0 / max(1, int(active.sum())), 0.0)
    for _ in range(iterations):
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = np.where(games > 0, games / (p[:, None] + p[None, :]), 0.0).sum(axis=1)
            new = np.where(active & (denom > 0), total / np.where(denom > 0, denom, 1.0), 0.0)
        new /= new.sum()
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return p


__all__ = ["DEFAULT_SAMPLES", "DEFAULT_SEED", "bootstrap_interval", "bootstrap_intervals", "bradley_terry"]
