"""Hostile files and damaged caches: one clean line, bounded memory, never a wrong number.

Every input here is crafted as a hostile reviewer would: safetensors headers and configs with
absurd numbers, pickles that loop, nest or share nodes exponentially, zip bombs, expanded views,
damaged or substituted prepared copies, weights rewritten behind a cache's back, FIFOs, locked
databases, huge prompts and image metadata. The CLI runs in-process (Typer's runner) except
where the process itself is measured (peak memory of the bombs, in one subprocess).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
import time
import types
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, IMAGES, WEIGHTS, forked_python
from typer.testing import CliRunner

from mps_cli import load_scorer
from mps_cli.cli import app
from mps_cli.errors import CheckpointError

CONFIG = FIXTURE / "config.json"
PROMPT = "three blue cubes stacked on top of a wooden table"
IMAGE = IMAGES / "sunset.png"
GiB = 1 << 30


def run_cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result, code: int, *needles: str) -> str:
    """The run failed with ``code`` and exactly one ``mps: error:`` line naming ``needles``; no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mps: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------- building the inputs

def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"\0" * 64) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


class _Module:
    """A torch-module-like object that pickles under a ``trainer.`` name (becomes an inert stand-in)."""

    def __init__(self, children=None):
        self._parameters = {}
        self._buffers = {}
        self._modules = dict(children or {})


def _module_pickle(path: Path, root, before=()) -> Path:
    """Pickle ``{"all": before, "module": root}``: listing nodes innermost-first keeps the pickler shallow."""
    fake = types.ModuleType("trainer.hostile")
    _Module.__module__ = "trainer.hostile"
    fake._Module = _Module
    added = {"trainer": types.ModuleType("trainer"), "trainer.hostile": fake}
    sys.modules.update(added)
    try:
        path.write_bytes(pickle.dumps({"all": list(before), "module": root}, protocol=2))
    finally:
        _Module.__module__ = __name__
        for name in added:
            del sys.modules[name]
    return path


