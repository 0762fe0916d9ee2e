"""The report page: what goes on it (this module, as plain values) and how it looks (the Jinja2 templates in
``templates/``, package data, every one autoescaped).

:class:`Page` decides the sections, their order, the cards and the numbers; the templates turn them into
markup. No text is escaped here, and none is marked safe but the package's own stylesheet and script,
which the Content-Security-Policy allows by their SHA-256 hashes, computed from exactly what is inserted.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import __version__
from ..constants import DISTRIBUTION
from .charts import Histogram, TrendPanel, WinRateChart, histogram, trend_panel, winrate_chart
from .images import PageImages
from .results import (
    Dataset,
    Entry,
    Pair,
    ReportSummary,
    Results,
    Series,
    Versus,
    VersusPrompt,
    is_number,
    order_dims,
)

#: Scored images from which a page also shows a histogram per dimension.
HISTOGRAM_MIN = 30
#: Images shown as "top" and as "bottom" for datasets and sampled galleries.
EXTREMES = 12
#: Prompts shown where the two sides of a versus disagree most.
DISAGREE_TOP = 10
ERRORS_LISTED = 500
SAMPLE_SEED = 0
TEMPLATES = "templates"


# --------------------------------------------------------------------------- what the templates are given


@dataclass(frozen=True)
class Bar:
    dim: str
    width: float  # percent of the bar's track: where the score sits in the page's range for the dimension
    value: float


@dataclass(frozen=True)
class Card:
    """One image card (``partials/card.html.j2``)."""

    image: str
    prompt: str
    scores: dict[str, float]
    rank: int | None
    shard: str | None
    name: str
    src: str | None
    full: str | None
    problem: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Failed:
    """Failed inputs (``partials/failed.html.j2``): the first rows listed, how many more there are."""

    rows: tuple[tuple[str, str], ...]
    total: int
    kind: str = "failed"

    @property
    def more(self) -> int:
        return max(0, self.total - len(self.rows))


def failed_of(errors: Sequence[tuple[str, str]]) -> Failed:
    return Failed(tuple(errors[:ERRORS_LISTED]), len(errors))


@dataclass(frozen=True)
class CardGroup:
    label: str
    cards: tuple[Card, ...]


@dataclass(frozen=True)
class Extremes:
    """The top and bottom images by ``dim`` (``partials/extremes.html.j2``)."""

    dim: str
    what: str
    groups: tuple[CardGroup, ...]
    kind: str = "extremes"


@dataclass(frozen=True)
class PromptGroup:
    prompt: str
    heading: str
    cards: tuple[Card, ...]
    best_name: str
    best_score: float


@dataclass(frozen=True)
class Gallery:
    dim: str
    groups: tuple[PromptGroup, ...]
    sampled: bool
    shown: int
    total: int
    seed: int = SAMPLE_SEED
    kind: str = "gallery"


@dataclass(frozen=True)
class Distribution:
    hists: tuple[Histogram, ...]
    kind: str = "distribution"


@dataclass(frozen=True)
class PairRow:
    dim: str
    a: object
    b: object
    p_a: float
    winner: str
    verdict: str


@dataclass(frozen=True)
class PairView:
    prompt: str
    a: Card
    b: Card
    rows: tuple[PairRow, ...]


@dataclass(frozen=True)
class Comparisons:
    pairs: tuple[PairView, ...]
    kind: str = "compare"


@dataclass(frozen=True)
class Disagreement:
    prompt: str
    diffs: tuple[tuple[str, float], ...]
    a: tuple[Card, ...]
    b: tuple[Card, ...]


@dataclass(frozen=True)
class VersusView:
    a: str
    b: str
    facts: tuple[str, ...]
    ranking: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]
    chart: WinRateChart | None
    disagree: tuple[Disagreement, ...]
    disagree_dim: str
    has_details: bool
    failed: Failed | None
    kind: str = "versus"


@dataclass(frozen=True)
class SeriesView:
    """A ``versus --series``: the checkpoints, the flags, and a trend panel per score and per statistic."""

    sides: tuple[str, ...]
    watched: str
    flags: tuple[tuple[str, str], ...]  # (kind, message)
    scores: tuple[TrendPanel, ...]
    stats: tuple[TrendPanel, ...]
    notes: tuple[str, ...]
    kind: str = "series"


@dataclass(frozen=True)
class DatasetView:
    name: str
    folder: str
    facts: str
    hists: tuple[Histogram, ...]
    extremes: Extremes | None
    failed: Failed | None
    kind: str = "dataset"


# --------------------------------------------------------------------------- the templates


def _f(spec: str):
    return lambda v: format(v, spec)


FILTERS = {
    "f1": _f(".1f"), "f2": _f(".2f"), "f3": _f(".3f"), "g": _f("g"), "signed3": _f("+.3f"), "thousands": _f(","),
    "plural": lambda n: "" if n == 1 else "s",
    "num3": lambda v: f"{v:.3f}" if is_number(v) else "–",
    "ellipsis": lambda text, n: text if len(text) <= n else text[: n - 1] + "…",
}


@lru_cache(maxsize=1)
def environment():
    """The templates' environment: package data, autoescape on for every template, undefined names an error."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("mps_cli.report", TEMPLATES), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(FILTERS)
    return env


