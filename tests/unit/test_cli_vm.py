"""virtctl's verbs (virtshift.cli.vm) and the websocket streams (virtshift.cli.streams).

The websocket tests run a small TLS aiohttp server in the test's loop (real sockets, the
kubeconfig's CA and bearer token); CLI commands run in a worker thread through ``main.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import re
import ssl
import sys
import termios
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from virtshift.api import admission
from virtshift.api.kinds import REGISTRY
from virtshift.api.schema import default_schemas
from virtshift.apiserver.pki import Pki, ensure_pki
from virtshift.cli import main
from virtshift.cli.createvm import build_vm
from virtshift.cli.streams import FdReader, pump, ws_connect
from virtshift.cli.vm import (
    Forwarder,
    PortSpec,
    Target,
    VmCommandError,
    console,
    kubectl_argv,
    parse_port,
    parse_target,
    parse_timeout,
    port_forward,
    subresource_path,
    vnc,
)
from virtshift.client import kubeconfig
from virtshift.client.kubeconfig import ClusterConfig
from virtshift.client.rest import Client
from virtshift.errors import BadRequest, NotFound, Unauthorized

TOKEN = "test-token"
NS = "default"
VM_KIND = REGISTRY.by_api_version("kubevirt.io/v1", "VirtualMachine")


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arg", "expected"), [
    ("vm/name.ns", Target("vm", "name", "ns")),
    ("vmi/testvmi", Target("vmi", "testvmi")),
    ("testvmi", Target("vmi", "testvmi")),
    ("virtualmachine/a.b.c", Target("vm", "a.b", "c")),
    ("vmis/x/other", Target("vmi", "x", "other")),
])
def test_parse_target(arg: str, expected: Target) -> None:
    assert parse_target(arg) == expected


def test_parse_ssh_target() -> None:
    assert parse_target("fedora@vm/x.ns", with_user=True) == Target("vm", "x", "ns", "fedora")
    assert parse_target("vm/x", with_user=True) == Target("vm", "x")


@pytest.mark.parametrize(("arg", "message"), [
    ("pod/x", "unsupported resource kind 'pod'"),
    ("vm/", "expected a name"),
    ("vm/.ns", "expected a name before '.'"),
    ("vm/x.", "expected a namespace after '.'"),
    ("vm/a/b/c", "too many '/'"),
    ("", "expected a name"),
])
def test_parse_target_errors(arg: str, message: str) -> None:
    with pytest.raises(VmCommandError, match=re.escape(message)):
        parse_target(arg)


def test_parse_ssh_target_errors() -> None:
    with pytest.raises(VmCommandError, match="expected a user name before '@'"):
        parse_target("@vm/x", with_user=True)
    with pytest.raises(VmCommandError, match="expected a target after '@'"):
        parse_target("me@", with_user=True)


@pytest.mark.parametrize(("arg", "expected"), [
    ("8080:80", PortSpec(8080, 80)),
    ("22", PortSpec(22, 22)),
    (":80", PortSpec(0, 80)),
    ("0:80", PortSpec(0, 80)),
    ("tcp/2222:22", PortSpec(2222, 22)),
])
def test_parse_port(arg: str, expected: PortSpec) -> None:
    assert parse_port(arg) == expected


@pytest.mark.parametrize(("arg", "message"), [
    ("80a", "'80a' is not a port number"),
    ("8080:", "'' is not a port number"),
    ("a:80", "'a' is not a port number"),
    ("0", "0 is out of range"),
    ("70000", "70000 is out of range"),
    ("8080:0", "0 is out of range"),
    ("udp/53", "UDP forwarding is not supported"),
    ("sctp/1", "unsupported protocol 'sctp'"),
])
def test_parse_port_errors(arg: str, message: str) -> None:
    with pytest.raises(VmCommandError, match=re.escape(message)):
        parse_port(arg)


def test_parse_timeout() -> None:
    assert parse_timeout("5") == 300  # minutes, as virtctl
    assert parse_timeout("30s") == 30
    assert parse_timeout("2m") == 120
    assert parse_timeout("1h") == 3600
    with pytest.raises(VmCommandError, match="invalid --timeout"):
        parse_timeout("soon")


def _args(*argv: str) -> argparse.Namespace:
    return main.parser().parse_args(list(argv))


def test_parser_verbs() -> None:
    a = _args("start", "vm1", "-n", "ns1", "--paused", "--dry-run")
    assert (a.name, a.namespace, a.paused, a.dry_run, a.kubeconfig) == (
        "vm1", "ns1", True, True, None)
    a = _args("--kubeconfig", "top", "stop", "vm1", "--force", "--grace-period", "0")
    assert (a.kubeconfig, a.force, a.grace_period) == ("top", True, 0)
    a = _args("--kubeconfig", "top", "restart", "vm1", "--kubeconfig", "verb")
    assert a.kubeconfig == "verb"
    a = _args("pause", "vm", "vm1")
    assert (a.kind, a.name) == ("vm", "vm1")
    a = _args("port-forward", "--address", "0.0.0.0", "vm/x.ns", "8080:80", "22")
    assert (a.address, a.target, a.ports) == ("0.0.0.0", "vm/x.ns", ["8080:80", "22"])
    a = _args("ssh", "-l", "me", "-p", "2222", "-i", "key", "-c", "uname -a", "vmi/x")
    assert (a.username, a.port, a.identity_file, a.command) == ("me", 2222, "key", "uname -a")
    a = _args("vnc", "x", "--proxy-only", "--port", "5901")
    assert (a.proxy_only, a.port, a.address) == (True, 5901, "127.0.0.1")
    assert _args("console", "x").timeout == "5"


@pytest.mark.parametrize("argv", [
    ["get", "-A", "vms"],
    ["get", "vms", "-n", "x", "-o", "yaml"],
    ["apply", "-f", "vm.yaml"],
    ["delete", "vm", "x", "--wait=false"],
    ["describe", "--help"],
])
def test_kubectl_pass_through(argv: list[str]) -> None:
    a = _args(*argv)
    assert a.kubectl_verb == argv[0]
    assert a.rest == argv[1:]
    assert kubectl_argv("kubectl", Path("/k"), a.kubectl_verb, a.rest) == [
        "kubectl", "--kubeconfig", "/k", *argv]


# ---- create vm ---------------------------------------------------------------------------------


def _admitted(vm: dict[str, Any]) -> None:
    """The manifest passes schema validation (strict) and KubeVirt's admission."""
    assert VM_KIND is not None
    pruned, warnings = default_schemas().validate(VM_KIND, vm, field_validation="Strict")
    assert warnings == []
    defaulted = admission.default(VM_KIND, pruned)
    assert admission.validate(VM_KIND, defaulted, None) == []


