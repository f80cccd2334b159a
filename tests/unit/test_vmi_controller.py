"""The VMI reconciler: Pending -> Scheduling -> Scheduled, Unschedulable, deletion."""

from __future__ import annotations

import copy
import datetime
from typing import Any

from virtshift.controller.vmi import (
    NODE_NAME_LABEL,
    VM_CONTROLLER_FINALIZER,
    VMI_FINALIZER,
    RemoveVMIFinalizers,
    SetVMILabels,
    UpdateVMIStatus,
    VMIDecision,
    reconcile_vmi,
    update_condition,
    volumes_ready,
)

Obj = dict[str, Any]

T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(seconds=30)
TS0, TS1 = "2026-05-06T07:08:09Z", "2026-05-06T07:08:39Z"


def node(name: str = "node1", memory: str = "8Gi", **labels: str) -> Obj:
    return {"metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "4", "memory": memory},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def make_vmi(phase: str = "", *, volumes: list[Obj] | None = None, deleting: bool = False,
             finalizers: list[str] | None = None, **spec: Any) -> Obj:
    obj: Obj = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "v", "namespace": "ns", "uid": "uid-v",
                     "finalizers": list(finalizers or [])},
        "spec": {"domain": {"cpu": {"sockets": 1, "cores": 1, "threads": 1},
                            "memory": {"guest": "1Gi"},
                            "resources": {"requests": {"memory": "1Gi"}}},
                 "volumes": volumes or [{"name": "root", "containerDisk": {"image": "i"}}],
                 **spec},
    }
    if phase:
        obj["status"] = {"phase": phase}
    if deleting:
        obj["metadata"]["deletionTimestamp"] = TS0
    return obj


def run(vmi: Obj, *, now: datetime.datetime = T0, nodes: list[Obj] | None = None,
        vmis: list[Obj] | None = None, owner_exists: bool = True,
        pvcs: dict[tuple[str, str], Obj] | None = None,
        datavolumes: dict[tuple[str, str], Obj] | None = None) -> VMIDecision:
    return reconcile_vmi(vmi, now=now, nodes=[node()] if nodes is None else nodes,
                         vmis=vmis or [], owner_exists=owner_exists, pvcs=pvcs,
                         datavolumes=datavolumes)


def status_update(decision: VMIDecision) -> Obj:
    found = [a for a in decision.actions if isinstance(a, UpdateVMIStatus)]
    assert len(found) == 1, decision.actions
    return found[0].status


def apply(vmi: Obj, decision: VMIDecision) -> Obj:
    vmi = copy.deepcopy(vmi)
    for action in decision.actions:
        if isinstance(action, UpdateVMIStatus):
            vmi["status"] = copy.deepcopy(action.status)
        elif isinstance(action, SetVMILabels):
            vmi["metadata"]["labels"] = action.labels
        else:
            vmi["metadata"]["finalizers"] = [f for f in vmi["metadata"]["finalizers"]
                                             if f not in action.finalizers]
    return vmi


def conditions(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status.get("conditions", [])}


def pvc(name: str) -> dict[tuple[str, str], Obj]:
    return {("ns", name): {"metadata": {"name": name, "namespace": "ns"},
                           "status": {"phase": "Bound"}}}


# ---- the happy path -----------------------------------------------------------------------


def test_new_vmi_goes_pending_then_scheduling_then_scheduled() -> None:
    vmi = make_vmi()
    first = run(vmi)
    status = status_update(first)
    assert status["phase"] == "Pending"
    assert status["phaseTransitionTimestamps"] == [
        {"phase": "Pending", "phaseTransitionTimestamp": TS0}]
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "PodNotExists")
    assert set(conditions(status)) == {"Ready"}
    vmi = apply(vmi, first)

    second = run(vmi, now=T1)
    status = status_update(second)
    assert status["phase"] == "Scheduling"
    assert [s["phase"] for s in status["phaseTransitionTimestamps"]] == ["Pending", "Scheduling"]
    ready = conditions(status)["Ready"]
    assert (ready["reason"], ready["lastTransitionTime"]) == ("GuestNotRunning", TS1)
    vmi = apply(vmi, second)

    third = run(vmi, now=T1)
    assert not third.unschedulable
    status = status_update(third)
    assert status["phase"] == "Scheduled" and status["nodeName"] == "node1"
    assert third.actions[1] == SetVMILabels({NODE_NAME_LABEL: "node1"})
    assert "PodScheduled" not in conditions(status)
    vmi = apply(vmi, third)

    # Nothing left to do for a Scheduled VMI: the node agent takes over.
    assert run(vmi, now=T1).actions == []


