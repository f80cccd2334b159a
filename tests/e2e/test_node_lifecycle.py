"""A node is lost and comes back (real platform with two node agents, real QEMU under TCG):
its Node goes Ready=Unknown with the unreachable taints, the VMI of a runStrategy Always VM on
it is failed (NodeUnresponsive) and restarted on the other node, and once the agent returns the
node is Ready and untainted again and the old QEMU is gone.

The agent is first frozen (SIGSTOP), not killed: the platform restarts a dead agent within a
second, long before any grace period; a frozen agent is what a cut-off node looks like (its QEMU
keeps running, nobody heartbeats). It is then killed with SIGKILL, and the platform restarts it:
that is the node returning."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Kubectl
from tests.e2e.test_vm_lifecycle import kernel_vm, uid_of
from tests.e2e.vmtools import KERNEL_IMAGE, Cluster, wait_for
from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

UNREACHABLE = "node.kubernetes.io/unreachable"
TIMINGS = {"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "1",
           "VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "4",
           "VIRTSHIFT_NODE_FAILOVER_SECONDS": "4"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    images = GuestImages.locate()
    p = PlatformProcess(tmp_path_factory.mktemp("nodes"),
                        args=["--nodes", "2", "--accel", "tcg"], env=TIMINGS)
    p.start()
    c = Cluster(p, Kubectl(p.kubeconfig, tmp_path_factory.mktemp("kubectl-cache")))
    try:
        wait_for(lambda: ready(c, "node01") == ready(c, "node02") == "True",
                 "both nodes to be Ready", 60)
        c.cli("image", "import", KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
              str(images.initrd), "--cmdline", "console=ttyS0 quiet")
        yield c
    finally:
        for name in ("node01", "node02"):  # a frozen agent would ignore the platform's SIGTERM
            with contextlib.suppress(OSError, ValueError):
                os.kill(c.agent_pid(name), signal.SIGCONT)
        p.stop()
        c.kill_leftover_qemus()


def node(c: Cluster, name: str) -> dict[str, Any]:
    r = c.request("GET", f"/api/v1/nodes/{name}")
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def ready(c: Cluster, name: str) -> str:
    r = c.request("GET", f"/api/v1/nodes/{name}")
    if not r.ok:
        return ""
    conds = (r.json().get("status") or {}).get("conditions") or []
    return next((str(x.get("status")) for x in conds if x.get("type") == "Ready"), "")


def unreachable_effects(n: dict[str, Any]) -> set[str]:
    return {str(t.get("effect")) for t in (n.get("spec") or {}).get("taints") or []
            if t.get("key") == UNREACHABLE}


def qemus_of(run_dir: Path) -> list[int]:
    """Pids of qemu-system processes whose command line names the VMI's run directory (or
    the short /tmp link the agent makes for it when the path is too long for a socket)."""
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    marks = (str(run_dir).encode(), f"/tmp/virtshift-{digest}/".encode())
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and any(m in cmdline for m in marks):
            out.append(int(proc.name))
    return out


def test_lost_node_fails_over_and_returns_clean(cluster: Cluster) -> None:
    ns = "failover"
    cluster.kubectl.run("create", "namespace", ns)
    cluster.create(ns, kernel_vm("ha", "Always"))
    first = cluster.wait_vmi_phase(ns, "ha", "Running", timeout=60)
    old_uid = uid_of(first)
    lost = first["status"]["nodeName"]
    other = "node02" if lost == "node01" else "node01"
    qemu_pid = cluster.qemu_pid(old_uid, node=lost)
    run_dir = cluster.run_dir(old_uid, lost)
    assert qemu_pid in qemus_of(run_dir)
    recorder = cluster.record_vmi(ns, "ha")
    agent = cluster.agent_pid(lost)
    started = time.monotonic()
    os.kill(agent, signal.SIGSTOP)
    try:
        # The node lifecycle: Ready=Unknown, both unreachable taints, unschedulable label.
        def marked() -> dict[str, Any] | None:
            n = node(cluster, lost)
            return n if ready(cluster, lost) == "Unknown" and unreachable_effects(n) == {
                "NoSchedule", "NoExecute"} else None
        n = wait_for(marked, f"{lost} to go Ready=Unknown and tainted", 20)
        cond = next(x for x in n["status"]["conditions"] if x["type"] == "Ready")
        assert cond["reason"] == "NodeStatusUnknown"
        assert cond["message"] == "Kubelet stopped posting node status."
        assert cond.get("lastHeartbeatTime")
        assert n["metadata"]["labels"]["kubevirt.io/schedulable"] == "false"
        assert all(t.get("timeAdded") for t in n["spec"]["taints"] if t["key"] == UNREACHABLE)
        assert ready(cluster, other) == "True"

        # Failover: the VMI fails with NodeUnresponsive, the VM restarts it on the other node.
        failed = wait_for(lambda: recorder.saw(old_uid, "Failed"), "the VMI to fail", 30)
        assert failed[2] == "NodeUnresponsive"
        second = cluster.wait_new_vmi(ns, "ha", old_uid, timeout=30)
        second = cluster.wait_vmi_phase(ns, "ha", "Running", timeout=60,
                                        uid=uid_of(second))
        assert second["status"]["nodeName"] == other
        evs = cluster.request("GET", f"/api/v1/namespaces/{ns}/events").json()["items"]
        assert any(e["reason"] == "NodeUnresponsive" and e["involvedObject"]["uid"] == old_uid
                   and lost in e["message"] for e in evs), evs
        # The fencing caveat: the cut-off node still runs the old QEMU.
        assert Path(f"/proc/{qemu_pid}").exists()
    finally:
        recorder.close()
        os.kill(agent, signal.SIGKILL)  # the platform restarts it: the node returns

    def back() -> bool:
        n = node(cluster, lost)
        return (ready(cluster, lost) == "True" and not unreachable_effects(n)
                and n["metadata"]["labels"].get("kubevirt.io/schedulable") == "true")
    wait_for(back, f"{lost} to be Ready and untainted again", 30)
    wait_for(lambda: not qemus_of(run_dir), "the old QEMU to be killed by the agent", 30)
    wait_for(lambda: not run_dir.exists(), "the old run directory to be removed", 10)
    vmi = cluster.vmi(ns, "ha")
    assert vmi is not None and uid_of(vmi) == uid_of(second)
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == other
    assert time.monotonic() - started < 90


def test_drain_taint_creates_evacuation_migrations(cluster: Cluster) -> None:
    ns = "evacuate"
    cluster.kubectl.run("create", "namespace", ns)
    mover = kernel_vm("mover", "Always")
    template = mover["spec"]["template"]["spec"]
    template["evictionStrategy"] = "LiveMigrate"
    template["domain"]["devices"]["interfaces"] = [{"name": "default", "masquerade": {}}]
    template["networks"] = [{"name": "default", "pod": {}}]  # a bridge would not migrate
    cluster.create(ns, mover)
    first = cluster.wait_vmi_phase(ns, "mover", "Running", timeout=60)
    where = first["status"]["nodeName"]
    stayer = kernel_vm("stayer", "Always")  # evictionStrategy None: left to `virtshift drain`
    stayer["spec"]["template"]["spec"]["evictionStrategy"] = "None"
    stayer["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": where}
    cluster.create(ns, stayer)
    cluster.wait_vmi_phase(ns, "stayer", "Running", timeout=60)
    def migratable() -> bool:
        conds = (cluster.vmi(ns, "mover") or {})["status"].get("conditions") or []
        assert any(c["type"] == "LiveMigratable" and c["status"] == "True" for c in conds), [
            c for c in conds if c["type"] == "LiveMigratable"]
        return True
    wait_for(migratable, "mover to be LiveMigratable", 30)

    def migrations() -> list[dict[str, Any]]:
        r = cluster.request(
            "GET", f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstancemigrations")
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    assert migrations() == []
    cluster.kubectl.run("taint", "node", where, "kubevirt.io/drain=draining:NoSchedule")
    try:
        (vmim, *more) = wait_for(migrations, "an evacuation migration", 30)
        assert more == [] or all(m["spec"]["vmiName"] == "mover" for m in more)
        assert vmim["metadata"]["name"].startswith("kubevirt-evacuation-")
        assert vmim["spec"]["vmiName"] == "mover"
        assert vmim["metadata"]["labels"]["kubevirt.io/vmi-name"] == "mover"
        assert vmim["metadata"]["annotations"]["kubevirt.io/evacuationMigration"] == where
        vmi = cluster.vmi(ns, "mover")
        assert vmi is not None and vmi["status"]["evacuationNodeName"] == where
        assert "evacuationNodeName" not in (cluster.vmi(ns, "stayer") or {})["status"]
        evs = cluster.request("GET", f"/api/v1/namespaces/{ns}/events").json()["items"]
        assert any(e["reason"] == "SuccessfulCreate" and e["involvedObject"]["name"] == "mover"
                   and vmim["metadata"]["name"] in e["message"] for e in evs), evs
    finally:
        cluster.kubectl.run("taint", "node", where, "kubevirt.io/drain-", check=False)
