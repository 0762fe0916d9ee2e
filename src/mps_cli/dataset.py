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
from .errors import MissingExtraError, OutputError, ShardError, ShardSelectionError
from .files import remove_stale_temps, replacing, write_whole
from .inputs.shards import NO_CAPTION, NO_IMAGE, Sample, Shard, find_shards, read_shard

MANIFEST = "_manifest.json"
#: Key of the settings JSON in each output parquet file's schema metadata.
PARQUET_METADATA_KEY = b"mps_cli.settings"
_LOCK = ".manifest.lock"
_CLAIMS = ".claims.lock"
#: :attr:`Row.cause` of an image that is there but does not decode (besides the shards' NO_IMAGE, NO_CAPTION).
BAD_IMAGE = "bad-image"
CAUSES = (NO_IMAGE, NO_CAPTION, BAD_IMAGE)


@dataclass(frozen=True)
class ModelSpec:
    """Which model scores, as plain values: the options a Ray actor loads it with (the weights as named
    here, so every machine loads the same ones), and the identity (content fingerprint of the weights,
    resolved dtype) that decides whether earlier results still hold."""

    options: ModelOptions
    identity: str
    dtype: str  # the resolved precision label: fp32, or IMAGE/TEXT such as bf16/fp32
    image_size: int = 224
    #: A panel's preprocessing rules (``options.model`` given), each image decoded once for all of them;
    #: None for MPS alone.
    rules: tuple[str, ...] | None = None
    #: As :attr:`~mps_cli.engine.scorer.Scorer.demo`: ``"random"`` for demo weights, else None.
    demo: str | None = None

    @classmethod
    def from_scorer(cls, scorer) -> ModelSpec:
        return cls(options=ModelOptions(weights=scorer.weights, device=str(scorer.device),
                                        dtype=scorer.precision.label),
                   identity=scorer.identity, dtype=scorer.precision.label, image_size=scorer.config.vision.image_size,
                   demo=scorer.demo)


def resolve_model(options: ModelOptions, *, device_kind: str | None = None) -> ModelSpec:
    """Find the weights (fetching them if needed) and resolve the dtype, without building the model.

    ``device_kind`` (``cpu`` or ``cuda``) is where the model will run when that is not this
    process (Ray actors); it decides what ``auto`` means for the dtype.
    """
    import torch

    from .devices import resolve_device, resolve_precision
    from .weights.sources import open_weights, weights_spec

    if device_kind is not None and options.device == "auto":
        dev = torch.device(device_kind)
    else:
        dev = resolve_device(options.device) if device_kind is None else torch.device(options.device)
    dtype = resolve_precision(options.dtype, dev).label
    if options.model:
        from .engine.panel import plan_panel

        panel = plan_panel(options)
        return ModelSpec(options=replace(options, weights=weights_spec(options.weights)), identity=panel.identity,
                         dtype=dtype, image_size=panel.image_size, rules=panel.rules, demo=panel.demo)
    opened = open_weights(options.weights, revision=options.revision, offline=options.offline, config=options.config)
    return ModelSpec(options=replace(options, weights=weights_spec(options.weights)),
                     identity=opened.identity, dtype=dtype, image_size=opened.config.vision.image_size,
                     demo=opened.demo)


