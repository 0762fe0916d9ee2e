"""Fetching weights from a Hub: a real HTTP server on 127.0.0.1 speaking the Hub's resolve protocol.

``HF_ENDPOINT`` points ``mps``, each command a process of its own, at the server and ``HF_HOME`` puts the
cache in tmp_path; the server's request log proves when the network was (not) touched. The processes are forks
of one that imported torch (tests/conftest.py ``forked_mps``): what is under test is the fetching, the cache and
what the command says, not the interpreter's start.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURE, IMAGES, WEIGHTS, forked_mps, mps_env
from conftest import run_mps as _run_mps
from hubserver import COMMIT, HubServer, free_port

from mps_cli.constants import DEFAULT_CONFIG_FILE, DEFAULT_REPO, DEFAULT_WEIGHTS_FILE


def run_mps(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``mps ARGS`` in a process of its own, forked (see the module's docstring)."""
    return _run_mps(*args, fork=True, **kwargs)


REPO = "owner/repo"
FILE = "path/mps-tiny.safetensors"
URI = f"hf://{REPO}/{FILE}"
FIXTURE_SHA256 = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
FIXTURE_SIZE = WEIGHTS.stat().st_size


#: The caller's own Hub settings, which must not leak into the subprocesses.
CALLERS_HUB_ENV = ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                   "HF_ENDPOINT", "HF_HOME", "MPS_WEIGHTS", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_hub_env(monkeypatch):
    for var in CALLERS_HUB_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub():
    server = HubServer()
    server.add_file(REPO, FILE, WEIGHTS)
    server.add_file(REPO, "path/config.json", FIXTURE / "config.json", lfs=False)
    with server:
        yield server


def env_for(url: str, tmp_path: Path, **extra: str) -> dict:
    # Telemetry off: huggingface_hub would otherwise ask the endpoint for an agent registry,
    # and the request log must hold only what fetching weights asked for.
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def blobs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "hf-home" / "hub"
    return sorted(p for p in root.rglob("*") if p.is_file() and "blobs" in p.parts) if root.exists() else []


def first_expected(expected: dict) -> dict:
    return next(r for r in expected["scores"] if r["dim"] == "overall")


def score_json(row: dict, weights: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return run_mps("score", str(IMAGES / row["image"]), "--prompt", row["prompt"], "--weights", weights,
                   "--device", "cpu", "--json", *extra, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mps: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert result.stdout == ""
    return errors[0]


def test_first_run_downloads_and_scores_then_offline_runs_use_only_the_cache(hub, tmp_path, expected):
    row = first_expected(expected)
    env = env_for(hub.url, tmp_path)

    first = score_json(row, URI, env)
    assert first.returncode == 0, first.stderr
    [doc] = json.loads(first.stdout)
    assert doc["scores"]["overall"] == pytest.approx(row["score"], abs=1e-3)
    assert {r.filename for r in hub.requests("GET")} == {FILE, "path/config.json"}

    # --offline with the server up: the log proves nothing was asked of it.
    before = len(hub.log)
    second = score_json(row, URI, env, "--offline")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)[0]["scores"]["overall"] == pytest.approx(row["score"], abs=1e-3)
    assert len(hub.log) == before

    hub.stop()
    third = score_json(row, URI, {**env, "HF_HUB_OFFLINE": "1"})
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)[0]["scores"]["overall"] == pytest.approx(row["score"], abs=1e-3)


def test_offline_without_cache_says_what_is_missing_and_how_to_get_it(hub, tmp_path, expected):
    result = score_json(first_expected(expected), URI, env_for(hub.url, tmp_path), "--offline")
    assert_one_line_error(result, 4, URI, "not in the cache", "mps download", "--weights PATH")
    assert hub.log == []


@pytest.mark.parametrize("setup, uri, needles", [
    (lambda hub: None, f"hf://{REPO}/path/missing.safetensors", ("path/missing.safetensors", "not found", REPO)),
    (lambda hub: None, "hf://owner/nothere/mps.safetensors", ("owner/nothere", "not found")),
    (lambda hub: None, f"{URI}@v9", ("revision 'v9'", "not found")),
    (lambda hub: hub.fail(FILE, 500), URI, ("HTTP 500", "try again later")),
    (lambda hub: hub.fail(FILE, 503, methods=("GET",)), URI, ("HTTP 503",)),
    (lambda hub: hub.private.update({REPO: "sekrit"}), URI, ("private", "HF_TOKEN")),
    (lambda hub: hub.gated.add(REPO), URI, ("gated", "HF_TOKEN")),
], ids=["404-file", "404-repo", "404-revision", "500", "503-on-get", "401-private", "403-gated"])
def test_hub_errors_are_one_line_and_exit_4(hub, tmp_path, setup, uri, needles):
    setup(hub)
    result = run_mps("download", uri, env=env_for(hub.url, tmp_path))
    assert_one_line_error(result, 4, uri, *needles)
    assert blobs(tmp_path) == []


