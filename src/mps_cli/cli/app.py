"""The Typer app, the options commands share, model loading, and the one place errors become
messages, flag hints and exit codes.

Nothing here imports torch: ``mps --help`` must stay instant.
"""

from __future__ import annotations

import logging
import os
import traceback
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from enum import IntEnum
from typing import Annotated

import typer
import typer.core

from ..engine.options import ModelOptions
from ..errors import CheckpointError, ConfigError, DeviceError, FetchError, InputError, MPSError, ServerError
from ..inputs.items import Problem
from ..switches import env_flag
from . import output
from .values import BadValue, bounds, rule_for, usage_message

DIMENSION_NOTE = (
    "Only a checkpoint trained on overall preference has been published; aesthetics, detail "
    "and alignment are that model read through their condition masks."
)
#: What every command that scores with demo weights (``mps demo``) says once on stderr; ``{kind}`` is the
#: weights' demo marker (``random``).
DEMO_NOTE = "demo weights ({kind}): these scores mean nothing"
DEBUG_ENV = "MPS_DEBUG"
#: Tell the user, once, when the library writes a file at least this large (the prepared weights).
NOTICE_MIN_BYTES = 256 * 2**20


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__
        from ..constants import DISTRIBUTION

        output.emit_lines([f"{DISTRIBUTION} {__version__}"])
        raise typer.Exit(0)


class _Group(typer.core.TyperGroup):
    """The ``mps`` group: every usage error Typer raises, for any command, becomes one ``mps: error:`` line
    and its exit code here, where the console script and Typer's test runner both pass."""

    def make_context(self, *args, **kwargs):
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors():
            return super().invoke(ctx)


@contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except typer.TyperException as exc:  # vendored click's UsageError and kin; typer.Exit is no TyperException
        message = usage_message(exc)
        if message:
            output.error(message)
        raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Group,
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


_typer_process_value = typer.core._TyperParameter.process_value


def _process_value(self, ctx, value):
    # Typer's own reading of a number or a choice fails in pydantic's words ("Input should be ..."), raised
    # from pydantic's error; the rule of the parameter's declared type and bounds says it in the voice of
    # every other bad value. A callback's own error (no cause) is left as it is.
    try:
        return _typer_process_value(self, ctx, value)
    except typer.BadParameter as exc:
        rule = rule_for(self) if type(exc) is typer.BadParameter and exc.__cause__ is not None else None
        if rule is None:
            raise
        raise BadValue(rule, value) from None


typer.core._TyperParameter.process_value = _process_value

#: What help shows for a value of each type when an option names none (``metavar=``): never a Python type.
_VALUE_NAMES = {int: "N", float: "X", str: "TEXT"}


def _value_name(self, ctx) -> str | None:
    # A flag takes no value (Typer would label it "<bool>"); a choice shows its choices; anything else its
    # metavar, else a word for its type, never Typer's "<list[str]>", "<int>" or "<path>".
    if self.is_flag and self.metavar is None:
        return None
    if self.metavar is not None:
        return self.metavar
    desc = self.type_descriptor
    if desc.is_choice:
        return self.display_type(ctx)
    if desc.is_path:
        return "PATH"
    annotation = desc.annotation
    if desc.is_list:
        (annotation,) = typing.get_args(annotation)
    return _VALUE_NAMES.get(annotation, "VALUE")


def _argument_type(self, ctx) -> str | None:
    # An argument's name column is its metavar (SOURCE, FILE); a type beside it would only repeat Python's.
    return None


def _range_help(self) -> str | None:
    # "[at least 1]" beside N, in the words an error uses, not Typer's "[x>=1e-06]".
    return bounds(self.min, self.max) or None


typer.core.TyperOption.display_type_rich = _value_name
typer.core.TyperOption._get_number_range_help_str = _range_help
typer.core.TyperArgument.display_type_rich = _argument_type


class Exit(IntEnum):
    """The exit codes; what each means is :data:`EXIT_MEANINGS`."""

    OK = 0
    PARTIAL = 1
    USAGE = 2
    RESOURCE = 3
    FETCH = 4
    INTERNAL = 5
    INTERRUPTED = 130


#: Exit 4 of a command without --server: only the weights' fetch.
_FETCH_WITHOUT_SERVER = "weights could not be fetched"

#: What each exit code means for every command; the help of each command and docs/output.md say this
#: (commands say what 0 and 1 are for them). A test holds the page to it.
EXIT_MEANINGS: dict[Exit, str] = {
    Exit.OK: "everything done",
    Exit.PARTIAL: "some inputs failed; the others were done and printed",
    Exit.USAGE: "usage error: a bad option, an unreadable input file, no prompt source",
    Exit.RESOURCE: "weights or config unreadable or mismatched, out of memory, or a cache or output not writable",
    Exit.FETCH: f"{_FETCH_WITHOUT_SERVER}, or the --server could not be reached",
    Exit.INTERNAL: "an unexpected error: a bug (MPS_DEBUG=1 shows the traceback)",
    Exit.INTERRUPTED: "interrupted",
}
_ALWAYS = (Exit.USAGE, Exit.RESOURCE, Exit.FETCH, Exit.INTERNAL, Exit.INTERRUPTED)


