"""Comparing sides: per dimension, A's win rate over all pairs (a pair's outcome is 1 when A scores higher,
0.5 for a tie, 0 when B does), the mean score difference A - B, and a 95% bootstrap interval that resamples
prompts (pairs of one prompt are not independent), or pairs when there is a single prompt. With more
than two sides: every pairwise comparison, and a Bradley-Terry ranking.

Folder images are scored through :func:`mps_cli.scorecache.score_cached`, the cache ``mps eval``
uses. Nothing here prints; problems (unpaired images, failed images) go into the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ..composite import COMPOSITE_KEY, Composite
from ..constants import DEFAULT_MASK_THRESHOLD
from .series import Series
from .sides import ALL_PAIRS, BY_NAME, Entry, Failure, Lineup, Side, SideError
from .stats import DEFAULT_SAMPLES, DEFAULT_SEED, bootstrap_intervals, bradley_terry


def _num(x: float) -> float | None:
    """JSON has no NaN: a statistic over no pairs is null."""
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class DimResult:
    """One dimension of A against B. ``win_rate`` is in [0, 1]; ties count half."""

    win_rate: float
    ci95: tuple[float, float]
    mean_diff: float
    wins: int
    ties: int
    losses: int

    def mirrored(self) -> DimResult:
        """The same comparison seen from B."""
        lo, hi = self.ci95
        return DimResult(1.0 - self.win_rate, (1.0 - hi, 1.0 - lo), -self.mean_diff, self.losses, self.ties, self.wins)

    def to_dict(self) -> dict:
        return {"win_rate": _num(self.win_rate), "ci95": [_num(x) for x in self.ci95],
                "mean_diff": _num(self.mean_diff), "wins": self.wins, "ties": self.ties, "losses": self.losses}


@dataclass(frozen=True)
class PromptResult:
    """One prompt of a matchup: its pairs, and per dimension A's win rate and mean difference on them."""

    prompt: str
    pairs: int
    a_images: tuple[str, ...]
    b_images: tuple[str, ...]
    win_rate: dict[str, float]
    mean_diff: dict[str, float]
    a_scores: tuple[dict[str, float], ...] = ()  # per image of a_images, its scores
    b_scores: tuple[dict[str, float], ...] = ()

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "pairs": self.pairs, "a_images": list(self.a_images),
                "b_images": list(self.b_images), "a_scores": [dict(x) for x in self.a_scores],
                "b_scores": [dict(x) for x in self.b_scores],
                "results": {k: {"win_rate": self.win_rate[k], "mean_diff": self.mean_diff[k]} for k in self.win_rate}}


@dataclass(frozen=True)
class Matchup:
    """Side ``a`` against side ``b``. ``unit`` says what the bootstrap resampled: prompt, or pair
    when all pairs share one prompt. ``per_prompt`` is ordered best prompt for A first (by the
    first dimension's mean difference)."""

    a: str
    b: str
    prompts: int
    pairs: int
    unpaired: dict[str, list[str]]
    results: dict[str, DimResult]
    per_prompt: tuple[PromptResult, ...]
    unit: str


@dataclass(frozen=True)
class Strength:
    """A side's Bradley-Terry strength (strengths sum to 1; P(i beats j) = s_i / (s_i + s_j))."""

    side: str
    strength: float


