"""Unit tests of schema loading and validation (virtshift.api.schema)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtshift.api.kinds import (
    CORE_SCHEMA_SOURCE,
    REGISTRY,
    KindInfo,
)
from virtshift.api.schema import (
    CORE_SCHEMA_FILE,
    OPENAPI_DIR_ENV,
    SchemaError,
    SchemaSet,
    default_schemas,
    find_openapi_dir,
)
from virtshift.errors import BadRequest, FieldError, Invalid

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "kubevirt-examples"
Obj = dict[str, Any]


def _examples() -> list[tuple[str, Obj]]:
    out = []
    for path in sorted(CORPUS.rglob("*.yaml")):
        with path.open() as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc:
                    out.append((f"{path.relative_to(CORPUS)}#{i}", doc))
    return out


EXAMPLES = _examples()


def _kind(api_version: str, kind: str) -> KindInfo:
    info = REGISTRY.by_api_version(api_version, kind)
    assert info is not None, (api_version, kind)
    return info


VM = _kind("kubevirt.io/v1", "VirtualMachine")
VMI = _kind("kubevirt.io/v1", "VirtualMachineInstance")
HCO = _kind("hco.kubevirt.io/v1beta1", "HyperConverged")
PVC = _kind("v1", "PersistentVolumeClaim")
NODE = _kind("v1", "Node")
SECRET = _kind("v1", "Secret")
EVENT = _kind("v1", "Event")
DV = _kind("cdi.kubevirt.io/v1beta1", "DataVolume")


@pytest.fixture(scope="module")
def schemas() -> SchemaSet:
    return default_schemas()


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _vm() -> Obj:
    with (CORPUS / "vm-cirros.yaml").open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc


def _invalid(schemas: SchemaSet, kind: KindInfo, obj: Obj, mode: str = "Strict") -> Invalid:
    with pytest.raises(Invalid) as info:
        schemas.validate(kind, obj, field_validation=mode)
    return info.value


def _by_field(err: Invalid) -> dict[str, FieldError]:
    return {c.field: c for c in err.causes}


# ---- the conformance corpus ------------------------------------------------------------------


def test_corpus_is_present() -> None:
    assert len(EXAMPLES) >= 30


@pytest.mark.parametrize(("name", "doc"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_every_example_validates_strictly(schemas: SchemaSet, name: str, doc: Obj) -> None:
    kind = _kind(doc["apiVersion"], doc["kind"])
    original = copy.deepcopy(doc)
    pruned, warnings = schemas.validate(kind, doc, field_validation="Strict")
    assert warnings == []
    assert doc == original  # the input is left alone
    # Nothing is pruned but nulls in non-nullable fields.
    assert _drop_nulls(pruned) == _drop_nulls(doc)


def test_kind_without_schema_accepts_anything(schemas: SchemaSet) -> None:
    assert HCO.schema is None
    obj = {"apiVersion": "hco.kubevirt.io/v1beta1", "kind": "HyperConverged",
           "metadata": {"name": "x", "whatever": 1}, "spec": {"foo": [1, {"b": None}]}}
    pruned, warnings = schemas.validate(HCO, obj)
    assert pruned == obj and warnings == []
    assert pruned is not obj and pruned["spec"] is not obj["spec"]


def test_every_kind_schema_resolves(schemas: SchemaSet) -> None:
    for kind in REGISTRY.kinds:
        key = schemas.kind_definition(kind)
        if kind.schema is None:
            assert key is None
            continue
        assert key is not None
        assert schemas.closure([key])  # every $ref on the way resolves


# ---- typed errors --------------------------------------------------------------------------------


def test_type_error_message(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["spec"]["running"] = "yes"
    err = _invalid(schemas, VM, vm)
    assert err.code == 422 and err.reason == "Invalid"
    assert err.kind == "VirtualMachine" and err.group == "kubevirt.io" and err.name == "vm-cirros"
    [cause] = err.causes
    assert cause.type == "FieldValueTypeInvalid"
    assert cause.field == "spec.running"
    assert cause.text() == (
        'spec.running: Invalid value: "string": spec.running in body must be of type '
        'boolean: "string"'
    )
    assert err.message == (
        'VirtualMachine.kubevirt.io "vm-cirros" is invalid: spec.running: Invalid value: '
        '"string": spec.running in body must be of type boolean: "string"'
    )


def test_required_value(schemas: SchemaSet) -> None:
    vm = _vm()
    del vm["spec"]["template"]
    err = _invalid(schemas, VM, vm)
    assert [c.text() for c in err.causes] == ["spec.template: Required value"]
    assert err.causes[0].type == "FieldValueRequired"


def test_status_is_never_required(schemas: SchemaSet) -> None:
    obj = {"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
           "metadata": {"name": "t"}, "spec": {"pvcName": "p"}}
    kind = _kind("upload.cdi.kubevirt.io/v1beta1", "UploadTokenRequest")
    assert schemas.validate(kind, obj)[0] == obj


def test_error_paths_inside_arrays(schemas: SchemaSet) -> None:
    vm = _vm()
    disks = vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
    disks[0]["name"] = 7
    del disks[1]["name"]
    err = _invalid(schemas, VM, vm)
    fields = _by_field(err)
    assert set(fields) == {
        "spec.template.spec.domain.devices.disks[0].name",
        "spec.template.spec.domain.devices.disks[1].name",
    }
    assert fields["spec.template.spec.domain.devices.disks[0].name"].message == (
        '"integer": spec.template.spec.domain.devices.disks[0].name in body must be of type '
        'string: "integer"'
    )
    assert fields["spec.template.spec.domain.devices.disks[1].name"].type == "FieldValueRequired"


def test_enum(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["spec"]["template"]["spec"]["dnsPolicy"] = "Sometimes"
    [cause] = _invalid(schemas, VM, vm).causes
    assert cause.type == "FieldValueNotSupported"
    assert cause.text() == (
        'spec.template.spec.dnsPolicy: Unsupported value: "Sometimes": supported values: '
        '"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"'
    )


def test_all_errors_are_collected(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["spec"]["running"] = 1
    vm["spec"]["bogus"] = True
    vm["metadata"]["labels"]["n"] = 5
    vm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "soon"
    err = _invalid(schemas, VM, vm)
    assert set(_by_field(err)) == {
        "spec.running", "spec.bogus", "metadata.labels.n",
        "spec.template.spec.terminationGracePeriodSeconds",
    }
    assert err.message.startswith('VirtualMachine.kubevirt.io "vm-cirros" is invalid: [')
    status = err.status()
    assert len(status["details"]["causes"]) == 4


def test_wrong_container_types(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["spec"]["template"]["spec"]["volumes"] = {"a": 1}
    vm["spec"]["template"]["spec"]["domain"]["devices"] = ["x"]
    fields = _by_field(_invalid(schemas, VM, vm))
    assert fields["spec.template.spec.volumes"].message.endswith(
        'must be of type array: "object"')
    assert fields["spec.template.spec.domain.devices"].message.endswith(
        'must be of type object: "array"')


def test_integers(schemas: SchemaSet) -> None:
    vm = _vm()
    spec = vm["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = 30.0  # an integral float is an integer
    pruned, _ = schemas.validate(VM, vm)
    value = pruned["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert value == 30 and isinstance(value, int)
    spec["terminationGracePeriodSeconds"] = 1.5
    assert _by_field(_invalid(schemas, VM, vm))[
        "spec.template.spec.terminationGracePeriodSeconds"].message.endswith(
        'must be of type integer: "number"')
    spec["terminationGracePeriodSeconds"] = True
    assert _invalid(schemas, VM, vm).causes[0].message.endswith('"boolean"')


def test_int32_range(schemas: SchemaSet) -> None:
    vmi: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "metadata": {"name": "v"},
                "spec": {"domain": {"devices": {}, "clock": {"utc": {"offsetSeconds": 2**31}}}}}
    [cause] = _invalid(schemas, VMI, vmi).causes
    assert cause.field == "spec.domain.clock.utc.offsetSeconds"
    assert cause.message == ("2147483648: spec.domain.clock.utc.offsetSeconds in body should be "
                             "less than or equal to 2147483647")
    vmi["spec"]["domain"]["clock"]["utc"]["offsetSeconds"] = -(2**31)
    schemas.validate(VMI, vmi)


def test_quantities(schemas: SchemaSet) -> None:
    vm = _vm()
    memory = vm["spec"]["template"]["spec"]["domain"]["memory"]
    for ok in ("128Mi", "1G", "1.5Gi", "500m", "1e3", 1024, 1.5):
        memory["guest"] = ok
        assert schemas.validate(VM, vm)[0]["spec"]["template"]["spec"]["domain"]["memory"][
            "guest"] == ok
    for bad in ("12xx", "Mi", "1.5 Gi"):
        memory["guest"] = bad
        [cause] = _invalid(schemas, VM, vm).causes
        assert cause.type == "FieldValueInvalid"
        assert cause.field == "spec.template.spec.domain.memory.guest"
        assert "in body should match" in cause.message
    memory["guest"] = True
    assert _invalid(schemas, VM, vm).causes[0].type == "FieldValueTypeInvalid"


def test_nulls(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["metadata"]["creationTimestamp"] = None
    vm["spec"]["running"] = None
    vm["status"] = None  # VirtualMachineStatus is nullable
    pruned, _ = schemas.validate(VM, vm)
    assert "running" not in pruned["spec"]
    assert pruned["status"] is None
    vm["spec"]["template"] = None  # a pruned null counts as missing
    assert _invalid(schemas, VM, vm).causes[0].text() == "spec.template: Required value"


def test_metadata_types_are_checked_and_unknown_metadata_pruned(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["metadata"]["annotations"] = {"a": "b"}
    vm["metadata"]["finalizers"] = ["x"]
    vm["metadata"]["colour"] = "blue"
    pruned, warnings = schemas.validate(VM, vm, field_validation="Warn")
    assert "colour" not in pruned["metadata"]
    assert pruned["metadata"]["annotations"] == {"a": "b"}
    assert warnings == ['unknown field "metadata.colour"']
    vm["metadata"]["finalizers"] = "x"
    vm["metadata"]["generation"] = "1"
    assert set(_by_field(_invalid(schemas, VM, vm))) == {
        "metadata.finalizers", "metadata.generation", "metadata.colour"}


def test_date_time_format(schemas: SchemaSet) -> None:
    vm = _vm()
    vm["metadata"]["creationTimestamp"] = "2024-05-01T10:00:00Z"
    schemas.validate(VM, vm)
    vm["metadata"]["creationTimestamp"] = "yesterday"
    [cause] = _invalid(schemas, VM, vm).causes
    assert cause.field == "metadata.creationTimestamp"
    assert cause.message == (
        '"yesterday": metadata.creationTimestamp in body must be of type date-time: "yesterday"')


# ---- unknown fields ------------------------------------------------------------------------------


def _vm_with_unknown_fields() -> Obj:
    vm = _vm()
    vm["spec"]["foo"] = 1
    vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"][0]["bar"] = {"x": 1}
    return vm


UNKNOWN = ['unknown field "spec.foo"',
           'unknown field "spec.template.spec.domain.devices.disks[0].bar"']


def test_unknown_fields_strict(schemas: SchemaSet) -> None:
    err = _invalid(schemas, VM, _vm_with_unknown_fields(), "Strict")
    assert [c.type for c in err.causes] == ["FieldValueUnknown", "FieldValueUnknown"]
    assert sorted(c.text() for c in err.causes) == sorted(UNKNOWN)
    assert {c["field"] for c in err.status()["details"]["causes"]} == {
        "spec.foo", "spec.template.spec.domain.devices.disks[0].bar"}


def test_unknown_fields_warn(schemas: SchemaSet) -> None:
    pruned, warnings = schemas.validate(VM, _vm_with_unknown_fields(), field_validation="Warn")
    assert sorted(warnings) == sorted(UNKNOWN)
    assert pruned == _vm()


def test_unknown_fields_ignore(schemas: SchemaSet) -> None:
    pruned, warnings = schemas.validate(VM, _vm_with_unknown_fields(), field_validation="Ignore")
    assert warnings == []
    assert pruned == _vm()


def test_unknown_fields_and_real_errors_together(schemas: SchemaSet) -> None:
    vm = _vm_with_unknown_fields()
    vm["spec"]["running"] = "no"
    err = _invalid(schemas, VM, vm, "Warn")  # Warn still rejects type errors
    assert [c.field for c in err.causes] == ["spec.running"]


def test_empty_structs_prune_everything(schemas: SchemaSet) -> None:
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "v"},
           "spec": {"domain": {"devices": {"interfaces": [
               {"name": "default", "masquerade": {"mode": "x"}}]}}}}
    err = _invalid(schemas, VMI, vmi)
    assert [c.text() for c in err.causes] == [
        'unknown field "spec.domain.devices.interfaces[0].masquerade.mode"']


def test_bad_field_validation_directive(schemas: SchemaSet) -> None:
    with pytest.raises(BadRequest):
        schemas.validate(VM, _vm(), field_validation="strict")


def test_result_is_a_deep_copy(schemas: SchemaSet) -> None:
    vm = _vm()
    pruned, _ = schemas.validate(VM, vm)
    pruned["spec"]["template"]["spec"]["volumes"][0]["name"] = "changed"
    pruned["metadata"]["labels"]["new"] = "x"
    assert vm == _vm()


# ---- core kinds ----------------------------------------------------------------------------------


def test_core_kinds(schemas: SchemaSet) -> None:
    pvc: Obj = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "p"},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                         "resources": {"requests": {"storage": "1Gi"}},
                         "dataSourceRef": {"kind": "VolumeSnapshot", "name": "s",
                                           "apiGroup": "snapshot.storage.k8s.io"}},
                "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}
    assert schemas.validate(PVC, pvc)[0] == pvc
    pvc["spec"]["accessModes"] = ["ReadWriteSometimes"]
    [cause] = _invalid(schemas, PVC, pvc).causes
    assert cause.field == "spec.accessModes[0]" and cause.type == "FieldValueNotSupported"

    node: Obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
                 "spec": {"unschedulable": True, "taints": [{"key": "k", "effect": "NoSchedule"}]},
                 "status": {"capacity": {"cpu": "4", "memory": "8Gi"},
                            "allocatable": {"cpu": 4},
                            "conditions": [{"type": "Ready", "status": "True",
                                            "lastHeartbeatTime": "2024-01-01T00:00:00Z"}],
                            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                            "nodeInfo": {"architecture": "amd64"}}}
    err = _invalid(schemas, NODE, node)
    assert {c.field for c in err.causes} >= {"status.nodeInfo.machineID"}
    node["spec"]["taints"][0]["effect"] = "Maybe"
    assert "spec.taints[0].effect" in _by_field(_invalid(schemas, NODE, node))

    secret: Obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                   "type": "Opaque", "data": {"a": "aGVsbG8="}, "stringData": {"b": "plain"}}
    assert schemas.validate(SECRET, secret)[0] == secret
    secret["data"]["a"] = "not base64!"
    [cause] = _invalid(schemas, SECRET, secret).causes
    assert cause.field == "data.a"

    event: Obj = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e", "namespace": "d"},
                  "involvedObject": {"kind": "VirtualMachine", "name": "vm"}, "count": 2,
                  "eventTime": "2024-01-01T00:00:00.123456Z", "type": "Normal"}
    assert schemas.validate(EVENT, event)[0] == event
    del event["involvedObject"]
    assert _invalid(schemas, EVENT, event).causes[0].text() == "involvedObject: Required value"


def test_upstream_meta_types_resolve_to_core(schemas: SchemaSet) -> None:
    assert schemas.canonical("kubevirt", "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta") == (
        CORE_SCHEMA_SOURCE, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    assert schemas.canonical("cdi", "v1.ObjectMeta") == (
        CORE_SCHEMA_SOURCE, "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    assert schemas.canonical("cdi", "resource.Quantity") == (
        CORE_SCHEMA_SOURCE, "io.k8s.apimachinery.pkg.api.resource.Quantity")
    # CDI's own v1.Condition is not the apimachinery one.
    assert schemas.canonical("cdi", "v1.Condition") == ("cdi", "v1.Condition")
    assert schemas.public_name("cdi", "v1beta1.DataVolume") == "io.kubevirt.cdi.v1beta1.DataVolume"
    assert schemas.public_name("kubevirt", "v1.VirtualMachine") == "io.kubevirt.v1.VirtualMachine"
    # DataVolume templates inside a VM use the CDI-shaped spec of kubevirt's document.
    dv: Obj = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
               "metadata": {"name": "d", "labels": {"a": 1}},
               "spec": {"source": {"blank": {}}, "storage": {"resources": {
                   "requests": {"storage": "1Gi"}}}}}
    assert [c.field for c in _invalid(schemas, DV, dv).causes] == ["metadata.labels.a"]


# ---- schema features, on synthetic definitions ---------------------------------------------------


def _synthetic(extra: dict[str, Obj]) -> tuple[SchemaSet, KindInfo]:
    with CORE_SCHEMA_FILE.open() as f:
        core = json.load(f)["definitions"]
    kind = KindInfo("test.io", "v1", "Widget", "widgets", "widget", True,
                    schema=(CORE_SCHEMA_SOURCE, "test.Widget"))
    return SchemaSet({CORE_SCHEMA_SOURCE: {**core, **extra}}), kind


def _widget(spec: Obj) -> Obj:
    return {"apiVersion": "test.io/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": spec}


def test_schema_features() -> None:
    schemas, kind = _synthetic({
        "test.Widget": {"properties": {  # no "type": an object because it has properties
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": {"description": "with siblings", "$ref": "#/definitions/test.Spec"},
        }},
        "test.Spec": {"type": "object", "properties": {
            "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
            "port2": {"x-kubernetes-int-or-string": True},
            "raw": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.runtime.RawExtension"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"n": {"type": "integer"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "integer"}},
            "mixed": {"allOf": [{"$ref": "#/definitions/test.A"},
                                {"$ref": "#/definitions/test.B"}]},
            "child": {"$ref": "#/definitions/test.Spec"},  # recursive
            "anything": {"description": "no type at all"},
            "count": {"type": "integer", "format": "int32"},
            "ratio": {"type": "number"},
            "maybe": {"type": "string", "nullable": True},
            "when": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.Time"},
            "pattern": {"type": "string", "pattern": "^[a-z]+$"},
        }},
        "test.A": {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
        "test.B": {"type": "object", "properties": {"b": {"type": "boolean"}}},
    })
    good = _widget({
        "port": 80, "port2": "http", "raw": {"kind": "X", "any": [1, {"y": None}]},
        "free": {"n": 1, "other": {"deep": True}}, "labels": {"x": 1, "y": 2},
        "mixed": {"a": "s", "b": True}, "child": {"child": {"count": 3}},
        "anything": [1, "two"], "count": -5, "ratio": 1, "maybe": None,
        "when": "2024-01-01T00:00:00+02:00", "pattern": "abc",
    })
    assert schemas.validate(kind, good) == (good, [])

    bad = _widget({
        "port": 1.5, "port2": [], "free": {"n": "one", "other": 1}, "labels": {"x": "1"},
        "mixed": {"b": "no", "c": 1}, "child": {"child": {"count": 2**40, "zzz": 1}},
        "ratio": "1", "pattern": "ABC", "unknown": 1,
    })
    err = _invalid(schemas, kind, bad)
    fields = _by_field(err)
    assert set(fields) == {
        "spec.port", "spec.port2", "spec.free.n", "spec.labels.x", "spec.mixed.a",
        "spec.mixed.b", "spec.mixed.c", "spec.child.child.count", "spec.child.child.zzz",
        "spec.ratio", "spec.pattern", "spec.unknown",
    }
    assert fields["spec.port"].message == (
        '"number": spec.port in body must be of type integer,string: "number"')
    assert fields["spec.mixed.a"].type == "FieldValueRequired"
    assert fields["spec.child.child.zzz"].type == "FieldValueUnknown"
    assert fields["spec.pattern"].message == (
        "\"ABC\": spec.pattern in body should match '^[a-z]+$'")


def test_top_level_fields_always_known() -> None:
    schemas, kind = _synthetic({
        "test.Widget": {"type": "object", "properties": {"spec": {"type": "object"}}},
    })
    obj = _widget({})
    assert schemas.validate(kind, obj)[0] == obj


# ---- loading -------------------------------------------------------------------------------------


def test_load_from_explicit_directory() -> None:
    loaded = SchemaSet.load(find_openapi_dir())
    assert set(loaded.sources) == {"core", "kubevirt", "cdi"}


def test_missing_directory_is_a_clear_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SchemaError, match=r"kubevirt-swagger\.json"):
        SchemaSet.load(tmp_path)
    monkeypatch.setenv(OPENAPI_DIR_ENV, str(tmp_path))
    with pytest.raises(SchemaError, match=OPENAPI_DIR_ENV):
        find_openapi_dir()


def test_env_var_selects_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = find_openapi_dir()
    for name in ("kubevirt-swagger.json", "cdi-swagger.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    monkeypatch.setenv(OPENAPI_DIR_ENV, str(tmp_path))
    assert find_openapi_dir() == tmp_path


def test_core_definitions_are_self_contained() -> None:
    with CORE_SCHEMA_FILE.open() as f:
        definitions = json.load(f)["definitions"]
    refs: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str):
                refs.add(ref)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(definitions)
    assert {r.removeprefix("#/definitions/") for r in refs} <= set(definitions)
    for kind in REGISTRY.kinds:
        if kind.schema and kind.schema[0] == CORE_SCHEMA_SOURCE:
            assert kind.schema[1] in definitions


# ---- speed ---------------------------------------------------------------------------------------


def test_validation_is_fast(schemas: SchemaSet) -> None:
    vm = _vm()
    schemas.validate(VM, vm)  # compile
    runs = 200
    start = time.perf_counter()
    for _ in range(runs):
        schemas.validate(VM, vm)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 0.002, f"{per_call * 1000:.3f} ms per validation"
