"""Composite rewards, one spelling everywhere: the parser, load_reward(reward=...), --reward on score, rank
and versus (the server's field is in test_batch.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from conftest import IMAGES, WEIGHTS, run_cli

from mps_cli.composite import parse_composite
from mps_cli.errors import CompositeError

PROMPT = "a red fox sitting in a snowy forest at dawn"
LOCAL = ["--weights", str(WEIGHTS), "--device", "cpu"]


# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("text, weights, constant, spelling", [
    ("overall+0.5*alignment", {"overall": 1.0, "alignment": 0.5}, 0.0, "overall + 0.5*alignment"),
    ("0.7*mps.overall+0.3*hpsv2.1", {"mps.overall": 0.7, "hpsv2.1": 0.3}, 0.0, "0.7*mps.overall + 0.3*hpsv2.1"),
    ("-(overall - 2*detail)/4 + 1", {"overall": -0.25, "detail": 0.5}, 1.0, "-0.25*overall + 0.5*detail + 1"),
    ("2*(overall + detail) - overall", {"overall": 1.0, "detail": 2.0}, 0.0, "overall + 2*detail"),
    ("aesthetics*3 - custom/2", {"aesthetics": 3.0, "custom": -0.5}, 0.0, "3*aesthetics - 0.5*custom"),
    (" pickscore ", {"pickscore": 1.0}, 0.0, "pickscore"),
])
def test_expressions_reduce_to_a_weighted_sum(text, weights, constant, spelling):
    c = parse_composite(text)
    assert dict(c.weights) == weights and c.constant == constant and c.spelling == spelling
    assert parse_composite(c.spelling).weights == c.weights  # the canonical spelling reads back the same


@pytest.mark.parametrize("text, message", [
    ("overall*detail", "a product of two scores is not a weighted sum (position 8)"),
    ("overall/detail", "division by a score is not a weighted sum"),
    ("overall/0", "division by zero"),
    ("(overall + detail", "a parenthesis is not closed"),
    ("overall +", "it ends where a number or a name should come"),
    ("overall $ 2", "at '$ 2' (position 9)"),
    ("3", "names no score"),
    ("", "is empty"),
    ("1e999*overall", "not a finite number"),
    ("(" * 40 + "overall" + ")" * 40, "nested deeper than 32"),
    ("overall+" * 200 + "overall", "at most 1000"),
    ("__import__('os')", "(position 12): expected a number"),  # never evaluated: a quote is no token
])
def test_malformed_expressions_are_typed_errors_saying_what_and_where(text, message):
    with pytest.raises(CompositeError) as exc:
        parse_composite(text)
    assert message in str(exc.value) and exc.value.hint == "reward"


def test_names_bind_to_the_scored_keys_and_ask_for_what_they_need():
    c = parse_composite("overall + 0.5*alignment")
    assert c.bind(["mps.overall", "mps.alignment"]).weights == (("mps.overall", 1.0), ("mps.alignment", 0.5))
    assert parse_composite("mps.detail").bind(["detail"]).weights == (("detail", 1.0),)
    with pytest.raises(CompositeError, match=r"reward term 'alignment' of .* is not among the scores \(overall\)"):
        c.bind(["overall"])
    assert c.request(None, None, None) == (None, ["overall", "alignment"])
    assert c.request(None, ["detail"], None) == (None, ["detail", "overall", "alignment"])
    assert c.request(None, ["all"], None) == (None, ["all"])
    mixed = parse_composite("0.7*mps.overall+0.3*hpsv2.1")
    assert mixed.request(None, None, None) == (["mps", "hpsv2.1"], ["overall"])  # the judge it names is loaded
    assert parse_composite("pickscore").request(None, None, None) == (["pickscore"], None)
    with pytest.raises(CompositeError, match=r"needs hpsv2.1 among the models \(mps, pickscore\)") as exc:
        mixed.request(["mps", "pickscore"], None, None)
    assert exc.value.hint == "model"
    with pytest.raises(CompositeError, match="needs mps among the models"):
        parse_composite("overall").request(["pickscore=x.safetensors"], None, None)
    with pytest.raises(CompositeError, match="unknown reward term 'beauty'"):
        parse_composite("overall - beauty").request(None, None, None)
    with pytest.raises(CompositeError, match="needs a custom condition"):
        parse_composite("custom").request(None, None, None)
    assert c.value({"overall": 2.0, "alignment": 4.0, "detail": 9.0}) == 4.0
    assert c.terms({"overall": 2.0, "alignment": 4.0, "detail": 9.0}) == {"overall": 2.0, "alignment": 4.0}


# --------------------------------------------------------------------------- load_reward


def test_load_reward_with_a_composite_is_the_differentiable_weighted_sum():
    from mps_cli import load_reward

    reward = load_reward(WEIGHTS, reward="overall + 0.5*alignment - detail", device="cpu", dtype="fp32")
    assert reward.dims == ("overall", "alignment", "detail")
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 3, 48, 64), generator=g).requires_grad_(True)
    value = reward(x, PROMPT)
    parts = reward.score(x, PROMPT)
    want = parts["overall"] + 0.5 * parts["alignment"] - parts["detail"]
    assert value.shape == (2,) and torch.allclose(value, want)
    (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    assert grad.abs().sum() > 0 and torch.allclose(grad, want_grad)
    scores, info = reward.reward_fn()(x.detach(), [PROMPT] * 2, None)
    assert torch.allclose(scores, want.detach()) and set(info) == {"overall", "alignment", "detail", "composite"}
    assert torch.allclose(reward.loss(x, PROMPT), -want.mean())
    # explicit dims are scored beside the composite's
    both = load_reward(WEIGHTS, reward="detail", dims=["aesthetics"], device="cpu", dtype="fp32")
    assert both.dims == ("aesthetics", "detail") and torch.allclose(both(x, PROMPT), parts["detail"])
    with pytest.raises(CompositeError, match="unknown reward term 'beauty'"):
        load_reward(WEIGHTS, reward="beauty", device="cpu")


def test_load_reward_composite_over_a_judge(judges):
    from mps_cli import load_reward

    path, _ = judges["pickscore"]
    reward = load_reward(str(WEIGHTS), model=["mps", f"pickscore={path}"], reward="0.7*overall + 0.3*pickscore",
                         device="cpu", dtype="fp32")
    x = torch.rand((2, 3, 40, 40), generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    parts = reward.score(x, PROMPT)
    assert list(parts) == ["mps.overall", "pickscore"]
    value = reward(x, PROMPT)
    assert torch.allclose(value, 0.7 * parts["mps.overall"] + 0.3 * parts["pickscore"])
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------- the command line


def test_score_and_rank_report_the_composite_beside_its_terms(scorer):
    images = [IMAGES / n for n in ("crop.png", "sunset.png", "portrait.jpg", "wide.webp")]
    want = {str(r.image): r.scores for r in scorer.score(images, PROMPT, dims=["overall", "alignment"])}
    res = run_cli("score", *map(str, images), "--prompt", PROMPT, "--reward", "overall+0.5*alignment", "--json", *LOCAL)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    for row in rows:
        w = want[row["image"]]
        assert set(row["scores"]) == {"overall", "alignment"} and row["terms"] == row["scores"]
        assert abs(row["composite"] - (w["overall"] + 0.5 * w["alignment"])) < 1e-5
    ranked = run_cli("rank", *map(str, images), "--prompt", PROMPT, "--reward", "alignment - overall", "--csv",
                     *LOCAL)
    assert ranked.returncode == 0
    table = list(csv.DictReader(io.StringIO(ranked.stdout)))
    assert list(table[0]) == ["rank", "image", "prompt", "alignment", "overall", "composite", "error"]
    composites = [float(r["composite"]) for r in table]
    assert composites == sorted(composites, reverse=True)  # --reward ranks by the composite
    assert all(abs(float(r["composite"]) - (float(r["alignment"]) - float(r["overall"]))) < 2e-6 for r in table)
    by_overall = run_cli("rank", *map(str, images), "--prompt", PROMPT, "--reward", "alignment - overall",
                         "--by", "overall", "--jsonl", *LOCAL)
    overall = [json.loads(line)["scores"]["overall"] for line in by_overall.stdout.splitlines()]
    assert overall == sorted(overall, reverse=True)
    table_out = run_cli("score", str(images[0]), "--prompt", PROMPT, "--reward", "detail", *LOCAL)
    assert "composite" in table_out.stdout


def test_bad_rewards_are_one_line_before_any_model_loads():
    from mps_cli.cli.app import LOADS

    before = LOADS["count"]
    cases = {
        ("score", str(IMAGES / "crop.png"), "--prompt", PROMPT, "--reward", "overall+beauty"):
            "unknown reward term 'beauty'",
        ("score", str(IMAGES / "crop.png"), "--prompt", PROMPT, "--reward", "overall*detail"):
            "a product of two scores is not a weighted sum",
        ("rank", str(IMAGES / "crop.png"), "--prompt", PROMPT, "--by", "composite"): "--by composite needs --reward",
        ("score", str(IMAGES / "crop.png"), "--prompt", PROMPT, "--reward", "overall+pickscore", "--model", "mps"):
            "needs pickscore among the models (mps) (add them with --model)",
    }
    for args, message in cases.items():
        res = run_cli(*args, *LOCAL)
        said = " ".join(res.stderr.replace("│", " ").split())  # Typer's usage box, in-process, wraps the line
        assert res.returncode == 2 and message in said, (args, res.stderr)
        assert "Traceback" not in res.stderr and not res.stdout
    assert LOADS["count"] == before


def test_versus_compares_the_composite_as_a_key(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for side, names in ((a, ["crop.png", "sunset.png", "gray.png"]), (b, ["portrait.jpg", "wide.webp", "alpha.png"])):
        side.mkdir()
        for i, n in enumerate(names):
            (side / f"{i}.png").write_bytes((IMAGES / n).read_bytes())
    res = run_cli("versus", str(a), str(b), "--prompt", PROMPT, "--reward", "overall+0.5*alignment", "--json",
                  "--no-cache", "--bootstrap", "100", *LOCAL)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert list(doc["results"]) == ["overall", "alignment", "composite"] and doc["reward"] == "overall + 0.5*alignment"
    assert doc["results"]["composite"]["wins"] + doc["results"]["composite"]["losses"] \
        + doc["results"]["composite"]["ties"] == 3
