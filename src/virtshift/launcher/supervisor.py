"""Supervision of one VM's QEMU process, which outlives the agent that started it.

How it works:
- :meth:`Supervisor.start` runs ``/bin/sh -c WRAPPER RUN_DIR QEMU-ARGV...`` in a new session
  (no controlling terminal, its own process group), stdin from /dev/null, stdout and stderr
  appended to ``qemu.log``. The shell waits for QEMU and writes its wait status (``$?``) to
  ``exit-status``, the way a container monitor records a container's exit: whoever supervises
  later - this process, or an agent restarted since - can read how QEMU ended. QEMU writes its
  own pid to ``qemu.pid``; ``start`` returns once QMP answers.
- The supervisor's record, ``supervisor.json``, holds the pid with its start time from
  /proc (so a recycled pid is never mistaken for QEMU), the first ``SHUTDOWN`` event, a guest
  panic, the last stop request and, once known, the outcome. :meth:`Supervisor.attach` rebuilds a
  supervisor from the run directory alone.
- QEMU runs with ``-no-shutdown`` (see the converter): after a guest power-off it stays in the
  ``shutdown`` state until the supervisor, having recorded the event, sends ``quit``. A QEMU
  found in that state on attach is handled the same way, so a guest shutdown that happened
  while no agent was around is still told apart from a crash.
- Exit is noticed by QMP end-of-file and confirmed by polling the pid (QEMU is not this
  process's child after an agent restart).

Outcomes (:class:`ExitInfo`): a guest power-off nobody asked for is ``GuestShutdown``; one after
our ACPI request is ``Stopped``; our SIGKILL (:meth:`kill`, or a shutdown grace period that ran
out) is ``Killed``; these end the VMI ``Succeeded``. A guest panic or QEMU dying otherwise
(signal, non-zero exit, no shutdown event) is ``GuestPanicked``/``Crashed``: ``Failed``.

Soft reboot follows KubeVirt: through the guest agent (``guest-shutdown`` mode ``reboot``) when
it answers, else by the ACPI power button with the power-off turned into a reset (libvirt's
"fake reboot"), within :data:`FAKE_REBOOT_WINDOW` seconds; with neither it is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from virtshift.launcher.common import LauncherError, RunDir
from virtshift.launcher.guestagent import GuestAgent, GuestAgentInfo, GuestInterface
from virtshift.launcher.qmp import QmpConnectError, QmpDisconnected, QmpEvent, QmpSession

log = logging.getLogger(__name__)

FAKE_REBOOT_WINDOW = 300.0
POLL_INTERVAL = 0.05
_WRAPPER = (
    'd=$1; shift; "$@"; rc=$?; '
    'printf "%s\\n" "$rc" > "$d/exit-status.tmp" && mv -f "$d/exit-status.tmp" "$d/exit-status"; '
    "exit $rc"
)
_children: set[subprocess.Popen[bytes]] = set()
"""Wrapper shells started by this process, reaped by whichever supervisor polls next."""


class ExitKind(StrEnum):
    GUEST_SHUTDOWN = "GuestShutdown"
    STOPPED = "Stopped"
    KILLED = "Killed"
    GUEST_PANICKED = "GuestPanicked"
    CRASHED = "Crashed"


@dataclass(frozen=True)
class ExitInfo:
    kind: ExitKind
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    shutdown_reason: str | None = None
    """The reason of QEMU's first ``SHUTDOWN`` event (``guest-shutdown``, ``guest-reset``...)."""

    @property
    def succeeded(self) -> bool:
        return self.kind in (ExitKind.GUEST_SHUTDOWN, ExitKind.STOPPED, ExitKind.KILLED)

    @property
    def phase(self) -> str:
        """The VMI phase this ending leads to."""
        return "Succeeded" if self.succeeded else "Failed"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitInfo:
        return cls(kind=ExitKind(data["kind"]), reason=str(data["reason"]),
                   exit_code=data.get("exit_code"), signal=data.get("signal"),
                   shutdown_reason=data.get("shutdown_reason"))


