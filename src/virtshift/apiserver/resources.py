"""REST semantics for every registered kind, independent of HTTP.

create/get/list/update/patch/delete follow Kubernetes' generic registry: optimistic concurrency
on ``metadata.resourceVersion``, ``generation`` bumps on spec changes, the ``status`` subresource,
finalizers and ``deletionTimestamp``, dry runs, managed fields and admission (defaulting, schema
validation with ``fieldValidation``, semantic checks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from virtshift.api import admission
from virtshift.api.admission import migration as migration_admission
from virtshift.api.cdi import PVC_PROTECTION
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.api.patch import json_patch, merge_patch, strategic_merge_patch
from virtshift.api.schema import SchemaSet
from virtshift.api.selectors import FieldSelector, LabelSelector
from virtshift.api.ssa import server_side_apply, update_managed_fields
from virtshift.apiserver import meta as m
from virtshift.apiserver.auth import UserInfo, is_component
from virtshift.apiserver.nscache import NamespaceCache
from virtshift.errors import (
    AdmissionDenied,
    AlreadyExists,
    BadRequest,
    Compacted,
    Conflict,
    Expired,
    FieldError,
    Forbidden,
    Invalid,
    KeyExists,
    KeyNotFound,
    NotFound,
    RevisionMismatch,
    UnsupportedMediaType,
)
from virtshift.store.base import Record, Store

PATCH_JSON = "application/json-patch+json"
PATCH_MERGE = "application/merge-patch+json"
PATCH_STRATEGIC = "application/strategic-merge-patch+json"
PATCH_APPLY_YAML = "application/apply-patch+yaml"
PATCH_APPLY_JSON = "application/apply-patch+json"
PATCH_TYPES = (PATCH_JSON, PATCH_MERGE, PATCH_STRATEGIC, PATCH_APPLY_YAML, PATCH_APPLY_JSON)

PROTECTED_NAMESPACES = frozenset({"default", "kube-system", "kube-public"})
NAMESPACE_FINALIZER = "kubernetes"
PATCH_RETRIES = 8
LIST_SCAN_CHUNK = 500
MIGRATION = ("kubevirt.io", "VirtualMachineInstanceMigration")


@dataclass
class WriteContext:
    user: UserInfo
    dry_run: bool = False
    field_manager: str = ""
    field_validation: str = "Strict"
    warnings: list[str] = field(default_factory=list)


def _pins_version(patch_type: str, body: Any) -> bool:
    """Whether a patch body sets ``metadata.resourceVersion`` (a precondition)."""
    if isinstance(body, list):
        return any(isinstance(op, dict) and op.get("path") == "/metadata/resourceVersion"
                   for op in body)
    if isinstance(body, dict):
        meta = body.get("metadata")
        return isinstance(meta, dict) and meta.get("resourceVersion") is not None
    return False


def _optimistic_lock_message(kind: KindInfo, name: str) -> str:
    return (
        f'Operation cannot be fulfilled on {kind.group_resource} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )


def _manager_for(ctx: WriteContext, user_agent_default: str = "unknown") -> str:
    return ctx.field_manager or user_agent_default


def encode_continue(revision: int, last_key: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": last_key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise BadRequest(f"continue key is not valid: {e}") from e


class Resources:
    """Kubernetes' generic registry over a :class:`Store`."""

    def __init__(self, store: Store, registry: Registry, schemas: SchemaSet) -> None:
        self.store = store
        self.registry = registry
        self.schemas = schemas
        # Held from the migration create admitter's in-flight check to the write, so that two
        # concurrent migrations of one VMI cannot both be admitted.
        self._migration_create = asyncio.Lock()
        # Set by the API server while it serves (a watch keeps it current); None: read each time.
        self.namespaces: NamespaceCache | None = None

    # ---- reading -----------------------------------------------------------------------------

    def to_api(self, kind: KindInfo, rec: Record) -> Obj:
        return m.api_object(kind, rec.value, rec.revision)

    def not_found(self, kind: KindInfo, name: str) -> NotFound:
        return NotFound(f'{kind.group_resource} "{name}" not found',
                        name=name, group=kind.group, kind=kind.plural)

    async def _record(self, kind: KindInfo, ns: str | None, name: str) -> Record:
        rec = await self.store.get(m.store_key(kind, ns, name))
        if rec is None:
            raise self.not_found(kind, name)
        return rec

    async def get(self, kind: KindInfo, ns: str | None, name: str) -> Obj:
        return self.to_api(kind, await self._record(kind, ns, name))

    async def list_objects(
        self,
        kind: KindInfo,
        ns: str | None,
        *,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        limit: int = 0,
        continue_token: str | None = None,
    ) -> tuple[list[Obj], Obj]:
        """Returns (items, list metadata) with ``continue`` when ``limit`` cut the list short."""
        prefix = m.store_key(kind, ns)
        start_after: str | None = None
        if continue_token:
            token_rev, start_after = decode_continue(continue_token)
            if token_rev < self.store.compacted_revision:
                raise Expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter."
                )
        exact = fields.exact_name() if fields is not None else None
        if exact is not None and (ns or not kind.namespaced):
            rec = await self.store.get(m.store_key(kind, ns, exact))
            found = [self.to_api(kind, rec)] if rec else []
            found = [o for o in found if self._selected(o, labels, fields)]
            return found, {"resourceVersion": str(self.store.revision)}

        filtering = labels is not None or fields is not None
        items: list[Obj] = []
        revision = 0
        while True:
            chunk = limit - len(items) if limit and not filtering else (
                LIST_SCAN_CHUNK if limit else 0)
            res = await self.store.list(prefix, limit=chunk, start_after=start_after)
            revision = revision or res.revision
            for rec in res.records:
                obj = self.to_api(kind, rec)
                start_after = rec.key
                if self._selected(obj, labels, fields):
                    items.append(obj)
                    if limit and len(items) >= limit:
                        break
            if limit and len(items) >= limit:
                more = res.more or rec is not res.records[-1]
                meta: Obj = {"resourceVersion": str(revision)}
                if more and start_after is not None:
                    meta["continue"] = encode_continue(revision, start_after)
                    if not filtering:
                        meta["remainingItemCount"] = res.remaining
                return items, meta
            if not res.more:
                return items, {"resourceVersion": str(revision)}

    @staticmethod
    def _selected(obj: Obj, labels: LabelSelector | None, fields: FieldSelector | None) -> bool:
        if labels is not None and not labels.matches(obj.get("metadata", {}).get("labels") or {}):
            return False
        return fields is None or fields.matches(obj)

    # ---- admission -----------------------------------------------------------------------------

    def _admit(self, kind: KindInfo, obj: Obj, old: Obj | None, ctx: WriteContext,
               *, default: bool = True) -> Obj:
        name = str(obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get(
            "generateName") or "")
        if default:
            obj = admission.default(kind, obj)
        unpruned = obj
        try:
            obj, warnings = self.schemas.validate(kind, obj,
                                                  field_validation=ctx.field_validation)
        except Invalid as e:
            unknown = [c for c in e.causes if c.type == "FieldValueUnknown"]
            if unknown:
                # Kubernetes rejects unknown fields while decoding, before validation: 400.
                listed = ", ".join(c.text() for c in unknown)
                raise BadRequest(
                    f'{kind.kind} in version "{kind.version}" cannot be handled as a '
                    f"{kind.kind}: strict decoding error: {listed}") from None
            raise
        ctx.warnings.extend(warnings)
        errs = m.validate_metadata(kind, obj.get("metadata") or {})
        # KubeVirt's and CDI's admission reads the object as sent (an explicit null counts).
        errs += admission.validate(kind, unpruned, old, internal=is_component(ctx.user))
        if errs:
            raise Invalid.for_object(kind.kind, kind.group, name, errs)
        return obj

    async def _admit_against_store(self, kind: KindInfo, ns: str | None, obj: Obj) -> None:
        """The validating webhooks' checks that read other objects: the migration create
        admitter's (the VMI and the namespace's migrations)."""
        if (kind.group, kind.kind) != MIGRATION or ns is None:
            return
        vmi_kind = self.registry.require("kubevirt.io", "v1", "VirtualMachineInstance")
        vmi_name = str((obj.get("spec") or {}).get("vmiName") or "")
        rec = await self.store.get(m.store_key(vmi_kind, ns, vmi_name))
        vmi = self.to_api(vmi_kind, rec) if rec is not None else None
        migrations: list[Obj] = []
        if vmi is not None:
            migrations, _ = await self.list_objects(kind, ns)
        message = migration_admission.create_denial(obj, vmi, migrations)
        if message is not None:
            raise AdmissionDenied(migration_admission.denied(message))

    def _check_body_type(self, kind: KindInfo, obj: Any) -> Obj:
        if not isinstance(obj, dict):
            raise BadRequest("the body of the request was in an unknown format - accepted media "
                             "types include: application/json, application/yaml")
        if kind.builtin:
            # Built-in kinds take their version and kind from the URL when the body omits them.
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.kind)
        api_version = obj.get("apiVersion")
        body_kind = obj.get("kind")
        if not body_kind:
            raise BadRequest(f"Object 'Kind' is missing in '{json.dumps(obj)[:200]}'")
        if not api_version:
            raise BadRequest(f"Object 'apiVersion' is missing in '{json.dumps(obj)[:200]}'")
        if api_version != kind.api_version:
            raise BadRequest(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({kind.api_version})")
        if body_kind != kind.kind:
            raise BadRequest(
                f"the kind in the data ({body_kind}) does not match the expected kind "
                f"({kind.kind})")
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        return obj

    async def _check_namespace(self, kind: KindInfo, ns: str | None) -> None:
        if not kind.namespaced or ns is None:
            return
        if self.namespaces is not None and self.namespaces.is_active(ns):
            return
        ns_kind = self.registry.by_kind("", "v1", "Namespace")
        assert ns_kind is not None
        rec = await self.store.get(m.store_key(ns_kind, None, ns))
        if rec is None:
            raise NotFound(f'namespaces "{ns}" not found', name=ns, kind="namespaces")
        if rec.value.get("metadata", {}).get("deletionTimestamp"):
            raise Forbidden(
                f'{kind.plural}{"." + kind.group if kind.group else ""} is forbidden: unable to '
                f"create new content in namespace {ns} because it is being terminated",
                name=ns, kind="namespaces",
            )
        if self.namespaces is not None:
            self.namespaces.remember(ns, rec.revision)

    # ---- create --------------------------------------------------------------------------------

    async def create(self, kind: KindInfo, ns: str | None, body: Any, ctx: WriteContext,
                     *, managed_done: bool = False) -> Obj:
        if (kind.group, kind.kind) != MIGRATION:
            return await self._create(kind, ns, body, ctx, managed_done=managed_done)
        async with self._migration_create:
            return await self._create(kind, ns, body, ctx, managed_done=managed_done)

    async def _create(self, kind: KindInfo, ns: str | None, body: Any, ctx: WriteContext,
                      *, managed_done: bool) -> Obj:
        # The body is the caller's to give away (a freshly decoded request): no copy is made.
        obj = self._check_body_type(kind, body)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and ns and body_ns != ns:
                raise BadRequest("the namespace of the provided object does not match the "
                                 "namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        for f in m.SYSTEM_META:
            meta.pop(f, None)
        if kind.has_status and kind.group:
            # Custom resources with a status subresource ignore status on create.
            obj.pop("status", None)
        generated = not meta.get("name") and bool(meta.get("generateName"))
        if generated:
            meta["name"] = m.generate_name(str(meta["generateName"]))
        errs = m.validate_name(kind, meta.get("name"))
        if errs:
            raise Invalid.for_object(kind.kind, kind.group, str(meta.get("name") or ""), errs)
        await self._check_namespace(kind, ns)
        self._builtin_create_defaults(kind, obj)
        obj = self._admit(kind, obj, None, ctx)
        await self._admit_against_store(kind, ns, obj)
        meta = obj["metadata"]
        now = m.now_rfc3339()
        meta["uid"] = m.new_uid()
        meta["creationTimestamp"] = now
        meta["generation"] = 1
        if not managed_done:
            obj = update_managed_fields(kind, None, obj, manager=_manager_for(ctx),
                                        operation="Update", now=now)
        obj.pop("apiVersion", None)
        obj.pop("kind", None)
        stored = {"apiVersion": kind.api_version, "kind": kind.kind, **obj}
        if ctx.dry_run:
            out = m.deep(stored)
            out["metadata"]["resourceVersion"] = ""
            return out
        for attempt in range(5 if generated else 1):
            try:
                rec = await self.store.create(m.store_key(kind, ns, meta["name"]), stored)
                return self.to_api(kind, rec)
            except KeyExists:
                if not generated or attempt == 4:
                    raise AlreadyExists(
                        f'{kind.group_resource} "{meta["name"]}" already exists',
                        name=meta["name"], group=kind.group, kind=kind.plural) from None
                meta["name"] = m.generate_name(str(meta["generateName"]))
        raise AssertionError("unreachable")

    @staticmethod
    def _builtin_create_defaults(kind: KindInfo, obj: Obj) -> None:
        if kind.group == "" and kind.kind == "Namespace":
            spec = obj.setdefault("spec", {})
            spec["finalizers"] = [NAMESPACE_FINALIZER]
            obj["status"] = {"phase": "Active"}
        elif kind.group == "" and kind.kind == "PersistentVolumeClaim":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
            # StorageObjectInUseProtection: the storage controller lets it go once unused
            meta = obj.setdefault("metadata", {})
            fins = meta.get("finalizers") if isinstance(meta.get("finalizers"), list) else []
            if PVC_PROTECTION not in fins:
                meta["finalizers"] = [*fins, PVC_PROTECTION]
            obj["spec"].setdefault("volumeMode", "Filesystem") if isinstance(
                obj.get("spec"), dict) else None
        elif kind.group == "" and kind.kind == "PersistentVolume":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif kind.group == "" and kind.kind == "Secret":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict):
                data = obj.setdefault("data", {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()

    # ---- update --------------------------------------------------------------------------------

    async def update(self, kind: KindInfo, ns: str | None, name: str, body: Any,
                     ctx: WriteContext, *, subresource: str = "") -> Obj:
        obj = m.deep(self._check_body_type(kind, body))
        meta = obj.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise BadRequest(f"the name of the object ({meta.get('name')}) does not match the "
                             f"name on the URL ({name})")
        rv = meta.get("resourceVersion")
        rec = await self._record(kind, ns, name)
        if not rv and kind.group:
            raise Invalid.for_object(kind.kind, kind.group, name, [FieldError(
                "FieldValueInvalid", "metadata.resourceVersion",
                "0x0: must be specified for an update")])
        if rv and str(rv) != str(rec.revision):
            raise Conflict(_optimistic_lock_message(kind, name), name=name, group=kind.group,
                           kind=kind.plural)
        return await self._write_update(kind, ns, rec, obj, ctx, subresource=subresource)

    async def _write_update(self, kind: KindInfo, ns: str | None, rec: Record, new_in: Obj,
                            ctx: WriteContext, *, subresource: str = "",
                            managed_done: bool = False) -> Obj:
        old = self.to_api(kind, rec)
        old_meta = old["metadata"]
        name = old_meta["name"]
        new = m.deep(new_in)
        new["apiVersion"] = kind.api_version
        new["kind"] = kind.kind
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        if subresource == "status":
            status = new.get("status")
            managed = meta.get("managedFields")
            new = m.deep(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            if managed is not None and managed_done:
                new["metadata"]["managedFields"] = managed
            meta = new["metadata"]
        else:
            if kind.has_status:
                if "status" in old:
                    new["status"] = m.deep(old["status"])
                else:
                    new.pop("status", None)
        for f in m.SYSTEM_META:
            if f in old_meta:
                meta[f] = old_meta[f]
            else:
                meta.pop(f, None)
        meta["name"] = name
        if kind.namespaced:
            if meta.get("namespace") not in (None, ns):
                raise Invalid.for_object(kind.kind, kind.group, name, [FieldError(
                    "FieldValueInvalid", "metadata.namespace", "field is immutable")])
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        deleting = bool(old_meta.get("deletionTimestamp"))
        if deleting:
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise Invalid.for_object(kind.kind, kind.group, name, [FieldError(
                    "FieldValueForbidden", "metadata.finalizers",
                    "no new finalizers can be added if the object is being deleted, found new "
                    f"finalizers {json.dumps(sorted(added))}")])
        new = self._admit(kind, new, old, ctx, default=subresource != "status")
        meta = new["metadata"]
        if m.spec_part(new) != m.spec_part(old):
            meta["generation"] = int(old_meta.get("generation") or 0) + 1
        now = m.now_rfc3339()
        if not managed_done:
            new = update_managed_fields(kind, old, new, manager=_manager_for(ctx),
                                        operation="Update", subresource=subresource, now=now)
        if _same(new, old):
            return old
        if ctx.dry_run:
            return new
        key = m.store_key(kind, ns, name)
        stored = m.storable(new)
        try:
            if deleting and not self._blocking_finalizers(kind, stored):
                deleted = await self.store.delete(key, expected_revision=rec.revision)
                out = self.to_api(kind, deleted)
                out["metadata"]["resourceVersion"] = str(deleted.revision)
                return out
            rec2 = await self.store.update(key, stored, expected_revision=rec.revision)
        except RevisionMismatch:
            raise Conflict(_optimistic_lock_message(kind, name), name=name, group=kind.group,
                           kind=kind.plural) from None
        except KeyNotFound:
            raise self.not_found(kind, name) from None
        return self.to_api(kind, rec2)

    @staticmethod
    def _blocking_finalizers(kind: KindInfo, obj: Obj) -> list[str]:
        fins = list(obj.get("metadata", {}).get("finalizers") or [])
        if kind.group == "" and kind.kind == "Namespace":
            fins += list((obj.get("spec") or {}).get("finalizers") or [])
        return fins

    # ---- patch ---------------------------------------------------------------------------------

    async def patch(self, kind: KindInfo, ns: str | None, name: str, patch_type: str,
                    body: Any, ctx: WriteContext, *, subresource: str = "",
                    force: bool = False) -> tuple[Obj, bool]:
        """Returns (object, created). Apply patches create missing objects."""
        apply = patch_type in (PATCH_APPLY_YAML, PATCH_APPLY_JSON)
        if patch_type == PATCH_STRATEGIC and not kind.builtin:
            raise UnsupportedMediaType(
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {PATCH_JSON}, {PATCH_MERGE}, {PATCH_APPLY_YAML}")
        if patch_type not in PATCH_TYPES:
            raise UnsupportedMediaType(f"unsupported patch type {patch_type!r}")
        if apply:
            if not ctx.field_manager:
                raise BadRequest("PATCH, application/apply-patch+yaml requests require a "
                                 "non-empty fieldManager")
            body = self._check_body_type(kind, body)
            body_name = (body.get("metadata") or {}).get("name")
            if body_name and body_name != name:
                raise BadRequest(f"the name of the object ({body_name}) does not match the "
                                 f"name on the URL ({name})")
        for attempt in range(PATCH_RETRIES):
            rec = await self.store.get(m.store_key(kind, ns, name))
            if rec is None:
                if not apply:
                    raise self.not_found(kind, name)
                applied = m.deep(body)
                applied.setdefault("metadata", {})["name"] = name
                created = server_side_apply(kind, None, applied, manager=ctx.field_manager,
                                            force=force, now=m.now_rfc3339())
                try:
                    return await self.create(kind, ns, created, ctx, managed_done=True), True
                except AlreadyExists:
                    continue
            current = self.to_api(kind, rec)
            if apply:
                patched = server_side_apply(kind, current, m.deep(body),
                                            manager=ctx.field_manager, force=force,
                                            now=m.now_rfc3339())
            elif patch_type == PATCH_JSON:
                patched = json_patch(current, body)
            elif patch_type == PATCH_MERGE:
                patched = merge_patch(current, body)
            else:
                patched = strategic_merge_patch(kind, current, body)
            if not isinstance(patched, dict):
                raise BadRequest("the patch did not produce an object")
            # The object carries the version it was read at; only a patch that sets
            # resourceVersion itself makes it a precondition (a plain patch is re-applied to
            # the newest object on a write conflict, as Kubernetes does).
            version = (patched.get("metadata") or {}).get("resourceVersion")
            if version and str(version) != str(rec.revision):
                raise Conflict(_optimistic_lock_message(kind, name), name=name,
                               group=kind.group, kind=kind.plural)
            pinned = _pins_version(patch_type, body)
            try:
                out = await self._write_update(kind, ns, rec, patched, ctx,
                                               subresource=subresource, managed_done=apply)
                return out, False
            except Conflict:
                if pinned or attempt == PATCH_RETRIES - 1:
                    raise
        raise Conflict(_optimistic_lock_message(kind, name), name=name, group=kind.group,
                       kind=kind.plural)

    # ---- delete --------------------------------------------------------------------------------

    async def delete(self, kind: KindInfo, ns: str | None, name: str, options: Obj,
                     ctx: WriteContext) -> tuple[Obj, bool]:
        """Returns (body, gone). ``gone`` is False when finalizers keep the object."""
        if kind.group == "" and kind.kind == "Namespace" and name in PROTECTED_NAMESPACES:
            raise Forbidden(f'namespaces "{name}" is forbidden: this namespace may not be '
                            "deleted", name=name, kind="namespaces")
        for _attempt in range(PATCH_RETRIES):
            rec = await self._record(kind, ns, name)
            obj = self.to_api(kind, rec)
            meta = obj["metadata"]
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise Conflict(f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                               f"object meta: {meta.get('uid')}", name=name, group=kind.group,
                               kind=kind.plural)
            if pre.get("resourceVersion") and str(pre["resourceVersion"]) != str(rec.revision):
                raise Conflict(
                    f"Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: {rec.revision}",
                    name=name, group=kind.group, kind=kind.plural)
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is True:
                policy = "Orphan"
            if policy not in (None, "Background", "Foreground", "Orphan"):
                raise Invalid.for_object("DeleteOptions", "", "", [FieldError(
                    "FieldValueNotSupported", "propagationPolicy",
                    f'"{policy}": supported values: "Foreground", "Background", "Orphan", '
                    '"nil"')])
            fins = list(meta.get("finalizers") or [])
            if policy == "Foreground" and "foregroundDeletion" not in fins:
                fins.append("foregroundDeletion")
            if policy == "Orphan" and "orphan" not in fins:
                fins.append("orphan")
            probe = m.deep(obj)
            probe["metadata"]["finalizers"] = fins
            key = m.store_key(kind, ns, name)
            if self._blocking_finalizers(kind, probe):
                if meta.get("deletionTimestamp") and fins == list(meta.get("finalizers") or []):
                    return obj, False
                new = probe
                nm = new["metadata"]
                if fins:
                    nm["finalizers"] = fins
                if not nm.get("deletionTimestamp"):
                    nm["deletionTimestamp"] = m.now_rfc3339()
                    nm["deletionGracePeriodSeconds"] = 0
                    nm["generation"] = int(nm.get("generation") or 0) + 1
                if kind.group == "" and kind.kind == "Namespace":
                    new.setdefault("status", {})["phase"] = "Terminating"
                if ctx.dry_run:
                    return new, False
                stored = m.storable(new)
                try:
                    rec2 = await self.store.update(key, stored, expected_revision=rec.revision)
                except (RevisionMismatch, KeyNotFound):
                    continue
                return self.to_api(kind, rec2), False
            if ctx.dry_run:
                return obj, True
            try:
                deleted = await self.store.delete(key, expected_revision=rec.revision)
            except (RevisionMismatch, KeyNotFound):
                continue
            out = self.to_api(kind, deleted)
            out["metadata"]["resourceVersion"] = str(deleted.revision)
            return out, True
        raise Conflict(_optimistic_lock_message(kind, name), name=name, group=kind.group,
                       kind=kind.plural)

    def deleted_status(self, kind: KindInfo, obj: Obj) -> Obj:
        meta = obj.get("metadata", {})
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": meta.get("name"), "group": kind.group, "kind": kind.plural,
                        "uid": meta.get("uid")},
        }

    async def delete_collection(self, kind: KindInfo, ns: str | None, options: Obj,
                                ctx: WriteContext, *, labels: LabelSelector | None,
                                fields: FieldSelector | None) -> list[Obj]:
        items, _ = await self.list_objects(kind, ns, labels=labels, fields=fields)
        out: list[Obj] = []
        for obj in items:
            try:
                deleted, _gone = await self.delete(kind, ns or obj["metadata"].get("namespace"),
                                                   obj["metadata"]["name"], options, ctx)
                out.append(deleted)
            except NotFound:
                continue
        return out

    # ---- watch support -----------------------------------------------------------------------

    def check_watch_revision(self, revision: int) -> None:
        if revision < self.store.compacted_revision:
            raise Expired(f"too old resource version: {revision} "
                          f"({self.store.compacted_revision + 1})")

    @staticmethod
    def compacted_to_expired(e: Compacted) -> Expired:
        return Expired(f"too old resource version: {e.requested} ({e.compacted + 1})")


def _same(a: Obj, b: Obj) -> bool:
    """Equal apart from managed-field timestamps (a no-op write is not stored)."""
    def strip(o: Obj) -> Obj:
        c = dict(o)
        md = dict(c.get("metadata") or {})
        mf = md.pop("managedFields", None)
        if isinstance(mf, list):
            md["managedFields"] = [
                {k: v for k, v in e.items() if k != "time"} for e in mf if isinstance(e, dict)
            ]
        c["metadata"] = md
        return c
    return strip(a) == strip(b)
