"""``mps demo``: a tiny random-weight checkpoint and a few images to try every command on, offline."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEMO_RANDOM, WEIGHTS_ENV
from ..errors import ForeignFolderError, OutputError
from . import output
from .app import DEMO_NOTE, Exit, exit_help, fail, handle_errors

EXITS = exit_help({Exit.OK: "written (or already there, unchanged)",
                   Exit.USAGE: "DIR is not empty and not a demo folder (or not a folder)",
                   Exit.RESOURCE: "DIR cannot be written"},
                  codes=(Exit.INTERNAL, Exit.INTERRUPTED))
DEFAULT_DIR = Path("mps-demo")


def demo(
    folder: Annotated[Path, typer.Argument(
        metavar="DIR", help="Where to write the demo: a new or empty folder, or one mps demo wrote before.")
    ] = DEFAULT_DIR,
) -> None:
    """Write a tiny random-weight checkpoint and a few images into DIR, and print the commands to try on them.

    Nothing is downloaded, so every command can be tried offline to see the shape of its output. The
    weights are random: their scores mean nothing, and every command that scores with them says so on
    stderr. Rerunning on the same DIR writes the same files and leaves the ones you added.
    """
    from ..demo import make_demo

    with handle_errors("writing the demo"):
        try:
            made = make_demo(folder)
        except ForeignFolderError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        except OutputError as exc:
            raise fail(str(exc), Exit.RESOURCE) from None
    files = f"{made.written} file" + ("" if made.written == 1 else "s")
    done = f"wrote {files}" if made.written else "already there, unchanged"
    output.say(f"{made.folder}: {done}; {DEMO_NOTE.format(kind=DEMO_RANDOM)}")
    output.emit_lines(demo_commands(made))


def demo_commands(made) -> list[str]:
    """The commands to try, each runnable as printed from the current folder, under one comment line."""
    q = shlex.quote
    w = f"--weights {q(str(made.weights))}"
    v1, v2 = (q(str(s)) for s in made.sides)
    a, b, prompt = made.sample
    ranked = made.folder / "ranked.jsonl"
    return [
        "# Try these (random weights: the scores mean nothing, they only show what each command prints):",
        f"mps score {v1} --prompt-from metadata {w}",
        f"mps score --prompts {q(str(made.prompts))} --dim all --jsonl {w}",
        f"mps compare {q(str(a))} {q(str(b))} --prompt {q(prompt)} {w}",
        f"mps rank {v1} {v2} --prompt {q(prompt)} --top 3 {w}",
        f"mps versus {v1} {v2} --prompt-from sidecar {w}",
        f"mps eval pairs {q(str(made.pairs))} {w}",
        f"mps rank {v1} {v2} --prompt-from metadata --jsonl {w} > {q(str(ranked))}",
        f"mps report {q(str(ranked))} -o {q(str(made.folder / 'report.html'))}",
        f"{WEIGHTS_ENV}={q(str(made.weights))} mps info",
    ]


__all__ = ["EXITS", "demo", "demo_commands"]
