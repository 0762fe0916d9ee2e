"""Shared test fixtures. The golden fixture lives in ../shared (CI has it there too)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# One intra-op thread for torch, here and in every CLI subprocess (they inherit the environment). On a small
# shared CPU, OpenMP's spinning workers made the tiny model 10-50x slower with two threads than with one;
# the tests check results, never thread counts. Set before anything imports torch (which reads it then).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MPS_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "mps-tiny"
WEIGHTS = FIXTURE / "mps-tiny.safetensors"
IMAGES = FIXTURE / "images"
ORIGINAL = FIXTURE / "original-format"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may use, at most 4 (each holds torch and a model)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_configure(config):
    if not WEIGHTS.is_file():
        raise pytest.UsageError(f"golden fixture not found at {FIXTURE}; set MPS_SHARED to the shared/ folder")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Prepared weights go to a per-session folder (inherited by CLI subprocesses), never ~/.cache."""
    old = os.environ.get("MPS_CACHE_DIR")
    os.environ["MPS_CACHE_DIR"] = str(tmp_path_factory.mktemp("mps-cache"))
    yield
    if old is None:
        os.environ.pop("MPS_CACHE_DIR", None)
    else:
        os.environ["MPS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="session")
def judges(tmp_path_factory):
    """Tiny random-weight HPSv2.1, CLIPScore and PickScore checkpoints in their published layouts, with the
    reference (open_clip, transformers) models that wrote them: {name: (path, model)}."""
    import judges_refs

    return judges_refs.write_judges(tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="session")
def scorer():
    """The fixture checkpoint loaded once, fp32 on CPU."""
    from mps_cli import load_scorer

    return load_scorer(WEIGHTS, device="cpu", dtype="fp32")


def messages(stderr: str) -> list[str]:
    """The per-input error and warning lines of stderr: not the closing hints, notes and summary."""
    return [line for line in stderr.splitlines() if line.startswith(("mps: error:", "mps: warning:"))]


def summary(stderr: str) -> str:
    """The closing "N scored, M failed" line."""
    lines = [line for line in stderr.splitlines() if re.fullmatch(r"mps: \d+ scored, \d+ failed", line)]
    assert len(lines) == 1, stderr
    return lines[0]


def run_cli(*args: str, env: dict | None = None, input: str | None = None, cwd=None):
    """The command in this process (Typer's runner), answered like :func:`run_mps`: for tests of what
    the command prints, where the process itself is not under test. Loaded models are shared."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from mps_cli.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, list(args), input=input, env=env)
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


def mps_executable() -> list[str]:
    """The installed console script, as users run it."""
    exe = shutil.which("mps", path=str(Path(sys.executable).parent)) or shutil.which("mps")
    assert exe, "the mps console script is not installed (pip install -e '.[test]')"
    return [exe]


def run_mps(*args: str, env: dict | None = None, input: str | None = None, cwd=None, timeout: float = 300):
    """Run the real console script in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("MPS_WEIGHTS", None) if env is None or "MPS_WEIGHTS" not in env else None
    return subprocess.run(
        [*mps_executable(), *args], capture_output=True, text=True, env=full_env, input=input,
        cwd=cwd, timeout=timeout,
    )
