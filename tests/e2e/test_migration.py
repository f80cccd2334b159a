"""Live migration end to end (TCG, two nodes): the corpus's migration-job.yaml moves a running
guest to the other node; its serial counter keeps counting and its HTTP server answers through
the port forward before and after; cancel, a killed target, a policy timeout and a VM's
printableStatus."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.conftest import CORPUS
from tests.e2e.vmtools import KERNEL_IMAGE, TESTGUEST_IMAGE, Cluster, guest_cluster, wait_for
from virtshift import nodenet

pytestmark = pytest.mark.e2e

COUNTER = re.compile(r"COUNTER (\d+)")
USER_DATA = ("#!/bin/sh\n"
             "(i=0; while :; do echo \"COUNTER $i\"; i=$((i+1)); sleep 0.5; done) &\n")
VMIM = "/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstancemigrations"
DISK_MARK = "mirrored-disk-ok"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory both nodes see (as an NFS mount would be): hostDisks with shared: true."""
    return tmp_path_factory.mktemp("shared-disks")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "mig", nodes=2, args=["--hostdisk-dir", str(shared)],
                       disk_images=[TESTGUEST_IMAGE]) as c:
        yield c


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
        # data written to the node-local containerDisk (its overlay) must move with the VM
        console.send(f"\nprintf {DISK_MARK} | dd of=/dev/vda bs=512 seek=4000 conv=notrunc "
                     "2>/dev/null; sync; echo synced-$((3*3))\n")
        console.read_until("synced-9", 30)
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
    seen = still_counting(cluster, ns, "vmi-migratable")
    assert min(seen) > before, (before, seen)
    console = cluster.console(ns, "vmi-migratable")
    try:  # read it back from the target's disk, not from the guest's page cache
        console.send("\nsync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 "
                     "skip=4000 count=1 2>/dev/null | head -c 20; echo; echo read-$((4*4))\n")
        console.read_until("read-16", 30)
        assert DISK_MARK in console.text, console.text[-500:]  # not in the command line
    finally:
        console.close()
    page = http_through_forward(cluster, ns, "vmi-migratable")
    assert b"200 OK" in page, page[:200]
    ws = cluster.websocket(ns, "vmi-migratable", "vnc")  # VNC reaches the new node too
    try:
        greeting = ws.recv()
        assert (greeting if isinstance(greeting, bytes) else greeting.encode()).startswith(
            b"RFB 003.008"), greeting
    finally:
        ws.close()
    # the Ready condition is reported by the new node
    wait_for(lambda: (cluster.vmi(ns, "vmi-migratable") or {}).get("status", {}).get(
        "nodeName") == target, "the VMI to stay on the target", 10)


# ---- slow migrations: cancel, a killed target, a timeout, printableStatus --------------------

POLICIES = "/apis/migrations.kubevirt.io/v1alpha1/migrationpolicies"


def slow_policy(cluster: Cluster, name: str, label: str, bandwidth: str = "4Mi",
                **extra: Any) -> None:
    """A MigrationPolicy throttling the VMIs labelled ``mig=<label>`` (4 MiB/s: a migration of
    a 128 MiB guest takes about 20 s, long enough to act on it mid-way).

    Tests whose migration must complete use 32 MiB/s (about 3 s): under TCG, QEMU 7.2 corrupts
    the guest's memory in some pre-copy migrations that last about 20 s (seen with bare QEMU
    and the same command line too: 3 of 4 runs at 4 MiB/s; never in runs of 3 s or less)."""
    body = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name},
            "spec": {"bandwidthPerMigration": bandwidth,
                     "selectors": {"virtualMachineInstanceSelector": {"mig": label}},
                     **extra}}
    resp = cluster.request("POST", POLICIES, body)
    assert resp.status_code == 201, resp.text


def start_labelled(cluster: Cluster, ns: str, name: str, label: str,
                   user_data: str = USER_DATA) -> dict[str, Any]:
    """A VMI labelled ``mig=<label>`` (for a policy), booted and counting, LiveMigratable."""
    spec = migratable_spec(disk=False)
    spec["volumes"][0]["cloudInitNoCloud"]["userData"] = user_data
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                        "metadata": {"name": name, "labels": {"mig": label}}, "spec": spec})
    vmi = cluster.wait_vmi_phase(ns, name, "Running", timeout=120)
    console = cluster.console(ns, name)
    try:
        console.read_until("COUNTER 2", 120)
    finally:
        console.close()
    wait_migratable(cluster, ns, name)
    return vmi


