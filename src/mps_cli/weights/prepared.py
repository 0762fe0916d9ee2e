"""Weights already converted for this machine, kept on disk and mapped where they lie.

Loading an fp16 checkpoint for the CPU converts about a billion values into freshly allocated
memory, and most of the seconds that takes go to faulting that memory in. So after the first
such load the converted tensors (final dtype, final layout) are written once to a cache file.
Later loads map that file privately and use it in place: it is already in the page cache, so
loading is building page tables, and every process scoring at the same time shares one copy.

The file is safetensors written by us, sealed with CRC-32 checksums (:mod:`.sealed`, the format).
Here is the policy: it is named after the source's path, its SHA-256, the dtype and the layout;
it is verified in full on the first load after it was written or changed, and by
:func:`verify_all`; anything that does not match exactly (another source, a changed source, a
damaged or substituted file, a symlink, a FIFO) is deleted and rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..constants import CACHE_ENV
from ..constants import PREPARED_ENV as SWITCH_ENV
from ..errors import CheckpointError
from ..files import remove_stale_temps
from ..switches import env_flag
from .cachedir import prepared_dir, version_of, weights_sha256
from .reader import SafetensorsFile
from .sealed import (
    FORMAT,
    VERSION,
    PreparedWriter,
    SourceIdentity,
    Specs,
    Unusable,
    map_prepared,
    marker,
    metadata,
    verify_file,
)

log = logging.getLogger("mps_cli")


def enabled() -> bool:
    """Whether prepared weights are used, per ``$MPS_PREPARED_WEIGHTS`` (default on, where the OS has pwrite)."""
    return hasattr(os, "pwrite") and env_flag(SWITCH_ENV, default=True)


def cache_dir() -> Path:
    """The folder of prepared weights: ``prepared/`` in mps-cli's cache folder."""
    return prepared_dir()


def source_identity(path: Path) -> SourceIdentity:
    """The identity of a source weights file (its SHA-256 is computed once per version of the file)."""
    return SourceIdentity(os.path.realpath(path), weights_sha256(path))


def prepared_path(source: SourceIdentity, dtype_name: str, transposed: frozenset[str],
                  folder: Path | None = None) -> Path:
    """The cache file for ``source`` converted to ``dtype_name`` with ``transposed`` stored (in, out)."""
    ident = json.dumps([FORMAT, VERSION, source.path, source.sha256, dtype_name, sorted(transposed)])
    key = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return (folder or cache_dir()) / f"{key}-{dtype_name}.safetensors"


def obtain(source: SafetensorsFile, specs: Specs, transposed: frozenset[str], dtype_name: str,
           convert: Callable[[PreparedWriter], None]) -> dict | None:
    """The converted state dict, mapped from the prepared copy (written first by ``convert`` if needed).

    ``convert(writer)`` fills every tensor through :meth:`PreparedWriter.buffer` and
    :meth:`PreparedWriter.write`. None (after a log line) when there is no usable copy and
    none can be written; the caller then converts into memory.
    """
    try:
        ident = source_identity(source.path)
        if source.stat is not None and version_of(os.stat(source.path)) != version_of(source.stat):
            return None  # changed since it was opened: this load reads it directly
        path = prepared_path(ident, dtype_name, transposed)
    except (OSError, CheckpointError):
        return None
    state = _map_or_discard(path, specs, transposed, ident)
    if state is not None:
        return state
    writer = open_writer(path, specs, transposed, ident)
    if writer is None:
        return None
    try:
        convert(writer)
        writer.commit()
        _remove_superseded(path, ident.path)
    except OSError as exc:
        writer.abort()
        log.warning("not caching prepared weights in %s: %s", path.parent, exc.strerror or exc)
        return None
    except BaseException:
        writer.abort()
        raise
    return _map_or_discard(path, specs, transposed, ident)


def _map_or_discard(path: Path, specs: Specs, transposed: frozenset[str], ident: SourceIdentity) -> dict | None:
    try:
        return map_prepared(path, specs, transposed, ident)
    except (CheckpointError, OSError, ValueError) as exc:
        discard(path, str(exc))
        return None


def open_writer(path: Path, specs: Specs, transposed: frozenset[str], source: SourceIdentity) -> PreparedWriter | None:
    """A :class:`PreparedWriter`, or None (with a log line saying why) when the cache is unwritable."""
    try:
        writer = PreparedWriter(path, specs, transposed, source)
        log.info("writing %.1f GiB of prepared weights to %s once; later loads map it (%s=0 turns this off)",
                 writer._total / 2**30, path.parent, SWITCH_ENV, extra={"nbytes": writer._total})
        return writer
    except OSError as exc:
        log.warning("not caching prepared weights in %s: %s (set %s=0 to stop trying)",
                    path.parent, exc.strerror or exc, SWITCH_ENV)
        return None


def discard(path: Path, why: str) -> None:
    """Remove an unusable prepared file (a link is removed, not followed); it is rebuilt on the next load."""
    log.warning("rebuilding prepared weights: %s", why)
    for p in (path, marker(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_superseded(current: Path, source: str) -> None:
    """Delete older copies of the same source file at the same dtype: its contents changed since."""
    suffix = current.name.split("-", 1)[1]
    for p in current.parent.glob(f"*-{suffix}"):
        if p == current:
            continue
        try:
            if metadata(p).get("source") == source:
                p.unlink()
                marker(p).unlink(missing_ok=True)
        except (OSError, ValueError, CheckpointError):
            pass


@dataclass(frozen=True)
class Summary:
    """What the prepared folder holds: usable-looking copies and their size."""

    folder: Path
    files: int
    bytes: int


def summary() -> Summary:
    """Count the prepared files (regular files only; leftovers of dead writers are removed first)."""
    folder = cache_dir()
    files = total = 0
    if folder.is_dir():
        remove_stale_temps(folder)
        for p in folder.glob("*.safetensors"):
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return Summary(folder, files, total)


def verify_all(source: str | os.PathLike | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> list[tuple[Path, str | None]]:
    """Check prepared files against their seals in full; delete those that fail.

    ``source``: only the copies prepared from that weights file (the others are not read); None: every copy.
    ``progress(what, done, total)`` counts MiB read. Returns ``(path, None)`` for a good file and
    ``(path, why)`` for one deleted.
    """
    folder = cache_dir()
    out: list[tuple[Path, str | None]] = []
    if not folder.is_dir():
        return out
    files = sorted(folder.glob("*.safetensors"))
    if source is not None:
        files = [p for p in files if _source_of(p) == os.path.realpath(source)]
    sizes = {p: _size(p) for p in files}
    total, done = sum(sizes.values()), 0
    what = f"verifying {len(files)} prepared cop{'y' if len(files) == 1 else 'ies'}, {total / 2**30:.1f} GiB"
    for p in files:
        if progress is not None:
            progress(what, done // 2**20, total // 2**20)
        try:
            verify_file(p)
            out.append((p, None))
        except (CheckpointError, OSError, ValueError) as exc:
            discard(p, str(exc))
            out.append((p, str(exc)))
        done += sizes[p]
    if progress is not None and files:
        progress(what, total // 2**20, total // 2**20)
    return out


def _source_of(path: Path) -> str | None:
    try:
        return metadata(path).get("source")
    except (OSError, ValueError, CheckpointError):
        return None  # unreadable: only a full verify looks at it


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = ["CACHE_ENV", "FORMAT", "SWITCH_ENV", "PreparedWriter", "SourceIdentity", "Summary", "Unusable", "cache_dir",
           "enabled", "map_prepared", "obtain", "open_writer", "prepared_path", "summary", "verify_all"]
