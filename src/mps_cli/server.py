"""``mps serve``: one loaded :class:`~mps_cli.engine.scorer.Scorer` behind HTTP.

Images from concurrent requests are merged into model batches by :class:`MicroBatcher`,
which runs the model in one worker thread; the event loop only parses and waits, and the
request's thread pool decodes each image all the way to the model's input tensor, so the
worker's time goes to the model alone. Needs the ``serve`` extra (Starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from . import __version__
from .composite import Composite, apply_composite, parse_composite
from .constants import (
    BATCH_SCHEMA,
    CUSTOM_KEY,
    DEFAULT_MASK_THRESHOLD,
    SERVE_MAX_BATCH,
    SERVE_MAX_BODY_BYTES,
    SERVE_MAX_IMAGE_PIXELS,
    SERVE_MAX_QUEUE,
    SERVE_MAX_WAIT_MS,
    SERVE_READ_TIMEOUT_S,
)
from .engine.panel import keyed_conditions, mps_dims, split_key
from .engine.preprocess import EncodedImage, image_from_array
from .engine.scorer import ScoreResult, check_mask_threshold, compare_scores
from .errors import CompositeError, ImageError, PromptCountError
from .serve_http import JSONResponse, _BodyTooLarge, _bounded_protocol, _error, _Guard, _short_text, _SlowBody

log = logging.getLogger("mps_cli.server")

#: Images of one request decoded at once (in the request's thread pool), one per CPU.
DECODE_THREADS = max(2, os.cpu_count() or 1)

Conditions = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ServeOptions:
    """What the server accepts and how it batches."""

    max_batch: int = SERVE_MAX_BATCH
    max_wait_ms: float = SERVE_MAX_WAIT_MS
    max_queue: int = SERVE_MAX_QUEUE
    max_body_bytes: int = SERVE_MAX_BODY_BYTES
    max_image_pixels: int = SERVE_MAX_IMAGE_PIXELS
    token: str | None = None
    allow_dir: Path | None = None
    read_timeout: float = SERVE_READ_TIMEOUT_S


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class QueueFull(Exception):
    """The batcher holds as many images as it may; the caller should retry later."""


@dataclass
class _Job:
    pixels: Any  # the model's input: a normalised 3 x S x S float tensor
    label: str
    prompt: str
    conditions: Conditions
    threshold: float
    future: Future

    @property
    def key(self) -> tuple[Conditions, float]:
        return self.conditions, self.threshold


class MicroBatcher:
    """Runs the scorer in one worker thread; images from concurrent callers share its batches.

    A batch holds images with the same conditions and mask threshold, at most ``max_batch``
    of them; the worker waits at most ``max_wait_ms`` after the oldest queued image for a
    batch to fill, and only while more images are on their way (:meth:`expect`): a lone
    client's request is scored as soon as it is queued. Prompt and condition features are
    cached by the scorer across batches.
    Queued images are the model's input tensors (600 KB each at 224 px), so a full queue of
    ``max_queue`` images holds ``max_queue`` of them.
    """

    def __init__(self, scorer, max_batch: int = SERVE_MAX_BATCH, max_wait_ms: float = SERVE_MAX_WAIT_MS,
                 max_queue: int = SERVE_MAX_QUEUE):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_ms not negative")
        self.scorer = scorer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._pending: deque[tuple[float, _Job]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._incoming = 0  # requests decoding images they will submit
        self._thread: threading.Thread | None = None
        self._stats = {"requests": 0, "images": 0, "batches": 0, "batched_images": 0, "largest_batch": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mps-model", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Score what is queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def expect(self) -> None:
        """A request is decoding images it will submit (or call :meth:`unexpect`): worth waiting for."""
        with self._cond:
            self._incoming += 1

    def unexpect(self) -> None:
        """An expected request will submit nothing after all."""
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    def submit(self, pixels: list, labels: list[str], prompts: list[str], conditions: Conditions,
               threshold: float, expected: bool = False, new_request: bool = True) -> list[Future]:
        """Queue preprocessed images (:func:`~mps_cli.engine.preprocess.pixels_from_image`) with their names and
        prompts; one future of a ScoreResult per image. ``expected``: this request called :meth:`expect`,
        and no longer counts as on its way once this returns. ``new_request``: False for a request's later
        parts (a large request is queued in parts as its images are decoded)."""
        jobs = [_Job(px, label, p, conditions, threshold, Future())
                for px, label, p in zip(pixels, labels, prompts, strict=True)]
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} images are waiting for the model (limit {self.max_queue})")
            now = time.monotonic()
            if expected:
                self._incoming -= 1
            self._pending.extend((now, j) for j in jobs)
            self._stats["requests"] += new_request
            self._stats["images"] += len(jobs)
            self._cond.notify_all()
        return [j.future for j in jobs]

    def stats(self) -> dict:
        with self._cond:
            s = dict(self._stats)
            queued = len(self._pending)
        return {
            "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000.0, "max_queue": self.max_queue,
            "requests": s["requests"], "images": s["images"], "batches": s["batches"],
            "mean_batch_size": s["batched_images"] / s["batches"] if s["batches"] else 0.0,
            "largest_batch": s["largest_batch"], "queue_length": queued,
        }

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job's kind, once full or once the oldest has waited max_wait."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                first_t, first = self._pending[0]
                key = first.key
                ready = sum(1 for _, j in self._pending if j.key == key)
                remaining = first_t + self.max_wait - time.monotonic()
                if ready >= self.max_batch or remaining <= 0 or self._closing or self._incoming <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Job] = []
            rest: deque[tuple[float, _Job]] = deque()
            for item in self._pending:
                if len(batch) < self.max_batch and item[1].key == key:
                    batch.append(item[1])
                else:
                    rest.append(item)
            self._pending = rest
        # A caller that went away has cancelled its futures; its images are not scored.
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            conditions, threshold = batch[0].key
            dims, has_custom = mps_dims(k for k, _ in conditions)
            custom = next((text for k, text in conditions if split_key(k)[1] == CUSTOM_KEY), None) \
                if has_custom else None
            try:
                results = self.scorer.score_pixels([j.pixels for j in batch], [j.prompt for j in batch],
                                                   [j.label for j in batch], dims=dims, condition=custom,
                                                   mask_threshold=threshold, batch_size=len(batch))
            except BaseException as exc:  # noqa: B036 (the worker must outlive any one batch)
                for j in batch:
                    j.future.set_exception(exc)
                continue
            with self._cond:
                self._stats["batches"] += 1
                self._stats["batched_images"] += len(batch)
                self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
            for j, r in zip(batch, results, strict=True):
                j.future.set_result(r)


class RequestError(Exception):
    """A request the server will not serve: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str, extra: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.extra, self.headers = status, message, extra or {}, headers


