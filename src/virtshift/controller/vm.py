"""The VirtualMachine controller: one VMI per VM, started and stopped by its runStrategy.

The decision is pure: :func:`reconcile_vm` takes a VM, its VMI (or None), the time and the
DataVolumes/PVCs it may reference, and returns a :class:`VMPlan`, an ordered list of typed actions.
:class:`VMController` applies plans through the API client, driven by watches.

Semantics follow upstream ``pkg/virt-controller/watch/vm/vm.go``:

* runStrategy (``spec.running`` true/false is Always/Halted): ``Always`` creates a VMI when none
  exists and deletes a final one (Succeeded or Failed) so the next pass recreates it; ``Halted``
  deletes any VMI; ``Manual`` acts only on ``status.stateChangeRequests``; ``RerunOnFailure``
  starts once, deletes a final VMI and, if it Failed, queues a Start request so it is recreated,
  while a Succeeded one stays stopped; ``Once`` creates a VMI only when none exists and never
  removes a final one. A Stop request with the VMI's UID deletes it under every strategy that
  honours requests; a Start request makes ``Halted`` switch the VM to ``Always`` (the paused start
  of the start subresource). Requests are trimmed one at a time, as upstream: a Stop once the VMI
  is gone (or is another one), a Start once a live VMI exists.
* Crash loops: a VMI that becomes final without ever reaching Running counts as a start failure
  (``status.startFailure``); restarts under ``Always`` and ``RerunOnFailure`` wait ``10 * n^2``
  seconds plus up to half again of random jitter, capped at 300, and the VM shows
  ``CrashLoopBackOff`` meanwhile (a ``Manual`` start or a ``Once`` VM does not wait). A VMI
  that ran, or a strategy that does not restart by itself, clears the record.
* ``status``: ``created``, ``ready``, ``runStrategy`` (once a VMI was created),
  ``observedGeneration`` (the VMI's ``kubevirt.io/vm-generation``) and ``desiredGeneration``,
  conditions (``Ready`` from the VMI, ``Failure`` from the last sync error, every other VMI
  condition mirrored), and ``printableStatus`` from the first matching rule of upstream's list
  (Terminating, Stopping, Migrating, Paused, Running, ErrorPvcNotFound, DataVolumeError,
  ErrorUnschedulable, Provisioning, WaitingForVolumeBinding, ErrImagePull, ImagePullBackOff,
  Starting, CrashLoopBackOff, Stopped, WaitingForReceiver, else Unknown).
* The VM carries ``kubevirt.io/virtualMachineControllerFinalizer`` so a deleted VM first stops its
  VMI (printableStatus ``Terminating``); the VMI carries it too until the controller has seen it
  final. VMIs are created from the template with the VM as controlling owner, the
  ``kubevirt.io/vm-generation`` annotation and the legacy name-based firmware UUID.
* DataVolumes of ``spec.dataVolumeTemplates`` are created (owned by the VM) and a start waits
  until they are Succeeded, WaitForFirstConsumer or PendingPopulation.

Not done: instancetypes/preferences, ControllerRevisions (so no ``RestartRequired`` and no
generation-annotation bump when only the run strategy changes), hotplug volume requests, memory
dumps, live updates and the firmware-UUID write-back to the VM spec.
"""

from __future__ import annotations

import copy
import datetime
import logging
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.kinds import Obj
from virtshift.controller.vmi import (
    VM_CONTROLLER_FINALIZER,
    Key,
    as_dict,
    as_list,
    controller_ref,
    datavolume_error,
    datavolume_provisioning,
    get_condition,
    has_condition,
    is_deleting,
    is_final,
    key_of,
    make_condition,
    meta,
    parse_time,
    phase,
    remove_condition,
    rfc3339,
    status_of,
    unbound_pvc,
    update_condition,
)
from virtshift.errors import ApiError

log = logging.getLogger(__name__)

