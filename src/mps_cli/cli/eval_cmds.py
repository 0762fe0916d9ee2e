"""``mps eval``: the paper's accuracies on preference benchmarks, resumable through a score cache."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD
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
from .output import Progress, quiet_broken_pipe, render_eval_report

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
    "Exit status: 0 every item evaluated; 1 some items skipped (a missing or unreadable image, named "
    "on stderr and counted in the report); 2 bad usage or a malformed benchmark file; 3 weights or "
    "config problem; 4 fetch problem; 130 interrupted (scores so far stay cached).",
])


def eval_command(
    benchmark: Annotated[BenchmarkKind, typer.Argument(help="Benchmark format: imagereward, hpdv2 or pairs.",
                                                        case_sensitive=False, show_default=False)],
    file: Annotated[Path, typer.Argument(help="The benchmark file (JSON, or JSON lines for pairs).",
                                         show_default=False)],
    images_root: Annotated[Path | None, typer.Option(
        "--images-root", "-r", help="Folder the benchmark's image paths are relative to "
        "(default: the benchmark file's folder).")] = None,
    dims: Dims = None,
    condition: Condition = None,
    mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    as_json: AsJson = False,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Score cache (SQLite). Default: scores.sqlite in $MPS_CACHE_DIR, else in "
        "$XDG_CACHE_HOME/mps-cli (~/.cache when unset).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Keep scores in memory only.")] = False,
    weights: Weights = None,
    config: Config = None,
    revision: Revision = None,
    offline: Offline = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: BatchSize = None,
    models: Models = None,
) -> None:
    """The accuracy of the scorer on a human preference benchmark (see EVAL_HELP)."""
    from ..engine.panel import keyed_conditions
    from ..evaluate import BenchmarkError, CacheError, ScoreCache, default_cache_path, evaluate, load_benchmark

    model = ModelOptions(weights, config, revision, offline, device, dtype, batch_size, model=models)
    with handle_errors("reading the benchmark"):
        try:
            keyed_conditions(model.model, dims, condition)
        except ValueError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        if images_root is not None and not images_root.is_dir():
            raise fail(f"--images-root {images_root}: not a folder", Exit.USAGE)
        if cache is not None and no_cache:
            raise fail("--cache and --no-cache contradict each other; pass one", Exit.USAGE)
        try:
            bench = load_benchmark(benchmark.value, file, images_root)
        except BenchmarkError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        try:
            store = ScoreCache(None if no_cache else (cache or default_cache_path()))
        except CacheError as exc:
            raise fail(describe(exc), Exit.USAGE) from None
    with store:
        scorer = load_model(model)
        with handle_errors("evaluating"), Progress(force=True) as progress:
            report = evaluate(bench, scorer, dims, condition=condition, mask_threshold=mask_threshold,
                              cache=store, batch_size=batch_size, progress=progress.stage_callback,
                              models=model.model)

    for problem in report.problems[:MAX_PROBLEM_LINES]:
        say(f"mps: warning: {problem.item}: {problem.message}; item skipped")
    if len(report.problems) > MAX_PROBLEM_LINES:
        say(f"mps: warning: … and {len(report.problems) - MAX_PROBLEM_LINES} more items skipped (see --json)")
    try:
        render_eval_report(report, as_json, DIMENSION_NOTE)
    except BrokenPipeError:
        quiet_broken_pipe()
        raise typer.Exit(int(Exit.OK)) from None
    if report.skipped:
        raise typer.Exit(int(Exit.PARTIAL))
