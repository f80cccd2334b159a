"""Several nodes, each in its own network namespace (``virtshift up --nodes 2``), and
``virtshift node join``: agents reach the control plane over the node network, a VM pinned to
one node boots and answers through the API server, killing another node's agent leaves it
alone, and stopping the platform removes the namespaces and the bridge."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Kubectl
from tests.e2e.vmtools import KERNEL_IMAGE, VIRTSHIFT, Cluster, wait_for
from virtshift import nodenet
from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="node network namespaces need root and iproute2"),
]

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    images = GuestImages.locate()
    p = PlatformProcess(tmp_path_factory.mktemp("nodes"),
                        args=["--nodes", "2", "--accel", "tcg"])
    p.start()
    c = Cluster(p, Kubectl(p.kubeconfig, tmp_path_factory.mktemp("kubectl-cache")))
    try:
        for node in ("node01", "node02"):
            wait_for(lambda node=node: ready(c, node), f"{node} Ready", 60)
        c.cli("image", "import", KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
              str(images.initrd), "--cmdline", "console=ttyS0 quiet")
        yield c
    finally:
        p.stop()
        c.kill_leftover_qemus()  # and the node network a failed test's VMs kept


def ready(c: Cluster, node: str) -> dict[str, Any] | None:
    r = c.request("GET", f"/api/v1/nodes/{node}")
    if not r.ok:
        return None
    obj: dict[str, Any] = r.json()
    conds = (obj.get("status") or {}).get("conditions") or []
    ok = any(x["type"] == "Ready" and x["status"] == "True" for x in conds)
    return obj if ok else None


def internal_ip(node: dict[str, Any]) -> str:
    return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")


def agent_port(c: Cluster, node: str) -> int:
    obj = c.request("GET", f"/api/v1/nodes/{node}").json()
    return int(obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"])


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def pinned_vm(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 0,
            "domain": {
                "firmware": {"kernelBoot": {"container": {
                    "image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz",
                    "initrdPath": "/boot/initrd.img"}}},
                "devices": {},
                "memory": {"guest": "128Mi"},
            },
        }}},
    }


def http_through_portforward(c: Cluster, name: str) -> bytes:
    """GET / from the guest's port 80 over the API server's portforward websocket."""
    ws = c.websocket(NS, name, "portforward/80")
    try:
        ws.send_binary(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 20
        while b"</html>" not in buf and time.monotonic() < deadline:
            ws.settimeout(max(0.1, deadline - time.monotonic()))
            data = ws.recv()
            if not data:
                break
            buf += data if isinstance(data, bytes) else data.encode()
        return buf
    finally:
        ws.close()


def reachable_from(ns: str, host: str, port: int) -> bool:
    """Whether a TCP connection from inside network namespace ``ns`` to host:port opens."""
    code = ("import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout=2).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n")
    proc = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code],
                          capture_output=True, timeout=20)
    return proc.returncode == 0


def test_nodes_have_own_namespaces_and_addresses(cluster: Cluster) -> None:
    net = nodenet.load(cluster.data_dir)
    assert net is not None, "no node network was set up for --nodes 2 as root"
    nodes = [wait_for(lambda n=n: ready(cluster, n), f"{n} Ready", 30)
             for n in ("node01", "node02")]
    ips = [internal_ip(n) for n in nodes]
    assert ips[0] != ips[1]
    assert all(ipaddress.ip_address(ip) in net.subnet for ip in ips)
    assert ips == [net.address("node01"), net.address("node02")]
    own = netns_of(os.getpid())
    spaces = [netns_of(cluster.agent_pid(n)) for n in ("node01", "node02")]
    assert own not in spaces
    assert spaces[0] != spaces[1]
    # the agents really went through the join bootstrap, against the bridge address
    cfg = (cluster.data_dir / "nodes" / "node01" / "join" / "kubeconfig").read_text()
    assert f"https://{net.gateway}:" in cfg
    # a node can be cut off alone, and reconnected
    port = int(cluster.platform.config().server.rsplit(":", 1)[1])
    assert reachable_from(net.netns("node01"), net.gateway, port)
    nodenet.cut_off(cluster.data_dir, "node01")
    try:
        assert not reachable_from(net.netns("node01"), net.gateway, port)
        assert reachable_from(net.netns("node02"), net.gateway, port)
    finally:
        nodenet.reconnect(cluster.data_dir, "node01")
    wait_for(lambda: reachable_from(net.netns("node01"), net.gateway, port),
             "node01 reconnected", 15)


def test_vm_on_node02_survives_node01_agent_kill(cluster: Cluster) -> None:
    cluster.create(NS, pinned_vm("pinned", "node02"))
    vmi = cluster.wait_vmi_phase(NS, "pinned", "Running", timeout=90)
    assert vmi["status"]["nodeName"] == "node02"
    qemu = cluster.qemu_pid(vmi["metadata"]["uid"], "node02")
    assert netns_of(qemu) == netns_of(cluster.agent_pid("node02"))
    console = cluster.console(NS, "pinned")
    try:
        console.read_until("TESTGUEST-READY", 90)
    finally:
        console.close()
    page = wait_for(lambda: (lambda b: b if b"200 OK" in b else None)(
        http_through_portforward(cluster, "pinned")), "guest HTTP via portforward", 60)
    assert b"virtshift testguest" in page

    old = cluster.agent_pid("node01")
    os.kill(old, 9)
    wait_for(lambda: not Path(f"/proc/{old}").exists() or
             Path(f"/proc/{old}/status").read_text().find("State:\tZ") >= 0,
             "node01's agent to die", 10)
    # node02's VM still answers, through the API server and node02's agent
    console = cluster.console(NS, "pinned")
    try:
        console.wait_prompt(timeout=60)
        mark = len(console.text)
        console.send("echo node-$((40+2))\n")
        console.read_until("node-42", 30, start=mark)
    finally:
        console.close()
    assert b"200 OK" in http_through_portforward(cluster, "pinned")
    assert cluster.qemu_pid(vmi["metadata"]["uid"], "node02") == qemu
    # node01's agent comes back (restarted by the platform, joining again)
    wait_for(lambda: cluster.agent_pid("node01") != old and ready(cluster, "node01"),
             "node01's agent restarted", 60)


def join_cmd(cluster: Cluster, *args: str) -> list[str]:
    return [str(VIRTSHIFT), "node", "join", "--server", cluster.platform.config().server,
            *args]


def test_join_refuses_bad_credentials(cluster: Cluster, tmp_path: Path) -> None:
    token = (cluster.data_dir / "join-token").read_text().strip()
    bad = subprocess.run(join_cmd(cluster, "--token", "abcdef.0123456789abcdef",
                                  "--insecure-skip-ca-verification", "--node-name", "bad",
                                  "--data-dir", str(tmp_path / "bad")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        "error: the control plane refused the join token (401: Unauthorized)"]
    no_hash = subprocess.run(join_cmd(cluster, "--token", token, "--node-name", "bad",
                                      "--data-dir", str(tmp_path / "bad")),
                             capture_output=True, text=True, timeout=60)
    assert no_hash.returncode != 0 and "--ca-cert-hash" in no_hash.stderr
    wrong = subprocess.run(join_cmd(cluster, "--token", token, "--ca-cert-hash",
                                    "sha256:" + "0" * 64, "--node-name", "bad",
                                    "--data-dir", str(tmp_path / "bad")),
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "refusing to join" in wrong.stderr
    unreachable = subprocess.run(
        [str(VIRTSHIFT), "node", "join", "--server", "https://127.0.0.1:1", "--token", token,
         "--insecure-skip-ca-verification", "--data-dir", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=60)
    assert unreachable.returncode != 0
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot reach the control plane" in unreachable.stderr
    # the bootstrap endpoint itself: Kubernetes Status objects, 401 and 403
    s = requests.Session()
    s.trust_env = False
    s.verify = str(cluster._ca())
    url = cluster.platform.config().server + "/virtshift/v1/join"
    body = {"nodeName": "bad", "address": "127.0.0.1"}
    r = s.post(url, json=body, timeout=10)
    assert r.status_code == 401 and r.json()["kind"] == "Status"
    r = s.post(url, json=body, timeout=10,
               headers={"Authorization": f"Bearer {cluster.platform.config().token}"})
    assert r.status_code == 403 and r.json()["reason"] == "Forbidden"
    assert cluster.request("GET", "/api/v1/nodes/bad").status_code == 404


def test_join_registers_an_extra_node(cluster: Cluster, tmp_path: Path) -> None:
    token = (cluster.data_dir / "join-token").read_text().strip()
    ca_hash = next(line.split("--ca-cert-hash ")[1].split()[0]
                   for line in cluster.platform.log_text().splitlines()
                   if "virtshift node join" in line)
    log = (tmp_path / "join.log").open("wb")
    proc = subprocess.Popen(join_cmd(cluster, "--token", token, "--ca-cert-hash", ca_hash,
                                     "--node-name", "extra", "--address", "127.0.2.1",
                                     "--data-dir", str(tmp_path / "extra"), "--accel", "tcg"),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        node = wait_for(lambda: proc.poll() is None and ready(cluster, "extra"),
                        "the joined node Ready", 60)
        assert internal_ip(node) == "127.0.2.1"
        assert (tmp_path / "extra" / "join" / "node.key").stat().st_mode & 0o077 == 0
    finally:
        proc.terminate()
        proc.wait(20)
        cluster.request("DELETE", "/api/v1/nodes/extra")
    assert proc.returncode == 0, (tmp_path / "join.log").read_text()


def test_zz_restart_reuses_network_then_stop_removes_it(cluster: Cluster) -> None:
    net = nodenet.load(cluster.data_dir)
    assert net is not None
    vmi = cluster.vmi(NS, "pinned")
    assert vmi is not None and vmi["status"]["phase"] == "Running"
    qemu = cluster.qemu_pid(vmi["metadata"]["uid"], "node02")
    ports = {n: agent_port(cluster, n) for n in ("node01", "node02")}
    # a platform stop keeps the namespace a VM still runs in (VMs outlive the platform) ...
    cluster.platform.stop()
    assert Path(f"/proc/{qemu}").exists()
    assert net.netns("node02") in nodenet.list_netns()
    assert net.netns("node01") not in nodenet.list_netns()  # nothing ran there
    # ... and a restart re-uses it: same addresses, node02's agent re-attaches to its VM
    cluster.platform.start()
    assert nodenet.load(cluster.data_dir) == net
    for n in ("node01", "node02"):  # the new agents report their new endpoints
        wait_for(lambda n=n: ready(cluster, n) and agent_port(cluster, n) != ports[n],
                 f"{n}'s new agent", 40)
    console = cluster.console(NS, "pinned")
    try:
        console.wait_prompt(timeout=60)
    finally:
        console.close()
    assert cluster.qemu_pid(vmi["metadata"]["uid"], "node02") == qemu
    cluster.request("DELETE", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/pinned")
    cluster.wait_vmi_gone(NS, "pinned", 60)
    wait_for(lambda: not _qemus_in(net), "QEMUs to exit", 30)
    cluster.platform.stop()
    assert cluster.platform.proc is not None and cluster.platform.proc.returncode == 0
    left = [n for n in nodenet.list_netns() if n.startswith(f"vs{net.tag}-")]
    assert left == []
    assert subprocess.run(["ip", "link", "show", "dev", net.bridge],
                          capture_output=True).returncode != 0
    assert subprocess.run(["ip", "link", "show", "dev", net.host_veth("node01")],
                          capture_output=True).returncode != 0


def _qemus_in(net: nodenet.NodeNetwork) -> bool:
    for n in ("node01", "node02"):
        ns = net.netns(n)
        if ns not in nodenet.list_netns():
            continue
        for pid in nodenet.netns_pids(ns):
            try:
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False
