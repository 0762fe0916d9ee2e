"""Where the differentiable reward's backward spends its time, per dtype: a torch.profiler table and the suspects.

Run it as ``python benchmarks/profile_reward.py --device cuda`` (``--help`` for options). On the H200 run of
2026-11-27 the fp16 forward + backward cost 18x the forward and bf16 2.2x, with the same op list (read off
this profiler on CPU): the dtypes differ only in the kernels chosen. Per dtype it reports

* forward alone and forward + backward of ``reward.loss(images, prompt)`` (B x 3 x 512 x 512 in [0, 1]),
  best of ``--repeats``, and the ops with the most self time in one profiled step (device time on CUDA),
  with a Chrome trace per dtype in ``--out``;
* the same step with each attention backend forced in turn (flash, efficient, cudnn, math): a backend
  slow in one dtype's backward shows as the one row that is fast when it is excluded;
* the patch embedding's gradient alone, as the convolution cuDNN runs and as the matmul the model now
  runs (``mps_cli.engine.model.patch_embedding``), and the preprocessing's (two-pass bicubic in fp32).

``--tiny`` profiles the golden fixture's tiny model instead of the full-size one (a CPU dry run: op
lists, not timings). fp16 is run on CPU only with ``--tiny``: the CPU does not run it natively.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "a watercolor painting of a lighthouse on a rocky coast at sunset"
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def log(msg: str) -> None:
    print(f"[profile_reward {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best_of(fn, repeats: int, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def top_ops(prof, device, n: int) -> list[dict]:
    """The ops with the most self time (device time on CUDA, CPU time elsewhere) in a profiled step."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1
    return [{"op": e.key, "calls": e.count, "ms": getattr(e, attr) / 1000, "share": getattr(e, attr) / total}
            for e in events[:n]]


