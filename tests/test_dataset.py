"""``mps dataset``: shards (webdataset tars, parquet files) built here from the fixture's images and
prompts are scored exactly as ``mps score`` scores the same files, locally and on Ray; a killed run
resumes without scoring anything twice; ``--shard-index`` splits cover every shard once; bad
shards and bad samples are reported without stopping the job."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from conftest import IMAGES, WEIGHTS, forked_mps, kill_hard, mps_executable  # noqa: E402

from mps_cli.cli import app  # noqa: E402
from mps_cli.dataset import MANIFEST, DatasetJob, ModelSpec, plan_dataset, score_dataset  # noqa: E402
from mps_cli.inputs.shards import expand_braces, find_shards  # noqa: E402

DIMS = ("overall", "aesthetics", "detail", "alignment")
TOL = 1e-5
MODEL = ["--weights", str(WEIGHTS), "--device", "cpu", "--dtype", "fp32"]


def image_names() -> list[str]:
    return sorted(p.name for p in IMAGES.iterdir())


def prompts_of(expected: dict) -> list[str]:
    return sorted({r["prompt"] for r in expected["scores"]})


def write_tar(path: Path, samples: list[tuple[str, str, str | None, bool]], extra: bool = True) -> None:
    """samples: (key, image file name, prompt, prompt in .txt (else in .json))."""
    with tarfile.open(path, "w") as tar:
        for key, image, prompt, as_txt in samples:
            members = [(f"{key}.{image.rsplit('.', 1)[1]}", (IMAGES / image).read_bytes())]
            if prompt is not None:
                members.append((f"{key}.txt", prompt.encode()) if as_txt else
                               (f"{key}.json", json.dumps({"caption": prompt, "width": 1}).encode()))
            if extra:  # not an image, caption or json: ignored
                members.append((f"{key}.cls", b"3"))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory, expected):
    """Three tar shards and two parquet files (Hugging Face struct + caption/id; img2dataset jpg +
    text/key) holding the 7 fixture images with prompts; and what each row should be."""
    root = tmp_path_factory.mktemp("dataset")
    names, prompts = image_names(), prompts_of(expected)
    rows = {}  # (shard source, key) -> (image, prompt)
    (root / "wds").mkdir()
    for n, idx in enumerate([(0, 1, 2), (3, 4), (5, 6)]):
        source = str(root / "wds" / f"{n:05d}.tar")
        samples = [(f"s{n}-{i:03d}", names[i], prompts[i % 4], i % 2 == 0) for i in idx]
        write_tar(Path(source), samples)
        rows.update({(source, k): (img, p) for k, img, p, _ in samples})
    (root / "pq").mkdir()
    first = str(root / "pq" / "part-0.parquet")
    pq.write_table(pa.table({
        "id": [100 + i for i in range(4)],
        "image": [{"bytes": (IMAGES / names[i]).read_bytes(), "path": names[i]} for i in range(4)],
        "caption": [prompts[(i + 1) % 4] for i in range(4)],
    }), first)
    rows.update({(first, str(100 + i)): (names[i], prompts[(i + 1) % 4]) for i in range(4)})
    second = str(root / "pq" / "part-1.parquet")
    pq.write_table(pa.table({
        "key": [f"k{i}" for i in range(4, 7)],
        "jpg": [(IMAGES / names[i]).read_bytes() for i in range(4, 7)],
        "text": [prompts[(i + 2) % 4] for i in range(4, 7)],
    }), second)
    rows.update({(second, f"k{i}"): (names[i], prompts[(i + 2) % 4]) for i in range(4, 7)})
    return root, rows


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """``mps score --dim all`` on the same images as files, each with its prompt: {(image, prompt): scores}."""
    _, rows = data
    listing = tmp_path_factory.mktemp("ref") / "prompts.jsonl"
    pairs = sorted(set(rows.values()))
    listing.write_text("".join(json.dumps({"image": str(IMAGES / img), "prompt": p}) + "\n" for img, p in pairs))
    result = CliRunner().invoke(app, ["score", "--prompts", str(listing), "--dim", "all", "--json", *MODEL])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    return {(Path(d["image"]).name, d["prompt"]): d["scores"] for d in docs}


def read_out(out: Path) -> dict:
    """{(shard, key): row} over every output parquet file."""
    found = {}
    for f in sorted(out.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            assert (row["shard"], row["key"]) not in found
            found[(row["shard"], row["key"])] = row
    return found


def assert_matches(out: Path, data, reference) -> None:
    _, rows = data
    found = read_out(out)
    assert set(found) == set(rows)
    for (shard, key), row in found.items():
        image, prompt = rows[(shard, key)]
        assert row["error"] is None and row["prompt"] == prompt
        for dim in DIMS:
            assert abs(row[dim] - reference[(image, prompt)][dim]) <= TOL, (shard, key, dim)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["dtype"] == "fp32" and set(manifest["settings"]["conditions"]) == set(DIMS)
    counts = {}
    for (shard, _), _v in found.items():
        counts[shard] = counts.get(shard, 0) + 1
    assert {v["source"]: v["rows"] for v in manifest["shards"].values()} == counts


def test_brace_ranges_and_folders_expand_in_order(data):
    root, _ = data
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.parquet") == ["a/1.parquet", "a/2.parquet", "b/1.parquet", "b/2.parquet"]
    shards, problems = find_shards([str(root / "wds" / "{00000..00002}.tar"), str(root / "pq"),
                                    str(root / "wds" / "00009.tar")])
    assert [s.name for s in shards] == ["00000", "00001", "00002", "part-0", "part-1"]
    assert problems == [(str(root / "wds" / "00009.tar"), "no such file")]


def test_webdataset_and_parquet_match_mps_score(data, reference, tmp_path):
    root, _ = data
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["dataset", str(root / "wds" / "{00000..00002}.tar"), str(root / "pq"),
                                      "--out", str(out), "--dim", "all", *MODEL])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "00000.parquet", "00001.parquet", "00002.parquet", "part-0.parquet", "part-1.parquet"]
    assert_matches(out, data, reference)
    assert result.stdout.startswith("5 shards (5 written, 0 failed), 14 images scored, 0 errors")
    schema = pq.read_schema(out / "00000.parquet")
    assert schema.names == ["key", "shard", "prompt", *DIMS, "error"]
    # The same run again: every shard is already there, nothing is scored.
    again = CliRunner().invoke(app, ["dataset", str(root / "wds"), str(root / "pq"), "--out", str(out),
                                     "--dim", "all", *MODEL])
    assert again.exit_code == 0 and "5 already done, 0 written" in again.stdout
    # Other settings into the same folder: refused before scoring, one line, exit 2.
    other = CliRunner().invoke(app, ["dataset", str(root / "wds"), "--out", str(out), "--dim", "overall",
                                     "--mask-threshold", "0.5", *MODEL])
    assert other.exit_code == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "other settings" in lines[0] and "mask threshold 0.3" in lines[0], lines


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # address="local": a new instance of our own, never a Ray head another process left running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_decodes_on_cpu_tasks_beside_the_scoring_actors(local_ray, data, tmp_path):
    """Ray Data fuses stages whose resources match into one worker: decoding must stay a task stage of its
    own, or every scoring actor would decode its batches between forwards (the plan, before anything runs)."""
    import contextlib

    from mps_cli.dataset import resolve_model
    from mps_cli.engine.options import ModelOptions
    from mps_cli.ray_engine import _pipeline

    root, _ = data
    plan = plan_dataset(DatasetJob((str(root / "wds"),), tmp_path / "out"))
    spec = resolve_model(ModelOptions(weights=str(WEIGHTS), device="cpu", dtype="fp32"))
    for gpus in (0, 1):  # a CPU actor has the decode tasks' CPU count; a GPU actor does not
        ds = _pipeline(local_ray, plan.shards, plan, spec, batch_size=2, workers=1, gpus_per_worker=gpus,
                       cpus_per_worker=1)
        if not hasattr(ds, "explain"):
            pytest.skip(f"Ray {local_ray.__version__} has no Dataset.explain (it came after 2.40)")
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            ds.explain()
        optimized = shown.getvalue().split("Physical Plan (Optimized)")[1].split()
        assert "TaskPoolMapOperator[MapBatches(_decode)]" in optimized, shown.getvalue()
        assert "ActorPoolMapOperator[MapBatches(_ScoreActor)]" in optimized, shown.getvalue()


def test_ray_engine_writes_and_prints_what_the_local_engine_does_for_a_panel(local_ray, data, judges, tmp_path):
    """The console script as a Ray driver of its own (joining this process's instance, which saves starting one),
    for a panel (--model: MPS and the three judges, whose preprocessing needs all three rules, so each image is
    decoded once on the CPU tasks into a column per rule), over tars, parquet files and a tar holding a broken
    image: the rows are the local engine's (which test_webdataset_and_parquet_match_mps_score holds to mps score,
    and tests/test_judges_cli.py to each model scored alone), the broken image one error row; stdout is the
    local run's summary, stderr its lines (the error count) and the job's own progress lines: no Ray log lines,
    deprecations or worker warnings."""
    from mps_cli.dataset import resolve_model
    from mps_cli.engine.options import ModelOptions
    from mps_cli.engine.panel import load_scorer

    root, rows = data
    bad = tmp_path / "bad" / "broken.tar"
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as tar:
        for name, payload in (("b0.jpg", b"\xff\xd8 not a jpeg"), ("b0.txt", b"a red fox")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    models = "mps," + ",".join(f"{name}={path}" for name, (path, _) in sorted(judges.items()))
    options = ModelOptions(weights=str(WEIGHTS), device="cpu", dtype="fp32", model=models)
    spec = resolve_model(options, device_kind="cpu")  # what the driver plans with
    assert set(spec.rules) == {"clip", "open_clip", "letterbox"} and spec.identity == load_scorer(options).identity
    args = ["dataset", str(root / "wds"), str(root / "pq"), str(bad), "--model", models, "--dim", "all",
            "--batch-size", "2", *MODEL]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RAY_BACKEND_LOG_LEVEL")}
    proc = subprocess.run([*mps_executable(), *args, "--out", str(tmp_path / "ray"), "--engine", "ray",
                           "--ray-address", local_ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == local.exit_code == 1, proc.stderr  # 1: a row failed

    def timeless(summary: str) -> str:
        return re.sub(r", [\d.]+ s \([\d.]+ images/s\) -> .*", "", summary)

    assert timeless(proc.stdout) == timeless(local.stdout)
    assert proc.stdout.startswith("6 shards (6 written, 0 failed), 14 images scored, 1 error"), proc.stdout
    progress = re.compile(r"mps: dataset: \d/6 shards, \d+ images?, [\d.]+ images/s(, ETA [\dhms]+)?")
    lines = proc.stderr.splitlines()
    assert [line for line in lines if not progress.fullmatch(line)] == [
        line for line in local.stderr.splitlines() if not progress.fullmatch(line)], proc.stderr
    assert [line for line in lines if progress.fullmatch(line)][-1].startswith("mps: dataset: 6/6 shards, 15 images")
    outs = {engine: read_out(tmp_path / engine) for engine in ("local", "ray")}
    keys = [f"mps.{dim}" for dim in DIMS] + sorted(judges)
    assert set(outs["ray"]) == set(outs["local"]) and len(outs["ray"]) == len(rows) + 1
    for where, row in outs["ray"].items():
        want = outs["local"][where]
        assert row["error"] == want["error"], where
        for key in keys if want["error"] is None else ():
            assert row[key] == pytest.approx(want[key], abs=1e-5), (where, key)
    assert [r["error"] for r in outs["ray"].values() if r["error"]] == [
        r["error"] for r in outs["local"].values() if r["error"]] != []


def test_worker_that_cannot_load_the_model_fails_the_job_at_once_with_its_error(local_ray, data, tmp_path, capfd):
    """An actor whose model does not load (here: other weights than planned) must end the job with that
    error, typed: raised from the actor's constructor, Ray restarts it for most of a minute, prints each
    traceback on the driver's stdout, and ends with its own error wrapping ours."""
    import dataclasses

    from mps_cli.dataset import resolve_model
    from mps_cli.engine.options import ModelOptions
    from mps_cli.errors import OutputError
    from mps_cli.ray_engine import score_dataset_ray

    root, _ = data
    plan = plan_dataset(DatasetJob((str(root / "wds"),), tmp_path / "out"))
    spec = resolve_model(ModelOptions(weights=str(WEIGHTS), device="cpu", dtype="fp32"))
    spec = dataclasses.replace(spec, identity="sha256:" + "0" * 64)
    capfd.readouterr()
    with pytest.raises(OutputError, match="the weights differ between machines"):
        score_dataset_ray(plan, spec)
    assert local_ray.is_initialized()  # it joined the instance this process runs, and left it running
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    assert not list((tmp_path / "out").glob("*.parquet"))


