"""Field sets and ``metadata.managedFields`` entries, in structured-merge-diff's terms.

A *field path* is a tuple of FieldsV1 tokens: ``f:<member>`` for an object member,
``k:{"name":"x"}`` for an item of an associative list, ``v:"x"`` for an element of a set. A
*field set* is a frozenset of paths; :func:`fields_v1` and :func:`parse_fields_v1` convert to and
from the FieldsV1 tree (``{"f:spec": {".": {}, "f:running": {}}}``, where ``"."`` marks a node
that is itself a member besides having members below it).

Lists follow :func:`virtshift.api.smp.list_type`: atomic lists are leaves, sets and associative
lists have items. :func:`fieldset_of` is what an applied configuration sets (leaves and list
items); :func:`diff_fieldset` is what a write changed (leaves by value, plus every node it
created or removed). :class:`ManagedEntry` is one managedFields entry; server-side apply and
the ownership rules live in :mod:`virtshift.api.ssa`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NamedTuple

from virtshift.api.gojson import go_format, go_quote, json_equal
from virtshift.api.kinds import KindInfo
from virtshift.api.smp import list_type

Obj = dict[str, Any]
Names = tuple[str, ...]
Path = tuple[str, ...]
"""A field path: FieldsV1 tokens from the object root, e.g. ``("f:spec", "f:running")``."""
FieldSet = frozenset[Path]

APPLY: Final = "Apply"
UPDATE: Final = "Update"
FIELDS_V1: Final = "FieldsV1"
MAX_UPDATE_MANAGERS: Final = 10
ANCIENT_CHANGES: Final = "ancient-changes"


# ---- field paths and sets --------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


class FieldNode(NamedTuple):
    """One child of a node: its token, field-name path, value, and whether it is a leaf."""

    token: str
    names: Names
    value: Any
    leaf: bool


def field_children(kind: KindInfo, value: Any, names: Names) -> list[FieldNode] | None:
    """The child nodes of ``value``; None when it is a leaf (scalar or atomic list)."""
    if isinstance(value, dict):
        return [FieldNode(f"f:{k}", (*names, k), v, False) for k, v in value.items()]
    if not isinstance(value, list):
        return None
    lt = list_type(kind, names)
    out: list[FieldNode] = []
    seen: set[str] = set()
    if lt.relation == "set":
        if any(isinstance(v, dict | list) for v in value):
            return None
        for v in value:
            token = "v:" + _dump(v)
            if token not in seen:
                seen.add(token)
                out.append(FieldNode(token, names, v, True))
        return out
    if lt.relation == "map":
        if not all(isinstance(v, dict) and all(k in v for k in lt.keys) for v in value):
            return None  # not a valid associative list: treat as one value
        for v in value:
            token = "k:" + _dump({k: v[k] for k in lt.keys})
            if token not in seen:
                seen.add(token)
                out.append(FieldNode(token, names, v, lt.atomic_items))
        return out
    return None


def _collect(kind: KindInfo, value: Any, path: Path, names: Names, leaf: bool,
             out: set[Path]) -> None:
    kids = None if leaf else field_children(kind, value, names)
    if not kids:
        if path:
            out.add(path)
        return
    for child in kids:
        child_path = (*path, child.token)
        if not child.token.startswith("f:"):
            out.add(child_path)
        _collect(kind, child.value, child_path, child.names, child.leaf, out)


def fieldset_of(kind: KindInfo, obj: Any) -> FieldSet:
    """The fields an applied configuration sets: its leaves and list items.

    Empty objects and lists count as leaves; nulls too (applying ``null`` owns the field).
    Nothing is stripped here — see :func:`server_side_apply` for what is never owned.
    """
    out: set[Path] = set()
    _collect(kind, obj, (), (), False, out)
    return frozenset(out)


@dataclass(frozen=True)
class FieldDiff:
    """What a write did to the fields of an object, as structured-merge-diff compares."""

    added: FieldSet
    modified: FieldSet
    removed: FieldSet

    @property
    def changed(self) -> FieldSet:
        return self.added | self.modified


def _subtree(kind: KindInfo, value: Any, path: Path, names: Names, leaf: bool,
             out: set[Path]) -> None:
    if path:
        out.add(path)
    for child in (None if leaf else field_children(kind, value, names)) or []:
        _subtree(kind, child.value, (*path, child.token), child.names, child.leaf, out)


def _diff(kind: KindInfo, old: Any, new: Any, path: Path, names: Names, leaf: bool,
          acc: tuple[set[Path], set[Path], set[Path]]) -> None:
    added, modified, removed = acc
    old_kids = None if leaf else field_children(kind, old, names)
    new_kids = None if leaf else field_children(kind, new, names)
    if old_kids is not None and new_kids is not None and type(old) is type(new):
        old_by = {c.token: c for c in old_kids}
        new_by = {c.token: c for c in new_kids}
        for token, c in new_by.items():
            o = old_by.get(token)
            if o is None:
                _subtree(kind, c.value, (*path, token), c.names, c.leaf, added)
            else:
                _diff(kind, o.value, c.value, (*path, token), c.names, c.leaf, acc)
        for token, o in old_by.items():
            if token not in new_by:
                _subtree(kind, o.value, (*path, token), o.names, o.leaf, removed)
        return
    if old_kids is None and new_kids is None:
        if not json_equal(old, new):
            modified.add(path)
        return
    if path:
        modified.add(path)  # the node changed shape (say, a scalar became an object)
    for o in old_kids or []:
        _subtree(kind, o.value, (*path, o.token), o.names, o.leaf, removed)
    for c in new_kids or []:
        _subtree(kind, c.value, (*path, c.token), c.names, c.leaf, added)


def diff_fieldset(kind: KindInfo, old: Any, new: Any) -> FieldDiff:
    """Fields added, modified and removed between ``old`` and ``new``.

    Leaves compare by value. A node (object, set, associative list, list item) absent from
    ``old`` is added with all its descendants; absent from ``new``, removed likewise.
    """
    acc: tuple[set[Path], set[Path], set[Path]] = (set(), set(), set())
    _diff(kind, old, new, (), (), False, acc)
    return FieldDiff(frozenset(acc[0]), frozenset(acc[1]), frozenset(acc[2]))


_TOKEN_RANK: Final[Mapping[str, int]] = {"f": 0, "k": 1, "v": 2, "i": 3}


def _token_key(token: str) -> tuple[int, str]:
    return _TOKEN_RANK.get(token[:1], 4), token


def path_sort_key(path: Path) -> tuple[tuple[int, str], ...]:
    return tuple(_token_key(t) for t in path)


def _canonical_token(token: str) -> str:
    prefix, sep, rest = token.partition(":")
    if sep and prefix in ("k", "v"):
        try:
            return f"{prefix}:{_dump(json.loads(rest))}"
        except ValueError:
            return token
    return token


def parse_fields_v1(tree: Any) -> FieldSet:
    """The field set a FieldsV1 tree describes (``{}`` leaves and ``"."``-marked nodes)."""
    out: set[Path] = set()

    def walk(node: Any, path: Path) -> None:
        if not isinstance(node, dict):
            return
        tokens = [k for k in node if k != "."]
        if path and ("." in node or not tokens):
            out.add(path)
        for token in tokens:
            walk(node[token], (*path, _canonical_token(token)))

    walk(tree, ())
    return frozenset(out)


def fields_v1(fields: Iterable[Path]) -> Obj:
    """The FieldsV1 tree of a field set, members sorted as Kubernetes writes them."""
    members = set(fields)
    tree: Obj = {}
    for path in members:
        node = tree
        for token in path:
            node = node.setdefault(token, {})

    def emit(node: Obj, path: Path) -> Obj:
        out: Obj = {}
        if node and path in members:
            out["."] = {}
        for token in (sorted(node, key=_token_key) if len(node) > 1 else node):
            out[token] = emit(node[token], (*path, token))
        return out

    return emit(tree, ())


def _value_string(value: Any) -> str:
    """structured-merge-diff's human form of a key or set value."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, list):
        return "[" + ",".join(_value_string(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_value_string(value[k])}" for k in sorted(value)) + "}"
    return go_format(value)


