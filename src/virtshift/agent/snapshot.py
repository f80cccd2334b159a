"""The node agent's part of VM snapshots: copying the volumes of a VirtualMachineSnapshotContent
that lie on this node, and removing the copies when the content goes.

The snapshot controller (:mod:`virtshift.controller.snapshot`) labels a content with the node
holding its claims' volumes (``virtshift.io/snapshot-node``). The agent of that node watches its
contents and, for each one not yet ready, copies every volume backup's ``disk.img`` to
``<storage root>/snapshots/<content uid>/<volume name>.img`` (the directory is written into the
content's ``virtshift.io/snapshot-dir`` annotation first), then writes the content's status:
``volumeSnapshotStatus`` per volume, ``creationTime`` and ``readyToUse``. A failure is written
as ``status.error`` and retried (2 s doubling to 30 s) until the snapshot's deadline ends it.
Everything is keyed by the content, so an agent restart simply starts an unfinished copy over.

* Offline (no VMI of the VM on this node): a sparse-aware copy (reflink when the filesystem can,
  else ``copy_file_range`` over the data extents found with ``SEEK_DATA``/``SEEK_HOLE``).
* Online: QEMU makes a point-in-time copy while the guest keeps running. When the guest agent
  answers, the guest's filesystems are frozen first (``guest-fsfreeze-freeze``) and thawed as soon
  as the copy's point in time is fixed. The VM is paused only for the instant in which the
  volumes' data extents are read and the ``blockdev-backup`` jobs start (one QMP ``transaction``
  for all volumes: one point in time); the jobs then copy in the background (copy-before-write
  keeps the point in time). The ranges that were holes at that instant are punched out of the
  copy afterwards, so the copy is as sparse as the volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from virtshift.agent.disks import DiskError, confined
from virtshift.aio import stop_tasks
from virtshift.api.cdi import pv_node
from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.client.informer import Reflector
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound, VirtshiftError
from virtshift.launcher.common import LauncherError
from virtshift.launcher.guestagent import GuestAgent, GuestAgentError
from virtshift.launcher.qmp import QmpSession
from virtshift.storage.sparse import Extents, copy_extents, data_extents, reflink

if TYPE_CHECKING:
    from virtshift.agent.vmis import Domain, VMISync

log = logging.getLogger(__name__)

# The names :mod:`virtshift.controller.snapshot` shares with the agent (agents do not import
# controller modules; a unit test keeps the two in step).
LABEL_NODE = "virtshift.io/snapshot-node"
ANN_DIR = "virtshift.io/snapshot-dir"
ANN_STATS = "virtshift.io/snapshot-stats"

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
CHUNK = 1 << 30
RETRY_FIRST, RETRY_MAX = 2.0, 30.0
JOB_POLL = 0.05
FREEZE_TIMEOUT = 10.0

Key = tuple[str, str]


class SnapshotError(VirtshiftError):
    pass


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- sparse files ----------------------------------------------------------------------------


def holes(extents: Extents, size: int) -> Extents:
    out: Extents = []
    pos = 0
    for start, end in extents:
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return out


_libc: Any = None


def punch_holes(fd: int, ranges: Extents) -> None:
    """Deallocate ``ranges`` of the file (they read as zeros afterwards)."""
    global _libc
    if not ranges:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    for start, end in ranges:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start,
                           end - start) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                return  # the copy stays correct, only less sparse
            raise OSError(err, os.strerror(err))


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` (replaced); returns the bytes of data copied (0 for a reflink)."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        if reflink(fin.fileno(), fout.fileno()):
            return 0
        size = os.fstat(fin.fileno()).st_size
        copied = copy_extents(fin.fileno(), fout.fileno(), data_extents(fin.fileno(), size),
                              CHUNK)
        os.ftruncate(fout.fileno(), size)
        os.fsync(fout.fileno())
        return copied


def finish_copy(part: Path, final: Path) -> None:
    part.replace(final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


# ---- the agent part --------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    name: str  # the VM's volume name
    snapshot_name: str  # volumeSnapshotName
    source: Path  # the volume's disk.img


@dataclass
class CopyStats:
    online: bool = False
    frozen: bool = False
    paused_ms: float = 0.0
    frozen_ms: float = 0.0
    seconds: float = 0.0
    bytes: int = 0

    def to_json(self) -> str:
        return json.dumps({"online": self.online, "frozen": self.frozen,
                           "pausedMs": round(self.paused_ms, 2),
                           "frozenMs": round(self.frozen_ms, 2),
                           "seconds": round(self.seconds, 3), "bytes": self.bytes},
                          sort_keys=True)


class SnapshotAgent:
    """Copies this node's snapshot volumes; ``vmis`` (the agent's VMI sync) gives access to the
    QEMU of a running VM for online snapshots."""

    def __init__(self, client: Client, *, node_name: str, storage_root: Path,
                 vmis: VMISync | None = None) -> None:
        self.client = client
        self.node = node_name
        self.storage_root = storage_root
        self.vmis = vmis
        self.kind: KindInfo = REGISTRY.require("snapshot.kubevirt.io", "v1beta1",
                                               "VirtualMachineSnapshotContent")
        self.pvc_kind = REGISTRY.require("", "v1", "PersistentVolumeClaim")
        self.pv_kind = REGISTRY.require("", "v1", "PersistentVolume")
        self.contents: dict[Key, Obj] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self._retry: dict[Key, float] = {}
        self._synced = asyncio.Event()

    @property
    def snapshots_dir(self) -> Path:
        return self.storage_root / "snapshots"

    def content_dir(self, content: Mapping[str, Any]) -> Path:
        return self.snapshots_dir / str(_dict(content.get("metadata")).get("uid"))

    async def run(self) -> None:
        reflector = Reflector(self.client, self.kind, self._on_event,
                              lambda _k: self._synced.set(),
                              label_selector=f"{LABEL_NODE}={self.node}")
        task = asyncio.create_task(reflector.run(), name="agent-snapshot-reflector")
        synced = asyncio.create_task(self._synced.wait())
        try:
            await asyncio.wait([task, synced], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
            await self.remove_orphans()
            for key in list(self.contents):
                self._kick(key)
            await task
        finally:
            await stop_tasks([task, synced, *self._tasks.values(), *self._cleanups])

    def _on_event(self, event: str, _kind: KindInfo, obj: Obj) -> None:
        meta = _dict(obj.get("metadata"))
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if event == "DELETED":
            self.contents.pop(key, None)
            self._retry.pop(key, None)
            task = self._tasks.pop(key, None)
            cleanup = asyncio.create_task(self._remove(obj, task), name=f"snapshot-rm:{key}")
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            return
        held = self.contents.get(key)
        if held is not None and _dict(held.get("metadata")).get("uid") != meta.get("uid"):
            old = self._tasks.pop(key, None)
            if old is not None:
                old.cancel()
        self.contents[key] = obj
        if self._synced.is_set():
            self._kick(key)

    async def _remove(self, content: Obj, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            await stop_tasks([task])
        directory = self.content_dir(content)
        await asyncio.to_thread(shutil.rmtree, directory, True)
        log.info("removed snapshot copies %s", directory)

    async def remove_orphans(self) -> list[Path]:
        """Delete the copies of contents that no longer exist (deleted while the agent was
        away)."""
        alive = {str(_dict(c.get("metadata")).get("uid")) for c in self.contents.values()}

        def sweep() -> list[Path]:
            if not self.snapshots_dir.is_dir():
                return []
            gone = [d for d in self.snapshots_dir.iterdir() if d.name not in alive]
            for d in gone:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(
                    missing_ok=True)
            return gone

        gone = await asyncio.to_thread(sweep)
        for d in gone:
            log.info("removed snapshot copies %s: their content was deleted", d)
        return gone

    @staticmethod
    def needs_copy(content: Mapping[str, Any]) -> bool:
        meta = _dict(content.get("metadata"))
        status = _dict(content.get("status"))
        return (not meta.get("deletionTimestamp") and not status.get("creationTime")
                and status.get("readyToUse") is not True
                and bool(_dict(content.get("spec")).get("volumeBackups")))

    def _kick(self, key: Key) -> None:
        content = self.contents.get(key)
        if content is None or not self.needs_copy(content):
            return
        task = self._tasks.get(key)
        if task is not None and not task.done():
            return
        self._tasks[key] = asyncio.create_task(self._work(key), name=f"snapshot:{key[1]}")

    async def _work(self, key: Key) -> None:
        delay = self._retry.get(key, RETRY_FIRST)
        content = self.contents.get(key)
        if content is None or not self.needs_copy(content):
            return
        try:
            await self.take(content)
            self._retry.pop(key, None)
        except (SnapshotError, DiskError, LauncherError, GuestAgentError, ApiError,
                aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("snapshot content %s/%s: %s; retrying in %.0fs", key[0], key[1], e,
                        delay)
            with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, TimeoutError):
                await self.client.patch(self.kind, key[0], key[1], {"status": {
                    "readyToUse": False, "error": {"time": _now(), "message": str(e)}}},
                    subresource="status")
            self._retry[key] = min(delay * 2, RETRY_MAX)
            await asyncio.sleep(delay)
            self._tasks.pop(key, None)
            self._kick(key)

    async def _volumes(self, content: Obj) -> list[Volume]:
        ns = str(_dict(content.get("metadata")).get("namespace") or "default")
        out = []
        for backup in _dict(content.get("spec")).get("volumeBackups") or []:
            backup = _dict(backup)
            claim = str(_dict(_dict(backup.get("persistentVolumeClaim")).get(
                "metadata")).get("name") or "")
            try:
                pvc = await self.client.get(self.pvc_kind, ns, claim)
                pv = await self.client.get(self.pv_kind, None, str(
                    _dict(pvc.get("spec")).get("volumeName") or ""))
            except NotFound as e:
                raise SnapshotError(f"volume {backup.get('volumeName')}: claim {ns}/{claim} "
                                    "or its volume no longer exists") from e
            if pv_node(pv) != self.node:
                raise SnapshotError(f"volume {backup.get('volumeName')}: claim {ns}/{claim} is "
                                    f"on node {pv_node(pv) or '?'}, not on {self.node}")
            path = str(_dict(_dict(pv.get("spec")).get("hostPath")).get("path") or "")
            directory = confined(path, (self.storage_root,))
            out.append(Volume(str(backup.get("volumeName")),
                              str(backup.get("volumeSnapshotName") or ""),
                              directory / "disk.img"))
        return out

    async def take(self, content: Obj) -> CopyStats:
        """Copy the content's volumes and mark it ready."""
        meta = _dict(content.get("metadata"))
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        directory = self.content_dir(content)
        annotations = _dict(meta.get("annotations"))
        if annotations.get(ANN_DIR) != str(directory):
            await self.client.patch(self.kind, ns, name, {"metadata": {"annotations": {
                ANN_DIR: str(directory)}}})
        volumes = await self._volumes(content)
        for v in volumes:
            if not await asyncio.to_thread(v.source.is_file):
                raise SnapshotError(f"volume {v.name}: {v.source} does not exist (the volume "
                                    "was never attached to a VM)")
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        vm_meta = _dict(_dict(_dict(_dict(content.get("spec")).get("source")).get(
            "virtualMachine")).get("metadata"))
        vm_name = str(vm_meta.get("name") or "")
        dom = None
        if self.vmis is not None and vm_name:
            with contextlib.suppress(NotFound):
                dom = self.vmis.domain_of(ns, vm_name)
        started = time.monotonic()
        if dom is not None:
            stats = await self.online_copy(dom, volumes, directory)
        else:
            stats = CopyStats()
            for v in volumes:
                part = directory / f"{v.name}.img.part"
                await asyncio.to_thread(sparse_copy, v.source, part)
                await asyncio.to_thread(finish_copy, part, directory / f"{v.name}.img")
        stats.seconds = time.monotonic() - started
        stats.bytes = sum([await asyncio.to_thread(allocated_bytes, directory / f"{v.name}.img")
                           for v in volumes])
        now = _now()
        await self.client.patch(self.kind, ns, name, {"metadata": {"annotations": {
            ANN_STATS: stats.to_json()}}})
        await self.client.patch(self.kind, ns, name, {"status": {
            "creationTime": now, "readyToUse": True, "error": None,
            "volumeSnapshotStatus": [{"volumeSnapshotName": v.snapshot_name,
                                      "creationTime": now, "readyToUse": True}
                                     for v in volumes]}}, subresource="status")
        how = (f"online (guest paused {stats.paused_ms:.1f} ms, filesystems frozen "
               f"{stats.frozen_ms:.0f} ms)" if stats.frozen else
               f"online (guest paused {stats.paused_ms:.1f} ms, no guest agent)"
               if stats.online else "offline")
        log.info("snapshot content %s/%s: %d volume(s) copied %s in %.2fs, %d bytes", ns, name,
                 len(volumes), how, stats.seconds, stats.bytes)
        return stats

    async def online_copy(self, dom: Domain, volumes: Sequence[Volume],
                          directory: Path) -> CopyStats:
        """A point-in-time copy by the running QEMU (see the module docstring)."""
        if dom.sup is None:
            raise SnapshotError(f"the QEMU of {dom.key[0]}/{dom.key[1]} is not supervised")
        qmp = dom.sup.qmp
        stats = CopyStats(online=True)
        by_path = await asyncio.to_thread(
            lambda: {os.path.realpath(d.path): str(d.node_name) for d in dom.conversion.disks})
        sources = await asyncio.to_thread(lambda: [os.path.realpath(v.source) for v in volumes])
        jobs: list[tuple[Volume, str, str, Path]] = []
        for i, v in enumerate(volumes):
            node = by_path.get(sources[i])
            if node is None:
                raise SnapshotError(f"volume {v.name}: {v.source} is not a disk of the running "
                                    "VM")
            tag = f"vs{i}-{directory.name[:8]}"
            jobs.append((v, node, tag, directory / f"{v.name}.img.part"))
        await self._drop_jobs(qmp, [tag for _, _, tag, _ in jobs])
        for v, _node, _tag, part in jobs:
            size = await asyncio.to_thread(_size_of, v.source)
            await asyncio.to_thread(_sparse_target, part, size)
        tags = [tag for _, _, tag, _ in jobs]
        try:
            for _v, _node, tag, part in jobs:
                await qmp.execute("blockdev-add", {
                    "driver": "raw", "node-name": tag,
                    "file": {"driver": "file", "filename": str(part)}})
            extents = await self._start_backup(dom, jobs, stats)
            await self._wait_jobs(qmp, tags)
        finally:  # also when cancelled (the content was deleted): QEMU lets go of the files
            await self._drop_jobs(qmp, tags)
        for v, _node, tag, part in jobs:
            size = await asyncio.to_thread(_size_of, part)
            await asyncio.to_thread(_punch_file, part, holes(extents[tag], size))
            await asyncio.to_thread(finish_copy, part, directory / f"{v.name}.img")
        return stats

    @staticmethod
    async def _start_backup(dom: Domain, jobs: Sequence[tuple[Volume, str, str, Path]],
                            stats: CopyStats) -> dict[str, Extents]:
        """Freeze (when the guest agent answers), pause, read the data extents, start the
        backup jobs in one transaction, resume, thaw. Returns each job's data extents."""
        sup = dom.sup
        assert sup is not None
        qmp = sup.qmp
        agent = GuestAgent(dom.run.ga_socket)
        frozen_at = 0.0
        extents: dict[str, Extents] = {}
        try:
            if await sup.guest_agent_ping(timeout_s=1.0) is not None:
                await agent.execute("guest-fsfreeze-freeze", timeout_s=FREEZE_TIMEOUT)
                stats.frozen = True
                frozen_at = time.monotonic()
            was_running = (await qmp.execute("query-status")).get("status") == "running"
            paused_at = time.monotonic()
            if was_running:
                await qmp.execute("stop")
            try:
                for v, _node, tag, _part in jobs:
                    extents[tag] = await asyncio.to_thread(_extents_of, v.source)
                await qmp.execute("transaction", {"actions": [
                    {"type": "blockdev-backup", "data": {
                        "job-id": tag, "device": node, "target": tag, "sync": "full",
                        "auto-dismiss": False}}
                    for _v, node, tag, _part in jobs]})
            finally:
                if was_running:
                    await qmp.execute("cont")
                stats.paused_ms = (time.monotonic() - paused_at) * 1000
        finally:
            if stats.frozen:
                await _thaw(agent)
                stats.frozen_ms = (time.monotonic() - frozen_at) * 1000
        return extents

    @staticmethod
    async def _wait_jobs(qmp: QmpSession, tags: Sequence[str]) -> None:
        wanted = set(tags)
        while True:
            jobs = {j["id"]: j for j in await qmp.execute("query-jobs") if j["id"] in wanted}
            missing = wanted - set(jobs)
            if missing:
                raise SnapshotError(f"backup job(s) {', '.join(sorted(missing))} vanished")
            failed = [f"{j['id']}: {j['error']}" for j in jobs.values() if j.get("error")]
            if failed:
                raise SnapshotError(f"backup failed: {'; '.join(failed)}")
            if all(j["status"] == "concluded" for j in jobs.values()):
                return
            await asyncio.sleep(JOB_POLL)

    @staticmethod
    async def _drop_jobs(qmp: QmpSession, tags: Sequence[str]) -> None:
        """Dismiss our jobs and remove our target nodes (left over from an earlier attempt, or
        done)."""
        wanted = set(tags)
        for job in await qmp.execute("query-jobs"):
            if job["id"] not in wanted:
                continue
            if job["status"] not in ("concluded", "null"):
                with contextlib.suppress(LauncherError):
                    await qmp.execute("job-cancel", {"id": job["id"]})
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    states = {j["id"]: j["status"] for j in await qmp.execute("query-jobs")}
                    if states.get(job["id"]) in (None, "concluded", "null"):
                        break
                    await asyncio.sleep(JOB_POLL)
            with contextlib.suppress(LauncherError):
                await qmp.execute("job-dismiss", {"id": job["id"]})
        names = {n.get("node-name") for n in await qmp.execute("query-named-block-nodes")}
        for tag in tags:
            if tag in names:
                await qmp.execute("blockdev-del", {"node-name": tag})


async def _thaw(agent: GuestAgent) -> None:
    """Thaw the guest's filesystems; tried three times, as a guest left frozen hangs."""
    for attempt in range(3):
        try:
            await agent.execute("guest-fsfreeze-thaw", timeout_s=FREEZE_TIMEOUT)
            return
        except GuestAgentError as e:
            if attempt == 2:
                raise
            log.warning("guest-fsfreeze-thaw failed (%s); trying again", e)
            await asyncio.sleep(0.5)


def _size_of(path: Path) -> int:
    return path.stat().st_size


def _sparse_target(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def _extents_of(path: Path) -> Extents:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _punch_file(path: Path, ranges: Extents) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        punch_holes(fd, ranges)
        os.fsync(fd)
    finally:
        os.close(fd)
