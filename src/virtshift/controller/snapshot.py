"""VM snapshots and restores (``snapshot.kubevirt.io/v1beta1``), as pure decisions.

Upstream's ``pkg/storage/snapshot`` keeps a VirtualMachineSnapshot, the
VirtualMachineSnapshotContent it creates, and a VirtualMachineRestore in step; the names, phases,
condition reasons, events and messages here are its own. What differs is the storage underneath:
there is no CSI VolumeSnapshot. The snapshot of a volume is a copy of its ``disk.img`` that the node
agent holding the volume (:mod:`virtshift.agent.snapshot`) makes on the same node; the content
records where (:data:`ANN_NODE`, :data:`ANN_DIR`), and a restore creates claims that the node's
populator fills from those files (the ``snapshot`` source of :mod:`virtshift.api.cdi`).

* :func:`reconcile_snapshot`: the VM is locked (``status.snapshotInProgress`` and the
  ``snapshot-source-protection`` finalizer) once its claims are bound, populated and on one node;
  then the content is created with the VM as it is (``source.virtualMachine``) and one
  ``volumeBackups`` entry per claim. The snapshot mirrors the content's ``creationTime``,
  ``readyToUse`` and ``error``, and goes ``InProgress`` -> ``Succeeded`` (or ``Failed`` once
  ``failureDeadline``, 5 minutes by default, passes). Deleting it deletes the content (deletion
  policy ``Delete``, or a content that never became ready) and unlocks the VM.
* :func:`reconcile_content`: the controller's part of a content (the agent writes the rest).
* :func:`reconcile_restore`: the target VM must have no VMI (``targetReadinessPolicy``); a claim
  ``restore-<restore uid>-<volume>`` per volume backup, then the VM's volumes point at them (a new
  VM is created from the snapshotted spec when the target does not exist), then ``complete``.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.api import cdi
from virtshift.api.cdi import pv_node
from virtshift.api.kinds import Obj
from virtshift.api.patch import json_patch
from virtshift.controller.storage import ANN_SELECTED_NODE
from virtshift.controller.vm import firmware_uuid, run_strategy
from virtshift.controller.vmi import (
    Key,
    as_dict,
    as_list,
    is_deleting,
    key_of,
    meta,
    parse_time,
    rfc3339,
    status_of,
)
from virtshift.errors import ApiError

API_VERSION = "snapshot.kubevirt.io/v1beta1"

SNAPSHOT_FINALIZER = "snapshot.kubevirt.io/vmsnapshot-protection"
CONTENT_FINALIZER = "snapshot.kubevirt.io/vmsnapshotcontent-protection"
SOURCE_FINALIZER = "snapshot.kubevirt.io/snapshot-source-protection"
RESTORE_FINALIZER = "snapshot.kubevirt.io/vmrestore-protection"

LABEL_SOURCE_NAME = "snapshot.kubevirt.io/source-vm-name"
LABEL_SOURCE_NAMESPACE = "snapshot.kubevirt.io/source-vm-namespace"
LABEL_RESTORE_SOURCE_NAME = "restore.kubevirt.io/source-vm-name"
LABEL_RESTORE_SOURCE_NAMESPACE = "restore.kubevirt.io/source-vm-namespace"
ANN_RESTORE_NAME = "restore.kubevirt.io/name"
ANN_LAST_RESTORE = "restore.kubevirt.io/lastRestoreUID"

# virtshift's own: where the volume copies of a content lie.
LABEL_NODE = "virtshift.io/snapshot-node"
"""On a content: the node whose agent copies its volumes (where the claims' volumes are)."""
ANN_NODE = "virtshift.io/snapshot-node"
ANN_DIR = "virtshift.io/snapshot-dir"
"""On a content, written by the node agent: the directory holding ``<volume name>.img``."""
ANN_STATS = "virtshift.io/snapshot-stats"
"""On a content, written by the node agent: how the copy went (JSON: online, frozen, pausedMs,
seconds, bytes)."""

EVENT_CONTENT_CREATE = "SuccessfulVirtualMachineSnapshotContentCreate"
EVENT_RESTORE_COMPLETE = "VirtualMachineRestoreComplete"
EVENT_RESTORE_ERROR = "VirtualMachineRestoreError"
EVENT_RESTORE_NOT_READY = "RestoreTargetNotReady"

DEADLINE_EXCEEDED = "snapshot deadline exceeded"
DEFAULT_FAILURE_DEADLINE = 300.0
RESTORE_GRACE_PERIOD = 300.0
RETRY_SECONDS = 5.0

ERR_RESTORE_TO_EXISTING = ("restore source and restore target are different but restore "
                           "target already exists")
ERR_GRACE_EXCEEDED = "Restore target failed to be ready within 5m0s"
ERR_TARGET_NOT_READY = "Restore target not ready"

INDICATION_MESSAGES = {
    "Online": "Snapshot taken while the VM was running. Consistency depends on guest-agent "
              "quiescing.",
    "GuestAgent": "Guest agent was active and attempted to quiesce the filesystem for "
                  "application consistency.",
    "NoGuestAgent": "Guest agent was not available. Snapshot is crash-consistent and may not "
                    "be application-consistent.",
    "Paused": "Snapshot taken while the VM was paused. Snapshot is crash-consistent and may "
              "not be application-consistent.",
}

# Annotation prefixes a restored claim does not inherit from the snapshotted one.
_DROPPED_ANNOTATIONS = ("pv.kubernetes.io", "volume.beta.kubernetes.io", "cdi.kubevirt.io",
                        "volume.kubernetes.io", "k8s.io/CloneRequest", "k8s.io/CloneOf",
                        "virtshift.io/populate")


# ---- actions ---------------------------------------------------------------------------------
# ``kind`` is one of: snapshot, content, restore, vm, pvc, dv.


@dataclass(frozen=True)
class Create:
    kind: str
    namespace: str
    obj: Obj


@dataclass(frozen=True)
class Patch:
    """A JSON merge patch (pin it with ``metadata.resourceVersion`` where it must not race)."""

    kind: str
    namespace: str
    name: str
    patch: Obj
    subresource: str = ""


@dataclass(frozen=True)
class Update:
    """A whole-object write (its resourceVersion pins it), of ``status`` when ``subresource``."""

    kind: str
    namespace: str
    obj: Obj
    subresource: str = ""


@dataclass(frozen=True)
class Delete:
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Event:
    kind: str
    obj: Obj
    type: str
    reason: str
    message: str


Action = Create | Patch | Update | Delete | Event


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.05)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


