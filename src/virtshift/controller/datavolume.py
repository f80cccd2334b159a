"""The DataVolume controller (CDI's import, upload and clone controllers), as pure decisions.

A DataVolume gets a PersistentVolumeClaim of the same name, owned by it, that says what fills it
(the :mod:`virtshift.api.cdi` contract); the node agent holding the volume populates it and
reports through the claim's annotations, which this controller maps onto the DataVolume:

==========================  =====================================================
claim                        DataVolume phase
==========================  =====================================================
not created / source wait    ``Pending`` (clone: ``CloneScheduled``)
unbound, WFFC, no consumer   ``WaitForFirstConsumer`` (CDI honours WFFC)
unbound otherwise            ``Pending``
bound, pod not started       ``ImportScheduled`` / ``CloneScheduled`` / ``UploadScheduled``
pod Running                  ``ImportInProgress`` / ``CloneInProgress`` / ``UploadReady``
pod Succeeded                ``Succeeded`` (progress ``100.0%``)
pod Failed                   ``Failed``
==========================  =====================================================

``status.progress`` is the populator's percentage (``N/A`` while unknown), ``restartCount`` its
restarts; conditions ``Bound``, ``Running`` and ``Ready`` follow CDI. The claim spec comes from
``spec.pvc`` verbatim or from ``spec.storage`` with defaults filled (ReadWriteOnce, Filesystem,
and for a clone the source's size); sources ``http``, ``registry``, ``blank``, ``upload``,
``pvc`` and ``sourceRef`` (a DataSource naming a claim) are supported. A clone waits while its
source is not populated or is used by a running VMI (``CloneSourceInUse``), and lands on the
source's node. A claim of that name that the DataVolume does not own is an error
(``ErrClaimNotValid``), never taken over, unless it is annotated as populated for it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtshift.api import cdi
from virtshift.api.cdi import pv_node
from virtshift.api.kinds import Obj
from virtshift.controller.storage import claim_class
from virtshift.controller.vmi import as_dict, as_list, meta, phase

Key = tuple[str, str]

CONTROLLER_LABEL = {"app": "containerized-data-importer",
                    "app.kubernetes.io/component": "storage",
                    "app.kubernetes.io/managed-by": "cdi-controller"}


def _ns(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("namespace") or "default")


def _name(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("name") or "")


# ---- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateClaim:
    pvc: Obj


@dataclass(frozen=True)
class PatchClaim:
    namespace: str
    name: str
    patch: Obj


@dataclass(frozen=True)
class SetStatus:
    namespace: str
    name: str
    status: Obj


@dataclass(frozen=True)
class RecordEvent:
    namespace: str
    name: str
    type: str
    reason: str
    message: str


DVAction = CreateClaim | PatchClaim | SetStatus | RecordEvent


@dataclass(frozen=True)
class DVInputs:
    dv: Obj
    pvc: Obj | None
    classes: list[Obj]
    pvcs: Mapping[Key, Obj]
    pvs: Mapping[str, Obj]
    datasources: Mapping[Key, Obj]
    vmis: list[Obj]


# ---- the source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What a DataVolume asks for: the populate source, its kind for phases (import, upload,
    clone), and an error when it cannot be served."""

    populate: cdi.PopulateSource | None
    kind: str  # "import" | "upload" | "clone"
    error: str = ""


def clone_origin(dv: Mapping[str, Any], datasources: Mapping[Key, Obj]) -> tuple[str, str, str]:
    """(namespace, name, error) of the claim a DataVolume clones (``source.pvc``, or
    ``sourceRef`` to a DataSource whose ``source.pvc`` names one)."""
    spec = as_dict(dv.get("spec"))
    pvc = as_dict(as_dict(spec.get("source")).get("pvc"))
    if pvc:
        return str(pvc.get("namespace") or _ns(dv)), str(pvc.get("name") or ""), ""
    ref = as_dict(spec.get("sourceRef"))
    if ref:
        if ref.get("kind") != "DataSource":
            return "", "", f"sourceRef kind {ref.get('kind')!r} is not supported (DataSource)"
        key = (str(ref.get("namespace") or _ns(dv)), str(ref.get("name") or ""))
        ds = datasources.get(key)
        if ds is None:
            return "", "", f'DataSource "{key[0]}/{key[1]}" not found'
        inner = as_dict(as_dict(as_dict(ds.get("spec")).get("source")).get("pvc"))
        if not inner:
            return "", "", f'DataSource "{key[0]}/{key[1]}" does not name a PVC source'
        return str(inner.get("namespace") or key[0]), str(inner.get("name") or ""), ""
    return "", "", ""


