"""The node agent process: ``virtshift agent`` (one per node; ``virtshift up`` starts them)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from virtshift.agent.disks import DiskPreparer
from virtshift.agent.endpoints import AgentEndpoints
from virtshift.agent.node import NodeFacts, node_object, node_status, rfc3339
from virtshift.agent.populate import Populator
from virtshift.agent.snapshot import SnapshotAgent
from virtshift.agent.vmis import VMISync
from virtshift.aio import stop_on_signals, stop_tasks
from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.envsettings import positive_seconds
from virtshift.errors import AlreadyExists, ApiError, VirtshiftError
from virtshift.storage.imagecache import ImageCache

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_ENV = "VIRTSHIFT_NODE_HEARTBEAT_SECONDS"


def heartbeat_seconds(env: Mapping[str, str]) -> float:
    """The heartbeat interval: ``VIRTSHIFT_NODE_HEARTBEAT_SECONDS`` (a positive number of
    seconds), else :data:`HEARTBEAT_SECONDS`. The controller checks that its node monitor grace
    period exceeds it."""
    return positive_seconds(env, HEARTBEAT_ENV, HEARTBEAT_SECONDS, AgentError)


class AgentError(VirtshiftError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    kubeconfig: Path
    data_dir: Path
    address: str = "127.0.0.1"
    accel: str = "auto"
    proxy_token_file: Path | None = None
    hostdisk_dirs: tuple[Path, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None


def detect_accel(requested: str) -> str:
    """``kvm`` when asked and usable, ``tcg`` otherwise; ``auto`` picks KVM only where it is
    known to run guests (``VIRTSHIFT_KVM_WORKS=1``: this project's reference machines expose a
    paravirtual /dev/kvm on which stock kernels hang, so presence alone is not enough)."""
    if requested == "tcg":
        return "tcg"
    kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if requested == "kvm":
        if not kvm_usable:
            raise AgentError("--accel kvm: /dev/kvm is not usable on this node")
        return "kvm"
    if kvm_usable and os.environ.get("VIRTSHIFT_KVM_WORKS") == "1":
        return "kvm"
    return "tcg"


def qemu_version() -> str:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        return "missing"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    first = out.stdout.split("\n", 1)[0]
    return first.rsplit("version", 1)[-1].split()[0] if "version" in first else "unknown"


def storage_free(data_dir: Path) -> int:
    """Bytes available to volumes on the filesystem of the node's storage root (-1: unknown)."""
    try:
        st = os.statvfs(data_dir)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.client = Client(kubeconfig.load(config.kubeconfig),
                             user_agent=f"virtshift-agent/{config.node_name}")
        self.node_kind: KindInfo = REGISTRY.require("", "v1", "Node")
        self.accel = detect_accel(config.accel)
        self.qemu_version = qemu_version()
        self.heartbeat_seconds = heartbeat_seconds(os.environ)
        self.ready_since: str | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        cache = ImageCache(config.data_dir / "images", self.client)
        preparer = DiskPreparer(self.client, cache,
                                config.hostdisk_dirs or (config.data_dir / "hostdisks",),
                                storage_root=config.data_dir / "storage",
                                node_name=config.node_name)
        self.preparer = preparer
        self.vmis = VMISync(self.client, node=config.node_name, address=config.address,
                            data_dir=config.data_dir, accel=self.accel, preparer=preparer)
        self.snapshots = SnapshotAgent(self.client, node_name=config.node_name,
                                       storage_root=config.data_dir / "storage", vmis=self.vmis)
        token = (config.proxy_token_file.read_text().strip()
                 if config.proxy_token_file is not None else "")
        self.populator = Populator(self.client, node_name=config.node_name,
                                   storage_root=config.data_dir / "storage",
                                   work_dir=config.data_dir / "populate",
                                   online_resize=self.vmis.resize_disk,
                                   proxy_token=token)
        self.http = web.Application()
        self.http["endpoints"] = endpoints = AgentEndpoints(self.vmis, token)
        endpoints.routes(self.http)

    def facts(self) -> NodeFacts:
        return NodeFacts(
            name=self.config.node_name,
            address=self.config.address,
            port=self.port,
            cpus=os.cpu_count() or 1,
            memory_ki=NodeFacts.memory_total_ki(),
            accel=self.accel,
            qemu_version=self.qemu_version,
            storage_root=str(self.config.data_dir / "storage"),
            storage_free=storage_free(self.config.data_dir),
        )

    async def register(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        facts = self.facts()
        with contextlib.suppress(AlreadyExists):
            await self.client.create(self.node_kind, None, node_object(facts, now))
        self.ready_since = rfc3339(now)
        await self.heartbeat(facts)

    async def heartbeat(self, facts: NodeFacts | None = None) -> None:
        facts = facts or self.facts()
        now = datetime.datetime.now(datetime.UTC)
        obj = node_object(facts, now)
        await self.client.patch(self.node_kind, None, facts.name,
                                {"metadata": {"labels": obj["metadata"]["labels"],
                                              "annotations": obj["metadata"]["annotations"]}})
        await self.client.patch(self.node_kind, None, facts.name,
                                {"status": node_status(facts, now,
                                                       ready_since=self.ready_since)},
                                subresource="status")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.heartbeat(self.facts())
                for gone in await self.preparer.remove_orphans():
                    log.info("removed %s: its persistent volume was deleted", gone)
                for device in await asyncio.to_thread(self.preparer.loops.release,
                                                      self.preparer.volume_dirs,
                                                      self.vmis.devices_in_use()):
                    log.info("detached %s: no VM uses it", device)
            except (ApiError, OSError, VirtshiftError) as e:
                log.warning("heartbeat failed: %s", e)

    async def run(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        runner = web.AppRunner(self.http, access_log=None, handle_signals=False)
        await runner.setup()
        tls = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(runner, self.config.address, 0, ssl_context=tls)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else 0
        stop = stop_on_signals()
        try:
            await self.register()
            log.info("node %s registered (accel %s, endpoint %s:%d)", self.config.node_name,
                     self.accel, self.config.address, self.port)
            self._tasks.append(asyncio.create_task(self._heartbeats(), name="heartbeats"))
            self._tasks.append(asyncio.create_task(self.vmis.run(), name="vmis"))
            self._tasks.append(asyncio.create_task(self.snapshots.run(), name="snapshots"))
            self._tasks.append(asyncio.create_task(self.populator.run(), name="populator"))
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *self._tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception() is not None:
                    raise AgentError(f"{t.get_name()} failed: {t.exception()}")
        finally:
            await stop_tasks(self._tasks)
            await self.client.close()
            await runner.cleanup()

