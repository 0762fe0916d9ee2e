"""One self-contained HTML page of results: galleries, comparisons, win rates and histograms.

Reads what the other commands write (``score``/``rank``/``compare`` JSON, JSONL or CSV,
``versus --json``, an ``mps dataset`` folder) and renders a page that works offline: images
are embedded as thumbnails (or linked by relative path), nothing is fetched from anywhere,
every text is escaped, and a Content-Security-Policy allows only the page's own inline
script and style (by hash) and ``data:`` images.

The page's stable hook for other programs: every image card is an element with class
``mps-card`` and attributes ``data-image``, ``data-prompt`` and one ``data-score-<dim>`` per
scored dimension; the sort control is ``<select id="mps-sort">`` with dimension names as
option values; the filter is ``<input id="mps-filter">``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np

from . import __version__
from .constants import CUSTOM_KEY, DIMENSIONS, DISTRIBUTION, IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS
from .errors import ImageError, ReportError, ResultsError

DEFAULT_THUMB = 256
DEFAULT_MAX_IMAGES = 2000
THUMB_FORMATS = ("webp", "jpeg")
#: Scored images from which a page also shows a histogram per dimension.
HISTOGRAM_MIN = 30
#: Images shown as "top" and as "bottom" for datasets and sampled galleries.
EXTREMES = 12
#: Prompts shown where the two sides of a versus disagree most.
DISAGREE_TOP = 10
ERRORS_LISTED = 500
SAMPLE_SEED = 0
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

    def extend(self, other: Results) -> None:
        self.entries += other.entries
        self.pairs += other.pairs
        self.versus += other.versus
        self.datasets += other.datasets
        self.sources += other.sources
        self.meta.update(other.meta)

    @property
    def empty(self) -> bool:
        return not (self.entries or self.pairs or self.versus or self.datasets)


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
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read ({exc})") from None
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
        for n, line in enumerate(stripped.splitlines(), 1):
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
                 scores=_clean_dims({k: float(v) for k, v in scores.items() if _is_number(v)}),
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
                  unpaired=doc.get("unpaired"), results=results, details=details, failed=failed)


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
                                "results": cells, "per_prompt": details.get((a, b), [])}, origin))
    if out:
        out[0].unpaired = doc.get("unpaired")
        out[0].failed = _versus({"results": {}, "failed": doc.get("failed")}, origin).failed
        ranking = doc.get("ranking") if isinstance(doc.get("ranking"), dict) else {}
        out[0].ranking = {k: [(str(r.get("side")), float(r["strength"])) for r in v
                              if isinstance(r, dict) and _is_number(r.get("strength"))]
                          for k, v in _clean_dims(ranking).items() if isinstance(v, list)}
    return out


def _versus_prompt(d: dict, origin: Path | None) -> VersusPrompt | None:
    prompt = str(d.get("prompt") or "")
    sides = {}
    for side in ("a", "b"):
        raw = d.get(side, d.get(f"{side}_images", d.get(f"images_{side}")))
        side_scores = d.get(f"{side}_scores") or d.get(f"scores_{side}")
        items = raw if isinstance(raw, list) else [raw] if raw is not None else []
        entries = []
        for it in items:
            if isinstance(it, dict) and it.get("image") is not None:
                entries.append(_entry({"prompt": prompt, **it}, origin))
            elif isinstance(it, str):
                sc = side_scores if isinstance(side_scores, dict) else {}
                entries.append(_entry({"image": it, "prompt": prompt, "scores": sc}, origin))
        sides[side] = entries
    diffs: dict[str, float] = {}
    for key in ("mean_diff", "diff"):
        v = d.get(key)
        if isinstance(v, dict):
            diffs.update({k: float(x) for k, x in v.items() if _is_number(x)})
        elif _is_number(v):
            diffs["overall"] = float(v)
    if isinstance(d.get("results"), dict):
        for k, v in d["results"].items():
            if isinstance(v, dict) and _is_number(v.get("mean_diff")):
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
                 scores=_order_dims(scores), shards_done=len(done) if isinstance(done, (list, dict)) else None)
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
                threshold=float(threshold) if _is_number(threshold) else None,
                conditions=[str(c) for c in conditions if isinstance(c, str)],
                version=str(m.get("version") or m.get("tool_version") or "") or None)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_number_text(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except ValueError:
        return False


def _clean_dims(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(k, str) and _DIM_NAME.match(k)}


def _order_dims(d: dict) -> dict:
    known = [k for k in (*DIMENSIONS, CUSTOM_KEY) if k in d]
    return {k: d[k] for k in known + [k for k in d if k not in known]}


def _short(doc: dict) -> str:
    text = json.dumps(doc, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- images


@dataclass
class _Image:
    src: str | None  # a data: URI or a relative URL
    full: str | None  # what "enlarge" shows when it differs (the original, linked)
    problem: str | None


class _Images:
    """Thumbnails (embedded) or relative links, each file done once."""

    def __init__(self, out_dir: Path, thumb: int, fmt: str, link: bool):
        self.out_dir, self.thumb, self.fmt, self.link = Path(os.path.abspath(out_dir)), thumb, fmt, link
        self.done: dict[str, _Image] = {}
        self.unreadable: dict[str, str] = {}

    def prepare(self, requests: Iterable[tuple[str, Path | None, str | None]]) -> None:
        """Make every (label, origin, shard) image ready, decoding in a few threads."""
        todo: dict[str, tuple] = {}
        for label, origin, shard in requests:
            todo.setdefault(self._key(label, origin, shard), (label, origin, shard))
        todo = {k: v for k, v in todo.items() if k not in self.done}
        # The same file under several names (links, ./a vs a) is encoded once.
        by_file: dict[object, list[str]] = {}
        for key, (label, origin, shard) in todo.items():
            path = None if shard is not None or self.link else _locate(label, origin)
            st = path.stat() if path is not None else None
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else key
            by_file.setdefault(ident, []).append(key)
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            firsts = [keys[0] for keys in by_file.values()]
            made = pool.map(lambda k: self._make(*todo[k]), firsts)
            for keys, img in zip(by_file.values(), made, strict=True):
                for key in keys:
                    self.done[key] = img

    def get(self, label: str, origin: Path | None, shard: str | None = None) -> _Image:
        return self.done[self._key(label, origin, shard)]

    @staticmethod
    def _key(label: str, origin: Path | None, shard: str | None) -> str:
        return f"{shard}\0{origin}\0{label}"

    def _make(self, label: str, origin: Path | None, shard: str | None) -> _Image:
        if shard is not None:
            return self._from_shard(label, shard, origin)
        path = _locate(label, origin)
        if path is None:
            return self._bad(label, f"{label}: no such file")
        if self.link:
            url = _relative_url(path, self.out_dir)
            return _Image(src=url, full=url, problem=None)
        try:
            from .engine.preprocess import open_image

            return _Image(src=self._encode(open_image(path)), full=None, problem=None)
        except ImageError as exc:
            return self._bad(label, str(exc))

    def _from_shard(self, key: str, shard: str, origin: Path | None) -> _Image:
        """A dataset row's image, read from its webdataset tar shard when that file is here."""
        from PIL import Image

        from .engine.preprocess import open_image

        path = _locate(shard, origin) or _locate(shard, origin.parent if origin else None)
        if path is None or not tarfile.is_tarfile(path):
            return _Image(src=None, full=None, problem="image is inside its shard")
        try:
            with tarfile.open(path) as tar:
                names = set(tar.getnames())
                member = next((key + ext for ext in sorted(IMAGE_EXTENSIONS) if key + ext in names), None)
                if member is None:
                    return _Image(src=None, full=None, problem="not found in its shard")
                img = Image.open(io.BytesIO(tar.extractfile(member).read()))
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{w}x{h} pixels is over the {MAX_IMAGE_PIXELS // 1_000_000} Mpx limit")
                return _Image(src=self._encode(open_image(img)), full=None, problem=None)
        except (OSError, tarfile.TarError, ImageError, ValueError, Image.DecompressionBombError) as exc:
            return self._bad(f"{shard}:{key}", f"{shard}:{key}: {exc}")

    def _bad(self, label: str, why: str) -> _Image:
        self.unreadable[label] = why
        return _Image(src=None, full=None, problem=why)

    def _encode(self, img) -> str:
        from PIL import Image

        img = img.copy()
        img.thumbnail((self.thumb, self.thumb), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if self.fmt == "webp":
            img.save(buf, "WEBP", quality=72, method=0)  # method 0: half the time, ~15% bigger
        else:
            img.save(buf, "JPEG", quality=80, optimize=True)
        return f"data:image/{self.fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _locate(label: str, origin: Path | None) -> Path | None:
    """The file a result names: as given (relative to the working folder), else beside the results file."""
    p = Path(label)
    for cand in ([p] if p.is_absolute() else [p, *([origin / p] if origin else [])]):
        try:
            if cand.is_file():
                return Path(os.path.abspath(cand))  # not resolve(): links keep the user's folder layout
        except OSError:
            continue
    return None


def _relative_url(path: Path, out_dir: Path) -> str:
    rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
    # quote() encodes ':' too, so no path can turn into a scheme such as javascript:
    return "./" + quote(rel) if not rel.startswith("../") else quote(rel)


# --------------------------------------------------------------------------- rendering


def write_report(path: str | os.PathLike, results: Results, *, thumb: int = DEFAULT_THUMB, thumb_format: str = "webp",
                 link_images: bool = False, max_images: int = DEFAULT_MAX_IMAGES,
                 title: str | None = None) -> ReportSummary:
    """Render ``results`` and write the page to ``path`` (whole or not at all)."""
    path = Path(path)
    html, summary = render_report(results, out_dir=path.parent, thumb=thumb, thumb_format=thumb_format,
                                  link_images=link_images, max_images=max_images, title=title)
    data = html.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return ReportSummary(path=path, cards=summary.cards, images=summary.images, sampled=summary.sampled,
                         unreadable=summary.unreadable, bytes=len(data))


def render_report(results: Results, *, out_dir: str | os.PathLike = ".", thumb: int = DEFAULT_THUMB,
                  thumb_format: str = "webp", link_images: bool = False, max_images: int = DEFAULT_MAX_IMAGES,
                  title: str | None = None) -> tuple[str, ReportSummary]:
    """The page as a string, and what it holds (``path`` and ``bytes`` of the summary are not set)."""
    if thumb_format not in THUMB_FORMATS:
        raise ValueError(f"thumbnail format must be one of {', '.join(THUMB_FORMATS)}")
    return _Page(results, Path(out_dir), thumb, thumb_format, link_images, max_images, title).render()


class _Page:
    def __init__(self, results: Results, out_dir: Path, thumb: int, fmt: str, link: bool, max_images: int,
                 title: str | None):
        self.r = results
        self.images = _Images(out_dir, thumb, fmt, link)
        self.link = link
        self.max_images = max_images
        self.title = title or "MPS report"
        self.cards = 0
        dims: dict[str, None] = {}
        for e in results.entries:
            dims.update(dict.fromkeys(e.scores))
        for p in results.pairs:
            dims.update(dict.fromkeys(p.results))
        for ds in results.datasets:
            dims.update(dict.fromkeys(ds.scores))
        for v in results.versus:
            for d in v.details:
                for e in d.a + d.b:
                    dims.update(dict.fromkeys(e.scores))
        self.dims = list(_order_dims(dict(dims)))
        self.scale = self._scales()

    def _scales(self) -> dict[str, tuple[float, float]]:
        """Per dimension, the range the bars span: every score on the page."""
        values: dict[str, list[float]] = {d: [] for d in self.dims}
        for e in self._all_entries():
            for d, s in e.scores.items():
                values[d].append(s)
        for p in self.r.pairs:
            for d, v in p.results.items():
                values[d] += [x for x in (v.get("a"), v.get("b")) if _is_number(x)]
        for ds in self.r.datasets:
            for d, arr in ds.scores.items():
                finite = arr[np.isfinite(arr)]
                if finite.size:
                    values[d] += [float(finite.min()), float(finite.max())]
        return {d: (min(v), max(v)) for d, v in values.items() if v}

    def _all_entries(self) -> list[Entry]:
        out = list(self.r.entries)
        for v in self.r.versus:
            for d in v.details:
                out += d.a + d.b
        return out

    # ----------------------------------------------------------------- page

    def render(self) -> tuple[str, ReportSummary]:
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

        body = []
        if self.r.versus:
            body += [self._versus(v) for v in self.r.versus]
        if self.r.pairs:
            body.append(self._pairs())
        for ds, ext in zip(self.r.datasets, ds_extremes, strict=True):
            body.append(self._dataset(ds, ext))
        if len(scored) >= HISTOGRAM_MIN:
            body.append(self._section("Distribution", self._histograms(
                {d: [e.scores[d] for e in scored if d in e.scores] for d in self.dims}), "dist"))
        if sampled:
            body.append(self._extremes_section(*extremes, "of all scored images"))
        if gallery:
            body.append(self._gallery(gallery, len(scored), sampled))
        errors = [(e.image, e.error) for e in entries if e.error is not None]
        if errors:
            body.append(self._errors(errors, len(errors)))

        html = self._document("\n".join(body))
        summary = ReportSummary(path=Path(), cards=self.cards, images=len(entries), sampled=sampled,
                                unreadable=tuple(self.images.unreadable.values()), bytes=0)
        return html, summary

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

    def _document(self, body: str) -> str:
        css, js = _CSS, _JS
        img_src = "data: 'self'" if self.link else "data:"
        csp = (f"default-src 'none'; img-src {img_src}; style-src '{_sha256(css)}'; "
               f"script-src '{_sha256(js)}'; base-uri 'none'; form-action 'none'")
        controls = ""
        if self.cards:
            options = "".join(f'<option value="{_e(d)}">{_e(d)}</option>' for d in self.dims)
            controls = (f'<div class="controls"><label>Sort by <select id="mps-sort">{options}</select></label>'
                        '<input id="mps-filter" type="search" placeholder="Filter prompts and file names"'
                        ' autocomplete="off" spellcheck="false"><span id="mps-count"></span></div>')
        sources = ", ".join(self.r.sources)
        return (
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="referrer" content="no-referrer">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(self.title)}</title>\n<style>{css}</style></head>\n<body>\n"
            f'<header><div class="head"><h1>{_e(self.title)}</h1><p class="sub">{self._headline()}</p>'
            f'<p class="src" title="{_e(sources)}">{_e(_ellipsis(sources, 160))}</p></div>{controls}</header>\n'
            f"<main>\n{body}\n</main>\n{self._footer()}\n"
            '<div id="mps-zoom" hidden><figure><img alt=""><figcaption><p class="z-prompt"></p>'
            '<p class="z-image"></p><p class="z-scores"></p></figcaption></figure></div>\n'
            f"<script>{js}</script>\n</body></html>\n"
        )

    def _headline(self) -> str:
        parts = []
        n = len(self.r.entries)
        if n:
            prompts = len({e.prompt for e in self.r.entries if e.error is None})
            failed = sum(e.error is not None for e in self.r.entries)
            parts.append(f"{n:,} image{_s(n)} · {prompts:,} prompt{_s(prompts)}"
                         + (f" · {failed:,} failed" if failed else ""))
        if self.r.pairs:
            parts.append(f"{len(self.r.pairs):,} comparison{_s(len(self.r.pairs))}")
        for v in self.r.versus:
            parts.append(f"versus: {_e(v.a)} vs {_e(v.b)}")
        for ds in self.r.datasets:
            parts.append(f"dataset: {ds.rows:,} rows")
        if self.dims:
            parts.append("dimensions: " + ", ".join(_e(d) for d in self.dims))
        return " · ".join(parts)

    def _footer(self) -> str:
        m = self.r.meta
        items = []
        if m.weights:
            items.append(f"weights <b>{_e(m.weights)}</b>")
        if m.identity:
            items.append(f"identity <code>{_e(m.identity)}</code>")
        if m.dtype:
            items.append(f"dtype <b>{_e(m.dtype)}</b>")
        if m.threshold is not None:
            items.append(f"mask threshold <b>{m.threshold:g}</b>")
        if m.conditions:
            items.append("conditions " + ", ".join(_e(c) for c in m.conditions))
        if m.version:
            items.append(f"scored with {DISTRIBUTION} {_e(m.version)}")
        if not items:
            items.append("model settings not recorded in these results")
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        items.append(f"report by {DISTRIBUTION} {__version__}, {when}")
        note = ("Scores are MPS logits; they compare images for the same prompt. Only a checkpoint trained on "
                "overall preference has been published; other dimensions read it through condition masks.")
        return f'<footer><p>{" · ".join(items)}</p><p class="note">{note}</p></footer>'

    @staticmethod
    def _section(title: str, inner: str, cls: str = "", note: str = "") -> str:
        note_html = f'<p class="note">{note}</p>' if note else ""
        return f'<section class="block {cls}"><h2>{_e(title)}</h2>{note_html}{inner}</section>'

    # ----------------------------------------------------------------- cards

    def _card(self, e: Entry, *, caption: str | None = None, scale_dims: Sequence[str] | None = None) -> str:
        self.cards += 1
        img = self.images.get(e.image, e.origin, e.shard)
        attrs = [f'class="mps-card mps-unit" data-image="{_e(e.image)}" data-prompt="{_e(e.prompt or "")}"']
        attrs += [f'data-score-{d}="{s!r}"' for d, s in e.scores.items()]
        if e.rank is not None:
            attrs.append(f'data-rank="{e.rank}"')
        if e.shard is not None:
            attrs.append(f'data-shard="{_e(e.shard)}"')
        if img.full and img.full != img.src:
            attrs.append(f'data-full="{_e(img.full)}"')
        name = caption if caption is not None else _basename(e.image)
        if img.src:
            # lazy: a page of thousands of thumbnails decodes only those scrolled into view
            thumb = f'<img src="{_e(img.src)}" alt="{_e(name)}" decoding="async" loading="lazy">'
        else:
            thumb = f'<span class="missing">{_e(img.problem or "no image")}</span>'
        rank = f'<span class="rank">#{e.rank}</span>' if e.rank is not None else ""
        bars = "".join(self._bar(d, e.scores[d]) for d in (scale_dims or self.dims) if d in e.scores)
        return (f'<figure {" ".join(attrs)} tabindex="0"><div class="thumb">{thumb}{rank}</div>'
                f'<figcaption><span class="name" title="{_e(e.image)}">{_e(name)}</span>'
                f'<div class="bars">{bars}</div></figcaption></figure>')

    def _bar(self, dim: str, value: float) -> str:
        lo, hi = self.scale.get(dim, (value, value))
        width = 100.0 if hi <= lo else 4.0 + 96.0 * (value - lo) / (hi - lo)
        return (f'<div class="bar-row" data-dim="{_e(dim)}"><span class="dim">{_e(dim)}</span>'
                f'<svg class="bar" viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true">'
                f'<rect class="track" width="100" height="8" rx="2"/><rect class="fill" width="{width:.1f}" height="8"'
                f' rx="2"/></svg><span class="val">{value:.3f}</span></div>')

    # ----------------------------------------------------------------- score / rank

    def _gallery(self, gallery: list[Entry], total: int, sampled: bool) -> str:
        groups: dict[str | None, list[Entry]] = {}
        for e in gallery:
            groups.setdefault(e.prompt, []).append(e)
        first = self._default_dim(gallery)
        html = []
        for prompt, items in groups.items():
            if any(e.rank is not None for e in items) and first == self._rank_dim(items):
                items = sorted(items, key=lambda e: (e.rank is None, e.rank or 0))
            else:
                items = sorted(items, key=lambda e: -e.scores.get(first, -math.inf))
            best = items[0]
            lead = (f"{len(items):,} image{_s(len(items))} · best by {_e(first)}: "
                    f"<b>{_e(_basename(best.image))}</b> ({best.scores.get(first, math.nan):.3f})")
            cards = "".join(self._card(e) for e in items)
            html.append(f'<section class="mps-group" data-prompt="{_e(prompt or "")}">'
                        f'<h3 class="prompt">{_e(prompt or "(no prompt)")}</h3><p class="lead">{lead}</p>'
                        f'<div class="mps-cards" data-sortable="1">{cards}</div></section>')
        note = (f"Showing a random sample of {len(gallery):,} of {total:,} scored images (seed {SAMPLE_SEED}; "
                "a higher image limit shows more); the histograms and top and bottom images use all of them."
                if sampled else "")
        return (f'<section class="block gallery" data-default-sort="{_e(first)}"><h2>Images by prompt, best first'
                f'</h2>{f"<p class=note>{note}</p>" if note else ""}{"".join(html)}</section>')

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

    def _extremes_section(self, top: list[Entry], bottom: list[Entry], what: str, dim: str | None = None) -> str:
        dim = dim or self._default_dim(top + bottom)
        inner = ""
        for label, items in ((f"Top {len(top)}", top), (f"Bottom {len(bottom)}", bottom)):
            if items:
                cards = "".join(self._card(e, caption=e.image if e.shard else None) for e in items)
                inner += (f'<div class="mps-group" data-prompt=""><h3>{_e(label)} by {_e(dim)}, {_e(what)}</h3>'
                          f'<div class="mps-cards" data-sortable="1">{cards}</div></div>')
        return self._section("Top and bottom", inner, "extremes")

    # ----------------------------------------------------------------- histograms

    def _histograms(self, values: dict[str, Sequence[float]]) -> str:
        figs = [_histogram_svg(d, v) for d, v in values.items() if len(v)]
        return f'<div class="hists">{"".join(figs)}</div>'

    # ----------------------------------------------------------------- errors

    def _errors(self, errors: list[tuple[str, str]], total: int) -> str:
        rows = "".join(f"<tr><td>{_e(img)}</td><td>{_e(msg)}</td></tr>" for img, msg in errors[:ERRORS_LISTED])
        more = f'<p class="note">… and {total - ERRORS_LISTED:,} more.</p>' if total > ERRORS_LISTED else ""
        return self._section(f"Failed ({total:,})", f'<table class="errors"><thead><tr><th>image</th><th>error</th>'
                             f"</tr></thead><tbody>{rows}</tbody></table>{more}", "failed")

    # ----------------------------------------------------------------- compare

    def _pairs(self) -> str:
        html = []
        for p in self.r.pairs:
            a = Entry(image=p.a, prompt=p.prompt, scores={d: v["a"] for d, v in p.results.items() if _is_number(
                v.get("a"))}, origin=p.origin)
            b = Entry(image=p.b, prompt=p.prompt, scores={d: v["b"] for d, v in p.results.items() if _is_number(
                v.get("b"))}, origin=p.origin)
            rows = []
            for d, v in p.results.items():
                pa = v.get("p_a")
                if not _is_number(pa):
                    continue
                winner = v.get("winner")
                tag = {"a": "A preferred", "b": "B preferred", "tie": "tie"}.get(winner, "")
                rows.append(
                    f'<tr><th>{_e(d)}</th><td class="num">{_num(v.get("a"))}</td>'
                    f'<td class="split"><svg viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true">'
                    f'<rect class="pa" width="{100 * pa:.1f}" height="10"/><rect class="pb" x="{100 * pa:.1f}" '
                    f'width="{100 * (1 - pa):.1f}" height="10"/><line x1="50" x2="50" y1="0" y2="10"/></svg>'
                    f'<span>P(A) = {pa:.3f}</span></td><td class="num">{_num(v.get("b"))}</td>'
                    f'<td class="win win-{_e(str(winner))}">{tag}</td></tr>')
            table = (f'<table class="cmp"><thead><tr><th></th><th>A</th><th>P(A preferred)</th><th>B</th><th></th>'
                     f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')
            html.append(f'<div class="mps-pair mps-unit"><h3 class="prompt">{_e(p.prompt)}</h3><div class="pair">'
                        f'<div class="side side-a"><span class="tag">A</span>{self._card(a)}</div>'
                        f'<div class="mid">{table}</div>'
                        f'<div class="side side-b"><span class="tag">B</span>{self._card(b)}</div>'
                        f"</div></div>")
        return self._section("Comparisons", "".join(html), "compare")

    # ----------------------------------------------------------------- versus

    def _versus(self, v: Versus) -> str:
        facts = []
        if v.prompts is not None:
            facts.append(f"{v.prompts:,} prompts")
        if v.pairs is not None:
            facts.append(f"{v.pairs:,} pairs")
        unpaired = _unpaired_text(v.unpaired)
        if unpaired:
            facts.append(f"unpaired: {_e(unpaired)}")
        head = (f'<p class="lead"><span class="tag">A</span> <b>{_e(v.a)}</b> &nbsp;vs&nbsp; '
                f'<span class="tag tag-b">B</span> <b>{_e(v.b)}</b>' + (" · " + " · ".join(facts) if facts else "")
                + "</p>")
        chart = _winrate_svg(v.results)
        explain = ('<p class="note">Win rate of A per dimension (ties count half) with its 95% bootstrap interval '
                   "over prompts; an interval that does not cross 50% is a real difference. Δ is the mean score "
                   "difference A − B.</p>")
        detail = ""
        top = self._disagree(v)
        if top:
            rows = []
            for d in top:
                diff = " · ".join(f"Δ {_e(k)} {x:+.3f}" for k, x in d.diffs.items())
                a = "".join(self._card(e) for e in d.a) or '<p class="missing">no image</p>'
                b = "".join(self._card(e) for e in d.b) or '<p class="missing">no image</p>'
                rows.append(f'<div class="mps-pair mps-unit"><h3 class="prompt">{_e(d.prompt)}</h3>'
                            f'<p class="lead">{diff}</p><div class="pair vs">'
                            f'<div class="side side-a"><span class="tag">A</span><div class="mps-cards">{a}</div></div>'
                            f'<div class="side side-b"><span class="tag tag-b">B</span><div class="mps-cards">{b}</div>'
                            f"</div></div></div>")
            dim = self._disagree_dim(v)
            detail = (f"<h3>Where A and B disagree most (by |Δ {_e(dim)}|)</h3>" + "".join(rows))
        elif not v.details:
            detail = '<p class="note">No per-prompt details in this file (the comparison was saved without them).</p>'
        html = self._section("Versus", self._ranking(v.ranking) + head + chart + explain + detail, "versus")
        if v.failed:
            html += self._errors(v.failed, len(v.failed))
        return html

    @staticmethod
    def _ranking(ranking: dict[str, list]) -> str:
        if not ranking:
            return ""
        rows = "".join(f"<tr><th>{_e(k)}</th><td>" + " &gt; ".join(f"<b>{_e(side)}</b> {strength:.3f}"
                                                                    for side, strength in v) + "</td></tr>"
                       for k, v in ranking.items())
        return ('<h3>Ranking by Bradley-Terry strength (strengths sum to 1)</h3>'
                f'<table class="cmp ranking"><tbody>{rows}</tbody></table>')

    def _disagree_dim(self, v: Versus) -> str:
        for d in (*v.results, *self.dims):
            if any(d in x.diffs for x in v.details):
                return d
        return "overall"

    def _disagree(self, v: Versus) -> list[VersusPrompt]:
        dim = self._disagree_dim(v)
        return sorted((x for x in v.details if dim in x.diffs), key=lambda x: -abs(x.diffs[dim]))[:DISAGREE_TOP]

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

    def _dataset(self, ds: Dataset, ext) -> str:
        failed = [(f"{s} · {k}", str(e)) for k, s, e in zip(ds.keys, ds.shards, ds.errors, strict=True)
                  if e is not None]
        scored = ds.rows - len(failed)
        shards = len(set(ds.shards))
        facts = f"{ds.rows:,} rows in {shards:,} shard{_s(shards)} · {scored:,} scored · {len(failed):,} failed"
        if ds.shards_done is not None:
            facts += f" · manifest: {ds.shards_done:,} shards done"
        inner = f'<p class="lead">{_e(str(ds.folder))} · {facts}</p>'
        inner += self._histograms({d: a[np.isfinite(a)] for d, a in ds.scores.items()})
        top, bottom, dim = ext
        html = self._section(f"Dataset: {ds.folder.name}", inner, "dataset")
        if top or bottom:
            html += self._extremes_section(top, bottom, "of the dataset", dim)
        if failed:
            html += self._errors(failed, len(failed))
        return html


# --------------------------------------------------------------------------- SVG charts


def _histogram_svg(dim: str, values) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return ""
    w, h, pad_l, pad_b, pad_t = 320, 118, 8, 24, 6
    bins = int(min(40, max(8, math.sqrt(v.size))))
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    top = counts.max() or 1
    plot_w, plot_h = w - 2 * pad_l, h - pad_b - pad_t
    bw = plot_w / bins
    rects = "".join(
        f'<rect x="{pad_l + i * bw + 0.5:.1f}" y="{pad_t + plot_h * (1 - c / top):.1f}" width="{max(bw - 1, 0.5):.1f}"'
        f' height="{plot_h * c / top:.1f}"><title>{edges[i]:.3f} – {edges[i + 1]:.3f}: {c:,}</title></rect>'
        for i, c in enumerate(counts))
    mean, median = float(v.mean()), float(np.median(v))

    def x(val: float) -> float:
        return pad_l + plot_w * (val - lo) / (hi - lo)

    base = pad_t + plot_h
    marks = (f'<line class="median" x1="{x(median):.1f}" x2="{x(median):.1f}" y1="{pad_t}" y2="{base}"/>'
             f'<line class="axis" x1="{pad_l}" x2="{w - pad_l}" y1="{base}" y2="{base}"/>'
             f'<text x="{pad_l}" y="{base + 15}">{lo:.2f}</text>'
             f'<text x="{w - pad_l}" y="{base + 15}" text-anchor="end">{hi:.2f}</text>'
             f'<text x="{x(median):.1f}" y="{base + 15}" text-anchor="middle" class="m">median {median:.2f}</text>')
    return (f'<figure class="hist"><figcaption><b>{_e(dim)}</b> <span>n = {v.size:,} · mean {mean:.3f} · '
            f'sd {float(v.std()):.3f}</span></figcaption><svg viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="histogram of {_e(dim)}">{rects}{marks}</svg></figure>')


def _winrate_svg(results: dict[str, dict]) -> str:
    rows = [(d, r) for d, r in results.items() if _is_number(r.get("win_rate"))]
    if not rows:
        return ""
    label_w, plot_w, right_w, row_h, top_pad = 110, 400, 250, 34, 26
    w = label_w + plot_w + right_w
    h = top_pad + row_h * len(rows) + 10

    def x(p: float) -> float:
        return label_w + plot_w * min(max(p, 0.0), 1.0)

    grid = "".join(f'<line class="grid{" half" if t == 0.5 else ""}" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top_pad - 6}"'
                   f' y2="{h - 8}"/><text x="{x(t):.1f}" y="{top_pad - 10}" text-anchor="middle">{t:.0%}</text>'
                   for t in (0, 0.25, 0.5, 0.75, 1))
    body = []
    for i, (d, r) in enumerate(rows):
        y = top_pad + row_h * i + row_h / 2
        wr = float(r["win_rate"])
        ci = r.get("ci95") if isinstance(r.get("ci95"), (list, tuple)) and len(r["ci95"]) == 2 else None
        lo, hi = (float(ci[0]), float(ci[1])) if ci and all(_is_number(c) for c in ci) else (wr, wr)
        cls = "a" if lo > 0.5 else "b" if hi < 0.5 else "even"
        diff = r.get("mean_diff")
        txt = f"{wr:.1%}" + (f" [{lo:.1%}, {hi:.1%}]" if ci else "")
        txt += f"  Δ {diff:+.3f}" if _is_number(diff) else ""
        body.append(
            f'<g class="row {cls}">'
            f'<text class="dim" x="{label_w - 10}" y="{y + 4:.1f}" text-anchor="end">{_e(d)}</text>'
            f'<rect class="ci" x="{x(lo):.1f}" y="{y - 6:.1f}" width="{max(x(hi) - x(lo), 1):.1f}" height="12" rx="3"/>'
            f'<line class="whisk" x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<circle cx="{x(wr):.1f}" cy="{y:.1f}" r="5.5"/>'
            f'<text class="val" x="{label_w + plot_w + 12}" y="{y + 4:.1f}">{_e(txt)}</text></g>')
    return (f'<svg class="winrate" viewBox="0 0 {w} {h}" role="img" aria-label="win rate of A per dimension">'
            f'{grid}{"".join(body)}</svg>')


# --------------------------------------------------------------------------- small helpers


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _num(v) -> str:
    return f"{v:.3f}" if _is_number(v) else "–"


def _basename(label: str) -> str:
    return label.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or label


def _ellipsis(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _unpaired_text(u: object) -> str:
    if isinstance(u, dict):
        return ", ".join(f"{k}: {len(v) if isinstance(v, (list, dict)) else v}" for k, v in u.items())
    if isinstance(u, (list, tuple)):
        return f"{len(u):,}"
    return "" if u in (None, 0) else str(u)


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


_CSS = """
:root{--bg:#f5f6f8;--card:#fff;--ink:#1d2330;--muted:#5d6678;--line:#e2e5ea;--a:#2f6fde;--b:#e07b24;--fill:#2f6fde;
--track:#e8ecf3;--good:#1f9d55;--bad:#c53030;color-scheme:light}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:12px 24px;
display:flex;flex-wrap:wrap;gap:10px 24px;align-items:center;justify-content:space-between}
h1{font-size:19px;margin:0}.sub{margin:2px 0 0;color:var(--muted)}.src{margin:0;color:var(--muted);font-size:12px}
.controls{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
select,input{font:inherit;padding:5px 8px;border:1px solid #c9ced8;border-radius:6px;background:#fff}
#mps-filter{width:240px}#mps-count{color:var(--muted);font-size:12px;min-width:110px}
main{padding:8px 24px 24px;max-width:1500px;margin:0 auto}
.block{margin:18px 0}.block>h2{font-size:16px;margin:0 0 8px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:14px;margin:16px 0 6px}.prompt{font-weight:600;word-break:break-word}
.lead{margin:0 0 8px;color:var(--muted)}.note{color:var(--muted);font-size:12.5px;margin:4px 0 10px}
.mps-cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.mps-card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden;
display:flex;flex-direction:column;box-shadow:0 1px 2px rgba(20,30,50,.06);outline:none;
content-visibility:auto;contain-intrinsic-size:auto 190px auto 284px}
.mps-card:focus-visible{box-shadow:0 0 0 3px rgba(47,111,222,.45)}
.thumb{position:relative;height:170px;display:flex;align-items:center;justify-content:center;cursor:zoom-in;
background:#eef0f4 repeating-conic-gradient(#e6e9ee 0 25%,#f2f4f7 0 50%) 0 0/16px 16px}
.thumb img{max-width:100%;max-height:100%;object-fit:contain;display:block}
.missing{color:var(--bad);font-size:12px;padding:10px;text-align:center;word-break:break-word}
.rank{position:absolute;top:6px;left:6px;background:rgba(20,25,35,.78);color:#fff;font-size:12px;font-weight:600;
padding:1px 7px;border-radius:10px}
figcaption{padding:7px 9px 9px}.name{display:block;font-size:12.5px;font-weight:600;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis;margin-bottom:4px}
.bar-row{display:grid;grid-template-columns:66px 1fr 52px;gap:6px;align-items:center;font-size:11.5px;
color:var(--muted)}
.bar-row .val{text-align:right;font-variant-numeric:tabular-nums;color:var(--ink)}
.bar{width:100%;height:8px;display:block}.bar .track{fill:var(--track)}.bar .fill{fill:#9db5e0}
.bar-row.on .fill{fill:var(--fill)}.bar-row.on .dim{color:var(--ink);font-weight:600}
.mps-group{margin:0 0 18px}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.hist{margin:0;background:#fff;border:1px solid var(--line);border-radius:10px;padding:8px 10px}
.hist figcaption{padding:0 0 4px}.hist figcaption span{color:var(--muted);font-size:12px}
.hist svg{width:100%;height:auto;display:block}.hist rect{fill:#7ea2e6}.hist rect:hover{fill:var(--a)}
.hist text{font-size:10.5px;fill:var(--muted)}.hist .m{fill:var(--ink)}
.hist .median{stroke:var(--b);stroke-width:1.5;stroke-dasharray:3 2}.hist .axis{stroke:#9aa3b2}
table{border-collapse:collapse;background:#fff}
.errors{width:100%;border:1px solid var(--line);font-size:12.5px}
.errors th,.errors td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top;
word-break:break-word}.errors td:last-child{color:var(--bad)}
.mps-pair{background:#fff;border:1px solid var(--line);border-radius:12px;padding:4px 14px 14px;margin:0 0 14px}
.pair{display:grid;grid-template-columns:minmax(150px,230px) minmax(0,1fr) minmax(150px,230px);
grid-template-areas:"a mid b";gap:14px;align-items:start}.side-a{grid-area:a}.side-b{grid-area:b}.mid{grid-area:mid}
.pair.vs{grid-template-columns:1fr 1fr;grid-template-areas:"a b"}.side{position:relative;min-width:0}
.side .mps-card{box-shadow:none}.side .mps-cards{grid-template-columns:repeat(auto-fill,minmax(150px,220px))}
.tag{display:inline-block;background:var(--a);color:#fff;font-weight:700;font-size:11px;border-radius:4px;
padding:0 6px;margin:0 0 4px}.side-b .tag,.tag-b{background:var(--b)}
.cmp{width:100%;font-size:13px}.cmp th,.cmp td{padding:5px 6px;border-bottom:1px solid var(--line)}
.cmp thead th{color:var(--muted);font-weight:600;font-size:12px}.cmp tbody th{text-align:left}
.num{text-align:right;font-variant-numeric:tabular-nums}
.split{min-width:90px;width:40%}
.split svg{width:100%;height:10px;display:block;border-radius:3px}
.split span{font-size:11.5px;color:var(--muted)}.pa{fill:var(--a)}.pb{fill:var(--b)}.split line{stroke:#fff}
.win{font-weight:600;white-space:nowrap}.win-a{color:var(--a)}.win-b{color:var(--b)}.win-tie{color:var(--muted)}
.winrate{width:100%;max-width:820px;height:auto;display:block;background:#fff;border:1px solid var(--line);
border-radius:10px;margin:6px 0}
.winrate text{font-size:11px;fill:var(--muted)}.winrate .dim{font-size:13px;fill:var(--ink);font-weight:600}
.winrate .val{font-size:12.5px;fill:var(--ink);font-variant-numeric:tabular-nums}
.winrate .grid{stroke:#e3e6eb}.winrate .half{stroke:#9aa3b2;stroke-dasharray:4 3}
.winrate .ci{fill:#c9d3e3}.winrate .whisk{stroke:#6b778c;stroke-width:1.5}.winrate circle{fill:#6b778c}
.winrate .a .ci{fill:#c6d8f7}.winrate .a circle{fill:var(--a)}.winrate .b .ci{fill:#f6d9c0}
.winrate .b circle{fill:var(--b)}
footer{border-top:1px solid var(--line);padding:12px 24px 20px;color:var(--muted);font-size:12.5px;background:#fff}
footer p{margin:2px 0;word-break:break-word}footer code{font-size:11.5px}
#mps-zoom{position:fixed;inset:0;z-index:10;background:rgba(12,16,24,.86);display:flex;align-items:center;
justify-content:center;padding:24px;cursor:zoom-out}
#mps-zoom figure{margin:0;max-width:min(1100px,96vw);max-height:94vh;display:flex;flex-direction:column;
align-items:center;gap:10px}
#mps-zoom img{max-width:100%;max-height:78vh;min-width:min(512px,90vw);object-fit:contain;image-rendering:auto;
background:#fff;border-radius:6px}
#mps-zoom figcaption{color:#eef1f6;text-align:center;max-width:900px}#mps-zoom p{margin:2px 0;word-break:break-word}
#mps-zoom .z-image,#mps-zoom .z-scores{color:#b8c0cf;font-size:12.5px}
@media (max-width:860px){.pair{grid-template-columns:1fr 1fr;grid-template-areas:"a b" "mid mid"}}
@media (max-width:520px){.pair,.pair.vs{grid-template-columns:1fr;grid-template-areas:"a" "b" "mid"}
#mps-filter{width:100%}}
"""

_JS = """
(() => {
  const sort = document.getElementById('mps-sort');
  const filter = document.getElementById('mps-filter');
  const count = document.getElementById('mps-count');
  const zoom = document.getElementById('mps-zoom');
  const cards = Array.from(document.querySelectorAll('.mps-card'));
  const score = (card, dim) => {
    const v = parseFloat(card.getAttribute('data-score-' + dim));
    return Number.isFinite(v) ? v : -Infinity;
  };
  function sortBy(dim) {
    document.querySelectorAll('[data-sortable]').forEach((box) => {
      const items = Array.from(box.children);
      items.sort((x, y) => {
        const a = score(x, dim), b = score(y, dim);
        return a === b ? 0 : (a < b ? 1 : -1);
      });
      const frag = document.createDocumentFragment();
      items.forEach((c) => frag.appendChild(c));
      box.appendChild(frag);
    });
    document.querySelectorAll('.bar-row').forEach((r) => r.classList.toggle('on', r.dataset.dim === dim));
  }
  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    document.querySelectorAll('.mps-unit').forEach((unit) => {
      const own = unit.classList.contains('mps-card') ? [unit] : Array.from(unit.querySelectorAll('.mps-card'));
      const hit = !q || own.some((c) => ((c.dataset.prompt || '') + '\\n' + (c.dataset.image || ''))
        .toLowerCase().includes(q));
      unit.hidden = !hit;
    });
    document.querySelectorAll('.mps-group').forEach((g) => {
      g.hidden = !g.querySelector('.mps-unit:not([hidden])');
    });
    const shown = cards.filter((c) => !c.closest('[hidden]')).length;
    count.textContent = shown + ' of ' + cards.length + ' images';
  }
  function open(card) {
    const img = card.querySelector('img');
    if (!img) return;
    const z = zoom.querySelector('img');
    z.src = card.dataset.full || img.src;
    zoom.querySelector('.z-prompt').textContent = card.dataset.prompt || '';
    zoom.querySelector('.z-image').textContent = card.dataset.image || '';
    zoom.querySelector('.z-scores').textContent = Array.from(card.attributes)
      .filter((a) => a.name.startsWith('data-score-'))
      .map((a) => a.name.slice(11) + ' ' + parseFloat(a.value).toFixed(3)).join('   ');
    zoom.hidden = false;
  }
  document.addEventListener('click', (ev) => {
    if (!zoom.hidden) { zoom.hidden = true; return; }
    const t = ev.target.closest('.thumb');
    if (t) open(t.closest('.mps-card'));
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') zoom.hidden = true;
    else if (ev.key === 'Enter' && ev.target.classList && ev.target.classList.contains('mps-card')) open(ev.target);
  });
  if (sort) {
    const gallery = document.querySelector('[data-default-sort]');
    const first = gallery ? gallery.dataset.defaultSort : sort.value;
    if (Array.from(sort.options).some((o) => o.value === first)) sort.value = first;
    sort.addEventListener('change', () => sortBy(sort.value));
    document.querySelectorAll('.bar-row').forEach((r) => r.classList.toggle('on', r.dataset.dim === sort.value));
  }
  if (filter) { filter.addEventListener('input', applyFilter); applyFilter(); }
})();
"""