def source_of(dv: Mapping[str, Any], datasources: Mapping[Key, Obj]) -> Source:
    spec = as_dict(dv.get("spec"))
    src = as_dict(spec.get("source"))
    content = str(spec.get("contentType") or "kubevirt")
    if "http" in src:
        http = as_dict(src["http"])
        url = str(http.get("url") or "")
        if not url:
            return Source(None, "import", "source.http.url is empty")
        return Source(cdi.PopulateSource(
            type="http", url=url, secret_ref=str(http.get("secretRef") or ""),
            cert_config_map=str(http.get("certConfigMap") or ""),
            extra_headers=tuple(str(h) for h in as_list(http.get("extraHeaders"))),
            secret_extra_headers=tuple(str(h) for h in as_list(http.get("secretExtraHeaders"))),
            insecure_skip_verify=http.get("insecureSkipVerify") is True,
            checksum=str(http.get("checksum") or ""), content_type=content), "import")
    if "registry" in src:
        reg = as_dict(src["registry"])
        url = str(reg.get("url") or "")
        if not url:
            return Source(None, "import", "source.registry.url is required (imageStream is "
                          "not supported)")
        return Source(cdi.PopulateSource(
            type="registry", url=url, secret_ref=str(reg.get("secretRef") or ""),
            cert_config_map=str(reg.get("certConfigMap") or ""), content_type=content),
            "import")
    if "blank" in src:
        return Source(cdi.PopulateSource(type="blank", content_type=content), "import")
    if "upload" in src:
        return Source(cdi.PopulateSource(type="upload", content_type=content), "upload")
    if "pvc" in src or spec.get("sourceRef"):
        ns, name, error = clone_origin(dv, datasources)
        if error:
            return Source(None, "clone", error)
        if not name:
            return Source(None, "clone", "source.pvc.name is empty")
        return Source(cdi.PopulateSource(type="clone", source_namespace=ns, source_name=name,
                                         content_type=content), "clone")
    kinds = ", ".join(sorted(src)) or "none"
    return Source(None, "import", f"source {kinds} is not supported (http, registry, blank, "
                  "upload, pvc, sourceRef)")


# ---- the claim -------------------------------------------------------------------------------


def claim_spec(dv: Mapping[str, Any], source_pvc: Mapping[str, Any] | None) -> tuple[Obj, str]:
    """The claim's spec from ``spec.pvc`` (verbatim) or ``spec.storage`` (defaults filled);
    (spec, error)."""
    spec = as_dict(dv.get("spec"))
    if "pvc" in spec and spec.get("pvc") is not None:
        out = copy.deepcopy(as_dict(spec["pvc"]))
        out.setdefault("volumeMode", "Filesystem")
    else:
        out = copy.deepcopy(as_dict(spec.get("storage")))
        if not out.get("accessModes"):
            src_modes = as_list(as_dict((source_pvc or {}).get("spec")).get("accessModes"))
            out["accessModes"] = list(src_modes) or ["ReadWriteOnce"]
        out.setdefault("volumeMode", "Filesystem")
    requests = as_dict(as_dict(out.get("resources")).get("requests"))
    if not requests.get("storage"):
        size = (as_dict(as_dict(as_dict(source_pvc or {}).get("status")).get("capacity")).get(
            "storage") or as_dict(as_dict(as_dict(as_dict(source_pvc or {}).get("spec")).get(
                "resources")).get("requests")).get("storage"))
        if not size:
            return out, "the storage size is missing (spec.storage.resources.requests.storage)"
        out.setdefault("resources", {}).setdefault("requests", {})["storage"] = size
    return out, ""


def owner_reference(dv: Mapping[str, Any]) -> Obj:
    md = meta(dv)
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "name": str(md.get("name")), "uid": str(md.get("uid")), "controller": True,
            "blockOwnerDeletion": True}


