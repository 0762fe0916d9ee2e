"""`mps serve` and its client: a real server process on 127.0.0.1, plus the batcher in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS, forked_mps, mps_executable

TOKEN = "s3cret-token"
IMAGE_NAMES = sorted(p.name for p in IMAGES.iterdir())
SMALL = ["gray.png", "palette.gif", "portrait.jpg"]  # small files, for requests with many images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


class ServerProcess:
    """One `mps serve` on loopback with the fixture weights, a token, an allowed folder and a 4 MiB body limit;
    ``fork``: a fork of conftest's fork server (the shim passes signals on), where the process's start is not
    under test."""

    def __init__(self, tmp: Path, fork: bool = False):
        self.tmp, self.fork = tmp, fork
        self.allowed = tmp / "allowed"
        self.allowed.mkdir()
        (self.allowed / "sub").mkdir()
        for name in IMAGE_NAMES:
            (self.allowed / name).write_bytes((IMAGES / name).read_bytes())
        (self.allowed / "escape.png").symlink_to(IMAGES / "sunset.png")  # a link out of the folder
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "server.log"

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("MPS_WEIGHTS", None)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(forked_mps() if self.fork else mps_executable()), "serve", "--weights", str(WEIGHTS), "--device", "cpu",
             "--port", str(self.port), "--token", TOKEN, "--allow-dir", str(self.allowed), "--max-body-mb", "4"],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not come up in 90 s: " + self.log_path.read_text())

    def ensure(self) -> ServerProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve"), fork=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(server_process) -> ServerProcess:
    """The module's server, restarted if a test has stopped it."""
    return server_process.ensure()


