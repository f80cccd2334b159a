"""The migration controller's decisions (virt-controller's migration controller), pure.

:func:`reconcile_migration` takes one ``VirtualMachineInstanceMigration`` with what the
controller's caches hold (its VMI, nodes, every VMI and migration, the KubeVirt CR, the
MigrationPolicies, the VMI's namespace) and returns typed actions. The protocol it drives, and
what the node agents do in between, is in :mod:`virtshift.api.migration`.

Phases: ``Pending`` (waiting for a slot: parallelMigrationsPerCluster, and
parallelOutboundMigrationsPerNode per source node) -> ``Scheduling`` (placing the target; an
unschedulable target fails after :data:`UNSCHEDULABLE_TIMEOUT_S`, as KubeVirt's 5 minutes)
-> ``Scheduled`` (the VMI carries the target label and a fresh ``migrationState``) ->
``PreparingTarget`` (the target agent starts QEMU; :data:`TARGET_TIMEOUT_S` at most) ->
``TargetReady`` -> ``Running`` (the source agent started) -> ``Succeeded`` (hand-over: the VMI's
node becomes the target) or ``Failed``. Deleting an unfinished migration cancels it: before
the source started, the controller ends it alone; afterwards it sets ``abortRequested`` and waits
for the source's answer.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.migration import (
    ACTIVE_PHASES,
    FAILED,
    FINAL_PHASES,
    MIGRATION_FINALIZER,
    MIGRATION_TARGET_LABEL,
    NODE_NAME_LABEL,
    PENDING,
    PREPARING_TARGET,
    RUNNING,
    SCHEDULED,
    SCHEDULING,
    SUCCEEDED,
    TARGET_READY,
    effective_config,
    migration_state,
)
from virtshift.controller.scheduler import place
from virtshift.controller.vmi import as_dict, meta, parse_time, phase, rfc3339, status_of

Obj = dict[str, Any]
UNSCHEDULABLE_TIMEOUT_S = 300.0
TARGET_TIMEOUT_S = 120.0
SLOT_RETRY_S = 1.0


@dataclass(frozen=True)
class MigrationInputs:
    vmim: Obj
    vmi: Obj | None
    now: datetime.datetime
    nodes: Sequence[Obj] = ()
    vmis: Sequence[Obj] = ()
    vmims: Sequence[Obj] = ()
    kubevirts: Sequence[Obj] = ()
    policies: Sequence[Obj] = ()
    namespace: Obj | None = None


@dataclass(frozen=True)
class SetMigrationFinalizer:
    present: bool


@dataclass(frozen=True)
class UpdateMigrationStatus:
    status: Obj


@dataclass(frozen=True)
class PatchVMIStatus:
    """A JSON merge patch of the VMI's status (``migrationState`` fields, ``nodeName``)."""
    patch: Obj


@dataclass(frozen=True)
class PatchVMILabels:
    labels: dict[str, str | None]


@dataclass(frozen=True)
class RecordEvent:
    on_vmi: bool
    type: str
    reason: str
    message: str


MigrationAction = (SetMigrationFinalizer | UpdateMigrationStatus | PatchVMIStatus
                   | PatchVMILabels | RecordEvent)


@dataclass
class MigrationPlan:
    actions: list[MigrationAction] = field(default_factory=list)
    requeue_after: float | None = None


def _name(obj: Mapping[str, Any] | None) -> str:
    return str(meta(obj or {}).get("name", ""))


def _since(status: Mapping[str, Any], phase_name: str, now: datetime.datetime) -> float:
    for item in status.get("phaseTransitionTimestamps") or []:
        item = as_dict(item)
        if item.get("phase") == phase_name:
            at = parse_time(item.get("phaseTransitionTimestamp"))
            if at is not None:
                return (now - at).total_seconds()
    return 0.0


def _with_phase(status: Obj, new: str, now: datetime.datetime) -> Obj:
    out = dict(status)
    if out.get("phase") != new:
        out["phase"] = new
        stamps = [as_dict(s) for s in out.get("phaseTransitionTimestamps") or []]
        out["phaseTransitionTimestamps"] = [*stamps, {"phase": new,
                                                      "phaseTransitionTimestamp": rfc3339(now)}]
    return out


def _node_ready(node: Mapping[str, Any]) -> bool:
    for cond in as_dict(node.get("status")).get("conditions") or []:
        cond = as_dict(cond)
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _source_node(vmi: Mapping[str, Any] | None) -> str:
    return str(status_of(vmi or {}).get("nodeName") or "")


def _slots_free(inp: MigrationInputs, source: str, config_cluster: int,
                config_node: int) -> bool:
    """Whether another migration may leave ``source`` now."""
    by_key = {(str(meta(v).get("namespace", "")), _name(v)): v for v in inp.vmis}
    mine = meta(inp.vmim).get("uid")
    active = [m for m in inp.vmims if meta(m).get("uid") != mine
              and phase(m) in ACTIVE_PHASES and phase(m) not in ("", PENDING)]
    if len(active) >= config_cluster:
        return False
    outbound = 0
    for m in active:
        vmi = by_key.get((str(meta(m).get("namespace", "")),
                          str(as_dict(m.get("spec")).get("vmiName", ""))))
        if vmi is not None and _source_node(vmi) == source:
            outbound += 1
    return outbound < config_node