def build_claim(dv: Mapping[str, Any], spec: Obj, source: cdi.PopulateSource) -> Obj:
    md = meta(dv)
    ann: dict[str, str] = {cdi.ANN_POPULATE: source.to_json(),
                           cdi.ANN_CONTENT_TYPE: source.content_type,
                           cdi.ANN_POPULATED_FOR: _name(dv)}
    dv_ann = as_dict(md.get("annotations"))
    if dv_ann.get(cdi.ANN_BIND_IMMEDIATE) == "true":
        ann[cdi.ANN_BIND_IMMEDIATE] = "true"
    if source.type in ("http", "registry", "blank"):
        ann[cdi.ANN_IMPORT_SOURCE] = "none" if source.type == "blank" else source.type
        if source.url:
            ann[cdi.ANN_IMPORT_ENDPOINT] = source.url
    elif source.type == "upload":
        ann[cdi.ANN_UPLOAD_TARGET] = ""
    elif source.type == "clone":
        ann[cdi.ANN_CLONE_REQUEST] = f"{source.source_namespace}/{source.source_name}"
    labels = dict(CONTROLLER_LABEL)
    labels.update({str(k): str(v) for k, v in as_dict(md.get("labels")).items()})
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": _name(dv), "namespace": _ns(dv), "labels": labels,
                         "annotations": ann, "ownerReferences": [owner_reference(dv)]},
            "spec": spec}


def owned_by(pvc: Mapping[str, Any], dv: Mapping[str, Any]) -> bool:
    uid = meta(dv).get("uid")
    return any(as_dict(r).get("uid") == uid for r in as_list(meta(pvc).get("ownerReferences")))


def source_in_use(ns: str, name: str, vmis: list[Obj]) -> str:
    """The name of a VMI (not final) that uses claim ``ns/name``, or ""."""
    for vmi in vmis:
        if _ns(vmi) != ns or phase(vmi) in ("Succeeded", "Failed"):
            continue
        for volume in as_list(as_dict(vmi.get("spec")).get("volumes")):
            volume = as_dict(volume)
            claim = (as_dict(volume.get("persistentVolumeClaim")).get("claimName")
                     or as_dict(volume.get("dataVolume")).get("name"))
            if claim == name:
                return _name(vmi)
    return ""


# ---- status ----------------------------------------------------------------------------------


def _condition(ctype: str, status: str, reason: str = "", message: str = "") -> Obj:
    out: Obj = {"type": ctype, "status": status}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def _status(old: Mapping[str, Any], *, phase: str, progress: str, claim: str, restarts: int,
            bound: Obj, running: Obj, ready: bool) -> Obj:
    status: Obj = {"phase": phase, "progress": progress, "restartCount": restarts,
                   "conditions": [bound, running,
                                  _condition("Ready", "True" if ready else "False")]}
    if claim:
        status["claimName"] = claim
    # keep the timestamps of conditions that did not change
    old_conds = {str(as_dict(c).get("type")): as_dict(c)
                 for c in as_list(as_dict(old.get("status")).get("conditions"))}
    for cond in status["conditions"]:
        prior = old_conds.get(cond["type"])
        if prior and all(prior.get(k) == cond.get(k) for k in ("status", "reason", "message")):
            for stamp in ("lastTransitionTime", "lastHeartbeatTime"):
                if stamp in prior:
                    cond[stamp] = prior[stamp]
    return status


def _phases(kind: str) -> tuple[str, str]:
    return {"import": ("ImportScheduled", "ImportInProgress"),
            "upload": ("UploadScheduled", "UploadReady"),
            "clone": ("CloneScheduled", "CloneInProgress")}[kind]


def waits_for_consumer(dv: Mapping[str, Any], spec: Obj, classes: list[Obj]) -> bool:
    """Whether the claim ``spec`` of ``dv`` will bind on first use."""
    if as_dict(meta(dv).get("annotations")).get(cdi.ANN_BIND_IMMEDIATE) == "true":
        return False
    sc = claim_class({"spec": spec}, classes)
    return sc is not None and sc.get("volumeBindingMode") == "WaitForFirstConsumer"