GENERATION_ANNOTATION = "kubevirt.io/vm-generation"
API_VERSION_ANNOTATIONS = ("kubevirt.io/latest-observed-api-version",
                           "kubevirt.io/storage-observed-api-version")
MIGRATION_TARGET_ANNOTATION = "kubevirt.io/create-migration-target"
ORPHAN_FINALIZER = "orphan"
FIRMWARE_UUID_NAMESPACE = uuid.UUID("6a1a24a1-4061-4607-8bf4-a3963d0c5895")
MAX_CRASHLOOP_BACKOFF = 300
REASON_FAILED_CREATE = "FailedCreate"
REASON_FAILED_DELETE = "FailedDelete"
_SYNC_IGNORED = ("Ready", "Failure", "RestartRequired")
_MANAGED = ("created", "ready", "printableStatus", "conditions", "stateChangeRequests",
            "startFailure", "observedGeneration", "desiredGeneration", "runStrategy")


@dataclass(frozen=True)
class SyncError:
    reason: str
    message: str


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchVMMetadata:
    """Add the controller's finalizer and the observed-API-version annotations."""

    finalizers: list[str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class RemoveVMFinalizer:
    finalizers: list[str]


@dataclass(frozen=True)
class AdoptVMI:
    owner_references: list[Obj]


@dataclass(frozen=True)
class CreateDataVolume:
    datavolume: Obj


@dataclass(frozen=True)
class CreateVMI:
    vmi: Obj


@dataclass(frozen=True)
class DeleteVMI:
    name: str
    uid: str


@dataclass(frozen=True)
class SetRunning:
    """Halted with a Start request: switch the VM to running (``runStrategy`` or ``running``)."""

    patch: Obj


@dataclass(frozen=True)
class SetStateChangeRequests:
    """RerunOnFailure after a failure: queue a Start request right away, as upstream does."""

    requests: list[Obj]


@dataclass(frozen=True)
class UpdateVMStatus:
    status: Obj
    cleared_requests: int = 0  # state change requests trimmed from the front


@dataclass(frozen=True)
class RemoveVMIFinalizer:
    name: str


VMAction = (PatchVMMetadata | RemoveVMFinalizer | AdoptVMI | CreateDataVolume | CreateVMI
            | DeleteVMI | SetRunning | SetStateChangeRequests | UpdateVMStatus
            | RemoveVMIFinalizer)
SYNC_ACTIONS = (CreateDataVolume, CreateVMI, DeleteVMI, SetRunning, SetStateChangeRequests)


@dataclass(frozen=True)
class VMInputs:
    vm: Obj
    vmi: Obj | None
    now: datetime.datetime
    datavolumes: Mapping[Key, Obj] = field(default_factory=dict)
    pvcs: Mapping[Key, Obj] = field(default_factory=dict)
    randint: Callable[[int], int] = random.randrange  # jitter: an int in [0, n)


@dataclass
class VMPlan:
    actions: list[VMAction]
    requeue_after: float | None = None
    start_expected: bool = False
    stop_expected: bool = False
    sync_error: SyncError | None = None
    requests: list[Obj] | None = None  # stateChangeRequests after the sync step


# ---- small predicates --------------------------------------------------------------------------


def run_strategy(vm: Mapping[str, Any]) -> tuple[str, str | None]:
    """``VirtualMachine.RunStrategy``: (strategy, error)."""
    spec = as_dict(vm.get("spec"))
    running, strategy = spec.get("running"), spec.get("runStrategy")
    if running is not None and strategy is not None:
        return "Unknown", "running and runstrategy are mutually exclusive"
    if running is not None:
        return ("Always" if running is True else "Halted"), None
    return (str(strategy) if strategy else "Halted"), None


def requests_of(vm: Mapping[str, Any]) -> list[Obj]:
    return [dict(r) for r in as_list(status_of(vm).get("stateChangeRequests"))
            if isinstance(r, dict)]


def has_start_request(requests: list[Obj]) -> bool:
    return bool(requests) and requests[0].get("action") == "Start"


def has_start_paused_request(requests: list[Obj]) -> bool:
    return has_start_request(requests) and as_dict(requests[0].get("data")).get(
        "paused") == "true"


def has_stop_request_for(requests: list[Obj], vmi: Mapping[str, Any]) -> bool:
    return (bool(requests) and requests[0].get("action") == "Stop"
            and requests[0].get("uid") is not None
            and requests[0].get("uid") == meta(vmi).get("uid"))


def was_running(vmi: Mapping[str, Any] | None) -> bool:
    return vmi is not None and any(
        isinstance(t, dict) and t.get("phase") == "Running"
        for t in as_list(status_of(vmi).get("phaseTransitionTimestamps")))


def is_migrating(vmi: Mapping[str, Any], now: datetime.datetime) -> bool:
    state = as_dict(status_of(vmi).get("migrationState"))
    start, end = parse_time(state.get("startTimestamp")), parse_time(state.get("endTimestamp"))
    return start is not None and now >= start and not (end is not None and now >= end)


def backoff_seconds(fail_count: int, randint: Callable[[int], int],
                    max_delay: int = MAX_CRASHLOOP_BACKOFF) -> int:
    """``calculateStartBackoffTime``: 10s * n^2 plus random [0, half] more, at most 300s."""
    interval = max(max_delay // 30, 10)
    delay = interval * max(fail_count, 1) ** 2
    delay += randint(delay // 2 + 1)
    return min(delay, max_delay)


def backoff_left(vm: Mapping[str, Any], now: datetime.datetime) -> int:
    retry = parse_time(as_dict(status_of(vm).get("startFailure")).get("retryAfterTimestamp"))
    if retry is None:
        return 0
    left = int(retry.timestamp()) - int(now.timestamp())
    return max(left, 0)


def firmware_uuid(name: str) -> str:
    """``CalculateLegacyUUID``: a name-based (SHA-1) UUID."""
    return str(uuid.uuid5(FIRMWARE_UUID_NAMESPACE, name))


def controller_reference(vm: Mapping[str, Any]) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "name": meta(vm).get("name"), "uid": meta(vm).get("uid"),
            "controller": True, "blockOwnerDeletion": True}


def build_vmi(vm: Mapping[str, Any], requests: list[Obj], *, receiver: bool = False) -> Obj:
    """``SetupVMIFromVM`` plus what ``startVMI`` adds."""
    template = as_dict(as_dict(vm.get("spec")).get("template"))
    tmeta = copy.deepcopy(as_dict(template.get("metadata")))
    ns, name = key_of(vm)
    for k in ("generateName", "creationTimestamp", "resourceVersion", "uid"):
        tmeta.pop(k, None)
    annotations = {str(k): str(v) for k, v in as_dict(tmeta.get("annotations")).items()}
    annotations[GENERATION_ANNOTATION] = str(meta(vm).get("generation") or 0)
    for a in API_VERSION_ANNOTATIONS:
        annotations[a] = "v1"
    if receiver:
        annotations[MIGRATION_TARGET_ANNOTATION] = "true"
    finalizers = [str(f) for f in as_list(tmeta.get("finalizers"))]
    if VM_CONTROLLER_FINALIZER not in finalizers:
        finalizers.append(VM_CONTROLLER_FINALIZER)
    metadata = {**tmeta, "name": name, "namespace": ns, "annotations": annotations,
                "ownerReferences": [controller_reference(vm)], "finalizers": finalizers}
    spec = copy.deepcopy(as_dict(template.get("spec")))
    if has_start_paused_request(requests):
        spec["startStrategy"] = "Paused"
    domain = spec.setdefault("domain", {})
    if isinstance(domain, dict):
        firmware = domain.setdefault("firmware", {})
        if isinstance(firmware, dict) and not firmware.get("uuid"):
            firmware["uuid"] = firmware_uuid(name)
        devices = as_dict(domain.get("devices"))
        if devices.get("autoattachInputDevice") is True and not devices.get("inputs"):
            devices["inputs"] = [{"name": "default-0"}]
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": metadata, "spec": spec}


def build_datavolume(vm: Mapping[str, Any], template: Mapping[str, Any]) -> Obj:
    tmeta = copy.deepcopy(as_dict(template.get("metadata")))
    tmeta.pop("creationTimestamp", None)
    tmeta["namespace"] = key_of(vm)[0]
    tmeta["ownerReferences"] = [controller_reference(vm)]
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": tmeta,
            "spec": copy.deepcopy(as_dict(template.get("spec")))}


def datavolumes_ready(inp: VMInputs) -> tuple[bool, list[CreateDataVolume]]:
    """``handleDataVolumes``: DataVolumes to create and whether all are populated."""
    ns = key_of(inp.vm)[0]
    ready, creates = True, []
    for t in as_list(as_dict(inp.vm.get("spec")).get("dataVolumeTemplates")):
        name = str(as_dict(as_dict(t).get("metadata")).get("name") or "")
        if not name:
            continue
        dv = inp.datavolumes.get((ns, name))
        if dv is None:
            ready = False
            creates.append(CreateDataVolume(build_datavolume(inp.vm, as_dict(t))))
        elif phase(dv) not in ("Succeeded", "WaitForFirstConsumer", "PendingPopulation"):
            ready = False
    return ready, creates


# ---- the sync step (syncRunStrategy) -------------------------------------------------------


def _plan_sync(inp: VMInputs, vmi: Obj | None, plan: VMPlan) -> None:
    vm = inp.vm
    requests = requests_of(vm)
    plan.requests = requests
    strategy, err = run_strategy(vm)
    if err is not None:
        plan.sync_error = SyncError(REASON_FAILED_CREATE, f"Error fetching RunStrategy: {err}")
        return
    name = key_of(vm)[1]
    dvs_ready, creates = datavolumes_ready(inp)
    immediate = as_dict(meta(vm).get("annotations")).get(
        "kubevirt.io/immediate-data-volume-creation") != "false"
    if immediate:
        plan.actions.extend(creates)
        if not dvs_ready and strategy != "Halted":
            return

    def start(backoff: bool = False) -> None:
        # Upstream waits out the start-failure backoff only under Always and RerunOnFailure.
        left = backoff_left(vm, inp.now) if backoff else 0
        if left > 0:
            plan.requeue_after = float(left)
            return
        if not dvs_ready:
            if not immediate:
                plan.actions.extend(creates)
            return
        plan.actions.append(CreateVMI(build_vmi(vm, requests,
                                                receiver=strategy == "WaitAsReceiver")))
        plan.start_expected = True

    def stop(target: Obj) -> None:
        if is_deleting(target):
            return
        plan.actions.append(DeleteVMI(name, str(meta(target).get("uid"))))
        plan.stop_expected = True

    if strategy == "Always":
        if vmi is not None:
            if has_stop_request_for(requests, vmi) or is_final(vmi):
                stop(vmi)
            return
        start(backoff=True)
    elif strategy == "RerunOnFailure":
        if vmi is not None:
            failed = phase(vmi) == "Failed"
            if not is_deleting(vmi) and (has_stop_request_for(requests, vmi) or failed
                                         or phase(vmi) == "Succeeded"):
                stop(vmi)
                if failed:
                    plan.requests = [*requests, {"action": "Start"}]
                    plan.actions.append(SetStateChangeRequests(plan.requests))
            return
        if not has_start_request(requests) and status_of(vm).get("runStrategy") == strategy:
            return
        start(backoff=True)
    elif strategy == "Manual":
        if vmi is not None:
            if has_stop_request_for(requests, vmi):
                stop(vmi)
        elif has_start_request(requests):
            start()
    elif strategy == "Halted":
        if vmi is None:
            if has_start_request(requests):
                spec = as_dict(vm.get("spec"))
                key = "runStrategy" if spec.get("runStrategy") is not None else "running"
                plan.actions.append(SetRunning({"spec": {key: "Always" if key == "runStrategy"
                                                         else True}}))
            return
        stop(vmi)
    elif strategy in ("Once", "WaitAsReceiver"):
        if vmi is None:
            start()
    else:
        plan.sync_error = SyncError(REASON_FAILED_CREATE, f"unknown runstrategy: {strategy}")


# ---- the status (updateStatus) -------------------------------------------------------------


def _trim_needed(requests: list[Obj], vmi: Obj | None) -> bool:
    """``isTrimFirstChangeRequestNeeded``."""
    if not requests:
        return False
    first = requests[0]
    if first.get("action") == "Stop":
        return vmi is None or first.get("uid") is None or first.get("uid") != meta(vmi).get(
            "uid")
    if first.get("action") == "Start":
        return vmi is not None and not is_deleting(vmi) and not is_final(vmi)
    return False


def _set_to_start(strategy: str, requests: list[Obj], vmi: Obj | None) -> bool:
    """``isSetToStart``."""
    if strategy == "Always":
        return True
    if strategy == "Manual":
        return not has_stop_request_for(requests, vmi) if vmi is not None else (
            has_start_request(requests))
    if strategy == "RerunOnFailure":
        return phase(vmi) != "Succeeded" if vmi is not None else True
    if strategy == "Once":
        return vmi is None
    return False


def _start_failure(inp: VMInputs, strategy: str, old: Obj | None) -> Obj | None:
    """``syncStartFailureStatus``."""
    vmi = inp.vmi
    if was_running(vmi) or strategy not in ("Always", "RerunOnFailure", "Once"):
        return None
    if vmi is None or not is_final(vmi):
        return old
    uid = meta(vmi).get("uid")
    if old is not None and old.get("lastFailedVMIUID") == uid:
        return old
    count = int((old or {}).get("consecutiveFailCount") or 0) + 1
    delay = backoff_seconds(count, inp.randint)
    return {"consecutiveFailCount": count, "lastFailedVMIUID": uid,
            "retryAfterTimestamp": rfc3339(inp.now + datetime.timedelta(seconds=delay))}


def _conditions(inp: VMInputs, old: list[Obj], sync_error: SyncError | None) -> list[Obj]:
    """``syncConditions``."""
    vm_conds = [dict(c) for c in old]
    now = rfc3339(inp.now)
    vmi = inp.vmi
    ready = get_condition(vmi, "Ready")
    if vmi is None:
        new = make_condition("Ready", "False", reason="VMINotExists",
                             message="VMI does not exist", probe=now, transition=now)
    elif ready is None:
        new = make_condition("Ready", "False", reason="VMIConditionMissing",
                             message="VMI is missing the Ready condition", probe=now,
                             transition=now)
    else:
        new = _copy_condition(ready)
    update_condition(vm_conds, new)
    if sync_error is None:
        vm_conds = remove_condition(vm_conds, "Failure")
    else:
        update_condition(vm_conds, make_condition("Failure", "True", reason=sync_error.reason,
                                                  message=sync_error.message, transition=now))
    if vmi is None:
        return vm_conds
    seen = set()
    for cond in as_list(status_of(vmi).get("conditions")):
        if not isinstance(cond, dict) or cond.get("type") in _SYNC_IGNORED:
            continue
        seen.add(cond.get("type"))
        update_condition(vm_conds, _copy_condition(cond))
    return [c for c in vm_conds if c.get("type") in _SYNC_IGNORED or c.get("type") in seen]


def _copy_condition(cond: Mapping[str, Any]) -> Obj:
    return make_condition(str(cond.get("type")), str(cond.get("status") or ""),
                          reason=str(cond.get("reason") or ""),
                          message=str(cond.get("message") or ""),
                          probe=cond.get("lastProbeTime"),
                          transition=cond.get("lastTransitionTime"))


def printable_status(inp: VMInputs, status: Obj, strategy: str, *, start_expected: bool,
                     stop_expected: bool) -> str:
    """``setPrintableStatus``: the first rule that holds, in upstream's order."""
    vm, vmi = inp.vm, inp.vmi
    requests = [r for r in as_list(status.get("stateChangeRequests")) if isinstance(r, dict)]
    failure = as_dict(status.get("startFailure"))

    def synchronized(reason: str) -> bool:
        return has_condition(vmi, "Synchronized", "False", reason)

    rules: list[tuple[str, Callable[[], bool]]] = [
        ("Terminating", lambda: is_deleting(vm)),
        ("Stopping", lambda: vmi is not None and not is_final(vmi)
         and (is_deleting(vmi) or stop_expected)),
        ("Migrating", lambda: vmi is not None and is_migrating(vmi, inp.now)),
        ("Paused", lambda: phase(vmi) == "Running"
         and has_condition(vmi, "Paused", "True")),
        ("Running", lambda: phase(vmi) == "Running"
         and not has_condition(vmi, "Paused", "True")),
        ("ErrorPvcNotFound", lambda: synchronized("FailedPvcNotFound")),
        ("DataVolumeError", lambda: datavolume_error(vm, inp.datavolumes)),
        ("ErrorUnschedulable", lambda: has_condition(vmi, "PodScheduled", "False",
                                                     "Unschedulable")),
        ("Provisioning", lambda: datavolume_provisioning(vm, inp.datavolumes)),
        ("WaitingForVolumeBinding", lambda: _set_to_start(strategy, requests, vmi)
         and unbound_pvc(vm, inp.pvcs)),
        ("ErrImagePull", lambda: synchronized("ErrImagePull")),
        ("ImagePullBackOff", lambda: synchronized("ImagePullBackOff")),
        ("Starting", lambda: start_expected if vmi is None
         else phase(vmi) in ("", "Pending", "Scheduling", "Scheduled")),
        ("CrashLoopBackOff", lambda: (vmi is None or is_final(vmi)) and not start_expected
         and int(failure.get("consecutiveFailCount") or 0) > 0
         and strategy in ("Always", "RerunOnFailure", "Once")),
        ("Stopped", lambda: is_final(vmi) if vmi is not None else not start_expected),
        ("WaitingForReceiver", lambda: (vmi is None or phase(vmi) == "WaitingForSync")
         and strategy == "WaitAsReceiver"),
    ]
    for name, holds in rules:
        if holds():
            return name
    return "Unknown"


def compute_status(inp: VMInputs, *, requests: list[Obj], sync_error: SyncError | None,
                   start_expected: bool, stop_expected: bool) -> tuple[Obj, int]:
    """The VM's new status and how many state change requests were trimmed."""
    vm, vmi = inp.vm, inp.vmi
    old = status_of(vm)
    status: Obj = copy.deepcopy(old)
    strategy, _ = run_strategy(vm)
    created = vmi is not None
    status["created"] = created
    status["ready"] = created and has_condition(vmi, "Ready", "True")
    if vmi is not None:
        try:
            gen = int(str(as_dict(meta(vmi).get("annotations")).get(GENERATION_ANNOTATION)))
            status["observedGeneration"] = gen
            status["desiredGeneration"] = int(meta(vm).get("generation") or 0)
        except ValueError:
            pass
    if status.get("runStrategy") or created:
        status["runStrategy"] = strategy
    requests = [dict(r) for r in requests]
    trimmed = 0
    if _trim_needed(requests, vmi):
        requests = requests[1:]
        trimmed = 1
    status["stateChangeRequests"] = requests
    status["startFailure"] = _start_failure(inp, strategy, as_dict(old.get("startFailure"))
                                            or None)
    status["conditions"] = _conditions(
        inp, [c for c in as_list(old.get("conditions")) if isinstance(c, dict)], sync_error)
    status["printableStatus"] = printable_status(inp, status, strategy,
                                                 start_expected=start_expected,
                                                 stop_expected=stop_expected)
    for k in _MANAGED:
        if status.get(k) in (None, False, "", [], 0, {}):
            status.pop(k, None)
    return status, trimmed


# ---- the whole reconcile -------------------------------------------------------------------


def reconcile_vm(inp: VMInputs) -> VMPlan:
    """Everything the controller does for one VM, in order (``execute`` upstream)."""
    vm = inp.vm
    plan = VMPlan([])
    vmi = inp.vmi
    if vmi is not None:
        ref = controller_ref(vmi)
        if ref is None and not is_deleting(vm) and not is_deleting(vmi):
            refs = [r for r in as_list(meta(vmi).get("ownerReferences")) if isinstance(r, dict)]
            plan.actions.append(AdoptVMI([*refs, controller_reference(vm)]))
        elif ref is not None and ref.get("uid") != meta(vm).get("uid"):
            vmi = None  # someone else's: leave it alone
    inp = VMInputs(vm, vmi, inp.now, inp.datavolumes, inp.pvcs, inp.randint)
    fins = [str(f) for f in as_list(meta(vm).get("finalizers"))]
    if is_deleting(vm):
        plan.requests = requests_of(vm)
        if vmi is None or ORPHAN_FINALIZER in fins:
            if VM_CONTROLLER_FINALIZER in fins:
                rest = [f for f in fins if f != VM_CONTROLLER_FINALIZER]
                plan.actions.append(RemoveVMFinalizer(rest))
                if not rest:
                    return plan  # the VM goes away with its last finalizer
        elif not is_deleting(vmi):
            plan.actions.append(DeleteVMI(key_of(vm)[1], str(meta(vmi).get("uid"))))
            plan.stop_expected = True
    else:
        annotations = as_dict(meta(vm).get("annotations"))
        missing = {a: "v1" for a in API_VERSION_ANNOTATIONS if annotations.get(a) != "v1"}
        if VM_CONTROLLER_FINALIZER not in fins or missing:
            plan.actions.append(PatchVMMetadata(
                fins if VM_CONTROLLER_FINALIZER in fins else [*fins, VM_CONTROLLER_FINALIZER],
                {**{str(k): str(v) for k, v in annotations.items()}, **missing}))
        _plan_sync(inp, vmi, plan)
    plan.actions.extend(status_actions(inp, plan, plan.sync_error))
    return plan


def status_actions(inp: VMInputs, plan: VMPlan, sync_error: SyncError | None
                   ) -> list[VMAction]:
    """The status write and what follows it; called again when a sync action failed."""
    requests = plan.requests if plan.requests is not None else requests_of(inp.vm)
    status, trimmed = compute_status(inp, requests=requests, sync_error=sync_error,
                                     start_expected=plan.start_expected,
                                     stop_expected=plan.stop_expected)
    out: list[VMAction] = []
    if status != status_of(inp.vm):
        out.append(UpdateVMStatus(status, trimmed))
    vmi = inp.vmi
    if vmi is not None and is_final(vmi) and VM_CONTROLLER_FINALIZER in as_list(
            meta(vmi).get("finalizers")):
        out.append(RemoveVMIFinalizer(key_of(vmi)[1]))
    return out


def sync_error_for(action: VMAction, e: ApiError) -> SyncError:
    if isinstance(action, CreateVMI | SetRunning):
        return SyncError(REASON_FAILED_CREATE, f"Failure while starting VMI: {e.message}")
    if isinstance(action, CreateDataVolume):
        return SyncError(REASON_FAILED_CREATE, "Error encountered while creating DataVolumes: "
                         f"failed to create DataVolume: {e.message}")
    if isinstance(action, SetStateChangeRequests):
        return SyncError(REASON_FAILED_DELETE,
                         f"failed to patch VM with start action: {e.message}")
    return SyncError(REASON_FAILED_DELETE, f"Failure attempting to delete VMI: {e.message}")
