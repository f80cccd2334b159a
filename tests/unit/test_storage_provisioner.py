"""The hostpath provisioner's decisions: the default class, provisioning and binding of claims
(Immediate and WaitForFirstConsumer), reclaim, and VMI placement with node-local volumes."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest

from virtshift.agent.disks import DiskError, DiskPreparer
from virtshift.controller.scheduler import ERR_VOLUME_AFFINITY, place
from virtshift.controller.storage import (
    ANN_DEFAULT_CLASS,
    ANN_PROVISIONED_BY,
    ANN_SELECTED_NODE,
    ANN_STORAGE_PROVISIONER,
    CLASS_NAME,
    PROVISIONER,
    CreatePV,
    CreateStorageClass,
    DeletePV,
    PatchPVC,
    SetPVCStatus,
    SetPVPhase,
    StorageAction,
    default_storage_class,
    reconcile_claim,
    reconcile_volume,
    select_nodes,
    storage_class_actions,
)
from virtshift.controller.vmi import UpdateVMIStatus, reconcile_vmi, volumes_ready

Obj = dict[str, Any]
T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)


def node(name: str, root: str | None = "/data/{name}/storage") -> Obj:
    ann = {"virtshift.io/storage-root": root.format(name=name)} if root else {}
    return {"metadata": {"name": name, "annotations": ann,
                         "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def claim(name: str = "data", *, cls: str | None = CLASS_NAME, size: str = "64Mi",
          selected: str = "", volume: str = "", phase: str = "Pending") -> Obj:
    spec: Obj = {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                 "resources": {"requests": {"storage": size}}}
    if cls is not None:
        spec["storageClassName"] = cls
    if volume:
        spec["volumeName"] = volume
    ann = {ANN_SELECTED_NODE: selected} if selected else {}
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}",
                         "resourceVersion": "5", "annotations": ann},
            "spec": spec, "status": {"phase": phase}}


def immediate() -> Obj:
    sc = default_storage_class()
    sc["metadata"]["name"] = "hpp-now"
    sc["metadata"]["annotations"] = {}
    sc["volumeBindingMode"] = "Immediate"
    return sc


CLASSES = [default_storage_class(), immediate()]


def apply(actions: list[StorageAction], pvcs: dict[tuple[str, str], Obj],
          pvs: dict[str, Obj]) -> None:
    """What the loop's writes do to the objects (merge patches, status, create, delete)."""
    for a in actions:
        if isinstance(a, PatchPVC):
            obj = pvcs[(a.namespace, a.name)]
            for part, values in a.patch.items():
                target = obj.setdefault(part, {})
                for k, v in values.items():
                    if isinstance(v, dict):
                        target.setdefault(k, {}).update(v)
                    else:
                        target[k] = v
        elif isinstance(a, SetPVCStatus):
            pvcs[(a.namespace, a.name)]["status"] = copy.deepcopy(a.status)
        elif isinstance(a, CreatePV):
            pvs[a.pv["metadata"]["name"]] = {**copy.deepcopy(a.pv), "status": {"phase": "Pending"}}
        elif isinstance(a, SetPVPhase):
            pvs[a.name]["status"] = {"phase": a.phase}
        elif isinstance(a, DeletePV):
            del pvs[a.name]


def converge(pvcs: dict[tuple[str, str], Obj], pvs: dict[str, Obj], nodes: list[Obj],
             classes: list[Obj] | None = None) -> None:
    for _ in range(10):
        actions: list[StorageAction] = []
        for key in sorted(pvcs):
            actions += reconcile_claim(pvcs[key], classes or CLASSES, pvs, nodes)
        for name in sorted(pvs):
            actions += reconcile_volume(pvs[name], pvcs)
        if not actions:
            return
        apply(actions, pvcs, pvs)
    raise AssertionError("did not converge")


def test_the_default_class_is_created_when_missing() -> None:
    [action] = storage_class_actions([])
    assert isinstance(action, CreateStorageClass)
    sc = action.storage_class
    assert sc["provisioner"] == "kubevirt.io.hostpath-provisioner"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["reclaimPolicy"] == "Delete"
    assert sc["metadata"]["annotations"] == {ANN_DEFAULT_CLASS: "true"}
    assert storage_class_actions([sc]) == []


