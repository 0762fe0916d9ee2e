"""Converting the authors' original checkpoints, and refusing pickles that would run code.

The original-format fixtures were written by the original classes (fp16, CUDA-tagged
storages); expected-fp16-weights.json holds the original implementation's scores for them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURE, IMAGES, ORIGINAL, WEIGHTS, run_cli

from mps_cli import CheckpointError, UnsafePickleError

WHOLE_MODULE = ORIGINAL / "MPS_tiny_checkpoint.pth"
STATE_DICT = ORIGINAL / "MPS_tiny_state_dict.pth"
CONFIG = FIXTURE / "config.json"


def safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header


PUBLISHED_KEYS = {k for k in safetensors_header(WEIGHTS) if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def fp16_expected() -> list[dict]:
    return json.loads((ORIGINAL / "expected-fp16-weights.json").read_text())["scores"]


def assert_scores_match(weights: Path, rows: list[dict]) -> None:
    from mps_cli import load_scorer

    scorer = load_scorer(weights, config=CONFIG, device="cpu", dtype="fp32")
    for prompt in sorted({r["prompt"] for r in rows}):
        mine = [r for r in rows if r["prompt"] == prompt]
        images = sorted({r["image"] for r in mine})
        dims = sorted({r["dim"] for r in mine})
        results = scorer.score([IMAGES / i for i in images], prompt, dims=dims)
        got = {(Path(res.image).name, d): res.scores[d] for res in results for d in dims}
        for r in mine:
            assert got[(r["image"], r["dim"])] == pytest.approx(r["score"], abs=1e-3), (r["image"], r["dim"])


@pytest.mark.parametrize("src, dtype", [(WHOLE_MODULE, None), (STATE_DICT, "fp32")],
                         ids=["whole-module", "state-dict"])
def test_convert_original_formats_to_the_published_layout(src, dtype, tmp_path, fp16_expected):
    dst = tmp_path / "converted.safetensors"
    result = run_cli("convert", str(src), str(dst), *(["--dtype", dtype] if dtype else []))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    header = safetensors_header(dst)
    assert set(header) == PUBLISHED_KEYS
    assert fields["tensors"] == str(len(PUBLISHED_KEYS))
    assert fields["size"].split()[0] == str(dst.stat().st_size)
    # The originals are fp16 (fixture README); --dtype fp32 casts every tensor.
    want = "F32" if dtype == "fp32" else "F16"
    assert {v["dtype"] for v in header.values()} == {want}
    assert fields["dtype"] == ("fp32" if dtype == "fp32" else "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.safetensors"]
    assert_scores_match(dst, fp16_expected)


def test_original_pth_scores_directly_as_weights(fp16_expected):
    # What `--weights MPS_tiny_checkpoint.pth` does: load_scorer reads the pickle itself.
    assert_scores_match(WHOLE_MODULE, fp16_expected)


def test_state_dict_pickle_reads_the_same_tensors_as_the_module_pickle():
    import torch

    from mps_cli.weights.pickles import read_checkpoint

    module = read_checkpoint(WHOLE_MODULE)
    plain = read_checkpoint(STATE_DICT)
    assert set(module) == set(plain) == PUBLISHED_KEYS
    for key in plain:
        assert module[key].device.type == "cpu" and module[key].dtype == torch.float16
        assert torch.equal(module[key], plain[key]), key


def test_prefixed_safetensors_is_stripped_and_cast(tmp_path):
    from safetensors.torch import load_file, save_file

    from mps_cli.weights.convert import convert_checkpoint

    original = load_file(WEIGHTS)
    src = tmp_path / "model.safetensors"
    save_file({f"mps.{k}": v for k, v in original.items()}, src)
    result = convert_checkpoint(src, tmp_path / "out.safetensors", dtype="bf16")
    header = safetensors_header(result.dst)
    assert set(header) == PUBLISHED_KEYS
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert (result.tensors, result.dtype, result.bytes) == (len(PUBLISHED_KEYS), "bf16", result.dst.stat().st_size)


class _Payload:
    """Unpickling this runs a shell command: the test checks that ours never does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    import torch

    payload = _Payload(f"touch {marker}")
    as_zip = tmp_path / "evil_zip.pth"
    torch.save({"model.logit_scale": torch.ones(()), "x": payload}, as_zip)
    plain = tmp_path / "evil_plain.pth"
    plain.write_bytes(pickle.dumps(payload, protocol=2))
    # The authors' format: a pickled trainer.models module with the payload among its attributes.
    names = ("trainer", "trainer.models", "trainer.models.clip_model")
    modules = {name: types.ModuleType(name) for name in names}
    module = modules["trainer.models.clip_model"]
    module.CLIPModel = type("CLIPModel", (), {"__module__": module.__name__})
    sys.modules.update(modules)
    try:
        fake = module.CLIPModel()
        fake.__dict__.update({"training": False, "_parameters": {}, "_buffers": {}, "_modules": {}, "hook": payload})
        data = pickle.dumps(fake, protocol=2)
    finally:
        for name in names:
            del sys.modules[name]
    assert b"trainer.models.clip_model" in data
    hidden = tmp_path / "evil_module.pth"
    with zipfile.ZipFile(hidden, "w") as out:
        out.writestr("evil_module/data.pkl", data)
        out.writestr("evil_module/byteorder", "little")
        out.writestr("evil_module/version", "3\n")
    return {"zip": as_zip, "plain": plain, "module": hidden}


