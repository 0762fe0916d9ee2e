"""Loading checkpoints: every way a weights file or config can be wrong, key prefixes, dtypes, devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, IMAGES, ORIGINAL, WEIGHTS

from mps_cli import load_scorer
from mps_cli.errors import CheckpointError, ConfigError

CONFIG = FIXTURE / "config.json"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
DIMS = ("overall", "aesthetics", "detail", "alignment")
PROMPT = "three blue cubes stacked on top of a wooden table"
TOL = 1e-3


@pytest.fixture(scope="module")
def tensors() -> dict:
    from safetensors.torch import load_file

    return load_file(WEIGHTS)


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _load_error(path: Path, error=CheckpointError, **kwargs) -> str:
    """Load, expecting ``error``; returns its message as the CLI shows it (with the flag hint the CLI adds),
    after the checks every loader error must pass: one line, and no CLI flag named by the library."""
    from mps_cli.cli.app import describe

    kwargs.setdefault("config", CONFIG)
    with pytest.raises(error) as info:
        load_scorer(path, device="cpu", dtype="fp32", **kwargs)
    assert type(info.value) is error
    assert " --" not in str(info.value)
    message = describe(info.value)
    assert "\n" not in message
    return message


def _assert_scores_match_fixture(scorer, prompt: str = PROMPT, expected_rows=None):
    rows = [r for r in (expected_rows or EXPECTED["scores"]) if r["prompt"] == prompt]
    names = sorted({r["image"] for r in rows})
    dims = sorted({r["dim"] for r in rows})
    results = {Path(r.image).name: r for r in scorer.score([IMAGES / n for n in names], prompt, dims=dims)}
    for row in rows:
        got = results[row["image"]]
        assert got.scores[row["dim"]] == pytest.approx(row["score"], abs=TOL), (row["image"], row["dim"])
        assert got.kept_tokens[row["dim"]] == row["kept_tokens"], (row["image"], row["dim"])


# --- unreadable files ---------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    data = WEIGHTS.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    message = _load_error(path)
    assert str(path) in message and "truncated" in message
    assert f"{len(data) // 2:,}" in message and f"{len(data):,}" in message


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    message = _load_error(path)
    assert str(path) in message and "truncated" in message and "0 bytes" in message


def test_text_file_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not the weights you are looking for\n" * 20)
    message = _load_error(path)
    assert str(path) in message and "not a safetensors file" in message


def test_corrupt_header_json(tmp_path):
    header = b"{this is not json}      "
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    message = _load_error(path)
    assert str(path) in message and "corrupt safetensors header" in message


def test_missing_file(tmp_path):
    message = _load_error(tmp_path / "absent.safetensors")
    assert str(tmp_path / "absent.safetensors") in message and "not found" in message


def test_safetensors_without_mps_keys(tmp_path):
    path = _save(tmp_path / "other.safetensors", {"weight": torch.zeros(2, 2)})
    message = _load_error(path)
    assert str(path) in message and "not an MPS checkpoint" in message
    assert "model.text_model.embeddings.token_embedding.weight" in message


# --- keys and shapes that do not fit ------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["cross_model.layers.1.0.fn.to_out.weight", "model.text_model.encoder.layers.0.self_attn.q_proj.weight",
     "model.vision_model.encoder.layers.1.self_attn.v_proj.bias", "model.logit_scale"],
)
def test_missing_key(tmp_path, tensors, key):
    path = _save(tmp_path / "missing.safetensors", {k: v for k, v in tensors.items() if k != key})
    message = _load_error(path)
    assert str(path) in message and "missing" in message and key in message
    # A damaged file, not another architecture: no advice to pass a config.
    assert "--config" not in message


def test_unexpected_extra_key(tmp_path, tensors):
    extra = "model.text_model.encoder.layers.0.mlp.fc3.weight"
    path = _save(tmp_path / "extra.safetensors", {**tensors, extra: torch.zeros(4, 4)})
    message = _load_error(path)
    assert str(path) in message and "unexpected" in message and extra in message


def test_unexpected_key_outside_the_prefix(tmp_path, tensors):
    path = _save(tmp_path / "stray.safetensors", {**tensors, "optimizer.step": torch.zeros(1)})
    message = _load_error(path)
    assert "unexpected" in message and "optimizer.step" in message


@pytest.mark.parametrize(
    "key, shape, want",
    [
        ("cross_model.layers.0.0.fn.to_out.weight", (64, 32), "(64, 64)"),
        ("model.text_model.final_layer_norm.weight", (65,), "(64,)"),
        # Stored apart, fused in the model: the error names the one projection that is off.
        ("model.text_model.encoder.layers.1.self_attn.k_proj.weight", (64, 48), "(64, 64)"),
    ],
)
def test_wrong_shape(tmp_path, tensors, key, shape, want):
    path = _save(tmp_path / "shape.safetensors", {**tensors, key: torch.zeros(shape)})
    message = _load_error(path)
    assert str(path) in message and "wrong shape" in message
    assert f"{key} {shape} (model expects {want})" in message
    assert message.count("wrong shape") == 1 and "q_proj" not in message


def test_unknown_prefix(tmp_path, tensors):
    path = _save(tmp_path / "foo.safetensors", {f"foo.{k}": v for k, v in tensors.items()})
    message = _load_error(path)
    assert str(path) in message and "unknown key prefix 'foo.'" in message


# --- configs ------------------------------------------------------------------------------------


def _config_with(tmp_path: Path, name: str = "config.json", **vision) -> Path:
    data = json.loads(CONFIG.read_text())
    data["vision_config"].update(vision)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_config_disagreeing_with_weights_passed_explicitly(tmp_path):
    config = _config_with(tmp_path, "patch16.json", patch_size=16)
    message = _load_error(WEIGHTS, config=config)
    assert str(WEIGHTS) in message and str(config) in message and "--config" in message
    assert ("model.vision_model.embeddings.patch_embedding.weight (64, 3, 32, 32) (model expects (64, 3, 16, 16))"
            in message)


def test_config_disagreeing_with_weights_beside_them(tmp_path):
    weights = tmp_path / "mps-tiny.safetensors"
    shutil.copyfile(WEIGHTS, weights)
    config = _config_with(tmp_path, patch_size=16)
    message = _load_error(weights, config=None)
    assert str(weights) in message and str(config) in message and "--config" in message
    assert "patch_embedding.weight (64, 3, 32, 32)" in message


def test_config_beside_weights_is_picked_up(tmp_path):
    weights = tmp_path / "w.safetensors"
    shutil.copyfile(WEIGHTS, weights)
    shutil.copyfile(CONFIG, tmp_path / "config.json")
    scorer = load_scorer(weights, device="cpu", dtype="fp32")
    assert scorer.config.source == str(tmp_path / "config.json")
    assert scorer.config.vision.patch_size == 32 and scorer.config.text.width == 64
    _assert_scores_match_fixture(scorer)


def test_without_config_the_builtin_vit_h_14_is_used(tmp_path):
    weights = tmp_path / "w.safetensors"
    shutil.copyfile(WEIGHTS, weights)
    message = _load_error(weights, config=None)
    assert str(weights) in message and "wrong shape" in message
    assert "built-in ViT-H-14" in message and "--config" in message
    assert "model.text_projection.weight (64, 64) (model expects (1024, 1024))" in message


@pytest.mark.parametrize(
    "text, fragment",
    [("{not json", "not valid JSON"), ("{}", "not a CLIP config"), ("[1, 2]", "expected a JSON object")],
)
def test_unreadable_or_invalid_config(tmp_path, text, fragment):
    config = tmp_path / "config.json"
    config.write_text(text)
    message = _load_error(WEIGHTS, error=ConfigError, config=config)
    assert str(config) in message and fragment in message


def test_missing_config(tmp_path):
    message = _load_error(WEIGHTS, error=ConfigError, config=tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in message and "not found" in message


def test_config_with_unsupported_activation(tmp_path):
    config = _config_with(tmp_path, hidden_act="relu")
    message = _load_error(WEIGHTS, error=ConfigError, config=config)
    assert "vision_config.hidden_act 'relu'" in message


# --- prefixes and ignored tensors ---------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["mps.", "module."])
def test_prefixed_keys_load_and_score_the_same(tmp_path, tensors, prefix):
    path = _save(tmp_path / "prefixed.safetensors", {prefix + k: v for k, v in tensors.items()})
    scorer = load_scorer(path, config=CONFIG, device="cpu", dtype="fp32")
    _assert_scores_match_fixture(scorer)


def test_position_ids_and_post_layernorm_are_ignored(tmp_path, tensors):
    # post_layernorm is garbage here: were it used (or loaded into ln_post), scores would move.
    variant = {
        **tensors,
        "model.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model.vision_model.embeddings.position_ids": torch.arange(50).unsqueeze(0),
        "model.vision_model.post_layernorm.weight": torch.full((64,), 7.0),
        "model.vision_model.post_layernorm.bias": torch.full((64,), -3.0),
    }
    scorer = load_scorer(_save(tmp_path / "extras.safetensors", variant), config=CONFIG, device="cpu",
                         dtype="fp32")
    _assert_scores_match_fixture(scorer)


def test_post_layernorm_may_be_absent(tmp_path, tensors):
    variant = {k: v for k, v in tensors.items() if "post_layernorm" not in k}
    assert len(variant) == len(tensors) - 2
    scorer = load_scorer(_save(tmp_path / "nopost.safetensors", variant), config=CONFIG, device="cpu",
                         dtype="fp32")
    _assert_scores_match_fixture(scorer)


# --- dtypes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_weights(tmp_path_factory, tensors) -> Path:
    folder = tmp_path_factory.mktemp("fp16")
    shutil.copyfile(CONFIG, folder / "config.json")
    return _save(folder / "mps-tiny-fp16.safetensors", {k: v.half() for k, v in tensors.items()})


def _param_dtypes(scorer) -> set:
    return {p.dtype for p in scorer.model.parameters()}


def test_fp16_file_loads_into_fp32(fp16_weights):
    from safetensors import safe_open

    with safe_open(str(fp16_weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    scorer = load_scorer(fp16_weights, device="cpu", dtype="fp32")
    assert _param_dtypes(scorer) == {torch.float32}
    # The original implementation's scores for the fp16-rounded weights, computed in fp32.
    reference = json.loads((ORIGINAL / "expected-fp16-weights.json").read_text())["scores"]
    for prompt in sorted({r["prompt"] for r in reference}):
        _assert_scores_match_fixture(scorer, prompt, reference)


def test_fp16_file_loads_into_bf16(fp16_weights):
    scorer = load_scorer(fp16_weights, device="cpu", dtype="bf16")
    assert scorer.dtype == torch.bfloat16
    assert torch.bfloat16 in _param_dtypes(scorer) and torch.float16 not in _param_dtypes(scorer)
    reference = json.loads((ORIGINAL / "expected-fp16-weights.json").read_text())["scores"]
    # With the text side in fp32, bf16 images move fixture scores by at most 0.32 (measured on
    # AVX-512 and on CUDA); every row of every prompt must stay within 0.5 of the original's.
    for prompt in sorted({r["prompt"] for r in reference}):
        rows = [r for r in reference if r["prompt"] == prompt]
        images = [IMAGES / n for n in sorted({r["image"] for r in rows})]
        results = {Path(r.image).name: r for r in scorer.score(images, prompt, dims=sorted({r["dim"] for r in rows}))}
        for row in rows:
            assert abs(results[row["image"]].scores[row["dim"]] - row["score"]) < 0.5, row