def _fail(plan: MigrationPlan, status: Obj, now: datetime.datetime, reason: str,
          message: str, *, clear_target: bool, type_: str = "Warning") -> MigrationPlan:
    plan.actions.append(UpdateMigrationStatus(_with_phase(status, FAILED, now)))
    if clear_target:
        plan.actions.append(PatchVMILabels({MIGRATION_TARGET_LABEL: None}))
    plan.actions.append(RecordEvent(False, type_, reason, message))
    return plan


def reconcile_migration(inp: MigrationInputs) -> MigrationPlan:
    vmim, vmi, now = inp.vmim, inp.vmi, inp.now
    plan = MigrationPlan()
    status = dict(status_of(vmim))
    current = str(status.get("phase") or "")
    uid = str(meta(vmim).get("uid", ""))
    deleting = bool(meta(vmim).get("deletionTimestamp"))
    held = MIGRATION_FINALIZER in (meta(vmim).get("finalizers") or [])
    state = migration_state(vmi) if vmi is not None else {}
    ours = bool(uid) and state.get("migrationUid") == uid

    if ours:
        status["migrationState"] = dict(state)
    if current in FINAL_PHASES:
        if deleting and held:
            plan.actions.append(SetMigrationFinalizer(False))
        return plan
    if deleting:
        return _cancel(inp, plan, status, state, ours, held)
    if not held:
        plan.actions.append(SetMigrationFinalizer(True))

    vmi_name = str(as_dict(vmim.get("spec")).get("vmiName", ""))
    if vmi is None or phase(vmi) != "Running" or meta(vmi).get("deletionTimestamp"):
        why = (f"VMI {vmi_name} does not exist" if vmi is None
               else f"VMI {vmi_name} is not running (phase {phase(vmi) or 'unset'})")
        return _fail(plan, status, now, "FailedMigration", f"migration failed: {why}",
                     clear_target=ours)

    if ours:
        return _follow(inp, plan, status, state)

    if state.get("migrationUid") and not state.get("completed") and not state.get("failed"):
        plan.actions.append(UpdateMigrationStatus(_with_phase(status, PENDING, now)))
        plan.requeue_after = SLOT_RETRY_S  # another migration of this VMI is finishing
        return plan

    config, policy = effective_config(inp.kubevirts, inp.policies, inp.namespace, vmi)
    source = _source_node(vmi)
    if not _slots_free(inp, source, config.parallel_migrations_per_cluster,
                       config.parallel_outbound_migrations_per_node):
        plan.actions.append(UpdateMigrationStatus(_with_phase(status, PENDING, now)))
        plan.requeue_after = SLOT_RETRY_S
        return plan

    # Scheduling: the scheduler's rules, never the source, plus addedNodeSelector.
    scheduling = _with_phase(status, SCHEDULING, now)
    spec = dict(as_dict(vmi.get("spec")))
    added = as_dict(as_dict(vmim.get("spec")).get("addedNodeSelector"))
    if added:
        # on a key collision the VM's own value stays (upstream): added can only restrict
        spec["nodeSelector"] = {**added, **as_dict(spec.get("nodeSelector"))}
    candidate = {**vmi, "spec": spec}
    nodes = [n for n in inp.nodes if _name(n) != source]
    placement = place(candidate, nodes, inp.vmis)
    if placement.node is None:
        waited = _since(scheduling, SCHEDULING, now)
        message = (f"no node can take VMI {vmi_name} besides its source {source}: "
                   f"{placement.message or 'no other node'}")
        if waited >= UNSCHEDULABLE_TIMEOUT_S:
            return _fail(plan, scheduling, now, "FailedMigration",
                         f"migration failed: target unschedulable for "
                         f"{UNSCHEDULABLE_TIMEOUT_S:.0f}s: {message}", clear_target=False)
        if current != SCHEDULING:
            plan.actions.append(RecordEvent(False, "Warning", "FailedScheduling", message))
        plan.actions.append(UpdateMigrationStatus(scheduling))
        plan.requeue_after = 5.0
        return plan
    target = placement.node
    vmi_ns = str(meta(vmi).get("namespace", ""))
    new_state: Obj = {
        "migrationUid": uid, "sourceNode": source, "targetNode": target,
        "sourcePod": f"virt-launcher-{_name(vmi)}-{source}",
        "targetPod": f"virt-launcher-{_name(vmi)}-{target}",
        "migrationConfiguration": config.to_status(),
    }
    if policy:
        new_state["migrationPolicyName"] = policy
    # replace what a previous migration left (a merge patch: null removes a field)
    patch_state: Obj = {k: None for k in state if k not in new_state}
    patch_state.update(new_state)
    old_conf = as_dict(state.get("migrationConfiguration"))
    patch_state["migrationConfiguration"] = {
        **{k: None for k in old_conf if k not in new_state["migrationConfiguration"]},
        **new_state["migrationConfiguration"]}
    plan.actions.append(PatchVMIStatus({"migrationState": patch_state}))
    plan.actions.append(PatchVMILabels({MIGRATION_TARGET_LABEL: target}))
    scheduled = _with_phase(scheduling, SCHEDULED, now)
    scheduled["migrationState"] = new_state
    plan.actions.append(UpdateMigrationStatus(scheduled))
    plan.actions.append(RecordEvent(
        False, "Normal", "SuccessfulCreate",
        f"migrating VMI {vmi_ns}/{_name(vmi)} from node {source} to node {target}"
        + (f" (migration policy {policy})" if policy else "")))
    plan.requeue_after = TARGET_TIMEOUT_S
    return plan


