"""The options several commands share, each declared once, and how a command takes them (``@takes``).

Typer has no dependency injection: an :class:`OptionGroup` names its options (an annotated type
carrying the ``typer.Option``, and a default) and the function that builds one value of them; a
command decorated with ``@takes(MODEL, RUN)`` shows the options as its own and receives
``model: ModelOptions`` and ``run: RunOptions``. A new model option is one field of
:class:`~mps_cli.engine.options.ModelOptions` and one entry in :data:`MODEL`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..constants import (
    DIMENSIONS,
    KNOWN_SOURCES,
    MASK_THRESHOLD_RANGE,
    MODEL_NAMES,
    SERVE_TOKEN_ENV,
    SERVER_ENV,
    WEIGHTS_ENV,
)
from ..devices import (
    BATCH_DEFAULT_TEXT,
    COMPILE_CHOICES,
    DECODE_CHOICES,
    DEVICE_CHOICES,
    DTYPE_SYNTAX,
    check_compile_spec,
    check_decode_spec,
    check_device_spec,
    parse_precision,
)
from ..engine.options import ModelOptions
from ..errors import DeviceError, MPSError
from .app import DIMENSION_NOTE, Exit, describe, fail, handle_errors, load_model, note_demo
from .values import BadValue

# --------------------------------------------------------------------------- shared options


def _check_dims(values: list[str] | None) -> list[str] | None:
    if not values:
        return values
    out = []
    for value in values:
        for v in (p.strip() for p in value.split(",")):
            if not v:
                continue
            if v != "all" and v not in DIMENSIONS:
                raise BadValue(f"one of {', '.join(DIMENSIONS)}, all", v)
            out.append(v)
    return out or None


def _mask_threshold(value) -> float:
    # A parser, not a callback: text that is no number breaks the same rule as 2 does. The range is checked
    # where the library checks it; MASK_THRESHOLD_RANGE is how both say it.
    from ..engine.scorer import check_mask_threshold

    try:
        return check_mask_threshold(float(value) if isinstance(value, str) else value)
    except ValueError:
        raise BadValue(f"a number in {MASK_THRESHOLD_RANGE}", value) from None


def _checked(check: Callable[[str], object], rule: str) -> Callable[[str], str]:
    """A callback: the value as ``check`` spells it (a dtype, which it parses into two names, lower-cased),
    or ``BadValue(rule)`` when ``check`` refuses it."""

    def callback(value: str) -> str:
        try:
            checked = check(value)
        except DeviceError:
            raise BadValue(rule, value) from None
        return checked if isinstance(checked, str) else value.strip().lower()

    return callback


_KNOWN = ", ".join(KNOWN_SOURCES)

# "\\[" is a literal bracket in Rich's help markup, which would read "[@REV]" as a style tag and drop it.
Weights = Annotated[str | None, typer.Option(
    "--weights", "-w", envvar=WEIGHTS_ENV, show_envvar=True, metavar="WEIGHTS", rich_help_panel="Model",
    help=f"Weights: a local .safetensors (or original .pth) file, hf://OWNER/REPO/PATH\\[@REV], "
    f"or a known name ({_KNOWN}). Default: the published MPS overall checkpoint.")]
Config = Annotated[Path | None, typer.Option(
    "--config", metavar="FILE", rich_help_panel="Model",
    help="Architecture config.json (transformers CLIPConfig). Default: the one beside the weights, "
    "else the built-in ViT-H-14.")]
Revision = Annotated[str | None, typer.Option(
    "--revision", metavar="REV", rich_help_panel="Model",
    help="Hub revision (commit, branch or tag) to pin; the same as an @REV in the source.")]
Offline = Annotated[bool, typer.Option(
    "--offline", rich_help_panel="Model",
    help="Never touch the network; use cached weights only (also HF_HUB_OFFLINE=1).")]
Device = Annotated[str, typer.Option(
    "--device", callback=_checked(check_device_spec, f"one of {DEVICE_CHOICES}"), metavar="DEVICE",
    rich_help_panel="Model",
    help=f"{DEVICE_CHOICES}; auto: CUDA, then Apple mps, then CPU.")]
Dtype = Annotated[str, typer.Option(
    "--dtype", callback=_checked(parse_precision, DTYPE_SYNTAX), metavar="DTYPE", rich_help_panel="Model",
    help="IMAGE or IMAGE/TEXT: auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16 for the vision tower and cross "
    "model; the text side (prompt, condition, mask) stays fp32 unless TEXT names another (bf16/bf16: all bf16). "
    "A dtype this CPU does not run natively is slow: mps info says which.")]
Decode = Annotated[str, typer.Option(
    "--decode", callback=_checked(check_decode_spec, f"one of {DECODE_CHOICES}"), metavar="MODE",
    rich_help_panel="Model",
    help=f"{DECODE_CHOICES}: how images become model input. exact: PIL, as the original; fast: JPEGs decoded on "
    "the GPU (tensor, needs the gpu extra) or, elsewhere, at a reduced JPEG scale (draft). auto: fast on CUDA, "
    "exact on CPU. Scores move by at most a few hundredths (docs/precision.md).")]
Compile = Annotated[str, typer.Option(
    "--compile", callback=_checked(check_compile_spec, f"one of {COMPILE_CHOICES}"), metavar="MODE",
    rich_help_panel="Model",
    help=f"{COMPILE_CHOICES}: torch.compile the vision tower and cross model at load (slow to start; "
    "graphs adds CUDA graphs, CUDA only).")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", "-b", min=1, rich_help_panel="Run",
    help=f"Images per forward pass (default: {BATCH_DEFAULT_TEXT}).")]
Dims = Annotated[list[str] | None, typer.Option(
    "--dim", "-d", callback=_check_dims, metavar="DIM", rich_help_panel="Scoring",
    help="Dimension to score, repeatable or comma-separated: overall (default), aesthetics, detail, "
    "alignment, or all. " + DIMENSION_NOTE)]
Condition = Annotated[str | None, typer.Option(
    "--condition", rich_help_panel="Scoring",
    help="A custom condition text (comma-separated attribute words); its score is keyed 'custom'.")]
MaskThreshold = Annotated[float, typer.Option(
    "--mask-threshold", parser=_mask_threshold, metavar="X", rich_help_panel="Scoring",
    help=f"Keep prompt tokens whose condition similarity ratio exceeds this: a number in \\{MASK_THRESHOLD_RANGE}.")]


def _check_reward(value: str | None) -> str | None:
    if value is None:
        return None
    from ..composite import parse_composite
    from ..errors import CompositeError

    try:
        parse_composite(value)
    except CompositeError as exc:  # said as the reward's later errors are (unknown names), not as Typer's
        raise fail(describe(exc), Exit.USAGE) from None
    return value


Reward = Annotated[str | None, typer.Option(
    "--reward", callback=_check_reward, metavar="EXPR", rich_help_panel="Scoring",
    help="A composite reward: a weighted sum of scores, e.g. 'overall+0.5*alignment' or "
    "'0.7*mps.overall+0.3*hpsv2.1' (+ - * / by numbers, parentheses). The dimensions and judges it names are "
    "scored too; each result carries 'composite' and its 'terms' (docs/reward.md).")]


def _check_models(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    from ..engine.panel import parse_models

    try:
        requests = parse_models(values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return [r.name if r.weights is None else f"{r.name}={r.weights}" for r in requests]


Models = Annotated[list[str] | None, typer.Option(
    "--model", "-m", callback=_check_models, metavar="MODEL", rich_help_panel="Model",
    help=f"Models to score with, repeatable or comma-separated: {', '.join(MODEL_NAMES)}; each image is decoded "
    "once for all of them. NAME=WEIGHTS gives a model a local file or hf:// URI. With --model every score is keyed "
    "by model: mps.overall (mps.DIM for each --dim), hpsv2.1, pickscore, clipscore. Default: MPS alone, keyed by "
    "dimension (docs/judges.md).")]

AsJson = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="One JSON document.")]
AsJsonl = Annotated[bool, typer.Option("--jsonl", rich_help_panel="Output",
                                       help="One JSON object per line, streamed.")]
AsCsv = Annotated[bool, typer.Option("--csv", rich_help_panel="Output", help="CSV with a header row.")]


# --------------------------------------------------------------------------- option groups


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands share, declared once (Typer has no dependency injection of its own).

    ``options`` maps each parameter name to its annotated type (carrying the ``typer.Option``) and
    default; a command decorated with :func:`takes` shows them as its own options and receives, in
    its parameter ``param``, the one value ``build(**parsed values)`` makes of them.
    """

    param: str
    options: dict[str, tuple[object, object]]
    build: Callable[..., object]


