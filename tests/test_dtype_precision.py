"""bf16 that keeps the ranking: the text side (prompt and condition features, the mask) stays fp32.

Measured on the golden fixture, all 140 expected.json rows (4 prompts x 7 images x 4 dimensions,
plus the custom-condition rows) and the 420 image pairs that share a prompt and condition.
"""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, IMAGES, WEIGHTS

from mps_cli import load_scorer

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
ROWS = [(r["image"], r["prompt"], r["dim"], None, EXPECTED["mask_threshold"]) for r in EXPECTED["scores"]]
ROWS += [(r["image"], r["prompt"], "custom", r["condition"], r["mask_threshold"]) for r in EXPECTED["custom"]]


def _score_rows(scorer, rows=ROWS) -> tuple[dict, dict]:
    """Every expected.json row scored by ``scorer``: (scores, kept_tokens), keyed by the row."""
    groups: dict[tuple, set] = {}
    for name, prompt, key, condition, threshold in rows:
        groups.setdefault((prompt, condition, threshold), set()).add((name, key))
    scores, kept = {}, {}
    for (prompt, condition, threshold), members in groups.items():
        names = sorted({n for n, _ in members})
        dims = None if condition else sorted({k for _, k in members})
        results = scorer.score([IMAGES / n for n in names], prompt, dims=dims, condition=condition,
                               mask_threshold=threshold)
        for name, res in zip(names, results):
            for key in res.scores:
                scores[name, prompt, key, condition, threshold] = res.scores[key]
                kept[name, prompt, key, condition, threshold] = res.kept_tokens[key]
    return scores, kept


def _swapped_pairs(got: dict, ref: dict) -> set:
    """The image pairs (same prompt and condition) whose order differs between ``got`` and ``ref``."""
    by_group: dict[tuple, list] = {}
    for row in ROWS:
        by_group.setdefault(row[1:], []).append(row)
    return {(a, b) for rows in by_group.values() for a, b in combinations(rows, 2)
            if (got[a] - got[b]) * (ref[a] - ref[b]) <= 0}


@pytest.fixture(scope="module")
def fp32_rows(scorer):
    return _score_rows(scorer)


@pytest.fixture(scope="module")
def bf16_scorer():
    return load_scorer(WEIGHTS, device="cpu", dtype="bf16")


def test_bf16_keeps_every_mask_and_the_ranking(bf16_scorer, fp32_rows):
    fp32, fp32_kept = fp32_rows
    assert bf16_scorer.precision.label == "bf16/fp32"
    dtypes = {name.split(".")[0]: p.dtype for name, p in bf16_scorer.model.named_parameters() if p.dim() >= 2}
    assert dtypes == {"text": torch.float32, "visual": torch.bfloat16, "cross": torch.bfloat16}
    got, kept = _score_rows(bf16_scorer)
    assert len(got) == 140
    assert kept == fp32_kept  # no condition mask flips (all bf16: 35 of 140 flip)
    assert max(abs(got[k] - fp32[k]) for k in got) < 0.5  # measured 0.33 (all bf16: 1.43)
    swapped = _swapped_pairs(got, fp32)
    # Measured 3 of 420 (99.3% in order; all bf16: 6). Not the 99.5% hoped for: the fp32 model
    # with only its image-side weights rounded to bf16 swaps 3 pairs too (benchmarks/bench.py
    # reports it), so what is left comes from the weights' precision, not the arithmetic.
    assert len(swapped) <= 3


def test_all_bf16_is_still_there_when_asked(fp32_rows):
    scorer = load_scorer(WEIGHTS, device="cpu", dtype="bf16/bf16")
    assert scorer.precision.label == "bf16" and scorer.text_dtype == torch.bfloat16
    fisherman = next(p for p in dict.fromkeys(r[1] for r in ROWS) if "fisherman" in p)
    _, kept = _score_rows(scorer, [r for r in ROWS if r[3] is None and r[1] == fisherman])
    # bf16 text features move the mask (measured: 35 of the 140 rows, 14 of them for this prompt):
    # why the text side stays fp32.
    assert any(fp32_rows[1][k] != v for k, v in kept.items())


def test_prepared_copy_is_keyed_by_the_mixed_layout(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("MPS_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copyfile(FIXTURE / "config.json", tmp_path / "config.json")
    fp16 = tmp_path / "fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(WEIGHTS).items()}, str(fp16))
    image = [IMAGES / "sunset.png"]
    first = load_scorer(fp16, device="cpu", dtype="bf16").score(image, "a red fox", dims=["all"])
    folder = tmp_path / "cache" / "prepared"
    (mixed,) = folder.glob("*.safetensors")
    assert mixed.name.endswith("-bfloat16_text_float32.safetensors")
    with safe_open(str(mixed), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys() if not k.startswith("__pad")}
    assert {v for k, v in stored.items() if k.startswith("text.")} == {"F32"}
    assert {v for k, v in stored.items() if k.startswith("visual.")} == {"BF16"}
    # The second load maps the copy and scores the same; all-bf16 gets its own copy beside it.
    assert load_scorer(fp16, device="cpu", dtype="bf16").score(image, "a red fox", dims=["all"]) == first
    load_scorer(fp16, device="cpu", dtype="bf16/bf16")
    names = sorted(p.name.split("-", 1)[1] for p in folder.glob("*.safetensors"))
    assert names == ["bfloat16.safetensors", "bfloat16_text_float32.safetensors"]
    assert Path(mixed).is_file()