def call(srv, method: str, path: str, body=None, token: str | None = TOKEN, headers: dict | None = None,
         raw: bytes | None = None, timeout: float = 60):
    """(status, JSON document, headers) of one HTTP call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def client(srv, **kw):
    from mps_cli.client import Client

    return Client(srv.url, token=TOKEN, **kw)


@pytest.fixture(scope="module")
def local(scorer, expected):
    """In-process scores of every fixture image for every fixture prompt, all dimensions."""
    prompts = sorted({r["prompt"] for r in expected["scores"]})
    out = {}
    for p in prompts:
        for name, r in zip(IMAGE_NAMES, scorer.score([IMAGES / n for n in IMAGE_NAMES], p, dims=["all"])):
            out[name, p] = r
    return out


# --------------------------------------------------------------------------- scores


def test_scores_through_the_server_equal_the_in_process_scorer(server, local, expected):
    c = client(server)
    for prompt in sorted({r["prompt"] for r in expected["scores"]}):
        got = c.score([IMAGES / n for n in IMAGE_NAMES], prompt, dims=["all"])
        for name, r in zip(IMAGE_NAMES, got):
            want = local[name, prompt]
            assert r.ok and r.image == str(IMAGES / name) and r.prompt == prompt
            assert r.kept_tokens == want.kept_tokens
            assert r.scores.keys() == want.scores.keys()
            for k in want.scores:
                assert abs(r.scores[k] - want.scores[k]) <= 1e-5, (name, prompt, k)
    # ... and the original implementation's numbers, with a custom condition and threshold per request
    for row in expected["custom"][:8]:
        (r,) = c.score([IMAGES / row["image"]], row["prompt"], dims=[], condition=row["condition"],
                       mask_threshold=row["mask_threshold"])
        assert abs(r.scores["custom"] - row["score"]) < 1e-3 and r.kept_tokens["custom"] == row["kept_tokens"]


def test_per_image_prompts_partial_failure_and_compare(server, local, expected, tmp_path):
    p1, p2 = sorted({r["prompt"] for r in expected["scores"]})[:2]
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    c = client(server)
    got = c.score([IMAGES / "crop.png", text, tmp_path / "missing.png", IMAGES / "wide.webp"], [p1, p2, p1, None])
    assert [r.ok for r in got] == [True, False, False, False]
    assert abs(got[0].scores["overall"] - local["crop.png", p1].scores["overall"]) <= 1e-5
    assert got[1].error == f"{text}: not an image PIL can read"
    assert got[2].error == f"{tmp_path / 'missing.png'}: no such file"
    assert got[3].error == f"{IMAGES / 'wide.webp'}: no prompt for this image"

    cmp = c.compare(IMAGES / "alpha.png", IMAGES / "sunset.png", p2, dims=["overall", "detail"])
    for k in ("overall", "detail"):
        assert abs(cmp.results[k].a - local["alpha.png", p2].scores[k]) <= 1e-5
        assert abs(cmp.results[k].b - local["sunset.png", p2].scores[k]) <= 1e-5
        assert cmp.results[k].winner == ("a" if cmp.results[k].a > cmp.results[k].b else "b")


def test_multipart_upload_and_data_urls_and_server_paths(server, local, expected):
    prompt = sorted({r["prompt"] for r in expected["scores"]})[0]
    boundary = "mpsboundary"
    parts = []
    for name in ("gray.png", "portrait.jpg"):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode()
                     + (IMAGES / name).read_bytes() + b"\r\n")
    for field, value in (("prompt", prompt), ("dims", "overall"), ("dims", "alignment")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, doc, _ = call(server, "POST", "/v1/score", raw=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, doc
    assert [r["image"] for r in doc["results"]] == ["gray.png", "portrait.jpg"]
    for row, name in zip(doc["results"], ("gray.png", "portrait.jpg")):
        assert set(row["scores"]) == {"overall", "alignment"}
        assert abs(row["scores"]["alignment"] - local[name, prompt].scores["alignment"]) <= 1e-5

    images = [f"data:image/png;base64,{b64(IMAGES / 'alpha.png')}", {"path": "sub/../crop.png"},
              {"path": str(server.allowed / "wide.webp")}]
    status, doc, _ = call(server, "POST", "/v1/score", {"images": images, "prompt": prompt})
    assert status == 200 and doc["failed"] == 0, doc
    for row, name in zip(doc["results"], ("alpha.png", "crop.png", "wide.webp")):
        assert abs(row["scores"]["overall"] - local[name, prompt].scores["overall"]) <= 1e-5


def test_client_uploads_raw_bytes_and_odd_names_and_prompts_survive(server, scorer, tmp_path):
    """The client sends a multipart form (no base64): names and prompts with quotes, CRLF, non-ASCII
    and a prompt over the form parser's default 1 MB part limit come back as sent, scored as locally."""
    from unittest import mock

    from mps_cli.client import Client

    odd = tmp_path / 'dir "q"' / "ñ 東京\tx.png"
    odd.parent.mkdir()
    odd.write_bytes((IMAGES / "sunset.png").read_bytes())
    plain = tmp_path / "plain.png"
    plain.write_bytes((IMAGES / "crop.png").read_bytes())
    prompts = ['a "quoted" fox\r\n--not-a-boundary\r\nat dawn, 東京', "word " * 300_000]
    c = client(server)
    with mock.patch.object(Client, "_call", autospec=True, side_effect=Client._call) as spy:
        got = c.score([odd, plain], prompts, dims=["overall", "detail"], mask_threshold=0.25)
    assert spy.call_args.kwargs["form"][1].startswith("multipart/form-data; boundary=")
    want = scorer.score([odd, plain], prompts, dims=["overall", "detail"], mask_threshold=0.25)
    for g, w in zip(got, want, strict=True):
        assert g.ok and g.image == w.image and g.prompt == w.prompt
        assert g.kept_tokens == w.kept_tokens and g.prompt_truncated == w.prompt_truncated
        assert all(abs(g.scores[k] - w.scores[k]) <= 1e-5 for k in w.scores)
    assert got[1].prompt_truncated
    # A file name with bytes that are not UTF-8 cannot go into the form; the client sends JSON instead.
    undecodable = tmp_path / os.fsdecode(b"bad\xff.png")
    undecodable.write_bytes((IMAGES / "gray.png").read_bytes())
    (r,) = c.score([undecodable], prompts[0])
    (w,) = scorer.score([undecodable], prompts[0])
    assert r.ok and r.image == str(undecodable) and abs(r.scores["overall"] - w.scores["overall"]) <= 1e-5


