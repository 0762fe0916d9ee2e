"""``mps download``, ``mps info`` and ``mps convert``: getting weights ready, and seeing what is there."""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Annotated

import typer

from ..constants import KNOWN_SOURCES, WEIGHTS_ENV
from ..errors import FetchError
from .app import AsJson, Exit, Revision, check_revision, fail, handle_errors, say
from .output import emit_json

_DOWNLOAD_FLAGS = re.compile(r",? (?:or )?(?:use --offline with cached weights|pass --weights PATH)")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def download(
    source: Annotated[str | None, typer.Argument(
        help=f"hf://OWNER/REPO/PATH\\[@REV] or a known name ({', '.join(KNOWN_SOURCES)}). "
        f"Default: ${WEIGHTS_ENV}, else the published MPS overall checkpoint.", show_default=False)] = None,
    revision: Revision = None,
    as_json: AsJson = False,
) -> None:
    """Fetch weights (and their config.json) into the Hugging Face cache; print the local path, size and sha256.

    Run it on a connected machine; later runs, even with --offline or HF_HUB_OFFLINE=1, use the cache.
    Exit codes: 0 fetched, 2 usage error, 3 corrupt file, 4 network or Hub problem.
    """
    from ..weights import hub_file_for, weights_spec

    check_revision(source, revision)
    with handle_errors("reading the source"):
        spec = weights_spec(source)
        hub_file = hub_file_for(spec, revision)
    if hub_file is None:
        raise fail(f"{spec}: not a Hub source: give hf://OWNER/REPO/PATH[@REV] or one of "
                   f"{', '.join(KNOWN_SOURCES)} (a local file needs no download)", Exit.USAGE)
    with handle_errors("downloading"):
        from ..hub import fetch_weights, file_sha256

        try:
            fetched = fetch_weights(hub_file, offline=False)
        except FetchError as exc:
            # The fetch messages suggest flags of the scoring commands; download has none of them.
            raise fail(_DOWNLOAD_FLAGS.sub("", str(exc)), Exit.FETCH) from None
        sha = fetched.sha256 or file_sha256(fetched.path)
    size = fetched.path.stat().st_size
    doc = {
        "source": hub_file.uri,
        "path": str(fetched.path),
        "size": size,
        "sha256": sha,
        "commit": fetched.commit,
        "config": str(fetched.config_path) if fetched.config_path else None,
        "downloaded": fetched.downloaded,
    }
    if as_json:
        emit_json(doc)
        return
    say(f"{'downloaded' if fetched.downloaded else 'already cached'}: {hub_file.uri}")
    print(f"path: {fetched.path}")
    print(f"size: {size} bytes ({_human(size)})")
    print(f"sha256: {sha}")
    print(f"commit: {fetched.commit or 'unknown'}")
    print(f"config: {fetched.config_path or 'none in the repository (built-in ViT-H-14 used)'}")


