"""Throughput and latency of ``mps serve`` against the in-process scorer on the same images.

Starts a real ``mps serve`` on 127.0.0.1 (a free port), then for 1, 4 and 16 concurrent clients
(threads in this process, each sending requests of ``--per-request`` images through
``mps_cli.client.Client``) measures images/s and per-request latency (p50, p99); the baseline is
``Scorer.score`` in this process on the same images with the server's batch size. Also times
``mps score --server URL`` for one image (wall clock, a fresh process each time).

    python benchmarks/bench_serve.py                     # the tiny fixture checkpoint, CPU
    python benchmarks/bench_serve.py --server-cpus 0     # scorer on CPU 0 (both ways), clients on the rest
    python benchmarks/bench_serve.py --weights W.safetensors --device cuda --images 512 --per-request 8
    python benchmarks/bench_serve.py --trainer           # a trainer's load: batches of 16 and 64 arrays of 512²

``--trainer`` measures what an RL trainer's reward client sees instead: rollout batches of
``--batch-sizes`` raw uint8 arrays of 512 x 512 (``POST /v1/batch``, one request per batch) from
``--workers`` concurrent rollout workers (``Client.submit`` from each), with images/s and per-batch
latency (p50, p99), against ``Scorer.score`` in this process on the same images and batches; then the
overlap the async client gains: one rollout loop that "generates" each batch (a sleep as long as
scoring a batch in-process takes, standing in for the sampler on its GPU) and scores it, first one
after the other, then with ``--in-flight`` batches scored while the next are generated
(``Client.submit`` and ``AsyncClient``).

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


# --------------------------------------------------------------------------- --trainer


def rollout_images(count: int, size: int = 512) -> list:
    """``count`` distinct size x size x 3 uint8 arrays, as a sampler hands them over (the fixture's images,
    resized, with seeded noise so that no two are alike)."""
    import numpy as np
    from PIL import Image

    sources = [Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
               for p in sorted((FIXTURE / "images").iterdir())]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        base = np.asarray(sources[i % len(sources)], dtype=np.int16)
        out.append(np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8))
    return out


def trainer_in_process(scorer, images: list, batch: int, max_batch: int) -> tuple[float, list[float]]:
    """``Scorer.score`` on the images, one call per rollout batch (an in-process reward): (wall, latencies)."""
    latencies, t0 = [], time.perf_counter()
    for s in range(0, len(images), batch):
        t = time.perf_counter()
        scorer.score(images[s:s + batch], PROMPT, dims=DIMS, batch_size=max_batch)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - t0, latencies


def _row(batch: int, n: int, wall: float, latencies: list[float], **extra) -> dict:
    return {"batch": batch, **extra, "images_per_s": n / wall, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "batch_s": statistics.median(latencies)}


def _rollout_workers(url: str, batches: list, workers: int) -> tuple[float, list[float]]:
    """Every rollout batch once, from ``workers`` rollout threads pulling batches from one queue; each sends its
    batch with ``Client.submit`` and waits for it, as a synchronous rollout step does: (wall, latencies)."""
    from mps_cli.client import Client

    lock, latencies, failures = threading.Lock(), [], []
    todo = iter(range(len(batches)))

    def work() -> None:
        client = Client(url, max_in_flight=1)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t = time.perf_counter()
            got = client.submit(batches[i], PROMPT, dims=DIMS, reward=REWARD).result()
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                failures.extend(r.error for r in got if r.error)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        raise SystemExit(f"bench_serve: {len(failures)} images failed, e.g. {failures[0]}")
    return time.perf_counter() - t0, latencies


def trainer_overlap(url: str, arrays: list, batch: int, steps: int, generate_s: float, in_flight: int,
                    repeats: int) -> dict:
    """One rollout loop of ``steps`` batches, each "generated" for ``generate_s`` (a sleep: the sampler's GPU
    time) then scored: sequentially, with Client.submit and with AsyncClient keeping ``in_flight`` in flight.
    The three loops alternate, ``repeats`` times; the best of each is kept."""
    batches = [arrays[(k * batch) % len(arrays):][:batch] for k in range(steps)]
    loops = {"sequential": _sequential_loop, "submit": _submit_loop, "async": _async_loop}
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, loop in loops.items():
            wall = loop(url, batches, generate_s, in_flight)
            best[name] = min(best.get(name, wall), wall)
    score_s = max(best["sequential"] / steps - generate_s, 1e-9)  # one batch's scoring, seen from the loop
    return {"batch": batch, "steps": steps, "generate_s": generate_s, "in_flight": in_flight,
            "sequential_s": best["sequential"], "submit_s": best["submit"], "async_s": best["async"],
            "submit_gain": best["sequential"] / best["submit"], "async_gain": best["sequential"] / best["async"],
            "ideal_gain": (generate_s + score_s) / max(generate_s, score_s)}


def _sequential_loop(url: str, batches: list, generate_s: float, in_flight: int) -> float:
    from mps_cli.client import Client

    client, t0 = Client(url), time.perf_counter()
    for b in batches:
        time.sleep(generate_s)
        client.submit(b, PROMPT, dims=DIMS, reward=REWARD).result()
    return time.perf_counter() - t0


def _submit_loop(url: str, batches: list, generate_s: float, in_flight: int) -> float:
    from mps_cli.client import Client

    client, futures, t0 = Client(url, max_in_flight=in_flight), [], time.perf_counter()
    for b in batches:
        time.sleep(generate_s)
        futures.append(client.submit(b, PROMPT, dims=DIMS, reward=REWARD))  # blocks while in_flight are out
    for f in futures:
        f.result()
    wall = time.perf_counter() - t0
    client.close()
    return wall


def _async_loop(url: str, batches: list, generate_s: float, in_flight: int) -> float:
    import asyncio

    from mps_cli.client import AsyncClient

    async def rollout() -> float:
        ac = AsyncClient(url, max_in_flight=in_flight)
        slots = asyncio.Semaphore(in_flight)

        async def score(b):
            try:
                await ac.score(b, PROMPT, dims=DIMS, reward=REWARD)
            finally:
                slots.release()

        t, tasks = time.perf_counter(), []
        for b in batches:
            await asyncio.sleep(generate_s)
            await slots.acquire()
            tasks.append(asyncio.create_task(score(b)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - t

    return asyncio.run(rollout())


DIMS = ["overall", "alignment", "detail"]
REWARD = "overall + 0.5*alignment"


def trainer_main(args) -> int:
    from PIL import Image

    from mps_cli import load_scorer

    batches = [int(x) for x in args.batch_sizes.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    count = args.images or 256
    arrays = rollout_images(count)
    images = [Image.fromarray(a) for a in arrays]  # the in-process reward's input, made outside the timing
    log(f"trainer load: {count} arrays of 512x512x3, batches {batches}, workers {workers}, model {args.weights}, "
        f"{args.device}; dims {DIMS}, reward {REWARD!r}")
    scorer = load_scorer(args.weights, config=args.config, device=args.device, dtype=args.dtype)
    scorer.score(images[:max(batches)], PROMPT, dims=DIMS, batch_size=args.max_batch)  # warm-up
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    base, rows, overlap = {}, [], []
    try:
        _rollout_workers(url, [arrays[:max(batches)]], 1)  # warm-up
        for b in batches:
            # Interleaved, best of the repeats each: on a shared machine the load moves within minutes.
            best: dict = {}
            groups = [arrays[s:s + b] for s in range(0, count, b)]
            for _ in range(args.repeats):
                for w in (0, *workers):
                    wall, lat = (trainer_in_process(scorer, images, b, args.max_batch) if w == 0
                                 else _rollout_workers(url, groups, w))
                    if w not in best or wall < best[w][0]:
                        best[w] = (wall, lat)
            base[b] = _row(b, count, *best[0])
            log(f"in-process, batch {b}: {base[b]['images_per_s']:.1f} images/s, p50 {base[b]['p50_ms']:.0f} ms")
            for w in workers:
                rows.append(_row(b, count, *best[w], workers=w))
                log(f"server, batch {b}, {w} workers: {rows[-1]['images_per_s']:.1f} images/s, "
                    f"p50 {rows[-1]['p50_ms']:.0f} ms")
        for b in batches:
            overlap.append(trainer_overlap(url, arrays, b, args.steps, base[b]["batch_s"], args.in_flight,
                                           args.repeats))
            log(f"overlap, batch {b}: x{overlap[-1]['submit_gain']:.2f} (submit), x{overlap[-1]['async_gain']:.2f} "
                "(async)")
    finally:
        server.terminate()
        server.wait(60)
    load = os.getloadavg()
    print(f"CPU: {cpu_name()}; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; model: {args.weights.name}, "
          f"device {args.device}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')} (OMP_NUM_THREADS)")
    print(f"trainer load: {count} rollout images, raw uint8 512x512x3 arrays (POST /v1/batch, multipart), "
          f"dims {', '.join(DIMS)}, reward '{REWARD}'; server --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms}; interleaved, best of {args.repeats}")
    print("| batch | rollout workers | images/s | vs in-process | p50 ms/batch | p99 ms/batch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in batches:
        ref = base[b]
        print(f"| {b} | in-process | {ref['images_per_s']:.1f} | 100% | {ref['p50_ms']:.0f} | {ref['p99_ms']:.0f} |")
        for r in (r for r in rows if r["batch"] == b):
            share = 100 * r["images_per_s"] / ref["images_per_s"]
            print(f"| {b} | {r['workers']} | {r['images_per_s']:.1f} | {share:.0f}% | {r['p50_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} |")
    print(f"overlap: one rollout loop of {args.steps} batches, each generated for as long as scoring it in-process "
          f"takes (a sleep), {args.in_flight} in flight; the three loops alternate, best of {args.repeats}; ideal: "
          "(generate + score) / max(generate, score)")
    print("| batch | generate s/batch | sequential s | Client.submit s | gain | AsyncClient s | gain | ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in overlap:
        print(f"| {o['batch']} | {o['generate_s']:.3f} | {o['sequential_s']:.2f} | {o['submit_s']:.2f} | "
              f"{o['submit_gain']:.2f}x | {o['async_s']:.2f} | {o['async_gain']:.2f}x | {o['ideal_gain']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "load": load, "in_process": base, "server": rows,
                                         "overlap": overlap}, indent=2))
    return 0


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
    p.add_argument("--trainer", action="store_true", help="the trainer-shaped load instead (see above)")
    p.add_argument("--batch-sizes", default="16,64", help="--trainer: rollout batch sizes (default 16,64)")
    p.add_argument("--workers", default="1,4", help="--trainer: concurrent rollout workers (default 1,4)")
    p.add_argument("--steps", type=int, default=6, help="--trainer: rollout steps of the overlap loop (default 6)")
    p.add_argument("--in-flight", type=int, default=2, help="--trainer: batches in flight in the overlap loop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trainer:
        return trainer_main(args)
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
