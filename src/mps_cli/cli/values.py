"""What a flag's value must be, said in one voice for every command:
``--top must be a whole number of at least 1 (got 0)``: the flag, the rule, what was given.

Numbers and choices declared the Typer way (``int``, ``float``, an ``Enum``, ``min=``/``max=``) get their
rule from :func:`rule_for`; a check of our own (a callback or a parser) raises :class:`BadValue` with its rule.
Nothing here imports torch.
"""

from __future__ import annotations

import re
from enum import Enum

import typer

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


class BadValue(typer.BadParameter):
    """A flag's value broke its rule. ``rule`` completes "--FLAG must be ..."; ``got`` is what was given;
    ``flag`` names it where Typer does not know the parameter (a check inside a command)."""

    def __init__(self, rule: str, got: object, *, flag: str | None = None) -> None:
        super().__init__(rule, param_hint=flag)
        self.rule, self.got = rule, got

    def format_message(self) -> str:
        return f"{flag_of(self)} must be {self.rule} (got {shown(self.got)})"


def shown(value: object) -> str:
    """A given value as the message echoes it: a number bare, anything else quoted (control characters escaped)."""
    if isinstance(value, Enum):
        value = value.value
    text = str(value)
    return text if _NUMBER.fullmatch(text) else repr(text)


def flag_of(exc: typer.BadParameter) -> str:
    """The flag a usage error is about: its long option (``--top``), an argument's name (``BENCHMARK``),
    or the ``param_hint`` the raiser gave."""
    if exc.param_hint is not None:
        return exc.param_hint if isinstance(exc.param_hint, str) else " / ".join(exc.param_hint)
    param = exc.param
    if param is None:
        return "a value"
    if getattr(param, "param_type_name", None) == "option":
        return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return param.metavar or (param.name or "value").upper()


def _number(value: float) -> str:
    # 0.000001, not Python's 1e-06; 0, not 0.0.
    return f"{value:.12f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def rule_for(param) -> str | None:
    """The rule of a Typer-declared number or choice parameter (its type, ``min``, ``max``), or None."""
    desc = param.type_descriptor
    if desc.is_choice:
        return "one of " + ", ".join(str(c.value if isinstance(c, Enum) else c) for c in desc.choices or ())
    kind = {int: "a whole number", float: "a number"}.get(desc.annotation)
    if kind is None:
        return None
    limits = bounds(desc.parameter_info.min, desc.parameter_info.max)
    if not limits:
        return kind
    return f"{kind} {limits}" if limits.startswith("from") else f"{kind} of {limits}"


def bounds(low: float | None, high: float | None) -> str:
    """``min=``/``max=`` in words, as errors and help both say them: "at least 1", "from 1 to 65535"."""
    if low is not None and high is not None:
        return f"from {_number(low)} to {_number(high)}"
    if low is not None:
        return f"at least {_number(low)}"
    if high is not None:
        return f"at most {_number(high)}"
    return ""


def usage_message(exc: typer.TyperException) -> str:
    """One line for a usage error Typer raised: a bad value in the voice above, anything else (an unknown
    option, a missing argument) Typer's words with where to look, ``(see 'mps rank --help')``."""
    if isinstance(exc, BadValue):
        return exc.format_message()
    if type(exc) is typer.BadParameter:  # a free-form check of ours: the flag, then what is wrong
        message = f"{flag_of(exc)}: {exc.message}"
    else:
        message = exc.format_message()
    message = " ".join(message.split())
    if not message:  # no_args_is_help: the help is already printed
        return ""
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see '{ctx.command_path if ctx is not None else 'mps'} --help')"