def direct_io_supported(path: str | Path) -> bool:
    """Whether ``path`` can be opened with O_DIRECT (cache mode ``none`` needs it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _reap() -> None:
    for child in list(_children):
        if child.poll() is not None:
            _children.discard(child)


def _log_tail(path: Path, lines: int = 4) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return " | ".join(kept[-lines:])


class _Record:
    """``supervisor.json``: read at attach, rewritten atomically on every change."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.data: dict[str, Any] = {}

    def load(self) -> bool:
        try:
            self.data = json.loads(self.run.state.read_text())
        except FileNotFoundError:
            return False
        return isinstance(self.data, dict) and isinstance(self.data.get("pid"), int)

    def update(self, **changes: Any) -> None:
        self.data.update(changes)
        tmp = self.run.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.run.state)

    def alive(self) -> bool:
        pid, start = self.data.get("pid"), self.data.get("starttime")
        return isinstance(pid, int) and _proc_starttime(pid) == start

    def wrapper_alive(self) -> bool:
        pid, start = self.data.get("wrapper_pid"), self.data.get("wrapper_starttime")
        return isinstance(pid, int) and _proc_starttime(pid) == start

    def classify(self) -> ExitInfo:
        """How QEMU ended, from what was recorded and the wrapper's exit status."""
        pid = self.data.get("pid")
        code = sig = None
        try:
            status = int(self.run.exit_status.read_text().strip())
            code, sig = (None, status - 128) if status > 128 else (status, None)
        except (FileNotFoundError, ValueError):
            status = None
        shutdown = self.data.get("shutdown") or {}
        sreason = shutdown.get("reason")
        stop = self.data.get("stop_requested")
        common: dict[str, Any] = {"exit_code": code, "signal": sig, "shutdown_reason": sreason}
        if self.data.get("panicked") or sreason == "guest-panic":
            return ExitInfo(ExitKind.GUEST_PANICKED, "the guest kernel panicked", **common)
        if stop == "kill":
            return ExitInfo(ExitKind.KILLED, f"QEMU (pid {pid}) was killed on request", **common)
        if shutdown.get("guest"):
            if stop == "powerdown":
                return ExitInfo(ExitKind.STOPPED, "the guest powered off on request", **common)
            return ExitInfo(ExitKind.GUEST_SHUTDOWN,
                            f"the guest shut down ({sreason})", **common)
        if sig is not None:
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            why = f"was killed by signal {sig} ({name})"
        elif sreason == "host-signal":
            why = "was terminated by a signal"
        elif code:
            tail = _log_tail(self.run.log, 2)
            why = f"exited with status {code}" + (f": {tail}" if tail else "")
        elif status is None:
            why = "exited without a guest shutdown (exit status unknown)"
        else:
            why = "exited without a guest shutdown"
        return ExitInfo(ExitKind.CRASHED, f"QEMU (pid {pid}) {why}", **common)


