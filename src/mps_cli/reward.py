"""MPS as a differentiable reward: the scorer's model and numbers, with gradients to the pixels.

For reward fine-tuning (DRaFT, AlignProp, ReFL), policy-gradient loops (DDPO, GRPO) and
test-time guidance. Images arrive as tensors straight from a decoder; preprocessing is the
scorer's (shorter side to the model's image size, bicubic, centre crop, CLIP mean/std) written in torch so the graph
is never cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .composite import COMPOSITE_KEY, Composite
from .constants import DEFAULT_MASK_THRESHOLD
from .engine.decode import resize_crop_normalise, round_to_8_bits
from .engine.scorer import (
    Scorer,
    check_mask_threshold,
    condition_masks,
    load_scorer,
    resolve_conditions,
    score_image_tokens,
)
from .errors import DimensionError, InputError, PromptCountError


def preprocess_images(images: torch.Tensor, size: int, input_range: tuple[float, float] = (0.0, 1.0),
                      round_pixels: bool = True, rounded_crop: bool = False) -> torch.Tensor:
    """B x 3 x H x W floats in ``input_range`` to normalised B x 3 x size x size model input, differentiably.

    The scorer's PIL path in torch: bicubic resize with antialiasing (PIL's kernel) so the
    shorter side is ``size`` and the longer side floored, centre crop at floor offsets, CLIP
    mean/std. PIL stores 8-bit pixels: it rounds the input (as saved) and the result of each
    resize pass, and so does this path by default, in the forward pass only (straight-through:
    the backward pass is that of the unrounded path). ``round_pixels=False`` is the smooth path,
    within about one grey level of PIL's pixels, whose gradient is the exact one of what it computes.
    ``rounded_crop``: the crop offsets rounded as torchvision's ``CenterCrop`` does (open_clip's
    transform, CLIPScore's) instead of floored.
    """
    lo, hi = input_range
    x = images.float() if images.dtype not in (torch.float32, torch.float64) else images
    x = (x - lo) / (hi - lo)
    if round_pixels:
        x = round_to_8_bits(x.clamp(0, 1))
    return resize_crop_normalise(x, size, round_pixels, rounded_crop)


class MPSReward(nn.Module):
    """MPS scores of image tensors for prompts, differentiable w.r.t. the images.

    Build it with :func:`load_reward`. The weights are frozen and the module stays in eval
    mode whatever ``.train()`` a parent calls. Text features (prompts, conditions) are
    computed once without gradient and cached. With a ``composite`` (``load_reward(reward=...)``),
    ``forward``, ``loss`` and ``reward_fn`` use that weighted sum of the scores.
    """

    #: A composite reward over :attr:`dims` (bound to them), or None.
    composite: Composite | None = None

    def __init__(self, scorer: Scorer, conditions: list[tuple[str, str]], mask_threshold: float,
                 input_range: tuple[float, float], round_pixels: bool = True):
        super().__init__()
        self.model = scorer.model
        self._scorer = scorer
        self.conditions = conditions
        self.mask_threshold = float(mask_threshold)
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.round_pixels = round_pixels
        self.model.requires_grad_(False)
        super().train(False)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.conditions)

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def weights(self) -> str:
        return self._scorer.weights

    def __repr__(self) -> str:
        return (f"MPSReward(weights={self.weights!r}, dims={self.dims}, device={self.device}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, input_range={self.input_range})")

    def train(self, mode: bool = True) -> MPSReward:
        """A frozen reward: always eval (dropout-free anyway, but callers check ``training``)."""
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .double(): cached text features belong to the old device and dtype.
        out = super()._apply(fn, recurse)
        self._scorer.device, self._scorer.dtype = self.device, self.dtype
        self._scorer._prompts.clear()
        self._scorer._conditions.clear()
        self.model.cross.parallel.apply(lambda m: getattr(m, "_rotary_cache", {}).clear())
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the vision blocks and cross layers in backward: less memory, about a third more time."""
        self.model.set_grad_checkpointing(enable)

    def _text_side(self, prompts: Sequence[str]):
        """Prompt tokens, embeddings and condition masks: no gradient, no autocast, cached by the scorer."""
        scorer = self._scorer
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            feats = scorer._prompt_features(prompts)
            text = torch.stack([f.tokens for f in feats])
            emb = torch.stack([f.embedding for f in feats])
            conds = [scorer._condition_features(t) for _, t in self.conditions]
            masks, _ = condition_masks(text, conds, self.mask_threshold, self.dtype)
        return text, emb, masks

    def score(self, images: torch.Tensor, prompts: str | Sequence[str],
              input_range: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Scores of every dimension as B fp32 tensors, keyed like :class:`ScoreResult` scores."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a float tensor B x 3 x H x W, got {got}")
        b = images.shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * b
        else:
            prompts = list(prompts)
            if len(prompts) != b:
                raise PromptCountError(b, len(prompts))
            bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
            if bad:
                raise InputError(f"prompt {bad[0]} is {type(prompts[bad[0]]).__name__}, not a string")
        size = self._scorer.config.vision.image_size
        px = preprocess_images(images.to(self.device), size, input_range or self.input_range, self.round_pixels)
        px = px.to(self.dtype)
        text, emb, masks = self._text_side(prompts)
        tokens = self.model.encode_image(px)
        scores = score_image_tokens(self.model, tokens, text, emb, masks)
        return dict(zip(self.dims, scores, strict=True))

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str]):
        """A B tensor of scores (one dimension, or the composite) or a dict of them (several)."""
        scores = self.score(images, prompts)
        if self.composite is not None:
            return self.composite.value(scores)
        return next(iter(scores.values())) if len(scores) == 1 else scores

    def loss(self, images: torch.Tensor, prompts: str | Sequence[str], target: float | None = None) -> torch.Tensor:
        """A scalar to minimise: the negative mean score, or ReFL's hinge ``mean(relu(target - score))``.

        The score is the composite where there is one; else several dimensions' scores are averaged first.
        """
        scores = self.score(images, prompts)
        score = (self.composite.value(scores) if self.composite is not None
                 else torch.stack(list(scores.values())).mean(dim=0))
        if target is None:
            return -score.mean()
        return F.relu(target - score).mean()

    def reward_fn(self, dim: str | None = None) -> Callable:
        """``fn(images, prompts, metadata) -> (scores, info)``, the DDPO/GRPO convention.

        ``images`` in [0, 1] whatever this reward's ``input_range``; ``scores`` a B tensor of
        ``dim`` (default: the composite where there is one, else the first dimension); ``info`` every
        dimension (and ``composite``), detached.
        """
        key = dim or (COMPOSITE_KEY if self.composite is not None else self.dims[0])
        if key not in self.dims and not (key == COMPOSITE_KEY and self.composite is not None):
            raise DimensionError(f"dimension {key!r} is not one this reward scores ({', '.join(self.dims)})")

        def fn(images: torch.Tensor, prompts: Sequence[str], metadata=None):
            scores = self.score(images, prompts, input_range=(0.0, 1.0))
            if self.composite is not None:
                scores[COMPOSITE_KEY] = self.composite.value(scores)
            return scores[key], {k: v.detach() for k, v in scores.items()}

        return fn