def exit_help(specific: dict[Exit, str], codes: tuple[Exit, ...] = _ALWAYS, server: bool = True) -> str:
    """The "Exit status" paragraph of a command's help: its own meanings of ``specific`` codes, then the
    general meaning of the other ``codes`` it can end with; ``server=False`` for a command without --server."""
    shown = sorted({*specific, *codes})
    general = EXIT_MEANINGS if server else {**EXIT_MEANINGS, Exit.FETCH: _FETCH_WITHOUT_SERVER}
    return "Exit status: " + "; ".join(f"{int(c)} {specific.get(c, general[c])}" for c in shown) + "."


#: The remedy for an input problem, in terms of this command line's flags (the library names none).
INPUT_HINTS: dict[Problem, str] = {
    Problem.EMPTY_FOLDER: "use --recursive to look in sub-folders too",
    Problem.NUL_IN_PATH: "for NUL-separated paths (find -print0, xargs -0), pass -0/--null",
    Problem.PROMPTS_FILE: "to score the images a prompts file lists, pass it as --prompts FILE",
    # Each names the sources other than the one that came up empty.
    Problem.NO_CAPTION: "give the prompt another way: --prompt TEXT, --prompts FILE, or --prompt-from metadata "
                        "(the prompt generators embed)",
    Problem.NO_METADATA_PROMPT: "give the prompt another way: --prompt TEXT, --prompts FILE, or --prompt-from "
                                "sidecar (a caption file beside each image)",
}
#: The remedy for a run-level error of a type, when the error carries no ``hint`` of its own (FLAG_HINTS).
ERROR_HINTS: list[tuple[type, str]] = [
    (ServerError, "check --server and --token, and that `mps serve` is running there"),
    (FetchError, "pass --weights PATH for a local file, or --offline to use the cache only"),
]


def fail(message: str, code: Exit) -> typer.Exit:
    """Say ``mps: error: MESSAGE`` and return the exit to raise."""
    output.error(message)
    return typer.Exit(int(code))


# What a user can change for each kind of library error (``MPSError.hint``), as this CLI spells it.
FLAG_HINTS = {
    "config": ": pass their config.json with --config",
    "weights": ", or pass {weights}",
    "download": ": run `mps download {uri}` on a connected machine with the same HF_HOME, or pass {weights}",
    "revision": ": check --revision or the @REVISION",
    "offline": ", or use --offline with cached weights",
    "offline-or-weights": ", use --offline with cached weights, or pass {weights}",
    "cache": "; delete it or pass another --cache (or --no-cache)",
    "cache-locked": ": try again when it is done, or pass another --cache (or --no-cache)",
    "model": " (add them with --model)",
    "condition": " (give one with --condition)",
    "dim": " (--dim)",
    "panel-dims": " (--model; --dim, --condition)",
    "compile": " (--compile off runs without it)",
    "panel-decode": " (drop --decode and --compile, or --model)",
    "device": ": use --device cpu (or auto)",
    "device-index": ": choose one with --device (or --device auto)",
    "dtype": ": choose another with --dtype (fp32 runs on every device)",
    "decode": " (--decode)",
    "compile-mode": " (--compile)",
    "server-unreachable": ": is `mps serve` running there? Check --server",
    "server": " (--server)",
    "server-failed": " (the server's log says why)",
    "token": " (check --token)",
}


#: Library errors whose culprit is one flag's whole value: said ``--FLAG: MESSAGE``, wherever they are found.
FLAG_PREFIXES = {"reward": "--reward"}


def describe(exc: BaseException) -> str:
    """The library's message with this command line's remedy for its kind of error.

    A structured hint (``MPSError.hint``, see :data:`FLAG_HINTS`) wins; otherwise the remedy
    for the error's type (:data:`ERROR_HINTS`).
    """
    message = str(exc)
    key = getattr(exc, "hint", None) or ""
    if key in FLAG_PREFIXES:
        return f"{FLAG_PREFIXES[key]}: {message}"
    if key in FLAG_HINTS:
        model = getattr(exc, "model", None)
        weights = f"--model {model}=PATH" if model else "--weights PATH"  # a judge's weights are given so
        return message + FLAG_HINTS[key].format(uri=getattr(exc, "uri", None) or "", weights=weights)
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


# --------------------------------------------------------------------------- the model


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
        note_demo(_SCORERS[key])
        return _SCORERS[key]
    from ..engine.panel import load_scorer

    LOADS["count"] += 1
    with handle_errors("loading the weights"), output.status("loading MPS weights…"):
        scorer = load_scorer(options)
    warn_slow_dtypes(scorer)
    _SCORERS[key] = scorer
    note_demo(scorer)
    return scorer


def note_demo(model) -> None:
    """The one stderr line a command that scores says when ``model`` (a scorer, a client's served model, a
    dataset's model spec: anything with ``demo``) has demo weights. Every command's model comes through
    :func:`load_model` (or, on Ray or a server, hands its marker here), so none says it itself."""
    kind = getattr(model, "demo", None)
    if kind:
        output.say(DEMO_NOTE.format(kind=kind), "note")


def warn_slow_dtypes(scorer) -> None:
    """One stderr line per dtype the device runs through a slow fallback; scoring goes on (the user asked)."""
    for s in scorer.slow_dtypes:
        factor = f", about {s.slowdown:.0f}x slower than fp32 per core (measured)" if s.slowdown else ""
        output.warning(f"{s.dtype} is not native on this {s.device.upper()}{factor}; going on in {s.dtype} as asked "
                       "(--dtype fp32 is faster here; `mps info --probe` shows each dtype)")
