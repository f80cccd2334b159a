"""The snapshot and restore controllers' loop.

Decisions are pure (:mod:`virtshift.controller.snapshot`). One loop keeps Reflector-fed caches of
snapshots, contents, restores, VMs, VMIs, PVCs, PVs, DataVolumes, StorageClasses and Nodes; an
event queues the objects it concerns (a VM or VMI event: the snapshots and restores naming that
VM; a content event: its snapshot and the restores using it; a PVC event: every snapshot and
restore of its namespace). A key is ``("snapshot:NS" | "content:NS" | "restore:NS", NAME)``,
or ``("vm:NS", NAME)`` for a VM's ``status.volumeSnapshotStatuses``.
Actions are applied in order; each write's response goes back into its cache; a failed write
stops the pass and the key is retried with backoff.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.client.rest import Client
from virtshift.controller import events
from virtshift.controller.manager import ObjectCache, WorkQueue, run_reflectors, serve
from virtshift.controller.restore import RestoreInputs, reconcile_restore
from virtshift.controller.snapshot import (
    Action,
    Create,
    Delete,
    Event,
    Patch,
    Plan,
    SnapshotInputs,
    Update,
    reconcile_content,
    reconcile_snapshot,
    reconcile_vm_volumes,
)
from virtshift.controller.vmi import Key, as_dict, key_of, meta, status_of
from virtshift.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class SnapshotController:
    """VirtualMachineSnapshot, VirtualMachineSnapshotContent and VirtualMachineRestore."""

    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client
        kind = registry.require
        self.kinds: dict[str, KindInfo] = {
            "snapshot": kind("snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshot"),
            "content": kind("snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshotContent"),
            "restore": kind("snapshot.kubevirt.io", "v1beta1", "VirtualMachineRestore"),
            "vm": kind("kubevirt.io", "v1", "VirtualMachine"),
            "vmi": kind("kubevirt.io", "v1", "VirtualMachineInstance"),
            "pvc": kind("", "v1", "PersistentVolumeClaim"),
            "pv": kind("", "v1", "PersistentVolume"),
            "dv": kind("cdi.kubevirt.io", "v1beta1", "DataVolume"),
            "sc": kind("storage.k8s.io", "v1", "StorageClass"),
        }
        self._by_plural = {(k.group, k.plural): name for name, k in self.kinds.items()}
        self.caches = {name: ObjectCache() for name in self.kinds}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()

    # ---- events ------------------------------------------------------------------------------

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        which = self._by_plural[(kind.group, kind.plural)]
        self.caches[which].apply(event, obj)
        ns, name = key_of(obj)
        if which in ("snapshot", "content", "restore"):
            self.queue.add((f"{which}:{ns}", name))
        if which == "content":
            snap = str(as_dict(obj.get("spec")).get("virtualMachineSnapshotName") or "")
            if snap:
                self.queue.add((f"snapshot:{ns}", snap))
            self._queue_restores(ns, lambda r: True)
        elif which == "snapshot":
            snap_name = name
            self._queue_restores(ns, lambda r: as_dict(r.get("spec")).get(
                "virtualMachineSnapshotName") == snap_name)
            content = str(status_of(obj).get("virtualMachineSnapshotContentName") or "")
            if content:
                self.queue.add((f"content:{ns}", content))
        elif which in ("vm", "vmi"):
            if which == "vm" and event != "DELETED":
                self.queue.add((f"vm:{ns}", name))
            for (sns, sname), s in self.caches["snapshot"].objects.items():
                if sns == ns and as_dict(as_dict(s.get("spec")).get("source")).get(
                        "name") == name:
                    self.queue.add((f"snapshot:{sns}", sname))
            self._queue_restores(ns, lambda r: as_dict(as_dict(r.get("spec")).get(
                "target")).get("name") == name)
        elif which in ("pvc", "dv"):
            for sns, sname in list(self.caches["snapshot"].objects):
                if sns == ns:
                    self.queue.add((f"snapshot:{sns}", sname))
            self._queue_restores(ns, lambda r: True)

    def _queue_restores(self, ns: str, match: Callable[[Obj], bool]) -> None:
        for (rns, rname), r in self.caches["restore"].objects.items():
            if rns == ns and match(r):
                self.queue.add((f"restore:{rns}", rname))

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, list(self.kinds.values()),
                                     self._on_event, self.synced, "snapshot")
        await serve("snapshot", tasks, self.synced, self.queue, self.reconcile)

    # ---- reconcile ---------------------------------------------------------------------------

    def _get(self, which: str, ns: str, name: str) -> Obj | None:
        return self.caches[which].get((ns, name)) if name else None

    async def reconcile(self, key: Key) -> bool:
        which, _, ns = key[0].partition(":")
        name = key[1]
        obj = self._get(which, ns, name)
        if obj is None:
            return True
        now = _now()
        if which == "snapshot":
            plan = reconcile_snapshot(self._snapshot_inputs(obj, now))
        elif which == "content":
            snap_name = str(as_dict(obj.get("spec")).get("virtualMachineSnapshotName") or "")
            plan = reconcile_content(obj, self._get("snapshot", ns, snap_name), now)
        elif which == "restore":
            plan = reconcile_restore(self._restore_inputs(obj, now))
        elif which == "vm":
            plan = reconcile_vm_volumes(obj)
        else:
            return True
        await self.execute(plan)
        if plan.requeue_after is not None:
            self.queue.add_after(key, plan.requeue_after)
        return True

    def _snapshot_inputs(self, snap: Obj, now: datetime.datetime) -> SnapshotInputs:
        ns = key_of(snap)[0]
        vm_name = str(as_dict(as_dict(snap.get("spec")).get("source")).get("name") or "")
        vm = self._get("vm", ns, vm_name)
        vmi = self._get("vmi", ns, vm_name) if vm is not None else None
        cname = str(status_of(snap).get("virtualMachineSnapshotContentName") or
                    f"vmsnapshot-content-{meta(snap).get('uid')}")
        return SnapshotInputs(
            snapshot=snap, vm=vm, vmi=vmi, content=self._get("content", ns, cname),
            pvcs=self.caches["pvc"].objects,
            pvs={k[1]: v for k, v in self.caches["pv"].objects.items()},
            now=now)

    def _restore_inputs(self, restore: Obj, now: datetime.datetime) -> RestoreInputs:
        ns = key_of(restore)[0]
        spec = as_dict(restore.get("spec"))
        snap = self._get("snapshot", ns, str(spec.get("virtualMachineSnapshotName") or ""))
        content = None
        if snap is not None:
            cname = str(status_of(snap).get("virtualMachineSnapshotContentName") or "")
            content = self._get("content", ns, cname)
        target = str(as_dict(spec.get("target")).get("name") or "")
        vm = self._get("vm", ns, target)
        return RestoreInputs(
            restore=restore, snapshot=snap, content=content, vm=vm,
            vmi=self._get("vmi", ns, target) if vm is not None else None,
            pvcs=self.caches["pvc"].objects, datavolumes=self.caches["dv"].objects,
            classes=self.caches["sc"].values(), now=now)

    async def execute(self, plan: Plan) -> None:
        for action in plan.actions:
            await self.apply(action)

    async def apply(self, action: Action) -> None:
        kind = self.kinds[action.kind]
        cache = self.caches[action.kind]
        try:
            if isinstance(action, Create):
                try:
                    out = await self.client.create(kind, action.namespace, action.obj)
                except AlreadyExists:
                    return
                cache.put(out)
                log.info("created %s %s/%s", kind.kind, action.namespace,
                         meta(out).get("name"))
            elif isinstance(action, Patch):
                out = await self.client.patch(kind, action.namespace, action.name, action.patch,
                                              subresource=action.subresource)
                if meta(out).get("deletionTimestamp") and not meta(out).get("finalizers"):
                    cache.forget(out)
                else:
                    cache.put(out)
            elif isinstance(action, Update):
                out = await self.client.update(kind, action.namespace, action.obj,
                                               subresource=action.subresource)
                cache.put(out)
                phase = status_of(out).get("phase")
                if action.subresource == "status" and phase:
                    log.debug("%s %s/%s: %s", kind.kind, action.namespace,
                              meta(out).get("name"), phase)
            elif isinstance(action, Delete):
                held = cache.get((action.namespace, action.name))
                out = await self.client.delete(kind, action.namespace, action.name)
                if out.get("kind") == kind.kind:
                    cache.put(out)
                elif held is not None:
                    cache.forget(held)
                log.info("deleted %s %s/%s", kind.kind, action.namespace, action.name)
            elif isinstance(action, Event):
                await events.record(self.client, action.obj, kind, action.type, action.reason,
                                    action.message)
        except NotFound:
            pass  # gone meanwhile: its watch event queues another pass
