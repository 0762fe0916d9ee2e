"""Our CLIP towers and BPE against open_clip's, the reference implementation they stand in for.

mps_cli does not import open_clip (its package import costs seconds of start-up); these tests do,
so that the module layout the checkpoint is remapped onto and every token id stay open_clip's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE

from mps_cli.engine.bpe import BPE, VOCAB_FILE, vocab_path
from mps_cli.engine.model import TextTower, VisionTower
from mps_cli.weights.config import builtin_config, read_config


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return BPE()


def _corpus() -> list[str]:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    prompts = {r["prompt"] for r in expected["scores"]}
    prompts |= {c for c in expected["conditions"].values()} if isinstance(expected["conditions"], dict) else set()
    prompts |= {
        "", "   ", "a red fox", "A RED FOX", "it's, they're, we've, I'm, you'll, he'd: contractions",
        "1234567890 and 3.14159 and 1,000,000", "café crème brûlée naïve façade", "東京の夜景、ネオン",
        "🦊🔥 emoji, ZWJ 👩‍🚀 and flags 🇯🇵", "tom &amp; jerry &amp;amp; double-escaped &lt;b&gt;",
        "mojibake: cafÃ© and â€œquotesâ€\x9d", "tabs\tand\nnewlines\r\n  and   runs", "<start_of_text>",
        "text with <end_of_text> inside", "ALL-CAPS_snake_case kebab-case CamelCaseWords",
        "((masterpiece)), [best quality:1.2], {dynamic|prompts}, <lora:name:0.8>",
        "Ελληνικά, русский, עברית, العربية, हिन्दी", "a" * 300, "supercalifragilisticexpialidocious " * 5,
        "\u00ad soft\u00adhyphen and\u200bzero width", "x\x00y\x1bz control bytes",
    }
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?'-0123456789éüñß中文😀"
    prompts |= {"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120))) for _ in range(300)}
    return sorted(prompts)


def test_every_token_id_is_open_clips(ours, reference):
    corpus = _corpus()
    assert len(corpus) > 300
    for text in corpus:
        assert ours.encode(text) == reference.encode(text), repr(text)


def test_vocabulary_and_special_ids_are_open_clips(ours, reference):
    assert ours.ids == reference.encoder
    assert ours.ids["<start_of_text>"] == 49406 and ours.ids["<end_of_text>"] == 49407


def test_shipped_vocabulary_file_is_open_clips_byte_for_byte():
    # open_clip is no runtime dependency: the package ships CLIP's vocabulary, which must stay the reference's file.
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch, the reference (in the test extra), is not installed")
    theirs = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    ours = vocab_path()
    assert ours.parent == Path(importlib.util.find_spec("mps_cli.engine").origin).parent
    assert hashlib.sha256(ours.read_bytes()).hexdigest() == hashlib.sha256(theirs.read_bytes()).hexdigest()
    assert (ours.parent / "CLIP-LICENSE.txt").read_text().count("Copyright (c) 2021 OpenAI") == 1


def _reference_towers(cfg):
    from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer, VisionTransformer

    def kwargs(t):
        return dict(width=t.width, layers=t.layers, heads=t.heads, mlp_ratio=t.mlp_width / t.width,
                    act_layer=QuickGELU if t.act == "quick_gelu" else torch.nn.GELU,
                    norm_layer=lambda d: LayerNorm(d, eps=t.eps))

    text = TextTransformer(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size,
                           output_dim=cfg.embed_dim, **kwargs(cfg.text))
    vision = VisionTransformer(image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                               output_dim=cfg.embed_dim, **kwargs(cfg.vision))
    return text, vision


def _layout(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("which", ["fixture", "ViT-H-14"])
def test_towers_have_open_clips_parameter_names_and_shapes(which):
    cfg = read_config(FIXTURE / "config.json") if which == "fixture" else builtin_config()
    with torch.device("meta"):
        text, vision = _reference_towers(cfg)
        our_text, our_vision = TextTower(cfg.text, cfg.embed_dim), VisionTower(cfg.vision, cfg.embed_dim)
    assert _layout(our_text) == _layout(text)
    # MPS reads the vision tokens before ln_post, so our tower has none.
    assert _layout(our_vision) == {k: s for k, s in _layout(vision).items() if not k.startswith("ln_post.")}


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_our_blocks_compute_what_open_clips_compute(act):
    """Same random weights in both: our block runner (SDPA, in-place residuals) against open_clip's blocks."""
    from dataclasses import replace

    from mps_cli.engine.model import _run_tower

    cfg = read_config(FIXTURE / "config.json")
    cfg = replace(cfg, text=replace(cfg.text, act=act), vision=replace(cfg.vision, act=act))
    torch.manual_seed(0)
    text, vision = _reference_towers(cfg)
    our_text, our_vision = TextTower(cfg.text, cfg.embed_dim), VisionTower(cfg.vision, cfg.embed_dim)
    for ref, mine, causal, tokens in ((text, our_text, True, cfg.text.context_length),
                                      (vision, our_vision, False, cfg.vision.num_tokens)):
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.1)
        mine.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("ln_post.")})
        x = torch.randn(3, tokens, ref.transformer.width)
        with torch.no_grad():
            want = ref.transformer(x, attn_mask=text.attn_mask if causal else None)
            got = _run_tower(mine.transformer, x.clone(), causal=causal)
        assert torch.allclose(got, want, atol=1e-5), (act, causal, (got - want).abs().max())
