"""The API server's side of live migration against a real `virtshift up --nodes 0`: the
VirtualMachineInstanceMigration create admitter (upstream's checks against the VMI and the other
migrations, with upstream's messages) and the VM ``migrate`` subresource.

No node runs here: a "running" VMI is simulated by writing its status through ``/status``, as a
node agent would."""

from __future__ import annotations

import concurrent.futures
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import CORPUS, Kubectl
from tests.e2e.vmtools import Cluster, wait_for
from virtshift.client import kubeconfig
from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

KV = "/apis/kubevirt.io/v1"
WEBHOOK = 'admission webhook "migration-create-validator.kubevirt.io" denied the request: '
SELECTOR_LABEL = "kubevirt.io/vmi-name"


@pytest.fixture(scope="module")
def cluster(platform: PlatformProcess, kubectl: Kubectl) -> Cluster:
    return Cluster(platform, kubectl)


def _vmi_manifest(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((CORPUS / "vmi-migratable.yaml").read_text())
    out: dict[str, Any] = copy.deepcopy(doc)
    out["metadata"]["name"] = name
    return out


def _migration(vmi: str, name: str | None = None) -> dict[str, Any]:
    meta = {"name": name} if name else {"generateName": f"{vmi}-mig-"}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": meta, "spec": {"vmiName": vmi}}


def _create_migration(c: Cluster, ns: str, body: dict[str, Any], query: str = ""
                      ) -> requests.Response:
    return c.request("POST", f"{KV}/namespaces/{ns}/virtualmachineinstancemigrations{query}",
                     body)


def _migrations(c: Cluster, ns: str) -> list[dict[str, Any]]:
    r = c.request("GET", f"{KV}/namespaces/{ns}/virtualmachineinstancemigrations")
    r.raise_for_status()
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def _assert_denied(r: requests.Response, message: str) -> None:
    """kube-apiserver's rendering of a webhook denial: 400, no reason, the webhook's message."""
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == 400
    assert "reason" not in body, body
    assert body["message"] == WEBHOOK + message, body["message"]


def _write_status(c: Cluster, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """Replace the VMI's status the way a node agent does (retried on write conflicts with the
    VMI controller)."""
    def attempt() -> dict[str, Any] | None:
        vmi = c.vmi(ns, name)
        assert vmi is not None
        vmi["status"] = {**(vmi.get("status") or {}), **status}
        r = c.request("PUT", f"{KV}/namespaces/{ns}/virtualmachineinstances/{name}/status", vmi)
        if r.status_code == 409:
            return None
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out
    return wait_for(attempt, f"status of VMI {ns}/{name} written", 30)


def _settled(c: Cluster, ns: str, name: str) -> dict[str, Any]:
    """The VMI once the VMI controller has made it ``Scheduling`` (no node fits: it stays)."""
    return c.wait_vmi_phase(ns, name, "Scheduling", 30)


def _live_migratable(status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    cond = {"type": "LiveMigratable", "status": status, "lastProbeTime": None,
            "lastTransitionTime": "2025-01-01T00:00:00Z"}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _running_vmi(c: Cluster, ns: str, name: str, migratable: dict[str, Any] | None = None,
                 *, create: bool = True) -> dict[str, Any]:
    """A VMI that looks Running on node01 with the given LiveMigratable condition."""
    if create:
        c.create(ns, _vmi_manifest(name))
    _settled(c, ns, name)
    cond = migratable or _live_migratable("True")
    return _write_status(c, ns, name, {"phase": "Running", "nodeName": "node01",
                                       "conditions": [cond]})


# ---- the create admitter -------------------------------------------------------------------


def test_refused_when_the_vmi_does_not_exist(cluster: Cluster, namespace: str) -> None:
    r = _create_migration(cluster, namespace, _migration("nope", "m"))
    _assert_denied(r, f'the VMI "{namespace}/nope" does not exist')
    assert _migrations(cluster, namespace) == []


def test_refused_when_the_vmi_is_not_running(cluster: Cluster, namespace: str) -> None:
    cluster.create(namespace, _vmi_manifest("pending"))
    _settled(cluster, namespace, "pending")
    r = _create_migration(cluster, namespace, _migration("pending", "m"))
    _assert_denied(r, 'Cannot migrate VMI that is not running (phase "Scheduling").')


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_refused_when_the_vmi_is_final(cluster: Cluster, namespace: str, phase: str) -> None:
    cluster.create(namespace, _vmi_manifest("done"))
    _settled(cluster, namespace, "done")
    _write_status(cluster, namespace, "done", {"phase": phase})
    r = _create_migration(cluster, namespace, _migration("done", "m"))
    _assert_denied(r, "Cannot migrate VMI in finalized state.")


def test_refused_when_the_vmi_is_not_live_migratable(cluster: Cluster, namespace: str) -> None:
    message = ("cannot migrate VMI: PVC disk0 is not shared, live migration requires that all "
               "PVCs must be shared (using ReadWriteMany access mode)")
    _running_vmi(cluster, namespace, "local",
                 _live_migratable("False", "DisksNotLiveMigratable", message))
    r = _create_migration(cluster, namespace, _migration("local", "m"))
    _assert_denied(r, f"Cannot migrate VMI, Reason: DisksNotLiveMigratable, Message: {message}")


def test_refused_while_the_node_agent_has_not_reported_live_migratable(
        cluster: Cluster, namespace: str) -> None:
    cluster.create(namespace, _vmi_manifest("fresh"))
    _settled(cluster, namespace, "fresh")
    _write_status(cluster, namespace, "fresh", {"phase": "Running", "nodeName": "node01"})
    r = _create_migration(cluster, namespace, _migration("fresh", "m"))
    _assert_denied(r, "Cannot migrate VMI, Reason: LiveMigratable, Message: the node agent has "
                      "not reported it yet")


def test_admitted_labelled_and_a_second_one_refused_while_in_flight(
        cluster: Cluster, namespace: str) -> None:
    _running_vmi(cluster, namespace, "vmi")
    r = _create_migration(cluster, namespace, _migration("vmi", "first"))
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["metadata"]["labels"][SELECTOR_LABEL] == "vmi"
    assert first["spec"] == {"vmiName": "vmi"}

    second = _create_migration(cluster, namespace, _migration("vmi", "second"))
    _assert_denied(second, f"in-flight migration detected. Active migration job "
                           f"({first['metadata']['uid']}) is currently already in progress "
                           f"for VMI vmi.")
    assert [m["metadata"]["name"] for m in _migrations(cluster, namespace)] == ["first"]

    # A finished migration no longer blocks the next one.
    path = f"{KV}/namespaces/{namespace}/virtualmachineinstancemigrations/first/status"
    r = _update(cluster, path, lambda o: o.update(
        status={**(o.get("status") or {}), "phase": "Succeeded"}))
    assert r.status_code == 200, r.text
    r = _create_migration(cluster, namespace, _migration("vmi", "third"))
    assert r.status_code == 201, r.text


def test_another_vmis_migration_does_not_conflict(cluster: Cluster, namespace: str) -> None:
    _running_vmi(cluster, namespace, "a")
    _running_vmi(cluster, namespace, "b")
    assert _create_migration(cluster, namespace, _migration("a", "ma")).status_code == 201
    assert _create_migration(cluster, namespace, _migration("b", "mb")).status_code == 201


def test_concurrent_creates_admit_exactly_one(cluster: Cluster, namespace: str) -> None:
    _running_vmi(cluster, namespace, "vmi")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: _create_migration(cluster, namespace, _migration("vmi", f"m{i}")),
            range(8)))
    assert sorted(r.status_code for r in codes) == [201] + [400] * 7, [r.text for r in codes]
    assert len(_migrations(cluster, namespace)) == 1


def test_dry_run_is_admitted_and_stores_nothing(cluster: Cluster, namespace: str) -> None:
    _running_vmi(cluster, namespace, "vmi")
    r = _create_migration(cluster, namespace, _migration("vmi", "m"), "?dryRun=All")
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["labels"][SELECTOR_LABEL] == "vmi"
    assert _migrations(cluster, namespace) == []
    # A dry run goes through the same admission (upstream's webhooks declare no side effects).
    r = _create_migration(cluster, namespace, _migration("gone", "m"), "?dryRun=All")
    _assert_denied(r, f'the VMI "{namespace}/gone" does not exist')


def test_components_get_the_same_checks(cluster: Cluster, namespace: str) -> None:
    cfg = kubeconfig.load(cluster.data_dir / "components.kubeconfig")
    ca = cluster.data_dir / "components-ca-for-tests.pem"
    ca.write_bytes(cfg.ca_pem)
    with requests.Session() as s:
        s.trust_env = False
        s.verify = str(ca)
        s.headers["Authorization"] = f"Bearer {cfg.token}"
        who = s.post(cfg.server + "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                     json={"apiVersion": "authentication.k8s.io/v1",
                           "kind": "SelfSubjectReview"}, timeout=30)
        assert "system:serviceaccounts:kubevirt" in who.json()["status"]["userInfo"]["groups"]
        r = s.post(f"{cfg.server}{KV}/namespaces/{namespace}/virtualmachineinstancemigrations",
                   json=_migration("nope", "m"), timeout=30)
    _assert_denied(r, f'the VMI "{namespace}/nope" does not exist')


