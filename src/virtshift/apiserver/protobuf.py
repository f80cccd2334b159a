"""Decoding Kubernetes protobuf request bodies into JSON objects.

kubectl's typed clients (``kubectl create namespace|configmap|secret``, ``kubectl auth can-i``,
``kubectl auth whoami``) send built-in kinds as ``application/vnd.kubernetes.protobuf``: the
magic ``k8s\\0`` then a ``runtime.Unknown`` envelope holding the object's own message. Responses
stay JSON (those clients accept both). Field numbers follow k8s.io/api's generated.proto.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

from virtshift.errors import BadRequest, UnsupportedMediaType

PROTOBUF = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

# A message schema: field number -> (json name, decoder). Decoders are a wire-type-aware type tag
# or a nested schema; "[]" marks a repeated field, "{}" a map<string, T>.
Schema = dict[int, tuple[str, Any]]


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) for every field in a message."""
    out: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        val: Any
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            val, i = buf[i:i + n], i + n
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((num, wire, val))
    return out


def _time(raw: bytes) -> str:
    secs = 0
    for num, _w, val in _fields(raw):
        if num == 1:
            secs = val if val < 1 << 63 else val - (1 << 64)
    return datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _scalar(tag: str, wire: int, val: Any) -> Any:
    if tag == "string":
        return bytes(val).decode("utf-8")
    if tag == "bytes":
        return base64.b64encode(bytes(val)).decode()
    if tag == "bool":
        return bool(val)
    if tag == "int":
        return val if val < 1 << 63 else val - (1 << 64)
    if tag == "time":
        return _time(bytes(val))
    if tag == "quantity":
        return decode_message(bytes(val), QUANTITY).get("string", "")
    raise ValueError(f"unknown tag {tag}")


def _value(spec: Any, wire: int, val: Any) -> Any:
    if isinstance(spec, dict):
        return decode_message(bytes(val), spec)
    return _scalar(spec, wire, val)


def decode_message(buf: bytes, schema: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for num, wire, val in _fields(buf):
        entry = schema.get(num)
        if entry is None:
            continue
        name, spec = entry
        if isinstance(spec, tuple) and spec[0] == "[]":
            out.setdefault(name, []).append(_value(spec[1], wire, val))
        elif isinstance(spec, tuple) and spec[0] == "{}":
            kv = {n: v for n, _w, v in _fields(bytes(val))}
            key = bytes(kv.get(1, b"")).decode("utf-8")
            out.setdefault(name, {})[key] = _value(spec[1], 2, kv.get(2, b""))
        else:
            out[name] = _value(spec, wire, val)
    return out


QUANTITY: Schema = {1: ("string", "string")}
OWNER_REFERENCE: Schema = {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                           5: ("apiVersion", "string"), 6: ("controller", "bool"),
                           7: ("blockOwnerDeletion", "bool")}
OBJECT_META: Schema = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
    5: ("uid", "string"), 6: ("resourceVersion", "string"), 7: ("generation", "int"),
    11: ("labels", ("{}", "string")), 12: ("annotations", ("{}", "string")),
    13: ("ownerReferences", ("[]", OWNER_REFERENCE)), 14: ("finalizers", ("[]", "string")),
}
OBJECT_REFERENCE: Schema = {1: ("kind", "string"), 2: ("namespace", "string"),
                            3: ("name", "string"), 4: ("uid", "string"),
                            5: ("apiVersion", "string"), 6: ("resourceVersion", "string"),
                            7: ("fieldPath", "string")}
LABEL_SELECTOR: Schema = {
    1: ("matchLabels", ("{}", "string")),
    2: ("matchExpressions", ("[]", {1: ("key", "string"), 2: ("operator", "string"),
                                    3: ("values", ("[]", "string"))})),
}
TYPED_REF: Schema = {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string"),
                     4: ("namespace", "string")}

KIND_SCHEMAS: dict[str, Schema] = {
    "Namespace": {1: ("metadata", OBJECT_META),
                  2: ("spec", {1: ("finalizers", ("[]", "string"))})},
    "ConfigMap": {1: ("metadata", OBJECT_META), 2: ("data", ("{}", "string")),
                  3: ("binaryData", ("{}", "bytes")), 4: ("immutable", "bool")},
    "Secret": {1: ("metadata", OBJECT_META), 2: ("data", ("{}", "bytes")),
               3: ("type", "string"), 4: ("stringData", ("{}", "string")),
               5: ("immutable", "bool")},
    "PersistentVolumeClaim": {1: ("metadata", OBJECT_META), 2: ("spec", {
        1: ("accessModes", ("[]", "string")),
        2: ("resources", {1: ("limits", ("{}", "quantity")),
                          2: ("requests", ("{}", "quantity"))}),
        3: ("volumeName", "string"), 4: ("selector", LABEL_SELECTOR),
        5: ("storageClassName", "string"), 6: ("volumeMode", "string"),
        7: ("dataSource", TYPED_REF), 8: ("dataSourceRef", TYPED_REF),
        9: ("volumeAttributesClassName", "string")})},
    "Event": {1: ("metadata", OBJECT_META), 2: ("involvedObject", OBJECT_REFERENCE),
              3: ("reason", "string"), 4: ("message", "string"),
              5: ("source", {1: ("component", "string"), 2: ("host", "string")}),
              6: ("firstTimestamp", "time"), 7: ("lastTimestamp", "time"),
              8: ("count", "int"), 9: ("type", "string"), 12: ("action", "string"),
              14: ("reportingComponent", "string"), 15: ("reportingInstance", "string")},
    "SelfSubjectReview": {1: ("metadata", OBJECT_META)},
    "SelfSubjectAccessReview": {1: ("metadata", OBJECT_META), 2: ("spec", {
        1: ("resourceAttributes", {1: ("namespace", "string"), 2: ("verb", "string"),
                                   3: ("group", "string"), 4: ("version", "string"),
                                   5: ("resource", "string"), 6: ("subresource", "string"),
                                   7: ("name", "string")}),
        2: ("nonResourceAttributes", {1: ("path", "string"), 2: ("verb", "string")})})},
    "SelfSubjectRulesReview": {1: ("metadata", OBJECT_META),
                               2: ("spec", {1: ("namespace", "string")})},
    "DeleteOptions": {1: ("gracePeriodSeconds", "int"),
                      2: ("preconditions", {1: ("uid", "string"),
                                            2: ("resourceVersion", "string")}),
                      3: ("orphanDependents", "bool"), 4: ("propagationPolicy", "string"),
                      5: ("dryRun", ("[]", "string"))},
}


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded built-in object as the JSON object it stands for."""
    if not body.startswith(MAGIC):
        raise BadRequest("protobuf body without the k8s envelope")
    try:
        envelope = decode_message(body[len(MAGIC):], {
            1: ("typeMeta", {1: ("apiVersion", "string"), 2: ("kind", "string")}),
            2: ("raw", "bytes"), 3: ("contentEncoding", "string"), 4: ("contentType", "string"),
        })
        type_meta = envelope.get("typeMeta", {})
        kind = type_meta.get("kind", "")
        schema = KIND_SCHEMAS.get(kind)
        if schema is None:
            raise UnsupportedMediaType(
                f"protobuf is not supported for {kind or 'this kind'}: send application/json")
        raw = base64.b64decode(envelope.get("raw", ""))
        obj = decode_message(raw, schema)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body of the request is not valid protobuf: {e}") from e
    out: dict[str, Any] = {"apiVersion": type_meta.get("apiVersion", ""), "kind": kind}
    out.update(obj)
    return out


