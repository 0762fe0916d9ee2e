"""``mps versus``: generator against generator, win rates per dimension with bootstrap intervals."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD
from ..engine.options import ModelOptions
from ..errors import PromptError
from ..inputs.items import PromptSource
from . import output
from .app import DIMENSION_NOTE, Exit, describe, exit_help, fail, handle_errors, load_model
from .options import (
    MODEL,
    RUN,
    SCORE_CACHE,
    AsJson,
    CacheChoice,
    Condition,
    Dims,
    MaskThreshold,
    Reward,
    RunOptions,
    takes,
)
from .output import Progress, emit_json
from .render import render_series, render_versus
from .report_cmds import Html, write_html
from .scoring_cmds import scoring, warn_empty_prompt

MAX_PROBLEM_LINES = 20

VERSUS_HELP = "\n\n".join([
    "Which generator do people prefer? Per dimension: how often side A's image beats side B's for the same "
    "prompt (ties count half), the mean score difference, and a 95% bootstrap interval over prompts.",
    "A side is a folder of images, an `mps dataset` output folder, or a JSON/JSONL from `mps score` (these "
    "are not scored again). Images pair by their path relative to the side without extension "
    "(a/cat_01.png ~ b/cat_01.jpg), under the same prompt, whatever the prompt source; with --pairing "
    "all-pairs-per-prompt every A image of a prompt meets every B image of it (seeds). --prompts names images "
    "by that relative path (with or without extension).",
    "More than two sides: the pairwise matrix and a Bradley-Terry ranking. --series: the sides are checkpoints in "
    "training order, watched for reward hacking: per dimension the score trend, image statistics on the same "
    "images (colourfulness, saturation, high-frequency energy, brightness, near-duplicates) and flags where the "
    "reward rises while alignment or detail falls or the images leave the first checkpoint's range.",
    exit_help({Exit.OK: "every image compared",
               Exit.PARTIAL: "some images unpaired, missing or failed (listed; the rest are compared)",
               Exit.USAGE: "bad usage or an unreadable side or prompts file",
               Exit.INTERRUPTED: "interrupted (scores so far stay cached)"}, server=False),
])


class Pairing(str, Enum):
    """How images of two sides pair (the values of :data:`mps_cli.versus.PAIRINGS`)."""

    by_name = "by-name"
    all_pairs = "all-pairs-per-prompt"


def _problems(report) -> None:
    """The images that failed or are missing (errors), then those left unpaired (warnings: they are fine, only
    nothing pairs with them); at most MAX_PROBLEM_LINES lines in all."""
    lines = [(output.error, f.error) for f in report.failed]
    for side, names in report.missing.items():
        lines += [(output.error, f"{side}: no image {n!r}, which the prompts file lists") for n in names]
    for labels in report.unpaired.values():
        lines += [(output.warning, f"{label}: unpaired (no image to compare it with)") for label in labels]
    for say, line in lines[:MAX_PROBLEM_LINES]:
        say(line)
    if len(lines) > MAX_PROBLEM_LINES:
        rest = lines[MAX_PROBLEM_LINES:]
        say = output.error if any(s is output.error for s, _ in rest) else output.warning
        say(f"… and {len(rest)} more (see --json)")


@takes(MODEL, RUN, SCORE_CACHE)
def versus_command(
    sides: Annotated[list[str], typer.Argument(
        metavar="SIDE", help="Two or more sides: image folders, mps dataset folders, or JSON/JSONL from mps score.",
        show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel="Prompts", help="The prompt, for every image.")] = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", metavar="FILE", rich_help_panel="Prompts",
        help="JSONL or CSV with image and prompt; images named by their path relative to each side, with or "
        "without extension. Several images of a side under one prompt (seeds) are all compared.")] = None,
    prompt_from: Annotated[PromptSource | None, typer.Option(
        "--prompt-from", rich_help_panel="Prompts",
        help="sidecar: the caption file beside each image; metadata: the prompt generators embed.")] = None,
    pairing: Annotated[Pairing, typer.Option(
        "--pairing", rich_help_panel="Prompts",
        help="by-name: A's cat_01.png meets B's cat_01.jpg under the same prompt; all-pairs-per-prompt: every A "
        "image of a prompt meets every B image of it (seeds, or names that differ).")] = Pairing.by_name,
    details: Annotated[bool, typer.Option(
        "--details", rich_help_panel="Output", help="Per-prompt results, best prompts for A first.")] = False,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel="Output",
                                      help="Seed of the bootstrap, so reruns print the same interval.")] = 0,
    samples: Annotated[int, typer.Option("--bootstrap", min=1, rich_help_panel="Output",
                                         help="Bootstrap resamples.")] = 1000,
    series: Annotated[bool, typer.Option(
        "--series", rich_help_panel="Output",
        help="The sides are checkpoints in training order: watch them for reward hacking (default --dim all).")]
    = False,
    as_json: AsJson = False,
    html: Html = None,
    dims: Dims = None,
    condition: Condition = None,
    mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    reward: Reward = None,
    *, model: ModelOptions, run: RunOptions, scores: CacheChoice,
) -> None:
    if series and dims is None and condition is None:
        dims = ["all"]  # the monitor watches alignment and detail beside overall
    how = scoring(dims, condition, mask_threshold, model.model, reward)
    model, dims = how.model_for(model), how.dims
    with handle_errors():
        lineup = _line_up(sides, prompt, prompts, prompt_from, pairing, dims, condition, model.model)
        report = _compare(lineup, dims, condition, mask_threshold, reward, series, samples, seed,
                          model=model, run=run, scores=scores)
    _emit(report, details, as_json, html)


def _compare(lineup, dims, condition, mask_threshold, reward, series, samples, seed, *, model, run, scores):
    """The lineup scored (through the score cache) and compared; a side that cannot be compared is a usage error."""
    from ..versus import NoNamesMatch, SideError, compare_sides

    store = scores.open() if lineup.needs_scoring or series else None
    scorer = load_model(model) if lineup.needs_scoring else None
    try:
        with Progress(force=True) as progress:
            return compare_sides(lineup, scorer, dims, condition=condition, mask_threshold=mask_threshold,
                                 cache=store, batch_size=run.batch_for(scorer), samples=samples, seed=seed,
                                 progress=progress.stage_callback, models=model.model, reward=reward,
                                 series=series)
    except NoNamesMatch as exc:
        raise fail(f"{exc.what}: nothing pairs by name; try --pairing all-pairs-per-prompt", Exit.USAGE) from None
    except SideError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    finally:
        if store is not None:
            store.close()


def _emit(report, details: bool, as_json: bool, html) -> None:
    """Problems and flags on stderr, the results on stdout (JSON or tables), the HTML page; exit 1 when partial."""
    _problems(report)
    if not any(m.pairs for m in report.matchups):
        output.error("no pairs to compare: no image of one side has a counterpart on another under the same prompt")
    if report.series is not None:
        for f in report.series.flags:
            output.warning(f"reward hacking? {f.message}")
    if as_json:
        emit_json(report.to_dict(details=details))
    else:
        render_versus(report, details, DIMENSION_NOTE)
        if report.series is not None:
            render_series(report.series)
    write_html(html, [report.to_dict(details=True)])
    if not report.ok or not any(m.pairs for m in report.matchups):
        raise typer.Exit(int(Exit.PARTIAL))


def _line_up(sides: list[str], prompt, prompts, prompt_from, pairing: Pairing, dims, condition, models):
    """The sides read and every image given its prompt; anything wrong with them is a usage error."""
    from ..engine.panel import keyed_conditions
    from ..versus import SideError, line_up, read_side

    if len(sides) < 2:
        raise fail("versus needs two sides or more (folders, dataset folders or JSONL files)", Exit.USAGE)
    twice = next((s for i, s in enumerate(sides) if s in sides[:i]), None)
    if twice is not None:
        raise fail(f"{twice}: the same side is given twice", Exit.USAGE)
    sources = [n for n, on in (("--prompt", prompt is not None), ("--prompts", prompts is not None),
                               ("--prompt-from", prompt_from is not None)) if on]
    if len(sources) > 1:
        raise fail(f"choose one prompt source, not {' and '.join(sources)}", Exit.USAGE)
    warn_empty_prompt(prompt)
    try:
        keyed_conditions(models, dims, condition)
        read = [read_side(s) for s in sides]
    except (ValueError, SideError) as exc:
        raise fail(describe(exc), Exit.USAGE) from None
    if not sources and any(not s.prescored for s in read):
        raise fail("no prompt for the image folders: give --prompt TEXT, --prompts FILE or "
                   "--prompt-from sidecar|metadata", Exit.USAGE)
    try:
        return line_up(read, prompt=prompt, prompts_file=prompts,
                       prompt_from=prompt_from.value if prompt_from else None, pairing=pairing.value)
    except (ValueError, PromptError) as exc:
        raise fail(str(exc), Exit.USAGE) from None
