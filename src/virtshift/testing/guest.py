"""Boot the virtshift test guest (``make setup`` builds it into ``.cache/guest/``) under bare QEMU.

Helpers for tests and benchmarks that need a real VM without the platform:

* :class:`GuestImages` finds the built kernel, initrd and disk (and fails clearly when missing);
* :func:`free_tcp_port`, :func:`make_nocloud_iso`, :func:`make_configdrive_iso`,
  :func:`make_overlay`;
* :class:`SerialConsole` reads a QEMU serial unix socket in a thread: wait for text, type commands;
* :class:`QmpConnection` and :class:`GuestAgentConnection` are small synchronous JSON-line clients
  for the QMP and qemu-guest-agent sockets (usable from sync and async tests alike);
* :class:`TestGuest` runs one QEMU with all of the above wired up.

Everything synchronises by polling with deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[3]
READY_MARKER = "TESTGUEST-READY"
BootMode = Literal["kernel", "pvh", "disk"]


def guest_dir() -> Path:
    """Where ``scripts/build-guest.sh`` puts the images (``VIRTSHIFT_GUEST_DIR`` overrides)."""
    env = os.environ.get("VIRTSHIFT_GUEST_DIR")
    return Path(env) if env else REPO / ".cache" / "guest"


@dataclass(frozen=True)
class GuestImages:
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.directory / "testguest.qcow2"

    @classmethod
    def locate(cls, directory: Path | None = None) -> GuestImages:
        """The built images; raises FileNotFoundError (run ``make setup``) when any is missing."""
        images = cls(directory or guest_dir())
        missing = [p for p in (images.vmlinuz, images.initrd, images.disk) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                "test guest image(s) missing: " + ", ".join(str(p) for p in missing)
                + " -- run `make setup` (scripts/build-guest.sh) to build them")
        return images


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _genisoimage() -> str:
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise FileNotFoundError("genisoimage is missing (scripts/setup-system.sh installs it)")
    return tool


def _write_iso(path: Path, label: str, files: dict[str, str | bytes]) -> Path:
    with tempfile.TemporaryDirectory(prefix="virtshift-iso-") as tmp:
        root = Path(tmp)
        for name, content in files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([_genisoimage(), "-quiet", "-output", str(path), "-volid", label,
                        "-joliet", "-rock", str(root)], check=True, capture_output=True)
    return path


def make_nocloud_iso(path: Path, user_data: str | bytes, *, hostname: str | None = None,
                     instance_id: str = "iid-testguest", meta_data: str | None = None,
                     network_config: str | None = None, label: str = "cidata") -> Path:
    """A cloud-init NoCloud ISO (volume label ``cidata``) with user-data and meta-data.

    ``meta_data`` replaces the generated ``instance-id``/``local-hostname`` document when given.
    """
    if meta_data is None:
        meta_data = f"instance-id: {instance_id}\n"
        if hostname:
            meta_data += f"local-hostname: {hostname}\n"
    files: dict[str, str | bytes] = {"user-data": user_data, "meta-data": meta_data}
    if network_config is not None:
        files["network-config"] = network_config
    return _write_iso(path, label, files)


def make_configdrive_iso(path: Path, user_data: str | bytes, *, hostname: str | None = None,
                         uuid: str = "00000000-0000-0000-0000-000000000001") -> Path:
    """An OpenStack ConfigDrive ISO (label ``config-2``).

    It holds ``openstack/latest/user_data`` and ``openstack/latest/meta_data.json``.
    """
    meta: dict[str, str] = {"uuid": uuid}
    if hostname:
        meta["hostname"] = hostname
    return _write_iso(path, "config-2", {
        "openstack/latest/user_data": user_data,
        "openstack/latest/meta_data.json": json.dumps(meta),
    })


def make_overlay(base: Path, overlay: Path) -> Path:
    """A throwaway qcow2 overlay on ``base`` so the base image never changes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.resolve()),
                    "-F", "qcow2", str(overlay)], check=True, capture_output=True)
    return overlay


def _connect_unix(path: Path, deadline: float, alive: Callable[[], bool] | None = None
                  ) -> socket.socket:
    """Connect to a unix socket that a starting process will create, polling until deadline."""
    last: OSError | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"process exited before {path} accepted a connection")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError as e:
            s.close()
            last = e
            time.sleep(0.01)
    raise TimeoutError(f"cannot connect to {path}: {last}")


