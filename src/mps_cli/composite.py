"""Composite rewards: a weighted sum of result keys, spelled ``overall+0.5*alignment`` or
``0.7*mps.overall+0.3*hpsv2.1``, the same everywhere (``load_reward``, ``--reward``, the server's
``reward`` field, ``mps versus``).

The grammar is a small linear one, parsed here (never ``eval``): numbers, names (a dimension,
``custom``, ``mps.<dim>``, a judge), ``+``, ``-``, ``*``, ``/`` by a number, unary minus and
parentheses. Whatever the spelling, an expression reduces to ``sum(weight * key) + constant``, so
applied to score tensors it stays differentiable. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .constants import CUSTOM_KEY, DIMENSIONS, JUDGES, MPS_MODEL
from .errors import CompositeError

#: The key a composite reward's value has beside the scores it is made of (versus, reports).
COMPOSITE_KEY = "composite"
#: Longest expression accepted (a server parses what clients send).
MAX_EXPRESSION = 1000
MAX_DEPTH = 32

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(?P<op>[-+*/()]))")


@dataclass(frozen=True)
class Composite:
    """``sum(weight * scores[name]) + constant``: ``weights`` in order of first appearance, each name once."""

    text: str
    weights: tuple[tuple[str, float], ...]
    constant: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.weights)

    @property
    def spelling(self) -> str:
        """The canonical spelling: ``overall + 0.5*alignment``."""
        parts: list[str] = []
        for name, w in self.weights:
            sign, mag = ("-" if w < 0 else "+"), abs(w)
            body = name if mag == 1 else f"{mag:g}*{name}"
            parts.append((sign if sign == "-" else "") + body if not parts else f" {sign} {body}")
        if self.constant or not parts:
            c = self.constant
            parts.append(f"{c:g}" if not parts else f" {'-' if c < 0 else '+'} {abs(c):g}")
        return "".join(parts)

    def value(self, scores: Mapping):
        """The composite of one result's ``scores`` (floats), or of B score tensors (differentiable)."""
        total = self.constant
        for name, w in self.weights:
            total = total + w * scores[name]
        return total

    def terms(self, scores: Mapping) -> dict:
        """Each term's own (unweighted) score."""
        return {name: scores[name] for name in self.names}

    def bind(self, keys: Sequence[str]) -> Composite:
        """The same expression with every name spelled as one of ``keys`` (``overall`` is ``mps.overall`` where
        several models score, and the reverse); raises CompositeError naming a term that is not among them."""
        keys = list(keys)
        out: dict[str, float] = {}
        for name, w in self.weights:
            key = _key_for(name, keys)
            if key is None:
                raise CompositeError(f"reward term {name!r} of {self.text!r} is not among the scores "
                                     f"({', '.join(keys) or 'none'})", hint="reward")
            out[key] = out.get(key, 0.0) + w
        return replace(self, weights=tuple(out.items()))

    def request(self, models: Sequence[str] | None, dims: Iterable[str] | None, condition: str | None
                ) -> tuple[list[str] | None, list[str] | None]:
        """(models, dims) to score so that every term has a score: the dimensions given plus those the
        expression names; without ``models``, the judges it names (MPS first, if it names MPS too).
        Raises CompositeError for a term no model gives, a judge not among ``models``, or ``custom``
        without a condition."""
        dims = None if dims is None else ([dims] if isinstance(dims, str) else list(dims))
        wanted_dims: list[str] = []
        judges: list[str] = []
        for name in self.names:
            model, dim = split_name(name)
            if model is None:
                raise CompositeError(f"unknown reward term {name!r} in {self.text!r}: expected a dimension "
                                     f"({', '.join(DIMENSIONS)}), {CUSTOM_KEY}, mps.<dimension> or a model "
                                     f"({', '.join(JUDGES)})", hint="reward")
            if model != MPS_MODEL:
                judges.append(model)
            elif dim == CUSTOM_KEY:
                if condition is None:
                    raise CompositeError(f"reward term {name!r} needs a custom condition text", hint="condition")
            elif dim not in wanted_dims:
                wanted_dims.append(dim)
        if models is None and judges:
            models = ([MPS_MODEL] if wanted_dims or any(split_name(n)[1] == CUSTOM_KEY for n in self.names)
                      else []) + list(dict.fromkeys(judges))
        elif models is not None:
            names = [m.partition("=")[0].strip().lower() for m in models]
            lacking = [j for j in judges if j not in names]
            if wanted_dims and MPS_MODEL not in names:
                lacking.insert(0, MPS_MODEL)
            if lacking:
                raise CompositeError(f"reward {self.text!r} needs {', '.join(dict.fromkeys(lacking))} among the "
                                     f"models ({', '.join(names)})", hint="model")
            models = list(models)
        if wanted_dims:
            given = dims or []
            extra = [d for d in wanted_dims if d not in given and "all" not in given]
            dims = [*given, *extra] if dims is not None else wanted_dims
        return models, dims


