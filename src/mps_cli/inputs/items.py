"""Which images to score and with which prompt, resolved and checked before any model is loaded.

Arguments name files, folders, or ``-`` for paths read from a stream (one per line, or
NUL-separated as ``find -print0`` writes them). Everything that can go wrong with one input
(a missing file, a name the OS refuses, a folder without images, an image without a prompt)
becomes that input's :class:`Item` error; nothing here raises for a single input.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO

from ..constants import IMAGE_EXTENSIONS
from ..errors import PromptError
from .prompts import (
    PROMPT_FILE_SUFFIXES,
    MissingPromptError,
    metadata_prompt,
    read_prompt_file,
    sidecar_prompt,
    text_problem,
)


class Problem(str, Enum):
    """Why an input cannot be scored, where the caller may have a remedy to suggest."""

    MISSING = "missing"
    EMPTY_FOLDER = "empty-folder"  # no images directly in it, but sub-folders, which were not searched
    NUL_IN_PATH = "nul-in-path"  # a path with a NUL byte: NUL-separated input read as lines
    NO_CAPTION = "no-caption"  # the sidecar source: no caption file beside this image (or an empty one)
    NO_METADATA_PROMPT = "no-metadata-prompt"  # the metadata source: no generator prompt in this image
    PROMPTS_FILE = "prompts-file"  # a .jsonl, .json or .csv given as an image: meant as the prompts file
    OTHER = "other"


@dataclass
class Item:
    """One input: its label as given, where it is, its prompt, or why it cannot be scored."""

    label: str
    path: Path | None
    prompt: str | None = None
    error: str | None = None
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, message: str, problem: Problem = Problem.OTHER) -> None:
        self.error, self.problem = message, problem


class PromptSource(str, Enum):
    """Where each image's prompt comes from when it is not given once for all."""

    sidecar = "sidecar"
    metadata = "metadata"


