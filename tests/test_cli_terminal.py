"""The console script where people type it: stderr a terminal (a pseudo-terminal here) while
results go to a pipe or a file, closed pipes, hostile inputs, and inputs checked before weights."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import zlib

import pyte
import pytest
from conftest import IMAGES, WEIGHTS, forked_mps, forked_python, messages, mps_executable, run_cli, run_mps, summary
from PIL import Image
from PIL.PngImagePlugin import PngInfo

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
N_IMAGES = 6  # more than one batch of --batch-size 2: the progress bar is drawn


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "100"}
    env.pop("MPS_WEIGHTS", None)
    return env


# One process runs many commands through the console script's entry point (`mps_cli.cli:main`), each
# with the process's real stdout and stderr, a marker line on stdout after each: the whole matrix costs one
# process. It is a fork of conftest's fork server (forked_python), given the pseudo-terminal as its stderr:
# what is tested is what reaches the terminal, not the interpreter's start (the `| head` test below runs
# the console script itself on a terminal).
DRIVER = """
import json, sys
from mps_cli.cli import main
for i, args in enumerate(json.loads(sys.argv[1])):
    sys.argv = ["mps", *args]
    try:
        main()
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    sys.stdout.write(f"@@case {i} rc={rc}@@\\n")
    sys.stdout.flush()
"""
MARK = re.compile(r"@@case (\d+) rc=(\d+)@@")


def _on_pty(argv: list[str], cwd, *, stdout_file=None, shell: str | None = None) -> tuple[str, bytes]:
    """Run ``argv`` (or the ``shell`` line) with stderr, and stdout unless ``stdout_file``, on one
    pseudo-terminal; returns (what the file got, the terminal's bytes)."""
    master, slave = pty.openpty()
    try:
        out = open(stdout_file, "w") if stdout_file else slave
        cmd = ["bash", "-c", shell] if shell else argv
        proc = subprocess.Popen(cmd, stdout=out, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=_env())
        os.close(slave)
        slave = None
        tty = b""
        while True:  # drain the terminal so the child never blocks on it
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        proc.wait(timeout=300)
        if stdout_file:
            out.close()
        return (open(stdout_file).read() if stdout_file else ""), tty
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def _screen(tty: bytes) -> list[str]:
    """The terminal's final lines, as a user sees them: on a screen taller than all that was written and wider than
    its longest line, so nothing scrolls away or wraps (and no larger: rendering costs its area)."""
    lines = tty.split(b"\n")
    screen = pyte.Screen(max(len(line) for line in lines) + 10, len(lines) + 10)
    stream = pyte.ByteStream(screen)
    stream.feed(tty)
    return [line.rstrip() for line in screen.display][:screen.cursor.y + 1]


def _cases(images: list[str], commands=("score", "rank", "compare"), formats=("table", "json", "jsonl", "csv")):
    runs = []
    for cmd in commands:
        for fmt in formats if cmd != "eval" else ("table", "json"):
            flag = [] if fmt == "table" else [f"--{fmt}"]
            if cmd == "compare":
                args = ["compare", "img0.png", "img1.png", "--prompt", FOX]
            elif cmd == "eval":
                args = ["eval", "pairs", "pairs.jsonl", "--no-cache"]
            else:
                args = [cmd, *images, "--prompt", FOX]
            runs.append((cmd, fmt, [*args, *flag, "--batch-size", "2", "-w", str(WEIGHTS)]))
    return runs


#: A progress bar's line: its count then its elapsed time (``━━━━ 2/6 0:00:01 eta 0:00:02``).
BAR = re.compile(r"\d+/\d+ +\d+:\d\d:\d\d")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    d = tmp_path_factory.mktemp("tty")
    for i, name in enumerate(["sunset.png", "gray.png", "crop.png", "alpha.png", "wide.webp", "portrait.jpg"]):
        shutil.copy(IMAGES / name, d / f"img{i}{os.path.splitext(name)[1]}")
    (d / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": FOX, "a": f"img{i}.png" if i < 4 else "img0.png", "b": "img1.png", "winner": "a"}) + "\n"
        for i in (0, 2, 3)))
    return d


