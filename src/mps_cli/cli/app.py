"""The Typer app, the options commands share, model loading, and the one place errors become
messages, flag hints and exit codes.

Nothing here imports torch: ``mps --help`` must stay instant.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from ..constants import (
    DEFAULT_MASK_THRESHOLD,
    DIMENSIONS,
    KNOWN_SOURCES,
    MODEL_NAMES,
    SERVE_TOKEN_ENV,
    SERVER_ENV,
    WEIGHTS_ENV,
)
from ..devices import BATCH_DEFAULT_TEXT, DEVICE_CHOICES, check_device_spec, parse_precision
from ..errors import CheckpointError, ConfigError, DeviceError, FetchError, InputError, MPSError, ServerError
from ..inputs.items import Problem

DIMENSION_NOTE = (
    "Only a checkpoint trained on overall preference has been published; aesthetics, detail "
    "and alignment are that model read through their condition masks."
)
DEBUG_ENV = "MPS_DEBUG"
#: Tell the user, once, when the library writes a file at least this large (the prepared weights).
NOTICE_MIN_BYTES = 256 * 2**20


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__
        from ..constants import DISTRIBUTION

        print(f"{DISTRIBUTION} {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="mps",
    help="Score text-to-image generations with MPS, the Multi-dimensional Preference Score "
    "(CVPR 2024): how much people would prefer an image for its prompt.\n\n" + DIMENSION_NOTE,
    epilog="Examples:\n\n"
    "mps score gen.png --prompt 'a red fox in the snow'\n\n"
    "mps rank samples/ --prompt-from metadata --top 5\n\n"
    "find runs -name '*.png' -print0 | mps rank - -0 --prompt 'a castle' --jsonl | head -3",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    # Images between PIL's warning and refusal sizes are decoded; the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    _route_library_notices()


_typer_display_type = typer.core.TyperOption.display_type_rich


def _display_type(self, ctx):
    # A flag takes no value; Typer would label it "<bool>" as if it did.
    if self.is_flag and self.metavar is None:
        return None
    return _typer_display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _display_type


class Exit(IntEnum):
    OK = 0
    PARTIAL = 1  # some inputs failed; the rest were scored and printed
    USAGE = 2  # bad flag value, unknown dimension, bad device, no prompt source
    WEIGHTS = 3  # weights or config unreadable or mismatched; out of memory; an unexpected error
    FETCH = 4  # network, Hub or offline-cache problem
    INTERRUPTED = 130


#: The remedy for an input problem, in terms of this command line's flags (the library names none).
INPUT_HINTS: dict[Problem, str] = {
    Problem.EMPTY_FOLDER: "use --recursive to look in sub-folders too",
    Problem.NUL_IN_PATH: "for NUL-separated paths (find -print0, xargs -0), pass -0/--null",
    Problem.NO_PROMPT: "give the prompt another way: --prompt TEXT, --prompts FILE, or --prompt-from sidecar|metadata",
}
#: The remedy for a run-level error, added when the message does not already name a flag.
ERROR_HINTS: list[tuple[type, str]] = [
    (ServerError, "check --server and --token, and that `mps serve` is running there"),
    (FetchError, "pass --weights PATH for a local file, or --offline to use the cache only"),
    (DeviceError, "choose another with --device or --dtype"),
]


def say(message: str) -> None:
    """One line on stderr (never stdout, which carries results only)."""
    from .output import stderr_line

    stderr_line(message)


def fail(message: str, code: Exit) -> typer.Exit:
    say(f"mps: error: {message}")
    return typer.Exit(int(code))


# What a user can change for each kind of library error (``MPSError.hint``), as this CLI spells it.
FLAG_HINTS = {
    "config": ": pass their config.json with --config",
    "weights": ", or pass --weights PATH",
    "download": ": run `mps download {uri}` on a connected machine with the same HF_HOME, or pass --weights PATH",
    "revision": ": check --revision or the @REVISION",
    "offline": ", or use --offline with cached weights",
    "offline-or-weights": ", use --offline with cached weights, or pass --weights PATH",
    "cache": "; delete it or pass another --cache (or --no-cache)",
    "cache-locked": ": try again when it is done, or pass another --cache (or --no-cache)",
}


def describe(exc: BaseException) -> str:
    """The library's message with this command line's remedy for its kind of error.

    A structured hint (``MPSError.hint``, see :data:`FLAG_HINTS`) wins; otherwise the remedy
    for the error's type (:data:`ERROR_HINTS`).
    """
    message = str(exc)
    key = getattr(exc, "hint", None) or ""
    if key in FLAG_HINTS:
        return message + FLAG_HINTS[key].format(uri=getattr(exc, "uri", None) or "")
    for kind, hint in ERROR_HINTS:
        if isinstance(exc, kind):
            return f"{message} ({hint})"
    return message


def unexpected(exc: BaseException, doing: str) -> typer.Exit:
    """The last line of defence: a bug or an unforeseen failure is one line (exit 3), never a traceback."""
    detail = " ".join(str(exc).split())
    say(f"mps: error: unexpected {type(exc).__name__} while {doing}" + (f": {detail}" if detail else ""))
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)
    else:
        say(f"mps: hint: rerun with {DEBUG_ENV}=1 to see the traceback (and please report it)")
    return typer.Exit(int(Exit.WEIGHTS))


@contextmanager
def handle_errors(doing: str = "running") -> Iterator[None]:
    """Map the library's typed errors to one stderr line and an exit code; never a traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort, BrokenPipeError):
        raise
    except DeviceError as exc:
        raise fail(describe(exc), Exit.USAGE) from None
    except (CheckpointError, ConfigError) as exc:
        raise fail(describe(exc), Exit.WEIGHTS) from None
    except FetchError as exc:
        raise fail(describe(exc), Exit.FETCH) from None
    except InputError as exc:
        # Reaching here, it stopped the run: nothing more was scored, so it is not "some inputs failed".
        raise fail(describe(exc), Exit.USAGE) from None
    except MPSError as exc:
        raise fail(describe(exc), Exit.WEIGHTS) from None
    except KeyboardInterrupt:
        say("mps: interrupted")
        raise typer.Exit(int(Exit.INTERRUPTED)) from None
    except MemoryError:
        raise fail(f"out of memory while {doing}: try a smaller --batch-size or --dtype bf16", Exit.WEIGHTS) from None
    except RecursionError as exc:
        raise unexpected(exc, doing) from None
    except Exception as exc:
        raise unexpected(exc, doing) from None


