"""Uploads end to end (TCG): ``virtshift image-upload`` into a DataVolume through the upload proxy
on the API server's port, a VM booting the uploaded test guest, upload tokens that are refused
(garbage, forged, expired, for a missing claim), and a cut-off upload that leaves no disk and
can be done again."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e.vmtools import Cluster, guest_cluster, wait_for
from virtshift.api import cdi
from virtshift.apiserver.upload import KEY_FILE, issue_token
from virtshift.testing.guest import GuestImages

pytestmark = pytest.mark.e2e

NS = "upload"
DVS = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
TOKENS = f"/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{NS}/uploadtokenrequests"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with guest_cluster(tmp_path_factory, "upload",
                       env={"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "2"}) as c:
        c.kubectl.run("create", "namespace", NS)
        yield c


@pytest.fixture(scope="module")
def guest_disk() -> Path:
    return GuestImages.locate().disk


def get(cluster: Cluster, path: str) -> dict[str, Any] | None:
    r = cluster.request("GET", path)
    out: dict[str, Any] | None = r.json() if r.ok else None
    return out


def ann_of(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def volume_dir(cluster: Cluster, claim: str) -> Path:
    pvc = wait_for(lambda: (lambda p: p if p and p["spec"].get("volumeName") else None)(
        get(cluster, f"{PVCS}/{claim}")), f"claim {claim} to be bound", 60)
    return cluster.data_dir / "nodes" / "node01" / "storage" / str(pvc["spec"]["volumeName"])


def proxy(cluster: Cluster, method: str, path: str, token: str | None,
          data: bytes | None = None) -> requests.Response:
    """A request to the upload proxy with an upload token (not the user's)."""
    cfg = cluster.platform.config()
    s, _ = cluster._session()
    with s:
        s.headers.pop("Authorization", None)
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return s.request(method, cfg.server + path, headers=headers, data=data, timeout=60)


def token_for(cluster: Cluster, claim: str) -> str:
    r = cluster.request("POST", TOKENS, {"apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                                         "kind": "UploadTokenRequest",
                                         "metadata": {"name": "t"}, "spec": {"pvcName": claim}})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "UploadTokenRequest" and body["spec"]["pvcName"] == claim
    return str(body["status"]["token"])


def upload_dv(name: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "annotations": {cdi.ANN_BIND_IMMEDIATE: "true"}},
            "spec": {"source": {"upload": {}},
                     "storage": {"resources": {"requests": {"storage": "128Mi"}}}}}


def wait_dv_phase(cluster: Cluster, name: str, phase: str, timeout: float = 60
                  ) -> dict[str, Any]:
    try:
        return wait_for(lambda: (lambda d: d if d and (d.get("status") or {}).get("phase")
                                 == phase else None)(get(cluster, f"{DVS}/{name}")),
                        f"DataVolume {name} phase {phase}", timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\nDV: {json.dumps(get(cluster, f'{DVS}/{name}'), indent=1)}\n"
                             f"PVC: {json.dumps(get(cluster, f'{PVCS}/{name}'), indent=1)}\n"
                             f"log tail:\n{cluster.platform.log_text()[-3000:]}") from None


def disk_vm(name: str, dv: str) -> dict[str, Any]:
    """A VM booting (BIOS, from disk) the DataVolume ``dv``."""
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "terminationGracePeriodSeconds": 0,
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                       "memory": {"guest": "128Mi"}},
            "volumes": [{"name": "root", "dataVolume": {"name": dv}}]}}},
    }