def claim_waits_for_consumer(pvc: Mapping[str, Any], classes: list[Obj]) -> bool:
    ann = as_dict(meta(pvc).get("annotations"))
    if ann.get("volume.kubernetes.io/selected-node") or ann.get(cdi.ANN_BIND_IMMEDIATE) == "true":
        return False
    sc = claim_class(pvc, classes)
    return sc is not None and sc.get("volumeBindingMode") == "WaitForFirstConsumer"


def reconcile(inp: DVInputs) -> list[DVAction]:
    dv = inp.dv
    md = meta(dv)
    if md.get("deletionTimestamp"):
        return []
    ns, name = _ns(dv), _name(dv)
    old_status = as_dict(dv.get("status"))
    out: list[DVAction] = []

    def status(phase: str, *, progress: str = "N/A", restarts: int = 0, bound: Obj | None = None,
               running: Obj | None = None, claim: str = "") -> None:
        new = _status(dv, phase=phase, progress=progress, claim=claim, restarts=restarts,
                      bound=bound or _condition("Bound", "False"),
                      running=running or _condition("Running", "False"),
                      ready=phase == "Succeeded")
        if _comparable(new) != _comparable(old_status):
            out.append(SetStatus(ns, name, new))

    old_running = next((as_dict(c) for c in as_list(old_status.get("conditions"))
                        if as_dict(c).get("type") == "Running"), {})

    def event(etype: str, reason: str, message: str) -> None:
        # once per change of reason or message: the Running condition carries them too
        if (old_running.get("reason"), old_running.get("message")) != (reason, message):
            out.append(RecordEvent(ns, name, etype, reason, message))

    source = source_of(dv, inp.datasources)
    if source.error or source.populate is None:
        message = source.error or "no source"
        event("Warning", "Error", message)
        status("Failed", running=_condition("Running", "False", "Error", message))
        return out

    pvc = inp.pvc
    if (pvc is not None and not owned_by(pvc, dv)
            and as_dict(meta(pvc).get("annotations")).get(cdi.ANN_POPULATED_FOR) != name):
        message = f'Resource "{name}" already exists and is not managed by DataVolume'
        event("Warning", "ErrResourceExists", message)
        status("Pending", running=_condition("Running", "False", "ErrResourceExists", message))
        return out

    populate = source.populate
    source_pvc: Obj | None = None
    source_node = ""
    if populate.type == "clone":
        key = (populate.source_namespace, populate.source_name)
        source_pvc = inp.pvcs.get(key)
        if pvc is None:
            waiting = ""
            if source_pvc is None:
                waiting = f'clone source "{key[0]}/{key[1]}" not found'
                reason = "CloneSourceNotFound"
            elif phase(source_pvc) != "Bound" or not cdi.populated(source_pvc):
                waiting = f'clone source "{key[0]}/{key[1]}" is not populated yet'
                reason = "CloneSourceNotReady"
            else:
                user = source_in_use(key[0], key[1], inp.vmis)
                if user:
                    waiting = (f'clone source "{key[0]}/{key[1]}" is in use by '
                               f"VirtualMachineInstance {user}")
                    reason = "CloneSourceInUse"
            if waiting:
                event("Normal", reason, waiting)
                status("CloneScheduled", running=_condition("Running", "False", reason,
                                                            waiting))
                return out
            volume = str(as_dict(source_pvc and source_pvc.get("spec")).get("volumeName") or "")
            source_node = pv_node(inp.pvs.get(volume) or {})

    if pvc is None:
        spec, error = claim_spec(dv, source_pvc)
        if error:
            event("Warning", "Error", error)
            status("Failed", running=_condition("Running", "False", "Error", error))
            return out
        if source_node and not waits_for_consumer(dv, spec, inp.classes):
            # a local copy: the clone lands where its source is; a claim that waits for its
            # consumer is copied to the consumer's node instead (host-assisted)
            populate = dataclasses.replace(populate, node=source_node)
        out.append(CreateClaim(build_claim(dv, spec, populate)))
        status("Pending", claim=name,
               bound=_condition("Bound", "Unknown", "Pending", f"PVC {name} Pending"))
        return out

    ann = as_dict(meta(pvc).get("annotations"))
    bound_phase = phase(pvc)
    scheduled, in_progress = _phases(source.kind)
    restarts = int(str(ann.get(cdi.ANN_POD_RESTARTS) or "0") or 0)
    if bound_phase == "Lost":
        message = f"PVC {name} Lost"
        event("Warning", "ClaimLost", message)
        status("Failed", claim=name, restarts=restarts,
               bound=_condition("Bound", "False", "ClaimLost", message))
        return out
    if bound_phase != "Bound":
        bound = _condition("Bound", "False", "Pending", f"PVC {name} Pending")
        if claim_waits_for_consumer(pvc, inp.classes):
            status("WaitForFirstConsumer", claim=name, bound=bound)
        else:
            status("Pending", claim=name, bound=bound)
        return out
    bound = _condition("Bound", "True", "Bound", f"PVC {name} Bound")
    pod = str(ann.get(cdi.ANN_POD_PHASE) or "")
    reason = str(ann.get(cdi.ANN_RUNNING_REASON) or "")
    message = str(ann.get(cdi.ANN_RUNNING_MESSAGE) or "")
    progress = str(ann.get(cdi.ANN_PROGRESS) or "N/A")
    if pod == cdi.POD_SUCCEEDED:
        what = {"import": "Import", "upload": "Upload", "clone": "Clone"}[source.kind]
        if phase(dv) != "Succeeded":
            verb = {"import": "imported", "upload": "uploaded", "clone": "cloned"}[source.kind]
            out.append(RecordEvent(ns, name, "Normal", f"{what}Succeeded",
                                   f"Successfully {verb} into PVC {name}"))
        status("Succeeded", progress="100.0%", claim=name, restarts=restarts, bound=bound,
               running=_condition("Running", "False", "Completed", f"{what} Complete"))
        return out
    if pod == cdi.POD_FAILED:
        event("Warning", reason or "Error", message or "the population failed")
        status("Failed", progress=progress, claim=name, restarts=restarts, bound=bound,
               running=_condition("Running", "False", reason or "Error", message))
        return out
    if pod == cdi.POD_RUNNING and (source.kind != "upload"
                                   or ann.get(cdi.ANN_POD_READY) == "true"):
        if reason and restarts:  # a failed attempt waiting for its retry
            event("Warning", reason, message)
        running = (_condition("Running", "False", reason, message) if reason
                   else _condition("Running", "True"))
        status(in_progress, progress=progress, claim=name, restarts=restarts, bound=bound,
               running=running)
        return out
    status(scheduled, claim=name, restarts=restarts, bound=bound,
           running=_condition("Running", "False", reason or "Pending",
                              message))
    return out