class _NoticeHandler(logging.Handler):
    """Library log records on stderr: warnings always, large-file notices once, nothing else."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and getattr(record, "nbytes", 0) < NOTICE_MIN_BYTES:
            return
        message = record.getMessage()
        if message in self.seen:
            return
        self.seen.add(message)
        say(message if message.startswith("mps: ") else f"mps: note: {message}")


def _route_library_notices() -> None:
    logger = logging.getLogger("mps_cli")
    if not any(isinstance(h, _NoticeHandler) for h in logger.handlers):
        logger.addHandler(_NoticeHandler())
        logger.propagate = False
    logger.setLevel(logging.INFO)


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
                raise typer.BadParameter(f"{v!r} is not one of {', '.join(DIMENSIONS)}, all")
            out.append(v)
    return out or None


def _check_threshold(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value} is not in [0, 1)")
    return value


def _check_batch(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter("must be at least 1")
    return value


def _check_device(value: str) -> str:
    try:
        return check_device_spec(value)
    except DeviceError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_dtype(value: str) -> str:
    try:
        parse_precision(value)
    except DeviceError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value.strip().lower()


_KNOWN = ", ".join(KNOWN_SOURCES)

# "\\[" is a literal bracket in Rich's help markup, which would read "[@REV]" as a style tag and drop it.
Weights = Annotated[str | None, typer.Option(
    "--weights", "-w", envvar=WEIGHTS_ENV, show_envvar=True, rich_help_panel="Model",
    help=f"Weights: a local .safetensors (or original .pth) file, hf://OWNER/REPO/PATH\\[@REV], "
    f"or a known name ({_KNOWN}). Default: the published MPS overall checkpoint.")]
Config = Annotated[Path | None, typer.Option(
    "--config", rich_help_panel="Model",
    help="Architecture config.json (transformers CLIPConfig). Default: the one beside the weights, "
    "else the built-in ViT-H-14.")]
Revision = Annotated[str | None, typer.Option(
    "--revision", rich_help_panel="Model",
    help="Hub revision (commit, branch or tag) to pin; the same as an @REV in the source.")]
Offline = Annotated[bool, typer.Option(
    "--offline", rich_help_panel="Model",
    help="Never touch the network; use cached weights only (also HF_HUB_OFFLINE=1).")]
Device = Annotated[str, typer.Option(
    "--device", callback=_check_device, rich_help_panel="Model",
    help=f"{DEVICE_CHOICES}; auto: CUDA, then Apple mps, then CPU.")]
Dtype = Annotated[str, typer.Option(
    "--dtype", callback=_check_dtype, rich_help_panel="Model",
    help="IMAGE or IMAGE/TEXT: auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16 for the vision tower and cross "
    "model; the text side (prompt, condition, mask) stays fp32 unless TEXT names another (bf16/bf16: all bf16). "
    "A dtype this CPU does not run natively is slow: mps info says which.")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", "-b", callback=_check_batch, rich_help_panel="Model",
    help=f"Images per forward pass (default: {BATCH_DEFAULT_TEXT}).")]
Dims = Annotated[list[str] | None, typer.Option(
    "--dim", "-d", callback=_check_dims, rich_help_panel="Scoring",
    help="Dimension to score, repeatable or comma-separated: overall (default), aesthetics, detail, "
    "alignment, or all. " + DIMENSION_NOTE)]
Condition = Annotated[str | None, typer.Option(
    "--condition", rich_help_panel="Scoring",
    help="A custom condition text (comma-separated attribute words); its score is keyed 'custom'.")]
MaskThreshold = Annotated[float, typer.Option(
    "--mask-threshold", callback=_check_threshold, rich_help_panel="Scoring",
    help="Keep prompt tokens whose condition similarity ratio exceeds this.")]

DEFAULT_THRESHOLD = DEFAULT_MASK_THRESHOLD


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
    "--model", "-m", callback=_check_models, rich_help_panel="Model",
    help=f"Models to score with, repeatable or comma-separated: {', '.join(MODEL_NAMES)}; each image is decoded "
    "once for all of them. NAME=WEIGHTS gives a model a local file or hf:// URI. With --model every score is keyed "
    "by model: mps.overall (mps.DIM for each --dim), hpsv2.1, pickscore, clipscore. Default: MPS alone, keyed by "
    "dimension (docs/judges.md).")]

AsJson = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="One JSON document.")]
AsJsonl = Annotated[bool, typer.Option("--jsonl", rich_help_panel="Output",
                                       help="One JSON object per line, streamed.")]
AsCsv = Annotated[bool, typer.Option("--csv", rich_help_panel="Output", help="CSV with a header row.")]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelOptions:
    """Everything the model options of a command say about which scorer to load, and how."""

    weights: str | None = None
    config: Path | None = None
    revision: str | None = None
    offline: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    #: ``--model``: the models scored on one decode (``mps,hpsv2.1``); None is MPS alone, keyed by dimension.
    model: str | None = None

    def __post_init__(self) -> None:
        check_revision(self.weights, self.revision)
        if isinstance(self.model, (list, tuple)):
            object.__setattr__(self, "model", ",".join(self.model) or None)

    def key(self) -> tuple:
        """What decides the loaded model (not the batch size), with a local file's size and time."""
        stamp = None
        if self.weights:
            try:
                st = os.stat(self.weights)
                stamp = (st.st_size, st.st_mtime_ns)
            except (OSError, ValueError):
                pass
        return (self.weights, stamp, str(self.config) if self.config else None, self.revision, self.offline,
                self.device, self.dtype, self.model)


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