@lru_cache(maxsize=1)
def inline_assets() -> tuple[str, str]:
    """The stylesheet and the script the page carries inline, as the package holds them."""
    from importlib.resources import files

    folder = files("mps_cli.report") / TEMPLATES
    return (folder / "report.css").read_text(encoding="utf-8"), (folder / "report.js").read_text(encoding="utf-8")


def csp_hash(text: str) -> str:
    """The Content-Security-Policy source that allows exactly this inline text."""
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


# --------------------------------------------------------------------------- the page


class Page:
    """The report of ``results``: builds the sections, then renders them with the templates."""

    def __init__(self, results: Results, out_dir: Path, thumb: int, fmt: str, link: bool, max_images: int,
                 title: str | None):
        self.r = results
        self.images = PageImages(out_dir, thumb, fmt, link)
        self.link = link
        self.max_images = max_images
        self.title = title or "MPS report"
        self.cards = 0
        self.dims = list(order_dims(dict.fromkeys(self._all_dims())))
        self.scale = self._scales()

    def _all_dims(self):
        for e in self.r.entries:
            yield from e.scores
        for p in self.r.pairs:
            yield from p.results
        for ds in self.r.datasets:
            yield from ds.scores
        for e in self._all_entries()[len(self.r.entries):]:
            yield from e.scores

    def _all_entries(self) -> list[Entry]:
        out = list(self.r.entries)
        for v in self.r.versus:
            for d in v.details:
                out += d.a + d.b
        return out

    def _scales(self) -> dict[str, tuple[float, float]]:
        """Per dimension, the range the bars span: every score on the page."""
        values: dict[str, list[float]] = {d: [] for d in self.dims}
        for e in self._all_entries():
            for d, s in e.scores.items():
                values[d].append(s)
        for p in self.r.pairs:
            for d, v in p.results.items():
                values[d] += [x for x in (v.get("a"), v.get("b")) if is_number(x)]
        for ds in self.r.datasets:
            for d, arr in ds.scores.items():
                finite = arr[np.isfinite(arr)]
                if finite.size:
                    values[d] += [float(finite.min()), float(finite.max())]
        return {d: (min(v), max(v)) for d, v in values.items() if v}

    def render(self) -> tuple[str, ReportSummary]:
        """The page as a string, and what it holds (``path`` and ``bytes`` of the summary are not set)."""
        entries = self.r.entries
        scored = [e for e in entries if e.error is None and e.scores]
        sampled = len(scored) > self.max_images
        gallery = scored
        if sampled:
            keep = set(random.Random(SAMPLE_SEED).sample(range(len(scored)), self.max_images))
            gallery = [e for i, e in enumerate(scored) if i in keep]
        extremes = self._extremes(scored) if sampled else ([], [])
        ds_extremes = [self._dataset_extremes(ds) for ds in self.r.datasets]
        self._prepare_images(gallery, extremes, ds_extremes)
        sections = self._sections(entries, scored, gallery, sampled, extremes, ds_extremes)
        html = self._document(sections)
        summary = ReportSummary(path=Path(), cards=self.cards, images=len(entries), sampled=sampled,
                                unreadable=tuple(self.images.unreadable.values()), bytes=0)
        return html, summary

    def _sections(self, entries, scored, gallery, sampled, extremes, ds_extremes) -> list:
        sections: list = [self._series(s) for s in self.r.series]
        sections += [self._versus(v) for v in self.r.versus]
        if self.r.pairs:
            sections.append(self._pairs())
        sections += [self._dataset(ds, ext) for ds, ext in zip(self.r.datasets, ds_extremes, strict=True)]
        if len(scored) >= HISTOGRAM_MIN:
            sections.append(Distribution(self._histograms(
                {d: [e.scores[d] for e in scored if d in e.scores] for d in self.dims})))
        if sampled:
            sections.append(self._extremes_view(*extremes, "of all scored images"))
        if gallery:
            sections.append(self._gallery(gallery, len(scored), sampled))
        errors = [(e.image, e.error) for e in entries if e.error is not None]
        if errors:
            sections.append(failed_of(errors))
        return sections

    def _prepare_images(self, gallery, extremes, ds_extremes) -> None:
        reqs = [(e.image, e.origin, e.shard) for e in [*gallery, *extremes[0], *extremes[1]]]
        for p in self.r.pairs:
            reqs += [(p.a, p.origin, None), (p.b, p.origin, None)]
        for v in self.r.versus:
            for d in self._disagree(v):
                reqs += [(e.image, e.origin, e.shard) for e in d.a + d.b]
        for top, bottom, _ in ds_extremes:
            reqs += [(e.image, e.origin, e.shard) for e in top + bottom]
        self.images.prepare(reqs)

    def _document(self, sections: list) -> str:
        from markupsafe import Markup

        css, js = inline_assets()
        return environment().get_template("report.html.j2").render(
            title=self.title, linked=self.link, style_hash=csp_hash(css), script_hash=csp_hash(js),
            css=Markup(css), js=Markup(js), headline=self._headline(),
            sources=", ".join(self.r.sources), controls=self.cards > 0, dims=self.dims, sections=sections,
            meta=self.r.meta, tool=DISTRIBUTION, version=__version__,
            when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def _headline(self) -> list[str]:
        parts = []
        n = len(self.r.entries)
        if n:
            prompts = len({e.prompt for e in self.r.entries if e.error is None})
            failed = sum(e.error is not None for e in self.r.entries)
            parts.append(f"{n:,} image{_s(n)} · {prompts:,} prompt{_s(prompts)}"
                         + (f" · {failed:,} failed" if failed else ""))
        if self.r.pairs:
            parts.append(f"{len(self.r.pairs):,} comparison{_s(len(self.r.pairs))}")
        parts += [f"series of {len(s.points)} checkpoints · {len(s.flags)} flag{_s(len(s.flags))}"
                  for s in self.r.series]
        parts += [f"versus: {v.a} vs {v.b}" for v in self.r.versus]
        parts += [f"dataset: {ds.rows:,} rows" for ds in self.r.datasets]
        if self.dims:
            parts.append("dimensions: " + ", ".join(self.dims))
        return parts

    # ----------------------------------------------------------------- cards

    def _card(self, e: Entry, *, caption: str | None = None) -> Card:
        self.cards += 1
        img = self.images.get(e.image, e.origin, e.shard)
        bars = []
        for d in self.dims:
            if d in e.scores:
                lo, hi = self.scale.get(d, (e.scores[d], e.scores[d]))
                width = 100.0 if hi <= lo else 4.0 + 96.0 * (e.scores[d] - lo) / (hi - lo)
                bars.append(Bar(d, width, e.scores[d]))
        return Card(image=e.image, prompt=e.prompt or "", scores=dict(e.scores), rank=e.rank, shard=e.shard,
                    name=caption if caption is not None else _basename(e.image), src=img.src,
                    full=img.full if img.full and img.full != img.src else None, problem=img.problem or "no image",
                    bars=tuple(bars))

    # ----------------------------------------------------------------- score / rank

    def _gallery(self, gallery: list[Entry], total: int, sampled: bool) -> Gallery:
        groups: dict[str | None, list[Entry]] = {}
        for e in gallery:
            groups.setdefault(e.prompt, []).append(e)
        first = self._default_dim(gallery)
        shown = []
        for prompt, items in groups.items():
            if any(e.rank is not None for e in items) and first == self._rank_dim(items):
                items = sorted(items, key=lambda e: (e.rank is None, e.rank or 0))
            else:
                items = sorted(items, key=lambda e: -e.scores.get(first, -math.inf))
            best = items[0]
            shown.append(PromptGroup(prompt=prompt or "", heading=prompt or "(no prompt)",
                                     cards=tuple(self._card(e) for e in items), best_name=_basename(best.image),
                                     best_score=best.scores.get(first, math.nan)))
        return Gallery(dim=first, groups=tuple(shown), sampled=sampled, shown=len(gallery), total=total)

    def _default_dim(self, entries: list[Entry]) -> str:
        return self._rank_dim(entries) or (self.dims[0] if self.dims else "overall")

    def _rank_dim(self, entries: list[Entry]) -> str | None:
        """For rank output, the dimension whose order the ranks follow (rank's ``--by``)."""
        ranked = sorted((e for e in entries if e.rank is not None), key=lambda e: e.rank)
        if len(ranked) < 2:
            return None
        for d in self.dims:
            vals = [e.scores.get(d, -math.inf) for e in ranked]
            if all(x >= y for x, y in zip(vals, vals[1:], strict=False)):
                return d
        return None

    def _extremes(self, scored: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        d = self._default_dim(scored)
        order = sorted((e for e in scored if d in e.scores), key=lambda e: -e.scores[d])
        k = min(EXTREMES, len(order) // 2)
        return order[:k], order[len(order) - k:][::-1] if k else []

    def _extremes_view(self, top: list[Entry], bottom: list[Entry], what: str, dim: str | None = None) -> Extremes:
        groups = tuple(CardGroup(label, tuple(self._card(e, caption=e.image if e.shard else None) for e in items))
                       for label, items in ((f"Top {len(top)}", top), (f"Bottom {len(bottom)}", bottom)) if items)
        return Extremes(dim=dim or self._default_dim(top + bottom), what=what, groups=groups)

    @staticmethod
    def _histograms(values: dict[str, Sequence[float]]) -> tuple[Histogram, ...]:
        return tuple(h for h in (histogram(d, v) for d, v in values.items() if len(v)) if h is not None)

    # ----------------------------------------------------------------- compare

    def _pairs(self) -> Comparisons:
        views = []
        for p in self.r.pairs:
            views.append(PairView(prompt=p.prompt, a=self._card(_side(p, "a")), b=self._card(_side(p, "b")), rows=tuple(
                PairRow(dim=d, a=v.get("a"), b=v.get("b"), p_a=v["p_a"], winner=str(v.get("winner")),
                        verdict={"a": "A preferred", "b": "B preferred", "tie": "tie"}.get(v.get("winner"), ""))
                for d, v in p.results.items() if is_number(v.get("p_a")))))
        return Comparisons(tuple(views))

    # ----------------------------------------------------------------- versus

    def _versus(self, v: Versus) -> VersusView:
        facts = []
        if v.prompts is not None:
            facts.append(f"{v.prompts:,} prompts")
        if v.pairs is not None:
            facts.append(f"{v.pairs:,} pairs")
        if v.pairing is not None:
            facts.append(f"pairing: {v.pairing}")
        unpaired = _unpaired_text(v.unpaired)
        if unpaired:
            facts.append(f"unpaired: {unpaired}")
        disagree = tuple(Disagreement(prompt=d.prompt, diffs=tuple(d.diffs.items()),
                                      a=tuple(self._card(e) for e in d.a), b=tuple(self._card(e) for e in d.b))
                         for d in self._disagree(v))
        return VersusView(a=v.a, b=v.b, facts=tuple(facts),
                          ranking=tuple((k, tuple(order)) for k, order in v.ranking.items()),
                          chart=winrate_chart(v.results), disagree=disagree, disagree_dim=self._disagree_dim(v),
                          has_details=bool(v.details), failed=failed_of(v.failed) if v.failed else None)

    def _disagree_dim(self, v: Versus) -> str:
        for d in (*v.results, *self.dims):
            if any(d in x.diffs for x in v.details):
                return d
        return "overall"

    def _disagree(self, v: Versus) -> list[VersusPrompt]:
        dim = self._disagree_dim(v)
        return sorted((x for x in v.details if dim in x.diffs), key=lambda x: -abs(x.diffs[dim]))[:DISAGREE_TOP]

    # ----------------------------------------------------------------- series

    def _series(self, s: Series) -> SeriesView:
        sides = [p.side for p in s.points]
        flagged: dict[str, set[int]] = {}
        for side, kind, key, _ in s.flags:
            at = sides.index(side) if side in sides else None
            if at is not None:
                flagged.setdefault(key, set()).add(at)
                if kind == "score" and s.rising:
                    flagged.setdefault(s.rising, set()).add(at)
        keys = list(order_dims(dict.fromkeys(k for p in s.points for k in p.scores)))
        scores = [trend_panel(k, sides, [p.scores.get(k) for p in s.points], flagged=frozenset(flagged.get(k, ())))
                  for k in keys]
        stats = []
        for name in dict.fromkeys(k for p in s.points for k in p.stats):
            first = s.points[0].stats.get(name)
            stats.append(trend_panel(name.replace("_", " "), sides, [p.stats.get(name) for p in s.points],
                                     band=(first[1], first[2]) if first else None,
                                     flagged=frozenset(flagged.get(name, ()))))
        rates = [p.duplicate_rate for p in s.points]
        stats.append(trend_panel("near-duplicate rate", sides, [None if r is None else (r, r, r) for r in rates],
                                 flagged=frozenset(flagged.get("near_duplicates", ()))))
        watched = f"{s.rising} against {', '.join(s.falling)}" if s.rising and s.falling else ""
        return SeriesView(sides=tuple(sides), watched=watched, flags=tuple((k, m) for _, k, _, m in s.flags),
                          scores=tuple(p for p in scores if p), stats=tuple(p for p in stats if p),
                          notes=tuple(s.notes))

    # ----------------------------------------------------------------- dataset

    def _dataset_extremes(self, ds: Dataset):
        if not ds.scores:
            return [], [], None
        dim = next(iter(ds.scores))
        arr = ds.scores[dim]
        ok = np.flatnonzero(np.isfinite(arr))
        order = ok[np.argsort(-arr[ok], kind="stable")]
        k = min(EXTREMES, len(order) // 2) if len(order) > 1 else len(order)
        picks = (order[:k], order[len(order) - k:][::-1] if k and len(order) > 1 else [])

        def entry(i: int) -> Entry:
            scores = {d: float(a[i]) for d, a in ds.scores.items() if math.isfinite(a[i])}
            return Entry(image=str(ds.keys[i]), prompt=ds.prompts[i], scores=scores, shard=str(ds.shards[i]),
                         origin=ds.folder)

        return [entry(int(i)) for i in picks[0]], [entry(int(i)) for i in picks[1]], dim

    def _dataset(self, ds: Dataset, ext) -> DatasetView:
        failed = [(f"{s} · {k}", str(e)) for k, s, e in zip(ds.keys, ds.shards, ds.errors, strict=True)
                  if e is not None]
        shards = len(set(ds.shards))
        facts = (f"{ds.rows:,} rows in {shards:,} shard{_s(shards)} · {ds.rows - len(failed):,} scored · "
                 f"{len(failed):,} failed")
        if ds.shards_done is not None:
            facts += f" · manifest: {ds.shards_done:,} shards done"
        top, bottom, dim = ext
        return DatasetView(name=ds.folder.name, folder=str(ds.folder), facts=facts,
                           hists=self._histograms({d: a[np.isfinite(a)] for d, a in ds.scores.items()}),
                           extremes=self._extremes_view(top, bottom, "of the dataset", dim) if top or bottom else None,
                           failed=failed_of(failed) if failed else None)


def _side(p: Pair, side: str) -> Entry:
    return Entry(image=getattr(p, side), prompt=p.prompt, origin=p.origin,
                 scores={d: v[side] for d, v in p.results.items() if is_number(v.get(side))})


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _basename(label: str) -> str:
    return label.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or label


def _unpaired_text(u: object) -> str:
    if isinstance(u, dict):
        # A side with nothing unpaired says nothing: the lead names the sides already.
        counts = {k: len(v) if isinstance(v, (list, dict)) else v for k, v in u.items()}
        return ", ".join(f"{k}: {n}" for k, n in counts.items() if n not in (0, None, ""))
    if isinstance(u, (list, tuple)):
        return f"{len(u):,}"
    return "" if u in (None, 0) else str(u)


__all__ = ["Card", "Page", "csp_hash", "environment", "inline_assets"]
