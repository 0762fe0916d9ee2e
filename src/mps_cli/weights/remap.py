"""Published key names onto the model's, and the strict check of a checkpoint's shapes: pure, no torch.

The published layout is a transformers-style CLIP state dict (``model.text_model.*``,
``model.vision_model.*``, ``model.text_projection``, ``model.visual_projection``,
``model.logit_scale``) plus the condition-masked cross model (``cross_model.layers.N.*``),
optionally under an ``mps.`` or ``module.`` prefix. Our model uses open_clip's names; q, k and
v projections are stored apart and fused here, and the two projections are transposed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..errors import CheckpointError
from .config import CrossConfig

KNOWN_PREFIXES = ("", "mps.", "module.")
_ANCHOR = "model.text_model.embeddings.token_embedding.weight"

# Keys present in published files that the model does not use.
_IGNORED = (
    re.compile(r".*\.position_ids$"),
    re.compile(r"^model\.vision_model\.post_layernorm\.(weight|bias)$"),
)

_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_SIMPLE = {
    "model.text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "model.text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "model.text_model.final_layer_norm.weight": "text.ln_final.weight",
    "model.text_model.final_layer_norm.bias": "text.ln_final.bias",
    "model.vision_model.embeddings.class_embedding": "visual.class_embedding",
    "model.vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "model.vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "model.vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "model.vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "model.logit_scale": "logit_scale",
}
# A CLIP judge's pooled image embedding goes through the post-norm that MPS skips.
_POST_LAYERNORM = {
    "model.vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "model.vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# Linear (out, in) weights that open_clip keeps as (in, out) projection matrices.
_TRANSPOSED = {
    "model.text_projection.weight": "text.text_projection",
    "model.visual_projection.weight": "visual.proj",
}
_CROSS_RENAMES = {
    "0.fn.norm.weight": "cross.{i}.norm.weight",
    "0.fn.norm.bias": "cross.{i}.norm.bias",
    "0.fn.to_q.weight": "cross.{i}.to_q.weight",
    "0.fn.to_kv.weight": "cross.{i}.to_kv.weight",
    "0.fn.to_out.weight": "cross.{i}.to_out.weight",
    "0.fn.ff.0.weight": "cross.{i}.ff_in.weight",
    "0.fn.ff.2.weight": "cross.{i}.ff_out.weight",
    "1.fn.norm.weight": "parallel.{i}.norm.weight",
    "1.fn.norm.bias": "parallel.{i}.norm.bias",
    "1.fn.rotary_emb.inv_freq": "parallel.{i}.inv_freq",
    "1.fn.fused_attn_ff_proj.weight": "parallel.{i}.fused.weight",
    "1.fn.attn_out.weight": "parallel.{i}.attn_out.weight",
    "1.fn.ff_out.1.weight": "parallel.{i}.ff_out.weight",
}
_TOWER_LAYER = re.compile(r"^model\.(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CROSS_LAYER = re.compile(r"^cross_model\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^self_attn\.([qkv])_proj$")

def detect_prefix(keys: Iterable[str], name: str = "checkpoint") -> str:
    """The prefix the published keys sit under: none, ``mps.`` or ``module.``."""
    keys = list(keys)
    anchors = [k for k in keys if k.endswith(_ANCHOR)]
    if not anchors:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise CheckpointError(
            f"{name}: not an MPS checkpoint: no '{_ANCHOR}' tensor (first keys: {sample})"
        )
    prefix = anchors[0][: -len(_ANCHOR)]
    if prefix not in KNOWN_PREFIXES:
        raise CheckpointError(
            f"{name}: unknown key prefix {prefix!r} (expected keys under none, 'mps.' or 'module.')"
        )
    return prefix


@dataclass
class RemapPlan:
    """How each of our parameter names is built from the checkpoint's tensors."""

    targets: dict[str, tuple[str, list[str]]]  # ours -> (op, source keys), op in copy|cat|t
    unexpected: list[str]
    ignored: list[str]


