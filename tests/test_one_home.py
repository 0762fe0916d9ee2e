"""Facts with one home: how a file is replaced whole (and its leftovers swept), how a yes/no variable is
spelled, what range the mask threshold has."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import IMAGES, WEIGHTS, run_cli

from mps_cli import files

SRC = Path(__file__).resolve().parents[1] / "src" / "mps_cli"
PROMPT = "a red fox sitting in a snowy forest at dawn, highly detailed"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- replacing a file whole


def test_replacing_renames_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.replacing(target) as tmp:
        assert tmp.name == f".out.json.{files.host_tag()}.{os.getpid()}.tmp" and tmp.parent == tmp_path
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    files.write_whole(target, "new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path):
    host = files.host_tag()
    dead = tmp_path / f".a.parquet.{host}.{_dead_pid()}.tmp"
    live = tmp_path / f".a.parquet.{host}.{os.getpid()}.tmp"
    other_name = tmp_path / f".b.parquet.{host}.{_dead_pid()}.tmp"
    elsewhere = tmp_path / f".a.parquet.otherhost.{os.getpid()}.tmp"
    old_elsewhere = tmp_path / ".a.parquet.otherhost.1.tmp"
    for p in (dead, live, other_name, elsewhere, old_elsewhere):
        p.write_bytes(b"x")
    os.utime(old_elsewhere, (1, 1))  # written long ago on another host
    files.remove_stale_temps(tmp_path, "a.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_name, elsewhere))
    files.remove_stale_temps(tmp_path)
    assert not other_name.exists() and live.exists()


def test_only_the_files_module_renames_into_place():
    """Write-then-rename lives in mps_cli.files; the prepared-weights writer (weights/sealed.py: pwrite into
    its temp_path) renames its own file when it seals it."""
    renamers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os"):
                renamers.add(path.relative_to(SRC).as_posix())
    assert renamers == {"files.py", "weights/sealed.py"}


def _one_image_shard(shard: Path) -> Path:
    """A webdataset tar of one captioned image."""
    import io
    import tarfile

    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        tar.add(IMAGES / "sunset.png", arcname="0000.png")
        caption = PROMPT.encode()
        info = tarfile.TarInfo("0000.txt")
        info.size = len(caption)
        tar.addfile(info, io.BytesIO(caption))
    return shard


def test_a_dataset_shard_left_half_written_by_a_killed_run_is_swept_up(tmp_path):
    shard = _one_image_shard(tmp_path / "in" / "00000.tar")
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / f".00000.parquet.{files.host_tag()}.{_dead_pid()}.tmp"
    leftover.write_bytes(b"PAR1 half")
    res = run_cli("dataset", str(shard), "--out", str(out), "-w", str(WEIGHTS), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    # .claims.lock: the shard claims of runs sharing the folder (issue 23), kept for the next run.
    assert sorted(p.name for p in out.iterdir()) == [".claims.lock", ".manifest.lock", "00000.parquet",
                                                     "_manifest.json"]
    assert json.loads((out / "_manifest.json").read_text())["shards"]["00000.parquet"]["rows"] == 1


def test_a_manifest_left_half_written_by_a_killed_run_is_swept_up(tmp_path):
    """A run killed between writing the manifest's temporary file and renaming it (right after a shard's
    rename, where a kill lands often) leaves that file; the next run into the folder removes it."""
    shard = _one_image_shard(tmp_path / "in" / "00000.tar")
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / f"._manifest.json.{files.host_tag()}.{_dead_pid()}.tmp"
    leftover.write_text('{"settings": {')
    res = run_cli("dataset", str(shard), "--out", str(out), "-w", str(WEIGHTS), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".claims.lock", ".manifest.lock", "00000.parquet",
                                                     "_manifest.json"]


def test_a_report_that_cannot_be_renamed_into_place_leaves_nothing(tmp_path):
    from mps_cli.errors import ReportError
    from mps_cli.report import parse_results, write_report

    results = parse_results(json.dumps({"image": str(IMAGES / "sunset.png"), "prompt": PROMPT,
                                        "scores": {"overall": 1.0}}), "r.json")
    blocker = tmp_path / "report.html"
    blocker.mkdir()  # a folder where the page would go: the rename fails
    with pytest.raises(ReportError, match="cannot write the report"):
        write_report(blocker, results)
    assert list(tmp_path.iterdir()) == [blocker] and list(blocker.iterdir()) == []


# --------------------------------------------------------------------------- yes/no variables


@pytest.mark.parametrize("value, on", [
    (None, True), ("", True), ("1", True), ("yes", True), ("ON", True),
    ("0", False), ("false", False), ("No", False), ("off", False), (" FALSE ", False),
])
def test_prepared_weights_switch_spellings(monkeypatch, value, on):
    from mps_cli.weights.prepared import SWITCH_ENV, enabled

    if value is None:
        monkeypatch.delenv(SWITCH_ENV, raising=False)
    else:
        monkeypatch.setenv(SWITCH_ENV, value)
    assert enabled() is on


def test_one_parser_reads_every_switch():
    """Yes/no environment variables are read by mps_cli.switches.env_flag, nowhere by hand."""
    readers = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "env_flag(" in text and path.name != "switches.py":
            readers.add(path.relative_to(SRC).as_posix())
        assert '"off", "false"' not in text and 'not in ("", "0")' not in text, path
    assert readers == {"cli/app.py", "weights/prepared.py"}


# --------------------------------------------------------------------------- the mask threshold


def test_every_entry_point_holds_the_mask_threshold_to_one_range(scorer, tmp_path):
    from mps_cli import load_reward
    from mps_cli.engine.scorer import check_mask_threshold
    from mps_cli.evaluate import Benchmark, evaluate
    from mps_cli.versus import compare_sides, line_up, read_side

    assert check_mask_threshold(0) == 0.0 and check_mask_threshold(0.3) == 0.3
    for bad in (1.0, -0.1, float("nan"), True, "0.3", None):
        with pytest.raises(ValueError, match=r"mask threshold must be in \[0, 1\)"):
            check_mask_threshold(bad)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for side in "ab":
        (tmp_path / side / "x.png").symlink_to(IMAGES / "sunset.png")
    lineup = line_up([read_side(tmp_path / "a"), read_side(tmp_path / "b")], prompt=PROMPT)
    calls = [
        lambda t: list(scorer.iter_score([IMAGES / "sunset.png"], PROMPT, mask_threshold=t)),
        lambda t: scorer.score_pixels([], [], [], mask_threshold=t),
        lambda t: evaluate(Benchmark("pairs", "p.jsonl", ()), scorer, mask_threshold=t),
        lambda t: compare_sides(lineup, scorer, mask_threshold=t),
        lambda t: load_reward(tmp_path / "never-read.safetensors", mask_threshold=t),  # refused before loading
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"mask threshold must be in \[0, 1\), got 1\.0"):
            call(1.0)
    res = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", PROMPT, "--mask-threshold", "1",
                  "-w", str(WEIGHTS))
    assert (res.returncode, res.stderr) == (2, "mps: error: --mask-threshold must be a number in [0, 1) (got 1)\n")


# --------------------------------------------------------------------------- what the installation sees


def test_mps_info_prints_what_the_library_says(monkeypatch):
    from mps_cli.environment import environment_info

    monkeypatch.setenv("MPS_WEIGHTS", str(WEIGHTS))
    res = run_cli("info", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == environment_info().to_dict()
    assert doc["weights"] == {"source": str(WEIGHTS), "hub": False, "cached": True, "path": str(WEIGHTS)}
    assert doc["versions"]["torch"] and doc["prepared"]["enabled"] is True
    text = run_cli("info").stdout
    # A local file is found, not cached (as a Hub file would be); a missing one is said too.
    assert f"weights: {WEIGHTS}\n  local file, found\n" in text and "devices:\n  cpu" in text
    assert "cached at" not in text
    missing = run_cli("info", env={"MPS_WEIGHTS": str(WEIGHTS) + ".missing"})
    assert missing.returncode == 0 and f"{WEIGHTS}.missing\n  local file not found\n" in missing.stdout


# --------------------------------------------------------------------------- dimensions and prompt counts


def test_every_entry_point_raises_one_typed_error_for_a_bad_dimension_or_prompt_count(scorer, tmp_path):
    import torch

    from mps_cli import DIMENSIONS, DimensionError, InputError, PromptCountError, load_reward, load_scorer
    from mps_cli.client import Client

    sunset = IMAGES / "sunset.png"
    reward = load_reward(WEIGHTS, device="cpu")
    panel = load_scorer(WEIGHTS, device="cpu", model=("mps",))
    client = Client("http://127.0.0.1:9")  # refused before any request is sent
    dimension_calls = {
        "Scorer": lambda: scorer.score([sunset], PROMPT, dims=["beauty"]),
        "Panel": lambda: panel.score([sunset], PROMPT, dims=["beauty"]),
        "load_reward": lambda: load_reward(WEIGHTS, dims=("beauty",), device="cpu"),
        "MPSReward.reward_fn": lambda: reward.reward_fn("beauty"),
    }
    for name, call in dimension_calls.items():
        with pytest.raises(DimensionError) as info:
            call()
        assert "beauty" in str(info.value) and isinstance(info.value, InputError), name
    with pytest.raises(DimensionError) as info:
        scorer.score([sunset], PROMPT, dims=["beauty"])
    assert all(dim in str(info.value) for dim in DIMENSIONS)
    count_calls = {
        "Scorer": lambda: scorer.score([sunset, sunset], ["a", "b", "c"]),
        "Panel": lambda: panel.score([sunset, sunset], ["a", "b", "c"]),
        "MPSReward": lambda: reward(torch.rand(2, 3, 32, 32), ["a", "b", "c"]),
        "Client": lambda: client.score([sunset, sunset], ["a", "b", "c"]),
    }
    for name, call in count_calls.items():
        with pytest.raises(PromptCountError, match="2 images but 3 prompts") as info:
            call()
        assert (info.value.images, info.value.prompts) == (2, 3), name
