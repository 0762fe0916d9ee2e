"""The differentiable reward: the scorer's numbers from tensors, correct gradients, frozen weights."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import FIXTURE, IMAGES, REPO, WEIGHTS

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
IMAGE_NAMES = sorted({row["image"] for row in EXPECTED["scores"]})
PROMPTS = sorted({row["prompt"] for row in EXPECTED["scores"]})
# The bound the default must meet on every row. The default rounds to 8 bits where PIL does
# (0.0025 from the original at most); the smooth path does not round, and this random tiny model
# turns its up-to-a-grey-level difference into up to 0.017 on the 112 dimension rows and 0.049
# on the 28 custom rows (threshold 0.01).
PARITY_TOL = 0.02


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are too small to split; on a shared 2-core machine a second thread only waits."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reward_all():
    from mps_cli import load_reward

    return load_reward(WEIGHTS, dims="all", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reward():
    from mps_cli import load_reward

    return load_reward(WEIGHTS, device="cpu", dtype="fp32")


def image_tensor(name: str) -> torch.Tensor:
    """1 x 3 x H x W in [0, 1], from the scorer's own decode (RGB conversion included)."""
    from mps_cli.engine.preprocess import open_image

    img = open_image(IMAGES / name)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def batch(shape=(2, 3, 40, 56), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen)


def test_exported_lazily_from_the_package():
    import mps_cli
    from mps_cli.panel_reward import load_reward  # MPS's reward, or with model= several models' (docs/judges.md)
    from mps_cli.reward import MPSReward

    assert mps_cli.load_reward is load_reward and mps_cli.MPSReward is MPSReward
    assert issubclass(MPSReward, torch.nn.Module)


@pytest.fixture(scope="module")
def fixture_rewards(reward_all):
    """A reward per (condition, threshold) of expected.json, keyed like its rows."""
    from mps_cli import load_reward

    out = {None: reward_all}
    for condition, threshold in {(r["condition"], r["mask_threshold"]) for r in EXPECTED["custom"]}:
        out[condition, threshold] = load_reward(WEIGHTS, dims=None, condition=condition, mask_threshold=threshold,
                                                device="cpu", dtype="fp32")
    return out


def fixture_gaps(rewards: dict, input_range, round_pixels: bool | None) -> list[tuple[float, dict]]:
    """|reward - original| for every row of expected.json, images as tensors in ``input_range``;
    ``round_pixels`` None: the rewards as loaded (the default)."""
    lo, hi = input_range
    gaps = []
    for key, rw in rewards.items():
        rows = EXPECTED["scores"] if key is None else \
            [r for r in EXPECTED["custom"] if (r["condition"], r["mask_threshold"]) == key]
        default = rw.round_pixels
        rw.round_pixels = default if round_pixels is None else round_pixels
        try:
            for name in IMAGE_NAMES:
                x = image_tensor(name) * (hi - lo) + lo
                with torch.no_grad():
                    got = rw.score(x.expand(len(PROMPTS), -1, -1, -1), PROMPTS, input_range=input_range)
                for row in rows:
                    if row["image"] == name:
                        value = got[row.get("dim", "custom")][PROMPTS.index(row["prompt"])].item()
                        gaps.append((abs(value - row["score"]), row))
        finally:
            rw.round_pixels = default
    assert len(gaps) == len(EXPECTED["scores"]) + len(EXPECTED["custom"])
    return gaps


@pytest.mark.parametrize("input_range", [(0, 1), (-1, 1)])
def test_the_default_gives_the_originals_scores_on_every_fixture_row(fixture_rewards, input_range):
    """All 140 rows (112 dimension, 28 custom-condition) within PARITY_TOL, with a margin of 4x."""
    assert all(rw.round_pixels for rw in fixture_rewards.values())  # straight-through rounding by default
    gaps = fixture_gaps(fixture_rewards, input_range, round_pixels=None)
    worst = max(gaps, key=lambda g: g[0])
    print(f"default, {input_range}: max gap {worst[0]:.5f} over {len(gaps)} rows")
    assert len(gaps) == 140
    assert worst[0] < PARITY_TOL / 4, worst  # PIL rounds in fixed point: a few ties still land on the other level


