"""The migration reconciler: Pending -> Scheduling -> Scheduled -> PreparingTarget ->
TargetReady -> Running -> Succeeded/Failed, slots, placement, timeouts, cancel, finalizer."""

from __future__ import annotations

import copy
import datetime
from typing import Any, TypeVar

import pytest

from virtshift.api.migration import (
    MIGRATION_FINALIZER,
    MIGRATION_TARGET_LABEL,
    NODE_NAME_LABEL,
    MigrationConfig,
    migration_state,
)
from virtshift.api.patch import merge_patch
from virtshift.controller.migration import (
    TARGET_TIMEOUT_S,
    UNSCHEDULABLE_TIMEOUT_S,
    MigrationAction,
    MigrationInputs,
    MigrationPlan,
    PatchVMILabels,
    PatchVMIStatus,
    RecordEvent,
    SetMigrationFinalizer,
    UpdateMigrationStatus,
    reconcile_migration,
)

Obj = dict[str, Any]
A = TypeVar("A", bound=MigrationAction)

T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
TS0 = "2026-05-06T07:08:09Z"
UID = "uid-m"


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- builders -------------------------------------------------------------------------------


def node(name: str, *, ready: bool = True, memory: str = "8Gi", **labels: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
            "spec": {},
            "status": {"allocatable": {"cpu": "4", "memory": memory, "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


NODES = [node("node1"), node("node2")]


def make_vmi(name: str = "v", *, on: str = "node1", phase: str = "Running",
             state: Obj | None = None, labels: dict[str, str] | None = None,
             **spec: Any) -> Obj:
    status: Obj = {"phase": phase, "nodeName": on}
    if state is not None:
        status["migrationState"] = state
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                         "labels": {NODE_NAME_LABEL: on, **(labels or {})}},
            "spec": {"domain": {"cpu": {"sockets": 1, "cores": 1, "threads": 1},
                                "memory": {"guest": "1Gi"},
                                "resources": {"requests": {"memory": "1Gi"}}},
                     "volumes": [{"name": "root", "containerDisk": {"image": "i"}}], **spec},
            "status": status}


def make_vmim(name: str = "m", *, vmi: str = "v", uid: str = UID, phase: str = "",
              held: bool = True, deleting: bool = False, stamps: dict[str, float] | None = None,
              added: dict[str, str] | None = None) -> Obj:
    spec: Obj = {"vmiName": vmi}
    if added:
        spec["addedNodeSelector"] = added
    obj: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": name, "namespace": "ns", "uid": uid,
                             "labels": {"kubevirt.io/vmi-name": vmi},
                             "finalizers": [MIGRATION_FINALIZER] if held else []},
                "spec": spec, "status": {}}
    if phase:
        obj["status"]["phase"] = phase
        obj["status"]["phaseTransitionTimestamps"] = [
            {"phase": p, "phaseTransitionTimestamp": stamp(s)}
            for p, s in (stamps or {phase: 0}).items()]
    if deleting:
        obj["metadata"]["deletionTimestamp"] = TS0
    return obj


def ours(**fields: Any) -> Obj:
    """A ``migrationState`` written for the migration under test, plus ``fields``."""
    return {"migrationUid": UID, "sourceNode": "node1", "targetNode": "node2",
            "sourcePod": "virt-launcher-v-node1", "targetPod": "virt-launcher-v-node2",
            "migrationConfiguration": MigrationConfig().to_status(), **fields}


def run(vmim: Obj, vmi: Obj | None, *, now: datetime.datetime = T0,
        nodes: list[Obj] | None = None, vmis: list[Obj] | None = None,
        vmims: list[Obj] | None = None, **kw: Any) -> MigrationPlan:
    if vmis is None:
        vmis = [vmi] if vmi is not None else []
    return reconcile_migration(MigrationInputs(
        vmim=vmim, vmi=vmi, now=now, nodes=NODES if nodes is None else nodes, vmis=vmis,
        vmims=[vmim] if vmims is None else vmims, **kw))


