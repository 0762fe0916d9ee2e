"""Every number and string that decides a score or a default lives here, once."""

from __future__ import annotations

from dataclasses import dataclass

#: The distribution's name on the package index (``pip install mps-score``; ``mps-cli`` there is another project).
#: The import name stays ``mps_cli`` and the command ``mps``.
DISTRIBUTION = "mps-score"

#: Condition texts, exactly as the original evaluation used them (the paper's condition words per dimension).
CONDITIONS: dict[str, str] = {
    "overall": (
        "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, "
        "limbs, structure, instance, texture, quantity, attributes, position, number, "
        "location, word, things."
    ),
    "aesthetics": "light, color, clarity, tone, style, ambiance, artistry",
    "detail": "shape, face, hair, hands, limbs, structure, instance, texture",
    "alignment": "quantity, attributes, position, number, location",
}
DIMENSIONS: tuple[str, ...] = tuple(CONDITIONS)
#: Result key of a user-supplied condition text.
CUSTOM_KEY = "custom"
DEFAULT_MASK_THRESHOLD = 0.3
#: The mask thresholds a score takes, as messages say it (engine.scorer.check_mask_threshold checks it).
MASK_THRESHOLD_RANGE = "[0, 1)"

# CLIP image normalisation (OpenAI statistics, as in the original processor).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP byte-level BPE special ids; padding is EOT, not 0 (the condition mask spans all 77 positions, padding included).
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77

# PIL's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS): bigger images are
# refused from their header, before any pixel is allocated.
MAX_IMAGE_PIXELS = 2 * 89_478_485

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Webdataset member extensions read as a sample's image when none is named, in this order.
IMAGE_MEMBER_EXTENSIONS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS, key=lambda e: (e != ".jpg", e)))

# Where the published weights live: the DiffSynth-Studio repository on the Hugging Face Hub, config.json beside them.
DEFAULT_REPO = "DiffSynth-Studio/QualityMetric_reward_pretrained"
DEFAULT_WEIGHTS_FILE = "MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors"
DEFAULT_CONFIG_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K/config.json"

#: Short names accepted by ``--weights``: name -> (repo, file in repo, config file or None).
KNOWN_SOURCES: dict[str, tuple[str, str, str | None]] = {
    "mps-overall": (DEFAULT_REPO, DEFAULT_WEIGHTS_FILE, DEFAULT_CONFIG_FILE),
    "mpsv1": ("RE-N-Y/mpsv1", "model.safetensors", None),
}
DEFAULT_SOURCE = "mps-overall"
#: The safetensors metadata key that marks weights as a demo (``mps demo``), and its one value: their
#: scores mean nothing. Loading reports it (``Scorer.demo``); every command that scores with them says so.
DEMO_METADATA_KEY = "mps_cli.demo"
DEMO_RANDOM = "random"


@dataclass(frozen=True)
class JudgeSpec:
    """One CLIP judge scored beside MPS: where its weights are published, their layout, its preprocessing, its formula.

    ``layout``: ``open_clip`` (an open_clip ``CLIP`` state dict) or ``hf_clip`` (a transformers ``CLIPModel``).
    ``preprocess``: ``clip`` (transformers' CLIPImageProcessor, MPS's own rule), ``open_clip`` (open_clip's
    eval transform) or ``letterbox`` (HPSv2's). ``formula``: ``cos100`` (100 cos), ``scaled_cos``
    (exp(logit_scale) cos) or ``clipscore`` (max(100 cos, 0)). docs/judges.md cites each fact.
    """

    repo: str
    filename: str
    revision: str | None
    layout: str
    preprocess: str
    formula: str


#: The judges ``--model`` names beside ``mps``; the one table of their sources, layouts and formulas.
JUDGES: dict[str, JudgeSpec] = {
    "hpsv2.1": JudgeSpec("xswu/HPSv2", "HPS_v2.1_compressed.pt", None, "open_clip", "letterbox", "cos100"),
    "pickscore": JudgeSpec("yuvalkirstain/PickScore_v1", "model.safetensors", None, "hf_clip", "clip", "scaled_cos"),
    "clipscore": JudgeSpec("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors", None,
                           "open_clip", "open_clip", "clipscore"),
}
MPS_MODEL = "mps"
#: Every name ``--model`` accepts, MPS first.
MODEL_NAMES: tuple[str, ...] = (MPS_MODEL, *JUDGES)
#: CLIPScore's weight on the cosine (torchmetrics' convention; Hessel et al. use 2.5 on CLIP ViT-B/32).
CLIPSCORE_WEIGHT = 100.0
#: HPSv2's benchmark scale: 100 x the cosine of its image and text embeddings.
HPS_SCALE = 100.0
WEIGHTS_ENV = "MPS_WEIGHTS"
#: Where the package keeps its own caches (prepared weights, scores); default ``$XDG_CACHE_HOME/mps-cli``.
CACHE_ENV = "MPS_CACHE_DIR"
#: The cache folder's name: the project's first name, kept when the distribution became mps-score, so that
#: prepared weights (GBs each) and score caches written before stay found rather than silently stranded.
CACHE_FOLDER = "mps-cli"
#: 0 / off / false / no: never read or write prepared weights.
PREPARED_ENV = "MPS_PREPARED_WEIGHTS"
#: Test hook: replaces the CPU matmul probe's answer, e.g. ``bf16=0.005,fp16=0.005`` (speed relative to fp32).
CPU_PROBE_ENV = "MPS_TEST_CPU_PROBE"

#: The MPS paper's (CVPR 2024) published accuracies for MPS on the ImageReward and HPD v2 test sets, in percent.
PUBLISHED_ACCURACY = {"imagereward": 67.5, "hpdv2": 83.5}

# `mps serve` and its clients.
#: URL of a running `mps serve` that score/rank/compare send their work to.
SERVER_ENV = "MPS_SERVER"
#: Bearer token the server requires and clients send.
SERVE_TOKEN_ENV = "MPS_SERVE_TOKEN"
SERVE_DEFAULT_PORT = 8000
SERVE_MAX_BATCH = 32
SERVE_MAX_WAIT_MS = 5.0
#: Images waiting for the model before new requests get 503.
SERVE_MAX_QUEUE = 1024
SERVE_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Per-image pixel limit for uploads: generous for generations (8192 x 8192), far below a bomb.
SERVE_MAX_IMAGE_PIXELS = 8192 * 8192
#: The versioned wire format of ``POST /v1/batch`` (request and answer), docs/server.md.
BATCH_SCHEMA = "mps-score/batch@1"
#: Requests a client keeps in flight at once (``Client.submit``, ``AsyncClient``) unless told otherwise.
CLIENT_MAX_IN_FLIGHT = 4
#: Seconds a client has to send a request's headers, then as long again for its body; a slower one is cut off.
SERVE_READ_TIMEOUT_S = 30.0
