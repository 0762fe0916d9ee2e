"""``mps download``, ``mps info`` and ``mps convert``: getting weights ready, and seeing what is there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..constants import KNOWN_SOURCES, WEIGHTS_ENV
from ..errors import FetchError
from . import output
from .app import DEMO_NOTE, Exit, exit_help, fail, handle_errors
from .options import AsJson, Revision, check_revision
from .output import emit_json, human_size
from .values import BadValue

DOWNLOAD_EXITS = exit_help({Exit.OK: "fetched (or already cached)",
                            Exit.USAGE: "usage error: not a Hub source, or --revision disagrees with it",
                            Exit.RESOURCE: "a malformed source or a corrupt file",
                            Exit.FETCH: "network or Hub problem"})
INFO_EXITS = exit_help({Exit.OK: "shown", Exit.USAGE: "usage error: a bad option"},
                       (Exit.USAGE, Exit.RESOURCE, Exit.INTERNAL, Exit.INTERRUPTED))
CONVERT_EXITS = exit_help({Exit.OK: "written", Exit.USAGE: "usage error (DST exists without --force)",
                           Exit.RESOURCE: "unreadable or unsafe checkpoint, or DST cannot be written"},
                          codes=(Exit.INTERNAL, Exit.INTERRUPTED))


def download(
    source: Annotated[str | None, typer.Argument(
        help=f"hf://OWNER/REPO/PATH\\[@REV] or a known name ({', '.join(KNOWN_SOURCES)}). "
        f"Default: ${WEIGHTS_ENV}, else the published MPS overall checkpoint.", metavar="SOURCE",
        show_default=False)] = None,
    revision: Revision = None,
    as_json: AsJson = False,
) -> None:
    """Fetch weights (and their config.json) into the Hugging Face cache; print the local path, size and sha256.

    Run it on a connected machine; later runs, even with --offline or HF_HUB_OFFLINE=1, use the cache.
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
    output.say(f"{'downloaded' if fetched.downloaded else 'already cached'}: {hub_file.uri}")
    output.emit_lines([f"path: {fetched.path}", f"size: {size} bytes ({human_size(size)})", f"sha256: {sha}",
                       f"commit: {fetched.commit or 'unknown'}",
                       f"config: {fetched.config_path or 'none in the repository (built-in ViT-H-14 used)'}"])


def info(
    as_json: AsJson = False,
    verify: Annotated[bool, typer.Option(
        "--verify",
        help=f"Check the prepared copies of the current weights (${WEIGHTS_ENV}, else the default) against their "
        "checksums in full; delete the damaged.")] = False,
    verify_all: Annotated[bool, typer.Option(
        "--all", help="With --verify: every prepared copy in the cache, whatever weights it came from.")] = False,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Also time a small matmul per dtype on the CPU (well under a second) and show its "
        "speed relative to fp32.")] = False,
) -> None:
    """Show the version, where weights are cached (and whether they are), devices, their native dtypes and
    library versions.

    A dtype is native when the device's own arithmetic runs it; on CPUs without AVX-512 BF16 or AMX,
    bf16 and fp16 run through a fallback tens to hundreds of times slower than fp32. Never touches the network.
    """
    from ..environment import environment_info

    if verify_all and not verify:
        raise fail("--all goes with --verify: mps info --verify --all", Exit.USAGE)
    with handle_errors(), output.Progress(force=True) as progress:
        doc = environment_info(probe=probe, verify=verify, verify_all=verify_all,
                               progress=progress.stage_callback).to_dict()
    if as_json:
        emit_json(doc)
        return
    output.emit_lines(_info_lines(doc))


def _info_lines(doc: dict) -> list[str]:
    w = doc["weights"]
    lines = [
        f"{doc['distribution']} {doc['version']} (python {doc['python']})",
        f"cache: {doc['cache_dir']}" + ("  [offline]" if doc["offline"] else f"  (from {doc['endpoint']})"),
        f"weights: {w['source']}" + (f" = {w['uri']}" if w.get("uri") else ""),
    ]
    if w["cached"] and w.get("hub"):
        lines.append(f"  cached at {w['path']}")
        lines.append(f"  config: {w.get('config') or 'not cached (built-in ViT-H-14 is used)'}")
    elif w["cached"]:
        lines.append("  local file, found")  # a local file is not in any cache: 'cached at' misled
    elif w.get("hub"):
        lines.append(f"  not cached: run `mps download {w['uri']}` on a connected machine")
    else:
        lines.append("  local file not found")
    if w.get("demo"):
        lines.append(f"  {DEMO_NOTE.format(kind=w['demo'])}")
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
    return lines


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
        metavar="SRC", help="The checkpoint: the authors' MPS_overall_checkpoint.pth (a pickled module), a state-dict "
        ".pth, or a .safetensors under an 'mps.'/'module.' prefix.", show_default=False)],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output .safetensors file.", show_default=False)],
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", help="Cast floating tensors to fp32, fp16 or bf16 (default: keep them).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace DST if it exists.")] = False,
    as_json: AsJson = False,
) -> None:
    """Convert a checkpoint to the published safetensors layout, reading pickles without running their code.

    The output loads with --weights and scores as the source does. A failed conversion leaves
    no output file, and an existing DST is kept unless --force is given.
    """
    if dst.suffix.lower() != ".safetensors":
        raise BadValue("a file name ending in .safetensors", str(dst), flag="DST")
    if dtype is not None and _storage_dtype(dtype) is None:
        raise BadValue("one of fp32, fp16, bf16", dtype, flag="--dtype")
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
    output.say(f"converted {src} -> {result.dst}")
    output.emit_lines([f"path: {result.dst}", f"tensors: {result.tensors}",
                       f"size: {result.bytes} bytes ({human_size(result.bytes)})", f"dtype: {result.dtype}"])


def _storage_dtype(spec: str) -> str | None:
    from ..devices import DTYPES, parse_dtype
    from ..errors import DeviceError

    try:
        name = parse_dtype(spec)
    except DeviceError:
        return None
    return name if name in DTYPES else None


__all__ = ["convert", "download", "info"]
