"""The node agent's VMI loop (virt-handler's core): start, watch, stop and report the QEMU of every
VMI scheduled to this node.

- A reflector watches the VMIs labelled ``kubevirt.io/nodeName=<node>``. Each VMI key is
  reconciled by at most one task at a time; a change arriving meanwhile reruns it.
- Start (phase ``Scheduled``): the agent's finalizer is added first (so a deletion waits for
  QEMU to stop), disks are prepared, the pure converter makes the argv, the supervisor starts QEMU
  detached, and the VMI becomes ``Running``. A failure to prepare (an image the store does not
  hold) sets ``Synchronized`` False with the reason (``ErrImagePull``) and is retried with
  backoff; a spec that cannot run here fails the VMI.
- While it runs, a monitor polls QEMU's run state and the guest agent (AgentConnected,
  guestOSInfo, interface addresses) and re-reports when something changed.
- Stop: a VMI being deleted gets an ACPI power-down, then SIGKILL after its grace period. When
  QEMU ends (by our hand, from inside the guest, or by a crash) the VMI becomes ``Succeeded`` or
  ``Failed`` with the reason, and the finalizer is removed.
- Agent restart: each run directory records its VMI; the agent re-attaches to the QEMU by its QMP
  socket (same pid), or reports how it ended while nobody watched. QEMUs whose VMI is gone are
  killed and their run directories removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import shutil
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from virtshift.agent import loopdev
from virtshift.agent.disks import DiskError, DiskPreparer
from virtshift.agent.migration import (
    MigrationSource,
    MigrationTarget,
    mirrored_disks,
)
from virtshift.agent.status import (
    FINAL_PHASES,
    NODE_AGENT_FINALIZER,
    Observed,
    final_status,
    rfc3339,
    running_status,
    sync_failure_status,
)
from virtshift.aio import stop_tasks
from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.api.migration import (
    MIGRATION_TARGET_LABEL,
    PORT_MIGRATION,
    PORT_NBD,
    MigrationConfig,
    migration_state,
)
from virtshift.client.informer import Reflector
from virtshift.client.rest import Client
from virtshift.errors import ApiError, Conflict, NotFound
from virtshift.launcher.common import LauncherError, RunDir
from virtshift.launcher.context import (
    Conversion,
    DiskInfo,
    InterfaceInfo,
    LaunchContext,
    PortForward,
    UserNetwork,
)
from virtshift.launcher.converter import convert
from virtshift.launcher.migration import OutgoingMigration
from virtshift.launcher.qmp import QmpError
from virtshift.launcher.supervisor import ExitInfo, ExitKind, Supervisor

log = logging.getLogger(__name__)

Key = tuple[str, str]
NODE_NAME_LABEL = "kubevirt.io/nodeName"
DEFAULT_GRACE = 30
MONITOR_FAST = 1.0
MONITOR_SLOW = 10.0
RETRY_MAX = 60.0
DOMAIN_FILE = "domain.json"
TRANSIENT = (ApiError, aiohttp.ClientError, OSError, TimeoutError)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = _dict(obj.get("metadata"))
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Obj:
    """A JSON merge patch turning status ``old`` into ``new`` (top-level keys)."""
    patch: Obj = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def conversion_from_json(data: Mapping[str, Any]) -> Conversion:
    d = dict(data)
    d["argv"] = tuple(d["argv"])
    d["disks"] = tuple(DiskInfo(**x) for x in d["disks"])
    d["interfaces"] = tuple(InterfaceInfo(**x) for x in d["interfaces"])
    d["warnings"] = tuple(d["warnings"])
    return Conversion(**d)


@dataclass
class Domain:
    """One VMI's QEMU on this node (running, or ended and not yet reported)."""

    key: Key
    uid: str
    run: RunDir
    conversion: Conversion
    accel: str
    sup: Supervisor | None = None
    exit: ExitInfo | None = None
    observed: Observed = field(default_factory=Observed)
    forwards: dict[int, int] = field(default_factory=dict)  # guest TCP port -> host port
    netdev: str = "net0"
    stopping: asyncio.Task[ExitInfo] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    role: str = "owner"
    """``owner``: this node runs the VMI; ``target``: an incoming migration waits here."""
    migration_uid: str = ""
    """The migration this target domain belongs to."""
    exports: tuple[str, ...] = ()
    incoming_done: bool = False
    outgoing: OutgoingMigration | None = None
    migrating: asyncio.Task[None] | None = None
    migrated_uid: str = ""
    tried: set[str] = field(default_factory=set)
    """The migration that moved this VMI away (the QEMU here is paused for good)."""

    def save(self) -> None:
        data = {"namespace": self.key[0], "name": self.key[1], "uid": self.uid,
                "accel": self.accel, "conversion": asdict(self.conversion),
                "forwards": {str(k): v for k, v in self.forwards.items()},
                "netdev": self.netdev, "role": self.role, "migrationUid": self.migration_uid,
                "exports": list(self.exports)}
        tmp = self.run.path / (DOMAIN_FILE + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.run.path / DOMAIN_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> Domain | None:
        try:
            data = json.loads((run_dir / DOMAIN_FILE).read_text())
            return cls(key=(data["namespace"], data["name"]), uid=data["uid"],
                       run=RunDir.of(run_dir), accel=data.get("accel", "tcg"),
                       conversion=conversion_from_json(data["conversion"]),
                       forwards={int(k): int(v) for k, v in data.get("forwards", {}).items()},
                       netdev=data.get("netdev", "net0"), role=data.get("role", "owner"),
                       migration_uid=data.get("migrationUid", ""),
                       exports=tuple(data.get("exports", ())))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring run directory %s: %s", run_dir, e)
            return None


class VMISync:
    def __init__(self, client: Client, *, node: str, address: str, data_dir: Path, accel: str,
                 preparer: DiskPreparer) -> None:
        self.client = client
        self.node = node
        self.address = address
        self.accel = accel
        self.preparer = preparer
        self.vms_dir = data_dir / "vms"
        self.vmi_kind: KindInfo = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance")
        self.vmis: dict[Key, Obj] = {}
        self.targets: dict[Key, Obj] = {}  # VMIs migrating to this node
        self.source = MigrationSource(client, self.vmi_kind)
        self.domains: dict[Key, Domain] = {}
        self._workers: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[Key] = set()
        self._retry: dict[Key, float] = {}  # API/connection errors of a reconcile
        self._prepare_backoff: dict[Key, float] = {}  # disks that could not be prepared
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._synced = asyncio.Event()
        self.recovered = asyncio.Event()
        """Set once the QEMUs found on disk at start are attached again (endpoints wait)."""
        self._owned_synced = asyncio.Event()
        self._targets_synced = asyncio.Event()

    # ---- process ------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.recover()
        owned = Reflector(self.client, self.vmi_kind, self._on_event,
                          lambda _k: self._owned_synced.set(),
                          label_selector=f"{NODE_NAME_LABEL}={self.node}")
        incoming = Reflector(self.client, self.vmi_kind, self._on_target_event,
                             lambda _k: self._targets_synced.set(),
                             label_selector=f"{MIGRATION_TARGET_LABEL}={self.node}")
        tasks = [asyncio.create_task(owned.run(), name="agent-vmi-reflector"),
                 asyncio.create_task(incoming.run(), name="agent-vmi-target-reflector")]
        try:
            await self._owned_synced.wait()
            await self._targets_synced.wait()
            self._synced.set()
            # every listed VMI, and the QEMUs found on disk (orphans, VMIs that ended while
            # the agent was away)
            for key in {*self.vmis, *self.targets, *self.domains}:
                self.kick(key)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            await stop_tasks(tasks)
            await self.close()


    def _open_disk(self, image: Path) -> tuple[Supervisor, str] | None:
        """The supervisor of the running VM that has ``image`` open, and its block node."""
        real = image.resolve()
        devices = set(loopdev.attached(real)) if not str(real).startswith("/dev/") else set()
        for domain in self.domains.values():
            if domain.role != "owner" or domain.sup is None or domain.exit is not None:
                continue
            for disk in domain.conversion.disks:
                if disk.path and (Path(disk.path).resolve() == real or disk.path in devices):
                    return domain.sup, disk.node_name
        return None

    def devices_in_use(self) -> set[str]:
        """The block devices (``/dev/...``) that QEMUs of this node have open."""
        return {d.path for dom in self.domains.values() if dom.exit is None
                for d in dom.conversion.disks if d.path.startswith("/dev/")}

    async def resize_disk(self, image: Path, size: int) -> bool:
        """Grow ``image`` to ``size`` bytes through the QEMU that has it open (QMP
        ``block_resize``, so the guest sees the new size); False when no running VM uses it."""
        found = await asyncio.to_thread(self._open_disk, image)
        if found is None:
            return False
        sup, node_name = found
        await sup.qmp.execute("block_resize", {"node-name": node_name, "size": size})
        return True

    async def close(self) -> None:
        """Stop supervising (QEMUs keep running, as when the agent restarts)."""
        for t in self._timers.values():
            t.cancel()
        await stop_tasks(list(self._workers.values()))
        for dom in self.domains.values():
            await self._detach(dom)

    async def _detach(self, dom: Domain) -> None:
        await stop_tasks(dom.tasks)
        dom.tasks.clear()
        if dom.sup is not None:
            await dom.sup.detach()

    def _on_event(self, event: str, _kind: KindInfo, obj: Obj) -> None:
        key = key_of(obj)
        if event == "DELETED":
            self.vmis.pop(key, None)
        else:
            self.vmis[key] = obj
        self.kick(key)

    def _on_target_event(self, event: str, _kind: KindInfo, obj: Obj) -> None:
        key = key_of(obj)
        if event == "DELETED":
            self.targets.pop(key, None)
        else:
            self.targets[key] = obj
        self.kick(key)

    def _current(self, key: Key) -> Obj | None:
        """The newest copy of the VMI among both watches."""
        copies = [o for o in (self.vmis.get(key), self.targets.get(key)) if o is not None]
        if not copies:
            return None
        return max(copies, key=lambda o: int(_dict(o.get("metadata")).get(
            "resourceVersion") or 0))

    async def _refetch(self, key: Key) -> Obj | None:
        """A VMI that left both watches while this node holds its QEMU: during a migration's
        hand-over the labels change one at a time, so ask the API server before acting."""
        try:
            vmi = await self.client.get(self.vmi_kind, *key)
        except NotFound:
            return None
        labels = _dict(_dict(vmi.get("metadata")).get("labels"))
        if labels.get(NODE_NAME_LABEL) == self.node:
            self.vmis[key] = vmi
        elif labels.get(MIGRATION_TARGET_LABEL) == self.node:
            self.targets[key] = vmi
        else:
            return None
        return vmi

    def kick(self, key: Key) -> None:
        self._dirty.add(key)
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._worker(key), name=f"vmi:{key[1]}")

    def kick_after(self, key: Key, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self.kick, key)

    async def _worker(self, key: Key) -> None:
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                try:
                    await self.reconcile(key)
                    self._retry.pop(key, None)
                except TRANSIENT as e:
                    delay = min(self._retry.get(key, 0.25) * 2, RETRY_MAX)
                    self._retry[key] = delay
                    log.warning("VMI %s/%s: %s; retrying in %.1fs", key[0], key[1], e, delay)
                    self.kick_after(key, delay)
        finally:
            self._workers.pop(key, None)

    # ---- recovery -----------------------------------------------------------------------------

    async def recover(self) -> None:
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        for run_dir in sorted(self.vms_dir.iterdir()):
            dom = Domain.load(run_dir)
            if dom is None:
                continue
            try:
                dom.sup = await Supervisor.attach(run_dir)
            except LauncherError as e:
                log.warning("cannot attach to the QEMU in %s: %s", run_dir, e)
                dom.sup = None
            if dom.sup is None:
                dom.exit = Supervisor.last_exit(run_dir) or ExitInfo(
                    ExitKind.CRASHED, "QEMU was gone when the node agent restarted")
                log.info("VMI %s/%s: QEMU ended while the agent was away (%s)", *dom.key,
                         dom.exit.kind.value)
            else:
                log.info("VMI %s/%s: re-attached to QEMU pid %s%s", *dom.key, dom.sup.pid,
                         " (migration target)" if dom.role == "target" else "")
                self._watch(dom)
                if dom.role == "target":
                    MigrationTarget.resume(dom)
            self.domains[dom.key] = dom
        self.recovered.set()

    # ---- reconcile ----------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        if not self._synced.is_set():
            return  # every key is kicked again once the first list is in
        vmi = self._current(key)
        dom = self.domains.get(key)
        if vmi is None and dom is not None:
            vmi = await self._refetch(key)
        uid = str(_dict(vmi.get("metadata")).get("uid")) if vmi else ""
        if dom is not None and (vmi is None or dom.uid != uid):
            log.info("VMI %s/%s (uid %s) is gone from this node: stopping its QEMU", *key,
                     dom.uid)
            await self._discard(dom)
            dom = None
        if vmi is None:
            self._prepare_backoff.pop(key, None)
            return
        meta = _dict(vmi.get("metadata"))
        status = _dict(vmi.get("status"))
        phase = str(status.get("phase") or "")
        if dom is not None and dom.role == "target":
            if not await self._reconcile_target(vmi, dom):
                return
        elif dom is None and key not in self.vmis:
            if self._incoming_wanted(vmi):
                await self._start_target(vmi)
            return
        deleting = bool(meta.get("deletionTimestamp"))
        mine = NODE_AGENT_FINALIZER in (meta.get("finalizers") or [])
        if phase in FINAL_PHASES:
            if dom is not None:
                await self._discard(dom)
            if mine:
                await self._drop_finalizer(vmi)
            return
        if dom is None:
            if phase == "Scheduled" and status.get("nodeName") == self.node and not deleting:
                await self._start(vmi)
            elif phase == "Running" or (mine and (deleting or phase == "Scheduled")):
                # Its QEMU is not here (never started, or lost with its run directory).
                await self._report_final(vmi, None, failed_reason="QEMUNotFound")
            return
        if dom.exit is not None:
            await self._report_final(vmi, dom.exit)
            await self._discard(dom)
            return
        state = migration_state(vmi)
        moved = (state.get("sourceNode") == self.node and state.get("targetNode") != self.node
                 and state.get("completed") and not state.get("failed"))
        if dom.migrated_uid or moved or status.get("nodeName") != self.node:
            return  # moved away (or being handed over): the target node reports it now
        if deleting:
            if dom.stopping is None and dom.sup is not None:
                # virt-handler's rule: the VMI's own grace period (the stop subresource writes
                # a shorter one into it); a custom resource's deletionGracePeriodSeconds is
                # always 0 and says nothing.
                grace = _dict(vmi.get("spec")).get("terminationGracePeriodSeconds")
                grace = grace if isinstance(grace, int) and grace >= 0 else DEFAULT_GRACE
                log.info("VMI %s/%s is being deleted: shutting down (grace %ds)", *key, grace)
                dom.stopping = asyncio.create_task(dom.sup.shutdown(grace))
            return
        self._drive_outgoing(vmi, dom)
        if dom.migrating is not None:
            return  # QEMU's state flickers during a migration; report it afterwards
        new = running_status(vmi, dom.conversion, dom.observed, _now(), node=self.node)
        await self._patch_status(vmi, new)

    # ---- migration ----------------------------------------------------------------------------

    def _incoming_wanted(self, vmi: Obj) -> bool:
        state = migration_state(vmi)
        labels = _dict(_dict(vmi.get("metadata")).get("labels"))
        return (labels.get(MIGRATION_TARGET_LABEL) == self.node
                and state.get("targetNode") == self.node and bool(state.get("migrationUid"))
                and not state.get("targetNodeAddress") and not state.get("completed")
                and not state.get("failed") and not state.get("abortRequested")
                and not _dict(vmi.get("metadata")).get("deletionTimestamp")
                and _dict(vmi.get("status")).get("phase") == "Running")

    async def _reconcile_target(self, vmi: Obj, dom: Domain) -> bool:
        """A migration target domain; True once the VMI was handed over to this node (the
        caller then treats it as its own)."""
        state = migration_state(vmi)
        status = _dict(vmi.get("status"))
        if (status.get("nodeName") == self.node and state.get("migrationUid") == dom.migration_uid
                and state.get("completed") and not state.get("failed")):
            log.info("VMI %s/%s: handed over to this node", *dom.key)
            dom.role = "owner"
            dom.save()
            self._start_monitor(dom)
            return True
        labels = _dict(_dict(vmi.get("metadata")).get("labels"))
        gone = (labels.get(MIGRATION_TARGET_LABEL) != self.node
                or state.get("migrationUid") != dom.migration_uid or bool(state.get("failed"))
                or status.get("phase") in FINAL_PHASES)
        if gone or (dom.exit is not None and not dom.incoming_done):
            why = dom.exit.reason if dom.exit is not None else "the migration ended"
            log.info("VMI %s/%s: discarding the migration target (%s)", *dom.key, why)
            await self._discard(dom)
        return False

    async def _start_target(self, vmi: Obj) -> None:
        key = key_of(vmi)
        state = migration_state(vmi)
        launched = await self._launch(vmi, incoming=True)
        if launched is None:
            return
        dom = launched
        config = MigrationConfig.from_status(_dict(state.get("migrationConfiguration")))
        port = free_port(self.address)
        nbd_port = free_port(self.address) if dom.exports else None
        try:
            await MigrationTarget.receive(dom, address=self.address, port=port,
                                          nbd_port=nbd_port, exports=dom.exports, config=config)
        except (QmpError, LauncherError) as e:
            log.warning("VMI %s/%s: preparing the migration target failed: %s", *key, e)
            await self._discard(dom)
            return
        ports = {str(port): PORT_MIGRATION}
        if nbd_port is not None:
            ports[str(nbd_port)] = PORT_NBD
        log.info("VMI %s/%s: migration target ready on %s:%d", *key, self.address, port)
        await self.source.report(key, {
            "targetNodeAddress": self.address, "targetDirectMigrationNodePorts": ports,
            "targetNodeDomainDetected": True, "targetNodeDomainReadyTimestamp": rfc3339(_now()),
            "targetState": {"node": self.node, "migrationUID": dom.migration_uid,
                            "domainDetected": True}})

    def _drive_outgoing(self, vmi: Obj, dom: Domain) -> None:
        state = migration_state(vmi)
        uid = str(state.get("migrationUid") or "")
        if dom.outgoing is not None and state.get("abortRequested"):
            dom.outgoing.abort()
        if (dom.migrating is None and uid and uid not in dom.tried
                and state.get("sourceNode") == self.node and state.get("targetNodeAddress")
                and not state.get("completed") and not state.get("failed")
                and not state.get("abortRequested") and dom.sup is not None):
            dom.tried.add(uid)
            dom.migrating = asyncio.create_task(self._outgoing(vmi, dom),
                                                name=f"migrate:{dom.key[1]}")
            dom.tasks.append(dom.migrating)

    async def _outgoing(self, vmi: Obj, dom: Domain) -> None:
        try:
            await self.source.run(dom, vmi, self.node)
        finally:
            dom.migrating = None
            self.kick(dom.key)

    async def _report_final(self, vmi: Obj, exit_info: ExitInfo | None, *,
                            failed_reason: str = "") -> None:
        key = key_of(vmi)
        new = final_status(vmi, exit_info, _now(), failed_reason=failed_reason)
        log.info("VMI %s/%s: %s (%s)", *key, new["phase"], new.get("reason"))
        await self._patch_status(vmi, new)
        if NODE_AGENT_FINALIZER in (_dict(vmi.get("metadata")).get("finalizers") or []):
            await self._drop_finalizer(vmi)

    # ---- start --------------------------------------------------------------------------------

    def run_dir(self, uid: str) -> Path:
        path = self.vms_dir / uid
        if len(str(path / "serial.sock")) > 100:  # sun_path: keep socket paths short
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
            short = Path("/tmp") / f"virtshift-{digest}"
            path.mkdir(parents=True, exist_ok=True)
            if not short.is_symlink():
                short.unlink(missing_ok=True)
                short.symlink_to(path)
            return short
        return path

    async def _start(self, vmi: Obj) -> None:
        vmi = await self._add_finalizer(vmi)
        dom = await self._launch(vmi, incoming=False)
        if dom is not None:
            await self._patch_status(vmi, running_status(vmi, dom.conversion, dom.observed,
                                                         _now(), node=self.node))

    async def _launch_failed(self, vmi: Obj, reason: str, message: str, *, incoming: bool,
                             exit_info: ExitInfo | None = None) -> None:
        """Starting QEMU failed: a migration target reports it in the migration state (the
        source keeps the VM); a start fails the VMI."""
        key = key_of(vmi)
        if incoming:
            await self.source.report(key, {"completed": True, "failed": True,
                                           "failureReason": f"target node {self.node}: "
                                                            f"{message}",
                                           "endTimestamp": rfc3339(_now())})
            return
        await self._patch_status(vmi, sync_failure_status(vmi, reason, message, _now()))
        await self._report_final(self.vmis.get(key, vmi), exit_info,
                                 failed_reason="" if exit_info else reason)

    async def _launch(self, vmi: Obj, *, incoming: bool) -> Domain | None:
        """Prepare the disks and start QEMU (waiting for a migration stream if ``incoming``)."""
        key = key_of(vmi)
        uid = str(_dict(vmi["metadata"]).get("uid"))
        run = RunDir.of(self.run_dir(uid))
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            prepared = await self.preparer.prepare(vmi, run.path / "disks")
        except DiskError as e:
            if incoming:
                await self._launch_failed(vmi, e.reason, str(e), incoming=True)
                return None
            delay = min(self._prepare_backoff.get(key, 2.5) * 2, RETRY_MAX)
            self._prepare_backoff[key] = delay
            log.warning("VMI %s/%s: %s (%s); retrying in %.0fs", *key, e, e.reason, delay)
            await self._patch_status(vmi, sync_failure_status(vmi, e.reason, str(e), _now()))
            self.kick_after(key, delay)
            return None
        self._prepare_backoff.pop(key, None)
        forwards = self._forwards(vmi)
        pods = self._pod_interfaces(vmi)
        ctx = LaunchContext(
            run_dir=run.path, accel="kvm" if self.accel == "kvm" else "tcg",
            disks=prepared.disks, kernel_boot=prepared.kernel_boot, efi=prepared.efi,
            networks={name: UserNetwork(tuple(PortForward(self.address, host, guest)
                                              for guest, host in forwards.items()))
                      for _, name in pods},
            incoming="defer" if incoming else None)
        try:
            conv = convert(vmi, ctx)
        except LauncherError as e:
            log.warning("VMI %s/%s cannot run here: %s", *key, e)
            await self._launch_failed(vmi, "FailedCreate", str(e), incoming=incoming)
            return None
        dom = Domain(key, uid, run, conv, ctx.accel, forwards=forwards,
                     netdev=f"net{pods[0][0]}" if pods else "net0")
        dom.observed = Observed(paused=conv.start_paused, paused_reason="PausedStartStrategy",
                                software_emulation=ctx.accel == "tcg")
        argv = conv.argv
        if incoming:
            dom.role = "target"
            dom.migration_uid = str(migration_state(vmi).get("migrationUid") or "")
            dom.exports = tuple(d.node for d in mirrored_disks(vmi, conv))
            if dom.exports and "-S" not in argv:
                argv = (*argv, "-S")  # NBD writes need the guest's devices not yet running
        sup = Supervisor(run.path)
        try:
            pid = await sup.start(argv)
        except LauncherError as e:
            log.warning("VMI %s/%s: QEMU failed to start: %s", *key, e)
            await self._launch_failed(vmi, "FailedCreate", str(e), incoming=incoming,
                                      exit_info=ExitInfo(ExitKind.CRASHED,
                                                         f"QEMU failed to start: {e}"))
            return None
        dom.sup = sup
        dom.save()
        self.domains[key] = dom
        log.info("VMI %s/%s: QEMU started (pid %d, %s%s)", *key, pid, ctx.accel,
                 ", migration target" if incoming else "")
        self._watch(dom)
        return dom

    @staticmethod
    def _pod_interfaces(vmi: Obj) -> list[tuple[int, str]]:
        """(index, name) of the interfaces on the pod network; the converter names the
        QEMU netdev of interface ``i`` ``net{i}``."""
        spec = _dict(vmi.get("spec"))
        pods = {str(_dict(n).get("name")) for n in spec.get("networks") or []
                if "pod" in _dict(n)}
        ifaces = _dict(_dict(spec.get("domain")).get("devices")).get("interfaces") or []
        return [(i, str(_dict(iface).get("name"))) for i, iface in enumerate(ifaces)
                if str(_dict(iface).get("name")) in pods]

    def _forwards(self, vmi: Obj) -> dict[int, int]:
        """Host ports (on the node address) for the TCP ports the pod interfaces declare."""
        out: dict[int, int] = {}
        spec = _dict(vmi.get("spec"))
        for iface in _dict(_dict(spec.get("domain")).get("devices")).get("interfaces") or []:
            for port in _dict(iface).get("ports") or []:
                p = _dict(port)
                if str(p.get("protocol") or "TCP").upper() == "TCP" and isinstance(
                        p.get("port"), int) and p["port"] not in out:
                    out[p["port"]] = free_port(self.address)
        return out

    # ---- running ------------------------------------------------------------------------------

    def _watch(self, dom: Domain) -> None:
        dom.tasks.append(asyncio.create_task(self._wait_exit(dom), name=f"exit:{dom.key[1]}"))
        if dom.role != "target":
            self._start_monitor(dom)

    def _start_monitor(self, dom: Domain) -> None:
        """Poll QEMU and the guest agent. Never for an incoming migration: bytes written to the
        guest agent's channel of a QEMU that is still receiving reach guest memory through a
        virtio ring that is not set up yet, and corrupt the guest."""
        dom.tasks.append(asyncio.create_task(self._monitor(dom), name=f"mon:{dom.key[1]}"))

    async def _wait_exit(self, dom: Domain) -> None:
        assert dom.sup is not None
        dom.exit = await dom.sup.wait_exit()
        log.info("VMI %s/%s: QEMU ended: %s (%s)", *dom.key, dom.exit.kind.value,
                 dom.exit.reason)
        self.kick(dom.key)

    async def _monitor(self, dom: Domain) -> None:
        sup = dom.sup
        assert sup is not None
        while not sup.exited:
            before = dom.observed
            try:
                observed = await self.observe(dom)
            except (QmpError, LauncherError, OSError) as e:
                log.debug("monitoring %s: %s", dom.key, e)
                observed = dom.observed
            if dom.observed is not before:
                continue  # changed meanwhile (pause/unpause): this observation may be stale
            if observed != dom.observed:
                dom.observed = observed
                self.kick(dom.key)
            await asyncio.sleep(MONITOR_SLOW if observed.agent_connected else MONITOR_FAST)

    async def observe(self, dom: Domain) -> Observed:
        sup = dom.sup
        assert sup is not None
        state = await sup.status()
        paused = state in ("paused", "prelaunch", "suspended")
        reason = dom.observed.paused_reason if paused else "PausedByUser"
        info = await sup.guest_agent_ping(timeout_s=1.0)
        os_info = ifaces = None
        if info is not None:
            os_info = await sup.guest_osinfo()
            ifaces = await sup.guest_interfaces()
        return replace(dom.observed, paused=paused, paused_reason=reason,
                       agent_connected=info is not None, guest_os=os_info,
                       guest_interfaces=tuple(ifaces) if ifaces is not None else None)

    def domain_of(self, namespace: str, name: str) -> Domain:
        dom = self.domains.get((namespace, name))
        if dom is None or dom.sup is None or dom.exit is not None or dom.role == "target":
            raise NotFound(f'virtualmachineinstance "{name}" is not running on node '
                           f"{self.node}")
        return dom

    async def set_paused(self, dom: Domain, paused: bool) -> None:
        assert dom.sup is not None
        if paused:
            await dom.sup.pause()
        else:
            await dom.sup.unpause()
        dom.observed = replace(dom.observed, paused=paused, paused_reason="PausedByUser")
        self.kick(dom.key)

    async def forward(self, dom: Domain, guest_port: int) -> int:
        """A host port (on the node address) forwarded to ``guest_port`` of the guest."""
        if guest_port in dom.forwards:
            return dom.forwards[guest_port]
        assert dom.sup is not None
        host = free_port(self.address)
        guest_ip = next((i.guest_ip for i in dom.conversion.interfaces if i.guest_ip), None)
        if guest_ip is None:
            raise NotFound("the VMI has no pod network interface to forward ports to")
        out = await dom.sup.qmp.execute("human-monitor-command", {
            "command-line": f"hostfwd_add {dom.netdev} tcp:{self.address}:{host}-"
                            f"{guest_ip}:{guest_port}"})
        if isinstance(out, str) and out.strip():
            raise LauncherError(f"forwarding guest port {guest_port}: {out.strip()}")
        dom.forwards[guest_port] = host
        dom.save()
        return host

    # ---- API writes ---------------------------------------------------------------------------

    async def _patch_status(self, vmi: Obj, new: Obj) -> None:
        patch = status_patch(_dict(vmi.get("status")), new)
        if not patch:
            return
        ns, name = key_of(vmi)
        try:
            out = await self.client.patch(self.vmi_kind, ns, name, {"status": patch},
                                          subresource="status")
        except NotFound:
            return
        self._remember(out)

    def _remember(self, obj: Obj) -> None:
        key = key_of(obj)
        old = self.vmis.get(key)
        try:
            newer = old is None or int(obj["metadata"]["resourceVersion"]) >= int(
                old["metadata"]["resourceVersion"])
        except (KeyError, ValueError, TypeError):
            newer = True
        if newer and (old is None or old["metadata"].get("uid") == obj["metadata"].get("uid")):
            self.vmis[key] = obj

    async def _add_finalizer(self, vmi: Obj) -> Obj:
        meta = _dict(vmi["metadata"])
        fins = list(meta.get("finalizers") or [])
        if NODE_AGENT_FINALIZER in fins:
            return vmi
        ns, name = key_of(vmi)
        out = await self.client.patch(self.vmi_kind, ns, name, {"metadata": {
            "finalizers": [*fins, NODE_AGENT_FINALIZER],
            "resourceVersion": meta.get("resourceVersion")}})
        self._remember(out)
        return out

    async def _drop_finalizer(self, vmi: Obj) -> None:
        ns, name = key_of(vmi)
        for _ in range(8):
            meta = _dict(vmi["metadata"])
            fins = [f for f in meta.get("finalizers") or [] if f != NODE_AGENT_FINALIZER]
            try:
                out = await self.client.patch(self.vmi_kind, ns, name, {"metadata": {
                    "finalizers": fins, "resourceVersion": meta.get("resourceVersion")}})
                self._remember(out)
                return
            except NotFound:
                return
            except Conflict:
                vmi = await self.client.get(self.vmi_kind, ns, name)
                if NODE_AGENT_FINALIZER not in (vmi["metadata"].get("finalizers") or []):
                    return
        raise Conflict(f"removing the node agent's finalizer from {ns}/{name} kept conflicting")

    async def _discard(self, dom: Domain) -> None:
        """Kill the QEMU (if it still runs) and remove its run directory."""
        if dom.sup is not None and not dom.sup.exited:
            with contextlib.suppress(LauncherError, QmpError):
                await dom.sup.kill()
        await self._detach(dom)
        self.domains.pop(dom.key, None)
        target = dom.run.path.resolve()
        if dom.run.path.is_symlink():
            dom.run.path.unlink(missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, target, True)

