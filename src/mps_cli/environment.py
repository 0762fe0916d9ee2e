"""What this installation sees: the default weights and whether they are cached, the caches, the devices
and their native dtypes, the prepared weights, library versions. What ``mps info`` shows; never
touches the network.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

#: The distributions whose versions are reported: what computes, decodes (PIL's resize decides scores) and loads.
DISTRIBUTIONS = ("torch", "pillow", "huggingface_hub", "safetensors")


@dataclass(frozen=True)
class EnvironmentInfo:
    """``mps info --json``: every field is JSON-ready (``weights``, ``devices`` and ``prepared`` as documents)."""

    distribution: str
    version: str
    python: str
    cache_dir: str
    endpoint: str
    offline: bool
    weights: dict
    devices: list[dict]
    default_device: str
    default_dtype: str
    default_text_dtype: str
    versions: dict[str, str | None]
    prepared: dict

    def to_dict(self) -> dict:
        return asdict(self)


def environment_info(*, probe: bool = False, verify: bool = False, verify_all: bool = False,
                     progress=None) -> EnvironmentInfo:
    """The installation as it is now. ``probe`` also times a small matmul per dtype on the CPU (well under a
    second); ``verify`` checks the prepared copies of the current weights in full and deletes the damaged
    (``verify_all``: every copy); ``progress(what, done, total)`` follows the MiB read."""
    from . import __version__
    from .constants import DISTRIBUTION
    from .devices import list_devices, resolve_device, resolve_precision
    from .weights.hub import cache_dir, endpoint, is_offline

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    return EnvironmentInfo(
        distribution=DISTRIBUTION, version=__version__, python=platform.python_version(), cache_dir=str(cache_dir()),
        endpoint=endpoint(),
        offline=is_offline(None), weights=default_weights(), devices=list_devices(probe=probe),
        default_device=str(device), default_dtype=precision.image, default_text_dtype=precision.text,
        versions={d: distribution_version(d) for d in DISTRIBUTIONS},
        prepared=prepared_weights(verify=verify, verify_all=verify_all, progress=progress))


def default_weights() -> dict:
    """The weights a scoring command would load (``$MPS_WEIGHTS`` or the published default), where they are
    cached, if they are, and (``demo``, only for demo weights) their demo marker: ``random``."""
    from .weights.hub import cached_weights, config_filename
    from .weights.sources import HubFile, demo_file, hub_file_for, weights_spec

    spec = weights_spec(None)
    hub_file = hub_file_for(spec)
    if hub_file is None:
        found = Path(spec).is_file()
        doc = {"source": spec, "hub": False, "cached": found, "path": str(Path(spec)) if found else None}
    else:
        path = cached_weights(hub_file)
        config = cached_weights(HubFile(hub_file.repo, config_filename(hub_file), hub_file.revision))
        doc = {"source": spec, "hub": True, "uri": hub_file.uri, "cached": path is not None,
               "path": str(path) if path else None, "config": str(config) if config else None}
    demo = demo_file(doc["path"]) if doc["path"] else None
    return {**doc, "demo": demo} if demo else doc


def prepared_weights(verify: bool = False, verify_all: bool = False, progress=None) -> dict:
    """The prepared-weights folder: whether it is used, its files and their size (``verified``: each file's
    check, with ``verify``: the copies of the current weights, or all with ``verify_all``)."""
    from .weights.prepared import SWITCH_ENV, enabled, summary
    from .weights.prepared import verify_all as verify_files

    found = summary()
    doc = {"dir": str(found.folder), "enabled": enabled(), "switch": f"{SWITCH_ENV}=0", "files": found.files,
           "bytes": found.bytes}
    if verify:
        source = None if verify_all else default_weights().get("path")
        checked = verify_files(source, progress) if verify_all or source is not None else []
        doc["verified"] = [{"path": str(p), "ok": why is None, "error": why} for p, why in checked]
    return doc


def distribution_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


__all__ = ["DISTRIBUTIONS", "EnvironmentInfo", "default_weights", "distribution_version", "environment_info",
           "prepared_weights"]