def test_wffc_claim_waits_for_a_selected_node_then_binds_there() -> None:
    pvcs = {("ns", "data"): claim()}
    pvs: dict[str, Obj] = {}
    nodes = [node("node01"), node("node02")]
    converge(pvcs, pvs, nodes)
    assert pvs == {} and pvcs[("ns", "data")]["status"]["phase"] == "Pending"

    pvcs[("ns", "data")]["metadata"]["annotations"][ANN_SELECTED_NODE] = "node02"
    converge(pvcs, pvs, nodes)
    pv = pvs["pvc-u-data"]
    assert pv["metadata"]["annotations"][ANN_PROVISIONED_BY] == PROVISIONER
    assert pv["spec"]["hostPath"]["path"] == "/data/node02/storage/pvc-u-data"
    assert pv["spec"]["capacity"] == {"storage": "64Mi"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert pv["spec"]["claimRef"]["uid"] == "u-data"
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"] == [{"key": "kubernetes.io/hostname", "operator": "In",
                                 "values": ["node02"]}]
    assert pv["status"]["phase"] == "Bound"
    got = pvcs[("ns", "data")]
    assert got["spec"]["volumeName"] == "pvc-u-data"
    assert got["status"] == {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
                             "capacity": {"storage": "64Mi"}}
    assert got["metadata"]["annotations"][ANN_STORAGE_PROVISIONER] == PROVISIONER
    assert got["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] == "yes"


def test_immediate_claim_goes_to_the_node_with_least_provisioned() -> None:
    pvcs = {("ns", "a"): claim("a", cls="hpp-now", size="1Gi")}
    pvs: dict[str, Obj] = {}
    nodes = [node("node01"), node("node02"), node("node03", root=None)]
    converge(pvcs, pvs, nodes)
    assert pvs["pvc-u-a"]["spec"]["hostPath"]["path"].startswith("/data/node01/")
    pvcs[("ns", "b")] = claim("b", cls="hpp-now", size="1Gi")
    converge(pvcs, pvs, nodes)
    assert pvs["pvc-u-b"]["spec"]["hostPath"]["path"].startswith("/data/node02/")


def test_claim_without_class_gets_the_default_one_and_other_classes_are_left_alone() -> None:
    pvcs = {("ns", "d"): claim("d", cls=None, selected="node01"),
            ("ns", "x"): claim("x", cls="other", selected="node01")}
    pvs: dict[str, Obj] = {}
    converge(pvcs, pvs, [node("node01")])
    assert pvcs[("ns", "d")]["spec"]["storageClassName"] == CLASS_NAME
    assert pvcs[("ns", "d")]["status"]["phase"] == "Bound"
    assert pvcs[("ns", "x")]["status"]["phase"] == "Pending" and "pvc-u-x" not in pvs


def test_deleted_claim_releases_and_deletes_its_volume_or_retains_it() -> None:
    pvcs = {("ns", "data"): claim(selected="node01")}
    pvs: dict[str, Obj] = {}
    converge(pvcs, pvs, [node("node01")])
    del pvcs[("ns", "data")]
    assert reconcile_volume(pvs["pvc-u-data"], pvcs) == [
        SetPVPhase("pvc-u-data", "Released"), DeletePV("pvc-u-data")]
    pvs["pvc-u-data"]["spec"]["persistentVolumeReclaimPolicy"] = "Retain"
    assert reconcile_volume(pvs["pvc-u-data"], pvcs) == [SetPVPhase("pvc-u-data", "Released")]
    pvs["pvc-u-data"]["status"]["phase"] = "Released"
    assert reconcile_volume(pvs["pvc-u-data"], pvcs) == []
    # A new claim of the same name (another uid) does not take the released volume.
    pvcs[("ns", "data")] = {**claim(), "metadata": {**claim()["metadata"], "uid": "u-new"}}
    assert reconcile_volume(pvs["pvc-u-data"], pvcs) == []


def test_claim_whose_volume_vanished_is_lost() -> None:
    assert reconcile_claim(claim(volume="pvc-gone", phase="Bound"), CLASSES, {}, []) == [
        SetPVCStatus("ns", "data", {"phase": "Lost"})]


def vmi(*claims: str, phase: str = "Pending") -> Obj:
    return {"metadata": {"name": "v", "namespace": "ns", "uid": "uid-v"},
            "spec": {"domain": {"memory": {"guest": "128Mi"}},
                     "volumes": [{"name": c, "persistentVolumeClaim": {"claimName": c}}
                                 for c in claims]},
            "status": {"phase": phase}}


def test_volume_binding_selects_the_scheduled_node_for_wffc_claims() -> None:
    pvcs = {("ns", "data"): claim()}
    nodes = [node("node01", root=None), node("node02")]
    [action] = select_nodes([vmi("data")], pvcs, CLASSES, {}, nodes)
    assert action == PatchPVC("ns", "data", {"metadata": {"annotations": {
        ANN_SELECTED_NODE: "node02"}}})
    pvcs[("ns", "data")]["metadata"]["annotations"][ANN_SELECTED_NODE] = "node02"
    assert select_nodes([vmi("data")], pvcs, CLASSES, {}, nodes) == []
    # Running VMIs and VMIs with a missing claim are not considered.
    assert select_nodes([vmi("data", phase="Running")], {("ns", "data"): claim()}, CLASSES,
                        {}, nodes) == []
    assert select_nodes([vmi("data", "nope")], {("ns", "data"): claim()}, CLASSES, {},
                        nodes) == []


def test_vmi_waits_pending_until_claims_are_bound() -> None:
    pvcs = {("ns", "data"): claim()}
    assert volumes_ready(vmi("data"), pvcs, {}) == (False, "")
    pvcs[("ns", "data")]["status"]["phase"] = "Bound"
    assert volumes_ready(vmi("data"), pvcs, {}) == (True, "")


def test_vmi_is_scheduled_only_where_its_bound_volume_is() -> None:
    pvcs = {("ns", "data"): claim(selected="node02")}
    pvs: dict[str, Obj] = {}
    nodes = [node("node01"), node("node02")]
    converge(pvcs, pvs, nodes)
    decision = reconcile_vmi(vmi("data", phase="Scheduling"), now=T0, nodes=nodes, vmis=[],
                             owner_exists=True, pvcs=pvcs, pvs=pvs)
    status = next(a.status for a in decision.actions if isinstance(a, UpdateVMIStatus))
    assert status["phase"] == "Scheduled" and status["nodeName"] == "node02"

    blocked = place(vmi("data"), [node("node01")], [], volume_node="node02")
    assert blocked.node is None and f"1 {ERR_VOLUME_AFFINITY}" in blocked.message


def test_agent_makes_a_sparse_disk_image_in_the_volume_directory(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    preparer = DiskPreparer(None, None, (), storage_root=root,  # type: ignore[arg-type]
                            node_name="node01")
    pvcs = {("ns", "data"): claim(selected="node01")}
    pvs: dict[str, Obj] = {}
    converge(pvcs, pvs, [node("node01", root=str(root))])
    disk = preparer._volume_file("data", pvs["pvc-u-data"], False, (root,))
    image = root / "pvc-u-data" / "disk.img"
    assert disk.path == str(image) and disk.format == "raw"
    assert image.stat().st_size == 64 * 1024 * 1024
    assert image.stat().st_blocks == 0  # sparse
    other = DiskPreparer(None, None, (), storage_root=root,  # type: ignore[arg-type]
                         node_name="node02")
    with pytest.raises(DiskError, match="is on node node01"):
        other._volume_file("data", pvs["pvc-u-data"], False, (root,))
    outside = copy.deepcopy(pvs["pvc-u-data"])
    outside["spec"]["hostPath"]["path"] = "/etc"
    with pytest.raises(DiskError, match="outside"):
        preparer._volume_file("data", outside, False, (root,))
