"""The snapshot and restore controllers' decisions (pure), and the node agent's file helpers."""

from __future__ import annotations

import copy
import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest

from virtshift.agent import snapshot as agent_snapshot
from virtshift.agent.snapshot import holes, punch_holes, sparse_copy
from virtshift.api import cdi
from virtshift.controller import snapshot as ctl
from virtshift.controller.restore import RestoreInputs, reconcile_restore
from virtshift.controller.snapshot import (
    CONTENT_FINALIZER,
    RESTORE_FINALIZER,
    SNAPSHOT_FINALIZER,
    SOURCE_FINALIZER,
    Create,
    Delete,
    Event,
    Patch,
    Plan,
    SnapshotInputs,
    Update,
    parse_duration,
    reconcile_content,
    reconcile_snapshot,
)
from virtshift.storage.sparse import data_extents

Obj = dict[str, Any]
T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
NS = "default"


def ts(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def vm(name: str = "vm1", *, fins: list[str] | None = None, status: Obj | None = None,
       claims: tuple[str, ...] = ("data",), running: bool = False) -> Obj:
    volumes: list[Obj] = [{"name": c, "persistentVolumeClaim": {"claimName": c}}
                          for c in claims]
    volumes.append({"name": "cloudinit", "cloudInitNoCloud": {"userData": "#!/bin/sh"}})
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "resourceVersion": "10", "finalizers": fins or []},
            "spec": {"runStrategy": "Always" if running else "Halted",
                     "template": {"spec": {"domain": {"devices": {}}, "volumes": volumes}}},
            "status": status or {}}


def pvc(name: str, *, phase: str = "Bound", node: str = "node01", **ann: str) -> Obj:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "annotations": dict(ann)},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": f"pv-{name}",
                     "resources": {"requests": {"storage": "64Mi"}},
                     "storageClassName": "hostpath-provisioner", "volumeMode": "Filesystem"},
            "status": {"phase": phase}}


def pv(name: str, node: str) -> Obj:
    return {"metadata": {"name": f"pv-{name}"}, "spec": {"nodeAffinity": {"required": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}}


def snap(*, status: Obj | None = None, fins: tuple[str, ...] = (SNAPSHOT_FINALIZER,),
         deleting: bool = False, created: datetime.datetime = T0, **spec: Any) -> Obj:
    obj: Obj = {"apiVersion": ctl.API_VERSION, "kind": "VirtualMachineSnapshot",
                "metadata": {"name": "s1", "namespace": NS, "uid": "suid",
                             "resourceVersion": "5", "creationTimestamp": ts(created),
                             "finalizers": list(fins)},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                                    "name": "vm1"}, **spec}}
    if status is not None:
        obj["status"] = status
    if deleting:
        obj["metadata"]["deletionTimestamp"] = ts(T0)
    return obj


def vmi(*conds: str) -> Obj:
    return {"metadata": {"name": "vm1", "namespace": NS},
            "status": {"phase": "Running",
                       "conditions": [{"type": c, "status": "True"} for c in conds]}}


def inputs(s: Obj, v: Obj | None, *, vmi_: Obj | None = None, content: Obj | None = None,
           pvcs: list[Obj] | None = None, nodes: dict[str, str] | None = None,
           now: datetime.datetime = T0) -> SnapshotInputs:
    pvcs = [pvc("data")] if pvcs is None else pvcs
    nodes = nodes or {p["metadata"]["name"]: "node01" for p in pvcs}
    return SnapshotInputs(
        snapshot=s, vm=v, vmi=vmi_, content=content,
        pvcs={(NS, p["metadata"]["name"]): p for p in pvcs},
        pvs={f"pv-{n}": pv(n, node) for n, node in nodes.items()}, now=now)


def of(plan: Plan, cls: type) -> list[Any]:
    return [a for a in plan.actions if isinstance(a, cls)]


def status_update(plan: Plan, kind: str) -> Obj:
    [u] = [a for a in of(plan, Update) if a.kind == kind and a.subresource == "status"]
    out: Obj = u.obj["status"]
    return out


