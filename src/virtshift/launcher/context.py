"""The typed inputs and outputs of the converter (:mod:`virtshift.launcher.converter`).

The node agent builds a :class:`LaunchContext` from what it prepared for one VMI (disk files,
kernel, firmware, network backends, run directory); the converter returns a :class:`Conversion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

# ---- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskFile:
    """A volume's backing file, prepared by the node agent.

    ``kind`` is the device used when the VMI lists the volume without a disk entry; a disk
    entry's own target (disk, cdrom, lun) wins. ``direct_io`` says whether O_DIRECT works on
    the file (see :func:`virtshift.launcher.supervisor.direct_io_supported`).
    """

    path: str
    format: Literal["qcow2", "raw"] = "raw"
    readonly: bool = False
    kind: Literal["disk", "cdrom", "lun"] = "disk"
    direct_io: bool = False
    shared: bool = False
    """Every node sees the same file (a ReadWriteMany claim on shared storage): a migration
    does not copy it."""


@dataclass(frozen=True)
class KernelBoot:
    """Files for ``firmware.kernelBoot``; ``cmdline`` None means the VMI's ``kernelArgs``."""

    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class EfiFirmware:
    """OVMF for ``bootloader.efi``: read-only code, and this VM's own (writable) vars copy."""

    code: str
    vars: str
    secure_boot: bool = False


class PortForward(NamedTuple):
    """One host port forwarded to a guest port (user-mode networking)."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class UserNetwork:
    forwards: tuple[PortForward, ...] = ()


@dataclass(frozen=True)
class TapNetwork:
    ifname: str


@dataclass(frozen=True)
class LaunchContext:
    """Everything the argv needs that is not in the VMI."""

    run_dir: Path
    qemu: str = "qemu-system-x86_64"
    accel: Literal["kvm", "tcg"] = "tcg"
    disks: Mapping[str, DiskFile] = field(default_factory=dict)
    kernel_boot: KernelBoot | None = None
    efi: EfiFirmware | None = None
    networks: Mapping[str, UserNetwork | TapNetwork] = field(default_factory=dict)
    """Backend per interface name; a pod interface without an entry gets ``UserNetwork()``."""
    incoming: str | None = None
    """Start as a migration target (``-incoming``), e.g. ``"defer"``."""


# ---- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskInfo:
    name: str
    qdev_id: str
    node_name: str
    bus: str
    device: str
    path: str
    readonly: bool
    boot_index: int | None
    shared: bool = False


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    qdev_id: str
    mac: str
    model: str
    backend: Literal["user", "tap"]
    guest_ip: str | None
    """The address user-mode networking hands out by DHCP (None for tap)."""
    gateway: str | None


@dataclass(frozen=True)
class Conversion:
    argv: tuple[str, ...]
    machine: str
    cpu_model: str
    vcpus: int
    sockets: int
    cores: int
    threads: int
    memory_bytes: int
    start_paused: bool
    disks: tuple[DiskInfo, ...]
    interfaces: tuple[InterfaceInfo, ...]
    warnings: tuple[str, ...]