@dataclass(frozen=True)
class DatasetJob:
    """What to score and how: the sources, the output folder, and the options that shape the rows."""

    sources: tuple[str, ...]
    out: Path
    dims: tuple[str, ...] | None = None
    condition: str | None = None
    mask_threshold: float = DEFAULT_MASK_THRESHOLD
    prompt: str | None = None
    caption_column: str | None = None  # parquet column (and first .json field tried in tars)
    image_column: str | None = None  # parquet column
    shard_index: int | None = None
    num_shards: int | None = None
    batch_size: int | None = None
    image_ext: str | None = None  # webdataset member extension
    caption_ext: str | None = None  # webdataset member extension
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
    found: int = 0  # shards the sources named, before the split between workers

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
    same output file, :class:`DimensionError` for bad dimensions, :class:`ShardSelectionError` for a bad
    shard selection (both ``ValueError`` too). When the sources name
    no shard at all (``found == 0``), nothing is created.
    """
    from .engine.scorer import resolve_conditions

    require_pyarrow()
    conditions = resolve_conditions(job.dims, job.condition)
    if job.models:
        from .engine.panel import parse_models, result_keys

        result_keys(parse_models(job.models), job.dims, job.condition)
    if (job.shard_index is None) != (job.num_shards is None) or (
            job.num_shards is not None and not (job.num_shards >= 1 and 0 <= job.shard_index < job.num_shards)):
        raise ShardSelectionError(job.shard_index, job.num_shards)
    shards, problems = find_shards(list(job.sources))
    found = len(shards)
    if shards:
        _check_writable(job.out)
    owners: dict[str, Shard] = {}
    for shard in shards:
        other = owners.setdefault(shard.name, shard)
        if other is not shard:
            raise OutputError(f"{other.source} and {shard.source} would both write {shard.name}.parquet; "
                              "score them into separate output folders")
    if job.num_shards is not None:
        shards = shards[job.shard_index::job.num_shards]
        problems = problems if job.shard_index == 0 else []  # reported once, not by every worker
    return DatasetPlan(job, shards, [ShardFailure(s, m) for s, m in problems], conditions, found)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder (the output is a folder of parquet files)")
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
        "caption_ext": job.caption_ext,
        "image_ext": job.image_ext,
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
    cause: str | None = None  # one of CAUSES when known; not written


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


_SETTING_NAMES = {"weights": "weights", "dtype": "dtype", "mask_threshold": "mask threshold",
                  "conditions": "dimensions", "prompt": "prompt", "caption_column": "caption column",
                  "image_column": "image column", "caption_ext": "caption member", "image_ext": "image member",
                  "models": "models"}


def _setting_text(key: str, value) -> str:
    if value is None:
        return {"prompt": "the captions"}.get(key, "the default")
    if key == "weights" and isinstance(value, str) and len(value) > 24:
        return value[:19] + "…"  # sha256: and 12 hex digits tell two fingerprints apart
    if key == "conditions" and isinstance(value, dict):
        return ", ".join(value) or "none"
    if key in ("prompt", "caption_column", "image_column", "caption_ext", "image_ext"):
        return repr(value)
    return str(value)


def setting_differences(found: dict, wanted: dict) -> list[str]:
    """What differs between two settings records, one short phrase per setting:
    ``mask threshold 0.3, not 0.5``. A setting an older record lacks counts as its default (None)."""
    out = []
    for key in dict.fromkeys([*wanted, *found]):
        a, b = found.get(key), wanted.get(key)
        if a == b:
            continue
        name = _SETTING_NAMES.get(key, key.replace("_", " "))
        if key == "conditions" and isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
            texts = [k for k in b if a.get(k) != b.get(k)]
            out.append(f"the condition text of {', '.join(texts)} {a[texts[0]]!r}, not {b[texts[0]]!r}")
            continue
        out.append(f"{name} {_setting_text(key, a)}, not {_setting_text(key, b)}")
    return out


class _Claims:
    """Which shards this process is scoring: one byte-range lock per shard in one file, so a run holds
    as many as it likes through one descriptor, and the kernel drops them when the process dies
    (``kill -9`` included). POSIX record locks belong to the process: another process is excluded,
    this one's threads are not (one run per process), and closing any descriptor of the file would
    drop them all, so the file is opened once here and closed only by :meth:`close`."""

    # Lock offsets are a hash of the shard name; two names on one offset (odds about n^2 / 2^63 for n
    # shards) would at worst let two runs score the same shard, whose file is still written whole.
    _SPAN = 2**62

    def __init__(self, path: Path):
        try:
            import fcntl
        except ImportError:  # Windows: one run per folder
            self.fcntl, self.fd = None, None
            return
        self.fcntl = fcntl
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _offset(self, name: str) -> int:
        import hashlib

        return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") \
            % self._SPAN

    def take(self, name: str, wait: bool) -> bool:
        if self.fd is None:
            return True
        flags = self.fcntl.LOCK_EX | (0 if wait else self.fcntl.LOCK_NB)
        try:
            self.fcntl.lockf(self.fd, flags, 1, self._offset(name), os.SEEK_SET)
        except OSError:  # EAGAIN/EACCES: another process holds it
            return False
        return True

    def give_back(self, name: str) -> None:
        if self.fd is not None:
            self.fcntl.lockf(self.fd, self.fcntl.LOCK_UN, 1, self._offset(name), os.SEEK_SET)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Output:
    """The output folder: one ``NAME.parquet`` per shard, written whole (temporary name, then
    renamed), and ``_manifest.json`` recording the settings and every shard done.

    The parquet files are the truth: each carries the settings in its metadata, so a shard written
    just before a kill, before the manifest heard of it, still counts as done on the next run.
    Runs into one folder at once claim shards (:meth:`claim`) so that each is scored by one of them.
    """

    def __init__(self, folder: Path, settings: dict, keys: Sequence[str]):
        self.folder = Path(folder)
        self.settings = settings
        self.keys = list(keys)
        self._settings_json = json.dumps(settings, sort_keys=True)
        self._claims: _Claims | None = None

    def _check(self, found: dict, where: str) -> None:
        if not isinstance(found, dict) or not found:
            raise OutputError(f"{where}: not written by mps dataset (no settings record in it); move it away")
        differences = setting_differences(found, self.settings)
        if differences:
            raise OutputError(f"{where} holds scores made with other settings ({'; '.join(differences)}). "
                              "Use another output folder, or the same settings to resume")

    def open(self) -> Output:
        """Create the manifest, or check this run's settings against it."""
        from . import __version__

        path = self.folder / MANIFEST
        with _locked(self.folder):
            # A run killed mid-write of the manifest leaves its temporary file (the shards' own are swept
            # as each is written); only writers that are gone are removed, so runs beside this one keep theirs.
            remove_stale_temps(self.folder, MANIFEST)
            if path.exists():
                try:
                    doc = json.loads(path.read_text(encoding="utf-8"))
                    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict) \
                            or not isinstance(doc.get("shards", {}), dict):
                        raise ValueError("not an mps dataset manifest: no settings and shards records")
                except (OSError, ValueError) as exc:
                    raise OutputError(f"{path}: unreadable manifest ({exc}); move it away to start over") from None
                self._check(doc["settings"], str(path))
            else:
                _write_json(path, {"tool": DISTRIBUTION, "version": __version__, "settings": self.settings,
                                   "shards": {}})
        return self

    def path_for(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.parquet"

    def pending(self, shards: Iterable[Shard]) -> tuple[list[Shard], dict[Shard, tuple[int, int]]]:
        """The shards still to score, and those already done under these settings with their
        (rows, rows with an error)."""
        todo, done = [], {}
        recorded = self._read_manifest().get("shards", {})  # read once: it lists every shard done
        for shard in shards:
            if self.path_for(shard).exists():
                # a shard written just before a kill, before the manifest heard of it, is recorded now
                done[shard] = self.counts(shard, recorded)
            else:
                todo.append(shard)
        return todo, done

    def counts(self, shard: Shard, recorded: dict | None = None) -> tuple[int, int]:
        """(rows, rows with an error) of a written shard: from the manifest (or its ``shards``
        record as read), else from its file."""
        if recorded is None:
            recorded = self._read_manifest().get("shards", {})
        entry = recorded.get(f"{shard.name}.parquet")
        if isinstance(entry, dict):
            rows, errors = entry.get("rows"), entry.get("errors")
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (rows, errors)) \
                    and errors <= rows:
                return rows, errors
        rows, errors = self._inspect(self.path_for(shard))
        self._record(shard, rows, errors)
        return rows, errors

    def _read_manifest(self) -> dict:
        try:
            doc = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        if not isinstance(doc.get("shards"), dict):
            doc["shards"] = {}
        return doc

    def _inspect(self, path: Path) -> tuple[int, int]:
        """(rows, rows with an error) of an output file, its settings checked."""
        import pyarrow.parquet as pq

        def unreadable(exc: Exception) -> OutputError:
            detail = " ".join(str(exc).split())[:120]
            return OutputError(f"{path}: unreadable output file ({detail}); delete it to score that shard again")

        try:
            meta = pq.read_metadata(path)
            found = json.loads((meta.metadata or {}).get(PARQUET_METADATA_KEY, b"{}"))
        except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
            raise unreadable(exc) from None
        self._check(found, str(path))
        try:
            errors = pq.read_table(path, columns=["error"]).column("error").null_count
        except Exception as exc:
            raise unreadable(exc) from None
        return meta.num_rows, meta.num_rows - errors

    def _record(self, shard: Shard, rows: int, errors: int) -> None:
        path = self.folder / MANIFEST
        with _locked(self.folder):
            doc = self._read_manifest()
            if not isinstance(doc.get("settings"), dict):
                doc = {**doc, "settings": self.settings}
            doc["shards"][f"{shard.name}.parquet"] = {"source": shard.source, "rows": rows, "errors": errors}
            _write_json(path, doc)

    def claim(self, shard: Shard, wait: bool = False) -> bool:
        """Take the shard for this process, so that another run into the same folder leaves it alone;
        False when another process holds it (with ``wait``, block until it lets go). A claim ends
        with :meth:`release`, :meth:`close`, or the process."""
        if self._claims is None:
            self._claims = _Claims(self.folder / _CLAIMS)
        return self._claims.take(shard.name, wait)

    def release(self, shard: Shard) -> None:
        if self._claims is not None:
            self._claims.give_back(shard.name)

    def close(self) -> None:
        """Let go of every claim."""
        if self._claims is not None:
            self._claims.close()
            self._claims = None

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
        # Left by a killed run (this process holds the shard's claim, so no live run here is writing one).
        remove_stale_temps(self.folder, final.name)
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
    """What a run did: shards selected, written now, already done before, written meanwhile by another
    run into the same folder; shards that could not be read; rows scored and failed this run; time.

    ``total_scored``, ``total_failed`` and ``shards_with_errors`` count every selected shard in the
    output folder, earlier runs' included, so a resumed job ends as an uninterrupted one would;
    ``causes`` splits this run's failed rows by :data:`CAUSES` (``other`` for the rest)."""

    out: Path
    shards: int
    written: int
    already_done: int
    failed: list[ShardFailure]
    images: int  # rows scored this run
    errors: int  # rows with an error this run
    seconds: float
    elsewhere: int = 0
    total_scored: int = 0
    total_failed: int = 0
    shards_with_errors: int = 0
    causes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every selected shard read and every row scored."""
        return not self.failed and not self.total_failed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


class Tracker:
    """Counts a run's progress and tells the caller; shared by both engines."""

    def __init__(self, plan: DatasetPlan, pending: int, done: dict[Shard, tuple[int, int]],
                 progress: Callable[[DatasetProgress], None] | None):
        """``done``: the selected shards already written, with (rows, rows with an error), as
        :meth:`Output.pending` gives them."""
        self.plan, self.pending, self.already_done, self.callback = plan, pending, len(done), progress
        self.start = time.perf_counter()
        self.written = 0
        self.elsewhere = 0
        self.images = 0
        self.errors = 0
        self.failed: list[ShardFailure] = list(plan.problems)
        self.partial = 0.0  # fraction of the shard in flight
        self.causes: dict[str, int] = {}
        self.bad_shards = 0  # shards written this run holding failed rows
        self.earlier = [0, 0, 0]  # rows, failed rows, shards with failed rows: written by other runs
        for rows, errors in done.values():
            self.written_before(rows, errors)

    def _emit(self, failure: ShardFailure | None = None) -> None:
        if self.callback is not None:
            finished = self.written + self.elsewhere + len(self.failed) - len(self.plan.problems)
            fraction = (finished + self.partial) / self.pending if self.pending else 1.0
            self.callback(DatasetProgress(len(self.plan.shards), self.already_done + self.written + self.elsewhere,
                                          self.images, self.errors, time.perf_counter() - self.start,
                                          min(fraction, 1.0), failure))

    def scored(self, n: int = 1, partial: float | None = None) -> None:
        self.images += n
        if partial is not None:
            self.partial = partial
        self._emit()

    def written_before(self, rows: int, errors: int) -> None:
        """A selected shard another run wrote (before this one, or while it ran)."""
        self.earlier[0] += rows
        self.earlier[1] += errors
        self.earlier[2] += errors > 0

    def written_elsewhere(self, rows: int, errors: int) -> None:
        self.elsewhere += 1
        self.written_before(rows, errors)
        self.partial = 0.0
        self._emit()

    def shard_done(self, rows: Sequence[Row]) -> None:
        self.written += 1
        bad = [r for r in rows if r.error is not None]
        self.errors += len(bad)
        self.bad_shards += bool(bad)
        for r in bad:
            cause = r.cause if r.cause in CAUSES else "other"
            self.causes[cause] = self.causes.get(cause, 0) + 1
        self.partial = 0.0
        self._emit()

    def shard_failed(self, failure: ShardFailure) -> None:
        self.failed.append(failure)
        self.partial = 0.0
        self._emit(failure)

    def summary(self) -> DatasetSummary:
        rows, errors, bad_shards = self.earlier
        return DatasetSummary(out=self.plan.job.out, shards=len(self.plan.shards), written=self.written,
                              already_done=self.already_done, failed=self.failed,
                              images=self.images - self.errors, errors=self.errors,
                              seconds=time.perf_counter() - self.start, elsewhere=self.elsewhere,
                              total_scored=self.images - self.errors + rows - errors,
                              total_failed=self.errors + errors,
                              shards_with_errors=self.bad_shards + bad_shards,
                              causes=dict(self.causes))


