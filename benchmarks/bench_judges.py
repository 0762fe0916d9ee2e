"""Several models on one decode (issue 27): k models in one panel against k separate runs, and the memory each adds.

    python benchmarks/bench_judges.py                      # 16 images of 1024 x 1024, the tiny models
    python benchmarks/bench_judges.py --images 32 --size 768 --json judges.json

The models are tiny random-weight checkpoints (the golden fixture's geometry: width 64, 2 layers, patch 32):
with them the model's own time is small, so what the table shows is the decoding and preprocessing that one
decode saves. MPS is the fixture checkpoint (``../shared``, or ``$MPS_SHARED``); each judge a random
open_clip-layout file written once into the bench cache (``$MPS_BENCH_CACHE``, never inside the repository).
The memory a full-size ViT-H-14 model adds is counted from its parameter shapes (built on the meta device,
nothing allocated) at each dtype. Everything runs in fp32 on the CPU (a dtype every CPU runs natively).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from bench_assets import DEFAULT_FIXTURE, PROMPT, check_outside_repo, default_cache_dir, log
from bench_measure import machine_info

JUDGE_SEEDS = {"hpsv2.1": 1, "pickscore": 2, "clipscore": 3}
ALL = ("mps", "hpsv2.1", "pickscore", "clipscore")


def rss() -> int:
    """This process's resident memory in bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tiny_judges(folder: Path) -> dict[str, Path]:
    """One random tiny judge per name, in open_clip's layout, with the fixture's config.json beside it."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from mps_cli.engine.model import CLIPJudgeModel
    from mps_cli.weights.config import read_config

    out = {}
    for name, seed in JUDGE_SEEDS.items():
        path = folder / name / "judge.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            model = CLIPJudgeModel(read_config(DEFAULT_FIXTURE / "config.json"))
            state = {}
            for k, v in model.state_dict().items():
                t = torch.randn(v.shape) * 0.05 if v.dim() else torch.tensor(4.6)
                state[k.removeprefix("text.")] = t.contiguous()
            save_file(state, str(path))
            shutil.copy(DEFAULT_FIXTURE / "config.json", path.parent / "config.json")
        out[name] = path
    return out


def images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` photo-like PNGs (smooth gradients plus noise: PNG decode costs what a generation's does)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{size}-{i:03d}.png"
        if not path.exists():
            y, x = np.mgrid[0:size, 0:size] / size
            base = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def specs(judges: dict[str, Path], names) -> list[str]:
    return [n if n == "mps" else f"{n}={judges[n]}" for n in names]


def timed_score(spec: list[str], paths: list[Path], reps: int) -> tuple[float, float]:
    """Best of ``reps`` (wall seconds, CPU seconds of this process, all its threads) for scoring ``paths``
    with a panel of ``spec`` (loaded before timing). CPU seconds count the work done, which other
    processes on a shared machine slow down far less than they do the wall clock."""
    from mps_cli import load_scorer

    scorer = load_scorer(str(DEFAULT_FIXTURE / "mps-tiny.safetensors"), model=spec, device="cpu", dtype="fp32")
    scorer.score(paths[:1], PROMPT)  # loads every model, encodes the prompt
    wall = cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        results = scorer.score(paths, PROMPT)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return wall, cpu


def decode_ms(paths: list[Path], rules: tuple[str, ...]) -> float:
    """Milliseconds per image to decode once and preprocess by ``rules`` (one thread)."""
    from mps_cli.engine.pixel_rules import pixels_by_rule
    from mps_cli.engine.preprocess import open_image

    t = time.perf_counter()
    for p in paths:
        pixels_by_rule(open_image(p, keep_mode=True), 224, rules)
    return 1000 * (time.perf_counter() - t) / len(paths)


def full_size_bytes() -> dict:
    """Weights of each full-size model, from its parameter shapes: elements and bytes per dtype."""
    import torch

    from mps_cli.engine.model import CLIPJudgeModel, MPSModel
    from mps_cli.weights.config import CrossConfig, builtin_config

    cfg = builtin_config()
    cross = CrossConfig(width=1024, layers=4, heads=16, head_dim=64, cross_ff=4096, parallel_ff=4096)
    with torch.device("meta"):
        models = {"judge (ViT-H-14)": CLIPJudgeModel(cfg), "mps": MPSModel(cfg, cross)}
    out = {}
    for name, m in models.items():
        n = sum(v.numel() for v in m.state_dict().values())
        out[name] = {"elements": n, "fp32_bytes": 4 * n, "bf16_bytes": 2 * n}
    return out


def rss_per_model(judges: dict[str, Path]) -> list[dict]:
    """Resident memory after each model of a four-model panel is loaded (tiny models; fp32)."""
    from mps_cli import load_scorer

    gc.collect()
    panel = load_scorer(str(DEFAULT_FIXTURE / "mps-tiny.safetensors"), model=specs(judges, ALL), device="cpu",
                        dtype="fp32")
    rows = [{"loaded": "none (weights opened and checked)", "rss": rss()}]
    for member in panel.members:
        _ = member.scorer if member.name == "mps" else member.model
        gc.collect()
        rows.append({"loaded": member.name, "rss": rss()})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (square PNGs)")
    ap.add_argument("--reps", type=int, default=3, help="best of this many timed runs")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if not (DEFAULT_FIXTURE / "mps-tiny.safetensors").is_file():
        raise SystemExit(f"bench: the fixture is not at {DEFAULT_FIXTURE}; set MPS_SHARED")
    cache = check_outside_repo(args.cache_dir or default_cache_dir()) / "judges"
    judges = tiny_judges(cache / "weights")
    paths = images(cache / "images", args.images, args.size)
    import torch

    info = machine_info(torch.device("cpu"))
    log(f"{info['cpu']}, {info['usable_cpus']} CPUs, torch {info['torch']} ({info['torch_threads']} threads)")

    rules = {"mps": ("clip",), "hpsv2.1": ("letterbox",), "pickscore": ("clip",), "clipscore": ("open_clip",)}
    decode = {name: decode_ms(paths, rules[name]) for name in ALL}
    decode["all four (one decode)"] = decode_ms(paths, ("clip", "open_clip", "letterbox"))
    log("decode: " + ", ".join(f"{k} {v:.1f} ms" for k, v in decode.items()))

    # A first scorer in a process runs slower (thread pools, allocator, oneDNN kernels warming up): not a row.
    timed_score(specs(judges, ["mps"]), paths, 1)
    rows = []
    for k in range(1, len(ALL) + 1):
        names = ALL[:k]
        together = timed_score(specs(judges, names), paths, args.reps)
        alone = [timed_score(specs(judges, [n]), paths, args.reps) for n in names]
        apart = tuple(sum(t[i] for t in alone) for i in (0, 1))
        n = len(paths)
        rows.append({"models": ",".join(names), "k": k, "panel_s": together[0], "separate_s": apart[0],
                     "panel_cpu_s": together[1], "separate_cpu_s": apart[1],
                     "panel_ms_per_image": 1000 * together[0] / n, "separate_ms_per_image": 1000 * apart[0] / n,
                     "panel_cpu_ms_per_image": 1000 * together[1] / n,
                     "separate_cpu_ms_per_image": 1000 * apart[1] / n,
                     "saving": 1 - together[0] / apart[0], "cpu_saving": 1 - together[1] / apart[1]})
        log(f"k={k}: one panel {together[0]:.2f} s ({together[1]:.2f} CPU s), {k} separate runs {apart[0]:.2f} s "
            f"({apart[1]:.2f} CPU s)")
    memory = {"full_size": full_size_bytes(), "tiny_rss": rss_per_model(judges)}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_judges: {len(paths)} PNGs of {args.size}x{args.size}, tiny models, fp32, CPU: {info['cpu']} "
          f"({info['usable_cpus']} CPUs, {info['torch_threads']} torch threads; load average {load:.1f} at the end)")
    print("\n| decode + preprocess in a decode thread, one thread | ms per image |\n| --- | --- |")
    for k, v in decode.items():
        print(f"| {k} | {v:.1f} |")
    print("\n| models | one panel (one decode): wall, CPU ms/image | k separate runs: wall, CPU ms/image | "
          "saving: wall, CPU |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['models']} | {r['panel_ms_per_image']:.1f}, {r['panel_cpu_ms_per_image']:.1f} | "
              f"{r['separate_ms_per_image']:.1f}, {r['separate_cpu_ms_per_image']:.1f} | "
              f"{100 * r['saving']:.0f}%, {100 * r['cpu_saving']:.0f}% |")
    print("\n| full-size model | parameters | fp32 | bf16 / fp16 |\n| --- | --- | --- | --- |")
    for k, v in memory["full_size"].items():
        print(f"| {k} | {v['elements']:,} | {v['fp32_bytes'] / 2**30:.2f} GiB | {v['bf16_bytes'] / 2**30:.2f} GiB |")
    print("\n| tiny panel, after loading | RSS | added |\n| --- | --- | --- |")
    prev = None
    for r in memory["tiny_rss"]:
        added = "" if prev is None else f"{(r['rss'] - prev) / 2**20:+.1f} MiB"
        print(f"| {r['loaded']} | {r['rss'] / 2**20:.0f} MiB | {added} |")
        prev = r["rss"]
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load_average": load, "images": len(paths), "size": args.size,
                                         "decode_ms": decode, "runs": rows, "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
