"""The model options, defined once: keyword-only in the library, one shared set of flags on the command line,
and the batch size a run option resolved once."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tarfile

import pytest
from conftest import FIXTURE, IMAGES, WEIGHTS, run_cli, run_mps
from hubserver import HubServer

from mps_cli.engine.options import MODEL_OPTION_NAMES, ModelOptions

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"


def test_model_options_are_keyword_only_everywhere():
    from mps_cli import load_scorer
    from mps_cli.dataset import resolve_model

    with pytest.raises(TypeError):
        ModelOptions(str(WEIGHTS))  # an order of values is refused
    with pytest.raises(TypeError):
        load_scorer(WEIGHTS, None, "cpu")  # the old positional order (weights, config, device) is gone
    with pytest.raises(TypeError, match="unknown model option 'dtyp'"):
        load_scorer(WEIGHTS, dtyp="fp32")
    with pytest.raises(TypeError, match="not both"):
        load_scorer(ModelOptions(weights=WEIGHTS), device="cpu")
    params = inspect.signature(resolve_model).parameters
    assert [p.kind for p in params.values()] == [inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY]


def test_load_scorer_takes_the_options_or_their_fields(scorer):
    from mps_cli import load_scorer

    image = IMAGES / "sunset.png"
    by_fields = load_scorer(WEIGHTS, device="cpu", dtype="fp32").score([image], FOX)[0].scores
    by_options = load_scorer(ModelOptions(weights=WEIGHTS, device="cpu", dtype="fp32"), batch_size=2)
    assert by_options.batch_size == 2
    assert by_options.score([image], FOX)[0].scores == by_fields == scorer.score([image], FOX)[0].scores


def test_the_command_line_model_flags_are_the_library_fields():
    """Adding a model option is a field in ModelOptions and one entry in the CLI's MODEL group: both or neither."""
    from mps_cli.cli.options import MODEL, RUN, RunOptions

    assert tuple(MODEL.options) == MODEL_OPTION_NAMES
    assert tuple(RUN.options) == tuple(f.name for f in dataclasses.fields(RunOptions))


def test_every_model_command_shows_the_same_model_flags():
    def flags(command: str) -> set[str]:
        res = run_cli(command, "--help", env={"COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        return {f for f in ("--weights", "--config", "--revision", "--offline", "--device", "--dtype", "--batch-size")
                if f in res.stdout}

    for command in ("score", "rank", "compare", "eval", "versus", "dataset", "serve"):
        assert flags(command) == {"--weights", "--config", "--revision", "--offline", "--device", "--dtype",
                                  "--batch-size"}, command


def test_the_flags_reach_the_loaded_model(tmp_path):
    """--dtype, --device and --batch-size through the shared group: the JSON says what was used."""
    res = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", FOX, "-w", str(WEIGHTS), "--device", "cpu",
                  "--dtype", "bf16", "-b", "3", "--json", "--html", str(tmp_path / "r.html"))
    assert res.returncode == 0, res.stderr
    footer = (tmp_path / "r.html").read_text()
    assert "dtype <b>bf16/fp32</b>" in footer
    res = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", FOX, "-w", "hf://a/b/c.safetensors@v1",
                  "--revision", "v2")
    assert res.returncode == 2 and "pins revision 'v1'" in res.stderr


def test_run_batch_size_is_resolved_once(scorer):
    from mps_cli.cli.options import RunOptions
    from mps_cli.engine.scorer import batch_of

    assert RunOptions().batch_for(scorer) == scorer.batch_size == 4  # the CPU default, from devices
    assert RunOptions(batch_size=7).batch_for(scorer) == 7
    assert RunOptions().batch_for(None) is None
    assert batch_of(scorer, None) == 4 and batch_of(scorer, 2) == 2
    with pytest.raises(ValueError, match="at least 1"):
        batch_of(scorer, 0)


def _shard(path, images: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for n, name in enumerate(images):
            tar.add(IMAGES / name, arcname=f"{n:04d}{(IMAGES / name).suffix}")
            caption = FOX.encode()
            info = tarfile.TarInfo(f"{n:04d}.txt")
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))


def test_a_local_dataset_run_opens_the_weights_once(tmp_path, monkeypatch):
    """The Hub is asked about the weights once per run (it was asked twice: once to plan, once to load)."""
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HOME", "MPS_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    shard = tmp_path / "00000.tar"
    _shard(shard, ["sunset.png", "portrait.jpg"])
    hub = HubServer()
    hub.add_file("owner/repo", "path/mps-tiny.safetensors", WEIGHTS)
    hub.add_file("owner/repo", "path/config.json", FIXTURE / "config.json", lfs=False)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    uri = "hf://owner/repo/path/mps-tiny.safetensors"
    with hub:
        env["HF_ENDPOINT"] = hub.url
        assert run_mps("download", uri, env=env, fork=True).returncode == 0  # cached now: one look at the Hub per open
        before = len(hub.requests("HEAD", "path/mps-tiny.safetensors"))
        proc = run_mps("dataset", str(shard), "--out", str(tmp_path / "out"), "-w", uri, "--device", "cpu", env=env,
                       fork=True)
        assert proc.returncode == 0, proc.stderr
        asked = hub.requests("HEAD", "path/mps-tiny.safetensors")[before:]
    assert len(asked) == 1, [r.path for r in asked]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["settings"]["weights"].startswith("sha256:")


def test_the_exit_code_table_in_the_docs_is_the_exit_enum():
    """docs/output.md lists every code with the meaning the commands' --help gives (cli.app.EXIT_MEANINGS)."""
    import re
    from pathlib import Path

    from mps_cli.cli.app import EXIT_MEANINGS, Exit, exit_help

    page = (Path(__file__).resolve().parents[1] / "docs" / "output.md").read_text(encoding="utf-8")
    section = page.split("## Exit codes", 1)[1]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M))
    assert rows == {str(int(code)): text for code, text in EXIT_MEANINGS.items()}
    assert set(EXIT_MEANINGS) == set(Exit)
    help_text = exit_help({Exit.OK: "all scored"})
    assert help_text.startswith("Exit status: 0 all scored; 2 usage error") and "; 5 an unexpected error" in help_text
