"""Where weights come from: a local file, ``hf://OWNER/REPO/PATH[@REV]``, or a known short name.

Only :mod:`mps_cli.hub` talks to the Hub; this module decides what to ask it for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import SafetensorsFile, TensorDict, TensorSource, fingerprint
from .constants import DEFAULT_SOURCE, KNOWN_SOURCES, WEIGHTS_ENV
from .errors import CheckpointError

PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl"}


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub repository, with the config.json to use beside it (if any)."""

    repo: str
    filename: str
    revision: str | None = None
    config: str | None = None  # path in the repo; None: try config.json in the file's folder

    @property
    def uri(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}/{self.filename}{rev}"


@dataclass
class OpenedWeights:
    source: TensorSource
    config_path: Path | None
    label: str
    identity: str


def parse_hf_uri(uri: str) -> HubFile:
    """``hf://OWNER/REPO/PATH/IN/REPO[@REVISION]`` -> :class:`HubFile`."""
    rest = uri[len("hf://"):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise CheckpointError(f"{uri}: empty revision after '@'")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3:
        raise CheckpointError(f"{uri}: expected hf://OWNER/REPO/PATH/IN/REPO[@REVISION]")
    return HubFile(repo="/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision)


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


def open_local(path: str | os.PathLike, label: str | None = None) -> OpenedWeights:
    """Open a local weights file: safetensors, or a pickle read without executing code."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from .pickles import read_checkpoint

        if not path.is_file():
            raise CheckpointError(f"{path}: weights file not found")
        tensors = read_checkpoint(path)
        source: TensorSource = TensorDict(tensors, name=str(path))
        identity = fingerprint(path)
    else:
        source = SafetensorsFile.open(path)
        identity = fingerprint(path)
    config = path.parent / "config.json"
    return OpenedWeights(source=source, config_path=config if config.is_file() else None,
                         label=label or str(path), identity=identity)


def open_weights(spec: str | os.PathLike | None = None, revision: str | None = None,
                 offline: bool | None = None) -> OpenedWeights:
    """Resolve a weights spec to an opened, validated file (fetching from the Hub if needed)."""
    spec = weights_spec(spec)
    hub_file = hub_file_for(spec, revision)
    if hub_file is None:
        return open_local(spec)
    from .hub import fetch_weights

    fetched = fetch_weights(hub_file, offline=offline)
    opened = open_local(fetched.path, label=hub_file.uri)
    opened.config_path = fetched.config_path
    return opened