def test_scheduled_on_the_node_that_fits() -> None:
    vmi = make_vmi("Scheduling", nodeSelector={"zone": "b"})
    nodes = [node("a", zone="a"), node("b", zone="b")]
    assert status_update(run(vmi, nodes=nodes))["nodeName"] == "b"


def test_node_label_is_repaired_for_a_running_vmi() -> None:
    vmi = make_vmi("Running")
    vmi["status"]["nodeName"] = "node7"
    vmi["metadata"]["labels"] = {"app": "x", NODE_NAME_LABEL: "node1"}
    assert run(vmi).actions == [SetVMILabels({"app": "x", NODE_NAME_LABEL: "node7"})]


def test_running_and_final_vmis_keep_their_phase() -> None:
    for phase in ("Running", "Succeeded", "Failed", "Unknown"):
        vmi = make_vmi(phase)
        decision = run(vmi, nodes=[])
        assert not [a for a in decision.actions if isinstance(a, UpdateVMIStatus)], phase


# ---- unschedulable ------------------------------------------------------------------------


def test_unschedulable_vmi_waits_in_scheduling() -> None:
    vmi = make_vmi("Scheduling")
    first = run(vmi, nodes=[node("small", memory="1Gi")])
    assert first.unschedulable
    status = status_update(first)
    assert status["phase"] == "Scheduling" and "nodeName" not in status
    cond = conditions(status)["PodScheduled"]
    assert cond == {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are "
                   "available: 1 No preemption victims found for incoming pod.",
        "lastProbeTime": None, "lastTransitionTime": TS0}
    assert "Synchronized" not in conditions(status)
    vmi = apply(vmi, first)

    # Still no room: the condition keeps its transition time, so there is nothing to write.
    again = run(vmi, now=T1, nodes=[node("small", memory="1Gi")])
    assert again.unschedulable and again.actions == []

    # Another reason: the message changes, the transition time stays.
    other = run(vmi, now=T1, nodes=[])
    cond = conditions(status_update(other))["PodScheduled"]
    assert cond["message"] == "no nodes available to schedule pods"
    assert cond["lastTransitionTime"] == TS0

    # A node with room appears: scheduled, and the condition goes.
    placed = run(vmi, now=T1, nodes=[node("small", memory="1Gi"), node("big", memory="4Gi")])
    assert not placed.unschedulable
    status = status_update(placed)
    assert status["phase"] == "Scheduled" and status["nodeName"] == "big"
    assert "PodScheduled" not in conditions(status)


def test_resources_of_placed_vmis_are_taken_into_account() -> None:
    running = make_vmi("Running")
    running["metadata"]["uid"] = "other"
    running["status"]["nodeName"] = "node1"
    vmi = make_vmi("Scheduling")
    assert status_update(run(vmi, nodes=[node(memory="2Gi")]))["phase"] == "Scheduled"
    decision = run(vmi, nodes=[node(memory="2Gi")], vmis=[running, vmi])
    assert decision.unschedulable


# ---- volumes ------------------------------------------------------------------------------


def test_missing_pvc_keeps_the_vmi_pending() -> None:
    vmi = make_vmi("Pending", volumes=[{"name": "d", "persistentVolumeClaim": {
        "claimName": "data"}}])
    decision = run(vmi)
    status = status_update(decision)
    assert status["phase"] == "Pending"
    message = "PVC ns/data does not exist, waiting for it to appear"
    synced = conditions(status)["Synchronized"]
    assert (synced["status"], synced["reason"], synced["message"]) == (
        "False", "FailedPvcNotFound", message)
    scheduled = conditions(status)["PodScheduled"]
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == (
        "False", "Unschedulable", message)
    vmi = apply(vmi, decision)
    assert run(vmi, now=T1).actions == []  # unchanged while the claim is missing
    # The claim appears.
    status = status_update(run(vmi, now=T1, pvcs=pvc("data")))
    assert status["phase"] == "Scheduling"
    assert set(conditions(status)) == {"Ready"}


