"""Crafted sides against ``mps versus`` and crafted benchmarks and caches against ``mps eval``: sides with
no common names, duplicate names, score files missing a dimension, NaN and infinite scores, a side
given twice, a tampered score cache. Each ends in one line (or one listed failure per culprit) and
the documented exit code, and the numbers are those of the same input without the culprits.

Pre-scored sides (JSONL, dataset folders) need no model; ``mps eval`` scores the fixture images."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS, run_cli

MODEL = ["--weights", str(WEIGHTS), "--device", "cpu", "--dtype", "fp32"]
PROMPTS = ["a red fox", "a castle", "three cubes"]


def side(path: Path, rows: list[tuple[str, str, dict | None]]) -> Path:
    """A JSONL side as mps score writes it, from (image, prompt, scores) rows."""
    lines = [json.dumps({"image": f"{path.stem}/{img}", "prompt": p, "scores": s}) for img, p, s in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def grid(scale: float, skip: tuple = ()) -> list[tuple[str, str, dict]]:
    """Nine images (3 prompts x 3 names) with scores that differ by side."""
    return [(f"img{i}.png", PROMPTS[i % 3], {"overall": scale * ((i * 7) % 5) + i / 10, "detail": scale - i})
            for i in range(9) if i not in skip]


def versus(*args: str):
    return run_cli("versus", *args, "--json", "--no-cache")


def win_rate(res) -> float | None:
    return json.loads(res.stdout)["results"]["overall"]["win_rate"]


@pytest.fixture
def clean(tmp_path):
    """Two clean sides and their win rate, the reference for the cases below."""
    a = side(tmp_path / "a.jsonl", grid(1.0))
    b = side(tmp_path / "b.jsonl", grid(1.3))
    res = versus(str(a), str(b))
    assert res.returncode == 0, res.stderr
    return a, b, json.loads(res.stdout)


def test_sides_with_no_common_names_exit_2_or_1_with_one_line_and_null_statistics(tmp_path):
    a = side(tmp_path / "a.jsonl", grid(1.0))
    b = side(tmp_path / "b.jsonl", [(f"other{i}.png", p, s) for i, (_, p, s) in enumerate(grid(1.0))])
    res = versus(str(a), str(b))
    # They share prompts, so pairing by name comparing nothing is a mistake the other pairing would fix.
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "--pairing all-pairs-per-prompt" in res.stderr
    b = side(tmp_path / "b.jsonl", [(f"other{i}.png", f"another {p}", s) for i, (_, p, s) in enumerate(grid(1.0))])
    res = versus(str(a), str(b))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("mps: error:")]
    assert len(errors) == 1 and "no pairs to compare" in errors[0], res.stderr
    doc = json.loads(res.stdout)
    assert doc["pairs"] == 0 and doc["results"]["overall"]["win_rate"] is None
    assert len(doc["unpaired"][str(a)]) == 9 and len(doc["unpaired"][str(b)]) == 9
    # Three sides, one of which shares nothing: the matrix says null there, the ranking stays finite.
    c = side(tmp_path / "c.jsonl", grid(0.7))
    three = versus(str(a), str(b), str(c))
    assert three.returncode == 1
    doc = json.loads(three.stdout)
    assert doc["matrix"]["overall"][str(a)][str(b)]["win_rate"] is None
    assert doc["matrix"]["overall"][str(a)][str(c)]["win_rate"] is not None
    strengths = [r["strength"] for r in doc["ranking"]["overall"]]
    assert all(isinstance(s, float) and 0 <= s <= 1 for s in strengths) and abs(sum(strengths) - 1) < 1e-9


def test_the_same_side_twice_under_two_spellings_is_a_usage_error(clean, tmp_path):
    a, _, _ = clean
    for other in (str(a), str(tmp_path / "." / "a.jsonl"), str(tmp_path / "x" / ".." / "a.jsonl")):
        (tmp_path / "x").mkdir(exist_ok=True)
        res = versus(str(a), other)
        assert res.returncode == 2, (other, res.stderr)
        (line,) = res.stderr.strip().splitlines()
        assert "the same side is given twice" in line


def test_a_record_listed_twice_counts_once(clean, tmp_path):
    a, b, want = clean
    doubled = side(tmp_path / "a2.jsonl", grid(1.0) + [grid(1.0)[4]])
    doubled_b = tmp_path / "b2.jsonl"
    doubled_b.write_text(b.read_text())
    res = versus(str(doubled), str(doubled_b))
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    (fail,) = doc["failed"]
    assert "listed twice" in fail["error"] and fail["image"] == "a2/img4.png"
    assert doc["results"]["overall"] == want["results"]["overall"] and doc["pairs"] == want["pairs"] == 9


def test_two_images_that_pair_under_one_name_pair_with_nothing(clean, tmp_path):
    a, b, want = clean
    rows = grid(1.0) + [("img4.jpg", PROMPTS[1], {"overall": 99.0, "detail": 0.0})]  # img4.png's name, its prompt
    clash = side(tmp_path / "a3.jsonl", rows)
    res = versus(str(clash), str(b))
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert sorted(f["image"] for f in doc["failed"]) == ["a3/img4.jpg", "a3/img4.png"]
    assert all("pairs under the name 'img4'" in f["error"] and "rename one" in f["error"] for f in doc["failed"])
    assert doc["pairs"] == 8
    without = versus(str(side(tmp_path / "a4.jsonl", grid(1.0, skip=(4,)))), str(b))
    assert doc["results"]["overall"] == json.loads(without.stdout)["results"]["overall"]


def test_a_dataset_side_with_one_key_in_two_shards_is_ambiguous(tmp_path, clean):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, b, _ = clean
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = grid(1.0)
    for n, part in enumerate((rows[:5], rows[4:])):  # img4 in both shards
        pq.write_table(pa.table({"key": [r[0][:-4] for r in part], "shard": [f"{n}.tar"] * len(part),
                                 "prompt": [r[1] for r in part], "overall": [r[2]["overall"] for r in part],
                                 "error": [None] * len(part)}), folder / f"{n}.parquet")
    res = run_cli("versus", str(folder), str(b), "--json", "--no-cache", "--dim", "overall")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert sorted(f["image"] for f in doc["failed"]) == ["0.parquet:img4", "1.parquet:img4"]
    assert doc["pairs"] == 8


def test_a_score_file_missing_a_dimension_is_one_line_exit_2(clean, tmp_path):
    a, b, _ = clean
    only = side(tmp_path / "only.jsonl", [(i, p, {"overall": s["overall"]}) for i, p, s in grid(1.0)])
    some = side(tmp_path / "some.jsonl", grid(1.0)[:4] + [(i, p, {"overall": s["overall"]})
                                                          for i, p, s in grid(1.0)[4:]])
    for lacking in (only, some):
        res = run_cli("versus", str(lacking), str(b), "--dim", "detail", "--json", "--no-cache")
        assert res.returncode == 2, res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert f"{lacking}: no 'detail' scores in it" in line and "score it again" in line and not res.stdout


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinite_scores_are_failures_not_losses(clean, tmp_path, literal):
    a, b, _ = clean
    text = a.read_text().splitlines()
    bad = json.loads(text[2])
    text[2] = text[2].replace(json.dumps(bad["scores"]["overall"]), literal, 1)
    assert literal in text[2]
    broken = tmp_path / "nan.jsonl"
    broken.write_text("\n".join(text) + "\n")
    res = versus(str(broken), str(b))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    doc = json.loads(res.stdout)
    (fail,) = doc["failed"]
    assert fail["image"] == "a/img2.png" and "not a finite number" in fail["error"] and "'overall'" in fail["error"]
    without = versus(str(side(tmp_path / "a5.jsonl", grid(1.0, skip=(2,)))), str(b))
    assert doc["results"]["overall"] == json.loads(without.stdout)["results"]["overall"] and doc["pairs"] == 8


@pytest.mark.parametrize("value", ['"NaN"', "true", "null", '"12.5"'], ids=["text", "bool", "null", "a number in text"])
def test_scores_that_are_not_numbers_do_not_count_as_scores(clean, tmp_path, value):
    a, b, _ = clean
    text = a.read_text().splitlines()
    bad = json.loads(text[2])
    text[2] = text[2].replace(json.dumps(bad["scores"]["overall"]), value, 1)
    broken = tmp_path / "typed.jsonl"
    broken.write_text("\n".join(text) + "\n")
    res = run_cli("versus", str(broken), str(b), "--dim", "overall", "--json", "--no-cache")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "no 'overall' scores in it" in line


def test_a_dataset_side_with_a_nan_score_and_no_error_is_a_failure(tmp_path, clean):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, b, _ = clean
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = grid(1.0)
    pq.write_table(pa.table({"key": [r[0][:-4] for r in rows], "prompt": [r[1] for r in rows],
                             "overall": [float("nan") if i == 3 else r[2]["overall"] for i, r in enumerate(rows)],
                             "error": [None] * len(rows)}), folder / "0.parquet")
    res = run_cli("versus", str(folder), str(b), "--json", "--no-cache", "--dim", "overall")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert [f["image"] for f in doc["failed"]] == ["0.parquet:img3"] and doc["pairs"] == 8


@pytest.mark.parametrize("content, says", [
    ("", "no results in it"),
    ("[1, 2]", "expected a score result"),
    ('{"image": 5}', "expected a score result"),
    ("{not json", "not valid JSON"),
], ids=["empty", "a list of numbers", "an image that is a number", "not json"])
def test_a_side_that_is_not_a_score_file_is_one_line(clean, tmp_path, content, says):
    _, b, _ = clean
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    res = versus(str(bad), str(b))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert says in line and str(bad) in line


# --------------------------------------------------------------------------- mps eval


@pytest.fixture
def pairs_file(tmp_path):
    names = sorted(p.name for p in IMAGES.iterdir())
    lines = [{"prompt": PROMPTS[i % 3], "a": names[i], "b": names[(i + 1) % len(names)], "winner": "ab"[i % 2]}
             for i in range(5)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def evaluate(pairs: Path, cache: Path):
    res = run_cli("eval", "pairs", str(pairs), "--images-root", str(IMAGES), "--cache", str(cache), "--json", *MODEL)
    assert "Traceback" not in res.stderr
    return res


def test_a_tampered_score_cache_is_rescored_to_the_same_accuracy(pairs_file, tmp_path):
    """Stored scores replaced by NaN, infinities, text and a blob: not scores, so scored again."""
    cache = tmp_path / "scores.sqlite"
    first = evaluate(pairs_file, cache)
    assert first.returncode == 0, first.stderr
    want = json.loads(first.stdout)
    for tamper in ("'nan'", "1e308 * 10", "-1e308 * 10", "'<script>'", "x'00ff'"):
        with sqlite3.connect(cache) as db:
            assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] > 0
            db.execute(f"UPDATE scores SET score = {tamper}")
        again = evaluate(pairs_file, cache)
        assert again.returncode == 0, (tamper, again.stderr)
        doc = json.loads(again.stdout)
        assert doc["accuracy"] == want["accuracy"] and doc["scored"] == want["scored"] > 0 and doc["cached"] == 0, \
            tamper


def test_a_cache_that_is_not_sqlite_is_one_line(pairs_file, tmp_path):
    cache = tmp_path / "scores.sqlite"
    cache.write_bytes(b"this is not a database" * 100)
    res = evaluate(pairs_file, cache)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert str(cache) in line and "--cache" in line


def test_a_pair_of_one_image_with_itself_is_skipped_and_named(pairs_file, tmp_path):
    cache = tmp_path / "scores.sqlite"
    lines = pairs_file.read_text().splitlines()
    item = json.loads(lines[0])
    lines.append(json.dumps({**item, "b": item["a"]}))
    pairs = tmp_path / "self.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    res = evaluate(pairs, cache)
    assert res.returncode == 1
    warned = [line for line in res.stderr.splitlines() if "twice" in line]
    assert len(warned) == 1 and "line 6" in warned[0] and "item skipped" in warned[0]
    doc = json.loads(res.stdout)
    assert doc["skipped"] == 1 and doc["accuracy"] == json.loads(evaluate(pairs_file, cache).stdout)["accuracy"]


def test_the_same_side_twice_names_it(clean):
    """Among three sides the repeated one is named, as every usage error names its culprit."""
    a, b, _ = clean
    res = versus(str(a), str(b), str(b))
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [f"mps: error: {b}: the same side is given twice"]
