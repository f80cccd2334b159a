"""Field ownership (``metadata.managedFields``) and server-side apply, as kube-apiserver keeps them.

Field paths, field sets and managedFields entries are :mod:`virtshift.api.managedfields`
(re-exported here). Every writer is a *manager*, identified by name, operation (``Apply`` or
``Update``), API version (Update only) and subresource; its entry owns a field set.

* **Update** (create/update/patch, :func:`update_managed_fields`): the fields a write adds or
  changes move to the writer; the fields it removes leave every manager. Nodes the write
  creates are owned too — except, for built-in kinds, the structs every typed object has
  (``spec``, ``status``, ...), which is why kubelet's entries show ``f:spec`` without ``"."``.
* **Apply** (:func:`server_side_apply`): the applied configuration is merged into the live
  object (lists by :func:`virtshift.api.smp.list_type`: custom resources' lists are atomic
  unless their schema says otherwise, so a VM's ``disks`` are owned whole, as on a real
  cluster) and its leaves and list items become the applier's set. Fields the applier applied
  before but no longer does are removed, unless another manager owns them. Changing a field
  another manager owns is a 409 Conflict worded like kube-apiserver's, unless ``force``, which
  moves the field to the applier.

Never owned: ``apiVersion``, ``kind`` and the system metadata (name, namespace, uid,
resourceVersion, generation, creationTimestamp, managedFields, deletion fields). On the main
resource of a kind with a status subresource ``status`` is not owned (and an apply does not
change it); on the ``status`` subresource only ``status`` is.

Not modelled: conversion between API versions (every kind serves one), the
``last-applied-configuration`` annotation upkeep kube-apiserver does for ``kubectl``, and
schema-driven struct/map distinctions below the built-in kinds' top-level structs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Final

from virtshift.api.gojson import json_equal
from virtshift.api.jsonvalue import clone
from virtshift.api.kinds import KindInfo
from virtshift.api.managedfields import (
    APPLY,
    UPDATE,
    EntryDraft,
    FieldDiff,
    FieldSet,
    ManagedEntry,
    Path,
    decode_drafts,
    decode_managed_fields,
    diff_fieldset,
    entry_json,
    field_children,
    fields_v1,
    fields_v1_has,
    fieldset_of,
    identity_key,
    parse_fields_v1,
    path_sort_key,
    path_string,
    store_drafts,
    store_managed_fields,
    subtree_fields_v1,
)
from virtshift.errors import BadRequest, Conflict, FieldError, PlainCause

__all__ = [
    "FieldDiff",
    "FieldSet",
    "ManagedEntry",
    "Path",
    "decode_managed_fields",
    "diff_fieldset",
    "fields_v1",
    "fieldset_of",
    "parse_fields_v1",
    "path_string",
    "server_side_apply",
    "update_managed_fields",
]

Obj = dict[str, Any]
Names = tuple[str, ...]

CONFLICT_CAUSE: Final = "FieldManagerConflict"

_STRIPPED: Final[FieldSet] = frozenset({
    ("f:apiVersion",),
    ("f:kind",),
    ("f:metadata",),
    *[("f:metadata", f"f:{name}") for name in (
        "name", "namespace", "creationTimestamp", "selfLink", "uid", "clusterName",
        "generation", "managedFields", "resourceVersion", "deletionTimestamp",
        "deletionGracePeriodSeconds")],
})

# The non-pointer structs a typed built-in object always carries (Go serializes them as {}),
# so Kubernetes never records them as created by a write.
_BUILTIN_ZERO: Final[Mapping[str, Obj]] = {
    "Namespace": {"spec": {}, "status": {}},
    "Node": {"spec": {}, "status": {"daemonEndpoints": {"kubeletEndpoint": {}}, "nodeInfo": {}}},
    "PersistentVolumeClaim": {"spec": {"resources": {}}, "status": {}},
    "PersistentVolume": {"spec": {}, "status": {}},
    "Event": {"involvedObject": {}, "source": {}},
}

_ABSENT: Final = object()


# ---- shared helpers --------------------------------------------------------------------------


def _without_managed(obj: Any) -> Obj:
    out = clone(obj) if isinstance(obj, dict) else {}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return out


def _managed_view(obj: Obj) -> Obj:
    """``obj`` without ``metadata.managedFields``, sharing everything else (read only)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def _fill(zero: Obj, obj: Obj) -> Obj:
    out = dict(obj)
    for key, value in zero.items():
        if key not in out:
            out[key] = clone(value)
        elif isinstance(out[key], dict):
            out[key] = _fill(value, out[key])
    return out