@dataclass
class _Source:
    """One image of a request before decoding: encoded bytes, base64 text, or a checked server path; with
    ``shape``, the bytes are a raw uint8 array of that shape rather than an encoded file."""

    name: str
    data: bytes | None = None
    text: str | None = None
    path: Path | None = None
    shape: Any = None


@dataclass
class _Work:
    sources: list[_Source]
    prompts: list[str | None]
    conditions: Conditions
    threshold: float
    composite: Composite | None = None


def _decode(src: _Source, max_pixels: int, scorer):
    """The model's input for one image on the scorer's decode path (:meth:`Scorer.load_pixels`: decoded, resized,
    cropped, normalised; for a panel, once per rule; on the tensor path, a JPEG checked for the batched decode on
    the device), or raises ImageError naming it. Runs in the request's thread, so the model's worker never
    waits for the host's part."""
    return scorer.load_pixels(_open(src, max_pixels), max_pixels)


def _open(src: _Source, max_pixels: int):
    """The image of a request as a path or encoded bytes (base64 decoded here, the image itself not yet), or
    a raw array's pixels as an image (its shape checked against its bytes and ``max_pixels`` first)."""
    if src.path is not None:
        return src.path
    data = src.data
    if data is None:
        text = src.text or ""
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or not head.endswith(";base64"):
                raise ImageError(f"{src.name}: a data URL must be base64 (data:image/...;base64,...)")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"{src.name}: invalid base64 ({exc})") from None
    if src.shape is not None:
        return image_from_array(data, src.shape, src.name, max_pixels)
    return EncodedImage(data, src.name)


