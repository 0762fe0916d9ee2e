"""The trainer's side of `mps serve`: POST /v1/batch (JSON and multipart, encoded images and raw uint8 arrays,
composite rewards), Client.submit and AsyncClient against a real server on loopback, retries of a busy server,
and the typed error when the server dies mid-run."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import IMAGES, kill_hard
from PIL import Image
from test_serve import TOKEN, ServerProcess, call, free_port

from mps_cli.constants import BATCH_SCHEMA

PROMPT = "a red fox sitting in a snowy forest at dawn"
NAMES = ["crop.png", "portrait.jpg", "sunset.png", "wide.webp"]


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("batch"), fork=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(server_process) -> ServerProcess:
    """The module's server, started again if a test (the one that kills it) has stopped it."""
    return server_process.ensure()


def rgb(name: str) -> np.ndarray:
    """The fixture image's pixels as the scorer decodes them: H x W x 3 uint8."""
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def local(scorer):
    """In-process scores of the four images for PROMPT, every dimension."""
    return {n: r for n, r in zip(NAMES, scorer.score([IMAGES / n for n in NAMES], PROMPT, dims=["all"]))}


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A hand-written form, as any HTTP library would send it (files: field name, bytes, content type)."""
    b = "trainerboundary42"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}{i}"\r\nContent-Type: {t}\r\n\r\n'
              .encode() + data + b"\r\n" for i, (k, data, t) in enumerate(files)]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


# --------------------------------------------------------------------------- the route


def test_batch_json_with_arrays_and_encoded_images_scores_each_row_in_order_with_the_composite(server, local):
    arrays = [rgb(n) for n in NAMES[:2]]
    images = [{"shape": list(a.shape), "dtype": "uint8", "data": b64(a.tobytes())} for a in arrays]
    images += [b64((IMAGES / n).read_bytes()) for n in NAMES[2:]]
    images.insert(2, {"shape": [4, 4, 3], "dtype": "uint8", "data": b64(b"\0" * 47)})  # one byte short
    body = {"schema": BATCH_SCHEMA, "images": images, "prompt": PROMPT, "reward": "overall + 0.5*alignment"}
    status, doc, _ = call(server, "POST", "/v1/batch", body)
    assert status == 200, doc
    assert doc["schema"] == BATCH_SCHEMA and doc["keys"] == ["overall", "alignment"]
    assert doc["reward"] == "overall + 0.5*alignment" and doc["failed"] == 1
    rows = doc["results"]
    assert [r["image"] for r in rows] == [f"image {i}" for i in range(5)]
    assert rows[2]["error"] == "image 2: shape [4, 4, 3] needs 48 bytes of uint8, got 47"
    assert doc["rewards"][2] is None
    for row, name, reward in zip(rows[:2] + rows[3:], NAMES, doc["rewards"][:2] + doc["rewards"][3:]):
        want = local[name].scores
        assert set(row["scores"]) == {"overall", "alignment"}
        for k in ("overall", "alignment"):
            assert abs(row["scores"][k] - want[k]) <= 1e-5, (name, k)
        assert row["terms"] == row["scores"]
        assert abs(row["composite"] - (want["overall"] + 0.5 * want["alignment"])) <= 2e-5
        assert reward == row["composite"]


def test_batch_multipart_array_parts_declare_their_shape(server, local):
    a, grey = rgb("sunset.png"), np.asarray(Image.open(IMAGES / "gray.png"))
    form, ctype = multipart(
        [("schema", BATCH_SCHEMA), ("prompt", PROMPT), ("dims", "detail"), ("names", "sun"), ("names", "grey"),
         ("names", "crop")],
        [("array", a.tobytes(), f'application/octet-stream; dtype=uint8; shape="{a.shape[0]},{a.shape[1]},3"'),
         ("array", grey.tobytes(), f"application/octet-stream; shape={grey.shape[0]}x{grey.shape[1]}"),
         ("image", (IMAGES / "crop.png").read_bytes(), "image/png")])
    status, doc, _ = call(server, "POST", "/v1/batch", raw=form, headers={"Content-Type": ctype})
    assert status == 200 and doc["failed"] == 0, doc
    assert [r["image"] for r in doc["results"]] == ["sun", "grey", "crop"]
    assert doc["rewards"] == [r["scores"]["detail"] for r in doc["results"]]  # no reward: the first key
    assert abs(doc["results"][0]["scores"]["detail"] - local["sunset.png"].scores["detail"]) <= 1e-5
    assert abs(doc["results"][2]["scores"]["detail"] - local["crop.png"].scores["detail"]) <= 1e-5
    status, doc, _ = call(server, "POST", "/v1/score", {"images": [b64((IMAGES / "gray.png").read_bytes())],
                                                        "prompt": PROMPT, "dims": ["detail"]})
    assert status == 200  # a grey array is the same pixels as the grey PNG
    assert doc["results"][0]["scores"] == pytest.approx(
        call(server, "POST", "/v1/batch", raw=form, headers={"Content-Type": ctype})[1]["results"][1]["scores"],
        abs=1e-5)


REFUSED = {
    "another schema": ({"schema": "mps-score/batch@9", "images": ["AAAA"], "prompt": "x"}, 422,
                       "unsupported schema 'mps-score/batch@9'"),
    "float array": ({"images": [{"shape": [2, 2, 3], "dtype": "float32", "data": "AAAA"}], "prompt": "x"}, 422,
                    "arrays must be uint8"),
    "array without dtype": ({"images": [{"shape": [2, 2, 3], "data": "AAAA"}], "prompt": "x"}, 422,
                            "an array is"),
    "array over the pixel limit": ({"images": [{"shape": [90000, 90000, 3], "dtype": "uint8", "data": "AAAA"}],
                                    "prompt": "x"}, 422, "over the 67 Mpx limit"),
    "array shape nonsense": ({"images": [{"shape": [2, "2", 3], "dtype": "uint8", "data": "AAAA"}], "prompt": "x"},
                             422, "shape is [height, width, channels]"),
    "unknown reward term": ({"images": ["AAAA"], "prompt": "x", "reward": "overall+0.5*beauty"}, 422,
                            "unknown reward term 'beauty'"),
    "reward naming a judge the server lacks": ({"images": ["AAAA"], "prompt": "x", "reward": "overall+pickscore"},
                                               422, "names a model this server does not load"),
    "reward not a weighted sum": ({"images": ["AAAA"], "prompt": "x", "reward": "overall*detail"}, 422,
                                  "a product of two scores is not a weighted sum"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_batch_refusals_name_the_problem(server, case):
    body, status, message = REFUSED[case]
    got, doc, _ = call(server, "POST", "/v1/batch", body)
    assert got == status and message in doc["error"], doc


def test_batch_keeps_the_token_and_the_form_rules(server):
    body = {"images": ["AAAA"], "prompt": "x"}
    assert call(server, "POST", "/v1/batch", body, token=None)[0] == 401
    assert call(server, "POST", "/v1/batch", body, token="guess")[0] == 401
    form, ctype = multipart([("prompt", "x")], [("array", b"\0" * 12, "application/octet-stream")])
    status, doc, _ = call(server, "POST", "/v1/batch", raw=form, headers={"Content-Type": ctype})
    assert status == 422 and "declares its shape" in doc["error"]
    assert call(server, "GET", "/v1/info")[1]["schemas"] == [BATCH_SCHEMA]


# --------------------------------------------------------------------------- the clients


def test_client_sends_arrays_raw_and_halves_a_request_over_the_body_limit(server, scorer):
    from mps_cli.client import Client

    # 8 arrays of 512 x 512 x 3 are 6 MiB: over this server's 4 MiB limit, so the client halves the request.
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]
    before = call(server, "GET", "/v1/info")[1]["batching"]["requests"]
    got = Client(server.url, token=TOKEN).submit(arrays, PROMPT, reward="detail - alignment").result(120)
    want = scorer.score([Image.fromarray(a) for a in arrays], PROMPT, dims=["detail", "alignment"])
    assert [r.image for r in got] == [f"<image {i}>" for i in range(8)]
    for g, w in zip(got, want, strict=True):
        assert g.ok and abs(g.composite - (w.scores["detail"] - w.scores["alignment"])) <= 2e-5
        assert g.terms.keys() == {"detail", "alignment"}
    assert call(server, "GET", "/v1/info")[1]["batching"]["requests"] - before == 2
    bad = Client(server.url, token=TOKEN).submit([arrays[0].astype(np.float32), arrays[1]], PROMPT).result(60)
    assert "an array must be uint8" in bad[0].error and bad[1].ok


class BusyFront:
    """A loopback HTTP front for the real server: answers the first ``busy`` requests 503 with Retry-After,
    forwards the rest, and records when each request (its body) came and how many were open at once."""

    def __init__(self, upstream: str, busy: int, retry_after: str = "0.3"):
        self.arrivals: list[tuple[float, bytes]] = []
        self.open = self.most_open = 0
        lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    front.arrivals.append((time.monotonic(), body))
                    n = len(front.arrivals)
                    front.open += 1
                    front.most_open = max(front.most_open, front.open)
                if n <= busy:
                    time.sleep(0.05)
                    answer = (503, b'{"error": "busy: retry shortly"}', {"Retry-After": retry_after})
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                    req = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                                 headers=headers)
                    try:
                        with urllib.request.urlopen(req, timeout=60) as r:
                            answer = (r.status, r.read(), {})
                    except urllib.error.HTTPError as exc:
                        answer = (exc.code, exc.read(), {})
                with lock:  # no longer open once answered: the client may send its next request at once
                    front.open -= 1
                self._answer(*answer)

            def _answer(self, status, data, headers):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_async_client_retries_503_honouring_retry_after_and_bounds_requests_in_flight(server, local):
    from mps_cli.client import AsyncClient

    front = BusyFront(server.url, busy=2, retry_after="0.3")
    try:
        async def rollout():
            client = AsyncClient(front.url, token=TOKEN, max_in_flight=2)
            batches = [[IMAGES / n for n in NAMES[i:] + NAMES[:i]] for i in range(6)]
            tasks = [asyncio.create_task(client.score(b, PROMPT, dims=["overall"])) for b in batches]
            return batches, await asyncio.gather(*tasks)

        batches, answers = asyncio.run(rollout())
    finally:
        front.close()
    for batch, got in zip(batches, answers, strict=True):
        assert [r.image for r in got] == [str(p) for p in batch]
        assert all(abs(r.scores["overall"] - local[p.name].scores["overall"]) <= 1e-5 for r, p in zip(got, batch))
    assert len(front.arrivals) == 6 + 2  # two busy answers, each retried once
    assert front.most_open <= 2
    for t_busy, body in front.arrivals[:2]:  # the same request again, no sooner than the server asked
        (t_retry,) = [t for t, b in front.arrivals[2:] if b == body]
        assert t_retry - t_busy >= 0.3


def test_the_async_client_and_submit_import_no_torch(server):
    script = f"""