def _with_zero(kind: KindInfo, obj: Obj) -> Obj:
    """``obj`` as the typed built-in object serializes: empty structs present."""
    if not kind.builtin:
        return obj
    return _fill({"metadata": {}, **_BUILTIN_ZERO.get(kind.kind, {})}, obj)


def _ownable(kind: KindInfo, subresource: str, paths: Iterable[Path]) -> FieldSet:
    """``paths`` without the fields a write through ``subresource`` never owns."""
    out: set[Path] = set()
    for path in paths:
        if path in _STRIPPED:
            continue
        in_status = path[:1] == ("f:status",)
        if subresource == "status" and not in_status:
            continue
        if subresource == "" and kind.has_status and in_status:
            continue
        out.add(path)
    return frozenset(out)


_STRIPPED_ROOT: Final = frozenset(p[0][2:] for p in _STRIPPED if len(p) == 1)
_STRIPPED_META: Final = frozenset(p[1][2:] for p in _STRIPPED if len(p) == 2)


def _unowned_node(tree: Obj) -> Obj | None:
    """The FieldsV1 node of a never-owned field: its owned descendants only, if any."""
    tree.pop(".", None)
    return tree or None


def _zero_struct_fields(kind: KindInfo, zero: Obj, value: Any, names: Names) -> Obj | None:
    """The FieldsV1 node a create writes for a built-in kind's always-present struct: the
    struct is not owned (the typed zero object has it), what it holds is; None if nothing."""
    if not isinstance(value, dict):
        return subtree_fields_v1(kind, value, names)  # changed shape: owned, as is below
    node: Obj = {}
    for key in sorted(value):
        below = zero.get(key)
        child = (_zero_struct_fields(kind, below, value[key], (*names, key))
                 if isinstance(below, dict) else
                 subtree_fields_v1(kind, value[key], (*names, key)))
        if child is not None:
            node[f"f:{key}"] = child
    return node or None


def _created_fields_v1(kind: KindInfo, obj: Obj, subresource: str) -> Obj:
    """The FieldsV1 tree a create of ``obj`` gives its manager, in one pass over ``obj``:
    ``fields_v1(_ownable(kind, subresource, diff_fieldset(kind, <zero>, <obj>).changed))``."""
    zero: Mapping[str, Any] = (
        {"metadata": {}, **_BUILTIN_ZERO.get(kind.kind, {})} if kind.builtin else {})
    tree: Obj = {}
    for key in sorted(obj):
        if subresource == "status" and key != "status":
            continue
        if subresource == "" and kind.has_status and key == "status":
            continue
        value = obj[key]
        node: Obj | None
        if key == "metadata" and isinstance(value, dict):
            node = {}
            for name in sorted(value):
                below = value[name]
                child: Obj | None = (subtree_fields_v1(kind, below, (key, name))
                                     if below and isinstance(below, dict | list) else {})
                if name in _STRIPPED_META and child is not None:
                    child = _unowned_node(child)
                if child is not None:
                    node[f"f:{name}"] = child
            node = node or None
        elif key in zero:
            node = _zero_struct_fields(kind, zero[key], value, (key,))
        else:
            node = subtree_fields_v1(kind, value, (key,))
        if node is not None and key in _STRIPPED_ROOT:
            node = _unowned_node(node)
        if node is not None:
            tree[f"f:{key}"] = node
    return tree


# ---- update ----------------------------------------------------------------------------------


def update_managed_fields(kind: KindInfo, old: Obj | None, new: Obj, *, manager: str,
                          operation: str = UPDATE, subresource: str = "", now: str) -> Obj:
    """``new`` with ``metadata.managedFields`` updated for an ordinary write by ``manager``.

    ``old`` is the live object (None on create). Fields the write added or changed become the
    manager's (merged into its existing entry, which gets ``time=now``) and are taken from every
    other manager; fields it removed are dropped from every manager; empty entries disappear.
    A write that changes nothing leaves the entries as they were.

    A non-empty ``managedFields`` list in ``new`` (on the main resource) replaces the live
    entries first, as kube-apiserver lets clients rewrite them; ``[{}]`` clears them.
    """
    # Only metadata.managedFields changes: copy the top level and metadata, share the rest.
    meta = dict(new.get("metadata") or {}) if isinstance(new.get("metadata"), dict) else {}
    result = {**new, "metadata": meta}
    given = meta.pop("managedFields", None)
    replaced = isinstance(given, list) and bool(given) and not subresource
    if old is None and not replaced:
        # A create: the manager owns every (ownable) field; no other entries to update.
        tree = _created_fields_v1(kind, result, subresource)
        if tree:
            meta["managedFields"] = [entry_json(manager, operation, kind.api_version, now,
                                                tree, subresource)]
        return result
    if replaced:
        drafts = decode_drafts(given)
    else:
        old_meta = old.get("metadata") if isinstance(old, dict) else None
        drafts = decode_drafts(old_meta.get("managedFields")
                               if isinstance(old_meta, dict) else None)
    before = _with_zero(kind, _managed_view(old) if isinstance(old, dict) else {})
    diff = diff_fieldset(kind, before, _with_zero(kind, result))
    changed = _ownable(kind, subresource, diff.changed)
    gone = changed | diff.removed
    key = identity_key(manager, operation, kind.api_version, subresource)
    previous = drafts.get(key) if changed else None
    kept = None
    if previous is not None:
        tree = previous.tree()
        if (all(fields_v1_has(tree, path) for path in changed)
                and not any(fields_v1_has(tree, path) for path in diff.removed)):
            kept = previous  # the writer changed only fields it owns: its set stays as it is
            previous.time = now
    if gone:
        # Other entries owning some of these fields lose them (their trees edited in place).
        for draft in drafts.values():
            if draft is kept:
                continue
            if draft is previous:
                draft.fields = draft.current_fields() - gone
                continue
            tree = draft.tree()
            lost = [path for path in gone if fields_v1_has(tree, path)]
            if lost:
                draft.drop(lost)
    if changed and kept is None:
        if previous is None:
            drafts[key] = EntryDraft(manager, operation, kind.api_version, now, subresource,
                                     [], changed)
        else:
            previous.fields = previous.current_fields() | changed
            previous.time = now
    return store_drafts(result, drafts.values())


