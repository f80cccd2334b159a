"""Unit tests of JSON patch, merge patch, strategic merge patch and server-side apply.

Expected messages and shapes are kube-apiserver's (apiserver handlers/patch.go, evanphx/json-patch
v4, apimachinery strategicpatch, structured-merge-diff and the fieldmanager).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.api.patch import (
    REJECTED_MESSAGE,
    PatchDetail,
    PatchServerError,
    json_patch,
    list_type,
    merge_patch,
    strategic_merge_patch,
)
from virtshift.api.ssa import (
    diff_fieldset,
    fields_v1,
    fieldset_of,
    parse_fields_v1,
    path_string,
    server_side_apply,
    update_managed_fields,
)
from virtshift.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Invalid,
    RequestEntityTooLarge,
    UnsupportedMediaType,
)

Obj = dict[str, Any]


def kind(group: str, version: str, name: str) -> KindInfo:
    found = REGISTRY.by_kind(group, version, name)
    assert found is not None
    return found


VM = kind("kubevirt.io", "v1", "VirtualMachine")
NODE = kind("", "v1", "Node")
NAMESPACE = kind("", "v1", "Namespace")
CONFIGMAP = kind("", "v1", "ConfigMap")

T0 = "2024-07-27T17:00:00Z"
T1 = "2024-07-27T18:00:00Z"
T2 = "2024-07-27T19:00:00Z"


def vm(**spec: Any) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "default", "labels": {"app": "demo"}},
        "spec": {
            "runStrategy": "Always",
            "template": {"spec": {"domain": {"devices": {"disks": [
                {"name": "disk0", "disk": {"bus": "virtio"}}]}}}},
            **spec,
        },
    }


def status_of(exc: pytest.ExceptionInfo[ApiError]) -> Obj:
    return exc.value.status()


def entries(obj: Obj) -> list[Obj]:
    result: list[Obj] = obj["metadata"]["managedFields"]
    return result


def entry(obj: Obj, manager: str, operation: str = "Update") -> Obj:
    found = [e for e in entries(obj) if e["manager"] == manager and e["operation"] == operation]
    assert len(found) == 1, entries(obj)
    return found[0]


# ---- JSON patch ------------------------------------------------------------------------------


class TestJsonPatch:
    def test_add_remove_replace(self) -> None:
        obj = vm()
        before = copy.deepcopy(obj)
        out = json_patch(obj, [
            {"op": "add", "path": "/metadata/labels/tier", "value": "web"},
            {"op": "remove", "path": "/metadata/labels/app"},
            {"op": "replace", "path": "/spec/runStrategy", "value": "Halted"},
            {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-",
             "value": {"name": "disk1"}},
            {"op": "add", "path": "/spec/template/spec/domain/devices/disks/0",
             "value": {"name": "first"}},
        ])
        assert obj == before
        assert out["metadata"]["labels"] == {"tier": "web"}
        assert out["spec"]["runStrategy"] == "Halted"
        disks = out["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
        assert [d["name"] for d in disks] == ["first", "disk0", "disk1"]

    def test_move_copy_test_and_escapes(self) -> None:
        obj = {"metadata": {"annotations": {"a/b": "1", "c~d": "2"}}, "spec": {"x": [1, 2]}}
        out = json_patch(obj, [
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
            {"op": "copy", "from": "/metadata/annotations/c~0d", "path": "/spec/y"},
            {"op": "move", "from": "/spec/x/0", "path": "/spec/x/-"},
            {"op": "remove", "path": "/spec/x/-1"},
        ])
        assert out["spec"] == {"x": [2], "y": "2"}

    def test_replace_of_missing_member_adds_it_like_kubernetes(self) -> None:
        out = json_patch({"metadata": {"labels": {}}},
                         [{"op": "replace", "path": "/metadata/labels/new", "value": "x"}])
        assert out["metadata"]["labels"] == {"new": "x"}

    @pytest.mark.parametrize(("ops", "detail"), [
        ([{"op": "test", "path": "/spec/runStrategy", "value": "Halted"}],
         "testing value /spec/runStrategy failed: test failed"),
        ([{"op": "remove", "path": "/spec/nothing"}],
         "error in remove for path: '/spec/nothing': Unable to remove nonexistent key: nothing: "
         "missing value"),
        ([{"op": "add", "path": "/spec/no/such", "value": 1}],
         'add operation does not apply: doc is missing path: "/spec/no/such": missing value'),
        ([{"op": "replace", "path": "/spec/template/spec/domain/devices/disks/5", "value": 1}],
         "replace operation does not apply: doc is missing key: "
         "/spec/template/spec/domain/devices/disks/5: missing value"),
        ([{"op": "add", "path": "/spec/template/spec/domain/devices/disks/9", "value": 1}],
         "error in add for path: '/spec/template/spec/domain/devices/disks/9': Unable to "
         "access invalid index: 9: invalid index referenced"),
        ([{"op": "frobnicate", "path": "/spec"}], "Unexpected kind: frobnicate"),
    ])
    def test_operation_failures_are_422_with_the_generic_message(
            self, ops: list[Obj], detail: str) -> None:
        with pytest.raises(Invalid) as exc:
            json_patch(vm(), ops)
        assert status_of(exc) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": REJECTED_MESSAGE, "reason": "Invalid", "code": 422,
        }
        assert isinstance(exc.value.__cause__, PatchDetail)
        assert str(exc.value.__cause__) == detail

    @pytest.mark.parametrize(("body", "message"), [
        ({"op": "add", "path": "/x", "value": 1}, "error decoding patch: json: cannot unmarshal "
         "object into Go value of type []handlers.jsonPatchOp"),
        ("nope", "error decoding patch: json: cannot unmarshal string into Go value of type "
         "[]handlers.jsonPatchOp"),
        ([1], "error decoding patch: json: cannot unmarshal number into Go value of type "
         "handlers.jsonPatchOp"),
        ([{"op": "add", "path": 3}], "error decoding patch: json: cannot unmarshal number into "
         "Go struct field jsonPatchOp.path of type string"),
    ])
    def test_malformed_body_is_400(self, body: Any, message: str) -> None:
        with pytest.raises(BadRequest) as exc:
            json_patch(vm(), body)
        assert exc.value.message == message
        assert exc.value.code == 400

    def test_too_many_operations(self) -> None:
        ops = [{"op": "test", "path": "/kind", "value": "VirtualMachine"}] * 10001
        with pytest.raises(RequestEntityTooLarge) as exc:
            json_patch(vm(), ops)
        assert exc.value.message == (
            "The allowed maximum operations in a JSON patch is 10000, got 10001")

    def test_null_body_is_an_empty_patch(self) -> None:
        assert json_patch(vm(), None) == vm()


# ---- JSON merge patch ------------------------------------------------------------------------


class TestMergePatch:
    def test_null_deletes_objects_merge_lists_replace(self) -> None:
        obj = vm()
        before = copy.deepcopy(obj)
        out = merge_patch(obj, {
            "metadata": {"labels": {"app": None, "tier": "web"}},
            "spec": {"runStrategy": None, "running": True,
                     "template": {"spec": {"domain": {"devices": {"disks": [{"name": "b"}]}}}}},
        })
        assert obj == before
        assert out["metadata"]["labels"] == {"tier": "web"}
        assert "runStrategy" not in out["spec"]
        assert out["spec"]["running"] is True
        assert out["spec"]["template"]["spec"]["domain"]["devices"]["disks"] == [{"name": "b"}]

    def test_nulls_inside_new_values_are_pruned(self) -> None:
        out = merge_patch({"spec": {}},
                          {"spec": {"new": {"a": None, "b": 1, "l": [None, {"c": None}]}}})
        assert out["spec"]["new"] == {"b": 1, "l": [None, {}]}

    @pytest.mark.parametrize(("body", "message"), [
        ([1], "error decoding patch: json: cannot unmarshal array into Go value of type "
              "map[string]interface {}"),
        ("x", "error decoding patch: json: cannot unmarshal string into Go value of type "
              "map[string]interface {}"),
        (None, "Invalid JSON Patch"),
    ])
    def test_non_object_patch_is_400(self, body: Any, message: str) -> None:
        with pytest.raises(BadRequest) as exc:
            merge_patch(vm(), body)
        assert exc.value.message == message


# ---- strategic merge patch -------------------------------------------------------------------


def node(**extra: Any) -> Obj:
    obj: Obj = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "labels": {"a": "1"}, "finalizers": ["a", "b", "x"]},
        "spec": {"taints": [{"key": "k1", "effect": "NoSchedule"}], "podCIDRs": ["10.0.0.0/24"]},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "MemoryPressure", "status": "False"},
            {"type": "DiskPressure", "status": "False"},
        ]},
    }
    obj.update(extra)
    return obj


class TestStrategicMergePatch:
    def test_custom_resources_get_415(self) -> None:
        with pytest.raises(UnsupportedMediaType) as exc:
            strategic_merge_patch(VM, vm(), {"spec": {}})
        assert status_of(exc)["code"] == 415
        assert exc.value.message == (
            "the body of the request was in an unknown format - accepted media types include: "
            "application/json-patch+json, application/merge-patch+json, "
            "application/apply-patch+yaml")

    def test_maps_merge_null_deletes_plain_lists_replace(self) -> None:
        obj = node()
        before = copy.deepcopy(obj)
        out = strategic_merge_patch(NODE, obj, {
            "metadata": {"labels": {"a": None, "b": "2"}},
            "spec": {"taints": [{"key": "k2", "effect": "NoExecute"}], "unschedulable": True},
        })
        assert obj == before
        assert out["metadata"]["labels"] == {"b": "2"}
        assert out["spec"]["taints"] == [{"key": "k2", "effect": "NoExecute"}]  # atomic list
        assert out["spec"]["unschedulable"] is True

    def test_finalizers_merge_as_a_set(self) -> None:
        out = strategic_merge_patch(NODE, node(), {"metadata": {"finalizers": ["c", "a"]}})
        assert out["metadata"]["finalizers"] == ["c", "a", "b", "x"]

    def test_namespace_spec_finalizers_are_replaced(self) -> None:
        ns = {"metadata": {"name": "ns"}, "spec": {"finalizers": ["kubernetes"]}}
        out = strategic_merge_patch(NAMESPACE, ns, {"spec": {"finalizers": ["other"]}})
        assert out["spec"]["finalizers"] == ["other"]

    def test_kubectl_three_way_patch_of_finalizers(self) -> None:
        # last-applied [a, b], new config [b, c]; somebody else added x on the server.
        patch = {"metadata": {
            "$setElementOrder/finalizers": ["b", "c"],
            "$deleteFromPrimitiveList/finalizers": ["a"],
            "finalizers": ["c"],
        }}
        out = strategic_merge_patch(NODE, node(), patch)
        assert out["metadata"]["finalizers"] == ["b", "c", "x"]

    def test_kubectl_three_way_patch_of_node_conditions(self) -> None:
        patch = {"status": {
            "$setElementOrder/conditions": [
                {"type": "NetworkUnavailable"}, {"type": "Ready"}, {"type": "MemoryPressure"}],
            "conditions": [
                {"type": "NetworkUnavailable", "status": "False"},
                {"type": "Ready", "status": "False"},
                {"$patch": "delete", "type": "DiskPressure"},
            ],
        }}
        out = strategic_merge_patch(NODE, node(), patch)
        assert out["status"]["conditions"] == [
            {"type": "NetworkUnavailable", "status": "False"},
            {"type": "Ready", "status": "False", "reason": "KubeletReady"},
            {"type": "MemoryPressure", "status": "False"},
        ]

    def test_merge_by_key_keeps_server_only_items(self) -> None:
        out = strategic_merge_patch(NODE, node(), {"status": {"conditions": [
            {"type": "DiskPressure", "status": "True", "reason": None}]}})
        assert out["status"]["conditions"] == [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "MemoryPressure", "status": "False"},
            {"type": "DiskPressure", "status": "True"},
        ]

    def test_owner_references_merge_by_uid(self) -> None:
        obj = {"metadata": {"ownerReferences": [{"uid": "1", "name": "a"}]}}
        out = strategic_merge_patch(CONFIGMAP, obj, {"metadata": {"ownerReferences": [
            {"uid": "2", "name": "b"}]}})
        # New items go before server-only ones (strategicpatch's mergeSortedSlice).
        assert [r["uid"] for r in out["metadata"]["ownerReferences"]] == ["2", "1"]

    def test_patch_replace_and_delete_directives(self) -> None:
        out = strategic_merge_patch(NODE, node(), {
            "status": {"conditions": [{"$patch": "replace"}, {"type": "Ready", "status": "U"}]},
            "metadata": {"labels": {"$patch": "replace", "z": "9"}},
            "spec": {"$patch": "delete"},
        })
        assert out["status"]["conditions"] == [{"type": "Ready", "status": "U"}]
        assert out["metadata"]["labels"] == {"z": "9"}
        assert out["spec"] == {}

    def test_retain_keys(self) -> None:
        obj = {"data": {"a": "1", "b": "2", "c": "3"}}
        out = strategic_merge_patch(CONFIGMAP, obj, {"data": {"$retainKeys": ["a", "d"],
                                                              "d": "4"}})
        assert out["data"] == {"a": "1", "d": "4"}
        with pytest.raises(BadRequest) as exc:
            strategic_merge_patch(CONFIGMAP, obj, {"data": {"$retainKeys": ["a"], "b": "x"}})
        assert exc.value.message == "invalid patch format of retainKeys"

    def test_new_values_lose_directives_and_nulls(self) -> None:
        out = strategic_merge_patch(CONFIGMAP, {"metadata": {}}, {"metadata": {
            "ownerReferences": [{"uid": "1", "name": None}, {"uid": "2", "$patch": "delete"}],
            "labels": {"x": None, "y": "1"}}})
        assert out["metadata"] == {"ownerReferences": [{"uid": "1"}], "labels": {"y": "1"}}

    def test_errors(self) -> None:
        with pytest.raises(BadRequest) as bad:
            strategic_merge_patch(NODE, node(), {"metadata": {"$deleteFromPrimitiveList": []}})
        assert bad.value.message == "invalid patch format of primitive list"
        with pytest.raises(BadRequest) as bad:
            strategic_merge_patch(NODE, node(), [1])
        assert bad.value.message == ("json: cannot unmarshal array into Go value of type "
                                     "map[string]interface {}")
        with pytest.raises(PatchServerError) as server:
            strategic_merge_patch(NODE, node(), {"status": {"conditions": [{"status": "x"}]}})
        assert status_of(server) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "map: map[status:x] does not contain declared merge key: type",
            "code": 500,
        }
        with pytest.raises(PatchServerError) as server:
            strategic_merge_patch(NODE, node(), {"metadata": {"finalizers": [1]}})
        assert server.value.message == ("list element types are not identical: "
                                        "[[a b x] [1]]")
        with pytest.raises(Invalid) as invalid:
            strategic_merge_patch(NODE, node(metadata={"finalizers": []}),
                                  {"metadata": {"finalizers": [["a"]]}})
        assert invalid.value.message == REJECTED_MESSAGE

    def test_list_type_table(self) -> None:
        assert list_type(NODE, ("status", "addresses")).smp_merge_key == "type"
        assert list_type(NODE, ("spec", "taints")).relation == "atomic"
        assert list_type(VM, ("metadata", "finalizers")).relation == "set"
        disks = ("spec", "template", "spec", "domain", "devices", "disks")
        assert list_type(VM, disks).relation == "atomic"


# The real Go implementation, via `kubectl patch --local`, as an oracle for the merge itself.
KUBECTL = shutil.which("kubectl", path=str(Path(__file__).resolve().parents[2] / ".venv" / "bin"))

ORACLE_CASES: list[tuple[str, Any]] = [
    ("strategic", {"spec": {"podCIDRs": ["10.1.0.0/24"]}}),
    ("strategic", {"spec": {"$deleteFromPrimitiveList/podCIDRs": ["10.0.0.0/24"]}}),
    ("strategic", {"status": {"addresses": [{"type": "InternalIP", "address": "1.2.3.4"}]}}),
    ("strategic", {"status": {"conditions": [{"$patch": "replace"}, {"type": "X"}]}}),
    ("strategic", {"status": {"conditions": [{"type": "B", "status": "1"},
                                             {"type": "DiskPressure", "status": "2"},
                                             {"type": "A", "status": "1"}]}}),
    ("strategic", {"metadata": {"$setElementOrder/finalizers": ["x", "b", "a"]}}),
    ("strategic", {"metadata": {"$setElementOrder/finalizers": ["q", "x", "a", "b"],
                                "finalizers": ["q"]}}),
    ("strategic", {"status": {"$setElementOrder/conditions": [
        {"type": "MemoryPressure"}, {"type": "A"}, {"type": "Ready"}, {"type": "DiskPressure"}],
        "conditions": [{"type": "A", "status": "1"}]}}),
    ("strategic", {"status": {"conditions": [{"type": "Ready", "$patch": "delete"},
                                             {"type": "Ready", "status": "New"}]}}),
    ("strategic", {"metadata": {"ownerReferences": [{"uid": "1", "$patch": "delete"}],
                                "labels": {"$patch": "delete"}}}),
    ("merge", {"status": {"conditions": [{"type": "Only", "status": "x", "reason": None}]},
               "metadata": {"labels": {"a": {"x": None, "y": 1}}}}),
    ("json", [{"op": "add", "path": "/metadata/finalizers/-2", "value": "z"},
              {"op": "move", "from": "/metadata/finalizers/0", "path": "/metadata/labels/m"},
              {"op": "copy", "from": "/spec/taints/0", "path": "/spec/taints/-"}]),
]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize(("patch_type", "patch"), ORACLE_CASES)
def test_same_result_as_kubernetes(tmp_path: Path, patch_type: str, patch: Any) -> None:
    live = node(metadata={"name": "n1", "labels": {"a": "1"}, "finalizers": ["a", "b", "x"],
                          "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o",
                                               "uid": "1"}]})
    source = tmp_path / "node.json"
    source.write_text(json.dumps(live))
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "patch", "--local", "-f", str(source), "--type", patch_type,
                           "-o", "json", "-p", json.dumps(patch)],
                          capture_output=True, text=True, timeout=60, check=True)
    expected = json.loads(proc.stdout)
    if patch_type == "strategic":
        ours = strategic_merge_patch(NODE, live, patch)
    elif patch_type == "merge":
        ours = merge_patch(live, patch)
    else:
        ours = json_patch(live, patch)
    assert ours == expected


# ---- field sets ------------------------------------------------------------------------------


class TestFieldSets:
    def test_fields_v1_round_trip_and_markers(self) -> None:
        fields = {("f:metadata", "f:labels"), ("f:metadata", "f:labels", "f:app"),
                  ("f:status", "f:conditions", 'k:{"type":"Ready"}'),
                  ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status"),
                  ("f:metadata", "f:finalizers", 'v:"a"')}
        tree = fields_v1(fields)
        assert tree == {
            "f:metadata": {"f:finalizers": {'v:"a"': {}},
                           "f:labels": {".": {}, "f:app": {}}},
            "f:status": {"f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}}}},
        }
        assert parse_fields_v1(tree) == fields

    def test_path_string(self) -> None:
        assert path_string(("f:spec", "f:runStrategy")) == ".spec.runStrategy"
        assert path_string(("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status")) == (
            '.status.conditions[type="Ready"].status')
        assert path_string(("f:metadata", "f:finalizers", 'v:"x"')) == '.metadata.finalizers[="x"]'

    def test_fieldset_of_applied_config(self) -> None:
        fields = fieldset_of(NODE, {"metadata": {"finalizers": ["a"]}, "status": {
            "conditions": [{"type": "Ready", "status": "True"}]}, "spec": {"taints": []}})
        assert fields == {
            ("f:metadata", "f:finalizers", 'v:"a"'),
            ("f:status", "f:conditions", 'k:{"type":"Ready"}'),
            ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:type"),
            ("f:status", "f:conditions", 'k:{"type":"Ready"}', "f:status"),
            ("f:spec", "f:taints"),
        }

    def test_diff(self) -> None:
        diff = diff_fieldset(VM, {"spec": {"a": 1, "b": {"c": 2}}},
                             {"spec": {"a": 2, "d": {"e": 3}}})
        assert diff.modified == {("f:spec", "f:a")}
        assert diff.added == {("f:spec", "f:d"), ("f:spec", "f:d", "f:e")}
        assert diff.removed == {("f:spec", "f:b"), ("f:spec", "f:b", "f:c")}


# ---- update_managed_fields -------------------------------------------------------------------


class TestUpdateManagedFields:
    def test_create_of_a_custom_resource(self) -> None:
        obj = vm()
        obj["metadata"].update(uid="u", resourceVersion="1", generation=1,
                               creationTimestamp=T0)
        out = update_managed_fields(VM, None, obj, manager="kubectl-client-side-apply", now=T0)
        assert "managedFields" not in obj["metadata"]
        assert entries(out) == [{
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": "kubevirt.io/v1",
            "time": T0,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:spec": {".": {}, "f:runStrategy": {}, "f:template": {".": {}, "f:spec": {
                    ".": {}, "f:domain": {".": {}, "f:devices": {".": {}, "f:disks": {}}}}}},
            },
        }]

    def test_create_of_a_builtin_kind(self) -> None:
        out = update_managed_fields(NODE, None, node(), manager="kubelet", now=T0)
        assert entries(out)[0]["fieldsV1"] == {
            "f:metadata": {"f:finalizers": {".": {}, 'v:"a"': {}, 'v:"b"': {}, 'v:"x"': {}},
                           "f:labels": {".": {}, "f:a": {}}},
            "f:spec": {"f:podCIDRs": {".": {}, 'v:"10.0.0.0/24"': {}}, "f:taints": {}},
        }  # no "." on the spec struct; status belongs to the status subresource

    def test_node_update_matches_a_real_controller_entry(self) -> None:
        # kube-controller-manager assigning a pod CIDR, as a real cluster records it.
        old: Obj = {"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "annotations": {"a": "b"}}, "spec": {}}
        new = copy.deepcopy(old)
        new["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] = "0"
        new["spec"] = {"podCIDR": "10.4.0.0/24", "podCIDRs": ["10.4.0.0/24"]}
        out = update_managed_fields(NODE, old, new, manager="kube-controller-manager", now=T0)
        assert entries(out)[0]["fieldsV1"] == {
            "f:metadata": {"f:annotations": {"f:node.alpha.kubernetes.io/ttl": {}}},
            "f:spec": {"f:podCIDR": {}, "f:podCIDRs": {".": {}, 'v:"10.4.0.0/24"': {}}},
        }

    def test_changed_fields_move_to_the_writer(self) -> None:
        created = update_managed_fields(VM, None, vm(), manager="kubectl-client-side-apply",
                                        now=T0)
        edited = copy.deepcopy(created)
        edited["spec"]["runStrategy"] = "Halted"
        edited["metadata"]["labels"]["team"] = "x"
        out = update_managed_fields(VM, created, edited, manager="kubectl-edit", now=T1)
        assert [e["manager"] for e in entries(out)] == ["kubectl-client-side-apply",
                                                        "kubectl-edit"]
        assert entry(out, "kubectl-edit") == {
            "manager": "kubectl-edit", "operation": "Update", "apiVersion": "kubevirt.io/v1",
            "time": T1, "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}},
                         "f:spec": {"f:runStrategy": {}}},
        }
        first = entry(out, "kubectl-client-side-apply")
        assert first["time"] == T0
        assert "f:runStrategy" not in first["fieldsV1"]["f:spec"]

    def test_no_change_keeps_entries(self) -> None:
        created = update_managed_fields(VM, None, vm(), manager="a", now=T0)
        out = update_managed_fields(VM, created, copy.deepcopy(created), manager="b", now=T1)
        assert out == created

    def test_removed_fields_leave_owners_and_empty_entries_go(self) -> None:
        created = update_managed_fields(VM, None, vm(), manager="a", now=T0)
        relabelled = copy.deepcopy(created)
        relabelled["metadata"]["labels"]["team"] = "x"
        owned = update_managed_fields(VM, created, relabelled, manager="labeller", now=T1)
        unlabelled = copy.deepcopy(owned)
        del unlabelled["metadata"]["labels"]["team"]
        out = update_managed_fields(VM, owned, unlabelled, manager="a", now=T2)
        assert [e["manager"] for e in entries(out)] == ["a"]
        assert entry(out, "a")["time"] == T0  # removing is not owning

    def test_managed_fields_in_the_request_replace_the_live_ones(self) -> None:
        created = update_managed_fields(VM, None, vm(), manager="a", now=T0)
        cleared = copy.deepcopy(created)
        cleared["metadata"]["managedFields"] = [{}]
        out = update_managed_fields(VM, created, cleared, manager="b", now=T1)
        assert "managedFields" not in out["metadata"]
        kept = copy.deepcopy(created)
        kept["metadata"]["managedFields"] = []
        assert update_managed_fields(VM, created, kept, manager="b", now=T1) == created

    def test_status_subresource(self) -> None:
        created = update_managed_fields(VM, None, vm(), manager="a", now=T0)
        reported = copy.deepcopy(created)
        reported["status"] = {"printableStatus": "Running", "ready": True}
        out = update_managed_fields(VM, created, reported, manager="virt-controller",
                                    subresource="status", now=T1)
        assert entry(out, "virt-controller") == {
            "manager": "virt-controller", "operation": "Update", "apiVersion": "kubevirt.io/v1",
            "time": T1, "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {".": {}, "f:printableStatus": {}, "f:ready": {}}},
            "subresource": "status",
        }

    def test_more_than_ten_update_managers_fold_into_ancient_changes(self) -> None:
        obj = update_managed_fields(VM, None, vm(), manager="m00", now="2024-01-01T00:00:00Z")
        for i in range(1, 12):
            new = copy.deepcopy(obj)
            new["metadata"]["labels"][f"l{i}"] = "x"
            obj = update_managed_fields(VM, obj, new, manager=f"m{i:02}",
                                        now=f"2024-01-01T00:00:{i:02}Z")
        managers = [e["manager"] for e in entries(obj)]
        assert len(managers) == 10
        assert managers[0] == "ancient-changes"
        assert "m00" not in managers and "m01" not in managers


# ---- server-side apply -----------------------------------------------------------------------


def applied_vm(**spec: Any) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "labels": {"app": "demo"}},
            "spec": {"runStrategy": "Always", **spec}}


class TestServerSideApply:
    def test_create(self) -> None:
        applied = applied_vm()
        before = copy.deepcopy(applied)
        out = server_side_apply(VM, None, applied, manager="kubectl", force=False, now=T0)
        assert applied == before
        assert out["spec"] == {"runStrategy": "Always"}
        assert entries(out) == [{
            "manager": "kubectl", "operation": "Apply", "apiVersion": "kubevirt.io/v1",
            "time": T0, "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}},
                         "f:spec": {"f:runStrategy": {}}},
        }]

    def test_reapply_removes_dropped_fields(self) -> None:
        first = server_side_apply(VM, None, applied_vm(running=True), manager="kubectl",
                                  force=False, now=T0)
        config = applied_vm()
        config["metadata"]["labels"] = {"tier": "web"}
        out = server_side_apply(VM, first, config, manager="kubectl", force=False, now=T1)
        assert out["metadata"]["labels"] == {"tier": "web"}
        assert out["spec"] == {"runStrategy": "Always"}
        assert entries(out)[0]["fieldsV1"] == {"f:metadata": {"f:labels": {"f:tier": {}}},
                                               "f:spec": {"f:runStrategy": {}}}
        assert entries(out)[0]["time"] == T1

    def test_dropped_field_stays_when_someone_else_owns_it(self) -> None:
        first = server_side_apply(VM, None, applied_vm(), manager="kubectl", force=False,
                                  now=T0)
        shared = server_side_apply(VM, first, applied_vm(), manager="other", force=False,
                                   now=T1)
        assert [e["manager"] for e in entries(shared)] == ["kubectl", "other"]
        config = applied_vm()
        del config["metadata"]["labels"]
        out = server_side_apply(VM, shared, config, manager="kubectl", force=False, now=T2)
        assert out["metadata"]["labels"] == {"app": "demo"}

    def test_conflict_with_an_update_manager(self) -> None:
        live = update_managed_fields(VM, None, vm(), manager="kubectl-client-side-apply",
                                     now=T0)
        with pytest.raises(Conflict) as exc:
            server_side_apply(VM, live, applied_vm(runStrategy="Halted"), manager="kubectl",
                              force=False, now=T1)
        assert status_of(exc) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": 'Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" '
                       "using kubevirt.io/v1: .spec.runStrategy",
            "reason": "Conflict", "code": 409,
            "details": {"causes": [{
                "reason": "FieldManagerConflict",
                "message": 'conflict with "kubectl-client-side-apply" using kubevirt.io/v1',
                "field": ".spec.runStrategy",
            }]},
        }

    def test_several_conflicts(self) -> None:
        live = update_managed_fields(VM, None, vm(), manager="kubectl-client-side-apply",
                                     now=T0)
        config = applied_vm(runStrategy="Halted")
        config["metadata"]["labels"]["app"] = "other"
        with pytest.raises(Conflict) as exc:
            server_side_apply(VM, live, config, manager="kubectl", force=False, now=T1)
        assert exc.value.message == (
            'Apply failed with 2 conflicts: conflicts with "kubectl-client-side-apply" using '
            "kubevirt.io/v1:\n- .metadata.labels.app\n- .spec.runStrategy")
        assert [c.field for c in exc.value.causes] == [".metadata.labels.app",
                                                       ".spec.runStrategy"]

    def test_force_takes_ownership(self) -> None:
        live = update_managed_fields(VM, None, vm(), manager="kubectl-client-side-apply",
                                     now=T0)
        out = server_side_apply(VM, live, applied_vm(runStrategy="Halted"), manager="kubectl",
                                force=True, now=T1)
        assert out["spec"]["runStrategy"] == "Halted"
        assert entry(out, "kubectl", "Apply")["fieldsV1"] == {
            "f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {"f:runStrategy": {}}}
        old = entry(out, "kubectl-client-side-apply")["fieldsV1"]
        assert "f:runStrategy" not in old["f:spec"]
        assert old["f:metadata"] == {"f:labels": {".": {}, "f:app": {}}}  # same value: shared

    def test_same_value_is_no_conflict(self) -> None:
        live = update_managed_fields(VM, None, vm(), manager="kubectl-client-side-apply",
                                     now=T0)
        out = server_side_apply(VM, live, applied_vm(), manager="kubectl", force=False, now=T1)
        assert out["spec"] == vm()["spec"]
        for e in entries(out):
            assert e["fieldsV1"]["f:spec"]["f:runStrategy"] == {}

    def test_noop_reapply_keeps_time(self) -> None:
        first = server_side_apply(VM, None, applied_vm(), manager="kubectl", force=False,
                                  now=T0)
        again = server_side_apply(VM, first, applied_vm(), manager="kubectl", force=False,
                                  now=T1)
        assert again == first

    def test_status_is_not_applied_through_the_main_resource(self) -> None:
        live = server_side_apply(VM, None, applied_vm(), manager="kubectl", force=False, now=T0)
        live["status"] = {"ready": True}
        config = applied_vm()
        config["status"] = {"ready": False}
        out = server_side_apply(VM, live, config, manager="kubectl", force=False, now=T1)
        assert out["status"] == {"ready": True}
        assert "f:status" not in entries(out)[0]["fieldsV1"]

    def test_status_on_create_is_kept_but_not_owned(self) -> None:
        config = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                  "status": {"capacity": {"cpu": "4"}}}
        out = server_side_apply(NODE, None, config, manager="kubelet", force=False, now=T0)
        assert out["status"] == {"capacity": {"cpu": "4"}}
        assert "managedFields" not in out["metadata"]  # nothing ownable was applied

    def test_associative_lists_and_sets(self) -> None:
        live = update_managed_fields(NODE, None, node(), manager="kubelet", now=T0)
        live = update_managed_fields(NODE, node(), live, manager="kubelet", now=T0)
        config = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1",
                  "finalizers": ["mine"]},
                  "status": {"conditions": [{"type": "Custom", "status": "True"},
                                            {"type": "Ready", "status": "True"}]}}
        out = server_side_apply(NODE, live, config, manager="npd", force=False, now=T1,
                                subresource="status")
        assert [c["type"] for c in out["status"]["conditions"]] == [
            "Custom", "Ready", "MemoryPressure", "DiskPressure"]
        assert out["metadata"]["finalizers"] == ["a", "b", "x"]  # metadata not via /status
        assert entry(out, "npd", "Apply") == {
            "manager": "npd", "operation": "Apply", "apiVersion": "v1", "time": T1,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:conditions": {
                'k:{"type":"Custom"}': {".": {}, "f:status": {}, "f:type": {}},
                'k:{"type":"Ready"}': {".": {}, "f:status": {}, "f:type": {}}}}},
            "subresource": "status",
        }
        main = server_side_apply(NODE, live, {**config, "status": {}}, manager="ops",
                                 force=False, now=T1)
        assert main["metadata"]["finalizers"] == ["a", "b", "x", "mine"]

    def test_set_items_keep_live_positions(self) -> None:
        live = update_managed_fields(CONFIGMAP, None, {"metadata": {"name": "c", "finalizers": [
            "a", "s"]}}, manager="ctrl", now=T0)
        config = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "c", "finalizers": ["n", "s"]}}
        out = server_side_apply(CONFIGMAP, live, config, manager="me", force=False, now=T1)
        assert out["metadata"]["finalizers"] == ["a", "n", "s"]
        assert entry(out, "me", "Apply")["fieldsV1"] == {
            "f:metadata": {"f:finalizers": {'v:"n"': {}, 'v:"s"': {}}}}
        assert entry(out, "ctrl")["fieldsV1"] == {
            "f:metadata": {"f:finalizers": {".": {}, 'v:"a"': {}, 'v:"s"': {}}}}

    def test_bad_apply_bodies(self) -> None:
        config = applied_vm()
        config["apiVersion"] = "kubevirt.io/v1alpha3"
        with pytest.raises(BadRequest) as exc:
            server_side_apply(VM, None, config, manager="kubectl", force=False, now=T0)
        assert exc.value.message == ("Incorrect version specified in apply patch. Specified "
                                     "patch version: kubevirt.io/v1alpha3, expected: "
                                     "kubevirt.io/v1")
        config = applied_vm()
        config["metadata"]["managedFields"] = []
        with pytest.raises(BadRequest) as exc:
            server_side_apply(VM, None, config, manager="kubectl", force=False, now=T0)
        assert exc.value.message == "metadata.managedFields must be nil"