def _update(c: Cluster, path: str, change: Callable[[dict[str, Any]], None]
            ) -> requests.Response:
    """GET, change, PUT; again while the migration controller's writes conflict."""
    def attempt() -> list[requests.Response] | None:
        cur = c.request("GET", path).json()
        change(cur)
        r = c.request("PUT", path, cur)
        return None if r.status_code == 409 else [r]  # a Response is falsy when not ok
    return wait_for(attempt, f"an update of {path} without a write conflict", 30)[0]


def test_update_keeps_the_spec_immutable(cluster: Cluster, namespace: str) -> None:
    _running_vmi(cluster, namespace, "vmi")
    assert _create_migration(cluster, namespace, _migration("vmi", "m")).status_code == 201
    path = f"{KV}/namespaces/{namespace}/virtualmachineinstancemigrations/m"
    r = _update(cluster, path, lambda o: o["spec"].update(vmiName="other"))
    assert r.status_code == 422, r.text
    assert "update of Migration object's spec is restricted" in r.json()["message"]
    # Metadata-only updates pass (the store checks are for creates only).
    r = _update(cluster, path, lambda o: o["metadata"].setdefault("annotations", {}).update(
        note="x"))
    assert r.status_code == 200, r.text


def test_kubectl_apply_of_migration_job(cluster: Cluster, kubectl: Kubectl,
                                        namespace: str) -> None:
    path = str(CORPUS / "migration-job.yaml")
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vmi-migratable.yaml"))
    _settled(cluster, namespace, "vmi-migratable")
    refused = kubectl.run("apply", "-n", namespace, "-f", path, check=False)
    assert refused.returncode != 0
    assert (WEBHOOK + 'Cannot migrate VMI that is not running (phase "Scheduling").'
            in refused.stderr), refused.stderr

    _running_vmi(cluster, namespace, "vmi-migratable", create=False)
    out = kubectl.run("apply", "-n", namespace, "-f", path).stdout
    assert "virtualmachineinstancemigration.kubevirt.io/migration-job created" in out
    got = kubectl.json("get", "vmim", "migration-job", "-n", namespace)
    assert got["metadata"]["labels"][SELECTOR_LABEL] == "vmi-migratable"


