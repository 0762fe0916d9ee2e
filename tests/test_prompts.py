"""Prompt sources: prompts files, caption sidecars and generator metadata, end to end through the
console script (the score proves which prompt was used) and piece by piece in-process."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import IMAGES, WEIGHTS, messages, run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mps_cli.errors import PromptError
from mps_cli.inputs.prompts import (
    a1111_prompt,
    comfy_prompt,
    decode_user_comment,
    metadata_prompt,
    read_prompt_file,
    sidecar_prompt,
)

FOX = "a red fox sitting in a snowy forest at dawn, highly detailed"
CUBES = "three blue cubes stacked on top of a wooden table"
CAFE = "A cozy café interior — warm light, plants & books"
FISHER = "portrait of an old fisherman with weathered hands, 35mm photo"
FIXTURE_IMAGES = ("sunset.png", "portrait.jpg", "alpha.png", "gray.png", "palette.gif", "wide.webp", "crop.png")
TOL = 1e-3
A1111_SETTINGS = "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model: sd15"


def table(expected: dict) -> dict:
    return {(r["image"], r["prompt"], r["dim"]): r["score"] for r in expected["scores"]}


def rows_of(proc) -> dict:
    assert "Traceback" not in proc.stderr
    return {r["image"]: r for r in (json.loads(line) for line in proc.stdout.splitlines())}


def _folders(tmp_path):
    """Images in lists/imgs, the prompts file in lists/, the command run from an unrelated cwd."""
    lists = tmp_path / "lists"
    (lists / "imgs").mkdir(parents=True)
    for name in FIXTURE_IMAGES:
        shutil.copy(IMAGES / name, lists / "imgs" / name)
    cwd = tmp_path / "work"
    cwd.mkdir()
    return lists, cwd


# --------------------------------------------------------------------------- prompts files


def test_prompts_jsonl_relative_paths_with_custom_condition(tmp_path, expected):
    lists, cwd = _folders(tmp_path)
    entries = [(f"imgs/{n}", p) for p in (FOX, FISHER) for n in FIXTURE_IMAGES]
    (lists / "p.jsonl").write_text("".join(json.dumps({"image": i, "prompt": p}) + "\n" for i, p in entries),
                                   encoding="utf-8")
    cond = expected["conditions"]["overall"]
    proc = run_cli("score", "--prompts", "../lists/p.jsonl", "--condition", cond, "--mask-threshold", "0.01",
                   "--jsonl", "-w", str(WEIGHTS), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["image"], r["prompt"]) for r in rows] == entries
    custom = {(r["image"], r["prompt"]): r["score"] for r in expected["custom"]
              if r["condition"] == cond and r["mask_threshold"] == 0.01}
    for r, (image, prompt) in zip(rows, entries):
        assert list(r["scores"]) == ["custom"]
        assert r["scores"]["custom"] == pytest.approx(custom[(image.split("/")[1], prompt)], abs=TOL), image


def test_prompts_csv_relative_and_absolute_paths_repeated_dims(tmp_path, expected):
    exp = table(expected)
    lists, cwd = _folders(tmp_path)
    plan = [("imgs/sunset.png", CAFE), ("imgs/wide.webp", FISHER), (str(IMAGES / "gray.png"), CUBES),
            ("imgs/palette.gif", FOX)]
    with open(lists / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "seed"])  # extra columns are ignored
        for image, prompt in plan:
            w.writerow([image, prompt, 7])
    proc = run_cli("score", "--prompts", str(lists / "p.csv"), "--dim", "alignment", "--dim", "aesthetics",
                   "--jsonl", "-w", str(WEIGHTS), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["image"], r["prompt"]) for r in rows] == plan
    for r, (image, prompt) in zip(rows, plan):
        name = image.replace("\\", "/").rsplit("/", 1)[-1]
        assert list(r["scores"]) == ["alignment", "aesthetics"]  # the order asked for
        for dim in ("alignment", "aesthetics"):
            assert r["scores"][dim] == pytest.approx(exp[(name, prompt, dim)], abs=TOL), (image, dim)


# --------------------------------------------------------------------------- sidecars


def test_sidecar_captions_and_one_truncation_warning(tmp_path, expected):
    exp = table(expected)
    d = tmp_path / "set"
    d.mkdir()
    shutil.copy(IMAGES / "sunset.png", d / "a.png")
    (d / "a.txt").write_text(FOX + "\n", encoding="utf-8")
    shutil.copy(IMAGES / "portrait.jpg", d / "b.jpg")
    (d / "b.caption").write_text(CUBES, encoding="utf-8")
    # Three long captions (well over 77 tokens) that differ only past the cut: truncation makes
    # them one prompt, so the two copies of one image must score the same.
    words = " ".join(f"word{i}" for i in range(120))
    for stem, tail, ext in (("c", "ending one", ".txt"), ("d", "a different ending", ".caption"),
                            ("e", "yet another", ".txt")):
        shutil.copy(IMAGES / "gray.png", d / f"{stem}.png")
        (d / f"{stem}{ext}").write_text(f"{FOX} {words} {tail}", encoding="utf-8")
    shutil.copy(IMAGES / "crop.png", d / "f.png")  # no caption beside it
    proc = run_cli("score", "set", "--prompt-from", "sidecar", "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    rows = rows_of(proc)
    assert set(rows) == {f"set/{s}" for s in ("a.png", "b.jpg", "c.png", "d.png", "e.png", "f.png")}
    assert rows["set/a.png"]["prompt"] == FOX
    assert rows["set/a.png"]["scores"]["overall"] == pytest.approx(exp[("sunset.png", FOX, "overall")], abs=TOL)
    assert rows["set/b.jpg"]["prompt"] == CUBES
    assert rows["set/b.jpg"]["scores"]["overall"] == pytest.approx(exp[("portrait.jpg", CUBES, "overall")], abs=TOL)
    assert rows["set/c.png"]["scores"]["overall"] == pytest.approx(rows["set/d.png"]["scores"]["overall"], abs=1e-5)
    assert rows["set/c.png"]["scores"]["overall"] == pytest.approx(rows["set/e.png"]["scores"]["overall"], abs=1e-5)
    assert set(rows["set/f.png"]) == {"image", "error"}
    err = messages(proc.stderr)
    assert len([line for line in err if "77" in line]) == 1, proc.stderr
    assert len([line for line in err if "f.png" in line]) == 1, proc.stderr
    assert len(err) == 2, proc.stderr


# --------------------------------------------------------------------------- generator metadata


def _info(**chunks: str) -> PngInfo:
    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    return info


def _png_with_text(src, dst, **chunks: str) -> None:
    Image.open(src).save(dst, pnginfo=_info(**chunks))


def _comfy_graph(positive: str, negative: str) -> str:
    """An API-format ComfyUI graph; the negative encoder has the lower node id on purpose."""
    return json.dumps({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["2", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    })


def _user_comment(text: str, byteorder: str = "utf-16-be") -> bytes:
    return b"UNICODE\0" + text.encode(byteorder)


def test_metadata_prompts_from_a1111_comfy_and_exif(tmp_path, expected):
    exp = table(expected)
    d = tmp_path / "gen"
    d.mkdir()
    # A1111, multi-line prompt: CLIP's tokenizer folds the newline into a space, so the score
    # must be the one-line FOX prompt's.
    head, tail = FOX.split(", ")
    multi = f"{head},\n{tail}"
    _png_with_text(IMAGES / "sunset.png", d / "a1111.png",
                   parameters=f"{multi}\nNegative prompt: ugly, blurry,\nlow quality\n{A1111_SETTINGS}")
    # A1111 without a negative prompt; a lossless PNG of the decoded fixture JPEG.
    Image.open(IMAGES / "portrait.jpg").convert("RGB").save(
        d / "noneg.png", pnginfo=_info(parameters=f"{CUBES}\n{A1111_SETTINGS}"))
    _png_with_text(IMAGES / "gray.png", d / "comfy.png", prompt=_comfy_graph(CAFE, "blurry, watermark"))
    # A1111 JPEG: the parameters live in EXIF UserComment as UTF-16.
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = _user_comment(f"{FISHER}\nNegative prompt: cartoon\n{A1111_SETTINGS}")
    Image.open(IMAGES / "portrait.jpg").convert("RGB").save(d / "exif.jpg", exif=exif, quality=100, subsampling=0)
    shutil.copy(IMAGES / "crop.png", d / "plain.png")

    args = ["gen/a1111.png", "gen/noneg.png", "gen/plain.png", "gen/comfy.png", "gen/exif.jpg"]
    proc = run_cli("score", *args, "--prompt-from", "metadata", "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    rows = rows_of(proc)
    assert list(rows) == args

    assert rows["gen/a1111.png"]["prompt"] == multi
    assert rows["gen/a1111.png"]["scores"]["overall"] == pytest.approx(exp[("sunset.png", FOX, "overall")], abs=TOL)
    assert rows["gen/noneg.png"]["prompt"] == CUBES
    assert rows["gen/noneg.png"]["scores"]["overall"] == pytest.approx(
        exp[("portrait.jpg", CUBES, "overall")], abs=TOL)
    assert rows["gen/comfy.png"]["prompt"] == CAFE
    assert rows["gen/comfy.png"]["scores"]["overall"] == pytest.approx(exp[("gray.png", CAFE, "overall")], abs=TOL)
    assert rows["gen/exif.jpg"]["prompt"] == FISHER
    # Re-encoding at quality 100 moves the score by ~0.002; other prompts are 3+ away.
    assert rows["gen/exif.jpg"]["scores"]["overall"] == pytest.approx(
        exp[("portrait.jpg", FISHER, "overall")], abs=0.05)

    assert set(rows["gen/plain.png"]) == {"image", "error"}
    assert messages(proc.stderr) == [line for line in proc.stderr.splitlines() if "plain.png" in line]
    assert len(messages(proc.stderr)) == 1
    # The remedy names flags, once, from the CLI; the library's message names none.
    assert "--" not in rows["gen/plain.png"]["error"]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("mps: hint:")]) == 1


# --------------------------------------------------------------------------- in-process pieces


def test_a1111_prompt_is_everything_before_the_negative_line():
    assert a1111_prompt(f"line one\nline two\nNegative prompt: bad\n{A1111_SETTINGS}") == "line one\nline two"
    assert a1111_prompt(f"only positive\n{A1111_SETTINGS}") == "only positive"
    assert a1111_prompt(f"crlf prompt\r\nNegative prompt: x\r\n{A1111_SETTINGS}") == "crlf prompt"
    # A prompt that merely mentions the words is not cut there.
    assert a1111_prompt(f"sign saying Negative prompt: no\n{A1111_SETTINGS}") == "sign saying Negative prompt: no"
    assert a1111_prompt("just a prompt, no settings") == "just a prompt, no settings"


def test_comfy_prompt_follows_links_to_the_positive_text():
    assert comfy_prompt(_comfy_graph("the positive", "the negative")) == "the positive"
    # SDXL encoders and text fed from another node by link.
    graph = json.loads(_comfy_graph("unused", "neg"))
    graph["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": ["9", 0], "text_l": ["9", 0]}}
    graph["9"] = {"class_type": "PrimitiveNode", "inputs": {"string": "linked text"}}
    assert comfy_prompt(json.dumps(graph)) == "linked text"
    assert comfy_prompt(json.dumps({"1": {"class_type": "VAEDecode", "inputs": {}}})) is None
    assert comfy_prompt("not json") is None
    assert comfy_prompt("[1, 2]") is None


def test_decode_user_comment_either_byte_order():
    text = f"{FISHER}\nNegative prompt: x"
    assert decode_user_comment(_user_comment(text, "utf-16-be")) == text
    assert decode_user_comment(_user_comment(text, "utf-16-le")) == text
    assert decode_user_comment(b"ASCII\0\0\0" + b"plain words") == "plain words"
    assert decode_user_comment(b"short") is None


def test_metadata_prompt_other_generators_and_errors(tmp_path):
    _png_with_text(IMAGES / "gray.png", tmp_path / "fooocus.png",
                   parameters=json.dumps({"prompt": "fooocus prompt", "negative_prompt": "bad"}))
    assert metadata_prompt(tmp_path / "fooocus.png") == "fooocus prompt"
    _png_with_text(IMAGES / "gray.png", tmp_path / "invoke.png",
                   invokeai_metadata=json.dumps({"positive_prompt": "invoke prompt", "negative_prompt": "n"}))
    assert metadata_prompt(tmp_path / "invoke.png") == "invoke prompt"
    with pytest.raises(PromptError, match="nothing.png"):
        metadata_prompt(tmp_path / "nothing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(PromptError, match="text.png"):
        metadata_prompt(tmp_path / "text.png")
    shutil.copy(IMAGES / "crop.png", tmp_path / "bare.png")
    with pytest.raises(PromptError, match="bare.png"):
        metadata_prompt(tmp_path / "bare.png")


def test_sidecar_prompt_prefers_txt_and_rejects_empty(tmp_path):
    img = tmp_path / "x.png"
    shutil.copy(IMAGES / "gray.png", img)
    with pytest.raises(PromptError, match="x.txt or x.caption"):
        sidecar_prompt(img)
    (tmp_path / "x.caption").write_text("from caption\n")
    assert sidecar_prompt(img) == "from caption"
    (tmp_path / "x.txt").write_text("\ufefffrom txt  \n")
    assert sidecar_prompt(img) == "from txt"
    (tmp_path / "x.txt").write_text("  \n")
    with pytest.raises(PromptError, match="empty"):
        sidecar_prompt(img)


def test_read_prompt_file_formats_and_failures(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "list.csv"
    f.write_text('\ufeffimage, prompt\n"a b.png","commas, and ""quotes"""\n/abs/c.png,third\n', encoding="utf-8")
    entries = read_prompt_file(f)
    assert [(e.image, e.prompt, e.error) for e in entries] == [
        ("a b.png", 'commas, and "quotes"', None), ("/abs/c.png", "third", None)]
    assert entries[0].path == tmp_path / "sub" / "a b.png"
    assert str(entries[1].path) == "/abs/c.png"

    t = tmp_path / "list.tsv"
    t.write_text("prompt\timage\nhello, world\tq.png\n")
    assert [(e.image, e.prompt) for e in read_prompt_file(t)] == [("q.png", "hello, world")]

    j = tmp_path / "list.jsonl"
    j.write_text('\n[1, 2]\n{"prompt": "no image"}\n{"image": "z.png", "prompt": 5}\n')
    errs = [e.error for e in read_prompt_file(j)]
    assert all(errs) and "list.jsonl:2" in errs[0] and "list.jsonl:3" in errs[1] and "list.jsonl:4" in errs[2]

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptError, match="empty.jsonl"):
        read_prompt_file(tmp_path / "empty.jsonl")
    with pytest.raises(PromptError, match="absent.csv"):
        read_prompt_file(tmp_path / "absent.csv")
    (tmp_path / "latin1.csv").write_bytes("image,prompt\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="UTF-8"):
        read_prompt_file(tmp_path / "latin1.csv")


def test_csv_prompt_spanning_lines_keeps_its_line_break(tmp_path):
    f = tmp_path / "multi.csv"
    f.write_text('image,prompt\na.png,"first line\nsecond line"\nb.png\nc.png,third\n', encoding="utf-8")
    entries = read_prompt_file(f)
    assert [(e.image, e.prompt) for e in entries] == [("a.png", "first line\nsecond line"), ("b.png", None),
                                                      ("c.png", "third")]
    # Error locations count physical lines, past the record that spans two.
    assert entries[1].error == f"{f}:4: missing 'prompt'"


def test_csv_that_the_csv_module_rejects_is_a_prompt_error(tmp_path):
    f = tmp_path / "huge.csv"
    f.write_text("image,prompt\na.png," + "x" * 200_000 + "\n", encoding="utf-8")  # over csv's field limit
    with pytest.raises(PromptError, match="huge.csv"):
        read_prompt_file(f)


def test_sidecar_caption_not_utf8_says_so_in_the_prompts_files_voice(tmp_path):
    """A Latin-1 caption is named with what to do, as a Latin-1 prompts file is, not as Python's codec error;
    the other images are still scored."""
    shutil.copy(IMAGES / "sunset.png", tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    shutil.copy(IMAGES / "gray.png", tmp_path / "b.png")
    (tmp_path / "b.txt").write_text(FOX, encoding="utf-8")
    proc = run_cli("score", "a.png", "b.png", "--prompt-from", "sidecar", "--jsonl", "-w", str(WEIGHTS),
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == ["mps: error: a.txt: not UTF-8 text; save the caption file as UTF-8"]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == ["a.png", "b.png"] and "scores" in rows[1], proc.stdout


def test_a_missing_image_of_a_prompts_file_in_another_folder_says_where_it_was_looked_for(tmp_path):
    """A prompts file's names resolve against its folder: 'v1/x.png: no such file' sent the user to ./v1."""
    (tmp_path / "set").mkdir()
    shutil.copy(IMAGES / "sunset.png", tmp_path / "set" / "a.png")
    lines = [{"image": "a.png", "prompt": FOX}, {"image": "gone.png", "prompt": FOX}]
    (tmp_path / "set" / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_cli("score", "--prompts", "set/p.jsonl", "--jsonl", "-w", str(WEIGHTS), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert messages(proc.stderr) == ["mps: error: gone.png: no such file (looked for set/gone.png)"]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == ["a.png", "gone.png"] and "scores" in rows[0]
