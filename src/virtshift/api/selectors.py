"""Label and field selectors, parsed and matched as kube-apiserver does.

Label selectors follow apimachinery's ``labels.Parse`` grammar::

    selector    ::= requirement ("," requirement)*
    requirement ::= ["!"] KEY [ ("in" | "notin") "(" VALUES ")"
                              | ("=" | "==" | "!=" | ">" | "<") VALUE ]

Field selectors are ``field=value``, ``field==value`` and ``field!=value`` terms joined by commas,
with ``\\``, ``,`` and ``=`` escaped by a backslash inside values. Which fields a kind accepts,
and the error for one it does not, depend on the kind exactly as upstream:

* custom resources: ``metadata.name``, ``metadata.namespace`` (namespaced kinds only) and the
  kind's ``selectable_fields``; otherwise ``field label not supported: F``;
* built-in kinds with their own field list (``selectable_fields`` set): that list plus
  ``metadata.name`` (and ``metadata.namespace`` when namespaced), with the same message;
* other built-in kinds: ``metadata.name`` and ``metadata.namespace`` only, otherwise
  ``"F" is not a known field selector: only "metadata.name", "metadata.namespace"``.

Every syntax or field error is a :class:`~virtshift.errors.BadRequest` carrying upstream's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from virtshift.api.kinds import KindInfo
from virtshift.errors import BadRequest

__all__ = [
    "EVERYTHING",
    "NOTHING",
    "FieldRequirement",
    "FieldSelector",
    "LabelSelector",
    "Requirement",
    "field_value",
    "label_selector_from_dict",
    "parse_field_selector",
    "parse_label_selector",
]

# ---- label key/value validation (apimachinery util/validation wording) ----------------------

_QNAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QNAME = re.compile(_QNAME_FMT)
_QNAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)
_LABEL_VALUE_FMT = f"({_QNAME_FMT})?"
_LABEL_VALUE = re.compile(_LABEL_VALUE_FMT)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character"
)
_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + "(\\." + _DNS1123_LABEL_FMT + ")*"
_DNS1123_SUBDOMAIN = re.compile(_DNS1123_SUBDOMAIN_FMT)
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character"
)


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    text = msg + " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            text += " or "
        text += f"'{example}', "
    return text + f"regex used for validation is '{fmt}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


def _blen(s: str) -> int:
    return len(s.encode())


def _qualified_name_errors(value: str) -> list[str]:
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            if _blen(prefix) > 253:
                errs.append("prefix part " + _max_len(253))
            if not _DNS1123_SUBDOMAIN.fullmatch(prefix):
                errs.append("prefix part " + _regex_error(
                    _DNS1123_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    else:
        return [
            "a qualified name "
            + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif _blen(name) > 63:
        errs.append("name part " + _max_len(63))
    if not _QNAME.fullmatch(name):
        errs.append("name part " + _regex_error(_QNAME_MSG, _QNAME_FMT, "MyName", "my.name",
                                                "123-abc"))
    return errs


def _label_value_errors(value: str) -> list[str]:
    errs: list[str] = []
    if _blen(value) > 63:
        errs.append(_max_len(63))
    if not _LABEL_VALUE.fullmatch(value):
        errs.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value",
                                 "12345"))
    return errs


def _go_quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _invalid(path: str, shown: str, detail: str) -> str:
    """A field.Invalid error rendered the way apimachinery prints it."""
    return f"{path}: Invalid value: {shown}: {detail}"


def _aggregate(errs: list[str]) -> str:
    unique = list(dict.fromkeys(errs))
    return unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"


# ---- requirements ---------------------------------------------------------------------------

EQUALS, DOUBLE_EQUALS, NOT_EQUALS = "=", "==", "!="
IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "in", "notin", "exists", "!"
GREATER_THAN, LESS_THAN = "gt", "lt"
_BINARY = (IN, NOT_IN, EQUALS, DOUBLE_EQUALS, NOT_EQUALS, GREATER_THAN, LESS_THAN)


def _int64(s: str) -> int | None:
    if not re.fullmatch(r"[+-]?\d+", s):
        return None
    n = int(s)
    return n if -(2**63) <= n < 2**63 else None


@dataclass(frozen=True)
class Requirement:
    """One label condition; ``operator`` is one of the constants above."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op, has = self.operator, self.key in labels
        if op in (IN, EQUALS, DOUBLE_EQUALS):
            return has and labels[self.key] in self.values
        if op in (NOT_IN, NOT_EQUALS):
            return not has or labels[self.key] not in self.values
        if op == EXISTS:
            return has
        if op == DOES_NOT_EXIST:
            return not has
        if op in (GREATER_THAN, LESS_THAN):
            if not has or len(self.values) != 1:
                return False
            mine, want = _int64(labels[self.key]), _int64(self.values[0])
            if mine is None or want is None:
                return False
            return mine > want if op == GREATER_THAN else mine < want
        return False

    def __str__(self) -> str:
        op = self.operator
        if op == EXISTS:
            return self.key
        if op == DOES_NOT_EXIST:
            return "!" + self.key
        joined = ",".join(sorted(self.values))
        if op in (IN, NOT_IN):
            return f"{self.key} {op} ({joined})"
        symbol = {GREATER_THAN: ">", LESS_THAN: "<"}.get(op, op)
        return f"{self.key}{symbol}{joined}"


