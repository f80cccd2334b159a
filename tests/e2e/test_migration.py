"""Live migration end to end (TCG, two nodes): the corpus's migration-job.yaml moves a running
guest to the other node; its serial counter keeps counting and its HTTP server answers through
the port forward before and after; cancel, a killed target, a policy timeout and a VM's
printableStatus."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websocket

from tests.conftest import CORPUS, Kubectl
from tests.e2e.vmtools import KERNEL_IMAGE, TESTGUEST_IMAGE, Cluster, wait_for
from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

COUNTER = re.compile(r"COUNTER (\d+)")
USER_DATA = ("#!/bin/sh\n"
             "(i=0; while :; do echo \"COUNTER $i\"; i=$((i+1)); sleep 0.5; done) &\n")
VMIM = "/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstancemigrations"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    images = GuestImages.locate()
    p = PlatformProcess(tmp_path_factory.mktemp("mig"),
                        args=["--nodes", "2", "--accel", "tcg"])
    p.start()
    c = Cluster(p, Kubectl(p.kubeconfig, tmp_path_factory.mktemp("kubectl-cache")))
    try:
        for node in ("node01", "node02"):
            wait_for(lambda n=node: c.request("GET", f"/api/v1/nodes/{n}").ok,  # type: ignore[misc]
                     f"{node} to register", 90)
        c.cli("image", "import", TESTGUEST_IMAGE, str(images.disk))
        c.cli("image", "import", KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
              str(images.initrd), "--cmdline", "console=ttyS0 quiet")
        yield c
    finally:
        p.stop()
        c.kill_leftover_qemus()


@pytest.fixture
def ns(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "mig-" + request.node.name.lower().replace("_", "-")[5:40].strip("-")
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-").strip("-")
    cluster.kubectl.run("create", "namespace", name)
    yield name
    cluster.kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def migratable_spec(*, disk: bool = True, memory: str = "128Mi") -> dict[str, Any]:
    """vmi-migratable.yaml's shape (containerDisk, masquerade) booting the test guest fast by
    kernelBoot, with a serial counter."""
    volumes: list[dict[str, Any]] = [
        {"name": "cloudinit", "cloudInitNoCloud": {"userData": USER_DATA}}]
    disks: list[dict[str, Any]] = [{"name": "cloudinit", "disk": {"bus": "virtio"}}]
    if disk:
        volumes.insert(0, {"name": "containerdisk", "containerDisk": {"image": TESTGUEST_IMAGE}})
        disks.insert(0, {"name": "containerdisk", "disk": {"bus": "virtio"}})
    return {
        "terminationGracePeriodSeconds": 0,
        "domain": {
            "firmware": {"kernelBoot": {"container": {
                "image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz",
                "initrdPath": "/boot/initrd.img"}}},
            "devices": {"disks": disks, "interfaces": [
                {"name": "default", "masquerade": {}, "ports": [{"port": 80}]}]},
            "memory": {"guest": memory},
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": volumes,
    }


def start_vmi(cluster: Cluster, ns: str, name: str, **kw: Any) -> dict[str, Any]:
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                        "metadata": {"name": name, "labels": {"special": name}},
                        "spec": migratable_spec(**kw)})
    return cluster.wait_vmi_phase(ns, name, "Running", timeout=120)


def counters(text: str) -> list[int]:
    return [int(m) for m in COUNTER.findall(text)]


def http_through_forward(cluster: Cluster, ns: str, name: str) -> bytes:
    ws = cluster.websocket(ns, name, "portforward/80")
    try:
        ws.send_binary(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 30
        while b"</html>" not in data and time.monotonic() < deadline:
            try:
                frame = ws.recv()
            except websocket.WebSocketConnectionClosedException:
                break
            data += frame if isinstance(frame, bytes) else frame.encode()
        return data
    finally:
        ws.close()


def wait_migratable(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        vmi = cluster.vmi(ns, name)
        conds = (vmi or {}).get("status", {}).get("conditions") or []
        ok = any(c.get("type") == "LiveMigratable" and c.get("status") == "True" for c in conds)
        return vmi if ok else None
    return wait_for(check, f"{name} to be LiveMigratable", 60)


def wait_migration(cluster: Cluster, ns: str, name: str, phases: tuple[str, ...],
                   timeout: float = 120) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        resp = cluster.request("GET", VMIM.format(ns=ns) + f"/{name}")
        if not resp.ok:
            return None
        obj: dict[str, Any] = resp.json()
        return obj if obj.get("status", {}).get("phase") in phases else None
    return wait_for(check, f"migration {name} to reach {phases}", timeout)


def test_migration_job_moves_a_running_guest(cluster: Cluster, ns: str) -> None:
    vmi = start_vmi(cluster, ns, "vmi-migratable")
    source = vmi["status"]["nodeName"]
    console = cluster.console(ns, "vmi-migratable")
    try:
        console.read_until("COUNTER 3", 120)
        before = max(counters(console.text))
    finally:
        console.close()
    page = http_through_forward(cluster, ns, "vmi-migratable")
    assert b"200 OK" in page, page[:200]
    wait_migratable(cluster, ns, "vmi-migratable")

    cluster.kubectl.run("apply", "-n", ns, "-f", str(CORPUS / "migration-job.yaml"))
    vmim = wait_migration(cluster, ns, "migration-job", ("Succeeded", "Failed"))
    after_vmi = cluster.vmi(ns, "vmi-migratable")
    assert after_vmi is not None
    state = after_vmi["status"]["migrationState"]
    assert vmim["status"]["phase"] == "Succeeded", (vmim["status"], state)
    target = state["targetNode"]
    assert target != source and state["sourceNode"] == source
    assert state["completed"] is True and not state.get("failed")
    assert state["startTimestamp"] and state["endTimestamp"]
    assert after_vmi["status"]["nodeName"] == target
    labels = after_vmi["metadata"]["labels"]
    assert labels["kubevirt.io/nodeName"] == target
    assert "kubevirt.io/migrationTargetNodeName" not in labels
    phases = [p["phase"] for p in vmim["status"]["phaseTransitionTimestamps"]]
    assert phases[-1] == "Succeeded" and "Scheduled" in phases and "Running" in phases, phases
    # the source's QEMU is gone, the target's runs the same guest (no reboot: the counter
    # carries on from where it was)
    wait_for(lambda: not cluster.run_dir(vmi["metadata"]["uid"], source).exists(),
             "the source run directory to go", 30)
    assert cluster.qemu_pid(vmi["metadata"]["uid"], target) > 0
    console = cluster.console(ns, "vmi-migratable")
    try:
        console.read_until(r"COUNTER \d+\r?\n", 30)
        console.read_until(r"COUNTER \d+\r?\n", 30, start=len(console.text))
        seen = counters(console.text)
        assert len(seen) >= 2 and seen == sorted(seen), seen
        assert min(seen) > before, (before, seen)
        assert "TESTGUEST-READY" not in console.text  # it did not boot again
    finally:
        console.close()
    page = http_through_forward(cluster, ns, "vmi-migratable")
    assert b"200 OK" in page, page[:200]
    # the Ready condition is reported by the new node
    wait_for(lambda: (cluster.vmi(ns, "vmi-migratable") or {}).get("status", {}).get(
        "nodeName") == target, "the VMI to stay on the target", 10)
