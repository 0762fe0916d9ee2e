"""How long ``mps report`` takes to render its page, per kind of input, and how big the page is.

Builds synthetic inputs in a temporary folder (distinct noise images, score/rank results, comparisons,
a versus document with per-prompt details, an ``mps dataset`` folder of parquet shards) and times
``mps_cli.report.render_report`` on each, best of ``--repeat``: the page's markup and charts, with the
thumbnails of the distinct images encoded once per run (``--link-images`` cases encode none).

    python benchmarks/bench_html.py               # the default sizes (about 15 s on 2 vCPUs)
    python benchmarks/bench_html.py --quick       # smoke check: small sizes, one repeat
    python benchmarks/bench_html.py --json out.json

Needs pyarrow (the dataset case) and the package itself; no model, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

DIMS = ("overall", "aesthetics", "detail", "alignment")


def log(msg: str) -> None:
    print(f"bench_html: {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def make_images(folder: Path, n: int, size: int = 512) -> list[Path]:
    """``n`` distinct PNG files: seeded 8x8 colour noise enlarged, smooth like a generation's large shapes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"src_{i:02d}.png"
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def score_docs(folder: Path, images: list[Path], n: int, per_prompt: int, rank: bool = False) -> list[dict]:
    """``n`` score (or rank) results, ``per_prompt`` images per prompt, each a link to one of ``images``."""
    rng = random.Random(1)
    docs = []
    for i in range(n):
        link = folder / f"img_{i:05d}.png"
        if not link.exists():
            link.symlink_to(images[i % len(images)])
        doc = {"image": link.name, "prompt": f"prompt number {i // per_prompt}",
               "scores": {d: rng.gauss(15, 4) for d in DIMS}}
        if rank:
            doc["rank"] = i % per_prompt + 1
        docs.append(doc)
    return docs


def compare_docs(images: list[Path], n: int) -> list[dict]:
    rng = random.Random(2)
    docs = []
    for i in range(n):
        a, b = images[i % len(images)], images[(i + 1) % len(images)]
        results = {}
        for d in DIMS:
            sa, sb = rng.gauss(15, 4), rng.gauss(15, 4)
            results[d] = {"a": sa, "b": sb, "p_a": 1 / (1 + 2.718281828 ** (sb - sa)),
                          "winner": "a" if sa > sb else "b"}
        docs.append({"prompt": f"compare prompt {i}", "a": str(a), "b": str(b), "results": results})
    return docs


def versus_doc(images: list[Path], prompts: int) -> dict:
    rng = random.Random(3)
    per_prompt = [{"prompt": f"versus prompt {i}", "pairs": 1, "a_images": [str(images[i % len(images)])],
                   "b_images": [str(images[(i + 3) % len(images)])],
                   "results": {d: {"win_rate": float(rng.random() > 0.5), "mean_diff": rng.gauss(0, 2)}
                               for d in DIMS}} for i in range(prompts)]
    results = {d: {"win_rate": 0.55, "ci95": [0.5, 0.6], "mean_diff": 0.3, "wins": 5, "ties": 0, "losses": 4}
               for d in DIMS}
    return {"a": "runs/base", "b": "runs/lora", "prompts": prompts, "pairs": prompts, "unpaired": {}, "missing": {},
            "failed": [], "bootstrap": {"samples": 1000, "seed": 0, "unit": "prompt"}, "scored": 2 * prompts,
            "cached": 0, "weights": "mps-overall", "weights_identity": "sha256:0", "dtype": "fp32",
            "mask_threshold": 0.3, "results": results, "per_prompt": per_prompt}


def dataset_folder(folder: Path, rows: int, shards: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(4)
    folder.mkdir()
    per = rows // shards
    for s in range(shards):
        keys = [f"{s:05d}{k:06d}" for k in range(per)]
        cols = {d: rng.normal(12, 3, per) for d in DIMS}
        errors = [None] * per
        errors[0] = "corrupt or truncated image"
        pq.write_table(pa.table({"key": keys, "shard": [f"shards/{s:05d}.tar"] * per,
                                 "prompt": [f"caption {k}" for k in keys], **cols, "error": errors}),
                       folder / f"{s:05d}.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"settings": {"weights": "sha256:0", "dtype": "fp32"},
                                                       "shards": {}}))
    return folder


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def timed(results, out_dir: Path, repeat: int, **kwargs) -> dict:
    from mps_cli.report import render_report

    best, html, summary = float("inf"), "", None
    for _ in range(repeat):
        start = time.perf_counter()
        html, summary = render_report(results, out_dir=out_dir, **kwargs)
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "bytes": len(html.encode("utf-8")), "cards": summary.cards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="score results in the gallery cases")
    parser.add_argument("--sampled", type=int, default=20000, help="results in the sampled case (over --max-images)")
    parser.add_argument("--pairs", type=int, default=300, help="comparisons")
    parser.add_argument("--prompts", type=int, default=500, help="versus prompts with details")
    parser.add_argument("--rows", type=int, default=200_000, help="dataset rows")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.sampled, args.pairs, args.prompts, args.rows, args.repeat = 100, 600, 10, 20, 5000, 1

    from mps_cli.report import parse_results, read_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-html-") as tmp:
        root = Path(tmp)
        images = make_images(root, 16)
        cases = []
        docs = score_docs(root, images, args.images, 50)
        cases.append(("score, embedded thumbnails", write_jsonl(root / "score.jsonl", docs), {}))
        cases.append(("score, --link-images", root / "score.jsonl", {"link_images": True}))
        ranked = score_docs(root, images, args.images, 50, rank=True)
        cases.append(("rank, --link-images", write_jsonl(root / "rank.jsonl", ranked), {"link_images": True}))
        big = score_docs(root, images, args.sampled, 50)
        cases.append((f"score {args.sampled:,}, sampled to {args.images:,}", write_jsonl(root / "big.jsonl", big),
                      {"max_images": args.images}))
        cases.append(("compare", write_jsonl(root / "cmp.jsonl", compare_docs(images, args.pairs)), {}))
        cases.append(("versus with details", write_jsonl(root / "vs.json", [versus_doc(images, args.prompts)]), {}))
        ds = dataset_folder(root / "dataset", args.rows, 8)
        for label, src, kwargs in [*cases, (f"dataset, {args.rows:,} rows", ds, {})]:
            results = read_dataset(src) if src.is_dir() else parse_results(src.read_text(), src.name, root)
            log(f"{label} ...")
            row = {"case": label, **timed(results, root, args.repeat, **kwargs)}
            rows.append(row)
            log(f"{label}: {row['seconds']:.3f} s, {row['bytes'] / 1e6:.1f} MB, {row['cards']:,} cards")

    cpu = cpu_name()
    print(f"mps report rendering, best of {args.repeat} (CPU: {cpu})")
    print()
    print("| case | cards | page MB | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['cards']:,} | {r['bytes'] / 1e6:.1f} | {r['seconds']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "repeat": args.repeat, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
