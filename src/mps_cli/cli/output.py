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
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

#: How every message line starts: ``mps: KIND: TEXT`` or ``mps: TEXT`` (``mps serve: ...`` for the server).
PROG = "mps"

_live_console = None  # the stderr console of an active progress display: messages go above it
_notes: set[str] = set()


def stderr_line(message: str) -> None:
    """One line on stderr, above a progress display when one is drawn."""
    message = clean(message)
    if _live_console is not None:
        _live_console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        print(message, file=sys.stderr, flush=True)


def say(text: str, kind: str | None = None, *, who: str = PROG) -> None:
    """A message on stderr: ``mps: KIND: TEXT`` (kind: error, warning, hint, note) or ``mps: TEXT``."""
    stderr_line(f"{who}: {kind}: {text}" if kind else f"{who}: {text}")


def error(text: str) -> None:
    """``mps: error: TEXT``: an input, or the run, failed."""
    say(text, "error")


def warning(text: str) -> None:
    """``mps: warning: TEXT``: something the user should know; the work goes on."""
    say(text, "warning")


def hint(text: str) -> None:
    """``mps: hint: TEXT``: what to do about what failed."""
    say(text, "hint")


def note_once(message: str) -> None:
    """``mps: note: TEXT``, at most once per process for the same text."""
    if message not in _notes:
        _notes.add(message)
        say(message, "note")


def stderr_text(text: str) -> None:
    """A block of text on stderr as it is (a traceback, with ``MPS_DEBUG``)."""
    sys.stderr.write(clean(text))
    sys.stderr.flush()


class LogLines(logging.Handler):
    """Log records as message lines on stderr, under ``who`` (the server's request log: ``mps serve: ...``)."""

    def __init__(self, who: str = PROG) -> None:
        super().__init__(logging.INFO)
        self.who = who

    def emit(self, record: logging.LogRecord) -> None:
        say(record.getMessage(), who=self.who)


class LibraryNotices(logging.Handler):
    """The library's log records on stderr: warnings always, notices only about files of ``min_bytes`` or
    more (the prepared weights), each text once."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__(logging.INFO)
        self.min_bytes = min_bytes
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        warn = record.levelno >= logging.WARNING
        if not warn and getattr(record, "nbytes", 0) < self.min_bytes:
            return
        message = record.getMessage()
        if message in self.seen:
            return
        self.seen.add(message)
        say(message, "warning" if warn else "note")


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


def emit_lines(lines: Sequence[str]) -> None:
    """Plain result lines on stdout (``mps info``, ``mps download``), each as the terminal gets it."""
    emit("".join(clean(line) + "\n" for line in lines))


def emit_json(doc, indent: int | None = 2) -> None:
    emit(json.dumps(_clean_doc(doc), ensure_ascii=False, indent=indent, allow_nan=False) + "\n")


def reader_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is how the reader of stdout going away (``| head``) showed: a BrokenPipeError, or the
    exit Click and Rich turn one into (they wrap the streams in ``PacifyFlushWrapper``, or exit from
    ``on_broken_pipe``)."""
    if isinstance(exc, BrokenPipeError):
        return True
    if not isinstance(exc, SystemExit):
        return False
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "on_broken_pipe":
            return True
        tb = tb.tb_next
    return False


def flush_results() -> bool:
    """Flush what is left of the results; False when the reader of stdout has gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


def quiet_broken_pipe() -> None:
    """The reader went away (``| head``): point stdout at /dev/null so exit-time flushes stay silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def stdout_console():
    """A Rich console on stdout for result tables."""
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

        console = stdout_console()
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

        console = stdout_console()
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
    console = stdout_console()
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


# --------------------------------------------------------------------------- versus

#: With more prompts than this, ``versus --details`` shows the best and the worst half of it.
DETAIL_ROWS = 20


def render_versus(report, details: bool, note: str) -> None:
    """The tables of ``mps versus``: two sides' win rates, or the matrix and ranking of more."""
    if len(report.sides) == 2:
        _versus_two(report, details, note)
    else:
        _versus_many(report, details)