# ---- the VM migrate subresource ------------------------------------------------------------


def _vm(name: str, strategy: str) -> dict[str, Any]:
    template = _vmi_manifest(name)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"runStrategy": strategy,
                     "template": {"metadata": {"labels": template["metadata"]["labels"]},
                                  "spec": template["spec"]}}}


@pytest.fixture
def running_vm(cluster: Cluster, namespace: str) -> Iterator[str]:
    cluster.create(namespace, _vm("vm", "Always"))
    wait_for(lambda: cluster.vmi(namespace, "vm"), "the VM's VMI", 30)
    _running_vmi(cluster, namespace, "vm", create=False)
    yield "vm"


def test_migrate_creates_a_migration(cluster: Cluster, namespace: str, running_vm: str) -> None:
    r = cluster.subresource("virtualmachines", namespace, running_vm, "migrate",
                            {"addedNodeSelector": {"zone": "b"}})
    assert r.status_code == 202, r.text
    assert r.content == b""
    [mig] = _migrations(cluster, namespace)
    assert mig["metadata"]["name"].startswith("kubevirt-migrate-vm-")
    assert mig["metadata"]["generateName"] == "kubevirt-migrate-vm-"
    assert mig["spec"] == {"vmiName": running_vm, "addedNodeSelector": {"zone": "b"}}
    assert mig["metadata"]["labels"][SELECTOR_LABEL] == running_vm

    # A second one while the first is in flight: virt-api passes the webhook's refusal on as 500.
    again = cluster.subresource("virtualmachines", namespace, running_vm, "migrate")
    assert again.status_code == 500, again.text
    body = again.json()
    assert body["reason"] == "InternalError"
    assert body["message"] == (
        f"Internal error occurred: {WEBHOOK}in-flight migration detected. Active migration job "
        f"({mig['metadata']['uid']}) is currently already in progress for VMI {running_vm}.")
    assert len(_migrations(cluster, namespace)) == 1


