"""``mps download``, ``mps info`` and ``mps convert``: getting weights ready, and seeing what is there."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DISTRIBUTION, KNOWN_SOURCES, WEIGHTS_ENV
from ..errors import FetchError
from .app import AsJson, Exit, Revision, check_revision, fail, handle_errors, say
from .output import emit_json


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
    from ..weights.sources import hub_file_for, weights_spec

    check_revision(source, revision)
    with handle_errors("reading the source"):
        spec = weights_spec(source)
        hub_file = hub_file_for(spec, revision)
    if hub_file is None:
        raise fail(f"{spec}: not a Hub source: give hf://OWNER/REPO/PATH[@REV] or one of "
                   f"{', '.join(KNOWN_SOURCES)} (a local file needs no download)", Exit.USAGE)
    with handle_errors("downloading"):
        from ..weights.hub import fetch_weights
        from ..weights.reader import file_sha256

        try:
            fetched = fetch_weights(hub_file, offline=False)
        except FetchError as exc:
            # The library's message alone: the scoring commands' remedies (--weights, --offline) are not download's.
            raise fail(str(exc), Exit.FETCH) from None
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


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _prepared_summary() -> dict:
    from ..weights.prepared import SWITCH_ENV, enabled, summary

    found = summary()
    return {"dir": str(found.folder), "enabled": enabled(), "switch": f"{SWITCH_ENV}=0",
            "files": found.files, "bytes": found.bytes}


def info(
    as_json: AsJson = False,
    verify: Annotated[bool, typer.Option(
        "--verify",
        help="Check every prepared-weights file against its checksums in full; delete the damaged.")] = False,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Also time a small matmul per dtype on the CPU (well under a second) and show its "
        "speed relative to fp32.")] = False,
) -> None:
    """Show the version, where weights are cached (and whether they are), devices, their native dtypes and
    library versions.

    A dtype is native when the device's own arithmetic runs it; on CPUs without AVX-512 BF16 or AMX,
    bf16 and fp16 run through a fallback tens to hundreds of times slower than fp32. Never touches the network.
    """
    from .. import __version__
    from ..devices import list_devices, resolve_device, resolve_precision
    from ..weights.hub import cache_dir, cached_weights, config_filename, endpoint, is_offline
    from ..weights.sources import HubFile, hub_file_for, weights_spec

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
        precision = resolve_precision("auto", device)
        doc = {
            "distribution": DISTRIBUTION,
            "version": __version__,
            "python": platform.python_version(),
            "cache_dir": str(cache_dir()),
            "endpoint": endpoint(),
            "offline": is_offline(None),
            "weights": weights,
            "devices": list_devices(probe=probe),
            "default_device": str(device),
            "default_dtype": precision.image,
            "default_text_dtype": precision.text,
            "versions": {d: _version(d) for d in ("torch", "pillow", "huggingface_hub", "safetensors")},
            "prepared": _prepared_summary(),
        }
        if verify:
            from ..weights.prepared import verify_all

            checked = verify_all()
            doc["prepared"]["verified"] = [{"path": str(p), "ok": why is None, "error": why} for p, why in checked]
    if as_json:
        emit_json(doc)
        return
    w = doc["weights"]
    lines = [
        f"{doc['distribution']} {doc['version']} (python {doc['python']})",
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
    for v in p.get("verified", []):
        error = f" ({v['error']})" if v["error"] else ""
        lines.append(f"  {'ok' if v['ok'] else 'damaged, deleted'}: {v['path']}{error}")
    lines.append("devices:")
    for d in doc["devices"]:
        lines += _device_lines(d)
    lines.append(f"default: --device auto -> {doc['default_device']}, --dtype auto -> {doc['default_dtype']} "
                 f"(text side {doc['default_text_dtype']})")
    lines.append("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in doc["versions"].items()))
    print("\n".join(lines))


def _device_lines(d: dict) -> list[str]:
    head = f"  {d['device']:<8} {d['name']}"
    if d.get("capability"):
        head += f"  (torch kernels: {d['capability']}; flags: {', '.join(d['flags'] or []) or 'none for bf16/fp16'})"
    lines = [head]
    for name, s in d["dtypes"].items():
        native = {True: "native", False: "NOT native (slow fallback)", None: "unknown"}[s["native"]]
        speed = f", {s['relative_speed']:.2f}x fp32's matmul speed" if "relative_speed" in s else ""
        lines.append(f"    {name}: {native}{speed} [{s['basis']}]")
    if "probe" in d:
        p = d["probe"]
        lines.append(f"    probe: {p['matmul']} matmul on one core, {p['seconds']:.2f} s: " + ", ".join(
            f"{k} {v:g} GFLOP/s" for k, v in p["gflops"].items()) + (" (injected)" if p["injected"] else ""))
    elif d["device"] == "cpu":
        lines.append("    (from the CPU's flags; `mps info --probe` measures)")
    return lines


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
    if dtype is not None and _storage_dtype(dtype) is None:
        raise typer.BadParameter(f"{dtype!r}: use fp32, fp16 or bf16", param_hint="--dtype")
    if not src.exists():
        raise fail(f"{src}: no such file", Exit.USAGE)
    if src.resolve() == dst.resolve():
        raise fail(f"{dst}: the output would overwrite the input; choose another name", Exit.USAGE)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise fail(f"{dst}: already exists; pass --force to replace it", Exit.USAGE)
    with handle_errors("converting"):
        from ..weights.convert import convert_checkpoint

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


def _storage_dtype(spec: str) -> str | None:
    from ..devices import DTYPES, parse_dtype
    from ..errors import DeviceError

    try:
        name = parse_dtype(spec)
    except DeviceError:
        return None
    return name if name in DTYPES else None


__all__ = ["convert", "download", "info"]
