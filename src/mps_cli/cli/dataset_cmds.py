"""``mps dataset``: score tar/parquet shards into one parquet file per shard (the work is in :mod:`mps_cli.dataset`)."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD, DISTRIBUTION
from ..errors import MissingExtraError, OutputError
from .app import (
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
    fail,
    handle_errors,
    load_model,
    say,
)


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
    "Exit status: 0 every shard written (rows that failed carry their error); 1 some shards could not "
    "be read (named on stderr) and were skipped; 2 bad usage, an unwritable --out, or --out holds "
    "results of other settings; 3 weights or config problem; 4 fetch problem; 130 interrupted "
    "(shards already written stay).",
])


class _ProgressLines:
    """Progress on stderr: every shard written, and a line at most every few seconds in between."""

    def __init__(self) -> None:
        self.every = 2.0 if sys.stderr.isatty() else 30.0
        self.last = time.monotonic()
        self.shards = -1

    def __call__(self, p) -> None:
        if p.failure is not None:
            say(f"mps: error: {p.failure.message}; shard skipped")
        now = time.monotonic()
        if p.shards_done == self.shards and now - self.last < self.every:
            return
        self.shards, self.last = p.shards_done, now
        eta = "" if p.eta is None else f", ETA {_duration(p.eta)}"
        say(f"mps: dataset: {p.shards_done}/{p.shards_total} shards, {p.images} images, "
            f"{p.rate:.1f} images/s{eta}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


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
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", rich_help_panel="Engine",
        help="Ray cluster to join (default: start Ray on this machine).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, rich_help_panel="Engine", help="Ray: scoring actors, each loading the model once.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(
        "--gpus-per-worker", min=0, rich_help_panel="Engine", help="Ray: GPUs per scoring actor.")] = 0,
    cpus_per_worker: Annotated[float, typer.Option(
        "--cpus-per-worker", min=0.01, rich_help_panel="Engine",
        help="Ray: CPUs per scoring actor (its torch threads on CPU).")] = 1,
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
    from ..dataset import DatasetJob, ModelSpec, open_output, plan_dataset, resolve_model, score_dataset

    model = ModelOptions(weights, config, revision, offline, device, dtype, batch_size, model=models)
    if model.model and engine is Engine.ray:
        raise fail("--model runs on the local engine only for now: drop --engine ray or --model", Exit.USAGE)
    with handle_errors():
        job = DatasetJob(sources=tuple(sources), out=out, dims=tuple(dims) if dims else None, condition=condition,
                         mask_threshold=mask_threshold, prompt=prompt, caption_column=caption_column,
                         image_column=image_column, shard_index=shard_index, num_shards=num_shards,
                         batch_size=batch_size, models=model.model)
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
            say(f"mps: error: {problem.source}: {problem.message}; skipped")
        kind = None if engine is Engine.local else ("cuda" if gpus_per_worker else "cpu")
        if model.model:
            # A panel opens every model's weights and fills each at its first batch: its identity is all of them.
            scorer = load_model(model)
            spec = ModelSpec.from_scorer(scorer)
        else:
            spec = resolve_model(weights, config, device, dtype, revision, offline or None, batch_size,
                                 device_kind=kind)
        try:
            output = open_output(plan, spec)
        except OutputError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        progress = _ProgressLines()
        if engine is Engine.ray:
            from ..ray_engine import score_dataset_ray

            summary = score_dataset_ray(plan, spec, output, workers=workers, gpus_per_worker=gpus_per_worker,
                                        cpus_per_worker=cpus_per_worker, address=ray_address, progress=progress)
        else:
            scorer = load_model(model)
            summary = score_dataset(plan, scorer, progress=progress, output=output)

    done = f"{summary.already_done} already done, " if summary.already_done else ""
    rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    print(f"{summary.shards} shards ({done}{summary.written} written, {len(summary.failed)} failed), "
          f"{summary.images} images scored, {summary.errors} errors, {summary.seconds:.1f} s "
          f"({rate:.1f} images/s) -> {summary.out}", flush=True)
    if summary.failed:
        raise typer.Exit(int(Exit.PARTIAL))