# ---- small helpers ---------------------------------------------------------------------------


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float | None:
    """A Go duration (``5m0s``, ``1h``, ``90s``) in seconds; None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos else None


def finalizers(obj: Mapping[str, Any]) -> list[str]:
    return [str(f) for f in as_list(meta(obj).get("finalizers"))]


def _fin_patch(obj: Mapping[str, Any], fins: list[str]) -> Obj:
    return {"metadata": {"finalizers": fins or None,
                         "resourceVersion": meta(obj).get("resourceVersion")}}


def condition(ctype: str, status: str, reason: str, now: datetime.datetime) -> Obj:
    return {"type": ctype, "status": status, "reason": reason, "lastProbeTime": None,
            "lastTransitionTime": rfc3339(now)}


def set_condition(status: Obj, new: Obj) -> None:
    """Upstream's ``updateCondition``: replace only when the status or reason changed."""
    conds = [c for c in as_list(status.get("conditions")) if isinstance(c, dict)]
    for i, c in enumerate(conds):
        if c.get("type") == new["type"]:
            if c.get("status") != new["status"] or c.get("reason") != new["reason"]:
                conds[i] = new
            break
    else:
        conds.append(new)
    status["conditions"] = conds


def has_condition(status: Mapping[str, Any], ctype: str, value: str = "True") -> bool:
    return any(isinstance(c, dict) and c.get("type") == ctype and c.get("status") == value
               for c in as_list(status.get("conditions")))