def create_migration(cluster: Cluster, ns: str, name: str, vmi: str) -> None:
    resp = cluster.request("POST", VMIM.format(ns=ns), {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name}, "spec": {"vmiName": vmi}})
    assert resp.status_code == 201, resp.text


def progress_of(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    resp = cluster.request("GET", VMIM.format(ns=ns) + f"/{name}")
    if not resp.ok:
        return None
    raw = resp.json()["metadata"].get("annotations", {}).get("virtshift.io/migration-progress")
    if not raw:
        return None
    data: dict[str, Any] = json.loads(raw)
    return data if data.get("transferredBytes", 0) > 0 else None


def slow_migration_under_way(cluster: Cluster, ns: str, name: str, job: str,
                             bandwidth: str = "4Mi") -> dict[str, Any]:
    """A throttled migration of a fresh VMI ``name``, moving data; returns the VMI as it
    started."""
    slow_policy(cluster, f"slow-{ns}", ns, bandwidth)
    vmi = start_labelled(cluster, ns, name, ns)
    create_migration(cluster, ns, job, name)
    wait_migration(cluster, ns, job, ("Running",), 60)
    wait_for(lambda: progress_of(cluster, ns, job), "the migration to move data", 30)
    return vmi


def assert_still_on_source(cluster: Cluster, ns: str, name: str, source: str) -> None:
    vmi = cluster.vmi(ns, name)
    assert vmi is not None and vmi["status"]["phase"] == "Running"
    assert vmi["status"]["nodeName"] == source
    assert vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == source
    assert "kubevirt.io/migrationTargetNodeName" not in vmi["metadata"]["labels"]
    still_counting(cluster, ns, name)


def still_counting(cluster: Cluster, ns: str, name: str) -> list[int]:
    """Two fresh counter lines on the console, increasing, and no boot in between."""
    vmi = cluster.vmi(ns, name) or {}
    log = cluster.run_dir(vmi["metadata"]["uid"], vmi["status"]["nodeName"]) / "serial.log"
    console = cluster.console(ns, name)
    try:
        try:
            console.read_until(r"COUNTER \d+\r?\n", 30)
            console.read_until(r"COUNTER \d+\r?\n", 30, start=len(console.text))
        except AssertionError as e:
            tail = log.read_bytes()[-3000:].decode(errors="replace") if log.exists() else ""
            raise AssertionError(f"{e}\nserial log of {vmi['status']['nodeName']}:\n{tail}"
                                 ) from None
        seen = counters(console.text)
        assert len(seen) >= 2 and seen == sorted(seen), seen
        assert "TESTGUEST-READY" not in console.text  # it did not boot again
        return seen
    finally:
        console.close()


def events_of(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    resp = cluster.request("GET", f"/api/v1/namespaces/{ns}/events")
    return [e for e in resp.json()["items"] if e["involvedObject"]["name"] == name]


def test_cancel_mid_way_keeps_the_source(cluster: Cluster, ns: str) -> None:
    vmi = slow_migration_under_way(cluster, ns, "cancel-me", "cancel-job")
    source = vmi["status"]["nodeName"]
    progress = progress_of(cluster, ns, "cancel-job")
    assert progress is not None
    assert progress["totalBytes"] > 0 and progress["status"] == "active", progress
    cluster.kubectl.run("delete", "-n", ns, "vmim", "cancel-job", "--wait=false")
    wait_for(lambda: cluster.request("GET", VMIM.format(ns=ns) + "/cancel-job").status_code
             == 404, "the cancelled migration to go", 60)
    state = cluster.vmi(ns, "cancel-me")["status"]["migrationState"]  # type: ignore[index]
    assert state["abortRequested"] is True and state["abortStatus"] == "Succeeded", state
    assert state["failed"] is True and state["completed"] is True
    assert_still_on_source(cluster, ns, "cancel-me", source)
    target = state["targetNode"]
    wait_for(lambda: not cluster.run_dir(vmi["metadata"]["uid"], target).exists(),
             "the target QEMU to be discarded", 30)


def test_killed_target_fails_the_migration_not_the_vm(cluster: Cluster, ns: str) -> None:
    vmi = slow_migration_under_way(cluster, ns, "victim", "doomed")
    source, uid = vmi["status"]["nodeName"], vmi["metadata"]["uid"]
    target = cluster.vmi(ns, "victim")["status"]["migrationState"]["targetNode"]  # type: ignore
    os.kill(cluster.qemu_pid(uid, target), signal.SIGKILL)
    vmim = wait_migration(cluster, ns, "doomed", ("Succeeded", "Failed"), 60)
    assert vmim["status"]["phase"] == "Failed"
    state = cluster.vmi(ns, "victim")["status"]["migrationState"]  # type: ignore[index]
    assert state["failed"] is True and state["failureReason"], state
    assert_still_on_source(cluster, ns, "victim", source)
    reasons = {e["reason"] for e in events_of(cluster, ns, "doomed")}
    assert "FailedMigration" in reasons, reasons
    wait_for(lambda: not cluster.run_dir(uid, target).exists(), "the target to clean up", 30)


def test_policy_completion_timeout_aborts(cluster: Cluster, ns: str) -> None:
    # 1 s per GiB (a 128 MiB guest counts as one GiB) at 4 MiB/s cannot finish in time
    slow_policy(cluster, f"slow-{ns}", ns, completionTimeoutPerGiB=1)
    vmi = start_labelled(cluster, ns, "too-slow", ns)
    create_migration(cluster, ns, "timeout-job", "too-slow")
    vmim = wait_migration(cluster, ns, "timeout-job", ("Succeeded", "Failed"), 60)
    assert vmim["status"]["phase"] == "Failed"
    state = cluster.vmi(ns, "too-slow")["status"]["migrationState"]  # type: ignore[index]
    assert "timed out" in state["failureReason"], state
    assert state["migrationPolicyName"] == f"slow-{ns}"
    assert state["migrationConfiguration"]["bandwidthPerMigration"] == "4Mi"
    assert state["migrationConfiguration"]["completionTimeoutPerGiB"] == 1
    assert_still_on_source(cluster, ns, "too-slow", vmi["status"]["nodeName"])


def test_vm_printable_status_passes_through_migrating(cluster: Cluster, ns: str) -> None:
    slow_policy(cluster, f"slow-{ns}", ns, "32Mi")
    cluster.create(ns, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "movable"},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"mig": ns}}, "spec": migratable_spec(disk=False)}}})
    cluster.wait_printable(ns, "movable", "Running", 120)
    console = cluster.console(ns, "movable")
    try:
        console.read_until("COUNTER 2", 120)  # booted: what the console shows next is new
    finally:
        console.close()
    wait_migratable(cluster, ns, "movable")
    create_migration(cluster, ns, "move-vm", "movable")
    cluster.wait_printable(ns, "movable", "Migrating", 60)
    wait_migration(cluster, ns, "move-vm", ("Succeeded",), 120)
    cluster.wait_printable(ns, "movable", "Running", 60)
    still_counting(cluster, ns, "movable")