@dataclass(frozen=True)
class VersusReport:
    """Everything ``mps versus`` prints. ``matchups``: one per pair of sides, in argument order."""

    sides: tuple[str, ...]
    keys: tuple[str, ...]
    matchups: tuple[Matchup, ...]
    unpaired: dict[str, list[str]]
    missing: dict[str, list[str]]
    failed: tuple[Failure, ...]
    ranking: dict[str, list[Strength]]
    samples: int
    seed: int
    scored: int
    cached: int
    weights: str | None  # None when nothing was scored (every side pre-scored)
    weights_identity: str | None
    dtype: str | None
    mask_threshold: float
    reward: str | None = None  # the composite's spelling; its values are the key ``composite``
    series: Series | None = None
    pairing: str = BY_NAME

    @property
    def ok(self) -> bool:
        """True when every image took part: nothing unpaired, missing or failed."""
        return not (any(self.unpaired.values()) or any(self.missing.values()) or self.failed)

    def matchup(self, a: str, b: str) -> Matchup:
        """``a`` against ``b`` (either order)."""
        for m in self.matchups:
            if (m.a, m.b) == (a, b):
                return m
            if (m.a, m.b) == (b, a):
                return _mirror(m)
        raise KeyError(f"no matchup {a!r} against {b!r}")

    def to_dict(self, details: bool = False) -> dict:
        """The ``mps versus --json`` document (see README); ``details`` adds the per-prompt results."""
        common = {
            "pairing": self.pairing,
            "unpaired": {s: list(v) for s, v in self.unpaired.items()},
            "missing": {s: list(v) for s, v in self.missing.items()},
            "failed": [{"side": f.side, "image": f.image, "error": f.error} for f in self.failed],
            "bootstrap": {"samples": self.samples, "seed": self.seed},
            "scored": self.scored, "cached": self.cached,
            "weights": self.weights, "weights_identity": self.weights_identity, "dtype": self.dtype,
            "mask_threshold": self.mask_threshold,
            **({"reward": self.reward} if self.reward is not None else {}),
            **({"series": self.series.to_dict()} if self.series is not None else {}),
        }
        if len(self.sides) == 2:
            m = self.matchups[0]
            doc = {"a": m.a, "b": m.b, "prompts": m.prompts, "pairs": m.pairs, **common,
                   "results": {k: r.to_dict() for k, r in m.results.items()}}
            doc["bootstrap"]["unit"] = m.unit
            if details:
                doc["per_prompt"] = [p.to_dict() for p in m.per_prompt]
            return doc
        matrix: dict[str, dict] = {k: {s: {} for s in self.sides} for k in self.keys}
        for m in self.matchups:
            for k in self.keys:
                for x, y, r in ((m.a, m.b, m.results[k]), (m.b, m.a, m.results[k].mirrored())):
                    matrix[k][x][y] = {**r.to_dict(), "prompts": m.prompts, "pairs": m.pairs, "unit": m.unit}
        doc = {"sides": list(self.sides), "prompts": len({p.prompt for m in self.matchups for p in m.per_prompt}),
               "pairs": sum(m.pairs for m in self.matchups), **common, "matrix": matrix,
               "ranking": {k: [{"side": s.side, "strength": s.strength} for s in v] for k, v in self.ranking.items()}}
        if details:
            doc["per_prompt"] = [{"a": m.a, "b": m.b, "prompts": [p.to_dict() for p in m.per_prompt]}
                                 for m in self.matchups]
        return doc


