"""Benchmark measurements: FLOPs and the matmul floor, throughput, the naive baseline, cold starts,
file reads, ``mps --help``, fixture accuracy per dtype, and the machine's description.

Each function measures one thing and returns plain numbers; ``bench_report`` judges and renders them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from bench_assets import CROSS_FF, CROSS_HEAD_DIM, CROSS_HEADS, CROSS_LAYERS, CROSS_WIDTH, PROMPT, REPO

# --------------------------------------------------------------------------- FLOPs and the floor

@dataclass
class Flops:
    vision: float  # per image
    cross_full: float  # per image per dimension, every layer over all tokens
    cross_reduced: float  # last layer's parallel block: queries and FF for the class token only
    cross_shared: float  # first layer's mask-independent part (q, k/v, FF): once for all dimensions
    text_encode: float  # per distinct prompt or condition (not in the floor: cached)

    def per_image(self, n_dims: int) -> float:
        return self.vision + self.cross_shared + n_dims * (self.cross_reduced - self.cross_shared)


def count_flops(cfg, n_text: int = 77) -> Flops:
    """Matmul FLOPs (2 per multiply-add) of one image, from the architecture."""
    v = cfg.vision
    n, w = v.num_tokens, v.width
    vision_layer = (2 * n * w * 3 * w + 2 * n * w * w  # qkv and output projections
                    + 2 * 2 * n * n * w  # scores and weighted sum, all heads
                    + 2 * 2 * n * w * v.mlp_width)  # MLP up and down
    vision = (2 * (n - 1) * 3 * v.patch_size ** 2 * w + v.layers * vision_layer
              + 2 * n * w * cfg.embed_dim)

    D, H, d, ff, L = CROSS_WIDTH, CROSS_HEADS, CROSS_HEAD_DIM, CROSS_FF, CROSS_LAYERS
    inner = H * d
    cross_attn = (2 * n * D * inner + 2 * n_text * D * 2 * d  # q on image tokens, shared k/v on text
                  + 2 * 2 * n * n_text * inner + 2 * n * inner * D  # attention, output projection
                  + 2 * n * D * 2 * ff + 2 * n * ff * D)  # SwiGLU feed-forward

    def parallel(q_tokens: int) -> float:
        return (2 * n * D * 2 * d  # the single key/value head, every token
                + 2 * q_tokens * D * (inner + 2 * ff)  # queries and FF input
                + 2 * 2 * q_tokens * n * inner  # attention
                + 2 * q_tokens * inner * D + 2 * q_tokens * ff * D)  # attn_out, ff_out

    cross_full = L * (cross_attn + parallel(n))
    cross_reduced = L * cross_attn + (L - 1) * parallel(n) + parallel(1)
    cross_shared = 2 * n * D * inner + 2 * n_text * D * 2 * d + 2 * n * D * 2 * ff + 2 * n * ff * D

    t = cfg.text
    ctx = t.context_length
    text_layer = 2 * ctx * t.width * 4 * t.width + 2 * 2 * ctx * ctx * t.width + 2 * 2 * ctx * t.width * t.mlp_width
    text = t.layers * text_layer + 2 * ctx * t.width * cfg.embed_dim
    return Flops(vision=vision, cross_full=cross_full, cross_reduced=cross_reduced, cross_shared=cross_shared,
                 text_encode=text)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype_name: str, device, size: int, reps: int) -> float:
    """Best-of-``reps`` throughput of one ``size``-square ``torch.mm`` at this dtype."""
    import torch

    from mps_cli.devices import torch_dtype

    dt = torch_dtype(dtype_name)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dt)
    torch.mm(a, b)
    synchronize(device)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


class MatmulProbe:
    """Matmul throughput probed at the start and right before and after every timed configuration.

    On a shared machine the throughput moves by 2-3x within minutes (a neighbour on the
    sibling hyperthread halves AMX), so each configuration's floor uses the better of the
    probes that bracket it, taken under the same conditions; a single probe at the start
    could land in a busy or an idle moment. The spread of all probes shows how noisy the run was.
    """

    def __init__(self, device, size: int, reps: int):
        self.device, self.size, self.reps = device, size, reps
        self.samples: dict[str, list[float]] = {}

    def probe(self, dtype_name: str) -> float:
        g = matmul_gflops(dtype_name, self.device, self.size, self.reps)
        self.samples.setdefault(dtype_name, []).append(g)
        return g


# --------------------------------------------------------------------------- measurements

class CpuWatch:
    """How much CPU other processes took while a measurement ran (Linux ``/proc/stat``).

    On a small shared machine a neighbour's burst slows an OpenMP matmul several-fold, so
    every timed row carries this, and a row measured while others were busy is flagged.
    Cores busy outside this process = (machine busy time - this process's and its
    children's CPU time) / wall time; hypervisor steal is counted as busy.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _sample(self):
        import resource

        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.hz  # user nice system irq softirq steal
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, own

    def __enter__(self):
        self.start = self._sample()
        self.others_cores = None
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self.start and end and end[0] > self.start[0]:
            wall = end[0] - self.start[0]
            self.others_cores = max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall)
        return False