def _follow(inp: MigrationInputs, plan: MigrationPlan, status: Obj,
            state: Mapping[str, Any]) -> MigrationPlan:
    """The migration is under way: mirror what the agents report."""
    now = inp.now
    current = str(status.get("phase") or "")
    source, target = str(state.get("sourceNode", "")), str(state.get("targetNode", ""))
    if state.get("failed"):
        reason = str(state.get("failureReason") or "migration failed")
        if state.get("abortStatus") == "Succeeded":
            return _fail(plan, status, now, "SuccessfulAbortMigration", reason,
                         clear_target=True, type_="Normal")
        return _fail(plan, status, now, "FailedMigration", reason, clear_target=True)
    if state.get("completed"):
        # hand over: status first (the source stops reporting), then the labels (the watches)
        patch: Obj = {"nodeName": target}
        plan.actions.append(PatchVMIStatus(patch))
        plan.actions.append(PatchVMILabels({NODE_NAME_LABEL: target,
                                            MIGRATION_TARGET_LABEL: None}))
        plan.actions.append(UpdateMigrationStatus(_with_phase(status, SUCCEEDED, now)))
        message = f"VMI migrated from node {source} to node {target}"
        plan.actions.append(RecordEvent(False, "Normal", "SuccessfulMigration", message))
        plan.actions.append(RecordEvent(True, "Normal", "Migrated", message))
        return plan
    if state.get("startTimestamp"):
        new = RUNNING
    elif state.get("targetNodeAddress"):
        new = TARGET_READY
    else:
        new = PREPARING_TARGET
        waited = max(_since(status, SCHEDULED, now), _since(status, PREPARING_TARGET, now))
        target_node = next((n for n in inp.nodes if _name(n) == target), None)
        problem = ""
        if target_node is None or not _node_ready(target_node):
            problem = f"target node {target} is not ready"
        elif waited >= TARGET_TIMEOUT_S:
            problem = (f"target node {target} did not prepare the VM within "
                       f"{TARGET_TIMEOUT_S:.0f}s")
        if problem:
            plan.actions.append(PatchVMIStatus({"migrationState": {
                "completed": True, "failed": True, "failureReason": problem,
                "endTimestamp": rfc3339(now)}}))
            return _fail(plan, status, now, "FailedMigration", problem, clear_target=True)
    updated = _with_phase(status, new, now)
    if updated != status_of(inp.vmim) or current != new:
        plan.actions.append(UpdateMigrationStatus(updated))
    if new == PREPARING_TARGET:
        plan.requeue_after = 5.0
    return plan


def _cancel(inp: MigrationInputs, plan: MigrationPlan, status: Obj,
            state: Mapping[str, Any], ours: bool, held: bool) -> MigrationPlan:
    """The migration object is being deleted before it finished."""
    now = inp.now
    if not ours or inp.vmi is None:
        if held:
            plan.actions.append(SetMigrationFinalizer(False))
        return plan
    if state.get("completed"):
        plan = _follow(inp, plan, status, state)  # it finished first: record the outcome
        plan.actions.append(SetMigrationFinalizer(False))
        return plan
    if not state.get("startTimestamp"):
        plan.actions.append(PatchVMIStatus({"migrationState": {
            "abortRequested": True, "abortStatus": "Succeeded", "completed": True,
            "failed": True, "failureReason": "migration was cancelled before it started",
            "endTimestamp": rfc3339(now)}}))
        plan.actions.append(PatchVMILabels({MIGRATION_TARGET_LABEL: None}))
        plan.actions.append(UpdateMigrationStatus(_with_phase(status, FAILED, now)))
        plan.actions.append(RecordEvent(False, "Normal", "SuccessfulAbortMigration",
                                        "migration cancelled before the source started"))
        plan.actions.append(SetMigrationFinalizer(False))
        return plan
    if not state.get("abortRequested"):
        plan.actions.append(PatchVMIStatus({"migrationState": {"abortRequested": True}}))
        plan.actions.append(RecordEvent(False, "Normal", "MigrationAbortRequested",
                                        "cancelling the running migration"))
    plan.requeue_after = 2.0
    return plan
