"""Speed and memory benchmark for mps-cli on a full-size (random-weight) ViT-H-14 MPS checkpoint.

Run it as ``python benchmarks/bench.py`` (``--help`` for options). It builds, once, in a user
cache directory (``$MPS_BENCH_CACHE``, else ``$XDG_CACHE_HOME/mps-cli-bench``, else
``~/.cache/mps-cli-bench``; never inside the repository) a 2 GB fp16 checkpoint in the
published layout with random weights (speed does not depend on the values) and a pool of
768x768 JPEGs (``bench_assets``), then measures (``bench_measure``):

* whole-pipeline throughput of ``Scorer.score`` on the JPEG paths (decode, preprocess, model)
  for {1 dimension, all 4} x each dtype the device runs natively (others are skipped, saying so);
* the naive baseline: the original evaluation procedure (batch 1; prompt and condition
  re-tokenised and re-encoded, vision tower re-run, for every image and every dimension),
  written with the library's model modules and its mask and score functions, in fp32;
* the FLOP-bound floor: matmul FLOPs per image counted from the config, divided by the
  matmul throughput of a large ``torch.mm`` measured in the same run at the same dtype;
* cold start in a fresh ``python -c`` (imports, weight load, first score) with the page
  cache warm, the time to read the weights file, ``mps --help`` wall time, and peak RSS of a
  process that loads and scores, against the weights' size at that dtype;
* each reduced dtype against fp32 on the golden tiny fixture (score differences, condition
  mask flips, image pairs in order), with the text side in fp32 and all in that dtype;
* ``--variants``: the first dtype's 4-dimension configuration again with one thing changed at a
  time (decode path, batch size, attention kernels, torch.compile), from the JPEG files and
  pre-decoded, each with its share of the floor, so that what each change gives is read off one run.

The table goes to stdout, progress to stderr, everything (a ``bench_report.Report``) to a JSON
file. Ratios (share of floor, speed-ups) are comparable only within one run: the machine may be
shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench_assets import (
    DEFAULT_FIXTURE,
    PROMPT,
    check_outside_repo,
    default_cache_dir,
    ensure_assets,
    log,
    weights_bytes_at,
)
from bench_measure import (
    MatmulProbe,
    cold_start,
    count_flops,
    fixture_accuracy,
    help_seconds,
    machine_info,
    naive_baseline,
    pipeline_throughput,
    predecoded,
    read_file_seconds,
    read_fresh_seconds,
    warm_imports,
)
from bench_report import Report, Row, evaluate_targets, render


def parse_args(argv=None) -> argparse.Namespace:
    from mps_cli.devices import DTYPES, parse_dtype
    from mps_cli.errors import DeviceError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images per throughput run (default 16)")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated: fp32, bf16, fp16 (default fp32,bf16); the text side stays fp32")
    p.add_argument("--slow-dtypes", action="store_true",
                   help="run dtypes the device does not run natively too (default: skip them, saying so)")
    p.add_argument("--batch-size", default="8",
                   help="batch size for Scorer.score (default 8); auto: the library's rule (on CUDA, free memory)")
    p.add_argument("--decode", default="auto",
                   help="decode path for the main rows (auto: the library's default on the device; exact, fast, "
                        "draft, tensor)")
    p.add_argument("--variants", default="",
                   help="comma-separated variants of the first dtype's 4-dim row, each KEY=VALUE joined by '+': "
                        "decode=exact|draft|tensor, batch=N, attention=math (SDPA's math kernels, the 'before' of "
                        "fused attention), compile=on|graphs; e.g. decode=exact,batch=128,attention=math")
    p.add_argument("--naive-images", type=int, default=2, help="images for the naive baseline (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration, best kept (default 1)")
    p.add_argument("--matmul-size", type=int, default=4096, help="square torch.mm size for the floor (default 4096)")
    p.add_argument("--matmul-reps", type=int, default=5, help="timed torch.mm runs, best kept (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2 images, batch 2, 1 naive image, two throughput configurations, "
                        "every measurement still exercised")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the checkpoint and images live (default $MPS_BENCH_CACHE or ~/.cache/mps-cli-bench)")
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="the mps-tiny golden fixture folder")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: main (the throughput rows), naive, cold, read (the file "
                        "reads), accuracy, help")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results here (default <cache>/results/bench-<time>.json)")
    args = p.parse_args(argv)
    try:
        args.dtypes = list(dict.fromkeys(parse_dtype(d) for d in args.dtypes.split(",") if d.strip()))
    except DeviceError as exc:
        p.error(str(exc))
    if not set(args.dtypes) <= set(DTYPES):
        p.error(f"--dtypes: expected some of {', '.join(DTYPES)}")
    try:
        args.batch_size = None if args.batch_size == "auto" else int(args.batch_size)
        args.variants = parse_variants(args.variants)
    except ValueError as exc:
        p.error(f"--batch-size or --variants: {exc}")
    if args.quick:
        args.images, args.batch_size, args.naive_images = 2, 2, 1
        args.matmul_reps = min(args.matmul_reps, 2)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.images < 1 or (args.batch_size or 1) < 1 or args.naive_images < 1 or args.repeats < 1:
        p.error("--images, --batch-size, --naive-images and --repeats must be at least 1")
    return args


VARIANT_KEYS = {"decode", "batch", "attention", "compile"}


def parse_variants(text: str) -> list[dict[str, str]]:
    """``decode=tensor+batch=128,attention=math`` as [{decode: tensor, batch: 128}, {attention: math}]."""
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        variant = {}
        for part in item.split("+"):
            key, sep, value = part.partition("=")
            if not sep or key not in VARIANT_KEYS:
                raise ValueError(f"{part!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(VARIANT_KEYS))}")
            variant[key] = value
        if "batch" in variant:
            int(variant["batch"])
        out.append(variant)
    return out


def attention_kernels(variant: dict):
    """The SDPA kernels a variant runs with: the math (unfused) ones for ``attention=math``, else torch's choice."""
    if variant.get("attention") != "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def configurations(args) -> list[tuple[str, int]]:
    """(dtype, number of dimensions) pairs to time; --quick keeps one per dtype, alternating 4 and 1."""
    if not args.quick:
        return [(dt, n) for dt in args.dtypes for n in (1, 4)]
    return [(dt, 4 if i % 2 == 0 else 1) for i, dt in enumerate(args.dtypes)]


