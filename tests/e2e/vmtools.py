"""Helpers for end-to-end tests that boot real guests: a platform with a node, the test images
imported, KubeVirt subresource calls, a websocket console, polling with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
import websocket

from tests.conftest import REPO, Kubectl
from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

VIRTSHIFT = REPO / ".venv" / "bin" / "virtshift"
CIRROS_IMAGE = "registry:5000/kubevirt/cirros-container-disk-demo:devel"
TESTGUEST_IMAGE = "virtshift/testguest:latest"
KERNEL_IMAGE = "virtshift/testguest-kernel:latest"
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], what: str, timeout: float = 90.0,
              interval: float = 0.2) -> T:
    """Poll ``fn`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except (requests.RequestException, AssertionError, KeyError) as e:
            value, last = None, e
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")


@dataclass
class Cluster:
    platform: PlatformProcess
    kubectl: Kubectl

    @property
    def data_dir(self) -> Path:
        return self.platform.data_dir

    def cli(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(VIRTSHIFT), "--kubeconfig", str(self.platform.kubeconfig),
                               *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"virtshift {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    # ---- raw API -------------------------------------------------------------------------------

    def _session(self) -> tuple[requests.Session, str]:
        cfg = self.platform.config()
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
        s.headers["Authorization"] = f"Bearer {cfg.token}"
        ca = self.data_dir / "ca-for-tests.pem"
        if not ca.exists():
            ca.write_bytes(cfg.ca_pem)
        s.verify = str(ca)
        return s, cfg.server

    def request(self, method: str, path: str, body: Any = None) -> requests.Response:
        s, server = self._session()
        with s:
            return s.request(method, server + path, json=body, timeout=30)

    def subresource(self, resource: str, ns: str, name: str, sub: str, body: Any = None,
                    method: str = "PUT") -> requests.Response:
        return self.request(method, f"{SUBRESOURCES}/namespaces/{ns}/{resource}/{name}/{sub}",
                            {} if body is None and method == "PUT" else body)

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        r = self.request("GET", f"/apis/kubevirt.io/v1/namespaces/{ns}/{plural}/{name}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def vm(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get("virtualmachines", ns, name)

    def vmi(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get("virtualmachineinstances", ns, name)

    def create(self, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        plural = {"VirtualMachine": "virtualmachines",
                  "VirtualMachineInstance": "virtualmachineinstances"}[obj["kind"]]
        r = self.request("POST", f"/apis/kubevirt.io/v1/namespaces/{ns}/{plural}", obj)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    # ---- conditions ------------------------------------------------------------------------------

    def wait_printable(self, ns: str, name: str, status: str, timeout: float = 90) -> dict:
        def check() -> dict[str, Any] | None:
            vm = self.vm(ns, name)
            return vm if vm and (vm.get("status") or {}).get("printableStatus") == status \
                else None
        try:
            return wait_for(check, f"VM {ns}/{name} printableStatus {status}", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\nVM: {json.dumps(self.vm(ns, name), indent=1)}\n"
                                 f"VMI: {json.dumps(self.vmi(ns, name), indent=1)}\n"
                                 f"log tail:\n{self.platform.log_text()[-3000:]}") from None

    def wait_vmi_phase(self, ns: str, name: str, phase: str, timeout: float = 90,
                       uid: str | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            vmi = self.vmi(ns, name)
            if vmi is None or (uid and vmi["metadata"]["uid"] != uid):
                return None
            return vmi if (vmi.get("status") or {}).get("phase") == phase else None
        try:
            return wait_for(check, f"VMI {ns}/{name} phase {phase}", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\nVMI: {json.dumps(self.vmi(ns, name), indent=1)}\n"
                                 f"log tail:\n{self.platform.log_text()[-3000:]}") from None

    def wait_vmi_gone(self, ns: str, name: str, timeout: float = 60,
                      uid: str | None = None) -> None:
        def gone() -> bool:
            vmi = self.vmi(ns, name)
            return vmi is None or (uid is not None and vmi["metadata"]["uid"] != uid)
        wait_for(gone, f"VMI {ns}/{name} to be deleted", timeout)

    def record_vmi(self, ns: str, name: str) -> VMIRecorder:
        """Start recording every state of VMI ``ns/name`` (by watch), including short-lived
        ones such as a Failed VMI that the VM controller replaces at once."""
        s, server = self._session()
        url = (f"{server}/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances"
               f"?watch=true&timeoutSeconds=300&fieldSelector=metadata.name%3D{name}")
        return VMIRecorder(s, url)

    def wait_new_vmi(self, ns: str, name: str, old_uid: str, timeout: float = 90
                     ) -> dict[str, Any]:
        """The VMI ``ns/name`` once it is another than ``old_uid``."""
        def check() -> dict[str, Any] | None:
            vmi = self.vmi(ns, name)
            return vmi if vmi and vmi["metadata"]["uid"] != old_uid else None
        try:
            return wait_for(check, f"a new VMI {ns}/{name}", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\nVM: {json.dumps(self.vm(ns, name), indent=1)}\n"
                                 f"VMI: {json.dumps(self.vmi(ns, name), indent=1)}\n"
                                 f"log tail:\n{self.platform.log_text()[-6000:]}") from None

    def console(self, ns: str, name: str) -> Console:
        return Console(self.websocket(ns, name, "console"))

    def websocket(self, ns: str, name: str, sub: str) -> websocket.WebSocket:
        """A ``plain.kubevirt.io`` websocket to VMI subresource ``sub`` (console, vnc,
        portforward/PORT)."""
        cfg = self.platform.config()
        url = (cfg.server.replace("https://", "wss://") +
               f"{SUBRESOURCES}/namespaces/{ns}/virtualmachineinstances/{name}/{sub}")
        return websocket.create_connection(
            url, subprotocols=["plain.kubevirt.io"],
            header=[f"Authorization: Bearer {cfg.token}"],
            sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": str(self._ca())}, timeout=10)

    def _ca(self) -> Path:
        self._session()[0].close()
        return self.data_dir / "ca-for-tests.pem"

    # ---- node-side facts -------------------------------------------------------------------------

    def run_dir(self, uid: str, node: str = "node01") -> Path:
        return self.data_dir / "nodes" / node / "vms" / uid

    def qemu_pid(self, uid: str, node: str = "node01") -> int:
        data = json.loads((self.run_dir(uid, node) / "supervisor.json").read_text())
        return int(data["pid"])

    def agent_pid(self, node: str = "node01") -> int:
        return int((self.data_dir / "nodes" / node / "agent.pid").read_text())

    def kill_leftover_qemus(self) -> None:
        for pidfile in self.data_dir.glob("nodes/*/vms/*/qemu.pid"):
            try:
                pid = int(pidfile.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"qemu-system" in cmdline:
                os.kill(pid, signal.SIGKILL)
        self.platform.remove_node_network()



@contextlib.contextmanager
def guest_cluster(tmp: Any, name: str, *, nodes: int = 1, args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None,
                  disk_images: Sequence[str] = ()) -> Iterator[Cluster]:
    """A platform (TCG) with ``nodes`` registered nodes and the test guest imported: its kernel
    as :data:`KERNEL_IMAGE`, its disk under each name of ``disk_images``. ``tmp`` is pytest's
    TempPathFactory. Stops the platform and any QEMU left behind on exit."""
    images = GuestImages.locate()
    p = PlatformProcess(tmp.mktemp(name), args=["--nodes", str(nodes), "--accel", "tcg", *args],
                        env=dict(env or {}))
    p.start()
    c = Cluster(p, Kubectl(p.kubeconfig, tmp.mktemp("kubectl-cache")))
    try:
        for i in range(1, nodes + 1):
            node = f"node{i:02d}"
            wait_for(lambda node=node: c.request("GET", f"/api/v1/nodes/{node}").ok,  # type: ignore[misc]
                     f"{node} to register", 90)
        for image in disk_images:
            c.cli("image", "import", image, str(images.disk))
        c.cli("image", "import", KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
              str(images.initrd), "--cmdline", "console=ttyS0 quiet")
        yield c
    finally:
        p.stop()
        c.kill_leftover_qemus()

class VMIRecorder:
    """(uid, phase, reason) of every watch event of one VMI, from a background thread."""

    def __init__(self, session: requests.Session, url: str) -> None:
        self.states: list[tuple[str, str, str]] = []
        self._resp = session.get(url, stream=True, timeout=(10, 330))
        self._resp.raise_for_status()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._resp.iter_lines():
                if not line:
                    continue
                ev = json.loads(line)
                obj = ev.get("object") or {}
                st = obj.get("status") or {}
                self.states.append((str((obj.get("metadata") or {}).get("uid")),
                                    str(st.get("phase") or ""), str(st.get("reason") or "")))
        except (requests.RequestException, ValueError, AttributeError):
            pass

    def saw(self, uid: str, phase: str) -> tuple[str, str, str] | None:
        return next((s for s in self.states if s[0] == uid and s[1] == phase), None)

    def close(self) -> None:
        # Closing the response while the reader thread blocks on it would hang: shut the
        # socket down first, so the thread sees EOF and ends.
        sock = getattr(getattr(self._resp.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._resp.close()


class Console:
    """A serial console through the API server's ``console`` websocket."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws = ws
        self.text = ""

    def read_until(self, pattern: str, timeout: float = 60, start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not rx.search(self.text, start):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"console: no {pattern!r} within {timeout:.0f}s; "
                                     f"tail:\n{self.text[-1500:]}")
            self.ws.settimeout(min(left, 2.0))
            try:
                data = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not data:
                raise AssertionError(f"console closed; tail:\n{self.text[-1500:]}")
            self.text += data.decode(errors="replace") if isinstance(data, bytes) else data
        return self.text

    def wait_prompt(self, pattern: str = r":/# ", timeout: float = 90) -> None:
        """Press Enter every few seconds until the shell's prompt answers."""
        deadline = time.monotonic() + timeout
        while True:
            mark = len(self.text)
            self.send("\n")
            try:
                self.read_until(pattern, 3, start=mark)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def send(self, text: str) -> None:
        self.ws.send_binary(text.encode())

    def close(self) -> None:
        self.ws.close()