def profile_dtype(weights: str, device, dtype: str, batch: int, size: int, repeats: int, out: Path | None,
                  n_ops: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from mps_cli import load_reward
    from mps_cli.engine.model import patch_embedding
    from mps_cli.reward import preprocess_images

    reward = load_reward(weights, device=str(device), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    with torch.no_grad():
        reward(images[:1], PROMPT)  # text features cached, as in a training loop

    def step():
        x = images.clone().requires_grad_()
        reward.loss(x, PROMPT).backward()

    def forward():
        with torch.no_grad():
            reward(images, PROMPT)

    row: dict = {"dtype": dtype, "batch": batch, "image_size": size,
                 "fwd_s": best_of(forward, repeats, device), "fwd_bwd_s": best_of(step, repeats, device)}
    row["ratio"] = row["fwd_bwd_s"] / row["fwd_s"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    row["top_ops"] = top_ops(prof, device, n_ops)
    if out is not None:
        trace = out / f"reward-trace-{dtype.replace('/', '_')}.json"
        prof.export_chrome_trace(str(trace))
        row["trace"] = str(trace)
    if device.type == "cuda":  # GPU only: the attention kernels are chosen per device
        row["by_backend"] = {}
        for name in BACKENDS:
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    row["by_backend"][name] = best_of(step, repeats, device)
            except RuntimeError as exc:  # that backend cannot run these shapes or dtypes
                row["by_backend"][name] = f"cannot run: {' '.join(str(exc).split())[:120]}"
    # The two pieces outside the transformer: the patch embedding and the bicubic preprocessing.
    conv = reward.model.visual.conv1
    px = torch.rand(batch, 3, 224, 224, generator=gen).to(device, reward.dtype)

    def conv_grad():
        x = px.clone().requires_grad_()
        torch.nn.functional.conv2d(x, conv.weight, stride=conv.stride).float().square().sum().backward()

    def matmul_grad():
        x = px.clone().requires_grad_()
        patch_embedding(x, conv).float().square().sum().backward()

    def preprocess_grad():
        x = images.clone().requires_grad_()
        preprocess_images(x, 224).square().sum().backward()

    row["patch_conv_fwd_bwd_s"] = best_of(conv_grad, repeats, device)
    row["patch_matmul_fwd_bwd_s"] = best_of(matmul_grad, repeats, device)
    row["preprocess_fwd_bwd_s"] = best_of(preprocess_grad, repeats, device)
    return row


def render(report: dict) -> str:
    lines = [f"machine: {report['machine']}", f"model: {report['weights']}", ""]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['dtype']}: {r['error']}")
            continue
        lines.append(f"{r['dtype']}, batch {r['batch']} of {r['image_size']}px: forward {r['fwd_s'] * 1000:.1f} ms, "
                     f"forward + backward {r['fwd_bwd_s'] * 1000:.1f} ms ({r['ratio']:.2f}x the forward)")
        ms = {k: r[k] * 1000 for k in ("patch_conv_fwd_bwd_s", "patch_matmul_fwd_bwd_s", "preprocess_fwd_bwd_s")}
        lines.append(f"  patch embedding fwd+bwd: as a convolution (cuDNN on CUDA) {ms['patch_conv_fwd_bwd_s']:.2f} "
                     f"ms, as the model's matmul {ms['patch_matmul_fwd_bwd_s']:.2f} ms; bicubic preprocessing "
                     f"fwd+bwd (fp32) {ms['preprocess_fwd_bwd_s']:.2f} ms")
        for name, t in r.get("by_backend", {}).items():
            lines.append(f"  attention forced to {name:<20} " + (f"{t * 1000:.1f} ms" if isinstance(t, float) else t))
        lines.append("  top ops by self time in one forward + backward:")
        for op in r["top_ops"]:
            lines.append(f"    {op['ms']:9.2f} ms {op['share']:6.1%} x{op['calls']:<5} {op['op'][:90]}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: fp16,bf16 on CUDA; fp32,bf16 on CPU, "
                                                  "plus fp16 with --tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4, as bench_reward.py)")
    p.add_argument("--image-size", type=int, default=512, help="input side before the resize (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default 3)")
    p.add_argument("--ops", type=int, default=15, help="ops listed per dtype (default 15)")
    p.add_argument("--tiny", action="store_true", help="the golden fixture's tiny model (a CPU dry run)")
    p.add_argument("--fixture", type=Path, default=None, help="the mps-tiny fixture folder (with --tiny)")
    p.add_argument("--cache-dir", type=Path, default=None, help="bench.py's cache (default $MPS_BENCH_CACHE or "
                                                                "~/.cache/mps-cli-bench)")
    p.add_argument("--out", type=Path, default=None, help="folder for the Chrome traces")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from bench_assets import DEFAULT_FIXTURE, check_outside_repo, default_cache_dir, ensure_assets
    from bench_reward import machine_line
    from mps_cli.devices import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.tiny:
        weights = str((args.fixture or DEFAULT_FIXTURE) / "mps-tiny.safetensors")
    else:
        cache = check_outside_repo(args.cache_dir or default_cache_dir())
        weights = str(ensure_assets(cache, 1, rebuild=False, device=args.device)[0])
    dtypes = (args.dtypes or ("fp16,bf16" if cuda else "fp32,bf16,fp16" if args.tiny else "fp32,bf16")).split(",")
    if not cuda and not args.tiny and "fp16" in dtypes:
        raise SystemExit("profile_reward: fp16 is not native on a CPU; profile it there only with --tiny")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dt in dtypes:
        log(f"{dt}: batch {args.batch_size}")
        try:
            rows.append(profile_dtype(weights, device, dt, args.batch_size, args.image_size, args.repeats, args.out,
                                      args.ops))
        except Exception as exc:  # one dtype's failure is that row's, the others still run
            rows.append({"dtype": dt, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
    report = {"machine": machine_line(args.device), "weights": weights, "rows": rows, "argv": sys.argv[1:]}
    report["table"] = render(report)
    print(report["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
