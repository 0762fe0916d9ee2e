"""``mps dataset``: score tar/parquet shards into one parquet file per shard (the work is in :mod:`mps_cli.dataset`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MASK_THRESHOLD, DISTRIBUTION, IMAGE_MEMBER_EXTENSIONS
from ..engine.options import ModelOptions
from ..errors import MissingExtraError, OutputError, ShardSelectionError
from . import output
from .app import Exit, describe, exit_help, fail, handle_errors, load_model, note_demo
from .options import MODEL, RUN, Condition, Dims, MaskThreshold, OptionGroup, RunOptions, takes
from .render import counted


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
    exit_help({Exit.OK: "every row of every selected shard scored",
               Exit.PARTIAL: "some rows failed (they carry their error; the count is on stderr), some shards could "
                             "not be read (named on stderr, skipped), or no source named a shard",
               Exit.USAGE: "bad usage, an unwritable --out, or --out holds results of other settings or a damaged "
                           "output file",
               Exit.INTERRUPTED: "interrupted (shards already written stay)"}, server=False),
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
        output.say(f"dataset: {p.shards_done}/{counted(p.shards_total, 'shard')}, {counted(p.images, 'image')}, "
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
        "--ray-address", metavar="ADDRESS", rich_help_panel="Engine",
        help="Ray cluster to join (default: start Ray on this machine).")],
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
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output folder (created if missing).",
                                      show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", metavar="TEXT", rich_help_panel="Prompts",
        help="One prompt for every image, instead of the captions.")] = None,
    caption_column: Annotated[str | None, typer.Option(
        "--caption-column", metavar="COLUMN", rich_help_panel="Prompts",
        help="Parquet column with the caption (in tars, the .json field tried first). Default: caption, then "
        "text, prompt.")] = None,
    caption_ext: Annotated[str | None, typer.Option(
        "--caption-ext", metavar="EXT", rich_help_panel="Prompts",
        help="Webdataset member with the caption: a text member such as txt, or json for its caption/text/prompt "
        "field. Default: txt, then json.")] = None,
    image_column: Annotated[str | None, typer.Option(
        "--image-column", metavar="COLUMN", rich_help_panel="Inputs",
        help="Parquet column with the image. Default: image, then jpg, png, webp.")] = None,
    image_ext: Annotated[str | None, typer.Option(
        "--image-ext", metavar="EXT", rich_help_panel="Inputs",
        help="Webdataset member extension of the image (jpg, png, seg.png, ...). Default: the first of "
        f"{', '.join(IMAGE_MEMBER_EXTENSIONS)} a sample has.")] = None,
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

    if engine is Engine.ray and (model.decode not in ("auto", "exact") or model.compile != "off"):
        raise fail("--decode and --compile apply to the local engine; Ray's workers decode the exact way "
                   "(drop them, or use --engine local)", Exit.USAGE)
    with handle_errors():
        job = DatasetJob(sources=tuple(sources), out=out, dims=tuple(dims) if dims else None, condition=condition,
                         mask_threshold=mask_threshold, prompt=prompt, caption_column=caption_column,
                         image_column=image_column, shard_index=shard_index, num_shards=num_shards,
                         batch_size=run.batch_size, image_ext=image_ext, caption_ext=caption_ext,
                         models=model.model)
        plan = _plan(job, engine)
        summary = _score(plan, model, ray if engine is Engine.ray else None)
    _report(summary, job)


def _plan(job, engine: Engine):
    """The job's plan, checked before any model loads; the sources that named nothing readable are said, and
    a job whose sources name no shard at all ends here, writing nothing."""
    from ..dataset import plan_dataset

    try:
        plan = plan_dataset(job)
        if engine is Engine.ray:
            from ..ray_engine import require_ray

            require_ray()
    except (OutputError, MissingExtraError) as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ShardSelectionError as exc:
        raise fail(_shard_selection(exc), Exit.USAGE) from None
    except ValueError as exc:  # a DimensionError's hint names its own flag
        raise fail(describe(exc), Exit.USAGE) from None
    for problem in plan.problems:
        output.error(f"{problem.source}: {problem.message}" + ("; skipped" if plan.found else ""))
    if not plan.found:
        raise fail(f"nothing to score: no source names a .tar or .parquet shard; {job.out} not written",
                   Exit.PARTIAL)
    return plan


def _shard_selection(exc: ShardSelectionError) -> str:
    """What is wrong with --shard-index/--num-shards, naming only those two and the valid range."""
    if exc.index is None:
        return f"--num-shards {exc.count} needs --shard-index (0..{max(exc.count, 1) - 1}): which share this run takes"
    if exc.count is None:
        return f"--shard-index {exc.index} needs --num-shards: how many runs share the shards"
    if exc.count < 1:
        return f"--num-shards {exc.count}: must be at least 1"
    return f"--shard-index {exc.index} is not in 0..{exc.count - 1} (the range for --num-shards {exc.count})"


def _score(plan, model: ModelOptions, ray: RayOptions | None):
    """Score the plan here (the model loaded once) or on Ray (``ray``: the workers load it)."""
    from ..dataset import ModelSpec, open_output, resolve_model, score_dataset

    if ray is not None:
        # Here the weights are only found and fingerprinted.
        scorer, spec = None, resolve_model(model, device_kind="cuda" if ray.gpus_per_worker else "cpu")
        note_demo(spec)
    else:
        scorer = load_model(model)  # the weights are opened once, by the load
        spec = ModelSpec.from_scorer(scorer)
    try:
        folder = open_output(plan, spec)
        if ray is None:
            return score_dataset(plan, scorer, progress=_ProgressLines(), output=folder)
        from ..ray_engine import score_dataset_ray

        return score_dataset_ray(plan, spec, folder, workers=ray.workers, gpus_per_worker=ray.gpus_per_worker,
                                 cpus_per_worker=ray.cpus_per_worker, address=ray.address, progress=_ProgressLines())
    except OutputError as exc:  # --out holds other settings, or a file in it is damaged
        raise fail(str(exc), Exit.USAGE) from None


def _report(summary, job) -> None:
    """The result line on stdout; on stderr the count (when something failed, or on a terminal) and,
    when no row was scored, the likely cause; exit 1 when any row or shard failed."""
    parts = [f"{summary.already_done} already done"] if summary.already_done else []
    parts.append(f"{summary.written} written")
    if summary.elsewhere:
        parts.append(f"{summary.elsewhere} by another run")
    parts.append(f"{len(summary.failed)} failed")
    rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    output.emit_lines([f"{counted(summary.shards, 'shard')} ({', '.join(parts)}), "
                       f"{counted(summary.images, 'image')} scored, {counted(summary.errors, 'error')}, "
                       f"{summary.seconds:.1f} s ({rate:.1f} images/s) -> {summary.out}"])
    if summary.total_failed and not summary.total_scored:
        output.error(_why_nothing_scored(summary, job))
    elif summary.failed and not (summary.written or summary.already_done or summary.elsewhere):
        output.error("no shard could be read (each is named above)")
    if not summary.ok or sys.stderr.isatty():
        count = f"{summary.total_scored} scored, {summary.total_failed} failed"
        if summary.total_failed:
            count += f" in {counted(summary.shards_with_errors, 'shard')}"
        if summary.failed:
            count += f"; {counted(len(summary.failed), 'shard')} not read"
        output.say(count)
    if not summary.ok:
        raise typer.Exit(int(Exit.PARTIAL))


def _why_nothing_scored(summary, job) -> str:
    """One line naming the likely cause when every row failed, from the causes the rows give."""
    from ..dataset import BAD_IMAGE, NO_CAPTION, NO_IMAGE

    causes = summary.causes
    cause = max(causes, key=causes.get) if causes else None
    n, total = causes.get(cause, 0), summary.total_failed
    head = f"no row was scored ({total} failed)"
    if cause == NO_IMAGE:
        if job.image_ext or job.image_column:
            named = " and ".join(x for x in (job.image_ext and f"--image-ext {job.image_ext}",
                                             job.image_column and f"--image-column {job.image_column}") if x)
            return f"{head}: {n} samples have no image where {named} says; check it against the shards"
        exts = ", ".join(IMAGE_MEMBER_EXTENSIONS)
        return (f"{head}: {n} samples have no image member with the default extensions ({exts}); name yours "
                "with --image-ext (for parquet shards, --image-column)")
    if cause == NO_CAPTION:
        return (f"{head}: {n} samples have no caption; name it with --caption-ext (tar member) or "
                "--caption-column (parquet column or .json field), or give one --prompt")
    if cause == BAD_IMAGE:
        return (f"{head}: {n} images do not decode; the error column of the output files says why for each "
                "(are the shards' images really images?)")
    return f"{head}; the error column of the output files says why for each row"
