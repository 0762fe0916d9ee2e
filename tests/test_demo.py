"""``mps demo``: the folder it writes, its random checkpoint marked as demo weights, and every command it
prints, run as printed against that folder."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import WEIGHTS, run_cli

NOTE = "mps: note: demo weights (random): these scores mean nothing"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``mps demo`` run in a fresh folder with the default DIR: (the folder it ran in, its result)."""
    cwd = tmp_path_factory.mktemp("demo")
    res = run_cli("demo", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cwd, res


def _commands(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def test_the_demo_folder_holds_weights_config_two_sides_and_prompt_files(demo):
    from PIL import Image

    from mps_cli.demo import PROMPTS, SIDES

    cwd, res = demo
    root = cwd / "mps-demo"
    assert (root / "demo-weights.safetensors").is_file() and (root / "config.json").is_file()
    assert "NOT REAL SCORES" in (root / "README.txt").read_text()
    for side in SIDES:
        assert sorted(p.name for p in (root / side).glob("*.png")) == sorted(f"{s}.png" for s in PROMPTS)
        for stem, prompt in PROMPTS.items():
            with Image.open(root / side / f"{stem}.png") as im:
                assert im.format == "PNG" and 64 <= min(im.size) and max(im.size) <= 256
            assert (root / side / f"{stem}.txt").read_text().strip() == prompt
    # The two sides draw each prompt differently (else versus would compare an image with itself).
    assert all((root / "v1" / f"{s}.png").read_bytes() != (root / "v2" / f"{s}.png").read_bytes() for s in PROMPTS)
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    assert sorted((r["image"], r["prompt"]) for r in rows) == sorted(
        (f"{side}/{s}.png", p) for s, p in PROMPTS.items() for side in SIDES)
    pairs = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    assert {(p["a"], p["b"], p["prompt"]) for p in pairs} == {(f"v1/{s}.png", f"v2/{s}.png", p)
                                                              for s, p in PROMPTS.items()}
    assert {p["winner"] for p in pairs} == {"a", "b"}
    # stdout: the commands (and one comment line); stderr: what was written, marked as demo weights.
    assert res.stderr.splitlines() == [f"mps: mps-demo: wrote 21 files; {NOTE.removeprefix('mps: note: ')}"]
    assert all(line.startswith("mps ") or line.startswith("MPS_WEIGHTS=") for line in _commands(res.stdout))


def test_the_prompt_sources_find_every_image_prompt(demo):
    from mps_cli.demo import PROMPTS
    from mps_cli.inputs.prompts import metadata_prompt, read_prompt_file, sidecar_prompt

    root = demo[0] / "mps-demo"
    images = sorted((root / "v1").glob("*.png")) + sorted((root / "v2").glob("*.png"))
    assert len(images) == 2 * len(PROMPTS)
    for image in images:
        assert metadata_prompt(image) == sidecar_prompt(image) == PROMPTS[image.stem]
    entries = read_prompt_file(root / "prompts.jsonl")
    assert all(e.error is None and e.path.is_file() and e.prompt == PROMPTS[e.path.stem] for e in entries)


def test_every_printed_command_runs_as_printed_and_says_the_scores_mean_nothing(demo):
    cwd, res = demo
    commands = _commands(res.stdout)
    ran = set()
    for line in commands:
        words = shlex.split(line)
        env = {}
        while "=" in words[0]:
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        target = None
        if ">" in words:
            at = words.index(">")
            words, target = words[:at], words[at + 1]
        assert words[0] == "mps", line
        out = run_cli(*words[1:], env=env or None, cwd=cwd)
        assert out.returncode == 0, f"{line}\n{out.stderr}"
        if target is not None:
            (cwd / target).write_text(out.stdout)
        name = words[1]
        ran.add(name)
        if name == "info":
            assert NOTE.removeprefix("mps: note: ") in out.stdout  # its result names the weights: demo ones
        elif name == "report":
            assert (cwd / words[words.index("-o") + 1]).stat().st_size > 1000
        else:
            assert out.stderr.splitlines().count(NOTE) == 1, f"{line}\n{out.stderr}"
            assert "demo weights" not in out.stdout and out.stdout.strip(), line
    assert {"score", "compare", "rank", "versus", "eval", "report", "info"} <= ran
    ranked = [json.loads(line) for line in (cwd / "mps-demo" / "ranked.jsonl").read_text().splitlines()]
    assert len(ranked) == 8 and all(r["prompt"] and "overall" in r["scores"] for r in ranked)


def test_the_checkpoint_is_the_same_bytes_for_a_seed_and_loads_marked_as_demo_weights(demo, scorer):
    from mps_cli import load_scorer
    from mps_cli.demo import DEMO_SEED, demo_weights
    from mps_cli.weights.sources import demo_file, open_weights

    path = demo[0] / "mps-demo" / "demo-weights.safetensors"
    assert path.read_bytes() == demo_weights(DEMO_SEED)
    assert demo_weights(DEMO_SEED + 1) != path.read_bytes()
    assert open_weights(path).demo == demo_file(path) == "random"
    demo_scorer = load_scorer(path, device="cpu", dtype="fp32")
    assert demo_scorer.demo == "random" and load_scorer(path, model="mps").demo == "random"
    # The real fixture is no demo, loaded alone or in a panel.
    assert scorer.demo is None and open_weights(WEIGHTS).demo is None and demo_file(WEIGHTS) is None
    assert load_scorer(WEIGHTS, model="mps").demo is None
    # Where no model is built here (Ray's workers load it), the plan says so too.
    from mps_cli.dataset import resolve_model
    from mps_cli.engine.options import ModelOptions

    assert resolve_model(ModelOptions(weights=str(path), device="cpu")).demo == "random"
    assert resolve_model(ModelOptions(weights=str(path), model="mps", device="cpu")).demo == "random"
    assert resolve_model(ModelOptions(weights=str(WEIGHTS), device="cpu")).demo is None
    result = demo_scorer.score([demo[0] / "mps-demo" / "v1" / "fox.png"], "a red fox", dims=["all"])[0]
    assert result.ok and len(result.scores) == 4


def test_mps_info_marks_demo_weights_and_not_the_real_ones(demo, monkeypatch):
    from mps_cli.environment import default_weights

    monkeypatch.setenv("MPS_WEIGHTS", str(demo[0] / "mps-demo" / "demo-weights.safetensors"))
    assert default_weights()["demo"] == "random"
    monkeypatch.setenv("MPS_WEIGHTS", str(WEIGHTS))
    assert "demo" not in default_weights()
    out = run_cli("info", "--json")
    assert out.returncode == 0 and "demo" not in json.loads(out.stdout)["weights"]


def test_a_real_checkpoint_scores_without_the_note(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "red.png")
    out = run_cli("score", str(tmp_path / "red.png"), "--prompt", "a red square", "--weights", str(WEIGHTS),
                  "--device", "cpu", "--dtype", "fp32")
    assert out.returncode == 0 and "demo" not in out.stderr


def test_rerunning_on_a_demo_folder_changes_nothing_and_keeps_added_files(tmp_path):
    first = run_cli("demo", str(tmp_path / "d"))
    assert first.returncode == 0
    (tmp_path / "d" / "mine.txt").write_text("kept")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*") if p.is_file()}
    again = run_cli("demo", str(tmp_path / "d"))
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "already there, unchanged" in again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "d").rglob("*") if p.is_file()} == before
    # A demo file damaged since is written again.
    (tmp_path / "d" / "v1" / "fox.txt").write_text("something else")
    fixed = run_cli("demo", str(tmp_path / "d"))
    assert fixed.returncode == 0 and "wrote 1 file;" in fixed.stderr
    assert (tmp_path / "d" / "v1" / "fox.txt").read_text() == (tmp_path / "d" / "v2" / "fox.txt").read_text()


