"""The dataset job as a Ray Data pipeline: read shards and decode on CPU tasks, score on a pool
of actors that each load the model once, write through the same :class:`~mps_cli.dataset.Output`.

Ray is an optional extra (``pip install "mps-cli[ray]"``) and is imported only here, lazily.
The driver (this process) writes the parquet files and the manifest: scores are small, and one
writer keeps the manifest whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .dataset import (
    BAD_IMAGE,
    DatasetPlan,
    DatasetProgress,
    DatasetSummary,
    ModelSpec,
    Output,
    Row,
    ShardFailure,
    Tracker,
    claim_shards,
    open_output,
    wait_for_shard,
)
from .devices import DEFAULT_BATCH
from .errors import EngineError, MissingExtraError, MPSError, OutputError, ShardError
from .inputs.shards import Shard, read_shard

_SCORE_PREFIX = "score:"


def require_ray():
    """The ``ray`` module, or :class:`MissingExtraError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError('the Ray engine needs Ray Data: pip install "mps-cli[ray]"') from None
    return ray


def _read_rows(item: dict, caption_column, image_column, prompt, image_ext=None, caption_ext=None) -> list[dict]:
    """flat_map: one shard into its sample rows; a shard that cannot be read becomes one marker row."""
    shard = Shard(item["source"], item["kind"])
    marker = {"source": shard.source, "kind": shard.kind, "index": -1, "n_rows": 0, "key": "", "label": "",
              "image": b"", "prompt": "", "has_prompt": False, "error": "", "cause": "", "shard_error": ""}
    try:
        samples = read_shard(shard, caption_column, image_column, prompt, image_ext=image_ext,
                             caption_ext=caption_ext)
    except ShardError as exc:
        return [{**marker, "shard_error": str(exc)}]
    if not samples:
        return [marker]
    return [{**marker, "index": i, "n_rows": len(samples), "key": s.key, "label": s.label, "image": s.image or b"",
             "prompt": s.prompt or "", "has_prompt": s.prompt is not None, "error": s.error or "",
             "cause": s.cause or ""}
            for i, s in enumerate(samples)]


def _scorable(batch: dict, i: int) -> bool:
    return batch["index"][i] >= 0 and not batch["error"][i] and not batch["shard_error"][i]


def _decode(batch: dict, image_size: int) -> dict:
    """map_batches on CPU tasks: image bytes into normalised pixels, exactly as for image files."""
    import numpy as np

    from .engine.preprocess import EncodedImage, load_pixels
    from .errors import ImageError

    n = len(batch["index"])
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    errors = np.array(batch["error"], dtype=object)
    for i in range(n):
        if _scorable(batch, i):
            try:
                pixels[i] = load_pixels(EncodedImage(bytes(batch["image"][i]), str(batch["label"][i])),
                                        image_size).numpy()
            except ImageError as exc:
                errors[i] = str(exc)
    out = {k: v for k, v in batch.items() if k != "image"}
    out["error"] = errors
    out["pixels"] = pixels
    return out


class _ScoreActor:
    """map_batches on actors: the model is loaded once per actor, then scores batch after batch."""

    def __init__(self, spec: ModelSpec, dims, condition, mask_threshold: float, batch_size: int):
        from .engine.scorer import load_scorer, resolve_conditions

        self.scorer = load_scorer(spec.options, batch_size=batch_size)
        got = ModelSpec.from_scorer(self.scorer)
        if (got.identity, got.dtype) != (spec.identity, spec.dtype):
            raise OutputError(f"a worker loaded weights {got.identity} in {got.dtype}, not {spec.identity} in "
                              f"{spec.dtype} as planned; the weights differ between machines")
        self.dims, self.condition, self.threshold = dims, condition, mask_threshold
        self.keys = [k for k, _ in resolve_conditions(dims, condition)]

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        n = len(batch["index"])
        ok = [i for i in range(n) if _scorable(batch, i)]
        results = self.scorer.score_pixels(
            [torch.from_numpy(np.ascontiguousarray(batch["pixels"][i])) for i in ok],
            [str(batch["prompt"][i]) for i in ok], [str(batch["label"][i]) for i in ok],
            dims=self.dims, condition=self.condition, mask_threshold=self.threshold) if ok else []
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for key in self.keys:
            col = np.full(n, np.nan, dtype=np.float64)
            for i, r in zip(ok, results, strict=True):
                col[i] = r.scores[key]
            out[_SCORE_PREFIX + key] = col
        return out


def _start(ray, address: str | None) -> bool:
    """Connect to ``address`` or start Ray on this machine; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # its C++ notices would interleave with progress
    try:
        ray.init(address=address, logging_level=logging.ERROR, include_dashboard=False, configure_logging=True)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise EngineError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return True


def _unwrap(exc: Exception) -> MPSError:
    """A Ray task error as this package's error: the cause's own message when it is ours."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MPSError):
        return cause
    text = str(cause or exc).strip().splitlines()
    return EngineError(f"the Ray job failed: {text[-1] if text else type(exc).__name__}")


def score_dataset_ray(plan: DatasetPlan, spec: ModelSpec, output: Output | None = None, workers: int = 1,
                      gpus_per_worker: float = 0, cpus_per_worker: float = 1, address: str | None = None,
                      progress: Callable[[DatasetProgress], None] | None = None) -> DatasetSummary:
    """Score ``plan``'s pending shards on Ray: ``workers`` scoring actors, each with
    ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs; reading and decoding run as CPU tasks.

    Without ``address`` (and no Ray already running in this process) Ray starts on this machine
    and stops at the end. Same output as :func:`mps_cli.dataset.score_dataset`.
    """
    ray = require_ray()
    output = output or open_output(plan, spec)
    try:
        return _run(ray, plan, spec, output, workers, gpus_per_worker, cpus_per_worker, address, progress)
    finally:
        output.close()


def _run(ray, plan: DatasetPlan, spec: ModelSpec, output: Output, workers: int, gpus_per_worker: float,
         cpus_per_worker: float, address: str | None, progress) -> DatasetSummary:
    pending, done = output.pending(plan.shards)
    tracker = Tracker(plan, len(pending), done, progress)
    # The pipeline reads every shard at once: claim them all now; another run's are waited for at the end.
    deferred: list = []
    todo = list(claim_shards(output, pending, tracker, deferred))
    _run_pipeline(ray, plan, spec, output, todo, tracker, workers, gpus_per_worker, cpus_per_worker, address)
    for shard in deferred:
        if not wait_for_shard(output, shard, tracker):
            tracker.shard_failed(ShardFailure(shard.source, "another run into this folder took it and stopped "
                                                            "before writing it; run again to score it"))
            output.release(shard)
    return tracker.summary()


def _run_pipeline(ray, plan: DatasetPlan, spec: ModelSpec, output: Output, todo: list, tracker: Tracker,
                  workers: int, gpus_per_worker: float, cpus_per_worker: float, address: str | None) -> None:
    if not todo:
        return
    by_source = {s.source: s for s in todo}
    job = plan.job
    batch_size = job.batch_size or DEFAULT_BATCH["accelerator" if gpus_per_worker else "cpu"]
    started = _start(ray, address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray").setLevel(logging.ERROR)
        ds = ray.data.from_items([{"source": s.source, "kind": s.kind} for s in todo],
                                 override_num_blocks=len(todo))
        ds = ds.flat_map(_read_rows, fn_kwargs={"caption_column": job.caption_column,
                                                "image_column": job.image_column, "prompt": job.prompt,
                                                "image_ext": job.image_ext, "caption_ext": job.caption_ext})
        # A remote-args function keeps Ray from fusing decoding into the scoring actors: decoding
        # stays on CPU tasks that run beside the actors instead of between their batches.
        ds = ds.map_batches(_decode, fn_kwargs={"image_size": spec.image_size}, batch_size=batch_size,
                            batch_format="numpy", ray_remote_args_fn=lambda: {"num_cpus": 1})
        ds = ds.map_batches(_ScoreActor, fn_constructor_kwargs={
            "spec": spec, "dims": job.dims, "condition": job.condition, "mask_threshold": job.mask_threshold,
            "batch_size": batch_size},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)
        buffers: dict[str, list[tuple[int, Row]]] = {}
        keys = plan.keys
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for i in range(len(batch["index"])):
                    shard = by_source[str(batch["source"][i])]
                    if batch["shard_error"][i]:
                        tracker.shard_failed(ShardFailure(shard.source, str(batch["shard_error"][i])))
                        output.release(shard)
                        continue
                    n_rows = int(batch["n_rows"][i])
                    if n_rows == 0:
                        output.write(shard, [])
                        output.release(shard)
                        tracker.shard_done([])
                        continue
                    error = str(batch["error"][i]) or None
                    cause = (str(batch["cause"][i]) or BAD_IMAGE) if error else None
                    prompt = str(batch["prompt"][i]) if batch["has_prompt"][i] else None
                    scores = {} if error else {k: float(batch[_SCORE_PREFIX + k][i]) for k in keys}
                    rows = buffers.setdefault(shard.source, [])
                    rows.append((int(batch["index"][i]), Row(str(batch["key"][i]), shard.source, prompt, scores,
                                                             error, cause)))
                    tracker.scored(1)
                    if len(rows) == n_rows:
                        done = [r for _, r in sorted(rows, key=lambda t: t[0])]
                        del buffers[shard.source]
                        output.write(shard, done)
                        output.release(shard)
                        tracker.shard_done(done)
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None
    finally:
        if started:
            ray.shutdown()
