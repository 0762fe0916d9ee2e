"""The Typer app, the options commands share, model loading, and the one place errors become
messages, flag hints and exit codes.

Nothing here imports torch: ``mps --help`` must stay instant.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from ..constants import DIMENSIONS, KNOWN_SOURCES, SERVE_TOKEN_ENV, SERVER_ENV, WEIGHTS_ENV
from ..devices import BATCH_DEFAULT_TEXT, DEVICE_CHOICES, check_device_spec, parse_precision
from ..engine.options import ModelOptions
from ..errors import CheckpointError, ConfigError, DeviceError, FetchError, InputError, MPSError, ServerError
from ..inputs.items import Problem
from ..switches import env_flag
from . import output

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

        output.emit_lines([f"mps-cli {__version__}"])
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
    """The exit codes; what each means is :data:`EXIT_MEANINGS`."""

    OK = 0
    PARTIAL = 1
    USAGE = 2
    RESOURCE = 3
    FETCH = 4
    INTERNAL = 5
    INTERRUPTED = 130


#: What each exit code means for every command; the help of each command and docs/output.md say this
#: (commands say what 0 and 1 are for them). A test holds the page to it.
EXIT_MEANINGS: dict[Exit, str] = {
    Exit.OK: "everything done",
    Exit.PARTIAL: "some inputs failed; the others were done and printed",
    Exit.USAGE: "usage error: a bad option, an unreadable input file, no prompt source",
    Exit.RESOURCE: "weights or config unreadable or mismatched, out of memory, or a cache or output not writable",
    Exit.FETCH: "weights could not be fetched, or the --server could not be reached",
    Exit.INTERNAL: "an unexpected error: a bug (MPS_DEBUG=1 shows the traceback)",
    Exit.INTERRUPTED: "interrupted",
}
_ALWAYS = (Exit.USAGE, Exit.RESOURCE, Exit.FETCH, Exit.INTERNAL, Exit.INTERRUPTED)


def exit_help(specific: dict[Exit, str], codes: tuple[Exit, ...] = _ALWAYS) -> str:
    """The "Exit status" paragraph of a command's help: its own meanings of ``specific`` codes, then the
    general meaning of the other ``codes`` it can end with."""
    shown = sorted({*specific, *codes})
    return "Exit status: " + "; ".join(f"{int(c)} {specific.get(c, EXIT_MEANINGS[c])}" for c in shown) + "."


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


def fail(message: str, code: Exit) -> typer.Exit:
    """Say ``mps: error: MESSAGE`` and return the exit to raise."""
    output.error(message)
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
    """The last line of defence: a bug or an unforeseen failure is one line (exit 5), never a traceback."""
    detail = " ".join(str(exc).split())
    output.error(f"unexpected {type(exc).__name__} while {doing}" + (f": {detail}" if detail else ""))
    if env_flag(DEBUG_ENV):
        output.stderr_text("".join(traceback.format_exception(exc)))
    else:
        output.hint(f"rerun with {DEBUG_ENV}=1 to see the traceback (and please report it)")
    return typer.Exit(int(Exit.INTERNAL))


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
        raise fail(describe(exc), Exit.RESOURCE) from None
    except FetchError as exc:
        raise fail(describe(exc), Exit.FETCH) from None
    except InputError as exc:
        # Reaching here, it stopped the run: nothing more was scored, so it is not "some inputs failed".
        raise fail(describe(exc), Exit.USAGE) from None
    except MPSError as exc:
        raise fail(describe(exc), Exit.RESOURCE) from None
    except KeyboardInterrupt:
        output.say("interrupted")
        raise typer.Exit(int(Exit.INTERRUPTED)) from None
    except MemoryError:
        raise fail(f"out of memory while {doing}: try a smaller --batch-size or --dtype bf16", Exit.RESOURCE) \
            from None
    except RecursionError as exc:
        raise unexpected(exc, doing) from None
    except Exception as exc:
        raise unexpected(exc, doing) from None


def _route_library_notices() -> None:
    logger = logging.getLogger("mps_cli")
    if not any(isinstance(h, output.LibraryNotices) for h in logger.handlers):
        logger.addHandler(output.LibraryNotices(NOTICE_MIN_BYTES))
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
    from ..engine.scorer import check_mask_threshold

    try:
        return check_mask_threshold(value)
    except ValueError:
        raise typer.BadParameter(f"{value} is not in [0, 1)") from None


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
    "--batch-size", "-b", callback=_check_batch, rich_help_panel="Run",
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
    "offline": (Offline, False), "device": (Device, "auto"), "dtype": (Dtype, "auto"),
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


_SCORERS: dict[tuple, object] = {}
#: How many times this process loaded a model: tests check that bad input never gets that far.
LOADS = {"count": 0}


def _cache_key(options: ModelOptions) -> tuple:
    """What decides the loaded model, with a local file's size and time (a rewritten file loads again)."""
    stamp = None
    if options.weights:
        try:
            st = os.stat(options.weights)
            stamp = (st.st_size, st.st_mtime_ns)
        except (OSError, ValueError):
            pass
    return (*(str(getattr(options, f.name)) for f in fields(options)), stamp)


def load_model(options: ModelOptions):
    """The scorer for these options: loaded once per process (a status line while a terminal waits)."""
    key = _cache_key(options)
    if key in _SCORERS:
        return _SCORERS[key]
    from ..engine.scorer import load_scorer

    LOADS["count"] += 1
    with handle_errors("loading the weights"), output.status("loading MPS weights…"):
        scorer = load_scorer(options)
    warn_slow_dtypes(scorer)
    _SCORERS[key] = scorer
    return scorer


def warn_slow_dtypes(scorer) -> None:
    """One stderr line per dtype the device runs through a slow fallback; scoring goes on (the user asked)."""
    for s in scorer.slow_dtypes:
        factor = f", about {s.slowdown:.0f}x slower than fp32 per core (measured)" if s.slowdown else ""
        output.warning(f"{s.dtype} is not native on this {s.device.upper()}{factor}; going on in {s.dtype} as asked "
                       "(--dtype fp32 is faster here; `mps info --probe` shows each dtype)")


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
        "--cache", help="Score cache (SQLite), shared by mps eval and mps versus. Default: scores.sqlite in "
        "$MPS_CACHE_DIR, else in $XDG_CACHE_HOME/mps-cli (~/.cache when unset).")], None),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", help="Keep scores in memory only.")], False),
}, _cache_choice)


# --server: the same commands, with the work sent to a running `mps serve` instead of a local model.
ServerUrl = Annotated[str | None, typer.Option(
    "--server", envvar=SERVER_ENV, show_envvar=True, rich_help_panel="Server",
    help="Send the work to a running `mps serve` at this URL instead of loading the model here "
    "(the model options are then the server's; --batch-size is images per request).")]
ServerToken = Annotated[str | None, typer.Option(
    "--token", envvar=SERVE_TOKEN_ENV, show_envvar=True, rich_help_panel="Server",
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

        return Client(remote.server, token=remote.token, batch_size=run.batch_size)
    return load_model(model)