def vm_volume_claims(vm: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(volume name, claim name) of a VM's ``persistentVolumeClaim`` and ``dataVolume``
    volumes, in spec order."""
    spec = as_dict(as_dict(as_dict(vm.get("spec")).get("template")).get("spec"))
    out = []
    for vol in as_list(spec.get("volumes")):
        vol = as_dict(vol)
        claim = (as_dict(vol.get("persistentVolumeClaim")).get("claimName")
                 or as_dict(vol.get("dataVolume")).get("name"))
        if claim and vol.get("name"):
            out.append((str(vol["name"]), str(claim)))
    return out


def vm_volume_names(vm: Mapping[str, Any]) -> list[str]:
    spec = as_dict(as_dict(as_dict(vm.get("spec")).get("template")).get("spec"))
    return [str(as_dict(v).get("name")) for v in as_list(spec.get("volumes"))
            if as_dict(v).get("name")]


def simplified_meta(obj: Mapping[str, Any]) -> Obj:
    """``getSimplifiedMetaObject``: name, namespace, labels, annotations."""
    m = meta(obj)
    out: Obj = {"name": m.get("name")}
    if m.get("namespace"):
        out["namespace"] = m["namespace"]
    for k in ("labels", "annotations"):
        if as_dict(m.get(k)):
            out[k] = copy.deepcopy(m[k])
    return out


def content_name(snapshot: Mapping[str, Any]) -> str:
    name = status_of(snapshot).get("virtualMachineSnapshotContentName")
    return str(name) if name else f"vmsnapshot-content-{meta(snapshot).get('uid')}"


def volume_snapshot_name(snapshot: Mapping[str, Any], volume: str) -> str:
    return f"vmsnapshot-{meta(snapshot).get('uid')}-volume-{volume}"


def restore_pvc_name(restore: Mapping[str, Any], volume: str) -> str:
    return f"restore-{meta(restore).get('uid')}-{volume}"


def snapshot_file(content: Mapping[str, Any], volume: str) -> tuple[str, str]:
    """(node, path) of a volume's copy, from the content's annotations; "" when unknown."""
    ann = as_dict(meta(content).get("annotations"))
    node, directory = str(ann.get(ANN_NODE) or ""), str(ann.get(ANN_DIR) or "")
    if not node or not directory:
        return "", ""
    return node, f"{directory.rstrip('/')}/{volume}.img"


# ---- snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInputs:
    snapshot: Obj
    vm: Obj | None
    vmi: Obj | None
    content: Obj | None
    pvcs: Mapping[Key, Obj]
    pvs: Mapping[str, Obj]
    now: datetime.datetime


def _phase(snapshot: Mapping[str, Any]) -> str:
    return str(status_of(snapshot).get("phase") or "")


def failure_deadline(snapshot: Mapping[str, Any]) -> float:
    """Seconds; 0 means none (upstream: a zero ``failureDeadline`` never fails)."""
    value = parse_duration(as_dict(snapshot.get("spec")).get("failureDeadline"))
    return DEFAULT_FAILURE_DEADLINE if value is None else value


def time_until_deadline(snapshot: Mapping[str, Any], now: datetime.datetime) -> float | None:
    deadline = failure_deadline(snapshot)
    created = parse_time(meta(snapshot).get("creationTimestamp"))
    if deadline <= 0 or created is None:
        return None
    return (created - now).total_seconds() + deadline


def deadline_exceeded(snapshot: Mapping[str, Any], status: Mapping[str, Any],
                      now: datetime.datetime) -> bool:
    phase = str(status.get("phase") or "")
    if phase == "Failed":
        return True
    if phase == "Succeeded" or status.get("creationTime"):
        return False
    left = time_until_deadline(snapshot, now)
    return left is not None and left < 0


def content_ready(content: Mapping[str, Any] | None) -> bool:
    return content is not None and status_of(content).get("readyToUse") is True


def should_delete_content(snapshot: Mapping[str, Any], content: Mapping[str, Any]) -> bool:
    policy = as_dict(snapshot.get("spec")).get("deletionPolicy")
    return policy in (None, "", "Delete") or not content_ready(content)


def source_locked(vm: Mapping[str, Any] | None, snapshot_name: str) -> bool:
    return (vm is not None and status_of(vm).get("snapshotInProgress") == snapshot_name
            and SOURCE_FINALIZER in finalizers(vm))


def lock_problem(inp: SnapshotInputs) -> str:
    """Why the source cannot be locked yet ("" when it can): upstream's ``verifyVolumes`` (the
    claims exist, are not being deleted, are bound and populated), another snapshot in
    progress, and here also: every volume lies on one node."""
    vm = inp.vm
    assert vm is not None
    ns, name = key_of(vm)
    nodes: set[str] = set()
    for _vol, claim in vm_volume_claims(vm):
        pvc = inp.pvcs.get((ns, claim))
        if pvc is None:
            return f" source {ns}/{name} volume doesnt exist: {claim}"
        if is_deleting(pvc):
            return f" source {ns}/{name} volume is being deleted: {claim}"
        if status_of(pvc).get("phase") != "Bound":
            return f" source {ns}/{name} volume not bound: {claim}"
        if not cdi.populated(pvc):
            return f" source {ns}/{name} volume not populated: {claim}"
        pv = inp.pvs.get(str(as_dict(pvc.get("spec")).get("volumeName") or ""))
        node = pv_node(pv) if pv is not None else ""
        if not node:
            return f" source {ns}/{name} volume {claim} is not a node-local volume"
        nodes.add(node)
    if len(nodes) > 1:
        return f" source {ns}/{name} volumes are on different nodes: {', '.join(sorted(nodes))}"
    busy = status_of(vm).get("snapshotInProgress")
    if busy and busy != meta(inp.snapshot).get("name"):
        return f' snapshot "{busy}" in progress'
    return ""


def build_content(inp: SnapshotInputs) -> Obj:
    snap, vm = inp.snapshot, inp.vm
    assert vm is not None
    ns, name = key_of(snap)
    backups = []
    node = ""
    for vol, claim in vm_volume_claims(vm):
        pvc = inp.pvcs[(ns, claim)]
        pv = inp.pvs.get(str(as_dict(pvc.get("spec")).get("volumeName") or ""))
        node = node or (pv_node(pv) if pv is not None else "")
        backups.append({
            "volumeName": vol,
            "persistentVolumeClaim": {"metadata": simplified_meta(pvc),
                                      "spec": copy.deepcopy(as_dict(pvc.get("spec")))},
            "volumeSnapshotName": volume_snapshot_name(snap, vol),
        })
    vm_copy: Obj = {"metadata": simplified_meta(vm),
                    "spec": copy.deepcopy(as_dict(vm.get("spec"))), "status": {}}
    metadata: Obj = {"name": content_name(snap), "namespace": ns,
                     "finalizers": [CONTENT_FINALIZER]}
    if node:
        metadata["labels"] = {LABEL_NODE: node}
        metadata["annotations"] = {ANN_NODE: node}
    return {
        "apiVersion": API_VERSION, "kind": "VirtualMachineSnapshotContent",
        "metadata": metadata,
        "spec": {"virtualMachineSnapshotName": name, "source": {"virtualMachine": vm_copy},
                 "volumeBackups": backups},
    }


def copy_stats(content: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the node agent reported about the copy (:data:`ANN_STATS`), or {}."""
    if content is None:
        return {}
    try:
        out = json.loads(str(as_dict(meta(content).get("annotations")).get(ANN_STATS) or "{}"))
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def indications(vmi: Mapping[str, Any] | None,
                stats: Mapping[str, Any] | None = None) -> list[str]:
    """``updateSnapshotSourceIndications``: Online while a VMI exists, then Paused, or
    GuestAgent when the agent is connected, else NoGuestAgent. Sorted, as upstream's set.
    Once the node agent has reported the copy (``stats``), what it did decides: Online when it
    copied through the running QEMU, GuestAgent when it froze the guest's filesystems."""
    if stats:
        if stats.get("online") is not True:
            return []
        return sorted({"Online", "GuestAgent" if stats.get("frozen") else "NoGuestAgent"})
    if vmi is None:
        return []
    conds = status_of(vmi)
    out = {"Online"}
    if has_condition(conds, "Paused"):
        out.add("Paused")
    elif has_condition(conds, "AgentConnected"):
        out.add("GuestAgent")
    else:
        out.add("NoGuestAgent")
    return sorted(out)