@pytest.mark.parametrize("kind", ["foreign files", "a file", "foreign weights"])
def test_a_folder_the_demo_did_not_write_is_refused_and_left_alone(tmp_path, kind):
    import shutil

    target = tmp_path / "target"
    if kind == "a file":
        target.write_text("not a folder")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        if kind == "foreign weights":  # real weights under the demo's name are not the demo's
            shutil.copy(WEIGHTS, target / "demo-weights.safetensors")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = run_cli("demo", str(target))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mps: error: {target}: ") and "new or empty folder" in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_dir_that_cannot_be_made_is_one_line_and_exit_3(tmp_path):
    (tmp_path / "file").write_text("a file, so no folder can be made under it")
    out = run_cli("demo", str(tmp_path / "file" / "demo"))
    assert out.returncode == 3 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mps: error: {tmp_path / 'file' / 'demo'}") and "cannot" in lines[0]


def test_an_absolute_dir_with_a_space_prints_commands_that_quote_it(tmp_path):
    target = tmp_path / "my demo"
    out = run_cli("demo", str(target))
    assert out.returncode == 0
    first = _commands(out.stdout)[0]
    assert shlex.split(first)[2] == str(target / "v1")
    assert shlex.quote(str(target / "demo-weights.safetensors")) in first


def test_the_demo_files_are_the_same_bytes_on_every_run(tmp_path):
    from mps_cli.demo import make_demo

    a, b = make_demo(tmp_path / "a"), make_demo(tmp_path / "b")
    files = sorted(p.relative_to(a.folder) for p in a.folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.folder) for p in b.folder.rglob("*") if p.is_file())
    assert all((a.folder / f).read_bytes() == (b.folder / f).read_bytes() for f in files)
    assert a.written == len(files)