import asyncio, sys
from mps_cli.client import AsyncClient, Client
data = open({str(IMAGES / "crop.png")!r}, "rb").read()
async def main():
    return await AsyncClient({server.url!r}, token={TOKEN!r}).score([data], "a fox", reward="overall")
(r,) = asyncio.run(main())
(s,) = Client({server.url!r}, token={TOKEN!r}).submit([data], "a fox").result(60)
assert r.ok and s.ok and abs(r.composite - s.scores["overall"]) < 1e-6, (r, s)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "starlette", "safetensors", "open_clip")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().replace("'", '"')) == []


def test_backoff_doubles_from_the_first_wait_and_never_undercuts_retry_after():
    from mps_cli.client import BACKOFF_MAX_S, backoff_delay

    assert [backoff_delay(n) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, BACKOFF_MAX_S, BACKOFF_MAX_S]
    assert backoff_delay(0, "1") == 1.0 and backoff_delay(5, "1") == 3.2 and backoff_delay(2, "junk") == 0.4
    assert backoff_delay(0, "3600") == 60.0  # a server cannot park a client for an hour


def test_unreachable_port_is_a_server_error_at_once():
    from mps_cli.client import AsyncClient
    from mps_cli.errors import ServerError

    t = time.monotonic()
    with pytest.raises(ServerError, match="cannot reach the scoring server"):
        asyncio.run(AsyncClient(f"http://127.0.0.1:{free_port()}").info())
    assert time.monotonic() - t < 5