DIRTY_DATA = ("#!/bin/sh\ndd if=/dev/urandom of=/tmp/src bs=65536 count=256 2>/dev/null\n"
              "(while :; do cp /tmp/src /tmp/dst; done) &\n"
              "(i=0; while :; do echo \"COUNTER $i\"; i=$((i+1)); sleep 0.5; done) &\n")


def test_policy_post_copy_reaches_qemu(cluster: Cluster, ns: str) -> None:
    # pre-copy at 4 MiB/s cannot finish within 1 s; the policy allows post-copy, so the source
    # switches to it (QEMU's postcopy-ram on both sides) and the migration completes
    slow_policy(cluster, f"pc-{ns}", ns, completionTimeoutPerGiB=1, allowPostCopy=True)
    vmi = start_labelled(cluster, ns, "postcopy", ns, DIRTY_DATA)
    create_migration(cluster, ns, "pc-job", "postcopy")
    vmim = wait_migration(cluster, ns, "pc-job", ("Succeeded", "Failed"), 120)
    state = cluster.vmi(ns, "postcopy")["status"]["migrationState"]  # type: ignore[index]
    assert vmim["status"]["phase"] == "Succeeded", state
    assert state["mode"] == "PostCopy", state
    assert state["migrationConfiguration"]["allowPostCopy"] is True
    assert state["targetNode"] != vmi["status"]["nodeName"]
    still_counting(cluster, ns, "postcopy")


