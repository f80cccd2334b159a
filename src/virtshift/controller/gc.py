"""Garbage collection by ownerReferences, propagation finalizers, and namespace deletion.

The roles of kube-controller-manager's garbage collector and namespace controller:
- a dependent whose owners are all gone is deleted (background propagation);
- an owner deleted with ``propagationPolicy: Foreground`` keeps its ``foregroundDeletion``
  finalizer until its dependents are gone; with ``Orphan`` its dependents lose their reference to
  it, then its ``orphan`` finalizer is removed;
- a namespace being deleted has everything in it deleted, then its ``kubernetes`` finalizer is
  removed through the ``finalize`` subresource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.client.informer import Reflector
from virtshift.client.rest import Client
from virtshift.errors import ApiError, Conflict, NotFound

log = logging.getLogger(__name__)

FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
NAMESPACE_FINALIZER = "kubernetes"


@dataclass
class Entry:
    kind: KindInfo
    obj: Obj

    @property
    def meta(self) -> Obj:
        m: Obj = self.obj.get("metadata", {})
        return m

    @property
    def uid(self) -> str:
        return str(self.meta.get("uid", ""))

    @property
    def namespace(self) -> str | None:
        ns = self.meta.get("namespace")
        return str(ns) if ns else None

    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    @property
    def deleting(self) -> bool:
        return bool(self.meta.get("deletionTimestamp"))

    @property
    def owner_uids(self) -> list[str]:
        return [str(r.get("uid")) for r in self.meta.get("ownerReferences") or []]


def storage_kinds(registry: Registry) -> list[KindInfo]:
    """One kind per stored collection (a kind served in two versions is watched once)."""
    seen: set[tuple[str, str]] = set()
    out: list[KindInfo] = []
    for k in registry.kinds:
        if (k.group, k.plural) not in seen:
            seen.add((k.group, k.plural))
            out.append(k)
    return out


class GarbageCollector:
    def __init__(self, client: Client, registry: Registry) -> None:
        self.client = client
        self.registry = registry
        self.kinds = storage_kinds(registry)
        self.objects: dict[str, Entry] = {}
        self.dependents: dict[str, set[str]] = {}
        self.synced: set[str] = set()
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- cache -------------------------------------------------------------------------------

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        uid = str(obj.get("metadata", {}).get("uid", ""))
        if not uid:
            return
        old = self.objects.get(uid)
        if old is not None:
            for o in old.owner_uids:
                self.dependents.get(o, set()).discard(uid)
                self.dirty.add(o)
        if event == "DELETED":
            self.objects.pop(uid, None)
            self.dirty.update(self.dependents.get(uid, set()))
            ns = obj.get("metadata", {}).get("namespace")
            if ns:
                self.dirty.update(e.uid for e in self.objects.values()
                                  if e.kind.kind == "Namespace" and e.name == ns)
        else:
            entry = Entry(kind, obj)
            self.objects[uid] = entry
            for o in entry.owner_uids:
                self.dependents.setdefault(o, set()).add(uid)
            self.dirty.add(uid)
            self.dirty.update(self.dependents.get(uid, set()))
        self.wake.set()

    def _on_synced(self, kind: KindInfo) -> None:
        self.synced.add(f"{kind.group}/{kind.plural}")
        self.dirty.update(self.objects)
        self.wake.set()

    @property
    def all_synced(self) -> bool:
        return len(self.synced) == len(self.kinds)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        for k in self.kinds:
            r = Reflector(self.client, k, self._on_event, self._on_synced)
            self._tasks.append(asyncio.create_task(r.run(), name=f"reflector-{k.plural}"))
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if not self.all_synced:
                    continue
                batch, self.dirty = self.dirty, set()
                for uid in batch:
                    try:
                        await self.reconcile(uid)
                    except ApiError as e:
                        log.warning("garbage collection of %s: %s", uid, e)
                        self.dirty.add(uid)
                if self.dirty:
                    await asyncio.sleep(0.2)
                    self.wake.set()
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    # ---- reconcile ---------------------------------------------------------------------------

    async def reconcile(self, uid: str) -> None:
        entry = self.objects.get(uid)
        if entry is None:
            return
        await self._dependent(entry)
        if entry.deleting:
            await self._owner(entry)
            if entry.kind.group == "" and entry.kind.kind == "Namespace":
                await self._namespace(entry)

    async def _dependent(self, entry: Entry) -> None:
        refs = entry.meta.get("ownerReferences") or []
        if not refs:
            return
        keep: list[Obj] = []
        foreground = False
        for ref in refs:
            owner = self.objects.get(str(ref.get("uid")))
            if owner is None:
                continue
            if owner.deleting and ORPHAN in (owner.meta.get("finalizers") or []):
                continue
            if owner.deleting and FOREGROUND in (owner.meta.get("finalizers") or []):
                foreground = True
            keep.append(ref)
        if not keep:
            if any(self.objects.get(str(r.get("uid"))) is not None for r in refs):
                await self._set_owner_refs(entry, keep)  # every owner orphans it
                return
            if not entry.deleting:
                log.info("deleting %s %s/%s: its owners are gone", entry.kind.kind,
                         entry.namespace or "", entry.name)
                await self._delete(entry, "Background")
            return
        if foreground and all(
            self.objects[str(r.get("uid"))].deleting for r in keep
        ) and not entry.deleting:
            await self._delete(entry, "Foreground")
            return
        if len(keep) != len(refs):
            await self._set_owner_refs(entry, keep)

    async def _owner(self, entry: Entry) -> None:
        fins = list(entry.meta.get("finalizers") or [])
        deps = [self.objects[d] for d in self.dependents.get(entry.uid, set())
                if d in self.objects]
        if ORPHAN in fins and not deps:
            await self._drop_finalizer(entry, ORPHAN)
        elif FOREGROUND in fins:
            blocking = [d for d in deps if not d.deleting or d.meta.get("finalizers")]
            for d in deps:
                if not d.deleting:
                    await self._delete(d, "Foreground")
            if not blocking:
                await self._drop_finalizer(entry, FOREGROUND)

    async def _namespace(self, entry: Entry) -> None:
        ns = entry.name
        contents = [e for e in self.objects.values() if e.namespace == ns and e.kind.namespaced]
        for e in contents:
            if not e.deleting:
                await self._delete(e, "Background")
        if contents:
            return
        spec_fins = list((entry.obj.get("spec") or {}).get("finalizers") or [])
        if NAMESPACE_FINALIZER in spec_fins:
            obj = dict(entry.obj)
            obj["spec"] = {**(entry.obj.get("spec") or {}),
                           "finalizers": [f for f in spec_fins if f != NAMESPACE_FINALIZER]}
            with contextlib.suppress(NotFound, Conflict):
                await self.client.update(entry.kind, None, obj, subresource="finalize")

    # ---- writes ------------------------------------------------------------------------------

    async def _delete(self, entry: Entry, propagation: str) -> None:
        with contextlib.suppress(NotFound, Conflict):
            await self.client.delete(entry.kind, entry.namespace, entry.name,
                                     propagation=propagation, uid=entry.uid)

    async def _set_owner_refs(self, entry: Entry, refs: list[Obj]) -> None:
        rv = entry.meta.get("resourceVersion")
        patch = {"metadata": {"ownerReferences": refs or None, "resourceVersion": rv}}
        with contextlib.suppress(NotFound, Conflict):
            await self.client.patch(entry.kind, entry.namespace, entry.name, patch)

    async def _drop_finalizer(self, entry: Entry, finalizer: str) -> None:
        fins = [f for f in entry.meta.get("finalizers") or [] if f != finalizer]
        rv = entry.meta.get("resourceVersion")
        patch = {"metadata": {"finalizers": fins or None, "resourceVersion": rv}}
        with contextlib.suppress(NotFound, Conflict):
            await self.client.patch(entry.kind, entry.namespace, entry.name, patch)