def test_create_vm_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main.run(["create", "vm"])
    assert exit_.value.code == 0
    vm = yaml.safe_load(capsys.readouterr().out)
    assert vm["apiVersion"] == "kubevirt.io/v1"
    assert vm["kind"] == "VirtualMachine"
    assert re.fullmatch(r"vm-[a-z0-9]{5}", vm["metadata"]["name"])
    assert "namespace" not in vm["metadata"]
    assert vm["spec"]["runStrategy"] == "Always"
    spec = vm["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 180
    assert spec["domain"] == {"devices": {}, "memory": {"guest": "512Mi"}, "resources": {}}
    _admitted(vm)


def test_create_vm_full() -> None:
    user_data = "IyEvYmluL3NoCmVjaG8gaGkK"  # "#!/bin/sh\necho hi\n"
    vm = build_vm(_args(
        "create", "vm", "--name", "my-vm", "-n", "ns1", "--run-strategy", "Manual",
        "--memory", "256Mi", "--termination-grace-period", "0",
        "--volume-containerdisk", "src:virtshift/testguest:latest,bootorder:2",
        "--volume-containerdisk", "src:quay.io/x/y:1.0,name:second",
        "--volume-pvc", "src:data,bootorder:1",
        "--volume-blank", "size:1Gi",
        "--volume-import", "type:http,url:http://example.com/disk.img,size:2Gi,name:imported",
        "--cloud-init-user-data", user_data))
    vm = yaml.safe_load(yaml.safe_dump(vm))
    assert vm["metadata"] == {"name": "my-vm", "namespace": "ns1"}
    assert vm["spec"]["runStrategy"] == "Manual"
    spec = vm["spec"]["template"]["spec"]
    assert spec["domain"]["memory"] == {"guest": "256Mi"}
    assert spec["domain"]["devices"]["disks"] == [
        {"name": "my-vm-containerdisk-0", "bootOrder": 2}, {"name": "data", "bootOrder": 1}]
    assert [v["name"] for v in spec["volumes"]] == [
        "my-vm-containerdisk-0", "second", "data", "my-vm-blank-0", "imported", "cloudinitdisk"]
    assert spec["volumes"][0]["containerDisk"] == {"image": "virtshift/testguest:latest"}
    assert spec["volumes"][2]["persistentVolumeClaim"] == {"claimName": "data"}
    assert spec["volumes"][-1]["cloudInitNoCloud"] == {"userDataBase64": user_data}
    templates = vm["spec"]["dataVolumeTemplates"]
    assert templates[0]["spec"]["source"] == {"blank": {}}
    assert templates[1] == {"metadata": {"name": "imported"}, "spec": {
        "source": {"http": {"url": "http://example.com/disk.img"}},
        "storage": {"resources": {"requests": {"storage": "2Gi"}}}}}
    _admitted(vm)


def test_create_vm_cloud_config_and_instancetype(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.run(["create", "vm", "--name", "x", "--instancetype", "u1.small",
                  "--preference", "virtualmachinepreference/fedora",
                  "--volume-containerdisk", "src:img", "--user", "fedora",
                  "--ssh-key", "ssh-ed25519 AAAAC3Nz a@b"])
    vm = yaml.safe_load(capsys.readouterr().out)
    assert vm["spec"]["instancetype"] == {"name": "u1.small"}
    assert vm["spec"]["preference"] == {"kind": "virtualmachinepreference", "name": "fedora"}
    assert "memory" not in vm["spec"]["template"]["spec"]["domain"]
    cloud_init = vm["spec"]["template"]["spec"]["volumes"][-1]["cloudInitNoCloud"]
    user_data = cloud_init["userData"]
    assert user_data.startswith("#cloud-config\n")
    assert yaml.safe_load(user_data) == {"user": "fedora",
                                         "ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nz a@b"]}


@pytest.mark.parametrize(("argv", "message"), [
    (["--run-strategy", "Sometimes"], 'invalid RunStrategy "Sometimes"'),
    (["--memory", "1Gi", "--instancetype", "u1"], "mutually exclusive"),
    (["--memory", "lots"], "invalid quantity 'lots'"),
    (["--volume-containerdisk", "img"], "'img' is not key:value"),
    (["--volume-containerdisk", "source:img"], "unknown param 'source'"),
    (["--volume-containerdisk", "name:x"], "src must be specified"),
    (["--volume-containerdisk", "src:a,name:d", "--volume-pvc", "src:d"],
     "there is already a volume with name 'd'"),
    (["--volume-containerdisk", "src:a,bootorder:0"], "bootorder must be"),
    (["--volume-containerdisk", "src:a,bootorder:1", "--volume-pvc", "src:b,bootorder:1"],
     "bootorder 1 was specified multiple times"),
    (["--volume-pvc", "src:ns/claim"], "not allowed to specify the namespace"),
    (["--volume-blank", "name:x"], "size must be specified"),
    (["--volume-import", "type:ftp,size:1Gi"], "unknown source type 'ftp'"),
    (["--volume-import", "type:http,size:1Gi"], "type http needs url"),
    (["--cloud-init-user-data", "not base64!"], "not valid base64"),
    (["--cloud-init-user-data", "eA==", "--user", "x"], "mutually exclusive"),
    (["--instancetype", "pod/x"], "invalid kind 'pod'"),
])
def test_create_vm_errors(argv: list[str], message: str) -> None:
    with pytest.raises(VmCommandError, match=re.escape(message)):
        build_vm(_args("create", "vm", *argv))


# ---- a small API server ------------------------------------------------------------------------


@dataclass
class Api:
    url: str
    ca_pem: bytes
    kubeconfig: Path
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    received: dict[str, bytearray] = field(
        default_factory=lambda: collections.defaultdict(bytearray))
    closed: dict[str, asyncio.Event] = field(
        default_factory=lambda: collections.defaultdict(asyncio.Event))
    attempts: collections.Counter[str] = field(default_factory=collections.Counter)
    protocols: list[str | None] = field(default_factory=list)

    def client(self, token: str = TOKEN) -> Client:
        return Client(ClusterConfig(self.url, self.ca_pem, token))


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Failure", "message": message, "reason": reason,
                              "code": code}, status=code)