_SCORERS: dict[tuple, object] = {}
#: How many times this process loaded a model: tests check that bad input never gets that far.
LOADS = {"count": 0}


def load_model(options: ModelOptions):
    """The scorer for these options: loaded once per process (a status line while a terminal waits)."""
    key = options.key()
    if key in _SCORERS:
        return _SCORERS[key]
    from ..engine.panel import load_scorer
    from .output import status

    LOADS["count"] += 1
    with handle_errors("loading the weights"), status("loading MPS weights…"):
        scorer = load_scorer(options.weights, options.config, options.device, options.dtype, model=options.model,
                             revision=options.revision, offline=options.offline or None)
    warn_slow_dtypes(scorer)
    _SCORERS[key] = scorer
    return scorer


def warn_slow_dtypes(scorer) -> None:
    """One stderr line per dtype the device runs through a slow fallback; scoring goes on (the user asked)."""
    for s in scorer.slow_dtypes:
        factor = f", about {s.slowdown:.0f}x slower than fp32 per core (measured)" if s.slowdown else ""
        say(f"mps: warning: {s.dtype} is not native on this {s.device.upper()}{factor}; going on in {s.dtype} "
            "as asked (--dtype fp32 is faster here; `mps info --probe` shows each dtype)")


# --server: the same commands, with the work sent to a running `mps serve` instead of a local model.
ServerUrl = Annotated[str | None, typer.Option(
    "--server", envvar=SERVER_ENV, show_envvar=True, rich_help_panel="Server",
    help="Send the work to a running `mps serve` at this URL instead of loading the model here "
    "(the model options are then the server's; --batch-size is images per request).")]
ServerToken = Annotated[str | None, typer.Option(
    "--token", envvar=SERVE_TOKEN_ENV, show_envvar=True, rich_help_panel="Server",
    help="Bearer token for --server.")]


def open_scorer(options: ModelOptions, server: str | None = None, token: str | None = None):
    """What the scoring commands score with: a client of ``server`` if one is given, else the local model.

    Both offer ``iter_score``, ``score``, ``compare`` and ``batch_size``.
    """
    if server:
        from ..client import Client

        if options.model:
            raise fail("--model scores here; the server scores with its own models (mps serve --model): "
                       "drop --model or --server", Exit.USAGE)
        return Client(server, token=token, batch_size=options.batch_size)
    return load_model(options)
