"""``mps eval``: the paper's accuracies on preference benchmarks, resumable through a score cache."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD
from ..engine.options import ModelOptions
from . import output
from .app import DIMENSION_NOTE, Exit, describe, exit_help, fail, handle_errors, load_model
from .options import MODEL, RUN, SCORE_CACHE, AsJson, CacheChoice, Condition, Dims, MaskThreshold, RunOptions, takes
from .output import Progress
from .render import render_eval_report

MAX_PROBLEM_LINES = 20


class BenchmarkKind(str, Enum):
    imagereward = "imagereward"
    hpdv2 = "hpdv2"
    pairs = "pairs"


# Typer's Rich help keeps newlines as they are, so each paragraph is one line; "\\[" is a
# literal bracket (Rich would read "[paths]" as markup).
EVAL_HELP = "\n\n".join([
    "Measure the scorer's accuracy on a human preference benchmark, per dimension.",
    'imagereward: the ImageReward test JSON, a list of {"id", "prompt", "generations": \\[paths], '
    '"ranking": \\[ranks]}. Accuracy over every pair of a prompt whose human ranks differ, pooled; '
    "a model tie counts as wrong (paper: 67.5).",
    'hpdv2: the HPD v2 test JSON, a list of {"prompt", "image_path": \\[paths], "rank": \\[ranks]}. '
    "Per prompt 1 - wrong / (n(n-1)/2), where a model tie is not wrong; averaged over prompts "
    "(paper: 83.5).",
    'pairs: JSON lines {"prompt", "a", "b", "winner": "a" | "b" | "tie"}. Accuracy over the non-tie '
    "pairs; a model tie counts as wrong.",
    "Ranks: 1 = best. Image paths resolve against --images-root. Scores are cached by image content, "
    "prompt, condition, threshold, weights and dtype, so an interrupted run resumes where it stopped "
    "and a repeated run costs no model time.",
    f"{DIMENSION_NOTE} The paper's figures are for the overall dimension.",
    exit_help({Exit.OK: "every item evaluated",
               Exit.PARTIAL: "some items skipped (a missing or unreadable image, or an item listing one image "
                             "twice, named on stderr and counted in the report)",
               Exit.USAGE: "bad usage or a malformed benchmark file",
               Exit.INTERRUPTED: "interrupted (scores so far stay cached)"}, server=False),
])


@takes(MODEL, RUN, SCORE_CACHE)
def eval_command(
    benchmark: Annotated[BenchmarkKind, typer.Argument(
        metavar="BENCHMARK", help="Benchmark format: imagereward, hpdv2 or pairs.", case_sensitive=False,
        show_default=False)],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The benchmark file (JSON, or JSON lines for pairs).",
                                         show_default=False)],
    images_root: Annotated[Path | None, typer.Option(
        "--images-root", metavar="DIR", help="Folder the benchmark's image paths are relative to "
        "(default: the benchmark file's folder).")] = None,
    dims: Dims = None,
    condition: Condition = None,
    mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    as_json: AsJson = False,
    *, model: ModelOptions, run: RunOptions, scores: CacheChoice,
) -> None:
    """The accuracy of the scorer on a human preference benchmark (see EVAL_HELP)."""
    from ..engine.panel import keyed_conditions
    from ..evaluate import BenchmarkError, BenchmarkFormatError, evaluate, load_benchmark

    with handle_errors("reading the benchmark"):
        try:
            keyed_conditions(model.model, dims, condition)
        except ValueError as exc:
            raise fail(describe(exc), Exit.USAGE) from None
        if images_root is not None and not images_root.is_dir():
            raise fail(f"--images-root {images_root}: not a folder", Exit.USAGE)
        try:
            bench = load_benchmark(benchmark.value, file, images_root)
        except BenchmarkFormatError as exc:
            raise fail(f"{exc}: give it as mps eval {exc.found} {file}", Exit.USAGE) from None
        except BenchmarkError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        store = scores.open()
    with store:
        scorer = load_model(model)
        with handle_errors("evaluating"), Progress(force=True) as progress:
            report = evaluate(bench, scorer, dims, condition=condition, mask_threshold=mask_threshold,
                              cache=store, batch_size=run.batch_for(scorer), progress=progress.stage_callback,
                              models=model.model)

    # A skipped item is a failed input (exit 1), said as score says one (output.py has the rule).
    for problem in report.problems[:MAX_PROBLEM_LINES]:
        output.error(f"{problem.message} ({problem.item}: item skipped)")
    if len(report.problems) > MAX_PROBLEM_LINES:
        output.error(f"… and {len(report.problems) - MAX_PROBLEM_LINES} more items skipped (see --json)")
    render_eval_report(report, as_json, DIMENSION_NOTE)
    if report.skipped:
        raise typer.Exit(int(Exit.PARTIAL))