#: A Ray CPU task's view: ``_decode`` on encoded fixture images (and one broken one), alone in a process that never
#: imports torch; prints whether torch got imported and the pixels it made.
DECODE_TASK = """
import json, sys
import numpy as np
from mps_cli.ray_engine import _decode
names, size = json.loads(sys.argv[1]), int(sys.argv[2])
data = [open(n, "rb").read() for n in names] + [b"not an image"]
n = len(data)
batch = {"index": np.arange(n), "error": np.array([""] * n, dtype=object),
         "shard_error": np.array([""] * n, dtype=object), "image": np.array(data, dtype=object),
         "label": np.array([*names, "broken.png"], dtype=object)}
one = _decode(batch, size)
panel = _decode(batch, size, ("clip", "open_clip", "letterbox"))
np.savez(sys.argv[3], one=one["pixels"], clip=panel["pixels:clip"], open_clip=panel["pixels:open_clip"],
         letterbox=np.array(panel["pixels:letterbox"][0]))
print(json.dumps({"torch": "torch" in sys.modules, "errors": [str(e) for e in one["error"]]}))
"""


def test_ray_decode_tasks_make_the_scorers_pixels_without_importing_torch(tmp_path):
    """The decode stage runs on CPU task workers that hold no model: they never import torch (1.5 s of start-up
    and 300 MB each), yet make the very pixels the scorer and a panel's rules make from the same files."""
    import numpy as np

    from mps_cli.engine.pixel_rules import pixels_by_rule
    from mps_cli.engine.preprocess import load_pixels, open_image

    names = [str(IMAGES / n) for n in ("sunset.png", "alpha.png", "portrait.jpg")]
    size = 32
    proc = subprocess.run([sys.executable, "-c", DECODE_TASK, json.dumps(names), str(size), str(tmp_path / "px.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"] is False
    assert report["errors"][:3] == ["", "", ""] and "broken.png" in report["errors"][3], report["errors"]
    got = np.load(tmp_path / "px.npz")
    for i, name in enumerate(names):
        assert np.array_equal(got["one"][i], load_pixels(name, size).numpy()), name
    rules = pixels_by_rule(open_image(names[0], keep_mode=True), size, ("clip", "open_clip", "letterbox"))
    assert np.array_equal(got["clip"][0], rules["clip"].numpy()) and np.array_equal(got["clip"][0], got["one"][0])
    assert np.array_equal(got["open_clip"][0], rules["open_clip"].numpy())
    assert np.array_equal(got["letterbox"], rules["letterbox"])


def test_scoring_actor_copies_the_read_only_pixels_ray_hands_it():
    """Ray passes batches zero-copy from its object store, read-only; a tensor sharing that memory would be
    undefined behaviour (torch warns once per process, so the warning is no test: the memory is)."""
    import numpy as np
    import torch

    from mps_cli.dataset import resolve_model
    from mps_cli.engine.options import ModelOptions
    from mps_cli.engine.preprocess import load_pixels
    from mps_cli.ray_engine import _ScoreActor

    spec = resolve_model(ModelOptions(weights=str(WEIGHTS), device="cpu", dtype="fp32"))
    actor = _ScoreActor(spec, ["overall"], ("overall",), None, 0.3, batch_size=4)
    names = image_names()[:3]
    pixels = np.stack([load_pixels(IMAGES / n, spec.image_size).numpy() for n in names])
    pixels.flags.writeable = False
    seen = []
    score_pixels = actor.scorer.score_pixels

    def spy(tensors, *args, **kwargs):
        seen.extend(tensors)
        return score_pixels(tensors, *args, **kwargs)

    actor.scorer.score_pixels = spy
    batch = {"index": np.arange(3), "error": np.array(["", "", ""], dtype=object),
             "shard_error": np.array(["", "", ""], dtype=object), "pixels": pixels,
             "prompt": np.array(["a red fox"] * 3, dtype=object), "label": np.array(names, dtype=object)}
    scored = actor(batch)
    assert len(seen) == 3 and not any(np.shares_memory(t.numpy(), pixels) for t in seen)
    want = [r.scores["overall"] for r in actor.scorer.score([IMAGES / n for n in names], "a red fox")]
    assert scored["score:overall"].tolist() == pytest.approx(want, abs=1e-6)
    assert isinstance(seen[0], torch.Tensor)


def test_missing_extras_are_one_line_usage_errors(data, tmp_path, monkeypatch):
    root, _ = data
    for module, hint in ((("ray", "ray.data"), 'pip install "mps-score[ray]"'),
                         (("pyarrow", "pyarrow.parquet"), 'pip install "mps-score[dataset]"')):
        with monkeypatch.context() as m:
            for name in module:  # as if not installed: importing it raises ImportError
                m.setitem(sys.modules, name, None)
            result = CliRunner().invoke(app, ["dataset", str(root / "wds"), "--out", str(tmp_path / "o"),
                                              "--engine", "ray", "--weights", str(tmp_path / "none.safetensors")])
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and hint in result.stderr, result.stderr


def test_shard_index_splits_cover_every_shard_once(data, reference, scorer, tmp_path):
    root, _ = data
    sources = (str(root / "wds"), str(root / "pq"))
    out = tmp_path / "split"
    everything = plan_dataset(DatasetJob(sources, out, dims=("all",))).shards
    assigned = []
    for i in range(3):  # three workers sharing one output folder and its manifest
        plan = plan_dataset(DatasetJob(sources, out, dims=("all",), shard_index=i, num_shards=3))
        assigned += plan.shards
        summary = score_dataset(plan, scorer)
        assert summary.written == len(plan.shards) and not summary.failed
    assert sorted(s.source for s in assigned) == sorted(s.source for s in everything)
    assert len(assigned) == len(everything) == 5
    assert_matches(out, data, reference)


def test_bad_inputs_are_reported_and_the_rest_scored(data, expected, tmp_path):
    root, _ = data
    names, prompts = image_names(), prompts_of(expected)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_tar(bad / "a-good.tar", [("g0", names[0], prompts[0], True)])
    # A sample whose image does not decode, one without a caption, and good ones around them.
    with tarfile.open(bad / "b-mixed.tar", "w") as tar:
        for name, payload in (("m0.png", (IMAGES / names[1]).read_bytes()), ("m0.txt", prompts[1].encode()),
                              ("m1.jpg", b"\xff\xd8 not really a jpeg"), ("m1.txt", prompts[2].encode()),
                              ("m2.png", (IMAGES / names[2]).read_bytes()), ("m2.json", b'{"url": "x"}'),
                              ("m3.webp", (IMAGES / names[3]).read_bytes()), ("m3.txt", prompts[3].encode()),
                              ("m3.npy", b"\x93NUMPY")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    whole = (root / "wds" / "00000.tar").read_bytes()
    (bad / "c-truncated.tar").write_bytes(whole[: len(whole) // 2])
    (bad / "d-cut-at-member.tar").write_bytes(whole[:512])  # a header and nothing after it
    (bad / "e-broken.parquet").write_bytes(b"PAR1 this is not parquet")
    # A folder with tars reads its tars; put the parquet beside them as its own source.
    result = CliRunner().invoke(app, ["dataset", str(bad), str(bad / "e-broken.parquet"), "--out",
                                      str(tmp_path / "out"), *MODEL])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    err = result.stderr
    for culprit in ("c-truncated.tar", "d-cut-at-member.tar", "e-broken.parquet"):
        assert sum(culprit in line and "shard skipped" in line for line in err.splitlines()) == 1, err
    assert "2 written, 3 failed" in result.stdout
    out = read_out(tmp_path / "out")
    mixed = {key: row for (shard, key), row in out.items() if shard.endswith("b-mixed.tar")}
    assert set(mixed) == {"m0", "m1", "m2", "m3"}
    assert mixed["m0"]["error"] is None and mixed["m3"]["error"] is None and mixed["m3"]["overall"] is not None
    assert "m1.jpg" in mixed["m1"]["error"] and mixed["m1"]["overall"] is None
    assert "no caption" in mixed["m2"]["error"] and mixed["m2"]["prompt"] is None
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["a-good.parquet", "b-mixed.parquet"]


def test_unwritable_out_fails_before_loading_the_model(data, tmp_path):
    root, _ = data
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # Weights that do not exist: loading the model first would be exit 3, not 2.
    result = CliRunner().invoke(app, ["dataset", str(root / "wds"), "--out", str(blocker / "out"),
                                      "--weights", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "not writable" in result.stderr


def test_remote_urls_read_through_fsspec(data, reference, scorer, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    root, rows = data
    fs = fsspec.filesystem("memory")
    for n in range(3):
        fs.pipe(f"/mps-test/wds/{n:05d}.tar", (root / "wds" / f"{n:05d}.tar").read_bytes())
    try:
        plan = plan_dataset(DatasetJob(("memory://mps-test/wds/",), tmp_path / "out", dims=("all",)))
        assert [s.name for s in plan.shards] == ["00000", "00001", "00002"]
        summary = score_dataset(plan, scorer)
    finally:
        fs.rm("/mps-test", recursive=True)
    assert summary.written == 3 and summary.images == 7
    found = read_out(tmp_path / "out")
    for (shard, key), row in found.items():
        local = str(root / "wds" / Path(shard).name)
        image, prompt = rows[(local, key)]
        assert abs(row["overall"] - reference[(image, prompt)]["overall"]) <= TOL


def test_killed_run_resumes_without_scoring_anything_twice(scorer, expected, tmp_path):
    names, prompts = image_names(), prompts_of(expected)
    src = tmp_path / "big"
    src.mkdir()
    for n in range(3):
        write_tar(src / f"{n:05d}.tar", [(f"b{n}-{i:03d}", names[i % 7], prompts[(i + n) % 4], True)
                                        for i in range(10)], extra=False)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # A fork (conftest forked_mps) that kill_hard SIGKILLs: being killed is what counts, not starting.
    proc = subprocess.Popen([*forked_mps(), "dataset", str(src), "--out", str(out), "--batch-size", "2",
                             *MODEL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        kill_hard(proc)
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert 1 <= len(written) < 3, written  # killed after its first shard, before its last
    for f in written:  # only whole files under the final names
        assert pq.read_table(out / f).num_rows == 10
    # Resume in-process, one image per model call, so the model calls count the images scored.
    plan = plan_dataset(DatasetJob((str(src),), out, batch_size=1))
    before = scorer.stats["image_batches"]
    summary = score_dataset(plan, scorer)
    assert scorer.stats["image_batches"] - before == 10 * (3 - len(written)) == summary.images
    assert summary.already_done == len(written) and summary.written == 3 - len(written)
    assert not list(out.glob(".*.tmp"))
    # Equal to an uninterrupted run.
    fresh = tmp_path / "fresh"
    score_dataset(plan_dataset(DatasetJob((str(src),), fresh)), scorer)
    resumed, clean = read_out(out), read_out(fresh)
    assert resumed.keys() == clean.keys()
    for k, row in clean.items():
        assert resumed[k]["prompt"] == row["prompt"] and resumed[k]["error"] is None
        assert abs(resumed[k]["overall"] - row["overall"]) <= TOL  # batches of 2, 1 and 4 differ in rounding
    manifest, fresh_manifest = (json.loads((d / MANIFEST).read_text()) for d in (out, fresh))
    assert manifest["shards"] == fresh_manifest["shards"] and manifest["settings"] == fresh_manifest["settings"]
    assert manifest["settings"]["weights"] == ModelSpec.from_scorer(scorer).identity
