"""Score image datasets shard by shard: one parquet file per input shard, a manifest, resumable.

The plan (:func:`plan_dataset`) expands the sources and checks the output folder before any model
is loaded; :func:`open_output` checks the folder's manifest against the model settings; then
:func:`score_dataset` scores on this process through :class:`~mps_cli.engine.scorer.Scorer`, or
:func:`mps_cli.ray_engine.score_dataset_ray` on a Ray cluster. Both write through :class:`Output`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .constants import DEFAULT_MASK_THRESHOLD, DISTRIBUTION
from .engine.options import ModelOptions
from .errors import MissingExtraError, OutputError, ShardError
from .files import remove_stale_temps, replacing, write_whole
from .inputs.shards import Sample, Shard, find_shards, read_shard

MANIFEST = "_manifest.json"
#: Key of the settings JSON in each output parquet file's schema metadata.
PARQUET_METADATA_KEY = b"mps_cli.settings"
_LOCK = ".manifest.lock"


@dataclass(frozen=True)
class ModelSpec:
    """Which model scores, as plain values: the options a Ray actor loads it with (the weights as named
    here, so every machine loads the same ones), and the identity (content fingerprint of the weights,
    resolved dtype) that decides whether earlier results still hold."""

    options: ModelOptions
    identity: str
    dtype: str  # the resolved precision label: fp32, or IMAGE/TEXT such as bf16/fp32
    image_size: int = 224

    @classmethod
    def from_scorer(cls, scorer) -> ModelSpec:
        return cls(options=ModelOptions(weights=scorer.weights, device=str(scorer.device),
                                        dtype=scorer.precision.label),
                   identity=scorer.identity, dtype=scorer.precision.label, image_size=scorer.config.vision.image_size)


def resolve_model(options: ModelOptions, *, device_kind: str | None = None) -> ModelSpec:
    """Find the weights (fetching them if needed) and resolve the dtype, without building the model.

    ``device_kind`` (``cpu`` or ``cuda``) is where the model will run when that is not this
    process (Ray actors); it decides what ``auto`` means for the dtype.
    """
    import torch

    from .devices import resolve_device, resolve_precision
    from .weights.sources import open_weights, weights_spec

    opened = open_weights(options.weights, revision=options.revision, offline=options.offline, config=options.config)
    if device_kind is not None and options.device == "auto":
        dev = torch.device(device_kind)
    else:
        dev = resolve_device(options.device) if device_kind is None else torch.device(options.device)
    return ModelSpec(options=replace(options, weights=weights_spec(options.weights)),
                     identity=opened.identity, dtype=resolve_precision(options.dtype, dev).label,
                     image_size=opened.config.vision.image_size)


@dataclass(frozen=True)
class DatasetJob:
    """What to score and how: the sources, the output folder, and the options that shape the rows."""

    sources: tuple[str, ...]
    out: Path
    dims: tuple[str, ...] | None = None
    condition: str | None = None
    mask_threshold: float = DEFAULT_MASK_THRESHOLD
    prompt: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    batch_size: int | None = None
    #: Several models on one decode (``mps,hpsv2.1``): columns keyed ``mps.<dim>`` and by judge.
    models: str | None = None


@dataclass(frozen=True)
class ShardFailure:
    source: str
    message: str


@dataclass
class DatasetPlan:
    """The shards this process handles (after ``--shard-index/--num-shards``), the sources that
    named nothing readable, and the result columns."""

    job: DatasetJob
    shards: list[Shard]
    problems: list[ShardFailure]
    conditions: list[tuple[str, str]]

    @property
    def keys(self) -> list[str]:
        if self.job.models:
            from .engine.panel import parse_models, result_keys

            return list(result_keys(parse_models(self.job.models), self.job.dims, self.job.condition))
        return [k for k, _ in self.conditions]


def require_pyarrow() -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (imported only to check the extra is installed)
    except ImportError:
        raise MissingExtraError(f'scoring a dataset needs pyarrow: pip install "{DISTRIBUTION}[dataset]"') from None


def plan_dataset(job: DatasetJob) -> DatasetPlan:
    """Expand the sources and make sure the output folder is usable; loads no model.

    Raises :class:`OutputError` when the folder cannot be written or two shards would write the
    same output file, ``ValueError`` for bad dimensions or shard selection.
    """
    from .engine.scorer import resolve_conditions

    require_pyarrow()
    conditions = resolve_conditions(job.dims, job.condition)
    if job.models:
        from .engine.panel import parse_models, result_keys

        result_keys(parse_models(job.models), job.dims, job.condition)
    if (job.shard_index is None) != (job.num_shards is None):
        raise ValueError("a shard index needs the number of shards, and the number of shards an index")
    if job.num_shards is not None and not (job.num_shards >= 1 and 0 <= job.shard_index < job.num_shards):
        raise ValueError(f"shard index {job.shard_index} is not in 0..{job.num_shards - 1}")
    _check_writable(job.out)
    shards, problems = find_shards(list(job.sources))
    owners: dict[str, Shard] = {}
    for shard in shards:
        other = owners.setdefault(shard.name, shard)
        if other is not shard:
            raise OutputError(f"{other.source} and {shard.source} would both write {shard.name}.parquet; "
                              "score them into separate output folders")
    if job.num_shards is not None:
        shards = shards[job.shard_index::job.num_shards]
        problems = problems if job.shard_index == 0 else []  # reported once, not by every worker
    return DatasetPlan(job, shards, [ShardFailure(s, m) for s, m in problems], conditions)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def settings_of(plan: DatasetPlan, spec: ModelSpec) -> dict:
    """Everything that decides the rows; a rerun into the same folder must match it."""
    job = plan.job
    return {
        "weights": spec.identity,
        "dtype": spec.dtype,
        "mask_threshold": float(job.mask_threshold),
        "conditions": dict(plan.conditions),
        "prompt": job.prompt,
        "caption_column": job.caption_column,
        "image_column": job.image_column,
        # Only with --model, so folders written before it existed still resume.
        **({"models": job.models} if job.models else {}),
    }


@dataclass(frozen=True)
class Row:
    """One output row: the sample's key, its source shard, prompt, scores by key, or its error."""

    key: str
    shard: str
    prompt: str | None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None