def of(plan: MigrationPlan, kind: type[A]) -> list[A]:
    return [a for a in plan.actions if isinstance(a, kind)]


def new_status(plan: MigrationPlan) -> Obj:
    found = of(plan, UpdateMigrationStatus)
    assert len(found) == 1, plan.actions
    return found[0].status


def new_phase(plan: MigrationPlan) -> str:
    return str(new_status(plan)["phase"])


def events(plan: MigrationPlan) -> list[tuple[bool, str, str]]:
    return [(e.on_vmi, e.type, e.reason) for e in of(plan, RecordEvent)]


def apply(plan: MigrationPlan, vmim: Obj, vmi: Obj | None) -> tuple[Obj, Obj | None]:
    """What the controller's loop does with the actions (merge patches on the VMI)."""
    vmim, vmi = copy.deepcopy(vmim), copy.deepcopy(vmi)
    for action in plan.actions:
        if isinstance(action, UpdateMigrationStatus):
            vmim["status"] = copy.deepcopy(action.status)
        elif isinstance(action, SetMigrationFinalizer):
            rest = [f for f in vmim["metadata"]["finalizers"] if f != MIGRATION_FINALIZER]
            vmim["metadata"]["finalizers"] = rest + ([MIGRATION_FINALIZER]
                                                     if action.present else [])
        elif isinstance(action, PatchVMIStatus):
            assert vmi is not None
            vmi = merge_patch(vmi, {"status": action.patch})
        elif isinstance(action, PatchVMILabels):
            assert vmi is not None
            vmi = merge_patch(vmi, {"metadata": {"labels": action.labels}})
    return vmim, vmi


# ---- finalizer, missing or stopped VMI ------------------------------------------------------


def test_a_new_migration_gets_the_finalizer_and_is_scheduled() -> None:
    plan = run(make_vmim(held=False), make_vmi())
    assert plan.actions[0] == SetMigrationFinalizer(True)
    assert new_phase(plan) == "Scheduled"


def test_a_held_finalizer_is_not_added_again() -> None:
    plan = run(make_vmim(), make_vmi())
    assert of(plan, SetMigrationFinalizer) == []


def test_a_missing_vmi_fails_the_migration() -> None:
    plan = run(make_vmim(), None)
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Warning", "FailedMigration")]
    assert "VMI v does not exist" in of(plan, RecordEvent)[0].message
    assert of(plan, PatchVMILabels) == []


@pytest.mark.parametrize("phase", ["Scheduled", "Pending", "Succeeded", "Failed"])
def test_a_vmi_not_running_fails_the_migration(phase: str) -> None:
    plan = run(make_vmim(), make_vmi(phase=phase))
    assert new_phase(plan) == "Failed"
    assert f"is not running (phase {phase})" in of(plan, RecordEvent)[0].message


def test_a_vmi_being_deleted_fails_the_migration_and_drops_our_target_label() -> None:
    vmi = make_vmi(state=ours(), labels={MIGRATION_TARGET_LABEL: "node2"})
    vmi["metadata"]["deletionTimestamp"] = TS0
    plan = run(make_vmim(phase="Running"), vmi)
    assert new_phase(plan) == "Failed"
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: None})]


# ---- slots ----------------------------------------------------------------------------------


def busy(i: int, source: str, phase: str = "Running") -> tuple[Obj, Obj]:
    """Another VMI on ``source`` with an active migration."""
    other = make_vmi(f"o{i}", on=source)
    return other, make_vmim(f"m{i}", vmi=f"o{i}", uid=f"uid-m{i}", phase=phase)


