"""What the launcher modules share: the launcher error and the layout of a VM's run directory.

A run directory belongs to one VMI on one node. The node agent creates it; the converter names
the sockets QEMU opens in it; the supervisor keeps its records there, so that an agent which
restarts can find the VM again from the directory alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virtshift.errors import VirtshiftError

# sun_path in struct sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


class LauncherError(VirtshiftError):
    """A VM cannot be converted, started or controlled.

    ``fields`` names the offending VMI fields (``spec.domain.devices.gpus``...) when the cause
    is the spec, so the node agent can fail the VMI with a precise reason.
    """

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


@dataclass(frozen=True)
class RunDir:
    """The files of one VM under its run directory (all absolute paths)."""

    path: Path

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        return cls(Path(path).absolute())

    @property
    def qmp_socket(self) -> Path:
        """QMP monitor (unix socket, QEMU listens)."""
        return self.path / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        """The first serial port (the VMI console), unix socket, QEMU listens."""
        return self.path / "serial.sock"

    @property
    def serial_log(self) -> Path:
        """Everything the guest wrote to its serial console (appended across restarts)."""
        return self.path / "serial.log"

    @property
    def vnc_socket(self) -> Path:
        return self.path / "vnc.sock"

    @property
    def ga_socket(self) -> Path:
        """The host side of the guest agent's virtio-serial channel."""
        return self.path / "ga.sock"

    @property
    def pidfile(self) -> Path:
        """Written by QEMU itself (``-pidfile``)."""
        return self.path / "qemu.pid"

    @property
    def log(self) -> Path:
        """QEMU's stdout and stderr."""
        return self.path / "qemu.log"

    @property
    def state(self) -> Path:
        """The supervisor's record: pid, start time, QMP events seen, stop requests, outcome."""
        return self.path / "supervisor.json"

    @property
    def exit_status(self) -> Path:
        """QEMU's wait status as the shell wrapper saw it (``$?``: 128+N for signal N)."""
        return self.path / "exit-status"

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp_socket, self.serial_socket, self.vnc_socket, self.ga_socket)

    def check_socket_paths(self) -> None:
        """Raise :class:`LauncherError` when a socket path is too long for ``sun_path``."""
        for sock in self.sockets():
            if len(str(sock).encode()) > MAX_SOCKET_PATH:
                raise LauncherError(
                    f"run directory {self.path} is too deep: socket path {sock} is longer "
                    f"than {MAX_SOCKET_PATH} bytes"
                )
