"""The importer end to end with real processes: the ``python -m virtshift.storage.importer`` child,
real ``qemu-img``, and real HTTP(S) servers and a tiny OCI registry that the tests run on
127.0.0.1. Every import checks the resulting ``disk.img`` byte for byte (``qemu-img compare``), its
size (the capacity) and that no partial file is left behind."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import lzma
import os
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from virtshift.apiserver.pki import ensure_pki
from virtshift.storage.importer import (
    DISK_NAME,
    PARTIAL_NAME,
    SCRATCH_NAME,
    ImportArgs,
    ImportFailed,
    ImportResult,
    run,
)
from virtshift.testing.guest import free_tcp_port

MiB = 1 << 20
CAPACITY = 64 * MiB
PASSWORD = "s3cret-Pa55"

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    """A threaded HTTP(S) server on 127.0.0.1 whose routes are plain functions."""

    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    port: int = 0

    def start(self) -> Server:
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **dict(self.headers.items())})
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"


def send_bytes(data: bytes, *, status: int = 200, headers: dict[str, str] | None = None
               ) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return handle


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@dataclass(frozen=True)
class Images:
    raw: Path      # 8 MiB: random blocks, zero regions, a marker at the end
    qcow2: Path
    data: bytes


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    d = tmp_path_factory.mktemp("images")
    data = bytearray(8 * MiB)
    for i in range(0, 8 * MiB, MiB):        # half of each MiB random, half zeros
        data[i:i + MiB // 2] = os.urandom(MiB // 2)
    data[-16:] = b"END-OF-THE-DISK!"
    raw = d / "disk.raw"
    raw.write_bytes(bytes(data))
    qcow2 = d / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    return Images(raw, qcow2, bytes(data))


def dest(tmp_path: Path) -> Path:
    d = tmp_path / "pvc"
    d.mkdir(exist_ok=True)
    return d


def assert_disk(d: Path, images: Images, capacity: int = CAPACITY) -> None:
    disk = d / DISK_NAME
    assert disk.stat().st_size == capacity
    with disk.open("rb") as f:
        assert f.read(len(images.data)) == images.data
    # the growth beyond the image is a hole, and the zero halves were not written
    assert disk.stat().st_blocks * 512 < len(images.data) * 0.75
    assert_no_partials(d)


def assert_no_partials(d: Path) -> None:
    assert not (d / PARTIAL_NAME).exists() and not (d / SCRATCH_NAME).exists()
    assert sorted(p.name for p in d.iterdir()) in ([], [DISK_NAME])


async def sh(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv


async def do_import(**kw: Any) -> tuple[ImportResult, list[float]]:
    seen: list[float] = []

    async def progress(v: float) -> None:
        seen.append(v)

    kw.setdefault("capacity", CAPACITY)
    result = await run(ImportArgs(**kw), on_progress=progress)
    return result, seen


async def failed(**kw: Any) -> ImportFailed:
    kw.setdefault("capacity", CAPACITY)
    with pytest.raises(ImportFailed) as e:
        await run(ImportArgs(**kw))
    return e.value


# --- http ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["qcow2", "raw", "raw.gz", "raw.xz", "qcow2.xz"])
async def test_http_import_of_each_format(server: Server, images: Images, tmp_path: Path,
                                          variant: str) -> None:
    base = images.qcow2 if variant.startswith("qcow2") else images.raw
    body = base.read_bytes()
    if variant.endswith(".gz"):
        body = gzip.compress(body, 1)
    elif variant.endswith(".xz"):
        body = lzma.compress(body, preset=0)
    server.routes[f"/disk.{variant}"] = send_bytes(body)
    d = dest(tmp_path)
    result, seen = await do_import(source="http", dest_dir=d, url=server.url(f"/disk.{variant}"))
    assert_disk(d, images)
    assert result.format == variant.split(".")[0]
    assert result.compression == (variant.split(".")[1] if "." in variant else "")
    assert result.virtual_size == len(images.data)
    assert result.bytes_read == len(body)
    assert seen and seen[-1] == 100.0 and seen == sorted(seen)


async def test_basic_auth_and_headers_and_no_secret_on_command_lines(
        server: Server, images: Images, tmp_path: Path) -> None:
    body = images.qcow2.read_bytes()
    command_lines: list[str] = []

    def guarded(h: BaseHTTPRequestHandler) -> None:
        # while the importer waits for this answer, its command line is visible in /proc
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "virtshift.storage.importer" in cmd:
                command_lines.append(cmd)
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        if h.headers.get("Authorization") != expected or h.headers.get("X-Tenant") != "blue":
            send_bytes(b"denied", status=401)(h)
            return
        send_bytes(body)(h)

    server.routes["/private.qcow2"] = guarded
    d = dest(tmp_path)
    e = await failed(source="http", dest_dir=d, url=server.url("/private.qcow2"))
    assert e.reason == "Unauthorized" and not e.retryable and "401" in str(e)
    assert_no_partials(d)
    await do_import(source="http", dest_dir=d, url=server.url("/private.qcow2"),
                    username="alice", password=PASSWORD, headers=("X-Tenant: blue",))
    assert_disk(d, images)
    assert command_lines and all(PASSWORD not in c and "alice" not in c
                                 for c in command_lines)


async def test_https_with_a_ca_bundle_or_insecure(images: Images, tmp_path: Path) -> None:
    pki = ensure_pki(tmp_path / "pki", ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    s = Server(tls=ctx).start()
    try:
        s.routes["/d.qcow2"] = send_bytes(images.qcow2.read_bytes())
        d = dest(tmp_path)
        e = await failed(source="http", dest_dir=d, url=s.url("/d.qcow2"))
        assert e.reason == "TLSError" and not e.retryable
        assert_no_partials(d)
        await do_import(source="http", dest_dir=d, url=s.url("/d.qcow2"),
                        ca_file=str(pki.ca_cert))
        assert_disk(d, images)
        (d / DISK_NAME).unlink()
        await do_import(source="http", dest_dir=d, url=s.url("/d.qcow2"), insecure=True)
        assert_disk(d, images)
    finally:
        s.stop()


async def test_checksum_is_verified_over_the_served_bytes(server: Server, images: Images,
                                                          tmp_path: Path) -> None:
    body = lzma.compress(images.raw.read_bytes(), preset=0)
    server.routes["/d.raw.xz"] = send_bytes(body)
    d = dest(tmp_path)
    (d / DISK_NAME).write_bytes(b"the previous, complete disk" * 100)
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    e = await failed(source="http", dest_dir=d, url=server.url("/d.raw.xz"), checksum=wrong)
    assert e.reason == "ChecksumMismatch" and not e.retryable
    assert hashlib.sha256(body).hexdigest() in str(e)
    # a failed import leaves the existing disk alone
    assert (d / DISK_NAME).read_bytes() == b"the previous, complete disk" * 100
    assert_no_partials(d)
    good = "sha512:" + hashlib.sha512(body).hexdigest()
    await do_import(source="http", dest_dir=d, url=server.url("/d.raw.xz"), checksum=good)
    assert_disk(d, images)   # and a successful one replaces it


def cut_off(data: bytes) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
        h.close_connection = True
    return handle


async def test_http_failures_have_clear_reasons(server: Server, images: Images,
                                                tmp_path: Path) -> None:
    qcow2 = images.qcow2.read_bytes()
    server.routes.update({
        "/boom": send_bytes(b"internal error", status=500),
        "/teapot": send_bytes(b"no", status=418),
        "/page.html": send_bytes(b"<!DOCTYPE html>\n<html><body>Welcome!</body></html>\n"
                                 + b" " * 2000, headers={"Content-Type": "text/html"}),
        "/tiny.img": send_bytes(b"\x01\x02\x00\x03"),
        "/cut.qcow2": cut_off(qcow2),
        "/cut.raw": cut_off(images.raw.read_bytes()),
        "/bad.xz": send_bytes(lzma.compress(images.raw.read_bytes(), preset=0)[:100_000]),
    })
    d = dest(tmp_path)
    cases = [
        ("/missing.img", "NotFound", False, "404"),
        ("/boom", "ServerError", True, "500"),
        ("/teapot", "HTTPError", False, "418"),
        ("/page.html", "InvalidImage", False, "not a disk image"),
        ("/tiny.img", "InvalidImage", False, "only 4 bytes"),
        ("/cut.qcow2", "TransferInterrupted", True, f"of {len(qcow2)} bytes"),
        ("/cut.raw", "TransferInterrupted", True, "broke off"),
        ("/bad.xz", "InvalidImage", False, "xz"),
    ]
    for path, reason, retryable, text in cases:
        e = await failed(source="http", dest_dir=d, url=server.url(path))
        assert (e.reason, e.retryable) == (reason, retryable), (path, str(e))
        assert text in str(e), (path, str(e))
        if reason != "InvalidImage" or path == "/page.html":
            assert server.url(path) in str(e), str(e)
        assert_no_partials(d)
        assert not (d / DISK_NAME).exists()

    refused = f"http://127.0.0.1:{free_tcp_port()}/d.img"
    e = await failed(source="http", dest_dir=d, url=refused)
    assert (e.reason, e.retryable) == ("ConnectionFailed", True)
    assert "connection refused" in str(e) and refused in str(e)


async def test_an_image_larger_than_the_volume_fails(server: Server, images: Images,
                                                     tmp_path: Path) -> None:
    server.routes["/d.qcow2"] = send_bytes(images.qcow2.read_bytes())
    server.routes["/d.raw.gz"] = send_bytes(gzip.compress(images.raw.read_bytes(), 1))
    d = dest(tmp_path)
    small = 4 * MiB
    for path in ("/d.qcow2", "/d.raw.gz"):
        e = await failed(source="http", dest_dir=d, url=server.url(path), capacity=small)
        assert e.reason == "ImageTooLarge" and not e.retryable
        assert str(small) in str(e)
        assert_no_partials(d)
    e = await failed(source="http", dest_dir=d, url=server.url("/d.qcow2"), capacity=small)
    assert str(len(images.data)) in str(e)   # qcow2: the exact virtual size from its header


def trickle(chunk: bytes, count: int) -> Handler:
    """A slow download: ``count`` chunks, a pause between them (the server's pace)."""
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(chunk) * count))
        h.end_headers()
        try:
            for _ in range(count):
                h.wfile.write(chunk)
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass
    return handle


