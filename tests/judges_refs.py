"""Tiny random-weight judges written in their published layouts, and the reference implementations' scores.

The references are the libraries the judges are published for, run as their authors run them:
open_clip (HPSv2.1, CLIPScore) and transformers (PickScore), both in the test extra only.

- HPSv2.1: HPSv2's ``img_score.score`` builds open_clip's ViT-H-14 with ``light_augmentation=True``, whose
  eval transform (``hpsv2/src/open_clip/transform.py``, ``image_transform(resize_longest_max=True)``) is
  RGB (RGBA left as is), ``ToTensor``, ``ResizeMaxSize`` (longer side to 224 by ``round``, torchvision's
  tensor resize, zero padding), ``Normalize``; its benchmark scores ``100 * image_features @ text_features``
  (``hpsv2/evaluation.py``). :func:`hps_transform` is that transform, written here with torchvision's ops.
- CLIPScore: open_clip's own eval transform (``open_clip.transform.image_transform(224, is_train=False)``)
  and ``max(100 cos, 0)``.
- PickScore: transformers' PIL CLIP image processor (the one PickScore's README ran, transformers 4.27) and
  ``logit_scale.exp() * cos`` of ``get_image_features`` / ``get_text_features``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import FIXTURE

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
WIDTH, HEADS, LAYERS, PATCH, EMBED = 64, 2, 2, 32, 64


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norms and logit_scale too), so no part of the arithmetic hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.3 + torch.rand((), generator=g).item())
            elif p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def open_clip_model(seed: int):
    """A tiny open_clip ``CLIP`` (the fixture's geometry, GELU), random weights, eval mode."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=EMBED,
                 vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                                          image_size=224),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS))
    _randomise(model, seed)
    return model.eval()


def hf_clip_model(seed: int):
    """A tiny transformers ``CLIPModel`` of the same geometry, random weights, eval mode."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                  hidden_act="gelu")
    config = CLIPConfig(text_config=dict(common, max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(common, image_size=224, patch_size=PATCH), projection_dim=EMBED)
    model = CLIPModel(config)
    _randomise(model, seed)
    return model.eval()


def write_config(folder: Path) -> Path:
    """The fixture's transformers CLIPConfig (the same tiny geometry) as the config.json beside a judge's weights."""
    cfg = json.loads((FIXTURE / "config.json").read_text())
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def hps_transform(img):
    """HPSv2's eval transform (see the module docstring), RGBA converted to RGB (HPSv2 would pass 4 channels)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(img.convert("RGB"))
    h, w = x.shape[1:]
    scale = 224 / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = TF.resize(x, [nh, nw], InterpolationMode.BICUBIC)
        ph, pw = 224 - nh, 224 - nw
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(x, MEAN, STD)


def open_clip_transform():
    from open_clip.transform import image_transform

    return image_transform(224, is_train=False)


def hf_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


def open_clip_scores(model, transform, images, prompt: str, formula: str) -> list[float]:
    """open_clip's features of the transformed images and the tokenised prompt, through ``formula``."""
    import open_clip

    with torch.no_grad():
        px = torch.stack([transform(im) for im in images])
        img = model.encode_image(px, normalize=True)
        txt = model.encode_text(open_clip.tokenize([prompt]), normalize=True)
        cos = (img @ txt.T)[:, 0]
    return (100 * cos if formula == "cos100" else (100 * cos).clamp(min=0)).tolist()


def hf_scores(model, processor, images, prompt: str) -> list[float]:
    """PickScore's recipe: processor pixels, projected features, ``logit_scale.exp() * cos``.

    The prompt's ids are CLIP's BPE (open_clip's tokenizer, the same ids as transformers' CLIPTokenizer for
    ordinary text), unpadded as PickScore's ``padding=True`` leaves a single prompt.
    """
    import open_clip

    ids = open_clip.tokenize([prompt])[0]
    ids = ids[: int(ids.argmax()) + 1][None]
    # PickScore ran transformers 4.27, whose RGB conversion is PIL's convert("RGB") (alpha dropped); from
    # transformers 5.2x the processor composites transparency onto white instead. Converting first keeps the
    # reference PickScore's own rule whatever transformers the test extra resolves to.
    images = [im.convert("RGB") for im in images]
    with torch.no_grad():
        px = processor(images=list(images), return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=px).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img @ txt.T)[:, 0]).tolist()


def write_judges(root: Path) -> dict:
    """The three tiny judges on disk in their published layouts: {name: (weights file, reference model)}.

    Seeds whose cosines come out positive for the tests' prompts, so CLIPScore's clipping hides nothing.
    """
    from safetensors.torch import save_file

    hps_model, clip_model, pick_model = open_clip_model(1), open_clip_model(8), hf_clip_model(3)
    (root / "hps").mkdir()
    # HPSv2's published file: torch.save of a dict holding the open_clip state dict (and training leftovers).
    torch.save({"state_dict": hps_model.state_dict(), "epoch": 1}, root / "hps" / "HPS_v2.1_compressed.pt")
    write_config(root / "hps")
    (root / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()},
              str(root / "clip" / "open_clip_model.safetensors"))
    write_config(root / "clip")
    pick_model.save_pretrained(root / "pick")
    return {
        "hpsv2.1": (root / "hps" / "HPS_v2.1_compressed.pt", hps_model),
        "clipscore": (root / "clip" / "open_clip_model.safetensors", clip_model),
        "pickscore": (root / "pick" / "model.safetensors", pick_model),
    }