def conds(status: Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", "")) for c in status["conditions"]}


LOCKED = {"snapshotInProgress": "s1"}


# ---- snapshots -------------------------------------------------------------------------------


def test_a_new_snapshot_gets_its_finalizer_then_an_initial_status() -> None:
    plan = reconcile_snapshot(inputs(snap(fins=()), vm()))
    [p] = plan.actions
    assert isinstance(p, Patch) and p.kind == "snapshot"
    assert p.patch["metadata"]["finalizers"] == [SNAPSHOT_FINALIZER]
    assert p.patch["metadata"]["resourceVersion"] == "5"

    plan = reconcile_snapshot(inputs(snap(), vm()))
    assert not of(plan, Patch)  # no status yet: nothing is locked before it exists
    st = status_update(plan, "snapshot")
    assert st["phase"] == "InProgress" and st["readyToUse"] is False
    assert st["sourceUID"] == "uid-vm1"
    assert conds(st) == {"Progressing": ("False", "Source not locked"),
                         "Ready": ("False", "Not ready")}


def test_the_source_is_locked_once_its_claims_are_ready() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    plan = reconcile_snapshot(inputs(s, vm()))
    fin, st = of(plan, Patch)
    assert (fin.kind, fin.subresource) == ("vm", "")
    assert fin.patch["metadata"] == {"finalizers": [SOURCE_FINALIZER], "resourceVersion": "10"}
    assert (st.kind, st.subresource, st.patch) == ("vm", "status", {
        "status": {"snapshotInProgress": "s1"}})
    assert not of(plan, Create)
    assert plan.requeue_after == ctl.RETRY_SECONDS


@pytest.mark.parametrize(("claims", "why"), [
    ([], "volume doesnt exist: data"),
    ([pvc("data", phase="Pending")], "volume not bound: data"),
    ([pvc("data", **{cdi.ANN_POPULATE: '{"type":"blank"}'})], "volume not populated: data"),
])
def test_the_source_waits_for_its_claims(claims: list[Obj], why: str) -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    plan = reconcile_snapshot(inputs(s, vm(), pvcs=claims, nodes={"data": "node01"}))
    assert not of(plan, Patch)
    st = status_update(plan, "snapshot")
    assert conds(st)["Progressing"] == ("False", f"Source not locked source default/vm1 {why}")


def test_volumes_on_two_nodes_cannot_be_snapshotted_together() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    plan = reconcile_snapshot(inputs(s, vm(claims=("a", "b")), pvcs=[pvc("a"), pvc("b")],
                                     nodes={"a": "node01", "b": "node02"}))
    assert not of(plan, Patch)
    assert "different nodes: node01, node02" in conds(status_update(plan, "snapshot"))[
        "Progressing"][1]


def test_another_snapshot_in_progress_keeps_the_source() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    plan = reconcile_snapshot(inputs(s, vm(status={"snapshotInProgress": "other"})))
    assert not of(plan, Patch)
    assert conds(status_update(plan, "snapshot"))["Progressing"][1].endswith(
        'snapshot "other" in progress')


def test_a_locked_source_gets_its_content() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    v = vm(fins=[SOURCE_FINALIZER], status=LOCKED)
    plan = reconcile_snapshot(inputs(s, v, vmi_=vmi("AgentConnected")))
    [create] = of(plan, Create)
    content = create.obj
    assert content["metadata"]["name"] == "vmsnapshot-content-suid"
    assert content["metadata"]["finalizers"] == [CONTENT_FINALIZER]
    assert content["metadata"]["labels"] == {ctl.LABEL_NODE: "node01"}
    assert content["metadata"]["annotations"] == {ctl.ANN_NODE: "node01"}
    assert content["spec"]["virtualMachineSnapshotName"] == "s1"
    assert content["spec"]["source"]["virtualMachine"]["metadata"]["name"] == "vm1"
    assert content["spec"]["source"]["virtualMachine"]["spec"] == v["spec"]
    [backup] = content["spec"]["volumeBackups"]
    assert backup["volumeName"] == "data"
    assert backup["volumeSnapshotName"] == "vmsnapshot-suid-volume-data"
    assert backup["persistentVolumeClaim"]["metadata"]["name"] == "data"
    assert backup["persistentVolumeClaim"]["spec"]["resources"] == {
        "requests": {"storage": "64Mi"}}
    [event] = of(plan, Event)
    assert event.reason == "SuccessfulVirtualMachineSnapshotContentCreate"
    assert event.message == "Successfully created VirtualMachineSnapshotContent " \
                            "vmsnapshot-content-suid"
    st = status_update(plan, "snapshot")
    assert conds(st)["Progressing"] == ("True", "Source locked and operation in progress")
    assert st["indications"] == ["GuestAgent", "Online"]
    assert [i["indication"] for i in st["sourceIndications"]] == ["GuestAgent", "Online"]


@pytest.mark.parametrize(("vmi_conds", "expected"), [
    ((), ["NoGuestAgent", "Online"]),
    (("Paused",), ["Online", "Paused"]),
    (("AgentConnected",), ["GuestAgent", "Online"]),
])
def test_indications_follow_the_vmi(vmi_conds: tuple[str, ...], expected: list[str]) -> None:
    assert ctl.indications(vmi(*vmi_conds)) == expected
    assert ctl.indications(None) == []


def test_the_node_agents_account_decides_the_final_indications() -> None:
    assert ctl.indications(vmi(), {"online": True, "frozen": True}) == ["GuestAgent", "Online"]
    assert ctl.indications(vmi("AgentConnected"), {"online": True, "frozen": False}) == [
        "NoGuestAgent", "Online"]
    assert ctl.indications(vmi(), {"online": False}) == []


def content_obj(*, status: Obj | None = None, stats: Obj | None = None,
                deleting: bool = False) -> Obj:
    ann = {ctl.ANN_NODE: "node01", ctl.ANN_DIR: "/s/snapshots/cuid"}
    if stats is not None:
        ann[ctl.ANN_STATS] = json.dumps(stats)
    c: Obj = {"apiVersion": ctl.API_VERSION, "kind": "VirtualMachineSnapshotContent",
              "metadata": {"name": "vmsnapshot-content-suid", "namespace": NS, "uid": "cuid",
                           "resourceVersion": "7", "finalizers": [CONTENT_FINALIZER],
                           "annotations": ann},
              "spec": {"virtualMachineSnapshotName": "s1",
                       "source": {"virtualMachine": {"metadata": {"name": "vm1",
                                                                  "namespace": NS},
                                                     "spec": vm()["spec"]}},
                       "volumeBackups": [{
                           "volumeName": "data",
                           "persistentVolumeClaim": {
                               "metadata": {"name": "data", "namespace": NS,
                                            "annotations": {
                                                "pv.kubernetes.io/bind-completed": "yes",
                                                "keep.me/too": "1"},
                                            "labels": {"app": "db"}},
                               "spec": pvc("data")["spec"]},
                           "volumeSnapshotName": "vmsnapshot-suid-volume-data"}]}}
    if status is not None:
        c["status"] = status
    if deleting:
        c["metadata"]["deletionTimestamp"] = ts(T0)
    return c


def test_a_ready_content_completes_the_snapshot_and_unlocks_the_source() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False,
                     "indications": ["NoGuestAgent", "Online"]})
    v = vm(fins=[SOURCE_FINALIZER], status=LOCKED)
    c = content_obj(status={"readyToUse": True, "creationTime": ts(T0)},
                    stats={"online": True, "frozen": True})
    plan = reconcile_snapshot(inputs(s, v, vmi_=vmi(), content=c))
    st = status_update(plan, "snapshot")
    assert st["phase"] == "Succeeded" and st["readyToUse"] is True
    assert st["creationTime"] == ts(T0)
    assert st["virtualMachineSnapshotContentName"] == "vmsnapshot-content-suid"
    assert st["indications"] == ["GuestAgent", "Online"]
    assert st["snapshotVolumes"] == {"includedVolumes": ["data"],
                                     "excludedVolumes": ["cloudinit"]}
    assert conds(st) == {"Progressing": ("False", "Operation complete"),
                         "Ready": ("True", "Ready")}
    # Succeeded: the source is unlocked (finalizer first, pinned to the VM's version).
    plan = reconcile_snapshot(inputs(snap(status=st), v, content=c))
    fin, unlock = of(plan, Patch)
    assert fin.patch == {"metadata": {"finalizers": None, "resourceVersion": "10"}}
    assert unlock.patch == {"status": {"snapshotInProgress": None}}