def read_path_list(stream: IO[str], null: bool = False) -> list[str]:
    """Paths from a stream: one per line (blank lines skipped), or NUL-separated with ``null``."""
    text = stream.read()
    if null:
        return [p for p in text.split("\0") if p.strip("\n")]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files in a folder, sorted; unreadable entries and names the OS refuses are skipped."""
    found: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            if current is folder:
                raise
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(Path(entry.path))
            except OSError:
                continue
    return sorted(found)


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long for this system"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return exc.strerror or str(exc)


def expand(args: Iterable[str], recursive: bool = False, stdin: IO[str] | None = None,
           null: bool = False) -> list[Item]:
    """Items for image arguments: files as given, folders as their image files, ``-`` as paths from ``stdin``."""
    items: list[Item] = []
    for arg in args:
        if arg == "-":
            if stdin is None:
                raise ValueError("'-' needs a stream to read paths from")
            paths = read_path_list(stdin, null)
            items.extend(Item(label=p, path=None) for p in paths)
            if not paths:  # as a folder without images is: an input that gave nothing to score
                items.append(Item(label=arg, path=None, error="-: no paths on stdin"))
            continue
        items.append(Item(label=arg, path=None))
    out: list[Item] = []
    for it in items:
        out.extend(_resolve(it, recursive) if it.ok else [it])
    return out


def files(args: Iterable[str]) -> list[Item]:
    """One item per argument, each an image file (a folder is that item's error)."""
    out = []
    for arg in args:
        it = Item(label=arg, path=None if "\0" in arg else Path(arg))
        if it.path is None:
            it.fail(f"{_printable(arg)}: path contains a NUL byte", Problem.NUL_IN_PATH)
        out.append(_check_file(it))
    return out


def _as_pattern(arg: str) -> str:
    """What a missing path with ``*``, ``?`` or ``[`` most likely was: a shell pattern that matched nothing
    (the shell then passes it as it is), or one quoted, so that no shell expanded it."""
    if not any(c in arg for c in "*?["):
        return ""
    try:
        matches = glob.glob(arg)
    except (OSError, ValueError):
        return ""
    if matches:
        return " (a pattern, which mps does not expand: leave it unquoted for the shell to, or give the folder)"
    return " (and, read as a pattern, it matches none)"


def _resolve(it: Item, recursive: bool) -> list[Item]:
    arg = it.label
    if "\0" in arg:
        it.fail(f"{_printable(arg)}: path contains a NUL byte", Problem.NUL_IN_PATH)
        return [it]
    p = Path(arg)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            it.fail(f"{arg}: no such file{_as_pattern(arg)}", Problem.MISSING)
        else:
            it.fail(f"{arg}: {_describe_os_error(exc)}")
        return [it]
    if not stat.S_ISDIR(st.st_mode):
        it.path = p
        return [_check_file(it, st)]
    try:
        found = _folder_images(p, recursive)
    except OSError as exc:
        it.fail(f"{arg}: cannot list folder ({_describe_os_error(exc)})")
        return [it]
    if not found:
        _fail_empty_folder(it, p, recursive)
        return [it]
    return [Item(label=os.path.join(arg, str(f.relative_to(p))), path=f) for f in found]


def _fail_empty_folder(it: Item, folder: Path, recursive: bool) -> None:
    """Say what was looked for; only a folder with sub-folders left unsearched is :attr:`Problem.EMPTY_FOLDER`
    (a remedy of searching deeper would point nowhere for the others)."""
    kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    if recursive:
        it.fail(f"{it.label}: no images in this folder or below (looked for {kinds})")
        return
    try:
        entries = list(os.scandir(folder))
    except OSError:
        entries = []
    if any(_is_dir(e) for e in entries):
        it.fail(f"{it.label}: no images directly in this folder (looked for {kinds}; sub-folders not searched)",
                Problem.EMPTY_FOLDER)
    elif entries:
        it.fail(f"{it.label}: no images in this folder (looked for {kinds}) and no sub-folders")
    else:
        it.fail(f"{it.label}: no images: the folder is empty")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _check_file(it: Item, st: os.stat_result | None = None) -> Item:
    """Fail the item now if its file cannot be an image we can read (missing, not a file, unreadable)."""
    if it.error is not None or it.path is None:
        return it
    try:
        st = st or os.stat(it.path)
    except ValueError:
        it.fail(f"{_printable(it.label)}: path contains a NUL byte", Problem.NUL_IN_PATH)
        return it
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            it.fail(f"{it.label}: no such file", Problem.MISSING)
        else:
            it.fail(f"{it.label}: {_describe_os_error(exc)}")
        return it
    if stat.S_ISDIR(st.st_mode):
        it.fail(f"{it.label}: is a folder, not an image")
    elif not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or never end: refuse it without opening it.
        it.fail(f"{it.label}: not a regular file")
    elif not os.access(it.path, os.R_OK):
        it.fail(f"{it.label}: permission denied")
    elif it.path.suffix.lower() in PROMPT_FILE_SUFFIXES:
        it.fail(f"{it.label}: a {it.path.suffix.lower().lstrip('.').upper()} file, not an image",
                Problem.PROMPTS_FILE)
    return it


def from_prompt_file(path: str | os.PathLike) -> list[Item]:
    """Items listed by a prompts file (see :func:`mps_cli.inputs.prompts.read_prompt_file`), each checked.

    Raises :class:`PromptError` when the file itself cannot be read.
    """
    items = []
    for e in read_prompt_file(path):
        it = Item(label=e.image, path=e.path, prompt=e.prompt, error=e.error,
                  problem=Problem.OTHER if e.error else None)
        if it.error is None and it.path is not None and "\0" in str(it.path):
            it.fail(f"{_printable(e.image)}: path contains a NUL byte", Problem.NUL_IN_PATH)
        _check_file(it)
        if it.problem is Problem.MISSING and it.path is not None and str(it.path) != it.label:
            # The name is the file's, relative to its folder: say where that is from here.
            it.error = f"{it.error} (looked for {it.path})"
        items.append(it)
    return items


def attach_prompts(items: list[Item], prompt: str | None = None, source: PromptSource | None = None) -> None:
    """Give every usable item ``prompt``, or the one its sidecar or metadata holds (else an error)."""
    if prompt is not None:
        problem = text_problem(prompt)
        for it in items:
            if it.ok:
                if problem:
                    it.fail(f"{it.label}: the prompt {problem}")
                else:
                    it.prompt = prompt
        return
    if source is None:
        return
    read: Callable[[Path], str] = sidecar_prompt if source is PromptSource.sidecar else metadata_prompt
    # Which source came up empty: the remedy is another source, never the one just used.
    missing = Problem.NO_CAPTION if source is PromptSource.sidecar else Problem.NO_METADATA_PROMPT
    for it in items:
        if not it.ok:
            continue
        try:
            it.prompt = read(it.path)
        except MissingPromptError as exc:
            it.fail(str(exc), missing)
        except PromptError as exc:
            it.fail(str(exc))


def _printable(text: str) -> str:
    return text.replace("\0", "\\0")


__all__ = ["Item", "Problem", "PromptSource", "attach_prompts", "expand", "files", "from_prompt_file", "read_path_list"]
