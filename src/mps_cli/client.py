"""Clients of ``mps serve`` with the scorer's interface, on the standard library only.

``Client(url).score(images, prompts, dims=...)`` returns the same :class:`ScoreResult` s as
``Scorer.score``; ``Client.submit(...)`` returns a :class:`concurrent.futures.Future` of them, and
:class:`AsyncClient` is the same for asyncio, so a rollout loop can send batch k+1 while batch k is
scored. Nothing here imports torch, so a client starts in a fraction of a second.

Both clients share one protocol (:class:`_Protocol`): its methods that talk to the server are
generators that yield what to do next (an HTTP request, or a wait before retrying a busy server)
and get back the answer; each client drives them with its own transport (urllib, asyncio streams).
So the requests, the retries and the reading of answers are written once.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .constants import BATCH_SCHEMA, CLIENT_MAX_IN_FLIGHT, DEFAULT_MASK_THRESHOLD
from .devices import DEFAULT_BATCH
from .engine.preprocess import file_error
from .engine.scorer import Comparison, PairResult, PromptInput, ScoreResult, _prefetch, batch_of, image_label
from .errors import ImageError, PromptCountError, ServerError

#: How long a client keeps retrying a server that answers 503 (busy) before giving up.
BUSY_RETRY_SECONDS = 60.0
#: Back-off between retries of a 503: the first wait, and the longest (unless Retry-After asks for more).
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
#: The most a Retry-After header can make a client wait at once.
RETRY_AFTER_MAX_S = 60.0


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    data: bytes | None
    headers: dict


@dataclass(frozen=True)
class _Wait:
    seconds: float


#: What a protocol step gets back for a _Request: (status, headers, body).
_Reply = tuple[int, dict, bytes]
_Steps = Generator


@dataclass(frozen=True)
class _Upload:
    """One image as sent: an encoded file's bytes, or with ``shape`` a raw uint8 array's."""

    data: bytes
    shape: tuple[int, ...] | None = None


def backoff_delay(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0, 1, ...) of a busy (503) server: exponential back-off
    from :data:`BACKOFF_FIRST_S`, doubling up to :data:`BACKOFF_MAX_S`, and never less than the server's
    ``Retry-After`` (in seconds, at most :data:`RETRY_AFTER_MAX_S`)."""
    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 30))
    try:
        asked = min(max(float(retry_after), 0.0), RETRY_AFTER_MAX_S)
    except (TypeError, ValueError):
        asked = 0.0
    return max(delay, asked)


def _gone(url: str, exc: BaseException) -> ServerError:
    """The error for a server that cannot be reached or went away mid-request (refused, reset, timed out)."""
    reason = getattr(exc, "reason", None) or exc
    what = ("timed out" if isinstance(reason, TimeoutError | asyncio.TimeoutError)
            else " ".join(str(reason).split()) or type(reason).__name__)
    return ServerError(f"cannot reach the scoring server at {url} ({what})", hint="server-unreachable")


