"""Forward + backward cost of the differentiable MPS reward on a full-size (random-weight) ViT-H-14 model.

Run it as ``python benchmarks/bench_reward.py`` (``--help`` for options). It reuses the
checkpoint that ``bench.py`` builds once in its cache (``$MPS_BENCH_CACHE``, else
``~/.cache/mps-cli-bench``), then for each dtype, with and without gradient checkpointing,
in a fresh process each:

* seconds per image of ``reward.loss(images, prompt).backward()`` at the given batch
  (images B x 3 x S x S in [0, 1], requiring grad; the prompt's text features cached
  first, as in a training loop), best of ``--repeats`` after one warm-up;
* seconds per image of the same forward without gradient (the score alone), for the ratio;
* peak memory of one forward + backward above what the loaded model holds: on CPU the
  process's peak RSS (``VmHWM``, reset just before) minus its RSS before; on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before.

A dtype the CPU cannot run natively is skipped: bf16 runs only where a small bf16 matmul is
at most 3x slower than fp32 (on CPUs without bf16 instructions it is emulated and far slower).
The table goes to stdout, progress to stderr, and ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = ("a watercolor painting of a lighthouse on a rocky coast at sunset, "
          "soft golden light, detailed waves and seagulls")


def log(msg: str) -> None:
    print(f"[bench_reward {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_line(device: str) -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
    if device.startswith("cuda"):
        line += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line


def rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(ckpt: str, device: str, dtype: str, checkpointing: bool, batch: int, size: int,
            repeats: int, forward_only: bool) -> dict:
    """One configuration, in this process (the worker)."""
    import torch

    from mps_cli import load_reward

    t = time.perf_counter()
    reward = load_reward(ckpt, device=device, dtype=dtype, grad_checkpointing=checkpointing)
    dev = reward.device
    load_s = time.perf_counter() - t

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(dev)
    with torch.no_grad():
        reward(images[:1], PROMPT)  # text features cached, kernels initialised
    sync()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        import gc

        gc.collect()
        peak_ok = reset_peak_rss()
        base = rss_bytes("VmRSS")

    def step() -> float:
        x = images.clone().requires_grad_()
        sync()
        t = time.perf_counter()
        reward.loss(x, PROMPT).backward()
        sync()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        return time.perf_counter() - t

    first = step()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = rss_bytes("VmHWM") - base if peak_ok and base is not None else None
    times = [step() for _ in range(repeats)] if repeats else [first]
    out = {"dtype": dtype, "checkpointing": checkpointing, "batch": batch, "image_size": size,
           "load_s": load_s, "first_s": first, "fwd_bwd_s": min(times), "fwd_bwd_per_image_s": min(times) / batch,
           "peak_extra_bytes": peak, "model_rss_bytes": base if dev.type == "cpu" else None}
    if forward_only:
        fwd = []
        for _ in range(max(repeats, 1)):
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                reward(images, PROMPT)
            sync()
            fwd.append(time.perf_counter() - t)
        out["fwd_s"] = min(fwd)
        out["fwd_per_image_s"] = min(fwd) / batch
    return out


def run_worker(config: dict, timeout: float) -> dict:
    """``measure`` in a fresh process, so that each configuration's peak memory is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**config, "error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def render(report: dict) -> str:
    lines = [f"machine: {report['machine']}", f"model: {report['checkpoint']} (random weights, ViT-H-14 MPS)", ""]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["notes"]:
        lines.append("")
    lines.append(f"{'dtype':<6} {'checkpointing':<14} {'batch':>5} {'fwd+bwd s/img':>14} {'fwd s/img':>10} "
                 f"{'fwd+bwd/fwd':>11} {'peak extra':>12} {'load s':>7}")
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['dtype']:<6} {'on' if r['checkpointing'] else 'off':<14} {r['error']}")
            continue
        fwd = r.get("fwd_per_image_s")
        ratio = f"{r['fwd_bwd_per_image_s'] / fwd:.2f}x" if fwd else "-"
        fwd_s = f"{fwd:.3f}" if fwd else "-"
        lines.append(f"{r['dtype']:<6} {'on' if r['checkpointing'] else 'off':<14} {r['batch']:>5} "
                     f"{r['fwd_bwd_per_image_s']:>14.3f} {fwd_s:>10} {ratio:>11} "
                     f"{gib(r['peak_extra_bytes']):>12} {r['load_s']:>7.1f}")
    by = {(r["dtype"], r["checkpointing"]): r for r in report["rows"] if "error" not in r}
    summary = []
    for dtype in report["dtypes"]:
        off, on = by.get((dtype, False)), by.get((dtype, True))
        if off and on and off["peak_extra_bytes"] and on["peak_extra_bytes"]:
            summary.append(f"{dtype}: checkpointing keeps {on['peak_extra_bytes'] / off['peak_extra_bytes']:.0%} of "
                           f"the peak for {on['fwd_bwd_s'] / off['fwd_bwd_s']:.2f}x the time")
    return "\n".join(lines + ([""] + summary if summary else []))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32, bf16, fp16 (default: fp32,bf16 on CPU, "
                                                  "fp16,bf16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward + backward (default 4)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the input images before the resize (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up, best kept (default 3)")
    p.add_argument("--quick", action="store_true", help="the warm-up run is the only timed run (CPU smoke check)")
    p.add_argument("--cache-dir", type=Path, default=None, help="bench.py's cache (default $MPS_BENCH_CACHE or "
                                                                "~/.cache/mps-cli-bench)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration (default 3600)")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        c = json.loads(args.worker)
        print(json.dumps(measure(**c)))
        return 0

    sys.path.insert(0, str(HERE))
    from bench_assets import check_outside_repo, default_cache_dir, ensure_assets

    cache = check_outside_repo(args.cache_dir or default_cache_dir())
    os.environ.setdefault("MPS_CACHE_DIR", str(cache / "mps-cache"))
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtypes or ("fp16,bf16" if cuda else "fp32,bf16")).split(",")
    notes = []
    if not cuda:
        from mps_cli.devices import dtype_support, resolve_device

        # Never run a dtype this CPU only emulates: the library's own native decision (probe + flags).
        for dt in [d for d in dtypes if d != "fp32"]:
            support = dtype_support(resolve_device("cpu"), dt)
            speed = f"{support.relative_speed:.2f}x the fp32 speed" if support.relative_speed else "not measured"
            if support.native is False:
                dtypes.remove(dt)
                notes.append(f"{dt} skipped: not native on this CPU ({speed}, decided by {support.basis})")
            else:
                notes.append(f"{dt}: native on this CPU ({speed})")
    ckpt, _ = ensure_assets(cache, 1, rebuild=False, device=args.device)
    rows = []
    for dtype in dtypes:
        for checkpointing in (False, True):
            log(f"{dtype}, checkpointing {'on' if checkpointing else 'off'}: batch {args.batch_size}")
            config = {"ckpt": str(ckpt), "device": args.device, "dtype": dtype, "checkpointing": checkpointing,
                      "batch": args.batch_size, "size": args.image_size, "repeats": 0 if args.quick else args.repeats,
                      "forward_only": not checkpointing}
            row = run_worker(config, args.timeout)
            log(f"  error: {row['error']}" if "error" in row else f"  {row['fwd_bwd_per_image_s']:.3f} s/image")
            rows.append(row)
    report = {"machine": machine_line(args.device), "checkpoint": str(ckpt), "dtypes": dtypes, "notes": notes,
              "rows": rows, "argv": sys.argv[1:]}
    report["table"] = render(report)
    print(report["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
