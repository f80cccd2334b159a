"""Block-mode volumes: a volume's ``disk.img`` presented to QEMU as a loop block device.

A hostpath volume is a file; for ``volumeMode: Block`` the node agent attaches it to a loop
device (``losetup``, root only) and gives QEMU ``/dev/loopN`` (the ``host_device`` driver), as a
CSI driver would hand a block device to the pod. Devices are attached when a VMI's disks are
prepared and detached by :meth:`LoopDevices.release` once no QEMU of this node uses them (a
device attached moments ago is kept: its QEMU may not have started yet). A grown file is made
visible with ``losetup --set-capacity``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from virtshift.errors import VirtshiftError

KEEP_FRESH = 20.0  # seconds an attached device is kept before it counts as unused


class LoopError(VirtshiftError):
    pass


def _losetup(*args: str) -> str:
    try:
        out = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LoopError(f"losetup {' '.join(args)}: {e}") from e
    if out.returncode != 0:
        raise LoopError(f"losetup {' '.join(args)}: {' '.join(out.stderr.split())}")
    return out.stdout


def attached(image: Path) -> list[str]:
    """Loop devices backed by ``image``."""
    out = _losetup("--json", "--list", "--associated", str(image))
    if not out.strip():
        return []
    return [str(d["name"]) for d in json.loads(out).get("loopdevices") or []]


class LoopDevices:
    def __init__(self) -> None:
        self.fresh: dict[str, float] = {}  # device -> when this agent attached it

    def attach(self, image: Path) -> str:
        """The loop device of ``image``, attached now unless it already is."""
        existing = attached(image)
        if existing:
            device = existing[0]
        else:
            device = _losetup("--find", "--show", str(image)).strip()
        self.fresh[device] = time.monotonic()
        return device

    @staticmethod
    def set_capacity(image: Path) -> list[str]:
        """Re-read the size of ``image`` into its loop devices; returns them."""
        devices = attached(image)
        for device in devices:
            _losetup("--set-capacity", device)
        return devices

    def release(self, roots: Sequence[Path], in_use: Collection[str]) -> list[str]:
        """Detach the loop devices backed by files under ``roots`` that no QEMU here uses."""
        out = _losetup("--json", "--list")
        if not out.strip():
            return []
        now = time.monotonic()
        gone = []
        for dev in json.loads(out).get("loopdevices") or []:
            name, back = str(dev.get("name")), str(dev.get("back-file") or "")
            back = back.removesuffix(" (deleted)")
            if not any(back.startswith(str(r).rstrip("/") + "/") for r in roots):
                continue
            if name in in_use or now - self.fresh.get(name, -KEEP_FRESH) < KEEP_FRESH:
                continue
            try:
                _losetup("--detach", name)
            except LoopError:
                continue
            self.fresh.pop(name, None)
            gone.append(name)
        return gone