class Supervisor:
    """Supervises the QEMU of one run directory. Use :meth:`start` or :meth:`attach`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run = RunDir.of(run_dir)
        self.pid: int | None = None
        self._record = _Record(self.run)
        self._qmp: QmpSession | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._exit: asyncio.Future[ExitInfo] | None = None
        self._guest_agent = GuestAgent(self.run.ga_socket)
        self._listeners: list[Callable[[QmpEvent], None]] = []

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self, argv: Sequence[str], *, timeout_s: float = 30.0) -> int:
        """Start QEMU detached; return its pid once QMP answers (else LauncherError)."""
        if self._record.load() and self._record.alive():
            raise LauncherError(f"QEMU (pid {self._record.data['pid']}) already runs in "
                                f"{self.run.path}; attach to it instead")
        self.run.path.mkdir(parents=True, exist_ok=True)
        for stale in (*self.run.sockets(), self.run.pidfile, self.run.exit_status,
                      self.run.state):
            stale.unlink(missing_ok=True)
        proc = await asyncio.to_thread(self._spawn, argv)
        _children.add(proc)
        try:
            qmp = await QmpSession.connect(self.run.qmp_socket, timeout_s=timeout_s,
                                           alive=lambda: proc.poll() is None)
        except QmpConnectError as e:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(POLL_INTERVAL)
            tail = _log_tail(self.run.log)
            raise LauncherError(f"QEMU did not start: {tail or e}") from e
        pid = int(self.run.pidfile.read_text().strip())
        self._record.data = {}
        self._record.update(
            pid=pid, starttime=_proc_starttime(pid), wrapper_pid=proc.pid,
            wrapper_starttime=_proc_starttime(proc.pid), started_at=time.time(),
            argv=list(argv), shutdown=None, panicked=None, stop_requested=None,
            fake_reboot_until=None, exit=None)
        self.pid = pid
        self._qmp = qmp
        self._begin_monitoring()
        return pid

    def _spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with self.run.log.open("ab") as logf:
            logf.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: "
                       f"{' '.join(argv)}\n".encode())
            logf.flush()
            return subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "virtshift-qemu", str(self.run.path), *argv],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.run.path, start_new_session=True, close_fds=True)

    @classmethod
    async def attach(cls, run_dir: str | Path, *, timeout_s: float = 10.0) -> Supervisor | None:
        """A supervisor for the QEMU still running in ``run_dir``; None if there is none."""
        sup = cls(run_dir)
        if not sup._record.load() or not sup._record.alive():
            return None
        try:
            sup._qmp = await QmpSession.connect(sup.run.qmp_socket, timeout_s=timeout_s,
                                                alive=sup._record.alive)
        except QmpConnectError:
            if not sup._record.alive():
                return None
            raise
        sup.pid = int(sup._record.data["pid"])
        if await sup.status() == "shutdown":
            # The guest powered off while nobody watched: QEMU waits in the shutdown state.
            if not sup._record.data.get("shutdown"):
                sup._record.update(shutdown={"guest": True, "reason": "guest-shutdown",
                                             "seen": "on attach"})
            await sup._after_shutdown()
        sup._begin_monitoring()
        return sup

    @staticmethod
    def last_exit(run_dir: str | Path) -> ExitInfo | None:
        """How the QEMU of ``run_dir`` ended; None if it still runs or never started."""
        record = _Record(RunDir.of(run_dir))
        if not record.load() or record.alive():
            return None
        if isinstance(record.data.get("exit"), dict):
            return ExitInfo.from_json(record.data["exit"])
        info = record.classify()
        record.update(exit=asdict(info))
        return info

    async def detach(self) -> None:
        """Stop supervising (as if the agent died); QEMU keeps running."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self._qmp is not None:
            await self._qmp.close()

    @property
    def qmp(self) -> QmpSession:
        if self._qmp is None:
            raise LauncherError(f"no QMP session to the QEMU of {self.run.path}")
        return self._qmp

    @property
    def exited(self) -> bool:
        return self._exit is not None and self._exit.done()

    async def wait_exit(self) -> ExitInfo:
        if self._exit is None:
            raise LauncherError("the supervisor is not running (start or attach first)")
        return await asyncio.shield(self._exit)

    # ---- control -------------------------------------------------------------------------------

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``shutdown``, ``prelaunch``...), or
        ``exited``."""
        if self.exited or not self._record.alive():
            return "exited"
        try:
            result = await self.qmp.execute("query-status")
        except QmpDisconnected:
            if not self._record.alive():
                return "exited"
            raise
        return str(result["status"])

    async def pause(self) -> None:
        await self.qmp.execute("stop")

    async def unpause(self) -> None:
        await self.qmp.execute("cont")

    async def reset(self) -> None:
        await self.qmp.execute("system_reset")

    async def soft_reboot(self, *, acpi: bool = True) -> str:
        """Reboot the guest OS; returns how: ``guest-agent`` or ``acpi``."""
        if await self.guest_agent_ping() is not None:
            await self._guest_agent.execute("guest-shutdown", {"mode": "reboot"},
                                            expect_reply=False)
            return "guest-agent"
        if not acpi:
            raise LauncherError("soft reboot needs the guest agent connected or ACPI enabled, "
                                "and the VMI has neither")
        self._record.update(fake_reboot_until=time.time() + FAKE_REBOOT_WINDOW)
        await self.qmp.execute("system_powerdown")
        return "acpi"

    async def shutdown(self, grace_seconds: float) -> ExitInfo:
        """ACPI power-off, then SIGKILL if QEMU has not exited after ``grace_seconds``."""
        if self.exited:
            return await self.wait_exit()
        if self._record.data.get("stop_requested") != "kill":
            self._record.update(stop_requested="powerdown", fake_reboot_until=None)
        if grace_seconds > 0:
            try:
                if await self.status() == "shutdown":
                    await self._quit()
                else:
                    await self.qmp.execute("system_powerdown")
            except QmpDisconnected as e:
                log.debug("QEMU %s left during shutdown: %s", self.pid, e)
            try:
                return await asyncio.wait_for(self.wait_exit(), grace_seconds)
            except TimeoutError:
                log.info("QEMU %s still running after %.0fs grace; killing", self.pid,
                         grace_seconds)
        return await self.kill()

    async def kill(self) -> ExitInfo:
        """SIGKILL QEMU now; its outcome is ``Killed``."""
        if not self.exited:
            self._record.update(stop_requested="kill")
            if self._record.alive() and self.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it exited just now: fine
                    os.kill(self.pid, signal.SIGKILL)
        return await self.wait_exit()

    # ---- guest agent ---------------------------------------------------------------------------

    async def guest_agent_ping(self, *, timeout_s: float = 1.5) -> GuestAgentInfo | None:
        """The agent's version and commands if it answers, else None."""
        if self.exited:
            return None
        return await self._guest_agent.info(timeout_s=timeout_s)

    async def guest_osinfo(self, *, timeout_s: float = 2.0) -> dict[str, str] | None:
        return None if self.exited else await self._guest_agent.osinfo(timeout_s=timeout_s)

    async def guest_interfaces(self, *, timeout_s: float = 2.0) -> list[GuestInterface] | None:
        return None if self.exited else await self._guest_agent.interfaces(timeout_s=timeout_s)

    # ---- monitoring ----------------------------------------------------------------------------

    def _begin_monitoring(self) -> None:
        self._exit = asyncio.get_running_loop().create_future()
        self._monitor = asyncio.get_running_loop().create_task(
            self._watch(), name=f"supervisor:{self.run.path.name}")

    def _alive(self) -> bool:
        _reap()
        return self._record.alive()

    async def _watch(self) -> None:
        try:
            while True:
                if self._qmp is not None and self._qmp.connected:
                    async for event in self._qmp.events():
                        await self._on_event(event)
                if not self._alive():
                    break
                # QEMU lives but QMP dropped (someone else took the monitor?): reconnect.
                try:
                    if self._qmp is not None:
                        await self._qmp.close()
                    self._qmp = await QmpSession.connect(self.run.qmp_socket, timeout_s=1.0,
                                                         alive=self._alive)
                except QmpConnectError as e:
                    log.debug("QMP reconnect to %s failed: %s", self.pid, e)
                    await asyncio.sleep(POLL_INTERVAL * 4)
            info = await self._conclude()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("supervising QEMU %s failed", self.pid)
            assert self._exit is not None
            if not self._exit.done():
                self._exit.set_exception(LauncherError(f"supervision failed: {e}"))
            raise
        assert self._exit is not None
        if not self._exit.done():
            self._exit.set_result(info)

    def add_listener(self, listener: Callable[[QmpEvent], None]) -> None:
        """Also pass every QMP event to ``listener`` (called in the event loop, must not
        block)."""
        self._listeners.append(listener)

    async def _on_event(self, event: QmpEvent) -> None:
        for listener in self._listeners:
            listener(event)
        if event.name == "SHUTDOWN":
            if self._record.data.get("shutdown") is None:
                self._record.update(shutdown={"guest": bool(event.data.get("guest")),
                                              "reason": event.data.get("reason"),
                                              "at": event.timestamp})
            if event.data.get("guest"):
                await self._after_shutdown()
        elif event.name == "GUEST_PANICKED":
            self._record.update(panicked=event.data or {"action": "unknown"})

    async def _after_shutdown(self) -> None:
        """The guest powered off and QEMU waits (-no-shutdown): reset it for a pending ACPI
        soft reboot, else tell QEMU to exit."""
        until = self._record.data.get("fake_reboot_until")
        try:
            if until and until > time.time() and not self._record.data.get("panicked"):
                self._record.update(shutdown=None, fake_reboot_until=None)
                await self.qmp.execute("system_reset")
                await self.qmp.execute("cont")
                return
            await self._quit()
        except QmpDisconnected as e:
            log.debug("QEMU %s left after its shutdown: %s", self.pid, e)

    async def _quit(self) -> None:
        try:
            await self.qmp.execute("quit", timeout_s=5.0)
        except QmpDisconnected as e:
            log.debug("QEMU %s closed QMP on quit: %s", self.pid, e)  # the expected EOF

    async def _conclude(self) -> ExitInfo:
        """QEMU is gone: wait briefly for the wrapper's exit status, then classify and record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while not self.run.exit_status.exists() and loop.time() < deadline:
            _reap()
            if not self._record.wrapper_alive():
                break
            await asyncio.sleep(POLL_INTERVAL)
        if self._qmp is not None:
            await self._qmp.close()
        info = self._record.classify()
        self._record.update(exit=asdict(info))
        return info