def load_reward(weights: str | os.PathLike | None = None, *, dims: Iterable[str] | str | None = ("overall",),
                condition: str | None = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                device: str = "auto", dtype: str = "auto", input_range: tuple[float, float] = (0, 1),
                grad_checkpointing: bool = False, round_pixels: bool = True, config=None, revision: str | None = None,
                offline: bool | None = None) -> MPSReward:
    """Load MPS as a differentiable reward (same weights sources, prepared copies and errors as :func:`load_scorer`).

    ``dims`` from overall, aesthetics, detail, alignment or ``all``; ``condition`` adds a
    custom condition keyed ``custom`` (with ``dims=None`` it is the only one). ``input_range``
    is what the images passed in span: ``(0, 1)``, or ``(-1, 1)`` for raw VAE output.
    ``round_pixels`` (the default) rounds to 8 bits where PIL does, with straight-through gradients,
    so scores equal what the scorer gives the image saved as a PNG; ``False`` is the smooth path
    (exact gradients of a score off by PIL's rounding).
    """
    conditions = resolve_conditions(dims, condition)
    mask_threshold = check_mask_threshold(mask_threshold)
    lo, hi = input_range
    if not float(lo) < float(hi):
        raise ValueError(f"input range must be (low, high) with low < high, got {input_range}")
    scorer = load_scorer(weights, config=config, device=device, dtype=dtype, revision=revision, offline=offline)
    reward = MPSReward(scorer, conditions, mask_threshold, (lo, hi), round_pixels)
    reward.set_grad_checkpointing(grad_checkpointing)
    return reward


__all__ = ["MPSReward", "load_reward", "preprocess_images"]