@pytest.mark.parametrize("input_range", [(0, 1), (-1, 1)])
def test_the_smooth_path_lands_near_the_originals(fixture_rewards, input_range):
    """round_pixels=False skips PIL's 8-bit rounding; this random tiny model is sensitive to it."""
    gaps = fixture_gaps(fixture_rewards, input_range, round_pixels=False)
    dims = max(g for g, row in gaps if "dim" in row)
    custom = max(g for g, row in gaps if "dim" not in row)
    print(f"smooth, {input_range}: max gap {dims:.4f} (112 dimension rows), {custom:.4f} (28 custom rows)")
    assert 0 < dims < PARITY_TOL
    assert custom < 3 * PARITY_TOL


def test_preprocessing_lands_within_about_a_grey_level_of_pil():
    from mps_cli.constants import IMAGE_STD
    from mps_cli.engine.preprocess import open_image, pixels_from_image
    from mps_cli.reward import preprocess_images

    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    for name in IMAGE_NAMES:
        ref = pixels_from_image(open_image(IMAGES / name), 224)
        got = preprocess_images(image_tensor(name), 224, round_pixels=False)[0]
        assert got.shape == ref.shape == (3, 224, 224)
        levels = ((got - ref) * std * 255).abs()
        # Two uint8 roundings in PIL (after each resize pass), none here; no overshoot left unclipped.
        assert levels.max() < 1.1, (name, levels.max().item())
        assert levels.mean() < 0.45, (name, levels.mean().item())


def test_full_path_gradients_pass_gradcheck_in_float64():
    """Elementwise on a 2x3 image, and fast (a random direction) on a batch of two 5x7 images in two dimensions.

    Both go through the whole smooth path (the default's backward pass): resize, crop, normalise,
    vision tower, mask, cross model. The default's forward pass rounds, so finite differences of it
    are steps, not slopes.
    """
    from mps_cli import load_reward

    rw = load_reward(WEIGHTS, dims=("overall", "detail"), device="cpu", dtype="fp32", round_pixels=False).double()
    assert rw.dtype == torch.float64
    gen = torch.Generator().manual_seed(1)
    prompts = ["a red fox in the snow", "portrait of an old fisherman"]
    # Values well inside (0, 1): the resize's clamp (PIL's clipping) is then smooth.
    small = (0.3 + 0.4 * torch.rand(1, 3, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda im: tuple(rw.score(im, prompts[:1]).values()), (small,))
    pair = (0.3 + 0.4 * torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda im: tuple(rw.score(im, prompts).values()), (pair,), fast_mode=True)


def test_weights_stay_frozen_and_pixels_get_gradients(reward):
    x = batch().requires_grad_()
    loss = reward.loss(x, ["a red fox in the snow", "a lighthouse at dusk"])
    assert loss.dim() == 0
    loss.backward()
    params = list(reward.parameters())
    assert len(params) > 50
    assert all(not p.requires_grad and p.grad is None for p in params)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_a_wrapping_module_cannot_switch_the_reward_to_training(reward):
    outer = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), reward)
    outer.train()
    assert outer[0].training
    assert not reward.training and not any(m.training for m in reward.modules())
    assert reward.train() is reward and not reward.training


def test_text_features_are_computed_once_without_gradient(reward):
    stats = reward._scorer.stats
    prompt = "a bowl of ramen, steam rising"
    before = stats["prompt_encodes"]
    for _ in range(2):
        reward(batch().requires_grad_(), prompt).sum().backward()
    assert stats["prompt_encodes"] == before + 1
    cached = reward._scorer._prompts[prompt]
    assert not cached.tokens.requires_grad and cached.tokens.grad_fn is None
    assert not any(c.requires_grad for c in reward._scorer._conditions.values())


