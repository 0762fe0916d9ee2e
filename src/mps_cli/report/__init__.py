"""One self-contained HTML page of results: galleries, comparisons, win rates and histograms.

Reads what the other commands write (``score``/``rank``/``compare`` JSON, JSONL or CSV,
``versus --json``, an ``mps dataset`` folder: :mod:`.results`) and renders a page that works
offline: images are embedded as thumbnails or linked by relative path (:mod:`.images`), nothing is
fetched from anywhere, every text is escaped by the templates (:mod:`.page`, ``templates/``), and
a Content-Security-Policy allows only the page's own inline script and style (by hash) and
``data:`` images.

The page's stable hook for other programs: every image card is an element with class
``mps-card`` and attributes ``data-image``, ``data-prompt`` and one ``data-score-<dim>`` per
scored dimension; the sort control is ``<select id="mps-sort">`` with dimension names as
option values; the filter is ``<input id="mps-filter">``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ReportError
from ..files import write_whole
from .results import (
    Dataset,
    Entry,
    Meta,
    Pair,
    ReportSummary,
    Results,
    Versus,
    VersusPrompt,
    parse_results,
    read_dataset,
    read_result_path,
    read_results,
    results_from_records,
)

DEFAULT_THUMB = 256
DEFAULT_MAX_IMAGES = 2000
THUMB_FORMATS = ("webp", "jpeg")


def write_report(path: str | os.PathLike, results: Results, *, thumb: int = DEFAULT_THUMB, thumb_format: str = "webp",
                 link_images: bool = False, max_images: int = DEFAULT_MAX_IMAGES,
                 title: str | None = None) -> ReportSummary:
    """Render ``results`` and write the page to ``path`` (whole or not at all)."""
    path = Path(path)
    html, summary = render_report(results, out_dir=path.parent, thumb=thumb, thumb_format=thumb_format,
                                  link_images=link_images, max_images=max_images, title=title)
    data = html.encode("utf-8")
    try:
        write_whole(path, data)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return ReportSummary(path=path, cards=summary.cards, images=summary.images, sampled=summary.sampled,
                         unreadable=summary.unreadable, bytes=len(data))


def render_report(results: Results, *, out_dir: str | os.PathLike = ".", thumb: int = DEFAULT_THUMB,
                  thumb_format: str = "webp", link_images: bool = False, max_images: int = DEFAULT_MAX_IMAGES,
                  title: str | None = None) -> tuple[str, ReportSummary]:
    """The page as a string, and what it holds (``path`` and ``bytes`` of the summary are not set)."""
    from .page import Page

    if thumb_format not in THUMB_FORMATS:
        raise ValueError(f"thumbnail format must be one of {', '.join(THUMB_FORMATS)}")
    return Page(results, Path(out_dir), thumb, thumb_format, link_images, max_images, title).render()


__all__ = [
    "DEFAULT_MAX_IMAGES", "DEFAULT_THUMB", "THUMB_FORMATS", "Dataset", "Entry", "Meta", "Pair", "ReportSummary",
    "Results", "Versus", "VersusPrompt", "parse_results", "read_dataset", "read_result_path", "read_results",
    "render_report", "results_from_records", "write_report",
]