def importer_pids(d: Path) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"virtshift.storage.importer" in cmd and str(d).encode() in cmd:
            out.append(int(pid))
    return out


async def test_cancel_kills_the_child_and_leaves_no_partial_disk(server: Server,
                                                                  tmp_path: Path) -> None:
    chunk = os.urandom(256 << 10)
    server.routes["/slow.img"] = trickle(chunk, 400)   # 100 MiB over ~20 s
    d = dest(tmp_path)
    (d / DISK_NAME).write_bytes(b"old disk")
    started = asyncio.Event()

    async def progress(v: float) -> None:
        started.set()

    task = asyncio.create_task(run(ImportArgs(source="http", dest_dir=d, capacity=200 * MiB,
                                              url=server.url("/slow.img")),
                                   on_progress=progress))
    await asyncio.wait_for(started.wait(), 30)
    deadline = time.monotonic() + 30
    while not (d / PARTIAL_NAME).exists():   # the child opens it once the format is known
        assert time.monotonic() < deadline, "no partial disk appeared"
        await asyncio.sleep(0.02)
    assert importer_pids(d)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert importer_pids(d) == []
    assert not (d / PARTIAL_NAME).exists()
    assert (d / DISK_NAME).read_bytes() == b"old disk"


# --- stdin (upload) -----------------------------------------------------------------------------

