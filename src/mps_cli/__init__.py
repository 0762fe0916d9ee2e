"""MPS (Multi-dimensional Preference Score) for text-to-image generations.

``from mps_cli import load_scorer``; heavy modules (torch) load on first use so
that importing the package, and ``mps --help``, stay instant.
"""

from __future__ import annotations

from .constants import CONDITIONS, DIMENSIONS
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DimensionError,
    FetchError,
    ImageError,
    InputError,
    MPSError,
    PromptCountError,
    PromptError,
    UnsafePickleError,
)

__version__ = "0.1.0"

_LAZY = {
    "load_scorer": "engine.panel", "Panel": "engine.panel", "Scorer": "engine.scorer", "ScoreResult": "engine.scorer",
    "Comparison": "engine.scorer", "PairResult": "engine.scorer", "preference_probability": "engine.scorer",
    "compare_scores": "engine.scorer",
    "load_reward": "panel_reward", "PanelReward": "panel_reward", "MPSReward": "reward",
    "ModelConfig": "weights.config", "read_config": "weights.config", "builtin_config": "weights.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONDITIONS", "DIMENSIONS", "CheckpointError", "ConfigError", "DeviceError", "DimensionError",
    "FetchError", "ImageError", "InputError", "MPSError", "PromptCountError", "PromptError",
    "UnsafePickleError", "__version__",
    *_LAZY,
]