def test_datavolumes_must_be_populated() -> None:
    vmi = make_vmi("Pending", volumes=[{"name": "d", "dataVolume": {"name": "dv"}}])
    dv: Obj = {"metadata": {"name": "dv", "namespace": "ns"},
               "status": {"phase": "ImportInProgress"}}
    # Not populated yet: still Pending, without an error.
    decision = run(vmi, pvcs=pvc("dv"), datavolumes={("ns", "dv"): dv})
    status = status_update(decision)
    assert status["phase"] == "Pending" and "Synchronized" not in conditions(status)
    for ready in ("Succeeded", "WaitForFirstConsumer", "PendingPopulation"):
        dv["status"]["phase"] = ready
        status = status_update(run(vmi, pvcs=pvc("dv"), datavolumes={("ns", "dv"): dv}))
        assert status["phase"] == "Scheduling", ready


def test_volumes_ready() -> None:
    vmi = make_vmi(volumes=[
        {"name": "a", "containerDisk": {"image": "x"}},
        {"name": "b", "persistentVolumeClaim": {"claimName": "pb"}},
        {"name": "c", "dataVolume": {"name": "dc"}},
    ])
    assert volumes_ready(vmi, {}, {}) == (
        False, "PVC ns/pb does not exist, waiting for it to appear")
    both = {**pvc("pb"), **pvc("dc")}
    assert volumes_ready(vmi, both, {}) == (True, "")
    failed = {("ns", "dc"): {"status": {"phase": "Failed"}}}
    assert volumes_ready(vmi, both, failed) == (False, "")


# ---- deletion and finalizers --------------------------------------------------------------


def test_vmi_deleted_before_it_runs_fails() -> None:
    for phase in ("", "Pending", "Scheduling"):
        status = status_update(run(make_vmi(phase, deleting=True)))
        assert status["phase"] == "Failed", phase
        assert status["phaseTransitionTimestamps"][-1] == {
            "phase": "Failed", "phaseTransitionTimestamp": TS0}


def test_deleted_scheduled_vmi_fails_unless_an_agent_holds_it() -> None:
    vmi = make_vmi("Scheduled", deleting=True,
                   finalizers=[VM_CONTROLLER_FINALIZER, VMI_FINALIZER])
    vmi["status"]["nodeName"] = "node1"
    decision = run(vmi)
    assert status_update(decision)["phase"] == "Failed"
    # Final: the VMI finalizer goes; the VM controller's stays while its VM exists.
    assert decision.actions[-1] == RemoveVMIFinalizers((VMI_FINALIZER,))
    held = make_vmi("Scheduled", deleting=True,
                    finalizers=[VM_CONTROLLER_FINALIZER, "virtshift.io/node-agent"])
    held["status"]["nodeName"] = "node1"
    held["metadata"]["labels"] = {NODE_NAME_LABEL: "node1"}
    assert run(held).actions == []


def test_final_vmi_finalizers() -> None:
    vmi = make_vmi("Succeeded", finalizers=[VMI_FINALIZER, VM_CONTROLLER_FINALIZER, "other"])
    assert run(vmi, owner_exists=True).actions == [RemoveVMIFinalizers((VMI_FINALIZER,))]
    assert run(vmi, owner_exists=False).actions == [
        RemoveVMIFinalizers((VMI_FINALIZER, VM_CONTROLLER_FINALIZER))]
    vmi["metadata"]["finalizers"] = ["other"]
    assert run(vmi, owner_exists=False).actions == []


def test_update_condition_only_replaces_on_change() -> None:
    conds = [{"type": "Ready", "status": "False", "reason": "A", "lastTransitionTime": "t0"}]
    update_condition(conds, {"type": "Ready", "status": "False", "reason": "A",
                             "lastTransitionTime": "t1"})
    assert conds[0]["lastTransitionTime"] == "t0"
    update_condition(conds, {"type": "Ready", "status": "True", "lastTransitionTime": "t2"})
    assert conds == [{"type": "Ready", "status": "True", "lastTransitionTime": "t2"}]
    update_condition(conds, {"type": "Paused", "status": "True"})
    assert [c["type"] for c in conds] == ["Ready", "Paused"]
