"""The DataVolume controller's pure decisions: claims, phases, progress, clone waits."""

from __future__ import annotations

from typing import Any

from virtshift.api import cdi
from virtshift.controller.datavolume import (
    CreateClaim,
    DVInputs,
    RecordEvent,
    SetStatus,
    annotated_claim_source,
    claim_spec,
    reconcile,
    source_of,
)
from virtshift.controller.storage import default_storage_class

WFFC = default_storage_class()
IMMEDIATE = {**default_storage_class(), "metadata": {"name": "now"},
             "volumeBindingMode": "Immediate"}


def dv(source: dict[str, Any], *, storage: dict[str, Any] | None = None,
       status: dict[str, Any] | None = None, name: str = "disk") -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": name, "namespace": "ns", "uid": "dv-uid"},
        "spec": {"source": source,
                 "storage": storage if storage is not None
                 else {"resources": {"requests": {"storage": "1Gi"}}}}}
    if status is not None:
        out["status"] = status
    return out


def claim(name: str = "disk", *, phase: str = "Pending", ann: dict[str, str] | None = None,
          owner: str = "dv-uid", volume: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "annotations": dict(ann or {}),
                         "ownerReferences": [{"uid": owner}] if owner else []},
            "spec": {"volumeName": volume, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "2Gi"}}},
            "status": {"phase": phase, "capacity": {"storage": "2Gi"}}}


def run(d: dict[str, Any], pvc: dict[str, Any] | None = None, *,
        pvcs: dict[tuple[str, str], Any] | None = None, pvs: dict[str, Any] | None = None,
        vmis: list[Any] | None = None) -> list[Any]:
    return reconcile(DVInputs(dv=d, pvc=pvc, classes=[WFFC, IMMEDIATE], pvcs=pvcs or {},
                              pvs=pvs or {}, datasources={}, vmis=vmis or []))


def status_of(actions: list[Any]) -> dict[str, Any]:
    found = [a.status for a in actions if isinstance(a, SetStatus)]
    assert found, actions
    out: dict[str, Any] = found[-1]
    return out


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = next(c for c in status["conditions"] if c["type"] == ctype)
    return out


def test_http_source_creates_an_owned_claim_with_the_contract() -> None:
    d = dv({"http": {"url": "http://127.0.0.1:8000/disk.qcow2", "secretRef": "creds",
                     "certConfigMap": "ca"}})
    actions = run(d)
    create = next(a for a in actions if isinstance(a, CreateClaim))
    pvc = create.pvc
    ann = pvc["metadata"]["annotations"]
    src = cdi.PopulateSource.from_json(ann[cdi.ANN_POPULATE])
    assert (src.type, src.url, src.secret_ref, src.cert_config_map) == (
        "http", "http://127.0.0.1:8000/disk.qcow2", "creds", "ca")
    assert ann[cdi.ANN_IMPORT_SOURCE] == "http"
    assert ann[cdi.ANN_IMPORT_ENDPOINT] == "http://127.0.0.1:8000/disk.qcow2"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "dv-uid"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["volumeMode"] == "Filesystem"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert status_of(actions)["phase"] == "Pending"


def test_phases_follow_the_claim_and_its_populator() -> None:
    d = dv({"http": {"url": "http://x/disk.img"}})
    pending = claim()
    assert status_of(run(d, pending))["phase"] == "WaitForFirstConsumer"
    selected = claim(ann={"volume.kubernetes.io/selected-node": "node01"})
    assert status_of(run(d, selected))["phase"] == "Pending"
    bound = claim(phase="Bound", volume="pvc-1")
    s = status_of(run(d, bound))
    assert s["phase"] == "ImportScheduled"
    assert cond(s, "Bound")["status"] == "True"
    running = claim(phase="Bound", volume="pvc-1", ann={
        cdi.ANN_POD_PHASE: "Running", cdi.ANN_PROGRESS: "45.10%", cdi.ANN_POD_RESTARTS: "1"})
    s = status_of(run(d, running))
    assert (s["phase"], s["progress"], s["restartCount"]) == ("ImportInProgress", "45.10%", 1)
    assert cond(s, "Running")["status"] == "True"
    done = claim(phase="Bound", volume="pvc-1", ann={cdi.ANN_POD_PHASE: "Succeeded"})
    actions = run(d, done)
    s = status_of(actions)
    assert (s["phase"], s["progress"]) == ("Succeeded", "100.0%")
    assert cond(s, "Ready")["status"] == "True"
    assert any(isinstance(a, RecordEvent) and a.reason == "ImportSucceeded" for a in actions)
    failed = claim(phase="Bound", volume="pvc-1", ann={
        cdi.ANN_POD_PHASE: "Failed", cdi.ANN_RUNNING_REASON: "InvalidImage",
        cdi.ANN_RUNNING_MESSAGE: "not a disk image"})
    actions = run(d, failed)
    s = status_of(actions)
    assert s["phase"] == "Failed"
    assert cond(s, "Running") == {"type": "Running", "status": "False",
                                  "reason": "InvalidImage", "message": "not a disk image"}
    assert any(isinstance(a, RecordEvent) and a.type == "Warning" for a in actions)