class PartialUpload:
    """A POST to the upload proxy over a raw TLS socket that announces ``total`` bytes and
    sends only what :meth:`send` is given: an upload cut off when :meth:`close` is called."""

    def __init__(self, cluster: Cluster, token: str, total: int) -> None:
        cfg = cluster.platform.config()
        url = urlsplit(cfg.server)
        ctx = ssl.create_default_context(cadata=cfg.ca_pem.decode())
        raw = socket.create_connection((url.hostname or "127.0.0.1", url.port or 443), 10)
        self.sock = ctx.wrap_socket(raw, server_hostname=url.hostname)
        head = (f"POST /v1beta1/upload HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {total}\r\n\r\n")
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_image_upload_dv_then_a_vm_boots_it(cluster: Cluster, guest_disk: Path) -> None:
    args = ["image-upload", "dv", "updisk", "-n", NS, "--size", "128Mi",
            "--image-path", str(guest_disk)]
    # The default class binds on first consumer: refused without --force-bind, as virtctl.
    refused = cluster.cli(*args, "--wait-secs", "30", check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert ("cannot upload to DataVolume in WaitForFirstConsumer phase, make sure the PVC is "
            "Bound, or use force-bind flag") in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "DataVolume upload/updisk created" in refused.stdout

    started = time.monotonic()
    done = cluster.cli(*args, "--force-bind", timeout=180)
    seconds = time.monotonic() - started
    assert "Using existing" in done.stdout, done.stdout
    assert f"Uploading {guest_disk} completed successfully" in done.stdout, done.stdout
    assert "100%" in done.stderr and "/s" in done.stderr, done.stderr  # the progress bar
    dv = wait_dv_phase(cluster, "updisk", "Succeeded", 10)
    assert dv["status"]["progress"] == "100.0%", dv["status"]
    pvc = get(cluster, f"{PVCS}/updisk")
    assert ann_of(pvc)[cdi.ANN_POD_PHASE] == cdi.POD_SUCCEEDED
    disk = volume_dir(cluster, "updisk") / "disk.img"
    assert disk.stat().st_size == 128 * 1024 * 1024  # grown to the capacity
    print(f"upload of {guest_disk.stat().st_size} bytes (qcow2) to Succeeded: {seconds:.1f} s")

    # A second upload into a populated volume is refused.
    again = cluster.cli(*args, check=False)
    assert again.returncode == 1
    assert "already successfully imported/cloned/updated" in again.stderr, again.stderr

    cluster.create(NS, disk_vm("upvm", "updisk"))
    cluster.wait_vmi_phase(NS, "upvm", "Running", 120)
    console = cluster.console(NS, "upvm")
    try:
        console.read_until("TESTGUEST-READY", 180)
    finally:
        console.close()
    cluster.kubectl.run("delete", "vm", "-n", NS, "upvm")
    cluster.wait_vmi_gone(NS, "upvm")


def test_upload_tokens_are_checked(cluster: Cluster, guest_disk: Path) -> None:
    r = cluster.request("POST", DVS, upload_dv("tokdv"))
    assert r.status_code == 201, r.text
    wait_dv_phase(cluster, "tokdv", "UploadReady")
    token = token_for(cluster, "tokdv")
    # The probe virtctl sends first.
    assert proxy(cluster, "HEAD", "/v1beta1/upload-async", token).status_code == 200

    # Garbage, a token whose signature is wrong, an expired one and none at all.
    assert proxy(cluster, "POST", "/v1beta1/upload", "garbage", b"x").status_code == 401
    forged = issue_token(b"not-the-server-key", NS, "tokdv", now=time.time())
    assert proxy(cluster, "POST", "/v1beta1/upload", forged, b"x").status_code == 401
    key = bytes.fromhex((cluster.data_dir / KEY_FILE).read_text().strip())
    expired = issue_token(key, NS, "tokdv", now=time.time() - 301)
    r = proxy(cluster, "POST", "/v1beta1/upload-async", expired, b"x")
    assert r.status_code == 401 and "expired" in r.json()["message"], r.text
    assert proxy(cluster, "POST", "/v1beta1/upload", None, b"x").status_code == 400
    # The user's own API token is no upload token.
    user_token = cluster.platform.config().token
    assert proxy(cluster, "POST", "/v1beta1/upload", user_token, b"x").status_code == 401
    # A valid token for a claim that does not exist.
    r = proxy(cluster, "POST", "/v1beta1/upload", issue_token(key, NS, "nothere",
                                                                now=time.time()), b"x")
    assert r.status_code == 404 and "doesn't exist" in r.json()["message"], r.text
    # UploadTokenRequest for a claim that is missing, or that is not an upload target.
    r = cluster.request("POST", TOKENS, {"apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                                         "kind": "UploadTokenRequest",
                                         "spec": {"pvcName": "nothere"}})
    assert r.status_code == 400 and "does not exist" in r.json()["message"], r.text
    plain = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "plain"},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "16Mi"}}}}
    assert cluster.request("POST", PVCS, plain).status_code == 201
    r = cluster.request("POST", TOKENS, {"apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                                         "kind": "UploadTokenRequest",
                                         "spec": {"pvcName": "plain"}})
    assert r.status_code == 400 and "not an upload target" in r.json()["message"], r.text
    # Garbage was not a disk: refused, and the claim stays ready for a real upload.
    r = proxy(cluster, "POST", "/v1beta1/upload", token, b"<html>not a disk</html>" * 100)
    assert r.status_code == 400, r.text
    pvc = wait_for(lambda: (lambda p: p if ann_of(p).get(cdi.ANN_RUNNING_REASON) ==
                            "InvalidImage" else None)(get(cluster, f"{PVCS}/tokdv")),
                   "the failed upload's reason on the claim", 30)
    assert ann_of(pvc)[cdi.ANN_POD_READY] == "true"
    assert not (volume_dir(cluster, "tokdv") / "disk.img").exists()
    r = proxy(cluster, "POST", "/v1beta1/upload", token, guest_disk.read_bytes())
    assert r.status_code == 200, r.text
    wait_dv_phase(cluster, "tokdv", "Succeeded")


