"""The OpenAPI documents the API server publishes, as pure functions.

* ``/openapi/v2``: :func:`openapi_v2` (JSON) and :func:`openapi_v2_protobuf` (the gnostic
  ``openapi_v2.Document`` encoding kubectl 1.27/1.28 download eagerly).
* ``/openapi/v3``: :func:`openapi_v3_index` and one :func:`openapi_v3_group_version` document
  per group version. kubectl finds a kind's schema through the ``x-kubernetes-group-version-kind``
  extension of the path operations and of ``components.schemas``, and decides whether the server
  validates fields from the ``fieldValidation`` parameter of the PATCH operation.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from typing import Any, Final

from virtshift.api.kinds import KindInfo, Registry
from virtshift.api.schema import LIST_META, OBJECT_META, DefKey, SchemaSet

Obj = dict[str, Any]

TITLE: Final = "Kubernetes"
VERSION: Final = "v1.33.0"

_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
_CORE = "core"
_STATUS_KEY: Final[DefKey] = (_CORE, _META + "Status")
_DELETE_OPTIONS_KEY: Final[DefKey] = (_CORE, _META + "DeleteOptions")
_PATCH_KEY: Final[DefKey] = (_CORE, _META + "Patch")
_LIST_META_KEY: Final[DefKey] = (_CORE, LIST_META)
_OBJECT_META_KEY: Final[DefKey] = (_CORE, OBJECT_META)

GVK_EXTENSION: Final = "x-kubernetes-group-version-kind"
ACTION_EXTENSION: Final = "x-kubernetes-action"

JSON_PATCH: Final = "application/json-patch+json"
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"
RESPONSE_TYPES: Final = ("application/json", "application/yaml")


def patch_types(kind: KindInfo) -> list[str]:
    """The PATCH content types a kind accepts (strategic merge only for built-in kinds)."""
    types = [JSON_PATCH, MERGE_PATCH]
    if kind.builtin:
        types.append(STRATEGIC_MERGE_PATCH)
    types.append(APPLY_PATCH)
    return types


def group_version_key(group: str, version: str) -> str:
    """``api/v1`` for the core group, ``apis/GROUP/VERSION`` otherwise (the v3 index keys)."""
    return f"api/{version}" if not group else f"apis/{group}/{version}"


# ------------------------------------------------------------------------------------------------
# Kind schemas shared by both versions
# ------------------------------------------------------------------------------------------------


def _reverse_group(group: str) -> str:
    return ".".join(reversed(group.split("."))) if group else "io.k8s.api.core"


def kind_schema_name(kind: KindInfo, schemas: SchemaSet) -> str:
    """The name of a kind's schema in published documents."""
    key = schemas.kind_definition(kind)
    if key is not None:
        return schemas.public_name(*key)
    return f"{_reverse_group(kind.group)}.{kind.version}.{kind.kind}"


def list_schema_name(kind: KindInfo, schemas: SchemaSet) -> str:
    return kind_schema_name(kind, schemas) + "List"


def _gvk(kind: KindInfo, kind_name: str | None = None) -> dict[str, str]:
    return {"group": kind.group, "version": kind.version, "kind": kind_name or kind.kind}


def _ref(prefix: str, name: str) -> Obj:
    return {"$ref": prefix + name}


def _permissive_schema(kind: KindInfo, prefix: str, schemas: SchemaSet) -> Obj:
    return {
        "description": f"{kind.kind} of {kind.api_version}. No schema is published for this "
                       "kind; any fields are accepted and kept.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "apiVersion": {"description": "The versioned schema this object is written in.",
                           "type": "string"},
            "kind": {"description": "The kind of this object.", "type": "string"},
            "metadata": {
                "description": "Standard object metadata.",
                **_ref(prefix, schemas.public_name(*_OBJECT_META_KEY)),
            },
        },
    }