# ---- apply -----------------------------------------------------------------------------------


def _interleave(live: list[str], config: list[str]) -> list[str]:
    """Item order after apply, as structured-merge-diff merges lists: walking both lists, a
    live-only item is emitted where it stands, a shared live item waits until it is the next
    shared item of the configuration, and configuration items fill in between."""
    in_config = set(config)
    in_live = set(live)
    shared = [t for t in config if t in in_live]
    out: list[str] = []
    li = ri = si = 0
    while li < len(live) or ri < len(config):
        upcoming = shared[si] if si < len(shared) else None
        if li < len(live) and ri < len(config):
            if live[li] == config[ri]:
                out.append(config[ri])
                li, ri, si = li + 1, ri + 1, si + 1
                continue
            if live[li] in in_config and upcoming is not None and upcoming != live[li]:
                li += 1
                continue
        if li < len(live) and live[li] not in in_config:
            out.append(live[li])
            li += 1
        elif ri < len(config):
            out.append(config[ri])
            if config[ri] == upcoming:
                si += 1
            ri += 1
        else:
            li += 1  # a shared item already placed from the configuration
    return out


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _merge(kind: KindInfo, live: Any, config: Any, names: Names, leaf: bool) -> Any:
    """``config`` merged into ``live``: config wins, null removes, sets/maps merge by item."""
    if leaf or live is _ABSENT:
        return _drop_nulls(config)
    if isinstance(live, dict) and isinstance(config, dict):
        out = clone(live)
        for key, value in config.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(kind, live.get(key, _ABSENT), value, (*names, key), False)
        return out
    if isinstance(live, list) and isinstance(config, list):
        live_kids = field_children(kind, live, names)
        config_kids = field_children(kind, config, names)
        if live_kids is not None and config_kids is not None:
            live_by = {c.token: c for c in live_kids}
            config_by = {c.token: c for c in config_kids}
            merged: list[Any] = []
            for token in _interleave(list(live_by), list(config_by)):
                c = config_by.get(token)
                o = live_by.get(token)
                if c is None and o is not None:
                    merged.append(clone(o.value))
                elif c is not None:
                    base = o.value if o is not None else _ABSENT
                    merged.append(_merge(kind, base, c.value, c.names, c.leaf))
            return merged
    return _drop_nulls(config)


def _item_index(items: Any, token: str) -> int | None:
    if not isinstance(items, list):
        return None
    prefix, _, rest = token.partition(":")
    if prefix == "i":
        return int(rest) if rest.isdigit() and int(rest) < len(items) else None
    try:
        wanted = json.loads(rest)
    except ValueError:
        return None
    for i, item in enumerate(items):
        if prefix == "v" and json_equal(item, wanted):
            return i
        if (prefix == "k" and isinstance(item, dict) and isinstance(wanted, dict)
                and all(k in item and json_equal(item[k], v) for k, v in wanted.items())):
            return i
    return None


def _remove_path(obj: Obj, path: Path) -> None:
    node: Any = obj
    for token in path[:-1]:
        if token.startswith("f:"):
            node = node.get(token[2:], _ABSENT) if isinstance(node, dict) else _ABSENT
        else:
            idx = _item_index(node, token)
            node = _ABSENT if idx is None else node[idx]
        if node is _ABSENT:
            return
    last = path[-1]
    if last.startswith("f:"):
        if isinstance(node, dict):
            node.pop(last[2:], None)
        return
    idx = _item_index(node, last)
    if idx is not None:
        del node[idx]