def test_parallel_migrations_per_cluster_keeps_it_pending() -> None:
    others = [busy(i, f"n{i}") for i in range(5)]
    vmi, vmim = make_vmi(), make_vmim()
    plan = run(vmim, vmi, vmis=[vmi, *(o for o, _ in others)],
               vmims=[vmim, *(m for _, m in others)])
    assert new_phase(plan) == "Pending"
    assert plan.requeue_after is not None
    assert of(plan, PatchVMIStatus) == [] and of(plan, PatchVMILabels) == []
    # Pending and finished migrations hold no slot
    for _, m in others[:2]:
        m["status"]["phase"] = "Pending"
    others[2][1]["status"]["phase"] = "Succeeded"
    plan = run(vmim, vmi, vmis=[vmi, *(o for o, _ in others)],
               vmims=[vmim, *(m for _, m in others)])
    assert new_phase(plan) == "Scheduled"


def test_the_cluster_limit_comes_from_the_kubevirt_cr() -> None:
    other, other_m = busy(1, "n9")
    vmi, vmim = make_vmi(), make_vmim()
    cr = {"metadata": {"name": "kubevirt"},
          "spec": {"configuration": {"migrations": {"parallelMigrationsPerCluster": 1}}}}
    plan = run(vmim, vmi, vmis=[vmi, other], vmims=[vmim, other_m], kubevirts=[cr])
    assert new_phase(plan) == "Pending"


def test_parallel_outbound_migrations_per_node_keeps_it_pending() -> None:
    others = [busy(1, "node1", "Scheduling"), busy(2, "node1", "TargetReady")]
    vmi, vmim = make_vmi(), make_vmim()
    plan = run(vmim, vmi, vmis=[vmi, *(o for o, _ in others)],
               vmims=[vmim, *(m for _, m in others)])
    assert new_phase(plan) == "Pending"
    # the same two leaving another node leave this one free
    others = [busy(1, "node3"), busy(2, "node3")]
    plan = run(vmim, vmi, vmis=[vmi, *(o for o, _ in others)],
               vmims=[vmim, *(m for _, m in others)])
    assert new_phase(plan) == "Scheduled"


def test_an_unfinished_earlier_migration_of_the_vmi_keeps_it_pending() -> None:
    vmi = make_vmi(state=ours(migrationUid="uid-old", startTimestamp=TS0))
    plan = run(make_vmim(), vmi)
    assert new_phase(plan) == "Pending"
    assert of(plan, PatchVMIStatus) == []


# ---- scheduling the target ------------------------------------------------------------------


def test_the_target_is_never_the_source() -> None:
    nodes = [node("node1", memory="64Gi"), node("node2", memory="4Gi")]
    vmi, vmim = make_vmi(), make_vmim()
    plan = run(vmim, vmi, nodes=nodes)
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: "node2"})]
    state = of(plan, PatchVMIStatus)[0].patch["migrationState"]
    assert (state["sourceNode"], state["targetNode"]) == ("node1", "node2")
    assert (state["sourcePod"], state["targetPod"]) == ("virt-launcher-v-node1",
                                                        "virt-launcher-v-node2")
    assert state["migrationUid"] == UID
    assert MigrationConfig.from_status(state["migrationConfiguration"]) == MigrationConfig()
    status = new_status(plan)
    assert status["phase"] == "Scheduled"
    assert [s["phase"] for s in status["phaseTransitionTimestamps"]] == ["Scheduling",
                                                                         "Scheduled"]
    assert status["migrationState"] == state
    assert events(plan) == [(False, "Normal", "SuccessfulCreate")]
    assert "from node node1 to node node2" in of(plan, RecordEvent)[0].message


def test_added_node_selector_restricts_the_target() -> None:
    nodes = [node("node1"), node("node2"), node("node3", disk="ssd")]
    plan = run(make_vmim(added={"disk": "ssd"}), make_vmi(), nodes=nodes)
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: "node3"})]


def test_added_node_selector_cannot_override_the_vms_own_selector() -> None:
    # upstream: "in case of key collisions, values set on the VM objects are preserved"
    nodes = [node("node1", zone="a"), node("node2", zone="b", disk="ssd"),
             node("node3", zone="a", disk="ssd")]
    vmi = make_vmi(nodeSelector={"zone": "a"})
    plan = run(make_vmim(added={"zone": "b", "disk": "ssd"}), vmi, nodes=nodes)
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: "node3"})]