def test_scores_do_not_depend_on_the_batch(reward):
    x = batch((3, 3, 64, 48), seed=3)
    prompts = ["a cat", "a dog on a skateboard", "a cat"]
    with torch.no_grad():
        together = reward(x, prompts)
        alone = torch.cat([reward(x[i:i + 1], prompts[i]) for i in range(3)])
    assert together.shape == (3,) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_grad_checkpointing_gives_the_same_gradients(reward):
    from mps_cli import load_reward

    ckpt = load_reward(WEIGHTS, device="cpu", dtype="fp32", grad_checkpointing=True)
    calls = {"vision": 0, "cross": 0}
    hooks = [
        ckpt.model.visual.transformer.resblocks[0].ln_1.register_forward_hook(
            lambda *_: calls.__setitem__("vision", calls["vision"] + 1)),
        ckpt.model.cross.cross[1].norm.register_forward_hook(lambda *_: calls.__setitem__("cross", calls["cross"] + 1)),
    ]
    grads = []
    for rw in (reward, ckpt):
        x = batch((2, 3, 96, 72), seed=4).requires_grad_()
        rw.loss(x, ["a red fox in the snow", "a lighthouse at dusk"]).backward()
        grads.append(x.grad)
    for h in hooks:
        h.remove()
    assert calls == {"vision": 2, "cross": 2}  # each recomputed once in backward: checkpointing is on
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_works_under_autocast(reward, dtype):
    x = batch(seed=5)
    with torch.no_grad():
        ref = reward(x, "a red fox in the snow")
    x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        got = reward(x, "a red fox in the snow")
    got.sum().backward()
    assert got.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Same model in 8 (bf16) or 11 (fp16) significant bits: close to fp32, not equal.
    assert (got.detach() - ref).abs().max() < 0.5
    assert not torch.equal(got.detach(), ref)
    # The cached text side was not computed under autocast.
    assert reward._scorer._prompts["a red fox in the snow"].tokens.dtype == torch.float32


def test_several_dimensions_give_a_dict_and_the_adapters(reward_all):
    x = batch(seed=6)
    prompts = ("a cat", "a dog")
    with torch.no_grad():
        scores = reward_all(x, prompts)
        assert set(scores) == {"overall", "aesthetics", "detail", "alignment"}
        fn = reward_all.reward_fn("detail")
        got, info = fn(x, prompts, [{}, {}])
        torch.testing.assert_close(got, scores["detail"])
        assert set(info) == set(scores) and not got.requires_grad
        mean = torch.stack(list(scores.values())).mean(dim=0)
        torch.testing.assert_close(reward_all.loss(x, prompts), -mean.mean())
        hi, lo = mean.max().item() + 1, mean.min().item() - 1
        torch.testing.assert_close(reward_all.loss(x, prompts, target=lo), torch.tensor(0.0))
        torch.testing.assert_close(reward_all.loss(x, prompts, target=hi), (hi - mean).mean())
    with pytest.raises(ValueError, match="custom"):
        reward_all.reward_fn("custom")


def test_reward_fn_takes_zero_one_images_whatever_the_input_range():
    from mps_cli import load_reward

    vae = load_reward(WEIGHTS, device="cpu", dtype="fp32", input_range=(-1, 1))
    x = batch(seed=7)
    with torch.no_grad():
        scores, _ = vae.reward_fn()(x, ["a cat", "a dog"], None)
        torch.testing.assert_close(scores, vae(x * 2 - 1, ["a cat", "a dog"]))


def test_bad_inputs_raise_typed_errors(reward):
    from mps_cli import InputError, load_reward

    with pytest.raises(InputError, match="B x 3 x H x W"):
        reward(torch.rand(3, 32, 32), "a cat")
    with pytest.raises(InputError, match="B x 3 x H x W"):
        reward(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "a cat")
    with pytest.raises(InputError, match="2 images but 3 prompts"):
        reward(batch(), ["a", "b", "c"])
    with pytest.raises(InputError, match="prompt 1 is NoneType"):
        reward(batch(), ["a", None])
    with pytest.raises(ValueError, match="unknown dimension"):
        load_reward(WEIGHTS, dims=("beauty",), device="cpu")
    with pytest.raises(ValueError, match="input range"):
        load_reward(WEIGHTS, device="cpu", input_range=(1, -1))


def test_loading_errors_are_the_scorers(tmp_path):
    from mps_cli import MPSError, load_reward, load_scorer

    missing = tmp_path / "nope.safetensors"
    errors = []
    for load in (load_scorer, load_reward):
        with pytest.raises(MPSError) as info:
            load(missing, device="cpu")
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_guidance_example_raises_the_score(capsys):
    spec = importlib.util.spec_from_file_location("reward_guidance", REPO / "examples" / "reward_guidance.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rc = example.main(["--weights", str(WEIGHTS), "--steps", "4", "--size", "64", "--device", "cpu",
                       "--dtype", "fp32", "--prompt", "a red fox sitting in the snow"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["scores"]) == 5
    assert out["end"] > out["start"] + 0.1, out
