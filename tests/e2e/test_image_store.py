"""The cluster image store end to end: the real CLI, a real ``virtshift up``, the node cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import REPO
from virtshift.client import kubeconfig
from virtshift.client.rest import Client, resource_path
from virtshift.errors import NotFound
from virtshift.storage.imagecache import (
    ImageCache,
    ImageNotFound,
    ImageNotReady,
    create_overlay,
)
from virtshift.storage.imagestore import SHA256_HEADER, image_kind, image_name
from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

MAX_SIZE = 8 * 1024 * 1024  # the store's limit in these tests
VIRTSHIFT = REPO / ".venv" / "bin" / "virtshift"


@pytest.fixture(scope="module", autouse=True)
def qemu_utils() -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io missing: apt-get install qemu-utils")


@pytest.fixture(scope="module")
def store_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    p = PlatformProcess(tmp_path_factory.mktemp("imagestore"),
                        env={"VIRTSHIFT_IMAGE_MAX_SIZE": str(MAX_SIZE)})
    p.start()
    yield p
    p.stop()


@pytest.fixture
async def client(store_platform: PlatformProcess) -> AsyncIterator[Client]:
    c = Client(store_platform.config())
    yield c
    await c.close()


def cli(platform: PlatformProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(VIRTSHIFT)] if VIRTSHIFT.exists() else [sys.executable, "-m",
                                                       "virtshift.cli.main"]
    return subprocess.run([*cmd, "--kubeconfig", str(platform.kubeconfig), *args],
                          capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


async def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.to_thread(subprocess.run, list(cmd), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_qcow2(path: Path, pattern: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P {pattern} 0 1M", str(path)], check=True,
                   capture_output=True)
    return path


def list_rows(platform: PlatformProcess) -> dict[str, list[str]]:
    out = ok(cli(platform, "image", "list")).splitlines()
    assert out[0].split() == ["REFERENCE", "TYPE", "SIZE", "PHASE", "AGE"]
    return {line.split()[0]: line.split()[1:] for line in out[1:]}


def server_blob(platform: PlatformProcess, digest: str) -> Path:
    return platform.data_dir / "images" / "sha256" / digest


def wait_gone(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} still exists"
        time.sleep(0.05)


async def test_disk_import_resolve_overlay_remove(store_platform: PlatformProcess,
                                                  client: Client, tmp_path: Path) -> None:
    ref = "registry:5000/kubevirt/cirros-container-disk-demo:devel"
    disk = make_qcow2(tmp_path / "disk.qcow2", 0x5A)
    digest = sha256(disk)
    out = ok(await asyncio.to_thread(cli, store_platform, "image", "import", ref, str(disk)))
    assert f'image "{ref}" imported (qcow2' in out
    row = (await asyncio.to_thread(list_rows, store_platform))[ref]
    assert row[0] == "disk" and row[2] == "Ready"
    image = await client.get(image_kind(), None, image_name(ref))
    assert image["spec"]["reference"] == ref
    st = image["status"]
    assert st["format"] == "qcow2" and st["virtualSize"] == 64 * 1024 * 1024
    assert st["blobs"]["disk"]["sha256"] == digest and st["size"] == disk.stat().st_size
    assert server_blob(store_platform, digest).exists()

    cache = ImageCache(tmp_path / "cache", client)
    resolved = await cache.resolve(ref)
    assert resolved.type == "disk" and resolved.format == "qcow2"
    assert resolved.disk is not None and sha256(resolved.disk) == digest
    assert cache.downloaded_bytes == disk.stat().st_size
    again = await cache.resolve(ref)  # cached: nothing downloaded
    assert again.disk == resolved.disk and cache.downloaded_bytes == disk.stat().st_size

    overlay = tmp_path / "vm" / "overlay.qcow2"
    overlay.parent.mkdir()
    await create_overlay(resolved.disk, resolved.format or "", overlay)
    info = json.loads((await sh("qemu-img", "info", "--output=json", str(overlay))).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(resolved.disk.resolve())
    assert info.get("backing-filename-format") == "qcow2"
    await sh("qemu-io", "-c", "write -P 0xcd 0 2M", str(overlay))
    read = await sh("qemu-io", "-c", "read -P 0xcd 0 2M", str(overlay))
    assert "Pattern verification failed" not in read.stdout
    base_read = await sh("qemu-io", "-r", "-c", "read -P 0x5a 0 1M", str(resolved.disk))
    assert "Pattern verification failed" not in base_read.stdout
    assert sha256(resolved.disk) == digest  # the base never changes

    with pytest.raises(ImageNotFound) as e:
        await cache.resolve("registry:5000/kubevirt/no-such-image:devel")
    assert "registry:5000/kubevirt/no-such-image:devel" in str(e.value)
    assert e.value.reference == "registry:5000/kubevirt/no-such-image:devel"

    out = ok(await asyncio.to_thread(cli, store_platform, "image", "rm", ref))
    assert f'image "{ref}" deleted' in out
    assert ref not in await asyncio.to_thread(list_rows_or_empty, store_platform)
    await asyncio.to_thread(wait_gone, server_blob(store_platform, digest))
    with pytest.raises(ImageNotFound):
        await cache.resolve(ref)


def list_rows_or_empty(platform: PlatformProcess) -> dict[str, list[str]]:
    proc = cli(platform, "image", "list")
    ok(proc)
    if not proc.stdout.strip():
        assert "No images found." in proc.stderr
        return {}
    return list_rows(platform)


async def test_kernel_initrd_round_trip(store_platform: PlatformProcess, client: Client,
                                        tmp_path: Path) -> None:
    ref = "virtshift/testguest-kernel:latest"
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(700_000))
    out = ok(await asyncio.to_thread(cli, store_platform, "image", "import", ref, "--kernel",
                                     str(kernel), "--initrd", str(initrd), "--cmdline",
                                     "console=ttyS0 quiet"))
    assert "imported (kernel" in out
    row = (await asyncio.to_thread(list_rows, store_platform))[ref]
    assert row[0] == "kernel" and row[2] == "Ready"
    cache = ImageCache(tmp_path / "cache", client)
    # An untagged reference finds the :latest image, as container runtimes do.
    resolved = await cache.resolve("virtshift/testguest-kernel")
    assert resolved.type == "kernel" and resolved.cmdline == "console=ttyS0 quiet"
    assert resolved.kernel is not None and resolved.initrd is not None
    assert resolved.kernel.read_bytes() == kernel.read_bytes()
    assert resolved.initrd.read_bytes() == initrd.read_bytes()
    assert resolved.disk is None

    # Re-import with a new kernel only: the image stays Ready throughout, then serves the new
    # kernel without an initrd; the old blobs are collected.
    old = {p: sha256(f) for p, f in (("kernel", kernel), ("initrd", initrd))}
    kernel.write_bytes(os.urandom(200_000))
    ok(await asyncio.to_thread(cli, store_platform, "image", "import", ref, "--kernel",
                               str(kernel)))
    image = await client.get(image_kind(), None, image_name(ref))
    assert set(image["status"]["blobs"]) == {"kernel"}
    assert image["status"]["blobs"]["kernel"]["sha256"] == sha256(kernel)
    assert image["spec"]["cmdline"] == ""
    for digest in old.values():
        await asyncio.to_thread(wait_gone, server_blob(store_platform, digest))
    resolved = await cache.resolve(ref)
    assert resolved.initrd is None and resolved.kernel is not None
    assert resolved.kernel.read_bytes() == kernel.read_bytes()
    ok(await asyncio.to_thread(cli, store_platform, "image", "rm", ref))


async def _import_raw(platform: PlatformProcess, tmp_path: Path, ref: str, size: int
                      ) -> Path:
    path = tmp_path / f"{image_name(ref)}.raw"
    path.write_bytes(os.urandom(size))
    ok(await asyncio.to_thread(cli, platform, "image", "import", ref, str(path)))
    return path


async def test_interrupted_download_resumes(store_platform: PlatformProcess, client: Client,
                                            tmp_path: Path) -> None:
    ref = "virtshift/resume:1"
    src = await _import_raw(store_platform, tmp_path, ref, 3 * 1024 * 1024 + 123)
    data, digest, size = src.read_bytes(), sha256(src), src.stat().st_size
    name = image_name(ref)

    # Range requests straight to the store.
    path = resource_path(image_kind(), None, name, "disk")
    async with client.session.get(path, headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 10-19/{size}"
        assert resp.headers[SHA256_HEADER] == digest
        assert await resp.read() == data[10:20]
    async with client.session.get(path, headers={"Range": f"bytes={size}-"}) as resp:
        assert resp.status == 416

    # A download cut off after 1 MiB resumes from there.
    cache = ImageCache(tmp_path / "cache", client)
    cache.partial_path(digest).write_bytes(data[:1024 * 1024])
    resolved = await cache.resolve(ref)
    assert resolved.format == "raw" and resolved.disk is not None
    assert sha256(resolved.disk) == digest
    assert cache.downloaded_bytes == size - 1024 * 1024
    assert not cache.partial_path(digest).exists()

    # A partial file that is not a prefix of the blob fails verification and is replaced.
    cache2 = ImageCache(tmp_path / "cache2", client)
    cache2.partial_path(digest).write_bytes(b"\xff" * 4096)
    resolved2 = await cache2.resolve(ref)
    assert resolved2.disk is not None and sha256(resolved2.disk) == digest
    assert cache2.downloaded_bytes == (size - 4096) + size
    ok(await asyncio.to_thread(cli, store_platform, "image", "rm", ref))


async def test_cli_errors(store_platform: PlatformProcess, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        return one_line_error(cli(store_platform, *args))

    assert "no such file" in await asyncio.to_thread(
        run, "image", "import", "x/missing:1", str(tmp_path / "missing.qcow2"))
    assert 'image "x/unknown:1" not found' in await asyncio.to_thread(
        run, "image", "rm", "x/unknown:1")
    assert "FILE" in await asyncio.to_thread(run, "image", "import", "x/nothing:1")
    big = tmp_path / "big.raw"
    big.write_bytes(os.urandom(MAX_SIZE + 1))
    assert "too large" in await asyncio.to_thread(run, "image", "import", "x/big:1", str(big))
    base = make_qcow2(tmp_path / "base.qcow2", 1)
    backed = tmp_path / "backed.qcow2"
    await sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
             str(backed))
    assert "backing file" in await asyncio.to_thread(run, "image", "import", "x/backed:1",
                                                     str(backed))
    # Failed first imports leave nothing behind.
    rows = await asyncio.to_thread(list_rows_or_empty, store_platform)
    assert "x/big:1" not in rows and "x/backed:1" not in rows
    # An unreachable API server: one line too.
    cfg = kubeconfig.load(store_platform.kubeconfig)
    dead = tmp_path / "dead-kubeconfig"
    kubeconfig.write(dead, kubeconfig.render("https://127.0.0.1:9", cfg.ca_pem, cfg.token))
    cmd = [str(VIRTSHIFT)] if VIRTSHIFT.exists() else [sys.executable, "-m",
                                                       "virtshift.cli.main"]
    proc = await asyncio.to_thread(subprocess.run, [*cmd, "--kubeconfig", str(dead), "image",
                                                    "list"], capture_output=True, text=True)
    assert "cannot talk to the API server" in one_line_error(proc)


async def _put(client: Client, name: str, part: str, data: object,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    async with client.session.put(resource_path(image_kind(), None, name, part), data=data,
                                  headers={"Content-Type": "application/octet-stream",
                                           **(headers or {})}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_upload_errors_are_status_objects(store_platform: PlatformProcess,
                                                client: Client, tmp_path: Path) -> None:
    ref = "virtshift/errors:1"
    src = await _import_raw(store_platform, tmp_path, ref, 100_000)
    name = image_name(ref)

    code, body = await _put(client, name, "disk", b"hello", {SHA256_HEADER: "0" * 64})
    assert code == 400 and body["kind"] == "Status" and "sha256 mismatch" in str(body["message"])
    image = await client.get(image_kind(), None, name)  # still serving the good import
    assert image["status"]["phase"] == "Ready"
    assert image["status"]["blobs"]["disk"]["sha256"] == sha256(src)
    code, body = await _put(client, name, "disk", b"hello", {"Content-Type": "text/plain"})
    assert code == 415 and body["reason"] == "UnsupportedMediaType"
    code, body = await _put(client, "no-such-image", "disk", b"hello")
    assert code == 404 and body["reason"] == "NotFound"
    code, body = await _put(client, name, "kernel", b"hello")
    assert code == 400 and "not kernel" in str(body["message"])
    async with client.session.get(resource_path(image_kind(), None, name, "kernel")) as resp:
        assert resp.status == 404 and (await resp.json())["code"] == 404
    async with client.session.delete(resource_path(image_kind(), None, name, "disk")) as resp:
        assert resp.status == 405

    async def chunks(n: int, pause: float = 0.0) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"\0" * 65536
            await asyncio.sleep(pause)

    # Too large without a Content-Length: cut off while streaming.
    code, body = await _put(client, name, "disk", chunks(MAX_SIZE // 65536 + 2))
    assert code == 413 and body["reason"] == "RequestEntityTooLarge"

    # Two uploads of the same blob at once: the second is refused with 409.
    slow = asyncio.create_task(_put(client, name, "disk", chunks(40, 0.05)))
    await asyncio.sleep(0.5)
    code, body = await _put(client, name, "disk", b"hello")
    assert code == 409 and body["reason"] == "Conflict"
    code, body = await slow
    assert code == 200 and body["status"]["phase"] == "Ready"
    assert body["status"]["format"] == "raw" and body["status"]["size"] == 40 * 65536
    await asyncio.to_thread(wait_gone, server_blob(store_platform, sha256(src)))

    # A Failed image is not resolvable; the error names it.
    client_cache = ImageCache(tmp_path / "cache", client)
    kind = image_kind()
    await client.create(kind, None, {"apiVersion": kind.api_version, "kind": kind.kind,
                                     "metadata": {"name": image_name("x/failed:1")},
                                     "spec": {"reference": "x/failed:1"}})
    code, _ = await _put(client, image_name("x/failed:1"), "disk", b"x", {SHA256_HEADER: "1" * 64})
    assert code == 400
    with pytest.raises(ImageNotReady, match=r"x/failed:1.*Failed"):
        await client_cache.resolve("x/failed:1")
    for n in (name, image_name("x/failed:1")):
        await client.delete(kind, None, n)
    with pytest.raises(NotFound):
        await client.get(kind, None, name)


async def test_restart_fails_interrupted_uploads(tmp_path: Path) -> None:
    """An upload cut off by a control-plane crash: after restart the image is Failed, the
    temporary file is gone, and a new import succeeds."""
    platform = PlatformProcess(tmp_path / "data")
    platform.start()
    try:
        c = Client(platform.config())
        kind, ref = image_kind(), "x/crash:1"
        await c.create(kind, None, {"apiVersion": kind.api_version, "kind": kind.kind,
                                    "metadata": {"name": image_name(ref)},
                                    "spec": {"reference": ref}})

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"\0" * 65536
                await asyncio.sleep(0.01)

        upload = asyncio.create_task(_put(c, image_name(ref), "disk", endless()))
        tmp_dir = platform.data_dir / "images" / "tmp"
        deadline = time.monotonic() + 10
        while not any(tmp_dir.iterdir()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.to_thread(platform.kill)
        with pytest.raises(aiohttp.ClientError):
            await upload
        await c.close()
        await asyncio.to_thread(platform.start)
        c = Client(platform.config())
        image = await c.get(kind, None, image_name(ref))
        deadline = time.monotonic() + 10
        while image["status"]["phase"] != "Failed":
            assert image["status"]["phase"] == "Uploading" and time.monotonic() < deadline
            await asyncio.sleep(0.05)
            image = await c.get(kind, None, image_name(ref))
        assert "interrupted" in image["status"]["message"]
        assert not any(tmp_dir.iterdir())
        src = tmp_path / "disk.qcow2"
        make_qcow2(src, 7)
        ok(await asyncio.to_thread(cli, platform, "image", "import", ref, str(src)))
        assert (await asyncio.to_thread(list_rows, platform))[ref][2] == "Ready"
        await c.close()
    finally:
        platform.stop()


async def test_unauthenticated_blob_access_is_refused(store_platform: PlatformProcess) -> None:
    cfg = store_platform.config()
    async with aiohttp.ClientSession(base_url=cfg.server,
                                     connector=aiohttp.TCPConnector(ssl=cfg.ssl_context())
                                     ) as s:
        async with s.get(resource_path(image_kind(), None, "anything", "disk")) as resp:
            assert resp.status == 401
        async with s.put(resource_path(image_kind(), None, "anything", "disk"),
                         data=b"x") as resp:
            assert resp.status == 401