def _list_schema(kind: KindInfo, prefix: str, schemas: SchemaSet) -> Obj:
    return {
        "description": f"A list of {kind.kind} objects.",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"description": "The versioned schema this list is written in.",
                           "type": "string"},
            "kind": {"description": "The kind of this list.", "type": "string"},
            "items": {"description": f"The {kind.kind} objects.", "type": "array",
                      "items": _ref(prefix, kind_schema_name(kind, schemas))},
            "metadata": {"description": "Standard list metadata.",
                         **_ref(prefix, schemas.public_name(*_LIST_META_KEY))},
        },
        GVK_EXTENSION: [_gvk(kind, kind.list_kind)],
    }


def _kind_definitions(kinds: Iterable[KindInfo], schemas: SchemaSet, prefix: str) -> dict[str, Obj]:
    """Kind, list and support schemas (with their closure) for ``kinds``, by public name."""
    kinds = list(kinds)
    roots: list[DefKey] = [_OBJECT_META_KEY, _LIST_META_KEY, _STATUS_KEY, _DELETE_OPTIONS_KEY,
                           _PATCH_KEY]
    for kind in kinds:
        key = schemas.kind_definition(kind)
        if key is not None:
            roots.append(key)
    out = schemas.published_definitions(roots, prefix)
    gvks: dict[str, list[dict[str, str]]] = {}
    for kind in kinds:
        name = kind_schema_name(kind, schemas)
        if name not in out:
            out[name] = _permissive_schema(kind, prefix, schemas)
        gvks.setdefault(name, []).append(_gvk(kind))
        out[list_schema_name(kind, schemas)] = _list_schema(kind, prefix, schemas)
    for name, gvk_list in gvks.items():
        out[name] = {**out[name], GVK_EXTENSION: gvk_list}
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------


def _camel(text: str) -> str:
    parts = text.replace("-", ".").split(".")
    return "".join(p[:1].upper() + p[1:] for p in parts if p)


def _op_id(verb: str, kind: KindInfo, suffix: str = "", namespaced: bool | None = None) -> str:
    group = kind.group.removesuffix(".k8s.io") if kind.group else "core"
    scope = "Namespaced" if (kind.namespaced if namespaced is None else namespaced) else ""
    return f"{verb}{_camel(group)}{_camel(kind.version)}{scope}{kind.kind}{suffix}"


def _base_path(kind: KindInfo) -> str:
    return f"/api/{kind.version}" if not kind.group else f"/apis/{kind.group}/{kind.version}"


def collection_path(kind: KindInfo) -> str:
    base = _base_path(kind)
    if kind.namespaced:
        return f"{base}/namespaces/{{namespace}}/{kind.plural}"
    return f"{base}/{kind.plural}"


_PARAM_TEXT: Final = {
    "name": "Name of the object.",
    "namespace": "Namespace of the objects.",
    "pretty": "When true, the output is indented.",
    "dryRun": "When present (the only value is All), the request is checked and answered but "
              "nothing is stored.",
    "fieldManager": "Name of the actor making the change, recorded in managedFields.",
    "fieldValidation": "What to do with fields the schema does not know: Ignore drops them, "
                       "Warn drops them and warns, Strict rejects the request.",
    "force": "Server-side apply only: take ownership of conflicting fields.",
    "labelSelector": "Only objects whose labels match this selector.",
    "fieldSelector": "Only objects whose fields match this selector.",
    "limit": "The most objects to return; a continue token gives the rest.",
    "continue": "Token from a previous limited list, to get the next page.",
    "resourceVersion": "The version of the collection to read or watch from.",
    "resourceVersionMatch": "How resourceVersion applies to a list: Exact or NotOlderThan.",
    "watch": "Stream changes instead of returning a list.",
    "allowWatchBookmarks": "Let a watch send BOOKMARK events.",
    "timeoutSeconds": "End a watch or list after this many seconds.",
    "sendInitialEvents": "Start a watch with the current objects as ADDED events.",
    "gracePeriodSeconds": "Seconds before the object is deleted; 0 deletes immediately.",
    "propagationPolicy": "What happens to dependents: Orphan, Background or Foreground.",
    "orphanDependents": "Deprecated; use propagationPolicy.",
}
_PARAM_TYPES: Final = {
    "pretty": "string", "dryRun": "string", "fieldManager": "string",
    "fieldValidation": "string", "force": "boolean", "labelSelector": "string",
    "fieldSelector": "string", "limit": "integer", "continue": "string",
    "resourceVersion": "string", "resourceVersionMatch": "string", "watch": "boolean",
    "allowWatchBookmarks": "boolean", "timeoutSeconds": "integer",
    "sendInitialEvents": "boolean", "gracePeriodSeconds": "integer",
    "propagationPolicy": "string", "orphanDependents": "boolean",
}
_LIST_PARAMS: Final = ("allowWatchBookmarks", "continue", "fieldSelector", "labelSelector",
                       "limit", "resourceVersion", "resourceVersionMatch", "sendInitialEvents",
                       "timeoutSeconds", "watch")