def test_policy_auto_converge_throttles_the_guest(cluster: Cluster, ns: str) -> None:
    # the guest rewrites 16 MiB faster than 8 MiB/s can carry it: without help this never
    # converges; with allowAutoConverge QEMU throttles the guest's CPU
    slow_policy(cluster, f"ac-{ns}", ns, allowAutoConverge=True, bandwidthPerMigration="8Mi")
    start_labelled(cluster, ns, "converge", ns, DIRTY_DATA)
    create_migration(cluster, ns, "ac-job", "converge")
    seen: list[dict[str, Any]] = []

    def throttled() -> dict[str, Any] | None:
        progress = progress_of(cluster, ns, "ac-job")
        if progress is not None:
            seen.append(progress)
        return progress if progress and progress.get("cpuThrottlePercentage", 0) > 0 else None
    try:
        try:
            progress = wait_for(throttled, "auto-converge to throttle the guest's CPU", 120, 0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}; progress seen: {seen[-3:]}") from None
    finally:
        cluster.kubectl.run("delete", "-n", ns, "vmim", "ac-job", "--wait=false")
    assert progress["iteration"] >= 2 and progress["status"] == "active", (progress, seen[-3:])


# ---- storage, refusals, drain, a cut-off target ---------------------------------------------

def hostdisk_spec(path: Path, *, shared: bool) -> dict[str, Any]:
    spec = migratable_spec(disk=False)
    spec["volumes"].insert(0, {"name": "data", "hostDisk": {
        "path": str(path), "type": "DiskOrCreate", "capacity": "16Mi", "shared": shared}})
    spec["domain"]["devices"]["disks"].insert(0, {"name": "data", "disk": {"bus": "virtio"}})
    return spec


def migrate_on_shared_disk(cluster: Cluster, ns: str, name: str, disk: Path,
                           marks: tuple[str, str]) -> None:
    """VMI ``name``, whose first disk is the shared file ``disk``, writes ``marks[0]`` there,
    migrates without copying any disk, and its target QEMU writes ``marks[1]`` to the very same
    file."""
    vmi = cluster.wait_vmi_phase(ns, name, "Running", timeout=120)
    wait_migratable(cluster, ns, name)
    got = cluster.vmi(ns, name)
    assert got is not None and got["status"]["migrationMethod"] == "LiveMigration", got["spec"]
    console = cluster.console(ns, name)
    try:
        console.wait_prompt()
        console.send(f"printf {marks[0]} > /dev/vda; sync; echo wrote-$((1+1))\n")
        console.read_until("wrote-2", 30)
    finally:
        console.close()
    assert disk.read_bytes().startswith(marks[0].encode())
    create_migration(cluster, ns, f"{name}-job", name)
    vmim = wait_migration(cluster, ns, f"{name}-job", ("Succeeded", "Failed"), 120)
    assert vmim["status"]["phase"] == "Succeeded", cluster.vmi(ns, name)
    target = cluster.vmi(ns, name)["status"]["nodeName"]  # type: ignore[index]
    assert target != vmi["status"]["nodeName"]
    progress = json.loads(vmim["metadata"]["annotations"]["virtshift.io/migration-progress"])
    assert progress["diskRemainingBytes"] == 0
    console = cluster.console(ns, name)
    try:
        console.send(f"\nprintf {marks[1]} > /dev/vda; sync; echo wrote-$((2+2))\n")
        console.read_until("wrote-4", 30)
    finally:
        console.close()
    assert disk.read_bytes().startswith(marks[1].encode())


def test_shared_disk_migrates_without_copying(cluster: Cluster, ns: str, shared: Path) -> None:
    disk = shared / f"{ns}.img"
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                        "metadata": {"name": "shared"},
                        "spec": hostdisk_spec(disk, shared=True)})
    migrate_on_shared_disk(cluster, ns, "shared", disk, ("before-migration",
                                                       "after-migration-ok"))


