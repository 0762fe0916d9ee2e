"""The dataset job as a Ray Data pipeline: read shards and decode on CPU tasks, score on a pool
of actors that each load the model once, write through the same :class:`~mps_cli.dataset.Output`.

Ray is an optional extra (``pip install "mps-score[ray]"``) and is imported only here, lazily.
The driver (this process) writes the parquet files and the manifest: scores are small, and one
writer keeps the manifest whole. While the job runs, Ray's own log lines stay in its session
folder (``/tmp/ray/session_latest/logs``) instead of this process's stderr, which carries the
job's progress as a local run's does; a failure still comes back as this package's error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .constants import DISTRIBUTION
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
#: Prefix of the columns in which a scoring actor that could not load its model reports why.
_FAILURE = "failure:"
#: Ray's C++ log threshold, read when its processes start.
BACKEND_LOG_ENV = "RAY_BACKEND_LOG_LEVEL"


def require_ray():
    """The ``ray`` module, or :class:`MissingExtraError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError(f'the Ray engine needs Ray Data: pip install "{DISTRIBUTION}[ray]"') from None
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


def _decode(batch: dict, image_size: int, rules: tuple[str, ...] | None = None) -> dict:
    """map_batches on CPU tasks: image bytes into normalised pixels, exactly as for image files; for a panel
    (``rules``), decoded once and prepared by each rule, one column per rule; numpy only, so that the task
    workers never import torch (:func:`~mps_cli.engine.preprocess.pixel_array`)."""
    import numpy as np

    from .engine.preprocess import EncodedImage, open_image, pixel_array
    from .errors import ImageError

    n = len(batch["index"])
    errors = np.array(batch["error"], dtype=object)
    if rules is None:
        columns = {_PIXELS: np.zeros((n, 3, image_size, image_size), dtype=np.float32)}
    else:
        from .engine.pixel_rules import LETTERBOX, arrays_by_rule

        columns = {_rule_column(rule): _rgb_column(n) if rule == LETTERBOX
                   else np.zeros((n, 3, image_size, image_size), dtype=np.float32) for rule in rules}
    for i in range(n):
        if not _scorable(batch, i):
            continue
        image = EncodedImage(bytes(batch["image"][i]), str(batch["label"][i]))
        try:
            if rules is None:
                columns[_PIXELS][i] = pixel_array(open_image(image), image_size)
                continue
            for rule, px in arrays_by_rule(open_image(image, keep_mode=True), image_size, rules).items():
                columns[_rule_column(rule)][i] = px
        except ImageError as exc:
            errors[i] = str(exc)
    out = {k: v for k, v in batch.items() if k != "image"}
    out["error"] = errors
    return {**out, **columns}


def _rgb_column(n: int):
    """The letterbox rule's column: each image's RGB bytes at its own size (the model's thread finishes
    them), a 1 x 1 placeholder where a row has no image."""
    import numpy as np

    col = np.empty(n, dtype=object)
    for i in range(n):
        col[i] = np.zeros((1, 1, 3), dtype=np.uint8)
    return col


#: The decoded pixels' column; a panel has one per preprocessing rule (:func:`_rule_column`).
_PIXELS = "pixels"


def _rule_column(rule: str) -> str:
    return f"{_PIXELS}:{rule}"


#: Heap reserved per decode task: its batch's encoded images and pixels (a few MiB each) and one decoded
#: image at a time (a 24-megapixel photo is 72 MiB as RGB). Declaring it also gives the decode stage
#: resources of its own, which keeps Ray Data from fusing it into the scoring actors.
DECODE_TASK_MEMORY = 256 << 20


class _ScoreActor:
    """map_batches on actors: the model is loaded once per actor, then scores batch after batch.

    A model that cannot be loaded is not raised from the constructor: Ray would restart the actor
    again and again for most of a minute, printing each traceback on the driver's stdout. The
    actor returns the error as data instead (:data:`_FAILURE` columns), like a sample's error, and
    the driver raises it as the error it was."""

    def __init__(self, spec: ModelSpec, keys: list[str], dims, condition, mask_threshold: float, batch_size: int):
        self.failure: MPSError | None = None
        try:
            self.scorer = self._load(spec, batch_size)
        except MPSError as exc:
            self.failure = exc
        except Exception as exc:  # torch's own (out of memory, a CUDA error): as deterministic, and as final
            text = str(exc).strip().splitlines()
            self.failure = EngineError(f"a scoring worker could not load the model: {type(exc).__name__}"
                                       + (f": {text[0]}" if text else ""))
        self.dims, self.condition, self.threshold = dims, condition, mask_threshold
        self.keys, self.rules = keys, spec.rules

    @staticmethod
    def _load(spec: ModelSpec, batch_size: int):
        from .engine.panel import load_scorer

        scorer = load_scorer(spec.options, batch_size=batch_size)
        got = ModelSpec.from_scorer(scorer)
        if (got.identity, got.dtype) != (spec.identity, spec.dtype):
            raise OutputError(f"a worker loaded weights {got.identity} in {got.dtype}, not {spec.identity} in "
                              f"{spec.dtype} as planned; the weights differ between machines")
        return scorer

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        n = len(batch["index"])
        if self.failure is not None:
            failure = {"kind": type(self.failure).__name__, "message": str(self.failure),
                       "hint": self.failure.hint or ""}
            return {"source": batch["source"],
                    **{_FAILURE + key: np.full(n, value, dtype=object) for key, value in failure.items()}}
        ok = [i for i in range(n) if _scorable(batch, i)]
        # Ray hands the batch over read-only (zero-copy from its object store); indexing by a list copies
        # the kept rows into one writable array, which torch may then share.
        results = self.scorer.score_pixels(
            self._pixels(batch, ok), [str(batch["prompt"][i]) for i in ok], [str(batch["label"][i]) for i in ok],
            dims=self.dims, condition=self.condition, mask_threshold=self.threshold) if ok else []
        out = {k: v for k, v in batch.items() if not k.startswith(_PIXELS)}
        for key in self.keys:
            col = np.full(n, np.nan, dtype=np.float64)
            for i, r in zip(ok, results, strict=True):
                col[i] = r.scores[key]
            out[_SCORE_PREFIX + key] = col
        return out

    def _pixels(self, batch: dict, ok: list[int]) -> list:
        """The kept rows' pixels as the scorer takes them: tensors, or for a panel ``{rule: tensor}``."""
        import numpy as np
        import torch

        if not ok:
            return []
        if self.rules is None:
            return list(torch.from_numpy(batch[_PIXELS][ok]))
        from .engine.pixel_rules import LETTERBOX

        # The letterbox rule's arrays go to the judge as arrays (np.array copies: Ray's are read-only).
        columns = {rule: [np.array(a) for a in batch[_rule_column(rule)][ok]] if rule == LETTERBOX
                   else list(torch.from_numpy(batch[_rule_column(rule)][ok])) for rule in self.rules}
        return [{rule: columns[rule][j] for rule in self.rules} for j in range(len(ok))]


def _start(ray, address: str | None) -> bool:
    """Connect to ``address`` or start Ray on this machine; True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        # log_to_driver: the workers' stdout and stderr stay in Ray's session logs; their errors reach
        # this process as task errors all the same.
        with _quiet_ray_backend():
            ray.init(address=address, logging_level=logging.ERROR, include_dashboard=False,
                     configure_logging=True, log_to_driver=False)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise EngineError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return True


@contextmanager
def _quiet_ray_backend() -> Iterator[None]:
    """Start Ray's C++ side (this process's core worker, the raylet and the workers it spawns) at its
    FATAL threshold, unless the user chose one: at ERROR it prints, per scoring actor, that the
    actor's constructor arguments live in the object store. It announces the threshold on stderr
    as it starts, so this process's stderr (fd 2, where C++ writes) is /dev/null meanwhile."""
    if BACKEND_LOG_ENV in os.environ:
        yield
        return
    os.environ[BACKEND_LOG_ENV] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        del os.environ[BACKEND_LOG_ENV]


def _worker_failure(kind: str, message: str, hint: str) -> MPSError:
    """A scoring actor's error, reported as data, as the error it was."""
    from . import errors

    cls = getattr(errors, kind, None)
    cls = cls if isinstance(cls, type) and issubclass(cls, MPSError) else EngineError
    return cls(message, hint=hint or None)


def _unwrap(exc: Exception) -> MPSError:
    """A Ray task error as this package's error: the cause's own message when it is ours."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MPSError):
        return cause
    text = str(cause or exc).strip().splitlines()
    return EngineError(f"the Ray job failed: {text[-1] if text else type(exc).__name__}")


@contextmanager
def _quiet_ray_loggers() -> Iterator[None]:
    """Ray's Python loggers at ERROR for the job (Ray Data's own logger does not propagate, so it is
    set apart): their INFO and WARNING lines (execution plans, "progress bars disabled") would
    interleave with the job's progress. Restored afterwards, for a caller that uses Ray itself."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _pipeline(ray, todo: list[Shard], plan: DatasetPlan, spec: ModelSpec, batch_size: int, workers: int,
              gpus_per_worker: float, cpus_per_worker: float):
    """The Ray Data pipeline over ``todo``: read (one task per shard), decode (CPU tasks), score (actors)."""
    job = plan.job
    ds = ray.data.from_items([{"source": s.source, "kind": s.kind} for s in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(_read_rows, fn_kwargs={"caption_column": job.caption_column,
                                            "image_column": job.image_column, "prompt": job.prompt,
                                            "image_ext": job.image_ext, "caption_ext": job.caption_ext})
    # Stages with equal resources are fused into one worker; the decode stage's own (a CPU and its
    # memory) keep it on CPU tasks that run beside the scoring actors instead of between their batches.
    ds = ds.map_batches(_decode, fn_kwargs={"image_size": spec.image_size, "rules": spec.rules},
                        batch_size=batch_size, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
    return ds.map_batches(_ScoreActor, fn_constructor_kwargs={
        "spec": spec, "keys": plan.keys, "dims": job.dims, "condition": job.condition,
        "mask_threshold": job.mask_threshold, "batch_size": batch_size},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)


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
    batch_size = plan.job.batch_size or DEFAULT_BATCH["accelerator" if gpus_per_worker else "cpu"]
    started = _start(ray, address)
    try:
        with _quiet_ray_loggers():
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ds = _pipeline(ray, todo, plan, spec, batch_size, workers, gpus_per_worker, cpus_per_worker)
            try:
                _write_rows(ds, plan.keys, by_source, output, tracker)
            except ray.exceptions.RayError as exc:
                raise _unwrap(exc) from None
    finally:
        if started:
            ray.shutdown()


def _write_rows(ds, keys: list[str], by_source: dict[str, Shard], output: Output, tracker: Tracker) -> None:
    """Take the scored rows as they come and write each shard once all its rows are in."""
    buffers: dict[str, list[tuple[int, Row]]] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if _FAILURE + "kind" in batch:
            raise _worker_failure(*(str(batch[_FAILURE + k][0]) for k in ("kind", "message", "hint")))
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
            rows.append((int(batch["index"][i]), Row(str(batch["key"][i]), shard.source, prompt, scores, error,
                                                     cause)))
            tracker.scored(1)
            if len(rows) == n_rows:
                done = [r for _, r in sorted(rows, key=lambda t: t[0])]
                del buffers[shard.source]
                output.write(shard, done)
                output.release(shard)
                tracker.shard_done(done)
