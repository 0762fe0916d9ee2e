"""A small Hugging Face Hub stand-in for tests: real HTTP on 127.0.0.1, the headers huggingface_hub reads.

It serves ``HEAD``/``GET /{owner}/{repo}/resolve/{revision}/{path}`` the way the Hub's
``resolve`` endpoint does for huggingface_hub's ``hf_hub_download``: ``X-Repo-Commit``,
a quoted ``ETag`` (the SHA-256 for LFS files, a git blob SHA-1 otherwise), ``X-Linked-Etag``
and ``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges`` and 206 answers
to ``Range`` requests, and the Hub's ``X-Error-Code`` values on 401/403/404. Failures can be
injected per file (a status code, a transfer cut short, a body shorter than announced, a
hang), and every request is logged so a test can prove the network was (not) touched.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = hashlib.sha1(b"mps-tiny fixture commit").hexdigest()
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    data: bytes
    etag: str
    lfs: bool


@dataclass
class Failure:
    kind: str  # status | cut | short | hang
    status: int = 500
    after: int = 0  # cut/short: bytes of the file sent before the transfer ends
    seconds: float = 0.0  # hang
    times: int | None = None  # None: every time
    methods: tuple[str, ...] = ("HEAD", "GET")
    error_code: str | None = None


@dataclass
class Logged:
    method: str
    path: str
    repo: str | None
    revision: str | None
    filename: str | None
    headers: dict = field(default_factory=dict)  # names lower-cased


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def free_port() -> int:
    """A port nothing listens on (bound, then released), for connection-refused tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self, commit: str = COMMIT, chunk: int = 1 << 16, chunk_delay: float = 0.0):
        self.commit = commit
        self.chunk = chunk
        self.chunk_delay = chunk_delay
        self.repos: dict[str, dict[str, Served]] = {}
        self.private: dict[str, str] = {}  # repo -> the token that may read it
        self.gated: set[str] = set()
        self.failures: dict[str, Failure] = {}  # keyed by path in repo
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------
    def add(self, repo: str, filename: str, data: bytes, lfs: bool = True, etag: str | None = None) -> Served:
        """Serve ``data`` as ``filename`` in ``repo``; the ETag is its SHA-256 (LFS) or git SHA-1."""
        served = Served(data=data, lfs=lfs,
                        etag=etag or (hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)))
        self.repos.setdefault(repo, {})[filename] = served
        return served

    def add_file(self, repo: str, filename: str, path: Path, **kwargs) -> Served:
        return self.add(repo, filename, Path(path).read_bytes(), **kwargs)

    def fail(self, filename: str, status: int, times: int | None = None, error_code: str | None = None,
             methods: tuple[str, ...] = ("HEAD", "GET")) -> None:
        self.failures[filename] = Failure("status", status=status, times=times, error_code=error_code,
                                          methods=methods)

    def cut(self, filename: str, after: int, times: int | None = 1) -> None:
        """GET sends the file up to byte ``after`` under the full Content-Length, then drops the connection."""
        self.failures[filename] = Failure("cut", after=after, times=times, methods=("GET",))

    def short(self, filename: str, after: int, times: int | None = None) -> None:
        """GET answers a complete, well-formed response holding only the first ``after`` bytes."""
        self.failures[filename] = Failure("short", after=after, times=times, methods=("GET",))

    def hang(self, filename: str, seconds: float, times: int | None = None) -> None:
        self.failures[filename] = Failure("hang", seconds=seconds, times=times, methods=("HEAD", "GET"))

    # -- inspection ----------------------------------------------------------------------
    def requests(self, method: str | None = None, filename: str | None = None) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (filename is None or r.filename == filename)]

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler -------------------------------------------------------------
    def _take_failure(self, filename: str, method: str) -> Failure | None:
        with self._lock:
            failure = self.failures.get(filename)
            if failure is None or method not in failure.methods:
                return None
            if failure.times is not None:
                if failure.times <= 0:
                    return None
                failure.times -= 1
            return failure


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        hub = self.hub
        parts = self.path.split("?", 1)[0].lstrip("/").split("/")
        repo = revision = filename = None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = f"{unquote(parts[0])}/{unquote(parts[1])}"
            revision = unquote(parts[3])
            filename = unquote("/".join(parts[4:]))
        with hub._lock:
            hub.log.append(Logged(self.command, self.path, repo, revision, filename,
                                   {k.lower(): v for k, v in self.headers.items()}))
        try:
            self._answer(hub, repo, revision, filename)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _answer(self, hub: HubServer, repo, revision, filename) -> None:
        if repo is None:
            return self._reply(404, {"X-Error-Message": "Not found"}, b"not found")
        if repo not in hub.repos:
            return self._reply(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo in hub.private and self.headers.get("Authorization") != f"Bearer {hub.private[repo]}":
            # The Hub answers 401 + RepoNotFound for a private repo, not revealing that it exists.
            return self._reply(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid credentials"})
        if repo in hub.gated:
            return self._reply(403, {"X-Error-Code": "GatedRepo",
                                     "X-Error-Message": f"Access to model {repo} is restricted."})
        if revision not in ("main", hub.commit):
            return self._reply(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        served = hub.repos[repo].get(filename)
        if served is None:
            return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                     "X-Repo-Commit": hub.commit})
        failure = hub._take_failure(filename, self.command)
        if failure is not None and failure.kind == "status":
            headers = {"X-Error-Code": failure.error_code} if failure.error_code else {}
            return self._reply(failure.status, headers, b"injected failure")
        if failure is not None and failure.kind == "hang":
            hub._stopping.wait(failure.seconds)
            self.close_connection = True
            return

        data = served.data
        total = len(data)
        headers = {
            "X-Repo-Commit": hub.commit,
            "ETag": f'"{served.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if served.lfs:
            headers["X-Linked-Etag"] = f'"{served.etag}"'
            headers["X-Linked-Size"] = str(total)
        start, end, status = 0, total, 200
        m = _RANGE.match(self.headers.get("Range", ""))
        if m and self.command == "GET":
            start = int(m[1])
            end = min(total, int(m[2]) + 1) if m[2] else total
            if start >= total:
                return self._reply(416, {"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        announced = end - start
        send_until = end
        if failure is not None and failure.kind == "short":
            end = send_until = min(end, failure.after)
            announced = max(0, end - start)
        elif failure is not None and failure.kind == "cut":
            send_until = max(start, min(end, failure.after))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if self.command == "HEAD":
            return
        pos = start
        while pos < send_until:
            step = min(hub.chunk, send_until - pos)
            self.wfile.write(data[pos:pos + step])
            pos += step
            if hub.chunk_delay:
                time.sleep(hub.chunk_delay)
        if failure is not None and failure.kind == "cut":
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
