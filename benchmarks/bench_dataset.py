"""Throughput of ``mps dataset`` (issue 14): shards against ``mps score`` on the same images as files.

Builds JPEGs (a gradient with noise, ``--size`` px square), writes them as webdataset tar shards
and as parquet shards (Hugging Face ``{"bytes", "path"}`` struct), then scores the same images
with the same prompts four ways, interleaved, best of ``--repeats``:

- files: ``Scorer.score`` on the JPEG paths, the engine ``mps score`` runs;
- tar / parquet: ``mps_cli.dataset.score_dataset`` into a fresh output folder (read, decode,
  score, write parquet and manifest);
- ray: ``mps_cli.ray_engine.score_dataset_ray`` on a Ray instance started here with every CPU,
  one scoring actor (``--ray-cpus-per-worker``); its wall time includes the actor's model load,
  the steady rate does not.

"images/s" is over the whole call; "steady" is from the first scored image to the last (it
leaves out start-up: the reader's first shard, Ray's actor and model load). Defaults use the tiny
golden fixture, where the model costs little and the dataset path's overhead shows most; pass
``--weights`` (e.g. bench.py's full-size checkpoint) for model-bound numbers.

    python benchmarks/bench_dataset.py                      # tiny fixture, 64 images, 2 repeats
    python benchmarks/bench_dataset.py --weights ~/.cache/mps-cli-bench/mps-vit-h14-random.safetensors \\
        --images 16 --shard-size 8 --repeats 1
    python benchmarks/bench_dataset.py --device cuda --batch-size 32 --images 512   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox sitting in a snowy forest at dawn, highly detailed",
           "three blue cubes stacked on top of a wooden table",
           "portrait of an old fisherman with weathered hands, 35mm photo",
           "A cozy café interior — warm light, plants & books"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        base = np.stack([xx * 255, yy * 255, (xx + yy) * 127], axis=-1)
        noise = rng.normal(0, 25, (size, size, 3))
        img = Image.fromarray(np.clip(base + noise + 10 * i, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def write_shards(root: Path, paths: list[Path], shard_size: int) -> tuple[list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "wds").mkdir(parents=True, exist_ok=True)
    (root / "pq").mkdir(parents=True, exist_ok=True)
    tars, parquets = [], []
    for s in range(0, len(paths), shard_size):
        chunk = list(enumerate(paths[s:s + shard_size], start=s))
        tar_path = root / "wds" / f"{s // shard_size:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i, p in chunk:
                for name, data in ((f"{i:06d}.jpg", p.read_bytes()), (f"{i:06d}.txt", PROMPTS[i % 4].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq_path = root / "pq" / f"part-{s // shard_size:05d}.parquet"
        pq.write_table(pa.table({
            "key": [f"{i:06d}" for i, _ in chunk],
            "image": [{"bytes": p.read_bytes(), "path": p.name} for _, p in chunk],
            "caption": [PROMPTS[i % 4] for i, _ in chunk],
        }), pq_path)
        tars.append(str(tar_path))
        parquets.append(str(pq_path))
    return tars, parquets


class Clock:
    """Progress callback that notes when the first and the last image were scored."""

    def __init__(self):
        self.first = self.last = None

    def __call__(self, progress=None) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now


def timed(fn, n: int) -> dict:
    clock = Clock()
    t0 = time.perf_counter()
    fn(clock)
    wall = time.perf_counter() - t0
    steady = (clock.last - clock.first) if clock.first and clock.last and clock.last > clock.first else wall
    # first..last spans n-1 images
    return {"wall_s": wall, "images_per_s": n / wall, "steady_images_per_s": (n - 1) / steady if n > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("MPS_SHARED", REPO.parent / "shared"))
    ap.add_argument("--weights", default=str(shared / "fixtures" / "mps-tiny" / "mps-tiny.safetensors"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=512, help="JPEG side in pixels")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--dims", default="overall", help="comma-separated, or all")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from mps_cli import load_scorer
    from mps_cli.dataset import DatasetJob, ModelSpec, plan_dataset, score_dataset
    from mps_cli.engine.options import ModelOptions

    dims = tuple(args.dims.split(","))
    work = Path(tempfile.mkdtemp(prefix="mps-bench-dataset-"))
    try:
        log(f"building {args.images} {args.size}px JPEGs and shards of {args.shard_size} in {work}")
        paths = make_images(work / "images", args.images, args.size)
        tars, parquets = write_shards(work, paths, args.shard_size)
        prompts = [PROMPTS[i % 4] for i in range(len(paths))]
        t0 = time.perf_counter()
        scorer = load_scorer(args.weights, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
        load_s = time.perf_counter() - t0
        scorer.score(paths[:2], prompts[:2], dims=dims)  # warm-up: text features, thread pools
        n = len(paths)
        runs = {"files": [], "tar": [], "parquet": []}
        counter = iter(range(10**6))

        def dataset(sources):
            def go(clock):
                out = work / f"out-{next(counter)}"
                plan = plan_dataset(DatasetJob(tuple(sources), out, dims=dims, batch_size=args.batch_size))
                summary = score_dataset(plan, scorer, progress=clock)
                assert summary.images == n and not summary.failed, summary
                shutil.rmtree(out)
            return go

        def files(clock):
            for _ in scorer.iter_score(paths, prompts, dims=dims, batch_size=args.batch_size):
                clock()

        for rep in range(args.repeats):
            for name, fn in (("files", files), ("tar", dataset(tars)), ("parquet", dataset(parquets))):
                runs[name].append(timed(fn, n))
                log(f"repeat {rep + 1}: {name}: {runs[name][-1]['images_per_s']:.1f} images/s")
        ray_info = None
        if not args.no_ray:
            import ray

            from mps_cli.ray_engine import score_dataset_ray

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            ray_start = time.perf_counter() - t0
            spec = ModelSpec(options=ModelOptions(weights=args.weights, device=args.device, dtype=args.dtype),
                             identity=scorer.identity, dtype=ModelSpec.from_scorer(scorer).dtype,
                             image_size=scorer.config.vision.image_size)
            runs["ray"] = []

            def on_ray(clock):
                out = work / f"out-{next(counter)}"
                plan = plan_dataset(DatasetJob(tuple(tars), out, dims=dims, batch_size=args.batch_size))
                summary = score_dataset_ray(plan, spec, workers=1, gpus_per_worker=args.gpus_per_worker,
                                            cpus_per_worker=args.ray_cpus_per_worker, progress=clock)
                assert summary.images == n and not summary.failed, summary
                shutil.rmtree(out)

            for rep in range(args.repeats):
                runs["ray"].append(timed(on_ray, n))
                log(f"repeat {rep + 1}: ray: {runs['ray'][-1]['images_per_s']:.1f} images/s")
            ray.shutdown()
            ray_info = {"init_s": ray_start, "cpus_per_worker": args.ray_cpus_per_worker}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    batch = scorer.batch_size if args.batch_size is None else args.batch_size
    machine = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.device}, "
               f"{ModelSpec.from_scorer(scorer).dtype}, batch {batch}")
    base = best["files"]["images_per_s"]
    lines = [f"machine: {machine}",
             f"weights: {args.weights} (load {load_s:.2f} s); {n} images of {args.size}px, "
             f"shards of {args.shard_size}; dims {','.join(dims)}; best of {args.repeats}",
             "", "| path | images/s | steady images/s | vs mps score (files) |", "| --- | --- | --- | --- |"]
    labels = {"files": "`mps score` engine on files", "tar": "`mps dataset`, tar shards",
              "parquet": "`mps dataset`, parquet shards", "ray": "`mps dataset --engine ray`, tar shards"}
    for k, r in best.items():
        steady = "—" if r["steady_images_per_s"] is None else f"{r['steady_images_per_s']:.1f}"
        lines.append(f"| {labels[k]} | {r['images_per_s']:.1f} | {steady} | {r['images_per_s'] / base:.2f}× |")
    if ray_info:
        lines.append(f"\nray.init: {ray_info['init_s']:.1f} s (not in the rows); one actor with "
                     f"{ray_info['cpus_per_worker']:g} CPU")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs, "best": best, "ray": ray_info,
                                         "table": lines}, indent=2))


if __name__ == "__main__":
    main()
