"""Yes/no environment variables (``MPS_DEBUG``, ``MPS_PREPARED_WEIGHTS``): one parser, one set of spellings."""

from __future__ import annotations

import os

#: Spellings of "no", whatever the case: ``MPS_DEBUG=false`` turns debugging off, as ``0`` does.
FALSE_SPELLINGS = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the switch ``$name`` is on: unset or blank is ``default``; 0, false, no, off (any case) are off;
    anything else (1, true, yes, on, ...) is on."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in FALSE_SPELLINGS


__all__ = ["FALSE_SPELLINGS", "env_flag"]
