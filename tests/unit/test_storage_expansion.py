"""Claims that grow, capacity checks, bind-immediate and volumes pinned to their source's node
(pure decisions of the provisioner and PVC update admission)."""

from __future__ import annotations

from typing import Any

from tests.unit.test_storage_provisioner import claim, node
from virtshift.api import cdi
from virtshift.api.admission.pvc import validate_update
from virtshift.controller.storage import (
    ClaimWarning,
    CreatePV,
    ExpandPV,
    build_pv,
    default_storage_class,
    pv_node,
    reconcile_claim,
)

SC = default_storage_class()


def bound(size: str, capacity: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pvc = claim(size=size, volume="pvc-u-data", phase="Bound")
    pvc["status"]["capacity"] = {"storage": capacity}
    pv = build_pv(claim(size=capacity), SC, "node01", "/data/node01/storage")
    pv["status"] = {"phase": "Bound"}
    return pvc, pv


def test_a_bound_claim_asking_for_more_grows_its_volume() -> None:
    pvc, pv = bound("96Mi", "64Mi")
    actions = reconcile_claim(pvc, [SC], {"pvc-u-data": pv}, [node("node01")])
    assert ExpandPV("pvc-u-data", "96Mi") in actions
    same, pv = bound("64Mi", "64Mi")
    assert not [a for a in reconcile_claim(same, [SC], {"pvc-u-data": pv}, [node("node01")])
                if isinstance(a, ExpandPV)]


def test_expansion_needs_a_class_that_allows_it() -> None:
    fixed = {**SC, "allowVolumeExpansion": False}
    pvc, pv = bound("96Mi", "64Mi")
    actions = reconcile_claim(pvc, [fixed], {"pvc-u-data": pv}, [node("node01")])
    warning = next(a for a in actions if isinstance(a, ClaimWarning))
    assert warning.reason == "VolumeResizeFailed"
    assert not [a for a in actions if isinstance(a, ExpandPV)]


def test_a_claim_larger_than_any_node_fails_to_provision() -> None:
    small = node("node01")
    small["metadata"]["annotations"]["virtshift.io/storage-available"] = str(2**30)
    pvc = claim(size="2Gi", selected="node01")
    actions = reconcile_claim(pvc, [SC], {}, [small])
    warning = next(a for a in actions if isinstance(a, ClaimWarning))
    assert warning.reason == "ProvisioningFailed"
    assert "insufficient storage" in warning.message and "node01 has 1073741824" in \
        warning.message
    assert not [a for a in actions if isinstance(a, CreatePV)]
    ok = reconcile_claim(claim(size="512Mi", selected="node01"), [SC], {}, [small])
    assert [a for a in ok if isinstance(a, CreatePV)]


def test_bind_immediate_and_source_nodes() -> None:
    pvc = claim()
    pvc["metadata"]["annotations"][cdi.ANN_BIND_IMMEDIATE] = "true"
    created = [a for a in reconcile_claim(pvc, [SC], {}, [node("node01"), node("node02")])
               if isinstance(a, CreatePV)]
    assert created, "a WFFC claim asking for immediate binding is provisioned at once"
    clone = claim()
    clone["metadata"]["annotations"][cdi.ANN_POPULATE] = cdi.PopulateSource(
        type="clone", source_namespace="ns", source_name="golden", node="node02").to_json()
    created = [a for a in reconcile_claim(clone, [SC], {}, [node("node01"), node("node02")])
               if isinstance(a, CreatePV)]
    assert created and pv_node(created[0].pv) == "node02"


def test_claim_updates_follow_kubernetes() -> None:
    old = claim(size="64Mi", volume="pvc-1", phase="Bound")
    old["status"]["capacity"] = {"storage": "64Mi"}
    grow = claim(size="128Mi", volume="pvc-1", phase="Bound")
    assert validate_update(grow, old) == []
    shrink = claim(size="32Mi", volume="pvc-1", phase="Bound")
    [err] = validate_update(shrink, old)
    assert (err.field, err.type) == ("spec.resources.requests.storage", "FieldValueForbidden")
    modes = claim(size="64Mi", volume="pvc-1", phase="Bound")
    modes["spec"]["accessModes"] = ["ReadWriteMany"]
    [err] = validate_update(modes, old)
    assert err.field == "spec" and "immutable" in err.message
    pending_old = claim(size="64Mi")
    assert validate_update(claim(size="128Mi"), pending_old)  # only bound claims grow
    binding = claim(size="64Mi", volume="pvc-1")
    assert validate_update(binding, pending_old) == []  # the binder fills volumeName once


def test_claims_in_use_keep_their_protection() -> None:
    from virtshift.controller.storage import ReleaseClaim, protection

    deleting = claim("data", volume="pvc-1", phase="Bound")
    deleting["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    deleting["metadata"]["finalizers"] = [cdi.PVC_PROTECTION]
    vmi = {"metadata": {"name": "vm", "namespace": "ns"}, "status": {"phase": "Running"},
           "spec": {"volumes": [{"name": "d", "dataVolume": {"name": "data"}}]}}
    assert protection({("ns", "data"): deleting}, [vmi]) == []
    vmi["status"]["phase"] = "Succeeded"
    assert protection({("ns", "data"): deleting}, [vmi]) == [ReleaseClaim("ns", "data")]
    alive = claim("data", volume="pvc-1", phase="Bound")
    alive["metadata"]["finalizers"] = [cdi.PVC_PROTECTION]
    assert protection({("ns", "data"): alive}, []) == []
