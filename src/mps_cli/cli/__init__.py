"""The ``mps`` command line: a thin layer over :mod:`mps_cli`."""

from __future__ import annotations

import typer

from .app import app
from . import scoring  # noqa: F401  (registers score, compare, rank)
from . import weights_cmds  # noqa: F401
from . import eval_cmd  # noqa: F401
from . import versus_cmd  # noqa: F401
from . import report_cmd  # noqa: F401
from . import serve_cmd  # noqa: F401
from . import dataset_cmd  # noqa: F401


def main() -> None:
    """Console-script entry point: usage errors become one ``mps: error:`` line, exit 2."""
    import sys
    import warnings

    # Images between PIL's warning and refusal sizes are decoded; the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 130
    except Exception as exc:
        # Typer's usage errors (vendored click's UsageError) carry these two attributes.
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "mps"
        message = " ".join(exc.format_message().split())
        if message:  # a bare `mps` has already printed its help
            print(f"mps: error: {message} (see '{where} --help')", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
