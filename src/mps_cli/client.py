"""A client of ``mps serve`` with the scorer's interface, on the standard library only.

``Client(url).score(images, prompts, dims=...)`` returns the same :class:`ScoreResult` s as
``Scorer.score``; nothing here imports torch, so a client starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence

from .constants import DEFAULT_MASK_THRESHOLD
from .devices import DEFAULT_BATCH
from .engine.preprocess import file_error
from .engine.scorer import Comparison, PairResult, PromptInput, ScoreResult, _prefetch, batch_of, image_label
from .errors import ImageError, ServerError

#: How long a client keeps retrying a server that answers 503 (busy) before giving up.
BUSY_RETRY_SECONDS = 60.0


class Client:
    """Scores through a running ``mps serve`` at ``url``; ``token`` is its bearer token, if it wants one.

    ``batch_size`` is images per request (default: the server's batch size, so that a lone
    client gets the same model batches, and the same bits, as a local run).
    """

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
        return f"Client(url={self.url!r})"

    # ----------------------------------------------------------------------- transport
    def _call(self, method: str, path: str, body: dict | None = None,
              form: tuple[bytes, str] | None = None) -> tuple[int, dict]:
        """One request, JSON ``body`` or an encoded multipart ``form`` (bytes, content type); retries 503s."""
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
        while True:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, raw = exc.code, exc.read()
                if status == 503 and time.monotonic() < deadline:
                    time.sleep(_retry_after(exc.headers.get("Retry-After")))
                    continue
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ServerError(f"cannot reach the scoring server at {self.url} ({reason}); "
                                  "is `mps serve` running there?") from None
            break
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ServerError(f"{self.url}{path} answered HTTP {status} with something that is not an "
                              "mps server's JSON; check the URL")
        if status == 401:
            raise ServerError(f"the scoring server at {self.url} refused the token: {doc.get('error', '')}")
        if status >= 500:
            raise ServerError(f"the scoring server at {self.url} failed (HTTP {status}): {doc.get('error', '')}")
        return status, doc

    def info(self) -> dict:
        """The server's model, device, dtype, limits and batching statistics."""
        status, doc = self._call("GET", "/v1/info")
        if status != 200:
            raise ServerError(f"{self.url}/v1/info: HTTP {status}: {doc.get('error', '')}")
        self._info = doc
        return doc

    @property
    def batch_size(self) -> int:
        if self._batch_size is None:
            # A server too old to say gets the smallest default, the CPU's.
            self._batch_size = int((self._info or self.info()).get("batch_size") or DEFAULT_BATCH["cpu"])
        return self._batch_size

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
    ) -> Iterator[ScoreResult]:
        """Like ``Scorer.iter_score``: results in input order as each request returns.

        Images are paths, PIL images or encoded bytes; ``batch_size`` images go in one request
        and ``workers`` requests are in flight at once (default 1, which keeps the server's
        batches the ones a local run would make).
        """
        images = list(images)
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompt_list)} prompts")
        dims = [dims] if isinstance(dims, str) else (list(dims) if dims is not None else None)
        size = batch_of(self, batch_size)
        labels = [image_label(img, i) for i, img in enumerate(images)]
        common = {"condition": condition, "mask_threshold": float(mask_threshold)}
        if dims is not None:
            common["dims"] = dims
        chunks = [range(s, min(s + size, len(images))) for s in range(0, len(images), size)]

        def run(chunk: range) -> list[ScoreResult]:
            return self._score_chunk([images[i] for i in chunk], [labels[i] for i in chunk],
                                     [prompt_list[i] for i in chunk], common)

        for results in _prefetch(chunks, run, workers or 1, 2 * (workers or 1)):
            for r in results:
                if progress:
                    progress(1)
                yield r

    def score(self, images: Sequence, prompts: PromptInput, dims: Iterable[str] | None = None,
              condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
              batch_size: int | None = None, progress: Callable[[int], None] | None = None,
              workers: int | None = None) -> list[ScoreResult]:
        """Score images for one prompt or one prompt per image, as ``Scorer.score`` does."""
        return list(self.iter_score(images, prompts, dims, condition, mask_threshold, batch_size, progress, workers))

    def compare(self, a, b, prompt: str, dims: Iterable[str] | None = None, condition: str | None = None,
                mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> Comparison:
        """Which of two images people would prefer for ``prompt``, as ``Scorer.compare``."""
        la, lb = image_label(a, 0), image_label(b, 1)
        payload = []
        for img, label in ((a, la), (b, lb)):
            data = _encode(img)
            if isinstance(data, ImageError):
                raise data
            payload.append({"data": data, "name": label})
        body = {"a": payload[0], "b": payload[1], "prompt": prompt, "condition": condition,
                "mask_threshold": float(mask_threshold)}
        if dims is not None:
            body["dims"] = [dims] if isinstance(dims, str) else list(dims)
        status, doc = self._call("POST", "/v1/compare", body)
        if status != 200:
            raise (ImageError if "results" in doc else ValueError)(doc.get("error", f"HTTP {status}"))
        self._truncated[prompt] = bool(doc.get("prompt_truncated"))
        return Comparison(prompt=doc["prompt"], a=la, b=lb,
                          results={k: PairResult(**v) for k, v in doc["results"].items()})

    def prompt_truncated(self, prompt: str) -> bool:
        """Whether ``prompt`` is longer than the 77 tokens the model reads, as the server said for it.

        Known once a request with this prompt was answered (tokenising here would import the model's code).
        """
        return self._truncated.get(prompt, False)

    def _score_chunk(self, images: list, labels: list[str], prompts: list, common: dict) -> list[ScoreResult]:
        rows: dict[int, ScoreResult] = {}
        encoded: dict[int, bytes] = {}
        for i, (img, label, prompt) in enumerate(zip(images, labels, prompts, strict=True)):
            data = _read(img)
            if isinstance(data, ImageError):
                rows[i] = ScoreResult(image=label, prompt=prompt, error=str(data))
            elif prompt is None:
                rows[i] = ScoreResult(image=label, prompt=None, error=f"{label}: no prompt for this image")
            else:
                encoded[i] = data
        send = list(encoded)
        if send:
            fields = [*(("names", labels[i]) for i in send), *(("prompts", prompts[i]) for i in send),
                      *(("dims", d) for d in common.get("dims") or ()),
                      *((k, str(common[k])) for k in ("condition", "mask_threshold") if common.get(k) is not None)]
            try:
                request = {"form": _multipart(fields, [encoded[i] for i in send])}
            except UnicodeEncodeError:
                # A name or prompt that is not UTF-8 (a file name's undecodable bytes): JSON escapes it.
                request = {"body": {"images": [base64.b64encode(encoded[i]).decode("ascii") for i in send],
                                    "names": [labels[i] for i in send], "prompts": [prompts[i] for i in send],
                                    **common}}
            status, doc = self._call("POST", "/v1/score", **request)
            if status == 413 and len(send) > 1:
                # One image too big for the server's body limit must not sink the others.
                for i in send:
                    rows[i] = self._score_chunk([images[i]], [labels[i]], [prompts[i]], common)[0]
            elif status == 413:
                rows[send[0]] = ScoreResult(image=labels[send[0]], prompt=prompts[send[0]],
                                            error=f"{labels[send[0]]}: too large for the server ({doc.get('error')})")
            elif "results" in doc and status in (200, 422):
                for i, row in zip(send, doc["results"], strict=False):
                    rows[i] = _result(row, labels[i], prompts[i])
            else:
                raise ValueError(f"the scoring server refused the request (HTTP {status}): {doc.get('error', '')}")
        return [rows[i] for i in range(len(images))]


def _result(row: dict, label: str, prompt) -> ScoreResult:
    if "error" in row:
        return ScoreResult(image=label, prompt=prompt, error=row["error"])
    return ScoreResult(image=label, prompt=row.get("prompt", prompt), scores=row["scores"],
                       kept_tokens=row.get("kept_tokens", {}), prompt_truncated=bool(row.get("prompt_truncated")))


def _read(image) -> bytes | ImageError:
    """The image's encoded bytes (PIL images as PNG), or the error naming why it cannot be read."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError as exc:
            return file_error(image, exc)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _encode(image) -> str | ImageError:
    """Base64 of the image's encoded bytes, for JSON requests."""
    data = _read(image)
    return data if isinstance(data, ImageError) else base64.b64encode(data).decode("ascii")


def _multipart(fields: list[tuple[str, str]], files: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and ``image`` files, and its content type."""
    while True:
        boundary = secrets.token_hex(16)
        mark = boundary.encode()
        if not any(mark in f for f in files) and not any(boundary in v for _, v in fields):
            break
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
             f"Content-Type: text/plain; charset=utf-8\r\n\r\n".encode() + value.encode() + b"\r\n"
             for name, value in fields]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
              "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for data in files]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.05), 5.0)
    except (TypeError, ValueError):
        return 1.0


__all__ = ["Client"]
