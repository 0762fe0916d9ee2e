"""A fork server for the tests: ``mps`` (and Python snippets) without paying ``import torch`` each time.

The docs' examples, and the tests of what a command does in a process of its own (the Hub's cache, two
downloads at once, what a second run finds), are about what the commands do, not about starting an interpreter
(tests/test_cli*.py run the real console script for that), yet each ``mps`` costs a second and a half of
importing torch, and they run about 70 of them. The server imports torch and the CLI once; for every command the
``mps`` shim (conftest ``forked_mps``) hands over its argv, working folder, environment and its stdin, stdout and
stderr (as file descriptors, over a Unix socket); the server forks, the child takes those descriptors as its
own 0, 1 and 2 and runs :func:`mps_cli.cli.main` (or the snippet) exactly as the console script would, and the
shim exits with the child's exit status. Every command is a fresh fork, so nothing carries over between them.

One server serves every test process of a run (conftest ``forked_mps``: xdist's workers share it, which saves
each the server's own start, ~2.5 CPU-s): each registers by holding a connection open, and the server exits,
removing its folder, once every one of them has closed it (exited, however it ended). The shim writes its
command's pid to ``pids/<shim pid>`` in that folder, for a test to SIGKILL the command itself (conftest
``kill_hard``): a signal a shim cannot pass on.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
from pathlib import Path

#: The shim: a Python without site-packages (fast to start) that forwards to the server.
#: It passes SIGTERM, SIGINT and SIGHUP on to the command's process, as if it were that process (a test stopping
#: a forked ``mps serve`` stops the server).
SHIM = '''#!{python} -S
import json, os, signal, socket, struct, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
    s.connect({path!r})
    request = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "python": {python_mode}}}
    socket.send_fds(s, [json.dumps(request).encode()], [0, 1, 2])
    pid = s.recv(4)
    if len(pid) == 4:
        with open(os.path.join({pids!r}, str(os.getpid())), "w") as f:
            f.write(str(struct.unpack("i", pid)[0]))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda n, _f, pid=struct.unpack("i", pid)[0]: os.kill(pid, n))
    status = s.recv(4)
sys.exit(struct.unpack("i", status)[0] if len(status) == 4 else 70)
'''


def write_shims(bindir: Path, path: str) -> None:
    """``mps`` and ``mps-python`` (``mps-python -c CODE``) in ``bindir``, talking to the server at ``path``."""
    bindir.mkdir(parents=True, exist_ok=True)
    pids = bindir.parent / "pids"
    pids.mkdir(exist_ok=True)
    for name, python_mode in (("mps", "False"), ("mps-python", "True")):
        shim = bindir / name
        shim.write_text(SHIM.format(python=sys.executable, path=path, python_mode=python_mode, pids=str(pids)))
        shim.chmod(0o755)


#: The first message of a connection that registers its process as one the server lives for.
REGISTER = b"register"


def _run_child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    try:
        if request["python"]:
            argv = request["argv"]
            assert argv[:1] == ["-c"], argv
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<doc example>", "exec"), {"__name__": "__main__"})
        else:
            from mps_cli.cli import main

            sys.argv = ["mps", *request["argv"]]
            main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


PRELOAD = ("mps_cli.engine.scorer", "mps_cli.engine.panel", "mps_cli.engine.decode", "mps_cli.weights.reader",
           "mps_cli.weights.sources", "mps_cli.cli.render", "safetensors.torch", "pydantic", "typer._adapters",
           "rich.table", "rich.progress", "ftfy", "regex",
           # --help's (Typer's rich help: markdown, syntax, panels), the report's and the Hub client's own imports
           "rich.markdown", "rich.syntax", "rich.panel", "rich.columns", "rich.traceback", "rich.pretty", "jinja2",
           "httpx2", "filelock", "yaml")


def serve(path: str, pointer: str | None = None) -> None:
    """Accept commands on the Unix socket ``path``, one fork per command, until every registered process has
    gone; then remove the socket's folder, and the file ``pointer`` (naming that folder, beside its lock file)
    if it still does."""
    import importlib

    import torch  # noqa: F401 (the import every command would otherwise pay)

    import mps_cli.cli  # noqa: F401

    # And what a scoring command imports next (half its time in a fork), and CLIP's vocabulary; no other state,
    # and no module that reads the environment on import (huggingface_hub, typer.rich_utils): each command
    # brings its own environment.
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # another release of a dependency, without it: the commands import what they use
            pass
    from PIL import Image

    from mps_cli.engine.preprocess import Tokenizer

    Image.init()
    Tokenizer._encoder()  # CLIP's vocabulary: the same read-only tables for every command

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    owners: list[socket.socket] = []  # one connection per registered process: readable (EOF) once it is gone
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(path)
        sock.listen(64)
        print("ready", flush=True)
        while True:
            readable, _, _ = select.select([sock, *owners], [], [])
            for gone in [c for c in readable if c is not sock]:
                owners.remove(gone)
                gone.close()
            if sock not in readable:
                if not owners:
                    break
                continue
            conn, _ = sock.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if msg == REGISTER:
                owners.append(conn)
                conn.sendall(b"ok")
                continue
            if os.fork() == 0:
                sock.close()
                for owner in owners:
                    owner.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                conn.sendall(struct.pack("i", os.getpid()))  # first the pid, for the shim to pass signals to
                code = _run_child(json.loads(msg))
                try:
                    conn.sendall(struct.pack("i", code))
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.close()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    if pointer:
        try:
            if json.loads(Path(pointer).read_text())["folder"] == os.path.dirname(path):
                os.unlink(pointer)
                os.unlink(Path(pointer).with_suffix(".lock"))  # a process waiting on it starts a server of its own
        except (OSError, ValueError, KeyError):
            pass


def register(path: str) -> socket.socket | None:
    """Register this process with the server at ``path``: the connection to keep open while it may fork
    commands; None if no server answers there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        conn.sendall(REGISTER)
        if conn.recv(2) == b"ok":
            return conn
    except OSError:
        pass
    conn.close()
    return None


if __name__ == "__main__":
    # The server reads nothing: fd 0 on /dev/null until a child takes the shim's stdin as its fd 0.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    serve(*sys.argv[1:3])