class NoNamesMatch(SideError):
    """Pairing by name found no image of side ``a`` named like one of side ``b``, though they share prompts."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.what = f"{a} and {b} share prompts but no image name (path without extension)"
        super().__init__(f"{self.what}: pairing {BY_NAME} compares nothing; pair every image of a prompt "
                         f"with {ALL_PAIRS}")


def _pair_up(a: Side, b: Side, by_prompt: bool, keys: Sequence[str], first: str,
             samples: int, seed: int) -> Matchup:
    def usable(side: Side) -> dict[str, dict[str, list[Entry]]]:
        out: dict[str, dict[str, list[Entry]]] = {}
        for e in side.entries:
            if e.error is None and e.scores is not None:
                out.setdefault(e.prompt, {}).setdefault("" if by_prompt else e.key, []).append(e)
        return out

    ua, ub = usable(a), usable(b)
    unpaired: dict[str, list[str]] = {a.name: [], b.name: []}
    groups: list[tuple[str, list[tuple[Entry, Entry]]]] = []
    for prompt in dict.fromkeys([*ua, *ub]):
        ga, gb = ua.get(prompt, {}), ub.get(prompt, {})
        pairs = []
        for key in dict.fromkeys([*ga, *gb]):
            ea, eb = ga.get(key, []), gb.get(key, [])
            if ea and eb:
                pairs.extend((x, y) for x in ea for y in eb)
            else:
                unpaired[a.name].extend(e.label for e in ea)
                unpaired[b.name].extend(e.label for e in eb)
        if pairs:
            groups.append((prompt, pairs))

    def outcome(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    # One prompt gives no prompt-to-prompt variation to resample: then pairs are the units.
    unit = "prompt" if len(groups) > 1 else "pair"
    units = [pairs for _, pairs in groups] if unit == "prompt" else [[p] for _, pairs in groups for p in pairs]
    outcomes = {k: [[outcome(x.scores[k], y.scores[k]) for x, y in u] for u in units] for k in keys}
    intervals = dict(zip(keys, bootstrap_intervals([outcomes[k] for k in keys], samples, seed, 0.95), strict=True))
    results = {}
    all_pairs = [p for _, pairs in groups for p in pairs]
    for k in keys:
        flat = [o for u in outcomes[k] for o in u]
        n = len(flat)
        results[k] = DimResult(
            win_rate=math.fsum(flat) / n if n else math.nan, ci95=intervals[k],
            mean_diff=math.fsum(x.scores[k] - y.scores[k] for x, y in all_pairs) / n if n else math.nan,
            wins=sum(o == 1.0 for o in flat), ties=sum(o == 0.5 for o in flat), losses=sum(o == 0.0 for o in flat))
    per_prompt = []
    for prompt, pairs in groups:
        xs, ys = dict((x.label, x.scores) for x, _ in pairs), dict((y.label, y.scores) for _, y in pairs)
        per_prompt.append(PromptResult(
            prompt=prompt, pairs=len(pairs), a_images=tuple(xs), b_images=tuple(ys),
            win_rate={k: math.fsum(outcome(x.scores[k], y.scores[k]) for x, y in pairs) / len(pairs) for k in keys},
            mean_diff={k: math.fsum(x.scores[k] - y.scores[k] for x, y in pairs) / len(pairs) for k in keys},
            a_scores=tuple({k: v[k] for k in keys} for v in xs.values()),
            b_scores=tuple({k: v[k] for k in keys} for v in ys.values())))
    per_prompt.sort(key=lambda p: -p.mean_diff[first])
    return Matchup(a.name, b.name, len(groups), len(all_pairs), unpaired, results, tuple(per_prompt), unit)


def _mirror(m: Matchup) -> Matchup:
    per_prompt = tuple(PromptResult(p.prompt, p.pairs, p.b_images, p.a_images,
                                    {k: 1.0 - v for k, v in p.win_rate.items()},
                                    {k: -v for k, v in p.mean_diff.items()}, p.b_scores, p.a_scores)
                       for p in reversed(m.per_prompt))
    return Matchup(m.b, m.a, m.prompts, m.pairs, m.unpaired, {k: r.mirrored() for k, r in m.results.items()},
                   per_prompt, m.unit)


def _flag_repeats(side: Side, by_prompt: bool) -> Side:
    """Within one side and one prompt, an image listed twice counts once (the repeat is an error), and,
    pairing by name, images that pair under one name (``a.png``, ``a.jpg``) pair with nothing: which
    one is meant is unknown. Each such entry becomes an error naming the other."""
    seen: set[tuple] = set()
    out: list[Entry] = []
    for e in side.entries:
        if e.error is None and (e.prompt, e.label) in seen:
            e = replace(e, scores=None, error=f"{e.label}: listed twice under one prompt ({_short(e.prompt)!r}); "
                                              "it counts once: remove the repeat")
        elif e.error is None:
            seen.add((e.prompt, e.label))
        out.append(e)
    if not by_prompt:
        groups: dict[tuple, list[Entry]] = {}
        for e in out:
            if e.error is None:
                groups.setdefault((e.prompt, e.key), []).append(e)
        clash = {id(e): g for g in groups.values() if len(g) > 1 for e in g}
        out = [replace(e, scores=None, error=f"{e.label}: pairs under the name {e.key!r}, as "
                                             f"{', '.join(o.label for o in clash[id(e)] if o is not e)} does; "
                                             "rename one so that each name is one image")
               if id(e) in clash else e for e in out]
    return replace(side, entries=tuple(out))


def _short(text: str | None, n: int = 60) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_prescored(side: Side, keys: Sequence[str]) -> None:
    for e in side.entries:
        if e.error is None and e.scores is not None:
            lacking = [k for k in keys if k not in e.scores]
            if lacking:
                have = ", ".join(e.scores) or "none"
                raise SideError(f"{side.name}: no {', '.join(repr(k) for k in lacking)} scores in it (it has {have}); "
                                "score it again with those dimensions or ask for the ones it has")


def _check_settings(sides: Sequence[Side], texts: dict[str, str], threshold: float, weights: str | None,
                    dtype: str | None) -> None:
    # Scores made under other settings are not comparable; a dataset manifest says what they were made with.
    for side in sides:
        st = side.settings or {}
        conditions = st.get("conditions") if isinstance(st.get("conditions"), dict) else {}
        wrong = [f"condition {k!r} {conditions[k]!r}" for k in texts if k in conditions and conditions[k] != texts[k]]
        if st.get("mask_threshold") is not None and float(st["mask_threshold"]) != threshold:
            wrong.append(f"mask threshold {st['mask_threshold']} (this run: {threshold})")
        if weights is not None and st.get("weights") not in (None, weights):
            wrong.append(f"weights {st['weights']} (this run: {weights})")
        if dtype is not None and st.get("dtype") not in (None, dtype):
            wrong.append(f"dtype {st['dtype']} (this run: {dtype})")
        if wrong:
            raise SideError(f"{side.name}: scored with {'; '.join(wrong)}; its scores do not compare with these")
        weights = weights if weights is not None else st.get("weights")
        dtype = dtype if dtype is not None else st.get("dtype")


def compare_sides(lineup: Lineup, scorer=None, dims: Iterable[str] | None = None, *, condition: str | None = None,
                  mask_threshold: float = DEFAULT_MASK_THRESHOLD, cache=None, batch_size: int | None = None,
                  samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                  progress: Callable[[str, int, int], None] | None = None, models=None, reward: str | None = None,
                  series: bool = False) -> VersusReport:
    """Score what needs scoring (through ``cache``, a :class:`~mps_cli.scorecache.ScoreCache`) and compare every
    two sides. ``scorer`` may be None when every side is pre-scored. ``models``: compare by the keys of
    several models (:func:`~mps_cli.engine.panel.keyed_conditions`). ``reward``: a composite expression
    (:mod:`mps_cli.composite`), compared as the key ``composite`` beside the scores it names. ``series``: the
    sides are checkpoints in training order; the report's ``series`` watches them for reward hacking
    (:mod:`.series`)."""
    from ..engine.scorer import check_mask_threshold

    keys, texts, composite = _keys(reward, models, dims, condition)
    threshold = check_mask_threshold(mask_threshold)
    if len(lineup.sides) < 2:
        raise ValueError("versus needs at least two sides")
    if samples < 1:
        raise ValueError("the bootstrap needs at least one sample")
    for side in lineup.sides:
        if side.prescored:
            _check_prescored(side, keys)
    sides = [_flag_repeats(s, lineup.by_prompt) for s in lineup.sides]
    sides, scored, cached, weights, identity, dtype = _scored(lineup, sides, scorer, keys, texts, condition,
                                                              threshold, cache, batch_size, progress)
    failed = list(lineup.failed)
    for side in sides:
        failed.extend(Failure(side.name, e.label, e.error) for e in side.entries if e.error is not None)
    if composite is not None:
        sides = [_with_composite(s, composite) for s in sides]
        keys.append(COMPOSITE_KEY)
    matchups = [_pair_up(sides[i], sides[j], lineup.by_prompt, keys, keys[0], samples, seed)
                for i in range(len(sides)) for j in range(i + 1, len(sides))]
    if not lineup.by_prompt:
        _check_names_match(sides, matchups, keys)
    report = VersusReport(
        sides=tuple(s.name for s in sides), keys=tuple(keys), matchups=tuple(matchups),
        unpaired=_unpaired(sides, lineup, matchups),
        missing={s: list(v) for s, v in lineup.missing.items()}, failed=tuple(failed),
        ranking=_ranking(sides, matchups, keys) if len(sides) > 2 else {}, samples=samples, seed=seed,
        scored=scored, cached=cached, weights=weights, weights_identity=identity, dtype=dtype,
        mask_threshold=threshold, reward=composite.spelling if composite is not None else None,
        pairing=lineup.pairing)
    if series:
        report = replace(report, series=_series(sides, keys, report, cache, progress))
    return report


def _keys(reward: str | None, models, dims, condition) -> tuple[list[str], dict[str, str], Composite | None]:
    """The keys compared, their condition texts, and the composite bound to them (None without ``reward``)."""
    from ..composite import parse_composite
    from ..engine.panel import keyed_conditions

    composite = None
    if reward is not None:
        composite = parse_composite(reward)
        names = None if not models else [m.partition("=")[0] for m in
                                         (models.split(",") if isinstance(models, str) else models)]
        wanted, dims = composite.request(names, dims, condition)
        models = models or wanted
    conditions = keyed_conditions(models, dims, condition)
    keys = [k for k, _ in conditions]
    return keys, dict(conditions), composite.bind(keys) if composite is not None else None


def _scored(lineup: Lineup, sides: list[Side], scorer, keys, texts, condition, threshold, cache, batch_size,
            progress) -> tuple[list[Side], int, int, str | None, str | None, str | None]:
    """The sides with folder images scored, after checking pre-scored settings against this run's; also how
    many were scored and served from cache, and the weights, their identity and dtype (None when none scored)."""
    from ..scorecache import cache_identity

    weights = identity = dtype = None
    if lineup.needs_scoring:
        if scorer is None:
            raise ValueError("folder sides need a scorer")
        weights = scorer.weights
        identity, dtype = cache_identity(scorer)
    _check_settings(sides, texts, threshold, identity, dtype)
    if not lineup.needs_scoring:
        return sides, 0, 0, weights, identity, dtype
    sides, scored, cached = _score_folders(sides, scorer, keys, texts, condition, threshold, cache, batch_size,
                                           progress)
    return sides, scored, cached, weights, identity, dtype


def _check_names_match(sides: Sequence[Side], matchups: Sequence[Matchup], keys: Sequence[str]) -> None:
    # Folders rendered with other file names share prompts but no names: by name that is "nothing to compare",
    # which hides that the other pairing would compare them. One empty matchup among others is only reported.
    if any(m.pairs for m in matchups):
        return
    index = {s.name: s for s in sides}
    for m in matchups:
        if _pair_up(index[m.a], index[m.b], True, keys, keys[0], 1, 0).pairs:
            raise NoNamesMatch(m.a, m.b)


def _unpaired(sides: Sequence[Side], lineup: Lineup, matchups: Sequence[Matchup]) -> dict[str, list[str]]:
    """Per side, the images not compared: unlisted by the prompts file or without a counterpart somewhere."""
    unpaired: dict[str, list[str]] = {}
    for side in sides:
        seen = list(lineup.unlisted.get(side.name, []))
        for m in matchups:
            seen.extend(m.unpaired.get(side.name, []))
        unpaired[side.name] = list(dict.fromkeys(seen))
    return unpaired


def _with_composite(side: Side, composite: Composite) -> Side:
    """The side with every scored entry's composite among its scores (key ``composite``)."""
    def add(e: Entry) -> Entry:
        if e.error is not None or e.scores is None:
            return e
        return replace(e, scores={**e.scores, COMPOSITE_KEY: float(composite.value(e.scores))})

    return replace(side, entries=tuple(add(e) for e in side.entries))


