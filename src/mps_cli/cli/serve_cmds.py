"""``mps serve``: load the model once and score for many clients over HTTP."""

from __future__ import annotations

import importlib.util
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from ..constants import (
    DISTRIBUTION,
    SERVE_DEFAULT_PORT,
    SERVE_MAX_BATCH,
    SERVE_MAX_BODY_BYTES,
    SERVE_MAX_IMAGE_PIXELS,
    SERVE_MAX_QUEUE,
    SERVE_MAX_WAIT_MS,
    SERVE_READ_TIMEOUT_S,
    SERVE_TOKEN_ENV,
)
from ..engine.options import ModelOptions
from . import output
from .app import Exit, exit_help, fail, load_model
from .options import MODEL, RUN, RunOptions, takes

EXITS = exit_help({Exit.OK: "stopped by SIGTERM or Ctrl-C, the requests in flight answered",
                   Exit.USAGE: "bad usage, the serve extra missing, or the port taken"}, codes=(Exit.RESOURCE,
                                                                                                Exit.FETCH,
                                                                                                Exit.INTERNAL),
                   server=False)
INSTALL_HINT = f"`mps serve` needs the serve extra: pip install '{DISTRIBUTION}[serve]'"
_NEEDS = ("starlette", "uvicorn", "python_multipart")


def _missing() -> list[str]:
    return [m for m in _NEEDS if importlib.util.find_spec(m) is None]


@takes(MODEL, RUN)
def serve(
    host: Annotated[str, typer.Option("--host", metavar="HOST", rich_help_panel="Server",
                                      help="Address to bind. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, metavar="PORT", rich_help_panel="Server",
                                      help="Port to listen on.")] = SERVE_DEFAULT_PORT,
    token: Annotated[str | None, typer.Option(
        "--token", envvar=SERVE_TOKEN_ENV, show_envvar=True, metavar="TOKEN", rich_help_panel="Server",
        help="Require 'Authorization: Bearer TOKEN' on every call but /healthz.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, rich_help_panel="Batching",
                                           help="Most images in one model batch.")] = SERVE_MAX_BATCH,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0.0, metavar="MS", rich_help_panel="Batching",
        help="Longest wait for a batch to fill after its first image arrives.")] = SERVE_MAX_WAIT_MS,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, rich_help_panel="Batching",
        help="Images waiting for the model before requests are answered 503.")] = SERVE_MAX_QUEUE,
    max_body_mb: Annotated[float, typer.Option(
        "--max-body-mb", min=0.001, metavar="MIB", rich_help_panel="Limits",
        help="Largest request body, in MiB.")] = SERVE_MAX_BODY_BYTES / 2**20,
    max_image_mpx: Annotated[float, typer.Option(
        "--max-image-mpx", min=0.000001, metavar="MPX", rich_help_panel="Limits",
        help="Largest image, in megapixels; bigger ones are refused from their header.")]
    = SERVE_MAX_IMAGE_PIXELS / 1e6,
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", min=0.1, metavar="SECONDS", rich_help_panel="Limits",
        help="Seconds a client has to send a request's headers, and again its body; a slower one gets 408.")]
    = SERVE_READ_TIMEOUT_S,
    allow_dir: Annotated[Path | None, typer.Option(
        "--allow-dir", metavar="DIR", rich_help_panel="Limits",
        help="Also accept {\"path\": ...} images, read from this folder only (symlinks and .. resolved).")] = None,
    *, model: ModelOptions, run: RunOptions,
) -> None:
    """Serve the scorer over HTTP: POST /v1/score, POST /v1/batch, POST /v1/compare, GET /v1/info, GET /healthz.

    The model loads once; images from concurrent requests share model batches.
    SIGTERM or Ctrl-C stops taking requests, finishes those in flight, and exits 0.
    One log line per request on stderr.
    """
    missing = _missing()
    if missing:
        raise fail(f"{INSTALL_HINT} (missing: {', '.join(missing)})", Exit.USAGE)
    from ..server import ServeOptions
    from ..server import serve as run_server

    _check_access(host, port, token, allow_dir)
    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=int(max_image_mpx * 1e6),
                           token=token, allow_dir=allow_dir, read_timeout=read_timeout)
    _log_requests()
    scorer = load_model(model)
    scorer.batch_size = run.batch_for(scorer)  # this process serves one model: its batch size is the server's
    output.say(f"{scorer.weights} on {scorer.device}; listening on http://{_url_host(host)}:{port}"
               + (" (token required)" if token else ""), who="mps serve")
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then re-raises the signal it caught; with
    # the default dispositions that would kill (or interrupt) the process after a clean shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    run_server(scorer, host, port, options, log_level="warning")
    output.say("stopped", who="mps serve")
    raise typer.Exit(int(Exit.OK))


def _check_access(host: str, port: int, token: str | None, allow_dir: Path | None) -> None:
    """Refuse, before the slow model load, what would expose the scorer or cannot work."""
    from ..server import is_loopback

    if token is not None and not token.strip():
        raise typer.BadParameter("the token is empty", param_hint="--token")
    if token is None and not is_loopback(host):
        raise fail(f"--host {host} would expose the scorer beyond this machine without a token; "
                   f"set --token (or {SERVE_TOKEN_ENV}), or bind 127.0.0.1", Exit.USAGE)
    if allow_dir is not None and not allow_dir.is_dir():
        raise typer.BadParameter(f"{allow_dir} is not a folder", param_hint="--allow-dir")
    _check_port_free(host, port)


def _log_requests() -> None:
    """The server's request log on stderr, one ``mps serve: ...`` line per request."""
    logger = logging.getLogger("mps_cli.server")
    logger.addHandler(output.LogLines(who="mps serve"))
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its lines are the request log, not library notices


def _check_port_free(host: str, port: int) -> None:
    """Fail before the slow model load if the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise fail(f"--host {host}: {exc}", Exit.USAGE) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port", Exit.USAGE) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