def path_string(path: Path) -> str:
    """A path as Kubernetes prints it: ``.spec.template.spec.domain.devices.disks``,
    ``.status.conditions[type="Ready"].status``, ``.metadata.finalizers[="x"]``."""
    out: list[str] = []
    for token in path:
        prefix, _, rest = token.partition(":")
        if prefix == "f":
            out.append("." + rest)
            continue
        try:
            value = json.loads(rest)
        except ValueError:
            out.append(token)
            continue
        if prefix == "k" and isinstance(value, dict):
            out.append("[" + ",".join(f"{k}={_value_string(value[k])}" for k in sorted(value))
                       + "]")
        elif prefix == "v":
            out.append(f"[={_value_string(value)}]")
        else:
            out.append(f"[{rest}]")
    return "".join(out)


# ---- managedFields entries -------------------------------------------------------------------


@dataclass(frozen=True)
class ManagedEntry:
    """One ``metadata.managedFields`` entry."""

    manager: str
    operation: str
    api_version: str
    fields: FieldSet
    time: str | None = None
    subresource: str = ""

    @property
    def identity(self) -> str:
        """Kubernetes' manager identifier: the entry without time and fields (and, for appliers,
        without apiVersion), JSON-encoded."""
        ident: Obj = {}
        if self.manager:
            ident["manager"] = self.manager
        if self.operation:
            ident["operation"] = self.operation
        if self.api_version and self.operation != APPLY:
            ident["apiVersion"] = self.api_version
        if self.subresource:
            ident["subresource"] = self.subresource
        return json.dumps(ident, separators=(",", ":"), ensure_ascii=False)

    def describe(self) -> str:
        """The manager as conflict messages name it: ``"kubectl" using kubevirt.io/v1``."""
        text = go_quote(self.manager)
        if self.subresource:
            text += f" with subresource {go_quote(self.subresource)}"
        if self.operation == UPDATE:
            text += f" using {self.api_version}"
        return text

    def to_json(self) -> Obj:
        out: Obj = {}
        if self.manager:
            out["manager"] = self.manager
        out["operation"] = self.operation
        if self.api_version:
            out["apiVersion"] = self.api_version
        if self.time is not None:
            out["time"] = self.time
        out["fieldsType"] = FIELDS_V1
        out["fieldsV1"] = fields_v1(self.fields)
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def _text(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else ""


def decode_entries(raw: Any) -> list[ManagedEntry]:
    """Entries of a managedFields list; malformed entries are dropped, duplicates merged."""
    if not isinstance(raw, list):
        return []
    by_id: dict[str, ManagedEntry] = {}
    for item in raw:
        if not isinstance(item, dict) or item.get("fieldsType") != FIELDS_V1:
            continue
        tree = item.get("fieldsV1")
        time = item.get("time")
        entry = ManagedEntry(
            manager=_text(item, "manager"),
            operation=_text(item, "operation"),
            api_version=_text(item, "apiVersion"),
            fields=parse_fields_v1(tree if isinstance(tree, dict) else {}),
            time=time if isinstance(time, str) else None,
            subresource=_text(item, "subresource"),
        )
        previous = by_id.get(entry.identity)
        if previous is not None:
            entry = replace(previous, fields=previous.fields | entry.fields)
        by_id[entry.identity] = entry
    return list(by_id.values())


def decode_managed_fields(obj: Any) -> list[ManagedEntry]:
    """The entries of ``obj``'s ``metadata.managedFields``."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return decode_entries(meta.get("managedFields") if isinstance(meta, dict) else None)


def encode_managed_fields(entries: Iterable[ManagedEntry]) -> list[Obj]:
    """Entries in Kubernetes' order (Apply before Update, then by time, manager, version)."""
    ordered = sorted(entries, key=lambda e: (e.operation, e.time or "", e.manager,
                                             e.api_version, e.subresource))
    return [e.to_json() for e in ordered]


def _cap_update_managers(entries: list[ManagedEntry]) -> list[ManagedEntry]:
    """Fold the oldest Update entries into ``ancient-changes`` beyond ten Update entries."""
    count = sum(1 for e in entries if e.operation != APPLY)
    if count <= MAX_UPDATE_MANAGERS:
        return entries
    by_id = {e.identity: e for e in entries}
    oldest = sorted((e for e in entries if e.operation != APPLY and e.manager != ANCIENT_CHANGES),
                    key=lambda e: (e.time or "", e.identity))
    for entry in oldest:
        if count <= MAX_UPDATE_MANAGERS:
            break
        del by_id[entry.identity]
        bucket = ManagedEntry(ANCIENT_CHANGES, UPDATE, entry.api_version, entry.fields,
                              entry.time)
        previous = by_id.get(bucket.identity)
        if previous is not None:
            newest = max(previous.time or "", entry.time or "") or None
            bucket = replace(previous, fields=previous.fields | entry.fields, time=newest)
            count -= 1
        by_id[bucket.identity] = bucket
    return list(by_id.values())


def store_managed_fields(obj: Obj, entries: Iterable[ManagedEntry]) -> Obj:
    kept = _cap_update_managers([e for e in entries if e.fields])
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    if kept:
        meta["managedFields"] = encode_managed_fields(kept)
    else:
        meta.pop("managedFields", None)
    return obj
