"""Persistent volumes: the hostpath provisioner (HPP) and the PV controller's binding, as pure
decisions.

Upstream splits this between kube-controller-manager's PersistentVolume controller (binding,
phases, reclaim), the scheduler's VolumeBinding plugin (``volume.kubernetes.io/selected-node``
for ``WaitForFirstConsumer`` claims) and the hostpath provisioner (a directory per volume on the
chosen node). virtshift plays all three:

* The StorageClass ``hostpath-provisioner`` (provisioner ``kubevirt.io.hostpath-provisioner``,
  ``WaitForFirstConsumer``, reclaim ``Delete``) is created when missing and is the default class.
* A claim of that class (or of no class while it is the default; the class name is then written
  into the claim, as the retroactive default StorageClass assignment does) is provisioned on a
  node: at once for ``Immediate`` (the node with the fewest bytes provisioned), once
  ``volume.kubernetes.io/selected-node`` names one for ``WaitForFirstConsumer``.
* Provisioning creates the PersistentVolume ``pvc-<claim uid>``: capacity = the request, the
  claim's access modes and volume mode, the class's reclaim policy, ``claimRef``, a ``hostPath``
  under the node's storage root (the node agent publishes it in the ``virtshift.io/storage-root``
  annotation) and a required node affinity on ``kubernetes.io/hostname``; then both are bound.
* A volume whose claim is gone is ``Released``; reclaim ``Delete`` deletes it (the node agent
  removes the directory), ``Retain`` keeps it.
* :func:`select_nodes` is the VolumeBinding part: a VMI waiting for unbound WFFC claims is placed
  by :func:`virtshift.controller.scheduler.place` and the node is written into its claims.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtshift.api import cdi
from virtshift.api.admission import quantity
from virtshift.api.cdi import HOSTNAME_LABEL
from virtshift.api.cdi import pv_node as pv_node  # re-exported
from virtshift.api.kinds import Obj
from virtshift.controller.scheduler import node_ready_status, place

Key = tuple[str, str]

PROVISIONER = "kubevirt.io.hostpath-provisioner"
CLASS_NAME = "hostpath-provisioner"
ANN_DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
ANN_BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
ANN_STORAGE_ROOT = "virtshift.io/storage-root"
ANN_STORAGE_AVAILABLE = "virtshift.io/storage-available"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(obj.get("metadata"))


def _name(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("name") or "")


def _phase(obj: Mapping[str, Any]) -> str:
    return str(_dict(obj.get("status")).get("phase") or "")


def _bytes(value: Any) -> int:
    try:
        return quantity.parse_value(value).value()
    except (ValueError, TypeError):
        return 0


def default_storage_class() -> Obj:
    """The class the controller creates when it is missing."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": CLASS_NAME, "annotations": {ANN_DEFAULT_CLASS: "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": True,
    }