def _comparable(status: Mapping[str, Any]) -> Obj:
    out = copy.deepcopy(dict(status))
    for cond in as_list(out.get("conditions")):
        if isinstance(cond, dict):
            cond.pop("lastTransitionTime", None)
            cond.pop("lastHeartbeatTime", None)
    return out


# ---- claims annotated directly (CDI's PVC API) -----------------------------------------------


def annotated_claim_source(pvc: Mapping[str, Any]) -> cdi.PopulateSource | None:
    """A claim created with CDI's import or upload annotations but without the contract's
    ``virtshift.io/populate`` (kubectl users of CDI's PVC API): the source to write into it."""
    ann = as_dict(meta(pvc).get("annotations"))
    if cdi.ANN_POPULATE in ann or meta(pvc).get("deletionTimestamp"):
        return None
    if cdi.ANN_UPLOAD_TARGET in ann:
        return cdi.PopulateSource(type="upload")
    endpoint = str(ann.get(cdi.ANN_IMPORT_ENDPOINT) or "")
    kind = str(ann.get(cdi.ANN_IMPORT_SOURCE) or ("http" if endpoint else ""))
    if kind == "none":
        return cdi.PopulateSource(type="blank")
    if kind in ("http", "registry") and endpoint:
        return cdi.PopulateSource(
            type="http" if kind == "http" else "registry", url=endpoint,
            secret_ref=str(ann.get("cdi.kubevirt.io/storage.import.secretName") or ""),
            cert_config_map=str(ann.get("cdi.kubevirt.io/storage.import.certConfigMap") or ""))
    return None
