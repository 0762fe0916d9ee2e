"""``mps versus``: win rates, ties and mean differences of one "model" against another, on fixture images.

The two (or three) models are folders the tests build from the fixture's images; every expected
number is worked out here from expected.json (the original implementation's scores), never
from mps_cli.versus.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS, run_cli
from typer.testing import CliRunner

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
FISHER = "portrait of an old fisherman with weathered hands, 35mm photo"
CUBES = "three blue cubes stacked on top of a wooden table"
CAFE = "A cozy café interior — warm light, plants & books"
ALL_DIMS = ("overall", "aesthetics", "detail", "alignment")
MODEL = ["--weights", str(WEIGHTS), "--device", "cpu", "--dtype", "fp32"]
SEEDS = "all-pairs-per-prompt"  # fox's two seeds per side meet all four ways

# Two "models": prompt -> (name in the prompts file, {file in A: fixture image}, {file in B: fixture image}).
# Names are given with and without extension and differ in extension between the sides; fox has
# two seeds per side (4 pairs); cubes is the same file on both sides (a tie in every dimension).
TWO = {
    FOX: (["fox_1", "fox_2.jpg"], {"fox_1.png": "sunset.png", "fox_2.jpg": "portrait.jpg"},
          {"fox_1.png": "alpha.png", "fox_2.png": "gray.png"}),
    CUBES: (["cubes.png"], {"cubes.png": "crop.png"}, {"cubes.png": "crop.png"}),
    FISHER: (["sub/fisher"], {"sub/fisher.webp": "wide.webp"}, {"sub/fisher.gif": "palette.gif"}),
    CAFE: (["cafe.png"], {"cafe.png": "alpha.png"}, {"cafe.jpg": "portrait.jpg"}),
}

# Three "models", one image per prompt each. Overall: A beats B on 3 of 4 prompts, A beats C on
# all 4, B beats C on 3 of 4 (C wins fisher), so the ranking is A, B, C.
THREE = {
    FOX: ("crop.png", "palette.gif", "portrait.jpg"),
    CUBES: ("palette.gif", "portrait.jpg", "crop.png"),
    FISHER: ("palette.gif", "wide.webp", "gray.png"),
    CAFE: ("portrait.jpg", "palette.gif", "alpha.png"),
}


# ---------------------------------------------------------------- the statistics, written out plainly

def outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def hand_result(pairs_by_prompt: dict[str, list[tuple[str, str]]], golden, dim: str, margin: bool = True):
    """(win rate of A with ties as half, mean of A - B, pairs) over every (A image, B image) pair."""
    outcomes, diffs = [], []
    for prompt, pairs in pairs_by_prompt.items():
        for a, b in pairs:
            sa, sb = golden[(prompt, a, dim)], golden[(prompt, b, dim)]
            if margin and a != b:
                # our fp32 scores match the golden ones within 3e-5: only a clear margin is a safe expectation
                assert abs(sa - sb) > 1e-3, (prompt, a, b, dim)
            outcomes.append(0.5 if a == b else outcome(sa, sb))  # the same file: a tie
            diffs.append(0.0 if a == b else sa - sb)
    return sum(outcomes) / len(outcomes), sum(diffs) / len(diffs), len(outcomes)


@pytest.fixture(scope="module")
def golden(expected):
    return {(r["prompt"], r["image"], r["dim"]): r["score"] for r in expected["scores"]}


def place(folder: Path, name: str, image: str) -> Path:
    dest = folder / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(IMAGES / image, dest)
    return dest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Folders a/ and b/ and the prompts file that serves both."""
    root = tmp_path_factory.mktemp("versus-two")
    rows = []
    for prompt, (names, a_files, b_files) in TWO.items():
        for name, image in a_files.items():
            place(root / "a", name, image)
        for name, image in b_files.items():
            place(root / "b", name, image)
        rows += [{"image": n, "prompt": prompt} for n in names]
    write_jsonl(root / "prompts.jsonl", rows)
    return root


def seeded(two: Path) -> dict:
    """The prompts file of ``two``, every seed of a prompt meeting every seed of the other side."""
    return {"prompts_file": two / "prompts.jsonl", "pairing": SEEDS}