async def chunks_of(data: bytes, size: int = 300_000, fail_after: int = -1
                    ) -> AsyncIterator[bytes]:
    for n, i in enumerate(range(0, len(data), size)):
        if n == fail_after:
            raise ConnectionResetError("client went away")
        yield data[i:i + size]
        await asyncio.sleep(0)


async def test_upload_through_stdin(images: Images, tmp_path: Path) -> None:
    body = images.qcow2.read_bytes()
    d = dest(tmp_path)
    seen: list[float] = []

    async def progress(v: float) -> None:
        seen.append(v)

    result = await run(ImportArgs(source="stdin", dest_dir=d, capacity=CAPACITY, size=len(body)),
                       stdin=chunks_of(body), on_progress=progress)
    assert_disk(d, images)
    assert result.format == "qcow2" and result.bytes_read == len(body) and seen[-1] == 100.0

    # the client goes away mid-way: nothing is left, the existing disk stays
    with pytest.raises(ImportFailed) as e:
        await run(ImportArgs(source="stdin", dest_dir=d, capacity=CAPACITY),
                  stdin=chunks_of(body, fail_after=3))
    assert e.value.reason == "TransferInterrupted" and e.value.retryable
    assert_disk(d, images)
    # a body shorter than the announced size
    with pytest.raises(ImportFailed) as e:
        await run(ImportArgs(source="stdin", dest_dir=d, capacity=CAPACITY,
                             size=len(body) + 1), stdin=chunks_of(body))
    assert e.value.reason == "TransferInterrupted" and str(len(body)) in str(e.value)
    assert_disk(d, images)