def test_migrate_dry_run_creates_nothing(cluster: Cluster, namespace: str,
                                         running_vm: str) -> None:
    r = cluster.subresource("virtualmachines", namespace, running_vm, "migrate",
                            {"dryRun": ["All"]})
    assert r.status_code == 202, r.text
    assert _migrations(cluster, namespace) == []
    bad = cluster.subresource("virtualmachines", namespace, running_vm, "migrate",
                              {"dryRun": ["Some"]})
    assert bad.status_code == 400 and "supported values" in bad.json()["message"]


def test_migrate_refusals(cluster: Cluster, namespace: str) -> None:
    sub = cluster.subresource
    r = sub("virtualmachines", namespace, "missing", "migrate")
    assert r.status_code == 404, r.text
    assert r.json()["message"] == 'virtualmachine.kubevirt.io "missing" not found'

    cluster.create(namespace, _vm("stopped", "Halted"))
    r = sub("virtualmachines", namespace, "stopped", "migrate")
    assert r.status_code == 404, r.text
    assert r.json()["message"] == 'virtualmachineinstance.kubevirt.io "stopped" not found'
    assert r.json()["details"]["kind"] == "virtualmachineinstance"

    cluster.create(namespace, _vm("starting", "Always"))
    wait_for(lambda: cluster.vmi(namespace, "starting"), "the VM's VMI", 30)
    r = sub("virtualmachines", namespace, "starting", "migrate")
    assert r.status_code == 409, r.text
    assert r.json()["message"] == ('Operation cannot be fulfilled on virtualmachine.kubevirt.io '
                                   '"starting": VM is not running')

    r = sub("virtualmachines", namespace, "starting", "migrate", {"addedNodeSelector": "b"})
    assert r.status_code == 400, r.text
    assert r.json()["message"] == (
        "Can not unmarshal Request body to struct, error: json: cannot unmarshal string into Go "
        "struct field MigrateOptions.addedNodeSelector of type map[string]string")
    r = sub("virtualmachines", namespace, "starting", "migrate", method="POST")
    assert r.status_code == 405, r.text
    assert _migrations(cluster, namespace) == []


def test_migrate_is_listed(cluster: Cluster) -> None:
    r = cluster.request("GET", "/apis/subresources.kubevirt.io/v1")
    names = {res["name"] for res in r.json()["resources"]}
    assert "virtualmachines/migrate" in names