@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's manifest lock: workers of one job (``--shard-index``) share the manifest."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer per folder
        yield
        return
    with open(folder / _LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, doc: dict) -> None:
    write_whole(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _describe(settings: dict) -> str:
    conds = ", ".join(settings.get("conditions") or {})
    prompt = settings.get("prompt")
    text = (f"weights {settings.get('weights')}, dtype {settings.get('dtype')}, "
            f"mask threshold {settings.get('mask_threshold')}, dimensions {conds}")
    if prompt is not None:
        text += f", prompt {prompt!r}"
    for col in ("caption_column", "image_column"):
        if settings.get(col):
            text += f", {col.replace('_', ' ')} {settings[col]}"
    return text


class Output:
    """The output folder: one ``NAME.parquet`` per shard, written whole (temporary name, then
    renamed), and ``_manifest.json`` recording the settings and every shard done.

    The parquet files are the truth: each carries the settings in its metadata, so a shard written
    just before a kill, before the manifest heard of it, still counts as done on the next run.
    """

    def __init__(self, folder: Path, settings: dict, keys: Sequence[str]):
        self.folder = Path(folder)
        self.settings = settings
        self.keys = list(keys)
        self._settings_json = json.dumps(settings, sort_keys=True)

    def _check(self, found: dict, where: str) -> None:
        if json.dumps(found, sort_keys=True) != self._settings_json:
            raise OutputError(
                f"{where} holds scores made with other settings ({_describe(found)}); this run asks for "
                f"{_describe(self.settings)}. Use another output folder, or the same settings to resume")

    def open(self) -> Output:
        """Create the manifest, or check this run's settings against it."""
        from . import __version__

        path = self.folder / MANIFEST
        with _locked(self.folder):
            if path.exists():
                try:
                    doc = json.loads(path.read_text())
                    found = doc["settings"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise OutputError(f"{path}: unreadable manifest ({exc}); move it away to start over") from None
                self._check(found, str(path))
            else:
                _write_json(path, {"tool": DISTRIBUTION, "version": __version__, "settings": self.settings,
                                   "shards": {}})
        return self

    def path_for(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.parquet"

    def pending(self, shards: Iterable[Shard]) -> tuple[list[Shard], int]:
        """The shards still to score, and how many are already done under these settings."""
        todo, done = [], []
        manifest = self._read_manifest()
        for shard in shards:
            if self.path_for(shard).exists():
                done.append(shard)
            else:
                todo.append(shard)
        unrecorded = [s for s in done if f"{s.name}.parquet" not in manifest.get("shards", {})]
        for shard in unrecorded:  # written, then killed before the manifest was updated
            self._record(shard, *self._inspect(self.path_for(shard)))
        return todo, len(done)

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def _inspect(self, path: Path) -> tuple[int, int]:
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
            found = json.loads((meta.metadata or {}).get(PARQUET_METADATA_KEY, b"{}"))
            errors = pq.read_table(path, columns=["error"]).column("error").null_count
        except Exception as exc:
            raise OutputError(f"{path}: unreadable output file ({exc}); delete it to score that shard again") \
                from None
        self._check(found, str(path))
        return meta.num_rows, meta.num_rows - errors

    def _record(self, shard: Shard, rows: int, errors: int) -> None:
        path = self.folder / MANIFEST
        with _locked(self.folder):
            doc = self._read_manifest() or {"settings": self.settings, "shards": {}}
            doc.setdefault("shards", {})[f"{shard.name}.parquet"] = {"source": shard.source, "rows": rows,
                                                                     "errors": errors}
            _write_json(path, doc)

    def write(self, shard: Shard, rows: Sequence[Row]) -> None:
        """Write one shard's rows whole: a temporary file, then a rename, then the manifest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {
            "key": pa.array([r.key for r in rows], pa.string()),
            "shard": pa.array([r.shard for r in rows], pa.string()),
            "prompt": pa.array([r.prompt for r in rows], pa.string()),
            **{k: pa.array([r.scores.get(k) if r.error is None else None for r in rows], pa.float64())
               for k in self.keys},
            "error": pa.array([r.error for r in rows], pa.string()),
        }
        table = pa.table(columns).replace_schema_metadata({PARQUET_METADATA_KEY: self._settings_json.encode()})
        final = self.path_for(shard)
        remove_stale_temps(self.folder, final.name)  # left by a killed run
        with replacing(final) as tmp, open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        self._record(shard, len(rows), sum(r.error is not None for r in rows))


def open_output(plan: DatasetPlan, spec: ModelSpec) -> Output:
    """The job's output folder, its manifest checked against (or created with) these settings."""
    return Output(plan.job.out, settings_of(plan, spec), plan.keys).open()


@dataclass(frozen=True)
class DatasetProgress:
    """A snapshot for progress lines; ``failure`` is set when a shard has just been skipped."""

    shards_total: int
    shards_done: int
    images: int
    errors: int
    elapsed: float
    fraction: float  # of this run's work, 0..1
    failure: ShardFailure | None = None

    @property
    def rate(self) -> float:
        return self.images / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.fraction <= 0:
            return None
        return self.elapsed * (1 - self.fraction) / self.fraction


@dataclass(frozen=True)
class DatasetSummary:
    """What a run did: shards selected, written now, already done before; failures; rows; time."""

    out: Path
    shards: int
    written: int
    already_done: int
    failed: list[ShardFailure]
    images: int  # rows scored this run
    errors: int  # rows with an error this run
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


class Tracker:
    """Counts a run's progress and tells the caller; shared by both engines."""

    def __init__(self, plan: DatasetPlan, pending: int, already_done: int,
                 progress: Callable[[DatasetProgress], None] | None):
        self.plan, self.pending, self.already_done, self.callback = plan, pending, already_done, progress
        self.start = time.perf_counter()
        self.written = 0
        self.images = 0
        self.errors = 0
        self.failed: list[ShardFailure] = list(plan.problems)
        self.partial = 0.0  # fraction of the shard in flight

    def _emit(self, failure: ShardFailure | None = None) -> None:
        if self.callback is not None:
            finished = self.written + len(self.failed) - len(self.plan.problems)
            fraction = (finished + self.partial) / self.pending if self.pending else 1.0
            self.callback(DatasetProgress(len(self.plan.shards), self.already_done + self.written, self.images,
                                          self.errors, time.perf_counter() - self.start, min(fraction, 1.0),
                                          failure))

    def scored(self, n: int = 1, partial: float | None = None) -> None:
        self.images += n
        if partial is not None:
            self.partial = partial
        self._emit()

    def shard_done(self, rows: Sequence[Row]) -> None:
        self.written += 1
        self.errors += sum(r.error is not None for r in rows)
        self.partial = 0.0
        self._emit()

    def shard_failed(self, failure: ShardFailure) -> None:
        self.failed.append(failure)
        self.partial = 0.0
        self._emit(failure)

    def summary(self) -> DatasetSummary:
        return DatasetSummary(out=self.plan.job.out, shards=len(self.plan.shards), written=self.written,
                              already_done=self.already_done, failed=self.failed,
                              images=self.images - self.errors, errors=self.errors,
                              seconds=time.perf_counter() - self.start)


def _read(shard: Shard, job: DatasetJob) -> list[Sample]:
    return read_shard(shard, job.caption_column, job.image_column, job.prompt)


def _score_shard(scorer, shard: Shard, samples: list[Sample], job: DatasetJob, tracker: Tracker) -> list[Row]:
    from .engine.preprocess import EncodedImage

    good = [s for s in samples if s.error is None]
    total = max(1, len(samples))
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        tracker.scored(n, done / total)

    stream = scorer.iter_score([EncodedImage(s.image, s.label) for s in good], [s.prompt for s in good],
                               dims=job.dims, condition=job.condition, mask_threshold=job.mask_threshold,
                               batch_size=job.batch_size, progress=count)
    rows = []
    for s in samples:
        if s.error is not None:
            count(1)
            rows.append(Row(s.key, shard.source, s.prompt, error=s.error))
        else:
            r = next(stream)
            rows.append(Row(s.key, shard.source, s.prompt, dict(r.scores), r.error))
    return rows


def score_dataset(plan: DatasetPlan, scorer, progress: Callable[[DatasetProgress], None] | None = None,
                  output: Output | None = None) -> DatasetSummary:
    """Score every pending shard of ``plan`` on this process with ``scorer`` and write its parquet file.

    The next shard is read while this one is scored; images decode in the scorer's thread pool
    through the same preprocessing as image files. A shard that cannot be read is reported through
    ``progress`` and skipped; the summary lists it.
    """
    spec = ModelSpec.from_scorer(scorer)
    output = output or open_output(plan, spec)
    if output.settings["weights"] != spec.identity or output.settings["dtype"] != spec.dtype:
        raise OutputError(f"the loaded model ({spec.identity}, {spec.dtype}) is not the one the output was "
                          f"opened for ({output.settings['weights']}, {output.settings['dtype']})")
    todo, already = output.pending(plan.shards)
    tracker = Tracker(plan, len(todo), already, progress)
    job = plan.job
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mps-shard-read") as reader:
        ahead: Future | None = reader.submit(_read, todo[0], job) if todo else None
        for i, shard in enumerate(todo):
            current = ahead
            ahead = reader.submit(_read, todo[i + 1], job) if i + 1 < len(todo) else None
            try:
                samples = current.result()
            except ShardError as exc:
                tracker.shard_failed(ShardFailure(shard.source, str(exc)))
                continue
            rows = _score_shard(scorer, shard, samples, job, tracker)
            output.write(shard, rows)
            tracker.shard_done(rows)
    return tracker.summary()
