"""The decode paths beside the exact one: PIL's JPEG draft on the host, and the tensor path (torchvision's
batched ``decode_jpeg`` plus the torch resize, on the scorer's device: here the CPU, the same code that runs
on CUDA with nvJPEG). Scores, per-image fallbacks, the feeder thread, the option and its refusals.
"""

from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch
from conftest import IMAGES, WEIGHTS, messages, run_cli, summary
from PIL import Image

from mps_cli import load_scorer
from mps_cli.constants import DIMENSIONS, IMAGE_STD
from mps_cli.devices import resolve_decode
from mps_cli.engine.decode import checked_jpeg, decode_jpegs, find_jpeg_decoder
from mps_cli.engine.preprocess import EncodedImage, load_pixels, open_image, resized_size

PROMPTS = ["a red fox in the snow", "portrait of an old fisherman", "three blue cubes on a table"]
STD = torch.tensor(IMAGE_STD).view(3, 1, 1)
CPU = torch.device("cpu")


def jpeg_versions(folder: Path, side: int) -> list[Path]:
    """The fixture's images as RGB JPEGs (quality 90), shorter side ``side``: where the draft scales engage."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(IMAGES.iterdir()):
        with Image.open(src) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        scale = side / min(w, h)
        path = folder / (src.stem + ".jpg")
        rgb.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


def smooth_jpeg(path: Path, w: int, h: int, **save) -> Path:
    """A photograph-like JPEG: smooth gradients, no sharp edges."""
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    px = torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.5 + 0.3 * torch.sin(3 * (x + y))], dim=-1)
    Image.fromarray((px * 255).round().to(torch.uint8).numpy()).save(path, quality=90, **save)
    return path


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel difference of two normalised inputs in 8-bit grey levels."""
    return ((a - b) * STD * 255).abs()


@pytest.fixture(scope="module")
def scorers():
    return {path: load_scorer(WEIGHTS, device="cpu", decode=path) for path in ("exact", "draft", "tensor")}


@pytest.fixture(scope="module")
def fixture_jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    return {side: jpeg_versions(root / str(side), side) for side in (512, 1024)}


def _scores(scorer, paths) -> dict:
    out = {}
    for prompt in PROMPTS:
        for r in scorer.score(paths, prompt, dims=["all"]):
            assert r.ok, r.error
            out.update({(r.image, prompt, d): r.scores[d] for d in DIMENSIONS})
    return out


def _swapped(got: dict, ref: dict) -> int:
    groups: dict = {}
    for key in ref:
        groups.setdefault(key[1:], []).append(key)
    return sum((got[a] - got[b]) * (ref[a] - ref[b]) <= 0 for keys in groups.values() for a, b in combinations(keys, 2))


def test_each_path_against_the_exact_one_on_the_fixture_jpegs(scorers, fixture_jpegs):
    """The drift table of docs/precision.md, on two of its sizes (bench_decode.py adds 2048)."""
    for side, paths in fixture_jpegs.items():
        exact = _scores(scorers["exact"], paths)
        tensor = _scores(scorers["tensor"], paths)
        draft = _scores(scorers["draft"], paths)
        assert scorers["tensor"].decode == "tensor" and scorers["draft"].decode == "draft"
        # Measured 0.0025 (512) and 0.0014 (1024), every pair in order: under the 0.090 fp16 drift accepted on CUDA.
        assert max(abs(tensor[k] - exact[k]) for k in exact) < 0.01, side
        assert _swapped(tensor, exact) == 0
        # The draft path reads these high-frequency images through another low-pass: measured 0.22 and 0.093,
        # 8 and 0 of the 252 pairs swapped (bf16's order of drift), hence opt-in.
        worst = max(abs(draft[k] - exact[k]) for k in exact)
        assert 0.01 < worst < 0.4, (side, worst)
        assert _swapped(draft, exact) <= 9


def test_draft_decodes_a_jpeg_smaller_and_keeps_the_exact_geometry(tmp_path):
    path = smooth_jpeg(tmp_path / "photo.jpg", 1001, 703)
    exact, draft = open_image(path), open_image(path, draft=224)
    assert exact.size == (1001, 703)
    assert draft.size == resized_size(1001, 703, 224) == (318, 224)
    # A DCT-scaled decode is not the full one; on a smooth photograph it lands within a few grey levels.
    a, b = load_pixels(path, 224), load_pixels(path, 224, draft=True)
    assert a.shape == b.shape == (3, 224, 224)
    assert 0 < levels(a, b).max() <= 4 and levels(a, b).mean() < 0.6
    # Other formats (and JPEGs too small to reduce) decode as always.
    png = tmp_path / "photo.png"
    Image.open(path).save(png)
    assert torch.equal(load_pixels(png, 224, draft=True), load_pixels(png, 224))
    small = smooth_jpeg(tmp_path / "small.jpg", 300, 240)
    assert torch.equal(load_pixels(small, 224, draft=True), load_pixels(small, 224))