def plan_remap(keys: Iterable[str], prefix: str, pooled: bool = False) -> RemapPlan:
    """Map published key names (under ``prefix``) onto our module's names.

    ``pooled``: the vision tower's ``post_layernorm`` is read (a CLIP judge's pooled head) rather than ignored.
    """
    targets: dict[str, tuple[str, list[str]]] = {}
    qkv: dict[str, dict[str, str]] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for full in keys:
        if not full.startswith(prefix):
            unexpected.append(full)
            continue
        key = full[len(prefix):]
        if pooled and key in _POST_LAYERNORM:
            targets[_POST_LAYERNORM[key]] = ("copy", [full])
        elif any(p.match(key) for p in _IGNORED):
            ignored.append(full)
        elif key in _SIMPLE:
            targets[_SIMPLE[key]] = ("copy", [full])
        elif key in _TRANSPOSED:
            targets[_TRANSPOSED[key]] = ("t", [full])
        elif m := _TOWER_LAYER.match(key):
            tower = "text" if m[1] == "text" else "visual"
            base = f"{tower}.transformer.resblocks.{m[2]}"
            module, kind = m[3], m[4]
            if q := _QKV.match(module):
                suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
                qkv.setdefault(f"{base}.attn.{suffix}", {})[q[1]] = full
            elif module in _LAYER_RENAMES:
                targets[f"{base}.{_LAYER_RENAMES[module]}.{kind}"] = ("copy", [full])
            else:
                unexpected.append(full)
        elif (m := _CROSS_LAYER.match(key)) and m[2] in _CROSS_RENAMES:
            targets["cross." + _CROSS_RENAMES[m[2]].format(i=m[1])] = ("copy", [full])
        else:
            unexpected.append(full)
    for target, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            targets[target] = ("cat", [parts["q"], parts["k"], parts["v"]])
        else:
            # An incomplete q/k/v group: name the absent member as the file would have.
            present = next(iter(parts.items()))
            targets[target] = ("cat", [
                parts.get(c, present[1].replace(f"self_attn.{present[0]}_proj", f"self_attn.{c}_proj"))
                for c in "qkv"
            ])
    return RemapPlan(targets=targets, unexpected=sorted(unexpected), ignored=ignored)


def cross_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str, name: str) -> CrossConfig:
    """Read the cross model's geometry (width, heads, head size, layers, FF sizes) off its weights."""
    p = prefix + "cross_model.layers."
    try:
        layers = sorted({int(k[len(p):].split(".")[0]) for k in shapes if k.startswith(p)})
    except ValueError:
        raise CheckpointError(f"{name}: cross model tensors are not numbered ('{p}N...')") from None
    if not layers:
        raise CheckpointError(f"{name}: no cross model ('{p}N...' tensors) in this checkpoint")
    if layers != list(range(len(layers))):
        shown = layers if len(layers) <= 8 else f"{layers[:8]}..."
        raise CheckpointError(f"{name}: cross model layers are not numbered 0..N-1 ({shown})")

    def shape(suffix: str) -> tuple[int, ...]:
        key = f"{p}0.{suffix}"
        if key not in shapes:
            raise CheckpointError(f"{name}: missing tensor {key}")
        got = tuple(shapes[key])
        if len(got) != 2 or not all(isinstance(s, int) and s > 0 for s in got):
            raise CheckpointError(f"{name}: tensor {key} has shape {got}, not a matrix")
        return got

    inner, width = shape("0.fn.to_q.weight")
    head_dim = shape("0.fn.to_kv.weight")[0] // 2
    cross_ff = shape("0.fn.ff.0.weight")[0] // 2
    fused = shape("1.fn.fused_attn_ff_proj.weight")[0]
    parallel_ff = (fused - inner - 2 * head_dim) // 2
    if head_dim == 0 or inner % head_dim or cross_ff <= 0 or parallel_ff <= 0:
        raise CheckpointError(f"{name}: cross model to_q/to_kv/ff/fused_attn_ff_proj shapes are inconsistent")
    return CrossConfig(
        width=width, layers=len(layers), heads=inner // head_dim, head_dim=head_dim,
        cross_ff=cross_ff, parallel_ff=parallel_ff,
    )


