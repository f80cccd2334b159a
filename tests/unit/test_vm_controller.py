"""The VirtualMachine reconciler: runStrategy semantics, state change requests, status."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from virtshift.controller.vm import (
    API_VERSION_ANNOTATIONS,
    GENERATION_ANNOTATION,
    AdoptVMI,
    CreateDataVolume,
    CreateVMI,
    DeleteVMI,
    PatchVMMetadata,
    RemoveVMFinalizer,
    RemoveVMIFinalizer,
    SetRunning,
    SetStateChangeRequests,
    UpdateVMStatus,
    VMAction,
    VMInputs,
    VMPlan,
    backoff_seconds,
    build_vmi,
    firmware_uuid,
    reconcile_vm,
    run_strategy,
)
from virtshift.controller.vmi import VM_CONTROLLER_FINALIZER, parse_time, rfc3339

Obj = dict[str, Any]

NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
EARLIER = "2026-03-04T05:00:00Z"
VM_UID = "1e7e0000-0000-4000-8000-0000000000aa"
VMI_UID = "2e7e0000-0000-4000-8000-0000000000bb"
STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted", "Once")


def make_vm(strategy: str | None = "Always", *, running: bool | None = None,
            requests: list[Obj] | None = None, status: Obj | None = None,
            generation: int = 1, **metadata: Any) -> Obj:
    """A VM as the API server stores it after the controller's first pass (finalizer and
    api-version annotations present)."""
    spec: Obj = {"template": {
        "metadata": {"labels": {"kubevirt.io/vm": "vm1"}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "128Mi"}},
                 "volumes": [{"name": "root", "containerDisk": {"image": "img"}}]}}}
    if strategy is not None:
        spec["runStrategy"] = strategy
    if running is not None:
        spec["running"] = running
    meta: Obj = {"name": "vm1", "namespace": "ns", "uid": VM_UID, "generation": generation,
                 "finalizers": [VM_CONTROLLER_FINALIZER],
                 "annotations": dict.fromkeys(API_VERSION_ANNOTATIONS, "v1")}
    meta.update(metadata)
    vm: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
               "spec": spec, "status": dict(status or {})}
    if requests is not None:
        vm["status"]["stateChangeRequests"] = requests
    return vm


def make_vmi(phase: str = "Running", *, uid: str = VMI_UID, ran: bool | None = None,
             conditions: list[Obj] | None = None, deleting: bool = False,
             owner_uid: str | None = VM_UID, generation: int | None = 1,
             status: Obj | None = None) -> Obj:
    """The VM's VMI in ``phase``; ``ran`` says whether it ever reached Running (default: when
    the phase is Running or later)."""
    if ran is None:
        ran = phase in ("Running", "Succeeded", "Failed")
    stamps = [{"phase": p, "phaseTransitionTimestamp": EARLIER}
              for p in ("Pending", "Scheduling", "Scheduled") + (("Running",) if ran else ())]
    if phase not in ("", "Pending", "Scheduling", "Scheduled", "Running"):
        stamps.append({"phase": phase, "phaseTransitionTimestamp": EARLIER})
    meta: Obj = {"name": "vm1", "namespace": "ns", "uid": uid,
                 "finalizers": [VM_CONTROLLER_FINALIZER], "annotations": {}}
    if generation is not None:
        meta["annotations"][GENERATION_ANNOTATION] = str(generation)
    if owner_uid is not None:
        meta["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                    "name": "vm1", "uid": owner_uid, "controller": True}]
    if deleting:
        meta["deletionTimestamp"] = EARLIER
    st: Obj = {"phase": phase, "phaseTransitionTimestamps": stamps,
               "conditions": conditions or []}
    st.update(status or {})
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": meta, "spec": {}, "status": st}


def stop_request(uid: str = VMI_UID) -> Obj:
    return {"action": "Stop", "uid": uid}


START: Obj = {"action": "Start"}


def reconcile(vm: Obj, vmi: Obj | None = None, now: datetime.datetime = NOW,
              **kw: Any) -> VMPlan:
    kw.setdefault("randint", lambda n: 0)
    return reconcile_vm(VMInputs(vm, vmi, now, **kw))


def of(plan: VMPlan, kind: type[VMAction]) -> list[Any]:
    return [a for a in plan.actions if isinstance(a, kind)]


def sync_kinds(plan: VMPlan) -> list[str]:
    """The actions that change the world (not the status or metadata bookkeeping)."""
    skip = (UpdateVMStatus, RemoveVMIFinalizer, PatchVMMetadata)
    return [type(a).__name__ for a in plan.actions if not isinstance(a, skip)]


def new_status(plan: VMPlan, vm: Obj) -> Obj:
    updates = of(plan, UpdateVMStatus)
    assert len(updates) <= 1
    return dict(updates[0].status) if updates else dict(vm.get("status") or {})


def printable(plan: VMPlan, vm: Obj) -> str:
    return str(new_status(plan, vm)["printableStatus"])


def apply(vm: Obj, plan: VMPlan) -> Obj:
    """The VM after the controller wrote what the plan says (as VMController.execute does)."""
    vm = copy.deepcopy(vm)
    for action in plan.actions:
        if isinstance(action, SetStateChangeRequests):
            vm["status"]["stateChangeRequests"] = action.requests
        elif isinstance(action, SetRunning):
            vm["spec"].update(action.patch["spec"])
        elif isinstance(action, UpdateVMStatus):
            vm["status"] = copy.deepcopy(action.status)
        elif isinstance(action, PatchVMMetadata):
            vm["metadata"]["finalizers"] = action.finalizers
            vm["metadata"]["annotations"] = action.annotations
    return vm


def condition(status: Obj, ctype: str) -> Obj | None:
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), None)


# ---- the run strategy -------------------------------------------------------------------


def test_run_strategy_and_deprecated_running() -> None:
    assert run_strategy(make_vm("Manual")) == ("Manual", None)
    assert run_strategy(make_vm(None, running=True)) == ("Always", None)
    assert run_strategy(make_vm(None, running=False)) == ("Halted", None)
    assert run_strategy(make_vm(None)) == ("Halted", None)
    assert run_strategy(make_vm("Always", running=True)) == (
        "Unknown", "running and runstrategy are mutually exclusive")


# What each strategy does, given no VMI or the VMI in a phase: the sync actions and the
# printableStatus. "ran" VMIs reached Running before they ended (no crash loop).
MATRIX: list[tuple[str, str | None, list[str], str]] = [
    ("Always", None, ["CreateVMI"], "Starting"),
    ("Always", "Running", [], "Running"),
    ("Always", "Succeeded", ["DeleteVMI"], "Stopped"),
    ("Always", "Failed", ["DeleteVMI"], "Stopped"),
    ("RerunOnFailure", None, ["CreateVMI"], "Starting"),  # never ran under this strategy
    ("RerunOnFailure", "Running", [], "Running"),
    ("RerunOnFailure", "Succeeded", ["DeleteVMI"], "Stopped"),
    ("RerunOnFailure", "Failed", ["DeleteVMI", "SetStateChangeRequests"], "Stopped"),
    ("Manual", None, [], "Stopped"),
    ("Manual", "Running", [], "Running"),
    ("Manual", "Succeeded", [], "Stopped"),
    ("Manual", "Failed", [], "Stopped"),
    ("Halted", None, [], "Stopped"),
    ("Halted", "Running", ["DeleteVMI"], "Stopping"),
    ("Halted", "Succeeded", ["DeleteVMI"], "Stopped"),
    ("Halted", "Failed", ["DeleteVMI"], "Stopped"),
    ("Once", None, ["CreateVMI"], "Starting"),
    ("Once", "Running", [], "Running"),
    ("Once", "Succeeded", [], "Stopped"),
    ("Once", "Failed", [], "Stopped"),
]


@pytest.mark.parametrize(("strategy", "vmi_phase", "actions", "shown"), MATRIX,
                         ids=[f"{s}-{p}" for s, p, _, _ in MATRIX])
def test_run_strategy_matrix(strategy: str, vmi_phase: str | None, actions: list[str],
                             shown: str) -> None:
    vm = make_vm(strategy)
    vmi = make_vmi(vmi_phase) if vmi_phase else None
    plan = reconcile(vm, vmi)
    assert sync_kinds(plan) == actions
    assert printable(plan, vm) == shown
    assert plan.sync_error is None
    for delete in of(plan, DeleteVMI):
        assert (delete.name, delete.uid) == ("vm1", VMI_UID)
    for create in of(plan, CreateVMI):
        assert create.vmi["metadata"]["name"] == "vm1"
    if vmi_phase == "Failed" and strategy == "RerunOnFailure":
        assert of(plan, SetStateChangeRequests)[0].requests == [START]
        # The queued Start request survives the status write (the VMI is final).
        assert new_status(plan, vm)["stateChangeRequests"] == [START]


@pytest.mark.parametrize(("running", "equivalent"), [(True, "Always"), (False, "Halted")])
@pytest.mark.parametrize("vmi_phase", [None, "Running", "Succeeded", "Failed"])
def test_deprecated_running_acts_like_its_strategy(running: bool, equivalent: str,
                                                   vmi_phase: str | None) -> None:
    vmi = make_vmi(vmi_phase) if vmi_phase else None
    legacy, modern = make_vm(None, running=running), make_vm(equivalent)
    got, want = reconcile(legacy, vmi), reconcile(modern, vmi)
    assert sync_kinds(got) == sync_kinds(want)
    assert printable(got, legacy) == printable(want, modern)


def test_running_and_run_strategy_together_is_a_sync_error() -> None:
    vm = make_vm("Always", running=True)
    plan = reconcile(vm)
    assert sync_kinds(plan) == []
    assert plan.sync_error is not None and plan.sync_error.reason == "FailedCreate"
    failure = condition(new_status(plan, vm), "Failure")
    assert failure is not None
    assert failure["status"] == "True" and failure["reason"] == "FailedCreate"
    assert failure["message"] == ("Error fetching RunStrategy: running and runstrategy are "
                                  "mutually exclusive")


def test_unknown_run_strategy_is_a_sync_error() -> None:
    plan = reconcile(make_vm("Sometimes"))
    assert sync_kinds(plan) == []
    assert plan.sync_error is not None
    assert plan.sync_error.message == "unknown runstrategy: Sometimes"


def test_rerun_on_failure_does_not_restart_after_it_ran_once() -> None:
    # status.runStrategy records that a VMI was created under this strategy.
    vm = make_vm("RerunOnFailure", status={"runStrategy": "RerunOnFailure"})
    plan = reconcile(vm)
    assert sync_kinds(plan) == []
    assert printable(plan, vm) == "Stopped"
    # Coming from another strategy it starts.
    vm = make_vm("RerunOnFailure", status={"runStrategy": "Halted"})
    assert sync_kinds(reconcile(vm)) == ["CreateVMI"]


def test_rerun_on_failure_restarts_a_failed_vmi_in_two_passes() -> None:
    vm = make_vm("RerunOnFailure", status={"runStrategy": "RerunOnFailure"})
    first = reconcile(vm, make_vmi("Failed"))
    assert sync_kinds(first) == ["DeleteVMI", "SetStateChangeRequests"]
    vm = apply(vm, first)
    # The VMI is being deleted: nothing more until it is gone.
    plan = reconcile(vm, make_vmi("Failed", deleting=True))
    assert sync_kinds(plan) == []
    plan = reconcile(vm, None)
    assert sync_kinds(plan) == ["CreateVMI"]
    assert printable(plan, vm) == "Starting"
    vm = apply(vm, plan)
    # Once the new VMI exists, the Start request is trimmed.
    plan = reconcile(vm, make_vmi("Pending", uid="new"))
    assert new_status(plan, vm).get("stateChangeRequests") is None
    assert of(plan, UpdateVMStatus)[0].cleared_requests == 1


def test_deleting_vmi_is_not_deleted_again() -> None:
    for strategy in ("Always", "Halted", "RerunOnFailure"):
        vm = make_vm(strategy, requests=[stop_request()])
        plan = reconcile(vm, make_vmi("Running", deleting=True))
        assert sync_kinds(plan) == [], strategy
        assert printable(plan, vm) == "Stopping"


# ---- start and stop requests -------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "actions"), [
    ("Always", ["DeleteVMI"]),  # a restart: the next pass starts a new VMI
    ("RerunOnFailure", ["DeleteVMI"]),
    ("Manual", ["DeleteVMI"]),
    ("Halted", ["DeleteVMI"]),
    ("Once", []),
])
def test_stop_request_for_the_running_vmi(strategy: str, actions: list[str]) -> None:
    vm = make_vm(strategy, requests=[stop_request()])
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == actions
    assert printable(plan, vm) == ("Stopping" if actions else "Running")
    # The request stays until the VMI is gone.
    assert new_status(plan, vm)["stateChangeRequests"] == [stop_request()]


@pytest.mark.parametrize("strategy", ["Always", "RerunOnFailure", "Manual"])
def test_stop_request_for_another_vmi_is_ignored_and_trimmed(strategy: str) -> None:
    vm = make_vm(strategy, requests=[stop_request("someone-else")])
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == []
    assert "stateChangeRequests" not in new_status(plan, vm)
    assert of(plan, UpdateVMStatus)[0].cleared_requests == 1


def test_stop_request_without_uid_is_trimmed() -> None:
    vm = make_vm("Manual", requests=[{"action": "Stop"}])
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == []
    assert "stateChangeRequests" not in new_status(plan, vm)


@pytest.mark.parametrize(("strategy", "actions", "shown"), [
    ("Manual", ["CreateVMI"], "Starting"),
    ("RerunOnFailure", ["CreateVMI"], "Starting"),
    ("Always", ["CreateVMI"], "Starting"),
    ("Once", ["CreateVMI"], "Starting"),
    ("Halted", ["SetRunning"], "Stopped"),
])
def test_start_request_without_vmi(strategy: str, actions: list[str], shown: str) -> None:
    vm = make_vm(strategy, requests=[START], status={"runStrategy": strategy})
    plan = reconcile(vm)
    assert sync_kinds(plan) == actions
    assert printable(plan, vm) == shown
    # Kept until a live VMI exists.
    assert new_status(plan, vm)["stateChangeRequests"] == [START]


def test_halted_start_request_switches_the_vm_to_running() -> None:
    plan = reconcile(make_vm("Halted", requests=[START]))
    assert of(plan, SetRunning)[0].patch == {"spec": {"runStrategy": "Always"}}
    plan = reconcile(make_vm(None, running=False, requests=[START]))
    assert of(plan, SetRunning)[0].patch == {"spec": {"running": True}}


def test_start_request_is_trimmed_once_a_live_vmi_exists() -> None:
    vm = make_vm("Manual", requests=[START])
    for vmi_phase in ("Pending", "Scheduled", "Running"):
        plan = reconcile(vm, make_vmi(vmi_phase))
        assert sync_kinds(plan) == []
        assert "stateChangeRequests" not in new_status(plan, vm)
    # Not for a final or deleting VMI: that start is still to come.
    for vmi in (make_vmi("Succeeded"), make_vmi("Running", deleting=True)):
        plan = reconcile(vm, vmi)
        assert new_status(plan, vm)["stateChangeRequests"] == [START]


def test_manual_restart_takes_three_passes() -> None:
    """``virtctl restart`` on a Manual VM: [Stop uid, Start]; one request at a time."""
    vm = make_vm("Manual", requests=[stop_request(), START],
                 status={"runStrategy": "Manual", "created": True})
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == ["DeleteVMI"]
    assert printable(plan, vm) == "Stopping"
    vm = apply(vm, plan)
    # The VMI is gone: the Stop request is done, the Start request is not looked at yet.
    plan = reconcile(vm)
    assert sync_kinds(plan) == []
    assert new_status(plan, vm)["stateChangeRequests"] == [START]
    vm = apply(vm, plan)
    plan = reconcile(vm)
    assert sync_kinds(plan) == ["CreateVMI"]
    assert printable(plan, vm) == "Starting"


def test_always_restart() -> None:
    vm = make_vm("Always", requests=[stop_request(), START])
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == ["DeleteVMI"]
    vm = apply(vm, plan)
    plan = reconcile(vm)  # old VMI gone: Always starts a new one right away
    assert sync_kinds(plan) == ["CreateVMI"]
    assert new_status(plan, vm)["stateChangeRequests"] == [START]


def test_paused_start_request() -> None:
    vm = make_vm("Manual", requests=[{"action": "Start", "data": {"paused": "true"}}])
    (create,) = of(reconcile(vm), CreateVMI)
    assert create.vmi["spec"]["startStrategy"] == "Paused"
    (create,) = of(reconcile(make_vm("Manual", requests=[START])), CreateVMI)
    assert "startStrategy" not in create.vmi["spec"]


# ---- crash loops --------------------------------------------------------------------------


def test_backoff_seconds() -> None:
    assert [backoff_seconds(n, lambda k: 0) for n in (0, 1, 2, 3, 5, 6)] == [
        10, 10, 40, 90, 250, 300]
    # Jitter: up to half again, never past the cap.
    assert backoff_seconds(2, lambda k: k - 1) == 60
    assert backoff_seconds(5, lambda k: k - 1) == 300
    seen: list[int] = []

    def spy(k: int) -> int:
        seen.append(k)
        return 0

    backoff_seconds(3, spy)
    assert seen == [46]  # randint's bound: half of 90, plus one


def test_crash_loop_backoff() -> None:
    vm = make_vm("Always")
    # The VMI failed without ever running: a start failure.
    plan = reconcile(vm, make_vmi("Failed", ran=False, uid="a"))
    assert sync_kinds(plan) == ["DeleteVMI"]
    status = new_status(plan, vm)
    assert status["startFailure"] == {
        "consecutiveFailCount": 1, "lastFailedVMIUID": "a",
        "retryAfterTimestamp": rfc3339(NOW + datetime.timedelta(seconds=10))}
    assert status["printableStatus"] == "CrashLoopBackOff"
    vm = apply(vm, plan)
    # The same VMI seen again is not counted twice.
    again = reconcile(vm, make_vmi("Failed", ran=False, uid="a"))
    assert new_status(again, vm)["startFailure"]["consecutiveFailCount"] == 1
    # No VMI: wait for the backoff, requeued for when it ends.
    plan = reconcile(vm, None, NOW + datetime.timedelta(seconds=4))
    assert sync_kinds(plan) == []
    assert plan.requeue_after == 6.0
    assert printable(plan, vm) == "CrashLoopBackOff"
    # After it: start again.
    later = NOW + datetime.timedelta(seconds=10)
    plan = reconcile(vm, None, later)
    assert sync_kinds(plan) == ["CreateVMI"] and plan.requeue_after is None
    assert printable(plan, vm) == "Starting"
    vm = apply(vm, plan)
    # A second early failure: 40 seconds.
    plan = reconcile(vm, make_vmi("Failed", ran=False, uid="b"), later)
    failure = new_status(plan, vm)["startFailure"]
    assert failure["consecutiveFailCount"] == 2
    assert parse_time(failure["retryAfterTimestamp"]) == later + datetime.timedelta(seconds=40)


def test_a_vmi_that_ran_clears_the_start_failure() -> None:
    failure = {"consecutiveFailCount": 3, "lastFailedVMIUID": "x",
               "retryAfterTimestamp": rfc3339(NOW + datetime.timedelta(seconds=90))}
    vm = make_vm("Always", status={"startFailure": failure})
    plan = reconcile(vm, make_vmi("Running"))
    assert "startFailure" not in new_status(plan, vm)
    plan = reconcile(vm, make_vmi("Failed", ran=True))
    assert "startFailure" not in new_status(plan, vm)
    assert printable(plan, vm) == "Stopped"


@pytest.mark.parametrize("strategy", ["Manual", "Halted"])
def test_strategies_that_do_not_restart_clear_the_start_failure(strategy: str) -> None:
    failure = {"consecutiveFailCount": 3, "lastFailedVMIUID": "x",
               "retryAfterTimestamp": rfc3339(NOW + datetime.timedelta(seconds=90))}
    vm = make_vm(strategy, status={"startFailure": failure})
    plan = reconcile(vm, make_vmi("Failed", ran=False))
    assert "startFailure" not in new_status(plan, vm)
    assert printable(plan, vm) == "Stopped"


def test_rerun_on_failure_waits_for_the_backoff_too() -> None:
    failure = {"consecutiveFailCount": 1, "lastFailedVMIUID": "x",
               "retryAfterTimestamp": rfc3339(NOW + datetime.timedelta(seconds=30))}
    vm = make_vm("RerunOnFailure", requests=[START],
                 status={"startFailure": failure, "runStrategy": "RerunOnFailure"})
    plan = reconcile(vm)
    assert sync_kinds(plan) == [] and plan.requeue_after == 30.0
    assert printable(plan, vm) == "CrashLoopBackOff"


@pytest.mark.parametrize("strategy", ["Manual", "Once"])
def test_start_without_backoff(strategy: str) -> None:
    """Upstream checks the start-failure backoff only for Always and RerunOnFailure: a Manual
    start request or a Once VM starts at once."""
    failure = {"consecutiveFailCount": 2, "lastFailedVMIUID": "x",
               "retryAfterTimestamp": rfc3339(NOW + datetime.timedelta(seconds=60))}
    vm = make_vm(strategy, requests=[START], status={"startFailure": failure})
    plan = reconcile(vm)
    assert sync_kinds(plan) == ["CreateVMI"]
    assert plan.requeue_after is None


# ---- printableStatus ----------------------------------------------------------------------


def cond(ctype: str, status: str, reason: str = "") -> Obj:
    c = {"type": ctype, "status": status, "lastProbeTime": None,
         "lastTransitionTime": EARLIER}
    if reason:
        c["reason"] = reason
    return c


@pytest.mark.parametrize(("vmi", "shown"), [
    (make_vmi(""), "Starting"),
    (make_vmi("Pending"), "Starting"),
    (make_vmi("Scheduling"), "Starting"),
    (make_vmi("Scheduled"), "Starting"),
    (make_vmi("Running"), "Running"),
    (make_vmi("Running", conditions=[cond("Paused", "True", "PausedByUser")]), "Paused"),
    (make_vmi("Running", conditions=[cond("Paused", "False")]), "Running"),
    (make_vmi("Scheduling", conditions=[cond("PodScheduled", "False", "Unschedulable")]),
     "ErrorUnschedulable"),
    (make_vmi("Scheduled", conditions=[cond("Synchronized", "False", "ErrImagePull")]),
     "ErrImagePull"),
    (make_vmi("Scheduled", conditions=[cond("Synchronized", "False", "ImagePullBackOff")]),
     "ImagePullBackOff"),
    (make_vmi("Pending", conditions=[cond("Synchronized", "False", "FailedPvcNotFound"),
                                     cond("PodScheduled", "False", "Unschedulable")]),
     "ErrorPvcNotFound"),
    (make_vmi("Running", status={"migrationState": {"startTimestamp": EARLIER}}),
     "Migrating"),
    (make_vmi("Running", status={"migrationState": {"startTimestamp": EARLIER,
                                                    "endTimestamp": EARLIER}}), "Running"),
    (make_vmi("Running", deleting=True), "Stopping"),
    (make_vmi("Failed", deleting=True), "Stopped"),
    (make_vmi("Unknown"), "Unknown"),
])
def test_printable_status_from_the_vmi(vmi: Obj, shown: str) -> None:
    vm = make_vm("Manual")  # Manual: the controller does nothing to the VMI by itself
    assert printable(reconcile(vm, vmi), vm) == shown


def test_printable_status_terminating_wins() -> None:
    vm = make_vm("Always", deletionTimestamp=EARLIER)
    plan = reconcile(vm, make_vmi("Running"))
    assert sync_kinds(plan) == ["DeleteVMI"]
    assert printable(plan, vm) == "Terminating"


def test_printable_status_volumes() -> None:
    vm = make_vm("Always")
    vm["spec"]["template"]["spec"]["volumes"] = [
        {"name": "d", "dataVolume": {"name": "dv1"}},
        {"name": "p", "persistentVolumeClaim": {"claimName": "pvc1"}}]
    dv = {"metadata": {"name": "dv1", "namespace": "ns"}, "status": {"phase": "Succeeded"}}
    pvc = {"metadata": {"name": "pvc1", "namespace": "ns"}, "status": {"phase": "Pending"}}
    pvcs = {("ns", "pvc1"): pvc}
    vmi = make_vmi("Pending")
    plan = reconcile(vm, vmi, datavolumes={("ns", "dv1"): dv}, pvcs=pvcs)
    assert printable(plan, vm) == "WaitingForVolumeBinding"
    dv["status"] = {"phase": "ImportInProgress"}
    assert printable(reconcile(vm, vmi, datavolumes={("ns", "dv1"): dv}, pvcs=pvcs),
                     vm) == "Provisioning"
    dv["status"] = {"phase": "Failed"}
    assert printable(reconcile(vm, vmi, datavolumes={("ns", "dv1"): dv}, pvcs=pvcs),
                     vm) == "DataVolumeError"
    # An unbound claim is not a reason to show anything but Stopped for a Halted VM.
    halted = make_vm("Halted")
    halted["spec"]["template"]["spec"]["volumes"] = vm["spec"]["template"]["spec"]["volumes"]
    assert printable(reconcile(halted, None, pvcs=pvcs), halted) == "Stopped"


# ---- status fields ------------------------------------------------------------------------


def test_status_fields_follow_the_vmi() -> None:
    vm = make_vm("Always", generation=3)
    vmi = make_vmi("Running", generation=2,
                   conditions=[cond("Ready", "True"), cond("AgentConnected", "True"),
                               cond("LiveMigratable", "False", "DisksNotLiveMigratable")])
    status = new_status(reconcile(vm, vmi), vm)
    assert status["created"] is True and status["ready"] is True
    assert status["runStrategy"] == "Always"
    assert (status["observedGeneration"], status["desiredGeneration"]) == (2, 3)
    assert [c["type"] for c in status["conditions"]] == [
        "Ready", "AgentConnected", "LiveMigratable"]
    assert (condition(status, "LiveMigratable") or {})["reason"] == "DisksNotLiveMigratable"
    # A VMI condition that went away goes from the VM too.
    vm["status"] = status
    vmi["status"]["conditions"] = [cond("Ready", "False", "GuestNotRunning")]
    status = new_status(reconcile(vm, vmi), vm)
    assert [c["type"] for c in status["conditions"]] == ["Ready"]
    assert status["conditions"][0]["reason"] == "GuestNotRunning"
    assert "ready" not in status


def test_status_without_vmi() -> None:
    vm = make_vm("Halted")
    status = new_status(reconcile(vm), vm)
    # runStrategy is recorded only once a VMI was created; false flags are left out.
    for key in ("created", "ready", "runStrategy", "observedGeneration"):
        assert key not in status
    ready = condition(status, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "VMINotExists")
    assert status["printableStatus"] == "Stopped"
    vm["status"] = {"runStrategy": "Always"}
    assert new_status(reconcile(vm), vm)["runStrategy"] == "Halted"


def test_vmi_without_ready_condition() -> None:
    vm = make_vm("Manual")
    ready = condition(new_status(reconcile(vm, make_vmi("Scheduled")), vm), "Ready")
    assert ready is not None and ready["reason"] == "VMIConditionMissing"


def test_no_status_write_when_nothing_changed() -> None:
    vm = make_vm("Manual")
    vm = apply(vm, reconcile(vm, make_vmi("Running")))
    assert of(reconcile(vm, make_vmi("Running")), UpdateVMStatus) == []


def test_failure_condition_clears_with_the_error() -> None:
    vm = make_vm("Always", running=True)
    vm = apply(vm, reconcile(vm))
    assert condition(vm["status"], "Failure") is not None
    del vm["spec"]["running"]
    assert condition(new_status(reconcile(vm), vm), "Failure") is None


def test_final_vmi_loses_the_controller_finalizer() -> None:
    vm = make_vm("Manual")
    assert of(reconcile(vm, make_vmi("Succeeded")), RemoveVMIFinalizer) == [
        RemoveVMIFinalizer("vm1")]
    assert of(reconcile(vm, make_vmi("Running")), RemoveVMIFinalizer) == []
    done = make_vmi("Failed")
    done["metadata"]["finalizers"] = []
    assert of(reconcile(vm, done), RemoveVMIFinalizer) == []


# ---- metadata, ownership, deletion --------------------------------------------------------


def test_fresh_vm_gets_finalizer_and_annotations() -> None:
    vm = make_vm("Halted", finalizers=["other"], annotations={"a": "b"})
    (patch,) = of(reconcile(vm), PatchVMMetadata)
    assert patch.finalizers == ["other", VM_CONTROLLER_FINALIZER]
    assert patch.annotations == {"a": "b", **dict.fromkeys(API_VERSION_ANNOTATIONS, "v1")}
    assert of(reconcile(make_vm("Halted")), PatchVMMetadata) == []


def test_orphan_vmi_is_adopted() -> None:
    vm = make_vm("Always")
    (adopt,) = of(reconcile(vm, make_vmi("Running", owner_uid=None)), AdoptVMI)
    assert adopt.owner_references[0]["uid"] == VM_UID
    assert adopt.owner_references[0]["controller"] is True


def test_vmi_of_another_owner_is_ignored() -> None:
    vm = make_vm("Halted")
    plan = reconcile(vm, make_vmi("Running", owner_uid="not-me"))
    assert sync_kinds(plan) == []  # not deleted by this VM's Halted strategy
    assert printable(plan, vm) == "Stopped"


def test_deleted_vm_stops_its_vmi_first() -> None:
    vm = make_vm("Always", deletionTimestamp=EARLIER)
    plan = reconcile(vm, make_vmi("Running"))
    assert of(plan, DeleteVMI) == [DeleteVMI("vm1", VMI_UID)]
    assert of(plan, RemoveVMFinalizer) == []
    # The VMI is gone: the finalizer goes, and with the last one no status is written.
    plan = reconcile(vm)
    assert of(plan, RemoveVMFinalizer) == [RemoveVMFinalizer([])]
    assert of(plan, UpdateVMStatus) == []
    vm["metadata"]["finalizers"].append("other")
    plan = reconcile(vm)
    assert of(plan, RemoveVMFinalizer) == [RemoveVMFinalizer(["other"])]
    assert printable(plan, vm) == "Terminating"


def test_deleted_vm_with_orphan_finalizer_leaves_its_vmi() -> None:
    vm = make_vm("Always", deletionTimestamp=EARLIER)
    vm["metadata"]["finalizers"] = ["orphan", VM_CONTROLLER_FINALIZER]
    plan = reconcile(vm, make_vmi("Running"))
    assert of(plan, DeleteVMI) == []
    assert of(plan, RemoveVMFinalizer) == [RemoveVMFinalizer(["orphan"])]


# ---- the VMI it creates -------------------------------------------------------------------


def test_build_vmi() -> None:
    vm = make_vm("Always", generation=7)
    vm["spec"]["template"]["metadata"].update(
        {"annotations": {"note": "x"}, "generateName": "zz", "finalizers": ["f"]})
    vmi = build_vmi(vm, [])
    meta = vmi["metadata"]
    assert (meta["name"], meta["namespace"]) == ("vm1", "ns")
    assert "generateName" not in meta
    assert meta["labels"] == {"kubevirt.io/vm": "vm1"}
    assert meta["annotations"]["note"] == "x"
    assert meta["annotations"][GENERATION_ANNOTATION] == "7"
    assert meta["finalizers"] == ["f", VM_CONTROLLER_FINALIZER]
    assert meta["ownerReferences"] == [{
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm1",
        "uid": VM_UID, "controller": True, "blockOwnerDeletion": True}]
    assert vmi["spec"]["domain"]["firmware"]["uuid"] == firmware_uuid("vm1")
    assert firmware_uuid("vm1") == firmware_uuid("vm1") != firmware_uuid("vm2")
    # The template is not modified, and a given firmware UUID is kept.
    assert "firmware" not in vm["spec"]["template"]["spec"]["domain"]
    vm["spec"]["template"]["spec"]["domain"]["firmware"] = {"uuid": "given"}
    assert build_vmi(vm, [])["spec"]["domain"]["firmware"]["uuid"] == "given"


def test_auto_attached_input_device() -> None:
    vm = make_vm("Always")
    vm["spec"]["template"]["spec"]["domain"]["devices"]["autoattachInputDevice"] = True
    assert build_vmi(vm, [])["spec"]["domain"]["devices"]["inputs"] == [{"name": "default-0"}]


def test_datavolume_templates_are_created_before_the_vmi() -> None:
    vm = make_vm("Always")
    vm["spec"]["dataVolumeTemplates"] = [{"metadata": {"name": "dv1"}, "spec": {
        "source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}]
    plan = reconcile(vm)
    assert sync_kinds(plan) == ["CreateDataVolume"]
    (create,) = of(plan, CreateDataVolume)
    dv = create.datavolume
    assert (dv["kind"], dv["metadata"]["name"], dv["metadata"]["namespace"]) == (
        "DataVolume", "dv1", "ns")
    assert dv["metadata"]["ownerReferences"][0]["uid"] == VM_UID
    assert dv["spec"]["source"] == {"blank": {}}
    # Importing: wait.
    importing = {"metadata": {"name": "dv1", "namespace": "ns"},
                 "status": {"phase": "ImportInProgress"}}
    assert sync_kinds(reconcile(vm, datavolumes={("ns", "dv1"): importing})) == []
    for ready_phase in ("Succeeded", "WaitForFirstConsumer", "PendingPopulation"):
        done = {**importing, "status": {"phase": ready_phase}}
        assert sync_kinds(reconcile(vm, datavolumes={("ns", "dv1"): done})) == ["CreateVMI"]
    # Halted VMs still get their DataVolumes (upstream's legacy behaviour).
    assert sync_kinds(reconcile(make_vm("Halted") | {"spec": vm["spec"] | {
        "runStrategy": "Halted"}})) == ["CreateDataVolume"]


def test_datavolume_creation_can_wait_for_the_start() -> None:
    vm = make_vm("Manual")
    vm["metadata"]["annotations"]["kubevirt.io/immediate-data-volume-creation"] = "false"
    vm["spec"]["dataVolumeTemplates"] = [{"metadata": {"name": "dv1"}, "spec": {}}]
    assert sync_kinds(reconcile(vm)) == []
    vm["status"]["stateChangeRequests"] = [START]
    assert sync_kinds(reconcile(vm)) == ["CreateDataVolume"]