def test_migrate_refuses_a_vm_that_cannot_move(cluster: Cluster, ns: str, shared: Path) -> None:
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                        "metadata": {"name": "pinned-disk"},
                        "spec": {"runStrategy": "Always", "template": {
                            "spec": hostdisk_spec(shared / f"{ns}.img", shared=False)}}})
    cluster.wait_printable(ns, "pinned-disk", "Running", 120)

    def not_migratable() -> dict[str, Any] | None:
        conds = (cluster.vmi(ns, "pinned-disk") or {}).get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "LiveMigratable"
                     and c["status"] == "False"), None)
    cond = wait_for(not_migratable, "LiveMigratable=False", 60)
    assert cond["reason"] == "DisksNotLiveMigratable"
    out = cluster.cli("migrate", "pinned-disk", "-n", ns, check=False)
    assert out.returncode != 0
    text = (out.stdout + out.stderr).strip()
    assert "DisksNotLiveMigratable" in text and len(text.splitlines()) == 1, text
    resp = cluster.request("GET", VMIM.format(ns=ns))
    assert resp.json()["items"] == []


def test_drain_with_mixed_eviction_strategies(cluster: Cluster, ns: str, shared: Path) -> None:
    cluster.cli("cordon", "node02")
    try:
        specs = {"live": ("LiveMigrate", migratable_spec(disk=False)),
                 "restart": ("None", migratable_spec(disk=False)),
                 "ifpossible": ("LiveMigrateIfPossible",
                                hostdisk_spec(shared / f"{ns}-ip.img", shared=False))}
        for name, (strategy, spec) in specs.items():
            spec = {**spec, "evictionStrategy": strategy}
            cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                "metadata": {"name": name},
                                "spec": {"runStrategy": "Always", "template": {"spec": spec}}})
        before = {}
        for name in specs:
            cluster.wait_printable(ns, name, "Running", 120)
            vmi = cluster.vmi(ns, name)
            assert vmi is not None and vmi["status"]["nodeName"] == "node01"
            before[name] = vmi["metadata"]["uid"]
        wait_migratable(cluster, ns, "live")
    finally:
        cluster.cli("uncordon", "node02")
    drained = cluster.cli("drain", "node01", "--timeout", "180", timeout=240)
    assert "node/node01 drained" in drained.stdout, drained.stdout
    try:
        # LiveMigrate: the same VMI, moved; the others were stopped and restarted elsewhere
        live = cluster.vmi(ns, "live")
        assert live is not None and live["metadata"]["uid"] == before["live"]
        assert live["status"]["nodeName"] == "node02"
        assert live["status"]["migrationState"]["completed"] is True
        for name in ("restart", "ifpossible"):
            vmi = cluster.wait_new_vmi(ns, name, before[name], 120)
            cluster.wait_vmi_phase(ns, name, "Running", 120)
            assert cluster.vmi(ns, name)["status"]["nodeName"] == "node02"  # type: ignore
        node = cluster.request("GET", "/api/v1/nodes/node01").json()
        assert node["spec"]["unschedulable"] is True
        assert any(t["key"] == "kubevirt.io/drain" for t in node["spec"].get("taints", []))
    finally:
        cluster.cli("uncordon", "node01")
    node = cluster.request("GET", "/api/v1/nodes/node01").json()
    assert not node["spec"].get("unschedulable")
    assert not [t for t in node["spec"].get("taints", []) if t["key"] == "kubevirt.io/drain"]


def test_source_agent_restart_mid_way_still_completes(cluster: Cluster, ns: str) -> None:
    """kill -9 of the source node agent while QEMU migrates: QEMU carries on alone; the
    restarted agent re-attaches, sees how the migration went and reports it."""
    vmi = slow_migration_under_way(cluster, ns, "orphaned", "restart-job", "32Mi")
    source = vmi["status"]["nodeName"]
    old_agent = cluster.agent_pid(source)
    os.kill(old_agent, signal.SIGKILL)
    wait_for(lambda: cluster.agent_pid(source) != old_agent, "the agent to be restarted", 30)
    vmim = wait_migration(cluster, ns, "restart-job", ("Succeeded", "Failed"), 120)
    after = cluster.vmi(ns, "orphaned")
    assert vmim["status"]["phase"] == "Succeeded", after
    assert after is not None and after["status"]["nodeName"] != source
    still_counting(cluster, ns, "orphaned")