def _check(cmd: str, fmt: str, stdout: str) -> None:
    if cmd in ("score", "rank"):
        if fmt == "json":
            assert len(json.loads(stdout)) == N_IMAGES
        elif fmt == "jsonl":
            assert len([json.loads(line) for line in stdout.splitlines()]) == N_IMAGES
        elif fmt == "csv":
            assert len(list(csv.DictReader(io.StringIO(stdout)))) == N_IMAGES
        else:
            assert stdout.count("img") == N_IMAGES and "prompt: " + FOX in " ".join(stdout.split())
    elif cmd == "compare":
        if fmt in ("json", "jsonl"):
            assert set(json.loads(stdout)["results"]) == {"overall"}
        elif fmt == "csv":
            assert list(csv.DictReader(io.StringIO(stdout)))[0]["overall.winner"] in ("a", "b", "tie")
        else:
            assert "P(A preferred)" in stdout
    else:
        if fmt == "json":
            assert json.loads(stdout)["benchmark"] == "pairs"
        else:
            assert "MPS accuracy on pairs" in stdout


def test_results_reach_stdout_while_stderr_is_a_terminal(gallery, tmp_path):
    images = sorted(f for f in os.listdir(gallery) if f.startswith("img"))
    runs = _cases(images, ("score", "rank", "compare", "eval"))
    stdout, tty = _on_pty([*forked_python(), "-c", DRIVER, json.dumps([a for _, _, a in runs])], gallery,
                          stdout_file=tmp_path / "out.txt")
    parts = MARK.split(stdout)
    assert len(parts) == 3 * len(runs) + 1, stdout[-2000:]
    text = tty.decode("utf-8", "replace")
    assert "Traceback" not in text
    for i, (cmd, fmt, _) in enumerate(runs):
        assert parts[3 * i + 2] == "0", (cmd, fmt, text)
        _check(cmd, fmt, parts[3 * i].removeprefix("\n"))
    # Nothing of the results leaked onto the terminal, and the bar really was drawn there
    # (6 images are 3 batches of 2) while the results went, unseen, to the file.
    assert "img1" not in text.replace("img1.png", "") and '"scores"' not in text, text
    assert "━" in text and text.count(f"{N_IMAGES} scored, 0 failed") == 8, text
    # Transient: the final screen holds only the message lines, no bar.
    assert not [line for line in _screen(tty) if BAR.search(line)], _screen(tty)


def test_no_bar_is_left_glued_to_results_on_a_shared_terminal(gallery):
    images = sorted(f for f in os.listdir(gallery) if f.startswith("img"))
    runs = _cases(images)
    _, tty = _on_pty([*forked_python(), "-c", DRIVER, json.dumps([a for _, _, a in runs])], gallery)
    assert b"\xe2\x94\x81" in tty  # the bar was drawn (and so could have been left behind)
    lines = _screen(tty)
    assert not [line for line in lines if BAR.search(line)], "\n".join(lines)
    screen = "\n".join(lines)
    blocks = MARK.split(screen)
    assert len(blocks) == 3 * len(runs) + 1, screen
    for i, (cmd, fmt, _) in enumerate(runs):
        assert blocks[3 * i + 2] == "0", (cmd, fmt, screen)
        # Every result reached the screen whole: the block, less the messages, is the command's output.
        results = "\n".join(line for line in blocks[3 * i].split("\n") if line and not line.startswith("mps: "))
        if fmt == "jsonl" or fmt == "json" or fmt == "csv":
            _check(cmd, fmt, results + "\n")
        else:
            assert ("P(A preferred)" if cmd == "compare" else "img5") in results, (cmd, results)


def test_no_bar_is_left_glued_to_what_head_prints(tmp_path):
    """`mps score ... --jsonl | head`, the console script on a terminal: head prints on the terminal the bar is
    drawn on, when it likes; once head has gone, mps stops quietly (no BrokenPipeError, no "Exception ignored"
    at exit, and no error for the missing path at the end, which it would reach if it went on)."""
    gallery_dir = IMAGES
    names = [*sorted(n for n in os.listdir(gallery_dir) if n.endswith(".png"))[:4] * 2, "zz_missing.png"]
    # The console script for JSON lines; a fork of conftest's fork server, on the same terminal, for CSV.
    for fmt, lines, mps in (("--jsonl", 3, mps_executable()[0]), ("--csv", 4, forked_mps()[0])):
        rc = tmp_path / f"rc{fmt}"
        line = (f"'{mps}' score {' '.join(names)} --prompt 'a fox' {fmt} --batch-size 2 -w '{WEIGHTS}' "
                f"| head -n {lines}; echo ${{PIPESTATUS[0]}} > '{rc}'")
        _, tty = _on_pty([], gallery_dir, shell=line)
        text = tty.decode("utf-8", "replace")
        assert "zz_missing" not in text and "Traceback" not in text and "Exception ignored" not in text, text
        assert int(rc.read_text()) in (0, 128 + signal.SIGPIPE)  # either convention for a closed pipe is quiet
        screen = _screen(tty)
        assert not [row for row in screen if BAR.search(row)], "\n".join(screen)
        shown = [row for row in screen if row and not row.startswith("mps: ")]
        assert len(shown) == lines, screen
        if fmt == "--jsonl":
            assert all(json.loads(row)["scores"] for row in shown), shown
        else:
            assert shown[0].startswith("image,prompt") and all(row.count(",") >= 2 for row in shown), shown


