"""A QMP session to one QEMU: connect with retry, commands with timeouts, events, disconnect.

Wraps :class:`qemu.qmp.QMPClient` (asyncio) and turns its exceptions into :class:`QmpError`
subclasses. The socket is connected by hand first, retried until the deadline while QEMU is
still creating it, so the library only ever sees a live socket (and logs no failed attempts).
QEMU serves one QMP client per monitor at a time: a second client's greeting never arrives until
the first one leaves, which shows up here as :class:`QmpConnectError` after the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError, Runstate, StateError
from qemu.qmp.qmp_client import ExecuteError

from virtshift.launcher.common import LauncherError

log = logging.getLogger(__name__)


class QmpError(LauncherError):
    """Base of QMP failures."""


class QmpConnectError(QmpError):
    """No QMP session could be established before the deadline."""


class QmpTimeout(QmpError):
    """A command got no answer in time."""


class QmpDisconnected(QmpError):
    """The session ended (QEMU exited or closed the monitor) before the answer came."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0
    """QEMU's own clock (seconds since the epoch)."""


def _event(msg: Any) -> QmpEvent:
    ts = msg.get("timestamp") or {}
    seconds = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
    data = msg.get("data")
    return QmpEvent(str(msg.get("event")), dict(data) if isinstance(data, dict) else {}, seconds)


class QmpSession:
    """One connected QMP session. Create with :meth:`connect`; end with :meth:`close`."""

    def __init__(self, path: Path, client: QMPClient, listener: EventListener) -> None:
        self.path = path
        self._client = client
        self._listener = listener
        self._closed = asyncio.Event()
        self.end_reason: str | None = None
        """Why the session ended, once it has (``EOF``, an OS error, ``closed``)."""
        self._dc_task: asyncio.Task[None] | None = None
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_runstate(), name=f"qmp-watch:{path}")

    @classmethod
    async def connect(cls, path: str | Path, *, timeout_s: float = 10.0,
                      alive: Callable[[], bool] | None = None,
                      retry_interval: float = 0.05) -> QmpSession:
        """Connect to the QMP socket at ``path``, retrying until ``timeout_s`` seconds passed.

        ``alive`` is polled between attempts; when it returns False (the QEMU process is gone)
        the attempt is abandoned at once.
        """
        path = Path(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, str(path)),
                                       max(0.01, deadline - loop.time()))
                break
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as e:
                sock.close()
                if alive is not None and not alive():
                    raise QmpConnectError(f"QEMU exited before its QMP socket {path} "
                                          "answered") from e
                if loop.time() >= deadline:
                    raise QmpConnectError(f"no QMP server at {path} after {timeout_s:.1f}s: "
                                          f"{e.__class__.__name__}") from e
                await asyncio.sleep(retry_interval)
            except OSError as e:
                sock.close()
                raise QmpConnectError(f"cannot connect to QMP socket {path}: {e}") from e
        client = QMPClient(f"qmp:{path.parent.name}")
        listener = EventListener()
        client.register_listener(listener)
        try:
            await asyncio.wait_for(client.connect(sock), max(0.5, deadline - loop.time()))
        except TimeoutError as e:
            sock.close()
            raise QmpConnectError(f"QMP at {path} did not greet in time (another client "
                                  "may hold the monitor)") from e
        except (ConnectError, QMPError, OSError, EOFError) as e:
            sock.close()
            raise QmpConnectError(f"QMP handshake with {path} failed: {e}") from e
        return cls(path, client, listener)

    @property
    def connected(self) -> bool:
        return not self._closed.is_set() and self._client.runstate == Runstate.RUNNING

    @property
    def qemu_version(self) -> str:
        greeting = self._client.greeting
        if greeting is None:
            return ""
        v = greeting.QMP.version.get("qemu")
        if not isinstance(v, dict):
            return ""
        return f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout_s: float = 10.0) -> Any:
        """Run ``command``; its ``return`` value, or a :class:`QmpError`."""
        if not self.connected:
            raise QmpDisconnected(f"QMP {command}: session to {self.path} is closed "
                                  f"({self.end_reason})")
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)
        except TimeoutError as e:
            raise QmpTimeout(f"QMP {command}: no answer within {timeout_s}s") from e
        except ExecuteError as e:
            raise QmpCommandError(command, e.error_class, str(e)) from e
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as e:
            raise QmpDisconnected(f"QMP {command}: session ended ({e})") from e

    async def events(self) -> AsyncIterator[QmpEvent]:
        """Every event since the connection, until the session ends (one consumer only)."""
        while True:
            if not self._listener.empty():
                yield _event(await self._listener.get())
                continue
            if self._closed.is_set():
                return
            get = asyncio.ensure_future(self._listener.get())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait((get, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not get.done():
                    get.cancel()
            if get.done() and not get.cancelled():
                yield _event(get.result())

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Disconnect (idempotent). QEMU keeps running."""
        if self.end_reason is None:
            self.end_reason = "closed"
        await self._start_disconnect()
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch

    def _start_disconnect(self) -> asyncio.Task[None]:
        if self._dc_task is None:
            self._dc_task = asyncio.get_running_loop().create_task(
                self._disconnect(), name=f"qmp-disconnect:{self.path}")
        return self._dc_task

    async def _disconnect(self) -> None:
        try:
            await self._client.disconnect()
        except EOFError:
            self.end_reason = self.end_reason or "EOF"  # QEMU closed the socket (exit, quit)
        except (OSError, QMPError) as e:
            self.end_reason = self.end_reason or f"{e.__class__.__name__}: {e}"
            log.debug("QMP %s ended with %r", self.path, e)
        finally:
            self.end_reason = self.end_reason or "EOF"
            self._closed.set()

    async def _watch_runstate(self) -> None:
        """Notice the library dropping the session (EOF from QEMU) and finish the disconnect."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        await asyncio.shield(self._start_disconnect())