class _Protocol:
    """The requests, retries and answers both clients share; see the module's docstring."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, batch_size: int | None = None):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        self.url = url
        self.token = token
        self.timeout = timeout
        self._batch_size = batch_size
        self._info: dict | None = None
        self._truncated: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    def _call(self, method: str, path: str, body: dict | None = None,
              form: tuple[bytes, str] | None = None) -> _Steps:
        """One request, JSON ``body`` or an encoded multipart ``form`` (bytes, content type), retried with
        back-off while the server answers 503; returns (status, JSON document)."""
        headers = {"Accept": "application/json"}
        data = None
        if form is not None:
            data, headers["Content-Type"] = form
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        attempt = 0
        while True:
            status, reply_headers, raw = yield _Request(method, path, data, headers)
            if status != 503:
                break
            delay = backoff_delay(attempt, reply_headers.get("retry-after"))
            if time.monotonic() + delay > deadline:
                break
            yield _Wait(delay)
            attempt += 1
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ServerError(f"{self.url}{path} answered HTTP {status} with something that is not an "
                              "mps server's JSON; check the URL", hint="server")
        if status == 401:
            raise ServerError(f"the scoring server at {self.url} refused the token: {doc.get('error', '')}",
                              hint="token")
        if status >= 500:
            raise ServerError(f"the scoring server at {self.url} failed (HTTP {status}): {doc.get('error', '')}",
                              hint="server-failed")
        return status, doc

    def _fetch_info(self) -> _Steps:
        status, doc = yield from self._call("GET", "/v1/info")
        if status != 200:
            raise ServerError(f"{self.url}/v1/info: HTTP {status}: {doc.get('error', '')}")
        self._info = doc
        return doc

    def _served_demo(self) -> _Steps:
        """The served weights' demo marker (``/v1/info``'s ``demo``, asked once), or None."""
        info = self._info if self._info is not None else (yield from self._fetch_info())
        return info.get("demo") or None

    def _size(self) -> _Steps:
        """The default images per request: the server's batch size (asked once)."""
        if self._batch_size is None:
            info = self._info if self._info is not None else (yield from self._fetch_info())
            # A server too old to say gets the smallest default, the CPU's.
            self._batch_size = int(info.get("batch_size") or DEFAULT_BATCH["cpu"])
        return self._batch_size

    def prompt_truncated(self, prompt: str) -> bool:
        """Whether ``prompt`` is longer than the 77 tokens the model reads, as the server said for it.

        Known once a request with this prompt was answered (tokenising here would import the model's code).
        """
        return self._truncated.get(prompt, False)

    @staticmethod
    def _plan(images: Sequence, prompts: PromptInput, dims, condition, mask_threshold, reward):
        """(images, labels, prompts, the request's common fields) of a score call, checked."""
        images = list(images)
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise PromptCountError(len(images), len(prompt_list))
        common: dict = {"condition": condition, "mask_threshold": float(mask_threshold)}
        if dims is not None:
            common["dims"] = [dims] if isinstance(dims, str) else list(dims)
        if reward is not None:
            common["reward"] = reward
        return images, [image_label(img, i) for i, img in enumerate(images)], prompt_list, common

    def _score_chunk(self, images: list, labels: list[str], prompts: list, common: dict) -> _Steps:
        """One request to ``/v1/batch`` (halved while the server finds it too large); results in order."""
        rows: dict[int, ScoreResult] = {}
        uploads: dict[int, _Upload] = {}
        for i, (img, label, prompt) in enumerate(zip(images, labels, prompts, strict=True)):
            up = _read(img, label)
            if isinstance(up, ImageError):
                rows[i] = ScoreResult(image=label, prompt=prompt, error=str(up))
            elif prompt is None:
                rows[i] = ScoreResult(image=label, prompt=None, error=f"{label}: no prompt for this image")
            else:
                uploads[i] = up
        send = list(uploads)
        if send:
            fields = [("schema", BATCH_SCHEMA), *(("names", labels[i]) for i in send),
                      *(("prompts", prompts[i]) for i in send), *(("dims", d) for d in common.get("dims") or ()),
                      *((k, str(common[k])) for k in ("condition", "mask_threshold", "reward")
                        if common.get(k) is not None)]
            try:
                request = {"form": _multipart(fields, [uploads[i] for i in send])}
            except UnicodeEncodeError:
                # A name or prompt that is not UTF-8 (a file name's undecodable bytes): JSON escapes it.
                request = {"body": {"schema": BATCH_SCHEMA, "images": [_json_image(uploads[i]) for i in send],
                                    "names": [labels[i] for i in send], "prompts": [prompts[i] for i in send],
                                    **common}}
            status, doc = yield from self._call("POST", "/v1/batch", **request)
            if status == 413 and len(send) > 1:
                # Over the server's body limit: halves, so one big image does not sink the others.
                for half in (send[:len(send) // 2], send[len(send) // 2:]):
                    got = yield from self._score_chunk([images[i] for i in half], [labels[i] for i in half],
                                                       [prompts[i] for i in half], common)
                    rows.update(zip(half, got, strict=True))
            elif status == 413:
                rows[send[0]] = ScoreResult(image=labels[send[0]], prompt=prompts[send[0]],
                                            error=f"{labels[send[0]]}: too large for the server ({doc.get('error')})")
            elif "results" in doc and status in (200, 422):
                for i, row in zip(send, doc["results"], strict=False):
                    rows[i] = _result(row, labels[i], prompts[i])
                    self._truncated[prompts[i]] = rows[i].prompt_truncated
            else:
                raise ValueError(f"the scoring server refused the request (HTTP {status}): {doc.get('error', '')}")
        return [rows[i] for i in range(len(images))]

    def _score(self, images, prompts, dims, condition, mask_threshold, reward, batch_size) -> _Steps:
        """Every image in requests of ``batch_size`` (default: all in one), one after the other."""
        images, labels, prompt_list, common = self._plan(images, prompts, dims, condition, mask_threshold, reward)
        size = batch_size or max(1, len(images))
        out: list[ScoreResult] = []
        for s in range(0, len(images), size):
            out += yield from self._score_chunk(images[s:s + size], labels[s:s + size], prompt_list[s:s + size],
                                                common)
        return out

    def _compare(self, a, b, prompt: str, dims, condition, mask_threshold) -> _Steps:
        la, lb = image_label(a, 0), image_label(b, 1)
        payload = []
        for img, label in ((a, la), (b, lb)):
            up = _read(img, label)
            if isinstance(up, ImageError):
                raise up
            image = _json_image(up)
            payload.append({**image, "name": label} if isinstance(image, dict) else {"data": image, "name": label})
        body = {"a": payload[0], "b": payload[1], "prompt": prompt, "condition": condition,
                "mask_threshold": float(mask_threshold)}
        if dims is not None:
            body["dims"] = [dims] if isinstance(dims, str) else list(dims)
        status, doc = yield from self._call("POST", "/v1/compare", body)
        if status != 200:
            raise (ImageError if "results" in doc else ValueError)(doc.get("error", f"HTTP {status}"))
        self._truncated[prompt] = bool(doc.get("prompt_truncated"))
        return Comparison(prompt=doc["prompt"], a=la, b=lb,
                          results={k: PairResult(**v) for k, v in doc["results"].items()})


class Client(_Protocol):
    """Scores through a running ``mps serve`` at ``url``; ``token`` is its bearer token, if it wants one.

    ``batch_size`` is images per request for :meth:`score` (default: the server's batch size, so
    that a lone client gets the same model batches, and the same bits, as a local run).
    :meth:`submit` sends a call in the background; at most ``max_in_flight`` are outstanding (a
    further ``submit`` waits for one to finish).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, batch_size: int | None = None,
                 max_in_flight: int = CLIENT_MAX_IN_FLIGHT):
        super().__init__(url, token, timeout, batch_size)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ----------------------------------------------------------------------- transport
    def _run(self, steps: _Steps):
        reply = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, _Wait):
                time.sleep(step.seconds)
                reply = None
            else:
                reply = self._exchange(step)

    def _exchange(self, req: _Request) -> _Reply:
        r = urllib.request.Request(self.url + req.path, data=req.data, method=req.method, headers=req.headers)
        try:
            with urllib.request.urlopen(r, timeout=self.timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _gone(self.url, exc) from None

    # ----------------------------------------------------------------------- the server
    def info(self) -> dict:
        """The server's model, device, dtype, limits and batching statistics."""
        return self._run(self._fetch_info())

    @property
    def batch_size(self) -> int:
        return self._run(self._size())

    @property
    def demo(self) -> str | None:
        """As ``Scorer.demo``: ``"random"`` when the server serves demo weights (their scores mean nothing),
        else None; asks the server's ``/v1/info`` once per client."""
        return self._run(self._served_demo())

    # ----------------------------------------------------------------------- scoring
    def iter_score(
        self,
        images: Sequence,
        prompts: PromptInput,
        dims: Iterable[str] | None = None,
        condition: str | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        workers: int | None = None,
        reward: str | None = None,
    ) -> Iterator[ScoreResult]:
        """Like ``Scorer.iter_score``: results in input order as each request returns.

        Images are paths, PIL images, encoded bytes or uint8 arrays (H x W x 3, numpy); ``batch_size``
        images go in one request and ``workers`` requests are in flight at once (default 1, which keeps
        the server's batches the ones a local run would make). ``reward``: a composite expression
        (``overall+0.5*alignment``) the server evaluates; results then carry ``composite`` and ``terms``.
        """
        images, labels, prompt_list, common = self._plan(images, prompts, dims, condition, mask_threshold, reward)
        size = batch_of(self, batch_size)
        chunks = [range(s, min(s + size, len(images))) for s in range(0, len(images), size)]

        def run(chunk: range) -> list[ScoreResult]:
            return self._run(self._score_chunk([images[i] for i in chunk], [labels[i] for i in chunk],
                                               [prompt_list[i] for i in chunk], common))

        for results in _prefetch(chunks, run, workers or 1, 2 * (workers or 1)):
            for r in results:
                if progress:
                    progress(1)
                yield r

    def score(self, images: Sequence, prompts: PromptInput, dims: Iterable[str] | None = None,
              condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
              batch_size: int | None = None, progress: Callable[[int], None] | None = None,
              workers: int | None = None, reward: str | None = None) -> list[ScoreResult]:
        """Score images for one prompt or one prompt per image, as ``Scorer.score`` does."""
        return list(self.iter_score(images, prompts, dims, condition, mask_threshold, batch_size, progress, workers,
                                    reward))

    def submit(self, images: Sequence, prompts: PromptInput, dims: Iterable[str] | None = None,
               condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
               reward: str | None = None, batch_size: int | None = None) -> Future:
        """Send one call in the background: a Future of its ``ScoreResult`` list (all images in one request
        unless ``batch_size`` says otherwise). Blocks while ``max_in_flight`` calls are outstanding; the
        Future raises :class:`~mps_cli.errors.ServerError` if the server cannot be reached or goes away."""
        steps = self._score(images, prompts, dims, condition, mask_threshold, reward, batch_size)
        self._slots.acquire()
        try:
            future = self._executor().submit(self._run, steps)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="mps-client")
            return self._pool

    def close(self) -> None:
        """Wait for submitted calls, then release their threads."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compare(self, a, b, prompt: str, dims: Iterable[str] | None = None, condition: str | None = None,
                mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> Comparison:
        """Which of two images people would prefer for ``prompt``, as ``Scorer.compare``."""
        return self._run(self._compare(a, b, prompt, dims, condition, mask_threshold))


class AsyncClient(_Protocol):
    """:class:`Client` for asyncio: ``await client.score(images, prompts, reward=...)``.

    At most ``max_in_flight`` requests are on the wire at once (others wait their turn), so a rollout
    loop can ``asyncio.create_task`` the scoring of batch k and go on generating batch k+1. Busy
    answers (503) are retried with back-off; a server that cannot be reached, resets the connection or
    does not answer within ``timeout`` seconds raises :class:`~mps_cli.errors.ServerError`.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, batch_size: int | None = None,
                 max_in_flight: int = CLIENT_MAX_IN_FLIGHT):
        super().__init__(url, token, timeout, batch_size)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url}: expected http://HOST[:PORT]")
        self._host, self._tls, self._prefix = parts.hostname, parts.scheme == "https", parts.path
        self._port = parts.port or (443 if self._tls else 80)
        self.max_in_flight = max_in_flight
        self._slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        self._slots.pop(asyncio.get_running_loop(), None)

    # ----------------------------------------------------------------------- transport
    async def _run(self, steps: _Steps):
        reply = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, _Wait):
                await asyncio.sleep(step.seconds)
                reply = None
            else:
                reply = await self._exchange(step)

    async def _exchange(self, req: _Request) -> _Reply:
        loop = asyncio.get_running_loop()
        slots = self._slots.setdefault(loop, asyncio.Semaphore(self.max_in_flight))
        async with slots:
            try:
                return await asyncio.wait_for(self._http(req), self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                raise _gone(self.url, exc) from None

    async def _http(self, req: _Request) -> _Reply:
        """One HTTP/1.1 exchange on its own connection (``Connection: close``)."""
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._tls or None)
        try:
            body = req.data or b""
            head = [f"{req.method} {self._prefix}{req.path} HTTP/1.1", f"Host: {self._host}:{self._port}",
                    f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in req.headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise ValueError(f"not an HTTP answer: {status_line[:40]!r}")
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            if "content-length" in headers:
                raw = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                raw = b""
                while (size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16)):
                    raw += await reader.readexactly(size)
                    await reader.readline()
            else:
                raw = await reader.read()
            return int(parts[1]), headers, raw
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    # ----------------------------------------------------------------------- calls
    async def info(self) -> dict:
        """The server's model, device, dtype, limits and batching statistics."""
        return await self._run(self._fetch_info())

    async def score(self, images: Sequence, prompts: PromptInput, dims: Iterable[str] | None = None,
                    condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                    reward: str | None = None, batch_size: int | None = None) -> list[ScoreResult]:
        """Score images (paths, PIL images, encoded bytes or uint8 H x W x 3 arrays) for one prompt or one per
        image; all in one request unless ``batch_size`` says otherwise, in order."""
        return await self._run(self._score(images, prompts, dims, condition, mask_threshold, reward, batch_size))

    async def compare(self, a, b, prompt: str, dims: Iterable[str] | None = None, condition: str | None = None,
                      mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> Comparison:
        """Which of two images people would prefer for ``prompt``, as ``Scorer.compare``."""
        return await self._run(self._compare(a, b, prompt, dims, condition, mask_threshold))


def _result(row: dict, label: str, prompt) -> ScoreResult:
    if "error" in row:
        return ScoreResult(image=label, prompt=prompt, error=row["error"])
    return ScoreResult(image=label, prompt=row.get("prompt", prompt), scores=row["scores"],
                       kept_tokens=row.get("kept_tokens", {}), prompt_truncated=bool(row.get("prompt_truncated")),
                       composite=row.get("composite"), terms=row.get("terms", {}))


def _read(image, label: str) -> _Upload | ImageError:
    """The image as it goes on the wire (paths and bytes as they are, PIL images as PNG, uint8 arrays raw),
    or the error naming why it cannot be sent."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _Upload(bytes(image))
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return _Upload(f.read())
        except OSError as exc:
            return file_error(image, exc)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return _Upload(buf.getvalue())
    shape, dtype = getattr(image, "shape", None), str(getattr(image, "dtype", ""))
    if shape is not None and hasattr(image, "tobytes"):
        if dtype != "uint8" or len(shape) not in (2, 3):
            return ImageError(f"{label}: an array must be uint8, H x W x 3 (got {dtype} {tuple(shape)}); "
                              "from floats in [0, 1]: (x * 255).round().clip(0, 255).astype('uint8')")
        return _Upload(image.tobytes(), tuple(int(n) for n in shape))  # tobytes: C order, whatever the strides
    return ImageError(f"{label}: cannot send a {type(image).__name__}: give a path, bytes, a PIL image or a "
                      "uint8 numpy array")


def _json_image(up: _Upload):
    """An image in a JSON request: base64 of an encoded file, or an array's shape, dtype and base64 bytes."""
    data = base64.b64encode(up.data).decode("ascii")
    return data if up.shape is None else {"shape": list(up.shape), "dtype": "uint8", "data": data}


def _multipart(fields: list[tuple[str, str]], files: list[_Upload]) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and the images (``image`` files, ``array`` parts declaring
    their shape), and its content type."""
    while True:
        boundary = secrets.token_hex(16)
        mark = boundary.encode()
        if not any(mark in f.data for f in files) and not any(boundary in v for _, v in fields):
            break
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
             f"Content-Type: text/plain; charset=utf-8\r\n\r\n".encode() + value.encode() + b"\r\n"
             for name, value in fields]
    for f in files:  # the image bytes are copied once, by the join
        kind, ctype = ("image", "application/octet-stream") if f.shape is None else (
            "array", f'application/octet-stream; dtype=uint8; shape="{",".join(map(str, f.shape))}"')
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{kind}"; filename="{kind}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode(), f.data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Disagreement:
    """A model option asked for here that the server does not serve: the option's field name (of
    :class:`~mps_cli.engine.options.ModelOptions`), what was asked and what the server has."""

    option: str
    asked: str
    served: str


def disagreements(info: dict, options) -> list[Disagreement]:
    """Where the model ``options`` asked for (a :class:`~mps_cli.engine.options.ModelOptions`) differ from
    the model a server's ``/v1/info`` describes; options left at their defaults ask nothing.

    Weights compare by identity: a local file by the SHA-256 of its bytes, a Hub file or known name by
    repository, file and (if pinned) revision; never by how a path is spelled. ``offline`` is about this
    machine's network, which a server run never uses, so it asks nothing of the server.
    """
    from .devices import AUTO_DTYPE, check_compile_spec, check_decode_spec, check_device_spec, parse_precision

    out: list[Disagreement] = []
    served_device = str(info.get("device", ""))
    if options.weights is not None or options.revision:
        out += _weights_disagree(info, options.weights, options.revision)
    if options.config is not None:
        from .weights.config import ModelConfig, config_digest, read_config

        cfg = options.config if isinstance(options.config, ModelConfig) else read_config(options.config)
        if info.get("config") is not None and config_digest(cfg) != info["config"]:
            out.append(Disagreement("config", str(getattr(options.config, "source", options.config)),
                                    f"another architecture ({info.get('weights')}'s)"))
    device = check_device_spec(options.device)
    if device != "auto" and device.partition(":")[0] != served_device.partition(":")[0]:
        # The kind decides kernels and the automatic dtype, hence the numbers; which GPU index does not.
        out.append(Disagreement("device", options.device, served_device))
    image, text = parse_precision(options.dtype)
    if (image, text) != ("auto", "auto"):
        kind = "cpu" if served_device.startswith("cpu") else "accelerator"
        served = str(info.get("dtype", ""))
        served_image, _, served_text = served.partition("/")
        want_image = AUTO_DTYPE[kind] if image == "auto" else image
        want_text = "fp32" if text == "auto" else text
        if (want_image, want_text) != (served_image, served_text or served_image):
            out.append(Disagreement("dtype", options.dtype, served))
    decode = check_decode_spec(options.decode)
    if decode not in ("auto", "fast") and "decode" in info and decode != info["decode"]:
        out.append(Disagreement("decode", options.decode, str(info["decode"])))
    compiled = check_compile_spec(options.compile)
    if compiled != "off" and compiled != info.get("compile", "off"):
        out.append(Disagreement("compile", options.compile, str(info.get("compile", "off"))))
    return out


def _weights_disagree(info: dict, weights, revision: str | None) -> list[Disagreement]:
    from .weights.cachedir import weights_sha256
    from .weights.sources import hub_file_for, weights_spec

    spec = weights_spec(weights)
    served_label, served_id = str(info.get("weights", "")), str(info.get("identity", ""))
    hub = hub_file_for(spec, revision)
    if hub is not None:
        served_hub = hub_file_for(served_label) if served_label.startswith("hf://") else None
        same = (served_hub is not None and (served_hub.repo, served_hub.filename) == (hub.repo, hub.filename)
                and (hub.revision is None or served_hub.revision == hub.revision))
        return [] if same else [Disagreement("revision" if weights is None else "weights", hub.uri, served_label)]
    if os.path.isfile(spec):
        try:
            same = "sha256:" + weights_sha256(spec) == served_id.split(";")[0].split("=")[-1]
        except OSError:
            same = False
    else:  # not a file here: perhaps a path on the server's machine, as the server was told it
        same = os.path.normpath(spec) == os.path.normpath(served_label)
    return [] if same else [Disagreement("weights", spec, f"{served_label} ({served_id[:19]})")]


__all__ = ["AsyncClient", "Client", "Disagreement", "backoff_delay", "disagreements"]
