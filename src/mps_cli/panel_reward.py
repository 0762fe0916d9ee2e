"""Several models as one differentiable reward: MPS and the CLIP judges, keyed like a panel's scores.

``load_reward(model=["mps", "pickscore"])`` returns a :class:`PanelReward`; without ``model`` it is
:func:`mps_cli.reward.load_reward` exactly. Each model preprocesses the image tensor by its own rule in
torch (:mod:`mps_cli.engine.pixel_rules` for the rules), so gradients reach the pixels through every model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .composite import parse_composite
from .constants import DEFAULT_MASK_THRESHOLD, MPS_MODEL
from .engine.model import judge_logits
from .engine.options import ModelOptions
from .engine.panel import keyed_conditions, load_panel, mps_key, parse_models
from .engine.pixel_rules import letterbox_images
from .errors import InputError, PromptCountError
from .reward import MPSReward, preprocess_images
from .reward import load_reward as load_mps_reward


class PanelReward(MPSReward):
    """The panel's models as one reward: :meth:`score` gives a B tensor per key (``mps.overall``, ``hpsv2.1``).

    ``forward``, ``loss`` and ``reward_fn`` are :class:`~mps_cli.reward.MPSReward`'s over those keys.
    """

    def __init__(self, panel, conditions: list[tuple[str, str]], mask_threshold: float,
                 input_range: tuple[float, float], round_pixels: bool = True):
        nn.Module.__init__(self)
        self.panel = panel
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.round_pixels = round_pixels
        self.mask_threshold = float(mask_threshold)
        mps = panel.mps
        self.mps = MPSReward(mps, conditions, mask_threshold, input_range, round_pixels) if mps else None
        self.judge_models = nn.ModuleList(j.model for j in panel.judges)
        self.judge_models.requires_grad_(False)
        self.keys = tuple(key for name in panel.models
                          for key in ([mps_key(k) for k, _ in conditions] if name == MPS_MODEL else [name]))
        nn.Module.train(self, False)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.keys)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def weights(self) -> str:
        return self.panel.weights

    def __repr__(self) -> str:
        return f"PanelReward({', '.join(self.panel.models)}, keys={self.keys}, device={self.device})"

    def _apply(self, fn, recurse: bool = True):
        out = nn.Module._apply(self, fn, recurse)
        for judge in self.panel.judges:
            judge.device, judge._prompts = self.device, type(judge._prompts)()
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every model's vision blocks (and MPS's cross layers) in backward."""
        if self.mps is not None:
            self.mps.set_grad_checkpointing(enable)
        for m in self.judge_models:
            m.set_grad_checkpointing(enable)

    def score(self, images: torch.Tensor, prompts: str | Sequence[str],
              input_range: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Scores of every key as B fp32 tensors, in the panel's order."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a float tensor B x 3 x H x W, got {got}")
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise PromptCountError(images.shape[0], len(prompts))
        span = input_range or self.input_range
        size = self.panel.config.vision.image_size
        out: dict[str, torch.Tensor] = {}
        judges = iter(zip(self.panel.judges, self.judge_models, strict=True))
        for name in self.panel.models:
            if name == MPS_MODEL:
                out.update((mps_key(k), v) for k, v in self.mps.score(images, prompts, span).items())
                continue
            judge, model = next(judges)
            x = images.to(self.device)
            if judge.rule == "letterbox":
                px = letterbox_images(x, size, span)
            else:
                px = preprocess_images(x, size, span, self.round_pixels, rounded_crop=judge.rule == "open_clip")
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                text = judge.text_embeddings(prompts)
            out[name] = judge_logits(judge.spec.formula, model.encode_image(px.to(self.dtype)), text,
                                     model.logit_scale)
        return out


_DEFAULT_DIMS = ("overall",)


def load_reward(weights=None, *, model=None, dims: Iterable[str] | str | None = _DEFAULT_DIMS,
                condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD, device: str = "auto",
                dtype: str = "auto", input_range: tuple[float, float] = (0, 1), grad_checkpointing: bool = False,
                round_pixels: bool = True, config=None, revision: str | None = None, offline: bool | None = None,
                reward: str | None = None):
    """MPS as a differentiable reward (:func:`mps_cli.reward.load_reward`) or, with ``model``, a :class:`PanelReward`.

    ``model`` as for ``load_scorer``; ``dims`` and ``condition`` are MPS's (ignored without it in ``model``).
    ``reward``: a composite, ``"overall+0.5*alignment"`` or ``"0.7*mps.overall+0.3*hpsv2.1"``
    (:mod:`mps_cli.composite`): the dimensions it names are scored (beside ``dims``, if given), a judge it
    names is loaded (without ``model``), and ``forward``, ``loss`` and ``reward_fn`` use the weighted sum.
    """
    if reward is not None:
        composite = parse_composite(reward)
        names = [m.name for m in parse_models(model)] if model is not None else None
        wanted, dims = composite.request(names, None if dims is _DEFAULT_DIMS else dims, condition)
        model = model if model is not None else wanted
        built = load_reward(weights, model=model, dims=dims, condition=condition, mask_threshold=mask_threshold,
                            device=device, dtype=dtype, input_range=input_range,
                            grad_checkpointing=grad_checkpointing, round_pixels=round_pixels, config=config,
                            revision=revision, offline=offline)
        built.composite = composite.bind(built.dims)
        return built
    if model is None:
        return load_mps_reward(weights, dims=dims, condition=condition, mask_threshold=mask_threshold,
                               device=device, dtype=dtype, input_range=input_range,
                               grad_checkpointing=grad_checkpointing, round_pixels=round_pixels, config=config,
                               revision=revision, offline=offline)
    lo, hi = input_range
    if not float(lo) < float(hi):
        raise ValueError(f"input range must be (low, high) with low < high, got {input_range}")
    panel = load_panel(ModelOptions(model=model, weights=weights, config=config, device=device, dtype=dtype,
                                    revision=revision, offline=offline))
    has_mps = MPS_MODEL in panel.models
    conditions = [(k.removeprefix(MPS_MODEL + "."), text)
                  for k, text in keyed_conditions(panel.models, dims if has_mps else None,
                                                  condition if has_mps else None) if k.startswith(MPS_MODEL + ".")]
    reward = PanelReward(panel, conditions, mask_threshold, (lo, hi), round_pixels)
    reward.set_grad_checkpointing(grad_checkpointing)
    return reward


__all__ = ["PanelReward", "load_reward"]