def test_zz_cut_off_target_aborts_and_keeps_the_source(cluster: Cluster, ns: str) -> None:
    """The target node loses the network mid-way: no progress for progressTimeout (5 s from
    the KubeVirt CR) aborts the migration; the guest runs on at the source."""
    kv = "/apis/kubevirt.io/v1/namespaces/default/kubevirts"
    resp = cluster.request("POST", kv, {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"migrations": {"progressTimeout": 5}}}})
    assert resp.status_code == 201, resp.text
    target = ""
    try:
        vmi = slow_migration_under_way(cluster, ns, "stranded", "cut-job")
        source = vmi["status"]["nodeName"]
        target = cluster.vmi(ns, "stranded")["status"]["migrationState"][  # type: ignore
            "targetNode"]
        assert cluster.vmi(ns, "stranded")["status"]["migrationState"]["migrationConfiguration"][  # type: ignore
            "progressTimeout"] == 5
        nodenet.cut_off(cluster.data_dir, target)
        vmim = wait_migration(cluster, ns, "cut-job", ("Succeeded", "Failed"), 90)
        assert vmim["status"]["phase"] == "Failed"
        state = cluster.vmi(ns, "stranded")["status"]["migrationState"]  # type: ignore
        assert "no progress" in state["failureReason"], state
        assert_still_on_source(cluster, ns, "stranded", source)
    finally:
        if target:
            nodenet.reconnect(cluster.data_dir, target)
        cluster.request("DELETE", kv + "/kubevirt")
    # back on the network, the target agent drops its half-received copy
    wait_for(lambda: not cluster.run_dir(vmi["metadata"]["uid"], target).exists(),
             "the stale target QEMU to be discarded", 60)


def test_rwx_claim_on_shared_storage_migrates_without_copying(cluster: Cluster, ns: str,
                                                              shared: Path) -> None:
    pool = shared / "rwx-pool"
    pool.mkdir(exist_ok=True)
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
          "metadata": {"name": f"shared-{ns}"}, "provisioner": "kubevirt.io.hostpath-provisioner",
          "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
          "parameters": {"sharedPath": str(pool)}}
    assert cluster.request("POST", "/apis/storage.k8s.io/v1/storageclasses", sc).status_code == 201

    def claim(name: str, cls: str | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                                "resources": {"requests": {"storage": "16Mi"}}}
        if cls:
            spec["storageClassName"] = cls
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name}, "spec": spec}

    pvcs = f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
    assert cluster.request("POST", pvcs, claim("local-rwx", None)).status_code == 201
    assert cluster.request("POST", pvcs, claim("data", f"shared-{ns}")).status_code == 201
    bound = wait_for(lambda: (p := cluster.request("GET", f"{pvcs}/data").json())["status"][
        "phase"] == "Bound" and p, "the RWX claim to bind", 30)
    pv = cluster.request("GET", f"/api/v1/persistentvolumes/{bound['spec']['volumeName']}").json()
    assert pv["spec"]["hostPath"]["path"].startswith(str(pool))
    assert "nodeAffinity" not in pv["spec"]
    refused = wait_for(lambda: next((e for e in events_of(cluster, ns, "local-rwx")
                                     if e["reason"] == "ProvisioningFailed"), None),
                       "ReadWriteMany refused on node-local storage", 30)
    assert "sharedPath" in refused["message"]

    spec = migratable_spec(disk=False)
    spec["volumes"].insert(0, {"name": "data", "persistentVolumeClaim": {"claimName": "data"}})
    spec["domain"]["devices"]["disks"].insert(0, {"name": "data", "disk": {"bus": "virtio"}})
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                        "metadata": {"name": "rwx"}, "spec": spec})
    image = Path(pv["spec"]["hostPath"]["path"]) / "disk.img"
    migrate_on_shared_disk(cluster, ns, "rwx", image, ("rwx-before", "rwx-after-ok"))
    cluster.request("DELETE", f"/apis/storage.k8s.io/v1/storageclasses/shared-{ns}")


