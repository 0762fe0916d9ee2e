"""``--model`` on the command line: one decode, keys per model in every output, and the published sources.

The judges are the tiny random-weight checkpoints of ``conftest.judges`` (their published layouts); the Hub
path runs the real console script against tests/hubserver.py serving them under their published names.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FIXTURE, IMAGES, WEIGHTS, run_cli, run_mps
from hubserver import HubServer

from mps_cli.constants import JUDGES

PROMPT = "a red fox sitting in a snowy forest at dawn"
LOCAL = ["--weights", str(WEIGHTS), "--device", "cpu", "--dtype", "fp32"]
NAMES = sorted(p.name for p in IMAGES.iterdir())


def model_args(judges, *names: str) -> list[str]:
    return ["--model", ",".join(n if n == "mps" else f"{n}={judges[n][0]}" for n in names)]


@pytest.fixture(scope="module")
def alone(judges, scorer):
    """Each model scored alone (the library, one model per call): {(model key, image name): score}."""
    from mps_cli import load_scorer

    out = {}
    for r in scorer.score(sorted(IMAGES.iterdir()), PROMPT, dims=["overall", "detail"]):
        out[("mps.overall", Path(r.image).name)] = r.scores["overall"]
        out[("mps.detail", Path(r.image).name)] = r.scores["detail"]
    for name, (path, _) in judges.items():
        one = load_scorer(model=f"{name}={path}", device="cpu", dtype="fp32")
        out.update(((name, Path(r.image).name), r.scores[name]) for r in one.score(sorted(IMAGES.iterdir()), PROMPT))
    return out


def test_score_json_jsonl_and_csv_carry_one_key_per_model_and_dimension(judges, alone):
    args = ["score", str(IMAGES), "--prompt", PROMPT, "--dim", "overall,detail", *LOCAL,
            *model_args(judges, "mps", "hpsv2.1", "pickscore", "clipscore")]
    keys = ["mps.overall", "mps.detail", "hpsv2.1", "pickscore", "clipscore"]
    docs = json.loads(run_cli(*args, "--json").stdout)
    assert [list(d["scores"]) for d in docs] == [keys] * len(NAMES)
    for d in docs:
        for k in keys:
            assert d["scores"][k] == pytest.approx(alone[k, Path(d["image"]).name], abs=1e-5)
    lines = [json.loads(line) for line in run_cli(*args, "--jsonl").stdout.splitlines()]
    assert lines == docs
    rows = list(csv.DictReader(io.StringIO(run_cli(*args, "--csv").stdout)))
    assert list(rows[0]) == ["image", "prompt", *keys, "error"]
    assert [float(r["pickscore"]) for r in rows] == pytest.approx([d["scores"]["pickscore"] for d in docs], abs=1e-5)
    table = run_cli(*args, env={"COLUMNS": "200"}).stdout
    assert all(k in table for k in keys) and "sunset.png" in table


def test_without_model_the_output_is_mps_keyed_by_dimension_as_before(expected):
    """No --model: keys are the dimensions and the values the original implementation's (the golden fixture)."""
    row = next(r for r in expected["scores"] if r["dim"] == "detail")
    proc = run_cli("score", str(IMAGES / row["image"]), "--prompt", row["prompt"], "--dim", "overall,detail",
                   "--json", *LOCAL)
    doc = json.loads(proc.stdout)
    assert list(doc[0]) == ["image", "prompt", "scores"] and list(doc[0]["scores"]) == ["overall", "detail"]
    assert doc[0]["scores"]["detail"] == pytest.approx(row["score"], abs=1e-3)


