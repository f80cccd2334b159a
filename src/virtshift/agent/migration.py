"""The node agent's share of a live migration (virt-handler's migration source and target roles).

The protocol is in :mod:`virtshift.api.migration`. Here:

- :func:`mirrored_disks` (pure) decides which block nodes must be copied: writable disks that
  live on this node (containerDisk overlays copy only their top layer, since every node holds the
  same base image; emptyDisks and the UEFI variable store copy in full). Shared hostDisks are not
  copied; read-only media (cloud-init, ConfigMaps) are rebuilt by the target.
- :class:`MigrationTarget` starts the incoming QEMU for a VMI labelled with this node as its
  migration target, reports the address and ports, and resumes the guest when the stream has
  completed. It never reports the VMI's phase: until the controller hands the VMI over, the
  source owns it.
- :class:`MigrationSource` runs the outgoing migration of a VMI whose ``migrationState`` names
  this node as the source once the target is ready, publishes progress on the migration object,
  honours ``abortRequested`` and reports the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.api.migration import (
    PORT_MIGRATION,
    PORT_NBD,
    PROGRESS_ANNOTATION,
    VMI_NAME_LABEL,
    MigrationConfig,
    migration_state,
)
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound
from virtshift.launcher.context import Conversion
from virtshift.launcher.migration import (
    MigrationFailed,
    MirroredDisk,
    OutgoingMigration,
    Progress,
    finish_incoming,
    incoming_status,
    prepare_incoming,
)
from virtshift.launcher.qmp import QmpError, QmpEvent

if TYPE_CHECKING:
    from virtshift.agent.vmis import Domain

log = logging.getLogger(__name__)

EFI_VARS_NODE = "pflash1"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mirrored_disks(vmi: Mapping[str, Any], conv: Conversion) -> list[MirroredDisk]:
    """The block nodes whose contents must move with the VM (see the module docstring)."""
    volumes = {str(_dict(v).get("name")): _dict(v)
               for v in _dict(vmi.get("spec")).get("volumes") or []}
    out: list[MirroredDisk] = []
    for disk in conv.disks:
        if disk.readonly or disk.shared:
            continue
        vol = volumes.get(disk.name, {})
        if "containerDisk" in vol:
            out.append(MirroredDisk(disk.node_name, "top"))
        elif "hostDisk" in vol and _dict(vol["hostDisk"]).get("shared") is True:
            continue
        else:
            out.append(MirroredDisk(disk.node_name, "full"))
    if any(EFI_VARS_NODE in arg for arg in conv.argv if arg.startswith("{")):
        out.append(MirroredDisk(EFI_VARS_NODE, "full"))
    return out


def target_ports(state: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(migration port, NBD port) from ``targetDirectMigrationNodePorts``."""
    mig = nbd = None
    for port, role in _dict(state.get("targetDirectMigrationNodePorts")).items():
        try:
            number = int(port)
        except ValueError:
            continue
        if role == PORT_MIGRATION:
            mig = number
        elif role == PORT_NBD:
            nbd = number
    return mig, nbd


class MigrationTarget:
    """Incoming side helpers; the caller (VMISync) owns the Domain and the QEMU."""

    @staticmethod
    async def receive(dom: Domain, *, address: str, port: int, nbd_port: int | None,
                      exports: Sequence[str], config: MigrationConfig) -> None:
        """Listen for the stream and resume the guest once it completes."""
        assert dom.sup is not None
        done = asyncio.Event()

        def on_event(event: QmpEvent) -> None:
            if event.name == "MIGRATION" and event.data.get("status") in (
                    "completed", "failed", "cancelled"):
                done.set()

        dom.sup.add_listener(on_event)
        await prepare_incoming(dom.sup.qmp, address=address, port=port, nbd_port=nbd_port,
                               exports=exports, post_copy=config.allow_post_copy)
        dom.tasks.append(asyncio.create_task(
            MigrationTarget._finish(dom, done, exports), name=f"incoming:{dom.key[1]}"))

    @staticmethod
    def resume(dom: Domain) -> None:
        """After a node agent restart: watch the incoming stream again (by polling)."""
        dom.tasks.append(asyncio.create_task(
            MigrationTarget._finish(dom, asyncio.Event(), dom.exports),
            name=f"incoming:{dom.key[1]}"))

    @staticmethod
    async def _finish(dom: Domain, done: asyncio.Event, exports: Sequence[str]) -> None:
        assert dom.sup is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)  # the event, or a slow poll
            try:
                status = await incoming_status(dom.sup.qmp)
            except QmpError:
                return  # QEMU is gone: the exit watcher reports it
            if status == "completed" and not dom.incoming_done:
                await finish_incoming(dom.sup.qmp, exports=exports)
                dom.incoming_done = True
                log.info("VMI %s/%s: incoming migration completed; guest resumed here", *dom.key)
                return
            if status in ("failed", "cancelled"):
                log.info("VMI %s/%s: incoming migration %s", *dom.key, status)
                return
            done.clear()


