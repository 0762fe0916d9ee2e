"""The Typer app, the options commands share, and the one place errors become messages and exit codes.

Nothing here imports torch: ``mps --help`` must stay instant.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from ..constants import DEFAULT_MASK_THRESHOLD, DIMENSIONS, KNOWN_SOURCES, SERVE_TOKEN_ENV, SERVER_ENV, WEIGHTS_ENV
from ..devices import BATCH_DEFAULT_TEXT, DEVICE_CHOICES, check_device_spec, parse_precision
from ..errors import CheckpointError, ConfigError, DeviceError, FetchError, InputError, MPSError

DIMENSION_NOTE = (
    "Only a checkpoint trained on overall preference has been published; aesthetics, detail "
    "and alignment are that model read through their condition masks."
)

app = typer.Typer(
    name="mps",
    help="Score text-to-image generations with MPS, the Multi-dimensional Preference Score "
    "(CVPR 2024): how much people would prefer an image for its prompt.\n\n" + DIMENSION_NOTE,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Exit(IntEnum):
    OK = 0
    PARTIAL = 1  # some inputs failed; the rest were scored and printed
    USAGE = 2  # bad flag value, unknown dimension, bad device, no prompt source
    WEIGHTS = 3  # weights or config unreadable or mismatched
    FETCH = 4  # network, Hub or offline-cache problem
    INTERRUPTED = 130


def say(message: str) -> None:
    """One line on stderr (never stdout, which carries results only)."""
    print(message, file=sys.stderr, flush=True)


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
    """The library's message with the CLI's advice for its kind of error (see :data:`FLAG_HINTS`)."""
    hint = FLAG_HINTS.get(getattr(exc, "hint", None) or "", "")
    return str(exc) + hint.format(uri=getattr(exc, "uri", None) or "")


@contextmanager
def handle_errors() -> Iterator[None]:
    """Map the library's typed errors to one stderr line and an exit code; never a traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except DeviceError as exc:
        raise fail(describe(exc), Exit.USAGE) from None
    except (CheckpointError, ConfigError) as exc:
        raise fail(describe(exc), Exit.WEIGHTS) from None
    except FetchError as exc:
        raise fail(describe(exc), Exit.FETCH) from None
    except InputError as exc:
        raise fail(describe(exc), Exit.PARTIAL) from None
    except MPSError as exc:
        raise fail(describe(exc), Exit.PARTIAL) from None
    except KeyboardInterrupt:
        say("mps: interrupted")
        raise typer.Exit(int(Exit.INTERRUPTED)) from None
    except MemoryError:
        raise fail("out of memory: try a smaller --batch-size or --dtype bf16", Exit.PARTIAL) from None


def _check_dims(values: Optional[List[str]]) -> Optional[List[str]]:
    for v in values or []:
        if v != "all" and v not in DIMENSIONS:
            raise typer.BadParameter(f"{v!r} is not one of {', '.join(DIMENSIONS)}, all")
    return values


def _check_threshold(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value} is not in [0, 1)")
    return value


def _check_batch(value: Optional[int]) -> Optional[int]:
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

Weights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", envvar=WEIGHTS_ENV, show_envvar=True, rich_help_panel="Model",
    help=f"Weights: a local .safetensors (or original .pth) file, hf://OWNER/REPO/PATH[@REV], "
    f"or a known name ({_KNOWN}). Default: the published MPS overall checkpoint.")]
Config = Annotated[Optional[Path], typer.Option(
    "--config", rich_help_panel="Model",
    help="Architecture config.json (transformers CLIPConfig). Default: the one beside the weights, "
    "else the built-in ViT-H-14.")]
Revision = Annotated[Optional[str], typer.Option(
    "--revision", rich_help_panel="Model", help="Hub revision (commit, branch or tag) to pin.")]
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
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", callback=_check_batch, rich_help_panel="Model",
    help=f"Images per forward pass (default: {BATCH_DEFAULT_TEXT}).")]
Dims = Annotated[Optional[List[str]], typer.Option(
    "--dim", "-d", callback=_check_dims, rich_help_panel="Scoring",
    help="Dimension to score, repeatable: overall (default), aesthetics, detail, alignment, or all. "
    + DIMENSION_NOTE)]
Condition = Annotated[Optional[str], typer.Option(
    "--condition", rich_help_panel="Scoring",
    help="A custom condition text (comma-separated attribute words); its score is keyed 'custom'.")]
MaskThreshold = Annotated[float, typer.Option(
    "--mask-threshold", callback=_check_threshold, rich_help_panel="Scoring",
    help="Keep prompt tokens whose condition similarity ratio exceeds this.")]

DEFAULT_THRESHOLD = DEFAULT_MASK_THRESHOLD


def load_scorer_for_cli(weights: Optional[str], config: Optional[Path], device: str, dtype: str,
                        revision: Optional[str] = None, offline: bool = False,
                        batch_size: Optional[int] = None):
    """Load the scorer with a status line on stderr when it is a terminal; warn once about a slow dtype."""
    from ..scorer import load_scorer

    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status("loading MPS weights…"):
            scorer = load_scorer(weights, config, device, dtype, revision=revision,
                                 offline=offline or None, batch_size=batch_size)
    else:
        scorer = load_scorer(weights, config, device, dtype, revision=revision, offline=offline or None,
                             batch_size=batch_size)
    warn_slow_dtypes(scorer)
    return scorer


def warn_slow_dtypes(scorer) -> None:
    """One stderr line per dtype the device runs through a slow fallback; scoring goes on (the user asked)."""
    for s in scorer.slow_dtypes:
        factor = f", about {s.slowdown:.0f}x slower than fp32 per core (measured)" if s.slowdown else ""
        say(f"mps: warning: {s.dtype} is not native on this {s.device.upper()}{factor}; going on in {s.dtype} "
            "as asked (--dtype fp32 is faster here; `mps info --probe` shows each dtype)")


# --server: the same commands, with the work sent to a running `mps serve` instead of a local model.
ServerUrl = Annotated[Optional[str], typer.Option(
    "--server", envvar=SERVER_ENV, show_envvar=True, rich_help_panel="Server",
    help="Send the work to a running `mps serve` at this URL instead of loading the model here "
    "(the model options are then the server's; --batch-size is images per request).")]
ServerToken = Annotated[Optional[str], typer.Option(
    "--token", envvar=SERVE_TOKEN_ENV, show_envvar=True, rich_help_panel="Server",
    help="Bearer token for --server.")]


def open_scorer(server: Optional[str], token: Optional[str], weights: Optional[str], config: Optional[Path],
                device: str, dtype: str, revision: Optional[str] = None, offline: bool = False,
                batch_size: Optional[int] = None):
    """What the scoring commands score with: a client of ``server`` if one is given, else the local model.

    Both offer ``iter_score``, ``score``, ``compare`` and ``batch_size``.
    """
    if server:
        from ..client import Client

        return Client(server, token=token, batch_size=batch_size)
    return load_scorer_for_cli(weights, config, device, dtype, revision, offline, batch_size)
