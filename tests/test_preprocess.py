"""Tokeniser and image preprocessing, pinned to mps-model.md §2 with hand-built inputs."""

from __future__ import annotations

import random
import struct
import time
import zlib

import pytest
import torch
from conftest import IMAGES
from PIL import Image

from mps_cli.engine.preprocess import Tokenizer, open_image, pixels_from_image, resize_crop
from mps_cli.errors import ImageError

SOT, EOT = 49406, 49407
# Written out from mps-model.md §2 rather than imported, so a typo in constants.py shows up.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """The BPE on its own: the token ids between SOT and EOT, with no layout applied (its ids are
    held to open_clip's in test_reference.py, the one test module that pays for importing open_clip)."""
    from mps_cli.engine.bpe import BPE

    return BPE()


# --- tokeniser ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a red fox", "A cozy café interior — warm light, plants & books", ""])
def test_layout_is_sot_text_eot_then_eot_padding(tokenizer, bpe, prompt):
    tokens = tokenizer(prompt)
    body = bpe.encode(prompt)
    assert len(tokens.ids) == 77
    assert tokens.ids[0] == SOT
    assert list(tokens.ids[1:1 + len(body)]) == body
    assert tokens.eot_index == len(body) + 1
    assert tokens.ids[tokens.eot_index] == EOT
    # The condition mask spans all 77 positions, so padding must be EOT (the original's pad id).
    assert set(tokens.ids[tokens.eot_index:]) == {EOT}
    assert 0 not in tokens.ids
    # The model reads the prompt embedding at argmax(ids): that must be this first EOT.
    assert max(range(77), key=lambda i: (tokens.ids[i], -i)) == tokens.eot_index
    assert tokens.truncated is False


def test_known_clip_ids_for_a_short_prompt(tokenizer):
    # CLIP vocabulary ids of "a</w>", "red</w>", "fox</w>".
    assert tokenizer("a red fox").ids[:5] == (SOT, 320, 736, 3240, EOT)


def test_exactly_75_tokens_fit_and_76_are_truncated(tokenizer, bpe):
    assert len(bpe.encode("word")) == 1
    fits = tokenizer(" ".join(["word"] * 75))
    assert fits.truncated is False and fits.eot_index == 76 and fits.ids[76] == EOT
    cut = tokenizer(" ".join(["word"] * 76))
    assert cut.truncated is True and cut.eot_index == 76 and cut.ids[76] == EOT


def test_long_prompt_is_cut_at_77_with_eot_last(tokenizer, bpe):
    words = "red fox snowy forest dawn old fisherman weathered hands blue cubes wooden table".split()
    prompt = " ".join(random.Random(7).choice(words) for _ in range(200))
    full = [SOT, *bpe.encode(prompt), EOT]
    assert len(full) > 200
    tokens = tokenizer(prompt)
    assert len(tokens.ids) == 77
    assert tokens.truncated is True
    assert tokens.ids[-1] == EOT
    assert tokens.eot_index == 76
    assert list(tokens.ids[:76]) == full[:76]


# --- resize and crop -------------------------------------------------------------------------


def _row_colour(y: int) -> tuple[int, int, int]:
    return (y % 256, 255 if y >= 256 else 0, (37 * y) % 256)


def test_crop_offset_is_floor_not_rounded(tmp_path):
    # 224x279: no resize, crop top = (279 - 224) // 2 = 27 (torchvision rounds 27.5 to 28).
    w, h = 224, 279
    img = Image.new("RGB", (w, h))
    for y in range(h):
        img.paste(_row_colour(y), (0, y, w, y + 1))
    path = tmp_path / "rows.png"
    img.save(path)
    out = resize_crop(open_image(path), 224)
    assert out.size == (224, 224)
    for k in range(224):
        assert out.getpixel((0, k)) == _row_colour(27 + k), f"output row {k}"
        assert out.getpixel((223, k)) == _row_colour(27 + k), f"output row {k}"


def test_fixture_crop_image_keeps_rows_27_to_250():
    img = open_image(IMAGES / "crop.png")
    assert img.size == (224, 279)
    assert resize_crop(img, 224).tobytes() == img.crop((0, 27, 224, 251)).tobytes()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