def target_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if op == "t":
        return tuple(reversed(shapes[0]))
    if op == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


def check_against_model(plan: RemapPlan, source_shapes: Mapping[str, tuple[int, ...]],
                        expected: Mapping[str, tuple[int, ...]], name: str, config_source: str,
                        published: Callable[[str], str] | None = None) -> None:
    """Strict comparison of the remapped checkpoint with the model; one error listing every problem.

    ``published`` names a model tensor the file lacks as the file's layout would (default: MPS's).
    """
    problems: list[str] = []
    missing_src = [s for op, srcs in plan.targets.values() for s in srcs if s not in source_shapes]
    missing = sorted(set(expected) - set(plan.targets))
    unexpected = list(plan.unexpected) + sorted(
        s for t, (_, srcs) in plan.targets.items() if t not in expected for s in srcs
    )
    mismatched = []
    for target, (op, srcs) in sorted(plan.targets.items()):
        if target not in expected or any(s not in source_shapes for s in srcs):
            continue
        want = tuple(expected[target])
        if op == "cat":
            # q, k and v are stored apart: name each one that is off, with its own expected shape.
            part = (want[0] // len(srcs), *want[1:])
            mismatched.extend(f"{s} {tuple(source_shapes[s])} (model expects {part})"
                              for s in srcs if tuple(source_shapes[s]) != part)
            continue
        if target_shape(op, [source_shapes[srcs[0]]]) != want:
            shown = target_shape(op, [want]) if op == "t" else want
            mismatched.append(f"{srcs[0]} {tuple(source_shapes[srcs[0]])} (model expects {shown})")

    def listing(label: str, items: list[str]) -> None:
        if items:
            head = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {head}")

    # Report our own names only where there is no published name to show.
    missing_published = sorted(set(missing_src) | {(published or published_name)(m) for m in missing})
    listing("missing", missing_published)
    listing("unexpected", unexpected)
    listing("wrong shape", mismatched)
    if problems:
        if mismatched:
            # Shapes that disagree mean another architecture (a smaller or larger CLIP), even
            # when its layer count also leaves tensors missing.
            raise CheckpointError(f"{name}: weights do not match the model: " + "; ".join(problems)
                                  + f"; the architecture ({config_source}) does not fit these weights",
                                  hint="config")
        raise CheckpointError(f"{name}: weights do not match the model: " + "; ".join(problems))


def published_name(target: str) -> str:
    """The published (MPS layout) name of our model tensor ``target``."""
    reverse = {v: k for k, v in {**_SIMPLE, **_TRANSPOSED, **_POST_LAYERNORM}.items()}
    if target in reverse:
        return reverse[target]
    if m := re.match(r"^(text|visual)\.transformer\.resblocks\.(\d+)\.(.+)$", target):
        tower = "text" if m[1] == "text" else "vision"
        rest = m[3]
        for pub, ours in _LAYER_RENAMES.items():
            rest = rest.replace(ours, pub)
        rest = rest.replace("attn.in_proj_weight", "self_attn.{q,k,v}_proj.weight").replace(
            "attn.in_proj_bias", "self_attn.{q,k,v}_proj.bias")
        return f"model.{tower}_model.encoder.layers.{m[2]}.{rest}"
    if m := re.match(r"^cross\.(cross|parallel)\.(\d+)\.(.+)$", target):
        for pub, ours in _CROSS_RENAMES.items():
            if ours.format(i=m[2]) == f"{m[1]}.{m[2]}.{m[3]}":
                return f"cross_model.layers.{m[2]}.{pub}"
    return target
