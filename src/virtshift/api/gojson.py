"""JSON values as Go's encoding/json and kube-apiserver see them, for Kubernetes-identical errors.

Shared by the patch modules (:mod:`virtshift.api.patch`, :mod:`virtshift.api.smp`,
:mod:`virtshift.api.ssa`): Go's ``%v`` rendering of decoded JSON, the type names its decoder
puts in "cannot unmarshal" messages, a JSON equality that tells ``true`` from ``1``, and the two
error shapes kube-apiserver gives patch failures it does not classify itself.
"""

from __future__ import annotations

import json
from typing import Any, Final

from virtshift.errors import InternalError, Invalid

REJECTED_MESSAGE: Final = "the server rejected our request due to an error in our request"


class PatchServerError(InternalError):
    """A patch failure kube-apiserver passes through unconverted: HTTP 500 without a reason."""

    reason = ""


class PatchDetail(Exception):
    """The merge library's own text for a failure Kubernetes reports generically."""


def rejected(detail: str) -> Invalid:
    """422 Invalid with kube-apiserver's generic text; ``detail`` is kept as ``__cause__`` only.

    kube-apiserver builds this with ``NewGenericServerResponse(422, ...)``, which sends neither
    the underlying error nor causes.
    """
    err = Invalid(REJECTED_MESSAGE)
    err.__cause__ = PatchDetail(detail)
    return err


def go_json_type(value: Any) -> str:
    """The JSON type name Go's decoder uses in "cannot unmarshal X into ..." messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def go_format(value: Any) -> str:
    """``value`` as Go's ``%v`` prints a decoded JSON value (``map[a:1 b:[x y]]``)."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, dict):
        inner = " ".join(f"{k}:{go_format(value[k])}" for k in sorted(value))
        return f"map[{inner}]"
    if isinstance(value, list):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    return str(value)


def go_kind(value: Any) -> str:
    """The Go dynamic type of a decoded value (ints and floats differ, as with PreserveInts)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values that tells ``true`` from ``1`` and ``1`` from ``1.0``."""
    if go_kind(a) != go_kind(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