def takes(*groups: OptionGroup) -> Callable:
    """Give a command the shared options of ``groups``: each group's ``param`` parameter is replaced,
    for Typer, by the group's options, and filled with the value built from them."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        replaced = {g.param for g in groups}
        missing = replaced - set(signature.parameters)
        if missing:
            raise TypeError(f"{command.__name__} has no parameter {', '.join(sorted(missing))}")
        kept = [p for name, p in signature.parameters.items() if name not in replaced]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for g in groups for name, (annotation, default) in g.options.items()]

        @functools.wraps(command)
        def with_groups(**values):
            for g in groups:
                values[g.param] = g.build(**{name: values.pop(name) for name in g.options})
            return command(**values)

        with_groups.__signature__ = signature.replace(parameters=[*kept, *added])
        with_groups.__annotations__ = {p.name: p.annotation for p in with_groups.__signature__.parameters.values()}
        return with_groups

    return decorate


# --------------------------------------------------------------------------- the model


def check_revision(source: str | None, revision: str | None) -> None:
    """``--revision`` and an ``@REV`` in the source must not disagree (one would be silently ignored)."""
    if not source or not revision or not source.startswith("hf://"):
        return
    from ..weights.sources import parse_hf_uri

    try:
        pinned = parse_hf_uri(source).revision
    except MPSError:
        return  # the loader reports a malformed source
    if pinned and pinned != revision:
        raise fail(f"{source} pins revision {pinned!r} but --revision says {revision!r}: give one", Exit.USAGE)


def _model_options(offline: bool, **values) -> ModelOptions:
    check_revision(values["weights"], values["revision"])
    # Without --offline, HF_HUB_OFFLINE decides (the library's None).
    return ModelOptions(offline=offline or None, **values)


#: The model options of every command that loads a model, one entry per field of
#: :class:`~mps_cli.engine.options.ModelOptions` (a test holds the two to the same names).
MODEL = OptionGroup("model", {
    "weights": (Weights, None), "config": (Config, None), "revision": (Revision, None),
    "offline": (Offline, False), "device": (Device, "auto"), "dtype": (Dtype, "auto"), "model": (Models, None),
    "decode": (Decode, "auto"), "compile": (Compile, "off"),
}, _model_options)


@dataclass(frozen=True)
class RunOptions:
    """How a command runs, beside which model: images per forward pass (per request with ``--server``)."""

    batch_size: int | None = None

    def batch_for(self, scorer) -> int | None:
        """The run's batch size, resolved once: the one asked for, else the scorer's (None without a scorer)."""
        if self.batch_size is not None or scorer is None:
            return self.batch_size
        return scorer.batch_size


RUN = OptionGroup("run", {"batch_size": (BatchSize, None)}, RunOptions)


@dataclass(frozen=True)
class CacheChoice:
    """Where ``mps eval`` and ``mps versus`` keep scores: ``--cache FILE`` (default: the cache folder's), or
    memory only (``--no-cache``)."""

    path: Path | None = None
    memory_only: bool = False

    def open(self):
        """The score cache; one that cannot be opened is a usage error (exit 2), with its remedy."""
        from ..scorecache import CacheError, ScoreCache, default_cache_path

        try:
            return ScoreCache(None if self.memory_only else (self.path or default_cache_path()))
        except CacheError as exc:
            raise fail(describe(exc), Exit.USAGE) from None


def _cache_choice(cache: Path | None, no_cache: bool) -> CacheChoice:
    if cache is not None and no_cache:
        raise fail("--cache and --no-cache contradict each other; pass one", Exit.USAGE)
    return CacheChoice(cache, no_cache)


SCORE_CACHE = OptionGroup("scores", {
    "cache": (Annotated[Path | None, typer.Option(
        "--cache", metavar="FILE", help="Score cache (SQLite), shared by mps eval and mps versus. Default: "
        "scores.sqlite in $MPS_CACHE_DIR, else in $XDG_CACHE_HOME/mps-cli (~/.cache when unset).")], None),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", help="Keep scores in memory only.")], False),
}, _cache_choice)


# --server: the same commands, with the work sent to a running `mps serve` instead of a local model.
ServerUrl = Annotated[str | None, typer.Option(
    "--server", envvar=SERVER_ENV, show_envvar=True, metavar="URL", rich_help_panel="Server",
    help="Send the work to a running `mps serve` at this URL instead of loading the model here "
    "(the model options are then the server's; --batch-size is images per request).")]
ServerToken = Annotated[str | None, typer.Option(
    "--token", envvar=SERVE_TOKEN_ENV, show_envvar=True, metavar="TOKEN", rich_help_panel="Server",
    help="Bearer token for --server.")]


@dataclass(frozen=True)
class Remote:
    """Where the scoring happens when not here: a running ``mps serve`` (``--server``) and its token."""

    server: str | None = None
    token: str | None = None


REMOTE = OptionGroup("remote", {"server": (ServerUrl, None), "token": (ServerToken, None)}, Remote)


def open_scorer(model: ModelOptions, remote: Remote, run: RunOptions):
    """What the scoring commands score with: a client of ``remote.server`` if one is given, else the local model.

    Both offer ``iter_score``, ``score``, ``compare`` and ``batch_size``.
    """
    if remote.server:
        from ..client import Client

        if model.model:
            raise fail("--model scores here; the server scores with its own models (mps serve --model): "
                       "drop --model or --server", Exit.USAGE)
        client = Client(remote.server, token=remote.token, batch_size=run.batch_size)
        check_served_model(client, model)
        with handle_errors("asking the server for its model"):
            note_demo(client)  # without --batch-size, the server's batch size is asked in the same round trip
        return client
    return load_model(model)


def check_served_model(client, model: ModelOptions) -> None:
    """Refuse model options the server does not serve (its scores would be another model's, unsaid);
    those that agree with its ``/v1/info`` go through silently."""
    import os

    from ..client import disagreements

    if all(getattr(model, f) == d for f, (_, d) in MODEL.options.items() if f != "offline"):
        return  # nothing asked: no round trip before the first batch
    with handle_errors("asking the server for its model"):
        found = disagreements(client.info(), model)
    if found:
        d = found[0]
        flag = f"--{d.option}"
        if d.option == "weights" and os.environ.get(WEIGHTS_ENV) and model.weights == os.environ[WEIGHTS_ENV]:
            flag = f"--weights (from ${WEIGHTS_ENV})"
        raise fail(f"{flag} {d.asked} is not what the server at {client.url} serves ({d.option} {d.served}): "
                   f"drop {flag.split()[0]}, or drop --server to score with it here", Exit.USAGE)