class SerialConsole:
    """A QEMU serial port on a unix socket; a thread collects everything the guest prints."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._reader, name="serial-console", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0,
                alive: Callable[[], bool] | None = None) -> SerialConsole:
        return cls(_connect_unix(path, time.monotonic() + timeout, alive))

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """Everything received so far (CRs dropped)."""
        with self._cond:
            return self._buf.decode(errors="replace").replace("\r", "")

    @property
    def position(self) -> int:
        """An offset into :attr:`text` to search from later (``wait_for(..., start=pos)``)."""
        return len(self.text)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def tail(self, chars: int = 3000) -> str:
        return self.text[-chars:]

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0,
                 start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (regex; plain strings are escaped) appears from ``start`` on."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf.decode(errors="replace").replace("\r", "")
                m = rx.search(text, start)
                if m:
                    return m
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "console closed" if self._closed else f"timed out after {timeout:.0f}s"
                    raise TimeoutError(f"{why} waiting for {rx.pattern!r}; console tail:\n"
                                       + text[-3000:])
                self._cond.wait(min(remaining, 0.5))

    def send(self, text: str) -> None:
        self._sock.sendall(text.encode())

    def run(self, command: str, timeout: float = 20.0) -> str:
        """Type ``command`` on the console shell and return its output (stdout+stderr).

        The output is framed by unique markers that never appear in the echoed input.
        """
        tag = f"{time.monotonic_ns():x}"
        start = self.position
        begin, end = f"<<B{tag}>>", f"<<E{tag}"
        # printf's octal escape for "<" keeps the literal markers out of the echoed command line
        self.send(f"printf '\\074<B{tag}>>\\n'; {command}; printf '\\074<E{tag}:%d>>\\n' $?\n")
        m_end = self.wait_for(re.compile(re.escape(end) + r":(\d+)>>"), timeout, start)
        text = self.text
        b = text.rfind(begin + "\n", start, m_end.start())
        if b < 0:
            raise RuntimeError(f"console output for {command!r} lost its begin marker")
        return text[b + len(begin) + 1:m_end.start()]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(2)


class _JsonLineSocket:
    """A unix stream socket carrying one JSON document per line (QMP, qemu-ga)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rbuf = b""

    def _send(self, obj: dict[str, Any]) -> None:
        self._sock.sendall(json.dumps(obj).encode() + b"\n")

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._rbuf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply on the socket")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise EOFError("socket closed")
            self._rbuf += data
        line, self._rbuf = self._rbuf.split(b"\n", 1)
        line = line.strip().lstrip(b"\xff")
        if not line:
            return self._recv(deadline)
        doc: dict[str, Any] = json.loads(line)
        return doc

    def close(self) -> None:
        self._sock.close()


class QmpError(RuntimeError):
    pass


class QmpConnection(_JsonLineSocket):
    """A synchronous QMP client: greeting, ``qmp_capabilities``, ``execute``, collected events."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        super().__init__(sock)
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        deadline = time.monotonic() + timeout
        self.greeting = self._recv(deadline)
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities", timeout=timeout)

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0,
                alive: Callable[[], bool] | None = None) -> QmpConnection:
        return cls(_connect_unix(path, time.monotonic() + timeout, alive), timeout)

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
        msg_id = f"vs{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event called ``name``, already received or arriving before the deadline."""
        for ev in self.events:
            if ev["event"] == name:
                self.events.remove(ev)
                return ev
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("event") == name:
                return reply
            if "event" in reply:
                self.events.append(reply)


class GuestAgentConnection(_JsonLineSocket):
    """A synchronous qemu-guest-agent client (host side of org.qemu.guest_agent.0)."""

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0,
                alive: Callable[[], bool] | None = None) -> GuestAgentConnection:
        return cls(_connect_unix(path, time.monotonic() + timeout, alive))

    def sync(self, timeout: float = 30.0) -> None:
        """Resynchronise with ``guest-sync-delimited``, retrying until the agent answers."""
        deadline = time.monotonic() + timeout
        while True:
            token = int(time.monotonic_ns() % 2**31)
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
            try:
                while True:
                    reply = self._recv(min(deadline, time.monotonic() + 1.0))
                    if reply.get("return") == token:
                        return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("the guest agent did not answer guest-sync") from None

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._recv(time.monotonic() + timeout)
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")


