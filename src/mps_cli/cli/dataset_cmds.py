"""``mps dataset``: score tar/parquet shards into one parquet file per shard (the work is in :mod:`mps_cli.dataset`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD, DISTRIBUTION
from ..engine.options import ModelOptions
from ..errors import MissingExtraError, OutputError
from . import output
from .app import Exit, exit_help, fail, handle_errors, load_model
from .options import MODEL, RUN, Condition, Dims, MaskThreshold, OptionGroup, RunOptions, takes


class Engine(str, Enum):
    local = "local"
    ray = "ray"


DATASET_HELP = "\n\n".join([
    "Score image datasets in shards: webdataset tar files (KEY.jpg + KEY.txt + KEY.json, as img2dataset "
    "writes them) and parquet files with image bytes (a bytes column or Hugging Face's {bytes, path} "
    "struct). SOURCE is a shard, a folder of shards, a brace range (shards/{00000..00127}.tar) or a "
    "remote URL (s3://, gs://, hf://datasets/...; needs s3fs, gcsfs or huggingface_hub).",
    "Writes one parquet file per shard into --out (columns key, shard, prompt, one per dimension, error) "
    "and _manifest.json. A rerun into the same --out skips the shards already written and refuses "
    "different settings. Split a job with --shard-index/--num-shards, or run it on Ray with --engine ray.",
    exit_help({Exit.OK: "every shard written (rows that failed carry their error)",
               Exit.PARTIAL: "some shards could not be read (named on stderr) and were skipped",
               Exit.USAGE: "bad usage, an unwritable --out, or --out holds results of other settings",
               Exit.INTERRUPTED: "interrupted (shards already written stay)"}),
])


class _ProgressLines:
    """Progress on stderr: every shard written, and a line at most every few seconds in between."""

    def __init__(self) -> None:
        self.every = 2.0 if sys.stderr.isatty() else 30.0
        self.last = time.monotonic()
        self.shards = -1

    def __call__(self, p) -> None:
        if p.failure is not None:
            output.error(f"{p.failure.message}; shard skipped")
        now = time.monotonic()
        if p.shards_done == self.shards and now - self.last < self.every:
            return
        self.shards, self.last = p.shards_done, now
        eta = "" if p.eta is None else f", ETA {_duration(p.eta)}"
        output.say(f"dataset: {p.shards_done}/{p.shards_total} shards, {p.images} images, "
                   f"{p.rate:.1f} images/s{eta}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide ``--engine ray`` runs."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1


RAY = OptionGroup("ray", {
    "ray_address": (Annotated[str | None, typer.Option(
        "--ray-address", rich_help_panel="Engine", help="Ray cluster to join (default: start Ray on this machine).")],
        None),
    "workers": (Annotated[int, typer.Option(
        "--workers", min=1, rich_help_panel="Engine", help="Ray: scoring actors, each loading the model once.")], 1),
    "gpus_per_worker": (Annotated[float, typer.Option(
        "--gpus-per-worker", min=0, rich_help_panel="Engine", help="Ray: GPUs per scoring actor.")], 0),
    "cpus_per_worker": (Annotated[float, typer.Option(
        "--cpus-per-worker", min=0.01, rich_help_panel="Engine",
        help="Ray: CPUs per scoring actor (its torch threads on CPU).")], 1),
}, lambda ray_address, **rest: RayOptions(address=ray_address, **rest))


@takes(MODEL, RUN, RAY)
def dataset_command(
    sources: Annotated[list[str], typer.Argument(
        metavar="SOURCE", help="Tar or parquet shards, folders of them, brace ranges, or URLs.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).",
                                      show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", rich_help_panel="Prompts",
        help="One prompt for every image, instead of the captions.")] = None,
    caption_column: Annotated[str | None, typer.Option(
        "--caption-column", rich_help_panel="Prompts",
        help="Parquet column or webdataset .json field with the caption. Default: caption, then text, prompt "
        "(a webdataset .txt member first).")] = None,
    image_column: Annotated[str | None, typer.Option(
        "--image-column", rich_help_panel="Inputs",
        help="Parquet column (or webdataset extension) with the image. Default: image, then jpg, png, webp.")] = None,
    shard_index: Annotated[int | None, typer.Option(
        "--shard-index", rich_help_panel="Splitting",
        help="Take every --num-shards-th shard from this one (0-based).")] = None,
    num_shards: Annotated[int | None, typer.Option(
        "--num-shards", rich_help_panel="Splitting", help="How many workers share the shards.")] = None,
    engine: Annotated[Engine, typer.Option(
        "--engine", rich_help_panel="Engine", help="local: this process; ray: a Ray Data pipeline "
        f"(pip install \"{DISTRIBUTION}\\[ray]\").")] = Engine.local,
    dims: Dims = None,
    condition: Condition = None,
    mask_threshold: MaskThreshold = DEFAULT_MASK_THRESHOLD,
    *, model: ModelOptions, run: RunOptions, ray: RayOptions,
) -> None:
    from ..dataset import DatasetJob

    if model.model and engine is Engine.ray:
        raise fail("--model runs on the local engine only for now: drop --engine ray or --model", Exit.USAGE)
    if engine is Engine.ray and (model.decode not in ("auto", "exact") or model.compile != "off"):
        raise fail("--decode and --compile apply to the local engine; Ray's workers decode the exact way "
                   "(drop them, or use --engine local)", Exit.USAGE)
    with handle_errors():
        job = DatasetJob(sources=tuple(sources), out=out, dims=tuple(dims) if dims else None, condition=condition,
                         mask_threshold=mask_threshold, prompt=prompt, caption_column=caption_column,
                         image_column=image_column, shard_index=shard_index, num_shards=num_shards,
                         batch_size=run.batch_size, models=model.model)
        plan = _plan(job, engine)
        summary = _score(plan, model, ray if engine is Engine.ray else None)
    done = f"{summary.already_done} already done, " if summary.already_done else ""
    rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    output.emit_lines([f"{summary.shards} shards ({done}{summary.written} written, {len(summary.failed)} failed), "
                       f"{summary.images} images scored, {summary.errors} errors, {summary.seconds:.1f} s "
                       f"({rate:.1f} images/s) -> {summary.out}"])
    if summary.failed:
        raise typer.Exit(int(Exit.PARTIAL))


def _plan(job, engine: Engine):
    """The job's plan, checked before any model loads; the sources that named nothing readable are said."""
    from ..dataset import plan_dataset

    try:
        plan = plan_dataset(job)
        if engine is Engine.ray:
            from ..ray_engine import require_ray

            require_ray()
    except (OutputError, MissingExtraError) as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ValueError as exc:
        raise fail(f"{exc} (--shard-index, --num-shards, --dim, --condition)", Exit.USAGE) from None
    for problem in plan.problems:
        output.error(f"{problem.source}: {problem.message}; skipped")
    return plan


def _score(plan, model: ModelOptions, ray: RayOptions | None):
    """Score the plan here (the model loaded once) or on Ray (``ray``: the workers load it)."""
    from ..dataset import ModelSpec, open_output, resolve_model, score_dataset

    if ray is not None:
        # Here the weights are only found and fingerprinted.
        scorer, spec = None, resolve_model(model, device_kind="cuda" if ray.gpus_per_worker else "cpu")
    else:
        scorer = load_model(model)  # the weights are opened once, by the load
        spec = ModelSpec.from_scorer(scorer)
    try:
        folder = open_output(plan, spec)
    except OutputError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    if ray is None:
        return score_dataset(plan, scorer, progress=_ProgressLines(), output=folder)
    from ..ray_engine import score_dataset_ray

    return score_dataset_ray(plan, spec, folder, workers=ray.workers, gpus_per_worker=ray.gpus_per_worker,
                             cpus_per_worker=ray.cpus_per_worker, address=ray.address, progress=_ProgressLines())