def test_a_content_error_shows_on_the_snapshot() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False})
    v = vm(fins=[SOURCE_FINALIZER], status=LOCKED)
    err = {"time": ts(T0), "message": "no space left"}
    plan = reconcile_snapshot(inputs(s, v, content=content_obj(
        status={"readyToUse": False, "error": err})))
    st = status_update(plan, "snapshot")
    assert st["phase"] == "InProgress" and st["error"] == err
    assert conds(st)["Progressing"] == ("False", "In error state")


def test_the_failure_deadline_fails_the_snapshot_and_deletes_its_content() -> None:
    s = snap(status={"phase": "InProgress", "readyToUse": False}, failureDeadline="1m")
    v = vm(fins=[SOURCE_FINALIZER], status=LOCKED)
    c = content_obj(status={"readyToUse": False})
    before = reconcile_snapshot(inputs(s, v, content=c, now=T0 + datetime.timedelta(seconds=30)))
    assert before.requeue_after == pytest.approx(30.5)
    plan = reconcile_snapshot(inputs(s, v, content=c, now=T0 + datetime.timedelta(seconds=61)))
    assert [(d.kind, d.name) for d in of(plan, Delete)] == [("content",
                                                             "vmsnapshot-content-suid")]
    st = status_update(plan, "snapshot")
    assert st["phase"] == "Failed"
    assert conds(st)["Failure"] == ("True", "snapshot deadline exceeded")
    assert conds(st)["Progressing"] == ("False", "Operation failed")
    # The source stays locked until the content is gone.
    assert not [p for p in of(plan, Patch) if p.kind == "vm"]
    plan = reconcile_snapshot(inputs(snap(status=st, failureDeadline="1m"), v, content=None,
                                     now=T0 + datetime.timedelta(seconds=62)))
    assert {p.kind for p in of(plan, Patch)} == {"vm"}


