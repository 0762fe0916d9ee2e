"""Each remedy fits the failure it follows (issue 28 item 5), and a failed input is said the same way,
``mps: error: <culprit>: <why>``, by every command (item 7). In process, on real files."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from conftest import IMAGES, WEIGHTS, run_cli

LOCAL = ("-w", str(WEIGHTS), "--device", "cpu")


def hints(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mps: hint:")]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mps: error:")]


# --------------------------------------------------------------------------- item 5: hints


def test_recursive_is_suggested_only_for_a_folder_with_sub_folders(tmp_path):
    deep = tmp_path / "deep"
    (deep / "sub").mkdir(parents=True)
    shutil.copy(IMAGES / "crop.png", deep / "sub" / "crop.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "notes.txt").write_text("no images here\n")
    (tmp_path / "bare").mkdir()

    res = run_cli("score", "deep", "--prompt", "x", *LOCAL, cwd=tmp_path)
    assert res.returncode == 1
    assert errors(res.stderr) == ["mps: error: deep: no images directly in this folder (looked for bmp, gif, jpeg, "
                                  "jpg, png, tif, tiff, webp; sub-folders not searched)"]
    assert hints(res.stderr) == ["mps: hint: use --recursive to look in sub-folders too"]

    res = run_cli("score", "flat", "bare", "--prompt", "x", *LOCAL, cwd=tmp_path)
    assert res.returncode == 1
    assert errors(res.stderr) == ["mps: error: flat: no images in this folder (looked for bmp, gif, jpeg, jpg, png, "
                                  "tif, tiff, webp) and no sub-folders",
                                  "mps: error: bare: no images: the folder is empty"]
    assert "--recursive" not in res.stderr and hints(res.stderr) == []

    # With --recursive there is nothing deeper to suggest either.
    (tmp_path / "flat" / "empty-sub").mkdir()
    res = run_cli("score", "flat", "--recursive", "--prompt", "x", *LOCAL, cwd=tmp_path)
    assert res.returncode == 1 and "no images in this folder or below" in res.stderr
    assert hints(res.stderr) == []


@pytest.mark.parametrize(("source", "other"), [("metadata", "sidecar"), ("sidecar", "metadata")])
def test_a_prompt_source_that_came_up_empty_is_not_suggested_again(tmp_path, source, other):
    shutil.copy(IMAGES / "crop.png", tmp_path / "crop.png")  # no caption beside it, no generator metadata
    res = run_cli("score", "crop.png", "--prompt-from", source, *LOCAL, cwd=tmp_path)
    assert res.returncode == 1
    (hint,) = hints(res.stderr)
    assert f"--prompt-from {other}" in hint and source not in hint, hint
    assert "--prompt TEXT" in hint and "--prompts FILE" in hint


def test_cuda_unavailable_points_at_device_cpu_not_at_dtype():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = run_cli("score", str(IMAGES / "crop.png"), "--prompt", "x", "-w", str(WEIGHTS), "--device", "cuda")
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith("mps: error: device 'cuda': CUDA is not available here"), line
    assert line.endswith(": use --device cpu (or auto)") and "--dtype" not in line, line


def test_a_dtype_error_points_at_dtype_and_a_device_error_at_device():
    from mps_cli.cli.app import describe
    from mps_cli.devices import parse_dtype, resolve_device
    from mps_cli.errors import DeviceError

    with pytest.raises(DeviceError) as dtype:
        parse_dtype("fp8")
    assert dtype.value.hint == "dtype"
    said = describe(dtype.value)
    assert "--dtype" in said and "--device" not in said, said

    with pytest.raises(DeviceError) as device:
        resolve_device("cuda:99")  # no CUDA here, or fewer devices than that
    said = describe(device.value)
    assert "--device" in said and "--dtype" not in said, said


@pytest.mark.parametrize(("args", "said"), [
    (("--shard-index", "2", "--num-shards", "2"), "--shard-index 2 is not in 0..1 (the range for --num-shards 2)"),
    (("--shard-index", "1"), "--shard-index 1 needs --num-shards"),
    (("--num-shards", "3"), "--num-shards 3 needs --shard-index (0..2)"),
    (("--shard-index", "0", "--num-shards", "0"), "--num-shards 0: must be at least 1"),
])
def test_a_shard_range_error_names_only_the_two_shard_flags(tmp_path, args, said):
    pytest.importorskip("pyarrow")
    res = run_cli("dataset", str(tmp_path), "--out", str(tmp_path / "out"), *args, *LOCAL)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"mps: error: {said}"), line
    assert "--dim" not in line and "--condition" not in line, line
    assert not (tmp_path / "out").exists()


def test_other_dataset_usage_errors_name_their_own_flag(tmp_path):
    pytest.importorskip("pyarrow")
    res = run_cli("dataset", str(tmp_path), "--out", str(tmp_path / "out"), "--condition", " ", *LOCAL)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert "condition text is empty" in line and "--condition" in line and "--shard-index" not in line, line


def test_an_unreachable_server_is_said_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    res = run_cli("score", str(IMAGES / "crop.png"), "--prompt", "x", "--server", f"http://127.0.0.1:{port}")
    assert res.returncode == 4
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"mps: error: cannot reach the scoring server at http://127.0.0.1:{port} ("), line
    assert line.count("mps serve") == 1 and line.count("running there") == 1 and "--server" in line, line


# --------------------------------------------------------------------------- item 7: one word for one failure


def test_the_same_unreadable_image_is_the_same_error_in_score_versus_and_eval(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for name in ("crop.png", "gray.png"):
        shutil.copy(IMAGES / name, a / name)
    shutil.copy(IMAGES / "sunset.png", b / "crop.png")
    bad = b / "gray.png"
    bad.write_text("this is a text file with an image name\n")
    shutil.copy(IMAGES / "alpha.png", b / "lonely.png")  # no counterpart in a: unpaired, which is no failure

    score = run_cli("score", str(bad), "--prompt", "x", "--jsonl", *LOCAL)
    assert score.returncode == 1
    (said,) = errors(score.stderr)
    assert said.startswith(f"mps: error: {bad}: "), said

    versus = run_cli("versus", str(a), str(b), "--prompt", "x", "--no-cache", "--json", *LOCAL)
    assert versus.returncode == 1
    assert errors(versus.stderr) == [said]
    warned = [line for line in versus.stderr.splitlines() if line.startswith("mps: warning:")]
    assert warned == [f"mps: warning: {a / 'gray.png'}: unpaired (no image to compare it with)",
                      f"mps: warning: {b / 'lonely.png'}: unpaired (no image to compare it with)"]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "x", "a": str(a / n), "b": str(b / n), "winner": "a"}) + "\n"
                             for n in ("gray.png", "crop.png")))
    evaluated = run_cli("eval", "pairs", str(pairs), "--no-cache", "--json", *LOCAL)
    assert evaluated.returncode == 1
    assert errors(evaluated.stderr) == [f"{said} (line 1: item skipped)"]
    assert "warning:" not in evaluated.stderr
    assert json.loads(evaluated.stdout)["skipped"] == 1


def test_an_empty_prompt_is_scored_with_a_warning_and_a_real_one_without(tmp_path):
    """`--prompt "$P"` with P unset scores every image against no text: legal, but worth one warning line."""
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        shutil.copy(IMAGES / ("sunset.png" if side == "a" else "gray.png"), tmp_path / side / "x.png")
    one, other = str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")
    commands = [("score", one), ("rank", one, other), ("compare", one, other),
                ("versus", str(tmp_path / "a"), str(tmp_path / "b"), "--no-cache")]
    for args in commands:
        for prompt, warned in (("", True), ("   ", True), ("a red fox", False)):
            res = run_cli(*args, "--prompt", prompt, "--json", *LOCAL)
            assert res.returncode == 0, (args, res.stderr)
            assert json.loads(res.stdout), args
            warnings = [line for line in res.stderr.splitlines() if line.startswith("mps: warning:")]
            assert warnings == (["mps: warning: --prompt is empty: every image is scored against no text "
                                 "(an unset shell variable?)"] if warned else []), (args, prompt, res.stderr)
