"""Crafted results against ``mps report`` and ``--html``: markup, event handlers and ``javascript:`` in
every field the page shows (prompts, image names, errors, dimension names, versus sides, dataset keys,
shards and manifest, the title), and fields of the wrong type. In a real headless Chromium no script
but the page's own may run, no request may leave the page, and the text must show as text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import IMAGES, run_cli
from test_report import Loaded, browser, write_jsonl  # noqa: F401 (browser: the module's Chromium fixture)

VECTORS = [
    "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "javascript:alert(3)",
    "'><svg onload=alert(4)>", "</style><script>alert(5)</script>", "</script><script>alert(6)</script>",
    "<iframe src=http://example.com/></iframe>", '<meta http-equiv="refresh" content="0;url=http://example.com/">',
    '<base href="http://example.com/">', "<a href='javascript:alert(7)'>x</a>", "<!--", "]]>", "&lt;b&gt;",
    "\u2028\u2029", "${alert(8)}{{7*7}}", "<form action=http://example.com/><button>go</button></form>",
    '<link rel="stylesheet" href="http://example.com/x.css">', "<object data=http://example.com/></object>",
    "<img src=http://example.com/pixel.png>", "url(http://example.com/x)",
]
EVIL = " ".join(VECTORS)
REAL = sorted(p.name for p in IMAGES.iterdir())


def evil(field: str) -> str:
    return f"{field} {EVIL}"


def hostile_inputs(tmp: Path) -> list[Path]:
    """Results of every kind the report reads, hostile wherever they hold text."""
    score = write_jsonl(tmp / "score.jsonl", [
        {"image": str(IMAGES / REAL[0]), "prompt": evil("prompt"), "scores": {"overall": 1.5, "detail": 0.5}},
        {"image": evil("image") + ".png", "prompt": evil("prompt"), "scores": {"overall": 0.2,
                                                                             evil("dim"): 9.0}},
        {"image": str(IMAGES / REAL[1]), "prompt": evil("prompt"), "error": evil("error")},
        {"image": str(IMAGES / REAL[2]), "prompt": evil("ranked"), "scores": {"overall": 2.0}, "rank": 1},
    ])
    compare = write_jsonl(tmp / "compare.jsonl", [{
        "prompt": evil("compare prompt"), "a": str(IMAGES / REAL[3]), "b": evil("b") + ".png",
        "results": {"overall": {"a": 1.0, "b": 2.0, "p_a": 0.27, "winner": evil("winner")},
                    evil("dim"): {"a": 1, "b": 2, "p_a": 0.5, "winner": "a"}}}])
    versus = tmp / "versus.json"
    versus.write_text(json.dumps({
        "a": evil("side a"), "b": evil("side b"), "prompts": 1, "pairs": 1,
        "unpaired": {evil("side a"): [evil("unpaired")]}, "missing": {},
        "failed": [{"side": evil("side"), "image": evil("failed image"), "error": evil("failed error")}],
        "results": {"overall": {"win_rate": 0.5, "ci95": [0.1, 0.9], "mean_diff": 0.1, "wins": 1, "ties": 0,
                                "losses": 1}},
        "per_prompt": [{"prompt": evil("versus prompt"), "pairs": 1, "a_images": [str(IMAGES / REAL[4])],
                        "b_images": [evil("b image")], "results": {"overall": {"win_rate": 1.0, "mean_diff": 0.4}}}],
        "weights": evil("weights"), "weights_identity": evil("identity"), "dtype": evil("dtype")}))
    matrix = tmp / "matrix.json"
    sides = [evil(f"side {i}") for i in range(3)]
    cell = {"win_rate": 0.5, "ci95": [0.2, 0.8], "mean_diff": 0.0, "wins": 1, "ties": 0, "losses": 1, "prompts": 1,
            "pairs": 2, "unit": "pair"}
    matrix.write_text(json.dumps({
        "sides": sides, "matrix": {"overall": {a: {b: cell for b in sides if b != a} for a in sides}},
        "ranking": {"overall": [{"side": s, "strength": 1 / 3} for s in sides]},
        "failed": [{"side": sides[0], "image": evil("m image"), "error": evil("m error")}]}))
    rows = tmp / "rank.csv"
    with rows.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "image", "prompt", "overall", "error"])
        w.writerow([1, str(IMAGES / REAL[5]), evil("csv prompt"), 3.25, ""])
        w.writerow(["", evil("csv image"), evil("csv prompt"), "", evil("csv error")])
    return [score, compare, versus, matrix, rows, _hostile_dataset(tmp)]


def _hostile_dataset(tmp: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp / "dataset"
    folder.mkdir()
    keys = [evil(f"key {i}") for i in range(4)]
    pq.write_table(pa.table({"key": keys, "shard": [evil("shard") + ".tar"] * 4,
                             "prompt": [evil("ds prompt")] * 4, "overall": [1.0, 2.0, None, 0.5],
                             "error": [None, None, evil("ds error"), None]}), folder / "00000.parquet")
    (folder / "_manifest.json").write_text(json.dumps({
        "tool": "mps-cli", "version": evil("version"),
        "settings": {"weights": evil("weights"), "dtype": evil("dtype"), "mask_threshold": 0.3,
                     "conditions": {"overall": evil("condition")}}, "shards": {}}))
    return folder


DOM_CHECK = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('*')) {
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) bad.push(el.tagName + ' ' + a.name);
      if (['href', 'src', 'action', 'data', 'formaction', 'xlink:href'].includes(a.name)
          && /^\\s*(javascript|vbscript|http|https):/i.test(a.value)) bad.push(el.tagName + ' ' + a.name);
    }
  }
  const tags = ['iframe', 'object', 'embed', 'base', 'form', 'link', 'button', 'frame', 'frameset', 'applet'];
  for (const t of tags) for (const el of document.getElementsByTagName(t)) bad.push('element ' + t);
  for (const m of document.querySelectorAll('meta[http-equiv]'))
    if (m.getAttribute('http-equiv').toLowerCase() !== 'content-security-policy') bad.push('meta ' + m.outerHTML);
  return {bad, scripts: document.scripts.length, text: document.body.innerText};
}"""