def test_rank_by_a_judge_and_by_an_mps_dimension(judges, alone):
    args = ["rank", str(IMAGES), "--prompt", PROMPT, "--json", *LOCAL, *model_args(judges, "mps", "hpsv2.1")]
    by_hps = json.loads(run_cli(*args, "--by", "hpsv2.1").stdout)
    want = sorted(NAMES, key=lambda n: -alone["hpsv2.1", n])
    assert [Path(d["image"]).name for d in by_hps] == want and [d["rank"] for d in by_hps] == list(range(1, 8))
    by_detail = json.loads(run_cli(*args, "--by", "detail").stdout)
    assert list(by_detail[0]["scores"]) == ["mps.overall", "mps.detail", "hpsv2.1"]
    assert [Path(d["image"]).name for d in by_detail] == sorted(NAMES, key=lambda n: -alone["mps.detail", n])
    wrong = run_cli(*args, "--by", "pickscore")
    assert (wrong.returncode, wrong.stderr) == (
        2, "mps: error: --by must be one of the --model models (mps, hpsv2.1) (got 'pickscore')\n")


def test_compare_gives_p_a_per_model(judges, alone):
    a, b = IMAGES / "crop.png", IMAGES / "wide.webp"
    doc = json.loads(run_cli("compare", str(a), str(b), "--prompt", PROMPT, "--json", *LOCAL,
                             *model_args(judges, "pickscore", "mps")).stdout)
    assert list(doc["results"]) == ["pickscore", "mps.overall"]
    res = doc["results"]["pickscore"]
    assert res["a"] == pytest.approx(alone["pickscore", "crop.png"], abs=1e-5)
    assert res["winner"] == ("a" if res["a"] > res["b"] else "b")


def test_usage_errors_name_the_culprit(judges):
    unknown = run_cli("score", str(IMAGES / "crop.png"), "--prompt", "x", "--model", "mps,imagereward")
    assert unknown.returncode == 2 and "unknown model 'imagereward'" in unknown.stderr
    dims = run_cli("score", str(IMAGES / "crop.png"), "--prompt", "x", "--dim", "detail", *LOCAL,
                   *model_args(judges, "hpsv2.1"))
    assert dims.returncode == 2 and "dimensions and conditions are MPS's" in dims.stderr
    served = run_cli("score", str(IMAGES / "crop.png"), "--prompt", "x", "--server", "http://127.0.0.1:9",
                     "--model", "mps")
    assert served.returncode == 2 and "drop --model or --server" in served.stderr
    assert "Traceback" not in unknown.stderr + dims.stderr + served.stderr


def test_a_bad_image_among_good_ones_fails_alone_for_every_model(judges, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("score", str(IMAGES / "crop.png"), str(bad), "--prompt", PROMPT, "--json", *LOCAL,
                   *model_args(judges, "mps", "clipscore"))
    assert proc.returncode == 1
    docs = json.loads(proc.stdout)
    assert set(docs[0]["scores"]) == {"mps.overall", "clipscore"} and "error" in docs[1]
    assert "1 scored, 1 failed" in proc.stderr


def test_dataset_parquet_has_a_column_per_model_key(judges, alone, tmp_path):
    import pyarrow as pa

    shard = tmp_path / "in" / "part-0.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"key": NAMES, "jpg": [(IMAGES / n).read_bytes() for n in NAMES],
                             "text": [PROMPT] * len(NAMES)}), shard)
    out = tmp_path / "out"
    args = ["dataset", str(shard), "--out", str(out), *LOCAL, *model_args(judges, "mps", "pickscore")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out / "part-0.parquet")
    assert table.column_names == ["key", "shard", "prompt", "mps.overall", "pickscore", "error"]
    for row in table.to_pylist():
        assert row["pickscore"] == pytest.approx(alone["pickscore", row["key"]], abs=1e-5)
        assert row["mps.overall"] == pytest.approx(alone["mps.overall", row["key"]], abs=1e-5)
    from mps_cli.dataset import MANIFEST

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["models"].startswith("mps,pickscore=")
    # Another set of models into the same folder would mix columns: refused.
    other = run_cli("dataset", str(shard), "--out", str(out), *LOCAL, *model_args(judges, "mps"))
    assert other.returncode == 2