def _read(shard: Shard, job: DatasetJob) -> list[Sample]:
    return read_shard(shard, job.caption_column, job.image_column, job.prompt, image_ext=job.image_ext,
                      caption_ext=job.caption_ext)


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
            rows.append(Row(s.key, shard.source, s.prompt, error=s.error, cause=s.cause))
        else:
            r = next(stream)
            rows.append(Row(s.key, shard.source, s.prompt, dict(r.scores), r.error,
                            BAD_IMAGE if r.error is not None else None))
    return rows


def claim_shards(output: Output, shards: Sequence[Shard], tracker: Tracker, deferred: list[Shard]) -> Iterator[Shard]:
    """The shards this process takes, in order, each claimed as it is yielded; those another run
    holds go to ``deferred``, and those another run wrote since :meth:`Output.pending` are counted."""
    for shard in shards:
        if not output.claim(shard):
            deferred.append(shard)
        elif output.path_for(shard).exists():
            output.release(shard)
            tracker.written_elsewhere(*output.counts(shard))
        else:
            yield shard


def wait_for_shard(output: Output, shard: Shard, tracker: Tracker) -> bool:
    """Wait until the run holding ``shard`` lets go; True when it wrote it (counted), else the shard
    is this process's to score (claimed). Call it holding no claim, so no two runs wait on each other."""
    output.claim(shard, wait=True)
    if output.path_for(shard).exists():
        output.release(shard)
        tracker.written_elsewhere(*output.counts(shard))
        return True
    return False