def test_tensor_path_lands_within_a_grey_level_of_pil(tmp_path):
    """torchvision's CPU decode is libjpeg-turbo's, as PIL's; the torch resize rounds where PIL does."""
    paths = [smooth_jpeg(tmp_path / "a.jpg", 768, 768), smooth_jpeg(tmp_path / "b.jpg", 517, 203),
             smooth_jpeg(tmp_path / "c.jpg", 224, 279), smooth_jpeg(tmp_path / "d.jpg", 640, 480)]
    jpegs = [checked_jpeg(p, p.name) for p in paths]
    assert all(j is not None for j in jpegs)
    got = decode_jpegs(jpegs, 224, CPU, find_jpeg_decoder(CPU))
    for p, px in zip(paths, got):
        ref = load_pixels(p, 224)
        assert px.shape == ref.shape == (3, 224, 224) and px.dtype == torch.float32
        assert levels(px, ref).max() <= 1.01, p.name
        assert levels(px, ref).mean() < 0.3, p.name


def _odd_inputs(tmp_path: Path) -> dict[str, Path]:
    good = smooth_jpeg(tmp_path / "good.jpg", 640, 480)
    data = good.read_bytes()
    files = {
        "good": good,
        "png": tmp_path / "sunset.png",
        "grey": tmp_path / "grey.jpg",
        "cmyk": tmp_path / "cmyk.jpg",
        "progressive": smooth_jpeg(tmp_path / "progressive.jpg", 500, 400, progressive=True),
        "truncated": tmp_path / "truncated.jpg",
        "not-a-jpeg": tmp_path / "text.jpg",
        "missing": tmp_path / "missing.jpg",
    }
    files["png"].write_bytes((IMAGES / "sunset.png").read_bytes())
    Image.open(good).convert("L").save(files["grey"], quality=90)
    Image.open(good).convert("CMYK").save(files["cmyk"], quality=90)
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not-a-jpeg"].write_text("hello")
    return files


def test_odd_files_go_the_exact_way_alone_and_never_fail_the_batch(scorers, tmp_path):
    files = _odd_inputs(tmp_path)
    paths = list(files.values())
    # The tensor path keeps only whole RGB or grey JPEGs; the rest are decoded on the host.
    taken = {name for name, p in files.items() if checked_jpeg(p, p.name) is not None}
    assert taken == {"good", "grey", "progressive"}
    exact = scorers["exact"].score(paths, "a red fox", dims=["all"], batch_size=8)
    fast = scorers["tensor"].score(paths, "a red fox", dims=["all"], batch_size=8)
    for name, e, f in zip(files, exact, fast):
        assert f.image == e.image == str(files[name])
        if name in ("truncated", "not-a-jpeg", "missing"):
            assert not f.ok and f.error == e.error, name  # the exact path's own message
        else:
            assert f.ok and e.ok, (name, f.error)
            assert max(abs(f.scores[d] - e.scores[d]) for d in DIMENSIONS) < 0.02, name


def test_a_jpeg_the_decoder_refuses_falls_back_to_pil(scorers, tmp_path):
    """A header PIL reads and a body libjpeg rejects: the batched call fails, the rest are still decoded."""
    good = smooth_jpeg(tmp_path / "good.jpg", 640, 480)
    data = good.read_bytes()
    bad = tmp_path / "bad-scan.jpg"
    bad.write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # half the scan, then the end-of-image marker
    assert checked_jpeg(bad, "bad") is not None
    items = [checked_jpeg(good, "good"), checked_jpeg(bad, "bad"), checked_jpeg(good, "good again")]
    out = decode_jpegs(items, 224, CPU, find_jpeg_decoder(CPU))
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert torch.equal(out[0], out[2])
    exact = scorers["exact"].score([bad], "a fox")[0]
    if exact.ok:  # PIL decodes what it can of it: so must the fallback
        assert isinstance(out[1], torch.Tensor)
    else:
        assert str(out[1]) == exact.error


def test_the_feeder_keeps_input_order_across_batches(scorers, tmp_path):
    """The tensor path prepares each batch on a feeder thread while the model runs the one before."""
    files = _odd_inputs(tmp_path)
    paths = [p for _ in range(3) for p in files.values()]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(paths))]
    assert scorers["tensor"]._feeds_ahead and not scorers["exact"]._feeds_ahead
    seen = []
    streamed = list(scorers["tensor"].iter_score(paths, prompts, batch_size=3, progress=seen.append))
    one_by_one = [scorers["tensor"].score([p], q)[0] for p, q in zip(paths, prompts)]
    assert [r.image for r in streamed] == [str(p) for p in paths]
    assert [r.error for r in streamed] == [r.error for r in one_by_one]
    for a, b in zip(streamed, one_by_one):
        if a.ok:
            assert abs(a.scores["overall"] - b.scores["overall"]) < 1e-4
    assert len(seen) == len(paths)


