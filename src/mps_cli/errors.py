"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class MPSError(Exception):
    """Base class of every error this package raises on purpose.

    ``hint`` names what a user could change (``"config"``, ``"weights"``, ``"offline"``, ...)
    without naming how: the CLI turns it into the flag to use, other callers may ignore it.
    ``uri`` is the Hub source the error is about, where there is one; ``model`` the judge (``hpsv2.1``, ...)
    whose weights it is about, None for MPS's own.
    """

    def __init__(self, *args, hint: str | None = None, uri: str | None = None, model: str | None = None):
        super().__init__(*args)
        self.hint = hint
        self.uri = uri
        self.model = model


class ConfigError(MPSError):
    """An architecture config is unreadable or inconsistent."""


class CheckpointError(MPSError):
    """A weights file is unreadable, truncated, or does not fit the architecture."""


class UnsafePickleError(CheckpointError):
    """A pickle asked to run code or to import something that is not plain data."""


class DeviceError(MPSError):
    """A requested device or dtype is unknown or unavailable."""


class InputError(MPSError):
    """A bad image, prompt or prompt file: affects one input, not the run."""


class DimensionError(InputError, ValueError):
    """A dimension that is not one of MPS's (or not one this scorer or reward scores), an empty custom
    condition, or none at all.

    A ``ValueError`` too, so callers that caught the bare error before keep working.
    """


class PromptCountError(InputError, ValueError):
    """The prompts given do not match the images one for one."""

    def __init__(self, images: int, prompts: int):
        super().__init__(f"{images} images but {prompts} prompts: give one prompt, or one per image")
        self.images = images
        self.prompts = prompts


class ImageError(InputError):
    """An image could not be read."""


class PromptError(InputError):
    """A prompt or prompt file could not be read."""


class CompositeError(InputError):
    """A composite reward expression (``overall+0.5*alignment``) is malformed or names an unknown term."""


class FetchError(MPSError):
    """Weights could not be fetched (network, missing file, offline without cache)."""


class ResultsError(InputError):
    """A results file or dataset folder given to the report could not be read."""


class ReportError(MPSError):
    """The report could not be written."""
class ServerError(FetchError):
    """A scoring server could not be reached, refused the request, or answered nonsense."""
class ShardSelectionError(InputError, ValueError):
    """A worker's share of the shards is ill-formed: ``index`` without ``count`` (or the other way), a
    ``count`` below 1, or an ``index`` outside ``0..count-1``. A ``ValueError`` too, as it was before."""

    def __init__(self, index: int | None, count: int | None):
        if index is None or count is None:
            message = "a shard index needs the number of shards, and the number of shards an index"
        elif count < 1:
            message = f"the number of shards must be at least 1, not {count}"
        else:
            message = f"shard index {index} is not in 0..{count - 1}"
        super().__init__(message)
        self.index = index
        self.count = count


class ShardError(InputError):
    """A dataset shard (tar or parquet) is missing, truncated or unreadable: that shard is skipped."""


class OutputError(MPSError):
    """An output folder cannot be used: not writable, or it holds results made with other settings."""


class ForeignFolderError(OutputError):
    """A folder to write into already holds files this package did not write there: it is left alone."""


class MissingExtraError(MPSError):
    """An optional dependency is not installed; the message says which extra to install."""


class EngineError(MPSError):
    """The distributed engine (Ray) could not start or failed while running the job."""