_WRITE_PARAMS: Final = ("dryRun", "fieldManager", "fieldValidation")
_PATCH_PARAMS: Final = ("dryRun", "fieldManager", "fieldValidation", "force")
_DELETE_PARAMS: Final = ("dryRun", "gracePeriodSeconds", "orphanDependents",
                         "propagationPolicy")


class _Op:
    """One operation, independent of the OpenAPI version that renders it."""

    def __init__(
        self, method: str, action: str, op_id: str, kind: KindInfo, query: Iterable[str],
        *, body: str | None = None, response: str | None = None, status_code: str = "200",
        patch: bool = False, extra_codes: Iterable[str] = (),
    ) -> None:
        self.method = method
        self.action = action
        self.op_id = op_id
        self.kind = kind
        self.query = tuple(query)
        self.body = body  # schema name of the request body
        self.response = response
        self.status_code = status_code
        self.patch = patch
        self.extra_codes = tuple(extra_codes)


def _kind_paths(kind: KindInfo, schemas: SchemaSet) -> list[tuple[str, tuple[str, ...], _Op]]:
    """(path, path parameters, operation) for every operation of a kind."""
    verbs = set(kind.verbs)
    obj = kind_schema_name(kind, schemas)
    lst = list_schema_name(kind, schemas)
    status = schemas.public_name(*_STATUS_KEY)
    delete_options = schemas.public_name(*_DELETE_OPTIONS_KEY)
    patch = schemas.public_name(*_PATCH_KEY)
    coll = collection_path(kind)
    item = coll + "/{name}"
    coll_params = ("namespace",) if kind.namespaced else ()
    item_params = ("name", *coll_params)
    out: list[tuple[str, tuple[str, ...], _Op]] = []
    if "list" in verbs:
        out.append((coll, coll_params, _Op("get", "list", _op_id("list", kind), kind,
                                           _LIST_PARAMS, response=lst)))
    if "create" in verbs:
        out.append((coll, coll_params, _Op(
            "post", "post", _op_id("create", kind), kind, _WRITE_PARAMS, body=obj,
            response=obj, extra_codes=("201", "202"))))
    if "deletecollection" in verbs:
        out.append((coll, coll_params, _Op(
            "delete", "deletecollection", _op_id("deleteCollection", kind), kind,
            (*_DELETE_PARAMS, *_LIST_PARAMS), body=delete_options, response=status)))
    if "get" in verbs:
        out.append((item, item_params, _Op("get", "get", _op_id("read", kind), kind, (),
                                           response=obj)))
    if "update" in verbs:
        out.append((item, item_params, _Op("put", "put", _op_id("replace", kind), kind,
                                           _WRITE_PARAMS, body=obj, response=obj,
                                           extra_codes=("201",))))
    if "patch" in verbs:
        out.append((item, item_params, _Op("patch", "patch", _op_id("patch", kind), kind,
                                           _PATCH_PARAMS, body=patch, response=obj,
                                           patch=True, extra_codes=("201",))))
    if "delete" in verbs:
        out.append((item, item_params, _Op("delete", "delete", _op_id("delete", kind), kind,
                                           _DELETE_PARAMS, body=delete_options,
                                           response=status, extra_codes=("202",))))
    if kind.has_status:
        status_path = item + "/status"
        if "get" in verbs:
            out.append((status_path, item_params, _Op(
                "get", "get", _op_id("read", kind, "Status"), kind, (), response=obj)))
        if "update" in verbs:
            out.append((status_path, item_params, _Op(
                "put", "put", _op_id("replace", kind, "Status"), kind, _WRITE_PARAMS,
                body=obj, response=obj, extra_codes=("201",))))
        if "patch" in verbs:
            out.append((status_path, item_params, _Op(
                "patch", "patch", _op_id("patch", kind, "Status"), kind, _PATCH_PARAMS,
                body=patch, response=obj, patch=True, extra_codes=("201",))))
    if kind.namespaced and "list" in verbs:
        out.append((f"{_base_path(kind)}/{kind.plural}", (), _Op(
            "get", "list", _op_id("list", kind, "ForAllNamespaces", namespaced=False), kind,
            _LIST_PARAMS, response=lst)))
    return out


