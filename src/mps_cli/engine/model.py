"""The MPS network: CLIP's text and vision towers plus our condition-masked cross model.

Every image token feature (no ``ln_post``) attends to the prompt's 77 token features, masked to the
tokens most like the condition text; the score is ``exp(logit_scale) * cos(prompt embedding, class token)``.
The towers carry open_clip's parameter names (the checkpoint is remapped to them once); they are
defined here because importing open_clip costs seconds of start-up (its package imports torchvision).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..weights.config import CrossConfig, ModelConfig, TextConfig, TowerConfig, VisionConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm answering in its input's dtype (under autocast it computes in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Embedding(nn.Module):
    """A token embedding table left uninitialised: loading assigns it, and ``nn.Embedding``'s random
    init on the meta device goes through torch's reference ops, which import torch._dynamo (~1 s)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class ResidualBlock(nn.Module):
    """Pre-norm self-attention and MLP; run by :func:`_run_block`, which owns the arithmetic."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(cfg.width, cfg.mlp_width),
            gelu=QuickGELU() if cfg.act == "quick_gelu" else nn.GELU(),
            c_proj=nn.Linear(cfg.mlp_width, cfg.width),
        ))


class Transformer(nn.Module):
    """A stack of residual blocks; ``grad_checkpointing`` recomputes them in backward."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.layers))


class TextTower(nn.Module):
    """CLIP's text transformer: token and position embeddings, causal blocks, final norm, projection."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))


class VisionTower(nn.Module):
    """CLIP's ViT: patch convolution, class token, position embeddings, pre-norm, blocks, projection."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_tokens, cfg.width))
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = Transformer(cfg)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


