"""`mps versus --series`, the reward-hacking monitor: checkpoint series built to drift (saturation pushed up,
tiled textures, one image everywhere, a reward rising while alignment falls) and stable ones, through the
library and the command line, and the report's trend panels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import WEIGHTS, run_cli
from PIL import Image, ImageEnhance

from mps_cli.imagestats import DUPLICATE_DISTANCE, dhash, measure, near_duplicates

PROMPT = "a watercolour landscape with a lake"
N = 12  # images per checkpoint: above RANGE_MIN_IMAGES


def base_image(i: int, checkpoint: int) -> Image.Image:
    """Image i as a checkpoint renders it: a smooth random scene of its own, re-rendered with a little noise."""
    scene = np.random.default_rng(i).integers(40, 215, (5, 5, 3)).astype(np.float64)
    img = np.asarray(Image.fromarray(scene.astype(np.uint8)).resize((96, 96), Image.Resampling.BICUBIC), np.float64)
    noise = np.random.default_rng(1000 * checkpoint + i).normal(0, 2.0, img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def drift(img: Image.Image, how: str, i: int) -> Image.Image:
    if how == "saturated":
        return ImageEnhance.Color(img).enhance(2.6)
    if how == "tiled":  # one fine 8 x 8 texture repeated over the image, tinted by the scene
        tile = np.random.default_rng(i).integers(0, 256, (8, 8, 3))
        tex = np.tile(tile, (12, 12, 1))
        return Image.fromarray(((tex + np.asarray(img)) / 2).astype(np.uint8))
    if how == "duplicates":  # every prompt gets (nearly) the same picture
        return base_image(0, 99).point(lambda v: min(255, v + i % 3))
    return img


def write_series(root, drifts: list[str]) -> list[str]:
    """One folder per checkpoint, N images each (same names across checkpoints, so they pair)."""
    sides = []
    for k, how in enumerate(drifts):
        folder = root / f"step{k:04d}"
        folder.mkdir(parents=True)
        for i in range(N):
            drift(base_image(i, k), how, i).save(folder / f"sample_{i:02d}.png")
        sides.append(str(folder))
    return sides


def run_series(scorer, sides: list[str], dims=("all",), reward=None):
    from mps_cli.scorecache import ScoreCache
    from mps_cli.versus import compare_sides, line_up, read_side

    lineup = line_up([read_side(s) for s in sides], prompt=PROMPT)
    with ScoreCache(None) as cache:
        return compare_sides(lineup, scorer, list(dims) if dims else None, cache=cache, samples=200, series=True,
                             reward=reward)


def kinds(report) -> set[tuple[str, str]]:
    return {(f.kind, f.key) for f in report.series.flags}


# --------------------------------------------------------------------------- the statistics themselves


def test_statistics_follow_their_definitions_on_images_built_for_them():
    flat = Image.new("RGB", (300, 200), (120, 40, 200))
    s = measure(flat)
    # Hasler-Süsstrunk: no spread, so M = 0.3 * |(mean rg, mean yb)| = 0.3 * |(80, -120)|
    assert s.colourfulness == pytest.approx(0.3 * np.hypot(80, -120))
    assert s.saturation == pytest.approx(160 / 200) and s.high_frequency == 0.0
    assert s.brightness == pytest.approx((0.299 * 120 + 0.587 * 40 + 0.114 * 200) / 255)
    grey = measure(Image.new("L", (64, 64), 90))
    assert grey.colourfulness == 0.0 and grey.saturation == 0.0
    noise = measure(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)))
    assert 0.75 < noise.high_frequency < 0.85  # white noise: the share of the spectrum's area beyond 1/4 cycle/px
    assert measure(base_image(3, 0)).high_frequency < 0.05
    # the same picture at another size measures alike (images are reduced to 256 px first)
    big = base_image(5, 0).resize((960, 960), Image.Resampling.BICUBIC)
    assert measure(big).saturation == pytest.approx(measure(big.resize((256, 256), Image.Resampling.BOX)).saturation)


def test_dhash_near_duplicates_use_the_documented_distance():
    a, b = base_image(1, 0), base_image(2, 0)
    ha, hb = dhash(a), dhash(b)
    close = ha ^ (2**DUPLICATE_DISTANCE - 1)  # exactly DUPLICATE_DISTANCE bits away
    far = ha ^ (2**(DUPLICATE_DISTANCE + 1) - 1)
    assert list(near_duplicates([ha, close])) == [True, True]
    assert list(near_duplicates([ha, far])) == [False, False]
    assert list(near_duplicates([ha, hb, dhash(a.point(lambda v: min(255, v + 2)))])) == [True, False, True]


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("how, expected", [
    ("saturated", {("statistic", "saturation"), ("statistic", "colourfulness")}),
    ("tiled", {("statistic", "high_frequency")}),
    ("duplicates", {("duplicates", "near_duplicates")}),
])
def test_each_drift_raises_its_flag_at_the_drifted_checkpoint_only(scorer, tmp_path, how, expected):
    sides = write_series(tmp_path, ["stable", "stable", how])
    report = run_series(scorer, sides)
    found = kinds(report)
    assert expected <= found, report.series.flags
    assert all(f.side == sides[2] for f in report.series.flags)  # the stable step is not flagged
    if how != "duplicates":
        assert ("duplicates", "near_duplicates") not in found
    cps = report.series.checkpoints
    assert [c.measured for c in cps] == [N, N, N] and cps[0].duplicate_rate == 0.0
    if how == "duplicates":
        assert cps[2].duplicate_rate == 1.0


def test_a_stable_series_raises_no_flag(scorer, tmp_path):
    sides = write_series(tmp_path, ["stable"] * 4)
    report = run_series(scorer, sides)
    assert report.series.flags == () and report.series.notes == ()
    assert report.series.rising == "overall" and report.series.falling == ("detail", "alignment")
    assert len(report.series.checkpoints) == 4


def _jsonl_side(path, folder, scores_of) -> str:
    rows = [{"image": str(folder / f"sample_{i:02d}.png"), "prompt": PROMPT, "scores": scores_of(i)} for i in range(N)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_overall_rising_while_alignment_falls_is_flagged_and_a_level_series_is_not(tmp_path):
    """Scores written by `mps score` (JSONL) for the same images: the monitor needs no model for them."""
    from mps_cli.versus import compare_sides, line_up, read_side

    write_series(tmp_path / "img", ["stable", "stable"])
    base = {i: float(np.random.default_rng(i).normal(20, 1)) for i in range(N)}

    def side(name, k, d_overall, d_alignment):
        return _jsonl_side(tmp_path / f"{name}.jsonl", tmp_path / "img" / f"step{k:04d}", lambda i: {
            "overall": base[i] + d_overall, "detail": base[i] + 0.01 * (i % 2), "alignment": base[i] + d_alignment})

    hacked = [side("a0", 0, 0, 0), side("a1", 1, 1.5, -1.0)]
    level = [side("b0", 0, 0, 0), side("b1", 1, 0.0, 0.0)]
    report = compare_sides(line_up([read_side(s) for s in hacked]), None, ["overall", "detail", "alignment"],
                           samples=200, series=True)
    (flag,) = [f for f in report.series.flags if f.kind == "score"]
    assert flag.side == hacked[1] and flag.key == "alignment"
    assert re.search(r"overall rises against .*a0\.jsonl \(wins 100% .* while alignment falls \(wins 0%", flag.message)
    assert report.series.checkpoints[1].measured == N  # the JSONL's images were measured too
    level_report = compare_sides(line_up([read_side(s) for s in level]), None, ["overall", "detail", "alignment"],
                                 samples=200, series=True)
    assert level_report.series.flags == ()
    # with a composite, the composite is what is watched rising
    with_reward = compare_sides(line_up([read_side(s) for s in hacked]), None, ["overall", "detail", "alignment"],
                                samples=200, series=True, reward="overall + 0.5*alignment")
    assert with_reward.series.rising == "composite"
    assert {(f.kind, f.key) for f in with_reward.series.flags} == {("score", "alignment")}


# --------------------------------------------------------------------------- the command line and the report


def test_versus_series_cli_json_table_and_report(tmp_path):
    sides = write_series(tmp_path / "runs", ["stable", "stable", "saturated"])
    common = [*sides, "--series", "--prompt", PROMPT, "--weights", str(WEIGHTS), "--device", "cpu",
              "--cache", str(tmp_path / "scores.sqlite"), "--bootstrap", "200"]
    res = run_cli("versus", *common, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    series = doc["series"]
    assert [c["side"] for c in series["checkpoints"]] == sides
    assert series["watch"] == {"rising": "overall", "falling": ["detail", "alignment"]}
    assert series["range"] == {"percentiles": [5.0, 95.0], "min_images": 8}
    assert {f["key"] for f in series["flags"]} == {"saturation", "colourfulness"}
    assert set(series["checkpoints"][0]["stats"]) == {"colourfulness", "saturation", "high_frequency", "brightness"}
    warned = [line for line in res.stderr.splitlines() if line.startswith("mps: warning: reward hacking?")]
    assert len(warned) == 2 and all(sides[2] in line for line in warned)

    table = run_cli("versus", *common)
    assert table.returncode == 0
    assert "score trend" in table.stdout and "image statistics" in table.stdout
    assert "flag (statistic):" in table.stdout and "watching overall against detail, alignment" in table.stdout

    src = tmp_path / "series.json"
    src.write_text(res.stdout)
    out = tmp_path / "series.html"
    assert run_cli("report", str(src), "-o", str(out)).returncode == 0
    html = out.read_text()
    section = html[html.index('<section class="block series">'):]
    section = section[:section.index("</section>")]
    assert section.count('<figure class="trend">') == 4 + 5  # four dimensions; four statistics, near-duplicates
    assert section.count('class="pt flagged"') == 2  # the saturated checkpoint, on saturation and colourfulness
    assert "<script" not in section and "http" not in section.replace("http://www.w3.org", "")
    assert "median saturation" in section


def test_series_needs_no_model_for_prescored_sides_and_says_what_it_could_not_check(tmp_path):
    write_series(tmp_path / "img", ["stable"])
    a = _jsonl_side(tmp_path / "a.jsonl", tmp_path / "img" / "step0000", lambda i: {"detail": float(i)})
    b = _jsonl_side(tmp_path / "b.jsonl", tmp_path / "img" / "step0000", lambda i: {"detail": float(i) + 1})
    res = run_cli("versus", a, b, "--series", "--dim", "detail", "--json", "--no-cache")
    assert res.returncode == 0, res.stderr
    notes = json.loads(res.stdout)["series"]["notes"]
    assert notes == ["score trends not checked for reward hacking: score overall (or give --reward)"]