def test_deleting_a_snapshot_deletes_its_content_per_policy() -> None:
    done = {"phase": "Succeeded", "readyToUse": True, "creationTime": ts(T0)}
    ready = content_obj(status={"readyToUse": True, "creationTime": ts(T0)})
    plan = reconcile_snapshot(inputs(snap(status=done, deleting=True), vm(), content=ready))
    assert [d.kind for d in of(plan, Delete)] == ["content"]
    [fin] = [p for p in of(plan, Patch) if p.kind == "snapshot"]
    assert fin.patch == {"metadata": {"finalizers": None}}
    plan = reconcile_snapshot(inputs(snap(status=done, deleting=True, deletionPolicy="Retain"),
                                     vm(), content=ready))
    assert not of(plan, Delete)
    # A content that never became ready goes even with Retain.
    plan = reconcile_snapshot(inputs(snap(status={"phase": "InProgress"}, deleting=True,
                                          deletionPolicy="Retain"), vm(),
                                     content=content_obj(status={"readyToUse": False})))
    assert [d.kind for d in of(plan, Delete)] == ["content"]
    assert status_update(plan, "snapshot")["phase"] == "Deleting"


def test_contents_are_released_with_their_snapshot() -> None:
    c = content_obj(status={"readyToUse": True})
    assert not reconcile_content(c, snap(status={"phase": "Succeeded"}), T0).actions
    [p] = reconcile_content(c, None, T0).actions
    assert isinstance(p, Patch) and p.patch["metadata"]["finalizers"] is None
    [p] = reconcile_content(c, snap(deleting=True), T0).actions
    assert isinstance(p, Patch)
    empty = content_obj()
    empty["spec"]["volumeBackups"] = []
    [u] = reconcile_content(empty, snap(), T0).actions
    assert isinstance(u, Update) and u.obj["status"] == {"creationTime": ts(T0),
                                                          "readyToUse": True}


def test_durations() -> None:
    assert parse_duration("5m0s") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0") == 0
    assert parse_duration("5 minutes") is None
    assert parse_duration("") is None


# ---- restores --------------------------------------------------------------------------------


def restore_obj(*, status: Obj | None = None, target: str = "vm1", deleting: bool = False,
                fins: tuple[str, ...] = (RESTORE_FINALIZER,), owned: bool = True,
                created: datetime.datetime = T0, **spec: Any) -> Obj:
    r: Obj = {"apiVersion": ctl.API_VERSION, "kind": "VirtualMachineRestore",
              "metadata": {"name": "r1", "namespace": NS, "uid": "ruid",
                           "resourceVersion": "3", "creationTimestamp": ts(created),
                           "finalizers": list(fins)},
              "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                                  "name": target},
                       "virtualMachineSnapshotName": "s1", **spec}}
    if owned:
        r["metadata"]["ownerReferences"] = [{"kind": "VirtualMachine", "name": target}]
    if status is not None:
        r["status"] = status
    if deleting:
        r["metadata"]["deletionTimestamp"] = ts(T0)
    return r


