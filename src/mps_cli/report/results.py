"""What ``mps report`` reads: the JSON contract of score, rank, compare and versus (JSON, JSONL, CSV), and
``mps dataset`` output folders, as plain data ready to render.

Reading is lenient about field names (the contract has grown) and strict about what reaches the
page: a dimension name becomes part of an attribute name, so only plain names are kept.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import CUSTOM_KEY, DIMENSIONS
from ..errors import ResultsError

# A dimension name becomes part of an attribute name (data-score-<dim>): only plain names.
_DIM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")  # "." for --model keys (mps.overall, hpsv2.1)
_DATASET_COLUMNS = {"key", "shard", "prompt", "error", "image", "rank"}


# --------------------------------------------------------------------------- data


@dataclass
class Meta:
    """What produced the results, as far as the inputs say."""

    weights: str | None = None
    identity: str | None = None
    dtype: str | None = None
    threshold: float | None = None
    conditions: list[str] = field(default_factory=list)
    version: str | None = None

    def update(self, other: Meta) -> None:
        for name in ("weights", "identity", "dtype", "threshold", "version"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(other, name))
        for c in other.conditions:
            if c not in self.conditions:
                self.conditions.append(c)


@dataclass
class Entry:
    """One scored (or failed) image: the path as given, its prompt, scores by dimension."""

    image: str
    prompt: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    rank: int | None = None
    shard: str | None = None
    origin: Path | None = None  # folder of the results file, to resolve relative image paths


@dataclass
class Pair:
    """One ``compare`` result: both images and, per dimension, both scores, ``p_a`` and the winner."""

    prompt: str
    a: str
    b: str
    results: dict[str, dict]
    origin: Path | None = None


@dataclass
class VersusPrompt:
    """One prompt of a versus: the images of each side and the score difference A - B per dimension."""

    prompt: str
    a: list[Entry]
    b: list[Entry]
    diffs: dict[str, float]


@dataclass
class Versus:
    """``mps versus --json``: win rate of A with its 95% interval and mean difference per dimension."""

    a: str
    b: str
    prompts: int | None
    pairs: int | None
    unpaired: object
    results: dict[str, dict]
    details: list[VersusPrompt] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, error)
    ranking: dict[str, list] = field(default_factory=dict)  # 3+ sides: dim -> [(side, strength)], strongest first
    pairing: str | None = None  # "by-name" or "all-pairs-per-prompt"; None in documents older than the field


@dataclass
class SeriesPoint:
    """One checkpoint of a ``versus --series``: mean score per key (with its interval), median statistics."""

    side: str
    scores: dict[str, tuple[float, float, float]]  # key -> (mean, ci low, ci high)
    stats: dict[str, tuple[float, float, float]]  # statistic -> (median, 5th, 95th percentile)
    duplicate_rate: float | None


@dataclass
class Series:
    """``mps versus --series``: the checkpoints in order, what was watched, the flags and notes."""

    points: list[SeriesPoint]
    rising: str | None
    falling: list[str]
    flags: list[tuple[str, str, str, str]]  # (side, kind, key, message)
    notes: list[str]


@dataclass
class Dataset:
    """An ``mps dataset`` output folder, kept as columns (it may hold millions of rows)."""

    folder: Path
    rows: int
    keys: list
    shards: list
    prompts: list
    errors: list
    scores: dict  # dim -> numpy float array (NaN where the row failed)
    shards_done: int | None = None


@dataclass
class Results:
    """Everything read from the inputs, ready to render."""

    entries: list[Entry] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    versus: list[Versus] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    meta: Meta = field(default_factory=Meta)
    sources: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)

    def extend(self, other: Results) -> None:
        self.entries += other.entries
        self.pairs += other.pairs
        self.versus += other.versus
        self.series += other.series
        self.datasets += other.datasets
        self.sources += other.sources
        self.meta.update(other.meta)

    @property
    def empty(self) -> bool:
        return not (self.entries or self.pairs or self.versus or self.datasets or self.series)


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`write_report` wrote."""

    path: Path
    cards: int
    images: int
    sampled: bool
    unreadable: tuple[str, ...]
    bytes: int