def _zip_with_member(path: Path, member: str, write, deflate: bool = False) -> Path:
    """A real torch archive of one small tensor whose ``member`` is replaced by what ``write(fh)`` streams."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    # Opened by name, the member takes the archive's method and level: a GiB of zeros deflates in 1 s
    # at level 1 (2.6 s at the default level a ZipInfo would get).
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=1) as out:
        for info in src.infolist():
            if info.filename.endswith(member):
                with out.open(info.filename, "w", force_zip64=deflate) as fh:
                    write(fh)
            else:
                out.writestr(info, src.read(info))
    return path


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Every hostile file, built once."""
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("hostile")
    real = load_file(WEIGHTS)
    out: dict[str, Path] = {}
    q = "cross_model.layers.0.0.fn.to_q.weight"

    # safetensors headers
    out["deep"] = _raw_safetensors(d / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    for name, bad in {
        "float_shape": {**entry, "shape": [2.0, 2]},
        "negative_shape": {**entry, "shape": [-2, -2]},
        "float_offsets": {**entry, "data_offsets": [0.0, 16.0]},
        "bad_dtype": {**entry, "dtype": "F128"},
        "not_a_dict": [1, 2, 3],
        "wrong_length": {**entry, "data_offsets": [0, 12]},
        "huge_count": {**entry, "shape": [2**62, 2**62], "data_offsets": [0, 16]},
    }.items():
        out[name] = _raw_safetensors(d / f"{name}.safetensors", {"model.logit_scale": bad})
    out["overlap"] = _raw_safetensors(d / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    })
    out["huge_header"] = d / "huge_header.safetensors"
    out["huge_header"].write_bytes((2**63).to_bytes(8, "little") + b"{}")
    numel = real[q].numel()
    out["flat_q"] = _save(d / "flat_q.safetensors", {**real, q: real[q].reshape(numel)})
    out["cube_q"] = _save(d / "cube_q.safetensors", {**real, q: real[q].reshape(1, *real[q].shape)})

    # configs
    base = json.loads(CONFIG.read_text())
    for name, change in {"heads0": {"num_attention_heads": 0}, "heads_neg": {"num_attention_heads": -4},
                         "width_float": {"hidden_size": 64.5}, "layers_huge": {"num_hidden_layers": 10**9},
                         "patch_str": {"patch_size": "big"}}.items():
        cfg = json.loads(json.dumps(base))
        cfg["vision_config"].update(change)
        out[f"config_{name}"] = d / f"config_{name}.json"
        out[f"config_{name}"].write_text(json.dumps(cfg))

    # pickles
    loop: dict = {}
    loop["state_dict"] = loop
    out["self_dict"] = d / "self_dict.pth"
    out["self_dict"].write_bytes(pickle.dumps(loop, protocol=2))
    chain = [_Module()]
    for _ in range(5000):
        chain.append(_Module({"inner": chain[-1]}))
    out["chain"] = _module_pickle(d / "chain.pth", chain[-1], chain[:-1])
    dag = [_Module()]
    for _ in range(40):
        dag.append(_Module({"a": dag[-1], "b": dag[-1]}))
    out["dag"] = _module_pickle(d / "dag.pth", dag[-1], dag[:-1])
    cyclic = _Module()
    cyclic._modules["me"] = cyclic
    out["cycle"] = _module_pickle(d / "cycle.pth", cyclic)
    out["dynamo"] = d / "dynamo.pth"
    out["dynamo"].write_bytes(b"\x80\x02ctorch\n_dynamo\n)\x81.")

    # zip bombs and views
    def zeros(fh, total=GiB, chunk=bytes(64 << 20)):
        for _ in range(total // len(chunk)):
            fh.write(chunk)

    out["inflate_bomb"] = _zip_with_member(d / "inflate_bomb.pth", "data/0", zeros, deflate=True)
    out["claims_bomb"] = _claims_4gib(d / "claims_bomb.pth")
    out["expanded"] = d / "expanded.pth"
    torch.save({"w": torch.zeros(1).expand(2**33)}, out["expanded"])
    return out


def _claims_4gib(path: Path) -> Path:
    """A tiny torch archive whose directory says its storage member holds about 4 GiB, stored."""
    _zip_with_member(path, "data/0", lambda fh: fh.write(b"\0" * 16))
    raw = bytearray(path.read_bytes())
    # Patch the central directory entry of data/0: compressed and uncompressed sizes.
    at = 0
    while (at := raw.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46: at + 46 + name_len].endswith(b"data/0"):
            extra_len = struct.unpack_from("<H", raw, at + 30)[0]
            if extra_len:  # zip64 sizes live in the extra field
                extra = at + 46 + name_len
                struct.pack_into("<QQ", raw, extra + 4, 0xFFFF_FFF0, 0xFFFF_FFF0)
            else:
                struct.pack_into("<II", raw, at + 20, 0xFFFF_FFF0, 0xFFFF_FFF0)
        at += 4
    path.write_bytes(bytes(raw))
    return path


# ------------------------------------------------------------------------- safetensors headers

@pytest.mark.parametrize("name, needle", [
    ("deep", "nested"), ("float_shape", "shape"), ("negative_shape", "shape"), ("float_offsets", "data_offsets"),
    ("bad_dtype", "dtype"), ("not_a_dict", "not an object"), ("wrong_length", "bytes"), ("huge_count", "bytes"),
    ("overlap", "overlaps"), ("huge_header", "not a safetensors file"),
    ("flat_q", "not a matrix"), ("cube_q", "not a matrix"),
])
def test_hostile_header_is_one_line_exit_3_and_no_output(inputs, tmp_path, name, needle):
    dst = tmp_path / "out.safetensors"
    line = one_line_error(run_cli("convert", inputs[name], dst), 3, str(inputs[name]), needle)
    assert not dst.exists() and not list(tmp_path.glob(".*"))
    if name not in ("deep", "huge_header", "overlap"):
        key = "cross_model.layers.0.0.fn.to_q.weight" if name.endswith("_q") else "model.logit_scale"
        assert key in line  # the entry is named


def test_hostile_header_when_scoring_too(inputs):
    one_line_error(run_cli("score", IMAGE, "--prompt", PROMPT, "--weights", inputs["float_offsets"]), 3,
                   "model.logit_scale")


# ------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name, field", [
    ("heads0", "num_attention_heads"), ("heads_neg", "num_attention_heads"), ("width_float", "hidden_size"),
    ("layers_huge", "num_hidden_layers"), ("patch_str", "patch_size"),
])
def test_config_numbers_are_checked_by_field(inputs, name, field):
    one_line_error(run_cli("score", IMAGE, "--prompt", PROMPT, "--weights", WEIGHTS, "--config",
                           inputs[f"config_{name}"]), 3, f"vision_config.{field}")