def snapshot_status(inp: SnapshotInputs, *, locked: bool, lock_msg: str) -> Obj:
    """``updateSnapshotStatus``: the snapshot's new status."""
    snap, vm, content, now = inp.snapshot, inp.vm, inp.content, inp.now
    old = status_of(snap)
    st: Obj = copy.deepcopy(old) if old else {"readyToUse": False}
    if vm is not None:
        st["sourceUID"] = meta(vm).get("uid")
    if content is not None and content.get("status"):
        cst = status_of(content)
        st["virtualMachineSnapshotContentName"] = meta(content).get("name")
        for k in ("creationTime", "readyToUse", "error"):
            if cst.get(k) is not None:
                st[k] = copy.deepcopy(cst[k])
            else:
                st.pop(k, None)
        st.setdefault("readyToUse", False)
    if deadline_exceeded(snap, st, now):
        st["phase"] = "Failed"
        set_condition(st, condition("Failure", "True", DEADLINE_EXCEEDED, now))
        set_condition(st, condition("Progressing", "False", "Operation failed", now))
    elif st.get("phase") == "Succeeded" or st.get("creationTime"):
        if st.get("phase") != "Succeeded":  # the copy's own account, once
            _set_indications(st, indications(None, copy_stats(content)))
        st["phase"] = "Succeeded"
        set_condition(st, condition("Progressing", "False", "Operation complete", now))
        if content is not None:
            source_vm = as_dict(as_dict(as_dict(content.get("spec")).get("source")).get(
                "virtualMachine"))
            backed = {str(as_dict(b).get("volumeName")) for b in as_list(
                as_dict(content.get("spec")).get("volumeBackups"))}
            names = vm_volume_names(source_vm)
            st["snapshotVolumes"] = {
                "includedVolumes": [n for n in names if n in backed] or None,
                "excludedVolumes": [n for n in names if n not in backed] or None}
            st["snapshotVolumes"] = {k: v for k, v in st["snapshotVolumes"].items()
                                     if v is not None}
    else:
        st["phase"] = "InProgress"
        if vm is not None:
            set_condition(st, condition("Progressing", "True" if locked else "False",
                                        lock_msg, now))
            marks = indications(inp.vmi)
            if marks:
                marks = sorted(set(as_list(st.get("indications"))) | set(marks))
            _set_indications(st, marks)
        else:
            set_condition(st, condition("Progressing", "False", "Source does not exist", now))
        if is_deleting(snap):
            st["phase"] = "Deleting"
            set_condition(st, condition("Progressing", "False", "VM snapshot is deleting", now))
    if st.get("readyToUse") is True:
        set_condition(st, condition("Ready", "True", "Ready", now))
    else:
        set_condition(st, condition("Ready", "False", "Not ready", now))
    if st.get("error"):
        set_condition(st, condition("Progressing", "False", "In error state", now))
    return st


def _set_indications(st: Obj, marks: Sequence[str]) -> None:
    if marks:
        st["indications"] = list(marks)
        st["sourceIndications"] = [
            {"indication": i, "message": INDICATION_MESSAGES.get(i, "Unknown indication")}
            for i in marks]
    else:
        st.pop("indications", None)
        st.pop("sourceIndications", None)


def _unlock(vm: Obj, snapshot_name: str) -> list[Action]:
    ns, name = key_of(vm)
    out: list[Action] = []
    if SOURCE_FINALIZER in finalizers(vm):
        out.append(Patch("vm", ns, name, _fin_patch(
            vm, [f for f in finalizers(vm) if f != SOURCE_FINALIZER])))
    if status_of(vm).get("snapshotInProgress") == snapshot_name:
        out.append(Patch("vm", ns, name, {"status": {"snapshotInProgress": None}}, "status"))
    return out


def reconcile_snapshot(inp: SnapshotInputs) -> Plan:
    """Everything the snapshot controller does for one VirtualMachineSnapshot
    (``updateVMSnapshot``)."""
    snap, content, now = inp.snapshot, inp.content, inp.now
    ns, name = key_of(snap)
    plan = Plan()
    source = as_dict(as_dict(snap.get("spec")).get("source"))
    if source.get("kind") != "VirtualMachine":
        return plan  # admission rejects other sources
    vm = inp.vm
    if vm is not None and meta(vm).get("uid") and status_of(snap).get("sourceUID") not in (
            None, meta(vm).get("uid")):
        vm = None  # a VM of the same name, not the one snapshotted
        inp = SnapshotInputs(snap, None, None, content, inp.pvcs, inp.pvs, now)
    deleting = is_deleting(snap)
    terminating = deleting or deadline_exceeded(snap, status_of(snap), now)
    if not terminating and SNAPSHOT_FINALIZER not in finalizers(snap):
        plan.actions.append(Patch("snapshot", ns, name,
                                  _fin_patch(snap, [*finalizers(snap), SNAPSHOT_FINALIZER])))
        return plan  # the next pass sees the finalizer
    locked = source_locked(vm, name)
    lock_msg = "Source locked and operation in progress" if locked else "Source not locked"
    progressing = _phase(snap) not in ("Succeeded", "Failed")
    can_remove_finalizer = True
    if vm is not None and snap.get("status"):
        if progressing and not terminating:
            if not locked:
                problem = lock_problem(inp)
                if problem:
                    lock_msg += problem
                else:
                    vns, vname = key_of(vm)
                    if SOURCE_FINALIZER not in finalizers(vm):  # first: pinned to vm's version
                        plan.actions.append(Patch("vm", vns, vname, _fin_patch(
                            vm, [*finalizers(vm), SOURCE_FINALIZER])))
                    if status_of(vm).get("snapshotInProgress") != name:
                        plan.actions.append(Patch("vm", vns, vname, {
                            "status": {"snapshotInProgress": name}}, "status"))
                plan.requeue(RETRY_SECONDS)
            elif content is None:
                created = build_content(inp)
                plan.actions.append(Create("content", ns, created))
                plan.actions.append(Event(
                    "snapshot", snap, "Normal", EVENT_CONTENT_CREATE,
                    f"Successfully created VirtualMachineSnapshotContent "
                    f"{created['metadata']['name']}"))
            can_remove_finalizer = False
        else:
            content_gone = content is None or not should_delete_content(snap, content)
            if not progressing or (terminating and content_gone):
                unlock = _unlock(vm, name)
                plan.actions.extend(unlock)
                can_remove_finalizer = not unlock and not source_locked(vm, name)
            else:
                can_remove_finalizer = not source_locked(vm, name)
    if terminating and content is not None and should_delete_content(snap, content) \
            and not is_deleting(content):
        plan.actions.append(Delete("content", ns, str(meta(content).get("name"))))
    status = snapshot_status(inp, locked=locked, lock_msg=lock_msg)
    if status != status_of(snap):
        plan.actions.append(Update("snapshot", ns, {**snap, "status": status}, "status"))
    if deleting and can_remove_finalizer and SNAPSHOT_FINALIZER in finalizers(snap):
        plan.actions.append(Patch("snapshot", ns, name, {"metadata": {"finalizers": [
            f for f in finalizers(snap) if f != SNAPSHOT_FINALIZER] or None}}))
    if status.get("phase") == "InProgress" and not deleting:
        left = time_until_deadline(snap, now)
        if left is not None:
            plan.requeue(left + 0.5)
    return plan


