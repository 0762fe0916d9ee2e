"""Crafted requests against a real ``mps serve`` on loopback, over raw sockets where the HTTP itself is
the attack: tokens, body limits, malformed multipart, JSON of the wrong types, image bombs, paths out
of ``--allow-dir``, a client that trickles bytes, 16 clients at once, SIGTERM under load.

Every case checks the status and that the message names the problem; after each case the server
must still answer a good request. Cases run in loops over tables (one server per test worker),
and a failing case is named in the assertion."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS, forked_mps, mps_executable

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

TOKEN = "attack-token-0123456789"
READ_TIMEOUT = 1.0  # the server's --read-timeout, short so that the trickle cases end quickly
GRAY = (IMAGES / "gray.png").read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `mps serve` with a token, a 1 MiB body limit, a 1 s read timeout and an allowed folder that
    holds the traps: a FIFO, a symlink loop, a link out, a folder. ``fork``: a fork of conftest's fork server (the
    shim passes signals on), where the process's start is not under test."""

    def __init__(self, tmp: Path, fork: bool = False):
        self.tmp, self.fork = tmp, fork
        self.allowed = tmp / "allowed"
        (self.allowed / "sub").mkdir(parents=True)
        (self.allowed / "gray.png").write_bytes(GRAY)
        (self.allowed / "out.png").symlink_to(IMAGES / "sunset.png")
        (self.allowed / "loop-a.png").symlink_to(self.allowed / "loop-b.png")
        (self.allowed / "loop-b.png").symlink_to(self.allowed / "loop-a.png")
        os.mkfifo(self.allowed / "fifo.png")
        self.outside = tmp / "outside.png"
        self.outside.write_bytes(GRAY)
        self.log_path = tmp / "server.log"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("MPS_WEIGHTS", None)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(forked_mps() if self.fork else mps_executable()), "serve", "--weights", str(WEIGHTS), "--device", "cpu",
             "--port", str(self.port), "--token", TOKEN, "--allow-dir", str(self.allowed), "--max-body-mb", "1",
             "--read-timeout", str(READ_TIMEOUT), "--max-batch", "8"],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if request(self, "GET", "/healthz", token=None, timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not come up in 90 s: " + self.log_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("attack-serve"), fork=True)
    yield srv
    srv.stop()


@pytest.fixture
def server(server_process) -> Server:
    """The module's server, started again if a test stopped it."""
    if server_process.proc.poll() is not None:
        server_process.log.close()
        server_process.start()
    return server_process


def request(srv, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
            headers: dict | None = None, timeout: float = 30):
    """(status, parsed JSON, raw body) of one HTTP call through http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, _json(raw), raw
    finally:
        conn.close()


def raw_exchange(srv, data: bytes, timeout: float = 15, shut: bool = False):
    """Send ``data`` as it is on a fresh socket; (status, JSON, seconds) of the whole answer, read to its
    end (http.client raises on a half-written one)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
    return resp.status, _json(body), time.monotonic() - start


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def score_body(images=None, prompt="a fox", **extra) -> bytes:
    doc = {"images": images if images is not None else [base64.b64encode(GRAY).decode()], "prompt": prompt, **extra}
    return json.dumps(doc).encode()


def assert_serving(srv, why: str = "") -> None:
    """A good request is answered with a score: the attack left the server working."""
    status, doc, raw = request(srv, "POST", "/v1/score", score_body())
    assert status == 200 and isinstance(doc["results"][0]["scores"]["overall"], float), (why, status, raw[:300])


def check_cases(srv, cases: dict, send) -> None:
    """Run every case: ``send(srv, case) -> (status, doc)``; each must give its status and a message
    holding its text, then the server must answer a good request. All failures are reported together."""
    failures = []
    for name, (status, text, case) in cases.items():
        try:
            got, doc = send(srv, case)
            message = (doc or {}).get("error", "") if isinstance(doc, dict) else ""
            if got != status or text.lower() not in message.lower():
                failures.append(f"{name}: got {got} {message!r}, want {status} with {text!r}")
            assert_serving(srv, name)
        except Exception as exc:  # recorded, asserted below
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    log = srv.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def http_request(path: str, body: bytes, headers: dict[str, str | bytes], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    for k, v in headers.items():
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- the token


AUTH = {
    "no header": (401, "missing token", None),
    "empty bearer": (401, "wrong token", b"Bearer "),
    "another scheme": (401, "wrong token", b"Basic " + base64.b64encode(f"u:{TOKEN}".encode())),
    "a prefix of the token": (401, "wrong token", f"Bearer {TOKEN[:-1]}".encode()),
    "the token and more": (401, "wrong token", f"Bearer {TOKEN}x".encode()),
    "the token in capitals": (401, "wrong token", f"Bearer {TOKEN.upper()}".encode()),
    "bytes that are not ASCII": (401, "wrong token", b"Bearer \xff\xfe" + TOKEN.encode()),
    # The HTTP parser refuses a header holding a NUL, before the app sees it (its own plain-text 400).
    "a NUL inside": (400, "", f"Bearer {TOKEN[:4]}".encode() + b"\0" + TOKEN[4:].encode()),
    "a 64 KiB token": (401, "wrong token", b"Bearer " + b"A" * 60_000),
}


def test_missing_and_wrong_tokens_are_401_on_every_route_but_healthz(server):
    def send(srv, auth):
        headers = {"Content-Type": "application/json", "Content-Length": str(len(score_body()))}
        if auth is not None:
            headers["Authorization"] = auth
        status, doc, _ = raw_exchange(srv, http_request("/v1/score", score_body(), headers))
        return status, doc

    # A 64 KiB header is over the HTTP parser's limit: answered 400 or 431 before the token is read.
    cases = {k: v for k, v in AUTH.items() if k != "a 64 KiB token"}
    check_cases(server, cases, send)
    status, _, _ = raw_exchange(server, http_request("/v1/score", b"", {"Authorization": AUTH["a 64 KiB token"][2],
                                                                        "Content-Length": "0"}))
    assert status in (400, 401, 431)
    for path, method in (("/v1/info", "GET"), ("/v1/compare", "POST"), ("/v1/batch", "POST"), ("/v1/nothing", "GET")):
        assert request(server, method, path, b"{}", token="wrong")[0] == 401, path
    assert request(server, "GET", "/healthz", token=None)[0] == 200
    assert_serving(server)


def test_the_token_is_compared_in_constant_time(monkeypatch):
    """The check goes through hmac.compare_digest (a spy around the real function, in-process)."""
    from mps_cli import serve_http as srv

    calls = []
    real = srv.hmac.compare_digest
    monkeypatch.setattr(srv.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    guard = srv._Guard(None, token=TOKEN, max_body=100)
    scope = {"type": "http", "path": "/v1/score", "headers": [(b"authorization", b"Bearer guess")]}
    assert guard._refuse(scope) is not None
    assert calls == [(b"guess", TOKEN.encode())]
    scope["headers"] = [(b"authorization", f"Bearer {TOKEN}".encode())]
    assert guard._refuse(scope) is None and calls[-1] == (TOKEN.encode(), TOKEN.encode())


# --------------------------------------------------------------------------- bodies and multipart


def _multipart(parts: list[bytes], boundary: bytes = b"XyZ", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def _file_part(name: str, filename: str, data: bytes) -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data


def _field(name: str, value: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()


def _form(body: bytes, ctype: str = "multipart/form-data; boundary=XyZ", extra: dict | None = None) -> bytes:
    return http_request("/v1/score", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype,
                                            "Content-Length": str(len(body)), **(extra or {})})


TEN_K = _multipart([_field("prompts", "a fox") for _ in range(10_000)])
BODIES = {
    "a Content-Length over the limit, no body sent": (
        413, "byte limit", http_request("/v1/score", b"", {"Authorization": f"Bearer {TOKEN}",
                                                           "Content-Length": str(2 * 2**20)})),
    "a chunked body over the limit": (
        413, "byte limit", http_request("/v1/score", b"".join(
            b"%x\r\n" % len(c) + c + b"\r\n" for c in [b"A" * 65536] * 20) + b"0\r\n\r\n",
            {"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})),
    "a negative Content-Length": (
        400, "", http_request("/v1/score", b"", {"Authorization": f"Bearer {TOKEN}", "Content-Length": "-1"})),
    "a Content-Length that is not a number": (
        400, "", http_request("/v1/score", b"", {"Authorization": f"Bearer {TOKEN}", "Content-Length": "ten"})),
    "multipart without a boundary": (
        400, "invalid multipart form", _form(_multipart([_field("prompt", "x")]), "multipart/form-data")),
    "multipart with an empty boundary": (
        400, "invalid multipart form", _form(_multipart([_field("prompt", "x")]), "multipart/form-data; boundary=")),
    "an unterminated part": (
        400, "invalid multipart form",
        _form(b"--XyZ\r\n" + _file_part("image", "a.png", GRAY)[:-100])),
    "a part without its headers' end": (
        400, "invalid multipart form", _form(b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n")),
    "10 000 parts": (400, "too many", _form(TEN_K)),
    "a part with no Content-Disposition": (
        400, "invalid multipart form", _form(_multipart([b"Content-Type: text/plain\r\n\r\nhello"]))),
    "a file field of another name": (
        422, "unexpected file field 'photo'", _form(_multipart([_file_part("photo", "a.png", GRAY),
                                                                _field("prompt", "a fox")]))),
    "a form with no image": (422, "no images", _form(_multipart([_field("prompt", "a fox")]))),
    "a form image that is a bomb": (
        422, "decompression bomb", None),  # filled in below, with a real bomb
    "an upload named ../../etc/passwd that is text": (
        422, "not an image", _form(_multipart([_file_part("image", "../../etc/passwd", b"root:x:0:0\n" * 30),
                                               _field("prompt", "a fox")]))),
}


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BODIES["a form image that is a bomb"] = (422, "decompression bomb", _form(_multipart([
    _file_part("image", "bomb.png", bomb_png()), _field("prompt", "a fox")])))


def test_body_limits_and_malformed_multipart(server):
    def send(srv, data):
        status, doc, seconds = raw_exchange(srv, data)
        assert seconds < 10, seconds
        return status, doc

    check_cases(server, BODIES, send)


# --------------------------------------------------------------------------- JSON of the wrong types


def _nested(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b', "prompt": "x"}'


B64 = base64.b64encode(GRAY).decode()
JSON_CASES = {
    "a list": (422, "must be a JSON object", b"[]"),
    "a string": (422, "must be a JSON object", b'"images"'),
    "null": (422, "must be a JSON object", b"null"),
    "images a string": (422, "non-empty list", json.dumps({"images": B64, "prompt": "x"}).encode()),
    "images empty": (422, "non-empty list", score_body(images=[])),
    "an image a number": (422, "an image is a base64 string", score_body(images=[123])),
    "an image a list": (422, "an image is a base64 string", score_body(images=[[B64]])),
    "data a number": (422, "'data' must be a base64 string", score_body(images=[{"data": 5}])),
    "data and path": (422, "an image is a base64 string", score_body(images=[{"data": B64, "path": "gray.png"}])),
    "path a number": (422, "'path' must be a non-empty string", score_body(images=[{"path": 5}])),
    "prompt a number": (422, "'prompt' must be a string", score_body(prompt=5)),
    "prompt empty": (422, "the prompt is empty", score_body(prompt="  ")),
    "prompts of numbers": (422, "'prompts' a list of strings",
                           json.dumps({"images": [B64], "prompts": [1]}).encode()),
    "prompts of the wrong count": (422, "1 images but 2 prompts",
                                   json.dumps({"images": [B64], "prompts": ["a", "b"]}).encode()),
    "prompt and prompts": (422, "not both", json.dumps({"images": [B64], "prompt": "a", "prompts": ["a"]}).encode()),
    "dims a number": (422, "'dims' must be", score_body(dims=5)),
    "dims with a number": (422, "'dims' must be", score_body(dims=["overall", 3])),
    "an unknown dim": (422, "unknown dimension", score_body(dims=["beauty"])),
    "condition an object": (422, "'condition' must be a string", score_body(condition={})),
    "threshold a word": (422, "'mask_threshold' must be a number", score_body(mask_threshold="abc")),
    "threshold true": (422, "'mask_threshold' must be a number", score_body(mask_threshold=True)),
    "threshold 1.5": (422, "'mask_threshold' must be a number", score_body(mask_threshold=1.5)),
    "threshold NaN": (422, "'mask_threshold' must be a number", score_body()[:-1] + b', "mask_threshold": NaN}'),
    "threshold 1e999": (422, "'mask_threshold' must be a number", score_body()[:-1] + b', "mask_threshold": 1e999}'),
    "names a string": (422, "'names' must be a list of strings", score_body(names="a")),
    "names of numbers": (422, "'names' must be a list of strings", score_body(names=[1])),
    "an unknown field": (422, "unknown field(s): image", json.dumps({"image": [B64], "prompt": "x"}).encode()),
    "nested 100 000 deep": (400, "nested too deeply", _nested(100_000)),
    "an integer of 5000 digits": (400, "invalid JSON", b'{"images": [' + b"9" * 5000 + b'], "prompt": "x"}'),
    "bytes that are not UTF-8": (400, "invalid JSON", b'{"images": ["\xff\xfe"], "prompt": "x"}'),
    "cut in the middle": (400, "invalid JSON", score_body()[:20]),
    "an empty body": (400, "empty body", b""),
    "1024+1 images": (413, "at most 1024", score_body(images=["A"] * 1025)),
    "compare with a number": (422, "an image is a base64 string",
                              json.dumps({"a": 1, "b": B64, "prompt": "x"}).encode()),
    "compare without b": (422, "no image 'b'", json.dumps({"a": B64, "prompt": "x"}).encode()),
    "compare with prompts": (422, "unknown field(s): prompts",
                             json.dumps({"a": B64, "b": B64, "prompts": ["x"]}).encode()),
}


def test_json_of_the_wrong_types_is_a_4xx_naming_the_field(server):
    def send(srv, body):
        path = "/v1/compare" if body.startswith(b'{"a"') else "/v1/score"
        status, doc, _ = request(srv, "POST", path, body)
        return status, doc

    check_cases(server, JSON_CASES, send)


# --------------------------------------------------------------------------- image bombs over HTTP


def _jpeg_header(width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def _gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 4, 4, 0) \
        + b"\x02\x02\x44\x01\x00;"


def _text_bomb_png() -> bytes:
    """A 1x1 PNG with a zTXt chunk inflating to 64 MiB: PIL's text limit, not the pixel limit, must catch it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    png = buf.getvalue()
    data = b"Comment\0\0" + zlib.compress(b"A" * 64 * 2**20, 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]


BOMBS = {
    "a PNG of 100000 x 100000": (422, "decompression bomb", bomb_png()),
    "a PNG of 9000 x 9000 (over --max-image-mpx)": (422, "over the", bomb_png(9000, 9000)),
    "a JPEG of 65500 x 65500": (422, "", _jpeg_header(65500, 65500)),
    "a GIF of 65535 x 65535": (422, "", _gif_header(65535, 65535)),
    "a PNG whose text inflates to 64 MiB": (422, "too large", _text_bomb_png()),
    "an empty image": (422, "empty", b""),
    "a truncated PNG": (422, "", GRAY[:200]),
}


def test_image_bombs_over_http_fail_alone_and_fast(server):
    def send(srv, data):
        start = time.monotonic()
        status, doc, _ = request(srv, "POST", "/v1/score", score_body(images=[base64.b64encode(data).decode()]))
        assert time.monotonic() - start < 10
        return status, doc

    check_cases(server, BOMBS, send)
    # Among good images, a bomb is one error row; the others are scored.
    images = [B64, base64.b64encode(bomb_png()).decode(), B64]
    status, doc, _ = request(server, "POST", "/v1/score", score_body(images=images))
    assert status == 200 and doc["failed"] == 1 and "decompression bomb" in doc["results"][1]["error"]


# --------------------------------------------------------------------------- paths out of --allow-dir


def test_paths_outside_allow_dir_and_files_that_are_not_files(server):
    cases = {
        "a .. path": (403, "outside the folder", "../outside.png"),
        "deep ..": (403, "outside the folder", "sub/../../outside.png"),
        "an absolute path outside": (403, "outside the folder", str(server.outside)),
        "/etc/passwd": (403, "outside the folder", "/etc/passwd"),
        "a symlink out": (403, "outside the folder", "out.png"),
        "a NUL byte": (422, "NUL", "gray.png\0.txt"),
        "a FIFO (would block a thread for ever)": (422, "not a regular file", "fifo.png"),
        "a folder": (422, "not a regular file", "sub"),
        "a symlink loop": (422, "", "loop-a.png"),
        "a name of 5000 characters": (422, "", "x" * 5000),
        "a missing file": (422, "no such file", "missing.png"),
    }

    def send(srv, path):
        start = time.monotonic()
        status, doc, _ = request(srv, "POST", "/v1/score", score_body(images=[{"path": path}]))
        assert time.monotonic() - start < 10
        return status, doc

    check_cases(server, cases, send)
    for inside in ("gray.png", "sub/../gray.png", str(server.allowed / "gray.png")):
        status, doc, _ = request(server, "POST", "/v1/score", score_body(images=[{"path": inside}]))
        assert status == 200 and "scores" in doc["results"][0], (inside, doc)


# --------------------------------------------------------------------------- trickling clients


def _trickle(srv, data: bytes, every: float, limit: float):
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the server answers or closes;
    (status or None, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=limit) as sock:
        sock.setblocking(False)
        answer = b""
        for i in range(len(data)):
            try:
                sock.send(data[i:i + 1])
            except OSError:
                break
            time.sleep(every)
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
                break
            except BlockingIOError:
                pass
            assert time.monotonic() - start < limit, "the server let a trickling client hold on past the limit"
        sock.settimeout(limit)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - start


def test_a_client_that_trickles_bytes_is_cut_off_and_others_are_served_meanwhile(server):
    body = score_body()
    headers = http_request("/v1/score", b"", {"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json", "Content-Length": str(len(body))})
    results = {}

    def run(name, fn):
        results[name] = fn()

    threads = [
        threading.Thread(target=run, args=("headers", lambda: _trickle(server, headers + body, 0.05, 8))),
        threading.Thread(target=run, args=("body", lambda: _trickle_body(server, headers, body))),
        threading.Thread(target=run, args=("silent", lambda: _silent(server))),
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert_serving(server, "during the trickles")  # the slow clients hold no one else up
    for t in threads:
        t.join(20)
    assert set(results) == {"headers", "body", "silent"}
    # Cut off after the read timeout, long before the trickle would have ended (7.5 s of headers);
    # the upper bounds leave room for a loaded machine.
    status, seconds = results["headers"]
    assert status == 408 and READ_TIMEOUT <= seconds < 7, results
    status, seconds = results["body"]
    assert status == 408 and seconds < 2 * READ_TIMEOUT + 6, results
    status, seconds = results["silent"]
    assert status == 408 and READ_TIMEOUT <= seconds < READ_TIMEOUT + 6, results
    assert_serving(server, "after the trickles")


def _trickle_body(srv, headers: bytes, body: bytes):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(headers)
        sock.setblocking(False)
        answer = b""
        for i in range(len(body)):
            try:
                sock.send(body[i:i + 1])
            except OSError:
                break
            time.sleep(0.05)
            try:
                answer = sock.recv(65536)
                break
            except BlockingIOError:
                pass
            assert time.monotonic() - start < 10
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - start


def _silent(srv):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - start


# --------------------------------------------------------------------------- 16 clients at once


def test_16_concurrent_clients_with_different_settings_each_get_their_own_scores(server, scorer):
    names = sorted(p.name for p in IMAGES.iterdir())
    encoded = {n: base64.b64encode((IMAGES / n).read_bytes()).decode() for n in names}
    plans = []
    for i in range(16):
        mine = [names[(i + k) % len(names)] for k in range(1 + i % 3)]
        opts = [{}, {"dims": ["detail"]}, {"mask_threshold": 0.5}, {"condition": "sharp light", "dims": None}][i % 4]
        plans.append((mine, f"client {i}: a lighthouse, take {i % 5}", {k: v for k, v in opts.items()}))
    want = []
    for mine, prompt, opts in plans:
        rs = scorer.score([IMAGES / n for n in mine], prompt, dims=opts.get("dims", ["overall"]),
                          condition=opts.get("condition"), mask_threshold=opts.get("mask_threshold", 0.3))
        want.append([r.scores for r in rs])
    got: list = [None] * 16
    start = threading.Barrier(16)

    def work(i: int) -> None:
        mine, prompt, opts = plans[i]
        body = {"images": [encoded[n] for n in mine], "prompt": prompt, "names": mine,
                **{k: v for k, v in opts.items() if v is not None}}
        start.wait()
        got[i] = request(server, "POST", "/v1/score", json.dumps(body).encode(), timeout=60)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for i, (status, doc, raw) in enumerate(got):
        assert status == 200, (i, raw[:300])
        rows = doc["results"]
        assert [r["image"] for r in rows] == plans[i][0] and {r["prompt"] for r in rows} == {plans[i][1]}
        for r, w in zip(rows, want[i], strict=True):
            assert r["scores"].keys() == w.keys(), i
            assert all(abs(r["scores"][k] - w[k]) <= 1e-5 for k in w), (i, r["scores"], w)


# --------------------------------------------------------------------------- SIGTERM under load


# --------------------------------------------------------------------------- the batch route and its arrays


def _array(shape, data: bytes = b"", dtype="uint8", **extra) -> dict:
    return {"shape": shape, "dtype": dtype, "data": base64.b64encode(data).decode(), **extra}


ARRAY_CASES = {
    "a shape of 100000 x 100000 with 12 bytes": (422, "over the", score_body(images=[_array([100_000, 100_000, 3],
                                                                                            b"\0" * 12)])),
    "a shape of 2**40 x 2**40": (422, "over the", score_body(images=[_array([2**40, 2**40, 3])])),
    "a negative height": (422, "[height, width, 1|3|4]", score_body(images=[_array([-4, 4, 3], b"\0" * 48)])),
    "zero width": (422, "[height, width, 1|3|4]", score_body(images=[_array([4, 0, 3])])),
    "five channels": (422, "[height, width, 1|3|4]", score_body(images=[_array([2, 2, 5], b"\0" * 20)])),
    "a shape of floats": (422, "shape is [height, width, channels]", score_body(images=[_array([2.0, 2, 3])])),
    "a shape of booleans": (422, "shape is [height, width, channels]", score_body(images=[_array([True, 2, 3])])),
    "a shape that is a string": (422, "shape is [height, width, channels]", score_body(images=[_array("4,4,3")])),
    "four dimensions": (422, "shape is [height, width, channels]", score_body(images=[_array([1, 2, 2, 3])])),
    "one byte short": (422, "needs 48 bytes", score_body(images=[_array([4, 4, 3], b"\0" * 47)])),
    "float32 data": (422, "arrays must be uint8", score_body(images=[_array([1, 1, 3], b"\0" * 12, "float32")])),
    "no dtype": (422, "an array is", score_body(images=[{"shape": [1, 1, 3], "data": "AAAA"}])),
    "an extra key": (422, "unknown: pickle", score_body(images=[_array([1, 1, 3], b"\0" * 3, pickle="x")])),
    "bad base64 in an array": (422, "invalid base64", score_body(images=[{"shape": [1, 1, 3], "dtype": "uint8",
                                                                          "data": "@@@"}])),
    "another schema": (422, "unsupported schema", score_body(schema="mps-score/batch@2")),
    "a schema that is an object": (422, "unsupported schema", score_body(schema={"v": 1})),
    "a reward that is code": (422, "expected a number", score_body(reward="__import__('os').system('id')")),
    "a reward that is a number": (422, "'reward' must be an expression", score_body(reward=3)),
    "a reward 10 000 characters long": (422, "at most 1000", score_body(reward="overall+" * 1250)),
    "a reward nested 200 deep": (422, "nested deeper than 32", score_body(reward="(" * 200 + "overall" + ")" * 200)),
    "a reward naming a judge this server lacks": (422, "does not load", score_body(reward="pickscore")),
}


def _array_form(shape_header: str, data: bytes) -> bytes:
    part = (f'Content-Disposition: form-data; name="array"; filename="a"\r\nContent-Type: {shape_header}\r\n\r\n'
            ).encode() + data
    body = _multipart([part, _field("prompt", "a fox"), _field("schema", "mps-score/batch@1")])
    return http_request("/v1/batch", body, {"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "multipart/form-data; boundary=XyZ",
                                            "Content-Length": str(len(body))})


ARRAY_FORMS = {
    "an array part without a shape": (422, "declares its shape", _array_form("application/octet-stream", b"\0" * 3)),
    "an array part with a shape of words": (422, "declares its shape",
                                            _array_form('application/octet-stream; shape="a,b,c"', b"\0" * 3)),
    "an array part of float32": (422, "arrays must be uint8",
                                 _array_form('application/octet-stream; dtype=float32; shape="1,1,3"', b"\0" * 12)),
    "an array part claiming 90000 x 90000": (422, "over the",
                                             _array_form('application/octet-stream; shape="90000,90000,3"', b"\0" * 3)),
    "an array part one byte long": (422, "needs 3 bytes",
                                    _array_form('application/octet-stream; shape="1,1,3"', b"\0")),
}


def test_the_batch_route_keeps_the_rules_and_refuses_crafted_arrays_and_rewards(server):
    """POST /v1/batch: every JSON and bomb case of /v1/score gets the same answer there, and its own inputs (raw
    arrays, the schema marker, reward expressions) are refused naming the problem, fast, without a traceback."""
    def send(srv, body):
        path = "/v1/compare" if body.startswith(b'{"a"') else "/v1/batch"
        start = time.monotonic()
        status, doc, _ = request(srv, "POST", path, body)
        assert time.monotonic() - start < 10
        return status, doc

    check_cases(server, {k: v for k, v in JSON_CASES.items() if not k.startswith("compare")}, send)
    bombs = {k: (s, t, score_body(images=[base64.b64encode(d).decode()])) for k, (s, t, d) in BOMBS.items()}
    check_cases(server, bombs, send)
    check_cases(server, ARRAY_CASES, send)
    check_cases(server, ARRAY_FORMS, lambda srv, data: raw_exchange(srv, data)[:2])
    # a good array among crafted ones: one row each, in order
    good = _array([2, 2, 3], bytes(range(12)))
    status, doc, _ = request(server, "POST", "/v1/batch", score_body(images=[good, _array([9, 9, 3]), good]))
    assert status == 200 and doc["failed"] == 1 and doc["rewards"][0] == doc["rewards"][2] and doc["rewards"][1] is None


@pytest.fixture
def own_server(tmp_path):
    """An `mps serve` of the test's own, for a test of how the process stops: a fork (conftest forked_mps,
    whose shim passes SIGTERM on); tests/test_serve.py stops the real console script the same way."""
    srv = Server(tmp_path, fork=True)
    yield srv
    srv.stop()


def test_sigterm_under_load_answers_or_refuses_every_request_and_none_half_written(own_server):
    """Clients keep sending while the server stops: each request gets a whole answer (200, or 503 once
    it is stopping) or is never accepted (the connection is refused or closed before any byte)."""
    srv = own_server
    body = score_body(images=[B64] * 12)
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                    sock.sendall(http_request("/v1/score", body, {
                        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                        "Content-Length": str(len(body)), "Connection": "close"}))
                    resp = http.client.HTTPResponse(sock)
                    try:
                        resp.begin()
                    except (http.client.RemoteDisconnected, ConnectionResetError):
                        outcome = "not accepted"
                    else:
                        raw = resp.read()  # raises IncompleteRead on a half-written answer
                        doc = json.loads(raw)
                        if resp.status == 200 and len(doc["results"]) == 12:
                            outcome = "200"
                        else:
                            outcome = "503" if resp.status == 503 and "error" in doc else f"bad {raw[:200]}"
            except ConnectionRefusedError:
                outcome = "refused"
                stop.wait(0.05)
            except Exception as exc:  # recorded, asserted below
                outcome = f"bad {type(exc).__name__}: {exc}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while outcomes.count("200") < 6:
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        deadline = time.monotonic() + 20  # the clients go on until one finds the port closed
        while "refused" not in outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    bad = [o for o in outcomes if o.startswith("bad")]
    assert not bad, bad[:5]
    assert outcomes.count("200") >= 6 and "refused" in outcomes, outcomes
    log = srv.log_path.read_text()
    assert "mps serve: stopped" in log and "Traceback" not in log
