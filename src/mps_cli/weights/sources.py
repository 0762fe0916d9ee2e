"""Where weights come from: a local file, ``hf://OWNER/REPO/PATH[@REV]``, or a known short name.

:func:`open_weights` is the one way from a weights argument to an opened, checked file and
the architecture config that goes with it. Only :mod:`mps_cli.weights.hub` talks to the Hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..constants import DEFAULT_SOURCE, DEMO_METADATA_KEY, KNOWN_SOURCES, WEIGHTS_ENV
from ..errors import CheckpointError
from .cachedir import weights_sha256
from .config import ModelConfig, builtin_config, read_config
from .hub import HubFile, config_filename, parse_hf_uri
from .reader import SafetensorsFile, TensorDict, TensorSource, check_regular_file

PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl"}


@dataclass(frozen=True)
class OpenedWeights:
    """Weights ready to load: the checked file, its architecture, a label for messages and a strong identity.

    ``demo``: what the file's metadata says it is when it is a demo (``"random"``: random weights, from
    ``mps demo``), else None.
    """

    source: TensorSource
    config: ModelConfig
    label: str
    identity: str  # "sha256:" and the SHA-256 of the file's bytes
    demo: str | None = None


def demo_of(source: TensorSource) -> str | None:
    """The demo marker of opened weights (:data:`~mps_cli.constants.DEMO_METADATA_KEY`), or None.

    Any value marks a demo; one that is not a short printable word (the file is anyone's) reads as ``marked``.
    """
    if not isinstance(source, SafetensorsFile):
        return None
    value = source.metadata.get(DEMO_METADATA_KEY)
    if not value:
        return None
    return value if value.isprintable() and len(value) <= 32 else "marked"


def demo_file(path: str | os.PathLike) -> str | None:
    """The demo marker of a local safetensors file, read from its header alone; None for any other file
    (a pickle, one that cannot be read: loading it says why)."""
    try:
        return demo_of(SafetensorsFile.open(path))
    except CheckpointError:
        return None


def weights_spec(spec: str | os.PathLike | None) -> str:
    """The weights asked for: the argument, else ``$MPS_WEIGHTS``, else the published default."""
    if spec is None or str(spec) == "":
        spec = os.environ.get(WEIGHTS_ENV) or DEFAULT_SOURCE
    return os.fspath(spec)


def hub_file_for(spec: str, revision: str | None = None) -> HubFile | None:
    """The Hub file a spec names (a short name or an ``hf://`` URI), or None for a local path."""
    if spec.startswith("hf://"):
        f = parse_hf_uri(spec)
    elif spec in KNOWN_SOURCES and not Path(spec).exists():
        repo, filename, config = KNOWN_SOURCES[spec]
        f = HubFile(repo=repo, filename=filename, config=config)
    else:
        return None
    if revision:
        f = HubFile(repo=f.repo, filename=f.filename, revision=revision, config=f.config)
    return f


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open a local weights file: safetensors (header checked in full), or a pickle read without executing code."""
    path = Path(path)
    check_regular_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from .pickles import read_checkpoint

        return TensorDict(read_checkpoint(path), name=str(path))
    return SafetensorsFile.open(path)


def open_weights(spec: str | os.PathLike | None = None, revision: str | None = None, offline: bool | None = None,
                 config: str | os.PathLike | ModelConfig | None = None) -> OpenedWeights:
    """Resolve a weights spec to an opened, checked file and its architecture, fetching from the Hub if needed.

    The architecture is, in this order: ``config`` (a :class:`ModelConfig` or a path), the
    ``config.json`` that goes with the weights (beside a local file; for a Hub file the one
    named for it, else the one in its folder), else the built-in ViT-H-14.
    """
    spec = weights_spec(spec)
    hub_file = hub_file_for(spec, revision)
    if hub_file is None:
        path, label = Path(spec), spec
        beside = path.parent / "config.json"
        found_config = beside if beside.is_file() else None
    else:
        from .hub import fetch_weights

        fetched = fetch_weights(hub_file, offline=offline, check=False)
        path, label, found_config = fetched.path, hub_file.uri, fetched.config_path
    source = open_source(path)
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is not None:
        cfg = read_config(config)
    elif found_config is not None:
        cfg = read_config(found_config)
    else:
        cfg = builtin_config()
    try:
        identity = "sha256:" + weights_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc.strerror or exc})") from exc
    return OpenedWeights(source=source, config=cfg, label=label, identity=identity, demo=demo_of(source))


__all__ = ["HubFile", "OpenedWeights", "config_filename", "demo_file", "demo_of", "hub_file_for", "open_source",
           "open_weights", "weights_spec"]