def _path_items(
    kinds: Iterable[KindInfo], schemas: SchemaSet,
    render: Callable[[_Op], Obj], render_param: Callable[[str, str, bool], Obj],
) -> dict[str, Obj]:
    paths: dict[str, Obj] = {}
    for kind in kinds:
        for path, params, op in _kind_paths(kind, schemas):
            entry = paths.get(path)
            if entry is None:
                entry = paths[path] = {"parameters": [
                    *(render_param(p, "path", True) for p in params),
                    render_param("pretty", "query", False),
                ]}
            entry[op.method] = render(op)
    return dict(sorted(paths.items()))


# ------------------------------------------------------------------------------------------------
# OpenAPI v2
# ------------------------------------------------------------------------------------------------

_V2_PREFIX: Final = "#/definitions/"


def _v2_param(name: str, where: str, required: bool) -> Obj:
    param: Obj = {"name": name, "in": where, "description": _PARAM_TEXT.get(name, name),
                  "type": _PARAM_TYPES.get(name, "string"), "uniqueItems": True}
    if required:
        param["required"] = True
    return param


def _v2_operation(op: _Op) -> Obj:
    params: list[Obj] = []
    if op.body is not None:
        params.append({"name": "body", "in": "body", "required": op.method != "delete",
                       "schema": _ref(_V2_PREFIX, op.body)})
    params.extend(_v2_param(q, "query", False) for q in op.query)
    responses: Obj = {}
    for code in (op.status_code, *op.extra_codes):
        responses[code] = {"description": _CODE_TEXT[code]}
        if op.response is not None:
            responses[code]["schema"] = _ref(_V2_PREFIX, op.response)
    responses["401"] = {"description": "Unauthorized"}
    consumes = patch_types(op.kind) if op.patch else ["*/*"]
    produces = [*RESPONSE_TYPES]
    if op.action == "list":
        produces += ["application/json;stream=watch"]
    return {
        "description": _describe(op),
        "consumes": consumes,
        "produces": produces,
        "schemes": ["https"],
        "tags": [_tag(op.kind)],
        "operationId": op.op_id,
        "parameters": params,
        "responses": responses,
        ACTION_EXTENSION: op.action,
        GVK_EXTENSION: _gvk(op.kind),
    }


_CODE_TEXT: Final = {"200": "OK", "201": "Created", "202": "Accepted"}