def test_the_migration_policy_shapes_the_configuration() -> None:
    policy = {"metadata": {"name": "slow"},
              "spec": {"selectors": {"virtualMachineInstanceSelector": {"slow": "yes"}},
                       "bandwidthPerMigration": "16Mi"}}
    plan = run(make_vmim(), make_vmi(labels={"slow": "yes"}), policies=[policy])
    state = of(plan, PatchVMIStatus)[0].patch["migrationState"]
    assert state["migrationPolicyName"] == "slow"
    assert state["migrationConfiguration"]["bandwidthPerMigration"] == "16Mi"
    assert "(migration policy slow)" in of(plan, RecordEvent)[0].message


def test_an_unschedulable_target_stays_scheduling_then_fails() -> None:
    vmim, vmi = make_vmim(), make_vmi()
    plan = run(vmim, vmi, nodes=[node("node1")])
    assert new_phase(plan) == "Scheduling"
    assert events(plan) == [(False, "Warning", "FailedScheduling")]
    assert "besides its source node1" in of(plan, RecordEvent)[0].message
    assert of(plan, PatchVMIStatus) == [] and of(plan, PatchVMILabels) == []
    vmim, _ = apply(plan, vmim, vmi)
    # still unschedulable a little later: no new event, same phase
    plan = run(vmim, vmi, nodes=[node("node1")], now=at(60))
    assert new_phase(plan) == "Scheduling"
    assert events(plan) == []
    assert [s["phase"] for s in new_status(plan)["phaseTransitionTimestamps"]] == [
        "Scheduling"]
    # past the timeout it fails
    plan = run(vmim, vmi, nodes=[node("node1")], now=at(UNSCHEDULABLE_TIMEOUT_S))
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Warning", "FailedMigration")]
    assert "unschedulable for 300s" in of(plan, RecordEvent)[0].message


def test_a_not_ready_node_is_no_target() -> None:
    plan = run(make_vmim(), make_vmi(), nodes=[node("node1"), node("node2", ready=False)])
    assert new_phase(plan) == "Scheduling"


def test_scheduling_replaces_what_an_earlier_migration_left() -> None:
    old_config = MigrationConfig(max_downtime_ms=500, allow_post_copy=True).to_status()
    old = ours(migrationUid="uid-old", migrationPolicyName="old-policy", completed=True,
               failed=True, failureReason="boom", abortStatus="Succeeded",
               startTimestamp=TS0, endTimestamp=TS0, targetNodeAddress="10.0.0.2",
               targetDirectMigrationNodePorts={"49152": 0},
               migrationConfiguration=old_config)
    vmim, vmi = make_vmim(), make_vmi(state=old)
    plan = run(vmim, vmi)
    _, moved = apply(plan, vmim, vmi)
    assert moved is not None
    state = migration_state(moved)
    assert set(state) == {"migrationUid", "sourceNode", "targetNode", "sourcePod",
                          "targetPod", "migrationConfiguration"}
    assert state["migrationUid"] == UID
    # the nested configuration is replaced too, not merged with the old one
    assert MigrationConfig.from_status(state["migrationConfiguration"]) == MigrationConfig()
    assert moved["metadata"]["labels"][MIGRATION_TARGET_LABEL] == "node2"


# ---- following the agents -------------------------------------------------------------------


def scheduled(**state: Any) -> tuple[Obj, Obj]:
    vmim = make_vmim(phase="Scheduled", stamps={"Scheduling": 0, "Scheduled": 0})
    vmi = make_vmi(state=ours(**state), labels={MIGRATION_TARGET_LABEL: "node2"})
    return vmim, vmi


