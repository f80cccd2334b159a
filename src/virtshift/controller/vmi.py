"""The VirtualMachineInstance controller: virt-controller's VMI lifecycle up to the node agent.

Phases (upstream ``pkg/virt-controller/watch/vmi/lifecycle.go``): an unprocessed VMI becomes
``Pending``; once its volumes are ready (every PVC exists; DataVolumes have Succeeded, wait for
their first consumer or are pending population) its "launcher" exists and it is ``Scheduling``;
:func:`virtshift.controller.scheduler.place` then picks a node and it is ``Scheduled`` with
``status.nodeName`` and the ``kubevirt.io/nodeName`` label. ``Running``, ``Succeeded`` and
``Failed`` come from the node agent. With no fitting node the VMI stays ``Scheduling`` with the
``PodScheduled`` condition False, reason ``Unschedulable`` and the scheduler's message, and is
retried whenever nodes or placed VMIs change. A missing PVC keeps it ``Pending`` with
``Synchronized`` False, reason ``FailedPvcNotFound``, mirrored into ``PodScheduled``.

Deletion: upstream deletes the launcher pod and fails the VMI when the pod is gone. Here a VMI
marked for deletion before it runs (unprocessed, Pending, Scheduling, or Scheduled and carrying
no finalizer but the VM controller's) is moved to ``Failed`` at once. A node agent that starts a
VMI adds a finalizer of its own and reports ``Succeeded``/``Failed`` when it has stopped it. A
final VMI loses ``foregroundDeleteVirtualMachine`` and, when its owning VM is gone, the VM
controller's finalizer.

The module also holds the pieces the VM controller shares: condition and time helpers, a
resource-version-guarded object cache and a work queue.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.api import cdi
from virtshift.api.kinds import Obj
from virtshift.controller.scheduler import Placement, place
from virtshift.controller.storage import volume_node

log = logging.getLogger(__name__)

Key = tuple[str, str]

NODE_NAME_LABEL = "kubevirt.io/nodeName"
VM_CONTROLLER_FINALIZER = "kubevirt.io/virtualMachineControllerFinalizer"
VMI_FINALIZER = "foregroundDeleteVirtualMachine"
FINAL_PHASES = ("Succeeded", "Failed")
REASON_POD_NOT_EXISTS = "PodNotExists"
REASON_GUEST_NOT_RUNNING = "GuestNotRunning"
REASON_PVC_NOT_FOUND = "FailedPvcNotFound"
REASON_UNSCHEDULABLE = "Unschedulable"


# ---- shared helpers --------------------------------------------------------------------------


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return as_dict(obj.get("metadata"))


def status_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    return as_dict(obj.get("status"))


def key_of(obj: Mapping[str, Any]) -> Key:
    m = meta(obj)
    return str(m.get("namespace") or ""), str(m.get("name") or "")


def phase(vmi: Mapping[str, Any] | None) -> str:
    return str(status_of(vmi).get("phase") or "") if vmi is not None else ""


def is_final(vmi: Mapping[str, Any] | None) -> bool:
    return phase(vmi) in FINAL_PHASES


def is_deleting(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and bool(meta(obj).get("deletionTimestamp"))


def get_condition(obj: Mapping[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    for cond in as_list(status_of(obj).get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == ctype:
            return cond
    return None


def has_condition(obj: Mapping[str, Any] | None, ctype: str, status: str,
                  reason: str | None = None) -> bool:
    cond = get_condition(obj, ctype)
    return (cond is not None and cond.get("status") == status
            and (reason is None or cond.get("reason") == reason))


def make_condition(ctype: str, status: str, *, reason: str = "", message: str = "",
                   probe: str | None = None, transition: str | None = None) -> Obj:
    cond: Obj = {"type": ctype, "status": status, "lastProbeTime": probe,
                 "lastTransitionTime": transition}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def update_condition(conds: list[Obj], new: Obj) -> None:
    """KubeVirt's ``UpdateCondition``: replace the condition of that type only when its status
    or reason changed; append it when absent."""
    for i, cond in enumerate(conds):
        if cond.get("type") == new["type"]:
            if cond.get("status") != new.get("status") or cond.get("reason") != new.get(
                    "reason"):
                conds[i] = new
            return
    conds.append(new)


def remove_condition(conds: list[Obj], ctype: str) -> list[Obj]:
    return [c for c in conds if c.get("type") != ctype]


def controller_ref(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    for ref in as_list(meta(obj).get("ownerReferences")):
        if isinstance(ref, dict) and ref.get("controller") is True:
            return ref
    return None


# ---- the pure VMI decision -------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateVMIStatus:
    status: Obj


@dataclass(frozen=True)
class SetVMILabels:
    labels: dict[str, str]


@dataclass(frozen=True)
class RemoveVMIFinalizers:
    finalizers: tuple[str, ...]


VMIAction = UpdateVMIStatus | SetVMILabels | RemoveVMIFinalizers


@dataclass(frozen=True)
class VMIDecision:
    actions: list[VMIAction] = field(default_factory=list)
    unschedulable: bool = False


def claim_name(volume: Mapping[str, Any]) -> str:
    """``PVCNameFromVirtVolume``: the claim behind a PVC or DataVolume volume."""
    pvc = as_dict(volume.get("persistentVolumeClaim"))
    if pvc.get("claimName"):
        return str(pvc["claimName"])
    dv = as_dict(volume.get("dataVolume"))
    if dv.get("name"):
        return str(dv["name"])
    return ""


def volumes_ready(vmi: Mapping[str, Any], pvcs: Mapping[Key, Obj],
                  datavolumes: Mapping[Key, Obj]) -> tuple[bool, str]:
    """``areDataVolumesReady``: (ready, missing-PVC message). A claim that is not ``Bound``
    yet keeps the VMI waiting (the launcher pod's volume binding would)."""
    ns = key_of(vmi)[0]
    ready = True
    for volume in as_list(as_dict(vmi.get("spec")).get("volumes")):
        if not isinstance(volume, dict) or not (
                "persistentVolumeClaim" in volume or "dataVolume" in volume):
            continue
        name = claim_name(volume)
        if not name:
            continue
        if (ns, name) not in pvcs:
            return False, f"PVC {ns}/{name} does not exist, waiting for it to appear"
        if phase(pvcs[(ns, name)]) != "Bound" or not cdi.populated(pvcs[(ns, name)]):
            ready = False  # bound by the storage controller, filled by the node's populator
        dv = datavolumes.get((ns, name))
        if dv is not None and phase(dv) not in ("Succeeded", "WaitForFirstConsumer",
                                                 "PendingPopulation"):
            ready = False
    return ready, ""


# ---- volume-derived VM statuses (pkg/storage/types) ------------------------------------------


def template_volumes(vm: Mapping[str, Any]) -> list[Obj]:
    spec = as_dict(as_dict(as_dict(vm.get("spec")).get("template")).get("spec"))
    return [v for v in as_list(spec.get("volumes")) if isinstance(v, dict)]


def _volume_datavolumes(vm: Mapping[str, Any], datavolumes: Mapping[Key, Obj]) -> list[Obj]:
    ns = key_of(vm)[0]
    out = []
    for v in template_volumes(vm):
        name = as_dict(v.get("dataVolume")).get("name")
        dv = datavolumes.get((ns, str(name))) if name else None
        if dv is not None:
            out.append(dv)
    return out


def datavolume_error(vm: Mapping[str, Any], datavolumes: Mapping[Key, Obj]) -> bool:
    """``HasDataVolumeErrors``: a referenced DataVolume Failed or its importer errored."""
    for dv in _volume_datavolumes(vm, datavolumes):
        running = as_dict(get_condition(dv, "Running"))
        if phase(dv) == "Failed" or (running.get("status") == "False" and running.get(
                "reason") in ("Error", "ImagePullFailed")):
            return True
    return False


def datavolume_provisioning(vm: Mapping[str, Any], datavolumes: Mapping[Key, Obj]) -> bool:
    """``HasDataVolumeProvisioning``: a referenced DataVolume is still being populated."""
    for dv in _volume_datavolumes(vm, datavolumes):
        if phase(dv) in ("Succeeded", "PendingPopulation"):
            continue
        if has_condition(dv, "Bound", "True") or phase(dv) != "WaitForFirstConsumer":
            return True
    return False


def unbound_pvc(vm: Mapping[str, Any], pvcs: Mapping[Key, Obj]) -> bool:
    """``HasUnboundPVC``: a referenced claim exists but is not Bound."""
    ns = key_of(vm)[0]
    for v in template_volumes(vm):
        name = claim_name(v)
        pvc = pvcs.get((ns, name)) if name else None
        if pvc is not None and phase(pvc) != "Bound":
            return True
    return False


def _with_phase(status: Obj, new_phase: str, now: str) -> None:
    if status.get("phase") != new_phase:
        status["phase"] = new_phase
        stamps = [s for s in as_list(status.get("phaseTransitionTimestamps"))
                  if isinstance(s, dict)]
        stamps.append({"phase": new_phase, "phaseTransitionTimestamp": now})
        status["phaseTransitionTimestamps"] = stamps


def _put_condition(conds: list[Obj], new: Obj) -> None:
    """Set the condition of that type in place (appended when absent): a condition that did not
    change keeps its position, so an unchanged status compares equal and is not rewritten."""
    for i, cond in enumerate(conds):
        if cond.get("type") == new["type"]:
            conds[i] = new
            return
    conds.append(new)


def _ready_condition(conds: list[Obj], reason: str, message: str, now: str) -> None:
    update_condition(conds, make_condition("Ready", "False", reason=reason, message=message,
                                           probe=now, transition=now))


def reconcile_vmi(vmi: Obj, *, now: datetime.datetime, nodes: Sequence[Obj],
                  vmis: Iterable[Obj], owner_exists: bool,
                  pvcs: Mapping[Key, Obj] | None = None,
                  datavolumes: Mapping[Key, Obj] | None = None,
                  pvs: Mapping[str, Obj] | None = None) -> VMIDecision:
    """What the VMI controller does with ``vmi``, given the cluster's ``nodes``, all ``vmis``
    (for the resources already placed), whether its owning VM exists, and PVCs/DataVolumes by
    (namespace, name), PersistentVolumes by name (a bound node-local volume pins the node)."""
    ts = rfc3339(now)
    old = status_of(vmi)
    status: Obj = {**old}
    conds: list[Obj] = [dict(c) for c in as_list(old.get("conditions")) if isinstance(c, dict)]
    actions: list[VMIAction] = []
    labels = {str(k): str(v) for k, v in as_dict(meta(vmi).get("labels")).items()}
    fins = [str(f) for f in as_list(meta(vmi).get("finalizers"))]
    current = phase(vmi)
    deleting = is_deleting(vmi)
    unschedulable = False
    sync_error: tuple[str, str] | None = None

    if current in ("", "Pending"):
        ready, missing = volumes_ready(vmi, pvcs or {}, datavolumes or {})
        if deleting:
            _with_phase(status, "Failed", ts)
        elif current == "" or not ready:
            _with_phase(status, "Pending", ts)
            _ready_condition(conds, REASON_POD_NOT_EXISTS,
                             "virt-launcher pod has not yet been scheduled", ts)
            if missing:
                sync_error = (REASON_PVC_NOT_FOUND, missing)
                _put_condition(conds, make_condition("PodScheduled", "False",
                                                     reason=REASON_UNSCHEDULABLE,
                                                     message=missing))
        else:
            _with_phase(status, "Scheduling", ts)
            conds = remove_condition(conds, "PodScheduled")
            _ready_condition(conds, REASON_GUEST_NOT_RUNNING,
                             "Guest VM is not reported as running", ts)
    elif current == "Scheduling":
        if deleting:
            _with_phase(status, "Failed", ts)
        else:
            pinned, conflict = volume_node(vmi, pvcs or {}, pvs or {})
            placement = (place(vmi, nodes, vmis, volume_node=pinned) if not conflict
                         else Placement(None, conflict, REASON_UNSCHEDULABLE))
            if placement.node is not None:
                conds = remove_condition(conds, "PodScheduled")
                _with_phase(status, "Scheduled", ts)
                status["nodeName"] = placement.node
                _ready_condition(conds, REASON_GUEST_NOT_RUNNING,
                                 "Guest VM is not reported as running", ts)
            else:
                unschedulable = True
                cond = make_condition("PodScheduled", "False", reason=REASON_UNSCHEDULABLE,
                                      message=placement.message, transition=ts)
                held = get_condition(vmi, "PodScheduled")
                if held is not None and held.get("status") == "False":
                    cond["lastTransitionTime"] = held.get("lastTransitionTime", ts)
                _put_condition(conds, cond)
    elif current == "Scheduled" and deleting and not [
            f for f in fins if f not in (VM_CONTROLLER_FINALIZER, VMI_FINALIZER)]:
        _with_phase(status, "Failed", ts)

    # CheckFailure: the Synchronized condition reports the last sync error.
    if current in ("", "Pending", "Scheduling") and not deleting:
        if sync_error is None:
            conds = remove_condition(conds, "Synchronized")
        elif not has_condition(vmi, "Synchronized", "False", sync_error[0]):
            conds = remove_condition(conds, "Synchronized")
            conds.append(make_condition("Synchronized", "False", reason=sync_error[0],
                                        message=sync_error[1], transition=ts))
    status["conditions"] = conds
    if not conds:
        status.pop("conditions", None)
    if status != old:
        actions.append(UpdateVMIStatus(status))

    node = status.get("nodeName")
    if status.get("phase") in ("Scheduled", "Running") and node and labels.get(
            NODE_NAME_LABEL) != node:
        actions.append(SetVMILabels({**labels, NODE_NAME_LABEL: str(node)}))

    if status.get("phase") in FINAL_PHASES:
        drop = [f for f in fins if f == VMI_FINALIZER
                or (f == VM_CONTROLLER_FINALIZER and not owner_exists)]
        if drop:
            actions.append(RemoveVMIFinalizers(tuple(drop)))
    return VMIDecision(actions, unschedulable)