def _requirement(key: str, op: str, values: Sequence[str], *, key_path: str | None,
                 nil_when_empty: bool = False) -> Requirement:
    """Build a validated requirement (``labels.NewRequirement``); errors raise BadRequest.

    ``key_path`` is the field path used for key errors (``None`` when the caller already
    validated the key). ``nil_when_empty`` renders an empty value list as ``null``, as Go does
    for a nil slice.
    """
    errs: list[str] = []
    if key_path is not None:
        kerrs = _qualified_name_errors(key)
        if kerrs:
            errs.append(_invalid(key_path, _go_quote(key), "; ".join(kerrs)))
    shown_values = ("null" if nil_when_empty and not values
                    else json.dumps(list(values), separators=(",", ":"), ensure_ascii=False))
    if op in (IN, NOT_IN):
        if not values:
            errs.append(_invalid("values", shown_values,
                                 "for 'in', 'notin' operators, values set can't be empty"))
    elif op in (EQUALS, DOUBLE_EQUALS, NOT_EQUALS):
        if len(values) != 1:
            errs.append(_invalid("values", shown_values,
                                 "exact-match compatibility requires one single value"))
    elif op in (EXISTS, DOES_NOT_EXIST):
        if values:
            errs.append(_invalid("values", shown_values,
                                 "values set must be empty for exists and does not exist"))
    elif op in (GREATER_THAN, LESS_THAN):
        if len(values) != 1:
            errs.append(_invalid("values", shown_values,
                                 "for 'Gt', 'Lt' operators, exactly one value is required"))
        for i, v in enumerate(values):
            if _int64(v) is None:
                errs.append(_invalid(f"values[{i}]", _go_quote(v),
                                     "for 'Gt', 'Lt' operators, the value must be an integer"))
    else:
        supported = ", ".join(_go_quote(o) for o in (*_BINARY, EXISTS, DOES_NOT_EXIST))
        errs.append(f"operator: Unsupported value: {_go_quote(op)}: supported values: "
                    f"{supported}")
    for i, v in enumerate(values):
        verrs = _label_value_errors(v)
        if verrs:
            errs.append(_invalid(f"values[{i}][{key}]", _go_quote(v), "; ".join(verrs)))
    if errs:
        raise _SelectorError(_aggregate(errs))
    return Requirement(key, op, tuple(values))


class _SelectorError(Exception):
    """Internal: a parse failure with upstream's message (wrapped into BadRequest)."""