def _describe(op: _Op) -> str:
    what = {
        "list": f"list or watch objects of kind {op.kind.kind}",
        "post": f"create a {op.kind.kind}",
        "deletecollection": f"delete a collection of {op.kind.kind}",
        "get": f"read the specified {op.kind.kind}",
        "put": f"replace the specified {op.kind.kind}",
        "patch": f"partially update the specified {op.kind.kind}",
        "delete": f"delete a {op.kind.kind}",
    }[op.action]
    if op.op_id.endswith("Status"):
        what = what.replace("the specified", "status of the specified")
    return what


def _tag(kind: KindInfo) -> str:
    group = kind.group.removesuffix(".k8s.io") if kind.group else "core"
    return f"{group.replace('.', '')}_{kind.version}"


def openapi_v2(
    registry: Registry, schemas: SchemaSet, *, title: str = TITLE, version: str = VERSION
) -> Obj:
    """The Swagger 2.0 document of every registered kind (served at ``/openapi/v2``)."""
    kinds = registry.kinds
    definitions = {name: _v2_schema(s) for name, s in
                   _kind_definitions(kinds, schemas, _V2_PREFIX).items()}
    return {
        "swagger": "2.0",
        "info": {"title": title, "version": version},
        "paths": _path_items(kinds, schemas, _v2_operation, _v2_param),
        "definitions": definitions,
        "securityDefinitions": {"BearerToken": {
            "description": "Bearer token authentication", "type": "apiKey",
            "name": "authorization", "in": "header"}},
        "security": [{"BearerToken": []}],
    }


