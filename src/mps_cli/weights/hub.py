"""The one module that talks to the Hugging Face Hub.

Downloads go through ``hf_hub_download`` into the standard cache, so ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean
everywhere else, concurrent processes are serialised by its file locks, and a download
whose connection drops resumes with a Range request. ``huggingface_hub`` reads its
environment at import time, so it is imported lazily here and nowhere else.

Every failure becomes a :class:`FetchError` (or :class:`CheckpointError` for a corrupt
file) whose message is one line naming the file and what to do.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, FetchError, MPSError
from .reader import file_sha256, read_safetensors_header

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


@dataclass(frozen=True)
class FetchedWeights:
    """A weights file in the local cache, checked, with the config.json that goes with it."""

    path: Path
    config_path: Path | None  # None: the repo has no config beside the weights (use the built-in one)
    commit: str | None
    downloaded: bool = False  # fetched by this call rather than found in the cache
    sha256: str | None = None  # known when this call downloaded and verified the file


def cache_dir() -> Path:
    """The Hub cache folder in use (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def is_offline(offline: bool | None = None) -> bool:
    """Offline when asked, or when ``HF_HUB_OFFLINE`` is set."""
    if offline:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_weights(f: HubFile) -> Path | None:
    """The cached copy of a Hub file for its revision, without touching the network."""
    return _cached(f.repo, f.filename, f.revision)


def fetch_weights(f: HubFile, offline: bool | None = None, check: bool = True) -> FetchedWeights:
    """The weights file (downloaded once, then from the cache) and its config.

    With ``check``, a safetensors file's header is validated here (callers that open the
    file next pass False: they validate it as they open it). Offline (``offline=True`` or
    ``HF_HUB_OFFLINE``), only the cache is read and nothing touches the network.
    """
    offline = is_offline(offline)
    before = cached_weights(f)
    path = _fetch(f, f.filename, f.revision, offline, what="weights")
    downloaded = before is None or before != path
    sha = _verify_download(f, path) if downloaded else None
    if check and path.suffix.lower() == ".safetensors":
        read_safetensors_header(path)
    commit = _commit_of(path)
    config_path = _fetch_config(f, commit, offline)
    return FetchedWeights(path=path, config_path=config_path, commit=commit, downloaded=downloaded, sha256=sha)


def config_filename(f: HubFile) -> str:
    """The config.json to use with a Hub file: the one named for it, else the one in its folder."""
    if f.config:
        return f.config
    folder = f.filename.rsplit("/", 1)[0] if "/" in f.filename else ""
    return f"{folder}/config.json" if folder else "config.json"


def _fetch_config(f: HubFile, commit: str | None, offline: bool) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    name = config_filename(f)
    revision = commit or f.revision
    found = try_to_load_from_cache(f.repo, name, revision=revision)
    if isinstance(found, str):
        return Path(found)
    if found is not None or offline:
        # Known to be absent at this commit, or unknowable offline: the built-in config is used,
        # and a mismatch with the weights is reported by name when they are loaded.
        return None
    try:
        return _fetch(f, name, revision, offline=False, what="config")
    except _NotThere:
        _remember_absent(f.repo, name, revision)
        return None


def _remember_absent(repo: str, filename: str, revision: str | None) -> None:
    """Let huggingface_hub record that a file is absent, so later runs need no network to know it."""
    from huggingface_hub import constants, hf_hub_download

    try:
        hf_hub_download(repo, filename, revision=revision, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:  # the expected outcome is a not-found error; the marker is what matters
        pass


class _NotThere(FetchError):
    """The file (not the repo) does not exist at that revision."""


def _cached(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:
        return None
    return Path(found) if isinstance(found, str) else None


def _fetch(f: HubFile, filename: str, revision: str | None, offline: bool, what: str) -> Path:
    from huggingface_hub import constants, hf_hub_download

    uri = HubFile(f.repo, filename, revision).uri
    if offline:
        path = _cached(f.repo, filename, revision)
        if path is None:
            raise FetchError(f"{uri}: {what} not in the cache ({cache_dir()}) and offline mode is on",
                             hint="download", uri=uri)
        return path
    if _cached(f.repo, filename, revision) is None:
        # hf_hub_download retries a failed metadata request for ~30 s when nothing is cached;
        # one quick request first turns a dead endpoint or a missing file into an answer now.
        _probe(f, filename, revision, uri, what)
    try:
        found = hf_hub_download(
            f.repo, filename, revision=revision, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except Exception as exc:  # huggingface_hub and its HTTP client raise many untyped errors
        raise _explain(exc, f, uri, revision, what) from None
    return Path(found)


def _probe(f: HubFile, filename: str, revision: str | None, uri: str, what: str) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    kwargs = {"timeout": constants.HF_HUB_ETAG_TIMEOUT}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False
    try:
        get_hf_file_metadata(hf_hub_url(f.repo, filename, revision=revision), **kwargs)
    except Exception as exc:  # as above
        raise _explain(exc, f, uri, revision, what) from None


def _network_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(timeouts, connection failures, cut transfers) of the HTTP clients huggingface_hub may use."""
    import ssl

    timeouts: list[type] = [TimeoutError]
    connects: list[type] = [ConnectionError, ssl.SSLError]
    cuts: list[type] = []
    # huggingface_hub may use httpx under its own name (httpx2) or the original.
    for client in ("httpx", "httpx2"):
        try:
            httpx = importlib.import_module(client)
        except ImportError:
            continue
        timeouts.append(httpx.TimeoutException)
        connects += [httpx.ConnectError, httpx.NetworkError, httpx.ProxyError]
        cuts.append(httpx.RemoteProtocolError)
    try:
        import requests

        timeouts.append(requests.exceptions.Timeout)
        connects += [requests.exceptions.ConnectionError, requests.exceptions.ProxyError, requests.exceptions.SSLError]
        cuts.append(requests.exceptions.ChunkedEncodingError)
    except ImportError:
        pass
    return tuple(timeouts), tuple(connects), tuple(cuts)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _root(exc: BaseException) -> BaseException:
    """The network error underneath huggingface_hub's 'cannot find it in the cache either' errors."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _explain(exc: BaseException, f: HubFile, uri: str, revision: str | None, what: str) -> MPSError:
    """One line for each way a fetch can fail: what went wrong with which file, and what to do."""
    from huggingface_hub import errors as hf

    rev = revision or "main"
    where = endpoint()

    if isinstance(exc, hf.HFValidationError):
        return CheckpointError(f"{uri}: not a valid Hub repository or file name ({_one_line(exc)})")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        root = _root(exc)
        if root is not exc:
            return _explain(root, f, uri, revision, what)
        return FetchError(
            f"{uri}: {what} not in the cache ({cache_dir()}) and the Hub at {where} could not be reached: "
            "check your connection", hint="weights", uri=uri)
    status = _status(exc)
    timeouts, connects, cuts = _network_errors()
    if isinstance(exc, hf.GatedRepoError):
        return FetchError(
            f"{uri}: {f.repo} is a gated repository: accept its terms at {where}/{f.repo} and set HF_TOKEN "
            "to a token of that account"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return FetchError(f"{uri}: revision {rev!r} not found in {f.repo}", hint="revision", uri=uri)
    if isinstance(exc, hf.EntryNotFoundError):
        return _NotThere(f"{uri}: {what} file {f.filename if what == 'weights' else uri} not found in "
                         f"{f.repo} at revision {rev}: check the path in the repository")
    if isinstance(exc, hf.RepositoryNotFoundError) or status == 401:
        return FetchError(
            f"{uri}: repository {f.repo} not found at {where}, or it is private (HTTP {status or 404}): "
            "check the name, or set HF_TOKEN to a token that can read it"
        )
    if status == 403:
        return FetchError(f"{uri}: access to {f.repo} denied (HTTP 403): set HF_TOKEN to a token that can read it")
    if status == 404:
        return _NotThere(f"{uri}: not found at {where} (HTTP 404): check the repository and path")
    if status is not None and status >= 500:
        return FetchError(f"{uri}: the Hub at {where} failed (HTTP {status}): try again later",
                          hint="weights", uri=uri)
    if status is not None:
        return FetchError(f"{uri}: the Hub at {where} refused the request (HTTP {status})")
    if isinstance(exc, timeouts):
        return FetchError(
            f"{uri}: timed out talking to {where}: check your connection (HF_HUB_ETAG_TIMEOUT and "
            "HF_HUB_DOWNLOAD_TIMEOUT set the limits)", hint="offline", uri=uri)
    if isinstance(exc, connects):
        return FetchError(
            f"{uri}: cannot connect to {where} ({_one_line(exc)}): check your connection or HF_ENDPOINT",
            hint="offline-or-weights", uri=uri)
    if isinstance(exc, cuts) or "Consistency check failed" in str(exc):
        return FetchError(f"{uri}: the download was cut short ({_got_of(exc)}); nothing was kept: "
                          "run the command again")
    if isinstance(exc, hf.FileMetadataError):
        return FetchError(f"{uri}: {where} does not answer like a Hugging Face Hub ({_one_line(exc)}): "
                          "check HF_ENDPOINT")
    if isinstance(exc, OSError):
        return FetchError(f"{uri}: could not store the download in {cache_dir()} ({_one_line(exc)})")
    return FetchError(f"{uri}: download failed ({type(exc).__name__}: {_one_line(exc)})")


def _got_of(exc: BaseException) -> str:
    text = str(exc)
    m = (re.search(r"should be of size (\d+) but has size (\d+)", text)
         or re.search(r"received (\d+) bytes, expected (\d+)", text))
    if m is None:
        return _one_line(exc)
    a, b = int(m[1]), int(m[2])
    got, total = (b, a) if "should be of size" in text else (a, b)
    return f"got {got:,} of {total:,} bytes"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("…" if len(text) > 200 else "") if text else type(exc).__name__


def _commit_of(path: Path) -> str | None:
    parts = path.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _COMMIT.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def _verify_download(f: HubFile, path: Path) -> str | None:
    """Hash a fresh download and compare it with the Hub's LFS ETag (the file's SHA-256), when it is one.

    huggingface_hub checks only the size; a server that sends the right number of wrong
    bytes would otherwise leave a bad file in the cache for every later run.
    """
    blob = path.resolve()
    if not _SHA256.fullmatch(blob.name):
        return None
    actual = file_sha256(path)
    if actual != blob.name:
        for p in (path, blob):
            try:
                os.unlink(p)
            except OSError:
                pass
        raise FetchError(
            f"{f.uri}: the downloaded file's sha256 ({actual[:12]}…) does not match the Hub's "
            f"({blob.name[:12]}…); it was deleted: run the command again"
        )
    return actual
