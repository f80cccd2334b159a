"""VirtualMachineRestore, as pure decisions (KubeVirt's restore controller): a restore of a
ready VirtualMachineSnapshot fills new claims ``restore-<restore uid>-<volume>`` from the
snapshot's copies (the :mod:`virtshift.api.cdi` populate contract, type ``snapshot``), then points
the target VM at them, or creates the target VM when it does not exist. Shared names and the
snapshot side are in :mod:`virtshift.controller.snapshot`.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtshift.api import cdi
from virtshift.api.kinds import Obj
from virtshift.api.patch import json_patch
from virtshift.controller.snapshot import (
    ANN_LAST_RESTORE,
    ANN_RESTORE_NAME,
    DROPPED_ANNOTATIONS,
    ERR_GRACE_EXCEEDED,
    ERR_RESTORE_TO_EXISTING,
    ERR_TARGET_NOT_READY,
    EVENT_RESTORE_COMPLETE,
    EVENT_RESTORE_ERROR,
    EVENT_RESTORE_NOT_READY,
    LABEL_RESTORE_SOURCE_NAME,
    LABEL_RESTORE_SOURCE_NAMESPACE,
    RESTORE_FINALIZER,
    RESTORE_GRACE_PERIOD,
    RETRY_SECONDS,
    Create,
    Delete,
    Event,
    Patch,
    Plan,
    Update,
    condition,
    content_ready,
    fin_patch,
    finalizers,
    restore_pvc_name,
    set_condition,
    snapshot_file,
    snapshot_phase,
)
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
    if snapshot_phase(snap) == "Failed":
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
                   if not str(k).startswith(DROPPED_ANNOTATIONS)}
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
        plan.actions.append(Patch("restore", ns, name, fin_patch(
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
