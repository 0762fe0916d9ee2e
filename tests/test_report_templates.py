"""The report's templates: package data in the wheel, autoescaped everywhere, and nothing marked safe but the
package's own stylesheet and script. (What the page does in a browser is tests/test_report.py.)"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import IMAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "mps_cli" / "report"
TEMPLATES = PACKAGE / "templates"
#: The only values the report code may mark safe (markupsafe.Markup), and why: they are the package's own
#: stylesheet and script (templates/report.css and report.js), read from package data, never user text; the
#: Content-Security-Policy allows exactly them, by the hashes of these same strings.
SAFE_NAMES = {"css", "js"}
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def test_no_template_marks_anything_safe_or_turns_escaping_off():
    templates = sorted(TEMPLATES.rglob("*.j2"))
    assert len(templates) >= 10  # base, report, one partial per card kind, one per section kind
    for path in templates:
        text = path.read_text(encoding="utf-8")
        for marker in (r"\|\s*safe\b", r"autoescape\s+false", r"\bMarkup\b", r"\|\s*forceescape", r"\{%\s*raw"):
            assert not re.search(marker, text), f"{path.relative_to(REPO)}: {marker}"


def test_every_template_is_autoescaped():
    from mps_cli.report.page import environment

    env = environment()
    names = env.list_templates(extensions=["j2"])
    assert {"base.html.j2", "report.html.j2", "partials/card.html.j2", "sections/versus.html.j2"} <= set(names)
    assert env.autoescape is True  # not a per-name function: every template, whatever its extension
    for name in names:
        assert env.get_template(name).environment.autoescape is True, name


def test_only_the_inline_assets_are_marked_safe_in_the_code():
    marked = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Markup":
                marked += [ast.unparse(arg) for arg in node.args]
    assert sorted(marked) == sorted(SAFE_NAMES)
    source = (PACKAGE / "page.py").read_text(encoding="utf-8")
    assert "css, js = inline_assets()" in source  # the names marked safe are the package files, nothing else


def test_hostile_text_reaches_the_page_only_escaped(tmp_path):
    from mps_cli.report import parse_results, render_report

    docs = [{"image": HOSTILE + ".png", "prompt": HOSTILE, "scores": {"overall": 1.0}},
            {"image": "ok.png", "error": HOSTILE}]
    results = parse_results("\n".join(json.dumps(d) for d in docs), HOSTILE, tmp_path)
    html, summary = render_report(results, out_dir=tmp_path, title=HOSTILE)
    assert summary.cards == 1
    assert "<img src=x" not in html and "<script>alert" not in html
    assert html.count("<script>") == 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_csp_hashes_are_those_of_the_inline_assets(tmp_path):
    import base64
    import hashlib

    from mps_cli.report import parse_results, render_report

    doc = {"image": str(IMAGES / "sunset.png"), "prompt": "a fox", "scores": {"overall": 1.0}}
    html, _ = render_report(parse_results(json.dumps(doc), "r.json"), out_dir=tmp_path)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    for text, kind in ((style, "style"), (script, "script")):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in html
    assert style == (TEMPLATES / "report.css").read_text() and script == (TEMPLATES / "report.js").read_text()


def test_the_wheel_carries_the_templates(tmp_path):
    pytest.importorskip("hatchling", reason="the test extra installs the build backend")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("mps_score-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"mps_cli/report/templates/{p.relative_to(TEMPLATES).as_posix()}" for p in TEMPLATES.rglob("*")
              if p.is_file()}
    assert wanted and wanted <= names, sorted(wanted - names)