@pytest.mark.parametrize("link", [False, True], ids=["embedded", "link-images"])
def test_hostile_text_in_every_field_runs_nothing_and_fetches_nothing(browser, tmp_path, link):  # noqa: F811
    sources = hostile_inputs(tmp_path)
    out = tmp_path / "report.html"
    res = run_cli("report", *map(str, sources), "-o", str(out), "--title", evil("title"),
                  *(["--link-images"] if link else []))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    loaded = Loaded(browser, out, height=900)
    page = loaded.page
    for i in range(page.eval_on_selector_all(".mps-card .thumb", "t => t.length")):
        page.eval_on_selector_all(".mps-card .thumb", f"t => t[{i}].click()")
        page.keyboard.press("Escape")
    page.fill("#mps-filter", "<script>alert(9)</script>")
    page.fill("#mps-filter", "")
    for value in page.eval_on_selector_all("#mps-sort option", "os => os.map(o => o.value)"):
        page.select_option("#mps-sort", value)
    loaded.decode_images()
    page.wait_for_timeout(100)
    loaded.quiet()  # no dialog, no console line, no page error, no request beyond the page and its images
    found = page.evaluate(DOM_CHECK)
    assert found["bad"] == [] and found["scripts"] == 1, found["bad"][:10]
    text = found["text"]
    for field in ("prompt", "error", "compare prompt", "side a", "versus prompt", "failed error", "csv prompt",
                  "ds prompt", "ds error", "title"):
        assert evil(field).split(" ", 1)[1][:60] in text.replace("\n", " "), field  # shown, as text
    assert page.title() == evil("title")
    loaded.close()


