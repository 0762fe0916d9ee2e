"""Devices and dtypes: spellings, defaults, and the decision whether a dtype is native on this hardware."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import FIXTURE, IMAGES, WEIGHTS, run_cli
from typer.testing import CliRunner

from mps_cli import devices, load_scorer
from mps_cli.devices import (
    CpuProbe,
    Precision,
    check_device_spec,
    decide_native,
    dtype_name,
    flags_hint,
    parse_precision,
    resolve_device,
    resolve_precision,
)
from mps_cli.errors import DeviceError

CONFIG = FIXTURE / "config.json"
CPU = torch.device("cpu")
# Flags as /proc/cpuinfo lists them on the two kinds of development machine, and on this one.
INTEL_AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})


# --- spellings and defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", "cuda:-1"])
def test_unknown_devices_are_refused(spec):
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    assert repr(spec) in str(info.value)
    assert "--" not in str(info.value)  # the library names no CLI flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(spec):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(spec)


def test_load_scorer_refuses_a_bad_device_before_reading_weights(tmp_path):
    with pytest.raises(DeviceError):
        load_scorer(tmp_path / "not-even-there.safetensors", config=CONFIG, device="tpu")


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert check_device_spec(" CUDA:1 ") == "cuda:1"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")


def test_dtype_resolution():
    # A torch.device for CUDA can be built without a GPU: only the default is looked at.
    cuda = torch.device("cuda")
    assert resolve_precision("auto", CPU) == Precision("fp32", "fp32")
    assert resolve_precision("auto", cuda) == Precision("fp16", "fp32")
    assert resolve_precision("fp16", CPU).image_dtype == torch.float16
    assert resolve_precision("bf16", CPU) == Precision("bf16", "fp32")
    assert resolve_precision("float32", cuda).image_dtype == torch.float32
    assert resolve_precision("bfloat16/half", CPU) == Precision("bf16", "fp16")
    assert resolve_precision("auto/bf16", cuda) == Precision("fp16", "bf16")
    for bad in ("int8", "bf16/", "bf16/int8"):
        with pytest.raises(DeviceError, match="int8|nothing after"):
            parse_precision(bad)
    assert [dtype_name(t) for t in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_precision_names_and_per_tensor_dtypes():
    mixed, plain = Precision("bf16", "fp32"), Precision("bf16", "bf16")
    assert (mixed.label, plain.label, Precision("fp32", "fp32").label) == ("bf16/fp32", "bf16", "fp32")
    # Uniform layouts keep the prepared-file names they had; no '-' so no dtype's glob matches another's.
    assert (plain.key, mixed.key) == ("bfloat16", "bfloat16_text_float32")
    assert mixed.tensor_dtype("text.transformer.resblocks.0.attn.in_proj_weight") == torch.float32
    assert mixed.tensor_dtype("visual.proj") == torch.bfloat16
    assert mixed.tensor_dtype("cross.cross.0.to_q.weight") == torch.bfloat16


# --- is it native? ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, dtype, relative, native, basis", [
    # An Intel CPU with AMX: bf16 several times fp32's speed.
    (INTEL_AMX, "bf16", 4.5, True, "probe"),
    (INTEL_AMX, "fp16", 3.0, True, "probe"),
    # An AVX2-only CPU: the fallback path, about 200x slower.
    (AVX2_ONLY, "bf16", 0.005, False, "probe"),
    (AVX2_ONLY, "fp16", 0.005, False, "probe"),
    # This machine (Zen 4, AVX-512 BF16, no AVX-512 FP16): bf16 faster, fp16 a fallback.
    (ZEN4, "bf16", 1.7, True, "probe"),
    (ZEN4, "fp16", 0.03, False, "probe"),
    # A probe disturbed by a neighbour lands in between: the flags settle it.
    (INTEL_AMX, "bf16", 0.3, True, "probe and cpu flags"),
    (AVX2_ONLY, "bf16", 0.3, False, "probe and cpu flags"),
    (None, "bf16", 0.3, False, "probe and cpu flags"),
    # Not probed: the flags alone; no flags to read: unknown.
    (INTEL_AMX, "bf16", None, True, "cpu flags"),
    (AVX2_ONLY, "bf16", None, False, "cpu flags"),
    (ZEN4, "fp16", None, False, "cpu flags"),
    (None, "bf16", None, None, "cpu flags"),
    (AVX2_ONLY, "fp32", None, True, "cpu flags"),
])
def test_native_decision(flags, dtype, relative, native, basis):
    assert decide_native(dtype, flags_hint(dtype, flags), relative) == (native, basis)


def test_the_probe_is_quick_cached_and_single_threaded_afterwards_restored():
    threads = torch.get_num_threads()
    first = devices.probe_cpu()
    again = devices.probe_cpu()
    assert torch.get_num_threads() == threads
    assert set(first.gflops) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in first.gflops.values())
    assert again.gflops == first.gflops and again.seconds < 0.05  # cached for the process
    assert first.relative("fp32") == 1.0


def test_injected_probe_decides(monkeypatch):
    monkeypatch.setenv("MPS_TEST_CPU_PROBE", "bf16=0.005,fp16=4")
    assert devices.probe_cpu() == CpuProbe(gflops={"fp32": 1.0, "bf16": 0.005, "fp16": 4.0}, injected=True)
    slow = devices.dtype_support(CPU, "bf16")
    assert (slow.native, slow.relative_speed, slow.slowdown) == (False, 0.005, 200.0)
    assert devices.dtype_support(CPU, "fp16").native is True
    monkeypatch.setenv("MPS_TEST_CPU_PROBE", "bf16=fast")
    with pytest.raises(DeviceError, match="MPS_TEST_CPU_PROBE"):
        devices.probe_cpu()


def test_scorer_exposes_what_is_native(monkeypatch):
    monkeypatch.setenv("MPS_TEST_CPU_PROBE", "bf16=0.005,fp16=0.005")
    slow = load_scorer(WEIGHTS, device="cpu", dtype="bf16")
    assert [(s.dtype, s.native) for s in slow.slow_dtypes] == [("bf16", False)]
    assert slow.dtype_support["fp32"].native is True  # the text side


# --- mps info and the warning -------------------------------------------------------------------


def test_info_json_lists_native_dtypes_per_device(monkeypatch):
    from mps_cli.cli import app

    monkeypatch.setenv("MPS_TEST_CPU_PROBE", "bf16=0.005,fp16=0.004")
    res = CliRunner().invoke(app, ["info", "--json", "--probe"])
    assert res.exit_code == 0, res.output
    cpu = json.loads(res.stdout)["devices"][0]
    assert cpu["device"] == "cpu"
    assert cpu["dtypes"] == {
        "fp32": {"native": True, "basis": "probe", "relative_speed": 1.0},
        "bf16": {"native": False, "basis": "probe", "relative_speed": 0.005},
        "fp16": {"native": False, "basis": "probe", "relative_speed": 0.004},
    }
    assert cpu["probe"]["injected"] is True
    res = CliRunner().invoke(app, ["info", "--probe"])
    assert "bf16: NOT native (slow fallback), 0.01x fp32's matmul speed [probe]" in res.stdout


def test_info_without_probe_reads_the_flags():
    from mps_cli.cli import app

    res = CliRunner().invoke(app, ["info", "--json"])
    cpu = json.loads(res.stdout)["devices"][0]
    flags = devices.cpu_flags()
    for dt in ("bf16", "fp16"):
        assert cpu["dtypes"][dt] == {"native": flags_hint(dt, flags), "basis": "cpu flags"}


def test_explicit_slow_dtype_warns_once_and_goes_on(monkeypatch):
    import importlib

    from mps_cli.cli import app

    app_module = importlib.import_module("mps_cli.cli.app")  # the module; the package's ``app`` is the Typer app
    # The warning comes with loading: each run below starts, as a new process would, with no model loaded.
    scorers: dict = {}
    monkeypatch.setattr(app_module, "_SCORERS", scorers)
    image = str(IMAGES / "sunset.png")
    args = ["score", image, "--prompt", "a red fox", "--json", "-w", str(WEIGHTS), "--device", "cpu"]
    slow = run_cli(*args, "--dtype", "bf16", env={"MPS_TEST_CPU_PROBE": "bf16=0.005"})
    assert slow.returncode == 0, slow.stderr
    warnings = [line for line in slow.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "mps: warning: bf16 is not native on this CPU, about 200x slower than fp32 per core (measured); going on "
        "in bf16 as asked (--dtype fp32 is faster here; `mps info --probe` shows each dtype)"
    ]
    assert json.loads(slow.stdout)[0]["scores"]["overall"]
    # Native bf16, and the default fp32: no warning (in-process: the same code path, faster).
    for dtype, probe in (("bf16", "bf16=3"), ("auto", "bf16=0.005,fp16=0.005")):
        scorers.clear()
        fast = CliRunner().invoke(app, [*args, "--dtype", dtype], env={"MPS_TEST_CPU_PROBE": probe})
        assert fast.exit_code == 0 and "warning" not in fast.stderr, fast.stderr
        if dtype == "bf16":
            assert json.loads(fast.stdout) == json.loads(slow.stdout)


# --- the batch size from free GPU memory ---------------------------------------------------------
# CUDA cannot exist on this machine: torch.cuda.mem_get_info is replaced by the free/total bytes a GPU
# would report, which is all the rule reads. Nothing else of CUDA is touched.


@pytest.mark.parametrize(("free_gib", "per_image_mib", "batch"), [
    (130, 40, 256),  # an idle H200: the cap
    (10, 40, 128),  # half of 10 GiB holds 128 images of 40 MiB
    (5, 36, 64),  # 71 fit: rounded down to a multiple of 8
    (1, 40, 12),  # not even the default 32 fits: what fits
    (0.01, 40, 1),  # never 0
])
def test_cuda_batch_is_what_half_the_free_memory_holds(monkeypatch, free_gib, per_image_mib, batch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 141 * 2**30))
    cuda = torch.device("cuda")
    assert devices.default_batch_size(cuda, per_image_mib * 2**20) == batch
    assert devices.default_batch_size(cuda) == 32  # no estimate: the accelerator default
    assert devices.default_batch_size(CPU, per_image_mib * 2**20) == 4  # the CPU never asks


def test_the_activation_estimate_of_vit_h_fits_its_batch_on_an_h200(monkeypatch):
    from mps_cli.engine.scorer import activation_bytes
    from mps_cli.weights.config import builtin_config

    cfg = builtin_config()
    per_image = activation_bytes(cfg, Precision("fp16", "fp32"))
    # About twice the widest vision step (257 tokens x (6 x 1280 + 2 x 5120) fp16) plus the cross model's copies.
    assert 30 * 2**20 < per_image < 60 * 2**20
    assert activation_bytes(cfg, Precision("fp32", "fp32")) == 2 * per_image
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 * 2**30, 141 * 2**30))
    assert devices.default_batch_size(torch.device("cuda"), per_image) == devices.GPU_MAX_BATCH


def test_decode_threads_per_device():
    assert devices.decode_workers(CPU) == min(4, os.cpu_count())
    assert devices.decode_workers(torch.device("cuda")) == min(32, os.cpu_count())
