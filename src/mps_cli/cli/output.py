"""The one door for what the commands print: results on stdout, and on stderr every message line
(``mps: error:``, ``warning:``, ``hint:``, ``note:``, spelled here only), the progress display, the
library's log records and the server's request log; and what a closed stdout means.

stdout carries results only, whatever stderr is: the progress display and the loading status
draw on stderr and never redirect stdout (Rich's live displays do by default, which sent results
meant for a pipe or file to the screen). How results look is :mod:`.render`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

#: How every message line starts: ``mps: KIND: TEXT`` or ``mps: TEXT`` (``mps serve: ...`` for the server).
PROG = "mps"

_live_console = None  # the stderr console of an active progress display: messages go above it
_live_bar = None  # the active Progress, cleared before results reach a terminal
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


# Which kind a line is, in every command alike: an input that failed (it could not be read or scored, or it is
# missing where something asked for it) is an error, whether the command then skips it, lists it as a failed
# row or stops; so is a run that failed. A warning is only for what failed nothing: the work it is about was
# done as asked and the line says something about it (an image with no counterpart to compare it with, a
# prompt truncated to 77 tokens, a slow dtype, a reward-hacking flag, an image a report could not show).


def error(text: str) -> None:
    """``mps: error: TEXT``: an input, or the run, failed (see the rule above)."""
    say(text, "error")


def warning(text: str) -> None:
    """``mps: warning: TEXT``: something the user should know about work that was done (see the rule above)."""
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
    _results_coming()
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

    _results_coming()
    # Plain text on pipes and files; the terminal's width (or 80) for a table.
    return Console(file=sys.stdout, soft_wrap=False, highlight=False)


# --------------------------------------------------------------------------- stderr: status, progress


def _results_coming() -> None:
    """Clear the progress bar for good before results go where they may share its terminal.

    A bar is drawn with the cursor at its end, so a result written to the same terminal (stdout a
    terminal too) lands glued to it, and a later redraw erases lines that are now the results. A
    pipe's reader (``| head``) may print on this terminal when it likes, beyond our control. From
    the first result on, the results themselves show the progress; a file takes them unseen, and
    the bar stays.
    """
    if _live_bar is None:
        return
    try:
        shared = sys.stdout.isatty() or stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        shared = True  # not a real file (a test's capture): nothing to draw over, and stopping is harmless
    if shared:
        _live_bar.close()


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
        global _live_console, _live_bar
        if self.bar is not None:
            self.bar.start()
            _live_console, _live_bar = self.bar.console, self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop and clear the bar (it is transient); later counts are not drawn."""
        global _live_console, _live_bar
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.stop()
            _live_console, _live_bar = None, None

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
            labels = {"hash": "reading images", "score": "scoring", "stats": "measuring images"}
            self._tasks[name] = self.bar.add_task(labels.get(name, name), total=total)
        self.bar.update(self._tasks[name], completed=done, total=total)


def human_size(n: int) -> str:
    """A byte count for people, in the binary units every size this CLI says uses: ``14.6 MiB``, ``812 B``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
