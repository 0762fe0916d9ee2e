"""MPS as a remote reward for a flow_grpo-style trainer, through ``mps serve``'s ``POST /v1/batch``.

flow_grpo (github.com/yifan123/flow_grpo, ``flow_grpo/rewards.py``) builds its reward from
``config.reward_fn = {"name": weight, ...}``: ``multi_score(device, score_dict)`` looks each name up
in a ``score_functions`` table of factories ``factory(device) -> _fn``, where
``_fn(images, prompts, metadata) -> (scores, details)``, ``images`` being a B x 3 x H x W float
tensor in [0, 1] or a B x H x W x 3 uint8 array. Its remote rewards (GenEval, DeQA, UnifiedReward)
pickle a dict of JPEG bytes to a Flask server and unpickle the answer. This adapter keeps that
contract but speaks the versioned, pickle-free ``mps-score/batch@1`` instead: raw uint8 pixels (no
JPEG loss) in a multipart form, scores back as JSON, one row per image in order.

Wiring it in (two lines in the trainer's checkout)::

    # flow_grpo/rewards.py, in multi_score's score_functions:
    "mps": mps_score_remote,                 # from examples/flow_grpo_reward_server.py
    # config/grpo.py, in your config:
    config.reward_fn = {"mps": 1.0}          # or {"mps": 1.0, "pickscore": 0.5}: flow_grpo sums the weights

and run the scorer where the GPU is free (another GPU, another host)::

    mps serve --host 0.0.0.0 --token "$MPS_SERVE_TOKEN" --max-batch 64 --weights mps-overall
    export MPS_SERVER=http://scorer-host:8000 MPS_REWARD="overall+0.5*alignment"

To overlap rollouts with scoring, submit each batch as soon as it is sampled and collect the
scores when the update needs them (``RemoteReward.submit`` below; at most ``max_in_flight``
batches are out at once).

Try it against a running server (stdout: one JSON line per image)::

    python examples/flow_grpo_reward_server.py --url http://127.0.0.1:8000 a.png b.png --prompt "a red fox"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import Future

import numpy as np

from mps_cli.client import Client

DEFAULT_REWARD = "overall"


def to_uint8_nhwc(images) -> np.ndarray:
    """B x H x W x 3 uint8, from what flow_grpo hands a reward: a float tensor B x 3 x H x W in [0, 1] (rounded
    as flow_grpo's own rewards round it) or a uint8 array already B x H x W x 3."""
    if hasattr(images, "detach"):  # a torch tensor; torch is the trainer's, never imported here
        images = (images.detach().float() * 255).round().clamp(0, 255).to("cpu").numpy().astype(np.uint8)
        images = images.transpose(0, 2, 3, 1)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected B x 3 x H x W floats or B x H x W x 3 uint8, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


class RemoteReward:
    """The ``_fn(images, prompts, metadata) -> (scores, details)`` of flow_grpo, scored by ``mps serve``.

    ``scores`` is the composite ``reward`` per image (a list of floats, as flow_grpo's remote rewards
    return); ``details`` holds each term's scores under its name.
    """

    def __init__(self, url: str, reward: str = DEFAULT_REWARD, token: str | None = None, max_in_flight: int = 2):
        self.client = Client(url, token=token, max_in_flight=max_in_flight)
        self.reward = reward

    def submit(self, images, prompts) -> Future:
        """Send a batch now; the Future's result is the batch's ``ScoreResult`` list."""
        arrays = to_uint8_nhwc(images)
        return self.client.submit(list(arrays), list(prompts), reward=self.reward)

    @staticmethod
    def collect(future: Future) -> tuple[list[float], dict[str, list[float]]]:
        """(scores, details) of a submitted batch; an image the server could not score raises."""
        results = future.result()
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"{len(bad)} images could not be scored, e.g. {bad[0]}")
        details: dict[str, list[float]] = {}
        for r in results:
            for name, value in r.terms.items():
                details.setdefault(name, []).append(value)
        return [r.composite for r in results], details

    def __call__(self, images, prompts, metadata=None):
        return self.collect(self.submit(images, prompts))


def mps_score_remote(device=None):
    """flow_grpo's factory signature: ``score_functions["mps"](device)`` (the device is the server's business)."""
    return RemoteReward(os.environ.get("MPS_SERVER", "http://127.0.0.1:8000"),
                        os.environ.get("MPS_REWARD", DEFAULT_REWARD), os.environ.get("MPS_SERVE_TOKEN"))


def main(argv=None) -> int:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", required=True)
    p.add_argument("--url", default=os.environ.get("MPS_SERVER", "http://127.0.0.1:8000"))
    p.add_argument("--token", default=os.environ.get("MPS_SERVE_TOKEN"))
    p.add_argument("--reward", default=DEFAULT_REWARD)
    args = p.parse_args(argv)
    # A rollout batch is one size: the images are brought to the first one's, as a sampler's would be.
    first = Image.open(args.images[0]).convert("RGB")
    batch = np.stack([np.asarray(Image.open(f).convert("RGB").resize(first.size)) for f in args.images])
    fn = RemoteReward(args.url, args.reward, args.token)
    scores, details = fn(batch, [args.prompt] * len(batch), {})
    for i, (path, score) in enumerate(zip(args.images, scores, strict=True)):
        print(json.dumps({"image": path, "reward": score, **{k: v[i] for k, v in details.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
