"""Everything the commands print: results on stdout (table, JSON, JSONL, CSV), and on stderr the
messages, the progress display and the closing summary.

stdout carries results only, whatever stderr is: the progress display and the loading status
draw on stderr and never redirect stdout (Rich's live displays do by default, which sent results
meant for a pipe or file to the screen).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

FORMATS = ("table", "json", "jsonl", "csv")

_live_console = None  # the stderr console of an active progress display: messages go above it
_notes: set[str] = set()


def stderr_line(message: str) -> None:
    """One line on stderr, above a progress display when one is drawn."""
    message = clean(message)
    if _live_console is not None:
        _live_console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        print(message, file=sys.stderr, flush=True)


def note_once(message: str) -> None:
    if message not in _notes:
        _notes.add(message)
        stderr_line(f"mps: note: {message}")


def clean(text: str) -> str:
    """``text`` as it can be written: names that are not valid UTF-8 get U+FFFD (said once on stderr)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    # File names the OS gave us as bytes come back with surrogate escapes; anything else is replaced too.
    fixed = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "surrogatepass")
    out = fixed.decode("utf-8", "replace")
    note_once("some names are not valid UTF-8 text; they are shown with U+FFFD in their place")
    return out


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _clean_doc(value):
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k): _clean_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_doc(v) for v in value]
    return value


def emit(text: str) -> None:
    """Write results to stdout and flush, so pipes see each line as it is ready."""
    sys.stdout.write(text)
    sys.stdout.flush()


def emit_json(doc, indent: int | None = 2) -> None:
    emit(json.dumps(_clean_doc(doc), ensure_ascii=False, indent=indent, allow_nan=False) + "\n")


def quiet_broken_pipe() -> None:
    """The reader went away (``| head``): point stdout at /dev/null so exit-time flushes stay silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _stdout_console():
    from rich.console import Console

    # Plain text on pipes and files; the terminal's width (or 80) for a table.
    return Console(file=sys.stdout, soft_wrap=False, highlight=False)


# --------------------------------------------------------------------------- stderr: status, progress


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens, only when stderr is a terminal."""
    global _live_console
    if not sys.stderr.isatty() or _live_console is not None:
        yield
        return
    from rich.live import Live
    from rich.spinner import Spinner

    console = _stderr_console()
    with Live(Spinner("dots", text=message), console=console, transient=True,
              redirect_stdout=False, redirect_stderr=False):
        _live_console = console
        try:
            yield
        finally:
            _live_console = None