class ScoringService:
    """Turns parsed requests into batcher work and answers; shared by the endpoints."""

    def __init__(self, scorer, options: ServeOptions):
        self.scorer = scorer
        self.options = options
        self.allow_dir = Path(options.allow_dir).resolve(strict=True) if options.allow_dir else None
        self.batcher = MicroBatcher(scorer, options.max_batch, options.max_wait_ms, options.max_queue)

    # ----------------------------------------------------------------------- parsing
    def _source(self, entry: Any, name: str) -> _Source:
        if isinstance(entry, _Source):
            entry.name = name
            return entry
        if isinstance(entry, str):
            return _Source(name=name, text=entry)
        keys = set(entry) if isinstance(entry, dict) else set()
        if "shape" in keys:
            return self._array(entry, name)
        if keys and keys <= {"data", "path", "name"} and len(keys & {"data", "path"}) == 1:
            name = entry.get("name") if isinstance(entry.get("name"), str) else name
            if "data" in entry:
                if not isinstance(entry["data"], str):
                    raise RequestError(422, f"{name}: 'data' must be a base64 string")
                return _Source(name=name, text=entry["data"])
            return _Source(name=name, path=self._checked_path(entry["path"]))
        raise RequestError(422, f"{name}: an image is a base64 string, a data URL, {{\"data\": ...}}, "
                                "{\"path\": ...} or {\"shape\": [H, W, 3], \"dtype\": \"uint8\", \"data\": ...}")

    @staticmethod
    def _array(entry: dict, name: str) -> _Source:
        """A raw uint8 array: ``{"shape": [H, W, C], "dtype": "uint8", "data": BASE64}``; the shape is checked
        against the bytes when the image is decoded, with the other images' errors."""
        name = entry.get("name") if isinstance(entry.get("name"), str) else name
        extra = sorted(set(entry) - {"shape", "dtype", "data", "name"})
        if extra or "data" not in entry or "dtype" not in entry:
            raise RequestError(422, f"{name}: an array is {{\"shape\": [H, W, 3], \"dtype\": \"uint8\", "
                                    "\"data\": BASE64}" + (f" (unknown: {', '.join(extra)})" if extra else ""))
        if entry["dtype"] != "uint8":
            raise RequestError(422, f"{name}: arrays must be uint8, got dtype {entry['dtype']!r}")
        if not isinstance(entry["data"], str):
            raise RequestError(422, f"{name}: 'data' must be a base64 string")
        return _Source(name=name, text=entry["data"], shape=entry["shape"])

    def _checked_path(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw:
            raise RequestError(422, "'path' must be a non-empty string")
        if "\0" in raw:
            raise RequestError(422, f"{raw!r}: a path cannot hold a NUL byte")
        if self.allow_dir is None:
            raise RequestError(403, f"{raw}: this server does not read server-side files (it was started "
                                    "without an allowed folder); send the image's bytes instead")
        try:
            resolved = (self.allow_dir / raw).resolve()  # follows symlinks and `..`
            inside = resolved.is_relative_to(self.allow_dir)
            exists, regular = (resolved.exists(), resolved.is_file()) if inside else (False, False)
        except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
            why = getattr(exc, "strerror", None) or exc
            raise RequestError(422, f"{_short_text(raw)}: not a usable path ({why})") from None
        if not inside:
            raise RequestError(403, f"{_short_text(raw)}: outside the folder this server may read")
        if not exists:
            raise RequestError(422, f"{_short_text(raw)}: no such file in the folder this server may read")
        if not regular:  # a FIFO or a device would block a decoding thread for ever
            raise RequestError(422, f"{_short_text(raw)}: not a regular file (a folder, FIFO or device)")
        return resolved

    def parse(self, body: dict, single: bool = False, batch: bool = False) -> _Work:
        """Validate a score (with ``batch``, a /v1/batch; with ``single``, a compare) request into work;
        raises RequestError."""
        _check_fields(body, single, batch)
        images, names = _images_and_names(body) if not single else _compared(body)
        if len(images) > self.options.max_queue:
            raise RequestError(413, f"{len(images)} images in one request; this server takes at most "
                                    f"{self.options.max_queue}")
        prompts = self._prompts(body, len(images), single)
        sources = [self._source(e, n) for e, n in zip(images, names, strict=True)]
        dims, condition = _dims_and_condition(body)
        composite, dims = self._composite(body.get("reward"), dims, condition)
        try:
            conditions = tuple(keyed_conditions(getattr(self.scorer, "models", None), dims, condition))
        except ValueError as exc:
            raise RequestError(422, str(exc)) from None
        if composite is not None:
            composite = composite.bind([k for k, _ in conditions])
        return _Work(sources, prompts, conditions, _threshold(body), composite)

    def _composite(self, reward: Any, dims, condition: str | None) -> tuple[Composite | None, Any]:
        """The request's ``reward`` expression, and the dimensions to score with the ones it names added."""
        if reward is None:
            return None, dims
        if not isinstance(reward, str):
            raise RequestError(422, "'reward' must be an expression such as \"overall+0.5*alignment\"")
        models = getattr(self.scorer, "models", None)
        try:
            composite = parse_composite(reward)
            wanted, dims = composite.request(list(models) if models else None, dims, condition)
        except CompositeError as exc:
            raise RequestError(422, str(exc)) from None
        if wanted and not models:
            raise RequestError(422, f"reward {reward!r} names a model this server does not load (it scores with "
                                    "MPS alone: mps serve --model adds judges)")
        return composite, dims

    @staticmethod
    def _prompts(body: dict, n: int, single: bool) -> list[str | None]:
        if "prompt" in body and "prompts" in body:
            raise RequestError(422, "give 'prompt' or 'prompts', not both")
        value = body.get("prompts", body.get("prompt"))
        if value is None:
            raise RequestError(422, "no prompt: give 'prompt' (one for every image)"
                               + ("" if single else " or 'prompts' (one per image)"))
        if isinstance(value, str):
            if not value.strip():
                raise RequestError(422, "the prompt is empty")
            return [value] * n
        if single or not isinstance(value, list) or not all(p is None or isinstance(p, str) for p in value):
            raise RequestError(422, "'prompt' must be a string" + ("" if single else "; 'prompts' a list of strings"))
        if len(value) != n:
            raise RequestError(422, str(PromptCountError(n, len(value))))
        return value

    # ----------------------------------------------------------------------- scoring
    async def run(self, work: _Work) -> list[ScoreResult]:
        """Decode (thread pool, the request's images in parallel, about in order), score (batcher), and return
        results in request order. A request larger than a model batch is queued a batch at a time as its images
        are decoded, so the model scores its first images while the host decodes the rest."""
        max_px = self.options.max_image_pixels
        decoding = asyncio.Semaphore(DECODE_THREADS)

        def decode(src: _Source, prompt: str | None):
            if prompt is None:
                return f"{src.name}: no prompt for this image"
            try:
                return _decode(src, max_px, self.scorer)
            except ImageError as exc:
                return str(exc)
            except Exception as exc:  # whatever else one image does to a decoder, it fails alone
                return f"{src.name}: cannot read image ({type(exc).__name__}: {' '.join(str(exc).split())})"

        async def bounded(src: _Source, prompt: str | None):
            async with decoding:  # first come, first decoded: a request's early images are ready first
                return await run_in_threadpool(decode, src, prompt)

        n, step = len(work.sources), self.batcher.max_batch
        tasks = [asyncio.ensure_future(bounded(src, p)) for src, p in zip(work.sources, work.prompts, strict=True)]
        decoded: list = [None] * n
        futures: dict[int, Future] = {}
        self.batcher.expect()
        submitted = False
        try:
            for start in range(0, n, step):
                part = range(start, min(start + step, n))
                for i in part:
                    decoded[i] = await tasks[i]
                good = [i for i in part if not isinstance(decoded[i], str)]
                got = self.batcher.submit([decoded[i] for i in good], [work.sources[i].name for i in good],
                                          [work.prompts[i] for i in good], work.conditions, work.threshold,
                                          expected=part.stop == n, new_request=start == 0)
                futures.update(zip(good, got, strict=True))
            submitted = True
        except QueueFull as exc:
            for f in futures.values():  # the parts already queued are not scored for nobody
                f.cancel()
            raise RequestError(503, f"busy: {exc}; retry shortly", headers={"Retry-After": "1"}) from None
        finally:
            if not submitted:
                self.batcher.unexpect()
                for t in tasks:
                    t.cancel()
        scored = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()))
        by_index = dict(zip(futures, scored, strict=True))
        return [by_index[i] if i in by_index else ScoreResult(image=src.name, prompt=prompt, error=decoded[i])
                for i, (src, prompt) in enumerate(zip(work.sources, work.prompts, strict=True))]

    def info(self) -> dict:
        from .weights.config import config_digest

        s = self.scorer
        return {
            "version": __version__, "weights": s.weights, "identity": s.identity, "device": str(s.device),
            "dtype": s.precision.label, "batch_size": s.batch_size, "config": config_digest(s.config),
            "decode": getattr(s, "decode", "exact"), "compile": getattr(s, "compiled", "off"),
            **({"models": list(s.models)} if getattr(s, "models", None) else {}),
            **({"demo": s.demo} if getattr(s, "demo", None) else {}),
            "limits": {"max_body_bytes": self.options.max_body_bytes,
                       "max_image_pixels": self.options.max_image_pixels,
                       "server_paths": self.allow_dir is not None},
            "batching": self.batcher.stats(), "schemas": [BATCH_SCHEMA],
        }