READY_SNAP = snap(status={"phase": "Succeeded", "readyToUse": True, "sourceUID": "uid-vm1",
                          "virtualMachineSnapshotContentName": "vmsnapshot-content-suid"})
READY_CONTENT = content_obj(status={"readyToUse": True, "creationTime": ts(T0)})
STARTED = {"complete": False, "conditions": []}
RESTORES = [{"volumeName": "data", "persistentVolumeClaim": "restore-ruid-data",
             "volumeSnapshotName": "vmsnapshot-suid-volume-data"}]


def rinputs(r: Obj, target: Obj | None, *, vmi_: Obj | None = None,
            pvcs: list[Obj] | None = None, snapshot: Obj | None = READY_SNAP,
            content: Obj | None = READY_CONTENT,
            now: datetime.datetime = T0) -> RestoreInputs:
    return RestoreInputs(restore=r, snapshot=snapshot, content=content, vm=target, vmi=vmi_,
                         pvcs={(NS, p["metadata"]["name"]): p for p in pvcs or []},
                         datavolumes={}, classes=[], now=now)


def test_a_new_restore_is_initialised_then_owned_and_protected() -> None:
    st = status_update(reconcile_restore(rinputs(restore_obj(fins=(), owned=False), vm())),
                       "restore")
    assert st["complete"] is False
    assert conds(st) == {"Progressing": ("True", "Initializing VirtualMachineRestore"),
                         "Ready": ("False", "Initializing VirtualMachineRestore")}
    [p] = reconcile_restore(rinputs(restore_obj(status=STARTED, fins=(), owned=False),
                                    vm())).actions
    assert isinstance(p, Patch)
    assert p.patch["metadata"]["finalizers"] == [RESTORE_FINALIZER]
    assert p.patch["metadata"]["ownerReferences"][0]["uid"] == "uid-vm1"


def test_a_running_target_waits_then_fails_after_the_grace_period() -> None:
    r = restore_obj(status=STARTED)
    plan = reconcile_restore(rinputs(r, vm(running=True), vmi_=vmi()))
    st = status_update(plan, "restore")
    assert conds(st) == {"Progressing": ("False", "Waiting for target to be ready"),
                         "Ready": ("False", "Waiting for target to be ready")}
    assert [e.reason for e in of(plan, Event)] == ["RestoreTargetNotReady"]
    assert not of(plan, Create)
    late = T0 + datetime.timedelta(minutes=6)
    st = status_update(reconcile_restore(rinputs(r, vm(running=True), vmi_=vmi(), now=late)),
                       "restore")
    assert conds(st)["Failure"] == ("True", "Restore target failed to be ready within 5m0s")
    st = status_update(reconcile_restore(rinputs(
        restore_obj(status=STARTED, targetReadinessPolicy="FailImmediate"), vm(running=True),
        vmi_=vmi())), "restore")
    assert conds(st)["Failure"] == ("True", "Restore target not ready")
    plan = reconcile_restore(rinputs(restore_obj(status=STARTED,
                                                 targetReadinessPolicy="StopTarget"),
                                     vm(running=True), vmi_=vmi()))
    [stop] = of(plan, Patch)
    assert (stop.kind, stop.patch) == ("vm", {"spec": {"runStrategy": "Halted"}})


@pytest.mark.parametrize(("snapshot", "content", "message"), [
    (None, READY_CONTENT, "VMSnapshot default/s1 does not exist"),
    (snap(status={"phase": "Failed"}), READY_CONTENT,
     "VMSnapshot default/s1 failed and is invalid to use"),
    (snap(status={"phase": "InProgress", "readyToUse": False}), READY_CONTENT,
     "VMSnapshot default/s1 not ready"),
    (READY_SNAP, None, "VMSnapshotContent default/vmsnapshot-content-suid does not exist"),
])
def test_a_restore_needs_a_ready_snapshot(snapshot: Obj | None, content: Obj | None,
                                          message: str) -> None:
    plan = reconcile_restore(rinputs(restore_obj(status=STARTED), vm(), snapshot=snapshot,
                                     content=content))
    st = status_update(plan, "restore")
    assert conds(st)["Progressing"] == ("False", message)
    [event] = of(plan, Event)
    assert (event.type, event.reason) == ("Warning", "VirtualMachineRestoreError")
    assert event.message == f"VirtualMachineRestore encountered error {message}"