def default_class(classes: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The default StorageClass (the newest of several, as Kubernetes picks)."""
    marked = [c for c in classes
              if _dict(_meta(c).get("annotations")).get(ANN_DEFAULT_CLASS) == "true"]
    if not marked:
        return None
    return max(marked, key=lambda c: (str(_meta(c).get("creationTimestamp") or ""), _name(c)))


def claim_class(pvc: Mapping[str, Any], classes: Sequence[Mapping[str, Any]]
                ) -> Mapping[str, Any] | None:
    """The class a claim asks for; no ``storageClassName`` means the default class, ``""`` none."""
    spec = _dict(pvc.get("spec"))
    if "storageClassName" not in spec or spec.get("storageClassName") is None:
        return default_class(classes)
    wanted = str(spec["storageClassName"])
    return next((c for c in classes if _name(c) == wanted), None) if wanted else None


def storage_root(node: Mapping[str, Any]) -> str:
    return str(_dict(_meta(node).get("annotations")).get(ANN_STORAGE_ROOT) or "")


def pv_name(pvc: Mapping[str, Any]) -> str:
    return f"pvc-{_meta(pvc).get('uid')}"


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateStorageClass:
    storage_class: Obj


@dataclass(frozen=True)
class PatchPVC:
    """A metadata/spec merge patch of a claim (class, annotations, volumeName)."""

    namespace: str
    name: str
    patch: Obj


@dataclass(frozen=True)
class SetPVCStatus:
    namespace: str
    name: str
    status: Obj


@dataclass(frozen=True)
class CreatePV:
    pv: Obj


@dataclass(frozen=True)
class SetPVPhase:
    name: str
    phase: str


@dataclass(frozen=True)
class DeletePV:
    name: str


@dataclass(frozen=True)
class ClaimWarning:
    """A Warning Event on the claim (``ProvisioningFailed``, ``VolumeResizeFailed``), recorded
    once per message."""

    namespace: str
    name: str
    reason: str
    message: str


@dataclass(frozen=True)
class ExpandPV:
    """Grow a volume's capacity to its claim's new request (the node agent grows the disk)."""

    name: str
    capacity: str


@dataclass(frozen=True)
class ReleaseClaim:
    """Remove ``kubernetes.io/pvc-protection`` from a claim being deleted that no VMI uses."""

    namespace: str
    name: str


StorageAction = (CreateStorageClass | PatchPVC | SetPVCStatus | CreatePV | SetPVPhase | DeletePV
                 | ClaimWarning | ExpandPV | ReleaseClaim)


# ---- decisions -------------------------------------------------------------------------------


def storage_class_actions(classes: Sequence[Mapping[str, Any]]) -> list[StorageAction]:
    if any(_name(c) == CLASS_NAME for c in classes):
        return []
    sc = default_storage_class()
    if default_class(classes) is not None:  # someone chose another default: keep theirs
        sc["metadata"]["annotations"] = {}
    return [CreateStorageClass(sc)]


def provisioned_bytes(pvs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pv in pvs:
        node = pv_node(pv)
        if node:
            out[node] = out.get(node, 0) + _bytes(
                _dict(_dict(pv.get("spec")).get("capacity")).get("storage"))
    return out


def storage_available(node: Mapping[str, Any]) -> int | None:
    """Bytes the node's storage root can still take (its agent's report), None if unknown."""
    value = _dict(_meta(node).get("annotations")).get(ANN_STORAGE_AVAILABLE)
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


def insufficient_message(size: int, nodes: Sequence[Mapping[str, Any]]) -> str:
    free = ", ".join(f"{_name(n)} has {storage_available(n)}" for n in nodes
                     if storage_available(n) is not None)
    return (f"insufficient storage: the claim requests {size} bytes, more than any node can "
            f"hold ({free or 'no node reports its free space'} bytes available)")


def pick_node(nodes: Sequence[Mapping[str, Any]], pvs: Iterable[Mapping[str, Any]],
              size: int = 0) -> str:
    """For ``Immediate`` claims: the ready node with a storage root that can hold ``size``
    bytes and has the fewest bytes provisioned (ties to the first name); "" when none."""
    used = provisioned_bytes(pvs)
    names = [_name(n) for n in nodes if storage_root(n) and node_ready_status(n) == "True"
             and _dict(n.get("spec")).get("unschedulable") is not True
             and (storage_available(n) is None or size <= (storage_available(n) or 0))]
    if not names:
        return ""
    return min(names, key=lambda n: (used.get(n, 0), n))


def build_pv(pvc: Mapping[str, Any], sc: Mapping[str, Any], node: str, root: str) -> Obj:
    spec = _dict(pvc.get("spec"))
    request = _dict(_dict(spec.get("resources")).get("requests")).get("storage")
    name = pv_name(pvc)
    meta = _meta(pvc)
    pv: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {ANN_PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": str(request)},
            "accessModes": list(_list(spec.get("accessModes"))) or ["ReadWriteOnce"],
            "volumeMode": str(spec.get("volumeMode") or "Filesystem"),
            "persistentVolumeReclaimPolicy": str(sc.get("reclaimPolicy") or "Delete"),
            "storageClassName": _name(sc),
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": str(meta.get("namespace") or "default"),
                         "name": _name(pvc), "uid": str(meta.get("uid")),
                         "resourceVersion": str(meta.get("resourceVersion") or "")},
            "hostPath": {"path": f"{(cdi.shared_path(sc) or root).rstrip('/')}/{name}"},
        },
    }
    if cdi.shared_path(sc):  # every node reaches it; ``node`` populates it
        pv["metadata"]["annotations"][cdi.ANN_POPULATE_NODE] = node
    else:
        pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}}
    return pv


def _bound_status(pv: Mapping[str, Any]) -> Obj:
    spec = _dict(pv.get("spec"))
    return {"phase": "Bound", "accessModes": list(_list(spec.get("accessModes"))),
            "capacity": dict(_dict(spec.get("capacity")))}


def reconcile_claim(pvc: Mapping[str, Any], classes: Sequence[Mapping[str, Any]],
                    pvs: Mapping[str, Obj], nodes: Sequence[Mapping[str, Any]]
                    ) -> list[StorageAction]:
    """What the PV controller and the provisioner do for one claim."""
    meta = _meta(pvc)
    if meta.get("deletionTimestamp"):
        return []
    ns, name = str(meta.get("namespace") or "default"), _name(pvc)
    spec = _dict(pvc.get("spec"))
    annotations = _dict(meta.get("annotations"))
    volume = str(spec.get("volumeName") or "")
    if volume:
        pv = pvs.get(volume)
        if pv is None:
            if _phase(pvc) == "Bound":
                return [SetPVCStatus(ns, name, {"phase": "Lost"})]
            return []
        ref = _dict(_dict(pv.get("spec")).get("claimRef"))
        if ref.get("uid") not in (None, meta.get("uid")):
            return []  # the volume belongs to another claim
        out: list[StorageAction] = []
        if _phase(pv) != "Bound":
            out.append(SetPVPhase(volume, "Bound"))
        if _phase(pvc) != "Bound":
            out.append(SetPVCStatus(ns, name, _bound_status(pv)))
        out.extend(expansion(pvc, pv, classes))
        return out

    sc = claim_class(pvc, classes)
    if sc is None or sc.get("provisioner") != PROVISIONER:
        return []
    out = []
    if spec.get("storageClassName") is None:
        out.append(PatchPVC(ns, name, {"spec": {"storageClassName": _name(sc)}}))
    existing = pvs.get(pv_name(pvc))
    if existing is not None:  # provisioned before: bind it
        return [*out, PatchPVC(ns, name, {
            "metadata": {"annotations": {ANN_BIND_COMPLETED: "yes",
                                         ANN_BOUND_BY_CONTROLLER: "yes"}},
            "spec": {"volumeName": pv_name(pvc)}})]
    request = _dict(_dict(spec.get("resources")).get("requests")).get("storage")
    size = _bytes(request)
    if not size:
        return out
    if "ReadWriteMany" in _list(spec.get("accessModes")) and not cdi.shared_path(sc):
        return [*out, ClaimWarning(ns, name, "ProvisioningFailed", (
            f'StorageClass "{_name(sc)}" keeps each volume on one node: ReadWriteMany needs a '
            f"class with parameters.{cdi.PARAM_SHARED_PATH}, a directory every node mounts"))]
    source = cdi.populate_source(pvc)
    if source is not None and source.node:
        node = source.node  # a clone or a restore lands where its data is
    elif (sc.get("volumeBindingMode") == "WaitForFirstConsumer"
          and annotations.get(cdi.ANN_BIND_IMMEDIATE) != "true"):
        node = str(annotations.get(ANN_SELECTED_NODE) or "")
        if not node:
            return out
    else:
        node = pick_node(nodes, pvs.values(), size)
        if not node:
            fits = [n for n in nodes if storage_root(n)]
            if fits:  # nodes exist, none can hold it
                out.append(ClaimWarning(ns, name, "ProvisioningFailed",
                                        insufficient_message(size, fits)))
            return out
    target = next((n for n in nodes if _name(n) == node), None)
    root = storage_root(target) if target is not None else ""
    if not root or target is None:
        return out  # the node has not published its storage root (yet)
    free = storage_available(target)
    if free is not None and size > free:
        out.append(ClaimWarning(ns, name, "ProvisioningFailed",
                                insufficient_message(size, [target])))
        return out
    if annotations.get(ANN_STORAGE_PROVISIONER) != PROVISIONER:
        out.append(PatchPVC(ns, name, {"metadata": {"annotations": {
            ANN_STORAGE_PROVISIONER: PROVISIONER, ANN_BETA_STORAGE_PROVISIONER: PROVISIONER}}}))
    out.append(CreatePV(build_pv(pvc, sc, node, root)))
    return out


def expansion(pvc: Mapping[str, Any], pv: Mapping[str, Any],
              classes: Sequence[Mapping[str, Any]]) -> list[StorageAction]:
    """A bound claim asking for more than its volume holds: the volume grows when its class
    allows expansion (``allowVolumeExpansion``), else a ``VolumeResizeFailed`` warning."""
    spec = _dict(pvc.get("spec"))
    request = _dict(_dict(spec.get("resources")).get("requests")).get("storage")
    capacity = _dict(_dict(pv.get("spec")).get("capacity")).get("storage")
    if _bytes(request) <= _bytes(capacity):
        return []
    ns, name = str(_meta(pvc).get("namespace") or "default"), _name(pvc)
    sc = claim_class(pvc, classes)
    if sc is None or sc.get("allowVolumeExpansion") is not True:
        return [ClaimWarning(ns, name, "VolumeResizeFailed", "only dynamically provisioned pvc "
                             "can be resized and the storageclass that provisions the pvc must "
                             "support resize")]
    return [ExpandPV(_name(pv), str(request))]


def reconcile_volume(pv: Mapping[str, Any], pvcs: Mapping[Key, Obj]) -> list[StorageAction]:
    """Phases and reclaim of one volume."""
    meta = _meta(pv)
    if meta.get("deletionTimestamp"):
        return []
    spec = _dict(pv.get("spec"))
    ref = _dict(spec.get("claimRef"))
    name = _name(pv)
    if not ref:
        return [SetPVPhase(name, "Available")] if _phase(pv) != "Available" else []
    claim = pvcs.get((str(ref.get("namespace") or "default"), str(ref.get("name") or "")))
    if claim is not None and (not ref.get("uid") or ref.get("uid") == _meta(claim).get("uid")):
        if _dict(claim.get("spec")).get("volumeName") == name and _phase(pv) != "Bound":
            return [SetPVPhase(name, "Bound")]
        return []
    # The claim is gone: Released, then reclaimed.
    out: list[StorageAction] = []
    if _phase(pv) not in ("Released", "Failed"):
        out.append(SetPVPhase(name, "Released"))
    policy = spec.get("persistentVolumeReclaimPolicy") or "Retain"
    if policy == "Delete" and _dict(meta.get("annotations")).get(
            ANN_PROVISIONED_BY) == PROVISIONER:
        out.append(DeletePV(name))
    return out


def protection(pvcs: Mapping[Key, Obj], vmis: Sequence[Mapping[str, Any]]) -> list[ReleaseClaim]:
    """Claims being deleted keep their protection while a VMI that has not ended uses them."""
    used: set[Key] = set()
    for vmi in vmis:
        if _phase(vmi) in ("Succeeded", "Failed"):
            continue
        ns = str(_meta(vmi).get("namespace") or "default")
        used.update((ns, c) for c in claims_of(vmi))
    return [ReleaseClaim(*key) for key, pvc in sorted(pvcs.items())
            if _meta(pvc).get("deletionTimestamp") and key not in used
            and cdi.PVC_PROTECTION in _list(_meta(pvc).get("finalizers"))]


def claims_of(vmi: Mapping[str, Any]) -> list[str]:
    """``PVCNameFromVirtVolume`` over a VMI's volumes."""
    out = []
    for volume in _list(_dict(vmi.get("spec")).get("volumes")):
        volume = _dict(volume)
        name = _dict(volume.get("persistentVolumeClaim")).get("claimName") or _dict(
            volume.get("dataVolume")).get("name")
        if name:
            out.append(str(name))
    return out