def _rate(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def _diff(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _versus_two(report, details: bool, note: str) -> None:
    from rich.table import Table

    m = report.matchups[0]
    console = stdout_console()
    table = Table(title=f"A: {m.a}  vs  B: {m.b}", title_justify="left")
    for col in ("dimension", "A wins %", "95% CI", "mean A − B", "A / tie / B"):
        table.add_column(col, justify="left" if col == "dimension" else "right")
    for k, r in m.results.items():
        table.add_row(k, _rate(r.win_rate), f"{_rate(r.ci95[0])}–{_rate(r.ci95[1])}", _diff(r.mean_diff),
                      f"{r.wins} / {r.ties} / {r.losses}")
    console.print(table)
    console.print(f"{_count(m.prompts, 'prompt')}, {_count(m.pairs, 'pair')}; interval from {report.samples} "
                  f"resamples of {m.unit}s, seed {report.seed}; {report.scored} images scored, "
                  f"{report.cached} from cache.", soft_wrap=True)
    if details:
        _versus_prompts(console, m)
    if any(k != "overall" for k in report.keys):
        console.print(f"Note: {note}", soft_wrap=True)


def _versus_prompts(console, m) -> None:
    from rich.table import Table

    first = next(iter(m.results))
    rows = list(m.per_prompt)
    hidden = 0
    if len(rows) > DETAIL_ROWS:
        hidden = len(rows) - DETAIL_ROWS
        rows = rows[:DETAIL_ROWS // 2] + [None] + rows[-DETAIL_ROWS // 2:]
    table = Table(title=f"{m.a} vs {m.b} per prompt, best for A first (by {first})", title_justify="left")
    table.add_column("prompt", overflow="ellipsis", max_width=60)
    table.add_column("pairs", justify="right")
    table.add_column("A wins %", justify="right")
    for k in m.results:
        table.add_column(f"{k} A − B", justify="right")
    for p in rows:
        if p is None:
            table.add_row(f"… {hidden} more", *[""] * (2 + len(m.results)))
            continue
        table.add_row(p.prompt, str(p.pairs), _rate(p.win_rate[first]), *[_diff(p.mean_diff[k]) for k in m.results])
    console.print(table)


def _versus_many(report, details: bool) -> None:
    from rich.table import Table

    console = stdout_console()
    for k in report.keys:
        table = Table(title=f"{k}: % of pairs the row side wins against the column side", title_justify="left")
        table.add_column("")
        for s in report.sides:
            table.add_column(s, justify="right")
        for s in report.sides:
            cells = [s]
            for t in report.sides:
                if s == t:
                    cells.append("—")
                else:
                    r = report.matchup(s, t).results[k]
                    cells.append(f"{_rate(r.win_rate)} ({_rate(r.ci95[0])}–{_rate(r.ci95[1])})")
            table.add_row(*cells)
        console.print(table)
        ranking = Table(title=f"{k}: Bradley-Terry ranking", title_justify="left")
        for col in ("#", "side", "strength"):
            ranking.add_column(col, justify="left" if col == "side" else "right")
        for i, st in enumerate(report.ranking[k], 1):
            ranking.add_row(str(i), st.side, f"{st.strength:.3f}")
        console.print(ranking)
    console.print(f"{_count(sum(m.pairs for m in report.matchups), 'pair')} over {len(report.matchups)} matchups; "
                  f"intervals from {report.samples} resamples, seed {report.seed}; {report.scored} images scored, "
                  f"{report.cached} from cache.", soft_wrap=True)
    if details:
        for m in report.matchups:
            _versus_prompts(console, m)


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
            error(row.error)
            remedy = self.hints.get(problem)
            if remedy and remedy not in self._remedies:
                self._remedies.append(remedy)
            return
        self.scored += 1
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            warning(f"the prompt for {row.image} is longer than 77 tokens; the model reads only the first 77 "
                    "(further truncation warnings suppressed)")

    def close(self, always: bool = False) -> None:
        """The remedies and the count: when something failed, or on a terminal."""
        for remedy in self._remedies:
            hint(remedy)
        if self.failed or (always and sys.stderr.isatty()):
            say(f"{self.scored} scored, {self.failed} failed")
