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

Scores go through :mod:`mps_cli.scorecache` (SQLite, keyed by image content, prompt, condition,
threshold, weights identity and dtype), so an interrupted evaluation resumes where it stopped.
The library never prints: progress goes to a callback, problems into the report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .constants import DEFAULT_MASK_THRESHOLD, PUBLISHED_ACCURACY
from .errors import InputError
from .scorecache import ProgressFn, ScoreCache, cache_identity, hash_images, score_cached

BENCHMARKS = ("imagereward", "hpdv2", "pairs")


class BenchmarkError(InputError):
    """A benchmark file is unreadable or an item in it is malformed."""


class BenchmarkFormatError(BenchmarkError):
    """A benchmark file given as one format is in another, ``found``."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found


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
    """An image that could not be used, and the benchmark item it made us skip (``message`` names the image
    first, as an image that failed is named by every command)."""

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


#: The key that tells each benchmark format's items apart (to say which format a file given as another is in).
_FORMAT_KEYS = {"imagereward": "generations", "hpdv2": "image_path", "pairs": "winner"}


def _check_format(path: Path, text: str, kind: str) -> None:
    """Raise if ``text``'s first item lacks ``kind``'s key and has another format's: the wrong BENCHMARK."""
    try:
        data = json.loads(text)
        first = data[0] if isinstance(data, list) and data else data
    except json.JSONDecodeError:
        line = next((ln for ln in text.split("\n") if ln.strip()), "")
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            return
    if not isinstance(first, dict) or _FORMAT_KEYS[kind] in first:
        return
    other = next((k for k, key in _FORMAT_KEYS.items() if key in first), None)
    if other is not None:
        article = "an" if other[0] in "aeiou" else "a"
        raise BenchmarkFormatError(f"{path}: {article} {other} benchmark file, not {kind}", other)


def _read_json_list(path: Path, kind: str) -> list:
    text = _read_text(path)
    _check_format(path, text, kind)
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
    for n, entry in enumerate(_read_json_list(path, kind), 1):
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
    text = _read_text(path)
    _check_format(path, text, "pairs")
    lines = text.split("\n")  # not splitlines(): U+2028 is text in JSON
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


# ---------------------------------------------------------------- evaluation

def evaluate(benchmark: Benchmark, scorer, dims: Iterable[str] | None = None, *, condition: str | None = None,
             mask_threshold: float = DEFAULT_MASK_THRESHOLD, cache: ScoreCache | None = None,
             batch_size: int | None = None, progress: ProgressFn | None = None, models=None) -> EvalReport:
    """Score every image of ``benchmark`` (reusing cached scores) and compute its accuracy per dimension.

    Images of all prompts go through the model in one stream, so batches mix prompts. Items
    with a missing or unreadable image are skipped and listed in the report's ``problems``.
    ``models`` (the panel's, see :func:`~mps_cli.engine.panel.keyed_conditions`): accuracy per model key.
    """
    from .engine.panel import keyed_conditions
    from .engine.scorer import check_mask_threshold

    conditions = keyed_conditions(models, dims, condition)
    keys = [k for k, _ in conditions]
    texts = dict(conditions)
    threshold = check_mask_threshold(mask_threshold)
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
    relevant = _relevant(benchmark)
    skipped = _Skipped(benchmark)
    digests, run = _score_items(benchmark, relevant, skipped, scorer, keys, texts, condition, threshold, cache,
                                batch_size, progress)
    used = [benchmark.items[i] for i in relevant if i not in skipped.indices]
    accuracy, pairs = _accuracy(benchmark.kind, used, keys,
                                lambda item, k: [run.scores[(digests[p], item.prompt)][k] for p in item.images])
    ties = 0
    if benchmark.kind != "hpdv2":
        for i, item in enumerate(benchmark.items):
            if i not in skipped.indices:
                ties += sum(a == b for n, a in enumerate(item.ranks) for b in item.ranks[n + 1:])
    prompts = len({item.prompt for item in used}) if benchmark.kind == "pairs" else len(used)
    return EvalReport(
        benchmark=benchmark.kind, file=benchmark.path, accuracy=accuracy,
        published=PUBLISHED_ACCURACY.get(benchmark.kind), items=len(benchmark.items), prompts=prompts,
        pairs=pairs, human_ties=ties, skipped=len(skipped.indices), problems=skipped.problems,
        scored=run.scored, cached=run.cached, weights=scorer.weights, weights_identity=weights, dtype=dtype,
        mask_threshold=threshold, conditions=texts,
    )


