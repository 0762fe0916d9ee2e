"""Reproduce the paper's accuracies on preference benchmarks (ImageReward, HPD v2, and plain pairs).

Three formats are read:

- ``imagereward``: the ImageReward test file, a JSON list of
  ``{"id", "prompt", "generations": [paths], "ranking": [ints]}`` (rank of each generation, 1 = best).
  Accuracy is pooled over every pair of a prompt whose human ranks differ; a model tie is wrong.
- ``hpdv2``: the HPD v2 test file, a JSON list of ``{"prompt", "image_path": [paths], "rank": [ints]}``.
  Per prompt ``1 - w / (n(n-1)/2)``, ``w`` the pairs the model strictly orders the wrong way
  (a model tie is not wrong), averaged over prompts.
- ``pairs``: JSON lines ``{"prompt", "a", "b", "winner": "a" | "b" | "tie"}``. Accuracy over the
  non-tie pairs; a model tie is wrong.

Scores go through a :class:`ScoreCache` (SQLite) keyed by image content, prompt, condition,
threshold, weights identity and dtype, so an interrupted evaluation resumes where it stopped.
The library never prints: progress goes to a callback, problems into the report.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .constants import DEFAULT_MASK_THRESHOLD, PUBLISHED_ACCURACY
from .errors import InputError, MPSError
from .weights.cachedir import scores_path
from .weights.reader import file_sha256

BENCHMARKS = ("imagereward", "hpdv2", "pairs")
CACHE_SCHEMA = 1
#: Seconds to wait for another process holding the score cache before giving up.
BUSY_TIMEOUT_S = 30

#: ``progress(stage, done, total)``; stage is "hash" (reading images) or "score" (the model).
ProgressFn = Callable[[str, int, int], None]


class BenchmarkError(InputError):
    """A benchmark file is unreadable or an item in it is malformed."""


class CacheError(MPSError):
    """The score cache cannot be opened or written."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One prompt with its images and their human ranks (lower is better; equal ranks tie)."""

    label: str  # where the item is in its file, for messages: "item 3 (id 'x')" or "line 7"
    prompt: str
    images: tuple[str, ...]  # resolved paths
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Benchmark:
    kind: str
    path: str
    items: tuple[BenchmarkItem, ...]


@dataclass(frozen=True)
class Problem:
    """An image that could not be used, and the benchmark item it made us skip."""

    item: str
    image: str
    message: str