@dataclass(frozen=True)
class LabelSelector:
    """An AND of requirements. ``nothing=True`` matches no labels at all (a nil selector)."""

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.nothing:
            return False
        present = labels or {}
        return all(r.matches(present) for r in self.requirements)

    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.nothing and not self.requirements

    def requires_exact_match(self, key: str) -> str | None:
        """The single value ``key`` must have (``=``, ``==`` or one-valued ``in``), if any."""
        for r in self.requirements:
            if r.key == key:
                if r.operator in (EQUALS, DOUBLE_EQUALS, IN) and len(r.values) == 1:
                    return r.values[0]
                return None
        return None

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


EVERYTHING = LabelSelector()
NOTHING = LabelSelector(nothing=True)

# ---- label selector string parser (labels.Parse) --------------------------------------------

(_ERROR, _EOS, _CLOSE, _COMMA, _NOT, _DEQ, _EQ, _GT, _IDENT, _IN, _LT, _NEQ, _NOTIN,
 _OPEN) = range(14)
_LITERALS = {
    ")": _CLOSE, ",": _COMMA, "!": _NOT, "==": _DEQ, "=": _EQ, ">": _GT, "in": _IN,
    "<": _LT, "!=": _NEQ, "notin": _NOTIN, "(": _OPEN,
}
_SPECIAL = frozenset("=!(),><")
_SPACE = frozenset(" \t\r\n")


def _lex(s: str) -> list[tuple[int, str]]:
    items: list[tuple[int, str]] = []
    pos, n = 0, len(s)
    while True:
        while pos < n and s[pos] in _SPACE:
            pos += 1
        if pos >= n:
            items.append((_EOS, ""))
            return items
        if s[pos] in _SPECIAL:
            buf, last = "", None
            while pos < n and s[pos] in _SPECIAL:
                candidate = buf + s[pos]
                if candidate in _LITERALS:
                    buf, last = candidate, (_LITERALS[candidate], candidate)
                    pos += 1
                elif last is not None:
                    break
                else:
                    buf = candidate
                    pos += 1
            items.append(last if last is not None
                         else (_ERROR, f"error expected: keyword found '{buf}'"))
        else:
            start = pos
            while pos < n and s[pos] not in _SPECIAL and s[pos] not in _SPACE:
                pos += 1
            word = s[start:pos]
            items.append((_LITERALS.get(word, _IDENT), word))