def test_connection_refused_and_timeout_are_one_line(hub, tmp_path):
    refused = run_mps("download", URI, env=env_for(f"http://127.0.0.1:{free_port()}", tmp_path))
    assert_one_line_error(refused, 4, "cannot connect")

    hub.hang(FILE, seconds=30)
    slow = run_mps("download", URI, env=env_for(hub.url, tmp_path, HF_HUB_ETAG_TIMEOUT="1"), timeout=60)
    assert_one_line_error(slow, 4, "timed out", "HF_HUB_ETAG_TIMEOUT")


def test_hf_token_opens_a_private_repo(hub, tmp_path):
    hub.private[REPO] = "sekrit"
    result = run_mps("download", URI, "--json", env=env_for(hub.url, tmp_path, HF_TOKEN="sekrit"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == FIXTURE_SHA256
    assert all(r.headers.get("authorization") == "Bearer sekrit" for r in hub.requests(filename=FILE))


def test_download_prints_path_size_and_sha256(hub, tmp_path):
    env = env_for(hub.url, tmp_path)
    result = run_mps("download", URI, env=env)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    path = Path(fields["path"])
    assert path.is_file() and str(path).startswith(str(tmp_path / "hf-home" / "hub"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fields["sha256"] == FIXTURE_SHA256
    assert fields["size"].split()[0] == str(FIXTURE_SIZE)
    assert fields["commit"] == COMMIT
    assert Path(fields["config"]).read_bytes() == (FIXTURE / "config.json").read_bytes()

    gets = len(hub.requests("GET"))
    again = run_mps("download", URI, "--json", env=env)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    got = (doc["path"], doc["size"], doc["sha256"], doc["downloaded"])
    assert got == (str(path), FIXTURE_SIZE, FIXTURE_SHA256, False)
    assert len(hub.requests("GET")) == gets


def test_download_pins_a_revision(hub, tmp_path):
    result = run_mps("download", URI, "--revision", COMMIT, "--json", env=env_for(hub.url, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"/snapshots/{COMMIT}/" in json.loads(result.stdout)["path"]
    assert {r.revision for r in hub.requests()} == {COMMIT}


def test_download_of_a_local_path_is_a_usage_error(tmp_path):
    result = run_mps("download", str(WEIGHTS))
    assert_one_line_error(result, 2, "not a Hub source")


def test_known_name_and_default_source_with_info(tmp_path):
    with HubServer() as server:
        server.add_file(DEFAULT_REPO, DEFAULT_WEIGHTS_FILE, WEIGHTS)
        server.add_file(DEFAULT_REPO, DEFAULT_CONFIG_FILE, FIXTURE / "config.json", lfs=False)
        env = env_for(server.url, tmp_path)
        before = run_mps("info", env=env)
        assert before.returncode == 0, before.stderr
        assert f"cache: {tmp_path / 'hf-home' / 'hub'}" in before.stdout
        assert f"not cached: run `mps download hf://{DEFAULT_REPO}/{DEFAULT_WEIGHTS_FILE}`" in before.stdout
        assert "cpu" in before.stdout and "torch" in before.stdout
        assert server.log == []

        fetched = run_mps("download", "--json", env=env)
        assert fetched.returncode == 0, fetched.stderr
        got = json.loads(fetched.stdout)
        assert got["source"] == f"hf://{DEFAULT_REPO}/{DEFAULT_WEIGHTS_FILE}"
        assert got["config"].endswith(DEFAULT_CONFIG_FILE)
    after = run_mps("info", "--json", env=env)
    assert after.returncode == 0, after.stderr
    weights = json.loads(after.stdout)["weights"]
    assert weights["cached"] is True and weights["path"] == got["path"]
    assert weights["config"] == got["config"]


def test_mps_weights_env_sets_the_default_source(hub, tmp_path):
    result = run_mps("download", "--json", env=env_for(hub.url, tmp_path, MPS_WEIGHTS=URI))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"] == URI


def test_a_transfer_cut_once_resumes_with_a_range_request(hub, tmp_path):
    # huggingface_hub writes in 10 MiB chunks, so cut past the first one for something to resume from.
    cut_at = FIXTURE_SIZE * 3 // 4
    hub.cut(FILE, after=cut_at, times=1)
    result = run_mps("download", URI, "--json", env=env_for(hub.url, tmp_path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert hashlib.sha256(Path(doc["path"]).read_bytes()).hexdigest() == FIXTURE_SHA256
    first, resumed = [r.headers.get("range") for r in hub.requests("GET", FILE)]
    assert first is None
    start = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut_at


def test_a_body_shorter_than_announced_leaves_nothing_and_the_next_run_downloads_again(hub, tmp_path):
    hub.short(FILE, after=FIXTURE_SIZE // 2, times=1)
    env = env_for(hub.url, tmp_path)
    cut = run_mps("download", URI, env=env)
    assert_one_line_error(cut, 4, URI, "cut short")
    assert [p for p in blobs(tmp_path) if p.stat().st_size > 10_000] == []

    again = run_mps("download", URI, "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sha256"] == FIXTURE_SHA256


@pytest.fixture(scope="module", autouse=True)
def dropping(tmp_path_factory):
    """A download from a server that cuts every transfer halfway, started with the module: the Hub client waits
    1 s before each of its five retries, so it runs while the module's other tests do."""
    server = HubServer()
    server.add_file(REPO, FILE, WEIGHTS)
    server.cut(FILE, after=FIXTURE_SIZE // 2, times=None)
    tmp = tmp_path_factory.mktemp("dropping")
    env = {k: v for k, v in mps_env().items() if k not in CALLERS_HUB_ENV}  # as clean_hub_env leaves it
    with server:
        proc = subprocess.Popen([*forked_mps(), "download", URI], env={**env, **env_for(server.url, tmp)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            yield proc, tmp
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=120)


def test_a_connection_that_keeps_dropping_fails_cleanly(dropping):
    proc, tmp_path = dropping
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, 4, URI, "cut short", f"of {FIXTURE_SIZE:,} bytes")
    assert [p for p in blobs(tmp_path) if p.stat().st_size > 10_000] == []


def test_wrong_bytes_under_a_sha256_etag_are_deleted(hub, tmp_path):
    data = WEIGHTS.read_bytes()
    hub.add(REPO, FILE, data[: len(data) - 4096], etag=FIXTURE_SHA256)
    result = run_mps("download", URI, env=env_for(hub.url, tmp_path))
    assert_one_line_error(result, 4, URI, "sha256", "deleted")
    assert not any(p.name == FIXTURE_SHA256 for p in blobs(tmp_path))
    snapshots = tmp_path / "hf-home" / "hub" / "models--owner--repo" / "snapshots"
    assert not any(p.name == "mps-tiny.safetensors" for p in snapshots.rglob("*"))


def test_a_truncated_file_without_a_checksum_is_named_before_use(hub, tmp_path):
    data = WEIGHTS.read_bytes()
    hub.add(REPO, FILE, data[: len(data) - 4096], lfs=False)
    result = run_mps("download", URI, env=env_for(hub.url, tmp_path))
    line = assert_one_line_error(result, 3, "truncated", "mps-tiny.safetensors")
    assert str(tmp_path / "hf-home" / "hub") in line


def test_two_processes_fetching_at_once_share_one_download(tmp_path):
    server = HubServer(chunk_delay=0.004)  # ~250 chunks: a second, so the two overlap
    server.add_file(REPO, FILE, WEIGHTS)
    with server:
        env = env_for(server.url, tmp_path)
        procs = [subprocess.Popen([*forked_mps(), "download", URI, "--json"], env=mps_env(env),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out)["sha256"] == FIXTURE_SHA256
    assert len(server.requests("GET", FILE)) == 1


def test_a_repo_without_config_needs_no_network_once_cached(tmp_path):
    server = HubServer()
    server.add_file(REPO, FILE, WEIGHTS)
    with server:
        env = env_for(server.url, tmp_path)
        first = run_mps("download", URI, "--json", env=env)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["config"] is None
        assert server.requests(filename="path/config.json"), "the config beside the weights was looked for"
    # Online, server gone: the weights and the config's known absence both come from the cache.
    again = run_mps("download", URI, "--json", env=env)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert (doc["sha256"], doc["config"], doc["downloaded"]) == (FIXTURE_SHA256, None, False)
