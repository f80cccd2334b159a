"""Disk preparation for one VMI on its node: the files behind its volumes.

- ``containerDisk``: the image is resolved in the cluster image store, fetched into the node's
  cache, and the VM boots from a qcow2 overlay in its run directory (the cached base never
  changes). A kernel image named by ``firmware.kernelBoot.container.image`` gives the kernel
  (``kernelPath``) and the initrd (``initrdPath``): the store keeps them as the image's parts, so
  the paths only say which parts to use.
- ``cloudInitNoCloud`` / ``cloudInitConfigDrive``: an ISO (labels ``cidata`` / ``config-2``),
  with ``secretRef`` data read from the VMI's namespace.
- ``emptyDisk``: a sparse qcow2 of ``capacity``, discarded with the VMI.
- ``hostDisk``: ``Disk`` (must exist) or ``DiskOrCreate`` (a sparse raw file of ``capacity``),
  confined to the node's allowed directories.
- ``persistentVolumeClaim`` / ``dataVolume``: the claim must be ``Bound``; its PersistentVolume
  (made by the hostpath provisioner, :mod:`virtshift.controller.storage`) is a directory under
  this node's storage root, and the VM disk is ``disk.img`` inside it, a sparse raw file of the
  volume's capacity created on first use (KubeVirt's Filesystem-mode layout). In volume mode
  Block the same file is attached to a loop device and QEMU gets the device
  (:mod:`virtshift.agent.loopdev`). :meth:`DiskPreparer.remove_orphans` deletes the directories
  of volumes that no longer exist (reclaim policy Delete).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtshift.agent.loopdev import LoopDevices, LoopError
from virtshift.api import cdi
from virtshift.api.admission import quantity
from virtshift.api.cdi import pv_node as pv_node  # re-exported for the agent modules
from virtshift.api.kinds import REGISTRY, Obj
from virtshift.client.rest import Client
from virtshift.errors import NotFound, VirtshiftError
from virtshift.launcher.context import DiskFile, EfiFirmware, KernelBoot
from virtshift.launcher.converter import efi_secure_boot
from virtshift.storage.cloudinit import build_seed, configdrive_files, nocloud_files
from virtshift.storage.imagecache import ImageCache, ImageError, create_overlay

REASON_PVC_NOT_FOUND = "FailedPvcNotFound"
REASON_FAILED_MOUNT = "FailedMount"
ORPHAN_MIN_AGE = 10.0  # seconds a volume directory lives before it can count as orphaned


class DiskError(VirtshiftError):
    """A volume could not be prepared; ``reason`` is the VMI condition reason."""

    def __init__(self, message: str, *, reason: str = "FailedCreate") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Prepared:
    disks: dict[str, DiskFile] = field(default_factory=dict)
    kernel_boot: KernelBoot | None = None
    efi: EfiFirmware | None = None


OVMF_DIR = Path("/usr/share/OVMF")
# (code, vars template) per secure boot setting, preferring the 4 MiB builds (Debian's ovmf)
OVMF_FILES = {
    False: (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")),
    True: (("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
           ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd")),
}


def prepare_efi(vmi: Mapping[str, Any], run_dir: Path, ovmf_dir: Path = OVMF_DIR
                ) -> EfiFirmware | None:
    """OVMF for ``bootloader.efi``: the read-only code and this VMI's own copy of the variable
    store (kept across reboots of the VMI, gone with it). None when the VMI boots BIOS or the
    node has no OVMF (the converter then reports the field)."""
    secure = efi_secure_boot(dict(vmi))
    if secure is None:
        return None
    for code, template in OVMF_FILES[secure]:
        if (ovmf_dir / code).is_file() and (ovmf_dir / template).is_file():
            vars_copy = run_dir / "efi-vars.fd"
            if not vars_copy.exists():
                shutil.copyfile(ovmf_dir / template, vars_copy)
            return EfiFirmware(str(ovmf_dir / code), str(vars_copy), secure_boot=secure)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def volume_roots(client: Client, pv: Mapping[str, Any], storage_root: Path | None
                       ) -> tuple[Path, ...]:
    """Where a node may find a volume's directory: its storage root, and the shared path of
    the volume's StorageClass (``parameters.sharedPath``)."""
    roots = (storage_root,) if storage_root is not None else ()
    cls = str(_dict(pv.get("spec")).get("storageClassName") or "")
    if not cls:
        return roots
    try:
        sc = await client.get(REGISTRY.require("storage.k8s.io", "v1", "StorageClass"), None,
                              cls)
    except NotFound:
        return roots
    shared = cdi.shared_path(sc)
    return (*roots, Path(shared)) if shared else roots


