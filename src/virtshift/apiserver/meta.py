"""Object metadata rules shared by every kind: names, uids, timestamps, generation, keys."""

from __future__ import annotations

import datetime
import os
import re
import secrets
import time
from typing import Any

from virtshift.api.jsonvalue import clone
from virtshift.api.kinds import KindInfo, Obj
from virtshift.errors import FieldError

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)

# Kinds whose names become host names or DNS labels upstream.
LABEL_NAMED_KINDS = frozenset({"Namespace", "VirtualMachine", "VirtualMachineInstance"})

GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# Fields the system owns: never taken from a client's create or update body.
SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
               "generation", "resourceVersion", "selfLink")


_now_cache: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """The current UTC time to the second, as Kubernetes timestamps are (formatted once per
    second: every write asks for it)."""
    global _now_cache
    second = int(time.time())
    if _now_cache[0] != second:
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _now_cache = (second, stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _now_cache[1]


_uid_pool = bytearray()
os.register_at_fork(after_in_child=_uid_pool.clear)  # a forked child must not reuse them


def new_uid() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())``; the random bytes come from
    ``os.urandom`` 4 KiB at a time instead of one system call per UID."""
    if len(_uid_pool) < 16:
        _uid_pool.extend(os.urandom(4096))
    raw = _uid_pool[-16:]
    del _uid_pool[-16:]
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def generate_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(GENERATE_ALPHABET) for _ in range(5))


def store_key(kind: KindInfo, namespace: str | None, name: str | None = None) -> str:
    """``/registry/GROUP/PLURAL/[NS/]NAME``; with no name, the prefix of the collection."""
    parts = ["", "registry", kind.group or "core", kind.plural]
    if kind.namespaced and namespace:
        parts.append(namespace)
    if name is not None:
        parts.append(name)
        return "/".join(parts)
    return "/".join(parts) + "/"


def quote(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def validate_name(kind: KindInfo, name: Any, path: str = "metadata.name") -> list[FieldError]:
    if not isinstance(name, str) or not name:
        return [FieldError("FieldValueRequired", path, "name or generateName is required")]
    if kind.kind in LABEL_NAMED_KINDS:
        if len(name) > 63:
            return [FieldError("FieldValueInvalid", path,
                               f"{quote(name)}: must be no more than 63 characters")]
        if not DNS1123_LABEL.match(name):
            return [FieldError("FieldValueInvalid", path, f"{quote(name)}: {_LABEL_MSG}")]
        return []
    if len(name) > 253:
        return [FieldError("FieldValueInvalid", path,
                           f"{quote(name)}: must be no more than 253 characters")]
    if not DNS1123_SUBDOMAIN.match(name):
        return [FieldError("FieldValueInvalid", path, f"{quote(name)}: {_SUBDOMAIN_MSG}")]
    return []


def _validate_qualified_key(key: str, path: str) -> list[FieldError]:
    prefix, _, name = key.rpartition("/")
    errs: list[FieldError] = []
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        errs.append(FieldError("FieldValueInvalid", path,
                               f"{quote(key)}: prefix part {_SUBDOMAIN_MSG}"))
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        errs.append(FieldError(
            "FieldValueInvalid", path,
            f"{quote(key)}: name part must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"))
    return errs


# A qualified key of at most 63 characters that _validate_qualified_key accepts (a shortcut:
# keys it does not match take the full check).
_QUALIFIED_KEY = re.compile(
    r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
    r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
)


def validate_metadata(kind: KindInfo, meta: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    labels = meta.get("labels") or {}
    if isinstance(labels, dict):
        for k, v in labels.items():
            key = str(k)
            if len(key) > 63 or _QUALIFIED_KEY.fullmatch(key) is None:
                errs += _validate_qualified_key(key, "metadata.labels")
            if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
                errs.append(FieldError(
                    "FieldValueInvalid", "metadata.labels",
                    f"{quote(v)}: a valid label must be an empty string or consist of "
                    "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                    "alphanumeric character"))
    annotations = meta.get("annotations") or {}
    if isinstance(annotations, dict):
        for k in annotations:
            key = str(k)
            if len(key) > 63 or _QUALIFIED_KEY.fullmatch(key) is None:
                errs += _validate_qualified_key(key, "metadata.annotations")
        total = sum(len(str(k)) + len(str(v)) for k, v in annotations.items())
        if total > 256 * 1024:
            errs.append(FieldError("FieldValueTooLong", "metadata.annotations",
                                   "may not be more than 262144 bytes"))
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for f in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(f):
                errs.append(FieldError("FieldValueRequired",
                                       f"metadata.ownerReferences[{i}].{f}", ""))
    finalizers = meta.get("finalizers") or []
    for i, fin in enumerate(finalizers):
        if not isinstance(fin, str) or not fin:
            errs.append(FieldError("FieldValueRequired", f"metadata.finalizers[{i}]", ""))
    return errs


def spec_part(obj: Obj) -> Obj:
    """Everything that counts towards ``metadata.generation``: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def api_object(kind: KindInfo, value: Obj, revision: int) -> Obj:
    """A stored value as the API shows it: version, kind and resourceVersion set. Only the top
    level and metadata are copied, so the stored value is never changed (callers that edit
    deeper must clone first)."""
    meta = value.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["resourceVersion"] = str(revision)
    return {**value, "apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}


def storable(obj: Obj) -> Obj:
    """The object as stored: without ``metadata.resourceVersion`` (the store's revision is)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


def deep(obj: Obj) -> Obj:
    return clone(obj)
