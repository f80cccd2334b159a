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
* Restores are decided in :mod:`virtshift.controller.restore` (:func:`reconcile_restore`), with
  the actions, names and helpers defined here.
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
DROPPED_ANNOTATIONS = ("pv.kubernetes.io", "volume.beta.kubernetes.io", "cdi.kubevirt.io",
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


def fin_patch(obj: Mapping[str, Any], fins: list[str]) -> Obj:
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


def snapshot_phase(snapshot: Mapping[str, Any]) -> str:
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
        out.append(Patch("vm", ns, name, fin_patch(
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
                                  fin_patch(snap, [*finalizers(snap), SNAPSHOT_FINALIZER])))
        return plan  # the next pass sees the finalizer
    locked = source_locked(vm, name)
    lock_msg = "Source locked and operation in progress" if locked else "Source not locked"
    progressing = snapshot_phase(snap) not in ("Succeeded", "Failed")
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
                        plan.actions.append(Patch("vm", vns, vname, fin_patch(
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
        plan.actions.append(Patch("content", ns, name, fin_patch(
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