def _v2_schema(schema: Any) -> Any:
    """Make a schema plain Swagger 2.0: one ``type`` per schema (kubectl's parser insists)."""
    if isinstance(schema, list):
        return [_v2_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: Obj = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, list):
            types = [t for t in v if t != "null"]
            if len(types) == 1:
                out["type"] = types[0]
            continue
        if k in ("properties", "definitions") and isinstance(v, dict):
            out[k] = {pk: _v2_schema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf"):
            out[k] = _v2_schema(v)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# OpenAPI v3
# ------------------------------------------------------------------------------------------------

_V3_PREFIX: Final = "#/components/schemas/"


def _v3_param(name: str, where: str, required: bool) -> Obj:
    param: Obj = {"name": name, "in": where, "description": _PARAM_TEXT.get(name, name),
                  "schema": {"type": _PARAM_TYPES.get(name, "string"), "uniqueItems": True}}
    if required:
        param["required"] = True
    return param


def _v3_operation(op: _Op) -> Obj:
    out: Obj = {
        "tags": [_tag(op.kind)],
        "description": _describe(op),
        "operationId": op.op_id,
    }
    if op.query:
        out["parameters"] = [_v3_param(q, "query", False) for q in op.query]
    if op.body is not None:
        body_schema = _ref(_V3_PREFIX, op.body)
        content_types = patch_types(op.kind) if op.patch else ["*/*"]
        out["requestBody"] = {
            "content": {ct: {"schema": body_schema} for ct in content_types},
            "required": op.method != "delete",
        }
    responses: Obj = {}
    for code in (op.status_code, *op.extra_codes):
        response: Obj = {"description": _CODE_TEXT[code]}
        if op.response is not None:
            schema = _ref(_V3_PREFIX, op.response)
            types = [*RESPONSE_TYPES]
            if op.action == "list":
                types.append("application/json;stream=watch")
            response["content"] = {ct: {"schema": schema} for ct in types}
        responses[code] = response
    responses["401"] = {"description": "Unauthorized"}
    out["responses"] = responses
    out[ACTION_EXTENSION] = op.action
    out[GVK_EXTENSION] = _gvk(op.kind)
    return out


def _v3_schema(schema: Any) -> Any:
    """Turn a Swagger 2.0 schema into OpenAPI 3.0 (refs are already rewritten).

    A ``$ref`` with siblings becomes ``allOf: [{$ref}]`` (3.0 ignores siblings of a ``$ref``),
    ``type`` lists become ``nullable`` and ``anyOf``.
    """
    if isinstance(schema, list):
        return [_v3_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: Obj = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, list):
            types = [t for t in v if t != "null"]
            if len(types) != len(v):
                out["nullable"] = True
            if len(types) == 1:
                out["type"] = types[0]
            elif types:
                out["anyOf"] = [{"type": t} for t in types]
            continue
        if k == "properties" and isinstance(v, dict):
            out[k] = {pk: _v3_schema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf"):
            out[k] = _v3_schema(v)
        else:
            out[k] = v
    ref = out.get("$ref")
    if isinstance(ref, str) and len(out) > 1:
        del out["$ref"]
        out = {"allOf": [{"$ref": ref}], **out}
    return out


def openapi_v3_group_version(
    registry: Registry, schemas: SchemaSet, group: str, version: str, *,
    title: str = TITLE, version_text: str = VERSION,
) -> Obj | None:
    """The OpenAPI 3.0 document of one group version, or None if nothing is served there."""
    kinds = registry.in_group_version(group, version)
    if not kinds:
        return None
    components = {name: _v3_schema(s) for name, s in
                  _kind_definitions(kinds, schemas, _V3_PREFIX).items()}
    return {
        "openapi": "3.0.0",
        "info": {"title": title, "version": version_text},
        "paths": _path_items(kinds, schemas, _v3_operation, _v3_param),
        "components": {
            "schemas": components,
            "securitySchemes": {"BearerToken": {
                "type": "apiKey", "description": "Bearer token authentication",
                "name": "authorization", "in": "header"}},
        },
        "security": [{"BearerToken": []}],
    }


def document_hash(doc: Obj) -> str:
    """A stable hash of a document (upper-case hex SHA-512 of its canonical JSON)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha512(canonical.encode()).hexdigest().upper()


def openapi_v3_index(registry: Registry, schemas: SchemaSet) -> Obj:
    """The ``/openapi/v3`` discovery document: one entry per served group version."""
    paths: Obj = {}
    for group, versions in registry.groups().items():
        for version in versions:
            doc = openapi_v3_group_version(registry, schemas, group, version)
            if doc is None:
                continue
            key = group_version_key(group, version)
            paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={document_hash(doc)}"}
    return {"paths": paths}


# ------------------------------------------------------------------------------------------------
# OpenAPI v2 as a gnostic protobuf (openapi_v2.Document)
# ------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag_bytes(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _tag_bytes(field, 2) + _varint(len(payload)) + payload


def _pb_str(field: int, value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        return b""
    return _pb_bytes(field, value.encode())


def _pb_strs(field: int, values: Any) -> bytes:
    if not isinstance(values, list):
        return b""
    return b"".join(_pb_bytes(field, v.encode()) for v in values if isinstance(v, str))


def _pb_bool(field: int, value: Any) -> bytes:
    return _tag_bytes(field, 0) + b"\x01" if value is True else b""


def _pb_int(field: int, value: Any) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        return b""
    return _tag_bytes(field, 0) + _varint(value)


def _pb_double(field: int, value: Any) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return b""
    return _tag_bytes(field, 1) + struct.pack("<d", float(value))


def _pb_msg(field: int, payload: bytes, *, always: bool = False) -> bytes:
    return _pb_bytes(field, payload) if payload or always else b""


def _pb_any(value: Any) -> bytes:
    """An ``openapi_v2.Any``: the value as YAML text (JSON is YAML)."""
    return _pb_str(2, json.dumps(value, separators=(",", ":")))


def _pb_named_any(field: int, name: str, value: Any) -> bytes:
    return _pb_bytes(field, _pb_str(1, name) + _pb_bytes(2, _pb_any(value)))


def _pb_extensions(field: int, obj: Obj) -> bytes:
    return b"".join(_pb_named_any(field, k, v) for k, v in obj.items() if k.startswith("x-"))


def _pb_schema(schema: Obj) -> bytes:
    out = [
        _pb_str(1, schema.get("$ref")),
        _pb_str(2, schema.get("format")),
        _pb_str(3, schema.get("title")),
        _pb_str(4, schema.get("description")),
    ]
    if "default" in schema:
        out.append(_pb_bytes(5, _pb_any(schema["default"])))
    out += [
        _pb_double(6, schema.get("multipleOf")),
        _pb_double(7, schema.get("maximum")),
        _pb_bool(8, schema.get("exclusiveMaximum")),
        _pb_double(9, schema.get("minimum")),
        _pb_bool(10, schema.get("exclusiveMinimum")),
        _pb_int(11, schema.get("maxLength")),
        _pb_int(12, schema.get("minLength")),
        _pb_str(13, schema.get("pattern")),
        _pb_int(14, schema.get("maxItems")),
        _pb_int(15, schema.get("minItems")),
        _pb_bool(16, schema.get("uniqueItems")),
        _pb_int(17, schema.get("maxProperties")),
        _pb_int(18, schema.get("minProperties")),
        _pb_strs(19, schema.get("required")),
    ]
    enum = schema.get("enum")
    if isinstance(enum, list):
        out.extend(_pb_bytes(20, _pb_any(e)) for e in enum)
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        out.append(_pb_bytes(21, _pb_bytes(1, _pb_schema(additional))))
    elif isinstance(additional, bool):
        out.append(_pb_bytes(21, _tag_bytes(2, 0) + (b"\x01" if additional else b"\x00")))
    kind = schema.get("type")
    if isinstance(kind, str):
        out.append(_pb_bytes(22, _pb_str(1, kind)))
    elif isinstance(kind, list):
        out.append(_pb_bytes(22, _pb_strs(1, kind)))
    items = schema.get("items")
    if isinstance(items, dict):
        out.append(_pb_bytes(23, _pb_bytes(1, _pb_schema(items))))
    all_of = schema.get("allOf")
    if isinstance(all_of, list):
        out.extend(_pb_bytes(24, _pb_schema(s)) for s in all_of if isinstance(s, dict))
    props = schema.get("properties")
    if isinstance(props, dict):
        out.append(_pb_bytes(25, b"".join(
            _pb_bytes(1, _pb_str(1, k) + _pb_bytes(2, _pb_schema(v)))
            for k, v in props.items() if isinstance(v, dict))))
    out.append(_pb_str(26, schema.get("discriminator")))
    out.append(_pb_bool(27, schema.get("readOnly")))
    if "example" in schema:
        out.append(_pb_bytes(30, _pb_any(schema["example"])))
    out.append(_pb_extensions(31, schema))
    return b"".join(out)


def _pb_parameter(param: Obj) -> bytes:
    where = param.get("in")
    if where == "body":
        body = (_pb_str(1, param.get("description")) + _pb_str(2, param.get("name"))
                + _pb_str(3, where) + _pb_bool(4, param.get("required")))
        schema = param.get("schema")
        if isinstance(schema, dict):
            body += _pb_bytes(5, _pb_schema(schema))
        body += _pb_extensions(6, param)
        parameter = _pb_bytes(1, body)
    else:
        common = (_pb_bool(1, param.get("required")) + _pb_str(2, where)
                  + _pb_str(3, param.get("description")) + _pb_str(4, param.get("name")))
        if where == "query":
            sub = (common + _pb_str(6, param.get("type")) + _pb_str(7, param.get("format"))
                   + _pb_bool(20, param.get("uniqueItems")) + _pb_extensions(23, param))
            which = 3
        elif where == "path":
            sub = (common + _pb_str(5, param.get("type")) + _pb_str(6, param.get("format"))
                   + _pb_bool(19, param.get("uniqueItems")) + _pb_extensions(22, param))
            which = 4
        else:  # header
            sub = (common + _pb_str(5, param.get("type")) + _pb_str(6, param.get("format"))
                   + _pb_extensions(22, param))
            which = 1
        parameter = _pb_bytes(2, _pb_bytes(which, sub))
    return _pb_bytes(1, parameter)  # ParametersItem.parameter


def _pb_operation(op: Obj) -> bytes:
    out = [
        _pb_strs(1, op.get("tags")),
        _pb_str(2, op.get("summary")),
        _pb_str(3, op.get("description")),
        _pb_str(5, op.get("operationId")),
        _pb_strs(6, op.get("produces")),
        _pb_strs(7, op.get("consumes")),
    ]
    for param in op.get("parameters") or []:
        if isinstance(param, dict):
            out.append(_pb_bytes(8, _pb_parameter(param)))
    responses = op.get("responses")
    if isinstance(responses, dict):
        codes = b""
        for code, response in responses.items():
            if not isinstance(response, dict):
                continue
            body = _pb_str(1, response.get("description"))
            schema = response.get("schema")
            if isinstance(schema, dict):
                body += _pb_bytes(2, _pb_bytes(1, _pb_schema(schema)))
            body += _pb_extensions(5, response)
            value = _pb_bytes(1, body)  # ResponseValue.response
            codes += _pb_bytes(1, _pb_str(1, code) + _pb_bytes(2, value))
        out.append(_pb_msg(9, codes, always=True))
    out.append(_pb_strs(10, op.get("schemes")))
    out.append(_pb_bool(11, op.get("deprecated")))
    out.append(_pb_extensions(13, op))
    return b"".join(out)


_PATH_ITEM_FIELDS: Final = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6,
                            "head": 7, "patch": 8}


def _pb_path_item(item: Obj) -> bytes:
    out = []
    for method, field in _PATH_ITEM_FIELDS.items():
        op = item.get(method)
        if isinstance(op, dict):
            out.append(_pb_bytes(field, _pb_operation(op)))
    for param in item.get("parameters") or []:
        if isinstance(param, dict):
            out.append(_pb_bytes(9, _pb_parameter(param)))
    out.append(_pb_extensions(10, item))
    return b"".join(out)


def openapi_v2_protobuf(doc: Obj) -> bytes:
    """Encode a Swagger 2.0 document as a gnostic ``openapi_v2.Document`` protobuf.

    Served at ``/openapi/v2`` for ``Accept: application/com.github.proto-openapi.spec.v2@v1.0
    +protobuf``. Info, paths (operations, parameters, responses, vendor extensions) and
    definitions are encoded; security sections are left out.
    """
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    assert isinstance(info, dict)
    info_bytes = (_pb_str(1, info.get("title")) + _pb_str(2, info.get("version"))
                  + _pb_str(3, info.get("description")))
    paths = doc.get("paths") if isinstance(doc.get("paths"), dict) else {}
    assert isinstance(paths, dict)
    paths_bytes = b"".join(
        _pb_bytes(2, _pb_str(1, name) + _pb_bytes(2, _pb_path_item(item)))
        for name, item in paths.items() if isinstance(item, dict)
    )
    definitions = doc.get("definitions") if isinstance(doc.get("definitions"), dict) else {}
    assert isinstance(definitions, dict)
    definitions_bytes = b"".join(
        _pb_bytes(1, _pb_str(1, name) + _pb_bytes(2, _pb_schema(schema)))
        for name, schema in definitions.items() if isinstance(schema, dict)
    )
    return b"".join([
        _pb_str(1, doc.get("swagger") or "2.0"),
        _pb_bytes(2, info_bytes),
        _pb_strs(5, doc.get("schemes")),
        _pb_strs(6, doc.get("consumes")),
        _pb_strs(7, doc.get("produces")),
        _pb_bytes(8, paths_bytes),
        _pb_msg(9, definitions_bytes),
        _pb_extensions(16, doc),
    ])
