"""The scoring API: ``load_scorer`` and :class:`Scorer`, returning plain dataclasses."""

from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Union

from .config import ModelConfig, builtin_config, read_config
from .constants import CONDITIONS, CUSTOM_KEY, DEFAULT_MASK_THRESHOLD, DIMENSIONS
from .errors import DeviceError, ImageError, InputError, MPSError, PromptError
from .preprocess import ImageInput, Tokenizer, load_pixels

PromptInput = Union[str, Sequence[Union[str, None]]]

_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
PROMPT_CACHE_SIZE = 256


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one image for its prompt, keyed by dimension (or ``custom``).

    A failed input has ``error`` set (one line naming the culprit) and no scores.
    ``kept_tokens`` says, per dimension, how many of the prompt's 77 positions the condition
    mask kept.
    """

    image: str
    prompt: str | None
    scores: dict[str, float] = field(default_factory=dict)
    kept_tokens: dict[str, int] = field(default_factory=dict)
    prompt_truncated: bool = False
    error: str | None = None

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
            raise ValueError(f"unknown dimension {dim!r}: expected one of {', '.join(DIMENSIONS)} or all")
    if condition is not None:
        if not condition.strip():
            raise ValueError("the custom condition text is empty")
        out.append((CUSTOM_KEY, condition))
    seen: dict[str, str] = {}
    for key, text in out:
        seen.setdefault(key, text)
    if not seen:
        raise ValueError("no dimension to score")
    return list(seen.items())


def resolve_device(spec: str = "auto"):
    """``auto`` (CUDA, then Apple mps, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {spec!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {spec!r}: Apple MPS is not available here; use --device cpu")
        return device
    raise DeviceError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(spec: str, device):
    """fp32 on CPU and fp16 on accelerators by default (as the original ran); bf16 on request."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if spec not in _DTYPE_NAMES:
        raise DeviceError(f"unknown dtype {spec!r}: use auto, fp32, fp16 or bf16")
    return getattr(torch, _DTYPE_NAMES[spec])


def dtype_name(dtype) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).replace("torch.", "")]


def image_label(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return getattr(image, "filename", "") or f"<image {index}>"


@dataclass
class _PromptFeatures:
    tokens: object  # 77 x D features, model dtype
    embedding: object  # D, the row at the first EOT
    truncated: bool


class Scorer:
    """A loaded MPS model. Build it with :func:`load_scorer`."""

    def __init__(self, model, config: ModelConfig, device, dtype, weights: str, identity: str,
                 batch_size: int | None = None):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self.identity = identity
        self.batch_size = batch_size or (4 if device.type == "cpu" else 32)
        self.tokenizer = Tokenizer(config.text.context_length)
        self._prompts: OrderedDict[str, _PromptFeatures] = OrderedDict()
        self._conditions: dict[str, object] = {}
        self.stats = {"prompt_encodes": 0, "condition_encodes": 0, "image_batches": 0}

    def __repr__(self) -> str:
        return f"Scorer(weights={self.weights!r}, device={self.device}, dtype={dtype_name(self.dtype)})"

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
            for i, (p, tok) in enumerate(zip(missing, toks)):
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

    def _score_batch(self, pixels: list, prompts: list[str], conditions, threshold: float):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            px = torch.stack(pixels).to(self.device, self.dtype)
            image_tokens = self.model.encode_image(px)
            feats = self._prompt_features(prompts)
            text = torch.stack([f.tokens for f in feats])
            emb = F.normalize(torch.stack([f.embedding for f in feats]).float(), dim=-1)
            scale = self.model.logit_scale.float().exp()
            text32 = text.float()
            masks, kept = [], {}
            for key, cond_text in conditions:
                cond = self._condition_features(cond_text).float()
                sim = (text32 @ cond.T).amax(dim=-1)  # B x 77: best match in the condition
                keep = (sim / sim.amax(dim=-1, keepdim=True)) > threshold
                mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device)
                mask.masked_fill_(~keep, float("-inf"))
                masks.append(mask)
                kept[key] = keep.sum(dim=-1).tolist()
            scores: dict[str, list[float]] = {}
            for (key, _), cls in zip(conditions, self.model.cross(image_tokens, text, masks)):
                scores[key] = (scale * (F.normalize(cls.float(), dim=-1) * emb).sum(dim=-1)).tolist()
            self.stats["image_batches"] += 1
        return scores, kept, [f.truncated for f in feats]

    def iter_score(
        self,
        images: Sequence[ImageInput],
        prompts: PromptInput,
        dims: Iterable[str] | None = None,
        condition: str | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        workers: int | None = None,
    ) -> Iterator[ScoreResult]:
        """Like :meth:`score`, yielding each result in input order as soon as it is ready."""
        images = list(images)
        if isinstance(prompts, str):
            prompt_list: list[str | None] = [prompts] * len(images)
        else:
            prompt_list = list(prompts)
            if len(prompt_list) != len(images):
                raise ValueError(f"{len(images)} images but {len(prompt_list)} prompts")
        conditions = resolve_conditions(dims, condition)
        if not 0.0 <= float(mask_threshold) < 1.0:
            raise ValueError(f"mask threshold must be in [0, 1), got {mask_threshold}")
        batch_size = int(batch_size or self.batch_size)
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        size = self.config.vision.image_size
        labels = [image_label(img, i) for i, img in enumerate(images)]

        def prepare(i: int):
            if prompt_list[i] is None:
                return None, f"{labels[i]}: no prompt for this image"
            try:
                return load_pixels(images[i], size), None
            except ImageError as exc:
                return None, str(exc)
            except Exception as exc:  # whatever else one file does to a decoder, it fails alone
                return None, f"{labels[i]}: cannot read image ({type(exc).__name__}: {' '.join(str(exc).split())})"

        ready: dict[int, ScoreResult] = {}
        next_out = 0
        batch: list[tuple[int, object]] = []

        def flush():
            idx = [i for i, _ in batch]
            scores, kept, truncated = self._score_batch(
                [px for _, px in batch], [prompt_list[i] for i in idx], conditions, float(mask_threshold)
            )
            for j, i in enumerate(idx):
                ready[i] = ScoreResult(
                    image=labels[i], prompt=prompt_list[i],
                    scores={k: v[j] for k, v in scores.items()},
                    kept_tokens={k: v[j] for k, v in kept.items()},
                    prompt_truncated=truncated[j],
                )
            batch.clear()

        def drain() -> Iterator[ScoreResult]:
            nonlocal next_out
            while next_out in ready:
                if progress:
                    progress(1)
                yield ready.pop(next_out)
                next_out += 1

        for i, (pixels, error) in enumerate(_prefetch(range(len(images)), prepare, workers, 2 * batch_size)):
            if error is not None:
                ready[i] = ScoreResult(image=labels[i], prompt=prompt_list[i], error=error)
            else:
                batch.append((i, pixels))
                if len(batch) >= batch_size:
                    flush()
            yield from drain()
        if batch:
            flush()
        yield from drain()

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


def load_scorer(weights: str | os.PathLike | None = None, config: str | os.PathLike | ModelConfig | None = None,
                device: str = "auto", dtype: str = "auto", *, revision: str | None = None,
                offline: bool | None = None, batch_size: int | None = None) -> Scorer:
    """Load an MPS checkpoint and return a :class:`Scorer`.

    ``weights``: a local ``.safetensors`` (or original ``.pth``) file, ``hf://OWNER/REPO/PATH[@REV]``,
    a known short name, or ``None`` for ``$MPS_WEIGHTS`` or the published default.
    ``config``: a ``config.json`` path; by default the one beside the weights, else ViT-H-14.
    """
    from .checkpoint import load_weights
    from .model import MPSModel
    from .weights import open_weights

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolved = open_weights(weights, revision=revision, offline=offline)
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is not None:
        cfg = read_config(config)
    elif resolved.config_path is not None:
        cfg = read_config(resolved.config_path)
    else:
        cfg = builtin_config()
    model = load_weights(lambda cross: MPSModel(cfg, cross), resolved.source, cfg, dev, dt)
    return Scorer(model, cfg, dev, dt, weights=resolved.label, identity=resolved.identity, batch_size=batch_size)


__all__ = [
    "Comparison", "PairResult", "ScoreResult", "Scorer", "compare_scores", "load_scorer",
    "preference_probability", "resolve_conditions", "resolve_device", "resolve_dtype",
    "InputError", "PromptError", "MPSError",
]