def test_the_flow_grpo_example_rewards_tensors_and_arrays_alike(server, scorer):
    """examples/flow_grpo_reward_server.py: flow_grpo's reward contract (B x 3 x H x W floats in [0, 1] or
    B x H x W x 3 uint8 in, (scores, details) out) over /v1/batch."""
    import importlib.util

    import torch
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("flow_grpo_example", REPO / "examples" / "flow_grpo_reward_server.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pixels = np.stack([np.asarray(Image.open(IMAGES / n).convert("RGB").resize((128, 96))) for n in NAMES])
    fn = example.RemoteReward(server.url, "overall + 0.5*alignment", TOKEN)
    scores, details = fn(pixels, [PROMPT] * 4, {})
    want = scorer.score([Image.fromarray(a) for a in pixels], PROMPT, dims=["overall", "alignment"])
    assert set(details) == {"overall", "alignment"}
    for s, w, o in zip(scores, want, details["overall"]):
        assert abs(s - (w.scores["overall"] + 0.5 * w.scores["alignment"])) <= 2e-5
        assert abs(o - w.scores["overall"]) <= 1e-5
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # what a sampler decodes
    pending = fn.submit(tensor, [PROMPT] * 4)
    again, _ = fn.collect(pending)
    assert again == pytest.approx(scores, abs=1e-6)
    with pytest.raises(ValueError, match="expected B x 3 x H x W floats"):
        fn(pixels[0], [PROMPT], {})


def test_a_server_killed_mid_run_is_a_server_error_for_async_and_submitted_calls(server):
    from mps_cli.client import AsyncClient, Client
    from mps_cli.errors import ServerError

    srv = server  # killed here; the next test that needs it starts it again
    try:
        big = [(IMAGES / n).read_bytes() for n in NAMES] * 16

        async def rollout():
            client = AsyncClient(srv.url, token=TOKEN, max_in_flight=2, timeout=30)
            assert (await client.score(big[:2], PROMPT))[0].ok
            tasks = [asyncio.create_task(client.score(big, PROMPT, dims=["all"])) for _ in range(6)]
            await asyncio.sleep(0.2)
            kill_hard(srv.proc)  # the forked server itself, not only its shim
            results = await asyncio.gather(*tasks, return_exceptions=True)
            with pytest.raises(ServerError, match="cannot reach the scoring server"):
                await client.score(big[:1], PROMPT)
            return results

        results = asyncio.run(rollout())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, ServerError) for e in errors), results
        assert all("cannot reach the scoring server at " + srv.url in str(e) for e in errors)
        future = Client(srv.url, token=TOKEN).submit(big[:1], PROMPT)
        with pytest.raises(ServerError, match="connection refused|Connection refused"):
            future.result(30)
    finally:
        srv.proc.wait(30)


