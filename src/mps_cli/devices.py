"""Devices and dtypes: how they are spelled, their defaults, and what the hardware runs natively.

The one home for these facts: the CLI's option checks, ``load_scorer``, ``convert``, ``info``,
``eval`` and the benchmark all parse and name devices and dtypes here. Nothing at import time
needs torch (``mps --help`` must stay instant).

A dtype is *native* on a device when its matrix multiplies run on the hardware's own
arithmetic, not through a slow fallback. On a CPU that is decided from a sub-second matmul
probe (cached for the process) together with the CPU's feature flags: CPUs without AVX-512
BF16/AMX run bf16 and fp16 matmuls one to two hundred times slower than fp32, CPUs with them
run bf16 faster than fp32.
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field

from .constants import CPU_PROBE_ENV
from .errors import DeviceError

#: Canonical dtype names, in the order they are listed.
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
_SPELLINGS = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Bytes per element.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: What ``auto`` means: fp32 on CPU, fp16 on accelerators (as the original ran).
AUTO_DTYPE = {"cpu": "fp32", "accelerator": "fp16"}
#: The text side (prompt and condition features, the condition mask) runs in fp32 unless the
#: dtype spelling names another for it (``IMAGE/TEXT``): a reduced-precision mask flips tokens.
TEXT_DTYPE = "fp32"
DTYPE_CHOICES = "auto, fp32, fp16 or bf16"
DTYPE_SYNTAX = "auto, fp32, fp16 or bf16, or two of them as IMAGE/TEXT (e.g. bf16/fp32)"

DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
#: Images per forward pass unless asked otherwise (on CUDA, the floor of the free-memory rule).
DEFAULT_BATCH = {"cpu": 4, "accelerator": 32}
#: On CUDA without --batch-size: as many images as half the free memory holds, at most this many
#: (beyond it a batch only adds latency; bench.py's batch rows say where the throughput stops growing).
GPU_MAX_BATCH = 256
GPU_MEMORY_SHARE = 0.5
BATCH_DEFAULT_TEXT = (f"{DEFAULT_BATCH['cpu']} on CPU; on CUDA what half the free memory holds, "
                      f"{DEFAULT_BATCH['accelerator']} to {GPU_MAX_BATCH}")
#: Threads that decode images beside the model: on CPU the model needs the cores; a GPU leaves them to decoding.
DECODE_WORKERS = {"cpu": 4, "accelerator": 32}

#: How images become model input. exact: PIL's decode and two-pass bicubic, as the original (the reference).
#: fast: on CUDA, JPEGs decoded in batches on the GPU (nvJPEG, through torchvision) and resized there in
#: torch ("tensor"); elsewhere JPEGs decoded at a reduced DCT scale by PIL's draft ("draft"). Other
#: formats, and JPEGs the fast path cannot take, always go the exact way, one image at a time.
DECODE_CHOICES = "auto, exact, fast, draft or tensor"
DECODE_PATHS: tuple[str, ...] = ("exact", "draft", "tensor")
#: What ``auto`` means per device type (any other: exact). On CUDA, fast: on the fixture's JPEG versions
#: the tensor path moves fp32 scores by at most 0.005 (1260 of 1260 pairs in order; bench_decode.py, the
#: same resize code on CPU), far under the fp16 drift already accepted there (0.090). Elsewhere, exact:
#: the draft path moves them by up to 0.30 (1253 of 1260 pairs in order, about bf16's drift): opt-in.
AUTO_DECODE = {"cuda": "fast"}
#: What ``fast`` means per device type (any other: draft).
FAST_DECODE = {"cuda": "tensor"}
#: torch.compile behind a flag. on: the image side (vision tower, cross model) through torch.compile's
#: default mode; graphs: also CUDA graphs (mode reduce-overhead), CUDA only.
COMPILE_MODES: tuple[str, ...] = ("off", "on", "graphs")
COMPILE_CHOICES = "off, on or graphs"

# A probed dtype at under this share of fp32's matmul rate runs a fallback path (measured:
# 0.005 on AVX2-only CPUs); at or over FAST_SHARE it runs natively (AMX: 3-6, AVX-512 BF16: 2-3).
# In between, a noisy probe is settled by the CPU's flags.
SLOW_SHARE = 0.2
FAST_SHARE = 0.5
# Probe: square matmuls of this size, best of PROBE_REPS; a dtype whose first multiply takes
# longer than PROBE_SLOW_S is not timed again (a fallback path is slow enough to show at once).
PROBE_SIZE = 256
PROBE_REPS = 5
PROBE_SLOW_S = 0.02


# --------------------------------------------------------------------------- spellings

def parse_dtype(spec: str) -> str:
    """The canonical name (fp32, bf16, fp16, or auto) of a dtype spelling; DeviceError if unknown."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return s
    if s not in _SPELLINGS:
        raise DeviceError(f"unknown dtype {spec!r}: expected {DTYPE_CHOICES}", hint="dtype")
    return _SPELLINGS[s]