# ------------------------------------------------------------------------- pickles

@pytest.mark.parametrize("name, needle", [
    ("self_dict", "contains itself"), ("chain", "deep"), ("dag", "entries"), ("cycle", "loops back"),
    ("dynamo", "torch._dynamo"), ("inflate_bomb", "zip bomb"), ("claims_bomb", "more than the file holds"),
    ("expanded", "stride 0"),
])
def test_hostile_pickle_is_refused_in_one_line_without_output(inputs, tmp_path, name, needle):
    dst = tmp_path / "out.safetensors"
    started = time.monotonic()
    one_line_error(run_cli("convert", inputs[name], dst), 3, needle)
    assert time.monotonic() - started < 30  # the 2^40 DAG is not walked
    assert not dst.exists() and not list(tmp_path.glob(".*"))


def test_bombs_stay_small_in_a_real_process(inputs):
    """Peak RSS of one process reading every bomb (the kernel's account), and the refused global imports nothing.

    The process is a fork of conftest's fork server (torch imported, torch._dynamo not): its high-water mark
    (VmHWM, per address space) starts at the server's ~350 MB, as a fresh interpreter's would after
    ``import torch``; ``ru_maxrss`` would count the pytest worker too.
    """
    names = ["dynamo", "inflate_bomb", "claims_bomb", "expanded", "dag", "chain"]
    script = (
        "import json, resource, sys\n"
        "from mps_cli.weights.pickles import read_checkpoint\n"
        "from mps_cli.errors import CheckpointError\n"
        "out = {}\n"
        "for name, path in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        read_checkpoint(path); out[name] = 'read'\n"
        "    except CheckpointError as exc:\n"
        "        out[name] = str(exc)\n"
        "    if name == 'dynamo': out['dynamo_imported'] = 'torch._dynamo' in sys.modules\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "out['peak_kib'] = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([*forked_python(), "-c", script, json.dumps({n: str(inputs[n]) for n in names})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert all(doc[n] != "read" for n in names), doc
    assert doc["dynamo_imported"] is False
    assert doc["peak_kib"] * 1024 < 1.5e9, doc["peak_kib"]


# ------------------------------------------------------------------------- the prepared copy

@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MPS_CACHE_DIR", str(folder))
    monkeypatch.delenv("MPS_PREPARED_WEIGHTS", raising=False)
    return folder / "prepared"


def _fp16(path: Path, scale_shift: float = 0.0) -> Path:
    from safetensors.torch import load_file

    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "config.json").write_text(CONFIG.read_text())
    tensors = {k: v.half() for k, v in load_file(WEIGHTS).items()}
    tensors["model.logit_scale"] = tensors["model.logit_scale"] + scale_shift
    return _save(path, tensors)


def _scores(weights: Path) -> list[float]:
    scorer = load_scorer(weights, device="cpu", dtype="bf16")
    return [r.scores["overall"] for r in scorer.score(sorted(IMAGES.glob("*.png"))[:2], PROMPT)]


def _only(cache: Path) -> Path:
    [path] = sorted(cache.glob("*.safetensors"))
    return path


def _rewrite_keeping_mtime(path: Path, offset: int, data: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _data_offset(path: Path, key: str) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


@pytest.mark.parametrize("damage", ["flipped_byte", "swapped_offsets", "huge_header", "fifo", "symlink_elsewhere"])
def test_damaged_or_substituted_copy_is_detected_and_rebuilt(cache, tmp_path, damage):
    weights = _fp16(tmp_path / "a" / "w.safetensors")
    right = _scores(weights)
    written = _only(cache)
    if damage == "flipped_byte":
        at = _data_offset(written, "logit_scale")
        _rewrite_keeping_mtime(written, at + 3, bytes([written.read_bytes()[at + 3] ^ 0x40]))
    elif damage == "swapped_offsets":
        raw = written.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        names = [k for k in header if k.startswith("visual.transformer.resblocks.0.ln_")][:2]
        a, b = (header[k]["data_offsets"] for k in names)
        header[names[0]]["data_offsets"], header[names[1]]["data_offsets"] = b, a
        text = json.dumps(header, separators=(",", ":")).encode()
        written.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])
    elif damage == "huge_header":
        written.write_bytes((2**63).to_bytes(8, "little") + b"\0" * 64)
    elif damage == "fifo":
        written.unlink()
        os.mkfifo(written)
    else:  # another checkpoint's copy put in its place
        other = _fp16(tmp_path / "b" / "w.safetensors", scale_shift=1.0)
        wrong = _scores(other)
        theirs = next(p for p in cache.glob("*.safetensors") if p != written)
        written.unlink()
        written.symlink_to(theirs)
        assert wrong != right
    assert _scores(weights) == right
    assert written.is_file() and not written.is_symlink()


def test_weights_rewritten_with_same_size_and_mtime_are_never_served_from_a_cache(cache, tmp_path):
    weights = _fp16(tmp_path / "w.safetensors")
    before_scorer = load_scorer(weights, device="cpu", dtype="bf16")
    before = [r.scores["overall"] for r in before_scorer.score([IMAGE], PROMPT)]
    at = _data_offset(weights, "model.logit_scale")
    old = torch.frombuffer(bytearray(weights.read_bytes()[at:at + 2]), dtype=torch.float16)
    _rewrite_keeping_mtime(weights, at, (old + 1).numpy().tobytes())
    after_scorer = load_scorer(weights, device="cpu", dtype="bf16")
    after = [r.scores["overall"] for r in after_scorer.score([IMAGE], PROMPT)]
    assert after[0] == pytest.approx(before[0] * 2.718281828, rel=2e-2)
    # the eval score cache is keyed on the same strong identity
    assert after_scorer.identity != before_scorer.identity and after_scorer.identity.startswith("sha256:")
    assert len(list(cache.glob("*.safetensors"))) == 1  # the stale copy is gone


def test_stale_temp_file_of_a_dead_writer_is_removed_at_once(cache):
    from mps_cli.files import host_tag as _host
    from mps_cli.weights.prepared import summary

    cache.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".x.safetensors.{_host()}.{dead.pid}.tmp"
    stale.write_bytes(b"\0" * 4096)
    alive = cache / f".y.safetensors.{_host()}.{os.getpid()}.tmp"
    alive.write_bytes(b"\0")
    summary()
    assert not stale.exists() and alive.exists()


def test_info_verify_finds_and_deletes_a_damaged_copy(cache, tmp_path):
    weights = _fp16(tmp_path / "w.safetensors")
    _scores(weights)
    written = _only(cache)
    ok = json.loads(run_cli("info", "--json", "--verify", "--all").stdout)["prepared"]["verified"]
    assert ok == [{"path": str(written), "ok": True, "error": None}]
    at = _data_offset(written, "logit_scale")
    with open(written, "r+b") as f:
        f.seek(at)
        f.write(b"\x7f\xc0\x00\x00")
    bad = json.loads(run_cli("info", "--json", "--verify", "--all").stdout)["prepared"]["verified"]
    assert bad[0]["ok"] is False and "seal" in bad[0]["error"] and not written.exists()


def test_info_verify_reads_only_the_current_weights_copies_unless_all(cache, tmp_path, monkeypatch):
    first, second = _fp16(tmp_path / "a" / "w.safetensors"), _fp16(tmp_path / "b" / "w.safetensors", 0.5)
    _scores(first)
    _scores(second)
    copies = sorted(cache.glob("*.safetensors"))
    assert len(copies) == 2
    monkeypatch.setenv("MPS_WEIGHTS", str(first))
    mine = json.loads(run_cli("info", "--json", "--verify").stdout)
    [only] = mine["prepared"]["verified"]
    from mps_cli.weights.sealed import metadata as sealed_metadata

    assert only["ok"] and sealed_metadata(Path(only["path"]))["source"] == os.path.realpath(first)
    every = json.loads(run_cli("info", "--json", "--verify", "--all").stdout)
    assert sorted(v["path"] for v in every["prepared"]["verified"]) == [str(p) for p in copies]
    one_line_error(run_cli("info", "--all"), 2, "--verify")


# ------------------------------------------------------------------------- weights that are not files, NaN

def test_fifo_as_weights_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    one_line_error(run_cli("score", IMAGE, "--prompt", PROMPT, "--weights", fifo), 3, "not a regular file")


def test_nan_scores_are_input_errors_never_printed(tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(WEIGHTS)
    tensors["model.logit_scale"] = torch.full_like(tensors["model.logit_scale"], float("nan"))
    weights = _save(tmp_path / "nan.safetensors", tensors)
    (tmp_path / "config.json").write_text(CONFIG.read_text())
    result = run_cli("score", IMAGE, "--prompt", PROMPT, "--weights", weights, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    doc = json.loads(result.stdout)  # valid JSON: no bare NaN
    assert "NaN" not in result.stdout and "non-finite" in doc[0]["error"]


# ------------------------------------------------------------------------- the score cache

def test_locked_score_cache_is_one_line(tmp_path, monkeypatch):
    import mps_cli.scorecache as scorecache
    from mps_cli.cli.app import describe

    db = tmp_path / "scores.sqlite"
    monkeypatch.setattr(scorecache, "BUSY_TIMEOUT_S", 0.2)
    store = scorecache.ScoreCache(db)
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than we wait
    try:
        with pytest.raises(scorecache.CacheError) as info:
            store.put(("0" * 64, PROMPT, "light", 0.3, "sha256:x", "fp32"), 1.0)
            store.commit()
    finally:
        holder.rollback()
        holder.close()
        store.close()
    assert "locked by another process" in str(info.value) and "--cache" not in str(info.value)
    assert "--cache" in describe(info.value) and "\n" not in describe(info.value)


def test_mps_cache_dir_moves_the_score_cache_too(tmp_path, monkeypatch):
    from mps_cli.scorecache import default_cache_path
    from mps_cli.weights.prepared import cache_dir

    monkeypatch.setenv("MPS_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "scores.sqlite" and cache_dir() == tmp_path / "c" / "prepared"


# ------------------------------------------------------------------------- prompts and images

def test_ten_megabyte_prompt_is_tokenised_in_moments():
    from mps_cli.engine.preprocess import Tokenizer

    started = time.monotonic()
    tokens = Tokenizer()("a red fox in the snow " * 500_000)
    assert time.monotonic() - started < 2 and tokens.truncated and len(tokens.ids) == 77


def test_png_whose_text_chunk_inflates_to_50_mb_is_that_images_error(tmp_path, scorer):
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good, "PNG")
    raw = good.getvalue()
    body = b"prompt\0\1\0\0\0" + zlib.compress(b"a" * (50 << 20), 9)  # iTXt, compressed
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"iTXt" + body))
    bomb = tmp_path / "itxt.png"
    bomb.write_bytes(raw[:33] + chunk + raw[33:])  # after IHDR
    assert bomb.stat().st_size < 300_000
    results = scorer.score([bomb, IMAGE], PROMPT)
    assert not results[0].ok and "itxt.png" in results[0].error and results[1].ok


def test_library_errors_name_no_cli_flag(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(WEIGHTS.read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_scorer(weights, device="cpu", dtype="fp32")  # no config beside it: ViT-H-14, which does not fit
    assert "--" not in str(info.value) and info.value.hint == "config"
