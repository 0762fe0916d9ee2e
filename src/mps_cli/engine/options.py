"""Which model to load, and how: the options every way of loading one shares, defined once.

``mps_cli.load_scorer`` (:mod:`~mps_cli.engine.panel`, and through it
:func:`~mps_cli.engine.scorer.load_scorer`), :func:`~mps_cli.dataset.resolve_model` (and through it
the Ray workers) and the command line's shared options all take a :class:`ModelOptions`, so a new
option is one new field here. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..weights.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Which scorer to load, and how. Keyword-only, so no caller depends on an order of nine values.

    ``weights``: a local ``.safetensors`` (or original ``.pth``) file, ``hf://OWNER/REPO/PATH[@REV]``,
    a known short name, or None for ``$MPS_WEIGHTS`` or the published default.
    ``config``: a ``config.json`` path or a :class:`~mps_cli.weights.config.ModelConfig`; by default
    the one beside the weights, else the built-in ViT-H-14.
    ``revision``: the Hub revision to pin (the same as an ``@REV`` in ``weights``).
    ``offline``: True never touches the network; None does what ``HF_HUB_OFFLINE`` says.
    ``device``: auto (CUDA, then Apple mps, then CPU), cpu, cuda, cuda:N or mps.
    ``dtype``: ``IMAGE[/TEXT]``: the image side (vision tower, cross model) in IMAGE (auto: fp32 on
    CPU, fp16 on GPUs), the text side (prompt and condition features, the condition mask) in fp32
    unless TEXT names another.
    ``model``: the models scored on one decode (``"mps,hpsv2.1"`` or a list; each may be
    ``NAME=WEIGHTS``; see :mod:`mps_cli.engine.panel`); None is MPS alone, keyed by dimension.
    ``weights``, ``config`` and ``revision`` are then MPS's.
    ``decode``: how images become model input (auto, exact, fast, draft, tensor; see
    :mod:`mps_cli.engine.decode`): auto is tensor on CUDA, exact elsewhere.
    ``compile``: off, on (torch.compile the image side at load) or graphs (also CUDA graphs, CUDA only).
    A panel (``model``) takes only auto/exact and off.
    """

    weights: str | os.PathLike | None = None
    config: str | os.PathLike | ModelConfig | None = None
    revision: str | None = None
    offline: bool | None = None
    device: str = "auto"
    dtype: str = "auto"
    model: str | Sequence[str] | None = None
    decode: str = "auto"
    compile: str = "off"

    def __post_init__(self) -> None:
        # One spelling (a comma-separated string, or None), so equal options compare, and cache, equal.
        model = ",".join(self.model) if isinstance(self.model, (list, tuple)) else self.model
        object.__setattr__(self, "model", model or None)


#: The field names of :class:`ModelOptions`, in order (what ``load_scorer(**options)`` accepts).
MODEL_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ModelOptions))


def model_options(weights: str | os.PathLike | ModelOptions | None = None, **options) -> ModelOptions:
    """One :class:`ModelOptions` from either a ModelOptions or its fields by name (``weights`` may be positional)."""
    if isinstance(weights, ModelOptions):
        if options:
            raise TypeError(f"give a ModelOptions or its fields, not both ({', '.join(sorted(options))})")
        return weights
    unknown = sorted(set(options) - set(MODEL_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown model option {unknown[0]!r}: expected {', '.join(MODEL_OPTION_NAMES)}")
    return ModelOptions(weights=weights, **options)


__all__ = ["MODEL_OPTION_NAMES", "ModelOptions", "model_options"]