def test_restoring_over_another_existing_vm_is_refused() -> None:
    other = vm("vm2")
    st = status_update(reconcile_restore(rinputs(restore_obj(status=STARTED, target="vm2"),
                                                 other)), "restore")
    assert conds(st)["Progressing"][1] == ctl.ERR_RESTORE_TO_EXISTING


def test_restore_creates_claims_filled_from_the_snapshot_files() -> None:
    r = restore_obj(status=STARTED)
    plan = reconcile_restore(rinputs(r, vm()))
    [mark] = of(plan, Patch)
    assert mark.patch == {"status": {"restoreInProgress": "r1"}}
    st = status_update(plan, "restore")
    assert st["restores"] == RESTORES
    assert conds(st)["Progressing"] == ("True", "Creating new PVCs")

    plan = reconcile_restore(rinputs(restore_obj(status=st), vm(status={
        "restoreInProgress": "r1"})))
    [create] = of(plan, Create)
    claim = create.obj
    assert claim["metadata"]["name"] == "restore-ruid-data"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "64Mi"}},
                             "storageClassName": "hostpath-provisioner",
                             "volumeMode": "Filesystem"}
    ann = claim["metadata"]["annotations"]
    assert cdi.populate_source(claim) == cdi.PopulateSource(
        type="snapshot", path="/s/snapshots/cuid/data.img", node="node01")
    assert ann["volume.kubernetes.io/selected-node"] == "node01"
    assert ann["restore.kubevirt.io/name"] == "r1"
    assert ann["restore.kubevirt.io/lastRestoreUID"] == "r1-ruid"
    assert ann["keep.me/too"] == "1" and "pv.kubernetes.io/bind-completed" not in ann
    assert claim["metadata"]["labels"] == {"app": "db",
                                           "restore.kubevirt.io/source-vm-name": "vm1",
                                           "restore.kubevirt.io/source-vm-namespace": NS}
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-vm1"


def test_restore_points_the_vm_at_the_new_claims_then_completes() -> None:
    st = {**STARTED, "restores": RESTORES}
    target = vm(status={"restoreInProgress": "r1"})
    plan = reconcile_restore(rinputs(restore_obj(status=st), target,
                                     pvcs=[pvc("restore-ruid-data")]))
    [update] = [u for u in of(plan, Update) if u.kind == "vm"]
    new = update.obj
    assert new["metadata"]["resourceVersion"] == "10"
    assert new["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"] == "r1-ruid"
    assert new["spec"]["runStrategy"] == "Halted"
    volumes = new["spec"]["template"]["spec"]["volumes"]
    assert volumes[0] == {"name": "data",
                          "persistentVolumeClaim": {"claimName": "restore-ruid-data"}}
    assert volumes[1]["name"] == "cloudinit"
    assert new["spec"]["template"]["spec"]["domain"]["firmware"]["uuid"]
    assert conds(status_update(plan, "restore"))["Progressing"] == ("True",
                                                                     "Updating target spec")

    restored = copy.deepcopy(new)
    plan = reconcile_restore(rinputs(restore_obj(status=st), restored,
                                     pvcs=[pvc("restore-ruid-data")]))
    [clear] = of(plan, Patch)
    assert clear.patch == {"status": {"restoreInProgress": None}}
    [event] = of(plan, Event)
    assert (event.reason, event.message) == ("VirtualMachineRestoreComplete",
                                             "Successfully completed VirtualMachineRestore r1")
    st = status_update(plan, "restore")
    assert st["complete"] is True and st["restoreTime"] == ts(T0)
    assert conds(st) == {"Progressing": ("False", "Operation complete"),
                         "Ready": ("True", "Operation complete")}
    assert not reconcile_restore(rinputs(restore_obj(status=st), restored)).actions