def _check_fields(body: Any, single: bool, batch: bool) -> None:
    """A JSON object with only the fields this route knows (and, for a batch, the schema it speaks)."""
    if not isinstance(body, dict):
        raise RequestError(422, "the request body must be a JSON object")
    known = {"images", "prompts", "prompt", "dims", "dim", "condition", "mask_threshold", "names", "reward"}
    if single:
        known = (known - {"images", "names", "prompts", "reward"}) | {"a", "b"}
    if batch:
        known.add("schema")
        if body.get("schema", BATCH_SCHEMA) != BATCH_SCHEMA:
            raise RequestError(422, f"unsupported schema {body['schema']!r}: this server speaks {BATCH_SCHEMA}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(422, f"unknown field(s): {', '.join(unknown)}; expected {', '.join(sorted(known))}")


def _compared(body: dict) -> tuple[list, list[str]]:
    """A compare request's two images and their names."""
    for side in ("a", "b"):
        if side not in body:
            raise RequestError(422, f"no image '{side}': compare takes images 'a' and 'b'")
    return [body["a"], body["b"]], [body[side].name if isinstance(body[side], _Source) else side
                                    for side in ("a", "b")]


def _images_and_names(body: dict) -> tuple[list, list[str]]:
    """A score or batch request's images and their names (given, or ``image N``)."""
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise RequestError(422, "no images: 'images' must be a non-empty list")
    names = body.get("names")
    if names is None:
        return images, [f"image {i}" for i in range(len(images))]
    if not isinstance(names, list) or len(names) != len(images) or not all(isinstance(n, str) for n in names):
        raise RequestError(422, "'names' must be a list of strings, one per image")
    return images, names


def _dims_and_condition(body: dict) -> tuple[Any, str | None]:
    """The request's dimensions (``dims`` or ``dim``) and custom condition, their types checked."""
    dims = body.get("dims", body.get("dim"))
    if dims is not None and not (isinstance(dims, str) or (isinstance(dims, list)
                                                           and all(isinstance(d, str) for d in dims))):
        raise RequestError(422, "'dims' must be a dimension name or a list of them")
    condition = body.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise RequestError(422, "'condition' must be a string")
    return dims, condition


def _threshold(body: dict) -> float:
    """The request's mask threshold; a form field arrives as text, so a number in text is taken too."""
    threshold = body.get("mask_threshold", DEFAULT_MASK_THRESHOLD)
    if isinstance(threshold, str):
        try:
            threshold = float(threshold)
        except ValueError:
            pass
    try:
        return check_mask_threshold(threshold)
    except ValueError:
        raise RequestError(422, f"'mask_threshold' must be a number in [0, 1), got {threshold!r}") from None


def result_row(r: ScoreResult) -> dict:
    """The JSON of one result, as the CLI writes it plus kept tokens and truncation (and a composite reward's
    value and terms, where one was asked for)."""
    if r.error is not None:
        return {"image": r.image, "prompt": r.prompt, "error": r.error}
    row = {"image": r.image, "prompt": r.prompt, "scores": dict(r.scores), "kept_tokens": dict(r.kept_tokens),
           "prompt_truncated": r.prompt_truncated}
    if r.composite is not None:
        row.update(composite=r.composite, terms=dict(r.terms))
    return row


def batch_reward(r: ScoreResult, work: _Work) -> float | None:
    """A /v1/batch row's reward: the composite where one was asked for, else the first key's score."""
    if r.error is not None:
        return None
    return r.composite if work.composite is not None else r.scores[work.conditions[0][0]]



async def _read_body(request: Request, max_part: int) -> dict:
    """The request as a dict: JSON, or a multipart form whose files become image sources."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_form(request, max_part)
    raw = await request.body()
    if not raw:
        raise RequestError(400, "empty body: send a JSON object (Content-Type: application/json) or a multipart form")
    try:
        return await run_in_threadpool(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "invalid JSON: nested too deeply") from None


async def _read_form(request: Request, max_part: int) -> dict:
    """A multipart form as a request dict: ``image`` files (or ``a`` and ``b``), and text fields, repeated
    ones (``prompts``, ``names``, ``dims``) in order. Image names are the ``names`` fields, else the files' names.

    The form a :class:`~mps_cli.client.Client` sends: raw bytes cost the client and the server less
    than base64 inside JSON (0.5 ms less server CPU per image on the fixture, 2-vCPU AMD EPYC)."""
    # python-multipart takes a body that stops inside a part as a shorter form, so an upload cut off
    # would be scored without its last images: the closing delimiter is looked for here.
    found = re.search(r'boundary="?([^";]*)', request.headers.get("content-type", ""), re.IGNORECASE)
    closing = b"--" + (found.group(1).encode("latin-1") if found else b"") + b"--"
    seen = {"closed": False, "tail": b""}

    async def watched_receive():
        message = await request.receive()
        if message["type"] == "http.request" and not seen["closed"]:
            data = seen["tail"] + message.get("body", b"")
            seen["closed"], seen["tail"] = closing in data, data[-(len(closing) - 1):]
        return message

    # A prompt field may be as long as the body allows, as in JSON (the tokenizer reads what it needs).
    try:
        form = await Request(request.scope, watched_receive).form(
            max_files=SERVE_MAX_QUEUE, max_fields=3 * SERVE_MAX_QUEUE + 16, max_part_size=max_part)
    except (_BodyTooLarge, _SlowBody):
        raise
    except Exception as exc:  # the multipart parser's own errors
        raise RequestError(400, f"invalid multipart form: {' '.join(str(exc).split())}") from None
    if not seen["closed"]:
        await form.close()
        raise RequestError(400, "invalid multipart form: it ends before its closing boundary (was the upload cut off?)")
    try:
        out: dict = {}
        images: list[_Source] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                src = _Source(name=value.filename or f"image {len(images)}", data=data)
                if key in ("a", "b"):
                    out[key] = src
                elif key in ("image", "images"):
                    images.append(src)
                elif key == "array":
                    src.shape = _declared_shape(value.content_type, src.name)
                    images.append(src)
                else:
                    raise RequestError(422, f"unexpected file field {key!r}: upload images as 'image' (encoded) or "
                                            "'array' (raw uint8), or 'a' and 'b'")
            elif key in ("prompts", "names", "dims", "dim"):
                out.setdefault("dims" if key == "dim" else key, []).append(value)
            else:
                out[key] = value  # single fields; parse() reports unknown ones
        if images:
            out["images"] = images
            out.setdefault("names", [s.name for s in images])
        return out
    finally:
        await form.close()


def _declared_shape(content_type: str | None, name: str) -> list[int]:
    """The shape an ``array`` part declares in its type: ``application/octet-stream; dtype=uint8; shape="H,W,C"``."""
    params = {}
    for item in (content_type or "").split(";")[1:]:
        key, _, value = item.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    if params.get("dtype", "uint8") != "uint8":
        raise RequestError(422, f"{name}: arrays must be uint8, got dtype {params['dtype']!r}")
    try:
        return [int(n) for n in params["shape"].replace("x", ",").split(",")]
    except (KeyError, ValueError):
        raise RequestError(422, f"{name}: an 'array' part declares its shape in its type: Content-Type: "
                                'application/octet-stream; dtype=uint8; shape="H,W,3"') from None


class _Endpoints:
    """The routes' handlers over one :class:`ScoringService`."""

    def __init__(self, service: ScoringService):
        self.service = service
        self.options = service.options

    async def _scored(self, request: Request, batch: bool) -> dict:
        body = await _read_body(request, self.options.max_body_bytes)
        work = self.service.parse(body, batch=batch)
        request.state.images = len(work.sources)
        results = apply_composite(work.composite, await self.service.run(work))
        doc = {"results": [result_row(r) for r in results], "failed": sum(r.error is not None for r in results)}
        if batch:
            doc = {"schema": BATCH_SCHEMA, "keys": [k for k, _ in work.conditions],
                   "reward": work.composite.spelling if work.composite else None, **doc,
                   "rewards": [batch_reward(r, work) for r in results]}
        if doc["failed"] == len(results):
            raise RequestError(422, "no image could be scored" + (f": {results[0].error}" if len(results) == 1
                                                                  else ""), doc)
        return doc

    async def score(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._scored(request, batch=False))

    async def batch(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._scored(request, batch=True))

    async def compare(self, request: Request) -> JSONResponse:
        body = await _read_body(request, self.options.max_body_bytes)
        work = self.service.parse(body, single=True)
        request.state.images = 2
        ra, rb = await self.service.run(work)
        bad = [r for r in (ra, rb) if r.error is not None]
        if bad:
            raise RequestError(422, "; ".join(r.error for r in bad), {"results": [result_row(ra), result_row(rb)]})
        results = {k: compare_scores(ra.scores[k], rb.scores[k]) for k in ra.scores}
        return JSONResponse({"prompt": ra.prompt, "a": ra.image, "b": rb.image,
                             "results": {k: {"a": v.a, "b": v.b, "p_a": v.p_a, "winner": v.winner}
                                         for k, v in results.items()},
                             "prompt_truncated": ra.prompt_truncated})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> JSONResponse:
        return JSONResponse(self.service.info())

    def guarded(self, endpoint):
        """``endpoint`` with the request's own errors answered as JSON with their status."""
        options = self.options

        async def run(request: Request) -> JSONResponse:
            try:
                return await endpoint(request)
            except RequestError as exc:
                return _error(exc.status, exc.message, exc.extra, exc.headers)
            except _BodyTooLarge:
                return _error(413, f"request body over the {options.max_body_bytes} byte limit")
            except _SlowBody:
                return _error(408, f"request body not received within {options.read_timeout:g} s",
                              headers={"Connection": "close"})
        return run


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(scorer, options: ServeOptions | None = None) -> Starlette:
    """The ASGI app serving ``scorer``; the batcher's worker runs for the app's lifespan."""
    from contextlib import asynccontextmanager

    service = ScoringService(scorer, options or ServeOptions())
    options = service.options
    ep = _Endpoints(service)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.batcher.close)

    app = Starlette(
        routes=[
            Route("/v1/score", ep.guarded(ep.score), methods=["POST"]),
            Route("/v1/batch", ep.guarded(ep.batch), methods=["POST"]),
            Route("/v1/compare", ep.guarded(ep.compare), methods=["POST"]),
            Route("/healthz", ep.healthz, methods=["GET"]),
            Route("/v1/info", ep.info, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_Guard, token=options.token, max_body=options.max_body_bytes,
                       read_timeout=options.read_timeout)
    return app


def warm_up(scorer) -> None:
    """Load the tokenizer, encode the dimensions' conditions and run the model once, before the first client."""
    from PIL import Image

    size = scorer.config.vision.image_size
    pixels = scorer.preprocess(Image.new("RGB", (size, size), (128, 128, 128)))
    models = getattr(scorer, "models", None)
    scorer.score_pixels([pixels], ["warm-up"], ["warm-up"], dims=["all"] if not models or "mps" in models else None)


def serve(scorer, host: str, port: int, options: ServeOptions, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    if options.token is None and not is_loopback(host):
        raise ValueError(f"binding {host} exposes the scorer beyond this machine; set a token")
    app = create_app(scorer, options)
    warm_up(scorer)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            server_header=False, lifespan="on", http=_bounded_protocol(options.read_timeout))
    uvicorn.Server(config).run()


__all__ = ["MicroBatcher", "QueueFull", "ServeOptions", "create_app", "is_loopback", "result_row", "serve", "warm_up"]
