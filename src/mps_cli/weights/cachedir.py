"""The one folder the package keeps its own caches in, and the strong identity of a weights file.

``$MPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mps-cli`` (``%LOCALAPPDATA%`` on Windows), else
``~/.cache/mps-cli`` (the project's first name, kept: see ``CACHE_FOLDER``). It holds
``prepared/`` (converted weights), ``scores.sqlite`` (the eval score cache) and ``identities/``
(the SHA-256 of weights files, remembered per file version).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..constants import CACHE_ENV, CACHE_FOLDER
from ..files import write_whole
from .reader import check_regular_file, file_sha256


def cache_root() -> Path:
    """The folder of the package's caches (see the module docstring)."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if not xdg and sys.platform == "win32":
        xdg = os.environ.get("LOCALAPPDATA")
    return Path(xdg) / CACHE_FOLDER if xdg else Path.home() / ".cache" / CACHE_FOLDER


def prepared_dir() -> Path:
    """Where prepared (converted) weights are kept."""
    return cache_root() / "prepared"


def scores_path() -> Path:
    """The default eval score cache."""
    return cache_root() / "scores.sqlite"


def version_of(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime.

    ctime cannot be set back by a user, so a rewrite that restores size and mtime still shows.
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def weights_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a weights file, hashed once per version of the file (see :func:`version_of`).

    The result is remembered under ``identities/`` in the cache folder; where that cannot be
    written, the file is hashed each time.
    """
    path = Path(path)
    real = os.path.realpath(path)
    version = version_of(check_regular_file(path))
    record = cache_root() / "identities" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    known = _read_record(record)
    if known.get("path") == real and known.get("version") == version and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = file_sha256(path)
    if version_of(check_regular_file(path)) == version:  # not rewritten while we read it
        write_small(record, json.dumps({"path": real, "version": version, "sha256": digest}))
    return digest


def _read_record(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            import stat

            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return {}
            data = json.loads(f.read(1 << 16))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_small(path: Path, text: str) -> None:
    """Replace a small record whole; where that cannot be done (an OSError) the old one stays."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, text)
    except OSError:
        pass


__all__ = ["cache_root", "prepared_dir", "scores_path", "version_of", "weights_sha256", "write_small"]