def http_get(url: str, timeout: float = 20.0) -> str:
    """GET ``url``, retrying connection errors until ``timeout``; returns the body text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: bytes = resp.read()
                return body.decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@dataclass
class TestGuest:
    """One QEMU running the test guest (TCG by default), with serial, QMP and port forwards.

    ``boot``: ``kernel`` (vmlinuz + initrd), ``pvh`` (vmlinux + initrd: faster) or ``disk``
    (a throwaway overlay on testguest.qcow2, booted by SYSLINUX). ``hostfwd`` maps guest TCP
    ports to host ports on 127.0.0.1 (0 = pick a free one; read back from ``hostfwd``).
    """

    __test__ = False  # not a pytest test class

    workdir: Path
    boot: BootMode = "kernel"
    images: GuestImages | None = None
    memory_mib: int = 256
    smp: int = 1
    accel: str = "tcg"
    machine: str | None = None
    cmdline: str = "console=ttyS0 quiet"
    nocloud_iso: Path | None = None
    cdrom_iso: bool = False  # attach nocloud_iso as an IDE/AHCI cdrom instead of virtio-blk
    hostfwd: dict[int, int] = field(default_factory=lambda: {80: 0})
    guest_agent: bool = False
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    console: SerialConsole | None = None
    qmp: QmpConnection | None = None
    started_at: float = 0.0
    ready_after: float | None = None

    @property
    def serial_path(self) -> Path:
        return self.workdir / "serial.sock"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def qga_path(self) -> Path:
        return self.workdir / "qga.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "qemu.log"

    def argv(self) -> list[str]:
        images = self.images or GuestImages.locate()
        args = ["qemu-system-x86_64", "-accel", self.accel, "-m", str(self.memory_mib),
                "-smp", str(self.smp), "-nodefaults", "-display", "none", "-no-reboot",
                "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=on,"
                            f"logfile={self.workdir / 'console.log'}",
                "-serial", "chardev:ser0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.machine:
            args += ["-machine", self.machine]
        if self.boot == "disk":
            overlay = make_overlay(images.disk, self.workdir / "disk.qcow2")
            args += ["-drive", f"file={overlay},if=virtio,format=qcow2"]
        else:
            kernel = images.vmlinux if self.boot == "pvh" else images.vmlinuz
            args += ["-kernel", str(kernel), "-initrd", str(images.initrd),
                     "-append", self.cmdline]
        if self.nocloud_iso is not None:
            if self.cdrom_iso:
                args += ["-drive", f"file={self.nocloud_iso},if=none,id=cidata,media=cdrom,"
                                   "format=raw,readonly=on",
                         "-device", "ide-cd,drive=cidata"]
            else:
                args += ["-drive", f"file={self.nocloud_iso},if=virtio,format=raw,readonly=on"]
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self.hostfwd.items())
        args += ["-netdev", f"user,id=net0{fwd}", "-device", "virtio-net-pci,netdev=net0"]
        if self.guest_agent:
            args += ["-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
                     "-device", "virtio-serial-pci",
                     "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        return [*args, *self.extra_args]

    def start(self, timeout: float = 10.0) -> TestGuest:
        """Start QEMU and connect the console (QEMU waits for it) and QMP."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hostfwd = {g: (h or free_tcp_port()) for g, h in self.hostfwd.items()}
        argv = self.argv()
        with self.log_path.open("wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        # never leak a QEMU, even when the caller forgets close() (runs at GC or exit)
        weakref.finalize(self, _kill_process, self.proc)
        alive = self.running
        try:
            self.console = SerialConsole.connect(self.serial_path, timeout, alive)
            self.qmp = QmpConnection.connect(self.qmp_path, timeout, alive)
        except Exception as e:
            self.kill()
            raise RuntimeError(f"QEMU did not come up: {e}\n{self.qemu_log()}") from e
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qemu_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for TESTGUEST-READY; returns seconds since QEMU was started."""
        assert self.console is not None, "start() first"
        try:
            self.console.wait_for(re.compile(r"^" + READY_MARKER + r"$", re.M), timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nQEMU log:\n{self.qemu_log()}") from None
        self.ready_after = time.monotonic() - self.started_at
        return self.ready_after

    def url(self, path: str = "/", guest_port: int = 80) -> str:
        return f"http://127.0.0.1:{self.hostfwd[guest_port]}{path}"

    def guest_agent_connection(self, timeout: float = 30.0) -> GuestAgentConnection:
        ga = GuestAgentConnection.connect(self.qga_path, timeout, self.running)
        ga.sync(timeout)
        return ga

    def powerdown(self) -> None:
        assert self.qmp is not None, "start() first"
        self.qmp.execute("system_powerdown")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for conn in (self.qmp, self.console):
            if conn is not None:
                conn.close()

    def __enter__(self) -> TestGuest:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