def native_dtypes(args, device, report: Report) -> None:
    """Keep only the dtypes the device runs natively (unless --slow-dtypes); record each decision."""
    from mps_cli.devices import dtype_support

    kept = []
    for dt in args.dtypes:
        s = dtype_support(device, dt)
        report.dtype_support[dt] = {"native": s.native, "relative_speed": s.relative_speed, "basis": s.basis}
        if s.native is False and not args.slow_dtypes:
            speed = f" (its matmuls ran at {s.relative_speed:.3g}x fp32's speed on one core)" \
                if s.relative_speed else ""
            why = f"not native on this {device.type.upper()}{speed}; --slow-dtypes runs it anyway"
            report.skipped[dt] = why
            log(f"skipping {dt}: {why}")
        else:
            kept.append(dt)
    args.dtypes = kept


def measure_loading(args, ckpt: Path, pool: list[Path], cache: Path, report: Report) -> None:
    """File reads, then cold starts in fresh processes (while this process holds no model), and mps --help."""
    import torch

    from mps_cli.devices import resolve_precision

    if "read" not in args.skip:
        log("timing the weights file read")
        report.read_s = read_file_seconds(ckpt, report.read_reps)
        report.read_fresh_s = read_fresh_seconds(ckpt, report.read_reps)
    if "cold" not in args.skip:
        # Emptied here so the first cold start measures the converting load and the second the mapped one.
        shutil.rmtree(cache / "mps-cache" / "prepared", ignore_errors=True)
        warm_imports()
        for dt in args.dtypes:
            precision = resolve_precision(dt, torch.device(args.device))
            for runs, what in ((report.cold_first, "no prepared copy yet (the load writes it)"),
                               (report.cold_start, "prepared copy mapped")):
                log(f"cold start and peak RSS, {precision.label}, fresh process, {what}")
                c = cold_start(ckpt, pool, dt, args.device, args.batch_size)
                c["precision"] = precision.label
                c["weights_bytes"] = weights_bytes_at(ckpt, precision)
                runs[dt] = c
    report.help = {"error": "skipped"} if "help" in args.skip else help_seconds(5)


