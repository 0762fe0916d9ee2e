"""Writing a file whole or not at all, and sweeping up after writers that were killed.

Every file the package replaces (dataset shards and their manifest, prepared weights, converted
checkpoints, the HTML report, the small records of the cache folder) is written under a temporary
name beside it, then renamed over it, so a reader sees the old file or the new one, never half of
one. The temporary name is spelled one way, :func:`temp_path`: hidden, and naming the host and the
process that writes it, so that :func:`remove_stale_temps` can tell a leftover from a live writer.
"""

from __future__ import annotations

import glob
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Temporary files of writers on other hosts (whose pids mean nothing here) are removed after this long.
STALE_TMP_S = 3600
_SUFFIX = ".tmp"


def host_tag() -> str:
    """This machine's name as it goes into temporary file names (so a stale one's writer can be told)."""
    return "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:40] or "host"


def temp_path(path: str | os.PathLike) -> Path:
    """Where this process writes ``path`` before renaming it into place: ``.NAME.HOST.PID.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}{_SUFFIX}")


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path`` into: renamed over ``path`` when the block ends, removed if it fails.

    A leftover of an earlier process with the same name (same host, a reused pid) is removed first.
    """
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_whole(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8); with ``fsync``, durable before the rename."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete the temporary files in ``folder`` whose writer is gone (only those of file ``name``, if given):
    a dead process on this host at once, any on another host after :data:`STALE_TMP_S`."""
    now, host = time.time(), host_tag()
    pattern = f".{glob.escape(name)}.*{_SUFFIX}" if name else f".*{_SUFFIX}"
    for p in Path(folder).glob(pattern):
        parts = p.name[:-len(_SUFFIX)].rsplit(".", 2)
        try:
            if len(parts) == 3 and parts[1] == host and parts[2].isdigit():
                if not _pid_alive(int(parts[2])):
                    p.unlink()
            elif now - p.lstat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


__all__ = ["STALE_TMP_S", "host_tag", "remove_stale_temps", "replacing", "temp_path", "write_whole"]