def score_dataset(plan: DatasetPlan, scorer, progress: Callable[[DatasetProgress], None] | None = None,
                  output: Output | None = None) -> DatasetSummary:
    """Score every pending shard of ``plan`` on this process with ``scorer`` and write its parquet file.

    The next shard is read while this one is scored; images decode in the scorer's thread pool
    through the same preprocessing as image files. A shard that cannot be read is reported through
    ``progress`` and skipped; the summary lists it. Runs sharing the output folder split the work:
    a shard another process is scoring is left to it, then waited for at the end, and scored here
    only if that process stopped without writing it.
    """
    spec = ModelSpec.from_scorer(scorer)
    output = output or open_output(plan, spec)
    if output.settings["weights"] != spec.identity or output.settings["dtype"] != spec.dtype:
        raise OutputError(f"the loaded model ({spec.identity}, {spec.dtype}) is not the one the output was "
                          f"opened for ({output.settings['weights']}, {output.settings['dtype']})")
    todo, done = output.pending(plan.shards)
    tracker = Tracker(plan, len(todo), done, progress)
    job = plan.job

    def finish(shard: Shard, samples: list[Sample] | ShardError) -> None:
        try:
            if isinstance(samples, ShardError):
                tracker.shard_failed(ShardFailure(shard.source, str(samples)))
                return
            rows = _score_shard(scorer, shard, samples, job, tracker)
            output.write(shard, rows)
            tracker.shard_done(rows)
        finally:
            output.release(shard)

    def read(shard: Shard) -> list[Sample] | ShardError:
        try:
            return _read(shard, job)
        except ShardError as exc:
            return exc

    try:
        deferred: list[Shard] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mps-shard-read") as reader:
            mine = claim_shards(output, todo, tracker, deferred)
            shard = next(mine, None)
            ahead: Future | None = reader.submit(read, shard) if shard is not None else None
            while shard is not None:
                current, samples_of = shard, ahead
                shard = next(mine, None)
                ahead = reader.submit(read, shard) if shard is not None else None
                finish(current, samples_of.result())
        for shard in deferred:  # holding no claim now
            if not wait_for_shard(output, shard, tracker):
                finish(shard, read(shard))
    finally:
        output.close()
    return tracker.summary()
