"""What a CPU user's install of mps-score costs (issue 22): pip's plan, the time, the disk.

For each git revision given (default: the working tree), the project is exported to a scratch
folder and installed as the README's CPU set-up does, into a fresh virtualenv that already holds
the CPU build of torch: first ``pip install --dry-run --report`` (what pip would add or replace),
then the timed ``pip install .``, then the installed size (site-packages with and without torch)
and the names in ``pip list`` a CPU install must not have (CUDA wheels, triton, torchvision, timm).

    python benchmarks/bench_install.py                      # the working tree
    python benchmarks/bench_install.py --ref main --ref HEAD   # before and after a change

The CPU torch comes from ``--cpu-torch`` (a wheel file or a requirement such as
``torch==2.13.0+cpu``), default the PyTorch CPU index as the README says. Times include building
the project's wheel and reading the package index, which are local mirrors on the machines the
figures in benchmarks/README.md come from: on a network, downloads add to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: What a CPU install must not bring: CUDA libraries and bindings, the GPU compiler, open_clip's image stack.
FORBIDDEN = re.compile(r"^(nvidia-.*|cuda-.*|triton|torchvision|timm)$", re.I)
#: torch itself in site-packages, with the CUDA libraries, bindings and compiler a CUDA build brings.
TORCH_PARTS = re.compile(r"^(torch|torchgen|functorch|nvidia|triton|cuda.*)$"
                         r"|^(torch|nvidia_.*|triton|cuda_.*)-.*\.dist-info$")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def export(ref: str | None, into: Path) -> Path:
    """The project at ``ref`` (None: the working tree, uncommitted changes included) as plain files."""
    if ref is None:
        shutil.copytree(REPO, into, ignore=shutil.ignore_patterns(".git", ".ci-venv", "*venv*", "__pycache__"))
        return into
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(ref: str | None, cpu_torch: str, scratch: Path) -> dict:
    label = ref or "working tree"
    project = export(ref, scratch / "project")
    venv = scratch / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    log(f"[{label}] installing the CPU build of torch ({cpu_torch})")
    torch_args = [cpu_torch] if cpu_torch != "index" else ["torch", "--index-url", CPU_INDEX]
    run([*pip, "install", "--quiet", *torch_args], stdout=subprocess.DEVNULL)
    torch_before = run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True).stdout.strip()

    log(f"[{label}] pip install --dry-run .")
    report = scratch / "report.json"
    run([*pip, "install", "--quiet", "--dry-run", "--report", str(report), str(project)], stdout=subprocess.DEVNULL)
    planned = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}"
                     for i in json.loads(report.read_text())["install"])

    log(f"[{label}] pip install .")
    started = time.perf_counter()
    run([*pip, "install", "--quiet", str(project)], stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started

    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    capture_output=True).stdout.strip())
    total = du(site)
    torch_bytes = sum(du(p) if p.is_dir() else p.stat().st_size for p in site.iterdir() if TORCH_PARTS.match(p.name))
    installed = json.loads(run([*pip, "list", "--format", "json"], capture_output=True).stdout)
    torch_after = run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True).stdout.strip()
    return {
        "ref": label,
        "planned": planned,
        "forbidden_planned": [p for p in planned if FORBIDDEN.match(p.split("==")[0])],
        "forbidden_installed": sorted(d["name"] for d in installed if FORBIDDEN.match(d["name"])),
        "torch": f"{torch_before} -> {torch_after}" if torch_before != torch_after else torch_after,
        "install_s": round(seconds, 1),
        "site_packages_bytes": total,
        "without_torch_bytes": total - torch_bytes,
        "distributions": len(installed),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[dict], cpu_torch: str) -> str:
    mib = 2**20
    lines = [
        f"mps-score CPU install, each in a fresh virtualenv holding the CPU build of torch ({cpu_torch})",
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; package index and find-links as pip is configured here",
        "",
        "without torch: site-packages less torch and the CUDA libraries and triton a CUDA build of torch brings",
        "",
        f"{'revision':<14} {'pip install .':>13} {'site-packages':>13} {'without torch':>13} {'dists':>5}  torch",
    ]
    for r in rows:
        lines.append(f"{r['ref'][:14]:<14} {r['install_s']:>12.1f}s {r['site_packages_bytes'] / mib:>9,.0f} MiB "
                     f"{r['without_torch_bytes'] / mib:>9,.0f} MiB {r['distributions']:>5}  {r['torch']}")
    for r in rows:
        lines += ["", f"{r['ref']}: pip install --dry-run . would install {len(r['planned'])}: "
                  + ", ".join(r["planned"]),
                  f"  CUDA wheels, triton, torchvision, timm planned: {', '.join(r['forbidden_planned']) or 'none'}; "
                  f"installed: {', '.join(r['forbidden_installed']) or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", action="append",
                        help="git revision to install (repeatable; default: the working tree)")
    parser.add_argument("--cpu-torch", default="index",
                        help=f"CPU torch to preinstall: a wheel path or requirement (default: torch from {CPU_INDEX})")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rows = []
    for ref in args.ref or [None]:
        with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
            rows.append(measure(ref, args.cpu_torch, Path(tmp)))
    print(render(rows, args.cpu_torch))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
