"""The DataVolume controller's loop.

Decisions are pure (:mod:`virtshift.controller.datavolume`). Reflector-fed caches of
DataVolumes, claims, volumes, StorageClasses, DataSources and VMIs; a DataVolume is reconciled
when it or its claim (same name) changes, and every DataVolume of a namespace when a VMI there
changes (a clone source may become free). Claims created with CDI's import/upload annotations
alone get the contract's populate annotation here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from virtshift.api import cdi
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.client.rest import Client
from virtshift.controller import events
from virtshift.controller.datavolume import (
    CreateClaim,
    DVAction,
    DVInputs,
    PatchClaim,
    RecordEvent,
    SetStatus,
    annotated_claim_source,
    clone_origin,
    reconcile,
)
from virtshift.controller.manager import ObjectCache, WorkQueue, run_reflectors, serve
from virtshift.controller.vmi import Key
from virtshift.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

_CLAIM = "claim:"  # queue keys for claims annotated directly: (CLAIM + namespace, name)


class DataVolumeController:
    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client
        kind = registry.require
        self.dv_kind = kind("cdi.kubevirt.io", "v1beta1", "DataVolume")
        self.pvc_kind = kind("", "v1", "PersistentVolumeClaim")
        self.pv_kind = kind("", "v1", "PersistentVolume")
        self.sc_kind = kind("storage.k8s.io", "v1", "StorageClass")
        self.ds_kind = kind("cdi.kubevirt.io", "v1beta1", "DataSource")
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.kinds = [self.dv_kind, self.pvc_kind, self.pv_kind, self.sc_kind, self.ds_kind,
                      self.vmi_kind]
        self.caches = {k.plural: ObjectCache() for k in self.kinds}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self.caches[kind.plural].apply(event, obj)
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if kind is self.dv_kind:
            self.queue.add((ns, name))
        elif kind is self.pvc_kind:
            if (ns, name) in self.caches["datavolumes"].objects:
                self.queue.add((ns, name))
            elif event != "DELETED" and annotated_claim_source(obj) is not None:
                self.queue.add((_CLAIM + ns, name))
            for key, dv in self.caches["datavolumes"].objects.items():
                if clone_origin(dv, self.caches["datasources"].objects)[:2] == (ns, name):
                    self.queue.add(key)  # a clone waits for its source
        elif kind in (self.vmi_kind, self.pv_kind, self.sc_kind, self.ds_kind):
            for key in self.caches["datavolumes"].objects:
                if kind is not self.vmi_kind or key[0] == ns:
                    self.queue.add(key)

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, self.kinds, self._on_event, self.synced,
                                     "datavolume")
        await serve("datavolume", tasks, self.synced, self.queue, self.reconcile)

    def inputs(self, key: Key) -> DVInputs | None:
        dv = self.caches["datavolumes"].get(key)
        if dv is None:
            return None
        pvcs = self.caches["persistentvolumeclaims"].objects
        return DVInputs(
            dv=dv, pvc=pvcs.get(key), classes=self.caches["storageclasses"].values(),
            pvcs=pvcs, pvs={k[1]: v for k, v in self.caches["persistentvolumes"].objects.items()},
            datasources=self.caches["datasources"].objects,
            vmis=self.caches["virtualmachineinstances"].values())

    async def reconcile(self, key: Key) -> bool:
        if key[0].startswith(_CLAIM):
            return await self._annotate_claim((key[0][len(_CLAIM):], key[1]))
        inp = self.inputs(key)
        if inp is None:
            return True
        for action in reconcile(inp):
            await self.apply(inp.dv, action)
        return True

    async def _annotate_claim(self, key: Key) -> bool:
        pvc = self.caches["persistentvolumeclaims"].get(key)
        source = annotated_claim_source(pvc) if pvc is not None else None
        if source is None:
            return True
        with contextlib.suppress(NotFound):
            self.caches["persistentvolumeclaims"].put(await self.client.patch(
                self.pvc_kind, key[0], key[1],
                {"metadata": {"annotations": {cdi.ANN_POPULATE: source.to_json()}}}))
        return True

    async def apply(self, dv: Obj, action: DVAction) -> None:
        try:
            if isinstance(action, CreateClaim):
                try:
                    pvc = await self.client.create(self.pvc_kind, action.pvc["metadata"][
                        "namespace"], action.pvc)
                except AlreadyExists:
                    return  # its watch event brings it
                self.caches["persistentvolumeclaims"].put(pvc)
                log.info("DataVolume %s/%s: created its claim", pvc["metadata"]["namespace"],
                         pvc["metadata"]["name"])
            elif isinstance(action, PatchClaim):
                self.caches["persistentvolumeclaims"].put(await self.client.patch(
                    self.pvc_kind, action.namespace, action.name, action.patch))
            elif isinstance(action, SetStatus):
                out = await self.client.patch(self.dv_kind, action.namespace, action.name,
                                              {"status": action.status},
                                              subresource="status")
                self.caches["datavolumes"].put(out)
                old = (dv.get("status") or {}).get("phase")
                if old != action.status.get("phase"):
                    log.info("DataVolume %s/%s: %s", action.namespace, action.name,
                             action.status.get("phase"))
            elif isinstance(action, RecordEvent):
                await events.record(self.client, dv, self.dv_kind, action.type, action.reason,
                                    action.message)
        except NotFound:
            pass  # gone meanwhile: its watch event queues another pass