def test_a_large_request_is_scored_a_model_batch_at_a_time_while_the_rest_decodes(scorer):
    """The first max_batch images go to the model before the request's last image is decoded: here the last
    one decodes only once a batch has been scored (in-process app; the scorer is the real one, its decode of
    that one image held back)."""
    import httpx

    from mps_cli.server import ServeOptions, create_app

    batch_done = threading.Event()

    class HeldBack:
        def __getattr__(self, name):
            return getattr(scorer, name)

        def load_pixels(self, source, max_pixels):
            if getattr(source, "filename", "") == "last":
                assert batch_done.wait(30), "the first batch was not scored while the last image waited"
            return scorer.load_pixels(source, max_pixels)

        def score_pixels(self, *args, **kwargs):
            out = scorer.score_pixels(*args, **kwargs)
            batch_done.set()
            return out

    app = create_app(HeldBack(), ServeOptions(max_batch=2))
    images = [{"data": b64((IMAGES / n).read_bytes()), "name": name}
              for n, name in (("crop.png", "a"), ("sunset.png", "b"), ("portrait.jpg", "last"))]

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://mps") as http:
                return await http.post("/v1/batch", json={"images": images, "prompt": PROMPT}, timeout=60)

    answer = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert [r["image"] for r in doc["results"]] == ["a", "b", "last"] and doc["failed"] == 0
    want = scorer.score([IMAGES / "portrait.jpg"], PROMPT)[0].scores["overall"]
    assert abs(doc["results"][2]["scores"]["overall"] - want) <= 1e-5
    assert app.state.service.batcher.stats()["requests"] == 1  # one request, queued in two parts