@dataclass(frozen=True)
class EvalReport:
    """The accuracy per dimension, and what it was computed over.

    ``accuracy[dim]`` is in [0, 1], or None when no pair could be evaluated. ``items`` counts
    the entries in the file, ``prompts`` the prompts evaluated (distinct prompts for ``pairs``),
    ``pairs`` the pairs the accuracy is over, ``human_ties`` the pairs left out because people
    tied them (ImageReward and pairs only; HPD v2 keeps them as never wrong), ``skipped`` the
    items left out because an image was missing or unreadable. ``scored`` and ``cached`` count
    (image, prompt) scorings done by the model in this run and those served by the cache.
    """

    benchmark: str
    file: str
    accuracy: dict[str, float | None]
    published: float | None  # the paper's figure for MPS (overall), in percent
    items: int
    prompts: int
    pairs: int
    human_ties: int
    skipped: int
    problems: list[Problem]
    scored: int
    cached: int
    weights: str
    weights_identity: str
    dtype: str
    mask_threshold: float
    conditions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``mps eval --json`` document)."""
        return {
            "benchmark": self.benchmark,
            "file": self.file,
            "accuracy": dict(self.accuracy),
            # the paper's figure as a fraction, like ``accuracy``; it is for the overall dimension
            "paper": {} if self.published is None else {"overall": self.published / 100},
            "items": self.items,
            "prompts": self.prompts,
            "pairs": self.pairs,
            "human_ties": self.human_ties,
            "skipped": self.skipped,
            "problems": [{"item": p.item, "image": p.image, "error": p.message} for p in self.problems],
            "scored": self.scored,
            "cached": self.cached,
            "weights": self.weights,
            "weights_identity": self.weights_identity,
            "dtype": self.dtype,
            "mask_threshold": self.mask_threshold,
            "conditions": dict(self.conditions),
        }


# ---------------------------------------------------------------- reading benchmark files

def _resolve(path: str, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else root / p)


def _need(entry: dict, key: str, where: str, kind: type | tuple[type, ...]):
    if key not in entry:
        raise BenchmarkError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BenchmarkError(f"{where}: field {key!r} should be a {name}, not {type(value).__name__}")
    return value


def _str_list(entry: dict, key: str, where: str) -> list[str]:
    values = _need(entry, key, where, list)
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise BenchmarkError(f"{where}: {key}[{i}] should be a non-empty path string")
    return values


def _int_list(entry: dict, key: str, where: str, length: int, paths_key: str) -> list[int]:
    values = _need(entry, key, where, list)
    if len(values) != length:
        raise BenchmarkError(f"{where}: {len(values)} {key} values for {length} {paths_key}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise BenchmarkError(f"{where}: {key}[{i}] should be an integer rank, not {v!r}")
    return [int(v) for v in values]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BenchmarkError(f"{path}: is a directory, not a benchmark file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read ({exc})") from None


def _read_json_list(path: Path) -> list:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a JSON list of items, found {type(data).__name__}")
    return data


def _group_items(path: Path, root: Path, kind: str) -> list[BenchmarkItem]:
    paths_key, ranks_key = ("generations", "ranking") if kind == "imagereward" else ("image_path", "rank")
    items = []
    for n, entry in enumerate(_read_json_list(path), 1):
        where = f"{path}: item {n}"
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{where}: expected an object, found {type(entry).__name__}")
        if kind == "imagereward" and "id" in entry:
            where += f" (id {entry['id']!r})"
        prompt = _need(entry, "prompt", where, str)
        images = _str_list(entry, paths_key, where)
        ranks = _int_list(entry, ranks_key, where, len(images), paths_key)
        label = where.split(": ", 1)[1]
        items.append(BenchmarkItem(label, prompt, tuple(_resolve(p, root) for p in images), tuple(ranks)))
    return items


_WINNER_RANKS = {"a": (1, 2), "b": (2, 1), "tie": (1, 1)}


def _pair_items(path: Path, root: Path) -> list[BenchmarkItem]:
    lines = _read_text(path).splitlines()
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{where}: expected an object, found {type(entry).__name__}")
        prompt = _need(entry, "prompt", where, str)
        a, b = (_need(entry, k, where, str) for k in ("a", "b"))
        winner = _need(entry, "winner", where, str)
        if winner not in _WINNER_RANKS:
            raise BenchmarkError(f"{where}: winner should be \"a\", \"b\" or \"tie\", not {winner!r}")
        items.append(BenchmarkItem(f"line {n}", prompt, (_resolve(a, root), _resolve(b, root)),
                                   _WINNER_RANKS[winner]))
    return items


def load_benchmark(kind: str, path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> Benchmark:
    """Read a benchmark file; image paths resolve against ``images_root`` (default: the file's folder).

    Raises :class:`BenchmarkError` naming the file and the item when anything is malformed.
    Images are not opened here.
    """
    if kind not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {kind!r}: use {', '.join(BENCHMARKS)}")
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent
    items = _pair_items(path, root) if kind == "pairs" else _group_items(path, root, kind)
    return Benchmark(kind, str(path), tuple(items))


# ---------------------------------------------------------------- the metrics

def pooled_pair_accuracy(groups: Iterable[tuple[Sequence[int], Sequence[float]]]) -> tuple[int, int, int]:
    """ImageReward's metric: (correct, pairs, human ties) pooled over groups.

    Every pair of a group whose human ranks differ counts; it is correct when the model scores
    the better-ranked image strictly higher, so a model tie is wrong.
    """
    correct = pairs = ties = 0
    for ranks, scores in groups:
        n = len(ranks)
        for i in range(n):
            for j in range(i + 1, n):
                if ranks[i] == ranks[j]:
                    ties += 1
                    continue
                pairs += 1
                better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                correct += scores[better] > scores[worse]
    return correct, pairs, ties


def inversion_accuracy(ranks: Sequence[int], scores: Sequence[float]) -> float | None:
    """HPD v2's per-prompt metric: ``1 - w / (n(n-1)/2)``, ``w`` the strictly inverted pairs.

    A pair is inverted only when both people and the model order it strictly, and oppositely;
    model ties (and human ties) are not wrong. None for fewer than two images.
    """
    n = len(ranks)
    if n < 2:
        return None
    wrong = 0
    for i in range(n):
        for j in range(i + 1, n):
            human = (ranks[i] < ranks[j]) - (ranks[i] > ranks[j])  # +1: i preferred
            model = (scores[i] > scores[j]) - (scores[i] < scores[j])
            wrong += human * model < 0
    return 1.0 - wrong / (n * (n - 1) / 2)


# ---------------------------------------------------------------- the score cache

def default_cache_path() -> Path:
    """``scores.sqlite`` in mps-cli's cache folder (``$MPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mps-cli``, ...)."""
    return scores_path()


# A score is identified by everything that decides it: what the pixels are (content hash, not
# path), the prompt, the condition text, the mask threshold, the weights and the dtype.
ScoreKey = tuple[str, str, str, float, str, str]


class ScoreCache:
    """Scores in SQLite (WAL), committed in batches so a killed run keeps what it scored.

    ``ScoreCache(None)`` keeps them in memory only. Also remembers file hashes by
    (path, size, mtime) so a second run does not re-read every image.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        try:
            if self.path is None:
                self._db = sqlite3.connect(":memory:")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS scores (
                    image_sha256 TEXT NOT NULL, prompt TEXT NOT NULL, condition TEXT NOT NULL,
                    mask_threshold REAL NOT NULL, weights TEXT NOT NULL, dtype TEXT NOT NULL,
                    score REAL NOT NULL,
                    PRIMARY KEY (image_sha256, prompt, condition, mask_threshold, weights, dtype)
                ) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS files (
                    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                    sha256 TEXT NOT NULL
                ) WITHOUT ROWID;
                """
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(CACHE_SCHEMA),))
            elif row[0] != str(CACHE_SCHEMA):
                raise CacheError(f"{self.path}: score cache schema {row[0]}, expected {CACHE_SCHEMA}", hint="cache")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise self._error("cannot use as a score cache", exc) from exc
        except OSError as exc:
            raise CacheError(f"{self.path}: cannot create the score cache ({exc.strerror or exc})",
                             hint="cache") from exc

    def _error(self, doing: str, exc: sqlite3.DatabaseError) -> CacheError:
        """One line for a database error; a lock held too long by another process is said as such."""
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return CacheError(f"{self.path}: the score cache is locked by another process (waited "
                              f"{BUSY_TIMEOUT_S} s)", hint="cache-locked")
        return CacheError(f"{self.path}: {doing} ({exc})", hint="cache")

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._db.commit()
        finally:
            self._db.close()

    def commit(self) -> None:
        try:
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise self._error("cannot write the score cache", exc) from exc

    def _query(self, sql: str, args: tuple = ()) -> list:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._error("cannot read the score cache", exc) from exc

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM scores")[0][0]

    def get(self, key: ScoreKey) -> float | None:
        """A stored score; a stored value that is not a finite number counts as absent."""
        rows = self._query(
            "SELECT score FROM scores WHERE image_sha256=? AND prompt=? AND condition=? "
            "AND mask_threshold=? AND weights=? AND dtype=?", key)
        value = rows[0][0] if rows else None
        return value if isinstance(value, float) and math.isfinite(value) else None

    def put(self, key: ScoreKey, score: float) -> None:
        """Store one finite score; it is durable after the next :meth:`commit`."""
        if not math.isfinite(score):
            raise ValueError(f"not a finite score: {score}")
        try:
            self._db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, float(score)))
        except sqlite3.DatabaseError as exc:
            raise self._error("cannot write the score cache", exc) from exc

    def sha256(self, path: str) -> str:
        """The content hash of an image file, remembered while its size and mtime stay the same."""
        st = os.stat(path)
        real = os.path.realpath(path)
        rows = self._query("SELECT size, mtime_ns, sha256 FROM files WHERE path=?", (real,))
        if rows and rows[0][0] == st.st_size and rows[0][1] == st.st_mtime_ns:
            return rows[0][2]
        digest = file_sha256(path)
        try:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                             (real, st.st_size, st.st_mtime_ns, digest))
        except sqlite3.DatabaseError as exc:
            raise self._error("cannot write the score cache", exc) from exc
        return digest