def test_server_uploads_take_the_tensor_path(scorers, tmp_path):
    import asyncio
    import base64

    import httpx

    from mps_cli.server import ServeOptions, create_app

    files = _odd_inputs(tmp_path)
    names = ["good", "grey", "png", "truncated"]
    app = create_app(scorers["tensor"], ServeOptions())
    body = {"images": [base64.b64encode(files[n].read_bytes()).decode() for n in names], "prompt": "a red fox"}

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mps") as http:
            return await http.post("/v1/score", json=body)

    app.state.service.batcher.start()
    try:
        rows = asyncio.run(post()).json()["results"]
    finally:
        app.state.service.batcher.close()
    local = scorers["exact"].score([EncodedImage(files[n].read_bytes(), n) for n in names], "a red fox")
    for name, row, ref in zip(names, rows, local):
        if name == "truncated":
            assert "error" in row and "truncated" in row["error"]
        else:
            assert abs(row["scores"]["overall"] - ref.scores["overall"]) < 0.02, name


def test_decode_option_on_the_command_line(tmp_path):
    files = _odd_inputs(tmp_path)
    args = ["score", str(files["good"]), str(files["truncated"]), "--prompt", "a fox", "--weights", str(WEIGHTS),
            "--device", "cpu", "--jsonl"]
    exact = run_cli(*args, "--decode", "exact")
    fast = run_cli(*args, "--decode", "fast")
    for res in (exact, fast):
        assert res.returncode == 1 and summary(res.stderr) == "mps: 1 scored, 1 failed"
        assert len(messages(res.stderr)) == 1
    assert exact.stdout.splitlines()[1] == fast.stdout.splitlines()[1]  # the failed row
    bad = run_cli(*args, "--decode", "quick")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "mps: error: --decode must be one of auto, exact, fast, draft or tensor (got 'quick')\n"


def test_without_torchvision_the_tensor_path_decodes_exactly_with_one_warning(monkeypatch, tmp_path):
    """torchvision is the optional gpu extra: an absent one (None in sys.modules: import fails) is no error.

    The library logs the fallback as a warning, which the output door (cli/output.py) says as ``warning:``."""
    import mps_cli.cli  # noqa: F401 (the package's `app` attribute is the Typer app; the module is below)

    cli_app = sys.modules["mps_cli.cli.app"]
    for name in ("torchcodec", "torchcodec.decoders", "torchvision", "torchvision.io"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(cli_app, "_SCORERS", {})
    good = smooth_jpeg(tmp_path / "good.jpg", 640, 480)
    args = ["score", str(good), "--prompt", "a fox", "--weights", str(WEIGHTS), "--device", "cpu", "--jsonl"]
    res = run_cli(*args, "--decode", "tensor")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "torchvision" in line]
    assert notes == ["mps: warning: the fast decode needs torchcodec or torchvision built for cpu (the gpu extra); "
                     "decoding the exact way instead"]
    assert res.stdout == run_cli(*args, "--decode", "exact").stdout


def test_what_each_spelling_means_per_device():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert [resolve_decode(s, cpu) for s in ("auto", "exact", "fast", "draft", "tensor")] == \
        ["exact", "exact", "draft", "draft", "tensor"]
    # Spellings only: no CUDA or Apple GPU is touched to resolve them.
    assert [resolve_decode(s, cuda) for s in ("auto", "fast", "exact", " Draft ")] == \
        ["tensor", "tensor", "exact", "draft"]
    # Apple's GPU has no batched JPEG decoder here: fast is the draft path, whose drift keeps it opt-in.
    assert [resolve_decode(s, mps) for s in ("auto", "fast")] == ["exact", "draft"]


def test_compile_graphs_is_refused_on_cpu_in_one_line():
    res = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", "a fox", "--weights", str(WEIGHTS),
                  "--device", "cpu", "--compile", "graphs")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "mps: error: compile mode 'graphs' (CUDA graphs) needs a CUDA device, not cpu (--compile off runs without it)"]
    assert run_cli("score", str(IMAGES / "sunset.png"), "--prompt", "a fox", "--compile", "max").returncode == 2


def test_ray_engine_refuses_decode_and_compile_before_starting(tmp_path):
    res = run_cli("dataset", str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray", "--decode", "fast",
                  "--weights", str(WEIGHTS))
    assert res.returncode == 2 and "apply to the local engine" in res.stderr


def test_a_panel_of_models_refuses_a_decode_path_before_loading():
    """The judges' references decode their own ways: --decode and --compile are MPS's alone."""
    import mps_cli
    from mps_cli.errors import InputError

    for options in ({"decode": "fast"}, {"decode": "tensor"}, {"compile": "on"}):
        with pytest.raises(InputError, match="MPS's alone"):
            mps_cli.load_scorer(WEIGHTS, device="cpu", model="mps", **options)
    panel = mps_cli.load_scorer(WEIGHTS, device="cpu", model="mps", decode="auto")
    ref = load_scorer(WEIGHTS, device="cpu").score([IMAGES / "sunset.png"], "a fox")[0]
    got = panel.score([IMAGES / "sunset.png"], "a fox")[0]
    assert got.scores == {"mps.overall": ref.scores["overall"]}
