"""Every shell and Python example of README.md and docs/*.md runs, on the tiny fixture, and exits 0.

A block that cannot run here (the Hub, a GPU, a cluster, the network) carries ``<!-- doc-test: skip (why) -->``
on the line above it. The examples name files (gen.png, samples/, prompts.jsonl, runs/v1, ...): the workspace
below holds them, built from the fixture's images. ``MPS_WEIGHTS`` points every example at the fixture's
checkpoint. ``mps`` on PATH forks a process that has imported torch already (tests/forkserver.py: the examples
are about what the commands do; tests/test_cli*.py start the console script itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IMAGES, REPO, WEIGHTS, forked_mps, forked_python, kill_hard, mps_executable

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|console|shell|python)\s*$")
SKIP = re.compile(r"^<!-- doc-test: skip(?: \((?P<why>[^)]*)\))? -->$")
SERVER = "<!-- doc-test: server -->"  # the block talks to `mps serve` on the docs' address; the test starts one
DOCS_URL = "http://127.0.0.1:8000"
MAX_SKIPPED = 7  # install commands, the test suite, clusters, the judges' Hub weights; lower it, never raise it


def blocks() -> list[tuple[str, int, str, str, str | None, bool]]:
    """(doc, line, language, code, skip reason or None, needs a server) for every runnable fence of the docs."""
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            above = lines[start - 1] if start else ""
            skip = SKIP.match(above)
            reason = (skip.group("why") or "") if skip else None
            found.append((doc.relative_to(REPO).as_posix(), start + 1, m.group(1),
                          "\n".join(lines[start + 1:end]) + "\n", reason, above == SERVER))
            i = end + 1
    return found


BLOCKS = blocks()


def test_skips_have_reasons_and_are_few():
    skipped = [(doc, line, why) for doc, line, _, _, why, _ in BLOCKS if why is not None]
    assert all(why.strip() for _, _, why in skipped), f"a doc-test skip without a reason: {skipped}"
    assert len(BLOCKS) >= 15, "the docs' examples were not found"
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} of {len(BLOCKS)} examples skipped: {skipped}"


def test_every_doc_test_marker_is_read():
    """A misspelt marker would silently run (or not skip) its block."""
    for doc in DOCS:
        for n, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if "doc-test" in text:
                assert SKIP.match(text) or text == SERVER, f"{doc.name}:{n}: unreadable marker {text!r}"


def _png(src: Path, dst: Path, text: dict | None = None) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").resize((48, 48)).save(dst, pnginfo=info)


def _shards(root: Path, pngs: list[Path]) -> None:
    """The datasets page's sources: webdataset tars (KEY.jpg or KEY.seg.png, KEY.txt) and parquet files
    (image bytes in a column, or in Hugging Face's image struct)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def encoded(src: Path, fmt: str) -> bytes:
        buf = io.BytesIO()
        with Image.open(src) as im:
            im.convert("RGB").resize((48, 48)).save(buf, fmt)
        return buf.getvalue()

    def tar(path: Path, ext: str, fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tf:
            for i, src in enumerate(pngs[:2]):
                for name, data in ((f"{i:04d}.{ext}", encoded(src, fmt)), (f"{i:04d}.txt", b"a red fox")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))

    for n in range(4):
        tar(root / "shards" / f"{n:05d}.tar", "jpg", "JPEG")
    tar(root / "wds" / "00000.tar", "seg.png", "PNG")
    (root / "data").mkdir()
    pq.write_table(pa.table({"text": ["a red fox", "a castle"], "jpg": [encoded(p, "JPEG") for p in pngs[:2]]}),
                   root / "data" / "part-0.parquet")
    (root / "hf-parquet").mkdir()
    images = [{"bytes": encoded(p, "PNG"), "path": f"{i}.png"} for i, p in enumerate(pngs[:2])]
    pq.write_table(pa.table({"caption": ["a red fox", "a castle"], "image": images}),
                   root / "hf-parquet" / "train-0.parquet")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder holding every file the examples name."""
    root = tmp_path_factory.mktemp("docs")
    pngs = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg", ".webp"))[:3]
    for name, src in zip(("gen.png", "a.png", "b.png"), pngs, strict=True):
        _png(src, root / name)
    for i, src in enumerate(pngs):
        _png(src, root / "out" / f"{i}.png")
        _png(src, root / f"{i}.png")
        _png(src, root / "samples" / f"{i}.png", {"parameters": f"a castle on a hill, {i}\nSteps: 20"})
        _png(src, root / "runs" / "r1" / f"{i}.png")
    for side in ("v1", "v2", "v3"):
        for i, src in enumerate(pngs[::-1] if side == "v2" else pngs):
            _png(src, root / "runs" / side / f"{i}.png")
            (root / "runs" / side / f"{i}.txt").write_text(f"a red fox, take {i}\n")
    for step in ("step0000", "step1000", "step2000"):
        for i, src in enumerate(pngs):
            _png(src, root / "ckpt" / step / f"{i}.png")
            (root / "ckpt" / step / f"{i}.txt").write_text(f"a red fox, take {i}\n")
    _shards(root, pngs)
    rows = [{"image": f"{i}.png", "prompt": f"a red fox, take {i}"} for i in range(len(pngs))]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.csv").write_text("image,prompt\n" + "".join(f"{r['image']},{r['prompt']}\n" for r in rows))
    return root


def _env(workspace: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MPS_WEIGHTS": str(WEIGHTS), "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def forks(workspace):
    """The examples' environment, where ``mps`` and ``mps-python`` on PATH fork a process that has imported
    torch already (conftest ``forked_mps``, tests/forkserver.py) instead of importing it once per command."""
    env = _env(workspace)
    env["PATH"] = f"{Path(forked_mps()[0]).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def server(workspace):
    """``mps serve`` on the fixture, on a free loopback port: its URL."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A fork of the fork server (its start is not what the examples are about); SIGTERM reaches it through the shim.
    proc = subprocess.Popen([*forked_mps(), "serve", "--port", str(port), "--device", "cpu", "--dtype", "fp32"],
                            cwd=workspace, env=_env(workspace), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mps serve did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]  # SIGTERM: the server stopped, and cleanly


@pytest.mark.parametrize(("doc", "line", "lang", "code", "why", "needs_server"), BLOCKS,
                         ids=[f"{doc}:{line}" for doc, line, *_ in BLOCKS])
def test_example_runs(doc, line, lang, code, why, needs_server, workspace, request):
    if why is not None:
        pytest.skip(f"{doc}:{line}: {why}")
    env = request.getfixturevalue("forks")
    if needs_server:
        code = code.replace(DOCS_URL, request.getfixturevalue("server"))
    if lang == "python":
        cmd = [shutil.which("mps-python", path=env["PATH"]), "-c", code]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    res = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{doc}:{line} exited {res.returncode}\n{code}\n--- stderr:\n{res.stderr[-3000:]}"



def test_the_fork_server_runs_mps_as_the_console_script_does(workspace, forks):
    """The examples' ``mps`` gives what the console script gives: exit status, stdout and stderr, stdin read."""
    listing = "gen.png\nmissing.png\n"
    args = ["score", "-", "--prompt", "a red fox", "--json", "--device", "cpu", "--dtype", "fp32"]
    shim, real = (subprocess.run([exe, *args], cwd=workspace, env=forks, input=listing, capture_output=True,
                                 text=True, timeout=120)
                  for exe in (forked_mps()[0], mps_executable()[0]))
    assert real.returncode == 1 and "missing.png" in real.stderr
    assert (shim.returncode, shim.stdout, shim.stderr) == (real.returncode, real.stdout, real.stderr)


def test_kill_hard_kills_the_forked_process_not_only_its_shim():
    """A shim cannot pass SIGKILL on: conftest's kill_hard kills the fork itself and returns once it is gone, with
    the shim's status the real process's would be (the kill -9 and resume tests rely on both)."""
    proc = subprocess.Popen([*forked_python(), "-c", "import time; print('up', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    child = int((Path(forked_mps()[0]).parent.parent / "pids" / str(proc.pid)).read_text())
    assert child != proc.pid
    os.kill(child, 0)  # running
    kill_hard(proc)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