# --------------------------------------------------------------------------- hostile inputs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_chunks(dst, *chunks: bytes) -> None:
    raw = (IMAGES / "gray.png").read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    dst.write_bytes(raw[:ihdr_end] + b"".join(chunks) + raw[ihdr_end:])


def _text(key: str, value) -> bytes:
    return _chunk(b"tEXt", key.encode() + b"\0" + (value if isinstance(value, bytes) else json.dumps(value).encode()))


@pytest.fixture
def hostile(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _text("parameters", b"a fox")
                                 + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    # 50 MB of text compressed into ~50 KB: PIL refuses it with a ValueError from Image.open.
    _png_with_chunks(d / "itxt.png", _chunk(b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(b"a" * 50_000_000)))
    _png_with_chunks(d / "comfy_strnode.png", _text("prompt", {
        "3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0]}}, "6": "a string, not a node"}))
    _png_with_chunks(d / "comfy_strinputs.png", _text("prompt", {
        "3": {"class_type": "KSampler", "inputs": "text"}, "6": {"class_type": "X", "inputs": "abc"}}))
    _png_with_chunks(d / "comfy_int.png", _text("prompt", {
        "3": {"class_type": "KSampler", "inputs": {"positive": [6, 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": 5}}}))
    _png_with_chunks(d / "sdmeta_int.png", _text("sd-metadata", {"image": {"prompt": [5, {"prompt": 7}]}}))
    _png_with_chunks(d / "deep.png", _text("parameters", b'{"a":' * 100_000 + b"1" + b"}" * 100_000))
    _png_with_chunks(d / "deep_comfy.png", _text("prompt", b"[" * 100_000 + b"]" * 100_000))
    info = PngInfo()
    info.add_text("parameters", f"{FOX}\nSteps: 20")
    Image.open(IMAGES / "sunset.png").save(d / "good.png", pnginfo=info)
    return tmp_path


def test_hostile_metadata_and_nul_separated_stdin_fail_alone(hostile):
    names = sorted(os.listdir(hostile / "gen"))
    paths = [f"gen/{n}" for n in names]
    long_name = "x" * 300 + ".png"
    stdin = "\0".join([*paths, long_name]) + "\0"
    proc = run_cli("score", "-", "-0", "--prompt-from", "metadata", "--jsonl", "-w", str(WEIGHTS),
                   cwd=hostile, input=stdin)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    rows = {r["image"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert list(rows) == [*paths, long_name]
    assert rows["gen/good.png"]["prompt"] == FOX and "overall" in rows["gen/good.png"]["scores"]
    assert "decompression bomb" in rows["gen/bomb.png"]["error"]
    assert "too large" in rows["gen/itxt.png"]["error"]
    assert "too long" in rows[long_name]["error"]
    for name in ("comfy_strnode", "comfy_strinputs", "comfy_int", "sdmeta_int", "deep_comfy"):
        assert set(rows[f"gen/{name}.png"]) == {"image", "error"}, rows[f"gen/{name}.png"]
    # deep.png's parameters are not JSON at all to a bounded parser: read as A1111 text, or refused.
    assert set(rows["gen/deep.png"]) in ({"image", "error"}, {"image", "prompt", "scores"})
    failed = [r for r in rows.values() if "error" in r]
    assert len(messages(proc.stderr)) >= len(failed)
    assert summary(proc.stderr) == f"mps: {len(rows) - len(failed)} scored, {len(failed)} failed"

    # The same paths NUL-separated but read as lines: each bad path is its input's error, with the remedy once.
    proc = run_cli("score", "-", "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS), cwd=hostile,
                   input="gen/good.png\n" + "\0".join(paths) + "\n")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "scores" in rows[0] and "NUL" in rows[1]["error"]
    assert proc.stderr.count("-0/--null") == 1


def test_prompts_file_with_nul_path_lone_surrogate_and_json_array(tmp_path):
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    shutil.copy(IMAGES / "gray.png", tmp_path / "b.png")
    lines = ['{"image": "a.png", "prompt": "' + FOX + '"}', '{"image": "b\\u0000.png", "prompt": "x"}',
             '{"image": "b.png", "prompt": "bad \\ud800 text"}', '{"file_name": "b.png", "text": "' + FOX + '"}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("score", "--prompts", "p.jsonl", "--json", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    assert [("scores" in d) for d in doc] == [True, False, False, True]
    assert "U+D800" in doc[2]["error"] and "p.jsonl:3" in doc[2]["error"]
    # What --json printed is itself a prompts file: the failed rows stay failed, the others score the same.
    (tmp_path / "again.json").write_text(proc.stdout)
    again = run_cli("score", "--prompts", "again.json", "--json", "-w", str(WEIGHTS), cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    redo = json.loads(again.stdout)
    assert [d.get("scores") for d in redo] == [d.get("scores") for d in doc]


def test_download_of_a_malformed_source_is_one_line():
    proc = run_mps("download", "hf://foo", fork=True)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1 and "hf://foo" in proc.stderr
    proc = run_mps("download", "hf://a/b/c.safetensors@v1", "--revision", "v2", fork=True)
    assert proc.returncode == 2 and "v1" in proc.stderr and "v2" in proc.stderr


def test_download_offline_names_no_flag_it_does_not_have(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2"}
    proc = run_mps("download", "hf://a/b/c.safetensors", env=env, fork=True)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--weights" not in proc.stderr and "--offline" not in proc.stderr


# --------------------------------------------------------------------------- inputs before weights


def test_no_usable_input_never_touches_the_weights(tmp_path):
    # A weights path that does not exist: loading would be exit 3. The Hub is unreachable: fetching would be exit 4.
    for extra, env in ((["-w", str(tmp_path / "absent.safetensors")], None),
                       ([], {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})):
        proc = run_mps("score", "missing.png", str(tmp_path), "--prompt", "x", "--json", *extra, env=env,
                       cwd=tmp_path, fork=True)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        doc = json.loads(proc.stdout)
        assert [d["image"] for d in doc] == ["missing.png", str(tmp_path)]
        assert "no such file" in doc[0]["error"] and "no images" in doc[1]["error"]
        assert "absent" not in proc.stderr and "127.0.0.1" not in proc.stderr
        assert summary(proc.stderr) == "mps: 0 scored, 2 failed"


# --------------------------------------------------------------------------- closed pipes and help


def test_closed_pipe_exits_0_for_every_command(tmp_path):
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    shutil.copy(IMAGES / "gray.png", tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": FOX, "a": "a.png", "b": "b.png", "winner": "a"})
                                          + "\n")
    for side in ("a", "b"):  # pre-scored sides: versus needs no model
        (tmp_path / f"{side}.jsonl").write_text("".join(
            json.dumps({"image": f"{side}/img{i}.png", "prompt": FOX, "scores": {"overall": float(i)}}) + "\n"
            for i in range(3)))
    mps = mps_executable()[0]
    # `| true` reads nothing and is gone before mps writes: the write itself meets the closed pipe.
    script = (
        f"'{mps}' --help | head -1 > /dev/null; echo ${{PIPESTATUS[0]}} > rc_help\n"
        f"'{mps}' score --help | head -1 > /dev/null; echo ${{PIPESTATUS[0]}} > rc_score_help\n"
        f"'{mps}' eval pairs pairs.jsonl --no-cache --json -w '{WEIGHTS}' | head -1 > /dev/null;"
        " echo ${PIPESTATUS[0]} > rc_eval\n"
        f"'{mps}' versus a.jsonl b.jsonl --json | true; echo ${{PIPESTATUS[0]}} > rc_versus\n"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                          timeout=300)
    assert proc.stderr == "", proc.stderr
    for name in ("rc_help", "rc_score_help", "rc_eval", "rc_versus"):
        assert (tmp_path / name).read_text().strip() == "0", name


def test_help_shows_rev_examples_version_and_no_bool_metavar():
    proc = run_mps("score", "--help", env={"COLUMNS": "200"}, fork=True)
    assert proc.returncode == 0
    assert "hf://OWNER/REPO/PATH[@REV]" in proc.stdout
    assert "<bool>" not in proc.stdout
    assert "Examples:" in proc.stdout and "mps score --prompts prompts.jsonl --csv > scores.csv" in proc.stdout
    assert "--null" in proc.stdout and "-0" in proc.stdout
    proc = run_mps("download", "--help", env={"COLUMNS": "200"}, fork=True)
    assert "[@REV]" in proc.stdout and "<bool>" not in proc.stdout
    proc = run_mps("--version")
    from mps_cli import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"mps-score {__version__}"