def _relevant(benchmark: Benchmark) -> list[int]:
    """The items with a pair that counts (not all tied by people, not a lone image): only they need scores."""
    if benchmark.kind == "hpdv2":
        return [i for i, item in enumerate(benchmark.items) if len(item.images) >= 2]
    return [i for i, item in enumerate(benchmark.items) if len(set(item.ranks)) >= 2]


class _Skipped:
    """The items left out, each once, with the image and the message that took it out."""

    def __init__(self, benchmark: Benchmark):
        self.benchmark = benchmark
        self.indices: set[int] = set()
        self.problems: list[Problem] = []

    def drop(self, path: str, indices: Iterable[int], message: str) -> None:
        for i in indices:
            if i not in self.indices:
                self.indices.add(i)
                self.problems.append(Problem(self.benchmark.items[i].label, path, message))


def _score_items(benchmark, relevant, skipped: _Skipped, scorer, keys, texts, condition, threshold, cache,
                 batch_size, progress):
    """(path -> content hash, the cached-scores run) for the relevant items; an unreadable image, or one
    the model could not score, takes its items out."""
    items_of: dict[str, list[int]] = {}
    for i in relevant:
        for path in dict.fromkeys(benchmark.items[i].images):
            items_of.setdefault(path, []).append(i)
    # An item that lists one image twice pits it against itself: the model ties, which counts as wrong.
    for i in relevant:
        images = benchmark.items[i].images
        repeated = next((p for n, p in enumerate(images) if p in images[:n]), None)
        if repeated is not None:
            skipped.drop(repeated, [i], f"{repeated}: listed twice in one item, so it meets itself; "
                         "fix the benchmark file")
    # Hash every distinct image once.
    digests, unreadable = hash_images(cache, list(items_of), progress)
    for path, message in unreadable.items():
        skipped.drop(path, items_of[path], message)
    # Distinct (content, prompt) of the usable items: a repeated image is scored once, so identical files
    # get identical scores.
    work: dict[tuple[str, str], str] = {}
    users: dict[tuple[str, str], list[int]] = {}
    for i in relevant:
        if i in skipped.indices:
            continue
        item = benchmark.items[i]
        for path in item.images:
            wk = (digests[path], item.prompt)
            work.setdefault(wk, path)
            users.setdefault(wk, []).append(i)
    run = score_cached(scorer, work, keys, texts, condition, threshold, cache, batch_size, progress)
    for wk, message in run.errors.items():
        skipped.drop(work[wk], users[wk], message)
    return digests, run


def _accuracy(kind: str, used: Sequence[BenchmarkItem], keys: Sequence[str], scores_of
              ) -> tuple[dict[str, float | None], int]:
    """The accuracy per dimension by the benchmark's own metric, and the pairs it is over."""
    accuracy: dict[str, float | None] = {}
    pairs = 0
    for k in keys:
        groups = [(item.ranks, scores_of(item, k)) for item in used]
        if kind == "hpdv2":
            per_prompt = [a for a in (inversion_accuracy(r, s) for r, s in groups) if a is not None]
            accuracy[k] = math.fsum(per_prompt) / len(per_prompt) if per_prompt else None
            pairs = sum(len(r) * (len(r) - 1) // 2 for r, _ in groups)
        else:
            correct, pairs, _ = pooled_pair_accuracy(groups)
            accuracy[k] = correct / pairs if pairs else None
    return accuracy, pairs


__all__ = [
    "BENCHMARKS", "Benchmark", "BenchmarkError", "BenchmarkFormatError", "BenchmarkItem", "EvalReport", "Problem",
    "evaluate", "inversion_accuracy", "load_benchmark", "pooled_pair_accuracy",
]