def two_pairs() -> dict[str, list[tuple[str, str]]]:
    return {p: [(a, b) for a in a_files.values() for b in b_files.values()] for p, (_, a_files, b_files) in TWO.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One score cache for the tests that do not count scorings, so an image is scored once in this module."""
    return tmp_path_factory.mktemp("versus-cache") / "scores.sqlite"


def versus(sides, scorer, dims=ALL_DIMS, cache=None, samples=1000, seed=0, batch_size=None, store=None, **prompts):
    from mps_cli.scorecache import ScoreCache
    from mps_cli.versus import compare_sides, line_up, read_side

    lineup = line_up([read_side(s) for s in sides], **prompts)
    if store is not None:
        with ScoreCache(store) as cache:
            return compare_sides(lineup, scorer, dims, cache=cache, samples=samples, seed=seed)
    return compare_sides(lineup, scorer, dims, cache=cache, samples=samples, seed=seed, batch_size=batch_size)


def cli(*args: str):
    from mps_cli.cli import app

    return CliRunner().invoke(app, ["versus", *args], catch_exceptions=False)


# ---------------------------------------------------------------- two models

def test_win_rates_ties_and_mean_differences_match_the_hand_computed_ones(two, scorer, golden, store):
    report = versus([two / "a", two / "b"], scorer, **seeded(two), store=store)
    m = report.matchups[0]
    assert report.ok, (report.unpaired, report.missing, report.failed)
    assert (m.prompts, m.pairs, m.unit) == (4, 7, "prompt")
    for dim in ALL_DIMS:
        win, diff, n = hand_result(two_pairs(), golden, dim)
        r = m.results[dim]
        assert r.win_rate == pytest.approx(win, abs=1e-12), dim
        assert r.mean_diff == pytest.approx(diff, abs=1e-4), dim
        assert r.ties == 1 and r.wins + r.ties + r.losses == n == 7
    # the overall numbers, spelled out: fox 4 wins, cubes a tie, fisher and cafe lost
    assert m.results["overall"].win_rate == pytest.approx(4.5 / 7)
    # per prompt, best for A first (by the overall mean difference)
    hand = {p: hand_result({p: pairs}, golden, "overall")[1] for p, pairs in two_pairs().items()}
    assert [p.prompt for p in m.per_prompt] == sorted(hand, key=lambda p: -hand[p])
    for p in m.per_prompt:
        assert p.mean_diff["overall"] == pytest.approx(hand[p.prompt], abs=1e-4)
    assert m.per_prompt[0].pairs == 4 and m.per_prompt[0].prompt == FOX


def test_cli_json_has_the_documented_shape_and_details(two, store):
    out = cli(str(two / "a"), str(two / "b"), "--prompts", str(two / "prompts.jsonl"), "--pairing", SEEDS, "--json",
              "--details",
              "--cache", str(store), "--dim", "overall", *MODEL)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["a"] == str(two / "a") and doc["b"] == str(two / "b")
    assert (doc["prompts"], doc["pairs"]) == (4, 7)
    assert doc["unpaired"] == {str(two / "a"): [], str(two / "b"): []}
    res = doc["results"]["overall"]
    assert set(res) >= {"win_rate", "ci95", "mean_diff"}
    assert res["win_rate"] == pytest.approx(4.5 / 7)
    assert res["ci95"][0] <= res["win_rate"] <= res["ci95"][1]
    assert [p["prompt"] for p in doc["per_prompt"]][0] == FOX
    fox = doc["per_prompt"][0]
    assert fox["pairs"] == 4 and len(fox["a_images"]) == 2 and len(fox["b_images"]) == 2
    # each image's own scores, so the HTML page's cards can show them
    assert [set(x) for x in fox["a_scores"] + fox["b_scores"]] == [{"overall"}] * 4
    assert fox["a_scores"][0]["overall"] != fox["b_scores"][0]["overall"]


def test_pairing_by_relative_path_with_one_prompt_bootstraps_pairs(two, scorer, golden, store):
    """Without a prompts file images pair by path without extension, across sub-folders."""
    report = versus([two / "a", two / "b"], scorer, prompt=FOX, store=store)
    m = report.matchups[0]
    assert report.ok
    by_key = {"fox_1": ("sunset.png", "alpha.png"), "fox_2": ("portrait.jpg", "gray.png"),
              "cubes": ("crop.png", "crop.png"), "sub/fisher": ("wide.webp", "palette.gif"),
              "cafe": ("alpha.png", "portrait.jpg")}
    assert (m.prompts, m.pairs, m.unit) == (1, 5, "pair")
    for dim in ALL_DIMS:
        win, diff, _ = hand_result({FOX: list(by_key.values())}, golden, dim)
        assert m.results[dim].win_rate == pytest.approx(win, abs=1e-12)
        assert m.results[dim].mean_diff == pytest.approx(diff, abs=1e-4)


def test_every_prompt_source_pairs_by_name_by_default_and_says_so(two, store):
    """--prompts and --prompt pair the same folders the same way (5 name-matched pairs) unless --pairing says
    otherwise; the pairing is in the JSON and under the table."""
    def run(*args):
        out = cli(str(two / "a"), str(two / "b"), *args, "--cache", str(store), "--dim", "overall", *MODEL)
        assert out.exit_code == 0, out.output
        return out

    from_file = json.loads(run("--prompts", str(two / "prompts.jsonl"), "--json").stdout)
    one_prompt = json.loads(run("--prompt", FOX, "--json").stdout)
    assert (from_file["pairs"], from_file["pairing"]) == (5, "by-name")
    assert (one_prompt["pairs"], one_prompt["pairing"]) == (5, "by-name")
    seeds = json.loads(run("--prompts", str(two / "prompts.jsonl"), "--pairing", SEEDS, "--json").stdout)
    assert (seeds["pairs"], seeds["pairing"]) == (7, SEEDS)
    crossed = json.loads(run("--prompt", FOX, "--pairing", SEEDS, "--json").stdout)
    assert crossed["pairs"] == 5 * 5  # five images a side, one prompt: every image of A meets every image of B
    assert "pairing: by-name" in run("--prompt", FOX).stdout


def test_no_name_in_common_is_a_usage_error_that_names_the_other_pairing(tmp_path, store):
    a, b = tmp_path / "v1", tmp_path / "v2"
    place(a, "fox_seed1.png", "sunset.png")
    place(b, "render_0001.png", "gray.png")
    out = cli(str(a), str(b), "--prompt", FOX, "--cache", str(store), "--dim", "overall", *MODEL)
    assert out.exit_code == 2
    assert "--pairing all-pairs-per-prompt" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = cli(str(a), str(b), "--prompt", FOX, "--pairing", SEEDS, "--json", "--cache", str(store),
              "--dim", "overall", *MODEL)
    assert out.exit_code == 0 and json.loads(out.stdout)["pairs"] == 1


# ---------------------------------------------------------------- the bootstrap interval

def test_bootstrap_is_seeded_contains_the_estimate_and_narrows_with_prompts(two, scorer, store):
    from mps_cli.versus import bootstrap_interval

    first = versus([two / "a", two / "b"], scorer, ["overall"], **seeded(two), seed=7,
                   store=store)
    again = versus([two / "a", two / "b"], scorer, ["overall"], **seeded(two), seed=7,
                   store=store)
    other = versus([two / "a", two / "b"], scorer, ["overall"], **seeded(two), seed=8,
                   samples=200, store=store)
    r = first.matchups[0].results["overall"]
    assert r.ci95 == again.matchups[0].results["overall"].ci95
    assert r.ci95 != other.matchups[0].results["overall"].ci95
    assert r.ci95[0] <= r.win_rate <= r.ci95[1] and r.ci95[0] < r.ci95[1]

    # The same mix of prompts, 4 times as many of them: the interval is about half as wide.
    mix = [[1.0, 1.0, 0.0], [0.0, 0.5], [1.0], [0.0, 1.0, 1.0, 0.0], [0.0], [1.0, 1.0]]
    point = sum(map(sum, mix)) / sum(map(len, mix))
    widths = []
    for copies in (1, 4, 16):
        lo, hi = bootstrap_interval(mix * copies, samples=2000, seed=1)
        assert lo <= point <= hi
        assert (lo, hi) == bootstrap_interval(mix * copies, samples=2000, seed=1)
        widths.append(hi - lo)
    assert widths[0] > 1.6 * widths[1] > 1.6 * 1.6 * widths[2]


# ---------------------------------------------------------------- bad input

def test_unpaired_missing_prompt_and_broken_image_are_reported_and_the_rest_compared(tmp_path, golden):
    """Exit 1, one line per problem, no traceback, the good pair compared."""
    a, b = tmp_path / "a", tmp_path / "b"
    for name, image in (("one.png", "sunset.png"), ("two.png", "gray.png"), ("three.png", "crop.png"),
                        ("four.png", "alpha.png")):
        place(a, name, image).with_suffix(".txt").write_text(FOX)
    place(b, "one.jpg", "portrait.jpg").with_suffix(".txt").write_text(FOX)
    place(b, "two.png", "wide.webp")  # no caption: the prompt is missing on this side
    (b / "three.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (b / "three.txt").write_text(FOX)
    proc = run_cli("versus", str(a), str(b), "--prompt-from", "sidecar", "--json", "--no-cache", *MODEL)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["prompts"], doc["pairs"]) == (1, 1)
    win, diff, _ = hand_result({FOX: [("sunset.png", "portrait.jpg")]}, golden, "overall")
    assert doc["results"]["overall"]["win_rate"] == win
    assert doc["results"]["overall"]["mean_diff"] == pytest.approx(diff, abs=1e-4)
    assert sorted(doc["unpaired"][str(a)]) == sorted(str(a / n) for n in ("two.png", "three.png", "four.png"))
    assert doc["unpaired"][str(b)] == []
    failed = {Path(f["image"]).name: f for f in doc["failed"]}
    assert set(failed) == {"two.png", "three.png"} and all(f["side"] == str(b) for f in failed.values())
    assert "caption" in failed["two.png"]["error"]
    for name in ("two.png", "three.png", "four.png"):
        assert any(name in line for line in proc.stderr.splitlines()), proc.stderr


def test_a_prompt_missing_on_one_side_is_counted_and_exits_1(two, tmp_path, store):
    """The prompts file lists a prompt only A has an image for, and an image neither side has."""
    a = tmp_path / "a"
    shutil.copytree(two / "a", a)
    place(a, "cafe_2.png", "gray.png")
    lines = ["image,prompt"] + [f'{n},"{p}"' for p, (names, _, _) in TWO.items() for n in names]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("\n".join(lines + ["cafe_2,a lighthouse at night", "ghost.png,nowhere"]) + "\n")
    out = cli(str(a), str(two / "b"), "--prompts", str(prompts), "--pairing", SEEDS, "--json", "--cache", str(store),
              "--dim", "overall",
              *MODEL)
    assert out.exit_code == 1
    doc = json.loads(out.stdout)
    assert doc["pairs"] == 7  # everything else still compared
    assert doc["missing"] == {str(a): ["ghost.png"], str(two / "b"): ["cafe_2", "ghost.png"]}
    assert doc["unpaired"] == {str(a): [str(a / "cafe_2.png")], str(two / "b"): []}
    assert "cafe_2" in out.stderr and "ghost.png" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["only"], "two sides"),
    (["nowhere-a", "nowhere-b", "--prompt", "x"], "no such folder"),
    (["A", "B"], "no prompt"),
    (["A", "B", "--prompt", "x", "--prompt-from", "sidecar"], "one prompt source"),
    (["A", "B", "--prompts", "nowhere.jsonl"], "prompts file not found"),
])
def test_usage_errors_are_one_line_and_exit_2(two, args, message):
    args = [str(two / a.lower()) if a in ("A", "B") else a for a in args]
    out = cli(*args, "--no-cache", *MODEL)
    assert out.exit_code == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- three models

def test_three_sides_matrix_is_antisymmetric_and_ranking_follows_the_win_rates(tmp_path, scorer, golden, store):
    from mps_cli.versus import bradley_terry

    sides = [tmp_path / s for s in ("A", "B", "C")]
    rows = []
    for n, (prompt, images) in enumerate(THREE.items()):
        for side, image in zip(sides, images, strict=True):
            place(side, f"p{n}{Path(image).suffix}", image)
        rows.append({"image": f"p{n}", "prompt": prompt})
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    report = versus(sides, scorer, prompts_file=tmp_path / "prompts.jsonl", store=store)
    doc = report.to_dict()
    names = [str(s) for s in sides]
    for dim in ALL_DIMS:
        for i, j in itertools.permutations(range(3), 2):
            x, y = doc["matrix"][dim][names[i]][names[j]], doc["matrix"][dim][names[j]][names[i]]
            assert x["win_rate"] + y["win_rate"] == pytest.approx(1.0)
            assert x["ci95"] == pytest.approx([1 - y["ci95"][1], 1 - y["ci95"][0]])
            assert x["mean_diff"] == pytest.approx(-y["mean_diff"])
            win, diff, _ = hand_result({p: [(im[i], im[j])] for p, im in THREE.items()}, golden, dim)
            assert x["win_rate"] == pytest.approx(win) and x["mean_diff"] == pytest.approx(diff, abs=1e-4)
    overall = doc["matrix"]["overall"]
    assert overall[names[0]][names[1]]["win_rate"] == 0.75
    assert overall[names[0]][names[2]]["win_rate"] == 1.0
    assert overall[names[1]][names[2]]["win_rate"] == 0.75
    ranking = [s["side"] for s in doc["ranking"]["overall"]]
    assert ranking == names
    for dim in ALL_DIMS:  # in every dimension, a higher rank never loses the head-to-head
        order = [s["side"] for s in doc["ranking"][dim]]
        for hi, lo in itertools.combinations(order, 2):
            assert doc["matrix"][dim][hi][lo]["win_rate"] >= 0.5
    # B against A on its own gives the mirror of A against B
    alone = versus([sides[1], sides[0]], scorer, ["overall"], prompts_file=tmp_path / "prompts.jsonl", store=store)
    assert alone.matchups[0].results["overall"].win_rate == 0.25

    # Zermelo's iteration recovers known strengths from wins in the Bradley-Terry proportions.
    truth = [0.5, 0.3, 0.2]
    n = 1_000_000
    wins = [[0 if i == j else n * truth[i] / (truth[i] + truth[j]) for j in range(3)] for i in range(3)]
    assert list(bradley_terry(wins)) == pytest.approx(truth, abs=1e-5)


# ---------------------------------------------------------------- sides already scored, and the cache

def test_prescored_sides_are_not_scored_again(two, tmp_path, scorer, golden):
    """A JSONL from `mps score` and an `mps dataset` parquet folder stand for sides without the model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mps_cli.cli import app

    scored = CliRunner().invoke(app, ["score", str(two / "a"), "--recursive", "--prompt", FOX, "--jsonl",
                                      "--dim", "all", *MODEL], catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    a_jsonl = tmp_path / "a.jsonl"
    a_jsonl.write_text(scored.stdout)

    # b/ as `mps dataset` writes it, with the golden scores: key, shard, prompt, one column per dimension, error
    dataset = tmp_path / "b-dataset"
    dataset.mkdir()
    b_files = {"fox_1": "alpha.png", "fox_2": "gray.png", "cubes": "wide.webp", "sub/fisher": "palette.gif",
               "cafe": "portrait.jpg"}
    table = {"key": list(b_files), "shard": ["b.tar"] * 5, "prompt": [FOX] * 5,
             **{d: [golden[(FOX, im, d)] for im in b_files.values()] for d in ALL_DIMS}, "error": [None] * 5}
    pq.write_table(pa.table(table), dataset / "b.parquet")
    (dataset / "_manifest.json").write_text("{}")

    a_files = {"fox_1": "sunset.png", "fox_2": "portrait.jpg", "cubes": "crop.png", "sub/fisher": "wide.webp",
               "cafe": "alpha.png"}
    # No model at all: weights that do not exist would fail the moment anything loaded them.
    out = cli(str(a_jsonl), str(dataset), "--json", "--dim", "all", "--weights", str(tmp_path / "none.safetensors"))
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert (doc["pairs"], doc["scored"], doc["cached"]) == (5, 0, 0)
    for dim in ALL_DIMS:
        win, diff, _ = hand_result({FOX: [(a_files[k], b_files[k]) for k in b_files]}, golden, dim)
        assert doc["results"][dim]["win_rate"] == pytest.approx(win, abs=1e-12)
        assert doc["results"][dim]["mean_diff"] == pytest.approx(diff, abs=1e-4)

    # A dataset scored under another threshold does not compare: one line, exit 2.
    (dataset / "_manifest.json").write_text(json.dumps({"settings": {"mask_threshold": 0.5, "dtype": "fp32"}}))
    out = cli(str(a_jsonl), str(dataset), "--dim", "overall")
    assert out.exit_code == 2 and "mask threshold 0.5" in out.stderr

    # A JSONL side against a folder: only the folder's images reach the model (batch size 1: one batch each).
    before = scorer.stats["image_batches"]
    report = versus([a_jsonl, two / "b"], scorer, ["overall"], prompt=FOX, batch_size=1)
    assert scorer.stats["image_batches"] - before == report.scored == 5
    assert report.matchups[0].pairs == 5 and report.ok


def test_cache_is_shared_and_a_new_side_costs_only_its_images(two, tmp_path, scorer):
    from mps_cli.scorecache import ScoreCache

    c = tmp_path / "c"
    place(c, "fox_1.png", "palette.gif")  # new content
    place(c, "fox_2.png", "portrait.jpg")  # the same content and prompt as a/fox_2.jpg: cached
    place(c, "cubes.png", "crop.png")
    place(c, "sub/fisher.png", "gray.png")
    place(c, "cafe.png", "wide.webp")
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        first = versus([two / "a", two / "b"], scorer, ["overall"], cache=cache, **seeded(two))
        assert (first.scored, first.cached) == (9, 0)  # 10 images, one content shared (cubes)
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        again = versus([two / "a", two / "b"], scorer, ["overall"], cache=cache, **seeded(two))
        assert (again.scored, again.cached) == (0, 9)
        assert again.matchups[0].results == first.matchups[0].results
        three = versus([two / "a", two / "b", c], scorer, ["overall"], cache=cache,
                       **seeded(two))
        assert (three.scored, three.cached) == (3, 9)
        assert three.matchup(str(two / "a"), str(two / "b")).results == first.matchups[0].results
    assert math.isclose(sum(s.strength for s in three.ranking["overall"]), 1.0)


def test_prompts_and_side_names_that_look_like_markup_are_printed_as_written(tmp_path):
    """Rich reads "[...]" as markup: a prompt or folder named so must show verbatim in every table, never
    vanish or end the run with a MarkupError (it did, in --details, exit 5)."""
    prompt = "a [bold]red[/] fox [/x] on [link=http://x]snow[/link]"
    sides = []
    for n, name in enumerate(("[red]a", "b[i]", "[bold]c")):
        side = tmp_path / f"{name}.jsonl"
        rows = [{"image": f"img{i}.png", "prompt": prompt,
                 "scores": {d: float((i * (n + k + 1)) % 3) for k, d in enumerate(ALL_DIMS)}} for i in range(4)]
        side.write_text("".join(json.dumps(row) + "\n" for row in rows))
        sides.append(str(side))
    for args in ([*sides[:2], "--details"], [*sides, "--details"], [*sides, "--series"]):
        res = run_cli("versus", *args, env={"COLUMNS": "250"})
        assert res.returncode == 0, (args, res.stderr)
        assert "Traceback" not in res.stderr and "MarkupError" not in res.stderr
        if "--details" in args:
            assert prompt in res.stdout, res.stdout
        for side in sides[:len(args) - 1]:
            assert Path(side).stem in res.stdout, (side, res.stdout)