WS_PATH = re.compile(r"/apis/subresources\.kubevirt\.io/v1/namespaces/([^/]+)/"
                     r"virtualmachineinstances/([^/]+)/(console|vnc|portforward/\d+)$")
ACTION_PATH = re.compile(r"/apis/subresources\.kubevirt\.io/v1/namespaces/([^/]+)/"
                         r"(virtualmachines|virtualmachineinstances)/([^/]+)/([a-z]+)$")
OBJECT_PATH = re.compile(r"/apis/kubevirt\.io/v1/namespaces/([^/]+)/"
                         r"(virtualmachines|virtualmachineinstances)/([^/]+)$")


def _app(api: Api) -> web.Application:
    async def stream(request: web.Request, name: str) -> web.StreamResponse:
        api.attempts[name] += 1
        if name == "missing":
            return _status(404, "NotFound",
                           f'virtualmachineinstances.kubevirt.io "{name}" not found')
        if name == "noroute":
            return _status(404, "NotFound", "the server could not find the requested resource")
        if name == "starting" and api.attempts[name] <= 4:  # two refused handshakes
            # (a refused handshake is asked again once, to read its Status)
            return _status(400, "BadRequest", f"VMI {name} is not running")
        ws = web.WebSocketResponse(protocols=("plain.kubevirt.io",))
        await ws.prepare(request)
        api.protocols.append(ws.ws_protocol)
        try:
            if name == "closer":
                await ws.send_bytes(b"bye")
                await ws.close()
                return ws
            async for msg in ws:
                api.received[name] += msg.data
                await ws.send_bytes(msg.data)
                if name == "oneshot":
                    await ws.close()
        finally:
            api.closed[name].set()
        return ws

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        path = request.path
        body = await request.text()
        api.calls.append((request.method, path, json.loads(body) if body else None))
        if request.method == "GET" and (m := WS_PATH.match(path)):
            return await stream(request, m.group(2))
        if m := ACTION_PATH.match(path):
            name, sub = m.group(3), m.group(4)
            if name == "running":
                return _status(409, "Conflict", "VM is already running\n(try stop first)")
            if sub == "guestosinfo":
                return web.json_response({"hostname": name, "os": {"id": "testguest"}})
            return web.Response(status=202)
        if (m := OBJECT_PATH.match(path)) and request.method == "GET":
            if m.group(3) == "missing":
                return _status(404, "NotFound", f'{m.group(2)}.kubevirt.io "missing" not found')
            return web.json_response({"metadata": {"name": m.group(3)}})
        return _status(404, "NotFound", "the server could not find the requested resource")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("pki"), [])