def test_preparing_target_then_target_ready_then_running() -> None:
    vmim, vmi = scheduled()
    plan = run(vmim, vmi, now=at(5))
    assert new_phase(plan) == "PreparingTarget"
    assert new_status(plan)["migrationState"]["targetNode"] == "node2"
    assert plan.requeue_after is not None
    vmim, _ = apply(plan, vmim, vmi)
    vmi["status"]["migrationState"].update(targetNodeAddress="10.0.0.2",
                                           targetDirectMigrationNodePorts={"49152": 0})
    plan = run(vmim, vmi, now=at(10))
    assert new_phase(plan) == "TargetReady"
    vmim, _ = apply(plan, vmim, vmi)
    vmi["status"]["migrationState"].update(startTimestamp=stamp(11), mode="PreCopy")
    plan = run(vmim, vmi, now=at(12))
    assert new_phase(plan) == "Running"
    assert new_status(plan)["migrationState"]["mode"] == "PreCopy"
    vmim, _ = apply(plan, vmim, vmi)
    assert [s["phase"] for s in vmim["status"]["phaseTransitionTimestamps"]] == [
        "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running"]
    # nothing new: nothing to write
    assert run(vmim, vmi, now=at(13)).actions == []


def test_success_hands_the_vmi_over_to_the_target() -> None:
    vmim = make_vmim(phase="Running")
    vmi = make_vmi(state=ours(targetNodeAddress="10.0.0.2", startTimestamp=TS0,
                              completed=True, endTimestamp=stamp(20)),
                   labels={MIGRATION_TARGET_LABEL: "node2"})
    plan = run(vmim, vmi, now=at(21))
    # status first (the source stops reporting), then the labels
    vmi_actions = [a for a in plan.actions if isinstance(a, PatchVMIStatus | PatchVMILabels)]
    assert vmi_actions == [PatchVMIStatus({"nodeName": "node2"}),
                           PatchVMILabels({NODE_NAME_LABEL: "node2",
                                           MIGRATION_TARGET_LABEL: None})]
    assert new_phase(plan) == "Succeeded"
    assert events(plan) == [(False, "Normal", "SuccessfulMigration"), (True, "Normal", "Migrated")]
    vmim, moved = apply(plan, vmim, vmi)
    assert moved is not None
    assert moved["status"]["nodeName"] == "node2"
    assert moved["metadata"]["labels"] == {NODE_NAME_LABEL: "node2"}
    # final: nothing more to do
    assert run(vmim, moved, now=at(22)).actions == []


def test_a_failure_reported_by_the_source_fails_it() -> None:
    vmim = make_vmim(phase="Running")
    vmi = make_vmi(state=ours(startTimestamp=TS0, completed=True, failed=True,
                              failureReason="QEMU: connection reset"),
                   labels={MIGRATION_TARGET_LABEL: "node2"})
    plan = run(vmim, vmi)
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Warning", "FailedMigration")]
    assert of(plan, RecordEvent)[0].message == "QEMU: connection reset"
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: None})]
    assert of(plan, PatchVMIStatus) == []  # the VMI stays on its source


def test_an_aborted_migration_fails_with_the_abort_reason() -> None:
    vmi = make_vmi(state=ours(startTimestamp=TS0, completed=True, failed=True,
                              abortRequested=True, abortStatus="Succeeded",
                              failureReason="migration cancelled"))
    plan = run(make_vmim(phase="Running"), vmi)
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Normal", "SuccessfulAbortMigration")]


def test_a_target_that_never_gets_ready_times_out() -> None:
    vmim = make_vmim(phase="PreparingTarget",
                     stamps={"Scheduling": 0, "Scheduled": 0, "PreparingTarget": 1})
    vmi = make_vmi(state=ours(), labels={MIGRATION_TARGET_LABEL: "node2"})
    assert new_phase(run(vmim, vmi, now=at(TARGET_TIMEOUT_S - 1))) == "PreparingTarget"
    plan = run(vmim, vmi, now=at(TARGET_TIMEOUT_S))
    assert new_phase(plan) == "Failed"
    patch = of(plan, PatchVMIStatus)[0].patch["migrationState"]
    assert patch["completed"] is True and patch["failed"] is True
    assert "did not prepare the VM within 120s" in patch["failureReason"]
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: None})]