def _series(sides: list[Side], keys: list[str], report: VersusReport, cache, progress) -> Series:
    """The sides as a series of checkpoints, their images measured through the cache (each file once ever)."""
    import os

    from ..scorecache import ScoreCache, hash_images, measure_cached
    from .series import build_series, image_file

    files = list(dict.fromkeys(f for s in sides for e in s.entries if e.error is None and e.scores is not None
                               and (f := image_file(s, e)) is not None and os.path.isfile(f)))
    own = cache is None
    store = ScoreCache(None) if own else cache
    try:
        digests, _ = hash_images(store, files, progress)
        by_digest = {d: p for p, d in digests.items()}
        measured, _ = measure_cached(store, by_digest, progress)
    finally:
        if own:
            store.close()
    stats = {p: measured[d] for p, d in digests.items() if d in measured}
    return build_series(sides, keys, report.matchup, stats)


def _score_folders(sides: list[Side], scorer, keys, texts, condition, threshold, cache, batch_size, progress
                   ) -> tuple[list[Side], int, int]:
    """The sides with every folder image scored (or failed), and how many the model scored and the cache served."""
    from ..scorecache import ScoreCache, hash_images, score_cached

    own = cache is None
    store = ScoreCache(None) if own else cache
    try:
        todo = [e for s in sides if not s.prescored for e in s.entries if e.error is None]
        digests, unreadable = hash_images(store, list(dict.fromkeys(e.path for e in todo)), progress)
        work: dict[tuple[str, str], str] = {}
        for e in todo:
            if e.path in digests:
                work.setdefault((digests[e.path], e.prompt), e.path)
        run = score_cached(scorer, work, keys, texts, condition, threshold, store, batch_size, progress)
    finally:
        if own:
            store.close()

    def scored(e: Entry) -> Entry:
        if e.error is not None:
            return e
        if e.path in unreadable:
            return replace(e, error=unreadable[e.path])
        wk = (digests.get(e.path), e.prompt)
        return replace(e, error=run.errors[wk]) if wk in run.errors else replace(e, scores=run.scores[wk])

    out = [side if side.prescored else replace(side, entries=tuple(scored(e) for e in side.entries)) for side in sides]
    return out, run.scored, run.cached


def _ranking(sides: Sequence[Side], matchups: Sequence[Matchup], keys: Sequence[str]) -> dict[str, list[Strength]]:
    """Per dimension, the sides by Bradley-Terry strength, strongest first (ties count half a win)."""
    index = {s.name: i for i, s in enumerate(sides)}
    ranking: dict[str, list[Strength]] = {}
    for k in keys:
        wins = [[0.0] * len(sides) for _ in sides]
        for m in matchups:
            r = m.results[k]
            wins[index[m.a]][index[m.b]] = r.wins + 0.5 * r.ties
            wins[index[m.b]][index[m.a]] = r.losses + 0.5 * r.ties
        strength = bradley_terry(wins)
        order = sorted(range(len(sides)), key=lambda i: -strength[i])
        ranking[k] = [Strength(sides[i].name, float(strength[i])) for i in order]
    return ranking


__all__ = ["DimResult", "Matchup", "NoNamesMatch", "PromptResult", "Strength", "VersusReport", "compare_sides"]
