"""Reward guidance with MPS: gradient ascent on an image's pixels to raise its score for a prompt.

The image is parametrised as ``sigmoid(z)`` (so it stays in [0, 1]) and ``z`` follows Adam on
the negative MPS score, as test-time guidance methods (ReNO and friends) do with a latent.
A sketch of the loop, not an image generator: with real weights it drifts the pixels towards
what MPS prefers for the prompt, adversarially more than artistically.

    python examples/reward_guidance.py --prompt "a red fox in the snow" --steps 20 --out fox.png
    python examples/reward_guidance.py --init photo.jpg --weights mps.safetensors --device cuda --dtype bf16

stdout: one JSON line ``{"prompt", "steps", "start", "end", "scores"}`` (``scores`` per step);
progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def initial_image(path: str | None, size: int, seed: int) -> torch.Tensor:
    """1 x 3 x H x W in [0, 1]: the image at ``path`` (decoded as the scorer does), or smooth noise."""
    if path:
        import numpy as np

        from mps_cli.engine.preprocess import open_image

        img = open_image(path)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def guide(reward, image: torch.Tensor, prompt: str, steps: int, lr: float,
          log=None) -> tuple[torch.Tensor, list[float]]:
    """Adam on the image's logits for ``steps`` steps.

    Returns the final image and the scores: before each step, then after the last.
    """
    z = torch.logit(image.clamp(1e-3, 1 - 1e-3)).to(reward.device).requires_grad_()
    opt = torch.optim.Adam([z], lr=lr)
    scores = []
    for step in range(steps):
        opt.zero_grad()
        score = reward(torch.sigmoid(z), prompt)
        (-score.sum()).backward()
        opt.step()
        scores.append(score.item())
        if log:
            log(f"step {step}: score {scores[-1]:.4f}")
    with torch.no_grad():
        final = torch.sigmoid(z)
        scores.append(reward(final, prompt).item())
    return final.detach(), scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="a red fox sitting in the snow, golden hour")
    p.add_argument("--weights", default=None,
                   help="weights file, hf:// path or short name (default: the published one)")
    p.add_argument("--init", default=None, help="start from this image (default: smooth random noise)")
    p.add_argument("--size", type=int, default=256, help="side of the noise image (default 256)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dim", default="overall", help="overall, aesthetics, detail or alignment")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the final image here (PNG)")
    args = p.parse_args(argv)

    from mps_cli import MPSError, load_reward

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        reward = load_reward(args.weights, dims=(args.dim,), device=args.device, dtype=args.dtype)
        image = initial_image(args.init, args.size, args.seed)
    except (MPSError, ValueError) as exc:
        log(f"reward_guidance: {exc}")
        return 2
    final, scores = guide(reward, image, args.prompt, args.steps, args.lr, log)
    if args.out:
        from PIL import Image

        px = (final[0].permute(1, 2, 0).float().cpu() * 255).round().to(torch.uint8).numpy()
        Image.fromarray(px).save(args.out)
        log(f"wrote {args.out}")
    print(json.dumps({"prompt": args.prompt, "steps": args.steps, "start": scores[0], "end": scores[-1],
                      "scores": scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
