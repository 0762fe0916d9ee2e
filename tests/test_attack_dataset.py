"""Crafted inputs against ``mps dataset``: broken and hostile shards, a tampered output folder, two
runs into one ``--out`` at once, ``kill -9`` mid-shard. Each case must end in one line naming the
culprit, the documented exit code, and output that equals a clean run's, row for row.

Shards are built here from tiny generated images; the model is the fixture checkpoint (in-process
through ``run_cli``, except where the process itself is attacked)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import struct
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from conftest import WEIGHTS, forked_mps, kill_hard, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = ["--weights", str(WEIGHTS), "--device", "cpu", "--dtype", "fp32"]
PROMPTS = ["a red fox in the snow", "three blue cubes on a table", "portrait of an old fisherman"]
TOL = 1e-5


def png(seed: int, size=(24, 18)) -> bytes:
    """A small PNG of noise: decodes fast, and every seed scores differently."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels with a token IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def samples(prefix: str, n: int, seed: int = 0, ext: str = "png") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}{i:03d}.{ext}", png(seed + i)), (f"{prefix}{i:03d}.txt", PROMPTS[i % 3].encode())]
    return out


def read_rows(out: Path) -> dict:
    """{(shard file, key): row} over the output parquet files; no row may appear twice."""
    found = {}
    for f in sorted(out.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            k = (Path(row["shard"]).name, row["key"])
            assert k not in found, k
            found[k] = row
    return found


def assert_same_rows(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, row in want.items():
        assert got[k]["prompt"] == row["prompt"] and got[k]["error"] == row["error"], k
        if row["error"] is None:
            assert abs(got[k]["overall"] - row["overall"]) <= TOL, k


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def dataset(*args: str):
    return run_cli("dataset", *args, *MODEL)


def one_error_line(stderr: str, culprit: str) -> None:
    lines = [line for line in stderr.splitlines() if culprit in line]
    assert len(lines) == 1 and lines[0].startswith("mps: error:"), stderr
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- exit codes and the mixed set


def test_a_mixed_set_reads_with_one_command_line_and_image_column_is_parquet_only(tmp_path, scorer):
    """The reported case: --image-column names the parquet files' column; the tars' images are found by
    extension, so the tar samples are scored too (they all failed before, and the run exited 0)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.tar").write_bytes(tar_of(samples("t", 3, seed=10)))
    pq.write_table(pa.table({"key": ["p0", "p1"], "picture": [png(20), png(21)], "text": PROMPTS[:2]}),
                   src / "b.parquet")
    res = dataset(str(src / "a.tar"), str(src / "b.parquet"), "--out", str(tmp_path / "out"),
                  "--image-column", "picture", "--caption-column", "text")
    assert res.returncode == 0, res.stderr
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 5 and all(r["error"] is None for r in rows.values())
    want = scorer.score([Image(png(10)), Image(png(20))], [PROMPTS[0], PROMPTS[0]])
    assert abs(rows["a.tar", "t000"]["overall"] - want[0].scores["overall"]) <= TOL
    assert abs(rows["b.parquet", "p0"]["overall"] - want[1].scores["overall"]) <= TOL
    assert res.stdout.startswith("2 shards (2 written, 0 failed), 5 images scored, 0 errors")


def Image(data: bytes):
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(data))


def test_failed_rows_exit_1_with_the_count_and_the_grammar_of_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = samples("g", 2, seed=30) + [("bad.png", b"\x89PNG\r\n\x1a\n not really"), ("bad.txt", b"x"),
                                          ("nocap.png", png(33))]
    (src / "mixed.tar").write_bytes(tar_of(members))
    (src / "one.tar").write_bytes(tar_of(samples("o", 1, seed=40)))
    res = dataset(str(src / "mixed.tar"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines()[-1] == "mps: 2 scored, 2 failed in 1 shard", res.stderr
    assert "Traceback" not in res.stderr
    one = dataset(str(src / "one.tar"), "--out", str(tmp_path / "one"))
    assert one.returncode == 0 and one.stdout.startswith("1 shard (1 written, 0 failed), 1 image scored, 0 errors")
    # A rerun scores nothing, and ends as the first run did: the failed rows are still in --out.
    again = dataset(str(src / "mixed.tar"), "--out", str(tmp_path / "out"))
    assert again.returncode == 1 and again.stderr.splitlines()[-1] == "mps: 2 scored, 2 failed in 1 shard"
    assert again.stdout.startswith("1 shard (1 already done, 0 written, 0 failed), 0 images scored")


@pytest.mark.parametrize("case", ["no image member", "no caption", "not images"])
def test_a_run_where_every_row_failed_says_why_in_one_line(tmp_path, case):
    src = tmp_path / "s.tar"
    if case == "no image member":  # the images are KEY.seg.png: not an extension looked for by default
        members = [(f"k{i}.seg.png", png(50 + i)) for i in range(3)] + [(f"k{i}.txt", b"a fox") for i in range(3)]
        hint = "--image-ext"
    elif case == "no caption":
        members = [(f"k{i}.png", png(50 + i)) for i in range(3)] + [(f"k{i}.json", b'{"url": "x"}') for i in range(3)]
        hint = "--caption-ext"
    else:
        members = [(f"k{i}.jpg", b"\xff\xd8\xff garbage " * 20) for i in range(3)] + \
            [(f"k{i}.txt", b"a fox") for i in range(3)]
        hint = "do not decode"
    src.write_bytes(tar_of(members))
    res = dataset(str(src), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    why = [line for line in res.stderr.splitlines() if "no row was scored" in line]
    assert len(why) == 1 and hint in why[0] and why[0].startswith("mps: error: no row was scored (3 failed)"), \
        res.stderr
    assert res.stderr.splitlines()[-1] == "mps: 0 scored, 3 failed in 1 shard"
    if case == "no image member":  # what the line says to do works
        fixed = dataset(str(src), "--out", str(tmp_path / "fixed"), "--image-ext", "seg.png")
        assert fixed.returncode == 0 and "3 images scored, 0 errors" in fixed.stdout, fixed.stderr


def test_a_source_that_names_no_shard_writes_nothing(tmp_path):
    res = dataset(str(tmp_path / "nope.tar"), "--out", str(tmp_path / "d"))
    assert res.returncode == 1 and not res.stdout
    assert res.stderr.splitlines() == [
        f"mps: error: {tmp_path / 'nope.tar'}: no such file",
        f"mps: error: nothing to score: no source names a .tar or .parquet shard; {tmp_path / 'd'} not written"]
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- broken and hostile shards


def _broken_shards(folder: Path) -> dict[str, str]:
    """{file name: what its one line must say}, beside two good shards."""
    good = tar_of(samples("k", 2, seed=60))
    gz = gzip.compress(good)
    table = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"], "image": [png(1), png(2)], "caption": ["x", "y"]}), table)
    parquet = table.getvalue()
    huge = bytearray(tar_of([("big.png", b"0" * 600)]))
    huge[124:136] = b"77777777777\0"  # a member header claiming 8 GiB, in a 2 KB file
    huge[148:156] = b"        "
    huge[148:155] = f"{sum(huge[:512]):06o}\0".encode()
    cases = {
        "garbage.tar": (os.urandom(3000), "not a tar file"),
        "empty.tar": (b"", "not a tar file"),
        "cut.tar": (good[: len(good) // 2], "truncated"),
        "cut-header.tar": (good[:700], "truncated"),
        "cut-gz.tar.gz": (gz[: len(gz) // 2], "truncated or not a tar"),
        "not-gzip.tgz": (b"\x1f\x8b\x08" + os.urandom(200), "truncated or not a tar"),
        "huge-member.tar": (bytes(huge), "truncated"),
        "cut-pq.parquet": (parquet[: len(parquet) // 2], "unreadable parquet"),
        "magic-only.parquet": (b"PAR1PAR1", "unreadable parquet"),
        "tar-as.parquet": (good, "unreadable parquet"),
    }
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: why for name, (_, why) in cases.items()}


def test_corrupt_and_truncated_shards_are_one_line_each_and_the_rest_is_scored(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.tar").write_bytes(tar_of(samples("k", 2, seed=60)))
    pq.write_table(pa.table({"key": ["a"], "image": [png(70)], "caption": ["x"]}), src / "good-pq.parquet")
    broken = _broken_shards(src)
    sources = [str(src / n) for n in ["good.tar", "good-pq.parquet", *broken]]
    res = dataset(*sources, "--out", str(tmp_path / "out"))
    assert res.returncode == 1, res.stderr
    for name, why in broken.items():
        line = [x for x in res.stderr.splitlines() if f"{src / name}:" in x]
        assert len(line) == 1 and why in line[0] and line[0].endswith("shard skipped"), (name, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == f"mps: 3 scored, 0 failed; {len(broken)} shards not read"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["good-pq.parquet", "good.parquet"]
    assert len(read_rows(tmp_path / "out")) == 3


def test_bad_parquet_cells_are_error_rows(tmp_path):
    src = tmp_path / "cells.parquet"
    pq.write_table(pa.table({
        "key": ["ok", "null-image", "garbage", "bomb", "list-caption", "no-caption"],
        "image": [png(80), None, os.urandom(100), bomb_png(), png(81), png(82)],
        "caption": ["a fox", "a fox", "a fox", "a fox", None, " "],
    }), src)
    table = pa.table({"key": ["int"], "image": pa.array([7], pa.int64()), "caption": ["a fox"]})
    pq.write_table(table, tmp_path / "ints.parquet")
    res = dataset(str(src), str(tmp_path / "ints.parquet"), "--out", str(tmp_path / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    rows = {k: r for (_, k), r in read_rows(tmp_path / "out").items()}
    assert rows["ok"]["error"] is None
    assert "no image in column image" in rows["null-image"]["error"]
    assert "not an image" in rows["garbage"]["error"] or "cannot identify" in rows["garbage"]["error"]
    assert "bomb" in rows["bomb"]["error"] or "pixels" in rows["bomb"]["error"]
    assert "no caption" in rows["list-caption"]["error"] and "no caption" in rows["no-caption"]["error"]
    assert "holds int, not image bytes" in rows["int"]["error"]
    assert res.stderr.splitlines()[-1] == "mps: 1 scored, 6 failed in 2 shards"


def test_tar_member_names_that_climb_out_write_nothing_outside_out(tmp_path):
    """Member names are keys, never paths: `..`, absolute names, links and devices write nothing anywhere."""
    src = tmp_path / "src"
    src.mkdir()
    tag = f"mps-attack-{os.getpid()}-{time.monotonic_ns()}"
    climbing = [f"../../{tag}-escape", f"/tmp/{tag}-absolute", f"a/../../../{tag}-up"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, key in enumerate(climbing):
            for name, data in ((f"{key}.png", png(90 + i)), (f"{key}.txt", b"a fox")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.SYMTYPE, "link.png"), (tarfile.LNKTYPE, "hard.png"), (tarfile.CHRTYPE, "dev.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        for ext in ("txt",):
            data = b"a fox"
            info = tarfile.TarInfo(f"link.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (src / "climb.tar").write_bytes(buf.getvalue())
    before = files_under(tmp_path)
    out = tmp_path / "work" / "out"
    res = dataset(str(src / "climb.tar"), "--out", str(out))
    after = files_under(tmp_path)
    created = after - before
    assert all(p.startswith(str(Path("work") / "out")) or p == "work" for p in created), created
    assert {p.name for p in out.iterdir()} <= {"climb.parquet", "_manifest.json", ".manifest.lock", ".claims.lock"}
    rows = {k: r for (_, k), r in read_rows(out).items()}
    assert {k for k, r in rows.items() if r["error"] is None} == set(climbing)
    assert "no image member" in rows["link"]["error"]  # the link is not followed, its caption has no image
    for place in {Path("/tmp"), Path.cwd(), Path.cwd().parent, Path.cwd().parent.parent, *out.parents}:
        assert not list(place.glob(f"{tag}*")), place
    assert res.returncode == 1 and res.stderr.splitlines()[-1] == "mps: 3 scored, 1 failed in 1 shard"


def test_garbage_images_and_bombs_in_a_tar_are_error_rows(tmp_path):
    members = samples("ok", 2, seed=100) + [
        ("bomb.png", bomb_png()), ("bomb.txt", b"a fox"),
        ("cut.png", png(7)[:60]), ("cut.txt", b"a fox"),
        ("noise.webp", os.urandom(500)), ("noise.txt", b"a fox"),
        ("empty.jpg", b""), ("empty.txt", b"a fox"),
        ("html.png", b"<html><script>alert(1)</script></html>"), ("html.txt", b"a fox"),
    ]
    (tmp_path / "g.tar").write_bytes(tar_of(members))
    start = time.monotonic()
    res = dataset(str(tmp_path / "g.tar"), "--out", str(tmp_path / "out"))
    assert time.monotonic() - start < 60
    assert res.returncode == 1 and "Traceback" not in res.stderr
    rows = {k: r for (_, k), r in read_rows(tmp_path / "out").items()}
    assert {k for k, r in rows.items() if r["error"] is None} == {"ok000", "ok001"}
    for key in ("bomb", "cut", "noise", "empty", "html"):
        assert rows[key]["overall"] is None and rows[key]["error"].startswith(f"{tmp_path / 'g.tar'}:{key}."), key
    assert res.stderr.splitlines()[-1] == "mps: 2 scored, 5 failed in 1 shard"


# --------------------------------------------------------------------------- a tampered output folder


@pytest.fixture
def written(tmp_path):
    """A shard scored into --out once."""
    (tmp_path / "s.tar").write_bytes(tar_of(samples("k", 2, seed=110)))
    out = tmp_path / "out"
    assert dataset(str(tmp_path / "s.tar"), "--out", str(out)).returncode == 0
    return tmp_path / "s.tar", out


@pytest.mark.parametrize("tamper, code, says", [
    ("not json", 2, "unreadable manifest"),
    ("a list", 2, "unreadable manifest"),
    ("shards a list", 2, "unreadable manifest"),
    ("other dtype", 2, "dtype bf16, not fp32"),
    ("other threshold", 2, "mask threshold 0.5, not 0.3"),
    ("garbage counts", 0, None),
    ("deleted", 0, None),
    ("foreign parquet", 2, "not written by mps dataset"),
    ("truncated parquet", 2, "unreadable output file"),
])
def test_a_tampered_manifest_or_output_file_is_one_line(written, tamper, code, says):
    src, out = written
    manifest = out / "_manifest.json"
    doc = json.loads(manifest.read_text())
    if tamper == "not json":
        manifest.write_text("{ this is not json")
    elif tamper == "a list":
        manifest.write_text("[]")
    elif tamper == "shards a list":
        manifest.write_text(json.dumps({**doc, "shards": []}))
    elif tamper == "other dtype":
        manifest.write_text(json.dumps({**doc, "settings": {**doc["settings"], "dtype": "bf16"}}))
    elif tamper == "other threshold":
        manifest.write_text(json.dumps({**doc, "settings": {**doc["settings"], "mask_threshold": 0.5}}))
    elif tamper == "garbage counts":
        manifest.write_text(json.dumps({**doc, "shards": {"s.parquet": {"rows": "many", "errors": -1}}}))
    elif tamper == "deleted":
        manifest.unlink()
    elif tamper == "foreign parquet":
        manifest.unlink()
        pq.write_table(pa.table({"key": ["x"]}), out / "s.parquet")
    elif tamper == "truncated parquet":
        data = (out / "s.parquet").read_bytes()
        (out / "s.parquet").write_bytes(data[: len(data) // 2])
        manifest.write_text(json.dumps({**doc, "shards": {}}))
    res = dataset(str(src), "--out", str(out))
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    if says is not None:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and lines[0].startswith("mps: error:"), lines
        assert lines[0].count("sha256:") == 0 and len(lines[0]) < 300, lines[0]
    else:
        assert "1 already done" in res.stdout
        fixed = json.loads(manifest.read_text())
        assert fixed["shards"]["s.parquet"]["rows"] == 2 and fixed["shards"]["s.parquet"]["errors"] == 0


def test_the_settings_error_names_only_what_differs(written):
    src, out = written
    res = dataset(str(src), "--out", str(out), "--dim", "overall", "--dim", "detail", "--prompt", "a fox")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "dimensions overall, not overall, detail" in line
    assert "prompt the captions, not 'a fox'" in line
    assert "weights" not in line and "dtype" not in line and "threshold" not in line


# --------------------------------------------------------------------------- the process attacked


def _popen(*args: str) -> subprocess.Popen:
    """``mps dataset`` in a process of its own, a fork of :func:`forked_mps`: what counts is being another
    process (its locks, its files, dying by SIGKILL: conftest ``kill_hard``), not how the interpreter starts."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([*forked_mps(), "dataset", *args, *MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _clean_run(src: Path, out: Path) -> dict:
    res = dataset(str(src), "--out", str(out), "--batch-size", "2")
    assert res.returncode in (0, 1), res.stderr
    return read_rows(out)


def test_two_runs_into_one_out_at_once_split_the_work(tmp_path, scorer):
    """Two runs at once, made deterministic: this test process claims shards 1 and 2, as a run scoring
    them would, while a real `mps dataset` process scores the folder. That run scores 0 and 3, leaves 1
    and 2, and waits; then a second `mps dataset` run here writes 1, and 2 is abandoned, which the
    waiting run scores itself. Every shard is scored once, and the rows are a clean run's."""
    from mps_cli.dataset import DatasetJob, ModelSpec, open_output, plan_dataset

    src = tmp_path / "src"
    src.mkdir()
    for n in range(4):
        (src / f"{n}.tar").write_bytes(tar_of(samples(f"s{n}-", 3, seed=200 + 10 * n)))
    out = tmp_path / "out"
    plan = plan_dataset(DatasetJob((str(src),), out))
    other = open_output(plan, ModelSpec.from_scorer(scorer))
    held = {s.name: s for s in plan.shards if s.name in ("1", "2")}
    assert all(other.claim(s) for s in held.values())
    proc = _popen(str(src), "--out", str(out))
    try:
        deadline = time.monotonic() + 90
        while {p.name for p in out.glob("*.parquet")} != {"0.parquet", "3.parquet"}:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None  # waiting for the held shards, not finished without them
        # The second run writes 1; ending, it closes its claims file, which lets go of this process's
        # claims, 2 included (POSIX record locks belong to the process): 2 is abandoned.
        here = dataset(str(src / "1.tar"), "--out", str(out))
        assert here.returncode == 0 and here.stdout.startswith("1 shard (1 written, 0 failed)"), here.stderr
        other.close()
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert stdout.startswith("4 shards (3 written, 1 by another run, 0 failed), 9 images scored"), stdout
    assert_same_rows(read_rows(out), _clean_run(src, tmp_path / "clean"))


def test_kill_9_mid_shard_then_resume_equals_a_clean_run_and_ends_the_same(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(3):
        members = samples(f"s{n}-", 12, seed=400 + 10 * n) + [(f"s{n}-bad.png", b"not a png"),
                                                              (f"s{n}-bad.txt", b"a fox")]
        (src / f"{n}.tar").write_bytes(tar_of(members))
    out = tmp_path / "out"
    proc = _popen(str(src), "--out", str(out), "--batch-size", "1")
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        kill_hard(proc)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(list(out.glob("*.parquet"))) < 3
    resumed = dataset(str(src), "--out", str(out), "--batch-size", "2")
    clean_out = tmp_path / "clean"
    clean = dataset(str(src), "--out", str(clean_out), "--batch-size", "2")
    assert resumed.returncode == clean.returncode == 1
    assert resumed.stderr.splitlines()[-1] == clean.stderr.splitlines()[-1] == "mps: 36 scored, 3 failed in 3 shards"
    assert_same_rows(read_rows(out), read_rows(clean_out))
    assert not list(out.glob(".*.tmp"))
    manifest, fresh = (json.loads((d / "_manifest.json").read_text()) for d in (out, clean_out))
    assert manifest["shards"] == fresh["shards"]


def test_an_out_that_is_a_file_says_so_and_leaves_it(tmp_path):
    """'--out results.parquet' (a file where a folder goes) read 'output folder is not writable (File exists)'."""
    (tmp_path / "s.tar").write_bytes(tar_of(samples("k", 1, seed=70)))
    taken = tmp_path / "results.parquet"
    taken.write_bytes(b"mine")
    res = dataset(str(tmp_path / "s.tar"), "--out", str(taken))
    assert res.returncode == 2 and not res.stdout
    assert [line for line in res.stderr.splitlines() if "error" in line] == [
        f"mps: error: {taken}: is a file, not a folder (the output is a folder of parquet files)"]
    assert taken.read_bytes() == b"mine"