def volume_node(vmi: Mapping[str, Any], pvcs: Mapping[Key, Obj],
                pvs: Mapping[str, Obj]) -> tuple[str, str]:
    """(node, message): the node the VMI's bound local volumes pin it to, or "" with a
    message when they pin it to different nodes (VolumeBinding's conflict)."""
    ns = str(_meta(vmi).get("namespace") or "default")
    nodes: set[str] = set()
    for claim in claims_of(vmi):
        pvc = pvcs.get((ns, claim))
        volume = str(_dict(_dict(pvc or {}).get("spec")).get("volumeName") or "")
        pv = pvs.get(volume) if volume else None
        if pv is not None and pv_node(pv):
            nodes.add(pv_node(pv))
    if len(nodes) > 1:
        return "", f"volumes of the VMI are on different nodes: {', '.join(sorted(nodes))}"
    return (next(iter(nodes)) if nodes else ""), ""


def select_nodes(vmis: Sequence[Mapping[str, Any]], pvcs: Mapping[Key, Obj],
                 classes: Sequence[Mapping[str, Any]], pvs: Mapping[str, Obj],
                 nodes: Sequence[Mapping[str, Any]]) -> list[StorageAction]:
    """VolumeBinding for VMIs waiting in ``Pending`` on unbound WaitForFirstConsumer claims of
    this provisioner: place the VMI as the scheduler would (restricted to the node of its
    bound volumes) and write that node into the claims' ``selected-node`` annotation."""
    out: list[StorageAction] = []
    for vmi in vmis:
        if _phase(vmi) not in ("", "Pending") or _meta(vmi).get("deletionTimestamp"):
            continue
        ns = str(_meta(vmi).get("namespace") or "default")
        waiting = []
        complete = True
        for claim in claims_of(vmi):
            pvc = pvcs.get((ns, claim))
            if pvc is None:
                complete = False
                break
            if _dict(pvc.get("spec")).get("volumeName") or _phase(pvc) == "Bound":
                continue
            sc = claim_class(pvc, classes)
            if (sc is None or sc.get("provisioner") != PROVISIONER
                    or sc.get("volumeBindingMode") != "WaitForFirstConsumer"):
                continue
            if _dict(_meta(pvc).get("annotations")).get(ANN_SELECTED_NODE):
                continue
            waiting.append(claim)
        if not complete or not waiting:
            continue
        pinned, conflict = volume_node(vmi, pvcs, pvs)
        if conflict:
            continue
        placement = place(vmi, [n for n in nodes if storage_root(n)], vmis, volume_node=pinned)
        if placement.node is None:
            continue
        for claim in waiting:
            out.append(PatchPVC(ns, claim, {"metadata": {"annotations": {
                ANN_SELECTED_NODE: placement.node}}}))
    return out
