"""Unit tests of the published OpenAPI documents (virtshift.apiserver.openapi)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.api.schema import SchemaSet, default_schemas
from virtshift.apiserver.openapi import (
    APPLY_PATCH,
    GVK_EXTENSION,
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    collection_path,
    document_hash,
    group_version_key,
    kind_schema_name,
    openapi_v2,
    openapi_v2_protobuf,
    openapi_v3_group_version,
    openapi_v3_index,
)

Obj = dict[str, Any]
GROUP_VERSIONS = [(g, v) for g, versions in REGISTRY.groups().items() for v in versions]
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def schemas() -> SchemaSet:
    return default_schemas()


@pytest.fixture(scope="module")
def v3_docs(schemas: SchemaSet) -> dict[tuple[str, str], Obj]:
    out = {}
    for group, version in GROUP_VERSIONS:
        doc = openapi_v3_group_version(REGISTRY, schemas, group, version)
        assert doc is not None
        out[(group, version)] = doc
    return out


@pytest.fixture(scope="module")
def v2_doc(schemas: SchemaSet) -> Obj:
    return openapi_v2(REGISTRY, schemas)


def _kind(group: str, version: str, kind: str) -> KindInfo:
    info = REGISTRY.by_kind(group, version, kind)
    assert info is not None
    return info


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str):
            yield ref
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def _operations(doc: Obj) -> Iterator[tuple[str, str, Obj]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _query_params(op: Obj) -> set[str]:
    return {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}


# ---- OpenAPI v3 ----------------------------------------------------------------------------------


def test_v3_index_lists_every_group_version(schemas: SchemaSet,
                                            v3_docs: dict[tuple[str, str], Obj]) -> None:
    index = openapi_v3_index(REGISTRY, schemas)
    assert set(index["paths"]) == {group_version_key(g, v) for g, v in GROUP_VERSIONS}
    assert "api/v1" in index["paths"] and "apis/kubevirt.io/v1" in index["paths"]
    for (group, version), doc in v3_docs.items():
        url = index["paths"][group_version_key(group, version)]["serverRelativeURL"]
        assert url == (f"/openapi/v3/{group_version_key(group, version)}"
                       f"?hash={document_hash(doc)}")
    assert openapi_v3_index(REGISTRY, schemas) == index  # stable


def test_v3_unknown_group_version(schemas: SchemaSet) -> None:
    assert openapi_v3_group_version(REGISTRY, schemas, "nope.io", "v1") is None
    assert openapi_v3_group_version(REGISTRY, schemas, "kubevirt.io", "v2") is None


def test_v3_paths_of_a_namespaced_custom_kind(v3_docs: dict[tuple[str, str], Obj]) -> None:
    doc = v3_docs[("kubevirt.io", "v1")]
    assert doc["openapi"].startswith("3.0")
    base = "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"
    paths = doc["paths"]
    assert set(paths[base]) >= {"get", "post", "delete", "parameters"}
    assert set(paths[base + "/{name}"]) >= {"get", "put", "patch", "delete"}
    assert set(paths[base + "/{name}/status"]) >= {"get", "put", "patch"}
    assert "get" in paths["/apis/kubevirt.io/v1/virtualmachines"]  # all namespaces

    patch = paths[base + "/{name}"]["patch"]
    gvk = {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachine"}
    assert patch[GVK_EXTENSION] == gvk
    assert patch["x-kubernetes-action"] == "patch"
    assert _query_params(patch) >= {"dryRun", "fieldManager", "fieldValidation", "force"}
    assert list(patch["requestBody"]["content"]) == [JSON_PATCH, MERGE_PATCH, APPLY_PATCH]
    assert paths[base]["get"]["x-kubernetes-action"] == "list"
    assert paths[base]["post"]["x-kubernetes-action"] == "post"
    item_params = {p["name"] for p in paths[base + "/{name}"]["parameters"]}
    assert item_params >= {"name", "namespace"}


def test_v3_paths_of_core_kinds(v3_docs: dict[tuple[str, str], Obj]) -> None:
    doc = v3_docs[("", "v1")]
    paths = doc["paths"]
    ns_patch = paths["/api/v1/namespaces/{name}"]["patch"]
    assert ns_patch[GVK_EXTENSION] == {"group": "", "version": "v1", "kind": "Namespace"}
    assert STRATEGIC_MERGE_PATCH in ns_patch["requestBody"]["content"]
    assert "/api/v1/namespaces/{name}/status" in paths  # Namespace has status
    assert "/api/v1/namespaces/{namespace}/configmaps/{name}" in paths
    assert "/api/v1/namespaces/{namespace}/configmaps/{name}/status" not in paths
    assert "/api/v1/nodes/{name}/status" in paths
    sc = v3_docs[("storage.k8s.io", "v1")]["paths"]
    assert "/apis/storage.k8s.io/v1/storageclasses/{name}" in sc
    assert "/apis/storage.k8s.io/v1/storageclasses/{name}/status" not in sc


def test_v3_every_operation_is_annotated(v3_docs: dict[tuple[str, str], Obj]) -> None:
    for (group, version), doc in v3_docs.items():
        kinds = {k.kind for k in REGISTRY.in_group_version(group, version)}
        for path, method, op in _operations(doc):
            gvk = op[GVK_EXTENSION]
            assert (gvk["group"], gvk["version"]) == (group, version), path
            assert gvk["kind"] in kinds
            assert op["x-kubernetes-action"] in {
                "get", "list", "post", "put", "patch", "delete", "deletecollection"}
            if method in ("post", "put", "patch"):
                assert _query_params(op) >= {"dryRun", "fieldManager", "fieldValidation"}, path
            if method == "patch":
                assert "force" in _query_params(op)
                kind = _kind(gvk["group"], gvk["version"], gvk["kind"])
                assert (STRATEGIC_MERGE_PATCH in op["requestBody"]["content"]) == kind.builtin


def test_v3_paths_follow_scope() -> None:
    for kind in REGISTRY.kinds:
        path = collection_path(kind)
        prefix = f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"
        assert path.startswith(prefix)
        assert ("/namespaces/{namespace}/" in path) == kind.namespaced
        assert path.endswith("/" + kind.plural)


def test_v3_refs_resolve_inside_each_document(v3_docs: dict[tuple[str, str], Obj]) -> None:
    for doc in v3_docs.values():
        components = doc["components"]["schemas"]
        for ref in _refs(doc):
            assert ref.startswith("#/components/schemas/"), ref
            assert ref.removeprefix("#/components/schemas/") in components, ref


def test_v3_kind_schemas_carry_their_gvk(schemas: SchemaSet,
                                         v3_docs: dict[tuple[str, str], Obj]) -> None:
    for (group, version), doc in v3_docs.items():
        components = doc["components"]["schemas"]
        for kind in REGISTRY.in_group_version(group, version):
            schema = components[kind_schema_name(kind, schemas)]
            gvk = {"group": group, "version": version, "kind": kind.kind}
            assert gvk in schema[GVK_EXTENSION]
            assert {"apiVersion", "kind", "metadata"} <= set(schema["properties"])
            listed = components[kind_schema_name(kind, schemas) + "List"]
            assert listed[GVK_EXTENSION] == [{**gvk, "kind": kind.list_kind}]


def test_v3_documents_are_openapi_3(v3_docs: dict[tuple[str, str], Obj]) -> None:
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            assert not isinstance(value.get("type"), list), value
            if "$ref" in value:
                assert len(value) == 1, value  # siblings go into allOf
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for doc in v3_docs.values():
        walk(doc["components"]["schemas"])


def test_v3_kind_without_schema_is_permissive(schemas: SchemaSet,
                                              v3_docs: dict[tuple[str, str], Obj]) -> None:
    kind = _kind("hco.kubevirt.io", "v1beta1", "HyperConverged")
    name = kind_schema_name(kind, schemas)
    assert name == "io.kubevirt.hco.v1beta1.HyperConverged"
    schema = v3_docs[("hco.kubevirt.io", "v1beta1")]["components"]["schemas"][name]
    assert schema["type"] == "object"
    assert schema["x-kubernetes-preserve-unknown-fields"] is True
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata"}


def test_v3_metadata_is_the_core_object_meta(v3_docs: dict[tuple[str, str], Obj]) -> None:
    meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    for doc in v3_docs.values():
        assert meta in doc["components"]["schemas"]
    components = v3_docs[("kubevirt.io", "v1")]["components"]["schemas"]
    vm = components["io.kubevirt.v1.VirtualMachine"]
    assert vm["properties"]["metadata"]["allOf"] == [{"$ref": "#/components/schemas/" + meta}]
    assert not any(n.startswith("io.kubevirt.k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta")
                   for n in components)


# ---- OpenAPI v2 ----------------------------------------------------------------------------------


def test_v2_document(schemas: SchemaSet, v2_doc: Obj) -> None:
    assert v2_doc["swagger"] == "2.0"
    assert v2_doc["info"]["title"] and v2_doc["info"]["version"]
    definitions = v2_doc["definitions"]
    for ref in _refs(v2_doc):
        assert ref.removeprefix("#/definitions/") in definitions, ref
    for kind in REGISTRY.kinds:
        gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
        assert gvk in definitions[kind_schema_name(kind, schemas)][GVK_EXTENSION]
    patches = [op for _, method, op in _operations(v2_doc) if method == "patch"]
    assert len(patches) >= len(REGISTRY.kinds)
    for op in patches:
        assert "fieldValidation" in _query_params(op)
        assert GVK_EXTENSION in op
    vm_patch = v2_doc["paths"]["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}"]
    assert vm_patch["patch"]["consumes"] == [JSON_PATCH, MERGE_PATCH, APPLY_PATCH]


def test_v2_has_one_type_per_schema(v2_doc: Obj) -> None:
    # kubectl's OpenAPI v2 parser rejects a definition with several types.
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            assert not isinstance(value.get("type"), list), value
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(v2_doc["definitions"])


# ---- OpenAPI v2 protobuf -------------------------------------------------------------------------

Fields = list[tuple[int, Any]]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _decode(data: bytes) -> Fields:
    """Decode one protobuf message into (field number, raw value) pairs."""
    out: Fields = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            out.append((field, value))
        elif wire == 1:
            out.append((field, struct.unpack("<d", data[pos:pos + 8])[0]))
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            out.append((field, data[pos:pos + length]))
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    assert pos == len(data)
    return out


def _one(fields: Fields, number: int) -> Any:
    values = [v for f, v in fields if f == number]
    assert len(values) == 1, (number, fields)
    return values[0]


def _all(fields: Fields, number: int) -> list[Any]:
    return [v for f, v in fields if f == number]


def test_protobuf_minimal_document() -> None:
    data = openapi_v2_protobuf({"swagger": "2.0", "info": {"title": "T", "version": "v1"},
                                "paths": {}})
    assert data == b"\x0a\x032.0" + b"\x12\x07\x0a\x01T\x12\x02v1" + b"\x42\x00"


def test_protobuf_document_decodes(v2_doc: Obj) -> None:
    doc = _decode(openapi_v2_protobuf(v2_doc))
    assert _one(doc, 1) == b"2.0"
    info = _decode(_one(doc, 2))
    assert _one(info, 1).decode() == v2_doc["info"]["title"]
    assert _one(info, 2).decode() == v2_doc["info"]["version"]

    # Paths (8): NamedPathItem (2) {name (1), PathItem (2)}.
    named_paths = {}
    for raw in _all(_decode(_one(doc, 8)), 2):
        named = _decode(raw)
        named_paths[_one(named, 1).decode()] = _decode(_one(named, 2))
    assert set(named_paths) == set(v2_doc["paths"])

    # The PATCH operation (8) of a VM: vendor extensions (13) and the fieldValidation parameter.
    item = named_paths["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}"]
    patch = _decode(_one(item, 8))
    extensions = {}
    for raw in _all(patch, 13):
        named_any = _decode(raw)
        value = _decode(_one(named_any, 2))
        extensions[_one(named_any, 1).decode()] = json.loads(_one(value, 2))
    assert extensions[GVK_EXTENSION] == {"group": "kubevirt.io", "version": "v1",
                                         "kind": "VirtualMachine"}
    assert extensions["x-kubernetes-action"] == "patch"
    query_names = set()
    for raw in _all(patch, 8):  # ParametersItem
        parameter = _decode(_one(_decode(raw), 1))  # .parameter
        non_body = [v for f, v in parameter if f == 2]
        if non_body:
            query = [v for f, v in _decode(non_body[0]) if f == 3]
            if query:
                query_names.add(_one(_decode(query[0]), 4).decode())
    assert {"fieldValidation", "dryRun", "fieldManager", "force"} <= query_names

    # Definitions (9): NamedSchema (1) {name (1), Schema (2)}.
    definitions = {}
    for raw in _all(_decode(_one(doc, 9)), 1):
        named = _decode(raw)
        definitions[_one(named, 1).decode()] = _decode(_one(named, 2))
    assert set(definitions) == set(v2_doc["definitions"])
    vm = definitions["io.kubevirt.v1.VirtualMachine"]
    assert _one(_decode(_one(vm, 22)), 1) == b"object"  # type
    assert _all(vm, 19) == [b"spec"]  # required
    props = {}
    for raw in _all(_decode(_one(vm, 25)), 1):
        named = _decode(raw)
        props[_one(named, 1).decode()] = _decode(_one(named, 2))
    assert set(props) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert _one(props["spec"], 1) == b"#/definitions/io.kubevirt.v1.VirtualMachineSpec"
    gvk = [_decode(raw) for raw in _all(vm, 31)]
    assert [_one(g, 1) for g in gvk] == [GVK_EXTENSION.encode()]
    assert json.loads(_one(_decode(_one(gvk[0], 2)), 2)) == [
        {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachine"}]


def test_protobuf_negative_and_boolean_values() -> None:
    data = openapi_v2_protobuf({
        "swagger": "2.0", "info": {"title": "T", "version": "v"}, "paths": {},
        "definitions": {"X": {"type": "object", "minLength": -1, "uniqueItems": True,
                              "maximum": 2.5, "additionalProperties": False}},
    })
    doc = _decode(data)
    schema = _decode(_one(_decode(_one(_decode(_one(doc, 9)), 1)), 2))
    assert _one(schema, 12) == (1 << 64) - 1  # int64 -1 as a ten-byte varint
    assert _one(schema, 16) == 1
    assert _one(schema, 7) == 2.5
    assert _decode(_one(schema, 21)) == [(2, 0)]