def test_an_unchanged_status_is_not_rewritten() -> None:
    d = dv({"blank": {}})
    bound = claim(phase="Bound", volume="pvc-1", ann={cdi.ANN_POD_PHASE: "Running"})
    s = status_of(run(d, bound))
    again = dv({"blank": {}}, status=s)
    assert not [a for a in run(again, bound) if isinstance(a, SetStatus | RecordEvent)]


def test_upload_is_ready_only_when_the_node_says_so() -> None:
    d = dv({"upload": {}})
    create = next(a for a in run(d) if isinstance(a, CreateClaim))
    assert cdi.ANN_UPLOAD_TARGET in create.pvc["metadata"]["annotations"]
    bound = claim(phase="Bound", volume="pvc-1", ann={cdi.ANN_POD_PHASE: "Running"})
    assert status_of(run(d, bound))["phase"] == "UploadScheduled"
    ready = claim(phase="Bound", volume="pvc-1",
                  ann={cdi.ANN_POD_PHASE: "Running", cdi.ANN_POD_READY: "true"})
    assert status_of(run(d, ready))["phase"] == "UploadReady"


def test_clone_waits_for_its_source_and_lands_on_its_node_or_its_consumers() -> None:
    d = dv({"pvc": {"namespace": "ns", "name": "golden"}}, storage={})
    s = status_of(run(d))
    assert s["phase"] == "CloneScheduled"
    assert cond(s, "Running")["reason"] == "CloneSourceNotFound"
    src = claim("golden", phase="Bound", volume="pvc-g", owner="",
                ann={cdi.ANN_POPULATE: cdi.PopulateSource(type="blank").to_json(),
                     cdi.ANN_POD_PHASE: "Succeeded"})
    pv = {"metadata": {"name": "pvc-g"}, "spec": {"nodeAffinity": {"required": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node02"]}]}]}}}}
    vmi = {"metadata": {"name": "user", "namespace": "ns"}, "status": {"phase": "Running"},
           "spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "golden"}}]}}
    s = status_of(run(d, pvcs={("ns", "golden"): src}, pvs={"pvc-g": pv}, vmis=[vmi]))
    assert cond(s, "Running")["reason"] == "CloneSourceInUse"
    # waiting for its consumer: copied to wherever the consumer runs (host-assisted)
    actions = run(d, pvcs={("ns", "golden"): src}, pvs={"pvc-g": pv})
    create = next(a for a in actions if isinstance(a, CreateClaim))
    populate = cdi.PopulateSource.from_json(
        create.pvc["metadata"]["annotations"][cdi.ANN_POPULATE])
    assert (populate.type, populate.source_name, populate.node) == ("clone", "golden", "")
    # bound at once: a local copy on the source's node
    d["metadata"]["annotations"] = {cdi.ANN_BIND_IMMEDIATE: "true"}
    actions = run(d, pvcs={("ns", "golden"): src}, pvs={"pvc-g": pv})
    create = next(a for a in actions if isinstance(a, CreateClaim))
    populate = cdi.PopulateSource.from_json(
        create.pvc["metadata"]["annotations"][cdi.ANN_POPULATE])
    assert (populate.type, populate.source_name, populate.node) == ("clone", "golden", "node02")
    assert create.pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"  # the source's
    assert create.pvc["metadata"]["annotations"][cdi.ANN_CLONE_REQUEST] == "ns/golden"
    bound = claim(phase="Bound", volume="pvc-c", ann={cdi.ANN_POD_PHASE: "Running"})
    assert status_of(run(d, bound, pvcs={("ns", "golden"): src}))["phase"] == "CloneInProgress"


def test_a_claim_it_does_not_own_is_never_taken_over() -> None:
    d = dv({"blank": {}})
    s = status_of(run(d, claim(owner="someone-else")))
    assert s["phase"] == "Pending"
    assert cond(s, "Running")["reason"] == "ErrResourceExists"


def test_bad_sources_fail_clearly() -> None:
    assert "not supported" in source_of(dv({"s3": {"url": "s3://b/k"}}), {}).error
    s = status_of(run(dv({"http": {"url": ""}})))
    assert s["phase"] == "Failed"
    assert "url" in cond(s, "Running")["message"]
    _, error = claim_spec(dv({"blank": {}}, storage={}), None)
    assert "size" in error


def test_claims_with_cdi_annotations_only_get_the_contract() -> None:
    pvc = claim(ann={cdi.ANN_IMPORT_ENDPOINT: "http://h/x.img"})
    src = annotated_claim_source(pvc)
    assert src is not None and (src.type, src.url) == ("http", "http://h/x.img")
    upload = annotated_claim_source(claim(ann={cdi.ANN_UPLOAD_TARGET: ""}))
    assert upload is not None and upload.type == "upload"
    assert annotated_claim_source(claim()) is None