def split_name(name: str) -> tuple[str | None, str | None]:
    """(model, dimension) a term names: ``overall`` and ``mps.overall`` are (mps, overall), ``custom``
    (mps, custom), ``pickscore`` (pickscore, None); (None, None) for a name no model gives."""
    if name in JUDGES:
        return name, None
    dim = name.removeprefix(MPS_MODEL + ".")
    if dim in DIMENSIONS or dim == CUSTOM_KEY:
        return MPS_MODEL, dim
    return None, None


def _key_for(name: str, keys: list[str]) -> str | None:
    if name in keys:
        return name
    model, dim = split_name(name)
    if model == MPS_MODEL:
        for key in (dim, f"{MPS_MODEL}.{dim}"):
            if key in keys:
                return key
    return None


def parse_composite(text: str) -> Composite:
    """Parse ``text`` into a :class:`Composite`; raises CompositeError naming what is wrong and where."""
    if not isinstance(text, str) or not text.strip():
        raise CompositeError("the reward expression is empty", hint="reward")
    if len(text) > MAX_EXPRESSION:
        raise CompositeError(f"the reward expression is {len(text)} characters long (at most {MAX_EXPRESSION})",
                             hint="reward")
    tokens = _tokens(text)
    parser = _Parser(text, tokens)
    weights, constant = parser.expression(0)
    if parser.pos < len(tokens):
        raise parser.error(f"unexpected {tokens[parser.pos][1]!r}")
    if not weights:
        raise CompositeError(f"the reward {text!r} names no score", hint="reward")
    if not all(math.isfinite(w) for w in weights.values()) or not math.isfinite(constant):
        raise CompositeError(f"the reward {text!r} has a weight that is not a finite number", hint="reward")
    return Composite(text=text, weights=tuple(weights.items()), constant=constant)


def apply_composite(composite: Composite | None, results: list) -> list:
    """``ScoreResult`` s with ``composite`` and ``terms`` set (failed ones unchanged); ``composite`` is bound
    to the results' keys."""
    if composite is None:
        return results
    return [r if not r.ok else replace(r, composite=float(composite.value(r.scores)), terms=composite.terms(r.scores))
            for r in results]


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            at = len(text) - len(text[pos:].lstrip())
            raise CompositeError(f"cannot read the reward {text!r} at {text[at:at + 10]!r} (position {at + 1}): "
                                 "expected a number, a score's name, + - * / or parentheses", hint="reward")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over ``sum := prod (('+'|'-') prod)*``, ``prod := unary (('*'|'/') unary)*``,
    ``unary := ('+'|'-') unary | NUMBER | NAME | '(' sum ')'``; every value is linear: (weights, constant)."""

    def __init__(self, text: str, tokens: list[tuple[str, str, int]]):
        self.text, self.tokens, self.pos = text, tokens, 0

    def error(self, what: str) -> CompositeError:
        where = self.tokens[self.pos][2] + 1 if self.pos < len(self.tokens) else len(self.text)
        return CompositeError(f"cannot read the reward {self.text!r}: {what} (position {where})", hint="reward")

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "op" else None

    def expression(self, depth: int):
        if depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH}")
        weights, const = self.product(depth)
        while self._peek() in ("+", "-"):
            sign = 1.0 if self.tokens[self.pos][1] == "+" else -1.0
            self.pos += 1
            w2, c2 = self.product(depth)
            weights = _add(weights, w2, sign)
            const += sign * c2
        return weights, const

    def product(self, depth: int):
        weights, const = self.unary(depth)
        while self._peek() in ("*", "/"):
            at, op = self.pos, self.tokens[self.pos][1]
            self.pos += 1
            w2, c2 = self.unary(depth)
            if op == "/":
                if w2 or c2 == 0:
                    self.pos = at
                    raise self.error("division by a score is not a weighted sum" if w2 else "division by zero")
                weights, const = {k: v / c2 for k, v in weights.items()}, const / c2
            elif weights and w2:
                self.pos = at
                raise self.error("a product of two scores is not a weighted sum")
            elif weights:
                weights, const = {k: v * c2 for k, v in weights.items()}, const * c2
            else:
                weights, const = {k: v * const for k, v in w2.items()}, const * c2
        return weights, const

    def unary(self, depth: int):
        if self.pos >= len(self.tokens):
            raise self.error("it ends where a number or a name should come")
        kind, value, _ = self.tokens[self.pos]
        if kind == "op" and value in "+-":
            self.pos += 1
            weights, const = self.unary(depth + 1)
            return ({k: -v for k, v in weights.items()}, -const) if value == "-" else (weights, const)
        if kind == "op" and value == "(":
            self.pos += 1
            inner = self.expression(depth + 1)
            if self._peek() != ")":
                raise self.error("a parenthesis is not closed")
            self.pos += 1
            return inner
        if kind == "num":
            self.pos += 1
            return {}, float(value)
        if kind == "name":
            self.pos += 1
            return {value: 1.0}, 0.0
        raise self.error(f"unexpected {value!r}")


def _add(a: dict[str, float], b: dict[str, float], sign: float) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + sign * v
    return out


__all__ = ["COMPOSITE_KEY", "Composite", "apply_composite", "parse_composite", "split_name"]