def pipeline_throughput(scorer, images: list, dims: list[str], batch_size: int | None,
                        repeats: int) -> dict:
    """Best-of-``repeats`` wall time of ``Scorer.score`` on the images (text features already warm)."""
    best, results, others = math.inf, None, None
    inputs = [str(p) if isinstance(p, Path) else p for p in images]
    for _ in range(repeats):
        with CpuWatch() as watch:
            t = time.perf_counter()
            results = scorer.score(inputs, PROMPT, dims=dims, batch_size=batch_size)
            took = time.perf_counter() - t
        if took < best:
            best, others = took, watch.others_cores
    bad = [r for r in results if not r.ok or not all(math.isfinite(v) for v in r.scores.values())]
    return {
        "seconds": best, "s_per_image": best / len(images), "images_per_s": len(images) / best,
        "failed_or_nonfinite": len(bad), "others_cores": others,
        "scores": {r.image: r.scores for r in results},
    }


def predecoded(images: list[Path], size: int) -> list:
    """The images decoded, resized and cropped in advance: scoring them times the model alone."""
    from mps_cli.engine.preprocess import open_image, resize_crop

    return [resize_crop(open_image(p), size) for p in images]


def naive_baseline(scorer, images: list[Path], dims: list[str], threshold: float = 0.3) -> dict:
    """The original evaluation procedure, one (image, dimension) at a time, nothing reused.

    For every image and every dimension: tokenise and encode the prompt and the condition,
    decode and preprocess the image, run the vision tower on it alone, build the condition
    mask and run the cross model for batch 1. The mask and the score are the library's own
    functions, so this times the procedure, not another formula.
    """
    import torch

    from mps_cli.constants import CONDITIONS
    from mps_cli.engine.model import additive_mask, condition_keep, preference_logits
    from mps_cli.engine.preprocess import Tokenizer, load_pixels

    model, device, dtype = scorer.model, scorer.device, scorer.dtype
    size = scorer.config.vision.image_size
    tokenizer = Tokenizer(scorer.config.text.context_length)

    def encode(text: str):
        tok = tokenizer(text)
        ids = torch.tensor([tok.ids], dtype=torch.long, device=device)
        return model.encode_text(ids), tok.eot_index

    times: dict[str, list[float]] = {d: [] for d in dims}
    scores: dict[str, dict[str, float]] = {}
    with torch.inference_mode(), CpuWatch() as watch:
        for path in images:
            scores[str(path)] = {}
            for dim in dims:
                t0 = time.perf_counter()
                text, eot = encode(PROMPT)
                cond, _ = encode(CONDITIONS[dim])
                px = load_pixels(str(path), size).unsqueeze(0).to(device=device, dtype=dtype)
                image_tokens = model.encode_image(px)
                mask = additive_mask(condition_keep(text, cond[0], threshold), dtype)
                cls = model.cross(image_tokens, text.to(dtype), [mask])[0]
                value = float(preference_logits(cls, text[:, eot], model.logit_scale)[0])
                times[dim].append(time.perf_counter() - t0)
                scores[str(path)][dim] = value
    per_image_all = [sum(times[d][i] for d in dims) for i in range(len(images))]
    return {
        "images": len(images),
        "s_per_image_per_dim": {d: statistics.mean(v) for d, v in times.items()},
        # Every (image, dimension) call is the same work, so all of them estimate one dimension.
        "s_per_image_1dim": statistics.mean(t for v in times.values() for t in v),
        "s_per_image_all": statistics.mean(per_image_all),
        "others_cores": watch.others_cores,
        "scores": scores,
    }


COLD_CHILD = r"""
import importlib, json, os, resource, sys, time
t_start = time.time()
args = json.loads(sys.argv[1])
import torch
t_torch = time.time()
import mps_cli
from mps_cli import load_scorer
# What load_scorer imports lazily, so "weight load" is the loading alone.
for name in ("safetensors", "safetensors.torch", "regex", "ftfy", "mps_cli.engine.bpe", "mps_cli.engine.model",
             "mps_cli.weights.checkpoint", "mps_cli.weights.sources", "mps_cli.engine.preprocess"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
t_imported = time.time()

def mem():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out

scorer = load_scorer(args["weights"], device=args["device"], dtype=args["dtype"])
t_loaded = time.time()
mem_loaded = mem()
first = scorer.score([args["images"][0]], args["prompt"], dims=["overall"])
t_first = time.time()
ok = all(r.ok for r in first)
batch = args["batch_size"] or scorer.batch_size
rest = scorer.score(args["images"][:batch], args["prompt"], dims=["all"], batch_size=batch)
ok = ok and all(r.ok for r in rest)
on_gpu = torch.cuda.is_available() and args["device"].startswith("cuda")
gpu_peak = torch.cuda.max_memory_allocated() if on_gpu else None
print(json.dumps({
    "t_start": t_start, "t_torch": t_torch, "t_imported": t_imported, "t_loaded": t_loaded, "t_first": t_first,
    "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "mem_after_load": mem_loaded, "mem_end": mem(), "gpu_peak_bytes": gpu_peak,
    "rss_batch": batch, "ok": ok, "threads": torch.get_num_threads(),
}))
"""


