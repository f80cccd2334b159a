"""The migration controller's loop: caches fed by Reflectors, one migration at a time, the pure
decisions of :mod:`virtshift.controller.migration` applied through the client."""

from __future__ import annotations

import asyncio
import datetime
import logging

from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.api.migration import MIGRATION_FINALIZER, VMI_NAME_LABEL
from virtshift.client.rest import Client
from virtshift.controller import events
from virtshift.controller.manager import ObjectCache, WorkQueue, run_reflectors, serve
from virtshift.controller.migration import (
    MigrationInputs,
    PatchVMILabels,
    PatchVMIStatus,
    RecordEvent,
    SetMigrationFinalizer,
    UpdateMigrationStatus,
    reconcile_migration,
)
from virtshift.controller.vmi import Key, as_dict, as_list, key_of, meta
from virtshift.errors import NotFound

log = logging.getLogger(__name__)


class MigrationController:
    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client
        kind = registry.require
        self.vmim_kind = kind("kubevirt.io", "v1", "VirtualMachineInstanceMigration")
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.node_kind = kind("", "v1", "Node")
        self.kv_kind = kind("kubevirt.io", "v1", "KubeVirt")
        self.policy_kind = kind("migrations.kubevirt.io", "v1alpha1", "MigrationPolicy")
        self.ns_kind = kind("", "v1", "Namespace")
        self.kinds = [self.vmim_kind, self.vmi_kind, self.node_kind, self.kv_kind,
                      self.policy_kind, self.ns_kind]
        self.caches = {k.plural: ObjectCache() for k in self.kinds}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()

    @property
    def vmims(self) -> ObjectCache:
        return self.caches[self.vmim_kind.plural]

    @property
    def vmis(self) -> ObjectCache:
        return self.caches[self.vmi_kind.plural]

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self.caches[kind.plural].apply(event, obj)
        if kind is self.vmim_kind:
            self.queue.add(key_of(obj))
        elif kind is self.vmi_kind:
            ns, name = key_of(obj)
            for m in self.vmims.values():
                if key_of(m)[0] == ns and as_dict(m.get("spec")).get("vmiName") == name:
                    self.queue.add(key_of(m))
        elif kind is self.node_kind:
            for m in self.vmims.values():
                self.queue.add(key_of(m))

    async def run(self) -> None:
        tasks = await run_reflectors(self.client, self.kinds, self._on_event, self.synced,
                                     "migration")
        await serve("migration", tasks, self.synced, self.queue, self.reconcile)

    async def reconcile(self, key: Key) -> bool:
        vmim = self.vmims.get(key)
        if vmim is None:
            return True
        ns = key[0]
        vmi_name = str(as_dict(vmim.get("spec")).get("vmiName", ""))
        vmi = self.vmis.get((ns, vmi_name))
        plan = reconcile_migration(MigrationInputs(
            vmim=vmim, vmi=vmi, now=datetime.datetime.now(datetime.UTC),
            nodes=self.caches[self.node_kind.plural].values(), vmis=self.vmis.values(),
            vmims=self.vmims.values(), kubevirts=self.caches[self.kv_kind.plural].values(),
            policies=self.caches[self.policy_kind.plural].values(),
            namespace=self.caches[self.ns_kind.plural].get(("", ns))))
        current: Obj | None = vmim
        for action in plan.actions:
            if current is None:
                return True  # the migration object is gone
            try:
                if isinstance(action, SetMigrationFinalizer):
                    current = await self._finalizer(current, action.present)
                elif isinstance(action, UpdateMigrationStatus):
                    before = str(as_dict(current.get("status")).get("phase") or "")
                    current = await self.client.update(
                        self.vmim_kind, ns, {**current, "status": action.status},
                        subresource="status")
                    after = str(action.status.get("phase") or "")
                    if before != after:
                        log.info("migration %s/%s (VMI %s): %s -> %s", ns, key[1], vmi_name,
                                 before or '""', after)
                elif isinstance(action, PatchVMIStatus):
                    vmi = await self.client.patch(self.vmi_kind, ns, vmi_name,
                                                  {"status": action.patch},
                                                  subresource="status")
                    self.vmis.put(vmi)
                elif isinstance(action, PatchVMILabels):
                    vmi = await self.client.patch(self.vmi_kind, ns, vmi_name,
                                                  {"metadata": {"labels": action.labels}})
                    self.vmis.put(vmi)
                elif isinstance(action, RecordEvent):
                    if action.on_vmi and vmi is not None:
                        await events.record(self.client, vmi, self.vmi_kind, action.type,
                                            action.reason, action.message)
                    elif not action.on_vmi:
                        await events.record(self.client, current, self.vmim_kind,
                                            action.type, action.reason, action.message)
            except NotFound:
                if isinstance(action, SetMigrationFinalizer | UpdateMigrationStatus):
                    return True  # the migration object is gone
                continue
            if current is not None and current is not vmim:
                self.vmims.put(current)
        if plan.requeue_after is not None:
            self.queue.add_after(key, plan.requeue_after)
        return True

    async def _finalizer(self, vmim: Obj, present: bool) -> Obj | None:
        ns, name = key_of(vmim)
        fins = [f for f in as_list(meta(vmim).get("finalizers")) if f != MIGRATION_FINALIZER]
        if present:
            fins.append(MIGRATION_FINALIZER)
        labels = as_dict(meta(vmim).get("labels"))
        patch: Obj = {"metadata": {"finalizers": fins or None,
                                   "resourceVersion": meta(vmim).get("resourceVersion")}}
        if present and VMI_NAME_LABEL not in labels:
            patch["metadata"]["labels"] = {
                VMI_NAME_LABEL: str(as_dict(vmim.get("spec")).get("vmiName", ""))}
        out = await self.client.patch(self.vmim_kind, ns, name, patch)
        if not present and meta(out).get("deletionTimestamp") and not fins:
            self.vmims.forget(out)
            return None
        return out
