"""Scores kept in SQLite, keyed by everything that decides them, so a long run resumes and a repeat costs no model time.

``mps eval`` and ``mps versus`` score through :func:`score_cached`: a score is identified by the
image's content (SHA-256, not its path), the prompt, the condition text, the mask threshold, the
weights' identity and the dtype. :class:`ScoreCache` (WAL, committed per batch) also remembers
file hashes by path, size and mtime so a second run does not re-read every image.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import MPSError
from .weights.cachedir import scores_path
from .weights.reader import file_sha256

CACHE_SCHEMA = 1
#: Seconds to wait for another process holding the score cache before giving up.
BUSY_TIMEOUT_S = 30

#: ``progress(stage, done, total)``; stage is "hash" (reading images) or "score" (the model).
ProgressFn = Callable[[str, int, int], None]


class CacheError(MPSError):
    """The score cache cannot be opened or written."""


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
                CREATE TABLE IF NOT EXISTS image_stats (
                    image_sha256 TEXT NOT NULL, version INTEGER NOT NULL, colourfulness REAL NOT NULL,
                    saturation REAL NOT NULL, high_frequency REAL NOT NULL, brightness REAL NOT NULL,
                    dhash INTEGER NOT NULL, PRIMARY KEY (image_sha256, version)
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

    def get_stats(self, digest: str):
        """An image's :class:`~mps_cli.imagestats.ImageStats` by content hash, if measured before."""
        from .imagestats import STATS_VERSION, ImageStats

        rows = self._query("SELECT colourfulness, saturation, high_frequency, brightness, dhash FROM image_stats "
                           "WHERE image_sha256=? AND version=?", (digest, STATS_VERSION))
        if not rows:
            return None
        *values, h = rows[0]
        return ImageStats(*values, dhash=h & (2**64 - 1))  # stored signed: SQLite integers are 64-bit signed

    def put_stats(self, digest: str, stats) -> None:
        """Keep an image's statistics (durable after the next :meth:`commit`)."""
        from .imagestats import STATS, STATS_VERSION

        signed = stats.dhash - 2**64 if stats.dhash >= 2**63 else stats.dhash
        try:
            self._db.execute("INSERT OR REPLACE INTO image_stats VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (digest, STATS_VERSION, *(float(getattr(stats, n)) for n in STATS), signed))
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
    from .engine.scorer import batch_of

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
    commit_every = batch_of(scorer, batch_size)
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


def measure_cached(cache: ScoreCache, files: Mapping[str, str], progress: ProgressFn | None = None
                   ) -> tuple[dict, dict[str, str]]:
    """Image statistics per content hash of ``files`` (hash -> an image file with that content), measured once
    ever: the cache keeps them. Returns (hash -> ImageStats, hash -> why it could not be measured)."""
    from concurrent.futures import ThreadPoolExecutor

    from .engine.preprocess import open_image
    from .errors import ImageError
    from .imagestats import measure

    stats, errors = {}, {}
    todo = []
    for digest, path in files.items():
        found = cache.get_stats(digest)
        if found is None:
            todo.append((digest, path))
        else:
            stats[digest] = found

    def one(item):
        try:
            return measure(open_image(item[1])), None
        except ImageError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mps-stats") as pool:
        for n, ((digest, _), (found, error)) in enumerate(zip(todo, pool.map(one, todo), strict=True), 1):
            if found is None:
                errors[digest] = error
            else:
                stats[digest] = found
                cache.put_stats(digest, found)
            if progress:
                progress("stats", n, len(todo))
    cache.commit()
    return stats, errors


def _score_stream(scorer, todo: list[tuple[str, str]], keys: list[str], condition: str | None,
                  mask_threshold: float, batch_size: int | None) -> Iterator:
    from .engine.panel import mps_dims

    # Keys are dimensions, or with several models mps.<dim> and judge names (a judge needs no dimension).
    dims, custom = mps_dims(keys)
    cond = condition if custom else None
    return scorer.iter_score([p for p, _ in todo], [q for _, q in todo], dims=dims, condition=cond,
                             mask_threshold=mask_threshold, batch_size=batch_size)


__all__ = ["CACHE_SCHEMA", "CacheError", "CachedScores", "ProgressFn", "ScoreCache", "ScoreKey", "cache_identity",
           "default_cache_path", "hash_images", "measure_cached", "score_cached"]