def test_the_server_says_it_serves_demo_weights(demo, scorer):
    pytest.importorskip("starlette")
    from mps_cli import load_scorer
    from mps_cli.server import ServeOptions, create_app

    def info(model) -> dict:
        service = create_app(model, ServeOptions()).state.service
        try:
            return service.info()
        finally:
            service.batcher.close()

    demo_scorer = load_scorer(demo[0] / "mps-demo" / "demo-weights.safetensors", device="cpu", dtype="fp32")
    assert info(demo_scorer)["demo"] == "random"
    assert "demo" not in info(scorer)


def test_scoring_through_a_server_of_demo_weights_says_so_once_too(demo):
    """``--server``: the note comes from the server's ``/v1/info``, as the weights are the server's."""
    pytest.importorskip("uvicorn")
    import socket
    import threading
    import time

    import uvicorn

    from mps_cli import load_scorer
    from mps_cli.server import ServeOptions, create_app

    root = demo[0] / "mps-demo"
    app = create_app(load_scorer(root / "demo-weights.safetensors", device="cpu", dtype="fp32"), ServeOptions())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        for extra in ([], ["--batch-size", "1"]):  # the server's batch size asked, or not
            out = run_cli("score", str(root / "v1" / "fox.png"), "--prompt", "a red fox", "--jsonl",
                          "--server", f"http://127.0.0.1:{port}", *extra)
            assert out.returncode == 0, out.stderr
            assert out.stderr.splitlines().count(NOTE) == 1 and "demo weights" not in out.stdout
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_hostile_demo_marker_is_read_as_marked_not_printed(tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    from mps_cli.weights.sources import demo_file

    path = tmp_path / "w.safetensors"
    for value, read in (("random", "random"), ("\x1b[2J gone", "marked"), ("x" * 500, "marked"), ("", None)):
        save_file({"t": torch.zeros(1)}, path, metadata={"mps_cli.demo": value})
        assert demo_file(path) == read, value
    shutil.copy(WEIGHTS, path)
    assert demo_file(path) is None and demo_file(tmp_path / "missing.safetensors") is None
