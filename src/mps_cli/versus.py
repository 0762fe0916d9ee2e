"""Generator against generator: per dimension, how often side A's images beat side B's for the same prompt.

A side is a folder of images, an ``mps dataset`` output folder (parquet) or a JSONL written by
``mps score``; the last two carry their scores and are never scored again. Images pair by their
path relative to the side without extension (``a/cat_01.png`` ~ ``b/cat_01.jpg``); with a prompts
file, by prompt: every image of A listed under a prompt meets every image of B listed under it
(seeds). A pair's outcome is 1 when A scores higher, 0.5 for a tie, 0 when B does.

Per dimension the report has the win rate of A over all pairs, the mean score difference A - B,
and a 95% percentile bootstrap interval for the win rate that resamples prompts (pairs of one
prompt are not independent), or pairs when there is a single prompt. With more than two sides:
every pairwise comparison, and a Bradley-Terry ranking fitted by Zermelo's iteration.

Folder images are scored through :func:`mps_cli.evaluate.score_cached`, the cache ``mps eval``
uses. Nothing here prints; problems (unpaired images, failed images) go into the report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .constants import DEFAULT_MASK_THRESHOLD, IMAGE_EXTENSIONS
from .errors import InputError, PromptError

DEFAULT_SAMPLES = 1000
DEFAULT_SEED = 0
MANIFEST_NAME = "_manifest.json"
PROMPT_SOURCES = ("sidecar", "metadata")
#: Columns of an ``mps dataset`` parquet file that are not dimension scores.
DATASET_META_COLUMNS = ("key", "shard", "prompt", "error")


class SideError(InputError):
    """A side cannot be read at all, or lacks the scores asked for."""


@dataclass(frozen=True)
class Entry:
    """One image of a side under one prompt: already scored, to be scored (``path``), or failed (``error``)."""

    key: str  # the pairing key: the path relative to the side, without extension, with "/" separators
    name: str  # the path relative to the side as it is (with extension); dataset rows: the key
    label: str  # how messages and reports name it
    prompt: str | None = None
    path: str | None = None
    scores: dict[str, float] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Side:
    """What one ``versus`` argument holds. ``kind``: folder, dataset or jsonl."""

    name: str
    kind: str
    entries: tuple[Entry, ...]
    settings: dict | None = None  # an mps dataset folder's manifest settings: weights, dtype, threshold, conditions

    @property
    def prescored(self) -> bool:
        return self.kind != "folder"


@dataclass(frozen=True)
class Failure:
    """An image (or prompts-file line) that could not take part, and why."""

    side: str | None
    image: str
    error: str


@dataclass(frozen=True)
class Lineup:
    """Sides with a prompt on every entry, ready to score and pair.

    ``by_prompt``: pairs form within a prompt, all A x B (a prompts file); otherwise by key.
    ``unlisted`` and ``missing``: per side, images the prompts file does not list, and names it
    lists that the side lacks.
    """

    sides: tuple[Side, ...]
    by_prompt: bool
    unlisted: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    failed: tuple[Failure, ...] = ()

    @property
    def needs_scoring(self) -> bool:
        """Whether any entry needs the model (so the caller knows whether to load it)."""
        return any(e.path is not None and e.error is None and e.scores is None for s in self.sides for e in s.entries)


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

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "pairs": self.pairs, "a_images": list(self.a_images),
                "b_images": list(self.b_images),
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
            "unpaired": {s: list(v) for s, v in self.unpaired.items()},
            "missing": {s: list(v) for s, v in self.missing.items()},
            "failed": [{"side": f.side, "image": f.image, "error": f.error} for f in self.failed],
            "bootstrap": {"samples": self.samples, "seed": self.seed},
            "scored": self.scored, "cached": self.cached,
            "weights": self.weights, "weights_identity": self.weights_identity, "dtype": self.dtype,
            "mask_threshold": self.mask_threshold,
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


# ---------------------------------------------------------------- reading sides

def _key_of(name: str) -> str:
    """The pairing key of a relative path: ``/`` separators, an image extension dropped."""
    name = name.replace(os.sep, "/").lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    stem, dot, ext = name.rpartition(".")
    if dot and "/" not in ext and f".{ext.lower()}" in IMAGE_EXTENSIONS:
        return stem
    return name


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_folder(root: Path, name: str) -> Side:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not _is_hidden(p.relative_to(root)))
    if not files:
        kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise SideError(f"{name}: no images in this folder or below ({kinds})")
    entries = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        entries.append(Entry(key=_key_of(rel), name=rel, label=os.path.join(name, rel), path=str(f)))
    return Side(name, "folder", tuple(entries))


def _read_dataset(root: Path, name: str) -> Side:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SideError(f"{name}: reading an mps dataset folder needs pyarrow (pip install pyarrow)") from None
    files = sorted(p for p in root.iterdir() if p.suffix == ".parquet" and p.is_file() and p.name[0] not in "._")
    entries = []
    for f in files:
        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
            raise SideError(f"{f}: cannot read as parquet ({exc})") from None
        for n, row in enumerate(rows):
            key = row.get("key")
            key = str(n) if key is None else str(key)
            label = f"{f.name}:{key}"
            scores = {k: float(v) for k, v in row.items()
                      if k not in DATASET_META_COLUMNS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            entries.append(Entry(key=_key_of(key), name=key, label=label, prompt=row.get("prompt"),
                                 scores=None if row.get("error") else scores,
                                 error=f"{label}: {row['error']}" if row.get("error") else None))
    if not entries:
        raise SideError(f"{name}: an mps dataset folder without rows")
    settings = None
    try:
        doc = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        settings = doc.get("settings") if isinstance(doc, dict) and isinstance(doc.get("settings"), dict) else None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SideError(f"{root / MANIFEST_NAME}: unreadable manifest ({exc})") from None
    return Side(name, "dataset", tuple(entries), settings)


def _read_jsonl(path: Path, name: str) -> Side:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SideError(f"{name}: cannot read ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # `mps score --json` writes one list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SideError(f"{name}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise SideError(f"{name}:{n}: not valid JSON ({exc.msg})") from None
    records = []
    for n, rec in numbered:
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise SideError(f"{name}:{n}: expected a score result (an object with an 'image' field)")
        records.append(rec)
    if not records:
        raise SideError(f"{name}: no results in it")
    # Keys are the image paths relative to the folder they all share, so they meet a folder side's keys.
    dirs = [os.path.dirname(os.path.normpath(r["image"])) for r in records]
    try:
        base = os.path.commonpath(dirs) if all(dirs) else ""
    except ValueError:  # absolute and relative paths mixed
        base = ""
    entries = []
    for rec in records:
        image = rec["image"]
        rel = os.path.relpath(os.path.normpath(image), base) if base else os.path.normpath(image)
        if rec.get("error") is not None or not isinstance(rec.get("scores"), dict):
            error = rec.get("error") or "no scores"
            entries.append(Entry(_key_of(rel), rel, image, prompt=rec.get("prompt"), error=f"{error}"))
            continue
        scores = {k: float(v) for k, v in rec["scores"].items() if isinstance(v, (int, float))}
        entries.append(Entry(_key_of(rel), rel, image, prompt=rec.get("prompt"), scores=scores))
    return Side(name, "jsonl", tuple(entries))


def read_side(path: str | os.PathLike) -> Side:
    """A folder of images, an ``mps dataset`` output folder, or a JSON/JSONL file from ``mps score``."""
    name = os.fspath(path)
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file() or any(f.suffix == ".parquet" for f in p.iterdir()):
            return _read_dataset(p, name)
        return _read_folder(p, name)
    if p.is_file():
        if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(p, name)
        raise SideError(f"{name}: a side is a folder of images, an mps dataset folder or a JSONL from mps score")
    raise SideError(f"{name}: no such folder or file")


# ---------------------------------------------------------------- prompts

def line_up(sides: Sequence[Side], *, prompt: str | None = None, prompts_file: str | os.PathLike | None = None,
            prompt_from: str | None = None) -> Lineup:
    """Give every folder image a prompt; pre-scored entries keep the prompt they were scored with.

    ``prompts_file`` (JSONL or CSV with image and prompt) names images by their path relative to
    a side, with or without extension, so one file serves every side. Raises :class:`PromptError`
    for a prompts file that cannot be read, ``ValueError`` when a folder side has no prompt source.
    """
    names = [s.name for s in sides]
    if len(set(names)) != len(names):
        raise ValueError("the same side is given twice")
    given = [x for x in (prompt, prompts_file, prompt_from) if x is not None]
    if len(given) > 1:
        raise ValueError("give one prompt source")
    if prompt_from is not None and prompt_from not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {prompt_from!r}: use {' or '.join(PROMPT_SOURCES)}")
    if not given and any(not s.prescored for s in sides):
        raise ValueError("a folder side needs a prompt source")
    if prompts_file is not None:
        return _line_up_file(sides, prompts_file)
    out = []
    for side in sides:
        if side.prescored:
            out.append(side)
            continue
        entries = []
        for e in side.entries:
            if prompt is not None:
                entries.append(replace(e, prompt=prompt))
                continue
            from .inputs.prompts import metadata_prompt, sidecar_prompt

            read = sidecar_prompt if prompt_from == "sidecar" else metadata_prompt
            try:
                entries.append(replace(e, prompt=read(e.path)))
            except PromptError as exc:
                entries.append(replace(e, error=str(exc)))
        out.append(replace(side, entries=tuple(entries)))
    return Lineup(tuple(out), by_prompt=False)


def _line_up_file(sides: Sequence[Side], prompts_file: str | os.PathLike) -> Lineup:
    from .inputs.prompts import read_prompt_file

    listed: list[tuple[str, str]] = []
    failed: list[Failure] = []
    for e in read_prompt_file(prompts_file):
        if e.error is not None:
            failed.append(Failure(None, e.image, e.error))
        elif os.path.isabs(e.image):
            failed.append(Failure(None, e.image, f"{prompts_file}: {e.image}: name images by their path "
                                                  "relative to each side"))
        else:
            listed.append((os.path.normpath(e.image).replace(os.sep, "/"), e.prompt))
    listed = list(dict.fromkeys(listed))
    out, unlisted, missing = [], {}, {}
    for side in sides:
        by_name: dict[str, list[Entry]] = {}
        by_key: dict[str, list[Entry]] = {}
        for e in side.entries:
            by_name.setdefault(e.name, []).append(e)
            by_key.setdefault(e.key, []).append(e)
        used: set[int] = set()
        placed: set[tuple[int, str]] = set()  # "cat.png" and "cat" listed under one prompt are one image
        entries: list[Entry] = []
        missing[side.name] = []
        for name, text in listed:
            found = by_name.get(name) or by_key.get(_key_of(name)) or []
            if not found:
                missing[side.name].append(name)
                continue
            for e in found:
                used.add(id(e))
                if (id(e), text) in placed:
                    continue
                placed.add((id(e), text))
                if not side.prescored:
                    entries.append(replace(e, prompt=text))
                elif e.error is not None or e.prompt == text:
                    entries.append(e)
                else:
                    entries.append(replace(e, prompt=text, scores=None,
                                           error=f"{e.label}: scored for another prompt ({e.prompt!r}), "
                                                 f"not {text!r}"))
        unlisted[side.name] = [e.label for e in side.entries if id(e) not in used]
        out.append(replace(side, entries=tuple(entries)))
    return Lineup(tuple(out), by_prompt=True, unlisted=unlisted, missing=missing, failed=tuple(failed))


# ---------------------------------------------------------------- statistics

def bootstrap_interval(outcomes: Sequence[Sequence[float]], samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean of ``outcomes``, resampling its groups.

    ``outcomes[g]`` are the pair outcomes (1, 0.5, 0) of group g. The same seed gives the same interval.
    """
    return _bootstrap([outcomes], samples, seed, level)[0]