# ---------------------------------------------------------------- scoring through the cache

def cache_identity(scorer) -> tuple[str, str]:
    """What names the model in a cache key: (weights identity, precision label)."""
    # The precision label (``bf16/fp32``: image side, text side) keys cached scores.
    return scorer.identity, scorer.precision.label


def hash_images(cache: ScoreCache, paths: Sequence[str], progress: ProgressFn | None = None
                ) -> tuple[dict[str, str], dict[str, str]]:
    """Content hashes of image files: (path -> sha256, path -> why it could not be read)."""
    digests: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for n, path in enumerate(paths, 1):
        try:
            digests[path] = cache.sha256(path)
        except FileNotFoundError:
            unreadable[path] = f"{path}: no such file"
        except IsADirectoryError:
            unreadable[path] = f"{path}: is a directory, not an image"
        except OSError as exc:
            unreadable[path] = f"{path}: cannot read ({exc.strerror or exc})"
        if progress:
            progress("hash", n, len(paths))
    cache.commit()
    return digests, unreadable


@dataclass(frozen=True)
class CachedScores:
    """Scores per (content hash, prompt), keyed by dimension; ``errors`` holds the items the model could
    not score. ``scored`` counts items the model scored in this run, ``cached`` those served whole by the cache."""

    scores: dict[tuple[str, str], dict[str, float]]
    errors: dict[tuple[str, str], str]
    scored: int
    cached: int


