"""The ``mps`` command line: a thin layer over :mod:`mps_cli`."""

from __future__ import annotations

from .app import app
from . import scoring  # noqa: F401  (registers score, compare, rank)
from . import weights_cmds  # noqa: F401
from . import eval_cmd  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    import warnings

    # Images between PIL's warning and refusal sizes are decoded; the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    app()


__all__ = ["app", "main"]
