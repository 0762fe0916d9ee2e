"""The ``mps`` command line as people and pipelines use it: the JSON contract checked against
the original implementation's scores (expected.json), rank/compare semantics, pipes, Ctrl-C
and help. What a command prints is tested in-process on one shared scorer; the console script runs
in a subprocess where the process itself is under test (pipes, Ctrl-C, help and import time)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import FIXTURE, IMAGES, WEIGHTS, messages, mps_executable, run_cli, run_mps, summary
from typer.testing import CliRunner

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
CUBES = "three blue cubes stacked on top of a wooden table"
CAFE = "A cozy café interior — warm light, plants & books"
FISHER = "portrait of an old fisherman with weathered hands, 35mm photo"
ALL_DIMS = ("overall", "aesthetics", "detail", "alignment")
FIXTURE_IMAGES = ("sunset.png", "portrait.jpg", "alpha.png", "gray.png", "palette.gif", "wide.webp", "crop.png")
TOL = 1e-3


def table(expected: dict) -> dict:
    """expected.json's rows as {(image, prompt, dim): score}."""
    return {(r["image"], r["prompt"], r["dim"]): r["score"] for r in expected["scores"]}


def clean_stderr(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def jsonl(stdout: str) -> list[dict]:
    """Every stdout line must be one complete JSON object (stdout carries results only)."""
    return [json.loads(line) for line in stdout.splitlines()]


def flat(text: str) -> str:
    """Help text with Rich's box drawing and wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━]", " ", text).split())


DIMENSION_NOTE = "Only a checkpoint trained on overall preference has been published"


# --------------------------------------------------------------------------- score


def test_score_json_all_dims_matches_expected_and_echoes_paths_as_given(expected):
    exp = table(expected)
    # Paths in several spellings: the output must echo each exactly, not a resolved form.
    args = ["images/sunset.png", "./images/gray.png", str(IMAGES / "wide.webp"), "images/palette.gif",
            "images/portrait.jpg", "images/alpha.png", "images/crop.png"]
    proc = run_cli("score", *args, "--prompt", FOX, "--dim", "all", "--json", "-w", str(WEIGHTS), cwd=FIXTURE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert isinstance(doc, list) and [d["image"] for d in doc] == args
    for d, arg in zip(doc, args):
        assert set(d) == {"image", "prompt", "scores"}
        assert d["prompt"] == FOX
        assert list(d["scores"]) == list(ALL_DIMS)
        name = os.path.basename(arg)
        for dim in ALL_DIMS:
            assert d["scores"][dim] == pytest.approx(exp[(name, FOX, dim)], abs=TOL), (name, dim)


def test_score_csv_with_paths_from_stdin(expected):
    exp = table(expected)
    names = ["crop.png", "portrait.jpg", "wide.webp"]
    stdin = "".join(f"images/{n}\n" for n in names) + "\n"  # a blank line is not a path
    proc = run_cli("score", "-", "--prompt", CAFE, "--dim", "overall", "--dim", "detail", "--csv",
                   "-w", str(WEIGHTS), cwd=FIXTURE, input=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["image"] for r in rows] == [f"images/{n}" for n in names]
    for r, name in zip(rows, names):
        assert r["prompt"] == CAFE  # non-ASCII and a comma survive CSV quoting
        assert r["error"] == ""
        for dim in ("overall", "detail"):
            assert float(r[dim]) == pytest.approx(exp[(name, CAFE, dim)], abs=TOL), (name, dim)


# --------------------------------------------------------------------------- rank


def _gallery(tmp_path, sub_image: str | None = None):
    """A folder of fixture copies with mixed-case extensions, non-image files, and a sub-folder."""
    g = tmp_path / "gallery"
    g.mkdir()
    names = {"sunset.png": "Sunset.PNG", "portrait.jpg": "portrait.JpG", "gray.png": "gray.png",
             "palette.gif": "palette.GIF", "wide.webp": "wide.webp", "alpha.png": "alpha.png",
             "crop.png": "crop.png"}
    (g / "sub").mkdir()
    for src, dst in names.items():
        shutil.copy(IMAGES / src, (g / "sub" / dst) if src == sub_image else (g / dst))
    (g / "notes.txt").write_text("not an image\n")
    (g / "README").write_text("no extension\n")
    (g / "sunset.png.bak").write_bytes((IMAGES / "sunset.png").read_bytes())
    return g, names


def test_rank_folder_and_stdin_by_dimension_with_failed_input_last(tmp_path, expected):
    exp = table(expected)
    _, names = _gallery(tmp_path, sub_image="alpha.png")
    # alpha.png sits in sub/ (not recursed into) but arrives by its own path on stdin.
    outside = str(IMAGES / "alpha.png")
    proc = run_cli("rank", "gallery", "nothere.png", "-", "--prompt", FOX, "--by", "alignment", "--jsonl",
                   "-w", str(WEIGHTS), cwd=tmp_path, input=outside + "\n")
    assert proc.returncode == 1, proc.stderr
    clean_stderr(proc)
    # Non-image files are skipped silently; the one failure is reported once.
    assert len(messages(proc.stderr)) == 1 and "nothere.png" in proc.stderr
    assert summary(proc.stderr) == "mps: 7 scored, 1 failed"
    rows = jsonl(proc.stdout)
    label = {s: outside if s == "alpha.png" else os.path.join("gallery", names[s]) for s in names}
    want = sorted(names, key=lambda s: -exp[(s, FOX, "alignment")])
    scored, failed = rows[:-1], rows[-1]
    assert [r["image"] for r in scored] == [label[s] for s in want]
    assert [r["rank"] for r in scored] == list(range(1, len(want) + 1))
    for r, src in zip(scored, want):
        assert r["scores"]["alignment"] == pytest.approx(exp[(src, FOX, "alignment")], abs=TOL)
        # --by adds its dimension to the default one.
        assert r["scores"]["overall"] == pytest.approx(exp[(src, FOX, "overall")], abs=TOL)
    assert set(failed) == {"image", "error"} and failed["image"] == "nothere.png"
    assert "nothere.png" in failed["error"]


def test_rank_recursive_top_k_json(tmp_path, expected):
    exp = table(expected)
    # Put the best image for this prompt in the sub-folder: without --recursive it could not lead.
    best = max(FIXTURE_IMAGES, key=lambda s: exp[(s, CUBES, "overall")])
    _, names = _gallery(tmp_path, sub_image=best)
    proc = run_cli("rank", "gallery", "--recursive", "--top", "3", "--prompt", CUBES, "--json",
                   "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    want = sorted(FIXTURE_IMAGES, key=lambda s: -exp[(s, CUBES, "overall")])[:3]
    label = {s: os.path.join("gallery", "sub", names[s]) if s == best else os.path.join("gallery", names[s])
             for s in FIXTURE_IMAGES}
    assert [d["image"] for d in doc] == [label[s] for s in want]
    assert [d["rank"] for d in doc] == [1, 2, 3]
    for d, src in zip(doc, want):
        assert d["prompt"] == CUBES
        assert d["scores"]["overall"] == pytest.approx(exp[(src, CUBES, "overall")], abs=TOL)


# --------------------------------------------------------------------------- compare


def test_compare_json_per_dimension(expected):
    exp = table(expected)
    proc = run_cli("compare", "images/sunset.png", "images/palette.gif", "--prompt", FOX, "--dim", "all",
                   "--json", "-w", str(WEIGHTS), cwd=FIXTURE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert (doc["prompt"], doc["a"], doc["b"]) == (FOX, "images/sunset.png", "images/palette.gif")
    assert list(doc["results"]) == list(ALL_DIMS)
    for dim in ALL_DIMS:
        sa, sb = exp[("sunset.png", FOX, dim)], exp[("palette.gif", FOX, dim)]
        p_a = math.exp(sa) / (math.exp(sa) + math.exp(sb))
        got = doc["results"][dim]
        assert got["a"] == pytest.approx(sa, abs=TOL)
        assert got["b"] == pytest.approx(sb, abs=TOL)
        assert got["p_a"] == pytest.approx(p_a, abs=TOL)
        assert got["winner"] == ("a" if sa > sb else "b")


def test_compare_warns_once_about_a_long_prompt():
    from mps_cli.cli import app

    long_prompt = FOX + " " + " ".join(f"word{i}" for i in range(100))
    res = CliRunner().invoke(app, ["compare", str(IMAGES / "sunset.png"), str(IMAGES / "gray.png"), "--prompt",
                                   long_prompt, "--json", "-w", str(WEIGHTS), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["prompt"] == long_prompt
    assert len([line for line in res.stderr.splitlines() if "77 tokens" in line]) == 1, res.stderr


# --------------------------------------------------------------------------- pipelines


def test_ctrl_c_exits_130_and_leaves_whole_lines(tmp_path):
    # Enough inputs that the run cannot finish before the signal lands (30 did, on a quiet machine, since
    # the next batch is prepared while the model runs); the run stops at the signal, so this costs nothing.
    shutil.copy(IMAGES / "crop.png", tmp_path / "c0000.png")
    paths = ["c0000.png"]
    for i in range(1, 1000):
        (tmp_path / f"c{i:04d}.png").symlink_to("c0000.png")
        paths.append(f"c{i:04d}.png")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MPS_WEIGHTS", None)
    proc = subprocess.Popen([*mps_executable(), "score", *paths, "--prompt", FOX, "--batch-size", "1",
                             "--jsonl", "-w", str(WEIGHTS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=env,
                            # as at a terminal: a shell's background job (`cmd &`) would hand SIGINT down ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = (first + rest).splitlines()
    assert 1 <= len(lines) < len(paths)
    assert (first + rest).endswith("\n")
    for line, name in zip(lines, paths):
        r = json.loads(line)
        assert r["image"] == name and set(r["scores"]) == {"overall"}


# --------------------------------------------------------------------------- help


def test_console_help_mentions_published_checkpoint():
    proc = run_mps("--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = flat(proc.stdout)
    assert DIMENSION_NOTE in text
    for cmd in ("score", "rank", "compare"):
        assert cmd in text


_HELP_PROBE = """
import json, sys
from typer.testing import CliRunner
from mps_cli.cli import app
runner = CliRunner()
out = {}
for args in (["--help"], ["score", "--help"], ["rank", "--help"], ["compare", "--help"]):
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    out[" ".join(args)] = [res.exit_code, res.output]
heavy = [m for m in ("torch", "open_clip", "safetensors", "huggingface_hub") if m in sys.modules]
print(json.dumps({"help": out, "heavy": heavy}))
"""


def test_subcommand_help_is_honest_and_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["heavy"] == []
    for args, (code, output) in report["help"].items():
        assert code == 0, (args, output)
        assert DIMENSION_NOTE in flat(output), args
    assert "--by" in report["help"]["rank --help"][1]
    assert "--top" in report["help"]["rank --help"][1]
    assert "p_a" in flat(report["help"]["compare --help"][1])


def test_python_dash_m_help_works_without_importing_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mps_cli", "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert DIMENSION_NOTE in flat(proc.stdout)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "mps_cli.cli" in imported  # the probe did see the imports
    assert not [m for m in imported if m.split(".")[0] in ("torch", "open_clip", "safetensors")]


def test_scoring_imports_neither_open_clip_nor_torchvision_nor_dynamo(expected):
    # Importing any open_clip module runs its package __init__ (torchvision, torch._dynamo): 2.3 s of
    # start-up on a small CPU. The towers and the BPE are ours; this run's scores prove they are right.
    row = next(r for r in expected["scores"] if r["dim"] == "overall")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mps_cli", "score", str(IMAGES / row["image"]),
                           "--prompt", row["prompt"], "--json", "-w", str(WEIGHTS), "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and "mps_cli.engine.model" in imported
    assert not [m for m in imported if m.split(".")[0] in ("open_clip", "torchvision")]
    assert not [m for m in imported if m.startswith("torch._dynamo")]
    [doc] = json.loads(proc.stdout)
    assert doc["scores"]["overall"] == pytest.approx(row["score"], abs=1e-3)


# --------------------------------------------------------------------------- parsing (in-process)


@pytest.mark.parametrize("args, culprit", [
    (["score", "x.png", "--prompt", "p", "--json", "--jsonl"], "--json and --jsonl"),
    (["score", "x.png", "--prompt", "p", "--mask-threshold", "1.5"], "--mask-threshold"),
    (["score", "x.png", "--prompt", "p", "--batch-size", "0"], "--batch-size"),
    (["score", "x.png", "--prompt", "p", "--dtype", "fp8"], "fp8"),
    (["score", "x.png", "--prompt", "p", "--prompt-from", "exif"], "exif"),
    (["score", "x.png", "--prompt", "p", "--prompt-from", "sidecar"], "--prompt and --prompt-from"),
    (["score", "--prompt", "p"], "no images"),
    (["rank", "x.png", "--prompt", "p", "--by", "beauty"], "beauty"),
    (["rank", "x.png", "--prompt", "p", "--by", "custom"], "--condition"),
    (["rank", "x.png", "--prompt", "p", "--top", "0"], "--top"),
    (["compare", "a.png", "b.png"], "--prompt"),
    (["compare", "a.png", "--prompt", "p"], "'B'"),
])
def test_usage_errors_exit_2_before_loading_anything(args, culprit, tmp_path):
    from mps_cli.cli import app
    from mps_cli.cli.app import LOADS

    loads = LOADS["count"]
    # Weights that do not exist: had loading started, the exit would be 3 and the message would name them.
    res = CliRunner().invoke(app, [*args, "-w", str(tmp_path / "absent.safetensors")], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert culprit in flat(res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert LOADS["count"] == loads and "absent" not in res.output


def test_prompts_file_with_positional_images_is_a_usage_error(tmp_path):
    from mps_cli.cli import app

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"image": "a.png", "prompt": "p"}) + "\n")
    res = CliRunner().invoke(app, ["score", "x.png", "--prompts", str(f)])
    assert res.exit_code == 2
    assert "--prompts" in res.output


# --------------------------------------------------------------------------- the JSON contract in-process
# These share one loaded scorer: the CLI keeps loaded models per process, keyed by the model options.


def invoke(*args: str, env: dict | None = None):
    from mps_cli.cli import app

    return CliRunner().invoke(app, [*args, "-w", str(WEIGHTS), "--device", "cpu"],
                              env={"COLUMNS": "100", **(env or {})})


def test_dims_comma_separated_same_as_repeated(expected):
    exp = table(expected)
    res = invoke("score", str(IMAGES / "sunset.png"), "--prompt", FOX, "--dim", "aesthetics,detail", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert list(doc[0]["scores"]) == ["aesthetics", "detail"]
    for dim in ("aesthetics", "detail"):
        assert doc[0]["scores"][dim] == pytest.approx(exp[("sunset.png", FOX, dim)], abs=TOL)


def test_rank_groups_by_prompt_with_per_image_prompts(tmp_path, expected):
    exp = table(expected)
    plan = [(n, p) for p in (FOX, CUBES) for n in ("sunset.png", "gray.png", "crop.png")]
    # Hugging Face imagefolder spelling: file_name and text.
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": str(IMAGES / n), "text": p}) + "\n" for n, p in plan))
    res = invoke("rank", "--prompts", str(tmp_path / "metadata.jsonl"), "--top", "2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    for group, prompt in ((1, FOX), (2, CUBES)):
        rows = [d for d in doc if d["group"] == group]
        want = sorted(("sunset.png", "gray.png", "crop.png"), key=lambda n: -exp[(n, prompt, "overall")])[:2]
        assert [os.path.basename(d["image"]) for d in rows] == want
        assert [d["rank"] for d in rows] == [1, 2] and {d["prompt"] for d in rows} == {prompt}
    table_res = invoke("rank", "--prompts", str(tmp_path / "metadata.jsonl"))
    assert "group 1 of 2" in table_res.stdout and "group 2 of 2" in table_res.stdout


def test_compare_failure_is_one_document_and_csv_names_like_json(tmp_path):
    res = invoke("compare", str(IMAGES / "sunset.png"), str(tmp_path / "gone.png"), "--prompt", FOX, "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)  # one document, not two
    assert "gone.png" in doc["error"] and "results" not in doc
    ok = invoke("compare", str(IMAGES / "sunset.png"), str(IMAGES / "gray.png"), "--prompt", FOX, "--dim", "all",
                "--json")
    as_csv = invoke("compare", str(IMAGES / "sunset.png"), str(IMAGES / "gray.png"), "--prompt", FOX, "--dim",
                    "all", "--csv")
    row = next(csv.DictReader(io.StringIO(as_csv.stdout)))
    results = json.loads(ok.stdout)["results"]
    for dim, fields in results.items():
        for key, value in fields.items():
            got = row[f"{dim}.{key}"]
            assert (float(got) == pytest.approx(value, abs=1e-5)) if key != "winner" else got == value


def test_compare_prompt_from_sidecar(tmp_path):
    for name in ("sunset.png", "gray.png"):
        shutil.copy(IMAGES / name, tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(FOX)
    res = invoke("compare", str(tmp_path / "sunset.png"), str(tmp_path / "gray.png"), "--prompt-from", "sidecar",
                 "--json")
    want = invoke("compare", str(IMAGES / "sunset.png"), str(IMAGES / "gray.png"), "--prompt", FOX, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"] == json.loads(want.stdout)["results"]
    (tmp_path / "gray.txt").write_text(CUBES)
    res = invoke("compare", str(tmp_path / "sunset.png"), str(tmp_path / "gray.png"), "--prompt-from", "sidecar",
                 "--json")
    assert res.exit_code == 1 and "different prompts" in json.loads(res.stdout)["error"]


def test_table_lists_failed_inputs_and_prompt_wraps_to_the_terminal(tmp_path):
    long_prompt = " ".join(["a very long prompt"] * 12)
    res = invoke("score", str(IMAGES / "gray.png"), str(tmp_path / "gone.png"), "--prompt", long_prompt,
                 env={"COLUMNS": "200"})
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert any("gone.png" in line and "failed" in line for line in lines)
    table_width = max(len(line) for line in lines if line.startswith(("┏", "└")))
    caption = [line for line in lines if line.startswith("prompt: ")]
    assert len(caption) == 1 and len(caption[0]) > table_width  # not folded to the table's width


def test_revision_conflicting_with_source_is_a_usage_error():
    from mps_cli.cli import app

    res = CliRunner().invoke(app, ["score", "x.png", "--prompt", "p", "-w", "hf://o/r/f.safetensors@v1",
                                   "--revision", "v2"])
    assert res.exit_code == 2 and "v1" in res.output and "v2" in res.output


def test_convert_refuses_to_overwrite_without_force(tmp_path):
    from mps_cli.cli import app

    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    src = FIXTURE / "original-format" / "MPS_tiny_state_dict.pth"
    res = CliRunner().invoke(app, ["convert", str(src), str(dst)])
    assert res.exit_code == 2 and "--force" in res.output and dst.read_bytes() == b"keep me"
    res = CliRunner().invoke(app, ["convert", str(src), str(dst), "--force"])
    assert res.exit_code == 0, res.output and dst.stat().st_size > 1000


def test_unexpected_errors_are_one_line_exit_5_and_never_exit_1(capsys, monkeypatch):
    import typer as _typer

    from mps_cli.cli.app import Exit, handle_errors
    from mps_cli.errors import MPSError

    # Real exceptions, raised where loading would be: a bug (5) is told apart from a resource failing (3).
    for exc, code in ((RuntimeError("boom"), Exit.INTERNAL), (MemoryError(), Exit.RESOURCE),
                      (MPSError("nothing scored"), Exit.RESOURCE)):
        with pytest.raises(_typer.Exit) as info, handle_errors("loading the weights"):
            raise exc
        assert info.value.exit_code == code
    assert (int(Exit.RESOURCE), int(Exit.INTERNAL)) == (3, 5)
    err = capsys.readouterr().err
    assert "unexpected RuntimeError while loading the weights: boom" in err
    assert "MPS_DEBUG=1" in err and "Traceback" not in err
    for spelling in ("false", "0", "no", "OFF", ""):  # "no" spelled any way keeps the traceback away
        monkeypatch.setenv("MPS_DEBUG", spelling)
        with pytest.raises(_typer.Exit), handle_errors("loading the weights"):
            raise RuntimeError("boom")
        assert "Traceback" not in capsys.readouterr().err, spelling
    for spelling in ("1", "true", "yes", "On"):
        monkeypatch.setenv("MPS_DEBUG", spelling)
        with pytest.raises(_typer.Exit), handle_errors("loading the weights"):
            raise RuntimeError("boom")
        assert "Traceback" in capsys.readouterr().err, spelling


def test_large_prepared_weights_are_announced_once(capsys):
    import logging

    from mps_cli.cli.app import NOTICE_MIN_BYTES, _route_library_notices

    _route_library_notices()
    log = logging.getLogger("mps_cli")
    for _ in range(2):
        log.info("writing %.1f GiB of prepared weights", 4.1, extra={"nbytes": 4 * 2**30})
    log.info("small file", extra={"nbytes": NOTICE_MIN_BYTES - 1})
    err = capsys.readouterr().err.splitlines()
    assert err == ["mps: note: writing 4.1 GiB of prepared weights"]


def test_every_command_help_says_its_exit_codes_and_keeps_its_paragraphs_whole():
    """Typer's Rich help keeps the newlines of a docstring wrapped in the source: on a wide terminal each paragraph
    must still be one line (`mps info` broke mid-sentence), and every command ends its text with its exit codes."""
    import inspect

    from mps_cli.cli import app

    for info in app.registered_commands:
        name = info.name
        res = run_cli(name, "--help", env={"COLUMNS": "1000"})
        assert res.returncode == 0, (name, res.stderr)
        lines = [line.strip() for line in res.stdout.splitlines()]
        assert any(line.startswith("Exit status: 0 ") for line in lines), (name, res.stdout)
        doc = info.help or inspect.cleandoc(info.callback.__doc__ or "")
        for paragraph in doc.split("\n\n"):
            words = " ".join(paragraph.split()).replace("\\[", "[")  # Rich markup escapes, as shown
            if words and not words.startswith(("Examples:", "Exit status:")):
                assert any(words[:200] in line for line in lines), (name, words[:80], res.stdout[:1500])


def test_exit_status_speaks_of_prompts_and_servers_only_for_commands_that_take_them():
    """`mps info` said its exit 2 could be "no prompt source", and versus, eval, dataset and serve that their exit
    4 could be "the --server could not be reached": the general meanings, wrong for commands without them."""
    import re

    from mps_cli.cli import app

    for info in app.registered_commands:
        res = run_cli(info.name, "--help", env={"COLUMNS": "1000"})
        status = next(line for line in res.stdout.splitlines() if "Exit status: 0 " in line)
        takes_prompt = re.search(r"--prompt\b", res.stdout) is not None
        assert takes_prompt or "prompt" not in status, (info.name, status)
        takes_server = re.search(r"│ --server\b", res.stdout) is not None
        assert takes_server == ("--server" in status), (info.name, status)
    status = [line for line in run_cli("info", "--help", env={"COLUMNS": "1000"}).stdout.splitlines()
              if "Exit status" in line]
    assert "2 usage error: a bad option;" in status[0], status


@pytest.mark.parametrize("name", ["score", "compare", "rank", "eval", "versus", "dataset", "report", "convert"])
def test_a_bare_command_that_needs_arguments_shows_its_help(name):
    """`mps score` alone said only 'no prompt' (then, given one, 'no images'); as `mps eval` does, every command
    that needs arguments shows its usage instead, exit 2."""
    res = run_cli(name)
    assert res.returncode == 2, res.stderr
    assert f"Usage: mps {name} " in res.stdout and "Exit status: 0 " in res.stdout
    assert "error" not in res.stderr


def test_compare_help_says_what_its_exit_1_is(tmp_path):
    """compare's exit 1 read 'the rest are still printed', from score; it has one result, which carries the error."""
    status = next(line for line in run_cli("compare", "--help", env={"COLUMNS": "1000"}).stdout.splitlines()
                  if "Exit status" in line)
    assert "0 compared; 1 A or B could not be scored, or their prompts differ (the result carries the error);" in status
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    res = run_cli("compare", "a.png", "gone.png", "--prompt", "a fox", "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path)
    assert res.returncode == 1
    assert json.loads(res.stdout) == {"prompt": "a fox", "a": "a.png", "b": "gone.png",
                                      "error": "gone.png: no such file"}