# --- file (clone), blank --------------------------------------------------------------------------

async def test_clone_a_sparse_raw_file_and_a_qcow2_overlay(images: Images,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    await sh("cp", "--sparse=always", str(images.raw), str(src))
    os.truncate(src, 32 * MiB)  # grown sparse, like a volume's disk.img
    d = dest(tmp_path)
    result, _ = await do_import(source="file", dest_dir=d, path=str(src))
    assert_disk(d, images)
    assert result.format == "raw" and result.virtual_size == 32 * MiB
    assert (d / DISK_NAME).stat().st_blocks <= src.stat().st_blocks + 64

    # a qcow2 overlay (a snapshot) is flattened
    overlay = tmp_path / "overlay.qcow2"
    await sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(images.qcow2),
             str(overlay))
    d2 = tmp_path / "pvc2"
    d2.mkdir()
    result, _ = await do_import(source="file", dest_dir=d2, path=str(overlay))
    assert_disk(d2, images)
    assert result.format == "qcow2"

    e = await failed(source="file", dest_dir=d2, path=str(src), capacity=16 * MiB)
    assert e.reason == "ImageTooLarge"
    e = await failed(source="file", dest_dir=d2, path=str(tmp_path / "nope"))
    assert e.reason == "InvalidSource"
    assert_disk(d2, images)


async def test_a_downloaded_qcow2_with_a_backing_file_is_refused(server: Server, images: Images,
                                                                 tmp_path: Path) -> None:
    overlay = tmp_path / "o.qcow2"
    await sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd",
             str(overlay), "1M")
    server.routes["/o.qcow2"] = send_bytes(overlay.read_bytes())
    d = dest(tmp_path)
    e = await failed(source="http", dest_dir=d, url=server.url("/o.qcow2"))
    assert e.reason == "InvalidImage" and "backing file" in str(e)
    assert_no_partials(d)


async def test_blank(tmp_path: Path) -> None:
    d = dest(tmp_path)
    result, _ = await do_import(source="blank", dest_dir=d, capacity=10 * 1024**3)
    disk = d / DISK_NAME
    assert disk.stat().st_size == 10 * 1024**3 and disk.stat().st_blocks == 0
    assert result.format == "raw" and result.virtual_size == 10 * 1024**3


# --- registry -----------------------------------------------------------------------------------

def layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Registry:
    """Registry v2 answers for one repository, behind a bearer-token challenge whose token
    endpoint takes basic auth."""

    def __init__(self, server: Server, repo: str, tag: str, layers: list[bytes]) -> None:
        self.token = f"tok-{server.port}"  # one token endpoint per server
        self.server = server
        blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in layers}
        config = b"{}"
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": dg, "size": len(b)} for dg, b in blobs.items()],
        }).encode()
        server.routes[f"/v2/{repo}/manifests/{tag}"] = self.guard(send_bytes(
            manifest, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}))
        for dg, b in blobs.items():
            # blobs live in "object storage" on another host name, as with real registries
            store = f"/store/{dg}"
            moved = send_bytes(b"", status=307,
                               headers={"Location": f"http://localhost:{server.port}{store}"})
            server.routes[f"/v2/{repo}/blobs/{dg}"] = self.guard(moved)
            server.routes[store] = self.no_credentials(send_bytes(b))
        server.routes["/token"] = self.issue

    @staticmethod
    def no_credentials(inner: Handler) -> Handler:
        def handle(h: BaseHTTPRequestHandler) -> None:
            if h.headers.get("Authorization"):
                send_bytes(b"credentials for another host", status=400)(h)
                return
            inner(h)
        return handle

    def guard(self, inner: Handler) -> Handler:
        def handle(h: BaseHTTPRequestHandler) -> None:
            if h.headers.get("Authorization") != f"Bearer {self.token}":
                realm = self.server.url("/token")
                send_bytes(b'{"errors":[{"code":"UNAUTHORIZED"}]}', status=401, headers={
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="test",'
                                        f'scope="repository:disks/alpine:pull"'})(h)
                return
            inner(h)
        return handle

    def issue(self, h: BaseHTTPRequestHandler) -> None:
        expected = "Basic " + base64.b64encode(f"puller:{PASSWORD}".encode()).decode()
        if h.headers.get("Authorization") != expected or "scope=repository" not in h.path:
            send_bytes(b"{}", status=401)(h)
            return
        send_bytes(json.dumps({"token": self.token}).encode())(h)