class Progress:
    """A progress bar with ETA on stderr, for a terminal and work longer than one batch.

    Use as a context manager; :meth:`advance` counts finished items, :meth:`stage` sets a
    named stage's count (``mps eval`` reads images, then scores them).
    """

    def __init__(self, total: int = 0, batch_size: int = 1, force: bool = False):
        self.bar = None
        self._tasks: dict[str, int] = {}
        if sys.stderr.isatty() and (force or total > batch_size):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("eta"), TimeRemainingColumn(), console=_stderr_console(), transient=True,
                           redirect_stdout=False, redirect_stderr=False)
            if total:
                self._tasks["score"] = self.bar.add_task("scoring", total=total)

    def __enter__(self) -> Progress:
        global _live_console
        if self.bar is not None:
            self.bar.start()
            _live_console = self.bar.console
        return self

    def __exit__(self, *exc) -> None:
        global _live_console
        if self.bar is not None:
            self.bar.stop()
            _live_console = None

    @property
    def callback(self):
        """``advance`` when a bar is drawn, else None (the library then skips the calls)."""
        return self.advance if self.bar is not None else None

    @property
    def stage_callback(self):
        return self.stage if self.bar is not None else None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and "score" in self._tasks:
            self.bar.advance(self._tasks["score"], n)

    def stage(self, name: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if name not in self._tasks:
            labels = {"hash": "reading images", "score": "scoring"}
            self._tasks[name] = self.bar.add_task(labels.get(name, name), total=total)
        self.bar.update(self._tasks[name], completed=done, total=total)


# --------------------------------------------------------------------------- score and rank


@dataclass
class Row:
    """One result line: an image's scores (or its error), with its rank and prompt group when ranking."""

    image: str
    prompt: str | None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    rank: int | None = None
    group: int | None = None

    def record(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        out: dict = {"image": self.image, "prompt": self.prompt, "scores": dict(self.scores)}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.group is not None:
            out["group"] = self.group
        return out


def finite_or_error(row: Row) -> Row:
    """A score that is not a finite number is that input's error: never print NaN."""
    bad = [k for k, v in row.scores.items() if not math.isfinite(v)]
    if bad and row.error is None:
        row.error = f"{row.image}: the model gave a non-finite {bad[0]} score (damaged weights?)"
        row.scores = {}
    return row


class ResultWriter:
    """Writes rows in the chosen format; JSONL and CSV stream, JSON and the table wait for the end."""

    def __init__(self, mode: str, keys: Sequence[str], rank: bool = False, grouped: bool = False):
        self.mode, self.keys, self.rank, self.grouped = mode, list(keys), rank, grouped
        self.rows: list[Row] = []
        self._csv_header_done = False

    def add(self, row: Row) -> None:
        if self.mode == "jsonl":
            emit_json(row.record(), indent=None)
        elif self.mode == "csv":
            self._csv_row(row)
        else:
            self.rows.append(row)

    def _csv_row(self, row: Row) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        lead = (["rank"] if self.rank else []) + (["group"] if self.grouped else [])
        if not self._csv_header_done:
            w.writerow(lead + ["image", "prompt", *self.keys, "error"])
            self._csv_header_done = True
        cells = ([row.rank if row.rank is not None else ""] if self.rank else []) + (
            [row.group if row.group is not None else ""] if self.grouped else [])
        scores = ["" if row.error else f"{row.scores[k]:.6f}" for k in self.keys]
        w.writerow([clean(str(c)) for c in cells + [row.image, row.prompt or "", *scores, row.error or ""]])
        emit(buf.getvalue())

    def close(self) -> None:
        if self.mode == "json":
            emit_json([r.record() for r in self.rows])
        elif self.mode == "table" and self.rows:
            self._tables()

    def _tables(self) -> None:
        from rich.table import Table
        from rich.text import Text

        console = _stdout_console()
        groups: dict[int | None, list[Row]] = {}
        for r in self.rows:
            groups.setdefault(r.group if r.error is None else -1, []).append(r)
        failed = groups.pop(-1, [])
        order = list(groups) or [None]
        for n, g in enumerate(order):
            rows = groups.get(g, []) + (failed if n == len(order) - 1 else [])
            prompts = {r.prompt for r in rows if r.error is None}
            title = f"group {g} of {len(order)}" if g is not None and self.grouped else None
            table = Table(title=title, title_justify="left")
            if self.rank:
                table.add_column("#", justify="right")
            table.add_column("image", overflow="fold")
            wide = len(prompts) > 1
            if wide:
                table.add_column("prompt", overflow="ellipsis", max_width=40)
            for k in self.keys:
                table.add_column(k, justify="right")
            for r in rows:
                # Text, not strings: a "[...]" in a file name or prompt is not markup.
                cells = ([str(r.rank) if r.rank is not None else ""] if self.rank else []) + [Text(clean(r.image))]
                if wide:
                    cells.append(Text(clean(r.prompt or "")))
                if r.error is None:
                    cells += [f"{r.scores[k]:.3f}" for k in self.keys]
                else:
                    cells += [Text("failed", style="red")] + [""] * (len(self.keys) - 1)
                table.add_row(*cells)
            console.print(table)
            if len(prompts) == 1:
                # Printed after the table, not as its caption, so it wraps to the terminal, not the table.
                console.print(f"prompt: {clean(next(iter(prompts)))}", markup=False, soft_wrap=True)
            if n < len(order) - 1:
                console.print()


# --------------------------------------------------------------------------- compare


def comparison_record(prompt: str | None, a: str, b: str, results: dict | None, error: str | None = None) -> dict:
    """The JSON document of one comparison: both scores, ``p_a`` and the winner per dimension, or the error."""
    doc: dict = {"prompt": prompt, "a": a, "b": b}
    if error is not None:
        doc["error"] = error
    else:
        doc["results"] = {k: {"a": v.a, "b": v.b, "p_a": v.p_a, "winner": v.winner} for k, v in results.items()}
    return doc


def render_comparison(mode: str, prompt: str | None, a: str, b: str, results: dict | None,
                      error: str | None = None) -> None:
    """One comparison as ONE document in every format; CSV columns are the JSON's keys joined by dots."""
    doc = comparison_record(prompt, a, b, results, error)
    if mode in ("json", "jsonl"):
        emit_json(doc, indent=2 if mode == "json" else None)
    elif mode == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        keys = list(results or {})
        w.writerow(["prompt", "a", "b", *(f"{k}.{f}" for k in keys for f in ("a", "b", "p_a", "winner")), "error"])
        cells = [f"{x:.6f}" if isinstance(x, float) else x
                 for k in keys for x in (results[k].a, results[k].b, results[k].p_a, results[k].winner)]
        w.writerow([clean(str(c)) for c in [prompt or "", a, b, *cells, error or ""]])
        emit(buf.getvalue())
    elif error is None:
        from rich.table import Table
        from rich.text import Text

        console = _stdout_console()
        table = Table()
        for col, just in (("dimension", "left"), ("A", "right"), ("B", "right"), ("P(A preferred)", "right"),
                          ("winner", "left")):
            table.add_column(col, justify=just)
        for k, v in results.items():
            name = Text({"a": f"A ({clean(a)})", "b": f"B ({clean(b)})", "tie": "tie"}[v.winner])
            table.add_row(k, f"{v.a:.3f}", f"{v.b:.3f}", f"{v.p_a:.3f}", name)
        console.print(table)
        console.print(f"prompt: {clean(prompt or '')}", markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- eval


def render_eval_report(report, as_json: bool, note: str) -> None:
    """The accuracy table (or the JSON report) of ``mps eval``."""
    if as_json:
        emit_json(report.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"MPS accuracy on {report.benchmark}", title_justify="left")
    table.add_column("dimension")
    table.add_column("accuracy %", justify="right")
    table.add_column("paper (MPS) %", justify="right")
    for dim, acc in report.accuracy.items():
        paper = report.published if dim == "overall" and report.published is not None else None
        table.add_row(dim, _percent(acc), "—" if paper is None else f"{paper:.1f}")
    console = _stdout_console()
    console.print(table)
    ties = "" if report.benchmark == "hpdv2" else f", {report.human_ties} human ties left out"
    # Plain lines are not re-wrapped, so they stay greppable when stdout is a file.
    console.print(f"{report.file}: {report.prompts} prompts, {report.pairs} pairs{ties}, {report.skipped} items "
                  f"skipped; {report.scored} images scored, {report.cached} from cache.", soft_wrap=True,
                  markup=False)
    if any(dim != "overall" for dim in report.accuracy):
        console.print(f"Note: {note}", soft_wrap=True, markup=False)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


# --------------------------------------------------------------------------- the end of a run


class Report:
    """Errors once per input as they happen; at the end each remedy once and a count."""

    def __init__(self, hints: dict | None = None):
        self.hints = hints or {}
        self.scored = 0
        self.failed = 0
        self._remedies: list[str] = []
        self._warned_truncation = False

    def result(self, row: Row, problem=None, truncated: bool = False) -> None:
        if row.error is not None:
            self.failed += 1
            stderr_line(f"mps: error: {row.error}")
            hint = self.hints.get(problem)
            if hint and hint not in self._remedies:
                self._remedies.append(hint)
            return
        self.scored += 1
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            stderr_line(f"mps: warning: the prompt for {row.image} is longer than 77 tokens; the model reads only "
                        "the first 77 (further truncation warnings suppressed)")

    def close(self, always: bool = False) -> None:
        """The remedies and the count: when something failed, or on a terminal."""
        for hint in self._remedies:
            stderr_line(f"mps: hint: {hint}")
        if self.failed or (always and sys.stderr.isatty()):
            stderr_line(f"mps: {self.scored} scored, {self.failed} failed")