def reconcile_content(content: Obj, snapshot: Obj | None, now: datetime.datetime) -> Plan:
    """The controller's part of a content (``updateVMSnapshotContent``): release it when its
    snapshot is gone or ends, and mark a content without volumes ready at once (the node agent
    copies the volumes of the others and writes their status)."""
    ns, name = key_of(content)
    plan = Plan()
    gone = snapshot is None or is_deleting(snapshot) or deadline_exceeded(
        snapshot, status_of(snapshot), now)
    if gone and CONTENT_FINALIZER in finalizers(content):
        plan.actions.append(Patch("content", ns, name, _fin_patch(
            content, [f for f in finalizers(content) if f != CONTENT_FINALIZER])))
        return plan
    if is_deleting(content):
        return plan
    backups = as_list(as_dict(content.get("spec")).get("volumeBackups"))
    if not backups and not status_of(content).get("creationTime"):
        plan.actions.append(Update("content", ns, {**content, "status": {
            "creationTime": rfc3339(now), "readyToUse": True}}, "status"))
    return plan


def volume_snapshot_statuses(vm: Mapping[str, Any]) -> list[Obj]:
    """The VM's ``status.volumeSnapshotStatuses``: every claim of the hostpath provisioner can
    be snapshotted; other volume sources cannot."""
    spec = as_dict(as_dict(as_dict(vm.get("spec")).get("template")).get("spec"))
    out: list[Obj] = []
    for vol in as_list(spec.get("volumes")):
        vol = as_dict(vol)
        name = str(vol.get("name") or "")
        if not name:
            continue
        if "persistentVolumeClaim" in vol or "dataVolume" in vol:
            out.append({"name": name, "enabled": True})
        else:
            out.append({"name": name, "enabled": False, "reason": "Snapshot is not supported "
                        f"for this volumeSource type [{name}]"})
    return out


def reconcile_vm_volumes(vm: Obj) -> Plan:
    """Keep the VM's ``status.volumeSnapshotStatuses`` up to date."""
    plan = Plan()
    if is_deleting(vm):
        return plan
    want = volume_snapshot_statuses(vm)
    if want != as_list(status_of(vm).get("volumeSnapshotStatuses")):
        ns, name = key_of(vm)
        plan.actions.append(Patch("vm", ns, name, {"status": {
            "volumeSnapshotStatuses": want or None}}, "status"))
    return plan


# ---- restores --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreInputs:
    restore: Obj
    snapshot: Obj | None
    content: Obj | None
    vm: Obj | None
    vmi: Obj | None
    pvcs: Mapping[Key, Obj]
    datavolumes: Mapping[Key, Obj]
    classes: Sequence[Obj]
    now: datetime.datetime


class RestoreError(Exception):
    """A restore step that cannot go on (the message goes into its conditions)."""


def restore_complete(restore: Mapping[str, Any]) -> bool:
    return status_of(restore).get("complete") is True


def restore_failed(restore: Mapping[str, Any]) -> bool:
    return any(isinstance(c, dict) and c.get("type") == "Failure"
               for c in as_list(status_of(restore).get("conditions")))


def last_restore_value(restore: Mapping[str, Any]) -> str:
    return f"{meta(restore).get('name')}-{meta(restore).get('uid')}"


def target_restored(restore: Mapping[str, Any], vm: Mapping[str, Any] | None) -> bool:
    return vm is not None and as_dict(meta(vm).get("annotations")).get(
        ANN_LAST_RESTORE) == last_restore_value(restore)


def _vm_ref(vm: Mapping[str, Any]) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "name": meta(vm).get("name"), "uid": meta(vm).get("uid"),
            "controller": True, "blockOwnerDeletion": True}


def _ready_snapshot(inp: RestoreInputs) -> tuple[Obj, Obj]:
    """``getVMSnapshot`` and ``getSnapshotContent``: both must exist and be ready."""
    ns = key_of(inp.restore)[0]
    snap_name = as_dict(inp.restore.get("spec")).get("virtualMachineSnapshotName")
    key = f"{ns}/{snap_name}"
    snap = inp.snapshot
    if snap is None:
        raise RestoreError(f"VMSnapshot {key} does not exist")
    if _phase(snap) == "Failed":
        raise RestoreError(f"VMSnapshot {key} failed and is invalid to use")
    if status_of(snap).get("readyToUse") is not True:
        raise RestoreError(f"VMSnapshot {key} not ready")
    cname = status_of(snap).get("virtualMachineSnapshotContentName")
    if not cname:
        raise RestoreError(f"no snapshot content name in {key}")
    content = inp.content
    if content is None:
        raise RestoreError(f"VMSnapshotContent {ns}/{cname} does not exist")
    if not content_ready(content):
        raise RestoreError(f"VMSnapshotContent {ns}/{cname} not ready")
    return snap, content


