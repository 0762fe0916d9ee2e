"""Architecture configs: transformers ``CLIPConfig``-style JSON, kept apart from weight identity."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SUPPORTED_ACTIVATIONS = ("gelu", "quick_gelu")
# A CLIP config.json is a few KB.
MAX_CONFIG_BYTES = 16 << 20

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


def config_digest(config: ModelConfig) -> str:
    """A short identity of an architecture (its towers and width, not where it was read from), so two
    machines can tell whether they build the same model."""
    import hashlib
    from dataclasses import asdict

    doc = {k: v for k, v in asdict(config).items() if k != "source"}
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


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
    for name, tower in (("text_config", t), ("vision_config", v)):
        if tower["hidden_act"] not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{source}: {name}.hidden_act {tower['hidden_act']!r} is not supported "
                f"(expected one of {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
    ti = {k: _count(source, f"text_config.{k}", t[k]) for k in _TOWER_INTS + ("max_position_embeddings", "vocab_size")}
    vi = {k: _count(source, f"vision_config.{k}", v[k]) for k in _TOWER_INTS + ("image_size", "patch_size")}
    embed_dim = _count(source, "projection_dim", data.get("projection_dim") or 512)
    for name, tower in (("text_config", ti), ("vision_config", vi)):
        if tower["hidden_size"] % tower["num_attention_heads"]:
            raise ConfigError(
                f"{source}: {name}.hidden_size {tower['hidden_size']} is not divisible by "
                f"num_attention_heads {tower['num_attention_heads']}"
            )
    if vi["patch_size"] > vi["image_size"]:
        raise ConfigError(f"{source}: vision_config.patch_size {vi['patch_size']} is larger than "
                          f"image_size {vi['image_size']}")
    text = TextConfig(
        width=ti["hidden_size"], layers=ti["num_hidden_layers"], heads=ti["num_attention_heads"],
        mlp_width=ti["intermediate_size"], act=t["hidden_act"], eps=_eps(source, "text_config", t["layer_norm_eps"]),
        context_length=ti["max_position_embeddings"], vocab_size=ti["vocab_size"],
    )
    vision = VisionConfig(
        width=vi["hidden_size"], layers=vi["num_hidden_layers"], heads=vi["num_attention_heads"],
        mlp_width=vi["intermediate_size"], act=v["hidden_act"], eps=_eps(source, "vision_config", v["layer_norm_eps"]),
        image_size=vi["image_size"], patch_size=vi["patch_size"],
    )
    if text.context_length != 77:
        raise ConfigError(f"{source}: text max_position_embeddings must be 77 for CLIP's tokenizer, "
                          f"got {text.context_length}")
    return ModelConfig(text=text, vision=vision, embed_dim=embed_dim, source=source)


_TOWER_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Far above any CLIP (ViT-bigG: width 1664, 48 layers), low enough that a model of this size
# is built on the meta device in moments rather than hanging on a hostile number.
MAX_CONFIG_INT = 1 << 20
_MAX_LAYERS = 1024


def _count(source: str, field: str, value) -> int:
    """A positive integer config value (64.0 and "64" are accepted), else a :class:`ConfigError`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value != int(value):
        raise ConfigError(f"{source}: {field} must be a positive integer, got {value!r}")
    n = int(value)
    limit = _MAX_LAYERS if field.endswith("num_hidden_layers") else MAX_CONFIG_INT
    if not 0 < n <= limit:
        raise ConfigError(f"{source}: {field} must be between 1 and {limit}, got {n}")
    return n


def _eps(source: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise ConfigError(f"{source}: {name}.layer_norm_eps must be a number between 0 and 1, got {value!r}")
    return float(value)


def read_config(path: str | Path) -> ModelConfig:
    """Read a transformers ``CLIPConfig``-style ``config.json``."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file, so not a config")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {st.st_size:,} bytes is far too large for a config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a config (JSON nested too deeply)") from None
    return parse_config(data, source=str(path))