def patch_embedding(pixels: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(pixels).flatten(2).transpose(1, 2)`` as one matmul: B x 3 x H x W to B x patches x width.

    The convolution's stride is its kernel and it has no bias or padding, so every output is one
    patch's dot product with a filter. As a GEMM, its backward (the reward's gradient to the
    pixels) is a GEMM in every dtype; as a convolution it went to cuDNN, whose fp16 kernels for
    3-channel inputs are a known slow case (see benchmarks/README.md, the reward's fp16 backward).
    """
    b, c, h, w = pixels.shape
    ph, pw = conv.kernel_size
    gh, gw = h // ph, w // pw
    x = pixels[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
    return x @ conv.weight.reshape(conv.out_channels, -1).t()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, except on CPU: a plain matmul then an in-place bias add.

    With the weight stored transposed (see :meth:`MPSModel.transposed_weights`) the CPU
    matmul reads it without repacking, which oneDNN's bf16 kernels otherwise do on every call.
    """
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    y = torch.matmul(x, weight.t())
    if bias is not None:
        y += bias
    return y


def _run_tower(transformer: nn.Module, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The tower's residual blocks, with attention through SDPA and residuals added in place.

    Same arithmetic as CLIP's pre-norm blocks, but the fused attention kernels never
    materialise the (tokens x tokens) weights per head, and no activation is allocated twice,
    which keeps peak memory down. ``x`` must be a tensor the caller no longer needs.
    While autograd records (the reward), the residuals are added out of place, and each
    block is recomputed in backward when ``transformer.grad_checkpointing`` is set.
    """
    recording = torch.is_grad_enabled() and x.requires_grad
    checkpointing = recording and getattr(transformer, "grad_checkpointing", False)
    for blk in transformer.resblocks:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(_run_block, blk, x, causal, False, use_reentrant=False)
        else:
            x = _run_block(blk, x, causal, not recording)
    return x


def _run_block(blk: nn.Module, x: torch.Tensor, causal: bool, inplace: bool) -> torch.Tensor:
    attn = blk.attn
    h = blk.ln_1(x)
    q, k, v = _linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = attn.num_heads
    o = F.scaled_dot_product_attention(
        _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads), is_causal=causal
    )
    h = _linear(_merge_heads(o), attn.out_proj.weight, attn.out_proj.bias)
    x = x.add_(h) if inplace else x + h
    mlp = blk.mlp
    h = _linear(blk.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias)
    exact_gelu = type(mlp.gelu) is nn.GELU and mlp.gelu.approximate == "none"
    h = torch.ops.aten.gelu_(h) if inplace and exact_gelu else mlp.gelu(h)
    h = _linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
    return x.add_(h) if inplace else x + h


class _LayerNorm(nn.Module):
    """LayerNorm with a learned weight and a stored (normally zero) bias buffer."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


def _swiglu(u: torch.Tensor) -> torch.Tensor:
    val, gate = u.chunk(2, dim=-1)
    out = F.silu(gate)
    out *= val
    return out


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttentionBlock(nn.Module):
    """Image tokens attend to the prompt's tokens through the condition mask; a parallel SwiGLU FF."""

    def __init__(self, cfg: CrossConfig):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm = _LayerNorm(cfg.width)
        self.to_q = nn.Linear(cfg.width, inner, bias=False)
        self.to_kv = nn.Linear(cfg.width, 2 * cfg.head_dim, bias=False)
        self.to_out = nn.Linear(inner, cfg.width, bias=False)
        self.ff_in = nn.Linear(cfg.width, 2 * cfg.cross_ff, bias=False)
        self.ff_out = nn.Linear(cfg.cross_ff, cfg.width, bias=False)

    def prepare(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything that does not depend on the condition mask: queries, keys, values, feed-forward.

        x: B x N x D image tokens; text: B x 77 x D.
        """
        n = self.norm(x)
        q = _heads_first(self.to_q(n), self.heads)
        k, v = self.to_kv(text).chunk(2, dim=-1)
        b, h = q.shape[:2]
        k = k.unsqueeze(1).expand(b, h, -1, -1)
        v = v.unsqueeze(1).expand(b, h, -1, -1)
        return q, k, v, self.ff_out(_swiglu(self.ff_in(n)))

    def attend(self, prepared: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
        """The block's residual update for one mask: B x 77 additive (0 or -inf)."""
        q, k, v, ff = prepared
        attn_mask = mask[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.head_dim ** -0.5)
        out = self.to_out(_merge_heads(out))
        out += ff
        return out

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(self.prepare(x, text), mask)


class ParallelBlock(nn.Module):
    """PaLM-style parallel self-attention (multi-query, rotary) and SwiGLU feed-forward."""

    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.split = (inner, cfg.head_dim, cfg.head_dim, 2 * cfg.parallel_ff)
        self.norm = _LayerNorm(cfg.width)
        self.fused = nn.Linear(cfg.width, sum(self.split), bias=False)
        self.attn_out = nn.Linear(inner, cfg.width, bias=False)
        self.ff_out = nn.Linear(cfg.parallel_ff, cfg.width, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2))
        self._rotary_cache: dict = {}

    def _rotary(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, like.device, like.dtype)
        if key not in self._rotary_cache:
            # Angles in fp32 whatever the model dtype: positions up to 256 lose bits in fp16.
            pos = torch.arange(n, device=like.device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(torch.float32))
            angles = torch.cat((freqs, freqs), dim=-1)
            self._rotary_cache[key] = (angles.cos().to(like.dtype), angles.sin().to(like.dtype))
        return self._rotary_cache[key]

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def forward(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Residual update of ``x``; with ``class_token_only`` only token 0's output is computed.

        Keys and values always come from every token; the saving is the queries and the
        feed-forward of the other tokens, whose outputs nobody reads after the last layer.
        """
        b, n_tok, _ = x.shape
        inner, d, _, _ = self.split
        n = self.norm(x)
        weight = self.fused.weight
        if class_token_only:
            kv = F.linear(n, weight[inner:inner + 2 * d])
            n0 = n[:, :1]
            q = F.linear(n0, weight[:inner])
            f = F.linear(n0, weight[inner + 2 * d:])
            x = x[:, :1]
        else:
            fused = self.fused(n)
            q, kv, f = fused.split((inner, 2 * d, self.split[3]), dim=-1)
        k, v = kv.chunk(2, dim=-1)
        cos, sin = self._rotary(n_tok, x)
        q = _heads_first(q, self.heads)
        q = self._rotate(q, cos[: q.shape[2]], sin[: q.shape[2]])
        k = self._rotate(k, cos, sin)
        h = self.heads
        k = k.unsqueeze(1).expand(b, h, -1, -1)
        v = v.unsqueeze(1).expand(b, h, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
        out = self.attn_out(_merge_heads(out))
        out += self.ff_out(_swiglu(f))
        out += x
        return out


class CrossModel(nn.Module):
    """L layers of (condition-masked cross-attention, parallel block), each residual."""

    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.cfg = cfg
        # Set by MPSModel.set_grad_checkpointing: recompute layers 1.. in backward.
        self.grad_checkpointing = False
        self.cross = nn.ModuleList(CrossAttentionBlock(cfg) for _ in range(cfg.layers))
        self.parallel = nn.ModuleList(ParallelBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, text: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The class token of the cross model's output for each mask: one B x D tensor per mask.

        Every mask sees the same image tokens and prompt, so the first layer's queries, keys,
        values and feed-forward are computed once for all of them (about 13% of a dimension).
        """
        last = self.cfg.layers - 1
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad
        first = self.cross[0].prepare(x, text)
        out = []
        for mask in masks:
            # The caller's image tokens are shared by every mask: never written in place.
            h = x + self.cross[0].attend(first, mask)
            h = self.parallel[0](h, class_token_only=last == 0)
            for i in range(1, self.cfg.layers):
                if checkpointing:
                    h = torch.utils.checkpoint.checkpoint(self._layer, i, h, text, mask, use_reentrant=False)
                else:
                    h = self._layer(i, h, text, mask)
            out.append(h[:, 0])
        return out

    def _layer(self, i: int, h: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.cross[i](h, text, mask)
        return self.parallel[i](h, class_token_only=i == self.cfg.layers - 1)


def condition_keep(text: torch.Tensor, condition: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which prompt positions the condition keeps: B x 77 bool, from fp32 features.

    A position's similarity is its best match among the condition's tokens, normalised by the
    prompt's largest; positions over ``threshold`` are kept. text: B x 77 x D, condition:
    C x D (or B x C x D), both the text tower's projected features.
    """
    sim = (text.float() @ condition.float().transpose(-1, -2)).amax(dim=-1)
    return (sim / sim.amax(dim=-1, keepdim=True)) > threshold


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cross-attention mask of ``keep``: 0 where kept, -inf elsewhere, in the attention's dtype."""
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill_(~keep, float("-inf"))


def preference_logits(cls: torch.Tensor, embedding: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The score: ``exp(logit_scale) * cosine(cross-model class token, prompt embedding)``, B.

    In fp32, or float64 for a float64 model (the reward's gradient check).
    """
    dtype = torch.promote_types(logit_scale.dtype, torch.float32)
    emb = F.normalize(embedding.to(dtype), dim=-1)
    return logit_scale.to(dtype).exp() * (F.normalize(cls.to(dtype), dim=-1) * emb).sum(dim=-1)


class MPSModel(nn.Module):
    """CLIP text and vision towers plus the MPS cross model."""

    def __init__(self, cfg: ModelConfig, cross: CrossConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # MPS reads all vision tokens before ln_post; the checkpoint's post_layernorm is unused.
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.cross = CrossModel(cross)

    def transposed_weights(self) -> set[str]:
        """Matrix weights best stored transposed on CPU: (in, out) memory, same logical shape.

        oneDNN's CPU matmul reads that layout without repacking the weight on every call,
        which its bf16 kernels otherwise do.
        """
        names = set()
        for prefix, module in self.named_modules():
            attr = "weight" if isinstance(module, nn.Linear) else \
                "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else None
            if attr:
                names.add(f"{prefix}.{attr}")
        return names

    def compile_image_side(self, mode: str) -> None:
        """Run ``encode_image`` and the cross model through ``torch.compile`` from now on.

        ``mode`` ``on``: the default mode (fused layer norms, GELU and residual adds); ``graphs``: also
        CUDA graphs (``reduce-overhead``), which replay a batch's kernels without launching each one.
        The text tower stays eager: it runs once per distinct prompt.
        """
        options = {"mode": "reduce-overhead"} if mode == "graphs" else {}
        self.encode_image = torch.compile(self.encode_image, **options)
        self.cross.forward = torch.compile(self.cross.forward, **options)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the vision tower's blocks and the cross model's layers in backward (saves memory)."""
        self.visual.set_grad_checkpointing(enable)
        self.cross.grad_checkpointing = enable

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Projected features of all token positions, B x 77 x D."""
        t = self.text
        x = t.token_embedding(ids) + t.positional_embedding
        x = _run_tower(t.transformer, x, causal=True)
        return t.ln_final(x) @ t.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected features of all image tokens (class token first), without ln_post, B x N x D."""
        v = self.visual
        x = patch_embedding(pixels, v.conv1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + v.positional_embedding
        x = _run_tower(v.transformer, v.ln_pre(x))
        return x @ v.proj


class PooledVisionTower(VisionTower):
    """The ViT with CLIP's pooled head: ``ln_post`` on the class token, then the projection."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.ln_post = LayerNorm(cfg.width, eps=cfg.eps)


class CLIPJudgeModel(nn.Module):
    """A CLIP scored by the cosine of its pooled embeddings (HPSv2.1, PickScore, CLIPScore), under open_clip's names.

    The towers are MPS's; the heads are CLIP's own: the text feature at the first EOT, and ``ln_post`` of
    the image's class token, each through its projection.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.visual = PooledVisionTower(cfg.vision, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    transposed_weights = MPSModel.transposed_weights

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the vision tower's blocks in backward (saves memory)."""
        self.visual.set_grad_checkpointing(enable)

    def encode_text(self, ids: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Projected prompt embeddings, B x D: the final-norm feature at each prompt's first EOT."""
        t = self.text
        x = t.token_embedding(ids) + t.positional_embedding
        x = _run_tower(t.transformer, x, causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return t.ln_final(x) @ t.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, B x D: ``ln_post`` of the class token."""
        v = self.visual
        x = patch_embedding(pixels, v.conv1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1) + v.positional_embedding
        x = _run_tower(v.transformer, v.ln_pre(x))
        return v.ln_post(x[:, 0]) @ v.proj


def judge_logits(formula: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """A judge's score from its pooled embeddings, B, in fp32 (float64 for a float64 model).

    ``cos100``: 100 cos (HPSv2); ``scaled_cos``: exp(logit_scale) cos (PickScore); ``clipscore``:
    max(100 cos, 0) (CLIPScore).
    """
    from ..constants import CLIPSCORE_WEIGHT, HPS_SCALE

    dtype = torch.promote_types(logit_scale.dtype, torch.float32)
    cos = (F.normalize(image.to(dtype), dim=-1) * F.normalize(text.to(dtype), dim=-1)).sum(dim=-1)
    if formula == "cos100":
        return HPS_SCALE * cos
    if formula == "scaled_cos":
        return logit_scale.to(dtype).exp() * cos
    if formula == "clipscore":
        return (CLIPSCORE_WEIGHT * cos).clamp(min=0)
    raise ValueError(f"unknown judge formula {formula!r}")