def parse_precision(spec: str) -> tuple[str, str]:
    """``IMAGE`` or ``IMAGE/TEXT`` as two canonical names; TEXT is ``auto`` when not given."""
    image, sep, text = (spec or "auto").partition("/")
    if sep and not text.strip():
        raise DeviceError(f"dtype {spec!r}: nothing after '/': expected {DTYPE_SYNTAX}", hint="dtype")
    return parse_dtype(image), parse_dtype(text) if sep else "auto"


def check_device_spec(spec: str) -> str:
    """A device spelling checked for form only (no torch): auto, cpu, cuda, cuda:N or mps, lower-cased."""
    s = (spec or "auto").strip().lower()
    base, sep, index = s.partition(":")
    if base not in DEVICE_KINDS or (sep and (base != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {spec!r}: expected {DEVICE_CHOICES}", hint="device")
    return s


def torch_dtype(name: str):
    """The torch dtype of a canonical (or any accepted) dtype name."""
    import torch

    return getattr(torch, _TORCH_NAMES[parse_dtype(name)])


def dtype_name(dtype) -> str:
    """The canonical name of a torch dtype (``torch.bfloat16`` -> ``bf16``)."""
    plain = str(dtype).removeprefix("torch.")
    for name, torch_name in _TORCH_NAMES.items():
        if torch_name == plain:
            return name
    raise DeviceError(f"unsupported dtype {plain}", hint="dtype")


def _kind(device) -> str:
    return "cpu" if device.type == "cpu" else "accelerator"


def default_batch_size(device, per_image_bytes: int | None = None) -> int:
    """Images per forward pass when not asked: small on CPU (cache-sized), larger on accelerators.

    On CUDA, given what one image costs in activations (``per_image_bytes``), as many images as
    :data:`GPU_MEMORY_SHARE` of the device's free memory holds, a multiple of 8 between the
    accelerator default and :data:`GPU_MAX_BATCH` (less only when even that default does not fit).
    """
    base = DEFAULT_BATCH[_kind(device)]
    if device.type != "cuda" or not per_image_bytes:
        return base
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    fits = int(free * GPU_MEMORY_SHARE) // int(per_image_bytes)
    if fits < base:
        return max(1, fits)
    return min(GPU_MAX_BATCH, fits // 8 * 8)


def decode_workers(device) -> int:
    """Threads that decode images beside the model on ``device`` (never more than the CPUs)."""
    return max(1, min(DECODE_WORKERS[_kind(device)], os.cpu_count() or 1))


def check_decode_spec(spec: str) -> str:
    """A decode spelling (auto, exact, fast, draft, tensor), lower-cased; DeviceError if unknown."""
    s = (spec or "auto").strip().lower()
    if s not in ("auto", "fast", *DECODE_PATHS):
        raise DeviceError(f"unknown decode {spec!r}: expected {DECODE_CHOICES}", hint="decode")
    return s


def resolve_decode(spec: str, device) -> str:
    """The decode path (exact, draft or tensor) that ``spec`` means on ``device``.

    ``auto`` follows :data:`AUTO_DECODE`, ``fast`` :data:`FAST_DECODE`; ``draft`` and ``tensor``
    name a fast path outright (``tensor`` runs on any device, the CPU included). Whether the
    tensor path's library (torchvision) is installed is the scorer's concern, not this one's.
    """
    s = check_decode_spec(spec)
    if s == "auto":
        s = AUTO_DECODE.get(device.type, "exact")
    if s == "fast":
        s = FAST_DECODE.get(device.type, "draft")
    return s


def check_compile_spec(spec: str) -> str:
    """A compile spelling (off, on, graphs), lower-cased; DeviceError if unknown."""
    s = (spec or "off").strip().lower()
    if s not in COMPILE_MODES:
        raise DeviceError(f"unknown compile mode {spec!r}: expected {COMPILE_CHOICES}", hint="compile-mode")
    return s


def resolve_device(spec: str = "auto"):
    """``auto`` (CUDA, then Apple mps, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device."""
    import torch

    s = check_device_spec(spec)
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(s)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__})",
                              hint="device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {spec!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})",
                              hint="device-index")
    elif device.type == "mps" and not _mps_available():
        raise DeviceError(f"device {spec!r}: Apple MPS is not available here", hint="device")
    return device


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


