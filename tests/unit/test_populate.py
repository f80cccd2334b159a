"""The node populator's pure decisions: which claims this node fills or grows."""

from __future__ import annotations

from typing import Any

from virtshift.agent.populate import capacity_bytes, percent, wants_expansion, wants_work
from virtshift.api import cdi


def pvc(*, phase: str = "Bound", source: str | None = "http", pod: str = "",
        ready: str = "", capacity: str = "64Mi") -> dict[str, Any]:
    ann: dict[str, str] = {}
    if source:
        ann[cdi.ANN_POPULATE] = cdi.PopulateSource(type=source, url="http://x/d.img"
                                                   if source == "http" else "").to_json()  # type: ignore[arg-type]
    if pod:
        ann[cdi.ANN_POD_PHASE] = pod
    if ready:
        ann[cdi.ANN_POD_READY] = ready
    return {"metadata": {"name": "d", "namespace": "ns", "annotations": ann},
            "spec": {"volumeName": "pvc-1"},
            "status": {"phase": phase, "capacity": {"storage": capacity}}}


def pv(node: str | None = "node01", capacity: str = "64Mi",
       populate_node: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"capacity": {"storage": capacity}, "hostPath": {"path": "/s/pvc-1"}}
    if node:
        spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}
    ann = {cdi.ANN_POPULATE_NODE: populate_node} if populate_node else {}
    return {"metadata": {"name": "pvc-1", "annotations": ann}, "spec": spec}


def test_only_the_node_holding_a_bound_unfinished_claim_works_on_it() -> None:
    assert wants_work(pvc(), pv(), "node01")
    assert not wants_work(pvc(), pv(), "node02")
    assert not wants_work(pvc(phase="Pending"), pv(), "node01")
    assert not wants_work(pvc(source=None), pv(), "node01")
    assert not wants_work(pvc(pod=cdi.POD_SUCCEEDED), pv(), "node01")
    assert not wants_work(pvc(pod=cdi.POD_FAILED), pv(), "node01")
    assert wants_work(pvc(pod=cdi.POD_RUNNING), pv(), "node01")  # restarted agent: again
    shared = pv(node=None, populate_node="node02")
    assert wants_work(pvc(), shared, "node02") and not wants_work(pvc(), shared, "node01")


def test_upload_claims_are_only_marked_ready_once() -> None:
    assert wants_work(pvc(source="upload"), pv(), "node01")
    assert not wants_work(pvc(source="upload", ready="true"), pv(), "node01")


def test_expansion_when_the_volume_outgrew_the_claim_status() -> None:
    assert wants_expansion(pvc(source=None), pv(capacity="96Mi"), "node01")
    assert not wants_expansion(pvc(source=None), pv(capacity="64Mi"), "node01")
    assert not wants_expansion(pvc(source=None), pv(capacity="96Mi"), "node02")
    assert not wants_expansion(pvc(), pv(capacity="96Mi"), "node01")  # still being filled


def test_sizes_and_progress_text() -> None:
    assert capacity_bytes(pv(capacity="1Gi")) == 2**30
    assert capacity_bytes(pv(capacity="1000")) == 512  # whole sectors
    assert percent(45.1) == "45.10%" and percent(120) == "100.00%"