def _bytes(value: Any, what: str) -> int:
    try:
        return quantity.parse_value(value).value()
    except ValueError as e:
        raise DiskError(f"{what}: invalid capacity {value!r}") from e


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise DiskError(f"{argv[0]} failed: {' '.join(err.decode(errors='replace').split())}")


def confined(path: str, allowed: Sequence[Path]) -> Path:
    """``path`` resolved, if it lies inside one of the ``allowed`` directories."""
    p = Path(os.path.realpath(path))
    for root in allowed:
        r = Path(os.path.realpath(root))
        if p == r or r in p.parents:
            return p
    dirs = ", ".join(str(a) for a in allowed) or "none configured"
    raise DiskError(f"hostDisk path {path} is outside the node's allowed directories ({dirs})")


class DiskPreparer:
    def __init__(self, client: Client, cache: ImageCache, hostdisk_dirs: Sequence[Path], *,
                 storage_root: Path | None = None, node_name: str = "") -> None:
        self.client = client
        self.cache = cache
        self.hostdisk_dirs = tuple(hostdisk_dirs)
        self.storage_root = storage_root
        self.node_name = node_name
        self.loops = LoopDevices()
        self.volume_dirs: tuple[Path, ...] = (storage_root,) if storage_root else ()
        """The storage root and the classes' shared paths, as last seen."""

    async def prepare(self, vmi: Mapping[str, Any], disk_dir: Path) -> Prepared:
        meta = _dict(vmi.get("metadata"))
        spec = _dict(vmi.get("spec"))
        ns = str(meta.get("namespace") or "default")
        name = str(meta.get("name"))
        hostname = str(spec.get("hostname") or name)
        await asyncio.to_thread(disk_dir.mkdir, parents=True, exist_ok=True)
        out = Prepared()
        for vol in spec.get("volumes") or []:
            vol = _dict(vol)
            vname = str(vol.get("name"))
            if "containerDisk" in vol:
                out.disks[vname] = await self._container_disk(
                    _dict(vol["containerDisk"]), disk_dir / f"{vname}.qcow2")
            elif "cloudInitNoCloud" in vol or "cloudInitConfigDrive" in vol:
                nocloud = "cloudInitNoCloud" in vol
                src = _dict(vol["cloudInitNoCloud" if nocloud else "cloudInitConfigDrive"])
                secrets = await self._secrets(ns, src)
                uid = str(meta.get("uid") or name)
                if nocloud:
                    files = nocloud_files(src, instance_id=f"{name}.{ns}", hostname=hostname,
                                          secrets=secrets)
                else:
                    files = configdrive_files(src, instance_id=uid, hostname=hostname,
                                              secrets=secrets)
                iso = await build_seed(disk_dir / f"{vname}.iso",
                                       "cidata" if nocloud else "config-2", files)
                out.disks[vname] = DiskFile(str(iso), "raw", readonly=True, kind="cdrom")
            elif "emptyDisk" in vol:
                size = _bytes(_dict(vol["emptyDisk"]).get("capacity"),
                              f"volume {vname}: emptyDisk")
                path = disk_dir / f"{vname}.empty.qcow2"
                if not path.exists():
                    await _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
                out.disks[vname] = DiskFile(str(path), "qcow2")
            elif "hostDisk" in vol:
                out.disks[vname] = await self._host_disk(vname, _dict(vol["hostDisk"]))
            elif "persistentVolumeClaim" in vol or "dataVolume" in vol:
                src = _dict(vol.get("persistentVolumeClaim"))
                claim = str(src.get("claimName") or _dict(vol.get("dataVolume")).get("name")
                            or "")
                out.disks[vname] = await self._claim_disk(ns, vname, claim,
                                                          readonly=src.get("readOnly") is True)
            else:
                kinds = [k for k in vol if k != "name"]
                raise DiskError(f"volume {vname}: {', '.join(kinds) or 'unknown'} volumes are "
                                "not supported on this node")
        out.efi = await asyncio.to_thread(prepare_efi, vmi, disk_dir.parent)
        kb = _dict(_dict(_dict(spec.get("domain")).get("firmware")).get("kernelBoot"))
        container = _dict(kb.get("container"))
        if container.get("image"):
            image = await self._resolve(str(container["image"]))
            if image.type != "kernel" or image.kernel is None:
                raise DiskError(f'kernelBoot image "{container["image"]}" is a disk image, not '
                                "a kernel", reason="ErrImagePull")
            if not container.get("kernelPath"):
                raise DiskError("kernelBoot.container without kernelPath: booting only an "
                                "initrd is not supported")
            if container.get("initrdPath") and image.initrd is None:
                raise DiskError(f'kernelBoot image "{container["image"]}" has no initrd '
                                f'(initrdPath {container["initrdPath"]})', reason="ErrImagePull")
            args = kb.get("kernelArgs")
            initrd = image.initrd if container.get("initrdPath") else None
            out.kernel_boot = KernelBoot(str(image.kernel), str(initrd) if initrd else None,
                                         cmdline=None if args else image.cmdline)
        return out

    async def _resolve(self, reference: str) -> Any:
        try:
            return await self.cache.resolve(reference)
        except ImageError as e:
            raise DiskError(str(e), reason="ErrImagePull") from e

    async def _container_disk(self, src: Obj, overlay: Path) -> DiskFile:
        reference = str(src.get("image") or "")
        if not reference:
            raise DiskError("containerDisk has no image")
        image = await self._resolve(reference)
        if image.type != "disk" or image.disk is None:
            raise DiskError(f'containerDisk image "{reference}" is a kernel image, not a disk '
                            "(use it in firmware.kernelBoot.container.image)",
                            reason="ErrImagePull")
        if not await asyncio.to_thread(overlay.exists):
            await create_overlay(image.disk, image.format or "raw", overlay)
        return DiskFile(str(overlay), "qcow2")

    async def _host_disk(self, vname: str, src: Obj) -> DiskFile:
        path = str(src.get("path") or "")
        if not path:
            raise DiskError(f"volume {vname}: hostDisk has no path")
        target = confined(path, self.hostdisk_dirs)
        kind = src.get("type") or "Disk"
        if not target.exists():
            if kind != "DiskOrCreate":
                raise DiskError(f"volume {vname}: hostDisk {path} does not exist (type Disk)")
            size = _bytes(src.get("capacity"), f"volume {vname}: hostDisk")
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as f:
                f.truncate(size)
        elif target.is_dir():
            target = target / "disk.img"
            if not target.exists():
                raise DiskError(f"volume {vname}: {target} does not exist")
        return DiskFile(str(target), "raw", readonly=False)

    async def _claim_disk(self, ns: str, vname: str, claim: str, *, readonly: bool
                          ) -> DiskFile:
        if not claim:
            raise DiskError(f"volume {vname}: no claim name")
        try:
            pvc = await self.client.get(REGISTRY.require("", "v1", "PersistentVolumeClaim"),
                                        ns, claim)
        except NotFound as e:
            raise DiskError(f'volume {vname}: persistentvolumeclaim "{claim}" not found',
                            reason=REASON_PVC_NOT_FOUND) from e
        volume = str(_dict(pvc.get("spec")).get("volumeName") or "")
        if _dict(pvc.get("status")).get("phase") != "Bound" or not volume:
            raise DiskError(f'volume {vname}: persistentvolumeclaim "{claim}" is not bound',
                            reason=REASON_FAILED_MOUNT)
        if not cdi.populated(pvc):
            raise DiskError(f'volume {vname}: persistentvolumeclaim "{claim}" is still being '
                            f"populated ({cdi.pod_phase(pvc) or cdi.POD_PENDING})",
                            reason=REASON_FAILED_MOUNT)
        try:
            pv = await self.client.get(REGISTRY.require("", "v1", "PersistentVolume"), None,
                                       volume)
        except NotFound as e:
            raise DiskError(f'volume {vname}: persistentvolume "{volume}" of claim "{claim}" '
                            "not found", reason=REASON_FAILED_MOUNT) from e
        roots = await self.volume_roots(pv)
        disk = await asyncio.to_thread(self._volume_file, vname, pv, readonly, roots)
        modes = _dict(pvc.get("spec")).get("accessModes") or []
        if "ReadWriteMany" in modes and not pv_node(pv):
            disk = dataclasses.replace(disk, shared=True)
        return disk

    async def volume_roots(self, pv: Obj) -> tuple[Path, ...]:
        return await volume_roots(self.client, pv, self.storage_root)

    def _volume_file(self, vname: str, pv: Obj, readonly: bool,
                     roots: tuple[Path, ...]) -> DiskFile:
        spec = _dict(pv.get("spec"))
        name = str(_dict(pv.get("metadata")).get("name"))
        where = pv_node(pv)
        if where and self.node_name and where != self.node_name:
            raise DiskError(f"volume {vname}: persistentvolume {name} is on node {where}, "
                            f"not on {self.node_name}", reason=REASON_FAILED_MOUNT)
        path = str(_dict(spec.get("hostPath")).get("path") or "")
        if not path or not roots:
            raise DiskError(f"volume {vname}: persistentvolume {name} is not a hostPath volume "
                            "of this node", reason=REASON_FAILED_MOUNT)
        directory = confined(path, roots)
        directory.mkdir(parents=True, exist_ok=True)
        image = directory / "disk.img"
        if not image.exists():
            size = _bytes(_dict(spec.get("capacity")).get("storage"),
                          f"volume {vname}: persistentvolume {name}")
            # KubeVirt leaves room for filesystem overhead; the whole capacity is ours here.
            with image.open("wb") as f:
                f.truncate(size - size % 512)
        if spec.get("volumeMode") == "Block":
            try:
                device = self.loops.attach(image)
            except LoopError as e:
                raise DiskError(f"volume {vname}: persistentvolume {name} has volume mode Block "
                                f"and no loop device could be attached: {e}",
                                reason=REASON_FAILED_MOUNT) from e
            return DiskFile(device, "raw", readonly=readonly)
        return DiskFile(str(image), "raw", readonly=readonly)

    async def remove_orphans(self) -> list[Path]:
        """Delete the ``pvc-*`` directories under the storage root whose PersistentVolume no
        longer exists (deleted by reclaim policy Delete); returns what was removed."""
        roots = [r for r in (self.storage_root,) if r is not None]
        classes = await self.client.list(REGISTRY.require("storage.k8s.io", "v1",
                                                          "StorageClass"))
        roots += [Path(p) for p in {cdi.shared_path(c) for c in classes.get("items") or []}
                  if p]
        pvs = await self.client.list(REGISTRY.require("", "v1", "PersistentVolume"))
        alive = {str(_dict(p.get("metadata")).get("name")) for p in pvs.get("items") or []}

        def orphans() -> list[Path]:
            # a directory made after the listing belongs to a volume the listing missed
            young = time.time() - ORPHAN_MIN_AGE
            return [d for root in roots if root.is_dir() for d in sorted(root.iterdir())
                    if d.name.startswith("pvc-") and d.name not in alive and d.is_dir()
                    and d.stat().st_mtime < young]

        gone = await asyncio.to_thread(orphans)
        self.volume_dirs = tuple(roots)
        for d in gone:
            await asyncio.to_thread(shutil.rmtree, d, True)
        return gone

    async def _secrets(self, ns: str, src: Obj) -> dict[str, dict[str, bytes]]:
        out: dict[str, dict[str, bytes]] = {}
        secret_kind = REGISTRY.require("", "v1", "Secret")
        for key in ("secretRef", "networkDataSecretRef"):
            ref = _dict(src.get(key))
            sname = ref.get("name")
            if not sname or sname in out:
                continue
            try:
                secret = await self.client.get(secret_kind, ns, str(sname))
            except NotFound:
                continue  # cloudinit reports the missing secret with its field
            data = {str(k): base64.b64decode(str(v)) for k, v in
                    _dict(secret.get("data")).items()}
            data.update({str(k): str(v).encode() for k, v in
                         _dict(secret.get("stringData")).items()})
            out[str(sname)] = data
        return out