@pytest.mark.parametrize("nodes", [[node("node1"), node("node2", ready=False)], [node("node1")]])
def test_a_target_node_not_ready_fails_the_preparation(nodes: list[Obj]) -> None:
    vmim, vmi = scheduled()
    plan = run(vmim, vmi, nodes=nodes, now=at(1))
    assert new_phase(plan) == "Failed"
    assert "target node node2 is not ready" in \
        of(plan, PatchVMIStatus)[0].patch["migrationState"]["failureReason"]


# ---- cancel and deletion --------------------------------------------------------------------


def test_cancel_before_scheduling_only_drops_the_finalizer() -> None:
    plan = run(make_vmim(phase="Pending", deleting=True), make_vmi())
    assert plan.actions == [SetMigrationFinalizer(False)]


def test_cancel_before_the_source_started_ends_it_at_once() -> None:
    vmim, vmi = scheduled(targetNodeAddress="10.0.0.2")
    vmim["metadata"]["deletionTimestamp"] = TS0
    plan = run(vmim, vmi, now=at(3))
    patch = of(plan, PatchVMIStatus)[0].patch["migrationState"]
    assert patch["abortRequested"] is True and patch["abortStatus"] == "Succeeded"
    assert patch["completed"] is True and patch["failed"] is True
    assert of(plan, PatchVMILabels) == [PatchVMILabels({MIGRATION_TARGET_LABEL: None})]
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Normal", "SuccessfulAbortMigration")]
    assert plan.actions[-1] == SetMigrationFinalizer(False)


def test_cancel_while_running_requests_an_abort_and_waits() -> None:
    vmim = make_vmim(phase="Running", deleting=True)
    vmi = make_vmi(state=ours(targetNodeAddress="10.0.0.2", startTimestamp=TS0),
                   labels={MIGRATION_TARGET_LABEL: "node2"})
    plan = run(vmim, vmi)
    assert of(plan, PatchVMIStatus) == [PatchVMIStatus({"migrationState":
                                                        {"abortRequested": True}})]
    assert events(plan) == [(False, "Normal", "MigrationAbortRequested")]
    assert of(plan, SetMigrationFinalizer) == []
    assert plan.requeue_after is not None
    vmim, vmi2 = apply(plan, vmim, vmi)
    assert vmi2 is not None
    # asked already: wait quietly
    plan = run(vmim, vmi2)
    assert plan.actions == [] and plan.requeue_after is not None
    # the source aborted: Failed, then the finalizer goes
    vmi2["status"]["migrationState"].update(completed=True, failed=True,
                                            abortStatus="Succeeded",
                                            failureReason="migration cancelled")
    plan = run(vmim, vmi2)
    assert new_phase(plan) == "Failed"
    assert events(plan) == [(False, "Normal", "SuccessfulAbortMigration")]
    assert plan.actions[-1] == SetMigrationFinalizer(False)


def test_cancel_too_late_still_hands_over() -> None:
    vmim = make_vmim(phase="Running", deleting=True)
    vmi = make_vmi(state=ours(startTimestamp=TS0, abortRequested=True, completed=True,
                              abortStatus="Failed"),
                   labels={MIGRATION_TARGET_LABEL: "node2"})
    plan = run(vmim, vmi)
    assert new_phase(plan) == "Succeeded"
    assert PatchVMIStatus({"nodeName": "node2"}) in plan.actions
    assert plan.actions[-1] == SetMigrationFinalizer(False)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_final_migration_being_deleted_drops_the_finalizer(phase: str) -> None:
    vmi = make_vmi(state=ours(completed=True))
    assert run(make_vmim(phase=phase, deleting=True), vmi).actions == [
        SetMigrationFinalizer(False)]
    assert run(make_vmim(phase=phase, deleting=True, held=False), vmi).actions == []
    assert run(make_vmim(phase=phase), vmi).actions == []
