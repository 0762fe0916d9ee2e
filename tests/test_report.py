"""``mps report`` and ``--html``, checked in a real headless Chromium (Debian's package, driven by Playwright).

Inputs are built from the fixture images with scores taken from expected.json (the report never
needs the model); only ``--html`` on score runs the tiny fixture checkpoint, once, in-process.
Set MPS_REPORT_DOCS=docs to refresh the screenshots shown in the README.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tarfile
import time
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS
from typer.testing import CliRunner

CHROMIUM = Path(os.environ.get("MPS_CHROMIUM", "/usr/bin/chromium"))
DIMS = ("overall", "aesthetics", "detail", "alignment")
HOSTILE_PROMPT = '<script>alert(1)</script>"><img src=x onerror=alert(2)> <a href="javascript:alert(3)">x</a>'
ONE_PROMPT = "a red fox sitting in a snowy forest at dawn, highly detailed"
# For this prompt the fixture's four dimensions order the seven images differently.
FISHER = "portrait of an old fisherman with weathered hands, 35mm photo"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


class Loaded:
    """A page loaded from a file, with everything it tried to do recorded."""

    def __init__(self, browser, path: Path, width: int = 800, height: int = 640):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.requests: list[str] = []
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(d):
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", on_dialog)
        self.url = path.resolve().as_uri()
        start = time.perf_counter()
        self.page.goto(self.url, wait_until="load")
        self.load_s = time.perf_counter() - start

    def outside(self) -> list[str]:
        """Requests other than the page itself, its data: images and (with --link-images) local files."""
        return [u for u in self.requests if u != self.url and not u.startswith(("data:", "file:"))]

    def decode_images(self) -> None:
        """Load the lazy thumbnails below the fold too, and wait until each is decoded (or failed)."""
        self.page.evaluate("""() => Promise.all(Array.from(document.images).map(i => {
            i.loading = 'eager'; return i.decode().catch(() => null); }))""")

    def cards(self) -> list[dict]:
        return self.page.eval_on_selector_all(".mps-card", """els => els.map(e => ({
            image: e.dataset.image, prompt: e.dataset.prompt, visible: !e.closest('[hidden]'),
            scores: Object.fromEntries(Array.from(e.attributes).filter(a => a.name.startsWith('data-score-'))
                                       .map(a => [a.name.slice(11), parseFloat(a.value)])),
            loaded: (e.querySelector('img') || {}).naturalWidth || 0}))""")

    def quiet(self) -> None:
        assert self.outside() == []
        assert self.console == [] and self.errors == [] and self.dialogs == []

    def close(self) -> None:
        self.page.close()


def screenshot(loaded: Loaded, kind: str) -> bytes:
    """A screenshot of the top of the page; not blank (many grey levels, real contrast)."""
    from PIL import Image, ImageStat

    png = loaded.page.screenshot(type="png")
    img = Image.open(io.BytesIO(png)).convert("L")
    assert ImageStat.Stat(img).stddev[0] > 20, f"{kind}: screenshot looks blank"
    assert len(img.getcolors(256)) > 64, f"{kind}: screenshot has too few grey levels"
    docs = os.environ.get("MPS_REPORT_DOCS")
    if docs:
        Path(docs, f"report-{kind}.png").write_bytes(png)
    return png


def expected_rows(expected: dict) -> dict:
    """{(image, prompt): {dim: score}} from the fixture's scores."""
    rows: dict = {}
    for r in expected["scores"]:
        rows.setdefault((r["image"], r["prompt"]), {})[r["dim"]] = r["score"]
    return rows


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def cli(*args: str, input: str | None = None):
    from mps_cli.cli import app

    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture(scope="module")
def score_file(tmp_path_factory, expected) -> tuple[Path, list[dict]]:
    """28 results (4 prompts x 7 images, 4 dimensions) as mps score --jsonl writes them."""
    docs = [{"image": str(IMAGES / img), "prompt": p, "scores": s}
            for (img, p), s in expected_rows(expected).items()]
    return write_jsonl(tmp_path_factory.mktemp("score") / "scores.jsonl", docs), docs


