"""Decode paths: how fast each turns 768x768 JPEGs into model input, and how far each moves the scores.

Run it as ``python benchmarks/bench_decode.py`` (``--help`` for options). Two parts:

* speed: the JPEG pool ``bench.py`` uses (768x768, quality 90, built once in its cache), each image
  made model input by the exact path (PIL decode, PIL two-pass bicubic), the draft path (PIL
  decoding the JPEG at 1/2 scale first) and the tensor path (``decode_jpeg`` on the device, in
  batches, then the torch resize there; on CUDA nvJPEG). Per image on one thread, then images/s
  with the scorer's decode threads (the exact and draft paths) or per batch (the tensor path);
* drift: the golden fixture's 7 images saved as JPEGs (quality 90) at three sizes whose shorter
  side engages each draft scale (512: 1/2, 1024: 1/4, 2048: 1/8), all 140 expected.json rows
  scored fp32 on the device by each fast path and by the exact path on the same JPEGs: largest
  and median |score difference| and image pairs (same prompt and condition) in the same order,
  against the fp16 drift already accepted on CUDA (0.090, benchmarks/results/h200-2026-11-27).

The table goes to stdout, progress to stderr, ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_assets import DEFAULT_FIXTURE, check_outside_repo, default_cache_dir, log, make_images
from bench_measure import drift, fixture_rows, machine_info, score_rows, synchronize

#: The largest fp16 score drift on the fixture already accepted on CUDA (text fp32, H200 run of 2026-11-27).
ACCEPTED_FP16_DRIFT = 0.090
FIXTURE_SIDES = (512, 1024, 2048)
JPEG_QUALITY = 90


def fixture_jpegs(fixture: Path, folder: Path, side: int) -> Path:
    """The fixture's images as RGB JPEGs with the shorter side at ``side`` (PIL bicubic up), same names."""
    from PIL import Image

    out = folder / f"short-{side}"
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted((fixture / "images").iterdir()):
        with Image.open(src) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        scale = side / min(w, h)
        rgb.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC).save(
            out / src.name, "JPEG", quality=JPEG_QUALITY)
    return out


def time_host(paths: list[Path], size: int, draft: bool, workers: int) -> dict:
    """The exact or draft path: ms per image on one thread, then images/s on ``workers`` threads."""
    from mps_cli.engine.preprocess import load_pixels

    load_pixels(paths[0], size, draft=draft)
    t = time.perf_counter()
    for p in paths:
        load_pixels(p, size, draft=draft)
    one = (time.perf_counter() - t) / len(paths)
    with ThreadPoolExecutor(workers) as pool:
        t = time.perf_counter()
        list(pool.map(lambda p: load_pixels(p, size, draft=draft), paths))
        pooled = len(paths) / (time.perf_counter() - t)
    return {"ms_per_image_one_thread": one * 1000, "images_per_s": pooled, "threads": workers}


def time_tensor(paths: list[Path], size: int, device, batch: int, decode) -> dict:
    """The tensor path: the host's part (read, header check) and the device's (batched decode, resize)."""
    from mps_cli.engine.decode import checked_jpeg, decode_jpegs

    t = time.perf_counter()
    jpegs = [checked_jpeg(p, str(p)) for p in paths]
    host = (time.perf_counter() - t) / len(paths)
    assert all(j is not None for j in jpegs), "the pool's JPEGs must all take the tensor path"
    decode_jpegs(jpegs[:batch], size, device, decode)
    synchronize(device)
    t = time.perf_counter()
    for start in range(0, len(jpegs), batch):
        out = decode_jpegs(jpegs[start:start + batch], size, device, decode)
    synchronize(device)
    took = time.perf_counter() - t
    bad = [o for o in out if not hasattr(o, "shape")]
    return {"host_ms_per_image": host * 1000, "device_ms_per_image": took / len(paths) * 1000,
            "images_per_s": len(paths) / took, "batch": batch, "failed": len(bad)}


