"""PATCH bodies as kube-apiserver applies them: JSON patch, JSON merge patch, strategic merge patch.

Every function here is pure: the inputs are never mutated and the result is a fresh object.
Failures are the :mod:`virtshift.errors` that kube-apiserver answers for the same input:

* a body of the wrong shape is 400 BadRequest, worded like the Go JSON decoder
  (``error decoding patch: json: cannot unmarshal object into Go value of type ...``);
* a JSON patch operation that cannot apply (missing path, failed ``test``, bad index) is 422
  Invalid with the generic message ``the server rejected our request due to an error in our
  request`` and no causes — kube-apiserver drops the operation's own text; we keep it as the
  exception's ``__cause__`` (a :class:`PatchDetail`) for logs only;
* strategic merge patch (:mod:`virtshift.api.smp`, re-exported here) adds a bare 500 with no
  reason (:class:`PatchServerError`) for malformed patches upstream does not classify.

JSON patch follows the evanphx/json-patch v4 library kube-apiserver vendors, quirks included:
``replace`` of a missing object member adds it and negative array indices count from the end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from virtshift.api.gojson import (
    REJECTED_MESSAGE,
    PatchDetail,
    PatchServerError,
    go_json_type,
    go_quote,
    json_equal,
    rejected,
)
from virtshift.api.jsonvalue import clone
from virtshift.api.smp import ListType, list_type, strategic_merge_patch
from virtshift.errors import BadRequest, RequestEntityTooLarge

__all__ = [
    "MAX_JSON_PATCH_OPERATIONS",
    "REJECTED_MESSAGE",
    "ListType",
    "PatchDetail",
    "PatchServerError",
    "json_patch",
    "list_type",
    "merge_patch",
    "strategic_merge_patch",
]

Obj = dict[str, Any]

MAX_JSON_PATCH_OPERATIONS: Final = 10000


# ---- JSON patch (RFC 6902) -------------------------------------------------------------------

_MISSING: Final = "missing value"
_INVALID_INDEX: Final = "invalid index referenced"
_TEST_FAILED: Final = "test failed"
_INT: Final = re.compile(r"[+-]?[0-9]+\Z")
_POINTER_ESCAPE: Final = re.compile(r"~[01]")


class _OpFailed(PatchDetail):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _atoi(key: str) -> int:
    if not _INT.match(key):
        raise _OpFailed(f"strconv.Atoi: parsing {go_quote(key)}: invalid syntax")
    idx = int(key)
    if not -(2**63) <= idx < 2**63:
        raise _OpFailed(f"strconv.Atoi: parsing {go_quote(key)}: value out of range")
    return idx


def _bad_index(idx: int) -> _OpFailed:
    return _OpFailed(f"Unable to access invalid index: {idx}: {_INVALID_INDEX}")


def _c_get(container: Any, key: str) -> Any:
    """Member ``key``; None when an object lacks it. Raises _OpFailed for bad array indices."""
    if isinstance(container, dict):
        return container.get(key)
    idx = _atoi(key)
    if idx < 0:
        if idx < -len(container):
            raise _bad_index(idx)
        idx += len(container)
    if idx >= len(container):
        raise _bad_index(idx)
    return container[idx]


def _c_set(container: Any, key: str, value: Any) -> None:
    if isinstance(container, dict):
        container[key] = value
        return
    idx = _atoi(key)
    if idx < 0:
        idx += len(container)
    container[idx] = value


def _c_add(container: Any, key: str, value: Any) -> None:
    if isinstance(container, dict):
        container[key] = value
        return
    if key == "-":
        container.append(value)
        return
    try:
        idx = _atoi(key)
    except _OpFailed as e:
        raise _OpFailed(f"value was not a proper array index: '{key}': {e.message}") from None
    size = len(container) + 1
    if idx >= size or idx < -size:
        raise _bad_index(idx)
    if idx < 0:
        idx += size
    container.insert(idx, value)


def _c_remove(container: Any, key: str) -> None:
    if isinstance(container, dict):
        if key not in container:
            raise _OpFailed(f"Unable to remove nonexistent key: {key}: {_MISSING}")
        del container[key]
        return
    idx = _atoi(key)
    if idx >= len(container) or idx < -len(container):
        raise _bad_index(idx)
    del container[idx]


def _unescape(token: str) -> str:
    return _POINTER_ESCAPE.sub(lambda m: "/" if m.group() == "~1" else "~", token)


def _find(root: list[Any], path: str) -> tuple[Any, str] | None:
    """The container holding ``path``'s last token, and that token; None if unreachable."""
    parts = path.split("/")
    if len(parts) < 2:
        return None
    container = root[0]
    for part in parts[1:-1]:
        try:
            nxt = _c_get(container, _unescape(part))
        except _OpFailed:
            return None
        if not isinstance(nxt, dict | list):
            return None
        container = nxt
    return container, _unescape(parts[-1])