TYPE_CONFUSED = {
    "a win rate that is text": {"a": "A", "b": "B", "results": {"overall": {"win_rate": "<b>", "ci95": "x",
                                                                         "mean_diff": [1]}}},
    "a p_a that is text": {"prompt": "p", "a": "a.png", "b": "b.png",
                           "results": {"overall": {"a": "1", "b": None, "p_a": "0.5", "winner": 3}}},
    "scores that are text": {"image": "x.png", "prompt": "p", "scores": {"overall": "NaN", "detail": "1e999"}},
    "a prompt that is a list": {"image": "x.png", "prompt": ["<script>"], "scores": {"overall": 1}},
    "an image that is a number": {"image": 12, "prompt": "p", "scores": {"overall": 1}},
    "a rank that is a string": {"image": "x.png", "prompt": "p", "scores": {"overall": 1}, "rank": "<1>"},
    "a matrix with odd sides": {"sides": [1, None, {"a": 1}], "matrix": {"overall": {"1": {"None": "x"}}}},
    "per-prompt details of the wrong shape": {"a": "A", "b": "B", "results": {"overall": {"win_rate": 0.5}},
                                              "per_prompt": [1, "x", {"prompt": 5, "a_images": 3, "mean_diff": "x"}]},
    "failed entries of the wrong shape": {"a": "A", "b": "B", "results": {"overall": {"win_rate": 0.5}},
                                          "failed": ["x", 1, {"error": {"a": 1}}]},
    "unpaired of the wrong shape": {"a": "A", "b": "B", "results": {"overall": {"win_rate": 0.5}}, "unpaired": 7},
}


def test_results_of_the_wrong_types_render_or_fail_in_one_line(tmp_path):
    failures = []
    for name, doc in TYPE_CONFUSED.items():
        src = tmp_path / "doc.json"
        src.write_text(json.dumps(doc))
        out = tmp_path / "page.html"
        out.unlink(missing_ok=True)
        res = run_cli("report", str(src), "-o", str(out))
        lines = res.stderr.strip().splitlines()
        if "Traceback" in res.stderr or "unexpected" in res.stderr or res.returncode not in (0, 1, 2):
            failures.append(f"{name}: exit {res.returncode}: {res.stderr[-400:]}")
        elif res.returncode == 2 and (len(lines) != 1 or out.exists()):
            failures.append(f"{name}: exit 2 should be one line and no page: {lines}")
        elif res.returncode == 0 and "<script>" in out.read_text().split("<script>", 1)[0]:
            failures.append(f"{name}: markup before the page's own script")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("content, says", [
    ((IMAGES / "gray.png").read_bytes(), "not a results file (expected JSON, JSONL or CSV from mps)"),
    (b"\x00\x01\x02binary", "not a results file (expected JSON, JSONL or CSV from mps)"),
    (b"just some words\n", "line 1 is not JSON"),
    (b"", "empty"),
], ids=["a png", "binary", "text", "empty"])
def test_a_file_that_is_not_results_says_so_in_one_line(tmp_path, content, says):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    res = run_cli("report", str(bad), "-o", str(tmp_path / "y.html"))
    assert res.returncode == 2 and not (tmp_path / "y.html").exists()
    (line,) = res.stderr.strip().splitlines()
    assert line == f"mps: error: {bad}: {says}" or (says in line and line.startswith("mps: error:")), line
    assert "codec" not in line


def test_score_html_with_hostile_prompt_and_names_runs_nothing(browser, tmp_path):  # noqa: F811
    """--html on a real scoring run: the prompt and the file names come from the user."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ['"><img src=x onerror=alert(1)>.png', "javascript:alert(2).png", "<script>alert(3)<.png"]
    for n, real in zip(names, REAL, strict=False):
        (folder / n).write_bytes((IMAGES / real).read_bytes())
    from conftest import WEIGHTS

    out = tmp_path / "score.html"
    res = run_cli("rank", str(folder), "--prompt", EVIL, "--html", str(out), "--weights", str(WEIGHTS),
                  "--device", "cpu", "--dtype", "fp32", "--jsonl")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.rstrip("\n").split("\n")) == 3  # JSON lines: U+2028 in the prompt is no line break
    loaded = Loaded(browser, out)
    loaded.page.eval_on_selector_all(".mps-card .thumb", "t => t.forEach(x => x.click())")
    loaded.decode_images()
    loaded.quiet()
    found = loaded.page.evaluate(DOM_CHECK)
    assert found["bad"] == [] and found["scripts"] == 1, found["bad"][:10]
    assert {c["image"] for c in loaded.cards()} == {str(folder / n) for n in names}
    assert all(c["loaded"] > 0 for c in loaded.cards())
    loaded.close()