def measure_scoring(args, ckpt: Path, pool: list[Path], images: list[Path], cfg, mm: MatmulProbe,
                    report: Report) -> tuple[dict, dict | None]:
    """Throughput per (dtype, dimensions), the model alone on pre-decoded images, and the naive baseline."""
    from mps_cli import load_scorer
    from mps_cli.constants import DIMENSIONS
    from mps_cli.devices import DTYPES

    configs = [] if "main" in args.skip else configurations(args)
    pipeline: dict[tuple[str, int], dict] = {}
    naive = None
    run = {d for d, _ in configs} | ({"fp32"} if "naive" not in args.skip else set())
    for dt in sorted(run, key=DTYPES.index):
        log(f"loading the scorer, {dt}")
        scorer = load_scorer(ckpt, device=args.device, dtype=dt, decode=args.decode)
        args.decode_path = scorer.decode
        todo = [n for d, n in configs if d == dt]
        if todo:
            log(f"  warm-up: {args.batch_size} images, all dims")
            scorer.score([str(p) for p in pool[: args.batch_size]], PROMPT, dims=["all"], batch_size=args.batch_size)
        for n in todo:
            dims = list(DIMENSIONS[:n]) if n == 1 else ["all"]
            log(f"  Scorer.score: {len(images)} images, {n} dim(s), batch {args.batch_size}")
            before = mm.probe(dt)
            pipeline[(dt, n)] = pipeline_throughput(scorer, images, dims, args.batch_size, args.repeats)
            if n == max(todo):
                log(f"  Scorer.score: the same on pre-decoded {cfg.vision.image_size}px images (model alone)")
                pipeline[(dt, n)]["model_only"] = pipeline_throughput(
                    scorer, predecoded(images, cfg.vision.image_size), dims, args.batch_size, args.repeats)
            pipeline[(dt, n)]["matmul_gflops"] = max(before, mm.probe(dt))
        if dt == "fp32" and "naive" not in args.skip:
            log(f"  naive baseline: {args.naive_images} image(s) x {len(DIMENSIONS)} dims, batch 1, nothing cached")
            before = mm.probe(dt)
            naive = naive_baseline(scorer, pool[: args.naive_images], list(DIMENSIONS))
            naive["matmul_gflops"] = max(before, mm.probe(dt))
            # The naive procedure must compute the same scores as the pipeline, or it measures something else.
            ref = scorer.score([str(p) for p in pool[: args.naive_images]], PROMPT, dims=["all"], batch_size=1)
            naive["max_abs_vs_pipeline"] = max(abs(r.scores[d] - naive["scores"][r.image][d])
                                               for r in ref for d in DIMENSIONS)
            if naive["max_abs_vs_pipeline"] > 1e-2:
                report.notes.append(f"naive scores differ from Scorer.score by up to "
                                    f"{naive['max_abs_vs_pipeline']:.3g}: the baseline does not match the model")
        del scorer
        gc.collect()
    return pipeline, naive