def test_restore_into_a_new_vm_creates_it_stopped_with_patches() -> None:
    st = {**STARTED, "restores": RESTORES}
    r = restore_obj(status=st, target="copy", owned=False, patches=[
        '{"op": "add", "path": "/metadata/labels", "value": {"restored": "yes"}}'])
    plan = reconcile_restore(rinputs(r, None, pvcs=[pvc("restore-ruid-data")]))
    [create] = of(plan, Create)
    assert create.kind == "vm"
    new = create.obj
    assert new["metadata"]["name"] == "copy" and new["metadata"]["labels"] == {"restored": "yes"}
    assert new["spec"]["runStrategy"] == "Halted"
    assert new["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "restore-ruid-data"}
    assert "firmware" not in new["spec"]["template"]["spec"]["domain"]


def test_datavolume_volumes_become_claims_and_their_templates_are_deleted() -> None:
    source = vm()
    source["spec"]["template"]["spec"]["volumes"][0] = {"name": "data",
                                                        "dataVolume": {"name": "data"}}
    source["spec"]["dataVolumeTemplates"] = [{"metadata": {"name": "data"}, "spec": {}}]
    content = copy.deepcopy(READY_CONTENT)
    content["spec"]["source"]["virtualMachine"]["spec"] = source["spec"]
    st = {**STARTED, "restores": RESTORES}
    target = vm(status={"restoreInProgress": "r1"})
    target["spec"] = copy.deepcopy(source["spec"])
    inp = RestoreInputs(restore=restore_obj(status=st), snapshot=READY_SNAP, content=content,
                        vm=target, vmi=None, pvcs={(NS, "restore-ruid-data"): pvc(
                            "restore-ruid-data")}, datavolumes={(NS, "data"): {}}, classes=[],
                        now=T0)
    plan = reconcile_restore(inp)
    st2 = status_update(plan, "restore")
    assert st2["deletedDataVolumes"] == ["data"]
    inp = RestoreInputs(**{**inp.__dict__, "restore": restore_obj(status=st2)})
    [update] = [u for u in of(reconcile_restore(inp), Update) if u.kind == "vm"]
    assert "dataVolumeTemplates" not in update.obj["spec"]
    assert update.obj["spec"]["template"]["spec"]["volumes"][0] == {
        "name": "data", "persistentVolumeClaim": {"claimName": "restore-ruid-data"}}
    inp = RestoreInputs(**{**inp.__dict__, "vm": update.obj})
    assert [(d.kind, d.name) for d in of(reconcile_restore(inp), Delete)] == [("dv", "data")]


def test_deleting_a_restore_releases_the_target() -> None:
    r = restore_obj(status=STARTED, deleting=True)
    plan = reconcile_restore(rinputs(r, vm(status={"restoreInProgress": "r1"})))
    assert [p.patch for p in of(plan, Patch)] == [{"status": {"restoreInProgress": None}}]
    st = status_update(plan, "restore")
    plan = reconcile_restore(rinputs(restore_obj(status=st, deleting=True), vm()))
    [p] = plan.actions
    assert isinstance(p, Patch) and p.patch["metadata"]["finalizers"] is None


# ---- the node agent's files ------------------------------------------------------------------


def test_the_agent_uses_the_controllers_names() -> None:
    assert agent_snapshot.LABEL_NODE == ctl.LABEL_NODE
    assert agent_snapshot.ANN_DIR == ctl.ANN_DIR
    assert agent_snapshot.ANN_STATS == ctl.ANN_STATS


def test_sparse_copy_keeps_holes_and_data(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    with src.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(0)
        f.write(b"marker")
        f.seek(40 << 20)
        f.write(os.urandom(1 << 20))
    dst = tmp_path / "copy.img"
    copied = sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 64 << 20
    assert copied <= 4 << 20  # only the data extents (0 for a reflink)
    assert dst.stat().st_blocks * 512 <= 4 << 20


def test_punching_the_holes_of_a_map(tmp_path: Path) -> None:
    path = tmp_path / "full.img"
    path.write_bytes(b"a" * 8192 + b"\0" * (1 << 20) + b"b" * 8192)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        assert data_extents(fd, size) == [(0, size)]
        ranges = holes([(0, 8192), (size - 8192, size)], size)
        assert ranges == [(8192, size - 8192)]
        punch_holes(fd, ranges)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:8192] == b"a" * 8192 and data[-8192:] == b"b" * 8192
    assert data[8192:-8192] == b"\0" * (1 << 20)
    assert path.stat().st_blocks * 512 < 512 * 1024


def test_the_vm_says_which_volumes_can_be_snapshotted() -> None:
    v = vm()
    [p] = ctl.reconcile_vm_volumes(v).actions
    assert isinstance(p, Patch) and p.subresource == "status"
    assert p.patch == {"status": {"volumeSnapshotStatuses": [
        {"name": "data", "enabled": True},
        {"name": "cloudinit", "enabled": False,
         "reason": "Snapshot is not supported for this volumeSource type [cloudinit]"}]}}
    v["status"]["volumeSnapshotStatuses"] = p.patch["status"]["volumeSnapshotStatuses"]
    assert not ctl.reconcile_vm_volumes(v).actions
