"""Real guests end to end (TCG): kubectl applies KubeVirt manifests, the controller makes VMIs,
the node agent boots QEMU, the console answers, and runStrategy semantics hold."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import CORPUS
from tests.e2e.vmtools import (
    CIRROS_IMAGE,
    KERNEL_IMAGE,
    TESTGUEST_IMAGE,
    Cluster,
    guest_cluster,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "vms",
                       disk_images=[CIRROS_IMAGE, TESTGUEST_IMAGE]) as c:
        yield c


@pytest.fixture
def ns(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "vm-" + request.node.name.lower().replace("_", "-")[5:40].strip("-")
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-").strip("-")
    cluster.kubectl.run("create", "namespace", name)
    yield name
    cluster.kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def kernel_vm(name: str, strategy: str, *, user_data: str | None = None,
              grace: int = 0) -> dict[str, Any]:
    """A small VM booting the test guest by kernelBoot (the fastest boot under TCG)."""
    volumes: list[dict[str, Any]] = []
    disks: list[dict[str, Any]] = []
    if user_data is not None:
        volumes.append({"name": "cloudinit", "cloudInitNoCloud": {"userData": user_data}})
        disks.append({"name": "cloudinit", "disk": {"bus": "virtio"}})
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": strategy,
            "template": {"spec": {
                "terminationGracePeriodSeconds": grace,
                "domain": {
                    "firmware": {"kernelBoot": {"container": {
                        "image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz",
                        "initrdPath": "/boot/initrd.img"}}},
                    "devices": {"disks": disks},
                    "memory": {"guest": "128Mi"},
                },
                "volumes": volumes,
            }},
        },
    }


def uid_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


# ---- the acceptance path: vm-cirros.yaml unchanged ------------------------------------------

def test_vm_cirros_boots_console_and_stops(cluster: Cluster, ns: str) -> None:
    manifest = CORPUS / "vm-cirros.yaml"
    cluster.kubectl.run("apply", "-n", ns, "-f", str(manifest))
    cluster.wait_printable(ns, "vm-cirros", "Stopped")  # runStrategy Halted
    assert cluster.vmi(ns, "vm-cirros") is None

    started = cluster.cli("start", "vm-cirros", "-n", ns)
    assert "vm-cirros" in started.stdout
    vmi = cluster.wait_vmi_phase(ns, "vm-cirros", "Running")
    console = cluster.console(ns, "vm-cirros")
    try:
        console.read_until("printed from cloud-init userdata", 90)
        console.read_until("TESTGUEST-READY", 60)
        console.send("\necho answer-$((6*7))\n")
        console.read_until("answer-42", 30)
    finally:
        console.close()
    assert vmi["status"]["nodeName"] == "node01"
    vmi_table = cluster.kubectl.run("get", "vmi", "-n", ns, "vm-cirros").stdout
    assert "Running" in vmi_table and "node01" in vmi_table
    vm = cluster.wait_printable(ns, "vm-cirros", "Running")
    assert vm["status"]["ready"] is True
    # the guest agent reports in: AgentConnected, guestOSInfo, the interface's address
    vmi = wait_for(lambda: (lambda v: v if any(
        c["type"] == "AgentConnected" and c["status"] == "True"
        for c in v["status"].get("conditions", [])) else None)(cluster.vmi(ns, "vm-cirros")),
        "AgentConnected", 60)
    assert vmi["status"]["guestOSInfo"]["id"] == "virtshift-testguest"
    assert vmi["status"]["interfaces"][0]["ipAddress"] == "10.0.2.2"
    qemu_pid = cluster.qemu_pid(uid_of(vmi))
    assert Path(f"/proc/{qemu_pid}").exists()

    cluster.cli("stop", "vm-cirros", "-n", ns)
    cluster.wait_printable(ns, "vm-cirros", "Stopped")
    cluster.wait_vmi_gone(ns, "vm-cirros")
    wait_for(lambda: not Path(f"/proc/{qemu_pid}").exists(), "QEMU to exit", 30)
    # The agent removes the run directory on its own, after the QEMU exit it reports.
    wait_for(lambda: not cluster.run_dir(uid_of(vmi)).exists(), "its run directory removed", 30)


# ---- runStrategy -------------------------------------------------------------------------------

def test_always_restarts_after_guest_poweroff_halted_stays_down(cluster: Cluster,
                                                                 ns: str) -> None:
    cluster.create(ns, kernel_vm("always", "Always"))
    cluster.create(ns, kernel_vm("halted", "Halted"))
    first = cluster.wait_vmi_phase(ns, "always", "Running")
    cluster.wait_printable(ns, "halted", "Stopped")
    assert cluster.vmi(ns, "halted") is None
    console = cluster.console(ns, "always")
    try:
        console.wait_prompt()
        for attempt in range(3):  # a keystroke typed while the shell redraws can be lost
            console.send("poweroff\n")
            try:
                console.read_until("Power down", 10, start=len(console.text))
                break
            except AssertionError:
                if attempt == 2:
                    raise
    finally:
        console.close()
    # the guest's own shutdown ends the VMI Succeeded; Always starts a new one
    second = cluster.wait_new_vmi(ns, "always", uid_of(first))
    cluster.wait_vmi_phase(ns, "always", "Running", uid=uid_of(second))


def test_once_does_not_restart_after_guest_shutdown(cluster: Cluster, ns: str) -> None:
    cluster.create(ns, kernel_vm("once", "Once", user_data="#!/bin/sh\necho bye; poweroff\n"))
    vmi = wait_for(lambda: cluster.vmi(ns, "once"), "the VMI of runStrategy Once", 30)
    done = cluster.wait_vmi_phase(ns, "once", "Succeeded", uid=uid_of(vmi))
    assert done["status"]["reason"] == "GuestShutdown"
    vm = cluster.wait_printable(ns, "once", "Stopped")
    # Once never starts a second VMI: the finished one stays, and the VM records no new start
    again = cluster.vmi(ns, "once")
    assert again is not None and uid_of(again) == uid_of(vmi)
    assert vm["spec"]["runStrategy"] == "Once"


def test_rerun_on_failure_restarts_a_crashed_qemu(cluster: Cluster, ns: str) -> None:
    recorder = cluster.record_vmi(ns, "rerun")
    try:
        cluster.create(ns, kernel_vm("rerun", "RerunOnFailure"))
        first = cluster.wait_vmi_phase(ns, "rerun", "Running")
        os.kill(cluster.qemu_pid(uid_of(first)), signal.SIGKILL)
        # the Failed VMI is replaced at once: the watch saw it
        failed = wait_for(lambda: recorder.saw(uid_of(first), "Failed"),
                          "the crashed VMI to be reported Failed", 60)
        assert failed[2] == "Crashed"
        second = cluster.wait_new_vmi(ns, "rerun", uid_of(first))
        cluster.wait_vmi_phase(ns, "rerun", "Running", uid=uid_of(second))
    finally:
        recorder.close()


def test_manual_needs_start_and_stop(cluster: Cluster, ns: str) -> None:
    cluster.create(ns, kernel_vm("manual", "Manual"))
    cluster.wait_printable(ns, "manual", "Stopped")
    r = cluster.subresource("virtualmachines", ns, "manual", "start")
    assert r.status_code == 202, r.text
    vmi = cluster.wait_vmi_phase(ns, "manual", "Running")
    again = cluster.subresource("virtualmachines", ns, "manual", "start")
    assert again.status_code == 409 and again.json()["reason"] == "Conflict"
    r = cluster.subresource("virtualmachines", ns, "manual", "stop")
    assert r.status_code == 202, r.text
    cluster.wait_vmi_gone(ns, "manual", uid=uid_of(vmi))
    cluster.wait_printable(ns, "manual", "Stopped")


# ---- the node agent --------------------------------------------------------------------------

def test_agent_restart_keeps_vms_running(cluster: Cluster, ns: str) -> None:
    cluster.create(ns, kernel_vm("survivor", "Always"))
    vmi = cluster.wait_vmi_phase(ns, "survivor", "Running")
    pid = cluster.qemu_pid(uid_of(vmi))
    old_agent = cluster.agent_pid()
    os.kill(old_agent, signal.SIGKILL)
    wait_for(lambda: cluster.agent_pid() != old_agent, "the platform to restart the agent", 30)
    # the new agent re-attached: pause goes through its QMP session
    r = wait_for(lambda: (lambda resp: resp if resp.status_code == 200 else None)(
        cluster.subresource("virtualmachineinstances", ns, "survivor", "pause")),
        "pause through the restarted agent", 60)
    assert r.status_code == 200
    cluster.wait_printable(ns, "survivor", "Paused")
    paused = cluster.vmi(ns, "survivor")
    assert paused is not None and uid_of(paused) == uid_of(vmi)
    assert any(c["type"] == "Paused" and c["status"] == "True"
               for c in paused["status"]["conditions"])
    assert cluster.qemu_pid(uid_of(vmi)) == pid and Path(f"/proc/{pid}").exists()
    r = cluster.subresource("virtualmachineinstances", ns, "survivor", "unpause")
    assert r.status_code == 200, r.text
    cluster.wait_printable(ns, "survivor", "Running")
    again = cluster.subresource("virtualmachineinstances", ns, "survivor", "unpause")
    assert again.status_code == 409, again.text


# ---- failures with clear reasons ---------------------------------------------------------------

def test_unschedulable_and_unknown_image(cluster: Cluster, ns: str) -> None:
    huge = kernel_vm("huge", "Always")
    huge["spec"]["template"]["spec"]["domain"]["memory"]["guest"] = "100Ti"
    cluster.create(ns, huge)
    missing = kernel_vm("missing", "Always")
    missing["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["container"][
        "image"] = "example/not-in-the-store:v1"
    cluster.create(ns, missing)
    cluster.wait_printable(ns, "huge", "ErrorUnschedulable")
    vmi = cluster.vmi(ns, "huge")
    assert vmi is not None
    cond = next(c for c in vmi["status"]["conditions"] if c["type"] == "PodScheduled")
    assert cond["reason"] == "Unschedulable" and "memory" in cond["message"].lower()
    cluster.wait_printable(ns, "missing", "ErrImagePull")
    vmi = cluster.vmi(ns, "missing")
    assert vmi is not None
    sync = next(c for c in vmi["status"]["conditions"] if c["type"] == "Synchronized")
    assert "example/not-in-the-store:v1" in sync["message"]


def test_invalid_spec_is_422_with_field_path(cluster: Cluster, ns: str) -> None:
    bad = kernel_vm("bad", "Always")
    bad["spec"]["template"]["spec"]["domain"]["devices"]["disks"] = [
        {"name": "nowhere", "disk": {"bus": "virtio"}}]
    r = cluster.request("POST", f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", bad)
    assert r.status_code == 422, r.text
    status = r.json()
    assert status["reason"] == "Invalid"
    fields = [c.get("field", "") for c in status["details"]["causes"]]
    assert any("disks" in f for f in fields), fields
    assert cluster.vm(ns, "bad") is None
    both = copy.deepcopy(kernel_vm("both", "Always"))
    both["spec"]["running"] = True
    proc = cluster.kubectl.run("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(both),
                               check=False)
    assert proc.returncode != 0 and "running" in proc.stderr


# ---- VMI subresources, graceful stop ------------------------------------------------------------

def ws_read_until(ws: Any, marker: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while marker not in buf:
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout}s: {buf[-500:]!r}"
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        data = ws.recv()
        assert data, f"closed before {marker!r}: {buf[-500:]!r}"
        buf += data if isinstance(data, bytes) else data.encode()
    return buf


def test_vmi_subresources_and_graceful_stop(cluster: Cluster, ns: str) -> None:
    vm = kernel_vm("subs", "Always", user_data="#!/bin/sh\necho subs-user-data\n", grace=60)
    cluster.create(ns, vm)
    vmi = cluster.wait_vmi_phase(ns, "subs", "Running")
    console = cluster.console(ns, "subs")
    try:
        console.read_until("TESTGUEST-READY", 90)
        # guest agent data through the CLI
        info = wait_for(lambda: (lambda p: p if p.returncode == 0 else None)(
            cluster.cli("guestosinfo", "subs", "-n", ns, check=False)), "guestosinfo", 60)
        assert json.loads(info.stdout)["os"]["id"] == "virtshift-testguest"
        # port-forward: the guest's HTTP server on port 80
        ws = cluster.websocket(ns, "subs", "portforward/80")
        try:
            ws.send_binary(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
            page = ws_read_until(ws, b"</html>")
            assert b"200 OK" in page and b"virtshift testguest" in page
        finally:
            ws.close()
        # VNC: the RFB greeting of QEMU's VNC server
        ws = cluster.websocket(ns, "subs", "vnc")
        try:
            assert ws_read_until(ws, b"\n", 10).startswith(b"RFB 003.008")
        finally:
            ws.close()
        # soft reboot through the guest agent: same VMI and QEMU, the guest boots again
        pid = cluster.qemu_pid(uid_of(vmi))
        mark = len(console.text)
        cluster.cli("soft-reboot", "subs", "-n", ns)
        console.read_until("TESTGUEST-READY", 90, start=mark)
        assert cluster.qemu_pid(uid_of(vmi)) == pid
        # pause and unpause through the CLI (virtctl's `pause vm`)
        cluster.cli("pause", "vm", "subs", "-n", ns)
        cluster.wait_printable(ns, "subs", "Paused")
        cluster.cli("unpause", "vm", "subs", "-n", ns)
        cluster.wait_printable(ns, "subs", "Running")
    finally:
        console.close()
    # graceful stop: the ACPI power button reaches the guest, which powers off well before
    # its 60 s grace period; the VMI ends Succeeded with reason Stopped (not Killed)
    recorder = cluster.record_vmi(ns, "subs")
    try:
        started = time.monotonic()
        cluster.cli("stop", "subs", "-n", ns)
        stopped = wait_for(lambda: recorder.saw(uid_of(vmi), "Succeeded"),
                           "the VMI to stop gracefully", 60)
        assert stopped[2] == "Stopped", recorder.states
        assert time.monotonic() - started < 30
    finally:
        recorder.close()
    cluster.wait_printable(ns, "subs", "Stopped")
    bad = cluster.subresource("virtualmachineinstances", ns, "subs", "pause")
    assert bad.status_code == 404 and bad.json()["kind"] == "Status"


def test_disks_emptydisk_configdrive_hostdisk(cluster: Cluster, ns: str) -> None:
    vm = kernel_vm("disks", "Always")
    spec = vm["spec"]["template"]["spec"]
    allowed = cluster.data_dir / "nodes" / "node01" / "hostdisks"
    spec["volumes"] = [
        {"name": "scratch", "emptyDisk": {"capacity": "64Mi"}},
        {"name": "host", "hostDisk": {"path": str(allowed / "disks" / "h.img"),
                                      "type": "DiskOrCreate", "capacity": "32Mi"}},
        {"name": "cfg", "cloudInitConfigDrive": {
            "userData": "#!/bin/sh\necho configdrive-says-$((2+3))\n"}},
    ]
    spec["domain"]["devices"]["disks"] = [
        {"name": "scratch", "disk": {"bus": "virtio"}},
        {"name": "host", "disk": {"bus": "virtio"}},
        {"name": "cfg", "disk": {"bus": "virtio"}},
    ]
    cluster.create(ns, vm)
    cluster.wait_vmi_phase(ns, "disks", "Running")
    console = cluster.console(ns, "disks")
    try:
        console.read_until("configdrive-says-5", 90)
        console.wait_prompt()
        mark = len(console.text)
        console.send("cat /sys/block/vda/size /sys/block/vdb/size; echo disks-$((1+1))\n")
        out = console.read_until(r"disks-2\s", 30, start=mark)[mark:]
        assert "131072" in out and "65536" in out, out  # 512-byte sectors: 64Mi, 32Mi
    finally:
        console.close()
    assert (allowed / "disks" / "h.img").stat().st_size == 32 * 1024 * 1024
    outside = kernel_vm("outside", "Always")
    outside["spec"]["template"]["spec"]["volumes"] = [
        {"name": "etc", "hostDisk": {"path": "/etc/passwd", "type": "Disk"}}]
    outside["spec"]["template"]["spec"]["domain"]["devices"]["disks"] = [
        {"name": "etc", "disk": {"bus": "virtio"}}]
    cluster.create(ns, outside)

    def refused() -> dict[str, Any] | None:
        vmi = cluster.vmi(ns, "outside")
        conds = (vmi or {}).get("status", {}).get("conditions", [])
        return next((c for c in conds if c["type"] == "Synchronized"
                     and "outside the node's allowed directories" in c.get("message", "")),
                    None)
    cond = wait_for(refused, "the hostDisk outside the allowed directories to be refused", 60)
    assert cond["status"] == "False"


def test_uefi_vm_runs_ovmf_and_reset(cluster: Cluster, ns: str) -> None:
    vm = kernel_vm("uefi", "Always")
    spec = vm["spec"]["template"]["spec"]
    del spec["domain"]["firmware"]["kernelBoot"]
    spec["domain"]["firmware"]["bootloader"] = {"efi": {"secureBoot": False}}
    spec["volumes"] = [{"name": "root", "containerDisk": {"image": TESTGUEST_IMAGE}}]
    spec["domain"]["devices"]["disks"] = [{"name": "root", "disk": {"bus": "virtio"}}]
    cluster.create(ns, vm)
    vmi = cluster.wait_vmi_phase(ns, "uefi", "Running")
    run = cluster.run_dir(uid_of(vmi))
    assert (run / "efi-vars.fd").is_file()
    argv = json.loads((run / "supervisor.json").read_text())["argv"]
    assert any("OVMF_CODE" in a for a in argv)
    # OVMF's boot manager reports on the serial console (the test disk has no EFI loader)
    log = run / "serial.log"
    wait_for(lambda: b"BdsDxe" in log.read_bytes(), "OVMF output on the console", 90)
    size = log.stat().st_size
    r = cluster.subresource("virtualmachineinstances", ns, "uefi", "reset")
    assert r.status_code == 200, r.text
    wait_for(lambda: b"BdsDxe" in log.read_bytes()[size:], "OVMF again after reset", 90)
    assert cluster.vmi(ns, "uefi")["metadata"]["uid"] == uid_of(vmi)  # type: ignore[index]


def test_agent_cleans_up_qemu_whose_vmi_is_gone(cluster: Cluster, ns: str) -> None:
    """A VMI force-removed while its agent was down: the restarted agent kills its QEMU."""
    vm = kernel_vm("orphan", "Always")
    vmi_obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
               "metadata": {"name": "orphan"}, "spec": vm["spec"]["template"]["spec"]}
    cluster.create(ns, vmi_obj)
    vmi = cluster.wait_vmi_phase(ns, "orphan", "Running")
    pid = cluster.qemu_pid(uid_of(vmi))
    # consoles need the caller's credentials
    cfg = cluster.platform.config()
    anon = requests.get(f"{cfg.server}/apis/subresources.kubevirt.io/v1/namespaces/{ns}/"
                        "virtualmachineinstances/orphan/console",
                        verify=str(cluster.data_dir / "ca-for-tests.pem"), timeout=10)
    assert anon.status_code == 401 and anon.json()["reason"] == "Unauthorized"
    agent = cluster.agent_pid()
    os.kill(agent, signal.SIGSTOP)
    try:
        s, server = cluster._session()
        with s:
            r = s.patch(f"{server}/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/"
                        "orphan", json={"metadata": {"finalizers": None}},
                        headers={"Content-Type": "application/merge-patch+json"}, timeout=10)
            assert r.status_code == 200, r.text
            r = s.delete(f"{server}/apis/kubevirt.io/v1/namespaces/{ns}/"
                         "virtualmachineinstances/orphan", timeout=10)
            assert r.status_code == 200, r.text
        cluster.wait_vmi_gone(ns, "orphan")
        assert Path(f"/proc/{pid}").exists()  # the stopped agent could not act
    finally:
        os.kill(agent, signal.SIGKILL)  # delivered to a stopped process too
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent, signal.SIGCONT)
    wait_for(lambda: cluster.agent_pid() != agent, "the platform to restart the agent", 30)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the orphaned QEMU to be killed", 60)
    wait_for(lambda: not cluster.run_dir(uid_of(vmi)).exists(), "its run directory removed", 30)


def test_agent_endpoint_is_tls_with_the_proxy_token(cluster: Cluster) -> None:
    node = cluster.request("GET", "/api/v1/nodes/node01").json()
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    ca = str(cluster.data_dir / "ca-for-tests.pem")
    url = f"https://127.0.0.1:{port}/v1/namespaces/default/virtualmachineinstances/x/pause"
    # the agent's certificate is issued by the cluster CA
    assert requests.get(f"https://127.0.0.1:{port}/healthz", verify=ca, timeout=10).ok
    # a user's token is not the proxy token: users reach agents only through the API server
    user = requests.put(url, verify=ca, timeout=10,
                        headers={"Authorization": f"Bearer {cluster.platform.config().token}"})
    assert user.status_code == 401
    token = (cluster.data_dir / "agent-proxy-token").read_text().strip()
    proxied = requests.put(url, verify=ca, timeout=10,
                           headers={"Authorization": f"Bearer {token}"})
    assert proxied.status_code == 404  # authenticated; no such VMI on the node
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