def test_cut_off_upload_leaves_no_disk_and_can_be_redone(cluster: Cluster,
                                                          guest_disk: Path) -> None:
    r = cluster.request("POST", DVS, upload_dv("cutdv"))
    assert r.status_code == 201, r.text
    wait_dv_phase(cluster, "cutdv", "UploadReady")
    directory = volume_dir(cluster, "cutdv")
    data = guest_disk.read_bytes()
    first = PartialUpload(cluster, token_for(cluster, "cutdv"), len(data))
    try:
        first.send(data[:len(data) // 2])
        # The importer is writing its scratch file: the upload is under way on the node.
        wait_for(lambda: directory.is_dir() and any(p.name.startswith(".disk.img")
                                                    for p in directory.iterdir()),
                 "the upload to reach the node", 30)
        # One upload at a time per claim.
        second = proxy(cluster, "POST", "/v1beta1/upload", token_for(cluster, "cutdv"), data)
        assert second.status_code == 409, second.text
        assert "already in progress" in second.json()["message"]
    finally:
        first.close()
    pvc = wait_for(lambda: (lambda p: p if ann_of(p).get(cdi.ANN_RUNNING_REASON) ==
                            "TransferInterrupted" else None)(get(cluster, f"{PVCS}/cutdv")),
                   "the cut-off upload's reason on the claim", 30)
    ann = ann_of(pvc)
    assert ann[cdi.ANN_POD_READY] == "true" and ann[cdi.ANN_POD_PHASE] == cdi.POD_RUNNING
    assert "cut off" in ann[cdi.ANN_RUNNING_MESSAGE], ann
    assert sorted(p.name for p in directory.iterdir()) == []  # no disk, no partial files
    assert wait_dv_phase(cluster, "cutdv", "UploadReady")

    # The same upload again, into the existing DataVolume.
    redo = cluster.cli("image-upload", "dv", "cutdv", "-n", NS, "--no-create",
                       "--image-path", str(guest_disk), timeout=180)
    assert "Using existing PVC upload/cutdv" in redo.stdout, redo.stdout
    wait_dv_phase(cluster, "cutdv", "Succeeded", 10)
    assert (directory / "disk.img").exists()


def test_image_upload_pvc_with_force_bind(cluster: Cluster, guest_disk: Path) -> None:
    base = ["image-upload", "pvc", "uppvc", "-n", NS, "--size", "96Mi",
            "--image-path", str(guest_disk)]
    refused = cluster.cli(*base, "--wait-secs", "20", check=False)
    assert refused.returncode == 1
    assert "WaitForFirstConsumer" in refused.stderr and "force-bind" in refused.stderr
    done = cluster.cli(*base, "--force-bind", timeout=180)
    assert "Processing completed successfully" in done.stdout, done.stdout
    pvc = get(cluster, f"{PVCS}/uppvc")
    ann = ann_of(pvc)
    assert ann[cdi.ANN_POD_PHASE] == cdi.POD_SUCCEEDED and cdi.ANN_UPLOAD_TARGET in ann
    assert (volume_dir(cluster, "uppvc") / "disk.img").stat().st_size == 96 * 1024 * 1024


def test_image_larger_than_the_volume_is_refused_and_reported(cluster: Cluster,
                                                              guest_disk: Path) -> None:
    small = cluster.cli("image-upload", "dv", "small", "-n", NS, "--size", "16Mi",
                        "--force-bind", "--image-path", str(guest_disk), check=False)
    assert small.returncode == 1, small.stdout + small.stderr
    last = small.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unexpected return value 400, upload into PVC small failed:")
    assert "cut off" not in last, last
    dv = wait_dv_phase(cluster, "small", "UploadReady")
    running = next(c for c in dv["status"]["conditions"] if c["type"] == "Running")
    assert running["reason"] == "ImageTooLarge", dv["status"]
    assert not (volume_dir(cluster, "small") / "disk.img").exists()


async def test_token_requests_need_rbac_and_an_upload_target(tmp_path: Path) -> None:
    """An API server in this process (real store, real sockets) with a user who is not an
    admin: creating an UploadTokenRequest is forbidden to them."""
    from aiohttp import ClientSession, web

    from virtshift.api.kinds import REGISTRY
    from virtshift.api.schema import default_schemas
    from virtshift.apiserver.app import ApiServer
    from virtshift.apiserver.auth import TokenAuthenticator, UserInfo
    from virtshift.apiserver.server import bootstrap
    from virtshift.apiserver.upload import register_upload, verify_token
    from virtshift.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "store.db")
    await store.start()
    auth = TokenAuthenticator(tmp_path / "tokens.json")
    admin = auth.issue(UserInfo("admin", "", ("system:masters", "system:authenticated")))
    bob = auth.issue(UserInfo("bob", "", ("system:authenticated",)))
    server = ApiServer(store, REGISTRY, default_schemas(), auth)
    service = register_upload(server, tmp_path, proxy_token="p",
                              agent_tls=ssl.create_default_context())
    service.ready_wait = 0.5
    await bootstrap(server)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    tokens = "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/default/uploadtokenrequests"
    request = {"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
               "metadata": {"name": "t"}, "spec": {"pvcName": "disk"}}
    try:
        async with ClientSession(base) as s:
            def as_(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            async with s.post(tokens, json=request, headers=as_(bob)) as r:
                assert r.status == 403
                assert (await r.json())["message"] == (
                    'uploadtokenrequests.upload.cdi.kubevirt.io is forbidden: User "bob" '
                    'cannot create resource "uploadtokenrequests" in API group '
                    '"upload.cdi.kubevirt.io" in the namespace "default"')
            async with s.post(tokens, json=request, headers=as_(admin)) as r:
                assert r.status == 400 and "does not exist" in (await r.json())["message"]
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "disk", "annotations": {cdi.ANN_UPLOAD_TARGET: ""}},
                   "spec": {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}}}}
            async with s.post("/api/v1/namespaces/default/persistentvolumeclaims", json=pvc,
                              headers=as_(admin)) as r:
                assert r.status == 201, await r.text()
            async with s.post(tokens, json=request, headers=as_(admin)) as r:
                assert r.status == 201
                body = await r.json()
            assert body["metadata"] == {"name": "t", "namespace": "default",
                                        "creationTimestamp": body["metadata"][
                                            "creationTimestamp"]}
            key = bytes.fromhex((tmp_path / KEY_FILE).read_text().strip())
            claim = verify_token(key, body["status"]["token"], now=time.time())
            assert (claim.namespace, claim.pvc) == ("default", "disk")
            assert 295 <= claim.expires - time.time() <= 300
            # Create-only, as CDI's: nothing is stored, nothing to list.
            async with s.get(tokens, headers=as_(admin)) as r:
                assert r.status == 405
            # The claim is not bound (nothing binds it here): the proxy says so, as a 503.
            async with s.post("/v1beta1/upload", data=b"x" * 1024,
                              headers=as_(body["status"]["token"])) as r:
                assert r.status == 503
                assert (await r.json())["message"] == \
                    "PVC disk is not bound yet: it is not ready for upload"
    finally:
        await runner.cleanup()
        await store.close()