class _LabelParser:
    def __init__(self, s: str) -> None:
        self.items = _lex(s)
        self.pos = 0

    def _look(self, values: bool) -> tuple[int, str]:
        tok, lit = self.items[self.pos]
        if values and tok in (_IN, _NOTIN):
            tok = _IDENT
        return tok, lit

    def _take(self, values: bool) -> tuple[int, str]:
        item = self._look(values)
        self.pos += 1
        return item

    def parse(self) -> list[Requirement]:
        reqs: list[Requirement] = []
        while True:
            tok, lit = self._look(True)
            if tok in (_IDENT, _NOT):
                try:
                    reqs.append(self._requirement())
                except _SelectorError as e:
                    raise _SelectorError(f"unable to parse requirement: {e}") from None
                tok, lit = self._take(True)
                if tok == _EOS:
                    return reqs
                if tok == _COMMA:
                    tok2, lit2 = self._look(True)
                    if tok2 not in (_IDENT, _NOT):
                        raise _SelectorError(f"found '{lit2}', expected: identifier after ','")
                    continue
                raise _SelectorError(f"found '{lit}', expected: ',' or 'end of string'")
            if tok == _EOS:
                return reqs
            raise _SelectorError(f"found '{lit}', expected: !, identifier, or 'end of string'")

    def _requirement(self) -> Requirement:
        op = ""
        tok, lit = self._take(True)
        if tok == _NOT:
            op = DOES_NOT_EXIST
            tok, lit = self._take(True)
        if tok != _IDENT:
            raise _SelectorError(f"found '{lit}', expected: identifier")
        key = lit
        kerrs = _qualified_name_errors(key)
        if kerrs:
            raise _SelectorError(_invalid("<nil>", _go_quote(key), "; ".join(kerrs)))
        if self._look(True)[0] in (_EOS, _COMMA) and op != DOES_NOT_EXIST:
            op = EXISTS
        if op in (EXISTS, DOES_NOT_EXIST):
            return _requirement(key, op, (), key_path=None)
        tok, lit = self._take(False)
        ops = {_IN: IN, _EQ: EQUALS, _DEQ: DOUBLE_EQUALS, _GT: GREATER_THAN, _LT: LESS_THAN,
               _NOTIN: NOT_IN, _NEQ: NOT_EQUALS}
        if tok not in ops:
            raise _SelectorError(f"found '{lit}', expected: {', '.join(_BINARY)}")
        op = ops[tok]
        values = self._set_values() if op in (IN, NOT_IN) else self._exact_value()
        return _requirement(key, op, sorted(values), key_path=None)

    def _set_values(self) -> set[str]:
        tok, lit = self._take(True)
        if tok != _OPEN:
            raise _SelectorError(f"found '{lit}' expected: '('")
        tok, lit = self._look(True)
        if tok in (_IDENT, _COMMA):
            values = self._identifiers()
            if self._take(True)[0] != _CLOSE:
                raise _SelectorError(f"found '{lit}', expected: ')'")
            return values
        if tok == _CLOSE:
            self._take(True)
            return {""}
        raise _SelectorError(f"found '{lit}', expected: ',', ')' or identifier")

    def _identifiers(self) -> set[str]:
        values: set[str] = set()
        while True:
            tok, lit = self._take(True)
            if tok == _IDENT:
                values.add(lit)
                tok2, lit2 = self._look(True)
                if tok2 == _COMMA:
                    continue
                if tok2 == _CLOSE:
                    return values
                raise _SelectorError(f"found '{lit2}', expected: ',' or ')'")
            if tok == _COMMA:
                if not values:
                    values.add("")
                tok2 = self._look(True)[0]
                if tok2 == _CLOSE:
                    values.add("")
                    return values
                if tok2 == _COMMA:
                    self._take(True)
                    values.add("")
                continue
            raise _SelectorError(f"found '{lit}', expected: ',', or identifier")

    def _exact_value(self) -> set[str]:
        if self._look(True)[0] in (_EOS, _COMMA):
            return {""}
        tok, lit = self._take(True)
        if tok == _IDENT:
            return {lit}
        raise _SelectorError(f"found '{lit}', expected: identifier")


def parse_label_selector(s: str) -> LabelSelector:
    """Parse a ``labelSelector`` query value; an empty string selects everything."""
    try:
        reqs = _LabelParser(s).parse()
    except _SelectorError as e:
        raise BadRequest(str(e)) from None
    return LabelSelector(tuple(sorted(reqs, key=lambda r: r.key)))


_DICT_OPERATORS = {"In": IN, "NotIn": NOT_IN, "Exists": EXISTS, "DoesNotExist": DOES_NOT_EXIST}


def label_selector_from_dict(sel: Mapping[str, Any] | None) -> LabelSelector:
    """A ``metav1.LabelSelector`` object as a selector (``LabelSelectorAsSelector``).

    ``None`` selects nothing; ``{}`` (no matchLabels, no matchExpressions) selects everything.
    An invalid key, value or operator raises :class:`BadRequest` with upstream's message.
    """
    if sel is None:
        return NOTHING
    match_labels: Mapping[str, Any] = sel.get("matchLabels") or {}
    expressions: Sequence[Mapping[str, Any]] = sel.get("matchExpressions") or []
    if not match_labels and not expressions:
        return EVERYTHING
    reqs: list[Requirement] = []
    try:
        for k, v in match_labels.items():
            reqs.append(_requirement(str(k), EQUALS, [str(v)], key_path="key"))
        for expr in expressions:
            operator = str(expr.get("operator", ""))
            if operator not in _DICT_OPERATORS:
                raise _SelectorError(f"{_go_quote(operator)} is not a valid label selector "
                                     "operator")
            values = [str(v) for v in (expr.get("values") or [])]
            reqs.append(_requirement(str(expr.get("key", "")), _DICT_OPERATORS[operator],
                                     values, key_path="key", nil_when_empty=True))
    except _SelectorError as e:
        raise BadRequest(str(e)) from None
    return LabelSelector(tuple(sorted(reqs, key=lambda r: r.key)))