def test_import_runs_on_the_node_the_vm_is_placed_on(cluster: Cluster, ns: str,
                                                     tmp_path: Path) -> None:
    """A WaitForFirstConsumer DataVolume of a VM pinned to node02 is provisioned and imported
    there: the importer runs in node02's network namespace and fetches from the host."""
    from tests.e2e.test_datavolume import Server, sha
    from virtshift.testing.guest import GuestImages

    net = nodenet.load(cluster.data_dir)
    assert net is not None
    guest = GuestImages.locate().disk
    (tmp_path / "guest.qcow2").write_bytes(guest.read_bytes())
    server = Server(tmp_path, host=net.gateway)
    try:
        spec = migratable_spec(disk=False)
        spec["nodeSelector"] = {"kubernetes.io/hostname": "node02"}
        spec["volumes"].insert(0, {"name": "data", "dataVolume": {"name": "imported"}})
        spec["domain"]["devices"]["disks"].insert(0, {"name": "data", "disk": {"bus": "virtio"}})
        vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
              "metadata": {"name": "placed"},
              "spec": {"runStrategy": "Always", "template": {"spec": spec},
                       "dataVolumeTemplates": [{"metadata": {"name": "imported"}, "spec": {
                           "source": {"http": {"url": server.url("guest.qcow2")}},
                           "storage": {"resources": {"requests": {"storage": "96Mi"}}}}}]}}
        cluster.create(ns, vm)
        vmi = cluster.wait_vmi_phase(ns, "placed", "Running", timeout=120)
        assert vmi["status"]["nodeName"] == "node02"
        dvs = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes/imported"
        assert cluster.request("GET", dvs).json()["status"]["phase"] == "Succeeded"
        pvc = cluster.request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/"
                                     "imported").json()
        assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "node02"
        pv = cluster.request("GET", f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}"
                             ).json()
        image = Path(pv["spec"]["hostPath"]["path"]) / "disk.img"
        assert image.is_relative_to(cluster.data_dir / "nodes" / "node02")
        raw = tmp_path / "guest.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest), str(raw)], check=True)
        assert sha(image, raw.stat().st_size) == sha(raw, raw.stat().st_size)
    finally:
        server.close()


def test_clone_to_another_node_is_host_assisted(cluster: Cluster, ns: str,
                                                tmp_path: Path) -> None:
    """A golden DataVolume on one node, cloned by a VM's dataVolumeTemplate for a VM pinned to
    the other node: the copy streams from the source node's agent to the target's."""
    from tests.e2e.test_datavolume import Server, sha
    from virtshift.testing.guest import GuestImages

    net = nodenet.load(cluster.data_dir)
    assert net is not None
    guest = GuestImages.locate().disk
    (tmp_path / "guest.qcow2").write_bytes(guest.read_bytes())
    server = Server(tmp_path, host=net.gateway)
    dvs = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes"
    try:
        golden = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                  "metadata": {"name": "golden", "annotations": {
                      "cdi.kubevirt.io/storage.bind.immediate.requested": "true"}},
                  "spec": {"source": {"http": {"url": server.url("guest.qcow2")}},
                           "storage": {"resources": {"requests": {"storage": "80Mi"}}}}}
        assert cluster.request("POST", dvs, golden).status_code == 201
        wait_for(lambda: cluster.request("GET", f"{dvs}/golden").json().get("status", {}).get(
            "phase") == "Succeeded", "the golden image to be imported", 90)
    finally:
        server.close()

    def volume(claim: str) -> dict[str, Any]:
        pvc = cluster.request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        out: dict[str, Any] = cluster.request(
            "GET", f"/api/v1/persistentvolumes/{pvc.json()['spec']['volumeName']}").json()
        return out

    source = volume("golden")
    source_node = source["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"][0]
    other = "node02" if source_node == "node01" else "node01"
    spec = migratable_spec(disk=False)
    spec["nodeSelector"] = {"kubernetes.io/hostname": other}
    spec["volumes"].insert(0, {"name": "data", "dataVolume": {"name": "copy"}})
    spec["domain"]["devices"]["disks"].insert(0, {"name": "data", "disk": {"bus": "virtio"}})
    cluster.create(ns, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                        "metadata": {"name": "cloned"},
                        "spec": {"runStrategy": "Always", "template": {"spec": spec},
                                 "dataVolumeTemplates": [{"metadata": {"name": "copy"}, "spec": {
                                     "source": {"pvc": {"namespace": ns, "name": "golden"}},
                                     "storage": {}}}]}})
    vmi = cluster.wait_vmi_phase(ns, "cloned", "Running", timeout=120)
    assert vmi["status"]["nodeName"] == other
    copy = volume("copy")
    assert copy["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"] == [other]
    assert copy["spec"]["capacity"]["storage"] == "80Mi"  # the source's size
    image = Path(copy["spec"]["hostPath"]["path"]) / "disk.img"
    original = Path(source["spec"]["hostPath"]["path"]) / "disk.img"
    assert sha(image, 80 * 2**20) == sha(original, 80 * 2**20)