def restored_pvc(inp: RestoreInputs, backup: Mapping[str, Any], pvc_name: str,
                 content: Mapping[str, Any]) -> Obj:
    """``CreateRestorePVCDefFromVMRestore``, filled by the populator from the volume's copy."""
    restore = inp.restore
    ns = key_of(restore)[0]
    source = as_dict(backup.get("persistentVolumeClaim"))
    smeta, sspec = as_dict(source.get("metadata")), as_dict(source.get("spec"))
    volume = str(backup.get("volumeName"))
    node, path = snapshot_file(content, volume)
    if not path:
        raise RestoreError(f"VolumeSnapshot {backup.get('volumeSnapshotName')} has no copy "
                           "on any node")
    source_vm = as_dict(as_dict(as_dict(content.get("spec")).get("source")).get(
        "virtualMachine"))
    labels = {str(k): str(v) for k, v in as_dict(smeta.get("labels")).items()}
    labels[LABEL_RESTORE_SOURCE_NAME] = str(meta(source_vm).get("name") or "")
    labels[LABEL_RESTORE_SOURCE_NAMESPACE] = str(meta(source_vm).get("namespace") or ns)
    annotations = {str(k): str(v) for k, v in as_dict(smeta.get("annotations")).items()
                   if not str(k).startswith(_DROPPED_ANNOTATIONS)}
    annotations[ANN_RESTORE_NAME] = str(meta(restore).get("name"))
    annotations[ANN_LAST_RESTORE] = last_restore_value(restore)
    annotations[cdi.ANN_POPULATE] = cdi.PopulateSource(type="snapshot", path=path,
                                                       node=node).to_json()
    annotations[ANN_SELECTED_NODE] = node
    for override in as_list(as_dict(restore.get("spec")).get("volumeRestoreOverrides")):
        override = as_dict(override)
        if override.get("volumeName") == volume:
            labels.update({str(k): str(v) for k, v in as_dict(override.get("labels")).items()})
            annotations.update({str(k): str(v) for k, v in as_dict(
                override.get("annotations")).items()})
    spec: Obj = {k: copy.deepcopy(sspec[k]) for k in ("accessModes", "resources",
                                                      "storageClassName", "volumeMode")
                 if sspec.get(k) is not None}
    pmeta: Obj = {"name": pvc_name, "namespace": ns, "labels": labels,
                  "annotations": annotations}
    if inp.vm is not None:
        pmeta["ownerReferences"] = [_vm_ref(inp.vm)]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": pmeta,
            "spec": spec}


def restored_vm(inp: RestoreInputs, content: Mapping[str, Any],
                restores: Sequence[Mapping[str, Any]]) -> Obj:
    """``generateRestoredVMSpec``: the snapshotted spec with its claims replaced by the
    restored ones. A ``dataVolume`` volume becomes a ``persistentVolumeClaim`` volume of the
    restored claim and its ``dataVolumeTemplates`` entry is dropped (the claim is filled from
    the snapshot, not by CDI again)."""
    restore, target = inp.restore, inp.vm
    snap_vm = as_dict(as_dict(as_dict(content.get("spec")).get("source")).get("virtualMachine"))
    spec: Obj = copy.deepcopy(as_dict(snap_vm.get("spec")))
    claims = {str(as_dict(r).get("volumeName")): str(as_dict(r).get("persistentVolumeClaim"))
              for r in restores}
    tspec = as_dict(as_dict(spec.get("template")).get("spec"))
    dropped: set[str] = set()
    volumes = []
    for vol in as_list(tspec.get("volumes")):
        vol = copy.deepcopy(as_dict(vol))
        vname = str(vol.get("name"))
        if vname in claims and "persistentVolumeClaim" in vol:
            vol["persistentVolumeClaim"]["claimName"] = claims[vname]
        elif vname in claims and "dataVolume" in vol:
            dropped.add(str(as_dict(vol["dataVolume"]).get("name")))
            vol = {"name": vname, "persistentVolumeClaim": {"claimName": claims[vname]}}
        volumes.append(vol)
    if "template" in spec:
        spec["template"].setdefault("spec", {})["volumes"] = volumes
    templates = [t for t in as_list(spec.get("dataVolumeTemplates"))
                 if str(meta(as_dict(t)).get("name")) not in dropped]
    if templates:
        spec["dataVolumeTemplates"] = templates
    else:
        spec.pop("dataVolumeTemplates", None)
    tname = str(as_dict(as_dict(restore.get("spec")).get("target")).get("name"))
    ns = key_of(restore)[0]
    if target is None:
        vm: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                   "metadata": {"name": tname, "namespace": ns}, "spec": spec}
        for k in ("labels", "annotations"):
            if as_dict(meta(snap_vm).get(k)):
                vm["metadata"][k] = copy.deepcopy(meta(snap_vm)[k])
        if spec.get("running") is not None:
            spec["running"] = False
        else:
            spec["runStrategy"] = "Halted"
    else:
        vm = copy.deepcopy(dict(target))
        vm["spec"] = spec
        if as_dict(target.get("spec")).get("running") is not None:
            spec["running"] = False
            spec.pop("runStrategy", None)
        else:
            spec["runStrategy"] = run_strategy(target)[0]
            spec.pop("running", None)
    vm["metadata"].setdefault("annotations", {})[ANN_LAST_RESTORE] = last_restore_value(restore)
    if meta(snap_vm).get("name") == tname:
        domain = as_dict(as_dict(spec.get("template")).get("spec")).get("domain")
        if isinstance(domain, dict):
            fw = domain.setdefault("firmware", {})
            fw.setdefault("uuid", firmware_uuid(tname))
    return vm