def measure_drift(fixture: Path, work: Path, device: str, sides) -> dict:
    """Each fast path against the exact one, fp32, on the fixture's JPEG versions."""
    from mps_cli import load_scorer

    rows = fixture_rows(fixture)
    if rows is None:
        return {"error": f"fixture not found at {fixture} (--fixture or $MPS_SHARED)"}
    weights = fixture / "mps-tiny.safetensors"
    scorers = {path: load_scorer(weights, device=device, dtype="fp32", decode=path)
               for path in ("exact", "draft", "tensor")}
    out: dict = {"device": device, "rows": len(rows.original), "sides": {}, "decode": {}}
    pooled: dict = {}
    for side in sides:
        folder = fixture_jpegs(fixture, work, side)
        got = {path: score_rows(s, rows, folder.joinpath)[0] for path, s in scorers.items()}
        out["decode"] = {path: s.decode for path, s in scorers.items()}
        out["sides"][side] = {path: drift(rows, got[path], got["exact"]) for path in ("draft", "tensor")}
        for path in ("draft", "tensor"):
            pooled.setdefault(path, []).append(out["sides"][side][path])
    out["all"] = {path: {"max_abs": max(d["max_abs"] for d in ds),
                         "pairs_in_order": sum(d["pairs_in_order"] for d in ds),
                         "pairs": sum(d["pairs"] for d in ds)} for path, ds in pooled.items()}
    return out


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']} ({m['usable_cpus']} CPUs usable), torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else ""), ""]
    speed = report.get("speed")
    if speed:
        lines.append(f"decode speed, {speed['images']} JPEGs of 768x768 (quality 90) to {speed['size']}px model input:")
        for path in ("exact", "draft"):
            r = speed[path]
            lines.append(f"  {path:<6} {r['ms_per_image_one_thread']:7.2f} ms/image on one thread, "
                         f"{r['images_per_s']:8.1f} images/s on {r['threads']} threads")
        r = speed.get("tensor")
        if r and "error" not in r:
            lines.append(f"  tensor {r['host_ms_per_image']:7.2f} ms/image on the host (read, header), "
                         f"{r['device_ms_per_image']:.2f} ms/image on {speed['device']} ({speed['decoder']}) in "
                         f"batches of {r['batch']} "
                         f"({r['images_per_s']:.1f} images/s)")
        elif r:
            lines.append(f"  tensor {r['error']}")
        one = {path: speed[path]["ms_per_image_one_thread"] for path in ("exact", "draft")}
        lines.append(f"  draft over exact, one thread: {one['exact'] / one['draft']:.2f}x faster")
        lines.append("")
    d = report.get("drift")
    if d and "error" not in d:
        lines.append(f"score drift against the exact path on the same JPEGs (fixture, {d['rows']} rows per size, fp32 "
                     f"on {d['device']}; decode paths {d['decode']}):")
        lines.append(f"  {'shorter side':<13} {'path':<7} {'max |diff|':>10} {'median':>8} {'pairs in order':>15}")
        for side, paths in d["sides"].items():
            for path, r in paths.items():
                lines.append(f"  {side:<13} {path:<7} {r['max_abs']:>10.4f} {r['median_abs']:>8.4f} "
                             f"{r['pairs_in_order']:>7}/{r['pairs']}")
        for path, r in d["all"].items():
            verdict = "below" if r["max_abs"] < ACCEPTED_FP16_DRIFT else "NOT below"
            lines.append(f"  all sizes, {path}: max |diff| {r['max_abs']:.4f}, {r['pairs_in_order']}/{r['pairs']} "
                         f"pairs in order: {verdict} the accepted fp16 drift ({ACCEPTED_FP16_DRIFT})")
    elif d:
        lines.append(f"drift: {d['error']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where the tensor path and the drift run: cpu (default), cuda")
    p.add_argument("--images", type=int, default=64, help="JPEGs in the speed part (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="tensor path batch (default 32)")
    p.add_argument("--threads", type=int, default=None, help="decode threads (default: the scorer's on this device)")
    p.add_argument("--sides", default=",".join(map(str, FIXTURE_SIDES)),
                   help="shorter sides of the fixture's JPEG versions (default 512,1024,2048)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: speed, drift")
    p.add_argument("--cache-dir", type=Path, default=None, help="bench.py's cache (default $MPS_BENCH_CACHE or "
                                                                "~/.cache/mps-cli-bench)")
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="the mps-tiny golden fixture folder")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mps_cli.devices import decode_workers, resolve_device
    from mps_cli.engine.decode import find_jpeg_decoder

    device = resolve_device(args.device)
    cache = check_outside_repo(args.cache_dir or default_cache_dir())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report: dict = {"machine": machine_info(device), "argv": sys.argv[1:]}
    if "speed" not in skip:
        log(f"decode speed: {args.images} JPEGs of 768x768")
        paths = make_images(cache / "images", args.images)
        threads = args.threads or decode_workers(device)
        speed = {"images": len(paths), "size": 224, "device": str(device),
                 "exact": time_host(paths, 224, False, threads), "draft": time_host(paths, 224, True, threads)}
        decode = find_jpeg_decoder(device)
        speed["tensor"] = time_tensor(paths, 224, device, args.batch_size, decode) if decode is not None \
            else {"error": f"no torchcodec or torchvision that decodes on {device} (the gpu extra)"}
        speed["decoder"] = getattr(decode, "backend", None)
        report["speed"] = speed
    if "drift" not in skip:
        log(f"drift on the fixture's JPEG versions, fp32 on {device}")
        sides = [int(s) for s in args.sides.split(",") if s.strip()]
        report["drift"] = measure_drift(args.fixture, cache / "fixture-jpegs", str(device), sides)
    report["table"] = render(report)
    print(report["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
