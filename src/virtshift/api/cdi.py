"""The volume population contract: how a claim says what fills it, and how the node that holds it
reports the work.

CDI runs an importer, upload or clone pod per claim and mirrors the pod into the claim's
annotations; virtshift's node agent plays the pod. The parts and who writes what:

* The DataVolume controller (and the snapshot restore controller) create the claim with
  :data:`ANN_POPULATE`, a JSON :class:`PopulateSource` saying where the data comes from, plus
  CDI's informative annotations (``storage.import.source``, ``storage.import.endpoint``,
  ``storage.upload.target``, ``k8s.io/CloneRequest``).
* The storage controller provisions the claim as any other; a source with a ``node`` (the data of
  a clone or a snapshot lies there) pins the volume to that node.
* The node agent that holds the bound volume populates it exactly once, through
  :mod:`virtshift.storage.importer` (a child process per volume), and writes the pod's part on the
  claim: :data:`ANN_POD_PHASE` (``Pending`` -> ``Running`` -> ``Succeeded`` | ``Failed``),
  :data:`ANN_POD_READY` (an upload volume ready to receive), :data:`ANN_POD_RESTARTS`,
  :data:`ANN_RUNNING_REASON` / :data:`ANN_RUNNING_MESSAGE` and :data:`ANN_PROGRESS`
  (``"45.10%"``). The disk appears as ``disk.img`` in the volume directory only once complete.
* The DataVolume controller maps those onto the DataVolume's phase, progress, restartCount and
  conditions; VMIs wait until every claim with :data:`ANN_POPULATE` is ``Succeeded``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ANN_POPULATE = "virtshift.io/populate"
ANN_PROGRESS = "virtshift.io/populate-progress"
ANN_POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
ANN_POD_READY = "cdi.kubevirt.io/storage.pod.ready"
ANN_POD_RESTARTS = "cdi.kubevirt.io/storage.pod.restarts"
ANN_RUNNING_REASON = "cdi.kubevirt.io/storage.condition.running.reason"
ANN_RUNNING_MESSAGE = "cdi.kubevirt.io/storage.condition.running.message"
ANN_IMPORT_SOURCE = "cdi.kubevirt.io/storage.import.source"
ANN_IMPORT_ENDPOINT = "cdi.kubevirt.io/storage.import.endpoint"
ANN_UPLOAD_TARGET = "cdi.kubevirt.io/storage.upload.target"
ANN_CLONE_REQUEST = "k8s.io/CloneRequest"
ANN_CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
ANN_BIND_IMMEDIATE = "cdi.kubevirt.io/storage.bind.immediate.requested"
ANN_POPULATED_FOR = "cdi.kubevirt.io/storage.populatedFor"

# Values of ANN_POD_PHASE (a pod's phases).
POD_PENDING = "Pending"
POD_RUNNING = "Running"
POD_SUCCEEDED = "Succeeded"
POD_FAILED = "Failed"

SourceType = Literal["http", "registry", "blank", "upload", "clone", "snapshot"]


@dataclass(frozen=True)
class PopulateSource:
    """What fills a claim.

    ``http``/``registry``: ``url`` with ``secret_ref`` (a Secret with ``accessKeyId`` and
    ``secretKey``: basic auth / registry credentials), ``cert_config_map`` (a ConfigMap whose
    values are PEM CA certificates), ``extra_headers`` / ``secret_extra_headers`` (``"Name:
    value"`` lines, the latter Secret names whose values are such lines), ``insecure_skip_verify``
    and ``checksum`` (``"sha256:<hex>"``; also md5, sha1, sha512). ``blank``: nothing.
    ``upload``: the bytes arrive through the upload proxy. ``clone``: the claim
    ``source_namespace/source_name``. ``snapshot``: ``path``, a disk file on ``node``.
    ``node``: where the source data lies (clone, snapshot); the volume is provisioned there.
    """

    type: SourceType
    url: str = ""
    secret_ref: str = ""
    cert_config_map: str = ""
    extra_headers: tuple[str, ...] = ()
    secret_extra_headers: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    checksum: str = ""
    source_namespace: str = ""
    source_name: str = ""
    path: str = ""
    node: str = ""
    content_type: str = "kubevirt"
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        out: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in asdict(self).items()
                               if v not in ("", (), {}, False) or k == "type"}
        return json.dumps(out, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PopulateSource:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("type") not in (
                "http", "registry", "blank", "upload", "clone", "snapshot"):
            raise ValueError(f"not a populate source: {text[:200]}")
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name in data:
                value = data[name]
                kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def _annotations(pvc: Mapping[str, Any]) -> dict[str, Any]:
    meta = pvc.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, dict) else None
    return ann if isinstance(ann, dict) else {}


def populate_source(pvc: Mapping[str, Any]) -> PopulateSource | None:
    """The claim's :data:`ANN_POPULATE`, or None (not populated, or unreadable)."""
    text = _annotations(pvc).get(ANN_POPULATE)
    if not text:
        return None
    try:
        return PopulateSource.from_json(str(text))
    except (ValueError, TypeError):
        return None


def pod_phase(pvc: Mapping[str, Any]) -> str:
    return str(_annotations(pvc).get(ANN_POD_PHASE) or "")


def populated(pvc: Mapping[str, Any]) -> bool:
    """True when nothing needs to fill the claim, or the filling has succeeded."""
    return not _annotations(pvc).get(ANN_POPULATE) or pod_phase(pvc) == POD_SUCCEEDED


# ---- the hostpath provisioner's volumes (shared by the controller and the node agent) --------

HOSTNAME_LABEL = "kubernetes.io/hostname"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
"""The finalizer the API server puts on every claim; the storage controller removes it once no
VMI uses the claim (StorageObjectInUseProtection)."""
PARAM_SHARED_PATH = "sharedPath"
"""A StorageClass parameter of the hostpath provisioner: a directory every node mounts at the same
path. Its volumes have no node affinity and may be ReadWriteMany."""
ANN_POPULATE_NODE = "virtshift.io/populate-node"
"""On a volume under a shared path: the node whose agent populates it."""


def pv_node(pv: Mapping[str, Any]) -> str:
    """The node a volume's required node affinity names (``kubernetes.io/hostname In [n]``),
    "" for a volume every node reaches."""
    spec = pv.get("spec")
    affinity = spec.get("nodeAffinity") if isinstance(spec, dict) else None
    required = affinity.get("required") if isinstance(affinity, dict) else None
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    for term in terms if isinstance(terms, list) else []:
        exprs = term.get("matchExpressions") if isinstance(term, dict) else None
        for expr in exprs if isinstance(exprs, list) else []:
            if not isinstance(expr, dict):
                continue
            values = expr.get("values")
            if (expr.get("key") == HOSTNAME_LABEL and expr.get("operator") == "In"
                    and isinstance(values, list) and values):
                return str(values[0])
    return ""


def shared_path(storage_class: Mapping[str, Any] | None) -> str:
    params = (storage_class or {}).get("parameters")
    return str(params.get(PARAM_SHARED_PATH) or "") if isinstance(params, dict) else ""


def populating_node(pv: Mapping[str, Any]) -> str:
    """The node that fills a volume: its affinity's node, or for a shared volume the one the
    provisioner chose."""
    meta = pv.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, dict) else None
    chosen = ann.get(ANN_POPULATE_NODE) if isinstance(ann, dict) else None
    return pv_node(pv) or str(chosen or "")