class MigrationSource:
    """Runs one outgoing migration and reports it."""

    def __init__(self, client: Client, vmi_kind: KindInfo) -> None:
        self.client = client
        self.vmi_kind = vmi_kind
        self.vmim_kind = REGISTRY.require("kubevirt.io", "v1",
                                          "VirtualMachineInstanceMigration")

    async def run(self, dom: Domain, vmi: Obj, node: str) -> None:
        state = migration_state(vmi)
        uid = str(state.get("migrationUid") or "")
        ns, name = dom.key
        config = MigrationConfig.from_status(_dict(state.get("migrationConfiguration")))
        port, nbd_port = target_ports(state)
        address = str(state.get("targetNodeAddress") or "")
        assert dom.sup is not None
        disks = mirrored_disks(vmi, dom.conversion)
        vmim_name = await self._vmim_name(ns, name, uid)
        out = OutgoingMigration(
            dom.sup.qmp, address, port or 0, config, dom.conversion.memory_bytes,
            nbd_port=nbd_port, disks=disks,
            report=lambda p: self._progress(ns, vmim_name, p))
        dom.outgoing = out
        await self._state(ns, name, {"startTimestamp": _now(), "mode": "PreCopy",
                                     "sourceState": {"node": node, "migrationUID": uid}})
        log.info("VMI %s/%s: migrating to %s:%s (%d disk(s) mirrored)", ns, name, address,
                 port, len(disks))
        try:
            if port is None:
                raise MigrationFailed("the target reported no migration port")
            progress = await out.run()
        except MigrationFailed as e:
            log.warning("VMI %s/%s: migration failed: %s", ns, name, e)
            fields: Obj = {"completed": True, "failed": True, "failureReason": str(e),
                           "endTimestamp": _now()}
            if e.aborted:
                fields["abortStatus"] = "Succeeded"
            await self._progress(ns, vmim_name, out.progress, final="failed")
            await self._state(ns, name, fields)
            return
        finally:
            dom.outgoing = None
        dom.migrated_uid = uid
        log.info("VMI %s/%s: migration completed in %d ms (downtime %s ms)", ns, name,
                 progress.elapsed_ms, progress.downtime_ms)
        await self._progress(ns, vmim_name, progress, final="completed")
        fields = {"completed": True, "endTimestamp": _now(), "mode": progress.mode}
        if out.abort_requested:
            fields["abortStatus"] = "Failed"  # too late: it had already switched over
        await self._state(ns, name, fields)

    async def report(self, key: tuple[str, str], fields: Obj) -> None:
        """Merge ``fields`` into the VMI's ``status.migrationState``."""
        await self._state(key[0], key[1], fields)

    async def _state(self, ns: str, name: str, fields: Obj) -> None:
        for attempt in range(5):
            try:
                await self.client.patch(self.vmi_kind, ns, name,
                                        {"status": {"migrationState": fields}},
                                        subresource="status")
                return
            except NotFound:
                return
            except (ApiError, OSError) as e:
                log.warning("VMI %s/%s: reporting migration state: %s", ns, name, e)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _vmim_name(self, ns: str, vmi_name: str, uid: str) -> str | None:
        try:
            listed = await self.client.list(self.vmim_kind, ns,
                                            label_selector=f"{VMI_NAME_LABEL}={vmi_name}")
        except (ApiError, OSError) as e:
            log.warning("looking up the migration of %s/%s: %s", ns, vmi_name, e)
            return None
        for item in listed.get("items") or []:
            if _dict(item.get("metadata")).get("uid") == uid:
                return str(item["metadata"]["name"])
        return None

    async def _progress(self, ns: str, vmim: str | None, progress: Progress,
                        final: str | None = None) -> None:
        if vmim is None:
            return
        data = progress.to_json()
        if final:
            data["status"] = final
        try:
            await self.client.patch(self.vmim_kind, ns, vmim, {"metadata": {"annotations": {
                PROGRESS_ANNOTATION: json.dumps(data, sort_keys=True)}}})
        except (ApiError, OSError) as e:
            log.debug("migration progress of %s/%s: %s", ns, vmim, e)