def build_rows(args, pipeline: dict, naive: dict | None, fl, cfg, report: Report) -> None:
    for (dt, n), r in pipeline.items():
        floor = fl.per_image(n) / (r["matmul_gflops"] * 1e9)
        base = None if naive is None else naive["s_per_image_1dim" if n == 1 else "s_per_image_all"]
        labels = (f"Scorer.score {dt}, {n} dim{'s' if n > 1 else ''}, batch {args.batch_size}, "
                  f"decode {getattr(args, 'decode_path', args.decode)}",
                  f"  same, pre-decoded {cfg.vision.image_size}px images")
        for kind, m, label in zip(("pipeline", "model_only"), (r, r.get("model_only")), labels, strict=True):
            if m is None:
                continue
            report.rows.append(Row(
                kind=kind, dtype=dt, dims=n, batch=args.batch_size, label=label,
                s_per_image=m["s_per_image"], images_per_s=m["images_per_s"], floor_s_per_image=floor,
                share_of_floor=floor / m["s_per_image"], speedup_vs_naive=base / m["s_per_image"] if base else None,
                matmul_gflops=r["matmul_gflops"], others_cores=m["others_cores"],
                failed_or_nonfinite=m["failed_or_nonfinite"]))
        if floor > r["s_per_image"]:
            report.notes.append(f"{dt}, {n} dim(s) beat the floor: both matmul probes ran in busier "
                                "moments than the scoring did; rerun on a quieter machine")
        if r["failed_or_nonfinite"]:
            report.notes.append(f"{dt}, {n} dims: {r['failed_or_nonfinite']} results failed or were not finite")
    if naive is not None:
        for n, key in ((1, "s_per_image_1dim"), (4, "s_per_image_all")):
            floor = fl.per_image(n) / (naive["matmul_gflops"] * 1e9)
            report.rows.append(Row(
                kind="naive", dtype="fp32", dims=n, batch=1,
                label=f"naive fp32, {n} dim{'s' if n > 1 else ''}, batch 1 ({naive['images']} img)",
                s_per_image=naive[key], images_per_s=1 / naive[key], floor_s_per_image=floor,
                share_of_floor=floor / naive[key], speedup_vs_naive=1.0, matmul_gflops=naive["matmul_gflops"],
                others_cores=naive["others_cores"]))
        report.naive = {k: v for k, v in naive.items() if k != "scores"}
    report.pipeline_scores_sample = {f"{dt}/{n}": dict(list(r["scores"].items())[:2])
                                     for (dt, n), r in pipeline.items()}