def _op_string(op: Mapping[str, Any], field: str) -> str | None:
    value = op.get(field)
    return value if isinstance(value, str) else None


def _apply_op(root: list[Any], op: Any) -> None:
    if not isinstance(op, dict):
        op = {}
    kind = _op_string(op, "op") or "unknown"
    path = _op_string(op, "path")
    value = clone(op.get("value"))
    no_path = f"operation missing path field: {_MISSING}"
    if kind == "add":
        if path is None:
            raise _OpFailed(f"add operation failed to decode path: {_MISSING}")
        found = _find(root, path)
        if found is None:
            raise _OpFailed(f'add operation does not apply: doc is missing path: "{path}": '
                            f"{_MISSING}")
        try:
            _c_add(*found, value)
        except _OpFailed as e:
            raise _OpFailed(f"error in add for path: '{path}': {e.message}") from None
    elif kind == "remove":
        if path is None:
            raise _OpFailed(f"remove operation failed to decode path: {_MISSING}")
        found = _find(root, path)
        if found is None:
            raise _OpFailed(f'remove operation does not apply: doc is missing path: "{path}": '
                            f"{_MISSING}")
        try:
            _c_remove(*found)
        except _OpFailed as e:
            raise _OpFailed(f"error in remove for path: '{path}': {e.message}") from None
    elif kind == "replace":
        if path is None:
            raise _OpFailed(f"replace operation failed to decode path: {no_path}")
        if path == "":
            if not isinstance(value, dict | list):
                raise _OpFailed("replace operation value must be object or array: %!w(<nil>)")
            root[0] = value
            return
        found = _find(root, path)
        if found is None:
            raise _OpFailed(f"replace operation does not apply: doc is missing path: {path}: "
                            f"{_MISSING}")
        try:
            _c_get(*found)
        except _OpFailed:
            raise _OpFailed(f"replace operation does not apply: doc is missing key: {path}: "
                            f"{_MISSING}") from None
        _c_set(*found, value)
    elif kind in ("move", "copy"):
        _move_or_copy(root, op, kind, path)
    elif kind == "test":
        if path is None:
            raise _OpFailed(f"test operation failed to decode path: {no_path}")
        if path == "":
            if not json_equal(root[0], value):
                raise _OpFailed(f"testing value  failed: {_TEST_FAILED}")
            return
        found = _find(root, path)
        if found is None:
            raise _OpFailed(f"test operation does not apply: is missing path: {path}: "
                            f"{_MISSING}")
        try:
            current = _c_get(*found)
        except _OpFailed as e:
            raise _OpFailed(f"error in test for path: '{path}': {e.message}") from None
        if current is None and value is None:
            return
        if current is None or value is None or not json_equal(current, value):
            raise _OpFailed(f"testing value {path} failed: {_TEST_FAILED}")
    else:
        raise _OpFailed(f"Unexpected kind: {kind}")


