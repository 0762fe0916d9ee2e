"""Benchmark assets: the full-size random-weight checkpoint and the JPEG pool, built once in a user cache.

The checkpoint is a 2 GB fp16 file in the published layout with random weights (speed does
not depend on the values); it is checked to load with the built-in ViT-H-14 config. Never
inside the repository.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = Path(os.environ.get("MPS_SHARED", REPO.parent / "shared")) / "fixtures" / "mps-tiny"

# Bump when the generated checkpoint or images change, so stale caches are rebuilt.
LAYOUT_VERSION = 1
CHECKPOINT_NAME = "mps-vit-h-14-random-fp16.safetensors"
SEED = 20240617
IMAGE_SIZE = 768
JPEG_QUALITY = 90
PROMPT = ("a watercolor painting of a lighthouse on a rocky coast at sunset, "
          "soft golden light, detailed waves and seagulls")

# The published cross model's geometry (read off the published weights' shapes).
CROSS_WIDTH, CROSS_LAYERS, CROSS_HEADS, CROSS_HEAD_DIM, CROSS_FF = 1024, 4, 16, 64, 4096


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cache location

def default_cache_dir() -> Path:
    env = os.environ.get("MPS_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mps-cli-bench"


def check_outside_repo(path: Path) -> Path:
    path = path.resolve()
    if path == REPO or REPO in path.parents:
        raise SystemExit(f"bench: cache dir {path} is inside the repository; pick one outside it "
                         "(--cache-dir or $MPS_BENCH_CACHE)")
    return path




# --------------------------------------------------------------------------- the checkpoint

def checkpoint_tensors(cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every tensor of the published layout; init is normal, one, zero or special."""
    out: list[tuple[str, tuple[int, ...], str]] = []

    def tower(prefix: str, t) -> None:
        for i in range(t.layers):
            p = f"{prefix}.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out.append((f"{p}.self_attn.{proj}.weight", (t.width, t.width), "normal"))
                out.append((f"{p}.self_attn.{proj}.bias", (t.width,), "normal"))
            for ln in ("layer_norm1", "layer_norm2"):
                out.append((f"{p}.{ln}.weight", (t.width,), "one"))
                out.append((f"{p}.{ln}.bias", (t.width,), "zero"))
            out.append((f"{p}.mlp.fc1.weight", (t.mlp_width, t.width), "normal"))
            out.append((f"{p}.mlp.fc1.bias", (t.mlp_width,), "normal"))
            out.append((f"{p}.mlp.fc2.weight", (t.width, t.mlp_width), "normal"))
            out.append((f"{p}.mlp.fc2.bias", (t.width,), "normal"))

    text, vision, dim = cfg.text, cfg.vision, cfg.embed_dim
    out.append(("model.text_model.embeddings.token_embedding.weight", (text.vocab_size, text.width), "normal"))
    out.append(("model.text_model.embeddings.position_embedding.weight", (text.context_length, text.width), "normal"))
    tower("model.text_model", text)
    out.append(("model.text_model.final_layer_norm.weight", (text.width,), "one"))
    out.append(("model.text_model.final_layer_norm.bias", (text.width,), "zero"))
    out.append(("model.text_projection.weight", (dim, text.width), "normal"))

    out.append(("model.vision_model.embeddings.class_embedding", (vision.width,), "normal"))
    out.append(("model.vision_model.embeddings.patch_embedding.weight",
                (vision.width, 3, vision.patch_size, vision.patch_size), "normal"))
    out.append(("model.vision_model.embeddings.position_embedding.weight", (vision.num_tokens, vision.width), "normal"))
    for ln in ("pre_layrnorm", "post_layernorm"):
        out.append((f"model.vision_model.{ln}.weight", (vision.width,), "one"))
        out.append((f"model.vision_model.{ln}.bias", (vision.width,), "zero"))
    tower("model.vision_model", vision)
    out.append(("model.visual_projection.weight", (dim, vision.width), "normal"))
    out.append(("model.logit_scale", (), "logit_scale"))

    D, H, d, ff = CROSS_WIDTH, CROSS_HEADS, CROSS_HEAD_DIM, CROSS_FF
    for i in range(CROSS_LAYERS):
        a, b = f"cross_model.layers.{i}.0.fn", f"cross_model.layers.{i}.1.fn"
        out += [
            (f"{a}.norm.weight", (D,), "one"), (f"{a}.norm.bias", (D,), "zero"),
            (f"{a}.to_q.weight", (H * d, D), "normal"), (f"{a}.to_kv.weight", (2 * d, D), "normal"),
            (f"{a}.to_out.weight", (D, H * d), "normal"),
            (f"{a}.ff.0.weight", (2 * ff, D), "normal"), (f"{a}.ff.2.weight", (D, ff), "normal"),
            (f"{b}.norm.weight", (D,), "one"), (f"{b}.norm.bias", (D,), "zero"),
            (f"{b}.rotary_emb.inv_freq", (d // 2,), "inv_freq"),
            (f"{b}.fused_attn_ff_proj.weight", (H * d + 2 * d + 2 * ff, D), "normal"),
            (f"{b}.attn_out.weight", (D, H * d), "normal"),
            (f"{b}.ff_out.1.weight", (D, ff), "normal"),
        ]
    return out


def write_checkpoint(path: Path, cfg, seed: int = SEED) -> int:
    """Write the random fp16 checkpoint tensor by tensor (never all in memory); returns its size."""
    import torch

    specs = checkpoint_tensors(cfg)
    header: dict = {"__metadata__": {"format": "pt", "note": "mps-cli benchmark: random weights"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _name, shape, init in specs:
            if init == "normal":
                t = torch.randn(shape, generator=gen) * 0.02
            elif init == "one":
                t = torch.ones(shape)
            elif init == "zero":
                t = torch.zeros(shape)
            elif init == "logit_scale":
                t = torch.tensor(math.log(100.0))
            else:  # rotary inverse frequencies, exactly as the original computes them
                t = 10000.0 ** (-torch.arange(0, CROSS_HEAD_DIM, 2, dtype=torch.float64) / CROSS_HEAD_DIM)
            f.write(t.to(torch.float16).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return path.stat().st_size


def make_images(folder: Path, n: int, seed: int = SEED) -> list[Path]:
    """``n`` 768x768 JPEGs: smooth colour gradients and waves plus sensor-like noise (quality 90)."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.jpg" for i in range(n)]
    ramp = torch.linspace(0.0, 1.0, IMAGE_SIZE)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    for i, path in enumerate(paths):
        if path.is_file():
            continue
        gen = torch.Generator().manual_seed(seed + i)
        r = torch.rand(3, 6, generator=gen)
        chans = []
        for c in range(3):
            a, b, f1, f2, ph, base = r[c].tolist()
            wave = torch.sin(2 * math.pi * (1 + 4 * f1) * (xx * a + yy * (1 - a)) + 6.28 * ph)
            wave2 = torch.cos(2 * math.pi * (1 + 3 * f2) * torch.hypot(xx - b, yy - base))
            chans.append(0.15 + 0.7 * (0.5 * base + 0.25 * (xx * a + yy * b) + 0.12 * wave + 0.1 * wave2))
        img = torch.stack(chans, dim=-1) * 255 + torch.randn(IMAGE_SIZE, IMAGE_SIZE, 3, generator=gen) * 8
        px = img.clamp(0, 255).round().to(torch.uint8).contiguous()
        tmp = path.with_suffix(".partial.jpg")
        Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), px.numpy().tobytes()).save(tmp, quality=JPEG_QUALITY)
        os.replace(tmp, path)
    return paths


def ensure_assets(cache: Path, n_images: int, rebuild: bool, device: str) -> tuple[Path, list[Path]]:
    """The cached checkpoint (built and checked to load on first use) and ``n_images`` JPEGs."""
    from mps_cli.weights.config import builtin_config

    cache.mkdir(parents=True, exist_ok=True)
    images = make_images(cache / "images", n_images)
    ckpt = cache / CHECKPOINT_NAME
    marker = cache / (CHECKPOINT_NAME + ".json")
    meta = {"layout_version": LAYOUT_VERSION, "seed": SEED}
    if not rebuild and ckpt.is_file() and marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("layout_version") == LAYOUT_VERSION and saved.get("bytes") == ckpt.stat().st_size:
            return ckpt, images
    marker.unlink(missing_ok=True)
    log(f"building the random full-size checkpoint at {ckpt} (about 2 GB, once)")
    t = time.perf_counter()
    size = write_checkpoint(ckpt, builtin_config())
    log(f"  wrote {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s; checking it loads")
    check_checkpoint(ckpt, images[0], device)
    marker.write_text(json.dumps({**meta, "bytes": size}))
    return ckpt, images


def check_checkpoint(ckpt: Path, image: Path, device: str) -> None:
    """The built file must load with the built-in config and give finite scores in every dimension."""
    from mps_cli import load_scorer

    scorer = load_scorer(ckpt, device=device)
    res = scorer.score([image], PROMPT, dims=["all"])[0]
    if not res.ok or not all(math.isfinite(v) for v in res.scores.values()):
        raise SystemExit(f"bench: the built checkpoint gives no finite scores ({res})")
    log(f"  loads with the built-in config; scores {', '.join(f'{k} {v:.2f}' for k, v in res.scores.items())}")
    del scorer
    gc.collect()


def weights_bytes_at(ckpt: Path, precision) -> int:
    """Bytes of the checkpoint's weights loaded at ``precision`` (a :class:`mps_cli.devices.Precision`)."""
    with open(ckpt, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    sizes = {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    text = sum(v for k, v in sizes.items() if k.startswith(("model.text_model.", "model.text_projection.")))
    return precision.weights_bytes(text, sum(sizes.values()) - text)