def score_cached(scorer, work: Mapping[tuple[str, str], str], keys: Sequence[str], texts: Mapping[str, str],
                 condition: str | None, threshold: float, cache: ScoreCache, batch_size: int | None = None,
                 progress: ProgressFn | None = None) -> CachedScores:
    """Score ``work`` ((content hash, prompt) -> an image file with that content) for ``keys``.

    Cached scores are reused; only missing (item, dimension) scores go through the model, and
    each new score is stored, committed every batch so a killed run keeps what it scored.
    ``texts`` maps each key to its condition text.
    """
    weights, dtype = cache_identity(scorer)
    scores: dict[tuple[str, str], dict[str, float]] = {}
    missing_keys: dict[tuple[str, str], tuple[str, ...]] = {}
    for (digest, prompt) in work:
        have = {}
        for k in keys:
            value = cache.get((digest, prompt, texts[k], threshold, weights, dtype))
            if value is not None:
                have[k] = value
        scores[(digest, prompt)] = have
        if len(have) < len(keys):
            missing_keys[(digest, prompt)] = tuple(k for k in keys if k not in have)
    cached = len(work) - len(missing_keys)

    # One stream per set of missing dimensions (normally one stream for everything).
    streams: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for wk, miss in missing_keys.items():
        streams.setdefault(miss, []).append(wk)
    errors: dict[tuple[str, str], str] = {}
    total, done, pending = len(missing_keys), 0, 0
    commit_every = max(1, int(batch_size or scorer.batch_size))
    if progress:
        progress("score", 0, total)
    try:
        for miss, wks in streams.items():
            todo = [(work[wk], wk[1]) for wk in wks]
            for wk, result in zip(wks, _score_stream(scorer, todo, list(miss), condition, threshold, batch_size),
                                  strict=True):
                if result.ok:
                    for k in miss:
                        value = float(result.scores[k])
                        scores[wk][k] = value
                        cache.put((wk[0], wk[1], texts[k], threshold, weights, dtype), value)
                    pending += 1
                    if pending >= commit_every:
                        cache.commit()
                        pending = 0
                else:
                    errors[wk] = result.error or f"{work[wk]}: could not be scored"
                    del scores[wk]
                done += 1
                if progress:
                    progress("score", done, total)
    finally:
        cache.commit()
    return CachedScores(scores, errors, total - len(errors), cached)


# ---------------------------------------------------------------- evaluation

def _score_stream(scorer, todo: list[tuple[str, str]], keys: list[str], condition: str | None,
                  mask_threshold: float, batch_size: int | None) -> Iterator:
    from .engine.panel import mps_dims

    # Keys are dimensions, or with several models mps.<dim> and judge names (a judge needs no dimension).
    dims, custom = mps_dims(keys)
    cond = condition if custom else None
    return scorer.iter_score([p for p, _ in todo], [q for _, q in todo], dims=dims, condition=cond,
                             mask_threshold=mask_threshold, batch_size=batch_size)