def measure_variants(args, ckpt: Path, pool: list[Path], images: list[Path], cfg, fl, mm: MatmulProbe,
                     report: Report) -> None:
    """The first dtype's 4-dimension configuration with one change per variant: JPEG files and pre-decoded rows."""
    from mps_cli import load_scorer

    dt = args.dtypes[0]
    base = {"decode": args.decode, "batch": str(args.batch_size), "compile": "off"}
    pre = predecoded(images, cfg.vision.image_size)
    for variant in args.variants:
        v = {**base, **variant}
        batch = int(v["batch"])
        name = "+".join(f"{k}={x}" for k, x in variant.items())
        log(f"variant {name}: loading the scorer, {dt}")
        try:
            scorer = load_scorer(ckpt, device=args.device, dtype=dt, decode=v["decode"], compile=v["compile"],
                                 batch_size=batch)
        except Exception as exc:  # a variant the machine cannot run (compile without a compiler, graphs on CPU)
            report.notes.append(f"variant {name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        label = f"  variant {name} (decode {scorer.decode}, batch {batch})"
        with attention_kernels(v):
            scorer.score([str(p) for p in pool[:batch]], PROMPT, dims=["all"], batch_size=batch)
            before = mm.probe(dt)
            files = pipeline_throughput(scorer, images, ["all"], batch, args.repeats)
            decoded = pipeline_throughput(scorer, pre, ["all"], batch, args.repeats)
            gflops = max(before, mm.probe(dt))
        floor = fl.per_image(4) / (gflops * 1e9)
        for kind, m, suffix in (("variant", files, ", JPEG files"), ("variant_model_only", decoded, ", pre-decoded")):
            report.rows.append(Row(
                kind=kind, dtype=dt, dims=4, batch=batch, label=label + suffix, s_per_image=m["s_per_image"],
                images_per_s=m["images_per_s"], floor_s_per_image=floor, share_of_floor=floor / m["s_per_image"],
                speedup_vs_naive=None, matmul_gflops=gflops, others_cores=m["others_cores"],
                failed_or_nonfinite=m["failed_or_nonfinite"]))
        del scorer
        gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from mps_cli.constants import CACHE_ENV
    from mps_cli.devices import DTYPES, resolve_device, resolve_precision
    from mps_cli.weights.config import builtin_config

    device = resolve_device(args.device)
    if args.batch_size is None:  # the library's own rule for this device, model and first dtype
        from mps_cli.devices import default_batch_size
        from mps_cli.engine.scorer import activation_bytes

        args.batch_size = default_batch_size(device, activation_bytes(builtin_config(),
                                                                      resolve_precision(args.dtypes[0], device)))
        log(f"batch size auto: {args.batch_size}")
    cache = check_outside_repo(args.cache_dir or default_cache_dir())
    # The library's own cache (prepared weights) goes beside the benchmark's, never to ~/.cache.
    os.environ[CACHE_ENV] = str(cache / "mps-cache")
    started = time.time()
    cfg = builtin_config()
    fl = count_flops(cfg)
    requested = list(args.dtypes)
    report = Report(
        machine=machine_info(device), args={}, checkpoint="", checkpoint_bytes=0, images=0,
        flops={**asdict(fl), "per_image_1": fl.per_image(1), "per_image_4": fl.per_image(4)})
    native_dtypes(args, device, report)
    ckpt, pool = ensure_assets(cache, max(args.images, args.naive_images, args.batch_size), args.rebuild, args.device)
    images = pool[: args.images]
    report.args = {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                   for k, v in vars(args).items()}
    report.args["dtypes_requested"] = requested
    report.checkpoint, report.checkpoint_bytes, report.images = str(ckpt), ckpt.stat().st_size, len(images)

    measure_loading(args, ckpt, pool, cache, report)
    log(f"matmul throughput ({args.matmul_size}^2 torch.mm, best of {args.matmul_reps})")
    mm = MatmulProbe(device, args.matmul_size, args.matmul_reps)
    for dt in sorted(set(args.dtypes) | {"fp32"}, key=DTYPES.index):
        mm.probe(dt)
    pipeline, naive = measure_scoring(args, ckpt, pool, images, cfg, mm, report)
    build_rows(args, pipeline, naive, fl, cfg, report)
    if args.variants:
        measure_variants(args, ckpt, pool, images, cfg, fl, mm, report)
    report.matmul_samples = mm.samples
    report.matmul_desc = (f"{args.matmul_size}x{args.matmul_size} torch.mm, best of {args.matmul_reps} "
                          "per probe; each row's floor uses the better of the probes just before and after it")
    report.cpu_default_dtype = resolve_precision("auto", torch.device("cpu")).label
    if "accuracy" not in args.skip:
        log(f"fixture accuracy (tiny checkpoint) on {args.device}")
        report.accuracy = fixture_accuracy(args.fixture, args.dtypes, args.device)
    report.targets = evaluate_targets(report, args.batch_size)
    report.elapsed_s = time.time() - started

    out = args.json or cache / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved before rendering too, so a long run's numbers survive a formatting error.
    out.write_text(json.dumps(report.to_json(), indent=2, default=str))
    text = render(report)
    print(text)
    out.write_text(json.dumps({**report.to_json(), "table": text}, indent=2, default=str))
    log(f"results written to {out} ({report.elapsed_s:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