@dataclass(frozen=True)
class Precision:
    """The dtypes a scorer computes in: the image side (vision tower, cross model) and the text side
    (text tower: prompt and condition features, hence the condition mask).
    """

    image: str
    text: str

    @property
    def label(self) -> str:
        """``bf16/fp32`` when the sides differ, else the one name (``fp32``)."""
        return self.image if self.image == self.text else f"{self.image}/{self.text}"

    @property
    def key(self) -> str:
        """A file-name-safe identity of the weights' layout (torch names, no ``-``): ``bfloat16_text_float32``."""
        image, text = _TORCH_NAMES[self.image], _TORCH_NAMES[self.text]
        return image if image == text else f"{image}_text_{text}"

    @property
    def reduced(self) -> bool:
        """Whether the image side (where the time goes) runs in 16 bits."""
        return self.image != "fp32"

    @property
    def image_dtype(self):
        """The image side's torch dtype."""
        return torch_dtype(self.image)

    @property
    def text_dtype(self):
        """The text side's torch dtype."""
        return torch_dtype(self.text)

    def tensor_dtype(self, name: str):
        """The torch dtype of the model tensor ``name``: the text tower's ``text.*`` on the text side."""
        return self.text_dtype if name.startswith("text.") else self.image_dtype

    def weights_bytes(self, text_elements: int, other_elements: int) -> int:
        """Bytes of weights with ``text_elements`` in the text tower and ``other_elements`` elsewhere."""
        return text_elements * DTYPE_BYTES[self.text] + other_elements * DTYPE_BYTES[self.image]


def resolve_precision(spec: str, device) -> Precision:
    """``IMAGE[/TEXT]`` on ``device``: IMAGE ``auto`` is fp32 on CPU, fp16 elsewhere; TEXT ``auto`` is fp32."""
    image, text = parse_precision(spec)
    if image == "auto":
        image = AUTO_DTYPE[_kind(device)]
    return Precision(image=image, text=TEXT_DTYPE if text == "auto" else text)


# --------------------------------------------------------------------------- what is native

@dataclass(frozen=True)
class DtypeSupport:
    """Whether ``dtype`` runs natively on ``device``, and how that was decided.

    ``native`` is None when it cannot be told. ``relative_speed`` is the measured matmul
    throughput at this dtype over fp32's on the same device (None when not probed);
    ``basis`` says what decided: ``probe``, ``probe and cpu flags``, ``cpu flags``, ``device``.
    """

    device: str
    dtype: str
    native: bool | None
    relative_speed: float | None = None
    basis: str = "device"

    @property
    def slowdown(self) -> float | None:
        """How many times slower than fp32 (None when not measured or not slower)."""
        if self.relative_speed is None or self.relative_speed >= 1 or self.relative_speed <= 0:
            return None
        return 1 / self.relative_speed


