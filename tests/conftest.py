"""Shared test fixtures. The golden fixture lives in ../shared (CI has it there too)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


#: Modules whose shared fixtures cost seconds per process (the judges' reference models: open_clip and transformers,
#: ~3.5 CPU-s to import; a local Ray instance, ~7 CPU-s to start): collected first, so xdist's work-stealing
#: scheduler (which hands each worker a contiguous share and steals from the tail) runs them all on one worker.
SHARED_SETUP_FIRST = ("test_judges.py", "test_judges_cli.py", "test_reference.py", "test_composite.py",
                      "test_dataset.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SHARED_SETUP_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def _build_each_app_once() -> None:
    """Typer's test runner builds the Click command tree from the app on every invoke (25 ms; the suite invokes
    it some 700 times): build it once per app, as the console script does once per process. Click commands keep
    no state between invocations (each gets a context of its own). ``_get_command`` is Typer's private name: were
    it renamed, the runner would build per invoke again, slower and no less right."""
    import typer.main
    import typer.testing

    built: dict = {}

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = (app, typer.main.get_command(app))  # the app kept alive: its id stays its own
        return built[id(app)][1]

    typer.testing._get_command = get_command


_build_each_app_once()


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


_fork_shim: list[str] = []
_fork_owner: list = []  # this process's registration with the fork server: held open until it exits


def forked_mps() -> list[str]:
    """``mps`` as a fresh fork of a process that imported torch and the CLI once (tests/forkserver.py), for
    tests of what a command does in a process of its own (its environment, files, exit status, streams) where
    starting the interpreter is not what is tested: 0.3 s a command instead of 2. One server for the run's test
    processes (xdist's workers), started by the first that needs it; tests/test_docs.py holds it to the console
    script. :func:`kill_hard` SIGKILLs such a command."""
    if not _fork_shim:
        import fcntl
        import json
        import tempfile

        from forkserver import register, write_shims

        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")[:16]
        base = Path(tempfile.gettempdir()) / f"mps-fork-{run}"  # short: Unix socket paths have a ~100-byte limit
        pointer = Path(f"{base}.json")
        with open(f"{base}.lock", "w") as lock:  # both removed by the server when it ends
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = json.loads(pointer.read_text())["folder"] if pointer.is_file() else None
            owner = register(os.path.join(folder, "fork.sock")) if folder else None
            if owner is None:  # the first, or the server ended with the processes it served
                folder = tempfile.mkdtemp(prefix="mps-fork-")
                sock = os.path.join(folder, "fork.sock")
                proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")), sock,
                                         str(pointer)],
                                        env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=folder,
                                        stdout=subprocess.PIPE, text=True)
                assert proc.stdout.readline().strip() == "ready", "the fork server did not start"
                proc.stdout.close()
                write_shims(Path(folder) / "bin", sock)
                owner = register(sock)
                assert owner is not None, "the fork server does not answer"
                pointer.write_text(json.dumps({"folder": folder}))
        _fork_owner.append(owner)
        _fork_shim.append(str(Path(folder) / "bin" / "mps"))
    return list(_fork_shim)


def forked_python() -> list[str]:
    """``python`` for ``-c CODE`` (with its arguments after it), as a fork of :func:`forked_mps`'s server."""
    return [str(Path(forked_mps()[0]).with_name("mps-python"))]


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL a command started as :func:`mps_executable` or :func:`forked_mps`, and return once it is gone:
    for a fork, its shim and the forked process both (a shim cannot pass SIGKILL on)."""
    import select

    child, pidfd = None, None
    if _fork_shim and str(proc.args[0]) in (_fork_shim[0], forked_python()[0]):
        pidfile = Path(_fork_shim[0]).parent.parent / "pids" / str(proc.pid)
        deadline = time.monotonic() + 30
        while not pidfile.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        child = int(pidfile.read_text()) if pidfile.is_file() else None
        try:
            pidfd = os.pidfd_open(child) if child else None
        except ProcessLookupError:
            pidfd = None  # it has ended already
    proc.kill()
    proc.wait(timeout=30)
    if pidfd is not None:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        select.select([pidfd], [], [], 30)
        os.close(pidfd)


def mps_env(env: dict | None = None) -> dict:
    """The environment :func:`run_mps` gives the command: this one, warnings off, ``MPS_WEIGHTS`` only if given."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("MPS_WEIGHTS", None) if env is None or "MPS_WEIGHTS" not in env else None
    return full_env


def run_mps(*args: str, env: dict | None = None, input: str | None = None, cwd=None, timeout: float = 300,
            fork: bool = False):
    """Run the real console script in a subprocess (``fork``: as a fork of :func:`forked_mps`, for tests where
    the interpreter's start is not under test); returns CompletedProcess with text output."""
    return subprocess.run(
        [*(forked_mps() if fork else mps_executable()), *args], capture_output=True, text=True,
        env=mps_env(env), input=input, cwd=cwd, timeout=timeout,
    )