def _patch_new_vm(vm: Obj, patches: Sequence[Any]) -> Obj:
    if not patches:
        return vm
    try:
        ops = [json.loads(p) if isinstance(p, str) else p for p in patches]
        return json_patch(vm, ops)
    except (ValueError, TypeError, ApiError) as e:  # a malformed patch is the user's error
        raise RestoreError(f"error patching VM {meta(vm).get('name')}: {e}") from e


def _restore_update(inp: RestoreInputs, plan: Plan, status: Obj) -> None:
    if status != status_of(inp.restore):
        ns = key_of(inp.restore)[0]
        plan.actions.append(Update("restore", ns, {**inp.restore, "status": status}, "status"))


def _restore_error(inp: RestoreInputs, plan: Plan, status: Obj, message: str) -> Plan:
    """``doUpdateError``: a Warning event and the message as the conditions' reason."""
    now = inp.now
    set_condition(status, condition("Progressing", "False", message, now))
    set_condition(status, condition("Ready", "False", message, now))
    if status != status_of(inp.restore):
        plan.actions.append(Event("restore", inp.restore, "Warning", EVENT_RESTORE_ERROR,
                                  f"VirtualMachineRestore encountered error {message}"))
    _restore_update(inp, plan, status)
    plan.requeue(RETRY_SECONDS)
    return plan


def reconcile_restore(inp: RestoreInputs) -> Plan:
    """Everything the restore controller does for one VirtualMachineRestore
    (``updateVMRestore``)."""
    restore, now = inp.restore, inp.now
    ns, name = key_of(restore)
    plan = Plan()
    if not restore.get("status"):
        status: Obj = {"complete": False}
        set_condition(status, condition("Progressing", "True",
                                        "Initializing VirtualMachineRestore", now))
        set_condition(status, condition("Ready", "False", "Initializing VirtualMachineRestore",
                                        now))
        _restore_update(inp, plan, status)
        return plan
    status = copy.deepcopy(status_of(restore))
    target_ref = as_dict(as_dict(restore.get("spec")).get("target"))
    if target_ref.get("kind") != "VirtualMachine":
        return _restore_error(inp, plan, status, f"unknown source {json.dumps(target_ref)}")
    vm = inp.vm
    if is_deleting(restore):
        if RESTORE_FINALIZER not in finalizers(restore):
            return plan
        if vm is not None and status_of(vm).get("restoreInProgress") == name:
            plan.actions.append(Patch("vm", ns, str(meta(vm).get("name")),
                                      {"status": {"restoreInProgress": None}}, "status"))
        set_condition(status, condition("Progressing", "False", "VM restore is deleting", now))
        set_condition(status, condition("Ready", "False", "VM restore is deleting", now))
        if status != status_of(restore):
            _restore_update(inp, plan, status)
            return plan
        plan.actions.append(Patch("restore", ns, name, _fin_patch(
            restore, [f for f in finalizers(restore) if f != RESTORE_FINALIZER])))
        return plan
    if restore_complete(restore) or restore_failed(restore):
        return plan
    metadata: Obj = {}
    if not as_list(meta(restore).get("ownerReferences")) and vm is not None:
        metadata["ownerReferences"] = [_vm_ref(vm)]
    if RESTORE_FINALIZER not in finalizers(restore):
        metadata["finalizers"] = [*finalizers(restore), RESTORE_FINALIZER]
    if metadata:
        metadata["resourceVersion"] = meta(restore).get("resourceVersion")
        plan.actions.append(Patch("restore", ns, name, {"metadata": metadata}))
        return plan

    if vm is not None and inp.vmi is not None:  # the target is not ready: it runs
        return _target_not_ready(inp, plan, status)

    try:
        snap, content = _ready_snapshot(inp)
        if (vm is not None and not target_restored(restore, vm)
                and status_of(snap).get("sourceUID") not in (None, meta(vm).get("uid"))):
            raise RestoreError(ERR_RESTORE_TO_EXISTING)
        if vm is not None and not target_restored(restore, vm):
            busy = status_of(vm).get("restoreInProgress")
            if busy and busy != name:
                raise RestoreError(f"vm restore {busy} in progress")
            if not busy:
                plan.actions.append(Patch("vm", ns, str(meta(vm).get("name")),
                                          {"status": {"restoreInProgress": name}}, "status"))
        if _volume_restores(inp, plan, status, content):
            set_condition(status, condition("Progressing", "True", "Creating new PVCs", now))
            set_condition(status, condition("Ready", "False", "Waiting for new PVCs", now))
            _restore_update(inp, plan, status)
            plan.requeue(RETRY_SECONDS)
            return plan
        if not target_restored(restore, vm) and _reconcile_target(inp, plan, status, content):
            set_condition(status, condition("Progressing", "True", "Updating target spec", now))
            set_condition(status, condition("Ready", "False", "Waiting for target update", now))
            _restore_update(inp, plan, status)
            return plan
    except RestoreError as e:
        return _restore_error(inp, plan, status, str(e))
    for dv in as_list(status.get("deletedDataVolumes")):
        if (ns, str(dv)) in inp.datavolumes:
            plan.actions.append(Delete("dv", ns, str(dv)))
    if vm is not None and status_of(vm).get("restoreInProgress") == name:
        plan.actions.append(Patch("vm", ns, str(meta(vm).get("name")),
                                  {"status": {"restoreInProgress": None}}, "status"))
    plan.actions.append(Event("restore", restore, "Normal", EVENT_RESTORE_COMPLETE,
                              f"Successfully completed VirtualMachineRestore {name}"))
    status["complete"] = True
    status["restoreTime"] = rfc3339(now)
    set_condition(status, condition("Progressing", "False", "Operation complete", now))
    set_condition(status, condition("Ready", "True", "Operation complete", now))
    _restore_update(inp, plan, status)
    return plan