@dataclass(frozen=True)
class CpuProbe:
    """Measured matmul throughput per dtype (GFLOP/s), or an injected answer (``injected``)."""

    gflops: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    injected: bool = False

    def relative(self, dtype: str) -> float | None:
        base, got = self.gflops.get("fp32"), self.gflops.get(dtype)
        return None if not base or got is None else got / base


def cpu_capability() -> str | None:
    """torch's CPU kernel level (``AVX512``, ``AVX2``, ``DEFAULT``...), None where torch does not say."""
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# x86 flags with matrix or vector units for the 16-bit formats; Arm's bf16 and half-precision SIMD.
_NATIVE_FLAGS = {
    "bf16": frozenset({"amx_bf16", "avx512_bf16", "bf16"}),
    "fp16": frozenset({"amx_fp16", "avx512_fp16", "asimdhp"}),
}


def flags_hint(dtype: str, flags: frozenset[str] | None) -> bool | None:
    """What the feature flags suggest about ``dtype`` on this CPU (None: no flags to read)."""
    if dtype == "fp32":
        return True
    if flags is None:
        return None
    return bool(flags & _NATIVE_FLAGS[dtype])


def decide_native(dtype: str, hint: bool | None, relative: float | None) -> tuple[bool | None, str]:
    """Whether ``dtype`` is native on a CPU, from the flags' ``hint`` and the probe's ``relative`` speed.

    The measurement wins when it is clear (under SLOW_SHARE of fp32's rate: a fallback; at or
    over FAST_SHARE: native); in between, or unmeasured, the flags decide. Returns (native, basis).
    """
    if dtype == "fp32":
        return True, "probe" if relative is not None else "cpu flags"
    if relative is None:
        return hint, "cpu flags"
    if relative < SLOW_SHARE:
        return False, "probe"
    if relative >= FAST_SHARE:
        return True, "probe"
    return bool(hint), "probe and cpu flags"


_probe_lock = threading.Lock()
_probe_cache: dict[str, float] = {}


def probe_cpu(dtypes=DTYPES) -> CpuProbe:
    """Matmul throughput of ``dtypes`` (and fp32) on one core of this CPU, measured once per process.

    Well under a second: 256-square multiplies, taken in turns so that a busy moment on a
    shared machine slows every dtype alike, the best of five kept, and a dtype whose first
    multiply is already slow (a fallback path) timed only once. One thread, because a core's
    kernels are what is being asked about, and a team of threads stalls whenever a neighbour
    takes one of its cores. ``$MPS_TEST_CPU_PROBE`` (a test hook, e.g. ``bf16=0.005,fp16=2.5``:
    each dtype's speed relative to fp32) replaces the measurement.
    """
    injected = _injected_probe()
    if injected is not None:
        return injected
    wanted = list(dict.fromkeys(("fp32", *dtypes)))
    start = time.perf_counter()
    with _probe_lock:
        todo = [dt for dt in wanted if dt not in _probe_cache]
        if todo:
            _probe_cache.update(_matmul_gflops(todo))
        got = {dt: _probe_cache[dt] for dt in wanted}
    return CpuProbe(gflops=got, seconds=time.perf_counter() - start)


def _injected_probe() -> CpuProbe | None:
    raw = os.environ.get(CPU_PROBE_ENV, "").strip()
    if not raw:
        return None
    gflops = {"fp32": 1.0}
    try:
        for part in raw.split(","):
            name, _, value = part.partition("=")
            gflops[parse_dtype(name)] = float(value)
    except (ValueError, DeviceError):
        raise DeviceError(f"${CPU_PROBE_ENV}={raw!r}: expected DTYPE=RELATIVE_SPEED pairs, e.g. bf16=0.005") from None
    return CpuProbe(gflops=gflops, injected=True)


