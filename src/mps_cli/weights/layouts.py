"""The CLIP judges' published key layouts onto our judge model's names: pure, no torch.

Two layouts are published (docs/judges.md cites each repository):

- ``open_clip``: an open_clip ``CLIP`` state dict (HPSv2.1's ``HPS_v2.1_compressed.pt`` holds one under
  ``state_dict``; laion's ``open_clip_model.safetensors`` is one). Our towers carry open_clip's names, so
  every tensor keeps its name; the text tower's sit at the top level there and under ``text.`` here.
- ``hf_clip``: a transformers ``CLIPModel`` (PickScore_v1): MPS's published CLIP towers without the
  ``model.`` prefix, read through :func:`~mps_cli.weights.remap.plan_remap` with the pooled head kept.

Either may sit under ``module.`` (saved from DistributedDataParallel).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..errors import CheckpointError
from .remap import RemapPlan, plan_remap, published_name

OPEN_CLIP = "open_clip"
HF_CLIP = "hf_clip"
LAYOUTS = (OPEN_CLIP, HF_CLIP)

_ANCHORS = {OPEN_CLIP: "token_embedding.weight", HF_CLIP: "text_model.embeddings.token_embedding.weight"}
_PREFIXES = {OPEN_CLIP: ("", "module."), HF_CLIP: ("", "module.", "model.")}

# open_clip's text tower at the top level of its CLIP module.
_OPEN_CLIP_TEXT = re.compile(r"^(token_embedding\.weight|positional_embedding|text_projection|ln_final\.(weight|bias)"
                             r"|transformer\.resblocks\.\d+\..+)$")
# open_clip keeps the causal mask as a buffer; older versions saved it.
_OPEN_CLIP_IGNORED = re.compile(r"^attn_mask$")


def detect_layout(keys: Iterable[str], name: str = "checkpoint") -> tuple[str, str]:
    """(layout, prefix) of a judge checkpoint's keys: open_clip's or transformers' CLIP."""
    keys = list(keys)
    for layout in (HF_CLIP, OPEN_CLIP):
        anchor = _ANCHORS[layout]
        for prefix in _PREFIXES[layout]:
            if prefix + anchor in keys:
                return layout, prefix
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise CheckpointError(f"{name}: not a CLIP checkpoint in open_clip's or transformers' layout: no "
                          f"'{_ANCHORS[OPEN_CLIP]}' or '{_ANCHORS[HF_CLIP]}' tensor (first keys: {sample})")


def plan_judge_remap(keys: Iterable[str], layout: str, prefix: str) -> RemapPlan:
    """Map a judge checkpoint's keys (``layout`` under ``prefix``) onto :class:`CLIPJudgeModel`'s names."""
    keys = list(keys)
    if layout == HF_CLIP:
        # The MPS tables name these tensors under "model."; read the file's names through them.
        virtual = {"model." + k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        plan = plan_remap(virtual, "", pooled=True)
        strays = [k for k in keys if not k.startswith(prefix)]

        def real(v: str) -> str:
            return virtual.get(v) or prefix + v.removeprefix("model.")

        return RemapPlan(targets={t: (op, [real(s) for s in srcs]) for t, (op, srcs) in plan.targets.items()},
                         unexpected=sorted([real(k) for k in plan.unexpected] + strays),
                         ignored=[real(k) for k in plan.ignored])
    targets: dict[str, tuple[str, list[str]]] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for full in keys:
        key = full[len(prefix):] if full.startswith(prefix) else None
        if key is None:
            unexpected.append(full)
        elif _OPEN_CLIP_IGNORED.match(key):
            ignored.append(full)
        elif key.startswith("visual.") or key == "logit_scale":
            targets[key] = ("copy", [full])
        elif _OPEN_CLIP_TEXT.match(key):
            targets["text." + key] = ("copy", [full])
        else:
            unexpected.append(full)
    return RemapPlan(targets=targets, unexpected=sorted(unexpected), ignored=ignored)


def published_judge_name(target: str, layout: str, prefix: str) -> str:
    """The name a file in ``layout`` would give our tensor ``target`` (for "missing" messages)."""
    if layout == HF_CLIP:
        return prefix + published_name(target).removeprefix("model.")
    return prefix + target.removeprefix("text.")


def judge_layout(shapes: Mapping[str, tuple[int, ...]], name: str):
    """The judges' layout for :func:`~mps_cli.weights.checkpoint.check_weights`: (None, plan, published namer)."""
    layout, prefix = detect_layout(shapes, name)
    plan = plan_judge_remap(shapes, layout, prefix)
    return None, plan, lambda target: published_judge_name(target, layout, prefix)


__all__ = ["HF_CLIP", "LAYOUTS", "OPEN_CLIP", "detect_layout", "judge_layout", "plan_judge_remap",
           "published_judge_name"]