# ---- field selectors ------------------------------------------------------------------------

_DEFAULT_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    operator: str  # "=", "==" or "!="
    value: str

    def matches(self, actual: str) -> bool:
        return (actual != self.value) if self.operator == NOT_EQUALS else (actual == self.value)

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
        return f"{self.field}{self.operator}{escaped}"


@dataclass(frozen=True)
class FieldSelector:
    """An AND of field terms over objects of one kind."""

    requirements: tuple[FieldRequirement, ...] = ()
    kind: KindInfo | None = dc_field(default=None, compare=False)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(r.matches(field_value(self.kind, obj, r.field)) for r in self.requirements)

    def exact_name(self) -> str | None:
        """The name a ``metadata.name=NAME`` term pins the selector to, if any."""
        return self.requires_exact_match("metadata.name")

    def requires_exact_match(self, name: str) -> str | None:
        for r in self.requirements:
            if r.field == name and r.operator in (EQUALS, DOUBLE_EQUALS):
                return r.value
        return None

    def empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def _split_terms(s: str) -> list[str]:
    terms, start, escaped = [], 0, False
    for i, c in enumerate(s):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ",":
            terms.append(s[start:i])
            start = i + 1
    terms.append(s[start:])
    return terms


def _split_term(term: str) -> tuple[str, str, str] | None:
    for i in range(len(term)):
        for op in (NOT_EQUALS, DOUBLE_EQUALS, EQUALS):
            if term.startswith(op, i):
                return term[:i], op, term[i + len(op):]
    return None


def _unescape(value: str) -> str:
    if not any(c in value for c in "\\,="):
        return value
    out, escaped = [], False
    for c in value:
        if escaped:
            if c not in "\\,=":
                raise _SelectorError(f"invalid field selector: invalid escape sequence: \\{c}")
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in ",=":
            raise _SelectorError(f"invalid field selector: unescaped character in value: {ord(c)}")
        else:
            out.append(c)
    if escaped:
        raise _SelectorError("invalid field selector: invalid escape sequence: \\")
    return "".join(out)


def _check_field(kind: KindInfo, label: str) -> None:
    if kind.builtin and not kind.selectable_fields:
        if label not in _DEFAULT_FIELDS:
            raise _SelectorError(f'"{label}" is not a known field selector: only '
                                 '"metadata.name", "metadata.namespace"')
        return
    if label == "metadata.name" or label in kind.selectable_fields:
        return
    if label == "metadata.namespace" and kind.namespaced:
        return
    raise _SelectorError(f"field label not supported: {label}")


def parse_field_selector(s: str, kind: KindInfo) -> FieldSelector:
    """Parse a ``fieldSelector`` query value for ``kind``; an empty string selects everything."""
    try:
        reqs: list[FieldRequirement] = []
        for part in sorted(_split_terms(s)):
            if not part:
                continue
            split = _split_term(part)
            if split is None:
                raise _SelectorError(f"invalid selector: '{s}'; can't understand '{part}'")
            lhs, op, rhs = split
            reqs.append(FieldRequirement(lhs, op, _unescape(rhs)))
        for r in reqs:
            _check_field(kind, r.field)
    except _SelectorError as e:
        raise BadRequest(str(e)) from None
    return FieldSelector(tuple(reqs), kind)


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    return ""


def _walk(obj: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def field_value(kind: KindInfo | None, obj: Mapping[str, Any], label: str) -> str:
    """The string a field selector compares for ``label`` (``""`` when the field is unset)."""
    if kind is not None and kind.builtin and kind.group == "":
        if kind.kind == "Node" and label == "spec.unschedulable":
            return "true" if _walk(obj, label) is True else "false"
        if kind.kind == "Event" and label == "source":
            return (_stringify(_walk(obj, "source.component"))
                    or _stringify(obj.get("reportingComponent")))
    return _stringify(_walk(obj, label))
