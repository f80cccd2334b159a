"""The storage controller's loop: StorageClasses, claims, volumes and WFFC node selection.

Decisions are pure (:mod:`virtshift.controller.storage`). The loop keeps Reflector-fed caches of
StorageClasses, PVCs, PVs, Nodes and VMIs; any event queues one cluster-wide pass (storage
objects are few), which decides every action from the caches and applies them in order. Each
write's response goes back into its cache so the next pass builds on it; a failed write retries
the pass with backoff.
"""

from __future__ import annotations

import asyncio
import logging

from virtshift.api.cdi import PVC_PROTECTION
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.client.rest import Client
from virtshift.controller import events
from virtshift.controller.manager import (
    ObjectCache,
    WorkQueue,
    remove_finalizers,
    run_reflectors,
    serve,
)
from virtshift.controller.storage import (
    ClaimWarning,
    CreatePV,
    CreateStorageClass,
    DeletePV,
    ExpandPV,
    PatchPVC,
    ReleaseClaim,
    SetPVCStatus,
    SetPVPhase,
    StorageAction,
    protection,
    reconcile_claim,
    reconcile_volume,
    select_nodes,
    storage_class_actions,
)
from virtshift.controller.vmi import Key
from virtshift.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

_ALL: Key = ("", "storage")


class StorageController:
    """The hostpath provisioner and the PV controller's binding."""

    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client
        kind = registry.require
        self.sc_kind = kind("storage.k8s.io", "v1", "StorageClass")
        self.pvc_kind = kind("", "v1", "PersistentVolumeClaim")
        self.pv_kind = kind("", "v1", "PersistentVolume")
        self.node_kind = kind("", "v1", "Node")
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.kinds = [self.sc_kind, self.pvc_kind, self.pv_kind, self.node_kind, self.vmi_kind]
        self.caches = {k.plural: ObjectCache() for k in self.kinds}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()
        self._warned: dict[tuple[str, str], str] = {}  # claim -> the last warning recorded

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self.caches[kind.plural].apply(event, obj)
        self.queue.add(_ALL)

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, self.kinds, self._on_event, self.synced,
                                     "storage")
        self.queue.add(_ALL)
        await serve("storage", tasks, self.synced, self.queue, self.reconcile)

    def plan(self) -> list[StorageAction]:
        classes = self.caches["storageclasses"].values()
        pvcs = self.caches["persistentvolumeclaims"].objects
        pvs = {k[1]: v for k, v in self.caches["persistentvolumes"].objects.items()}
        nodes = self.caches["nodes"].values()
        actions: list[StorageAction] = list(storage_class_actions(classes))
        for key in sorted(pvcs):
            actions.extend(reconcile_claim(pvcs[key], classes, pvs, nodes))
        for name in sorted(pvs):
            actions.extend(reconcile_volume(pvs[name], pvcs))
        actions.extend(select_nodes(self.caches["virtualmachineinstances"].values(), pvcs,
                                    classes, pvs, nodes))
        actions.extend(protection(pvcs, self.caches["virtualmachineinstances"].values()))
        return actions

    async def reconcile(self, key: Key) -> bool:
        for action in self.plan():
            await self.apply(action)
        return True

    async def apply(self, action: StorageAction) -> None:
        pvcs = self.caches["persistentvolumeclaims"]
        pvs = self.caches["persistentvolumes"]
        try:
            if isinstance(action, CreateStorageClass):
                try:
                    sc = await self.client.create(self.sc_kind, None, action.storage_class)
                    self.caches["storageclasses"].put(sc)
                    log.info("created StorageClass %s", sc["metadata"]["name"])
                except AlreadyExists:
                    pass
            elif isinstance(action, PatchPVC):
                pvcs.put(await self.client.patch(self.pvc_kind, action.namespace, action.name,
                                                 action.patch))
            elif isinstance(action, SetPVCStatus):
                out = await self.client.patch(self.pvc_kind, action.namespace, action.name,
                                              {"status": action.status},
                                              subresource="status")
                pvcs.put(out)
                log.info("PVC %s/%s: %s", action.namespace, action.name,
                         action.status.get("phase"))
            elif isinstance(action, CreatePV):
                try:
                    pv = await self.client.create(self.pv_kind, None, action.pv)
                except AlreadyExists:
                    return
                pvs.put(pv)
                ref = action.pv["spec"]["claimRef"]
                log.info("provisioned %s for PVC %s/%s", pv["metadata"]["name"],
                         ref["namespace"], ref["name"])
                claim = pvcs.get((ref["namespace"], ref["name"]))
                if claim is not None:
                    await events.record(self.client, claim, self.pvc_kind, events.NORMAL,
                                        "ProvisioningSucceeded", "Successfully provisioned "
                                        f"volume {pv['metadata']['name']}")
            elif isinstance(action, SetPVPhase):
                pvs.put(await self.client.patch(self.pv_kind, None, action.name,
                                                {"status": {"phase": action.phase}},
                                                subresource="status"))
            elif isinstance(action, ClaimWarning):
                key = (action.namespace, action.name)
                claim = pvcs.get(key)
                if claim is not None and self._warned.get(key) != action.message:
                    self._warned[key] = action.message
                    log.warning("PVC %s/%s: %s", *key, action.message)
                    await events.record(self.client, claim, self.pvc_kind, events.WARNING,
                                        action.reason, action.message)
            elif isinstance(action, ExpandPV):
                pvs.put(await self.client.patch(self.pv_kind, None, action.name,
                                                {"spec": {"capacity": {
                                                    "storage": action.capacity}}}))
                log.info("expanding %s to %s", action.name, action.capacity)
            elif isinstance(action, ReleaseClaim):
                held = pvcs.get((action.namespace, action.name))
                if held is not None:
                    await remove_finalizers(self.client, self.pvc_kind, pvcs, held,
                                            (PVC_PROTECTION,))
            elif isinstance(action, DeletePV):
                held = pvs.get(("", action.name))
                await self.client.delete(self.pv_kind, None, action.name)
                if held is not None:
                    pvs.forget(held)
                log.info("deleted %s (reclaim policy Delete)", action.name)
        except NotFound:
            pass  # gone meanwhile: its watch event queues another pass
