"""``mps eval``: the paper's accuracies (mps-model.md §6) on small benchmarks over the fixture images.

Expected accuracies are worked out here from expected.json's scores with a deliberately plain
reading of §6, never from mps_cli.evaluate.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, WEIGHTS, forked_mps, kill_hard, run_cli
from PIL import Image

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
FISHER = "portrait of an old fisherman with weathered hands, 35mm photo"
CUBES = "three blue cubes stacked on top of a wooden table"
CAFE = "A cozy café interior — warm light, plants & books"
ALL_DIMS = ("overall", "aesthetics", "detail", "alignment")
# twin.png is a byte-for-byte copy of crop.png: the model must score the two exactly alike.
TWIN_OF = {"twin.png": "crop.png"}


# ---------------------------------------------------------------- §6, written out plainly

def ir_accuracy(groups):
    """ImageReward: pooled over pairs whose human ranks differ; a model tie is wrong."""
    right = total = 0
    for ranks, scores in groups:
        for i, j in itertools.combinations(range(len(ranks)), 2):
            if ranks[i] == ranks[j]:
                continue
            total += 1
            if ranks[i] < ranks[j]:
                right += scores[i] > scores[j]
            else:
                right += scores[j] > scores[i]
    return right / total, total


def hpd_accuracy(groups):
    """HPD v2: per prompt 1 - w / C(n, 2), w = pairs the model strictly orders the wrong way; mean."""
    per_prompt = []
    for ranks, scores in groups:
        n = len(ranks)
        w = 0
        for i, j in itertools.combinations(range(n), 2):
            if ranks[i] < ranks[j] and scores[i] < scores[j]:
                w += 1
            if ranks[i] > ranks[j] and scores[i] > scores[j]:
                w += 1
        per_prompt.append(1 - w / (n * (n - 1) / 2))
    return sum(per_prompt) / len(per_prompt)


@pytest.fixture(scope="module")
def golden(expected):
    """(prompt, image, dim) -> the original implementation's score."""
    table = {(r["prompt"], r["image"], r["dim"]): r["score"] for r in expected["scores"]}
    for twin, original in TWIN_OF.items():
        for (prompt, image, dim), score in list(table.items()):
            if image == original:
                table[(prompt, twin, dim)] = score
    return table


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The fixture images (copied to a temp folder, never into the repo) plus an identical twin."""
    root = tmp_path_factory.mktemp("bench-images")
    for f in IMAGES.iterdir():
        shutil.copyfile(f, root / f.name)
    for twin, original in TWIN_OF.items():
        shutil.copyfile(IMAGES / original, root / twin)
    return root


def groups_for(items, golden, dim, paths_key, ranks_key):
    """(ranks, golden scores) per item; an item with an image the fixture lacks is skipped."""
    out = []
    for item in items:
        if any((item["prompt"], Path(p).name, dim) not in golden for p in item[paths_key]):
            continue
        out.append((item[ranks_key], [golden[(item["prompt"], Path(p).name, dim)] for p in item[paths_key]]))
    return out


def run_json(*args, env=None):
    proc = run_cli("eval", *args, "--weights", str(WEIGHTS), "--device", "cpu", "--json", env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


# ---------------------------------------------------------------- ImageReward

IR_ITEMS = [
    # portrait.jpg and alpha.png tied by people: that pair is left out.
    {"id": "fox", "prompt": FOX, "generations": ["sunset.png", "portrait.jpg", "alpha.png", "palette.gif", "gray.png"],
     "ranking": [1, 2, 2, 3, 4]},
    # crop.png vs its twin: a model tie, which ImageReward counts as wrong; wide/sunset tied by people.
    {"id": "cubes", "prompt": CUBES, "generations": ["crop.png", "twin.png", "wide.webp", "sunset.png"],
     "ranking": [1, 2, 3, 3]},
    # an image that does not exist: the whole item is skipped and counted.
    {"id": "cafe", "prompt": CAFE, "generations": ["palette.gif", "gray.png", "missing.png"], "ranking": [1, 2, 3]},
    {"id": "fisher", "prompt": FISHER, "generations": ["portrait.jpg", "wide.webp", "gray.png"], "ranking": [2, 1, 3]},
    # people tied everything: no pair counts, nothing to skip.
    {"id": "all-tied", "prompt": FISHER, "generations": ["alpha.png", "crop.png"], "ranking": [1, 1]},
]


def test_imagereward_accuracy_ties_missing_and_cache(tmp_path, image_root, golden):
    bench = tmp_path / "ir-test.json"
    bench.write_text(json.dumps(IR_ITEMS))
    cache = tmp_path / "scores.sqlite"
    proc, doc = run_json("imagereward", str(bench), "--images-root", str(image_root), "--dim", "all",
                         "--cache", str(cache))
    assert proc.returncode == 1, proc.stderr  # an image was skipped
    assert "missing.png" in proc.stderr and "cafe" in proc.stderr

    assert doc["benchmark"] == "imagereward"
    assert doc["skipped"] == 1
    assert [p["image"].endswith("missing.png") for p in doc["problems"]] == [True]
    for dim in ALL_DIMS:
        want, pairs = ir_accuracy(groups_for(IR_ITEMS, golden, dim, "generations", "ranking"))
        assert doc["accuracy"][dim] == pytest.approx(want, abs=1e-12), dim
        assert doc["pairs"] == pairs
    # fox: C(5,2) - 1 human tie = 9; cubes: C(4,2) - 1 = 5; fisher: 3 -> 17 pairs
    assert doc["pairs"] == 17
    assert doc["human_ties"] == 3  # fox 1, cubes 1, all-tied 1
    assert doc["prompts"] == 3
    # the model tie counts as wrong: scored as right, overall would be one pair higher
    tie_right = ir_accuracy(groups_for(IR_ITEMS, golden, "overall", "generations", "ranking"))[0] + 1 / 17
    assert doc["accuracy"]["overall"] != pytest.approx(tie_right)
    # distinct (image content, prompt) of the usable items; twin shares crop's content
    assert doc["scored"] == 5 + 3 + 3 and doc["cached"] == 0

    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    assert rows == 11 * 4

    # A second run over the same images costs no model time, and prints the table.
    again = run_cli("eval", "imagereward", str(bench), "--images-root", str(image_root), "--dim", "all",
                    "--cache", str(cache), "--weights", str(WEIGHTS), "--device", "cpu")
    assert again.returncode == 1, again.stderr
    assert "0 images scored, 11 from cache" in again.stdout
    overall_row = next(line for line in again.stdout.splitlines() if "overall" in line)
    assert f"{100 * doc['accuracy']['overall']:.1f}" in overall_row and "67.5" in overall_row
    assert "read through their condition" in again.stdout
    assert "missing.png" not in again.stdout  # problems go to stderr only
    assert "missing.png" in again.stderr


# ---------------------------------------------------------------- HPD v2

HPD_ITEMS = [
    {"prompt": FOX, "image_path": ["sunset.png", "portrait.jpg", "alpha.png", "gray.png", "palette.gif",
                                   "wide.webp", "crop.png", "twin.png"],
     "rank": [3, 1, 4, 2, 7, 5, 6, 8]},
    # twin.png ranked apart from crop.png by people, tied by the model: not wrong in HPD v2.
    {"prompt": CAFE, "image_path": ["palette.gif", "portrait.jpg", "twin.png", "crop.png"], "rank": [1, 2, 3, 4]},
    {"prompt": CUBES, "image_path": ["gray.png", "wide.webp", "sunset.png"], "rank": [1, 3, 2]},
    {"prompt": FISHER, "image_path": ["alpha.png", "gone/nothing.webp"], "rank": [1, 2]},
    # a file that is there but is no image: skipped too, the others unaffected
    {"prompt": FISHER, "image_path": ["crop.png", "corrupt.png"], "rank": [2, 1]},
]


def test_hpdv2_accuracy_per_prompt_mean_and_default_cache(tmp_path, image_root, golden):
    bench = tmp_path / "test.json"
    bench.write_text(json.dumps(HPD_ITEMS))
    root = tmp_path / "hpd-images"
    shutil.copytree(image_root, root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    xdg = tmp_path / "xdg"
    proc, doc = run_json("hpdv2", str(bench), "--images-root", str(root), "--dim", "overall", "--dim", "detail",
                         env={"XDG_CACHE_HOME": str(xdg), "MPS_CACHE_DIR": ""})
    assert proc.returncode == 1, proc.stderr
    assert "nothing.webp" in proc.stderr and "corrupt.png" in proc.stderr
    assert sorted(Path(p["image"]).name for p in doc["problems"]) == ["corrupt.png", "nothing.webp"]
    assert doc["benchmark"] == "hpdv2"
    assert set(doc["accuracy"]) == {"overall", "detail"}
    for dim in ("overall", "detail"):
        want = hpd_accuracy(groups_for(HPD_ITEMS, golden, dim, "image_path", "rank"))
        assert doc["accuracy"][dim] == pytest.approx(want, abs=1e-12), dim
    # the model tie is not wrong: counted as wrong, the café prompt would lose 1/6 of its pairs
    tie_wrong = hpd_accuracy(groups_for(HPD_ITEMS, golden, "overall", "image_path", "rank")) - (1 / 6) / 3
    assert doc["accuracy"]["overall"] != pytest.approx(tie_wrong)
    assert doc["prompts"] == 3 and doc["pairs"] == 28 + 6 + 3 and doc["skipped"] == 2
    assert doc["paper"] == {"overall": pytest.approx(0.835)}
    assert (xdg / "mps-cli" / "scores.sqlite").is_file()  # the default cache honours XDG_CACHE_HOME


# ---------------------------------------------------------------- pairs

PAIRS = [
    {"prompt": FOX, "a": "palette.gif", "b": "gray.png", "winner": "a"},
    {"prompt": FOX, "a": "sunset.png", "b": "portrait.jpg", "winner": "a"},
    {"prompt": FOX, "a": "alpha.png", "b": "wide.webp", "winner": "tie"},  # left out
    {"prompt": CUBES, "a": "crop.png", "b": "twin.png", "winner": "b"},  # model tie: wrong
    {"prompt": CUBES, "a": "wide.webp", "b": "palette.gif", "winner": "b"},
    {"prompt": CAFE, "a": "gray.png", "b": "alpha.png", "winner": "b"},
]


def test_pairs_accuracy_excludes_human_ties(tmp_path, image_root, golden):
    bench = tmp_path / "pairs.jsonl"
    bench.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n\n")
    proc, doc = run_json("pairs", str(bench), "--images-root", str(image_root), "--no-cache", "-d", "aesthetics",
                         "-d", "overall")
    assert proc.returncode == 0, proc.stderr
    for dim in ("overall", "aesthetics"):
        groups = [([1, 2] if p["winner"] == "a" else [2, 1] if p["winner"] == "b" else [1, 1],
                   [golden[(p["prompt"], p["a"], dim)], golden[(p["prompt"], p["b"], dim)]]) for p in PAIRS]
        want, pairs = ir_accuracy(groups)
        assert doc["accuracy"][dim] == pytest.approx(want, abs=1e-12), dim
    assert doc["pairs"] == 5 and doc["human_ties"] == 1 and doc["skipped"] == 0 and doc["prompts"] == 3
    assert list(doc["accuracy"]) == ["aesthetics", "overall"]


# ---------------------------------------------------------------- bad files

BAD_FILES = [
    # the right file given as the wrong BENCHMARK: named, with the command line that reads it
    ("imagereward", "pairs.jsonl", '{"prompt": "x", "a": "a.png", "b": "b.png", "winner": "a"}\n'
     '{"prompt": "y", "a": "a.png", "b": "b.png", "winner": "b"}\n',
     "a pairs benchmark file, not imagereward: give it as mps eval pairs"),
    ("pairs", "hpd.json", json.dumps([{"prompt": "x", "image_path": ["a.png", "b.png"], "rank": [1, 2]}]),
     "a hpdv2 benchmark file, not pairs: give it as mps eval hpdv2"),
    ("hpdv2", "ir.json", json.dumps([{"id": 1, "prompt": "x", "generations": ["a.png"], "ranking": [1]}]),
     "an imagereward benchmark file, not hpdv2: give it as mps eval imagereward"),
    ("imagereward", "absent.json", None, "no such file"),
    ("imagereward", "broken.json", '[{"id": "a", "prompt": "x"', "not valid JSON"),
    ("imagereward", "noranking.json", json.dumps([{"id": "q7", "prompt": "x", "generations": ["a.png"]}]),
     "item 1 (id 'q7'): missing field 'ranking'"),
    ("pairs", "bad.jsonl", '{"prompt": "x", "a": "a.png", "b": "b.png", "winner": "a"}\n'
                           '{"prompt": "x", "a": "a.png", "b": "b.png", "winner": "left"}\n', "line 2: winner"),
]
MORE_BAD_FILES = [
    ("hpdv2", "short.json", json.dumps([{"prompt": "x", "image_path": ["a.png", "b.png"], "rank": [1, 2]},
                                        {"prompt": "y", "image_path": ["a.png", "b.png"], "rank": [1]}]),
     "item 2: 1 rank values for 2 image_path"),
    ("hpdv2", "notlist.json", json.dumps({"prompt": "x"}), "expected a JSON list"),
    ("hpdv2", "badrank.json", json.dumps([{"prompt": "x", "image_path": ["a.png", "b.png"], "rank": [1, "2"]}]),
     "item 1: rank[1] should be an integer"),
    ("imagereward", "noprompt.json", json.dumps([{"id": 5, "generations": [], "ranking": []}]),
     "item 1 (id 5): missing field 'prompt'"),
    ("pairs", "garbled.jsonl", '{"prompt": "x", "a": "a.png", "b": "b.png", "winner": "a"}\nnot json\n',
     "line 2: not valid JSON"),
    ("pairs", "nob.jsonl", '{"prompt": "x", "a": "a.png", "winner": "a"}\n', "line 1: missing field 'b'"),
    ("pairs", "array.jsonl", '["x", "a.png", "b.png"]\n', "line 1: expected an object"),
]


@pytest.mark.parametrize("kind, name, content, culprit", BAD_FILES)
def test_bad_benchmark_file_is_one_line_and_exit_2(tmp_path, kind, name, content, culprit):
    bench = tmp_path / name
    if content is not None:
        bench.write_text(content)
    proc = run_cli("eval", kind, str(bench), "--weights", str(WEIGHTS), "--json")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert name in lines[0] and culprit in lines[0]


@pytest.mark.parametrize("kind, name, content, culprit", MORE_BAD_FILES)
def test_bad_benchmark_file_names_file_and_item(tmp_path, kind, name, content, culprit):
    from mps_cli.errors import InputError
    from mps_cli.evaluate import load_benchmark

    bench = tmp_path / name
    bench.write_text(content)
    with pytest.raises(InputError) as err:
        load_benchmark(kind, bench, tmp_path)
    assert str(err.value).startswith(f"{bench}: ") and culprit in str(err.value)


def test_images_root_must_be_a_folder(tmp_path):
    bench = tmp_path / "pairs.jsonl"
    bench.write_text(json.dumps(PAIRS[0]) + "\n")
    proc = run_cli("eval", "pairs", str(bench), "--images-root", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"mps: error: --images-root {tmp_path / 'nowhere'}: not a folder"


# ---------------------------------------------------------------- library: mixed-prompt batches

def test_library_batches_images_of_different_prompts_together(scorer, image_root, golden, tmp_path, capsys):
    from mps_cli.evaluate import evaluate, load_benchmark

    bench = tmp_path / "mixed.json"
    items = [{"prompt": FOX, "image_path": ["sunset.png", "gray.png", "wide.webp"], "rank": [1, 2, 3]},
             {"prompt": CUBES, "image_path": ["alpha.png", "portrait.jpg", "palette.gif"], "rank": [3, 1, 2]}]
    bench.write_text(json.dumps(items))
    before = scorer.stats["image_batches"]
    report = evaluate(load_benchmark("hpdv2", bench, image_root), scorer, ["overall"], batch_size=6)
    # six images of two prompts in one forward pass, not one pass per prompt
    assert scorer.stats["image_batches"] - before == 1
    assert report.scored == 6 and report.cached == 0
    want = hpd_accuracy(groups_for(items, golden, "overall", "image_path", "rank"))
    assert report.accuracy["overall"] == pytest.approx(want, abs=1e-12)
    assert capsys.readouterr() == ("", "")  # the library never prints


# ---------------------------------------------------------------- killed mid-way, then resumed

# Small images, few of them: the kill lands after the first stored score, so a short run is enough.
N_ITEMS, PER_ITEM = 6, 4
N_IMAGES = N_ITEMS * PER_ITEM


def _count_rows(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or momentarily busy
        return 0


def test_killed_eval_resumes_without_rescoring(tmp_path, scorer):
    root = tmp_path / "gen"
    root.mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"g{i:02d}.png")
    prompts = [FOX, CUBES, CAFE, FISHER, "a lighthouse in a storm", "two cats on a sofa"]
    items = [{"id": f"p{k}", "prompt": prompts[k],
              "generations": [f"g{i:02d}.png" for i in range(PER_ITEM * k, PER_ITEM * (k + 1))],
              "ranking": [int(r) for r in rng.permutation(PER_ITEM) + 1]} for k in range(N_ITEMS)]
    bench = tmp_path / "big.json"
    bench.write_text(json.dumps(items))
    db_path = tmp_path / "cache.sqlite"
    common = ["imagereward", str(bench), "--images-root", str(root), "--dim", "all", "--batch-size", "1"]

    # A fork (conftest forked_mps) that kill_hard SIGKILLs: being killed is what counts, not starting.
    proc = subprocess.Popen([*forked_mps(), "eval", *common, "--cache", str(db_path), "--weights", str(WEIGHTS),
                             "--device", "cpu", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while _count_rows(db_path) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        finished = proc.poll() is not None
    finally:
        kill_hard(proc)
    assert not finished, "the run finished before it could be interrupted"

    rows_before = _count_rows(db_path)
    # committed per batch: whole images only (4 dimensions each), some but not all
    assert 0 < rows_before < N_IMAGES * 4 and rows_before % 4 == 0

    resumed, doc = run_json(*common, "--cache", str(db_path))
    assert resumed.returncode == 0, resumed.stderr
    assert doc["cached"] == rows_before // 4
    assert doc["scored"] == N_IMAGES - rows_before // 4
    assert _count_rows(db_path) == N_IMAGES * 4

    # What an uninterrupted run must give: the engine's own scores (one image at a time, as the
    # killed and resumed runs did) put through the plain §6 metric above.
    engine = [(item["ranking"], scorer.score([root / g for g in item["generations"]], item["prompt"], dims=["all"],
                                             batch_size=1)) for item in items]
    for dim in ALL_DIMS:
        want, pairs = ir_accuracy([(ranks, [r.scores[dim] for r in results]) for ranks, results in engine])
        assert doc["accuracy"][dim] == pytest.approx(want, abs=1e-12), dim
        assert doc["pairs"] == pairs == N_ITEMS * PER_ITEM * (PER_ITEM - 1) // 2