def test_pickles_that_would_run_code_are_refused_and_never_run(tmp_path):
    from mps_cli.weights.pickles import read_checkpoint

    # Control: the same payload, unpickled the ordinary way, does run (in a throwaway process).
    control = tmp_path / "control"
    blob = pickle.dumps(_Payload(f"touch {control}"), protocol=2)
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=blob, check=True)
    assert control.exists()

    marker = tmp_path / "pwned"
    for kind, path in _evil_files(tmp_path, marker).items():
        with pytest.raises(UnsafePickleError, match=r"system"):
            read_checkpoint(path)
        assert not marker.exists(), kind


def test_unsafe_pickle_is_a_one_line_cli_error_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_files(tmp_path, marker)["zip"]
    dst = tmp_path / "out.safetensors"
    result = run_cli("convert", str(evil), str(dst))
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mps: error:")
    assert "system" in result.stderr and str(evil) in result.stderr
    assert not marker.exists()
    assert not dst.exists()


def test_other_globals_are_refused_by_name(tmp_path):
    from mps_cli.weights.pickles import read_checkpoint

    # GLOBAL builtins.eval, then REDUCE: the shape of an eval-based exploit, written by hand.
    evil = tmp_path / "eval.pkl"
    evil.write_bytes(b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00__import__()\x85R.")
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        read_checkpoint(evil)


def test_failed_conversions_leave_no_output_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mps_cli.weights.convert import convert_checkpoint

    not_mps = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, not_mps)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(WHOLE_MODULE.read_bytes()[: WHOLE_MODULE.stat().st_size // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for src in (not_mps, truncated):
        with pytest.raises(CheckpointError):
            convert_checkpoint(src, out_dir / "x.safetensors")
        assert list(out_dir.iterdir()) == [], src

    # An existing output survives a failed conversion untouched.
    keep = out_dir / "keep.safetensors"
    keep.write_bytes(b"previous")
    with pytest.raises(CheckpointError):
        convert_checkpoint(truncated, keep)
    assert keep.read_bytes() == b"previous" and list(out_dir.iterdir()) == [keep]


def test_formats_torch_reads_unsafely_or_not_at_all_get_their_reason(tmp_path):
    """torch's restricted loader reads every pickle here; what it cannot read gets one line saying why,
    and the stand-ins a module pickle needed do not stay in torch's process-wide safe list."""
    import torch

    from mps_cli.weights.pickles import read_checkpoint

    state = {"model.logit_scale": torch.ones(()), "w": torch.arange(4.0)}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["w"], state["w"])  # the pre-1.6 format, a state dict
    module = tmp_path / "module_legacy.pth"
    torch.save(torch.nn.Linear(2, 2), module, _use_new_zipfile_serialization=False)
    python_pickle = tmp_path / "state.pkl"
    python_pickle.write_bytes(pickle.dumps(state, protocol=4))  # pickle.dump's own protocol, not torch.save's (2)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(WHOLE_MODULE.read_bytes()[:100_000])
    # 101 model classes, each built once: torch's loader slows with every class it is allowed (written by hand).
    many = tmp_path / "many_classes.pkl"
    many.write_bytes(b"\x80\x02](" + b"".join(f"ctrainer.m{i}\nC{i}\n".encode() + b")\x81" for i in range(101)) + b"e.")
    for path, needle in ((module, "legacy (pre-1.6) torch file holding more than tensors"),
                         (python_pickle, "protocol-4 pickle"), (empty, "empty file"),
                         (truncated, "without its directory"), (many, "names 101 classes and functions")):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert needle in str(info.value) and "\n" not in str(info.value), (path.name, str(info.value))
    before = set(torch.serialization.get_safe_globals())  # torch or a library may have added some
    read_checkpoint(WHOLE_MODULE)
    assert set(torch.serialization.get_safe_globals()) == before
