"""What the reward's two preprocessing settings cost: score parity and gradient quality.

``round_pixels=True`` (the default) rounds to 8 bits where PIL does, in the forward pass only
(straight-through); ``round_pixels=False`` is the smooth path. On the golden fixture (its 7
images and 4 prompts, the tiny random-weight checkpoint unless ``--weights`` names another,
fp32 on CPU) this prints, for each setting:

* parity: the largest |reward - original| over the 140 rows of ``expected.json``;
* gradients: per image and prompt, the cosine between the two settings' gradients of the
  overall score with respect to the input pixels, and their relative L2 difference;
* ``torch.autograd.gradcheck`` in float64 on a 2x3 image through the whole path;
* gradient ascent as ``examples/reward_guidance.py`` runs it (Adam on the image's logits),
  from each fixture image: the score the reward reports at the end, what ``mps score`` gives
  the final image saved as an 8-bit PNG, and how many steps left the reported score unchanged.

    python benchmarks/reward_gradients.py [--steps 20] [--lr 0.05] [--json out.json]

Results to stdout, progress to stderr. Numbers only, no timing: nothing here is a speed figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("MPS_SHARED", REPO.parent / "shared")) / "fixtures" / "mps-tiny"


def log(msg: str) -> None:
    print(f"[reward_gradients] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def image_tensor(path: Path) -> torch.Tensor:
    from mps_cli.engine.preprocess import open_image

    img = open_image(path)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def parity(weights: str, expected: dict, images: list[Path]) -> dict[str, float]:
    from mps_cli import load_reward

    prompts = sorted({r["prompt"] for r in expected["scores"]})
    out = {}
    for rounding in (True, False):
        rewards = {None: load_reward(weights, dims="all", device="cpu", dtype="fp32", round_pixels=rounding)}
        for cond, thr in {(r["condition"], r["mask_threshold"]) for r in expected["custom"]}:
            rewards[cond, thr] = load_reward(weights, dims=None, condition=cond, mask_threshold=thr, device="cpu",
                                             dtype="fp32", round_pixels=rounding)
        worst = 0.0
        for key, rw in rewards.items():
            rows = expected["scores"] if key is None else \
                [r for r in expected["custom"] if (r["condition"], r["mask_threshold"]) == key]
            for path in images:
                with torch.no_grad():
                    got = rw.score(image_tensor(path).expand(len(prompts), -1, -1, -1), prompts)
                for r in rows:
                    if r["image"] == path.name:
                        value = got[r.get("dim", "custom")][prompts.index(r["prompt"])].item()
                        worst = max(worst, abs(value - r["score"]))
        out["straight-through" if rounding else "smooth"] = worst
    return out


def gradients(weights: str, images: list[Path], prompts: list[str]) -> dict[str, float]:
    from mps_cli import load_reward

    st = load_reward(weights, device="cpu", dtype="fp32", round_pixels=True)
    smooth = load_reward(weights, device="cpu", dtype="fp32", round_pixels=False)
    cosines, rel = [], []
    for path in images:
        for prompt in prompts:
            grads = []
            for rw in (st, smooth):
                x = image_tensor(path).requires_grad_()
                rw(x, prompt).sum().backward()
                grads.append(x.grad.flatten().double())
            a, b = grads
            cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            rel.append(float((a - b).norm() / b.norm()))
    return {"pairs": len(cosines), "cosine_min": min(cosines), "cosine_median": statistics.median(cosines),
            "cosine_mean": statistics.fmean(cosines), "rel_l2_max": max(rel), "rel_l2_median": statistics.median(rel)}


def gradchecks(weights: str) -> dict[str, bool]:
    from mps_cli import load_reward

    out = {}
    gen = torch.Generator().manual_seed(1)
    small = (0.3 + 0.4 * torch.rand(1, 3, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    for rounding in (False, True):
        rw = load_reward(weights, device="cpu", dtype="fp32", round_pixels=rounding).double()
        try:
            ok = torch.autograd.gradcheck(lambda im, rw=rw: rw(im, "a red fox in the snow"), (small,),
                                          raise_exception=False)
        except RuntimeError:
            ok = False
        out["straight-through" if rounding else "smooth"] = bool(ok)
    return out


def ascent(weights: str, images: list[Path], prompt: str, steps: int, lr: float) -> dict[str, dict]:
    from PIL import Image

    from mps_cli import load_reward, load_scorer

    spec = importlib.util.spec_from_file_location("reward_guidance", REPO / "examples" / "reward_guidance.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scorer = load_scorer(weights, device="cpu", dtype="fp32")
    out = {}
    for rounding in (True, False):
        rw = load_reward(weights, device="cpu", dtype="fp32", round_pixels=rounding)
        gaps, gains, flat = [], [], 0
        for path in images:
            final, scores = example.guide(rw, image_tensor(path), prompt, steps, lr)
            pixels = (final[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            saved = scorer.score([Image.fromarray(pixels)], prompt)[0].scores["overall"]
            gaps.append(abs(scores[-1] - saved))
            gains.append(saved - scores[0])
            flat += sum(abs(b - a) < 1e-7 for a, b in zip(scores, scores[1:], strict=False))
        out["straight-through" if rounding else "smooth"] = {
            "end_vs_saved_png_max": max(gaps), "gain_of_saved_png_mean": statistics.fmean(gains),
            "gain_of_saved_png_min": min(gains), "unchanged_steps": flat, "steps": steps * len(images)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(FIXTURE / "mps-tiny.safetensors"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, nargs="+", default=[0.05, 0.002],
                   help="Adam learning rates on the logits (default: the example's 0.05, and a small 0.002)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    expected = json.loads((FIXTURE / "expected.json").read_text())
    images = sorted((FIXTURE / "images").iterdir())
    prompts = sorted({r["prompt"] for r in expected["scores"]})
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    log(machine)
    log("parity on expected.json")
    results = {"machine": machine, "weights": args.weights, "parity_max_gap": parity(args.weights, expected, images)}
    log("gradients, straight-through against smooth")
    results["gradients"] = gradients(args.weights, images, prompts)
    log("gradcheck in float64")
    results["gradcheck"] = gradchecks(args.weights)
    results["ascent"] = {}
    for lr in args.lr:
        log(f"gradient ascent, {args.steps} steps at lr {lr}, from each fixture image")
        results["ascent"][str(lr)] = ascent(args.weights, images, prompts[0], args.steps, lr)

    g = results["gradients"]
    print(f"machine: {machine}")
    print(f"weights: {args.weights}")
    print("| | straight-through (default) | smooth (round_pixels=False) |")
    print("| --- | --- | --- |")
    pg = results["parity_max_gap"]
    print(f"| max gap to the original, 140 fixture rows | {pg['straight-through']:.4f} | {pg['smooth']:.4f} |")
    gc = results["gradcheck"]
    print(f"| float64 gradcheck of the whole path | {'passes' if gc['straight-through'] else 'fails'} | "
          f"{'passes' if gc['smooth'] else 'fails'} |")
    for lr, a in results["ascent"].items():
        st, sm = a["straight-through"], a["smooth"]
        print(f"| ascent at lr {lr}: reported end score vs `mps score` of the saved PNG, max | "
              f"{st['end_vs_saved_png_max']:.4f} | {sm['end_vs_saved_png_max']:.4f} |")
        print(f"| ascent at lr {lr}: gain of the saved PNG's score, mean (min) | {st['gain_of_saved_png_mean']:.4f} "
              f"({st['gain_of_saved_png_min']:.4f}) | {sm['gain_of_saved_png_mean']:.4f} "
              f"({sm['gain_of_saved_png_min']:.4f}) |")
        print(f"| ascent at lr {lr}: steps whose reported score did not move | {st['unchanged_steps']} of "
              f"{st['steps']} | {sm['unchanged_steps']} of {sm['steps']} |")
    print(f"gradients ({g['pairs']} image x prompt pairs): cosine between the two settings min {g['cosine_min']:.4f}, "
          f"median {g['cosine_median']:.4f}, mean {g['cosine_mean']:.4f}; relative L2 difference median "
          f"{g['rel_l2_median']:.3f}, max {g['rel_l2_max']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
