"""Throughput and latency of ``mps serve`` against the in-process scorer on the same images.

Starts a real ``mps serve`` on 127.0.0.1 (a free port), then for 1, 4 and 16 concurrent clients
(threads in this process, each sending requests of ``--per-request`` images through
``mps_cli.client.Client``) measures images/s and per-request latency (p50, p99); the baseline is
``Scorer.score`` in this process on the same images with the server's batch size. Also times
``mps score --server URL`` for one image (wall clock, a fresh process each time).

    python benchmarks/bench_serve.py                     # the tiny fixture checkpoint, CPU
    python benchmarks/bench_serve.py --server-cpus 0     # scorer on CPU 0 (both ways), clients on the rest
    python benchmarks/bench_serve.py --weights W.safetensors --device cuda --images 512 --per-request 8

The default model is the 1.8 MB fixture checkpoint (``../shared/fixtures/mps-tiny``), where a
batch costs milliseconds and the HTTP path is as visible as it can be; real weights make the
model's share larger and the server's relative overhead smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("MPS_SHARED", REPO.parent / "shared")) / "fixtures" / "mps-tiny"
PROMPT = "a red fox sitting in a snowy forest at dawn, highly detailed"


def log(msg: str) -> None:
    print(f"bench_serve: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def mps_exe() -> list[str]:
    exe = shutil.which("mps", path=str(Path(sys.executable).parent)) or shutil.which("mps")
    return [exe] if exe else [sys.executable, "-m", "mps_cli"]


def own_cpu() -> float:
    """CPU seconds this process (all its threads) has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds another process (all its threads) has used, from /proc (0.0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_list(text: str) -> set[int]:
    """``0,2-3`` as {0, 2, 3}."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def in_process(args, paths: list[Path]) -> dict:
    """Scorer.score on the same images, batch size = the server's --max-batch; best of the repeats.

    Timed on the main thread and on a worker thread (where the server runs its model): on a
    shared, oversubscribed CPU the two can differ a lot, and the fair baseline is the faster one.
    """
    from mps_cli import load_scorer

    scorer = load_scorer(args.weights, config=args.config, device=args.device, dtype=args.dtype)
    scorer.score(paths[: args.max_batch], PROMPT, batch_size=args.max_batch)  # warm-up
    out: dict = {"cpu_ms_per_image": None}
    for where in ("main thread", "worker thread"):
        best, best_cpu = float("inf"), None
        for _ in range(args.repeats):
            def run():
                nonlocal best, best_cpu
                c, t = own_cpu(), time.perf_counter()
                scorer.score(paths, PROMPT, batch_size=args.max_batch)
                dt, dc = time.perf_counter() - t, own_cpu() - c
                if dt < best:
                    best, best_cpu = dt, dc
            if where == "main thread":
                run()
            else:
                th = threading.Thread(target=run)
                th.start()
                th.join()
        out[where] = len(paths) / best
        cpu = best_cpu / len(paths) * 1000
        out["cpu_ms_per_image"] = cpu if out["cpu_ms_per_image"] is None else min(out["cpu_ms_per_image"], cpu)
        log(f"in-process ({where}): {out[where]:.1f} images/s, {cpu:.2f} ms CPU per image")
    return out


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [*mps_exe(), "serve", "--port", str(port), "--device", args.device, "--dtype", args.dtype,
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    if args.config:
        cmd += ["--config", str(args.config)]
    env, pin = dict(os.environ), None
    if args.server_cpus:
        env["OMP_NUM_THREADS"] = str(len(args.server_cpus))
        pin = lambda: os.sched_setaffinity(0, args.server_cpus)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, preexec_fn=pin)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited with {proc.returncode}; run `{' '.join(cmd)}` to see why")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench_serve: the server did not start in 10 minutes")


def through_server(url: str, blobs: list[bytes], clients: int, per_request: int, server_pid: int = 0) -> dict:
    """All images once, in requests of ``per_request`` images, from ``clients`` threads pulling from one queue.

    Also the CPU both sides spent per image: the server process's and this process's (the clients').
    """
    from mps_cli.client import Client

    requests = [blobs[i:i + per_request] for i in range(0, len(blobs), per_request)]
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    next_request = iter(range(len(requests)))

    def work() -> None:
        c = Client(url, batch_size=per_request)
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            t = time.perf_counter()
            got = c.score(requests[i], PROMPT)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                failures.extend(r.error for r in got if r.error)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    cpu_server, cpu_clients, t0 = process_cpu(server_pid), own_cpu(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    cpu_server, cpu_clients = process_cpu(server_pid) - cpu_server, own_cpu() - cpu_clients
    if failures:
        raise SystemExit(f"bench_serve: {len(failures)} images failed, e.g. {failures[0]}")
    return {"clients": clients, "images_per_s": len(blobs) / wall, "requests": len(requests),
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "server_cpu_ms_per_image": cpu_server / len(blobs) * 1000,
            "client_cpu_ms_per_image": cpu_clients / len(blobs) * 1000}


def cli_wall(url: str, image: Path, reps: int) -> list[float]:
    times = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for _ in range(reps):
        t = time.perf_counter()
        proc = subprocess.run([*mps_exe(), "score", str(image), "--prompt", PROMPT, "--json", "--server", url],
                              capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise SystemExit(f"bench_serve: mps score --server failed: {proc.stderr.strip()}")
    return times


def help_wall(reps: int) -> list[float]:
    """`mps --help` wall time: the floor of any `mps` command's start-up on this machine, for comparison."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([*mps_exe(), "--help"], capture_output=True)
        times.append(time.perf_counter() - t)
    return times


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=FIXTURE / "mps-tiny.safetensors")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--images", type=int, default=None,
                   help="images per measurement (default 512 on CPU, 2048 on a GPU, where 512 last about a second)")
    p.add_argument("--per-request", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2, help="runs per row; the best is kept (default 2)")
    p.add_argument("--cli-reps", type=int, default=5)
    p.add_argument("--server-cpus", default=None,
                   help="CPUs for the scoring side, e.g. 0 or 0-3: the server process and the in-process "
                        "baseline run there (torch threads = their number) and the clients on the other CPUs, "
                        "as when trainers call from other hosts (default: everything shares every CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.server_cpus:
        args.server_cpus = cpu_list(args.server_cpus)
        client_cpus = os.sched_getaffinity(0) - args.server_cpus
        if not client_cpus:
            raise SystemExit("bench_serve: --server-cpus leaves no CPU for the clients")
        # Set before torch loads, so its threads (and the decoding threads) inherit the scoring side's CPUs.
        os.environ["OMP_NUM_THREADS"] = str(len(args.server_cpus))
        os.sched_setaffinity(0, args.server_cpus)
    if args.images is None:
        args.images = 512 if args.device == "cpu" else 2048
    sources = sorted((FIXTURE / "images").iterdir())
    paths = [sources[i % len(sources)] for i in range(args.images)]
    blobs = [p.read_bytes() for p in paths]
    log(f"{args.images} images, {args.per_request} per request, model {args.weights}, {args.device}")
    base = in_process(args, paths)
    if args.server_cpus:
        os.sched_setaffinity(0, client_cpus)  # the client threads, started from here on
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    rows = []
    try:
        through_server(url, blobs[: args.max_batch], 4, args.per_request)  # warm-up
        for c in (int(x) for x in args.clients.split(",")):
            best = None
            for _ in range(args.repeats):
                row = through_server(url, blobs, c, args.per_request, server.pid)
                if best is None or row["images_per_s"] > best["images_per_s"]:
                    best = row
            log(f"{c} clients: {best['images_per_s']:.1f} images/s, p50 {best['p50_ms']:.1f} ms, "
                f"p99 {best['p99_ms']:.1f} ms")
            rows.append(best)
        from mps_cli.client import Client

        batching = Client(url).info()["batching"]
        cli = cli_wall(url, sources[0], args.cli_reps)
        helps = help_wall(args.cli_reps)
    finally:
        server.terminate()
        server.wait(60)
    ref = max(base["main thread"], base["worker thread"])
    where = (f"scoring side on CPUs {sorted(args.server_cpus)} (torch threads {len(args.server_cpus)}), clients on "
             f"CPUs {sorted(client_cpus)}" if args.server_cpus else "torch threads: default; everything on every CPU")
    print(f"CPU: {cpu_name()}; {where}; model: {args.weights.name}, device {args.device}")
    print(f"in-process Scorer.score, batch {args.max_batch}: main thread {base['main thread']:.1f} images/s, "
          f"worker thread {base['worker thread']:.1f} images/s (reference: the faster, {ref:.1f})")
    print(f"server: --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}, {args.per_request} images "
          "per request")
    print("| clients | images/s | vs in-process | p50 ms/request | p99 ms/request | server CPU ms/image "
          "| clients' CPU ms/image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['clients']} | {r['images_per_s']:.1f} | {100 * r['images_per_s'] / ref:.0f}% | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cpu_ms_per_image']:.2f} | "
              f"{r['client_cpu_ms_per_image']:.2f} |")
    print(f"in-process CPU per image: {base['cpu_ms_per_image']:.2f} ms (the server's CPU per image above "
          "includes the HTTP path; where clients share the server's CPUs, theirs is taken from it too)")
    print(f"server batching over the run: {batching['batches']} batches, mean {batching['mean_batch_size']:.1f} "
          f"images, largest {batching['largest_batch']}")
    print(f"`mps score --server` for one image, wall: median {statistics.median(cli):.3f} s, "
          f"best {min(cli):.3f} s over {len(cli)} runs; `mps --help` in the same minute: median "
          f"{statistics.median(helps):.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "in_process": base, "server": rows,
                                         "batching": batching, "cli_wall_s": cli, "help_wall_s": helps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