def cold_start(ckpt: Path, images: list[Path], dtype: str, device: str, batch_size: int | None) -> dict:
    """One fresh ``python -c``: process start to first score, then a full batch for peak RSS."""
    args = {"weights": str(ckpt), "images": [str(p) for p in images], "prompt": PROMPT,
            "dtype": dtype, "device": device, "batch_size": batch_size}
    with CpuWatch() as watch:
        t_spawn = time.time()
        proc = subprocess.run([sys.executable, "-c", COLD_CHILD, json.dumps(args)],
                              capture_output=True, text=True, timeout=3600)
        t_exit = time.time()
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "interpreter_s": r["t_start"] - t_spawn,
        "imports_s": r["t_imported"] - r["t_start"],
        "imports_torch_s": r["t_torch"] - r["t_start"],
        "load_s": r["t_loaded"] - r["t_imported"],
        "first_score_s": r["t_first"] - r["t_loaded"],
        "to_first_score_s": r["t_first"] - t_spawn,
        "process_wall_s": t_exit - t_spawn,
        "peak_rss_bytes": r["maxrss"],
        "mem_after_load": r["mem_after_load"], "mem_end": r["mem_end"],
        "gpu_peak_bytes": r["gpu_peak_bytes"], "rss_batch": r["rss_batch"], "ok": r["ok"],
        "others_cores": watch.others_cores,
    }


def warm_imports() -> None:
    """Bring the libraries' files into the page cache before the timed cold start."""
    subprocess.run([sys.executable, "-c", "import torch, safetensors, mps_cli.engine.scorer, mps_cli.engine.bpe"],
                   capture_output=True, timeout=600)


def read_file_seconds(path: Path, reps: int) -> float:
    """Best time to read the file into a reusable buffer (``cat > /dev/null``), after one warming read."""
    buf = memoryview(bytearray(16 << 20))
    best = math.inf
    for i in range(reps + 1):
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def read_fresh_seconds(path: Path, reps: int) -> float:
    """Best time to read the whole file into newly allocated memory (``Path.read_bytes``)."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        data = path.read_bytes()
        best = min(best, time.perf_counter() - t)
        del data
    return best


def help_seconds(reps: int) -> dict:
    exe = shutil.which("mps", path=str(Path(sys.executable).parent)) or shutil.which("mps")
    if not exe:
        return {"error": "the mps console script is not installed"}
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return {"error": f"mps --help exited {proc.returncode}: {proc.stderr.strip()[-200:]}"}
        if i:
            times.append(time.perf_counter() - t)
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": reps}


# --------------------------------------------------------------------------- fixture accuracy

@dataclass
class FixtureRows:
    """The golden fixture's expected.json rows: (image, prompt, key, condition or None, threshold) ->
    (original score, kept tokens), grouped for scoring (by text) and for pair order (by prompt and condition)."""

    original: dict
    by_text: dict
    by_group: dict


def fixture_rows(fixture: Path) -> FixtureRows | None:
    """The fixture's 140 rows, or None when the fixture is not there."""
    expected_path = fixture / "expected.json"
    if not (fixture / "mps-tiny.safetensors").is_file() or not expected_path.is_file():
        return None
    expected = json.loads(expected_path.read_text())
    original = {(r["image"], r["prompt"], r["dim"], None, expected["mask_threshold"]): (r["score"], r["kept_tokens"])
                for r in expected["scores"]}
    original.update({(r["image"], r["prompt"], "custom", r["condition"], r["mask_threshold"]):
                     (r["score"], r["kept_tokens"]) for r in expected.get("custom", [])})
    by_text: dict[tuple, set] = {}
    by_group: dict[tuple, list] = {}
    for key in original:
        name, prompt, dim, condition, threshold = key
        by_text.setdefault((prompt, condition, threshold), set()).add((name, dim))
        by_group.setdefault(key[1:], []).append(key)
    return FixtureRows(original, by_text, by_group)


