"""The JSONPath subset used by printer columns and selectable fields.

Kubernetes evaluates CRD ``additionalPrinterColumns`` with client-go's ``jsonpath`` package, with
missing keys allowed. This module implements the part of that language those paths use:

* ``.a.b`` fields (``\\.`` escapes a dot inside a name) and ``['a.b']`` / ``["a.b"]`` quoted keys;
* ``[0]``, ``[-1]``, ``[1:3]`` indexes and slices, ``[*]`` for every item of a list;
* ``.*`` for every value of a map (in key order) or item of a list;
* ``..name`` recursive descent;
* filters ``[?(@.type=='Ready')]`` with ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` against
  string, number and boolean literals (or another ``@`` path), and ``[?(@.x)]`` for existence.

A path may be wrapped in ``{...}`` and may start with ``$``. Syntax errors raise :class:`ValueError`
when the path is compiled. Evaluation never raises: as in client-go, a missing key yields no
result, and a runtime error (an index out of range, a filter over a map, comparing a string with a
number) makes the whole evaluation yield no result.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["JSONPath", "compile_path", "evaluate", "first"]


class _EvalError(Exception):
    """A runtime failure; the evaluation as a whole yields nothing."""


# ---- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str

    def apply(self, value: Any, out: list[Any]) -> None:
        if isinstance(value, dict) and self.name in value:
            out.append(value[self.name])


@dataclass(frozen=True)
class _Wildcard:
    """``.*``: the values of a map (sorted by key) or the items of a list."""

    def apply(self, value: Any, out: list[Any]) -> None:
        if isinstance(value, dict):
            out.extend(value[k] for k in sorted(value))
        elif isinstance(value, list):
            out.extend(value)


@dataclass(frozen=True)
class _Slice:
    """``[i]``, ``[a:b]`` and ``[*]`` (``start`` and ``end`` both unknown)."""

    start: int | None
    end: int | None
    single: bool = False

    def apply(self, value: Any, out: list[Any]) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            raise _EvalError("not an array or slice")
        length = len(value)
        start = 0 if self.start is None else self.start
        if start < 0:
            start += length
        if self.single:
            end = (self.start if self.start is not None else 0) + 1
            if end <= 0:  # [-1]: the derived end wraps like the start
                end += length
        else:
            end = length if self.end is None else self.end
            if end < 0:
                end += length
        if start == end:
            return
        if start >= length or start < 0:
            raise _EvalError(f"array index out of bounds: index {start}, length {length}")
        if end > length or end < 0:
            raise _EvalError(f"array index out of bounds: index {end - 1}, length {length}")
        if start > end:
            raise _EvalError(f"starting index {start} is greater than ending index {end}")
        out.extend(value[start:end])


@dataclass(frozen=True)
class _Recursive:
    """``..``: the value and everything below it, depth first."""

    def apply(self, value: Any, out: list[Any]) -> None:
        out.append(value)
        if isinstance(value, dict):
            for k in sorted(value):
                self.apply(value[k], out)
        elif isinstance(value, list):
            for item in value:
                self.apply(item, out)


@dataclass(frozen=True)
class _Literal:
    value: str | int | float | bool


@dataclass(frozen=True)
class _Filter:
    left: JSONPath | _Literal
    op: str  # "exists" or a comparison operator
    right: JSONPath | _Literal | None

    def apply(self, value: Any, out: list[Any]) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            raise _EvalError("not an array or slice and cannot be filtered")
        for item in value:
            lefts = _operand(self.left, item)
            if self.op == "exists":
                if lefts:
                    out.append(item)
                continue
            if not lefts:
                continue
            if len(lefts) > 1:
                raise _EvalError("can only compare one element at a time")
            assert self.right is not None
            rights = _operand(self.right, item)
            if not rights:
                continue
            if len(rights) > 1:
                raise _EvalError("can only compare one element at a time")
            if _compare(self.op, lefts[0], rights[0]):
                out.append(item)


_Step = _Field | _Wildcard | _Slice | _Recursive | _Filter


def _operand(operand: JSONPath | _Literal, item: Any) -> list[Any]:
    if isinstance(operand, _Literal):
        return [operand.value]
    return operand.find(item)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "other"


_ORDERED: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}


def _compare(op: str, a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb or ka == "other":
        raise _EvalError("incompatible types for comparison")
    if op == "==":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if ka == "bool":
        raise _EvalError("invalid type for comparison")
    return _ORDERED[op](a, b)


# ---- compiled paths -------------------------------------------------------------------------


@dataclass(frozen=True)
class JSONPath:
    """A compiled path; :meth:`find` evaluates it against a JSON-like value."""

    source: str
    steps: tuple[_Step, ...]

    def find(self, obj: Any) -> list[Any]:
        """Every value the path selects, in order; ``[]`` for none or on a runtime error."""
        try:
            return self._run(obj)
        except _EvalError:
            return []

    def _run(self, obj: Any) -> list[Any]:
        current = [obj]
        for step in self.steps:
            nxt: list[Any] = []
            for value in current:
                step.apply(value, nxt)
            current = nxt
        return current


def compile_path(path: str) -> JSONPath:
    """Parse ``path``; raise :class:`ValueError` with a reason if it is not valid."""
    return _compile_cached(path)


@functools.lru_cache(maxsize=1024)
def _compile_cached(path: str) -> JSONPath:
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if text.startswith("$"):
        text = text[1:]
    if not text:
        raise ValueError(f"invalid JSONPath {path!r}: empty path")
    if text[0] not in ".[":
        raise ValueError(f"invalid JSONPath {path!r}: a path starts with '.' or '['")
    return JSONPath(path, _Parser(text, path).steps())


def evaluate(obj: Any, path: str) -> list[Any]:
    """Every value ``path`` selects in ``obj`` (``[]`` if none)."""
    return compile_path(path).find(obj)


def first(obj: Any, path: str) -> Any | None:
    """The first value ``path`` selects in ``obj``, or ``None``."""
    found = compile_path(path).find(obj)
    return found[0] if found else None


# ---- parser ---------------------------------------------------------------------------------

_NAME_STOP = frozenset(".[](){}@=!<>,'\" \t\r\n")
_INT = re.compile(r"^\s*-?\d+\s*$")
_NUMBER = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")


class _Parser:
    def __init__(self, text: str, original: str) -> None:
        self.text = text
        self.original = original
        self.pos = 0

    def fail(self, why: str) -> ValueError:
        return ValueError(f"invalid JSONPath {self.original!r}: {why}")

    def steps(self) -> tuple[_Step, ...]:
        text, out = self.text, list[_Step]()
        if text == ".":
            return ()
        while self.pos < len(text):
            c = text[self.pos]
            if c == ".":
                if text.startswith("..", self.pos):
                    self.pos += 2
                    out.append(_Recursive())
                    if self.pos >= len(text):
                        raise self.fail("'..' must be followed by a name, '*' or '['")
                    if text[self.pos] == "[":
                        continue
                else:
                    self.pos += 1
                if self.pos < len(text) and text[self.pos] == "*":
                    self.pos += 1
                    out.append(_Wildcard())
                else:
                    out.append(_Field(self.name()))
            elif c == "[":
                out.append(self.bracket())
            else:
                raise self.fail(f"unexpected {c!r} at offset {self.pos}")
        return tuple(out)

    def name(self) -> str:
        text, chars = self.text, list[str]()
        while self.pos < len(text):
            c = text[self.pos]
            if c == "\\" and self.pos + 1 < len(text):
                chars.append(text[self.pos + 1])
                self.pos += 2
                continue
            if c in _NAME_STOP:
                break
            chars.append(c)
            self.pos += 1
        if not chars:
            raise self.fail(f"missing field name at offset {self.pos}")
        return "".join(chars)

    def bracket(self) -> _Step:
        end = _closing(self.text, self.pos)
        if end < 0:
            raise self.fail(f"unclosed '[' at offset {self.pos}")
        inner = self.text[self.pos + 1 : end].strip()
        self.pos = end + 1
        if inner.startswith("?"):
            body = inner[1:].strip()
            if not (body.startswith("(") and body.endswith(")")):
                raise self.fail(f"a filter is written [?(...)], got [{inner}]")
            return self.filter(body[1:-1].strip())
        if inner[:1] in ("'", '"'):
            key, rest = _quoted(inner)
            if key is None or rest.strip():
                raise self.fail(f"bad quoted key [{inner}]")
            return _Field(key)
        if inner == "*":
            return _Slice(None, None)
        return self.slice(inner)

    def slice(self, inner: str) -> _Slice:
        parts = inner.split(":")
        if len(parts) > 2:
            raise self.fail(f"slice steps are not supported: [{inner}]")
        if len(parts) == 1:
            if not _INT.match(parts[0]):
                raise self.fail(f"bad array index [{inner}]")
            return _Slice(int(parts[0]), None, single=True)
        bounds: list[int | None] = []
        for part in parts:
            if not part.strip():
                bounds.append(None)
            elif _INT.match(part):
                bounds.append(int(part))
            else:
                raise self.fail(f"bad array slice [{inner}]")
        return _Slice(bounds[0], bounds[1])

    def filter(self, expr: str) -> _Filter:
        found = _split_operator(expr)
        if found is None:
            left = self.operand(expr)
            if not isinstance(left, JSONPath):
                raise self.fail(f"an existence filter needs an @ path: {expr!r}")
            return _Filter(left, "exists", None)
        left_text, op, right_text = found
        return _Filter(self.operand(left_text), op, self.operand(right_text))

    def operand(self, text: str) -> JSONPath | _Literal:
        text = text.strip()
        if not text:
            raise self.fail("empty operand in filter")
        if text.startswith("@"):
            rest = text[1:]
            if not rest:
                return JSONPath("@", ())
            if rest[0] not in ".[":
                raise self.fail(f"bad path {text!r} in filter")
            return JSONPath(text, _Parser(rest, self.original).steps())
        if text[0] in ("'", '"'):
            value, rest = _quoted(text)
            if value is None or rest.strip():
                raise self.fail(f"bad string literal {text!r}")
            return _Literal(value)
        if text in ("true", "false"):
            return _Literal(text == "true")
        if _NUMBER.match(text):
            if re.fullmatch(r"-?\d+", text):
                return _Literal(int(text))
            return _Literal(float(text))
        raise self.fail(f"unrecognized operand {text!r} in filter")


def _quoted(text: str) -> tuple[str | None, str]:
    """A quoted string at the start of ``text`` and what follows it."""
    quote, chars, i = text[0], list[str](), 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if c == quote:
            return "".join(chars), text[i + 1 :]
        chars.append(c)
        i += 1
    return None, ""


def _closing(text: str, start: int) -> int:
    """Index of the ``]`` matching the ``[`` at ``start`` (quotes and nesting aware), or -1."""
    depth, quote, i = 0, "", start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in ("'", '"'):
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth == 0:
                return i if c == "]" else -1
        i += 1
    return -1


def _split_operator(expr: str) -> tuple[str, str, str] | None:
    """Split a filter at its first comparison operator outside quotes and brackets."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in ("'", '"'):
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif depth == 0:
            for op in _OPERATORS:
                if expr.startswith(op, i):
                    return expr[:i], op, expr[i + len(op) :]
        i += 1
    return None
