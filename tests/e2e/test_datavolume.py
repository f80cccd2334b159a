"""CDI DataVolumes end to end (TCG): imports over HTTP from a server the test runs (qcow2 and
raw.xz), blank and clone volumes, a VM with ``dataVolumeTemplates`` (the corpus's
vm-alpine-datavolume.yaml with an http source) booting the imported test guest, and bad input
ending in a clear phase and reason."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import lzma
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.test_pvc import run_in_guest
from tests.e2e.vmtools import Cluster, guest_cluster, wait_for
from virtshift.apiserver.pki import ensure_pki
from virtshift.testing.guest import GuestImages

pytestmark = pytest.mark.e2e

NS = "dv"
CORPUS = REPO.parent / "shared" / "reference" / "kubevirt-examples"
DVS = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes"


class Server:
    """A threaded HTTP server on ``host`` serving ``root`` (a real socket, a real server)."""

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined,method-assign]
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        self.host = host
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("http-root")
    guest = GuestImages.locate().disk
    (root / "guest.qcow2").write_bytes(guest.read_bytes())
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest), str(root / "guest.raw")],
                   check=True)
    (root / "guest.raw.xz").write_bytes(
        lzma.compress((root / "guest.raw").read_bytes(), preset=1))
    (root / "index.html").write_text("<html><body>" + "not a disk " * 100 + "</body></html>")
    server = Server(root)
    try:
        yield server, root
    finally:
        server.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "dv",
                       env={"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "2"}) as c:
        c.kubectl.run("create", "namespace", NS)
        yield c


def datavolume(name: str, source: dict[str, Any], size: str = "128Mi",
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "annotations": dict(annotations or {})},
            "spec": {"source": source,
                     "storage": {"resources": {"requests": {"storage": size}}}}}


def create_dv(cluster: Cluster, obj: dict[str, Any]) -> None:
    r = cluster.request("POST", DVS, obj)
    assert r.status_code == 201, r.text


def dv_of(cluster: Cluster, name: str) -> dict[str, Any]:
    r = cluster.request("GET", f"{DVS}/{name}")
    assert r.ok, r.text
    out: dict[str, Any] = r.json()
    return out


def wait_dv(cluster: Cluster, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        dv = dv_of(cluster, name)
        return dv if (dv.get("status") or {}).get("phase") == phase else None
    try:
        return wait_for(check, f"DataVolume {name} phase {phase}", timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{json.dumps(dv_of(cluster, name), indent=1)}\n"
                             f"log tail:\n{cluster.platform.log_text()[-3000:]}") from None


def volume_image(cluster: Cluster, claim: str) -> Path:
    pvc = cluster.request("GET", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{claim}")
    pv = cluster.request("GET", f"/api/v1/persistentvolumes/{pvc.json()['spec']['volumeName']}")
    return Path(pv.json()["spec"]["hostPath"]["path"]) / "disk.img"


def sha(path: Path, size: int) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def condition(dv: dict[str, Any], ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = next(c for c in dv["status"]["conditions"] if c["type"] == ctype)
    return out


def events_for(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    r = cluster.request("GET", f"/api/v1/namespaces/{NS}/events")
    return [e for e in r.json()["items"] if e["involvedObject"]["name"] == name]


IMMEDIATE = {"cdi.kubevirt.io/storage.bind.immediate.requested": "true"}


def test_http_imports_qcow2_and_raw_xz_then_clones_and_blank(
        cluster: Cluster, images: tuple[Server, Path]) -> None:
    server, root = images
    raw = root / "guest.raw"
    size = raw.stat().st_size
    create_dv(cluster, datavolume("qcow2", {"http": {"url": server.url("guest.qcow2")}},
                                  annotations=IMMEDIATE))
    create_dv(cluster, datavolume("rawxz", {"http": {"url": server.url("guest.raw.xz")}},
                                  annotations=IMMEDIATE))
    for name in ("qcow2", "rawxz"):
        dv = wait_dv(cluster, name, "Succeeded")
        assert dv["status"]["progress"] == "100.0%"
        assert condition(dv, "Ready")["status"] == "True"
        assert condition(dv, "Bound")["status"] == "True"
        image = volume_image(cluster, name)
        # the guest's bytes, converted to raw and grown to the claim's size
        assert sha(image, size) == sha(raw, size)
        assert image.stat().st_size == 128 * 2**20
        assert any(e["reason"] == "ImportSucceeded" for e in events_for(cluster, name))
    # kubectl shows CDI's columns
    out = cluster.kubectl.run("get", "dv", "-n", NS, "qcow2").stdout
    assert "Succeeded" in out and "100.0%" in out

    create_dv(cluster, datavolume("copy", {"pvc": {"namespace": NS, "name": "qcow2"}},
                                  annotations=IMMEDIATE))
    dv = wait_dv(cluster, "copy", "Succeeded")
    assert sha(volume_image(cluster, "copy"), size) == sha(raw, size)
    pvc = cluster.request("GET", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/copy").json()
    assert pvc["metadata"]["annotations"]["k8s.io/CloneRequest"] == f"{NS}/qcow2"
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "DataVolume"

    create_dv(cluster, datavolume("empty", {"blank": {}}, size="64Mi", annotations=IMMEDIATE))
    wait_dv(cluster, "empty", "Succeeded")
    image = volume_image(cluster, "empty")
    assert image.stat().st_size == 64 * 2**20
    assert image.stat().st_blocks * 512 < 2**20  # sparse

    # deleting a DataVolume deletes its claim (owner reference) and then the volume
    r = cluster.request("DELETE", f"{DVS}/empty")
    assert r.ok, r.text
    wait_for(lambda: not image.parent.exists(), "the blank volume's directory to go", 60)


def test_vm_with_datavolume_template_boots_the_imported_guest(
        cluster: Cluster, images: tuple[Server, Path]) -> None:
    server, _ = images
    vm = yaml.safe_load((CORPUS / "vm-alpine-datavolume.yaml").read_text())
    template = vm["spec"]["dataVolumeTemplates"][0]
    template["spec"]["source"] = {"http": {"url": server.url("guest.qcow2")}}
    del template["spec"]["pvc"]["storageClassName"]  # the corpus names a class "local"
    vm["spec"]["runStrategy"] = "Always"
    r = cluster.request("POST", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", vm)
    assert r.status_code == 201, r.text
    name = vm["metadata"]["name"]
    dv = wait_dv(cluster, "alpine-dv", "Succeeded", 120)
    assert dv["metadata"]["ownerReferences"][0]["name"] == name
    cluster.wait_printable(NS, name, "Running", 120)
    console = cluster.console(NS, name)
    try:
        console.read_until("TESTGUEST-READY", 120)
    finally:
        console.close()
    cluster.cli("stop", name, "-n", NS)
    cluster.wait_printable(NS, name, "Stopped", 60)


def test_bad_sources_end_in_a_clear_phase(cluster: Cluster,
                                          images: tuple[Server, Path]) -> None:
    server, _ = images
    create_dv(cluster, datavolume("missing", {"http": {"url": server.url("nope.qcow2")}},
                                  annotations=IMMEDIATE))
    create_dv(cluster, datavolume("html", {"http": {"url": server.url("index.html")}},
                                  annotations=IMMEDIATE))
    create_dv(cluster, datavolume("small", {"http": {"url": server.url("guest.qcow2")}},
                                  size="16Mi", annotations=IMMEDIATE))
    for name, words in (("missing", ("404",)), ("html", ()), ("small", ())):
        dv = wait_dv(cluster, name, "Failed", 60)
        running = condition(dv, "Running")
        assert running["status"] == "False" and running.get("reason"), running
        for w in words:
            assert w in running.get("message", ""), running
        image = volume_image(cluster, name)
        assert not image.exists(), "a failed import left a disk behind"
        assert list(image.parent.iterdir()) == [], list(image.parent.iterdir())

    # nothing answers: retried (restartCount grows), still in progress
    create_dv(cluster, datavolume("refused", {"http": {"url": "http://127.0.0.1:9/x.img"}},
                                  annotations=IMMEDIATE))
    dv = wait_for(lambda: (d := dv_of(cluster, "refused")).get("status", {}).get(
        "restartCount", 0) >= 1 and d, "restarts of an unreachable import", 60)
    assert dv["status"]["phase"] == "ImportInProgress"
    assert condition(dv, "Running")["status"] == "False"

    # larger than any node can hold: the claim stays Pending with a ProvisioningFailed event
    create_dv(cluster, datavolume("huge", {"blank": {}}, size="900Ti", annotations=IMMEDIATE))
    event = wait_for(lambda: next((e for e in cluster.request(
        "GET", f"/api/v1/namespaces/{NS}/events").json()["items"]
        if e["involvedObject"]["name"] == "huge" and e["reason"] == "ProvisioningFailed"),
        None), "a ProvisioningFailed event", 30)
    assert "insufficient storage" in event["message"]
    assert dv_of(cluster, "huge")["status"]["phase"] == "Pending"


def guest_output(cluster: Cluster, name: str, command: str, until: str) -> str:
    return run_in_guest(cluster, name, command, until, ns=NS)


def test_a_claim_grows_online_and_offline_and_never_shrinks(cluster: Cluster) -> None:
    from tests.e2e.test_vm_lifecycle import kernel_vm

    create_dv(cluster, datavolume("grow", {"blank": {}}, size="64Mi"))
    vm = kernel_vm("grower", "Always")
    spec = vm["spec"]["template"]["spec"]
    spec["volumes"] = [{"name": "data", "dataVolume": {"name": "grow"}}]
    spec["domain"]["devices"]["disks"] = [{"name": "data", "disk": {"bus": "virtio"}}]
    cluster.create(NS, vm)
    cluster.wait_printable(NS, "grower", "Running", 120)
    out = guest_output(cluster, "grower", "echo SIZE=$(cat /sys/block/vda/size)=", r"SIZE=\d+=")
    assert "SIZE=131072" in out, out  # 64 MiB in 512-byte sectors

    claim = f"/api/v1/namespaces/{NS}/persistentvolumeclaims/grow"

    def request(size: str, check: bool = True) -> Any:
        return cluster.kubectl.run("patch", "pvc", "grow", "-n", NS, "--type", "merge", "-p",
                                   json.dumps({"spec": {"resources": {"requests": {
                                       "storage": size}}}}), check=check)

    shrink = request("32Mi", check=False)
    assert shrink.returncode != 0
    assert "spec.resources.requests.storage: Forbidden: field can not be less than " \
        "status.capacity" in shrink.stderr, shrink.stderr

    # online: the running guest sees the new size (QMP block_resize)
    request("96Mi")
    wait_for(lambda: cluster.request("GET", claim).json()["status"]["capacity"]["storage"]
             == "96Mi", "the claim's capacity to grow", 60)
    out = guest_output(cluster, "grower", "echo SIZE=$(cat /sys/block/vda/size)=", r"SIZE=\d+=")
    assert "SIZE=196608" in out, out
    image = volume_image(cluster, "grow")
    assert image.stat().st_size == 96 * 2**20

    # offline
    cluster.cli("stop", "grower", "-n", NS)
    cluster.wait_printable(NS, "grower", "Stopped", 60)
    request("128Mi")
    wait_for(lambda: image.stat().st_size == 128 * 2**20, "disk.img to grow offline", 60)
    cluster.cli("start", "grower", "-n", NS)
    cluster.wait_printable(NS, "grower", "Running", 120)
    out = guest_output(cluster, "grower", "echo SIZE=$(cat /sys/block/vda/size)=", r"SIZE=\d+=")
    assert "SIZE=262144" in out, out

    # a claim in use is protected: deleting its DataVolume leaves it Terminating until the
    # VM stops (kubernetes.io/pvc-protection)
    assert cluster.request("DELETE", f"{DVS}/grow").ok
    held = wait_for(lambda: cluster.request("GET", claim).json()["metadata"].get(
        "deletionTimestamp") and cluster.request("GET", claim).json(), "the claim to be deleting",
        30)
    assert held["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    assert cluster.vm(NS, "grower")["status"]["printableStatus"] == "Running"  # type: ignore[index]
    cluster.cli("stop", "grower", "-n", NS)
    wait_for(lambda: cluster.request("GET", claim).status_code == 404,
             "the claim to go once unused", 60)
    wait_for(lambda: not image.parent.exists(), "the volume's directory to go", 60)
    assert cluster.request("DELETE", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/"
                                     "grower").ok


def test_block_mode_volume_is_a_loop_device_for_qemu(cluster: Cluster,
                                                     images: tuple[Server, Path]) -> None:
    from tests.e2e.test_vm_lifecycle import kernel_vm

    server, root = images
    dv = datavolume("blockdisk", {"http": {"url": server.url("guest.raw.xz")}}, size="96Mi")
    dv["spec"]["storage"]["volumeMode"] = "Block"
    create_dv(cluster, dv)
    vm = kernel_vm("blocky", "Always")
    spec = vm["spec"]["template"]["spec"]
    spec["volumes"] = [{"name": "data", "dataVolume": {"name": "blockdisk"}}]
    spec["domain"]["devices"]["disks"] = [{"name": "data", "disk": {"bus": "virtio"}}]
    cluster.create(NS, vm)
    cluster.wait_printable(NS, "blocky", "Running", 120)
    image = volume_image(cluster, "blockdisk")
    raw = root / "guest.raw"
    assert sha(image, raw.stat().st_size) == sha(raw, raw.stat().st_size)

    def loops() -> list[str]:
        out = subprocess.run(["losetup", "--json", "--list", "--associated", str(image)],
                             capture_output=True, text=True, check=True).stdout
        return [d["name"] for d in json.loads(out or '{"loopdevices": []}')["loopdevices"]]

    [device] = loops()
    vmi = cluster.vmi(NS, "blocky")
    assert vmi is not None
    argv = Path(f"/proc/{cluster.qemu_pid(vmi['metadata']['uid'])}/cmdline").read_bytes()
    assert device.encode() in argv and b'"host_device"' in argv
    out = guest_output(cluster, "blocky",
                       "echo SIZE=$(cat /sys/block/vda/size)=; printf block-mark | dd of=/dev/vda "
                       "bs=512 seek=180000 conv=notrunc 2>/dev/null; sync; echo done-$((3+4))",
                       "done-7")
    assert "SIZE=196608=" in out, out  # 96 MiB
    with image.open("rb") as f:
        f.seek(180000 * 512)
        assert f.read(10) == b"block-mark"
    cluster.cli("stop", "blocky", "-n", NS)
    cluster.wait_printable(NS, "blocky", "Stopped", 60)
    wait_for(lambda: not loops(), "the loop device to be detached", 60)


class AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files only with HTTP basic auth ``importer:s3cret``."""

    def do_GET(self) -> None:
        wanted = "Basic " + base64.b64encode(b"importer:s3cret").decode()
        if self.headers.get("Authorization") != wanted:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="images"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def test_https_import_with_a_private_ca_and_basic_auth(
        cluster: Cluster, images: tuple[Server, Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    _, root = images
    pki = ensure_pki(tmp_path_factory.mktemp("image-server-pki"), ["127.0.0.1"])
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            partial(AuthHandler, directory=str(root)))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.serving_cert, pki.serving_key)
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/guest.qcow2"
        core = f"/api/v1/namespaces/{NS}"
        assert cluster.request("POST", f"{core}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "image-creds"},
            "stringData": {"accessKeyId": "importer", "secretKey": "s3cret"}}).status_code == 201
        assert cluster.request("POST", f"{core}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wrong-creds"},
            "stringData": {"accessKeyId": "importer", "secretKey": "nope"}}).status_code == 201
        assert cluster.request("POST", f"{core}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "image-ca"},
            "data": {"ca.pem": pki.ca_pem().decode()}}).status_code == 201
        create_dv(cluster, datavolume("private", {"http": {
            "url": url, "secretRef": "image-creds", "certConfigMap": "image-ca"}},
            annotations=IMMEDIATE))
        create_dv(cluster, datavolume("untrusted", {"http": {
            "url": url, "secretRef": "image-creds"}}, annotations=IMMEDIATE))
        create_dv(cluster, datavolume("denied", {"http": {
            "url": url, "secretRef": "wrong-creds", "certConfigMap": "image-ca"}},
            annotations=IMMEDIATE))
        wait_dv(cluster, "private", "Succeeded")
        raw = root / "guest.raw"
        assert sha(volume_image(cluster, "private"), raw.stat().st_size) == \
            sha(raw, raw.stat().st_size)
        for name, reason in (("untrusted", "TLSError"), ("denied", "Unauthorized")):
            dv = wait_dv(cluster, name, "Failed", 60)
            assert condition(dv, "Running")["reason"] == reason, dv["status"]
    finally:
        httpd.shutdown()
        httpd.server_close()


class SlowHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files at about 10 MiB/s (a slow link), so an import is seen mid-way."""

    def copyfile(self, source: Any, outputfile: Any) -> None:
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(0.1)  # the link's pace, not a synchronisation

    def log_message(self, *args: Any) -> None:
        pass


def test_progress_is_reported_while_importing(cluster: Cluster,
                                              images: tuple[Server, Path]) -> None:
    _, root = images
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            partial(SlowHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/guest.raw"
        create_dv(cluster, datavolume("slow", {"http": {"url": url}}, annotations=IMMEDIATE))
        seen: set[str] = set()

        def midway() -> bool:
            status = dv_of(cluster, "slow").get("status") or {}
            if status.get("phase") == "ImportInProgress":
                seen.add(status.get("progress", ""))
            return any(p.endswith("%") and 0 < float(p[:-1]) < 100 for p in seen)

        wait_for(midway, "a progress between 0% and 100%", 60, interval=0.1)
        dv = wait_dv(cluster, "slow", "Succeeded", 60)
        assert dv["status"]["progress"] == "100.0%"
        assert condition(dv, "Running")["reason"] == "Completed"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_registry_import_from_an_insecure_registry(cluster: Cluster,
                                                   images: tuple[Server, Path]) -> None:
    from tests.integration.test_importer import PASSWORD, Registry, layer
    from tests.integration.test_importer import Server as RegistryServer

    _, root = images
    server = RegistryServer().start()
    try:
        Registry(server, "disks/alpine", "v1",
                 [layer({"disk/": b"", "./disk/guest.qcow2": (root / "guest.qcow2").read_bytes()})])
        host = f"127.0.0.1:{server.port}"
        config = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDIConfig",
                  "metadata": {"name": "config"}, "spec": {"insecureRegistries": [host]}}
        configs = "/apis/cdi.kubevirt.io/v1beta1/cdiconfigs"
        if cluster.request("POST", configs, config).status_code == 409:
            cluster.kubectl.run("patch", "cdiconfig", "config", "--type", "merge", "-p",
                                json.dumps({"spec": {"insecureRegistries": [host]}}))
        assert cluster.request("POST", f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registry-creds"},
            "stringData": {"accessKeyId": "puller", "secretKey": PASSWORD}}).status_code == 201
        create_dv(cluster, datavolume("fromregistry", {"registry": {
            "url": f"docker://{host}/disks/alpine:v1", "secretRef": "registry-creds"}},
            annotations=IMMEDIATE))
        wait_dv(cluster, "fromregistry", "Succeeded")
        raw = root / "guest.raw"
        assert sha(volume_image(cluster, "fromregistry"), raw.stat().st_size) == \
            sha(raw, raw.stat().st_size)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