# --------------------------------------------------------------------------- reading


def read_results(sources: Sequence[str | os.PathLike]) -> tuple[Results, list[str]]:
    """Read result files and dataset folders; returns the results and one message per unreadable source.

    ``-`` reads JSON or JSONL from stdin. Raises :class:`ResultsError` when nothing could be read.
    """
    out, problems = Results(), []
    for src in sources:
        try:
            if str(src) == "-":
                out.extend(parse_results(sys.stdin.read(), "stdin", Path.cwd()))
            else:
                out.extend(read_result_path(Path(src)))
        except ResultsError as exc:
            problems.append(str(exc))
    if out.empty:
        raise ResultsError("; ".join(problems) if problems else "no results to report")
    return out, problems


def read_result_path(path: Path) -> Results:
    """One results file (JSON, JSONL, CSV, parquet) or an ``mps dataset`` folder."""
    if path.is_dir():
        return read_dataset(path)
    if not path.exists():
        raise ResultsError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".parquet":
        return read_dataset(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a results file (expected JSON, JSONL or CSV from mps)") from None
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if "\0" in text:
        raise ResultsError(f"{path}: not a results file (expected JSON, JSONL or CSV from mps)")
    origin = path.resolve().parent
    if path.suffix.lower() == ".csv":
        return _parse_csv(text, str(path), origin)
    return parse_results(text, str(path), origin)


def parse_results(text: str, name: str, origin: Path | None = None) -> Results:
    """Results from the text of a JSON document or JSONL lines, as score/rank/compare/versus write them."""
    stripped = text.strip()
    if not stripped:
        raise ResultsError(f"{name}: empty")
    try:
        docs = [json.loads(stripped)]
    except json.JSONDecodeError:
        docs = []
        for n, line in enumerate(stripped.split("\n"), 1):  # not splitlines(): U+2028 is text in JSON
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ResultsError(f"{name}: line {n} is not JSON ({exc.msg})") from None
    if len(docs) == 1 and isinstance(docs[0], list):
        docs = docs[0]
    res = results_from_records(docs, origin, name)
    if res.empty:
        raise ResultsError(f"{name}: no score, rank, compare or versus results in it")
    return res


def results_from_records(records: Iterable[object], origin: Path | None = None, name: str = "results",
                         meta: Meta | None = None) -> Results:
    """Results from already parsed documents in the JSON contract of score/rank/compare/versus."""
    out = Results(meta=meta or Meta(), sources=[name])
    for doc in records:
        if not isinstance(doc, dict):
            raise ResultsError(f"{name}: expected JSON objects, found {type(doc).__name__}")
        if isinstance(doc.get("series"), dict):
            series = _series(doc["series"])
            out.series += [series] if series is not None else []
        if isinstance(doc.get("matrix"), dict) and isinstance(doc.get("sides"), list):
            out.versus += _versus_matrix(doc, origin)
            out.meta.update(_manifest_meta(doc))
        elif isinstance(doc.get("results"), dict) and any(
                isinstance(v, dict) and "win_rate" in v for v in doc["results"].values()):
            out.versus.append(_versus(doc, origin))
            out.meta.update(_manifest_meta(doc))
        elif isinstance(doc.get("results"), dict) and "a" in doc and "b" in doc:
            out.pairs.append(Pair(prompt=str(doc.get("prompt") or ""), a=str(doc["a"]), b=str(doc["b"]),
                                  results=_clean_dims({k: v for k, v in doc["results"].items() if isinstance(v, dict)}),
                                  origin=origin))
        elif "image" in doc:
            out.entries.append(_entry(doc, origin))
        else:
            raise ResultsError(f"{name}: an object with neither 'image' nor 'results' ({_short(doc)})")
    return out


def _entry(doc: dict, origin: Path | None) -> Entry:
    scores = doc.get("scores") if isinstance(doc.get("scores"), dict) else {}
    rank = doc.get("rank")
    return Entry(image=str(doc["image"]), prompt=None if doc.get("prompt") is None else str(doc["prompt"]),
                 scores=_clean_dims({k: float(v) for k, v in scores.items() if is_number(v)}),
                 error=None if doc.get("error") is None else str(doc["error"]),
                 rank=rank if isinstance(rank, int) else None, origin=origin)


def _parse_csv(text: str, name: str, origin: Path) -> Results:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "image" not in rows[0]:
        raise ResultsError(f"{name}: not a score/rank CSV (needs an 'image' column)")
    dims = [c for c in rows[0] if c not in ("rank", "image", "prompt", "error")]
    docs = []
    for row in rows:
        doc: dict = {"image": row["image"], "prompt": row.get("prompt") or None}
        if row.get("error"):
            doc["error"] = row["error"]
        else:
            doc["scores"] = {d: float(row[d]) for d in dims if _is_number_text(row.get(d))}
        if (row.get("rank") or "").isdigit():
            doc["rank"] = int(row["rank"])
        docs.append(doc)
    return results_from_records(docs, origin, name)


def _versus(doc: dict, origin: Path | None) -> Versus:
    results = _clean_dims({k: v for k, v in doc["results"].items() if isinstance(v, dict) and "win_rate" in v})
    raw = doc.get("details") or doc.get("per_prompt") or (doc["prompts"] if isinstance(doc.get("prompts"), list)
                                                          else [])
    details = [d for d in (_versus_prompt(x, origin) for x in raw if isinstance(x, dict)) if d is not None]
    failed = [(f"{f.get('side', '')}: {f.get('image', '')}".strip(": "), str(f.get("error", "")))
              for f in doc.get("failed") or [] if isinstance(f, dict)]
    return Versus(a=str(doc.get("a", "A")), b=str(doc.get("b", "B")),
                  prompts=doc["prompts"] if isinstance(doc.get("prompts"), int) else None,
                  pairs=doc.get("pairs") if isinstance(doc.get("pairs"), int) else None,
                  unpaired=doc.get("unpaired"), results=results, details=details, failed=failed,
                  pairing=doc["pairing"] if isinstance(doc.get("pairing"), str) else None)


def _versus_matrix(doc: dict, origin: Path | None) -> list[Versus]:
    """``mps versus A B C --json``: one :class:`Versus` per pair of sides, the ranking on the first."""
    sides = [str(x) for x in doc["sides"]]
    matrix = {k: v for k, v in _clean_dims(doc["matrix"]).items() if isinstance(v, dict)}
    details = {(str(m.get("a")), str(m.get("b"))): m.get("prompts") or []
               for m in doc.get("per_prompt") or [] if isinstance(m, dict)}
    out = []
    for i, a in enumerate(sides):
        for b in sides[i + 1:]:
            cells = {k: (m.get(a) or {}).get(b) for k, m in matrix.items()}
            cells = {k: c for k, c in cells.items() if isinstance(c, dict) and "win_rate" in c}
            if not cells:
                continue
            first = next(iter(cells.values()))
            out.append(_versus({"a": a, "b": b, "prompts": first.get("prompts"), "pairs": first.get("pairs"),
                                "results": cells, "per_prompt": details.get((a, b), []),
                                "pairing": doc.get("pairing")}, origin))
    if out:
        out[0].unpaired = doc.get("unpaired")
        out[0].failed = _versus({"results": {}, "failed": doc.get("failed")}, origin).failed
        ranking = doc.get("ranking") if isinstance(doc.get("ranking"), dict) else {}
        out[0].ranking = {k: [(str(r.get("side")), float(r["strength"])) for r in v
                              if isinstance(r, dict) and is_number(r.get("strength"))]
                          for k, v in _clean_dims(ranking).items() if isinstance(v, list)}
    return out


def _series(doc: dict) -> Series | None:
    """The ``series`` of a versus document, leniently: checkpoints without a side name, numbers that are not
    numbers, flags without a message are left out."""
    def numbers(*xs) -> tuple[float, ...] | None:
        return tuple(float(x) for x in xs) if all(is_number(x) for x in xs) else None

    def trend(v: object) -> tuple[float, ...] | None:
        ci = v.get("ci95") if isinstance(v, dict) else None
        return numbers(v.get("mean"), *ci) if isinstance(ci, list) and len(ci) == 2 else None

    def spread(v: object) -> tuple[float, ...] | None:
        return numbers(v.get("median"), v.get("p5"), v.get("p95")) if isinstance(v, dict) else None

    points = []
    for c in doc.get("checkpoints") or []:
        if not isinstance(c, dict) or not isinstance(c.get("side"), str):
            continue
        scores = c.get("scores") if isinstance(c.get("scores"), dict) else {}
        stats = c.get("stats") if isinstance(c.get("stats"), dict) else {}
        dup = c.get("duplicate_rate")
        points.append(SeriesPoint(c["side"], _clean_dims({k: t for k, v in scores.items() if (t := trend(v))}),
                                  {str(k): t for k, v in stats.items() if (t := spread(v))},
                                  float(dup) if is_number(dup) else None))
    if not points:
        return None
    watch = doc.get("watch") if isinstance(doc.get("watch"), dict) else {}
    flags = [(str(f.get("side", "")), str(f.get("kind", "")), str(f.get("key", "")), str(f["message"]))
             for f in doc.get("flags") or [] if isinstance(f, dict) and isinstance(f.get("message"), str)]
    return Series(points=points, rising=watch.get("rising") if isinstance(watch.get("rising"), str) else None,
                  falling=[str(x) for x in watch.get("falling") or [] if isinstance(x, str)], flags=flags,
                  notes=[str(n) for n in doc.get("notes") or [] if isinstance(n, str)])


def _versus_prompt(d: dict, origin: Path | None) -> VersusPrompt | None:
    prompt = str(d.get("prompt") or "")
    sides = {}
    for side in ("a", "b"):
        raw = d.get(side, d.get(f"{side}_images", d.get(f"images_{side}")))
        side_scores = d.get(f"{side}_scores") or d.get(f"scores_{side}")
        items = raw if isinstance(raw, list) else [raw] if raw is not None else []
        entries = []
        # mps versus writes a list of per-image scores beside the images; other tools one dict for the side.
        per_image = side_scores if isinstance(side_scores, list) and len(side_scores) == len(items) else None
        for i, it in enumerate(items):
            if isinstance(it, dict) and it.get("image") is not None:
                entries.append(_entry({"prompt": prompt, **it}, origin))
            elif isinstance(it, str):
                sc = per_image[i] if per_image is not None else side_scores
                sc = sc if isinstance(sc, dict) else {}
                entries.append(_entry({"image": it, "prompt": prompt, "scores": sc}, origin))
        sides[side] = entries
    diffs: dict[str, float] = {}
    for key in ("mean_diff", "diff"):
        v = d.get(key)
        if isinstance(v, dict):
            diffs.update({k: float(x) for k, x in v.items() if is_number(x)})
        elif is_number(v):
            diffs["overall"] = float(v)
    if isinstance(d.get("results"), dict):
        for k, v in d["results"].items():
            if isinstance(v, dict) and is_number(v.get("mean_diff")):
                diffs.setdefault(k, float(v["mean_diff"]))
    if not diffs and sides["a"] and sides["b"]:
        for k in sides["a"][0].scores:
            a = [e.scores[k] for e in sides["a"] if k in e.scores]
            b = [e.scores[k] for e in sides["b"] if k in e.scores]
            if a and b:
                diffs[k] = sum(a) / len(a) - sum(b) / len(b)
    if not (sides["a"] or sides["b"] or diffs):
        return None
    return VersusPrompt(prompt=prompt, a=sides["a"], b=sides["b"], diffs=_clean_dims(diffs))


def read_dataset(path: Path) -> Results:
    """An ``mps dataset`` output folder (its parquet shards and ``_manifest.json``), or one parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ResultsError(f"{path}: reading dataset output needs pyarrow (pip install pyarrow)") from None
    folder = path if path.is_dir() else path.parent
    files = sorted(f for f in folder.glob("*.parquet") if not f.name.startswith((".", "_"))) if path.is_dir() \
        else [path]
    manifest = _read_manifest(folder / "_manifest.json") if path.is_dir() else {}
    if not files:
        raise ResultsError(f"{path}: no parquet files (is this an mps dataset output folder?)")
    keys, shards, prompts, errors, scores = [], [], [], [], {}
    rows = 0
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise ResultsError(f"{f}: unreadable parquet ({exc})") from None
        n = table.num_rows
        cols = table.column_names
        dims = [c for c in cols if c not in _DATASET_COLUMNS and _DIM_NAME.match(c)
                and str(table.schema.field(c).type) in ("float", "double", "halffloat")]

        def column(name: str, default=None, cols=cols, table=table, n=n) -> list:
            return table.column(name).to_pylist() if name in cols else [default] * n

        keys += column("key") if "key" in cols else [str(i) for i in range(n)]
        shards += column("shard", default=f.stem)
        prompts += column("prompt")
        errors += column("error")
        for d in dims:
            arr = table.column(d).to_numpy(zero_copy_only=False).astype(np.float64)
            scores.setdefault(d, np.full(rows, np.nan))
            scores[d] = np.concatenate([scores[d], arr])
        for d in scores:
            if d not in dims:
                scores[d] = np.concatenate([scores[d], np.full(n, np.nan)])
        rows += n
    done = manifest.get("shards") or manifest.get("shards_done")
    ds = Dataset(folder=folder, rows=rows, keys=keys, shards=shards, prompts=prompts, errors=errors,
                 scores=order_dims(scores), shards_done=len(done) if isinstance(done, (list, dict)) else None)
    return Results(datasets=[ds], meta=_manifest_meta(manifest), sources=[str(path)])


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _manifest_meta(m: dict) -> Meta:
    """The model settings of a manifest; field names are read leniently (``weights`` may be an object)."""
    weights = m.get("weights")
    identity = m.get("identity") or m.get("weights_identity")
    if isinstance(weights, dict):
        identity = identity or weights.get("identity") or weights.get("sha256")
        weights = weights.get("label") or weights.get("path") or weights.get("source")
    threshold = m.get("mask_threshold", m.get("threshold"))
    conditions = m.get("conditions") or []
    if isinstance(conditions, dict):
        conditions = list(conditions)
    return Meta(weights=None if weights is None else str(weights), identity=None if identity is None else str(identity),
                dtype=None if m.get("dtype") is None else str(m["dtype"]),
                threshold=float(threshold) if is_number(threshold) else None,
                conditions=[str(c) for c in conditions if isinstance(c, str)],
                version=str(m.get("version") or m.get("tool_version") or "") or None)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_number_text(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except ValueError:
        return False


def _clean_dims(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(k, str) and _DIM_NAME.match(k)}


def order_dims(d: dict) -> dict:
    known = [k for k in (*DIMENSIONS, CUSTOM_KEY) if k in d]
    return {k: d[k] for k in known + [k for k in d if k not in known]}


def _short(doc: dict) -> str:
    text = json.dumps(doc, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["Dataset", "Entry", "Meta", "Pair", "ReportSummary", "Results", "Series", "SeriesPoint", "Versus",
           "VersusPrompt", "is_number",
           "order_dims", "parse_results", "read_dataset", "read_result_path", "read_results", "results_from_records"]