def evaluate(benchmark: Benchmark, scorer, dims: Iterable[str] | None = None, *, condition: str | None = None,
             mask_threshold: float = DEFAULT_MASK_THRESHOLD, cache: ScoreCache | None = None,
             batch_size: int | None = None, progress: ProgressFn | None = None, models=None) -> EvalReport:
    """Score every image of ``benchmark`` (reusing cached scores) and compute its accuracy per dimension.

    Images of all prompts go through the model in one stream, so batches mix prompts. Items
    with a missing or unreadable image are skipped and listed in the report's ``problems``.
    ``models`` (the panel's, see :func:`~mps_cli.engine.panel.keyed_conditions`): accuracy per model key.
    """
    from .engine.panel import keyed_conditions

    conditions = keyed_conditions(models, dims, condition)
    keys = [k for k, _ in conditions]
    texts = dict(conditions)
    threshold = float(mask_threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"mask threshold must be in [0, 1), got {mask_threshold}")
    weights, dtype = cache_identity(scorer)
    own_cache = cache is None
    cache = ScoreCache(None) if own_cache else cache
    try:
        return _evaluate(benchmark, scorer, keys, texts, condition, threshold, weights, dtype, cache,
                         batch_size, progress)
    finally:
        if own_cache:
            cache.close()
        else:
            cache.commit()


def _evaluate(benchmark, scorer, keys, texts, condition, threshold, weights, dtype, cache: ScoreCache,
              batch_size, progress) -> EvalReport:
    # Items without a pair that counts (all tied by people, or a lone image) need no scores.
    if benchmark.kind == "hpdv2":
        relevant = [i for i, item in enumerate(benchmark.items) if len(item.images) >= 2]
    else:
        relevant = [i for i, item in enumerate(benchmark.items) if len(set(item.ranks)) >= 2]
    items_of: dict[str, list[int]] = {}
    for i in relevant:
        for path in dict.fromkeys(benchmark.items[i].images):
            items_of.setdefault(path, []).append(i)
    problems: list[Problem] = []
    bad_items: set[int] = set()

    def drop(path: str, indices: Iterable[int], message: str) -> None:
        for i in indices:
            if i not in bad_items:
                bad_items.add(i)
                problems.append(Problem(benchmark.items[i].label, path, message))

    # Hash every distinct image once; a missing or unreadable file takes its items out.
    digests, unreadable = hash_images(cache, list(items_of), progress)
    for path, message in unreadable.items():
        drop(path, items_of[path], message)

    # Work: distinct (content, prompt) of the usable items; a repeated image is scored once,
    # so identical files get identical scores.
    work: dict[tuple[str, str], str] = {}
    users: dict[tuple[str, str], list[int]] = {}
    for i in relevant:
        if i in bad_items:
            continue
        item = benchmark.items[i]
        for path in item.images:
            wk = (digests[path], item.prompt)
            work.setdefault(wk, path)
            users.setdefault(wk, []).append(i)

    run = score_cached(scorer, work, keys, texts, condition, threshold, cache, batch_size, progress)
    for wk, message in run.errors.items():
        drop(work[wk], users[wk], message)
    scores = run.scores

    used = [benchmark.items[i] for i in relevant if i not in bad_items]
    accuracy: dict[str, float | None] = {}
    pairs = 0
    for k in keys:
        groups = [(item.ranks, [scores[(digests[p], item.prompt)][k] for p in item.images]) for item in used]
        if benchmark.kind == "hpdv2":
            per_prompt = [a for a in (inversion_accuracy(r, s) for r, s in groups) if a is not None]
            accuracy[k] = math.fsum(per_prompt) / len(per_prompt) if per_prompt else None
            pairs = sum(len(r) * (len(r) - 1) // 2 for r, _ in groups)
        else:
            correct, pairs, _ = pooled_pair_accuracy(groups)
            accuracy[k] = correct / pairs if pairs else None

    ties = 0
    if benchmark.kind != "hpdv2":
        for i, item in enumerate(benchmark.items):
            if i not in bad_items:
                ties += sum(a == b for n, a in enumerate(item.ranks) for b in item.ranks[n + 1:])
    prompts = len({item.prompt for item in used}) if benchmark.kind == "pairs" else len(used)
    return EvalReport(
        benchmark=benchmark.kind, file=benchmark.path, accuracy=accuracy,
        published=PUBLISHED_ACCURACY.get(benchmark.kind), items=len(benchmark.items), prompts=prompts,
        pairs=pairs, human_ties=ties, skipped=len(bad_items), problems=problems,
        scored=run.scored, cached=run.cached, weights=scorer.weights, weights_identity=weights, dtype=dtype,
        mask_threshold=threshold, conditions=texts,
    )


__all__ = [
    "BENCHMARKS", "Benchmark", "BenchmarkError", "BenchmarkItem", "CacheError", "CachedScores", "EvalReport",
    "Problem", "ScoreCache", "cache_identity", "default_cache_path", "evaluate", "file_sha256", "hash_images",
    "inversion_accuracy", "load_benchmark", "pooled_pair_accuracy", "score_cached",
]