@pytest.fixture
async def api(pki: Pki, tmp_path: Path) -> AsyncIterator[Api]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    state = Api("", pki.ca_pem(), tmp_path / "kubeconfig")
    runner = web.AppRunner(_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    state.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    kubeconfig.write(state.kubeconfig, kubeconfig.render(state.url, state.ca_pem, TOKEN))
    yield state
    await runner.cleanup()


@pytest.fixture
async def client(api: Api) -> AsyncIterator[Client]:
    c = api.client()
    yield c
    await c.close()


def _path(name: str, sub: str = "console") -> str:
    return subresource_path(NS, "virtualmachineinstances", name, sub)


class Feed:
    """A pump reader fed by the test: ``put(b"")`` is the end of input."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self) -> bytes:
        return await self.queue.get()


class Sink:
    """A pump writer that signals once ``want`` bytes have arrived."""

    def __init__(self, want: int = 0) -> None:
        self.data = bytearray()
        self.want = want
        self.full = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want:
            self.full.set()


class Lines(io.StringIO):
    """stdout for a task: ``line`` is set once a whole line has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.line = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if "\n" in self.getvalue():
            self.line.set()
        return n


@contextlib.contextmanager
def _pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---- streams -----------------------------------------------------------------------------------


async def test_pump_carries_bytes_and_local_end_closes_the_socket(api: Api,
                                                                  client: Client) -> None:
    ws = await ws_connect(client, _path("echo"))
    feed, sink = Feed(), Sink(want=len(b"hello world"))
    task = asyncio.create_task(pump(ws, feed.read, sink.write))
    feed.queue.put_nowait(b"hello ")
    feed.queue.put_nowait(b"world")
    await sink.full.wait()
    assert bytes(sink.data) == b"hello world"
    feed.queue.put_nowait(b"")  # end of local input
    assert await task == "local"
    await api.closed["echo"].wait()  # the server saw the websocket close
    assert bytes(api.received["echo"]) == b"hello world"
    assert api.protocols == ["plain.kubevirt.io"]
    assert ws.closed


async def test_pump_ends_when_the_server_closes(api: Api, client: Client) -> None:
    ws = await ws_connect(client, _path("closer"))
    blocked: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def never() -> bytes:
        return await blocked

    sink = Sink()
    assert await pump(ws, never, sink.write) == "remote"
    assert bytes(sink.data) == b"bye"
    assert not blocked.done() or blocked.cancelled()


async def test_refused_handshake_gives_the_server_message(api: Api, client: Client) -> None:
    with pytest.raises(NotFound, match=re.escape(
            'virtualmachineinstances.kubevirt.io "missing" not found')) as e:
        await ws_connect(client, _path("missing"))
    assert e.value.code == 404
    with pytest.raises(BadRequest, match="VMI starting is not running"):
        await ws_connect(client, _path("starting", "vnc"))
    bad = api.client(token="wrong")
    try:
        with pytest.raises(Unauthorized):
            await ws_connect(bad, _path("echo"))
    finally:
        await bad.close()


async def test_forwarder_splices_tcp_connections(api: Api, client: Client) -> None:
    errors = io.StringIO()
    fwd = await Forwarder(client, _path("pf", "portforward/80"), "pf", errors=errors
                          ).start("127.0.0.1", 0)
    try:
        for i in range(2):  # each connection gets its own websocket
            reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
            writer.write(b"GET / %d" % i)
            assert await reader.readexactly(7) == b"GET / %d" % i
            writer.close()
            await writer.wait_closed()
            await api.closed["pf"].wait()
            api.closed["pf"].clear()
        assert api.attempts["pf"] == 2
        assert errors.getvalue() == ""
    finally:
        await fwd.aclose()


async def test_forwarder_reports_a_refused_connection(api: Api, client: Client) -> None:
    errors = io.StringIO()
    fwd = await Forwarder(client, _path("missing", "portforward/22"), "ssh", errors=errors
                          ).start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
        assert await reader.read() == b""  # closed at once
        writer.close()
        assert errors.getvalue() == (
            'error: ssh: virtualmachineinstances.kubevirt.io "missing" not found\n')
    finally:
        await fwd.aclose()


async def test_fd_reader_stops_at_the_escape_byte() -> None:
    with _pipe() as (r, w):
        reader = FdReader(r, escape=0x1D)
        os.write(w, b"ls\x1drest")
        assert await reader.read() == b"ls"
        assert await reader.read() == b""
        assert reader.escaped


async def test_console_with_pipes(api: Api, client: Client) -> None:
    stderr = io.StringIO()
    with _pipe() as (in_r, in_w), _pipe() as (out_r, out_w):
        os.write(in_w, b"uname\n")
        # the server echoes one message and closes: the console ends with it
        assert await console(client, NS, "oneshot", 10, stdin_fd=in_r, stdout_fd=out_w,
                             stderr=stderr) == 0
        assert os.read(out_r, 100) == b"uname\n"
    assert stderr.getvalue() == ("Successfully connected to oneshot console. The escape "
                                 "sequence is ^]\n")


async def test_console_ends_at_end_of_input(api: Api, client: Client) -> None:
    in_r, in_w = os.pipe()
    os.close(in_w)  # stdin at EOF (closed once here, never again: its number gets reused)
    try:
        with _pipe() as (_, out_w):
            assert await console(client, NS, "echo", 10, stdin_fd=in_r, stdout_fd=out_w,
                                 stderr=io.StringIO()) == 0
    finally:
        os.close(in_r)
    await api.closed["echo"].wait()


async def test_console_on_a_terminal_uses_raw_mode_and_escape(api: Api, client: Client) -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        os.write(master, b"ab\x1d")
        with _pipe() as (_, out_w):
            assert await console(client, NS, "echo", 10, stdin_fd=slave, stdout_fd=out_w,
                                 stderr=io.StringIO()) == 0
        await api.closed["echo"].wait()
        assert bytes(api.received["echo"]) == b"ab"
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


async def test_console_waits_for_the_vmi_to_run(api: Api, client: Client) -> None:
    in_r, in_w = os.pipe()
    os.close(in_w)  # stdin at EOF (closed once here, never again: its number gets reused)
    try:
        with _pipe() as (_, out_w):
            assert await console(client, NS, "starting", 10, stdin_fd=in_r, stdout_fd=out_w,
                                 stderr=io.StringIO(), interval=0) == 0
    finally:
        os.close(in_r)
    assert api.attempts["starting"] == 5


async def test_console_does_not_wait_for_a_missing_route(api: Api, client: Client) -> None:
    with pytest.raises(NotFound, match="could not find the requested resource"):
        await console(client, NS, "noroute", 10, stdin_fd=0, stdout_fd=1, interval=0)
    assert api.attempts["noroute"] == 2  # the handshake, then once more for its message
    with pytest.raises(NotFound, match='"missing" not found'):
        await console(client, NS, "missing", 0, stdin_fd=0, stdout_fd=1, interval=0)


async def test_port_forward_and_vnc_serve(api: Api, client: Client) -> None:
    out = Lines()
    with contextlib.redirect_stdout(out):
        task = asyncio.create_task(port_forward(client, "ignored", parse_target("vm/pf.ns2"),
                                                [parse_port(":80")], "127.0.0.1"))
        await out.line.wait()
    m = re.fullmatch(r"Forwarding from 127\.0\.0\.1:(\d+) -> 80\n", out.getvalue())
    assert m is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", int(m.group(1)))
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await api.closed["pf"].wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert ("GET", "/apis/kubevirt.io/v1/namespaces/ns2/virtualmachines/pf", None) in api.calls
    assert any(c[1] == "/apis/subresources.kubevirt.io/v1/namespaces/ns2/"
               "virtualmachineinstances/pf/portforward/80" for c in api.calls)

    out = Lines()
    with contextlib.redirect_stdout(out):
        task = asyncio.create_task(vnc(client, NS, "screen", "127.0.0.1", 0, True))
        await out.line.wait()
    port = json.loads(out.getvalue())["port"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"RFB 003.008\n")
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ---- the CLI, end to end -----------------------------------------------------------------------


async def _cli(*argv: str) -> int | str | None:
    def run() -> int | str | None:
        try:
            main.run(list(argv))
        except SystemExit as e:
            return e.code
        raise AssertionError("main.run did not exit")

    return await asyncio.to_thread(run)


async def test_cli_lifecycle(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    k = str(api.kubeconfig)
    assert await _cli("--kubeconfig", k, "start", "vm1", "--paused") == 0
    assert await _cli("stop", "vm1", "-n", "ns1", "--kubeconfig", k, "--force",
                      "--grace-period", "0") == 0
    assert await _cli("--kubeconfig", k, "restart", "vm1", "--force", "--grace-period=0") == 0
    assert await _cli("--kubeconfig", k, "pause", "vm", "vm1") == 0
    assert await _cli("--kubeconfig", k, "unpause", "vmi", "vm1", "--dry-run") == 0
    assert await _cli("--kubeconfig", k, "soft-reboot", "vm1") == 0
    assert capsys.readouterr().out.splitlines() == [
        "VM vm1 was scheduled to start",
        "VM vm1 was scheduled to stop",
        "VM vm1 was scheduled to restart",
        "VMI vm1 was scheduled to pause",
        "Dry Run execution",
        "VMI vm1 was scheduled to unpause",
        "VMI vm1 was scheduled to soft-reboot",
    ]
    sub = "/apis/subresources.kubevirt.io/v1/namespaces"
    assert api.calls == [
        ("PUT", f"{sub}/default/virtualmachines/vm1/start", {"paused": True}),
        ("PUT", f"{sub}/ns1/virtualmachines/vm1/stop", {"gracePeriod": 0}),
        ("PUT", f"{sub}/default/virtualmachines/vm1/restart", {"gracePeriodSeconds": 0}),
        ("GET", "/apis/kubevirt.io/v1/namespaces/default/virtualmachines/vm1", None),
        ("PUT", f"{sub}/default/virtualmachineinstances/vm1/pause", {}),
        ("PUT", f"{sub}/default/virtualmachineinstances/vm1/unpause", {"dryRun": ["All"]}),
        ("PUT", f"{sub}/default/virtualmachineinstances/vm1/softreboot", {}),
    ]


async def test_cli_errors_are_one_line(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    k = str(api.kubeconfig)
    assert await _cli("--kubeconfig", k, "start", "running") == 1
    assert capsys.readouterr().err == "error: VM is already running (try stop first)\n"
    assert await _cli("--kubeconfig", k, "stop", "vm1", "--grace-period", "5") == 1
    assert capsys.readouterr().err == "error: Can not set gracePeriod without --force=true\n"
    assert await _cli("--kubeconfig", k, "restart", "vm1", "--force") == 1
    assert "Can not force restart without gracePeriod" in capsys.readouterr().err
    assert await _cli("--kubeconfig", k, "pause", "pod", "x") == 1
    assert "unsupported resource type 'pod'" in capsys.readouterr().err
    assert await _cli("--kubeconfig", k, "port-forward", "vm/x", "80:http") == 1
    assert "'http' is not a port number" in capsys.readouterr().err
    assert await _cli("--kubeconfig", k, "vnc", "missing", "--proxy-only") == 1
    assert capsys.readouterr().err == (
        'error: virtualmachineinstances.kubevirt.io "missing" not found\n')
    assert len([c for c in api.calls if c[0] == "PUT"]) == 1  # only the start went out


async def test_cli_guestosinfo(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _cli("--kubeconfig", str(api.kubeconfig), "guestosinfo", "g") == 0
    assert json.loads(capsys.readouterr().out) == {"hostname": "g", "os": {"id": "testguest"}}


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


async def test_cli_ssh_runs_ssh_through_a_port_forward(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "ssh", (
        "import socket, sys\n"
        "args = sys.argv[1:]\n"
        "port = int(args[args.index('-p') + 1])\n"
        "with socket.create_connection(('127.0.0.1', port)) as s:\n"
        "    s.sendall(b'SSH-2.0-fake')\n"
        "    data = b''\n"
        "    while len(data) < 12:\n"
        "        data += s.recv(100)\n"
        "print(data.decode(), *args[2:])\n"
        "sys.exit(7)\n"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert await _cli("--kubeconfig", str(api.kubeconfig), "ssh", "fedora@vm/sshvm.ns3",
                      "-i", "id_ed25519", "-c", "uname -a", "-t", "-o ConnectTimeout=5") == 7
    assert capfd.readouterr().out == (
        "SSH-2.0-fake -o ConnectTimeout=5 -o StrictHostKeyChecking=no -o "
        "UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i id_ed25519 fedora@127.0.0.1 "
        "uname -a\n")
    await api.closed["sshvm"].wait()
    assert any(c[1] == "/apis/subresources.kubevirt.io/v1/namespaces/ns3/"
               "virtualmachineinstances/sshvm/portforward/22" for c in api.calls)


async def test_cli_ssh_without_ssh(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await _cli("--kubeconfig", str(api.kubeconfig), "ssh", "vm/x") == 1
    assert "ssh: the OpenSSH client (ssh) is not installed" in capsys.readouterr().err


async def test_cli_kubectl_wrappers(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    venv_bin = tmp_path / "venv-bin"
    venv_bin.mkdir()
    _script(venv_bin / "kubectl", "import sys\nprint(*sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert await _cli("--kubeconfig", str(api.kubeconfig), "get", "-A", "vms", "-o",
                      "name") == 3
    assert capfd.readouterr().out == f"--kubeconfig {api.kubeconfig} get -A vms -o name\n"
    (venv_bin / "kubectl").unlink()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await _cli("--kubeconfig", str(api.kubeconfig), "apply", "-f", "x.yaml") == 1
    assert "kubectl is not installed" in capfd.readouterr().err