def _target_not_ready(inp: RestoreInputs, plan: Plan, status: Obj) -> Plan:
    """``handleVMRestoreTargetNotReady``."""
    restore, vm, now = inp.restore, inp.vm, inp.now
    assert vm is not None
    policy = as_dict(restore.get("spec")).get("targetReadinessPolicy") or "WaitGracePeriod"
    reason = "Waiting for target to be ready"
    set_condition(status, condition("Progressing", "False", reason, now))
    set_condition(status, condition("Ready", "False", reason, now))
    if policy == "StopTarget":
        vns, vname = key_of(vm)
        spec = as_dict(vm.get("spec"))
        if spec.get("running") is not None:
            if spec.get("running") is not False:
                plan.actions.append(Patch("vm", vns, vname, {"spec": {"running": False}}))
        elif spec.get("runStrategy") != "Halted":
            plan.actions.append(Patch("vm", vns, vname, {"spec": {"runStrategy": "Halted"}}))
    elif policy == "WaitGracePeriod":
        created = parse_time(meta(restore).get("creationTimestamp")) or now
        left = (created - now).total_seconds() + RESTORE_GRACE_PERIOD
        if left < 0:
            set_condition(status, condition("Progressing", "False", "Operation failed", now))
            set_condition(status, condition("Failure", "True", ERR_GRACE_EXCEEDED, now))
            set_condition(status, condition("Ready", "False", "Operation failed", now))
        else:
            plan.requeue(left + 0.5)
    elif policy == "FailImmediate":
        set_condition(status, condition("Progressing", "False", "Operation failed", now))
        set_condition(status, condition("Failure", "True", ERR_TARGET_NOT_READY, now))
        set_condition(status, condition("Ready", "False", "Operation failed", now))
    if status != status_of(restore):
        plan.actions.append(Event("restore", restore, "Normal", EVENT_RESTORE_NOT_READY,
                                  "Restore target VMI still exists"))
    _restore_update(inp, plan, status)
    plan.requeue(RETRY_SECONDS)
    return plan


def _volume_restores(inp: RestoreInputs, plan: Plan, status: Obj,
                     content: Mapping[str, Any]) -> bool:
    """``reconcileVolumeRestores``: True while claims are being created (or must bind)."""
    restore = inp.restore
    ns = key_of(restore)[0]
    held = {str(as_dict(r).get("volumeName")): as_dict(r)
            for r in as_list(status.get("restores"))}
    restores: list[Obj] = []
    backups = {}
    for b in as_list(as_dict(content.get("spec")).get("volumeBackups")):
        b = as_dict(b)
        vol = str(b.get("volumeName"))
        backups[vol] = b
        if vol in held:
            restores.append(held[vol])
            continue
        if not b.get("volumeSnapshotName"):
            raise RestoreError(f"VolumeSnapshotName missing {json.dumps(b)}")
        restores.append({"volumeName": vol,
                         "persistentVolumeClaim": restore_pvc_name(restore, vol),
                         "volumeSnapshotName": b["volumeSnapshotName"]})
    if restores != as_list(status.get("restores")):
        status["restores"] = restores
        return True
    busy = False
    for r in restores:
        pvc_name = str(r["persistentVolumeClaim"])
        pvc = inp.pvcs.get((ns, pvc_name))
        if pvc is None:
            plan.actions.append(Create("pvc", ns, restored_pvc(
                inp, backups[str(r["volumeName"])], pvc_name, content)))
            busy = True
            continue
        phase = status_of(pvc).get("phase") or "Pending"
        if phase == "Pending":
            sc_name = as_dict(pvc.get("spec")).get("storageClassName")
            sc = next((c for c in inp.classes if meta(c).get("name") == sc_name), None)
            if sc is not None and sc.get("volumeBindingMode") in (None, "Immediate"):
                busy = True
        elif phase != "Bound":
            raise RestoreError(f'PVC {ns}/{pvc_name} in status "{phase}"')
    return busy


def _reconcile_target(inp: RestoreInputs, plan: Plan, status: Obj,
                      content: Mapping[str, Any]) -> bool:
    """``vmRestoreTarget.Reconcile``: create or update the target VM; True when written."""
    restores = [as_dict(r) for r in as_list(status.get("restores"))]
    vm = restored_vm(inp, content, restores)
    ns = key_of(inp.restore)[0]
    if inp.vm is not None:
        old = {str(meta(as_dict(t)).get("name")) for t in as_list(
            as_dict(inp.vm.get("spec")).get("dataVolumeTemplates"))}
        new = {str(meta(as_dict(t)).get("name")) for t in as_list(
            as_dict(vm.get("spec")).get("dataVolumeTemplates"))}
        deleted = sorted(old - new)
        if deleted != as_list(status.get("deletedDataVolumes")) and (
                deleted or status.get("deletedDataVolumes")):
            status["deletedDataVolumes"] = deleted or None
            if not deleted:
                status.pop("deletedDataVolumes")
            return True
        plan.actions.append(Update("vm", ns, vm))
    else:
        vm = _patch_new_vm(vm, as_list(as_dict(inp.restore.get("spec")).get("patches")))
        plan.actions.append(Create("vm", ns, vm))
    return True
