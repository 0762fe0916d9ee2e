"""``mps versus``: generator against generator, win rates per dimension with bootstrap intervals."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD
from ..errors import PromptError
from ..inputs.items import PromptSource
from .app import (
    DIMENSION_NOTE,
    AsJson,
    BatchSize,
    Condition,
    Config,
    Device,
    Dims,
    Dtype,
    Exit,
    MaskThreshold,
    ModelOptions,
    Models,
    Offline,
    Revision,
    Weights,
    describe,
    fail,
    handle_errors,
    load_model,
    say,
)
from .output import Progress, emit_json, quiet_broken_pipe
from .report_cmds import Html, write_html

MAX_PROBLEM_LINES = 20
#: With more prompts than this, ``--details`` shows the best and the worst half of it.
DETAIL_ROWS = 20

VERSUS_HELP = "\n\n".join([
    "Which generator do people prefer? Per dimension: how often side A's image beats side B's for the same "
    "prompt (ties count half), the mean score difference, and a 95% bootstrap interval over prompts.",
    "A side is a folder of images, an `mps dataset` output folder, or a JSON/JSONL from `mps score` (these "
    "are not scored again). Images pair by their path relative to the side without extension "
    "(a/cat_01.png ~ b/cat_01.jpg). With --prompts, the file names images by that relative path (with or "
    "without extension) and every A image of a prompt meets every B image of it (seeds).",
    "More than two sides: the pairwise matrix and a Bradley-Terry ranking.",
    "Exit status: 0 every image compared; 1 some images unpaired, missing or failed (listed; the rest are "
    "compared); 2 bad usage or an unreadable side or prompts file; 3 weights or config problem; "
    "4 fetch problem; 130 interrupted (scores so far stay cached).",
])


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def _diff(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_two(report, details: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report.matchups[0]
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    table = Table(title=f"A: {m.a}  vs  B: {m.b}", title_justify="left")
    for col in ("dimension", "A wins %", "95% CI", "mean A − B", "A / tie / B"):
        table.add_column(col, justify="left" if col == "dimension" else "right")
    for k, r in m.results.items():
        table.add_row(k, _pct(r.win_rate), f"{_pct(r.ci95[0])}–{_pct(r.ci95[1])}", _diff(r.mean_diff),
                      f"{r.wins} / {r.ties} / {r.losses}")
    console.print(table)
    console.print(f"{_count(m.prompts, 'prompt')}, {_count(m.pairs, 'pair')}; interval from {report.samples} "
                  f"resamples of {m.unit}s, seed {report.seed}; {report.scored} images scored, "
                  f"{report.cached} from cache.", soft_wrap=True)
    if details:
        _print_prompts(console, m)
    if any(k != "overall" for k in report.keys):
        console.print(f"Note: {DIMENSION_NOTE}", soft_wrap=True)


def _print_prompts(console, m) -> None:
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
        table.add_row(p.prompt, str(p.pairs), _pct(p.win_rate[first]), *[_diff(p.mean_diff[k]) for k in m.results])
    console.print(table)


def _print_many(report, details: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
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
                    cells.append(f"{_pct(r.win_rate)} ({_pct(r.ci95[0])}–{_pct(r.ci95[1])})")
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
            _print_prompts(console, m)


def _warn(report) -> None:
    lines = [f"{f.error}" for f in report.failed]
    for side, names in report.missing.items():
        lines += [f"{side}: no image {n!r}, which the prompts file lists" for n in names]
    for labels in report.unpaired.values():
        lines += [f"{label}: unpaired (no image to compare it with)" for label in labels]
    for line in lines[:MAX_PROBLEM_LINES]:
        say(f"mps: warning: {line}")
    if len(lines) > MAX_PROBLEM_LINES:
        say(f"mps: warning: … and {len(lines) - MAX_PROBLEM_LINES} more (see --json)")


def versus_command(
    sides: Annotated[list[str], typer.Argument(
        help="Two or more sides: image folders, mps dataset folders, or JSON/JSONL from mps score.",
        show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", rich_help_panel="Prompts", help="The prompt, for every image.")] = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", rich_help_panel="Prompts",
        help="JSONL or CSV with image and prompt; images named by their path relative to each side, with or "
        "without extension. Several images of a side under one prompt (seeds) are all compared.")] = None,
    prompt_from: Annotated[PromptSource | None, typer.Option(
        "--prompt-from", rich_help_panel="Prompts",
        help="sidecar: the caption file beside each image; metadata: the prompt generators embed.")] = None,
    details: Annotated[bool, typer.Option(
        "--details", rich_help_panel="Output", help="Per-prompt results, best prompts for A first.")] = False,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel="Output",
                                      help="Seed of the bootstrap, so reruns print the same interval.")] = 0,
    samples: Annotated[int, typer.Option("--bootstrap", min=1, rich_help_panel="Output",
                                         help="Bootstrap resamples.")] = 1000,
    as_json: AsJson = False,
    html: Html = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Score cache (SQLite), shared with mps eval. Default: scores.sqlite in $MPS_CACHE_DIR, "
        "else in $XDG_CACHE_HOME/mps-cli (~/.cache when unset).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Keep scores in memory only.")] = False,
    dims: Dims = None,
    condition: Condition = None,
    mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    weights: Weights = None,
    config: Config = None,
    revision: Revision = None,
    offline: Offline = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: BatchSize = None,
    models: Models = None,
) -> None:
    from ..engine.panel import keyed_conditions
    from ..evaluate import CacheError, ScoreCache, default_cache_path
    from ..versus import SideError, compare_sides, line_up, read_side

    with handle_errors():
        if len(sides) < 2:
            raise fail("versus needs two sides or more (folders, dataset folders or JSONL files)", Exit.USAGE)
        if len(set(sides)) != len(sides):
            raise fail("the same side is given twice", Exit.USAGE)
        if cache is not None and no_cache:
            raise fail("--cache and --no-cache contradict each other; pass one", Exit.USAGE)
        sources = [n for n, on in (("--prompt", prompt is not None), ("--prompts", prompts is not None),
                                   ("--prompt-from", prompt_from is not None)) if on]
        if len(sources) > 1:
            raise fail(f"choose one prompt source, not {' and '.join(sources)}", Exit.USAGE)
        model = ModelOptions(weights, config, revision, offline, device, dtype, batch_size, model=models)
        try:
            keyed_conditions(model.model, dims, condition)
            read = [read_side(s) for s in sides]
        except (ValueError, SideError) as exc:
            raise fail(str(exc), Exit.USAGE) from None
        if not sources and any(not s.prescored for s in read):
            raise fail("no prompt for the image folders: give --prompt TEXT, --prompts FILE or "
                       "--prompt-from sidecar|metadata", Exit.USAGE)
        try:
            lineup = line_up(read, prompt=prompt, prompts_file=prompts,
                             prompt_from=prompt_from.value if prompt_from else None)
        except (ValueError, PromptError) as exc:
            raise fail(str(exc), Exit.USAGE) from None
        scorer = None
        store = None
        if lineup.needs_scoring:
            try:
                store = ScoreCache(None if no_cache else (cache or default_cache_path()))
            except CacheError as exc:
                raise fail(describe(exc), Exit.USAGE) from None
            scorer = load_model(model)
        try:
            with Progress(force=True) as progress:
                report = compare_sides(lineup, scorer, dims, condition=condition, mask_threshold=mask_threshold,
                                       cache=store, batch_size=batch_size, samples=samples, seed=seed,
                                       progress=progress.stage_callback, models=model.model)
        except SideError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        finally:
            if store is not None:
                store.close()

    _warn(report)
    if not any(m.pairs for m in report.matchups):
        say("mps: error: no pairs to compare: no image of one side has a counterpart on another under the same "
            "prompt")
    try:
        if as_json:
            emit_json(report.to_dict(details=details))
        elif len(report.sides) == 2:
            _print_two(report, details)
        else:
            _print_many(report, details)
    except BrokenPipeError:
        quiet_broken_pipe()
        raise typer.Exit(int(Exit.OK)) from None
    write_html(html, [report.to_dict(details=True)])
    if not report.ok or not any(m.pairs for m in report.matchups):
        raise typer.Exit(int(Exit.PARTIAL))