def test_versus_and_eval_report_each_model(judges, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for side, names in ((a, NAMES[:3]), (b, NAMES[3:6])):
        side.mkdir()
        for i, n in enumerate(names):
            shutil.copy(IMAGES / n, side / f"{i}{Path(n).suffix}")
    models = model_args(judges, "mps", "hpsv2.1")
    vs = json.loads(run_cli("versus", str(a), str(b), "--prompt", PROMPT, "--json", "--no-cache", *LOCAL,
                            *models).stdout)
    assert set(vs["results"]) == {"mps.overall", "hpsv2.1"} and vs["pairs"] == 3
    bench = tmp_path / "pairs.jsonl"
    bench.write_text("".join(json.dumps({"prompt": PROMPT, "a": str(IMAGES / x), "b": str(IMAGES / y),
                                         "winner": "a"}) + "\n" for x, y in zip(NAMES[:3], NAMES[3:6])))
    ev = json.loads(run_cli("eval", "pairs", str(bench), "--json", "--no-cache", *LOCAL, *models).stdout)
    assert set(ev["accuracy"]) == {"mps.overall", "hpsv2.1"}


def test_server_scores_a_panel_and_says_its_models(judges):
    import asyncio
    import base64

    import httpx

    from mps_cli import load_scorer
    from mps_cli.server import ServeOptions, create_app

    panel = load_scorer(model=[f"hpsv2.1={judges['hpsv2.1'][0]}", "mps"], weights=str(WEIGHTS), device="cpu",
                        dtype="fp32")
    app = create_app(panel, ServeOptions())
    app.state.service.batcher.start()  # the app's lifespan would; httpx's transport runs none
    body = {"images": [base64.b64encode((IMAGES / n).read_bytes()).decode() for n in ("alpha.png", "crop.png")],
            "prompt": PROMPT, "dims": ["detail"]}

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return (await client.post("/v1/score", json=body)).json(), (await client.get("/v1/info")).json()

    try:
        scored, info = asyncio.run(ask())
    finally:
        app.state.service.batcher.close()
    assert info["models"] == ["hpsv2.1", "mps"]
    assert [list(r["scores"]) for r in scored["results"]] == [["hpsv2.1", "mps.detail"]] * 2
    here = panel.score([IMAGES / "alpha.png", IMAGES / "crop.png"], PROMPT, dims=["detail"])
    assert [r["scores"]["hpsv2.1"] for r in scored["results"]] == [r.scores["hpsv2.1"] for r in here]


def test_judges_download_from_their_published_repositories_then_run_offline(judges, tmp_path):
    """The table's repositories and file names, fetched like MPS's (HF cache, then --offline)."""
    server = HubServer()
    for name in ("pickscore", "hpsv2.1"):
        spec, path = JUDGES[name], judges[name][0]
        server.add_file(spec.repo, spec.filename, path)
        server.add_file(spec.repo, "config.json", FIXTURE / "config.json", lfs=False)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "MPS_CACHE_DIR": str(tmp_path / "c")}
    args = ["score", str(IMAGES / "crop.png"), "--prompt", PROMPT, "--json", "--device", "cpu",
            "--model", "pickscore,hpsv2.1"]
    with server:
        online = run_mps(*args, env={**env, "HF_ENDPOINT": server.url}, fork=True)
        assert online.returncode == 0, online.stderr
        assert {r.filename for r in server.requests("GET")} >= {"model.safetensors", "HPS_v2.1_compressed.pt"}
    offline = run_mps(*args, "--offline", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, fork=True)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == json.loads(online.stdout)
    assert list(json.loads(online.stdout)[0]["scores"]) == ["pickscore", "hpsv2.1"]


def test_a_judge_that_cannot_be_fetched_points_to_its_own_weights_not_mps(tmp_path):
    """The remedy for a judge's weights missing offline (or its Hub unreachable) is NAME=PATH in --model:
    --weights gives MPS's weights and would not help."""
    cache = tmp_path / "hf"
    cache.mkdir()
    res = run_cli("score", str(IMAGES / "sunset.png"), "--prompt", PROMPT, "-m", "mps,pickscore", "--offline",
                  *LOCAL, env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache)})
    assert res.returncode == 4, res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"mps: error: hf://{JUDGES['pickscore'].repo}/"), line
    assert line.endswith("or pass --model pickscore=PATH") and "--weights" not in line, line