def _matmul_gflops(dtypes: list[str]) -> dict[str, float]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        pairs = {dt: [torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen).to(torch_dtype(dt)) for _ in "ab"]
                 for dt in dtypes}
        for a, b in pairs.values():
            torch.mm(a[:16, :16], b[:16, :16])  # kernel selection, not timed
        best = dict.fromkeys(dtypes, math.inf)
        for rep in range(PROBE_REPS):
            for dt, (a, b) in pairs.items():
                if rep and best[dt] > PROBE_SLOW_S:
                    continue
                t = time.perf_counter()
                torch.mm(a, b)
                best[dt] = min(best[dt], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return {dt: 2 * PROBE_SIZE ** 3 / s / 1e9 for dt, s in best.items()}


def dtype_support(device, dtype: str, probe: bool = True) -> DtypeSupport:
    """Whether ``dtype`` runs natively on ``device`` (a torch device); on CPU ``probe`` measures it."""
    dtype = parse_dtype(dtype)
    label = str(device)
    if device.type == "cpu":
        hint = flags_hint(dtype, cpu_flags())
        relative = probe_cpu((dtype,)).relative(dtype) if probe else None
        native, basis = decide_native(dtype, hint, relative)
        return DtypeSupport(label, dtype, native, relative, basis)
    if device.type == "cuda":
        import torch

        if dtype != "bf16":
            return DtypeSupport(label, dtype, True)
        # bf16 tensor cores start with compute capability 8.0 (Ampere).
        return DtypeSupport(label, dtype, torch.cuda.get_device_capability(device) >= (8, 0))
    if device.type == "mps":
        return DtypeSupport(label, dtype, True if dtype != "bf16" else None)
    return DtypeSupport(label, dtype, None)


def list_devices(probe: bool = False) -> list[dict]:
    """Every usable device with, per dtype, whether it is native (and on CPU, with ``probe``, its speed)."""
    import torch

    flags = cpu_flags()
    measured = probe_cpu(DTYPES) if probe else None
    entry = {"device": "cpu", "name": _cpu_name(), "capability": cpu_capability(),
             "flags": sorted(flags & frozenset().union(*_NATIVE_FLAGS.values())) if flags is not None else None,
             "dtypes": {}}
    for dt in DTYPES:
        relative = measured.relative(dt) if measured else None
        native, basis = decide_native(dt, flags_hint(dt, flags), relative)
        entry["dtypes"][dt] = _support_doc(DtypeSupport("cpu", dt, native, relative, basis))
    if measured is not None:
        entry["probe"] = {"gflops": {k: round(v, 2) for k, v in measured.gflops.items()},
                          "seconds": round(measured.seconds, 3), "injected": measured.injected,
                          "matmul": f"{PROBE_SIZE}x{PROBE_SIZE}"}
    found = [entry]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            dev = torch.device("cuda", i)
            found.append({"device": str(dev), "name": torch.cuda.get_device_name(i),
                          "dtypes": {dt: _support_doc(dtype_support(dev, dt)) for dt in DTYPES}})
    if _mps_available():
        dev = torch.device("mps")
        found.append({"device": "mps", "name": "Apple Metal",
                      "dtypes": {dt: _support_doc(dtype_support(dev, dt)) for dt in DTYPES}})
    return found


def _support_doc(s: DtypeSupport) -> dict:
    doc: dict = {"native": s.native, "basis": s.basis}
    if s.relative_speed is not None:
        doc["relative_speed"] = round(s.relative_speed, 3)
    return doc


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = [
    "AUTO_DECODE", "AUTO_DTYPE", "BATCH_DEFAULT_TEXT", "COMPILE_CHOICES", "COMPILE_MODES", "DECODE_CHOICES",
    "DECODE_PATHS", "DEFAULT_BATCH", "DEVICE_CHOICES", "DTYPES", "DTYPE_BYTES", "DTYPE_CHOICES", "DTYPE_SYNTAX",
    "FAST_DECODE", "GPU_MAX_BATCH", "TEXT_DTYPE", "CpuProbe", "DtypeSupport", "Precision", "check_compile_spec",
    "check_decode_spec", "check_device_spec", "cpu_capability", "cpu_flags", "decide_native", "decode_workers",
    "default_batch_size", "dtype_name", "dtype_support", "flags_hint", "list_devices", "parse_dtype",
    "parse_precision", "probe_cpu", "resolve_decode", "resolve_device", "resolve_precision", "torch_dtype",
]