def score_rows(scorer, rows: FixtureRows, image_path) -> tuple[dict, dict]:
    """Every row scored by ``scorer``, the image of row name N read from ``image_path(N)``: (scores, kept)."""
    got, kept = {}, {}
    for (prompt, condition, threshold), members in rows.by_text.items():
        names = sorted({n for n, _ in members})
        dims = None if condition else sorted({d for _, d in members})
        results = scorer.score([str(image_path(n)) for n in names], prompt, dims=dims,
                               condition=condition, mask_threshold=threshold)
        for name, res in zip(names, results, strict=True):
            if not res.ok:
                raise RuntimeError(f"fixture row failed: {res.error}")
            for dim, value in res.scores.items():
                got[name, prompt, dim, condition, threshold] = value
                kept[name, prompt, dim, condition, threshold] = res.kept_tokens[dim]
    return got, kept


def pairs_alike(rows: FixtureRows, got: dict, ref: dict) -> tuple[int, int]:
    """Image pairs (same prompt and condition) that ``got`` orders as ``ref`` does, and all pairs."""
    pairs = [(a, b) for keys in rows.by_group.values() for a, b in combinations(keys, 2)]
    return sum((got[a] - got[b]) * (ref[a] - ref[b]) > 0 for a, b in pairs), len(pairs)


def drift(rows: FixtureRows, got: dict, ref: dict) -> dict:
    """How far ``got`` is from ``ref`` over the rows: largest and median |difference|, pairs in order."""
    alike, pairs = pairs_alike(rows, got, ref)
    diffs = [abs(got[k] - ref[k]) for k in rows.original]
    return {"max_abs": max(diffs), "median_abs": statistics.median(diffs), "pairs_in_order": alike, "pairs": pairs}


def fixture_accuracy(fixture: Path, dtypes: list[str], device: str) -> dict:
    """Each reduced dtype against fp32 (same device) and the original's scores on the golden tiny fixture.

    Per dtype three variants: the default (text side fp32), the whole model in that dtype
    (``DT/DT``), and, as the floor any arithmetic could reach, the fp32 model with its image-side
    weights rounded to that dtype (``weights rounded``): largest score difference, condition
    masks that changed, image pairs (same prompt and condition) whose order changed.
    """
    import torch

    from mps_cli import load_scorer
    from mps_cli.devices import torch_dtype

    rows = fixture_rows(fixture)
    if rows is None:
        return {"error": f"fixture not found at {fixture} (--fixture or $MPS_SHARED)"}
    weights = fixture / "mps-tiny.safetensors"
    original = rows.original
    images = fixture / "images"

    def compare(got: dict, kept: dict, fp32: dict, fp32_kept: dict) -> dict:
        d = drift(rows, got, fp32)
        alike_orig, _ = pairs_alike(rows, got, {k: v[0] for k, v in original.items()})
        return {
            "max_abs_vs_fp32": d["max_abs"], "median_abs_vs_fp32": d["median_abs"],
            "mask_flips_vs_fp32": sum(kept[k] != fp32_kept[k] for k in original),
            "pairs_in_order_vs_fp32": d["pairs_in_order"], "pairs_in_order_vs_original": alike_orig,
            "pairs": d["pairs"],
        }

    fp32, fp32_kept = score_rows(load_scorer(weights, device=device, dtype="fp32"), rows, images.joinpath)
    out: dict = {"rows": len(original), "groups": len(rows.by_group), "device": device,
                 "fp32_max_abs_vs_original": max(abs(fp32[k] - v[0]) for k, v in original.items()),
                 "fp32_mask_flips_vs_original": sum(fp32_kept[k] != v[1] for k, v in original.items()),
                 "variants": {}}
    for dt in dtypes:
        if dt == "fp32":
            continue
        for spec in (dt, f"{dt}/{dt}"):
            scorer = load_scorer(weights, device=device, dtype=spec)
            out["variants"][scorer.precision.label] = compare(*score_rows(scorer, rows, images.joinpath),
                                                              fp32, fp32_kept)
        rounded = load_scorer(weights, device=device, dtype="fp32")
        with torch.no_grad():
            for name, p in rounded.model.named_parameters():
                if not name.startswith("text.") and name != "logit_scale":
                    p.copy_(p.to(torch_dtype(dt)))
        out["variants"][f"fp32, image-side weights rounded to {dt}"] = compare(
            *score_rows(rounded, rows, images.joinpath), fp32, fp32_kept)
    return out


# --------------------------------------------------------------------------- the machine

def machine_info(device) -> dict:
    import torch

    import mps_cli
    from mps_cli.devices import cpu_capability

    cpu = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "cpu": cpu or platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa": sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_fp16", "avx512f", "avx2"))),
        "cpu_capability": cpu_capability(),
        "memory_bytes": mem, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "mps_cli": getattr(mps_cli, "__version__", "?"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git"] = rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