@pytest.fixture(scope="module")
def score_page(browser, score_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("score-html") / "report.html"
    res = cli("report", str(score_file[0]), "-o", str(out))
    assert res.exit_code == 0, res.output
    loaded = Loaded(browser, out)
    yield loaded, score_file[1], out
    loaded.close()


# --------------------------------------------------------------------------- score / rank


def test_score_report_is_offline_quiet_and_has_one_card_per_result(score_page):
    loaded, docs, out = score_page
    loaded.quiet()
    html = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "img-src data:;" in csp and "script-src 'sha256-" in csp
    loaded.decode_images()
    cards = loaded.cards()
    assert len(cards) == len(docs)
    by_key = {(c["image"], c["prompt"]): c for c in cards}
    for d in docs:
        c = by_key[(d["image"], d["prompt"])]
        assert c["scores"] == d["scores"]  # full precision in the hook
        assert c["loaded"] > 0  # the embedded thumbnail decoded
    assert loaded.page.inner_text("#mps-count") == f"{len(docs)} of {len(docs)} images"
    screenshot(loaded, "score")


def _dom_order(loaded: Loaded) -> dict[str, list[dict]]:
    """Visible cards per prompt group, in page order."""
    groups: dict[str, list[dict]] = {}
    for c in loaded.cards():
        groups.setdefault(c["prompt"], []).append(c)
    return groups


def test_sort_reorders_cards_by_the_chosen_dimension(score_page):
    loaded, docs, _ = score_page
    assert loaded.page.eval_on_selector_all("#mps-sort option", "os => os.map(o => o.value)") == list(DIMS)
    orders = set()
    for dim in ("overall", "alignment", "detail", "aesthetics"):
        loaded.page.select_option("#mps-sort", dim)
        for prompt, cards in _dom_order(loaded).items():
            want = sorted((d for d in docs if d["prompt"] == prompt), key=lambda d: -d["scores"][dim])
            assert [c["image"] for c in cards] == [d["image"] for d in want], (dim, prompt)
            if prompt == FISHER:
                orders.add(tuple(c["image"] for c in cards))
    assert len(orders) >= 3  # the cards really moved
    loaded.page.select_option("#mps-sort", "overall")


def test_filter_hides_non_matching_cards(score_page):
    loaded, docs, _ = score_page
    page = loaded.page
    for query, match in (("PALETTE", lambda d: "palette" in d["image"]),
                         ("fisherman", lambda d: "fisherman" in d["prompt"]),
                         ("no such thing", lambda d: False)):
        page.fill("#mps-filter", query)
        visible = {(c["image"], c["prompt"]) for c in loaded.cards() if c["visible"]}
        assert visible == {(d["image"], d["prompt"]) for d in docs if match(d)}, query
        assert page.inner_text("#mps-count") == f"{len(visible)} of {len(docs)} images"
    page.fill("#mps-filter", "")
    assert all(c["visible"] for c in loaded.cards())


def test_click_enlarges_and_escape_closes(score_page):
    loaded, _, _ = score_page
    page = loaded.page
    page.click(".mps-card .thumb")
    assert page.is_visible("#mps-zoom")
    first = loaded.cards()[0]
    assert page.inner_text("#mps-zoom .z-image") == first["image"]
    assert page.eval_on_selector("#mps-zoom img", "i => i.naturalWidth") > 0
    page.keyboard.press("Escape")
    assert not page.is_visible("#mps-zoom")
    loaded.quiet()


def test_rank_output_with_errors_and_relative_paths(browser, tmp_path, expected):
    """A rank JSON with a failed input: cards for the ranked ones, in rank order, the failure listed."""
    rows = expected_rows(expected)
    ranked = sorted(((img, s) for (img, p), s in rows.items() if p == FISHER), key=lambda t: -t[1]["detail"])
    docs = [{"image": f"imgs/{img}", "prompt": FISHER, "scores": s, "rank": i}
            for i, (img, s) in enumerate(ranked, 1)]
    docs.append({"image": "imgs/broken.png", "error": "imgs/broken.png: corrupt or truncated image (bad header)"})
    (tmp_path / "imgs").symlink_to(IMAGES)
    src = tmp_path / "ranked.json"
    src.write_text(json.dumps(docs))
    out = tmp_path / "sub" / "r.html"
    out.parent.mkdir()
    # relative image paths resolve against the results file's folder; the page sits elsewhere
    res = cli("report", str(src), "-o", str(out), "--link-images")
    assert res.exit_code == 0, res.output
    loaded = Loaded(browser, out)
    loaded.decode_images()
    loaded.quiet()
    cards = loaded.cards()
    assert [c["image"] for c in cards] == [d["image"] for d in docs[:-1]]
    assert all(c["loaded"] > 0 for c in cards)  # linked originals, found through ../imgs
    assert loaded.page.input_value("#mps-sort") == "detail"  # the dimension the ranks follow
    assert "corrupt or truncated image (bad header)" in loaded.page.inner_text("section.failed")
    html = out.read_text()
    assert "img-src data: 'self'" in html and 'src="../imgs/sunset.png"' in html
    loaded.close()


# --------------------------------------------------------------------------- hostile input


def test_hostile_text_runs_nothing_and_shows_as_text(browser, tmp_path):
    evil_file = tmp_path / "javascript:alert(4).png"  # a real file whose name looks like a URL scheme
    evil_file.symlink_to(IMAGES / "sunset.png")
    docs = [
        {"image": "javascript:alert(4).png", "prompt": HOSTILE_PROMPT, "scores": {"overall": 1.5}},
        {"image": '"><img src=x onerror=alert(5)>.png', "prompt": "ok", "scores": {"overall": 0.5,
                                                                                    '"><script>alert(6)</script>': 1}},
        {"image": "<b>bad</b>.png", "error": "<img src=x onerror=alert(7)> broke"},
    ]
    src = write_jsonl(tmp_path / "evil.jsonl", docs)
    for link in (False, True):
        out = tmp_path / f"evil-{link}.html"
        res = cli("report", str(src), "-o", str(out), *(["--link-images"] if link else []))
        assert res.exit_code == 0, res.output
        loaded = Loaded(browser, out)
        page = loaded.page
        page.click(".mps-card .thumb")  # open the enlarged view of the hostile card too
        page.keyboard.press("Escape")
        page.fill("#mps-filter", "<script>")
        loaded.decode_images()
        loaded.quiet()  # no dialog, no console message, no error, no request
        assert page.eval_on_selector_all("script", "s => s.length") == 1
        assert page.eval_on_selector_all("img[src='x'], a[href^='javascript']", "e => e.length") == 0
        prompts = page.eval_on_selector_all("h3.prompt", "hs => hs.map(h => h.textContent)")
        assert HOSTILE_PROMPT in prompts
        assert '<img src=x onerror=alert(7)> broke' in page.inner_text("section.failed")
        cards = loaded.cards()
        assert {c["image"] for c in cards} == {docs[0]["image"], docs[1]["image"]}
        assert [c["scores"] for c in cards if c["prompt"] == "ok"] == [{"overall": 0.5}]  # the bad key dropped
        if link:
            # the scheme-looking name is a relative, percent-encoded link to the real file
            assert page.eval_on_selector(".mps-card[data-prompt^='<script>'] img", "i => i.getAttribute('src')") \
                == "./javascript%3Aalert%284%29.png"
            assert cards[0]["loaded"] > 0
        loaded.close()


# --------------------------------------------------------------------------- compare


def test_compare_report_shows_both_images_and_p_a(browser, tmp_path, expected):
    from mps_cli import compare_scores

    rows = expected_rows(expected)
    docs = []
    for prompt, (a, b) in ((ONE_PROMPT, ("sunset.png", "portrait.jpg")),
                           ("three blue cubes stacked on top of a wooden table", ("wide.webp", "crop.png"))):
        res = {d: compare_scores(rows[(a, prompt)][d], rows[(b, prompt)][d]) for d in DIMS}
        docs.append({"prompt": prompt, "a": str(IMAGES / a), "b": str(IMAGES / b),
                     "results": {d: {"a": v.a, "b": v.b, "p_a": v.p_a, "winner": v.winner} for d, v in res.items()}})
    out = tmp_path / "compare.html"
    assert cli("report", str(write_jsonl(tmp_path / "cmp.jsonl", docs)), "-o", str(out)).exit_code == 0
    loaded = Loaded(browser, out)
    loaded.decode_images()
    loaded.quiet()
    cards = loaded.cards()
    assert [c["image"] for c in cards] == [x for d in docs for x in (d["a"], d["b"])]
    assert all(c["loaded"] > 0 for c in cards)
    pairs = loaded.page.eval_on_selector_all(".mps-pair", "ps => ps.map(p => p.innerText)")
    for doc, text in zip(docs, pairs, strict=True):
        for _d, v in doc["results"].items():
            assert f"P(A) = {v['p_a']:.3f}" in text
    screenshot(loaded, "compare")
    loaded.close()


# --------------------------------------------------------------------------- versus


def test_versus_report_chart_and_most_disagreeing_prompts(browser, tmp_path, expected):
    """The document ``mps versus A B --details --json`` writes (README), then the 3-side one."""
    rows = expected_rows(expected)
    prompts = sorted({p for _, p in rows})
    images = sorted({i for i, _ in rows})
    pick = {p: (images[k], images[k + 3]) for k, p in enumerate(prompts)}
    per_prompt = [{"prompt": p, "pairs": 1, "a_images": [str(IMAGES / a)], "b_images": [str(IMAGES / b)],
                   "a_scores": [{d: rows[(a, p)][d] for d in DIMS}], "b_scores": [{d: rows[(b, p)][d] for d in DIMS}],
                   "results": {d: {"win_rate": float(rows[(a, p)][d] > rows[(b, p)][d]),
                                   "mean_diff": rows[(a, p)][d] - rows[(b, p)][d]} for d in DIMS}}
                  for p, (a, b) in pick.items()]
    results = {"overall": {"win_rate": 0.625, "ci95": [0.55, 0.7], "mean_diff": 0.84},
               "aesthetics": {"win_rate": 0.4, "ci95": [0.31, 0.47], "mean_diff": -0.3},
               "detail": {"win_rate": 0.52, "ci95": [0.44, 0.6], "mean_diff": 0.1},
               "alignment": {"win_rate": 0.5, "ci95": [0.42, 0.58], "mean_diff": 0.0}}
    doc = {"a": "runs/base", "b": "runs/lora", "prompts": 4, "pairs": 4, "pairing": "by-name",
           "unpaired": {"runs/base": ["x.png"], "runs/lora": []},
           "missing": {},
           "failed": [{"side": "runs/lora", "image": "runs/lora/bad.png", "error": "bad.png: empty file"}],
           "bootstrap": {"samples": 2000, "seed": 0, "unit": "prompt"}, "scored": 8, "cached": 0,
           "weights": "mps-overall", "weights_identity": "0123abcd", "dtype": "fp32", "mask_threshold": 0.3,
           "results": {d: {**r, "wins": 2, "ties": 0, "losses": 2} for d, r in results.items()},
           "per_prompt": per_prompt}
    src = tmp_path / "versus.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "versus.html"
    assert cli("report", str(src), "-o", str(out)).exit_code == 0
    loaded = Loaded(browser, out)
    loaded.decode_images()
    loaded.quiet()
    page = loaded.page
    chart = page.eval_on_selector_all("svg.winrate g.row", "gs => gs.map(g => [g.getAttribute('class'), "
                                      "g.querySelector('.val').textContent])")
    assert chart == [["row a", "62.5% [55.0%, 70.0%]  Δ +0.840"], ["row b", "40.0% [31.0%, 47.0%]  Δ -0.300"],
                     ["row even", "52.0% [44.0%, 60.0%]  Δ +0.100"], ["row even", "50.0% [42.0%, 58.0%]  Δ +0.000"]]
    shown = page.eval_on_selector_all("section.versus .mps-pair h3.prompt", "hs => hs.map(h => h.textContent)")
    assert shown == [d["prompt"] for d in sorted(per_prompt, key=lambda d: -abs(d["results"]["overall"]["mean_diff"]))]
    cards = loaded.cards()
    assert [c["image"] for c in cards][:2] == [str(IMAGES / x) for x in pick[shown[0]]]
    assert len(cards) == 2 * len(per_prompt) and all(c["loaded"] > 0 for c in cards)
    lead = page.inner_text("section.versus .lead")
    assert "unpaired: runs/base: 1" in lead and "runs/lora: 0" not in lead and "pairing: by-name" in lead
    # every card carries each side's own scores for its image, so the sort select has the dimensions
    for i, p in enumerate(shown):
        for k, name in enumerate(pick[p]):
            assert cards[2 * i + k]["scores"] == pytest.approx({d: rows[(name, p)][d] for d in DIMS}, abs=1e-3)
    options = page.eval_on_selector_all("#mps-sort option", "os => os.map(o => o.value)")
    assert sorted(options) == sorted(DIMS)
    assert "bad.png: empty file" in page.inner_text("section.failed")
    footer = page.inner_text("footer")
    assert "mps-overall" in footer and "0123abcd" in footer and "fp32" in footer
    screenshot(loaded, "versus")
    loaded.close()

    # three sides: a matrix per dimension and a Bradley-Terry ranking
    sides = ["v1", "v2", "v3"]
    cell = {"win_rate": 0.7, "ci95": [0.6, 0.8], "mean_diff": 1.0, "prompts": 4, "pairs": 4, "unit": "prompt"}
    mirror = {**cell, "win_rate": 0.3, "ci95": [0.2, 0.4], "mean_diff": -1.0}
    matrix = {"overall": {x: {y: (cell if i < j else mirror) for j, y in enumerate(sides) if y != x}
                          for i, x in enumerate(sides)}}
    three = {"sides": sides, "prompts": 4, "pairs": 12, "unpaired": {}, "missing": {}, "failed": [],
             "matrix": matrix, "ranking": {"overall": [{"side": "v1", "strength": 0.6}, {"side": "v2", "strength": 0.3},
                                                       {"side": "v3", "strength": 0.1}]}}
    src.write_text(json.dumps(three))
    assert cli("report", str(src), "-o", str(out)).exit_code == 0
    loaded = Loaded(browser, out)
    loaded.quiet()
    leads = loaded.page.eval_on_selector_all("section.versus p.lead", "ps => ps.map(p => p.textContent)")
    assert [" ".join(x.split(" · ")[0].split()) for x in leads] == ["A v1 vs B v2", "A v1 vs B v3", "A v2 vs B v3"]
    assert "v1 0.600 > v2 0.300 > v3 0.100" in loaded.page.inner_text("table.ranking")
    assert loaded.page.eval_on_selector_all("svg.winrate g.row.a", "gs => gs.length") == 3
    loaded.close()


# --------------------------------------------------------------------------- dataset


def test_dataset_report_histograms_extremes_and_errors(browser, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(7)
    files = sorted(IMAGES.iterdir())
    out_dir, shard_dir = tmp_path / "scored", tmp_path / "shards"
    out_dir.mkdir()
    shard_dir.mkdir()
    all_rows = []
    for s in range(3):
        tar_path = shard_dir / f"{s:05d}.tar"
        keys, cols = [], {d: [] for d in DIMS}
        with tarfile.open(tar_path, "w") as tar:
            for k in range(40):
                key = f"{s:05d}{k:04d}"
                tar.add(files[k % len(files)], arcname=key + files[k % len(files)].suffix)
                keys.append(key)
                for d in DIMS:
                    cols[d].append(rng.gauss(12, 3))
        errors = [None] * 40
        errors[3] = f"{key}.jpg: corrupt or truncated image (broken data stream)"
        for d in DIMS:
            cols[d][3] = None
        table = pa.table({"key": keys, "shard": [str(tar_path)] * 40, "prompt": [f"prompt {k}" for k in keys],
                          **cols, "error": errors})
        pq.write_table(table, out_dir / f"{s:05d}.parquet")
        all_rows += [(keys[i], cols["overall"][i], errors[i]) for i in range(40)]
    (out_dir / "_manifest.json").write_text(json.dumps({
        "weights": {"label": "mps-overall", "identity": "9f8e7d6c5b4a3210"}, "dtype": "fp16", "mask_threshold": 0.3,
        "conditions": list(DIMS), "version": "0.2.0", "shards": {f"{s:05d}": 40 for s in range(3)}}))
    out = tmp_path / "dataset.html"
    res = cli("report", str(out_dir), "-o", str(out))
    assert res.exit_code == 0, res.output
    loaded = Loaded(browser, out, height=900)
    loaded.decode_images()
    loaded.quiet()
    page = loaded.page
    assert page.eval_on_selector_all("section.dataset figure.hist", "fs => fs.length") == len(DIMS)
    assert "n = 117" in page.inner_text("section.dataset figure.hist")
    ok = sorted((r for r in all_rows if r[2] is None), key=lambda r: -r[1])
    cards = loaded.cards()
    assert [c["image"] for c in cards] == [r[0] for r in ok[:12]] + [r[0] for r in ok[::-1][:12]]
    assert all(c["loaded"] > 0 for c in cards)  # thumbnails read out of the tar shards
    failed = page.inner_text("section.failed")
    assert failed.count("corrupt or truncated image") == 3
    footer = page.inner_text("footer")
    for fact in ("mps-overall", "9f8e7d6c5b4a3210", "fp16", "mask threshold 0.3", "scored with mps-score 0.2.0"):
        assert fact in footer
    screenshot(loaded, "dataset")
    loaded.close()


# --------------------------------------------------------------------------- scale


def test_2000_results_make_a_small_fast_page_and_beyond_max_images_a_sample(browser, tmp_path):
    from mps_cli.report import parse_results, render_report, write_report

    files = sorted(IMAGES.iterdir())
    rng = random.Random(3)
    docs = []
    for i in range(2000):
        link = tmp_path / f"img_{i:04d}{files[i % 7].suffix}"
        link.symlink_to(files[i % 7])
        docs.append({"image": link.name, "prompt": f"prompt number {i // 50}",
                     "scores": {d: rng.gauss(15, 4) for d in DIMS}})
    src = write_jsonl(tmp_path / "big.jsonl", docs)
    results = parse_results(src.read_text(), "big.jsonl", tmp_path)
    out = tmp_path / "big.html"
    summary = write_report(out, results)
    assert summary.cards == 2000 and not summary.sampled and summary.unreadable == ()
    assert out.stat().st_size < 40e6
    loaded = Loaded(browser, out)
    if loaded.load_s >= 5.0:  # a shared CI machine can stall once; a page that is really slow fails twice
        loaded.close()
        loaded = Loaded(browser, out)
    assert loaded.load_s < 5.0
    loaded.quiet()
    assert loaded.page.eval_on_selector_all(".mps-card", "cs => cs.length") == 2000
    assert loaded.page.eval_on_selector_all("section.dist figure.hist", "fs => fs.length") == len(DIMS)
    loaded.close()

    html, small = render_report(results, out_dir=tmp_path, max_images=300, link_images=True)
    assert small.sampled and small.cards == 300 + 2 * 12  # the sample, then the top and bottom 12
    assert "random sample of 300 of 2,000 scored images" in html
    best = max(docs, key=lambda d: d["scores"]["overall"])["image"]
    assert re.search(r'<h3>Top 12 by overall, of all scored images</h3><div class="mps-cards" data-sortable="1">'
                     r'<figure class="mps-card mps-unit" data-image="' + re.escape(best) + '"', html)


# --------------------------------------------------------------------------- CLI


def test_score_html_writes_the_report_of_the_printed_results(tmp_path):
    out = tmp_path / "run.html"
    res = cli("score", str(IMAGES), "--prompt", ONE_PROMPT, "--dim", "all", "--weights", str(WEIGHTS),
              "--device", "cpu", "--dtype", "fp32", "--jsonl", "--html", str(out))
    assert res.exit_code == 0, res.output
    printed = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(printed) == 7
    html = out.read_text(encoding="utf-8")
    cards = re.findall(r'<figure class="mps-card[^>]*>', html)
    assert len(cards) == 7
    for doc in printed:
        card = next(c for c in cards if f'data-image="{doc["image"]}"' in c)
        for d, s in doc["scores"].items():
            assert math.isclose(float(re.search(rf'data-score-{d}="([^"]+)"', card).group(1)), s, rel_tol=0, abs_tol=0)
    footer = re.search(r"<footer>(.*?)</footer>", html, re.S).group(1)
    assert str(WEIGHTS) in footer and "fp32" in footer and "mask threshold <b>0.3</b>" in footer
    assert f"wrote {out}" in res.stderr


def test_report_cli_bad_inputs(tmp_path, score_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "scores": {"overall": 1}}\nnot json\n')
    out = tmp_path / "r.html"
    res = cli("report", str(score_file[0]), str(bad), str(tmp_path / "missing.json"), "-o", str(out))
    assert res.exit_code == 1  # two unreadable inputs; the page has the readable one
    assert "bad.jsonl: line 2 is not JSON" in res.stderr and "missing.json: no such file" in res.stderr
    assert "Traceback" not in res.output
    assert out.read_text().count('class="mps-card ') == len(score_file[1])

    res = cli("report", str(bad), "-o", str(tmp_path / "none.html"))
    assert res.exit_code == 2 and "line 2 is not JSON" in res.stderr
    assert not (tmp_path / "none.html").exists()

    res = cli("report", str(score_file[0]), "-o", str(tmp_path / "no" / "such" / "dir.html"))
    assert res.exit_code == 2 and "does not exist" in " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.stderr).split())

    # a pipe: mps score ... --jsonl | mps report - -o page.html
    res = cli("report", "-", "-o", str(out), input=score_file[0].read_text())
    assert res.exit_code == 0, res.output
    assert out.read_text().count('class="mps-card ') == len(score_file[1])


def test_report_says_the_pages_size_in_the_units_the_other_commands_use(tmp_path):
    """A small page said '0.0 MB' (and '1 image cards'); sizes are KiB/MiB as convert and download say them."""
    one = write_jsonl(tmp_path / "one.jsonl", [{"image": str(IMAGES / "sunset.png"), "prompt": ONE_PROMPT,
                                                "scores": {"overall": 1.0}}])
    out = tmp_path / "one.html"
    res = cli("report", str(one), "-o", str(out))
    assert res.exit_code == 0, res.output
    kib = out.stat().st_size / 1024
    assert kib < 1024 and res.stderr.splitlines() == [f"mps: wrote {out} (1 image card, {kib:.1f} KiB)"]