def _bootstrap(per_dim: list[Sequence[Sequence[float]]], samples: int, seed: int, level: float
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


# ---------------------------------------------------------------- comparing

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
    intervals = dict(zip(keys, _bootstrap([outcomes[k] for k in keys], samples, seed, 0.95), strict=True))
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
        per_prompt.append(PromptResult(
            prompt=prompt, pairs=len(pairs),
            a_images=tuple(dict.fromkeys(x.label for x, _ in pairs)),
            b_images=tuple(dict.fromkeys(y.label for _, y in pairs)),
            win_rate={k: math.fsum(outcome(x.scores[k], y.scores[k]) for x, y in pairs) / len(pairs) for k in keys},
            mean_diff={k: math.fsum(x.scores[k] - y.scores[k] for x, y in pairs) / len(pairs) for k in keys}))
    per_prompt.sort(key=lambda p: -p.mean_diff[first])
    return Matchup(a.name, b.name, len(groups), len(all_pairs), unpaired, results, tuple(per_prompt), unit)


def _mirror(m: Matchup) -> Matchup:
    per_prompt = tuple(PromptResult(p.prompt, p.pairs, p.b_images, p.a_images,
                                    {k: 1.0 - v for k, v in p.win_rate.items()},
                                    {k: -v for k, v in p.mean_diff.items()}) for p in reversed(m.per_prompt))
    return Matchup(m.b, m.a, m.prompts, m.pairs, m.unpaired, {k: r.mirrored() for k, r in m.results.items()},
                   per_prompt, m.unit)


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
                  progress: Callable[[str, int, int], None] | None = None, models=None) -> VersusReport:
    """Score what needs scoring (through ``cache``, a :class:`~mps_cli.evaluate.ScoreCache`) and compare every
    two sides. ``scorer`` may be None when every side is pre-scored. ``models``: compare by the keys of
    several models (:func:`~mps_cli.engine.panel.keyed_conditions`)."""
    from .engine.panel import keyed_conditions
    from .evaluate import ScoreCache, cache_identity, hash_images, score_cached

    conditions = keyed_conditions(models, dims, condition)
    keys = [k for k, _ in conditions]
    texts = dict(conditions)
    threshold = float(mask_threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"mask threshold must be in [0, 1), got {mask_threshold}")
    if len(lineup.sides) < 2:
        raise ValueError("versus needs at least two sides")
    if samples < 1:
        raise ValueError("the bootstrap needs at least one sample")
    for side in lineup.sides:
        if side.prescored:
            _check_prescored(side, keys)

    sides = list(lineup.sides)
    scored = cached = 0
    weights = identity = dtype = None
    if lineup.needs_scoring:
        if scorer is None:
            raise ValueError("folder sides need a scorer")
        weights = scorer.weights
        identity, dtype = cache_identity(scorer)
    _check_settings(sides, texts, threshold, identity, dtype)
    if lineup.needs_scoring:
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
        scored, cached = run.scored, run.cached
        for i, side in enumerate(sides):
            if side.prescored:
                continue
            entries = []
            for e in side.entries:
                if e.error is None:
                    wk = (digests.get(e.path), e.prompt)
                    if e.path in unreadable:
                        e = replace(e, error=unreadable[e.path])
                    elif wk in run.errors:
                        e = replace(e, error=run.errors[wk])
                    else:
                        e = replace(e, scores=run.scores[wk])
                entries.append(e)
            sides[i] = replace(side, entries=tuple(entries))

    failed = list(lineup.failed)
    for side in sides:
        failed.extend(Failure(side.name, e.label, e.error) for e in side.entries if e.error is not None)
    matchups = [_pair_up(sides[i], sides[j], lineup.by_prompt, keys, keys[0], samples, seed)
                for i in range(len(sides)) for j in range(i + 1, len(sides))]
    unpaired: dict[str, list[str]] = {}
    for side in sides:
        seen = list(lineup.unlisted.get(side.name, []))
        for m in matchups:
            seen.extend(m.unpaired.get(side.name, []))
        unpaired[side.name] = list(dict.fromkeys(seen))
    ranking: dict[str, list[Strength]] = {}
    if len(sides) > 2:
        index = {s.name: i for i, s in enumerate(sides)}
        for k in keys:
            wins = [[0.0] * len(sides) for _ in sides]
            for m in matchups:
                r = m.results[k]
                wins[index[m.a]][index[m.b]] = r.wins + 0.5 * r.ties
                wins[index[m.b]][index[m.a]] = r.losses + 0.5 * r.ties
            strength = bradley_terry(wins)
            order = sorted(range(len(sides)), key=lambda i: -strength[i])
            ranking[k] = [Strength(sides[i].name, float(strength[i])) for i in order]
    return VersusReport(
        sides=tuple(s.name for s in sides), keys=tuple(keys), matchups=tuple(matchups), unpaired=unpaired,
        missing={s: list(v) for s, v in lineup.missing.items()}, failed=tuple(failed), ranking=ranking,
        samples=samples, seed=seed, scored=scored, cached=cached, weights=weights, weights_identity=identity,
        dtype=dtype,
        mask_threshold=threshold)


__all__ = [
    "DimResult", "Entry", "Failure", "Lineup", "Matchup", "PromptResult", "Side", "SideError", "Strength",
    "VersusReport", "bootstrap_interval", "bradley_terry", "compare_sides", "line_up", "read_side",
]
