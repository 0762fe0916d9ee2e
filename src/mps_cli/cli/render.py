"""How results look: score and rank rows as a table, JSON, JSONL or CSV; a comparison; the eval and versus
tables; and the tally of a run (each failed input once, each remedy once, a count). Everything goes out
through :mod:`.output`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .output import clean, emit, emit_json, error, hint, say, stdout_console, warning

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
    composite: float | None = None
    terms: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        out: dict = {"image": self.image, "prompt": self.prompt, "scores": dict(self.scores)}
        if self.composite is not None:
            out.update(composite=self.composite, terms=dict(self.terms))
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

    def __init__(self, mode: str, keys: Sequence[str], rank: bool = False, grouped: bool = False,
                 composite: bool = False):
        self.mode, self.keys, self.rank, self.grouped = mode, list(keys), rank, grouped
        self.composite = composite
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
            w.writerow(lead + ["image", "prompt", *self.keys, *(["composite"] if self.composite else []), "error"])
            self._csv_header_done = True
        cells = ([row.rank if row.rank is not None else ""] if self.rank else []) + (
            [row.group if row.group is not None else ""] if self.grouped else [])
        scores = ["" if row.error else f"{row.scores[k]:.6f}" for k in self.keys]
        if self.composite:
            scores.append("" if row.error else f"{row.composite:.6f}")
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
            if self.composite:
                table.add_column("composite", justify="right")
            for r in rows:
                # Text, not strings: a "[...]" in a file name or prompt is not markup.
                cells = ([str(r.rank) if r.rank is not None else ""] if self.rank else []) + [Text(clean(r.image))]
                if wide:
                    cells.append(Text(clean(r.prompt or "")))
                if r.error is None:
                    cells += [f"{r.scores[k]:.3f}" for k in self.keys]
                    cells += [f"{r.composite:.3f}"] if self.composite else []
                else:
                    cells += [Text("failed", style="red")] + [""] * (len(self.keys) - 1 + self.composite)
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

    table = Table(title=_plain(f"MPS accuracy on {report.benchmark}"), title_justify="left")
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


def _plain(text: object):
    """User text (a prompt, a side's folder name) as a Rich cell or title: shown as written, never as markup."""
    from rich.text import Text

    return Text(clean(str(text)))


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


def counted(n: int, noun: str) -> str:
    """``1 pair``, ``2 pairs``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _versus_two(report, details: bool, note: str) -> None:
    from rich.table import Table

    m = report.matchups[0]
    console = stdout_console()
    table = Table(title=_plain(f"A: {m.a}  vs  B: {m.b}"), title_justify="left", caption=f"pairing: {report.pairing}",
                  caption_justify="left")
    for col in ("dimension", "A wins %", "95% CI", "mean A − B", "A / tie / B"):
        table.add_column(col, justify="left" if col == "dimension" else "right")
    for k, r in m.results.items():
        table.add_row(k, _rate(r.win_rate), f"{_rate(r.ci95[0])}–{_rate(r.ci95[1])}", _diff(r.mean_diff),
                      f"{r.wins} / {r.ties} / {r.losses}")
    console.print(table)
    console.print(f"{counted(m.prompts, 'prompt')}, {counted(m.pairs, 'pair')}; interval from {report.samples} "
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
    table = Table(title=_plain(f"{m.a} vs {m.b} per prompt, best for A first (by {first})"), title_justify="left")
    table.add_column("prompt", overflow="ellipsis", max_width=60)
    table.add_column("pairs", justify="right")
    table.add_column("A wins %", justify="right")
    for k in m.results:
        table.add_column(f"{k} A − B", justify="right")
    for p in rows:
        if p is None:
            table.add_row(f"… {hidden} more", *[""] * (2 + len(m.results)))
            continue
        table.add_row(_plain(p.prompt), str(p.pairs), _rate(p.win_rate[first]),
                      *[_diff(p.mean_diff[k]) for k in m.results])
    console.print(table)


def _versus_many(report, details: bool) -> None:
    from rich.table import Table

    console = stdout_console()
    for k in report.keys:
        table = Table(title=f"{k}: % of pairs the row side wins against the column side", title_justify="left",
                      caption=f"pairing: {report.pairing}", caption_justify="left")
        table.add_column("")
        for s in report.sides:
            table.add_column(_plain(s), justify="right")
        for s in report.sides:
            cells = [_plain(s)]
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
            ranking.add_row(str(i), _plain(st.side), f"{st.strength:.3f}")
        console.print(ranking)
    console.print(f"{counted(sum(m.pairs for m in report.matchups), 'pair')} over {len(report.matchups)} matchups; "
                  f"intervals from {report.samples} resamples, seed {report.seed}; {report.scored} images scored, "
                  f"{report.cached} from cache.", soft_wrap=True)
    if details:
        for m in report.matchups:
            _versus_prompts(console, m)


def render_series(series) -> None:
    """The tables of ``mps versus --series``: each checkpoint's mean scores and image statistics, then the flags."""
    from rich.table import Table

    console = stdout_console()
    keys = list(series.checkpoints[0].scores)
    table = Table(title="score trend: mean per checkpoint (95% interval)", title_justify="left")
    table.add_column("checkpoint")
    for k in keys:
        table.add_column(k, justify="right")
    for c in series.checkpoints:
        table.add_row(_plain(c.side), *(f"{t.mean:.3f} ({t.ci95[0]:.3f}–{t.ci95[1]:.3f})" if t.n else "—"
                                for t in c.scores.values()))
    console.print(table)
    stats = list(dict.fromkeys(s for c in series.checkpoints for s in c.stats))
    if stats:
        table = Table(title="image statistics: median (5th–95th percentile) per checkpoint", title_justify="left")
        table.add_column("checkpoint")
        for s in stats:
            table.add_column(s.replace("_", " "), justify="right")
        table.add_column("near-duplicates", justify="right")
        for c in series.checkpoints:
            cells = [f"{r.median:.3g} ({r.low:.3g}–{r.high:.3g})" if (r := c.stats.get(s)) else "—" for s in stats]
            table.add_row(_plain(c.side), *cells, "—" if c.duplicate_rate is None else f"{c.duplicate_rate:.0%}")
        console.print(table)
    watched = f"watching {series.rising} against {', '.join(series.falling) or 'nothing'}" if series.rising else ""
    console.print(f"{counted(len(series.flags), 'flag')}" + (f"; {watched}" if watched else "") + ".", soft_wrap=True)
    for f in series.flags:
        console.print(f"flag ({f.kind}): {clean(f.message)}", markup=False, soft_wrap=True)
    for note in series.notes:
        console.print(f"note: {clean(note)}", markup=False, soft_wrap=True)


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
