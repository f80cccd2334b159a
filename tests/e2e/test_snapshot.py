"""VM snapshots and restores end to end (TCG): an online snapshot of a running VM (the test guest
has no guest agent: indications Online and NoGuestAgent), a change in the guest, a restore into the
stopped VM that brings the snapshotted data back; an offline snapshot, a restore into a new VM, and
deleting a snapshot removes its content and the copies on the node."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_pvc import NS, pvc_vm, run_in_guest
from tests.e2e.vmtools import Cluster, guest_cluster, wait_for

pytestmark = pytest.mark.e2e

SNAP = f"/apis/snapshot.kubevirt.io/v1beta1/namespaces/{NS}"
READ = "echo 3 > /proc/sys/vm/drop_caches; head -c 12 /dev/vda; echo; echo read-$((2+2))"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "snap",
                       env={"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "2"}) as c:
        c.kubectl.run("create", "namespace", NS)
        yield c


def get(cluster: Cluster, path: str) -> dict[str, Any] | None:
    r = cluster.request("GET", path)
    out: dict[str, Any] | None = r.json() if r.ok else None
    return out


def write_marker(cluster: Cluster, vm: str, marker: str) -> None:
    out = run_in_guest(cluster, vm, f"printf '{marker}' > /dev/vda; sync; echo wrote-$((1+1))",
                       r"wrote-2\s")
    assert "wrote-2" in out, out


def read_marker(cluster: Cluster, vm: str) -> str:
    return run_in_guest(cluster, vm, READ, r"read-4\s")


def snapshot(cluster: Cluster, name: str, vm: str) -> dict[str, Any]:
    r = cluster.request("POST", f"{SNAP}/virtualmachinesnapshots", {
        "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
        "metadata": {"name": name},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}}})
    assert r.status_code == 201, r.text

    def ready() -> dict[str, Any] | None:
        s = get(cluster, f"{SNAP}/virtualmachinesnapshots/{name}") or {}
        return s if (s.get("status") or {}).get("readyToUse") is True else None
    try:
        return wait_for(ready, f"snapshot {name} to be ready", 90)
    except AssertionError as e:
        dump = json.dumps(get(cluster, f"{SNAP}/virtualmachinesnapshots/{name}"), indent=1)
        raise AssertionError(f"{e}\n{dump}\n{cluster.platform.log_text()[-4000:]}") from None


def restore(cluster: Cluster, name: str, target: str, snap: str) -> dict[str, Any]:
    r = cluster.request("POST", f"{SNAP}/virtualmachinerestores", {
        "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
        "metadata": {"name": name},
        "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                            "name": target},
                 "virtualMachineSnapshotName": snap}})
    assert r.status_code == 201, r.text

    def done() -> dict[str, Any] | None:
        s = get(cluster, f"{SNAP}/virtualmachinerestores/{name}") or {}
        return s if (s.get("status") or {}).get("complete") is True else None
    try:
        return wait_for(done, f"restore {name} to complete", 90)
    except AssertionError as e:
        dump = json.dumps(get(cluster, f"{SNAP}/virtualmachinerestores/{name}"), indent=1)
        raise AssertionError(f"{e}\n{dump}\n{cluster.platform.log_text()[-4000:]}") from None


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", ""))
            for c in obj["status"].get("conditions", [])}


def events_of(cluster: Cluster, name: str) -> list[str]:
    items = (get(cluster, f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
    return [e["reason"] for e in items if e["involvedObject"]["name"] == name]


def content_of(cluster: Cluster, snap: dict[str, Any]) -> dict[str, Any]:
    name = snap["status"]["virtualMachineSnapshotContentName"]
    content = get(cluster, f"{SNAP}/virtualmachinesnapshotcontents/{name}")
    assert content is not None
    return content


def test_online_snapshot_then_restore_brings_the_data_back(cluster: Cluster) -> None:
    r = cluster.request("POST", f"/api/v1/namespaces/{NS}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}}}})
    assert r.status_code == 201, r.text
    vm_uid = cluster.create(NS, pvc_vm("snapvm"))["metadata"]["uid"]
    cluster.wait_vmi_phase(NS, "snapvm", "Running")
    write_marker(cluster, "snapvm", "marker-AAAAA")
    wait_for(lambda: any(c["type"] == "AgentConnected" and c["status"] == "True" for c in (
        (cluster.vmi(NS, "snapvm") or {}).get("status") or {}).get("conditions", [])),
        "the guest agent to connect", 60)

    snap = snapshot(cluster, "online", "snapvm")
    st = snap["status"]
    assert st["phase"] == "Succeeded"
    assert st["sourceUID"] == vm_uid
    # The test guest runs qemu-guest-agent: its filesystems were frozen for the copy.
    assert st["indications"] == ["GuestAgent", "Online"], st
    assert {i["indication"] for i in st["sourceIndications"]} == {"GuestAgent", "Online"}
    assert conditions(snap)["Ready"] == ("True", "Ready")
    assert conditions(snap)["Progressing"] == ("False", "Operation complete")
    assert st["snapshotVolumes"] == {"includedVolumes": ["data"]}
    assert st["creationTime"]
    content = content_of(cluster, snap)
    [backup] = content["spec"]["volumeBackups"]
    assert backup["volumeName"] == "data"
    assert backup["persistentVolumeClaim"]["metadata"]["name"] == "data"
    assert backup["volumeSnapshotName"] == f"vmsnapshot-{snap['metadata']['uid']}-volume-data"
    assert content["spec"]["source"]["virtualMachine"]["metadata"]["name"] == "snapvm"
    assert content["status"]["readyToUse"] is True
    ann = content["metadata"]["annotations"]
    assert ann["virtshift.io/snapshot-node"] == "node01"
    copy = Path(ann["virtshift.io/snapshot-dir"]) / "data.img"
    assert copy.parent == (cluster.data_dir / "nodes" / "node01" / "storage" / "snapshots"
                           / content["metadata"]["uid"])
    assert copy.read_bytes()[:12] == b"marker-AAAAA"
    assert copy.stat().st_size == 64 * 1024 * 1024
    stats = json.loads(ann["virtshift.io/snapshot-stats"])
    assert stats["online"] is True and stats["frozen"] is True, stats
    assert stats["frozenMs"] < 5000, stats
    assert stats["pausedMs"] < 2000, stats
    assert stats["bytes"] < 16 * 1024 * 1024, stats  # as sparse as the volume
    assert "SuccessfulVirtualMachineSnapshotContentCreate" in events_of(cluster, "online")
    def unlocked() -> dict[str, Any] | None:
        v = cluster.vm(NS, "snapvm")
        return v if v and not (v.get("status") or {}).get("snapshotInProgress") else None
    vm = wait_for(unlocked, "the VM to be unlocked", 30)
    assert "snapshot.kubevirt.io/snapshot-source-protection" not in vm["metadata"].get(
        "finalizers", [])
    assert vm["status"]["volumeSnapshotStatuses"] == [{"name": "data", "enabled": True}]

    # A restore into the running VM with FailImmediate fails at once, and can be deleted.
    r = cluster.request("POST", f"{SNAP}/virtualmachinerestores", {
        "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
        "metadata": {"name": "too-early"},
        "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                            "name": "snapvm"},
                 "virtualMachineSnapshotName": "online", "targetReadinessPolicy": "FailImmediate"}})
    assert r.status_code == 201, r.text
    def failed_restore() -> dict[str, Any] | None:
        x = get(cluster, f"{SNAP}/virtualmachinerestores/too-early")
        return x if x and x.get("status") and "Failure" in conditions(x) else None
    failed = wait_for(failed_restore, "the restore to fail", 30)
    assert conditions(failed)["Failure"] == ("True", "Restore target not ready")
    assert failed["status"]["complete"] is False
    assert "RestoreTargetNotReady" in events_of(cluster, "too-early")
    assert cluster.request("DELETE", f"{SNAP}/virtualmachinerestores/too-early").ok
    wait_for(lambda: cluster.request("GET", f"{SNAP}/virtualmachinerestores/too-early")
             .status_code == 404, "the failed restore to go", 30)

    # The guest keeps running; change the data, stop, restore: the change is gone.
    write_marker(cluster, "snapvm", "marker-BBBBB")
    assert "marker-BBBBB" in read_marker(cluster, "snapvm")
    cluster.cli("stop", "snapvm", "-n", NS)
    cluster.wait_vmi_gone(NS, "snapvm")

    done = restore(cluster, "back", "snapvm", "online")
    [vr] = done["status"]["restores"]
    claim = f"restore-{done['metadata']['uid']}-data"
    assert vr == {"volumeName": "data", "persistentVolumeClaim": claim,
                  "volumeSnapshotName": backup["volumeSnapshotName"]}
    assert done["status"]["restoreTime"]
    assert conditions(done)["Ready"] == ("True", "Operation complete")
    vm = cluster.vm(NS, "snapvm") or {}
    assert vm["spec"]["template"]["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    assert vm["spec"]["runStrategy"] == "Halted"
    assert vm["metadata"]["annotations"]["restore.kubevirt.io/lastRestoreUID"] == \
        f"back-{done['metadata']['uid']}"
    assert "restoreInProgress" not in (vm.get("status") or {})
    pvc = get(cluster, f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{claim}") or {}
    assert pvc["spec"]["resources"]["requests"]["storage"] == "64Mi"
    assert pvc["metadata"]["annotations"]["restore.kubevirt.io/name"] == "back"
    assert "VirtualMachineRestoreComplete" in events_of(cluster, "back")

    cluster.cli("start", "snapvm", "-n", NS)
    cluster.wait_vmi_phase(NS, "snapvm", "Running", timeout=120)
    out = read_marker(cluster, "snapvm")
    assert "marker-AAAAA" in out, out


def test_offline_snapshot_restore_into_a_new_vm_and_delete(cluster: Cluster) -> None:
    if cluster.vmi(NS, "snapvm") is None:
        pytest.skip("needs the VM of the online test")
    write_marker(cluster, "snapvm", "marker-CCCCC")
    cluster.cli("stop", "snapvm", "-n", NS)
    cluster.wait_vmi_gone(NS, "snapvm")

    snap = snapshot(cluster, "offline", "snapvm")
    assert snap["status"]["phase"] == "Succeeded"
    assert "indications" not in snap["status"], snap["status"]
    content = content_of(cluster, snap)
    ann = content["metadata"]["annotations"]
    assert json.loads(ann["virtshift.io/snapshot-stats"])["online"] is False
    directory = Path(ann["virtshift.io/snapshot-dir"])
    assert (directory / "data.img").read_bytes()[:12] == b"marker-CCCCC"

    done = restore(cluster, "clone", "newvm", "offline")
    vm = cluster.vm(NS, "newvm") or {}
    assert vm["spec"]["runStrategy"] == "Halted"
    claim = f"restore-{done['metadata']['uid']}-data"
    assert vm["spec"]["template"]["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    cluster.cli("start", "newvm", "-n", NS)
    cluster.wait_vmi_phase(NS, "newvm", "Running", timeout=120)
    out = read_marker(cluster, "newvm")
    assert "marker-CCCCC" in out, out

    # Deleting the snapshot (deletionPolicy unset: Delete) deletes its content and the copies.
    r = cluster.request("DELETE", f"{SNAP}/virtualmachinesnapshots/offline")
    assert r.ok, r.text
    wait_for(lambda: cluster.request("GET", f"{SNAP}/virtualmachinesnapshotcontents/"
                                            f"{content['metadata']['name']}").status_code == 404,
             "the content to be deleted", 30)
    wait_for(lambda: not directory.exists(), "the copies to be removed", 30)

    # A content deleted while the node agent is down: its copies go when the agent is back.
    online = get(cluster, f"{SNAP}/virtualmachinesnapshots/online")
    assert online is not None
    kept = content_of(cluster, online)
    kept_dir = Path(kept["metadata"]["annotations"]["virtshift.io/snapshot-dir"])
    assert (kept_dir / "data.img").exists()
    agent = cluster.agent_pid()
    os.kill(agent, signal.SIGKILL)
    assert cluster.request("DELETE", f"{SNAP}/virtualmachinesnapshots/online").ok
    wait_for(lambda: cluster.request("GET", f"{SNAP}/virtualmachinesnapshotcontents/"
                                            f"{kept['metadata']['name']}").status_code == 404,
             "the content to be deleted", 30)
    wait_for(lambda: cluster.agent_pid() != agent, "the platform to restart the agent", 30)
    wait_for(lambda: not kept_dir.exists(), "the copies to be removed after the restart", 30)