@pytest.mark.parametrize(
    "size, resized, rounded, box",
    [
        ((300, 200), (336, 224), None, (56, 0, 280, 224)),
        # 224 * 299 / 200 = 334.88: floored to 334, where rounding would give 335.
        ((299, 200), (334, 224), (335, 224), (55, 0, 279, 224)),
        ((200, 299), (224, 334), (224, 335), (0, 55, 224, 279)),
    ],
)
def test_long_side_is_floored_before_crop(size, resized, rounded, box):
    img = _noise(*size)
    got = resize_crop(img, 224)
    assert got.size == (224, 224)
    assert got.tobytes() == img.resize(resized, resample=Image.Resampling.BICUBIC).crop(box).tobytes()
    if rounded:
        # The comparison above can tell floor from rounding on this image.
        assert got.tobytes() != img.resize(rounded, resample=Image.Resampling.BICUBIC).crop(box).tobytes()


def test_short_side_already_224_is_not_resampled():
    img = _noise(333, 224)
    assert resize_crop(img, 224).tobytes() == img.crop((54, 0, 278, 224)).tobytes()


# --- colour modes ------------------------------------------------------------------------------


def test_rgba_drops_alpha_without_compositing(tmp_path):
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (10, 200, 30, 0))  # fully transparent
    img.putpixel((1, 0), (250, 5, 100, 128))
    path = tmp_path / "alpha.png"
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 200, 30)
    assert out.getpixel((1, 0)) == (250, 5, 100)
    assert open_image(img).getpixel((0, 0)) == (10, 200, 30)


def test_palette_expands_to_its_colours(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([12, 34, 56, 200, 100, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    img.save(path)
    assert Image.open(path).mode == "P"
    out = open_image(path)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(2)] == [(12, 34, 56), (200, 100, 0)]


def test_grey_expands_to_three_equal_channels(tmp_path):
    img = Image.new("L", (3, 1))
    for x, v in enumerate((0, 77, 255)):
        img.putpixel((x, 0), v)
    path = tmp_path / "grey.png"
    img.save(path)
    out = open_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = (0, 32768, 51200, 65535)
    img = Image.frombytes("I;16", (4, 1), struct.pack("<4H", *values))
    path = tmp_path / "grey16.png"
    img.save(path)
    assert Image.open(path).mode == "I;16"
    out = open_image(path)
    for x, v in enumerate(values):
        r, g, b = out.getpixel((x, 0))
        assert r == g == b
        assert abs(r - v / 257) <= 1, f"{v} became {r}"


def test_cmyk_jpeg_comes_out_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = open_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r >= 240 and g <= 15 and b <= 15, (r, g, b)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    assert open_image(path).getpixel((5, 5)) == (255, 0, 0)


# --- normalisation -----------------------------------------------------------------------------


def test_pixels_are_normalised_with_clip_constants():
    colour = (200, 100, 13)
    px = pixels_from_image(Image.new("RGB", (224, 224), colour), 224)
    assert px.shape == (3, 224, 224) and px.dtype == torch.float32
    for c in range(3):
        want = (colour[c] / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(px[c], torch.full((224, 224), want), atol=1e-6), c


def test_pixels_are_channel_first_rows_then_columns():
    img = Image.new("RGB", (224, 224), (0, 0, 0))
    img.putpixel((5, 3), (255, 0, 0))  # x=5, y=3
    px = pixels_from_image(img, 224)
    assert px[0, 3, 5] == pytest.approx((1 - MEAN[0]) / STD[0], abs=1e-6)
    assert px[0, 5, 3] == pytest.approx((0 - MEAN[0]) / STD[0], abs=1e-6)


# --- unreadable images -------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _assert_image_error(path, *fragments):
    with pytest.raises(ImageError) as info:
        open_image(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_missing_file(tmp_path):
    _assert_image_error(tmp_path / "nope.png", "no such file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_image_error(path, "empty")


def test_text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    _assert_image_error(path, "not an image")


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    _assert_image_error(tmp_path / "folder.png", "directory")


def test_truncated_png(tmp_path):
    whole = tmp_path / "whole.png"
    _noise(64, 64).save(whole)
    data = whole.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    _assert_image_error(path, "truncated")


@pytest.mark.parametrize("pil_guard", [True, False], ids=["pil-guard-on", "pil-guard-off"])
def test_header_claiming_absurd_size_is_refused_before_decoding(tmp_path, monkeypatch, pil_guard):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        # A well-formed header (CRC included): PIL reads the size without touching pixel data.
        assert Image.open(path).size == (100_000, 100_000)
    if not pil_guard:
        # An application that switched PIL's own bomb check off must still be protected.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    start = time.perf_counter()
    _assert_image_error(path, "decompression bomb")
    # Decoding 30 GB of pixels could not finish in this time; refusing from the header does.
    assert time.perf_counter() - start < 1.0
