"""Persistent volumes end to end (TCG): a WaitForFirstConsumer claim of the default class is
provisioned on the node its VM is scheduled to, the guest's writes survive a stop/start and a new
VM on the same claim, and deleting the claim deletes the volume and its directory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_vm_lifecycle import kernel_vm
from tests.e2e.vmtools import Cluster, guest_cluster, wait_for

pytestmark = pytest.mark.e2e

NS = "storage"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "pvc",
                       env={"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "2"}) as c:
        c.kubectl.run("create", "namespace", NS)
        yield c


def pvc_vm(name: str) -> dict[str, Any]:
    vm = kernel_vm(name, "Always")
    spec = vm["spec"]["template"]["spec"]
    spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    spec["domain"]["devices"]["disks"] = [{"name": "data", "disk": {"bus": "virtio"}}]
    return vm


def run_in_guest(cluster: Cluster, name: str, command: str, until: str, ns: str = NS) -> str:
    """The console output of ``command`` typed at VMI ``ns/name``'s shell, up to ``until``."""
    console = cluster.console(ns, name)
    try:
        console.wait_prompt()
        mark = len(console.text)
        console.send(command + "\n")
        return console.read_until(until, 30, start=mark)[mark:]
    finally:
        console.close()


def get(cluster: Cluster, path: str) -> dict[str, Any] | None:
    r = cluster.request("GET", path)
    out: dict[str, Any] | None = r.json() if r.ok else None
    return out


def test_pvc_is_provisioned_where_the_vm_runs_and_keeps_its_data(cluster: Cluster) -> None:
    sc = wait_for(lambda: get(cluster, "/apis/storage.k8s.io/v1/storageclasses/"
                                       "hostpath-provisioner"), "the default StorageClass", 30)
    assert sc["provisioner"] == "kubevirt.io.hostpath-provisioner"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"

    pvcs = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
    r = cluster.request("POST", pvcs, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}}}})
    assert r.status_code == 201, r.text
    uid = r.json()["metadata"]["uid"]
    # No consumer yet: the claim waits (and gets the default class).
    wait_for(lambda: (get(cluster, f"{pvcs}/data") or {}).get("spec", {}).get(
        "storageClassName") == "hostpath-provisioner", "the default class in the claim", 30)
    assert get(cluster, f"/api/v1/persistentvolumes/pvc-{uid}") is None
    assert (get(cluster, f"{pvcs}/data") or {})["status"]["phase"] == "Pending"

    cluster.create(NS, pvc_vm("first"))
    vmi = cluster.wait_vmi_phase(NS, "first", "Running")
    assert vmi["status"]["nodeName"] == "node01"
    pvc = get(cluster, f"{pvcs}/data") or {}
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"]["volumeName"] == f"pvc-{uid}"
    assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "node01"
    pv = get(cluster, f"/api/v1/persistentvolumes/pvc-{uid}") or {}
    assert pv["status"]["phase"] == "Bound"
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"] == ["node01"]
    directory = cluster.data_dir / "nodes" / "node01" / "storage" / f"pvc-{uid}"
    assert pv["spec"]["hostPath"]["path"] == str(directory)
    assert (directory / "disk.img").stat().st_size == 64 * 1024 * 1024
    live = wait_for(lambda: next((c for c in (cluster.vmi(NS, "first") or {})["status"].get(
        "conditions", []) if c["type"] == "LiveMigratable"), None), "LiveMigratable", 30)
    assert live["status"] == "False", live

    out = run_in_guest(cluster, "first",
                       "printf 'pvc-%s' $((6*7)) > /dev/vda; sync; echo wrote-$((1+1))",
                       r"wrote-2\s")
    assert "wrote-2" in out

    cluster.cli("stop", "first", "-n", NS)
    cluster.wait_vmi_gone(NS, "first")
    cluster.cli("start", "first", "-n", NS)
    cluster.wait_vmi_phase(NS, "first", "Running")
    read = "echo 3 > /proc/sys/vm/drop_caches; head -c 6 /dev/vda; echo; echo read-$((2+2))"
    out = run_in_guest(cluster, "first", read, r"read-4\s")
    assert "pvc-42" in out, out

    cluster.kubectl.run("delete", "vm", "-n", NS, "first")
    cluster.wait_vmi_gone(NS, "first")
    cluster.create(NS, pvc_vm("second"))
    cluster.wait_vmi_phase(NS, "second", "Running")
    out = run_in_guest(cluster, "second", read, r"read-4\s")
    assert "pvc-42" in out, out
    cluster.kubectl.run("delete", "vm", "-n", NS, "second")
    cluster.wait_vmi_gone(NS, "second")

    # Reclaim policy Delete: the volume goes with the claim, and the node removes its data.
    cluster.kubectl.run("delete", "pvc", "-n", NS, "data")
    wait_for(lambda: cluster.request("GET", f"/api/v1/persistentvolumes/pvc-{uid}")
             .status_code == 404, "the volume to be deleted", 30)
    wait_for(lambda: not directory.exists(), "the volume's directory to be removed", 30)