def test_cli_through_the_server_is_byte_identical_to_local_and_imports_no_torch(server, expected):
    from typer.testing import CliRunner

    from mps_cli.cli import app

    prompt = sorted({r["prompt"] for r in expected["scores"]})[1]
    args = ["score", str(IMAGES), "--prompt", prompt, "--dim", "all", "--json"]
    local_run = CliRunner().invoke(app, [*args, "--weights", str(WEIGHTS), "--device", "cpu"])
    assert local_run.exit_code == 0
    env = {**os.environ, "MPS_SERVER": server.url, "MPS_SERVE_TOKEN": TOKEN, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mps_cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == local_run.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "mps_cli.client" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "open_clip", "safetensors", "starlette")]

    # the same exit code as a local run when an input fails, and 4 when the server is unreachable
    rank = subprocess.run([*forked_mps(), "rank", str(IMAGES / "gray.png"), "nope.png", "--prompt", prompt,
                           "--jsonl", "--server", server.url, "--token", TOKEN], capture_output=True, text=True,
                          env=env, timeout=60)
    # the input's one line, then the closing summary every scoring command prints (as a local run does)
    assert rank.returncode == 1 and rank.stderr.splitlines() == ["mps: error: nope.png: no such file",
                                                                 "mps: 1 scored, 1 failed"]
    assert [json.loads(line).get("rank") for line in rank.stdout.splitlines()] == [1, None]
    down = subprocess.run([*forked_mps(), "compare", str(IMAGES / "gray.png"), str(IMAGES / "crop.png"),
                           "--prompt", prompt, "--server", f"http://127.0.0.1:{free_port()}"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert down.returncode == 4 and "cannot reach the scoring server" in down.stderr and not down.stdout


# --------------------------------------------------------------------------- concurrency


def test_32_concurrent_clients_get_their_own_answers_in_shared_batches(server, scorer):
    from mps_cli.client import Client

    clients, per_client = 32, 8
    # 8 prompts x 7 images: clients sharing a prompt ask for different images at each step
    prompts = [f"a red fox, take {i % 8}" for i in range(clients)]
    pairs = [(n, p) for p in sorted(set(prompts)) for n in IMAGE_NAMES]
    scored = scorer.score([IMAGES / n for n, _ in pairs], [p for _, p in pairs], batch_size=len(pairs))
    want = {pair: r.scores["overall"] for pair, r in zip(pairs, scored)}
    encoded = {n: (IMAGES / n).read_bytes() for n in IMAGE_NAMES}
    before = call(server, "GET", "/v1/info")[1]["batching"]
    errors: list[str] = []
    answered = [0] * clients
    start = threading.Barrier(clients)

    def work(i: int) -> None:
        c = Client(server.url, token=TOKEN, batch_size=8)
        start.wait()
        for j in range(per_client):
            names = [IMAGE_NAMES[(i // 8 + j + k) % len(IMAGE_NAMES)] for k in range(1 + (i + j) % 3)]
            try:
                got = c.score([encoded[n] for n in names], prompts[i])
            except Exception as exc:  # recorded, asserted below
                errors.append(f"client {i} request {j}: {exc!r}")
                continue
            for n, r in zip(names, got):
                if r.prompt != prompts[i] or abs(r.scores["overall"] - want[n, prompts[i]]) > 1e-5:
                    errors.append(f"client {i} request {j}: {n} got {r}")
            answered[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert answered == [per_client] * clients
    after = call(server, "GET", "/v1/info")[1]["batching"]
    assert after["requests"] - before["requests"] == clients * per_client
    batches = after["batches"] - before["batches"]
    images = after["images"] - before["images"]
    assert images == sum(1 + (i + j) % 3 for i in range(clients) for j in range(per_client))
    assert batches < images / 2 and after["largest_batch"] > 1  # images of different clients shared batches
    assert after["queue_length"] == 0


# --------------------------------------------------------------------------- bad requests


def _bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels, with a token IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD = {
    "invalid JSON": (dict(raw=b'{"images": [}'), 400, "invalid JSON"),
    "bad base64": (dict(body={"images": ["@@not base64@@"], "prompt": "a fox"}), 422, "invalid base64"),
    "text file as image": (dict(body={"images": [base64.b64encode(b"hello, world\n" * 40).decode()],
                                      "prompt": "a fox"}), 422, "not an image PIL can read"),
    "decompression bomb": (dict(body={"images": [base64.b64encode(_bomb_png()).decode()], "prompt": "a fox"}),
                           422, "decompression bomb"),
    "body over the limit": (dict(raw=b'{"images": ["' + b"A" * (5 * 2**20) + b'"], "prompt": "x"}'), 413,
                            "byte limit"),
    "no prompt": (dict(body={"images": ["AAAA"]}), 422, "no prompt"),
    "unknown dim": (dict(body={"images": ["AAAA"], "prompt": "a fox", "dims": ["beauty"]}), 422,
                    "unknown dimension 'beauty'"),
    "wrong token": (dict(body={"images": ["AAAA"], "prompt": "a fox"}, token="guess"), 401, "wrong token"),
    "missing token": (dict(body={"images": ["AAAA"], "prompt": "a fox"}, token=None), 401, "missing token"),
    "path outside --allow-dir": (dict(body={"images": [{"path": str(IMAGES / "gray.png")}], "prompt": "a fox"}),
                                 403, "outside the folder"),
    "a .. path": (dict(body={"images": [{"path": "../../etc/passwd"}], "prompt": "a fox"}), 403,
                  "outside the folder"),
    "a symlink out of --allow-dir": (dict(body={"images": [{"path": "escape.png"}], "prompt": "a fox"}), 403,
                                     "outside the folder"),
    "unknown field": (dict(body={"image": ["AAAA"], "prompt": "a fox"}), 422, "unknown field(s): image"),
    "unknown route": (dict(body={}, path="/v1/nothing"), 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, case):
    kw, status, message = BAD[case]
    kw = dict(kw)
    path = kw.pop("path", "/v1/score")
    got, doc, _ = call(server, "POST", path, **kw)
    assert got == status, doc
    assert message in doc["error"]
    if status == 422 and "results" in doc:
        assert [message in r["error"] for r in doc["results"]] == [True]
    ok, doc, _ = call(server, "POST", "/v1/score", {"images": [b64(IMAGES / "gray.png")], "prompt": "a fox"})
    assert ok == 200 and doc["results"][0]["scores"]["overall"] == doc["results"][0]["scores"]["overall"]
    assert call(server, "GET", "/healthz", token=None)[0] == 200


def test_one_bad_image_among_good_ones_is_an_error_row(server):
    images = [b64(IMAGES / "gray.png"), "%%%", b64(IMAGES / "portrait.jpg")]
    status, doc, _ = call(server, "POST", "/v1/score", {"images": images, "prompt": "a fox", "names": ["g", "x", "p"]})
    assert status == 200 and doc["failed"] == 1
    assert [("scores" in r, r["image"]) for r in doc["results"]] == [(True, "g"), (False, "x"), (True, "p")]
    assert doc["results"][1]["error"].startswith("x: invalid base64")


def test_info_and_request_log(server):
    status, info, _ = call(server, "GET", "/v1/info")
    assert status == 200
    assert info["weights"] == str(WEIGHTS) and info["device"] == "cpu" and info["dtype"] == "fp32"
    assert len(info["identity"]) > 8 and info["limits"]["max_body_bytes"] == 4 * 2**20
    assert {"requests", "images", "batches", "mean_batch_size", "queue_length"} <= set(info["batching"])
    assert call(server, "GET", "/v1/info", token=None)[0] == 401
    deadline = time.monotonic() + 10  # the line is written just after the answer is sent
    while "GET /v1/info 401" not in (log := server.log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"^mps serve: POST /v1/score 200 1 image [0-9.]+ ms$", log, re.M)
    assert re.search(r"^mps serve: GET /v1/info 401 [0-9.]+ ms$", log, re.M)
    assert "Traceback" not in log


# --------------------------------------------------------------------------- SIGTERM


@pytest.fixture
def own_server(tmp_path):
    """A real console-script `mps serve` of the test's own, for a test of how the process stops."""
    srv = ServerProcess(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(own_server):
    server = own_server
    prompt = "a lighthouse in a storm"
    body = {"images": [b64(IMAGES / SMALL[k % 3]) for k in range(48)], "prompt": prompt}
    base = call(server, "GET", "/v1/info")[1]["batching"]["requests"]
    n = 6
    results: list = [None] * n

    def send(i: int) -> None:
        results[i] = call(server, "POST", "/v1/score", body, timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while call(server, "GET", "/v1/info")[1]["batching"]["requests"] < base + n:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    in_flight = sum(r is None for r in results)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert server.proc.wait(60) == 0
    assert in_flight > 0  # the signal did arrive while requests were being scored
    assert all(r is not None and r[0] == 200 and len(r[1]["results"]) == 48 for r in results)
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=2)
    assert "mps serve: stopped" in server.log_path.read_text()


# --------------------------------------------------------------------------- in-process: batcher, 503, start-up


def test_batcher_groups_compatible_images_up_to_max_batch(scorer):
    from PIL import Image

    from mps_cli.engine.preprocess import pixels_from_image
    from mps_cli.engine.scorer import resolve_conditions
    from mps_cli.server import MicroBatcher, QueueFull

    imgs = [Image.open(IMAGES / n).convert("RGB") for n in IMAGE_NAMES]
    size = scorer.config.vision.image_size
    px = [pixels_from_image(img, size) for img in imgs]
    names = list(IMAGE_NAMES)
    overall = tuple(resolve_conditions(["overall"], None))
    custom = tuple(resolve_conditions([], "hands, faces"))
    batcher = MicroBatcher(scorer, max_batch=4, max_wait_ms=0, max_queue=15)
    # queued before the worker starts, so the batches are decided by grouping alone
    f1 = batcher.submit(px, names, ["a fox"] * 7, overall, 0.3)  # 7 alike: batches of 4 and 3
    f2 = batcher.submit(px[:2], names[:2], ["a cat"] * 2, custom, 0.3)  # another condition
    f3 = batcher.submit(px[:2], names[:2], ["a fox"] * 2, overall, 0.01)  # another threshold
    with pytest.raises(QueueFull, match=r"11 images are waiting for the model \(limit 15\)"):
        batcher.submit(px, names, ["x"] * 7, overall, 0.3)
    batcher.start()
    got = [f.result(60) for f in (*f1, *f2, *f3)]
    batcher.close()
    stats = batcher.stats()
    assert stats["batches"] == 4 and stats["largest_batch"] == 4 and stats["queue_length"] == 0
    want = (scorer.score(imgs, "a fox") + scorer.score(imgs[:2], "a cat", dims=[], condition="hands, faces")
            + scorer.score(imgs[:2], "a fox", mask_threshold=0.01))
    assert [g.image for g in got] == names + names[:2] + names[:2]
    for g, w in zip(got, want):
        assert g.prompt == w.prompt and g.scores.keys() == w.scores.keys()
        assert all(abs(g.scores[k] - w.scores[k]) <= 1e-5 for k in w.scores)
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit(px[:1], names[:1], ["x"], overall, 0.3)


def test_batcher_waits_for_a_fuller_batch_only_while_requests_are_on_their_way(scorer):
    import time

    from PIL import Image

    from mps_cli.engine.preprocess import pixels_from_image
    from mps_cli.engine.scorer import resolve_conditions
    from mps_cli.server import MicroBatcher

    size = scorer.config.vision.image_size
    px = [pixels_from_image(Image.open(IMAGES / n).convert("RGB"), size) for n in IMAGE_NAMES[:6]]
    names = list(IMAGE_NAMES[:6])
    overall = tuple(resolve_conditions(["overall"], None))
    # A minute's max wait: a batch that goes early went because nothing more was on its way.
    batcher = MicroBatcher(scorer, max_batch=8, max_wait_ms=60_000, max_queue=64)
    batcher.start()
    try:
        lone = batcher.submit(px[:2], names[:2], ["a fox"] * 2, overall, 0.3)
        assert all(f.result(30).ok for f in lone)  # a lone request: scored at once
        batcher.expect()
        batcher.expect()  # two requests decoding
        first = batcher.submit(px[:2], names[:2], ["a fox"] * 2, overall, 0.3, expected=True)
        time.sleep(0.3)
        assert not any(f.done() for f in first)  # waiting for the other request's images
        second = batcher.submit(px[2:5], names[2:5], ["a fox"] * 3, overall, 0.3, expected=True)
        assert [f.result(30).image for f in first + second] == names[:5]
        batcher.expect()
        third = batcher.submit(px[5:], names[5:], ["a fox"], overall, 0.3)
        time.sleep(0.3)
        assert not third[0].done()
        batcher.unexpect()  # the request that was on its way gave up (every image failed, say)
        assert third[0].result(30).ok
        stats = batcher.stats()
        assert stats["batches"] == 3 and stats["largest_batch"] == 5
    finally:
        batcher.close()


def test_a_full_queue_answers_503_with_retry_after(scorer):
    import httpx

    from mps_cli.server import ServeOptions, create_app

    app = create_app(scorer, ServeOptions(max_queue=3))
    service = app.state.service
    body = {"images": [b64(IMAGES / "gray.png")] * 2, "prompt": "a fox"}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mps") as http:
            first = asyncio.create_task(http.post("/v1/score", json=body))
            while service.batcher.stats()["queue_length"] < 2:  # the worker is not running yet
                await asyncio.sleep(0.01)
            second = await http.post("/v1/score", json=body)
            service.batcher.start()
            return await first, second

    first, second = asyncio.run(scenario())
    service.batcher.close()
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "busy" in second.json()["error"]
    assert first.status_code == 200 and len(first.json()["results"]) == 2


def test_serve_refuses_a_public_address_without_a_token_and_explains_a_missing_extra(monkeypatch):
    from typer.testing import CliRunner

    from mps_cli.cli import app
    from mps_cli.cli import serve_cmds as serve_cmd

    monkeypatch.delenv("MPS_SERVE_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--weights", str(WEIGHTS)])
    assert r.exit_code == 2 and "without a token" in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = CliRunner().invoke(app, ["serve", "--port", str(busy.getsockname()[1]), "--weights", str(WEIGHTS)])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output
    # The serve extra is installed here; pretend one of its modules is not, to see the message.
    monkeypatch.setattr(serve_cmd, "_NEEDS", ("starlette", "no_such_module_for_mps"))
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2
    assert "pip install 'mps-score[serve]'" in r.output and "no_such_module_for_mps" in r.output


def test_model_options_with_server_agree_silently_or_are_refused(server, tmp_path):
    from conftest import run_cli
    from safetensors.torch import load_file, save_file

    img = str(server.allowed / "sunset.png")
    base = ["score", img, "--prompt", "a fox", "--jsonl", "--server", server.url, "--token", TOKEN]
    same = tmp_path / "same-bytes.safetensors"  # another path, the same file: the same model
    same.write_bytes(WEIGHTS.read_bytes())
    tensors = load_file(WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    other = tmp_path / "other.safetensors"
    save_file(tensors, other)
    cfg = json.loads((WEIGHTS.parent / "config.json").read_text())
    cfg["projection_dim"] = cfg["projection_dim"] * 2
    (tmp_path / "wide.json").write_text(json.dumps(cfg))

    for extra, env in ((["--weights", str(same), "--dtype", "fp32", "--device", "cpu"], None),
                       (["--config", str(WEIGHTS.parent / "config.json"), "--decode", "exact"], None),
                       ([], {"MPS_WEIGHTS": str(same)})):
        proc = run_cli(*base, *extra, env=env)
        assert proc.returncode == 0, (extra, proc.stderr)
        assert "scores" in json.loads(proc.stdout) and "warning" not in proc.stderr, proc.stderr

    refused = {
        "--weights": (["--weights", str(other)], None),
        "--weights (from $MPS_WEIGHTS)": ([], {"MPS_WEIGHTS": str(other)}),
        "--dtype": (["--dtype", "bf16"], None),
        "--device": (["--device", "cuda"], None),
        "--config": (["--config", str(tmp_path / "wide.json")], None),
        "--decode": (["--decode", "draft"], None),
        "--compile": (["--compile", "on"], None),
        "--revision": (["--revision", "v2"], None),
    }
    for flag, (extra, env) in refused.items():
        proc = run_cli(*base, *extra, env=env)
        assert proc.returncode == 2, (flag, proc.stderr)
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        line, = proc.stderr.splitlines()
        assert line.startswith(f"mps: error: {flag} ") and "drop " + flag.split()[0] in line, line
    # The server's own answer names what it serves, so the refusal can say it.
    line = run_cli(*base, "--dtype", "bf16").stderr
    assert "dtype fp32" in line and server.url in line