def _devices() -> list[dict]:
    import torch

    found = [{"device": "cpu", "name": platform.processor() or platform.machine(),
              "dtypes": ["fp32", "bf16", "fp16"]}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            with torch.cuda.device(i):
                bf16 = torch.cuda.is_bf16_supported()
            found.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                          "dtypes": ["fp16", "fp32"] + (["bf16"] if bf16 else [])})
    mps_backend = getattr(torch.backends, "mps", None)
    if mps_backend is not None and mps_backend.is_available():
        found.append({"device": "mps", "name": "Apple Metal", "dtypes": ["fp16", "fp32", "bf16"]})
    return found


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _prepared_summary() -> dict:
    from ..prepared import SWITCH_ENV, cache_dir, enabled

    folder = cache_dir()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return {"dir": str(folder), "enabled": enabled(), "switch": f"{SWITCH_ENV}=0",
            "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def info(as_json: AsJson = False) -> None:
    """Show the version, where weights are cached (and whether they are), devices, dtypes and library versions.

    Never touches the network.
    """
    from .. import __version__
    from ..hub import cache_dir, cached_weights, config_filename, endpoint, is_offline
    from ..scorer import resolve_device, resolve_dtype
    from ..weights import HubFile, hub_file_for, weights_spec

    with handle_errors():
        spec = weights_spec(None)
        hub_file = hub_file_for(spec)
        if hub_file is None:
            local = Path(spec)
            weights = {"source": spec, "hub": False, "cached": local.is_file(),
                       "path": str(local) if local.is_file() else None}
        else:
            path = cached_weights(hub_file)
            config = cached_weights(HubFile(hub_file.repo, config_filename(hub_file), hub_file.revision))
            weights = {"source": spec, "hub": True, "uri": hub_file.uri, "cached": path is not None,
                       "path": str(path) if path else None, "config": str(config) if config else None}
        device = resolve_device("auto")
        dtype = resolve_dtype("auto", device)
        doc = {
            "version": __version__,
            "python": platform.python_version(),
            "cache_dir": str(cache_dir()),
            "endpoint": endpoint(),
            "offline": is_offline(None),
            "weights": weights,
            "devices": _devices(),
            "default_device": str(device),
            "default_dtype": str(dtype).replace("torch.", "").replace("float32", "fp32")
            .replace("float16", "fp16").replace("bfloat16", "bf16"),
            "versions": {d: _version(d) for d in ("torch", "open_clip_torch", "huggingface_hub", "safetensors")},
            "prepared": _prepared_summary(),
        }
    if as_json:
        emit_json(doc)
        return
    w = doc["weights"]
    lines = [
        f"mps-cli {doc['version']} (python {doc['python']})",
        f"cache: {doc['cache_dir']}" + ("  [offline]" if doc["offline"] else f"  (from {doc['endpoint']})"),
        f"weights: {w['source']}" + (f" = {w['uri']}" if w.get("uri") else ""),
    ]
    if w["cached"]:
        lines.append(f"  cached at {w['path']}")
        if w.get("hub"):
            lines.append(f"  config: {w.get('config') or 'not cached (built-in ViT-H-14 is used)'}")
    elif w.get("hub"):
        lines.append(f"  not cached: run `mps download {w['uri']}` on a connected machine")
    else:
        lines.append("  local file not found")
    p = doc["prepared"]
    lines.append(f"prepared weights: {p['dir']}: " + (
        f"{p['files']} file(s), {p['bytes'] / 2**30:.2f} GiB" if p["enabled"] else f"off ({p['switch']})"))
    lines.append("devices:")
    for d in doc["devices"]:
        lines.append(f"  {d['device']:<8} {d['name']}  dtypes: {', '.join(d['dtypes'])}")
    lines.append(f"default: --device auto -> {doc['default_device']}, --dtype auto -> {doc['default_dtype']}")
    lines.append("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in doc["versions"].items()))
    print("\n".join(lines))


def convert(
    src: Annotated[Path, typer.Argument(
        help="The checkpoint: the authors' MPS_overall_checkpoint.pth (a pickled module), a state-dict "
        ".pth, or a .safetensors under an 'mps.'/'module.' prefix.", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output .safetensors file.", show_default=False)],
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Cast floating tensors to fp32, fp16 or bf16 (default: keep them).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace DST if it exists.")] = False,
    as_json: AsJson = False,
) -> None:
    """Convert a checkpoint to the published safetensors layout, reading pickles without running their code.

    The output loads with --weights and scores as the source does. A failed conversion leaves
    no output file, and an existing DST is kept unless --force is given. Exit codes: 0 written,
    2 usage error (DST exists without --force), 3 unreadable or unsafe checkpoint.
    """
    if dst.suffix.lower() != ".safetensors":
        raise typer.BadParameter(f"{dst}: must end in .safetensors", param_hint="DST")
    if dtype is not None and dtype.strip().lower() not in ("fp32", "float32", "fp16", "float16", "half",
                                                           "bf16", "bfloat16"):
        raise typer.BadParameter(f"{dtype!r}: use fp32, fp16 or bf16", param_hint="--dtype")
    if not src.exists():
        raise fail(f"{src}: no such file", Exit.USAGE)
    if src.resolve() == dst.resolve():
        raise fail(f"{dst}: the output would overwrite the input; choose another name", Exit.USAGE)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise fail(f"{dst}: already exists; pass --force to replace it", Exit.USAGE)
    with handle_errors("converting"):
        from ..convert import convert_checkpoint

        result = convert_checkpoint(src, dst, dtype)
    doc = {"path": str(result.dst), "tensors": result.tensors, "size": result.bytes, "dtype": result.dtype}
    if as_json:
        emit_json(doc)
        return
    say(f"converted {src} -> {result.dst}")
    print(f"path: {result.dst}")
    print(f"tensors: {result.tensors}")
    print(f"size: {result.bytes} bytes ({_human(result.bytes)})")
    print(f"dtype: {result.dtype}")


__all__ = ["convert", "download", "info"]
