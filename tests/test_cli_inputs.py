"""Bad input through the real console script: one stderr line naming the culprit, no traceback,
the right exit code, and every other input still scored and printed."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib

import pytest
from conftest import IMAGES, WEIGHTS, messages, run_cli, run_mps, summary
from PIL import Image

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
CUBES = "three blue cubes stacked on top of a wooden table"
TOL = 1e-3


def table(expected: dict) -> dict:
    return {(r["image"], r["prompt"], r["dim"]): r["score"] for r in expected["scores"]}


def lines_naming(stderr: str, culprit: str) -> list[str]:
    return [line for line in stderr.splitlines() if culprit in line]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path, width: int = 100_000, height: int = 100_000) -> None:
    """A valid PNG header (correct CRCs) claiming width x height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@pytest.fixture
def bad_inputs(tmp_path):
    """A folder of broken and awkward images beside good fixture copies."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "sunset.png")
    shutil.copy(IMAGES / "gray.png", tmp_path / "gray.png")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "notes.txt").write_text("no images here\n")
    (tmp_path / "zerobyte.png").write_bytes(b"")
    data = (IMAGES / "sunset.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notanimage.png").write_text("this is a text file with an image name\n")
    bomb_png(tmp_path / "bomb.png")

    Image.open(IMAGES / "portrait.jpg").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    # 16-bit grey: the 8-bit fixture scaled to the full 0..65535 range (x * 257).
    Image.open(IMAGES / "gray.png").convert("I").point(lambda v: v * 257).convert("I;16").save(tmp_path / "deep16.png")

    first = Image.open(IMAGES / "sunset.png").convert("RGB")
    second = Image.open(IMAGES / "wide.webp").convert("RGB").resize(first.size)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 2
        gif.seek(0)
        gif.convert("RGB").save(tmp_path / "anim_first.png")
        gif.seek(1)
        gif.convert("RGB").save(tmp_path / "anim_second.png")
    return tmp_path


def test_bad_images_fail_alone_and_the_rest_are_scored(bad_inputs, expected):
    exp = table(expected)
    culprits = ["nothere.png", "emptydir", "zerobyte.png", "truncated.png", "notanimage.png", "bomb.png"]
    fine = ["cmyk.jpg", "deep16.png", "anim.gif", "anim_first.png", "anim_second.png"]
    args = ["sunset.png", "nothere.png", "emptydir", "cmyk.jpg", "zerobyte.png", "truncated.png", "deep16.png",
            "notanimage.png", "anim.gif", "anim_first.png", "anim_second.png", "bomb.png", "gray.png"]
    proc = run_cli("score", *args, "--prompt", FOX, "--jsonl", "--batch-size", "2", "-w", str(WEIGHTS),
                   cwd=bad_inputs)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in culprits:
        assert len(lines_naming(proc.stderr, name)) == 1, (name, proc.stderr)
    assert len(messages(proc.stderr)) == len(culprits), proc.stderr
    assert summary(proc.stderr) == f"mps: {len(args) - len(culprits)} scored, {len(culprits)} failed"
    # The folder has no sub-folders: the line says what was looked for, and no remedy points deeper.
    folder = lines_naming(proc.stderr, "emptydir")[0]
    assert "looked for" in folder and "png" in folder and "no sub-folders" in folder, folder
    assert "--recursive" not in proc.stderr and "hint:" not in proc.stderr, proc.stderr

    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == args
    by = {r["image"]: r for r in rows}
    for name in culprits:
        assert set(by[name]) == {"image", "error"}, by[name]
        assert name in by[name]["error"] and "\n" not in by[name]["error"]
    for name in ["sunset.png", "gray.png", *fine]:
        assert set(by[name]) == {"image", "prompt", "scores"}, by[name]
    assert "too large" in by["bomb.png"]["error"] or "limit" in by["bomb.png"]["error"]

    score = {name: by[name]["scores"]["overall"] for name in ["sunset.png", "gray.png", *fine]}
    assert score["sunset.png"] == pytest.approx(exp[("sunset.png", FOX, "overall")], abs=TOL)
    assert score["gray.png"] == pytest.approx(exp[("gray.png", FOX, "overall")], abs=TOL)
    # 16-bit grey read at its true brightness is the 8-bit fixture again (clipping would whiten it).
    assert score["deep16.png"] == pytest.approx(exp[("gray.png", FOX, "overall")], abs=TOL)
    # CMYK decoded to the right colours: the portrait again, give or take re-encoding at quality 95.
    assert score["cmyk.jpg"] == pytest.approx(exp[("portrait.jpg", FOX, "overall")], abs=0.1)
    # An animated GIF is its first frame, not its second.
    assert score["anim.gif"] == pytest.approx(score["anim_first.png"], abs=1e-4)
    assert abs(score["anim.gif"] - score["anim_second.png"]) > 0.05


def test_empty_folder_alone_is_an_error(tmp_path):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "notes.txt").write_text("nothing\n")
    proc = run_cli("rank", "emptydir", "--prompt", FOX, "--json", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(messages(proc.stderr)) == 1 and "emptydir" in proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc) == 1 and set(doc[0]) == {"image", "error"} and doc[0]["image"] == "emptydir"


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    from mps_cli.engine.preprocess import load_pixels
    from mps_cli.errors import ImageError

    bomb_png(tmp_path / "bomb.png")
    start = time.perf_counter()
    with pytest.raises(ImageError, match="bomb.png"):
        load_pixels(tmp_path / "bomb.png", 224)
    # Allocating 30 GB of pixels (or inflating them) would take far longer than this.
    assert time.perf_counter() - start < 1.0


def test_unknown_dim_bad_device_and_no_prompt_are_usage_errors():
    img = str(IMAGES / "sunset.png")
    cases = [
        (["score", img, "--prompt", FOX, "--dim", "beauty"], "'beauty'"),
        (["score", img, "--prompt", FOX, "--device", "tpu"], "'tpu'"),
        (["rank", img], "--prompt"),
    ]
    for args, culprit in cases:
        proc = run_mps(*args, "-w", str(WEIGHTS), fork=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr
        assert len(lines_naming(proc.stderr, culprit)) == 1, (args, proc.stderr)


def test_cuda_on_a_machine_without_one_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test is about one that does not")
    proc = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", FOX, "--device", "cuda", "-w", str(WEIGHTS))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "cuda" in proc.stderr.lower()


def test_truncated_weights_exit_3(tmp_path):
    data = WEIGHTS.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    proc = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", FOX, "-w", str(bad))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "cut.safetensors" in proc.stderr


def test_csv_prompts_without_prompt_column_is_a_usage_error(tmp_path):
    f = tmp_path / "list.csv"
    f.write_text("image,caption\nsunset.png,a fox\n")
    proc = run_cli("score", "--prompts", str(f), "-w", str(WEIGHTS))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert "list.csv" in proc.stderr and "prompt" in proc.stderr


def test_prompts_file_bad_lines_fail_alone(tmp_path, expected):
    exp = table(expected)
    lists = tmp_path / "lists"
    (lists / "imgs").mkdir(parents=True)
    for name in ("sunset.png", "gray.png", "portrait.jpg"):
        shutil.copy(IMAGES / name, lists / "imgs" / name)
    lines = [
        json.dumps({"image": "imgs/sunset.png", "prompt": FOX}),
        json.dumps({"image": "imgs/gone.png", "prompt": FOX}),
        '{"image": "imgs/gray.png", "prompt": ',
        json.dumps({"image": "imgs/portrait.jpg"}),
        json.dumps({"image": "imgs/gray.png", "prompt": CUBES}),
    ]
    (lists / "p.jsonl").write_text("\n".join(lines) + "\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_cli("score", "--prompts", "../lists/p.jsonl", "--jsonl", "-w", str(WEIGHTS), cwd=elsewhere)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 5
    assert rows[0]["scores"]["overall"] == pytest.approx(exp[("sunset.png", FOX, "overall")], abs=TOL)
    assert rows[4]["scores"]["overall"] == pytest.approx(exp[("gray.png", CUBES, "overall")], abs=TOL)
    assert rows[4]["prompt"] == CUBES
    for r in rows[1:4]:
        assert set(r) == {"image", "error"}, r
    assert "gone.png" in rows[1]["error"]
    assert "p.jsonl:3" in rows[2]["error"]
    assert "p.jsonl:4" in rows[3]["error"] and "prompt" in rows[3]["error"]
    assert len(messages(proc.stderr)) == 3, proc.stderr
    for culprit in ("gone.png", "p.jsonl:3", "p.jsonl:4"):
        assert len(lines_naming(proc.stderr, culprit)) == 1, (culprit, proc.stderr)


@pytest.mark.parametrize("name", ["sunset.png", "portrait.jpg", "palette.gif", "wide.webp"])
def test_an_image_piped_into_stdin_is_one_usage_error_not_its_bytes_as_paths(tmp_path, name):
    """`cat a.png | mps score -`: stdin carries paths, so an image there is one line saying what to do instead."""
    proc = run_cli("score", "-", "--prompt", FOX, "-w", str(WEIGHTS), cwd=tmp_path,
                   input=(IMAGES / name).read_bytes())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["mps: error: -: stdin holds an image, not paths: name the image as an "
                                        "argument instead, or pipe in paths, one per line"]
    assert proc.stdout == ""


def test_null_separated_stdin_without_a_nul_says_to_drop_the_flag(tmp_path):
    """`ls | mps score - -0`: the newline would become part of the path (an error line broken in two)."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    proc = run_cli("rank", "-", "-0", "--prompt", FOX, "-w", str(WEIGHTS), cwd=tmp_path, input="a.png\n")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "mps: error: -0: stdin holds no NUL byte but line breaks: for paths one per line, drop -0"]
    # The same path NUL-terminated, or one line without -0, is scored.
    for args, stdin in ((["-0"], "a.png\0"), ([], "a.png\n")):
        proc = run_cli("rank", "-", *args, "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path, input=stdin)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["image"] == "a.png"


def test_a_prompts_file_given_as_an_image_points_to_prompts(tmp_path):
    """`mps score prompts.jsonl`: named as what it is, with the flag that reads it; the other image is scored.
    compare takes no --prompts, so it only names the file."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "a.png", "prompt": FOX}) + "\n")
    proc = run_cli("score", "prompts.jsonl", "a.png", "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == ["mps: error: prompts.jsonl: a JSONL file, not an image"]
    assert "mps: hint: to score the images a prompts file lists, pass it as --prompts FILE" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == ["prompts.jsonl", "a.png"] and "scores" in rows[1]
    proc = run_cli("compare", "prompts.jsonl", "a.png", "--prompt", FOX, "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == ["mps: error: prompts.jsonl: a JSONL file, not an image"]
    assert "--prompts" not in proc.stderr


def test_a_pattern_that_reached_mps_says_why_it_is_no_file(tmp_path):
    """A quoted glob (the shell left it alone) says to unquote it; one that matched nothing says so; a file
    whose name merely has brackets is scored as it is."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    shutil.copy(IMAGES / "gray.png", tmp_path / "b [1].png")
    proc = run_cli("score", "*.png", "*.jpg", "b [1].png", "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS),
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == [
        "mps: error: *.png: no such file (a pattern, which mps does not expand: leave it unquoted for the shell "
        "to, or give the folder)",
        "mps: error: *.jpg: no such file (and, read as a pattern, it matches none)"]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == ["*.png", "*.jpg", "b [1].png"] and "scores" in rows[2]


def test_empty_stdin_is_that_inputs_failure_as_an_empty_folder_is(tmp_path):
    """`find ... | mps score -` finding nothing printed nothing and exited 0; now '-' fails as an input, and
    the images given beside it are still scored."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    proc = run_cli("score", "-", "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path, input="\n\n")
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == ["mps: error: -: no paths on stdin"]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [{"image": "-", "error": "-: no paths on stdin"}]
    proc = run_cli("rank", "a.png", "-", "--prompt", FOX, "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path, input="")
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["image"] == "a.png" and rows[0]["rank"] == 1 and rows[1]["image"] == "-"
    assert summary(proc.stderr) == "mps: 1 scored, 1 failed"