def _move_or_copy(root: list[Any], op: Mapping[str, Any], kind: str, path: str | None) -> None:
    source = _op_string(op, "from")
    if source is None:
        raise _OpFailed(f"{kind} operation failed to decode from: operation, missing from "
                        f"field: {_MISSING}")
    found = _find(root, source)
    if found is None:
        raise _OpFailed(f"{kind} operation does not apply: doc is missing from path: {source}: "
                        f"{_MISSING}")
    container, key = found
    try:
        value = _c_get(container, key)
    except _OpFailed as e:
        where = f"error in move for path: '{key}'" if kind == "move" else \
            f"error in copy for from: '{source}'"
        raise _OpFailed(f"{where}: {e.message}") from None
    if kind == "move":
        try:
            _c_remove(container, key)
        except _OpFailed as e:
            raise _OpFailed(f"error in move for path: '{key}': {e.message}") from None
    else:
        value = clone(value)
    if path is None:
        detail = f"operation missing path field: {_MISSING}" if kind == "move" else _MISSING
        raise _OpFailed(f"{kind} operation failed to decode path: {detail}")
    dest = _find(root, path)
    if dest is None:
        raise _OpFailed(f"{kind} operation does not apply: doc is missing destination path: "
                        f"{path}: {_MISSING}")
    try:
        _c_add(*dest, value)
    except _OpFailed as e:
        where = f"error in move for path: '{path}'" if kind == "move" else \
            "error while adding value during copy"
        raise _OpFailed(f"{where}: {e.message}") from None


def _check_json_patch(ops: Any) -> list[Any]:
    """Decode ``ops`` the way kube-apiserver does under fieldValidation Warn/Strict."""
    if ops is None:
        return []
    prefix = "error decoding patch: json: cannot unmarshal"
    if not isinstance(ops, list):
        raise BadRequest(
            f"{prefix} {go_json_type(ops)} into Go value of type []handlers.jsonPatchOp")
    for op in ops:
        if op is None:
            continue
        if not isinstance(op, dict):
            raise BadRequest(
                f"{prefix} {go_json_type(op)} into Go value of type handlers.jsonPatchOp")
        for field in ("op", "path", "from"):
            value = op.get(field)
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"{prefix} {go_json_type(value)} into Go struct field "
                                 f"jsonPatchOp.{field} of type string")
    if len(ops) > MAX_JSON_PATCH_OPERATIONS:
        raise RequestEntityTooLarge(
            f"The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, "
            f"got {len(ops)}")
    return ops


def json_patch(obj: Obj, ops: Any) -> Obj:
    """Apply an RFC 6902 patch (``application/json-patch+json``) to ``obj``.

    A body that is not a list of operation objects is BadRequest (400); more than 10000
    operations is RequestEntityTooLarge (413); an operation that does not apply is Invalid
    (422) with kube-apiserver's generic message. ``null`` is an empty patch.
    """
    checked = _check_json_patch(ops)
    root: list[Any] = [clone(obj)]
    for op in checked:
        try:
            _apply_op(root, op)
        except _OpFailed as e:
            raise rejected(e.message) from e
    result = root[0]
    if not isinstance(result, dict):
        # Only a whole-document replace produces this; Kubernetes then fails to decode it.
        raise rejected("the patch did not produce an object")
    return result


# ---- JSON merge patch (RFC 7386) -------------------------------------------------------------


def _prune_nulls(value: Any) -> Any:
    """Drop null object members at every depth (array elements stay, as json-patch v4 does)."""
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [v if v is None else _prune_nulls(v) for v in value]
    return value


def _merge_docs(doc: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if value is None:
            doc.pop(key, None)
            continue
        current = doc.get(key)
        if not isinstance(current, dict):  # absent, null or not an object: take the patch
            doc[key] = _prune_nulls(value)
        elif not isinstance(value, dict):
            doc[key] = value
        else:
            _merge_docs(current, value)


def merge_patch(obj: Obj, patch: Any) -> Obj:
    """Apply an RFC 7386 merge patch (``application/merge-patch+json``) to ``obj``.

    Objects merge recursively, ``null`` deletes a member, anything else (lists included)
    replaces. A patch that is not an object is BadRequest (400).
    """
    if patch is None:
        raise BadRequest("Invalid JSON Patch")
    if not isinstance(patch, dict):
        raise BadRequest(f"error decoding patch: json: cannot unmarshal {go_json_type(patch)} "
                         "into Go value of type map[string]interface {}")
    doc = clone(obj)
    _merge_docs(doc, clone(patch))
    return doc
