"""The CLIP judges scored beside MPS (HPSv2.1, PickScore, CLIPScore): weights opened now, loaded on first use.

A judge is a CLIP ViT-H-14 with its own weights, preprocessing rule and formula
(:data:`~mps_cli.constants.JUDGES`); it shares nothing with MPS or another judge but the decoded image.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from ..constants import JUDGES, JudgeSpec
from ..devices import Precision
from .preprocess import Tokenizer

PROMPT_CACHE_SIZE = 256


class Judge:
    """One judge: its opened, strictly checked weights, built into a model on first use (:attr:`model`)."""

    def __init__(self, name: str, opened, device, precision: Precision):
        from ..weights.checkpoint import check_weights
        from ..weights.layouts import judge_layout
        from .model import CLIPJudgeModel

        self.name = name
        self.spec: JudgeSpec = JUDGES[name]
        self.opened = opened
        self.config = opened.config
        self.device = device
        self.precision = precision
        self.weights = opened.label
        self.identity = opened.identity
        self.tokenizer = Tokenizer(self.config.text.context_length)
        self._factory = lambda _: CLIPJudgeModel(self.config)
        self._layout = judge_layout
        # Every tensor is where it should be before anything is read: a wrong file fails now, not mid-run.
        check_weights(self._factory, opened.source, self.config, self._layout)
        self._model = None
        self._lock = threading.Lock()
        self._prompts: OrderedDict[str, object] = OrderedDict()

    def __repr__(self) -> str:
        return f"Judge({self.name!r}, weights={self.weights!r})"

    @property
    def rule(self) -> str:
        """The preprocessing rule this judge's reference applies (see :mod:`mps_cli.engine.pixel_rules`)."""
        return self.spec.preprocess

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self):
        """The judge's network, loaded (in the scorer's device and dtypes) the first time it is needed."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from ..weights.checkpoint import load_weights

                    self._model = load_weights(self._factory, self.opened.source, self.config, self.device,
                                               self.precision, layout=self._layout)
        return self._model

    def text_embeddings(self, prompts: Sequence[str]):
        """B x D prompt embeddings, each distinct prompt encoded once (LRU)."""
        import torch

        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if missing:
            toks = [self.tokenizer(p) for p in missing]
            ids = torch.tensor([t.ids for t in toks], dtype=torch.long, device=self.device)
            eot = torch.tensor([t.eot_index for t in toks], dtype=torch.long, device=self.device)
            feats = self.model.encode_text(ids, eot)
            for p, f in zip(missing, feats, strict=True):
                self._prompts[p] = f
        out = []
        for p in prompts:
            self._prompts.move_to_end(p)
            out.append(self._prompts[p])
        while len(self._prompts) > max(PROMPT_CACHE_SIZE, len(set(prompts))):
            self._prompts.popitem(last=False)
        return torch.stack(out)

    def score(self, pixels: Sequence, prompts: Sequence[str]) -> list[float]:
        """Scores of one batch for its prompts, as floats: ``pixels`` are :func:`pixels_by_rule`'s for this rule."""
        import torch

        from .model import judge_logits
        from .pixel_rules import LETTERBOX, letterbox_batch

        with torch.inference_mode():
            model = self.model
            if self.rule == LETTERBOX:
                batch = letterbox_batch(pixels, self.config.vision.image_size, self.device)
            else:
                batch = torch.stack(list(pixels))
            image = model.encode_image(batch.to(self.device, self.precision.image_dtype))
            text = self.text_embeddings(prompts)
            return judge_logits(self.spec.formula, image, text, model.logit_scale).tolist()


__all__ = ["Judge"]
