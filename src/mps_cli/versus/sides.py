"""The sides of a versus: what each argument holds, and the prompt of every image.

A side is a folder of images, an ``mps dataset`` output folder (parquet) or a JSONL written by
``mps score``; the last two carry their scores and are never scored again. Images pair by their
path relative to the side without extension (``a/cat_01.png`` ~ ``b/cat_01.jpg``); with a prompts
file, by prompt: every image of A listed under a prompt meets every image of B listed under it
(seeds).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from ..errors import InputError, PromptError

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


#: How images of two sides pair: by name under one prompt, or every A image of a prompt with every B image of it.
BY_NAME, ALL_PAIRS = "by-name", "all-pairs-per-prompt"
PAIRINGS = (BY_NAME, ALL_PAIRS)


@dataclass(frozen=True)
class Lineup:
    """Sides with a prompt on every entry, ready to score and pair.

    ``pairing``: :data:`BY_NAME`, pairs form between images of one name (relative path without extension)
    under one prompt; :data:`ALL_PAIRS`, every A image of a prompt meets every B image of it (seeds).
    ``unlisted`` and ``missing``: per side, images the prompts file does not list, and names it
    lists that the side lacks.
    """

    sides: tuple[Side, ...]
    pairing: str = BY_NAME
    unlisted: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    failed: tuple[Failure, ...] = ()

    @property
    def needs_scoring(self) -> bool:
        """Whether any entry needs the model (so the caller knows whether to load it)."""
        return any(e.path is not None and e.error is None and e.scores is None for s in self.sides for e in s.entries)

    @property
    def by_prompt(self) -> bool:
        """Whether pairs form within a prompt regardless of names."""
        return self.pairing == ALL_PAIRS


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
            scores, bad = _scores_of({k: v for k, v in row.items() if k not in DATASET_META_COLUMNS}, label)
            error = f"{label}: {row['error']}" if row.get("error") else bad
            entries.append(Entry(key=_key_of(key), name=key, label=label, prompt=row.get("prompt"),
                                 scores=None if error else scores, error=error))
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
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is text in JSON
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
        scores, bad = _scores_of(rec["scores"], image)
        entries.append(Entry(_key_of(rel), rel, image, prompt=rec.get("prompt"), scores=None if bad else scores,
                             error=bad))
    return Side(name, "jsonl", tuple(entries))


def _scores_of(values: dict, label: str) -> tuple[dict[str, float], str | None]:
    """The numeric scores of a pre-scored record, and an error when one of them is NaN or infinite
    (it would count as a loss, or win, in every pair). Text and booleans are not scores."""
    scores = {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        return scores, f"{label}: its {bad[0]!r} score is {scores[bad[0]]} (not a finite number); score it again"
    return scores, None


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


def line_up(sides: Sequence[Side], *, prompt: str | None = None, prompts_file: str | os.PathLike | None = None,
            prompt_from: str | None = None, pairing: str = BY_NAME) -> Lineup:
    """Give every folder image a prompt; pre-scored entries keep the prompt they were scored with.

    ``prompts_file`` (JSONL or CSV with image and prompt) names images by their path relative to
    a side, with or without extension, so one file serves every side. Raises :class:`PromptError`
    for a prompts file that cannot be read, ``ValueError`` when a folder side has no prompt source.
    ``pairing`` (one of :data:`PAIRINGS`) is the same for every prompt source.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}: use {' or '.join(PAIRINGS)}")
    names = [s.name for s in sides]
    if len(set(names)) != len(names) or len({os.path.realpath(n) for n in names}) != len(names):
        raise ValueError("the same side is given twice (" + ", ".join(names) + "): a side compared with "
                         "itself ties every pair")
    given = [x for x in (prompt, prompts_file, prompt_from) if x is not None]
    if len(given) > 1:
        raise ValueError("give one prompt source")
    if prompt_from is not None and prompt_from not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {prompt_from!r}: use {' or '.join(PROMPT_SOURCES)}")
    if not given and any(not s.prescored for s in sides):
        raise ValueError("a folder side needs a prompt source")
    if prompts_file is not None:
        return replace(_line_up_file(sides, prompts_file), pairing=pairing)
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
            from ..inputs.prompts import metadata_prompt, sidecar_prompt

            read = sidecar_prompt if prompt_from == "sidecar" else metadata_prompt
            try:
                entries.append(replace(e, prompt=read(e.path)))
            except PromptError as exc:
                entries.append(replace(e, error=str(exc)))
        out.append(replace(side, entries=tuple(entries)))
    return Lineup(tuple(out), pairing=pairing)


def _line_up_file(sides: Sequence[Side], prompts_file: str | os.PathLike) -> Lineup:
    from ..inputs.prompts import read_prompt_file

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
    return Lineup(tuple(out), unlisted=unlisted, missing=missing, failed=tuple(failed))


__all__ = ["ALL_PAIRS", "BY_NAME", "DATASET_META_COLUMNS", "MANIFEST_NAME", "PAIRINGS", "PROMPT_SOURCES", "Entry",
           "Failure", "Lineup", "Side", "SideError", "line_up", "read_side"]
