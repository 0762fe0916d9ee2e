"""Architecture configs: transformers ``CLIPConfig``-style JSON, kept apart from weight identity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_ACTIVATIONS = ("gelu", "quick_gelu")

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, used for keys a config omits,
# so a sparse config.json means what it means to transformers.
_TEXT_DEFAULTS = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


@dataclass(frozen=True)
class TowerConfig:
    """One CLIP transformer tower."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    act: str = "gelu"
    eps: float = 1e-5


@dataclass(frozen=True)
class TextConfig(TowerConfig):
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class VisionConfig(TowerConfig):
    image_size: int = 224
    patch_size: int = 14

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ModelConfig:
    """The CLIP towers' architecture; the cross model's geometry comes from the weights."""

    text: TextConfig
    vision: VisionConfig
    embed_dim: int
    source: str = "built-in ViT-H-14"


@dataclass(frozen=True)
class CrossConfig:
    """Geometry of the condition-masked cross model, read from weight shapes."""

    width: int
    layers: int
    heads: int
    head_dim: int
    cross_ff: int
    parallel_ff: int


def builtin_config() -> ModelConfig:
    """The ViT-H-14 (laion2B-s32B-b79K) architecture the published MPS checkpoint uses."""
    return ModelConfig(
        text=TextConfig(width=1024, layers=24, heads=16, mlp_width=4096, context_length=77),
        vision=VisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, image_size=224,
                            patch_size=14),
        embed_dim=1024,
    )


def parse_config(data: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build a :class:`ModelConfig` from a transformers ``CLIPConfig`` dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object with text_config and vision_config")
    text_raw = data.get("text_config")
    vision_raw = data.get("vision_config")
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ConfigError(f"{source}: not a CLIP config (needs text_config and vision_config objects)")
    t = {**_TEXT_DEFAULTS, **{k: v for k, v in text_raw.items() if v is not None}}
    v = {**_VISION_DEFAULTS, **{k: v for k, v in vision_raw.items() if v is not None}}
    try:
        for name, tower in (("text_config", t), ("vision_config", v)):
            if tower["hidden_act"] not in SUPPORTED_ACTIVATIONS:
                raise ConfigError(
                    f"{source}: {name}.hidden_act {tower['hidden_act']!r} is not supported "
                    f"(expected one of {', '.join(SUPPORTED_ACTIVATIONS)})"
                )
            if int(tower["hidden_size"]) % int(tower["num_attention_heads"]):
                raise ConfigError(
                    f"{source}: {name}.hidden_size {tower['hidden_size']} is not divisible by "
                    f"num_attention_heads {tower['num_attention_heads']}"
                )
        text = TextConfig(
            width=int(t["hidden_size"]), layers=int(t["num_hidden_layers"]),
            heads=int(t["num_attention_heads"]), mlp_width=int(t["intermediate_size"]),
            act=t["hidden_act"], eps=float(t["layer_norm_eps"]),
            context_length=int(t["max_position_embeddings"]), vocab_size=int(t["vocab_size"]),
        )
        vision = VisionConfig(
            width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]),
            heads=int(v["num_attention_heads"]), mlp_width=int(v["intermediate_size"]),
            act=v["hidden_act"], eps=float(v["layer_norm_eps"]),
            image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
        )
        embed_dim = int(data.get("projection_dim") or 512)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value ({exc})") from None
    if text.context_length != 77:
        raise ConfigError(f"{source}: text max_position_embeddings must be 77 for CLIP's tokenizer, "
                          f"got {text.context_length}")
    return ModelConfig(text=text, vision=vision, embed_dim=embed_dim, source=source)


def read_config(path: str | Path) -> ModelConfig:
    """Read a transformers ``CLIPConfig``-style ``config.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_config(data, source=str(path))