async def test_registry_import_with_a_bearer_token(server: Server, images: Images,
                                                   tmp_path: Path) -> None:
    Registry(server, "disks/alpine", "v1",
             [layer({"etc/motd": b"hello"}),
              layer({"disk/": b"", "./disk/alpine.qcow2": images.qcow2.read_bytes()}),
              layer({"readme.txt": b"a later layer without a disk"})])
    Registry(server, "disks/empty", "v1", [layer({"etc/motd": b"no disk here"})])
    host = f"127.0.0.1:{server.port}"
    d = dest(tmp_path)
    # anonymous: the token endpoint refuses
    e = await failed(source="registry", dest_dir=d, url=f"docker://{host}/disks/alpine:v1",
                     insecure=True)
    assert e.reason == "Unauthorized"
    result, seen = await do_import(source="registry", dest_dir=d,
                                   url=f"docker://{host}/disks/alpine:v1", insecure=True,
                                   username="puller", password=PASSWORD)
    assert_disk(d, images)
    assert result.format == "qcow2" and seen[-1] == 100.0
    # the blob redirect to another host was followed, without the registry's token
    store = [r for r in server.requests if r["path"].startswith("/store/")]
    assert store and not any("Authorization" in r for r in store)
    e = await failed(source="registry", dest_dir=d, url=f"docker://{host}/disks/alpine:v2",
                     insecure=True, username="puller", password=PASSWORD)
    assert e.reason == "NotFound"
    e = await failed(source="registry", dest_dir=d, url=f"docker://{host}/disks/empty:v1",
                     insecure=True, username="puller", password=PASSWORD)
    assert e.reason == "ImagePullFailed" and "disk/" in str(e)
    # without insecure, HTTPS is required
    e = await failed(source="registry", dest_dir=d, url=f"docker://{host}/disks/alpine:v1",
                     username="puller", password=PASSWORD)
    assert e.reason == "TLSError"
    assert_disk(d, images)



# --- several importers of one volume; the agent's death ---------------------------------------

async def test_two_importers_of_one_volume_take_turns(server: Server, images: Images,
                                                       tmp_path: Path) -> None:
    server.routes["/a.qcow2"] = send_bytes(images.qcow2.read_bytes())
    server.routes["/slow.raw"] = trickle(images.data[: MiB], 8)  # ~0.4 s, 8 MiB
    d = dest(tmp_path)
    results = await asyncio.gather(
        run(ImportArgs(source="http", dest_dir=d, capacity=CAPACITY,
                       url=server.url("/slow.raw"))),
        run(ImportArgs(source="http", dest_dir=d, capacity=CAPACITY,
                       url=server.url("/a.qcow2"))))
    assert {r.format for r in results} == {"raw", "qcow2"}
    head = (d / DISK_NAME).read_bytes()[: MiB]
    assert head == images.data[: MiB]   # either import, whole (both start the same)
    assert_no_partials(d)


PARENT = """
import asyncio, sys
from pathlib import Path
from virtshift.storage.importer import ImportArgs, run
asyncio.run(run(ImportArgs(source="http", dest_dir=Path(sys.argv[2]), capacity=1 << 30,
                           url=sys.argv[1])))
"""


async def test_the_child_dies_with_its_parent(server: Server, images: Images,
                                              tmp_path: Path) -> None:
    server.routes["/slow.img"] = trickle(os.urandom(256 << 10), 400)
    d = dest(tmp_path)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, server.url("/slow.img"), str(d))
    deadline = time.monotonic() + 30
    while not importer_pids(d):
        assert time.monotonic() < deadline and parent.returncode is None
        await asyncio.sleep(0.05)
    parent.kill()
    await parent.wait()
    deadline = time.monotonic() + 10
    while importer_pids(d):
        assert time.monotonic() < deadline, "the importer outlived its parent"
        await asyncio.sleep(0.05)
    # the next import of the volume (the restarted agent's) clears what the killed one left
    server.routes["/a.qcow2"] = send_bytes(images.qcow2.read_bytes())
    await do_import(source="http", dest_dir=d, url=server.url("/a.qcow2"))
    assert_disk(d, images)
