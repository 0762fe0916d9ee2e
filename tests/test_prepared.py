"""Prepared weights: the converted copy written on the first CPU load and mapped by later ones."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, IMAGES, ORIGINAL, WEIGHTS, run_cli, run_mps

from mps_cli import load_scorer
from mps_cli.weights.prepared import FORMAT, SWITCH_ENV

CONFIG = FIXTURE / "config.json"
PROMPT = "three blue cubes stacked on top of a wooden table"
IMAGE_PATHS = sorted(IMAGES.glob("*.png"))[:3]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MPS_CACHE_DIR", str(folder))
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    return folder / "prepared"


@pytest.fixture()
def fp16_weights(tmp_path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copyfile(CONFIG, folder / "config.json")
    path = folder / "mps-tiny-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(WEIGHTS).items()}, str(path))
    return path


def _scores(scorer) -> list[tuple]:
    return [(Path(r.image).name, tuple(sorted(r.scores.items())), tuple(sorted(r.kept_tokens.items())))
            for r in scorer.score(IMAGE_PATHS, PROMPT, dims=["all"])]


def _mapped_files() -> set[str]:
    """Files this process has mapped (the kernel's own account, not ours)."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def _prepared(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors")) if cache.is_dir() else []


def _no_conversion(monkeypatch):
    """Make converting from the source fail, so a load that succeeds must have mapped the copy."""
    import mps_cli.weights.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("converted from the source although a prepared copy exists")

    monkeypatch.setattr(checkpoint, "load_into", refuse)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_second_load_maps_the_converted_copy_and_scores_identically(cache, fp16_weights, dtype, torch_dtype,
                                                                     monkeypatch):
    first = load_scorer(fp16_weights, device="cpu", dtype=dtype)
    [written] = _prepared(cache)
    # The first load converted straight into the new file, then mapped it like any later load.
    assert str(written) in _mapped_files()
    assert not list(cache.glob(".*.tmp"))

    from safetensors import safe_open

    with safe_open(str(written), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        big = [k for k in f.keys() if not k.startswith("__pad") and f.get_slice(k).get_shape() != []]
        stored = {f.get_slice(k).get_dtype() for k in big}
    assert stored == ({"BF16", "F32"} if dtype == "bf16" else {"F32"})  # F32: logit_scale, inv_freq

    _no_conversion(monkeypatch)
    second = load_scorer(fp16_weights, device="cpu", dtype=dtype)
    assert {p.dtype for p in second.model.parameters()} == {p.dtype for p in first.model.parameters()}
    assert torch_dtype in {p.dtype for p in second.model.parameters()}
    assert _scores(second) == _scores(first)
    assert _prepared(cache) == [written]


def test_prepared_copy_scores_like_a_plain_load(cache, fp16_weights, monkeypatch):
    prepared = _scores(load_scorer(fp16_weights, device="cpu", dtype="bf16"))
    monkeypatch.setenv(SWITCH_ENV, "off")
    assert _scores(load_scorer(fp16_weights, device="cpu", dtype="bf16")) == prepared


def test_mapped_fp32_copy_matches_the_original_implementation(cache, fp16_weights, monkeypatch):
    load_scorer(fp16_weights, device="cpu", dtype="fp32")
    _no_conversion(monkeypatch)
    scorer = load_scorer(fp16_weights, device="cpu", dtype="fp32")
    reference = json.loads((ORIGINAL / "expected-fp16-weights.json").read_text())["scores"]
    prompt = reference[0]["prompt"]
    rows = [r for r in reference if r["prompt"] == prompt]
    got = {Path(r.image).name: r for r in scorer.score([IMAGES / n for n in sorted({r["image"] for r in rows})],
                                                       prompt, dims=sorted({r["dim"] for r in rows}))}
    for row in rows:
        assert got[row["image"]].scores[row["dim"]] == pytest.approx(row["score"], abs=1e-3), row
        assert got[row["image"]].kept_tokens[row["dim"]] == row["kept_tokens"], row


def test_no_copy_when_nothing_is_converted(cache):
    load_scorer(WEIGHTS, device="cpu", dtype="fp32")  # fp32 file, fp32 model, normal layout
    assert _prepared(cache) == []


def test_switched_off_by_environment(cache, fp16_weights, monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert not cache.exists() or _prepared(cache) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "other_tensors", "zeroed_data"])
def test_damaged_copy_is_rebuilt_not_used(cache, fp16_weights, damage, caplog, monkeypatch):
    reference = _scores(load_scorer(fp16_weights, device="cpu", dtype="bf16"))
    [written] = _prepared(cache)
    size = written.stat().st_size
    if damage == "truncate":
        with open(written, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "garbage_header":
        written.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif damage == "other_tensors":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(written), metadata={"format": FORMAT, "version": "1"})
    else:  # what a crash can leave: header in place, data pages never written back
        with open(written, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\0" * (size - size // 2))
    with caplog.at_level(logging.WARNING, logger="mps_cli"):
        scorer = load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert any("rebuilding prepared weights" in r.getMessage() for r in caplog.records)
    assert _scores(scorer) == reference
    assert written.stat().st_size == size  # rewritten whole
    _no_conversion(monkeypatch)
    again = load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert _scores(again) == reference


def test_changed_source_gets_a_new_copy(cache, fp16_weights):
    before = _scores(load_scorer(fp16_weights, device="cpu", dtype="bf16"))
    [old] = _prepared(cache)
    from safetensors.torch import load_file, save_file

    tensors = load_file(fp16_weights)
    tensors["model.logit_scale"] = tensors["model.logit_scale"] + 1  # same shapes, new values
    save_file(tensors, str(fp16_weights))
    after = _scores(load_scorer(fp16_weights, device="cpu", dtype="bf16"))
    [new] = _prepared(cache)  # the superseded copy of the same file is gone
    assert new != old
    # exp(logit_scale) multiplies every score, so new weights give e times the old scores.
    for (_, old_scores, _), (_, new_scores, _) in zip(before, after):
        for (dim, a), (_, b) in zip(old_scores, new_scores):
            assert b == pytest.approx(a * 2.718281828, rel=1e-3), dim


def test_copies_of_other_files_and_dtypes_are_kept(cache, fp16_weights, tmp_path):
    other = tmp_path / "other" / fp16_weights.name
    other.parent.mkdir()
    shutil.copyfile(fp16_weights, other)
    shutil.copyfile(CONFIG, other.parent / "config.json")
    load_scorer(fp16_weights, device="cpu", dtype="bf16")
    load_scorer(fp16_weights, device="cpu", dtype="fp32")
    load_scorer(other, device="cpu", dtype="bf16")
    assert len(_prepared(cache)) == 3


def test_unwritable_cache_still_loads_and_says_why(tmp_path, fp16_weights, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MPS_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="mps_cli"):
        scorer = load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert any("not caching prepared weights" in r.getMessage() for r in caplog.records)
    assert all(r.ok for r in scorer.score(IMAGE_PATHS, PROMPT))


def test_too_little_disk_space_skips_the_copy(cache, fp16_weights, monkeypatch, caplog):
    import mps_cli.weights.sealed as sealed

    monkeypatch.setattr(sealed, "MIN_FREE_AFTER", 1 << 60)  # no real disk has an exbibyte free
    with caplog.at_level(logging.WARNING, logger="mps_cli"):
        load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert any("GiB free" in r.getMessage() for r in caplog.records)
    assert _prepared(cache) == [] and not list(cache.glob(".*.tmp"))


def test_cli_twice_same_output_and_a_quiet_second_run(tmp_path, fp16_weights):
    env = {"MPS_CACHE_DIR": str(tmp_path / "cli-cache"), SWITCH_ENV: "1"}
    args = ("score", *map(str, IMAGE_PATHS), "--prompt", PROMPT, "--weights", str(fp16_weights),
            "--dtype", "bf16", "--dim", "all", "--json")
    # The first run writes the prepared copy (in-process: what it prints is all that counts here);
    # the second is a new process, as a user's next command is, and must find the copy.
    first = run_cli(*args, env=env)
    second = run_mps(*args, env=env, fork=True)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)
    assert "prepared" not in second.stderr and "Traceback" not in first.stderr + second.stderr
    assert len(list((tmp_path / "cli-cache" / "prepared").glob("*.safetensors"))) == 1


def test_stale_temporary_files_are_cleaned_up(cache, fp16_weights):
    cache.mkdir(parents=True)
    stale = cache / ".leftover.safetensors.12345.tmp"
    stale.write_bytes(b"x" * 1024)
    old = stale.stat().st_mtime - 2 * 3600
    os.utime(stale, (old, old))
    fresh = cache / ".other.safetensors.999.tmp"
    fresh.write_bytes(b"y")
    load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert not stale.exists() and fresh.exists()  # a writer may still own a recent one


def test_failed_load_leaves_no_partial_copy(cache, fp16_weights, monkeypatch):
    # A read error halfway through converting (injected: a real one needs a failing disk).
    from mps_cli.errors import CheckpointError
    from mps_cli.weights.checkpoint import SafetensorsFile

    calls = {"n": 0}
    real = SafetensorsFile.read_into

    def failing(self, key, out):
        calls["n"] += 1
        if calls["n"] == 20:
            raise CheckpointError(f"{self.path}: cannot read weights (Input/output error)")
        return real(self, key, out)

    monkeypatch.setattr(SafetensorsFile, "read_into", failing)
    with pytest.raises(CheckpointError, match="Input/output error"):
        load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert _prepared(cache) == [] and not list(cache.glob(".*.tmp"))
    monkeypatch.setattr(SafetensorsFile, "read_into", real)
    assert all(r.ok for r in load_scorer(fp16_weights, device="cpu", dtype="bf16").score(IMAGE_PATHS, PROMPT))


def test_info_reports_the_prepared_copies(tmp_path, fp16_weights, monkeypatch):
    folder = tmp_path / "info-cache"
    monkeypatch.setenv("MPS_CACHE_DIR", str(folder))
    load_scorer(fp16_weights, device="cpu", dtype="bf16")
    [written] = _prepared(folder / "prepared")
    env = {"MPS_CACHE_DIR": str(folder), SWITCH_ENV: "1", "HF_HUB_OFFLINE": "1"}
    doc = json.loads(run_cli("info", "--json", env=env).stdout)["prepared"]
    assert doc == {"dir": str(folder / "prepared"), "enabled": True, "switch": f"{SWITCH_ENV}=0",
                   "files": 1, "bytes": written.stat().st_size}
    text = run_cli("info", env={**env, SWITCH_ENV: "off"})
    assert text.returncode == 0 and f"prepared weights: {folder / 'prepared'}: off" in text.stdout