def _prune(merged: Obj, last: FieldSet, managers: Iterable[ManagedEntry]) -> None:
    """Remove what the applier applied last time and nobody owns now (nor anything below)."""
    owned: set[Path] = set()
    for entry in managers:
        owned |= entry.fields
    above_owned = {p[:i] for p in owned for i in range(1, len(p))}
    doomed = [p for p in last if p not in owned and p not in above_owned]
    for path in sorted(doomed, key=len, reverse=True):
        _remove_path(merged, path)


def _keep_reset_fields(kind: KindInfo, subresource: str, live: Obj, merged: Obj) -> Obj:
    """Undo what the write may not change: ``status`` on the main resource of a kind with a
    status subresource, everything but ``status`` on the status subresource."""
    if subresource == "status":
        out = clone(live)
        if "status" in merged:
            out["status"] = merged["status"]
        else:
            out.pop("status", None)
        return out
    if subresource == "" and kind.has_status:
        if "status" in live:
            merged["status"] = clone(live["status"])
        else:
            merged.pop("status", None)
    return merged


def _conflict_error(conflicts: list[tuple[ManagedEntry, Path]]) -> Conflict:
    ordered = sorted(conflicts, key=lambda c: (c[0].identity, path_sort_key(c[1])))
    causes: list[FieldError] = [
        PlainCause(CONFLICT_CAUSE, path_string(path), f"conflict with {entry.describe()}")
        for entry, path in ordered]
    if len(ordered) == 1:
        entry, path = ordered[0]
        message = (f"Apply failed with 1 conflict: conflict with {entry.describe()}: "
                   f"{path_string(path)}")
    else:
        lines: list[str] = []
        current = ""
        for entry, path in ordered:
            if entry.identity != current:
                current = entry.identity
                lines.append(f"conflicts with {entry.describe()}:")
            lines.append(f"- {path_string(path)}")
        message = f"Apply failed with {len(ordered)} conflicts: " + "\n".join(lines)
    return Conflict(message, causes=causes)


def server_side_apply(kind: KindInfo, live: Obj | None, applied: Obj, *, manager: str,
                      force: bool, now: str, subresource: str = "") -> Obj:
    """The object after ``manager`` applies ``applied`` (an apply patch) to ``live``.

    ``live`` is None when the object does not exist yet (apply creates it). The result carries
    the updated ``metadata.managedFields``; system metadata is whatever the merge produced and
    is the caller's to restore. Raises Conflict (409) when the apply changes fields another
    manager owns and ``force`` is false; BadRequest (400) for an ``applied`` of the wrong
    apiVersion or one that carries managedFields.
    """
    if not isinstance(applied, dict):
        raise BadRequest("error decoding YAML: the applied configuration is not an object")
    version = applied.get("apiVersion")
    if version != kind.api_version:
        raise BadRequest("Incorrect version specified in apply patch. Specified patch version: "
                         f"{version if isinstance(version, str) else ''}, expected: "
                         f"{kind.api_version}")
    applied_meta = applied.get("metadata")
    if isinstance(applied_meta, dict) and applied_meta.get("managedFields") is not None:
        raise BadRequest("metadata.managedFields must be nil")

    current = _without_managed(live)
    merged = _merge(kind, current, applied, (), False)
    if live is not None:  # on create, what survives is the kind's create strategy's business
        merged = _keep_reset_fields(kind, subresource, current, merged)

    managers = {e.identity: e for e in decode_managed_fields(live)}
    mine = ManagedEntry(manager, APPLY, kind.api_version,
                        _ownable(kind, subresource, fieldset_of(kind, applied)), None,
                        subresource)
    last = managers.get(mine.identity)
    managers[mine.identity] = mine if last is None else replace(
        last, api_version=kind.api_version, fields=mine.fields)
    if last is not None:
        _prune(merged, last.fields, managers.values())

    diff = diff_fieldset(kind, _with_zero(kind, current), _with_zero(kind, merged))
    changed = _ownable(kind, subresource, diff.changed)
    conflicts = [(entry, path) for ident, entry in managers.items() if ident != mine.identity
                 for path in entry.fields & changed]
    if conflicts and not force:
        raise _conflict_error(conflicts)
    for ident, entry in managers.items():
        if ident != mine.identity:
            managers[ident] = replace(entry, fields=entry.fields - changed - diff.removed)
    if last is None or last.time is None or not json_equal(current, merged):
        managers[mine.identity] = replace(managers[mine.identity], time=now)
    return store_managed_fields(merged, managers.values())
