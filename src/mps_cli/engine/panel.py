"""Several models on one decode: MPS and the CLIP judges scoring the same images, keyed per model.

``load_scorer(model=["mps", "hpsv2.1", "pickscore"])`` returns a :class:`Panel`. Each image is decoded
once and preprocessed once per distinct rule the requested models need (:mod:`mps_cli.engine.pixel_rules`);
each batch then goes through every model, one after the other: the models share nothing but the decoded
batch. Every model's weights are opened and checked when the panel is made; each is loaded into memory the
first time a batch reaches it.

Result keys: ``mps.<dimension>`` (``mps.overall``, ``mps.custom``, ...) for MPS, the judge's name for a judge.
Nothing here imports torch at module level: :func:`parse_models` and :func:`result_keys` serve ``--help``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..constants import JUDGES, MAX_IMAGE_PIXELS, MODEL_NAMES, MPS_MODEL
from ..errors import DimensionError, MPSError
from .options import ModelOptions, model_options
from .preprocess import ImageInput
from .scorer import Scorer
from .scorer import load_scorer as load_mps

KEY_SEPARATOR = "."


@dataclass(frozen=True)
class ModelRequest:
    """One requested model: its name and, optionally, its weights (a local file or ``hf://`` URI)."""

    name: str
    weights: str | None = None


def parse_models(spec: str | Sequence[str]) -> list[ModelRequest]:
    """``"mps,hpsv2.1=path/hps.safetensors"`` (or a list of such) to requests, in order, each name once.

    Raises ValueError naming an unknown model or a model asked for twice with different weights.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, ModelRequest] = {}
    for part in parts:
        for item in (p.strip() for p in str(part).split(",")):
            if not item:
                continue
            name, _, weights = item.partition("=")
            name = name.strip().lower()
            if name not in MODEL_NAMES:
                raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
            request = ModelRequest(name, weights.strip() or None)
            if name in out and out[name] != request:
                raise ValueError(f"model {name!r} is asked for twice with different weights")
            out[name] = request
    if not out:
        raise ValueError(f"no model given: expected one or more of {', '.join(MODEL_NAMES)}")
    return list(out.values())


def mps_key(dim: str) -> str:
    """The result key of an MPS dimension (or ``custom``) when several models score: ``mps.overall``."""
    return f"{MPS_MODEL}{KEY_SEPARATOR}{dim}"


def keyed_conditions(models: str | Sequence[str] | Sequence[ModelRequest] | None, dims: Iterable[str] | None,
                     condition: str | None) -> list[tuple[str, str]]:
    """(result key, the text that keys its cached score) per result, in order.

    Without ``models``: MPS alone, :func:`~mps_cli.engine.scorer.resolve_conditions` exactly. With them: MPS's
    dimensions under ``mps.`` with their condition texts, and each judge under its name with ``judge:NAME``
    (a judge reads no condition). Raises DimensionError (a ValueError) for dimensions or a condition without MPS.
    """
    from .scorer import resolve_conditions

    if not models:
        return resolve_conditions(dims, condition)
    requests = list(models) if all(isinstance(m, ModelRequest) for m in models) else parse_models(models)
    names = [m.name for m in requests]
    if MPS_MODEL not in names and (dims or condition is not None):
        raise DimensionError("dimensions and conditions are MPS's: add mps to the models, or drop them",
                             hint="panel-dims")
    out: list[tuple[str, str]] = []
    for name in names:
        if name == MPS_MODEL:
            out.extend((mps_key(k), text) for k, text in resolve_conditions(dims, condition))
        else:
            out.append((name, f"judge:{name}"))
    return out


def result_keys(models: Sequence[ModelRequest], dims: Iterable[str] | None, condition: str | None) -> tuple[str, ...]:
    """The keys a panel of ``models`` gives each result, in order (MPS's dimensions where MPS is asked for).

    Raises DimensionError (a ValueError) when dimensions or a condition are asked of a panel without MPS (judges
    have one score).
    """
    return tuple(k for k, _ in keyed_conditions(list(models), dims, condition))


def mps_dims(keys: Iterable[str]) -> tuple[list[str] | None, bool]:
    """(the MPS dimensions among result ``keys``, or None; whether MPS's custom condition is among them)."""
    from ..constants import CUSTOM_KEY

    found = [d for _, d in map(split_key, keys) if d is not None]
    return [d for d in found if d != CUSTOM_KEY] or None, CUSTOM_KEY in found


def split_key(key: str) -> tuple[str, str | None]:
    """(model, dimension or None) of a result key: ``mps.detail`` is (mps, detail), ``pickscore`` (pickscore, None)."""
    if key in JUDGES:
        return key, None
    model, sep, dim = key.partition(KEY_SEPARATOR)
    if sep and model == MPS_MODEL:
        return MPS_MODEL, dim
    return MPS_MODEL, key


def load_scorer(weights=None, *, batch_size: int | None = None, **options):
    """Load MPS (a :class:`~mps_cli.engine.scorer.Scorer`) or, with ``model``, a :class:`Panel` of several models.

    ``weights`` and the keyword ``options`` are the fields of :class:`~mps_cli.engine.options.ModelOptions`
    (or ``weights`` is one ModelOptions). ``model``: names from ``mps``, ``hpsv2.1``, ``pickscore``,
    ``clipscore`` (a list or comma-separated, each optionally ``NAME=WEIGHTS``); the panel's results are
    keyed ``mps.overall``, ``hpsv2.1``, ... Without ``model`` this is
    :func:`mps_cli.engine.scorer.load_scorer` exactly, results keyed by dimension. ``decode`` and
    ``compile`` are MPS's alone: a panel decodes the exact way (each model its reference's rule) and
    runs eagerly, and refuses anything else.
    """
    opts = model_options(weights, **options)
    if opts.model is None:
        return load_mps(opts, batch_size=batch_size)
    from ..devices import check_compile_spec, check_decode_spec
    from ..errors import InputError

    if check_decode_spec(opts.decode) not in ("auto", "exact") or check_compile_spec(opts.compile) != "off":
        raise InputError("decode paths and compiling are MPS's alone: a panel of models decodes the exact way "
                         "and runs eagerly", hint="panel-decode")
    return load_panel(opts, batch_size=batch_size)


def load_panel(options: ModelOptions, *, batch_size: int | None = None):
    """Open (fetching if needed) and check every model's weights of ``options.model``; see :class:`Panel`.

    ``options.weights``, ``config`` and ``revision`` are MPS's (``NAME=WEIGHTS`` in ``model`` overrides MPS's
    weights too); a judge's default weights come from :data:`~mps_cli.constants.JUDGES`, its
    architecture from the config.json beside its weights, else the built-in ViT-H-14.
    """
    from ..devices import resolve_device, resolve_precision
    from .judges import Judge
    from .scorer import dtypes_in_use

    requests = parse_models(options.model)
    dev = resolve_device(options.device)
    precision = resolve_precision(options.dtype, dev)
    support = dtypes_in_use(dev, precision)
    members: list = []
    for req in requests:
        opened = _open_member(req, options)
        if req.name == MPS_MODEL:
            members.append(_LazyMPS(opened, dev, precision, batch_size, support))
        else:
            members.append(Judge(req.name, opened, dev, precision))
    return Panel(members, dev, precision, batch_size=batch_size, dtype_support=support)


def _open_member(req: ModelRequest, options: ModelOptions):
    """One model's weights opened (fetched if needed): MPS's from ``options``, a judge's from its table row."""
    from ..weights.sources import open_weights

    if req.name == MPS_MODEL:
        return open_weights(req.weights or options.weights, revision=options.revision, offline=options.offline,
                            config=options.config)
    spec = JUDGES[req.name]
    source = req.weights or f"hf://{spec.repo}/{spec.filename}"
    pinned = spec.revision if req.weights is None else None
    try:
        return open_weights(source, revision=pinned, offline=options.offline)
    except MPSError as exc:
        exc.model = req.name  # a remedy of other weights is this judge's, not MPS's
        raise


@dataclass(frozen=True)
class PanelPlan:
    """What a panel is without building it: for workers elsewhere that load it (Ray actors) and the output
    folder that must match it. ``identity`` is :attr:`Panel.identity`; ``rules`` :attr:`Panel.rules`."""

    identity: str
    image_size: int
    rules: tuple[str, ...]
    demo: str | None = None  # as Panel.demo


def plan_panel(options: ModelOptions) -> PanelPlan:
    """Open every model's weights of ``options.model`` (fetching them if needed) and say what the panel
    they make would be; builds no model and resolves no device."""
    opened = [(req.name, _open_member(req, options)) for req in parse_models(options.model)]
    rules = tuple(dict.fromkeys(_LazyMPS.rule if name == MPS_MODEL else JUDGES[name].preprocess
                                for name, _ in opened))
    return PanelPlan(identity=";".join(f"{name}={o.identity}" for name, o in opened),
                     image_size=opened[0][1].config.vision.image_size, rules=rules,
                     demo=next((o.demo for _, o in opened if o.demo), None))


class _LazyMPS:
    """MPS in a panel: its weights opened and checked now, its :class:`Scorer` built at the first batch."""

    name = MPS_MODEL
    rule = "clip"

    def __init__(self, opened, device, precision, batch_size, support):
        from ..weights.checkpoint import check_weights
        from .model import MPSModel

        check_weights(lambda cross: MPSModel(opened.config, cross), opened.source, opened.config)
        self.opened, self.config = opened, opened.config
        self.weights, self.identity = opened.label, opened.identity
        self._args = (device, precision, batch_size, support)
        self._scorer = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._scorer is not None

    @property
    def scorer(self):
        if self._scorer is None:
            with self._lock:
                if self._scorer is None:
                    from .scorer import build_scorer

                    self._scorer = build_scorer(self.opened, *self._args)
        return self._scorer


class Panel(Scorer):
    """Several models scoring each batch of one decode; the :class:`~mps_cli.engine.scorer.Scorer` interface.

    ``iter_score``, ``score``, ``compare`` and ``score_pixels`` behave as the scorer's, with results keyed
    ``mps.<dimension>`` and by judge name. Dimensions and conditions apply to MPS only.
    """

    def __init__(self, members: list, device, precision, batch_size: int | None = None, dtype_support=None):
        from ..devices import default_batch_size
        from .preprocess import Tokenizer

        self.members = members
        self.models = tuple(m.name for m in members)
        self.device = device
        self.precision = precision
        self.dtype = precision.image_dtype
        self.text_dtype = precision.text_dtype
        self.dtype_support = dtype_support or {}
        self.batch_size = batch_size or default_batch_size(device)
        self.config = members[0].config
        self.rules = tuple(dict.fromkeys(m.rule for m in members))
        self.weights = "; ".join(f"{m.name}={m.weights}" for m in members)
        self.identity = ";".join(f"{m.name}={m.identity}" for m in members)
        #: As :attr:`Scorer.demo`: set when any member's weights are demo weights.
        self.demo = next((m.opened.demo for m in members if m.opened.demo), None)
        self.tokenizer = Tokenizer(self.config.text.context_length)
        self.stats = {"images_decoded": 0, "image_batches": 0}
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"Panel({', '.join(self.models)}, device={self.device}, dtype={self.precision.label})"

    @property
    def mps(self):
        """MPS's :class:`Scorer` (loaded on first use), or None when MPS is not in the panel."""
        lazy = next((m for m in self.members if m.name == MPS_MODEL), None)
        return lazy.scorer if lazy is not None else None

    @property
    def judges(self) -> list:
        return [m for m in self.members if m.name != MPS_MODEL]

    @property
    def loaded(self) -> dict[str, bool]:
        """Per model, whether its weights are in memory yet."""
        return {m.name: m.loaded for m in self.members}

    def keys(self, dims: Iterable[str] | None = None, condition: str | None = None) -> tuple[str, ...]:
        """The result keys of a call with these dimensions and condition."""
        return result_keys([ModelRequest(n) for n in self.models], dims, condition)

    #: Images for :meth:`preprocess` keep their own mode (open_clip converts to RGB after resizing).
    keeps_mode = True

    def load_pixels(self, source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
        """Decode one image once and preprocess it by every rule the panel's models need: ``{rule: tensor}``."""
        from .preprocess import open_image

        return self.preprocess(open_image(source, max_pixels, keep_mode=True))

    def preprocess(self, img) -> dict:
        """:meth:`load_pixels` for an image already decoded with ``keep_mode=True``."""
        from .pixel_rules import pixels_by_rule

        out = pixels_by_rule(img, self.config.vision.image_size, self.rules)
        with self._count:
            self.stats["images_decoded"] += 1
        return out

    def iter_score(self, images: Sequence[ImageInput], prompts, dims: Iterable[str] | None = None,
                   condition: str | None = None, *args, **kwargs) -> Iterator:
        """As :meth:`Scorer.iter_score`; dimensions and a condition need MPS in the panel."""
        self.keys(dims, condition)
        return super().iter_score(images, prompts, dims, condition, *args, **kwargs)

    def score_pixels(self, pixels: Sequence, prompts: Sequence[str], labels: Sequence[str],
                     dims: Iterable[str] | None = None, condition: str | None = None, *args, **kwargs) -> list:
        """As :meth:`Scorer.score_pixels`, for what :meth:`load_pixels` returns."""
        self.keys(dims, condition)
        return super().score_pixels(pixels, prompts, labels, dims, condition, *args, **kwargs)

    #: Each model stacks its own rule's tensors: no batch is made ahead on a feeder thread.
    _feeds_ahead = False

    def _model_input(self, items: list):
        """The batch as it is: each model takes its rule's tensors from it (:meth:`_score_batch`)."""
        return list(items), list(range(len(items))), {}

    def _score_batch(self, pixels: list, prompts: list[str], conditions, threshold: float):
        scores: dict[str, list[float]] = {}
        kept: dict[str, list[int]] = {}
        truncated = [self.tokenizer(p).truncated for p in prompts]
        for member in self.members:
            batch = [px[member.rule] for px in pixels]
            if member.name == MPS_MODEL:
                s, k, truncated = member.scorer._score_batch(batch, prompts, conditions, threshold)
                scores.update((mps_key(key), v) for key, v in s.items())
                kept.update((mps_key(key), v) for key, v in k.items())
            else:
                scores[member.name] = member.score(batch, prompts)
        self.stats["image_batches"] += 1
        return scores, kept, truncated


__all__ = ["ModelRequest", "Panel", "PanelPlan", "keyed_conditions", "load_panel", "load_scorer", "mps_dims", "mps_key",
           "parse_models", "plan_panel", "result_keys", "split_key"]
