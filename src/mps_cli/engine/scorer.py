"""The scoring API: ``load_scorer`` and :class:`Scorer`, returning plain dataclasses."""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..constants import (
    CONDITIONS,
    CUSTOM_KEY,
    DEFAULT_MASK_THRESHOLD,
    DIMENSIONS,
    MASK_THRESHOLD_RANGE,
    MAX_IMAGE_PIXELS,
)
from ..devices import (
    DTYPE_BYTES,
    DtypeSupport,
    Precision,
    check_compile_spec,
    decode_workers,
    default_batch_size,
    dtype_support,
    resolve_decode,
    resolve_device,
    resolve_precision,
)
from ..errors import DeviceError, DimensionError, ImageError, PromptCountError
from ..weights.config import ModelConfig
from .decode import EncodedJpeg, checked_jpeg, decode_jpegs, find_jpeg_decoder
from .options import ModelOptions, model_options
from .preprocess import ImageInput, Tokenizer, load_pixels, pixels_from_image

log = logging.getLogger(__name__)

PromptInput = str | Sequence[str | None]

PROMPT_CACHE_SIZE = 256


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one image for its prompt, keyed by dimension (or ``custom``).

    A failed input has ``error`` set (one line naming the culprit) and no scores.
    ``kept_tokens`` says, per dimension, how many of the prompt's 77 positions the condition
    mask kept. ``composite`` and ``terms``: a composite reward's value and each of its terms' scores,
    where one was asked for (:mod:`mps_cli.composite`).
    """

    image: str
    prompt: str | None
    scores: dict[str, float] = field(default_factory=dict)
    kept_tokens: dict[str, int] = field(default_factory=dict)
    prompt_truncated: bool = False
    error: str | None = None
    composite: float | None = None
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PairResult:
    """One dimension of a comparison: both scores, P(a preferred), and the winner."""

    a: float
    b: float
    p_a: float
    winner: str  # "a", "b", or "tie" when the scores are exactly equal


@dataclass(frozen=True)
class Comparison:
    prompt: str
    a: str
    b: str
    results: dict[str, PairResult]


def preference_probability(score_a: float, score_b: float) -> float:
    """P(a preferred over b) = softmax([score_a, score_b])[0], computed stably."""
    d = score_b - score_a
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def compare_scores(score_a: float, score_b: float) -> PairResult:
    """Pairwise result for two scores under the same prompt and condition."""
    winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
    return PairResult(a=score_a, b=score_b, p_a=preference_probability(score_a, score_b), winner=winner)


def resolve_conditions(dims: Iterable[str] | None, condition: str | None) -> list[tuple[str, str]]:
    """(result key, condition text) pairs; ``dims`` defaults to overall unless a custom condition is given."""
    if dims is None:
        dims = () if condition is not None else ("overall",)
    elif isinstance(dims, str):
        dims = (dims,)
    out: list[tuple[str, str]] = []
    for dim in dims:
        if dim == "all":
            out.extend((d, CONDITIONS[d]) for d in DIMENSIONS)
        elif dim in CONDITIONS:
            out.append((dim, CONDITIONS[dim]))
        else:
            raise DimensionError(f"unknown dimension {dim!r}: expected one of {', '.join(DIMENSIONS)} or all",
                                 hint="dim")
    if condition is not None:
        if not condition.strip():
            raise DimensionError("the custom condition text is empty", hint="condition")
        out.append((CUSTOM_KEY, condition))
    seen: dict[str, str] = {}
    for key, text in out:
        seen.setdefault(key, text)
    if not seen:
        raise DimensionError("no dimension to score", hint="dim")
    return list(seen.items())


def check_mask_threshold(value) -> float:
    """The condition-mask threshold as a float, checked to lie in [0, 1); ValueError otherwise (text and bools too)."""
    try:
        number = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0.0 <= number < 1.0:
        raise ValueError(f"mask threshold must be in {MASK_THRESHOLD_RANGE}, got {value!r}")
    return number


def batch_of(scorer, batch_size: int | None) -> int:
    """A call's batch size: the one given, else the scorer's own (its device's default, or what it was loaded with)."""
    size = int(scorer.batch_size if batch_size is None else batch_size)
    if size < 1:
        raise ValueError("batch size must be at least 1")
    return size


def image_label(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return getattr(image, "filename", "") or f"<image {index}>"


@dataclass
class _PromptFeatures:
    tokens: object  # 77 x D features, the text side's dtype
    embedding: object  # D, the row at the first EOT
    truncated: bool


# The scoring formula, shared by Scorer and the differentiable reward; its parts live in model.py.

def condition_masks(text, conditions: Sequence, threshold: float, dtype):
    """Additive masks (0 kept, -inf dropped) over the prompt positions, one B x 77 per condition.

    ``text`` is B x 77 x D prompt token features, each condition 77 x D. Also returns the
    boolean keep masks, computed from fp32 features whatever the model dtype.
    """
    from .model import additive_mask, condition_keep

    keeps = [condition_keep(text, cond, threshold) for cond in conditions]
    return [additive_mask(keep, dtype) for keep in keeps], keeps


def activation_bytes(config: ModelConfig, precision: Precision, n_dims: int = 4) -> int:
    """A generous bound on what one image holds in memory at the peak of a scoring forward pass.

    The vision tower's widest step (residual stream, normed copy, q/k/v, MLP hidden) plus the
    cross model's per-dimension copies, at the image side's dtype, doubled for the allocator's
    slack and the decoded input; what the free-memory batch rule divides by.
    """
    v, n = config.vision, config.vision.num_tokens
    vision = n * (6 * v.width + 2 * v.mlp_width)
    cross = n * (4 * config.embed_dim + 6 * config.embed_dim * n_dims)
    return 2 * (vision + cross) * DTYPE_BYTES[precision.image]


def score_image_tokens(model, image_tokens, text, embedding, masks: Sequence) -> list:
    """``exp(logit_scale) * cos(e, cross(V, T, m)[:, 0])`` as a B fp32 tensor per mask.

    ``embedding`` is the B x D prompt embeddings (the rows at the first EOT). The cross model
    reads the prompt's features in the image side's dtype (the text side may be fp32). A
    float64 model (the reward's gradient check) stays in float64.
    """
    from .model import preference_logits

    text = text.to(image_tokens.dtype)
    return [preference_logits(cls, embedding, model.logit_scale)
            for cls in model.cross(image_tokens, text, list(masks))]


class Scorer:
    """A loaded MPS model. Build it with :func:`load_scorer`."""

    def __init__(self, model, config: ModelConfig, device, precision: Precision, weights: str, identity: str,
                 batch_size: int | None = None, dtype_support: dict[str, DtypeSupport] | None = None,
                 decode: str = "exact", compiled: str = "off", jpeg_decoder=None, demo: str | None = None):
        self.model = model
        self.config = config
        self.device = device
        self.precision = precision
        #: The image side's torch dtype (vision tower, cross model: where the time goes).
        self.dtype = precision.image_dtype
        #: The text side's torch dtype (prompt and condition features, hence the condition mask).
        self.text_dtype = precision.text_dtype
        #: Per dtype this scorer computes in: whether the device runs it natively (see :mod:`mps_cli.devices`).
        self.dtype_support = dtype_support or {}
        self.weights = weights
        self.identity = identity
        #: ``"random"`` for demo weights (``mps demo``), whose scores mean nothing; None for real ones.
        self.demo = demo
        #: How images become model input: exact, draft or tensor (see :func:`mps_cli.devices.resolve_decode`).
        self.decode = decode
        self._jpeg_decoder = jpeg_decoder or (find_jpeg_decoder(device) if decode == "tensor" else None)
        #: torch.compile on the image side: off, on or graphs.
        self.compiled = compiled
        self.batch_size = batch_size or default_batch_size(device, activation_bytes(config, precision))
        self._side_stream = None
        self.tokenizer = Tokenizer(config.text.context_length)
        self._prompts: OrderedDict[str, _PromptFeatures] = OrderedDict()
        self._conditions: dict[str, object] = {}
        self.stats = {"prompt_encodes": 0, "condition_encodes": 0, "image_batches": 0}

    def __repr__(self) -> str:
        return f"Scorer(weights={self.weights!r}, device={self.device}, dtype={self.precision.label})"

    @property
    def slow_dtypes(self) -> list[DtypeSupport]:
        """The dtypes this scorer computes in that its device does not run natively (slow fallbacks)."""
        return [s for s in self.dtype_support.values() if s.native is False]

    # text side: every distinct prompt once (LRU), every condition once per scorer
    def _encode_texts(self, texts: list[str]):
        import torch

        toks = [self.tokenizer(t) for t in texts]
        ids = torch.tensor([t.ids for t in toks], dtype=torch.long, device=self.device)
        feats = self.model.encode_text(ids)
        return feats, toks

    def _prompt_features(self, prompts: Sequence[str]) -> list[_PromptFeatures]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if missing:
            feats, toks = self._encode_texts(missing)
            self.stats["prompt_encodes"] += len(missing)
            for i, (p, tok) in enumerate(zip(missing, toks, strict=True)):
                self._prompts[p] = _PromptFeatures(feats[i], feats[i, tok.eot_index], tok.truncated)
        out = []
        for p in prompts:
            self._prompts.move_to_end(p)
            out.append(self._prompts[p])
        while len(self._prompts) > max(PROMPT_CACHE_SIZE, len(set(prompts))):
            self._prompts.popitem(last=False)
        return out

    def _condition_features(self, text: str):
        if text not in self._conditions:
            self._conditions[text] = self._encode_texts([text])[0][0]
            self.stats["condition_encodes"] += 1
        return self._conditions[text]

    def prompt_truncated(self, prompt: str) -> bool:
        """Whether ``prompt`` is longer than the 77 tokens the model reads."""
        return self.tokenizer(prompt).truncated

    # image side: host decoding in threads, then one batch on the device
    def load_pixels(self, source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS):
        """One image decoded and preprocessed into what :meth:`score_pixels` takes; raises :class:`ImageError`.

        On this scorer's decode path: the 3 x S x S input tensor (the draft path's JPEGs reduced
        while they decode), or, on the tensor path, the JPEG checked and left encoded for the
        batched decode on the device (anything else is decoded the exact way here). Thread-safe.
        """
        if self.decode == "tensor":
            jpeg = checked_jpeg(source, image_label(source, 0), max_pixels)
            if jpeg is not None:
                return jpeg
        return load_pixels(source, self.config.vision.image_size, draft=self.decode == "draft", max_pixels=max_pixels)

    def _model_input(self, items: list):
        """One batch of :meth:`load_pixels` results as the model's B x 3 x S x S input on the device.

        Returns (input, positions it holds, {position: error message}): JPEGs are decoded on the
        device in one call; host tensors are stacked and, on CUDA, copied from pinned memory.
        """
        import torch

        size = self.config.vision.image_size
        ready: dict[int, object] = {}
        errors: dict[int, str] = {}
        jpegs = [i for i, it in enumerate(items) if isinstance(it, EncodedJpeg)]
        if jpegs:
            decoded = decode_jpegs([items[i] for i in jpegs], size, self.device, self._jpeg_decoder)
            for i, px in zip(jpegs, decoded, strict=True):
                if isinstance(px, ImageError):
                    errors[i] = str(px)
                else:
                    ready[i] = px
        host = [i for i in range(len(items)) if i not in ready and i not in errors]
        if host:
            stacked = torch.stack([items[i] for i in host])
            if self.device.type == "cuda":  # GPU only: an asynchronous copy needs page-locked memory
                stacked = stacked.pin_memory()
            stacked = stacked.to(self.device, non_blocking=True)
            if len(host) == len(items):  # the common case, every image from the host: already one batch
                return stacked.to(self.dtype), host, errors
            ready.update(zip(host, stacked, strict=True))
        order = sorted(ready)
        px = torch.stack([ready[i] for i in order]).to(self.dtype) if order else None
        return px, order, errors

    def _model_input_ahead(self, items: list):
        """:meth:`_model_input` on the feeder thread; on CUDA on a side stream, with the event the model's waits on."""
        import torch

        with torch.inference_mode():
            if self.device.type != "cuda":
                return self._model_input(items), None
            # GPU only: copies and decodes overlap the model's kernels on the default stream.
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            with torch.cuda.device(self.device), torch.cuda.stream(self._side_stream):
                prepared = self._model_input(items)
                done = torch.cuda.Event()
                done.record(self._side_stream)
            return prepared, done

    def _take_ahead(self, future):
        """The feeder's result, made safe to use on the model's stream (GPU: wait for it, tell the allocator)."""
        prepared, done = future.result()
        if done is not None:  # GPU only
            import torch

            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            if prepared[0] is not None:
                prepared[0].record_stream(stream)
        return prepared

    @property
    def _feeds_ahead(self) -> bool:
        """Whether batches are prepared on a feeder thread while the model runs (the GPU, and the tensor path)."""
        return self.device.type == "cuda" or self.decode == "tensor"

    def _score_batch(self, px, prompts: list[str], conditions, threshold: float):
        """Scores, kept tokens and truncation of one batch: ``px`` the model input on the device (or host tensors)."""
        import torch

        if isinstance(px, (list, tuple)):  # a panel hands over its rule's host tensors
            px = torch.stack(px).to(self.device, self.dtype)
        with torch.inference_mode():
            if self.compiled == "graphs":  # GPU only: CUDA graphs replay into the same output buffers
                torch.compiler.cudagraph_mark_step_begin()
            image_tokens = self.model.encode_image(px)
            feats = self._prompt_features(prompts)
            text = torch.stack([f.tokens for f in feats])
            conds = [self._condition_features(cond_text) for _, cond_text in conditions]
            masks, keeps = condition_masks(text, conds, threshold, self.dtype)
            emb = torch.stack([f.embedding for f in feats])
            kept = {key: keep.sum(dim=-1).tolist() for (key, _), keep in zip(conditions, keeps, strict=True)}
            scores = score_image_tokens(self.model, image_tokens, text, emb, masks)
            scores = {key: s.tolist() for (key, _), s in zip(conditions, scores, strict=True)}
            self.stats["image_batches"] += 1
        return scores, kept, [f.truncated for f in feats]

    def _results(self, prepared, prompts: list[str], labels: list[str], conditions,
                 threshold: float) -> list[ScoreResult]:
        """One model batch (a :meth:`_model_input` result) as results, in the batch's order.

        An image its decode refused, or whose score is not finite, is an error result.
        """
        px, order, errors = prepared
        out: list = [None] * len(labels)
        for i, message in errors.items():
            out[i] = ScoreResult(image=labels[i], prompt=prompts[i], error=message)
        if not order:
            return out
        scores, kept, truncated = self._score_batch(px, [prompts[i] for i in order], conditions, threshold)
        for j, i in enumerate(order):
            label, prompt = labels[i], prompts[i]
            if not all(math.isfinite(v[j]) for v in scores.values()):
                # A score is a number or the input is an error: NaN means damaged weights or input.
                out[i] = ScoreResult(image=label, prompt=prompt, error=f"{label}: the model gave a non-finite "
                                     "score: the weights or this input are damaged")
                continue
            out[i] = ScoreResult(image=label, prompt=prompt, scores={k: v[j] for k, v in scores.items()},
                                 kept_tokens={k: v[j] for k, v in kept.items()}, prompt_truncated=truncated[j])
        return out

    #: Images for :meth:`preprocess` come RGB (:func:`~mps_cli.engine.preprocess.open_image`'s default).
    keeps_mode = False

    def preprocess(self, img):
        """:meth:`load_pixels` for an image already decoded (``open_image(..., keep_mode=self.keeps_mode)``)."""
        return pixels_from_image(img, self.config.vision.image_size)

    def score_pixels(self, pixels: Sequence, prompts: Sequence[str], labels: Sequence[str],
                     dims: Iterable[str] | None = None, condition: str | None = None,
                     mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                     batch_size: int | None = None) -> list[ScoreResult]:
        """Score images already prepared by :meth:`load_pixels` (or :func:`~mps_cli.engine.preprocess.load_pixels`).

        For callers that decode on other threads or workers (the server, Ray Data) and hand over
        the ``3 x S x S`` float tensors (or the tensor path's checked JPEGs); ``labels`` name the
        images in the results. Batches of ``batch_size`` (default ``self.batch_size``).
        """
        conditions = resolve_conditions(dims, condition)
        threshold = check_mask_threshold(mask_threshold)
        step = batch_of(self, batch_size)
        out: list[ScoreResult] = []
        for start in range(0, len(pixels), step):
            end = start + step
            with _inference():
                prepared = self._model_input(list(pixels[start:end]))
            out.extend(self._results(prepared, list(prompts[start:end]), list(labels[start:end]),
                                     conditions, threshold))
        return out

    def iter_score(
        self,
        images: Sequence[ImageInput],
        prompts: PromptInput,
        dims: Iterable[str] | None = None,
        condition: str | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[ScoreResult]:
        """Like :meth:`score`, yielding each result in input order as soon as it is ready.

        Images decode on host threads (:meth:`load_pixels`); on a GPU, and on the tensor path,
        each full batch is then made model input on a feeder thread while the model runs the one
        before it.
        """
        images = list(images)
        prompt_list = _prompt_per_image(prompts, len(images))
        batch_size = batch_of(self, batch_size)
        labels = [image_label(img, i) for i, img in enumerate(images)]
        with _feeder(self._feeds_ahead) as feeder:
            run = _InOrder(self, prompt_list, labels, resolve_conditions(dims, condition),
                           check_mask_threshold(mask_threshold), feeder, progress)
            decoded = _prefetch(range(len(images)), lambda i: self._prepare_one(images[i], prompt_list[i], labels[i]),
                                decode_workers(self.device), 2 * batch_size)
            for i, (pixels, error) in enumerate(decoded):
                if error is not None:
                    run.fail(i, error)
                else:
                    run.add(i, pixels, batch_size)
                yield from run.drain()
            yield from run.close()

    def _prepare_one(self, image: ImageInput, prompt: str | None, label: str) -> tuple[object | None, str | None]:
        """One input's pixels, or why it cannot be scored: (pixels, None) or (None, message)."""
        if prompt is None:
            return None, f"{label}: no prompt for this image"
        try:
            return self.load_pixels(image), None
        except ImageError as exc:
            return None, str(exc)
        except Exception as exc:  # whatever else one file does to a decoder, it fails alone
            return None, f"{label}: cannot read image ({type(exc).__name__}: {' '.join(str(exc).split())})"

    def score(self, images: Sequence[ImageInput], prompts: PromptInput, dims: Iterable[str] | None = None,
              condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
              batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> list[ScoreResult]:
        """Score images (paths or PIL images) for one prompt or one prompt per image.

        ``dims`` picks from overall, aesthetics, detail, alignment (or ``all``); ``condition``
        adds a custom condition text keyed ``custom``. A bad image does not stop the others:
        its result carries ``error`` instead of scores.
        """
        return list(self.iter_score(images, prompts, dims, condition, mask_threshold, batch_size, progress))

    def compare(self, a: ImageInput, b: ImageInput, prompt: str, dims: Iterable[str] | None = None,
                condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> Comparison:
        """Score two images for one prompt and say, per dimension, which is preferred and how likely."""
        ra, rb = self.score([a, b], prompt, dims, condition, mask_threshold)
        for r in (ra, rb):
            if not r.ok:
                raise ImageError(r.error)
        return Comparison(prompt=prompt, a=ra.image, b=rb.image,
                          results={k: compare_scores(ra.scores[k], rb.scores[k]) for k in ra.scores})


def _inference():
    import torch

    return torch.inference_mode()


def _prompt_per_image(prompts: PromptInput, n: int) -> list[str | None]:
    """One prompt for every image, or a list that must have one per image."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompt_list = list(prompts)
    if len(prompt_list) != n:
        raise PromptCountError(n, len(prompt_list))
    return prompt_list


class _InOrder:
    """One :meth:`Scorer.iter_score` run: inputs gathered into batches, results filled in as they come
    (a failed input at once, a batch when the model has run it) and released in input order.

    With a feeder, a full batch is made model input on the feeder thread; at most one such batch waits
    ahead, so the model runs one batch while the next is prepared.
    """

    def __init__(self, scorer: Scorer, prompts: list, labels: list[str], conditions, threshold: float,
                 feeder: ThreadPoolExecutor | None, progress: Callable[[int], None] | None):
        self.scorer, self.prompts, self.labels = scorer, prompts, labels
        self.conditions, self.threshold = conditions, threshold
        self.feeder, self.progress = feeder, progress
        self.ready: dict[int, ScoreResult] = {}
        self.next_out = 0
        self.batch: list[tuple[int, object]] = []
        self.ahead: deque = deque()  # (future of a prepared batch, its input positions)

    def fail(self, i: int, error: str) -> None:
        """Input ``i`` could not be scored: its result carries ``error``."""
        self.ready[i] = ScoreResult(image=self.labels[i], prompt=self.prompts[i], error=error)

    def add(self, i: int, pixels, batch_size: int) -> None:
        """Input ``i``'s pixels join the batch, which runs once it is full."""
        self.batch.append((i, pixels))
        if len(self.batch) >= batch_size:
            self._flush()

    def drain(self) -> Iterator[ScoreResult]:
        """The results ready from the next one in input order on."""
        while self.next_out in self.ready:
            if self.progress:
                self.progress(1)
            yield self.ready.pop(self.next_out)
            self.next_out += 1

    def close(self) -> Iterator[ScoreResult]:
        """Run what is left (a partial batch, the one waiting ahead) and release every result."""
        if self.batch:
            self._flush()
        while self.ahead:
            self._finish()
            yield from self.drain()
        yield from self.drain()

    def _store(self, idx: list[int], prepared) -> None:
        results = self.scorer._results(prepared, [self.prompts[i] for i in idx], [self.labels[i] for i in idx],
                                       self.conditions, self.threshold)
        self.ready.update(zip(idx, results, strict=True))

    def _finish(self) -> None:
        future, idx = self.ahead.popleft()
        self._store(idx, self.scorer._take_ahead(future))

    def _flush(self) -> None:
        idx = [i for i, _ in self.batch]
        items = [px for _, px in self.batch]
        self.batch.clear()
        if self.feeder is None:
            with _inference():
                prepared = self.scorer._model_input(items)
            self._store(idx, prepared)
            return
        self.ahead.append((self.feeder.submit(self.scorer._model_input_ahead, items), idx))
        if len(self.ahead) > 1:
            self._finish()


@contextmanager
def _feeder(wanted: bool) -> Iterator[ThreadPoolExecutor | None]:
    """One thread that prepares the next batch's model input, or None where that would not pay."""
    if not wanted:
        yield None
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mps-feed") as pool:
        yield pool


def _prefetch(items: Iterable, fn: Callable, workers: int | None, depth: int) -> Iterator:
    """``map(fn, items)`` in a thread pool, in order, at most ``depth`` items ahead."""
    workers = workers or min(4, os.cpu_count() or 1)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mps-decode") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def load_scorer(weights: str | os.PathLike | ModelOptions | None = None, *, batch_size: int | None = None,
                **options) -> Scorer:
    """Load an MPS checkpoint and return a :class:`Scorer` (``mps_cli.load_scorer`` also loads several models).

    ``weights`` and the keyword ``options`` are the fields of
    :class:`~mps_cli.engine.options.ModelOptions` (``config``, ``revision``, ``offline``, ``device``,
    ``dtype``, ``decode``, ``compile``; see there), or ``weights`` is one ModelOptions. ``batch_size`` is
    the scorer's images per forward pass when a call does not say (default: its device's, see
    :mod:`mps_cli.devices`: 4 on CPU; on CUDA what half the free memory holds, 32 to 256).
    ``Scorer.dtype_support`` says whether the device runs each dtype in use natively.
    The decode path is resolved here (:func:`mps_cli.devices.resolve_decode`): the tensor path without a
    decoder for the device decodes the exact way, with one warning logged. A compile mode other than
    ``off`` compiles at load, on a warm-up batch, so that a failure is a :class:`DeviceError` here.
    """
    from ..weights.sources import open_weights

    opts = model_options(weights, **options)
    if opts.model is not None:
        raise ValueError("this loads MPS alone; mps_cli.load_scorer (mps_cli.engine.panel) loads several models")
    dev = resolve_device(opts.device)
    precision = resolve_precision(opts.dtype, dev)
    path = resolve_decode(opts.decode, dev)
    mode = check_compile_spec(opts.compile)
    if mode == "graphs" and dev.type != "cuda":
        raise DeviceError(f"compile mode 'graphs' (CUDA graphs) needs a CUDA device, not {dev}", hint="compile")
    decoder = find_jpeg_decoder(dev) if path == "tensor" else None
    if path == "tensor" and decoder is None:
        log.warning(f"the fast decode needs torchcodec or torchvision built for {dev.type} (the gpu extra); "
                    "decoding the exact way instead")
        path = "exact"
    support = dtypes_in_use(dev, precision)
    resolved = open_weights(opts.weights, revision=opts.revision, offline=opts.offline, config=opts.config)
    scorer = build_scorer(resolved, dev, precision, batch_size, support, decode=path, compiled=mode,
                          jpeg_decoder=decoder)
    if mode != "off":
        _compile(scorer, mode)
    return scorer


def dtypes_in_use(dev, precision: Precision) -> dict[str, DtypeSupport]:
    """Whether each dtype in use runs natively here (on CPU a sub-second probe, once per process)."""
    in_use = dict.fromkeys((precision.image, precision.text))
    return {dt: dtype_support(dev, dt, probe=dt != "fp32") for dt in in_use}


def build_scorer(resolved, dev, precision: Precision, batch_size: int | None = None,
                 support: dict[str, DtypeSupport] | None = None, decode: str = "exact", compiled: str = "off",
                 jpeg_decoder=None) -> Scorer:
    """The :class:`Scorer` of opened MPS weights (:func:`~mps_cli.weights.sources.open_weights`), loaded now.

    ``decode``, ``compiled`` and ``jpeg_decoder`` as :func:`load_scorer` resolved them (its compiling is its own).
    """
    from ..weights.checkpoint import load_weights
    from .model import MPSModel

    cfg = resolved.config
    model = load_weights(lambda cross: MPSModel(cfg, cross), resolved.source, cfg, dev, precision)
    return Scorer(model, cfg, dev, precision, weights=resolved.label, identity=resolved.identity,
                  batch_size=batch_size, dtype_support=support, decode=decode, compiled=compiled,
                  jpeg_decoder=jpeg_decoder, demo=resolved.demo)


def _compile(scorer: Scorer, mode: str) -> None:
    """torch.compile the image side and run one full batch through it, so that compiling happens (and fails) here."""
    import torch

    scorer.model.compile_image_side(mode)
    size = scorer.config.vision.image_size
    warm = [torch.zeros(3, size, size)] * scorer.batch_size
    try:
        scorer.score_pixels(warm, ["warm-up"] * len(warm), ["warm-up"] * len(warm), dims=["all"])
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise DeviceError(f"torch.compile ({mode}) failed on {scorer.device}: {type(exc).__name__}: {first}",
                          hint="compile") from None


__all__ = [
    "Comparison", "ModelOptions", "PairResult", "ScoreResult", "Scorer", "batch_of", "check_mask_threshold",
    "compare_scores", "load_scorer", "preference_probability", "resolve_conditions",
]
