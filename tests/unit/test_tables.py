"""meta.k8s.io Tables for custom resources and built-in kinds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from virtshift.api.kinds import AGE, REGISTRY, KindInfo, PrinterColumn
from virtshift.api.tables import NAME_DESCRIPTION, build_table, column_definitions, human_duration
from virtshift.errors import BadRequest

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def _ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kind(group: str, version: str, kind: str) -> KindInfo:
    info = REGISTRY.by_kind(group, version, kind)
    assert info is not None
    return info


def _table(kind: KindInfo, *objs: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return build_table(kind, list(objs), list_meta=kw.pop("list_meta", {}), now=NOW, **kw)


def _names(table: dict[str, Any]) -> list[str]:
    return [c["name"] for c in table["columnDefinitions"]]


def _wide(table: dict[str, Any]) -> list[str]:
    return [c["name"] for c in table["columnDefinitions"] if c["priority"] > 0]


# ---- human_duration -------------------------------------------------------------------------

M, H, D = 60, 3600, 86400


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "<invalid>"),
        (-2, "<invalid>"),
        (-1.9, "0s"),
        (-1, "0s"),
        (0, "0s"),
        (0.9, "0s"),
        (5, "5s"),
        (119, "119s"),
        (119.99, "119s"),
        (120, "2m"),
        (121, "2m1s"),
        (200, "3m20s"),
        (9 * M + 59, "9m59s"),
        (10 * M, "10m"),
        (10 * M + 30, "10m"),
        (3 * H - 1, "179m"),
        (3 * H, "3h"),
        (3 * H + M, "3h1m"),
        (8 * H - 1, "7h59m"),
        (8 * H, "8h"),
        (48 * H - 1, "47h"),
        (2 * D, "2d"),
        (2 * D + 3 * H, "2d3h"),
        (8 * D - 1, "7d23h"),
        (8 * D, "8d"),
        (730 * D - 1, "729d"),
        (730 * D, "2y"),
        (731 * D, "2y1d"),
        (8 * 365 * D - 1, "7y364d"),
        (8 * 365 * D, "8y"),
        (10 * 365 * D + 100 * D, "10y"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


# ---- custom resources -----------------------------------------------------------------------

VM = _kind("kubevirt.io", "v1", "VirtualMachine")
VMI = _kind("kubevirt.io", "v1", "VirtualMachineInstance")


def _vm() -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "default", "resourceVersion": "5",
                     "creationTimestamp": _ago(seconds=200), "labels": {"app": "web"}},
        "spec": {"runStrategy": "Always"},
        "status": {
            "printableStatus": "Running",
            "conditions": [
                {"type": "Paused", "status": "False"},
                {"type": "Ready", "status": "True"},
            ],
        },
    }


def test_vm_table() -> None:
    table = _table(VM, _vm(), list_meta={"resourceVersion": "42", "continue": "tok",
                                         "remainingItemCount": 0})
    assert table["kind"] == "Table"
    assert table["apiVersion"] == "meta.k8s.io/v1"
    assert table["metadata"] == {"resourceVersion": "42", "continue": "tok",
                                 "remainingItemCount": 0}
    assert _names(table) == ["Name", "Age", "Status", "Ready"]
    name, age, status, ready = table["columnDefinitions"]
    assert name == {"name": "Name", "type": "string", "format": "name",
                    "description": NAME_DESCRIPTION, "priority": 0}
    assert age["type"] == "date"
    assert age["description"] == (
        "Custom resource definition column (in JSONPath format): .metadata.creationTimestamp")
    assert status["description"] == "Human Readable Status"
    assert ready["priority"] == 0
    [row] = table["rows"]
    assert row["cells"] == ["vm1", "3m20s", "Running", "True"]
    assert row["object"] == {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": _vm()["metadata"]}


def test_vm_without_status_has_null_cells() -> None:
    vm = _vm()
    del vm["status"]
    [row] = _table(VM, vm)["rows"]
    assert row["cells"] == ["vm1", "3m20s", None, None]


def test_include_object() -> None:
    vm = _vm()
    assert _table(VM, vm, include_object="Object")["rows"][0]["object"] is vm
    assert _table(VM, vm, include_object="None")["rows"][0]["object"] is None
    with pytest.raises(BadRequest) as err:
        _table(VM, vm, include_object="Bogus")
    assert err.value.message == 'unrecognized includeObject value: "Bogus"'


def test_table_version_and_no_headers() -> None:
    table = _table(VM, _vm(), table_version="v1beta1", no_headers=True)
    assert table["apiVersion"] == "meta.k8s.io/v1beta1"
    assert table["rows"][0]["object"]["apiVersion"] == "meta.k8s.io/v1beta1"
    assert table["columnDefinitions"] is None
    assert _table(VM)["rows"] == []


def test_vmi_table_with_ip_and_node() -> None:
    vmi = {
        "metadata": {"name": "vmi1", "namespace": "default",
                     "creationTimestamp": _ago(days=2, hours=3)},
        "status": {
            "phase": "Running",
            "nodeName": "node01",
            "interfaces": [{"name": "default", "ipAddress": "10.0.0.5",
                            "ipAddresses": ["10.0.0.5", "fd00::5"]}],
            "conditions": [{"type": "Ready", "status": "True"},
                           {"type": "LiveMigratable", "status": "False",
                            "reason": "DisksNotLiveMigratable"}],
        },
    }
    table = _table(VMI, vmi)
    assert _names(table) == ["Name", "Age", "Phase", "IP", "NodeName", "Ready",
                             "Live-Migratable", "Paused"]
    assert _wide(table) == ["Live-Migratable", "Paused"]
    assert table["rows"][0]["cells"] == ["vmi1", "2d3h", "Running", "10.0.0.5", "node01",
                                         "True", "False", None]


def test_vmi_before_scheduling() -> None:
    vmi = {"metadata": {"name": "vmi2", "creationTimestamp": _ago(seconds=3)},
           "status": {"phase": "Pending", "interfaces": []}}
    assert _table(VMI, vmi)["rows"][0]["cells"] == ["vmi2", "3s", "Pending", None, None, None,
                                                    None, None]


def test_crd_cell_types() -> None:
    widget = KindInfo(
        "example.com", "v1", "Widget", "widgets", "widget", True,
        columns=(
            PrinterColumn("Count", "integer", ".spec.count"),
            PrinterColumn("Ratio", "number", ".spec.ratio", priority=1, format="float"),
            PrinterColumn("On", "boolean", ".spec.on"),
            PrinterColumn("When", "date", ".spec.when"),
            PrinterColumn("Map", "string", ".spec.map"),
            PrinterColumn("Null", "string", ".spec.null"),
            PrinterColumn("Flag", "string", ".spec.on"),
            PrinterColumn("Num", "string", ".spec.ratio"),
        ),
    )
    obj = {"metadata": {"name": "w"},
           "spec": {"count": 2.9, "ratio": 1, "on": True, "when": _ago(hours=5),
                    "map": {"b": "<x>", "a": [1, 2]}, "null": None}}
    table = _table(widget, obj)
    assert table["columnDefinitions"][2]["format"] == "float"
    assert table["rows"][0]["cells"] == [
        "w", 2, 1.0, True, "5h", '{"a":[1,2],"b":"\\u003cx\\u003e"}', "<no value>", "true", "1"]
    wrong = {"metadata": {"name": "w"},
             "spec": {"count": "2", "ratio": "x", "on": "yes", "when": "yesterday",
                      "map": "plain"}}
    assert _table(widget, wrong)["rows"][0]["cells"] == [
        "w", None, None, None, "<invalid>", "plain", None, "yes", "x"]
    zero = {"metadata": {"name": "w"}, "spec": {"when": "0001-01-01T00:00:00Z"}}
    assert _table(widget, zero)["rows"][0]["cells"][4] == "<unknown>"


def test_snapshot_and_datavolume_columns() -> None:
    snapshot = _kind("snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshot")
    obj = {"metadata": {"name": "snap"},
           "spec": {"source": {"kind": "VirtualMachine", "name": "vm1"}},
           "status": {"phase": "Succeeded", "readyToUse": True,
                      "creationTime": _ago(minutes=30)}}
    assert _table(snapshot, obj)["rows"][0]["cells"] == [
        "snap", "VirtualMachine", "vm1", "Succeeded", True, "30m", None]
    dv = _kind("cdi.kubevirt.io", "v1beta1", "DataVolume")
    obj = {"metadata": {"name": "dv", "creationTimestamp": _ago(seconds=90)},
           "status": {"phase": "ImportInProgress", "progress": "45.20%", "restartCount": 1}}
    assert _table(dv, obj)["rows"][0]["cells"] == ["dv", "ImportInProgress", "45.20%", 1, "90s"]


def test_default_age_column() -> None:
    datasource = _kind("cdi.kubevirt.io", "v1beta1", "DataSource")
    table = _table(datasource, {"metadata": {"name": "fedora",
                                             "creationTimestamp": _ago(days=3)}})
    assert _names(table) == ["Name", "Age"]
    assert table["columnDefinitions"][1]["type"] == AGE.type == "date"
    assert table["rows"][0]["cells"] == ["fedora", "3d"]


# ---- built-in kinds -------------------------------------------------------------------------

NODE = _kind("", "v1", "Node")


def _node(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "node01", "creationTimestamp": _ago(hours=5),
                     "labels": {"node-role.kubernetes.io/control-plane": "",
                                "node-role.kubernetes.io/worker": "",
                                "kubernetes.io/role": "master",
                                "kubernetes.io/hostname": "node01"}},
        "spec": spec,
        "status": {
            "conditions": [{"type": "MemoryPressure", "status": "False"},
                           {"type": "Ready", "status": "False", "reason": "KubeletNotReady"}],
            "addresses": [{"type": "Hostname", "address": "node01"},
                          {"type": "InternalIP", "address": "192.168.1.10"}],
            "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Fedora Linux 42",
                         "containerRuntimeVersion": "virtshift://0.1.0"},
        },
    }


def test_node_not_ready_and_cordoned() -> None:
    table = _table(NODE, _node(unschedulable=True))
    assert _names(table) == ["Name", "Status", "Roles", "Age", "Version", "Internal-IP",
                             "External-IP", "OS-Image", "Kernel-Version", "Container-Runtime"]
    assert _wide(table) == ["Internal-IP", "External-IP", "OS-Image", "Kernel-Version",
                            "Container-Runtime"]
    assert table["columnDefinitions"][0]["format"] == "name"
    assert table["rows"][0]["cells"] == [
        "node01", "NotReady,SchedulingDisabled", "control-plane,master,worker", "5h", "v1.33.0",
        "192.168.1.10", "<none>", "Fedora Linux 42", "<unknown>", "virtshift://0.1.0"]


def test_node_status_variants() -> None:
    ready = _node()
    ready["status"]["conditions"][1]["status"] = "True"
    ready["metadata"]["labels"] = {}
    cells = _table(NODE, ready)["rows"][0]["cells"]
    assert cells[1:3] == ["Ready", "<none>"]
    unknown = _node(unschedulable=False)
    unknown["status"]["conditions"] = []
    assert _table(NODE, unknown)["rows"][0]["cells"][1] == "Unknown"


def test_pvc_table() -> None:
    pvc_kind = _kind("", "v1", "PersistentVolumeClaim")
    bound = {
        "metadata": {"name": "disk1", "namespace": "default",
                     "creationTimestamp": _ago(days=10)},
        "spec": {"volumeName": "pv-1", "storageClassName": "local", "volumeMode": "Filesystem",
                 "resources": {"requests": {"storage": "10Gi"}}},
        "status": {"phase": "Bound", "capacity": {"storage": "10240Mi"},
                   "accessModes": ["ReadWriteMany", "ReadWriteOnce"]},
    }
    deleting = {
        "metadata": {"name": "disk2", "namespace": "default",
                     "deletionTimestamp": _ago(seconds=1),
                     "annotations": {"volume.beta.kubernetes.io/storage-class": "fast"}},
        "spec": {"storageClassName": "local", "volumeAttributesClassName": "gold",
                 "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Pending"},
    }
    table = _table(pvc_kind, bound, deleting)
    assert _names(table) == ["Name", "Status", "Volume", "Capacity", "Access Modes",
                             "StorageClass", "VolumeAttributesClass", "Age", "VolumeMode"]
    assert _wide(table) == ["VolumeMode"]
    assert [r["cells"] for r in table["rows"]] == [
        ["disk1", "Bound", "pv-1", "10Gi", "RWO,RWX", "local", "<unset>", "10d", "Filesystem"],
        ["disk2", "Terminating", "", "", "", "fast", "gold", "<unknown>", "<unset>"],
    ]


def test_pv_table() -> None:
    pv_kind = _kind("", "v1", "PersistentVolume")
    pv = {"metadata": {"name": "pv-1", "creationTimestamp": _ago(days=1)},
          "spec": {"capacity": {"storage": "1.5Gi"}, "accessModes": ["ReadWriteOncePod"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "local",
                   "claimRef": {"namespace": "default", "name": "disk1"},
                   "volumeMode": "Block"},
          "status": {"phase": "Bound"}}
    table = _table(pv_kind, pv)
    assert _names(table) == ["Name", "Capacity", "Access Modes", "Reclaim Policy", "Status",
                             "Claim", "StorageClass", "VolumeAttributesClass", "Reason", "Age",
                             "VolumeMode"]
    assert table["rows"][0]["cells"] == ["pv-1", "1536Mi", "RWOP", "Retain", "Bound",
                                         "default/disk1", "local", "<unset>", "", "24h", "Block"]


def test_event_table() -> None:
    event_kind = _kind("", "v1", "Event")
    classic = {
        "metadata": {"name": "vm1.17a", "namespace": "default"},
        "involvedObject": {"kind": "VirtualMachine", "name": "vm1", "namespace": "default"},
        "type": "Normal", "reason": "Started", "message": " Started the VM\n",
        "firstTimestamp": _ago(hours=1), "lastTimestamp": _ago(minutes=30), "count": 3,
        "source": {"component": "virt-controller"},
    }
    modern = {
        "metadata": {"name": "node01.17b", "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": ""},
        "type": "Warning", "reason": "Rebooted", "message": "rebooted",
        "eventTime": (NOW - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "series": {"count": 4, "lastObservedTime": _ago(seconds=60)},
        "reportingComponent": "kubelet", "reportingInstance": "node01",
    }
    table = _table(event_kind, classic, modern)
    assert _names(table) == ["Last Seen", "Type", "Reason", "Object", "Subobject", "Source",
                             "Message", "First Seen", "Count", "Name"]
    assert _wide(table) == ["Subobject", "Source", "First Seen", "Count", "Name"]
    assert table["columnDefinitions"][-1]["format"] == "name"
    assert [r["cells"] for r in table["rows"]] == [
        ["30m", "Normal", "Started", "virtualmachine/vm1", "", "virt-controller",
         "Started the VM", "60m", 3, "vm1.17a"],
        ["60s", "Warning", "Rebooted", "node", "", "kubelet, node01", "rebooted", "5m", 4,
         "node01.17b"],
    ]
    single = {"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"},
              "firstTimestamp": _ago(seconds=10)}
    cells = _table(event_kind, single)["rows"][0]["cells"]
    assert (cells[0], cells[7], cells[8]) == ("10s", "10s", 1)


def test_small_builtin_tables() -> None:
    ns = _table(_kind("", "v1", "Namespace"),
                {"metadata": {"name": "default", "creationTimestamp": _ago(days=400)},
                 "status": {"phase": "Active"}})
    assert _names(ns) == ["Name", "Status", "Age"]
    assert ns["rows"][0]["cells"] == ["default", "Active", "400d"]

    cm = _table(_kind("", "v1", "ConfigMap"),
                {"metadata": {"name": "cfg", "creationTimestamp": _ago(seconds=30)},
                 "data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}})
    assert _names(cm) == ["Name", "Data", "Age"]
    assert cm["rows"][0]["cells"] == ["cfg", 3, "30s"]

    secret = _table(_kind("", "v1", "Secret"),
                    {"metadata": {"name": "s"}, "type": "Opaque", "data": {"k": "dg=="}})
    assert _names(secret) == ["Name", "Type", "Data", "Age"]
    assert secret["rows"][0]["cells"] == ["s", "Opaque", 1, "<unknown>"]

    sc_kind = _kind("storage.k8s.io", "v1", "StorageClass")
    sc = _table(sc_kind,
                {"metadata": {"name": "local", "creationTimestamp": _ago(hours=2),
                              "annotations": {
                                  "storageclass.kubernetes.io/is-default-class": "true"}},
                 "provisioner": "virtshift.io/local", "volumeBindingMode": "WaitForFirstConsumer"},
                {"metadata": {"name": "fast"}, "provisioner": "x", "reclaimPolicy": "Retain",
                 "allowVolumeExpansion": True})
    assert _names(sc) == ["Name", "Provisioner", "ReclaimPolicy", "VolumeBindingMode",
                          "AllowVolumeExpansion", "Age"]
    assert [r["cells"] for r in sc["rows"]] == [
        ["local (default)", "virtshift.io/local", "Delete", "WaitForFirstConsumer", False,
         "120m"],
        ["fast", "x", "Retain", "Immediate", True, "<unknown>"],
    ]


def test_column_definitions_cover_every_kind() -> None:
    for kind in REGISTRY.kinds:
        defs = column_definitions(kind)
        assert any(d["format"] == "name" for d in defs), kind.kind
        for d in defs:
            assert set(d) == {"name", "type", "format", "description", "priority"}
            assert d["description"], (kind.kind, d["name"])
