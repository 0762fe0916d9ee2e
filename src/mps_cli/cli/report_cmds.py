"""``mps report``, and the ``--html FILE`` option that score, rank, compare (and versus) share."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .app import Exit, exit_help, fail, handle_errors
from .output import error, human_size, say, warning

EXITS = exit_help({Exit.OK: "written", Exit.PARTIAL: "some inputs unreadable (the rest are in the page)",
                   Exit.USAGE: "no readable input or a bad option", Exit.RESOURCE: "the page cannot be written"},
                  codes=(Exit.INTERNAL, Exit.INTERRUPTED))


class ThumbFormat(str, Enum):
    webp = "webp"
    jpeg = "jpeg"


def _check_out(value: Path | None) -> Path | None:
    """Refuse an unwritable destination before any work is done."""
    if value is not None:
        if value.is_dir():
            raise typer.BadParameter(f"{value} is a folder; give a file name such as report.html")
        if not value.parent.is_dir():
            raise typer.BadParameter(f"{value.parent} does not exist")
    return value


#: ``--html FILE`` on the commands that score: the report of their results, beside the normal output.
Html = Annotated[Path | None, typer.Option(
    "--html", callback=_check_out, rich_help_panel="Output", metavar="FILE",
    help="Also write a self-contained HTML report of the results to FILE (see mps report).")]


def write_html(path: Path | None, records: list, scorer=None, threshold: float | None = None,
               conditions: list | None = None) -> None:
    """Write the ``--html`` report of records in the JSON contract; a failure is one line, not lost results."""
    if path is None:
        return
    from ..report import Meta, results_from_records, write_report

    meta = Meta(threshold=threshold, conditions=list(conditions or []))
    if scorer is not None:
        from .. import __version__

        # A local Scorer, or a server's Client, which knows these only when the server said them.
        meta.weights, meta.identity = getattr(scorer, "weights", None), getattr(scorer, "identity", None)
        precision = getattr(scorer, "precision", None)
        meta.dtype, meta.version = precision.label if precision else None, __version__
    with handle_errors():
        results = results_from_records(records, Path.cwd(), "this run", meta)
        if results.empty:
            say(f"no results to report; {path} not written")
            return
        summary = write_report(path, results)
        _said(summary)


def _said(summary) -> None:
    more = " (sampled: see --max-images)" if summary.sampled else ""
    cards = f"{summary.cards:,} image card" + ("" if summary.cards == 1 else "s")
    say(f"wrote {summary.path} ({cards}{more}, {human_size(summary.bytes)})")
    if summary.unreadable:
        warning(f"{len(summary.unreadable):,} image(s) could not be shown, e.g. {summary.unreadable[0]}")


def report(
    results: Annotated[list[str], typer.Argument(
        help="What the other commands wrote: score/rank/compare JSON, JSONL or CSV, versus --json, an mps dataset "
        "output folder; - reads JSON/JSONL from stdin.", show_default=False, metavar="RESULTS")],
    output: Annotated[Path, typer.Option(
        "--out", "--output", "-o", callback=_check_out, metavar="FILE", help="The HTML file to write.",
        show_default=False)],
    thumb: Annotated[int, typer.Option(
        "--thumb", min=16, max=2048, metavar="PIXELS",
        help="Longest side of the embedded thumbnails, in pixels.")] = 256,
    thumb_format: Annotated[ThumbFormat, typer.Option(
        "--thumb-format", help="Encoding of the embedded thumbnails.")] = ThumbFormat.webp,
    link_images: Annotated[bool, typer.Option(
        "--link-images", help="Reference the original image files by relative path instead of embedding "
        "thumbnails (for large sets; the page then needs the files beside it).")] = False,
    max_images: Annotated[int, typer.Option(
        "--max-images", min=1, help="Show at most this many images in the gallery; beyond it a random sample, "
        "and the page says so.")] = 2000,
    title: Annotated[str | None, typer.Option("--title", metavar="TEXT", help="Page title.")] = None,
) -> None:
    """One self-contained HTML page of results: images best first per prompt, comparisons, win rates, histograms.

    It works offline: thumbnails are embedded and nothing is fetched.
    """
    from ..errors import ResultsError
    from ..report import read_results, write_report

    try:
        data, problems = read_results(results)
    except ResultsError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    for p in problems:
        error(p)
    with handle_errors():
        summary = write_report(output, data, thumb=thumb, thumb_format=thumb_format.value, link_images=link_images,
                               max_images=max_images, title=title)
    _said(summary)
    raise typer.Exit(int(Exit.PARTIAL if problems else Exit.OK))
