"""The controller process: its shared machinery, the VM and VMI controllers' loops, and
:func:`run_controllers`, which runs them with the garbage collector.

The decisions live in pure modules: :mod:`virtshift.controller.vm` (VM -> VMI, printableStatus),
:mod:`virtshift.controller.vmi` (VMI phases up to Scheduled) and
:mod:`virtshift.controller.scheduler` (placement). The loops here keep Reflector-fed caches,
reconcile one key at a time from a work queue, and apply the typed actions through the client.
Every write is pinned to the resourceVersion it was decided on, and its response is written back
into the cache (older watch events cannot undo it), so a pass never acts on a state older than its
own last write. API errors and connection failures are logged and the key is retried with
exponential backoff (0.1s doubling up to 30s); anything else is a bug and stops the controllers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from virtshift.aio import stop_on_signals, stop_tasks
from virtshift.api.kinds import REGISTRY, KindInfo, Obj, Registry
from virtshift.client import kubeconfig
from virtshift.client.informer import Reflector
from virtshift.client.rest import Client
from virtshift.controller.gc import GarbageCollector
from virtshift.controller.vm import (
    SYNC_ACTIONS,
    AdoptVMI,
    CreateDataVolume,
    CreateVMI,
    DeleteVMI,
    PatchVMMetadata,
    RemoveVMFinalizer,
    RemoveVMIFinalizer,
    SetRunning,
    SetStateChangeRequests,
    SyncError,
    UpdateVMStatus,
    VMAction,
    VMInputs,
    VMPlan,
    reconcile_vm,
    requests_of,
    status_actions,
    sync_error_for,
)
from virtshift.controller.vmi import (
    NODE_NAME_LABEL,
    VM_CONTROLLER_FINALIZER,
    Key,
    SetVMILabels,
    UpdateVMIStatus,
    VMIAction,
    as_list,
    controller_ref,
    is_deleting,
    is_final,
    key_of,
    meta,
    phase,
    reconcile_vmi,
    status_of,
)
from virtshift.errors import AlreadyExists, ApiError, Invalid, NotFound

log = logging.getLogger(__name__)


# ---- shared machinery ------------------------------------------------------------------------


def _rv(obj: Mapping[str, Any]) -> int | None:
    try:
        return int(str(meta(obj).get("resourceVersion")))
    except ValueError:
        return None


class ObjectCache:
    """Objects of one kind by (namespace, name), fed by a Reflector and by the controller's own
    writes; an update older than what the cache holds (or than a deletion it saw) is ignored."""

    def __init__(self) -> None:
        self.objects: dict[Key, Obj] = {}
        self._deleted: dict[Key, int] = {}

    def apply(self, event: str, obj: Obj) -> None:
        key = key_of(obj)
        rv = _rv(obj)
        if event == "DELETED":
            self.objects.pop(key, None)
            if rv is not None:
                self._deleted[key] = max(rv, self._deleted.get(key, 0))
            return
        self.put(obj)

    def put(self, obj: Obj) -> None:
        key = key_of(obj)
        rv = _rv(obj)
        if rv is not None:
            if rv <= self._deleted.get(key, -1):
                return
            held = self.objects.get(key)
            held_rv = _rv(held) if held is not None else None
            if held_rv is not None and rv < held_rv:
                return
            self._deleted.pop(key, None)
        self.objects[key] = obj

    def forget(self, obj: Obj) -> None:
        """The object was deleted by us (the response carried its last version)."""
        self.apply("DELETED", obj)

    def get(self, key: Key) -> Obj | None:
        return self.objects.get(key)

    def values(self) -> list[Obj]:
        return list(self.objects.values())


class WorkQueue:
    """Keys to reconcile, deduplicated, with delayed and rate-limited re-adds."""

    def __init__(self) -> None:
        self._dirty: set[Key] = set()
        self._event = asyncio.Event()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}

    def add(self, key: Key) -> None:
        self._dirty.add(key)
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    def add_after(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(delay, 0.0)
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: Key) -> None:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        self.add_after(key, min(0.1 * 2 ** n, 30.0))

    def forget(self, key: Key) -> None:
        self._failures.pop(key, None)

    async def batch(self) -> set[Key]:
        await self._event.wait()
        self._event.clear()
        out, self._dirty = self._dirty, set()
        return out

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


TRANSIENT = (ApiError, aiohttp.ClientError, OSError, TimeoutError)


async def remove_finalizers(client: Client, kind: KindInfo, cache: ObjectCache, obj: Obj,
                            finalizers: Collection[str]) -> Obj | None:
    """Remove ``finalizers`` from ``obj`` (the write pinned to its resourceVersion) and keep
    ``cache`` up to date; None when that was the last finalizer of an object being deleted
    (it is gone). NotFound propagates."""
    ns, name = key_of(obj)
    fins = [f for f in as_list(meta(obj).get("finalizers")) if f not in finalizers]
    out = await client.patch(kind, ns or None, name, {"metadata": {
        "finalizers": fins or None, "resourceVersion": meta(obj).get("resourceVersion")}})
    if is_deleting(out) and not fins:
        cache.forget(out)
        return None
    cache.put(out)
    return out


async def run_reflectors(client: Client, kinds: Sequence[KindInfo],
                         handler: Callable[[str, KindInfo, Obj], None],
                         synced: asyncio.Event, prefix: str) -> list[asyncio.Task[None]]:
    """Start one Reflector per kind; ``synced`` is set once every kind has been listed."""
    pending = {(k.group, k.plural) for k in kinds}

    def on_synced(kind: KindInfo) -> None:
        pending.discard((kind.group, kind.plural))
        if not pending:
            synced.set()

    return [asyncio.create_task(Reflector(client, k, handler, on_synced).run(),
                                name=f"{prefix}-reflector-{k.plural}") for k in kinds]


async def serve(what: str, tasks: list[asyncio.Task[None]], synced: asyncio.Event,
                queue: WorkQueue, reconcile: Callable[[Key], Awaitable[bool]]) -> None:
    """Reconcile keys from ``queue`` once ``synced``; a key whose reconcile returns False or
    raises a transient error is retried with backoff. Stops the reflector ``tasks`` on exit and
    raises if one of them dies."""

    def check() -> None:
        for t in tasks:
            if t.done():
                t.result()
                raise RuntimeError(f"{t.get_name()} stopped")

    for t in tasks:
        t.add_done_callback(lambda _t: queue.wake())
    try:
        waiter = asyncio.create_task(synced.wait())
        try:
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        check()
        while True:
            keys = await queue.batch()
            check()
            for key in sorted(keys):
                try:
                    ok = await reconcile(key)
                except TRANSIENT as e:
                    log.warning("%s %s/%s: %s; will retry", what, key[0], key[1], e)
                    ok = False
                if ok:
                    queue.forget(key)
                else:
                    queue.add_rate_limited(key)
    finally:
        queue.close()
        await stop_tasks(tasks)




# ---- the VMI controller --------------------------------------------------------------------------


class VMIController:
    """Drives :func:`reconcile_vmi` from watches on VMIs, VMs, Nodes, PVCs and DataVolumes."""

    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client

        kind = registry.require
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.vm_kind = kind("kubevirt.io", "v1", "VirtualMachine")
        self.node_kind = kind("", "v1", "Node")
        self.pvc_kind = kind("", "v1", "PersistentVolumeClaim")
        self.dv_kind = kind("cdi.kubevirt.io", "v1beta1", "DataVolume")
        self.pv_kind = kind("", "v1", "PersistentVolume")
        self.caches = {k.plural: ObjectCache() for k in (
            self.vmi_kind, self.vm_kind, self.node_kind, self.pvc_kind, self.dv_kind,
            self.pv_kind)}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()
        self.unschedulable: set[Key] = set()
        self._label_rejected: set[str] = set()

    @property
    def vmis(self) -> ObjectCache:
        return self.caches["virtualmachineinstances"]

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self.caches[kind.plural].apply(event, obj)
        if kind is self.vmi_kind:
            self.queue.add(key_of(obj))
            if event == "DELETED" or is_final(obj):
                self._retry_unschedulable()  # resources were freed
        elif kind is self.node_kind:
            self._retry_unschedulable()
        elif kind is self.vm_kind:
            key = key_of(obj)
            if key in self.vmis.objects:
                self.queue.add(key)
        else:
            ns = key_of(obj)[0]
            for vmi in self.vmis.values():
                if key_of(vmi)[0] == ns and phase(vmi) in ("", "Pending"):
                    self.queue.add(key_of(vmi))

    def _retry_unschedulable(self) -> None:
        for key in self.unschedulable:
            self.queue.add(key)

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, [self.vmi_kind, self.vm_kind, self.node_kind,
                                                   self.pvc_kind, self.dv_kind, self.pv_kind],
                                     self._on_event, self.synced, "vmi")
        await serve("VMI", tasks, self.synced, self.queue, self.reconcile)

    async def reconcile(self, key: Key) -> bool:
        vmi = self.vmis.get(key)
        if vmi is None:
            self.unschedulable.discard(key)
            return True
        ref = controller_ref(vmi)
        owner = self.caches["virtualmachines"].get(key) if ref is not None else None
        owner_exists = owner is not None and meta(owner).get("uid") == (ref or {}).get("uid")
        decision = reconcile_vmi(
            vmi, now=datetime.datetime.now(datetime.UTC),
            nodes=self.caches["nodes"].values(), vmis=self.vmis.values(),
            owner_exists=owner_exists,
            pvcs=self.caches["persistentvolumeclaims"].objects,
            datavolumes=self.caches["datavolumes"].objects,
            pvs={k[1]: v for k, v in self.caches["persistentvolumes"].objects.items()})
        if decision.unschedulable:
            self.unschedulable.add(key)
        else:
            self.unschedulable.discard(key)
        await self.apply(vmi, decision.actions)
        return True

    async def apply(self, vmi: Obj, actions: Sequence[VMIAction]) -> None:
        ns, name = key_of(vmi)
        current = vmi
        for action in actions:
            rv = meta(current).get("resourceVersion")
            try:
                if isinstance(action, UpdateVMIStatus):
                    current = await self.client.update(
                        self.vmi_kind, ns, {**current, "status": action.status},
                        subresource="status")
                    if phase(current) != phase(vmi):
                        log.info("VMI %s/%s: %s -> %s%s", ns, name, phase(vmi) or '""',
                                 phase(current), f" on {status_of(current).get('nodeName')}"
                                 if phase(current) == "Scheduled" else "")
                elif isinstance(action, SetVMILabels):
                    patch = {"metadata": {"labels": action.labels, "resourceVersion": rv}}
                    try:
                        current = await self.client.patch(self.vmi_kind, ns, name, patch)
                    except Invalid as e:
                        # Reserved labels need the API server to treat this controller as
                        # KubeVirt itself; status.nodeName is set either way.
                        uid = str(meta(current).get("uid"))
                        if uid not in self._label_rejected:
                            self._label_rejected.add(uid)
                            log.warning("VMI %s/%s: cannot set %s: %s", ns, name,
                                        NODE_NAME_LABEL, e)
                        continue
                else:
                    out = await remove_finalizers(self.client, self.vmi_kind, self.vmis,
                                                  current, action.finalizers)
                    if out is None:
                        return  # the last finalizer went: it is gone
                    current = out
            except NotFound:
                return
            self.vmis.put(current)


# ---- the VM controller --------------------------------------------------------------------------


class VMController:
    """Drives :func:`reconcile_vm` from watches on VMs, VMIs, DataVolumes and PVCs."""

    def __init__(self, client: Client, registry: Registry,
                 randint: Callable[[int], int] = random.randrange) -> None:
        self.client = client
        self.randint = randint

        kind = registry.require
        self.vm_kind = kind("kubevirt.io", "v1", "VirtualMachine")
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.dv_kind = kind("cdi.kubevirt.io", "v1beta1", "DataVolume")
        self.pvc_kind = kind("", "v1", "PersistentVolumeClaim")
        self.vms, self.vmis = ObjectCache(), ObjectCache()
        self.dvs, self.pvcs = ObjectCache(), ObjectCache()
        self._caches = {self.vm_kind.plural: self.vms, self.vmi_kind.plural: self.vmis,
                        self.dv_kind.plural: self.dvs, self.pvc_kind.plural: self.pvcs}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self._caches[kind.plural].apply(event, obj)
        key = key_of(obj)
        if kind is self.vm_kind:
            self.queue.add(key)
        elif kind is self.vmi_kind:
            ref = controller_ref(obj)
            if ref is not None and ref.get("kind") == "VirtualMachine":
                key = (key[0], str(ref.get("name")))
            if key in self.vms.objects:
                self.queue.add(key)
        else:
            for vm_key in self.vms.objects:
                if vm_key[0] == key[0]:
                    self.queue.add(vm_key)

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, [self.vm_kind, self.vmi_kind, self.dv_kind,
                                                   self.pvc_kind], self._on_event,
                                     self.synced, "vm")
        await serve("VM", tasks, self.synced, self.queue, self.reconcile)

    async def reconcile(self, key: Key) -> bool:
        """One pass for one VM; False when a sync action failed (retry with backoff)."""
        vm = self.vms.get(key)
        if vm is None:
            return True
        inp = VMInputs(vm, self.vmis.get(key), datetime.datetime.now(datetime.UTC),
                       self.dvs.objects, self.pvcs.objects, self.randint)
        plan = reconcile_vm(inp)
        ok = await self.execute(inp, plan)
        if plan.requeue_after is not None:
            self.queue.add_after(key, plan.requeue_after)
        return ok

    async def execute(self, inp: VMInputs, plan: VMPlan) -> bool:
        ns, name = key_of(inp.vm)
        vm = inp.vm
        vmi = inp.vmi
        failed: SyncError | None = None
        for i, action in enumerate(plan.actions):
            if isinstance(action, SYNC_ACTIONS):
                try:
                    vm = await self._sync(action, ns, vm)
                except NotFound:
                    if not isinstance(action, DeleteVMI):
                        raise
                except ApiError as e:
                    failed = sync_error_for(action, e)
                    log.warning("VM %s/%s: %s", ns, name, failed.message)
                    retry = VMPlan([], start_expected=plan.start_expected
                                   and not isinstance(action, CreateVMI),
                                   stop_expected=plan.stop_expected
                                   and not isinstance(action, DeleteVMI),
                                   requests=requests_of(inp.vm)
                                   if isinstance(action, SetStateChangeRequests)
                                   else plan.requests)
                    rest = status_actions(VMInputs(vm, inp.vmi, inp.now, inp.datavolumes,
                                                   inp.pvcs, inp.randint), retry, failed)
                    await self._finish(rest, ns, vm)
                    return False
                continue
            if isinstance(action, UpdateVMStatus | RemoveVMIFinalizer):
                await self._finish(plan.actions[i:], ns, vm)
                return True
            if isinstance(action, PatchVMMetadata):
                patch = {"metadata": {"finalizers": action.finalizers,
                                      "annotations": action.annotations,
                                      "resourceVersion": meta(vm).get("resourceVersion")}}
                vm = await self.client.patch(self.vm_kind, ns, name, patch)
                self.vms.put(vm)
            elif isinstance(action, RemoveVMFinalizer):
                patch = {"metadata": {"finalizers": action.finalizers or None,
                                      "resourceVersion": meta(vm).get("resourceVersion")}}
                vm = await self.client.patch(self.vm_kind, ns, name, patch)
                if action.finalizers:
                    self.vms.put(vm)
                else:
                    self.vms.forget(vm)
            elif isinstance(action, AdoptVMI) and vmi is not None:
                patch = {"metadata": {"ownerReferences": action.owner_references,
                                      "resourceVersion": meta(vmi).get("resourceVersion")}}
                vmi = await self.client.patch(self.vmi_kind, ns, name, patch)
                self.vmis.put(vmi)
        return True

    async def _sync(self, action: VMAction, ns: str, vm: Obj) -> Obj:
        """Apply one sync action; returns the VM as last written."""
        name = key_of(vm)[1]
        if isinstance(action, CreateVMI):
            created = await self.client.create(self.vmi_kind, ns, action.vmi)
            self.vmis.put(created)
            log.info("VM %s/%s: started by creating VMI %s", ns, name, meta(created).get("uid"))
        elif isinstance(action, CreateDataVolume):
            try:
                dv = await self.client.create(self.dv_kind, ns, action.datavolume)
                self.dvs.put(dv)
            except AlreadyExists:
                pass  # created meanwhile (or by CDI claim adoption): the cache catches up
        elif isinstance(action, DeleteVMI):
            gone = self.vmis.get((ns, action.name))
            out = await self.client.delete(self.vmi_kind, ns, action.name, uid=action.uid)
            if out.get("kind") == "VirtualMachineInstance":
                self.vmis.put(out)
            elif gone is not None:
                self.vmis.forget(gone)
            log.info("VM %s/%s: stopped by deleting VMI %s", ns, name, action.uid)
        elif isinstance(action, SetRunning):
            patch = {**action.patch,
                     "metadata": {"resourceVersion": meta(vm).get("resourceVersion")}}
            vm = await self.client.patch(self.vm_kind, ns, name, patch)
            self.vms.put(vm)
        elif isinstance(action, SetStateChangeRequests):
            patch = {"status": {"stateChangeRequests": action.requests},
                     "metadata": {"resourceVersion": meta(vm).get("resourceVersion")}}
            vm = await self.client.patch(self.vm_kind, ns, name, patch, subresource="status")
            self.vms.put(vm)
        return vm

    async def _finish(self, actions: list[VMAction], ns: str, vm: Obj) -> None:
        """The status write and the VMI finalizer removal that follows it."""
        for action in actions:
            if isinstance(action, UpdateVMStatus):
                vm = await self.client.update(self.vm_kind, ns, {**vm, "status": action.status},
                                              subresource="status")
                self.vms.put(vm)
            elif isinstance(action, RemoveVMIFinalizer):
                held = self.vmis.get((ns, action.name))  # as our own writes left it
                if held is None:
                    continue
                with contextlib.suppress(NotFound):
                    await remove_finalizers(self.client, self.vmi_kind, self.vmis, held,
                                            (VM_CONTROLLER_FINALIZER,))


# ---- the process -----------------------------------------------------------------------------


async def run_controllers(client: Client, registry: Registry) -> None:
    """Run the garbage collector, the VM controller and the VMI controller (with its scheduler)
    until cancelled. If one of them fails, the others are stopped and its error is raised."""
    from virtshift.controller.datavolumeloop import DataVolumeController
    from virtshift.controller.migrationloop import MigrationController  # they import this
    from virtshift.controller.nodeloop import NodeController
    from virtshift.controller.snapshotloop import SnapshotController
    from virtshift.controller.storageloop import StorageController

    tasks = [
        asyncio.create_task(NodeController(client, registry).run(), name="node-controller"),
        asyncio.create_task(MigrationController(client, registry).run(),
                            name="migration-controller"),
        asyncio.create_task(GarbageCollector(client, registry).run(), name="gc"),
        asyncio.create_task(VMController(client, registry).run(), name="vm-controller"),
        asyncio.create_task(VMIController(client, registry).run(), name="vmi-controller"),
        asyncio.create_task(StorageController(client, registry).run(), name="storage"),
        asyncio.create_task(SnapshotController(client, registry).run(), name="snapshot"),
        asyncio.create_task(DataVolumeController(client, registry).run(), name="datavolume"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # raises the controller's error
        raise RuntimeError(f"controller {next(iter(done)).get_name()} stopped")
    finally:
        await stop_tasks(tasks)


async def run(kubeconfig_path: Path) -> None:
    """The controller process (``virtshift controller``): every controller until SIGTERM."""
    client = Client(kubeconfig.load(kubeconfig_path), user_agent="virtshift-controller")
    stop = stop_on_signals()
    task = asyncio.create_task(run_controllers(client, REGISTRY), name="controllers")
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        await stop_tasks([task, waiter])
        await client.close()
