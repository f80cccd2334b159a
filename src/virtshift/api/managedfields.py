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

For the API server's writes the field sets are avoided where they are not needed:
:func:`subtree_fields_v1` writes a created object's tree in one pass, and an
:class:`EntryDraft` keeps a stored entry's tree (rewritten canonically by
:func:`canonical_fields_v1`) unless the write takes fields from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

import orjson

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
    if not leaf and type(value) is dict:
        for key, below in value.items():
            _subtree(kind, below, (*path, f"f:{key}"), (*names, key), False, out)
        return
    for child in (None if leaf else field_children(kind, value, names)) or []:
        _subtree(kind, child.value, (*path, child.token), child.names, child.leaf, out)


def _same(old: Any, new: Any) -> bool:
    """``json_equal(old, new)``, in C for the common case of equal values (a subtree a write
    left alone): Python's ``==`` (which only confuses ``true``, ``1`` and ``1.0``), then their
    JSON text (which does not); NaN (written ``null``) and the rest go the slow way."""
    if old != new:
        return False
    try:
        text = orjson.dumps(old)
        if text == orjson.dumps(new) and b"null" not in text:
            return True
    except orjson.JSONEncodeError:
        pass
    return json_equal(old, new)


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _diff(kind: KindInfo, old: Any, new: Any, path: Path, names: Names, leaf: bool,
          acc: tuple[set[Path], set[Path], set[Path]]) -> None:
    added, modified, removed = acc
    if (not leaf and type(old) is type(new) and isinstance(old, dict | list)
            and _same(old, new)):
        return  # nothing below changed (and, both being objects or lists, nor did the node)
    if not leaf and type(old) is dict and type(new) is dict:
        # field_children's f: nodes, without building them (sets: order does not matter)
        for key, value in new.items():
            if key in old:
                before = old[key]
                if type(before) in _SCALARS and type(value) in _SCALARS:
                    # json_equal of two plain scalars: same type, equal value
                    if type(before) is not type(value) or before != value:
                        modified.add((*path, f"f:{key}"))
                    continue
                _diff(kind, before, value, (*path, f"f:{key}"), (*names, key), False, acc)
            else:
                _subtree(kind, value, (*path, f"f:{key}"), (*names, key), False, added)
        for key, value in old.items():
            if key not in new:
                _subtree(kind, value, (*path, f"f:{key}"), (*names, key), False, removed)
        return
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


_PLAIN_ORDER: Final = frozenset({"f", "k", "v"})


def _sorted_tokens(tokens: Iterable[str]) -> list[str]:
    """``sorted(tokens, key=_token_key)``: plain string order when every token is an ``f:``,
    ``k:`` or ``v:`` one (their ranks follow their first letters)."""
    listed = list(tokens)
    for token in listed:
        if token[:1] not in _PLAIN_ORDER:
            return sorted(listed, key=_token_key)
    return sorted(listed)


def _canonical_token(token: str) -> str:
    if token[:2] == "f:":
        return token
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
        for token in (_sorted_tokens(node) if len(node) > 1 else node):
            out[token] = emit(node[token], (*path, token))
        return out

    return emit(tree, ())


def _canonical_node(nodes: list[Obj], root: bool) -> Obj | None:
    """The FieldsV1 node of the union of the field sets below ``nodes`` (raw trees at one
    path); None when that union has no member at or below the path."""
    member = False
    groups: dict[str, list[Obj]] = {}
    for node in nodes:
        has_tokens = False
        for token, child in node.items():
            if token == ".":
                continue
            has_tokens = True
            if isinstance(child, dict):
                group = groups.setdefault(_canonical_token(token), [])
                group.append(child)
        if not root and (not has_tokens or "." in node):
            member = True
    kids: Obj = {}
    for token in (_sorted_tokens(groups) if len(groups) > 1 else groups):
        below = _canonical_node(groups[token], False)
        if below is not None:
            kids[token] = below
    if not kids:
        return {} if member else None
    return {".": {}, **kids} if member else kids


def _canonical_one(node: Obj, root: bool) -> Obj | None:
    """``_canonical_node([node], root)`` for the usual node whose tokens are all distinct once
    canonical (always so for ``f:`` tokens)."""
    has_tokens = False
    plain = True  # every token is an f:, k: or v: one: plain string order is Kubernetes'
    groups: Obj = {}
    for token, child in node.items():
        if token == ".":
            continue
        has_tokens = True
        if isinstance(child, dict):
            if token[:2] != "f:":
                token = _canonical_token(token)
                plain = plain and token[:1] in _PLAIN_ORDER
            if token in groups:
                return _canonical_node([node], root)  # two tokens for one member: merge
            groups[token] = child
    member = not root and (not has_tokens or "." in node)
    kids: Obj = {}
    order: Iterable[str] = groups
    if len(groups) > 1:
        order = sorted(groups) if plain else sorted(groups, key=_token_key)
    for token in order:
        below = _canonical_one(groups[token], False)
        if below is not None:
            kids[token] = below
    if not kids:
        return {} if member else None
    return {".": {}, **kids} if member else kids


def canonical_fields_v1(trees: Iterable[Any]) -> Obj:
    """``fields_v1`` of the union of ``parse_fields_v1(tree)`` over ``trees``, in one pass over
    the trees (no field paths): how a stored entry is written back when no field leaves it."""
    nodes = [t for t in trees if isinstance(t, dict)]
    if len(nodes) == 1:
        return _canonical_one(nodes[0], True) or {}
    return _canonical_node(nodes, True) or {}


def fields_v1_has(tree: Obj, path: Path) -> bool:
    """Whether ``path`` is in the field set of ``tree``, a tree as :func:`fields_v1` writes
    it (members with children marked ``"."``, other members ``{}``, nothing else)."""
    node: Any = tree
    for token in path:
        node = node.get(token)
        if node is None:
            return False
    return not node or "." in node


_CONTAINERS: Final = (dict, list)


def subtree_fields_v1(kind: KindInfo, value: Any, names: Names) -> Obj:
    """The FieldsV1 tree of a node and everything below it, in one pass: what
    :func:`fields_v1` writes for the set of the node's path and all its descendants' (the
    fields a write that creates the node adds). ``names`` are the node's field names."""
    if isinstance(value, dict):
        if not value:
            return {}
        out: Obj = {".": {}}
        for key in (sorted(value) if len(value) > 1 else value):
            child = value[key]
            out[f"f:{key}"] = (subtree_fields_v1(kind, child, (*names, key))
                               if child and isinstance(child, _CONTAINERS) else {})
        return out
    if isinstance(value, list) and value:
        kids = field_children(kind, value, names)
        if kids:
            out = {".": {}}
            # One list's tokens share their prefix ("k:" or "v:"): plain order is Kubernetes'.
            for child in sorted(kids):
                out[child.token] = ({} if child.leaf
                                    else subtree_fields_v1(kind, child.value, child.names))
            return out
    return {}


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
        return entry_json(self.manager, self.operation, self.api_version, self.time,
                          fields_v1(self.fields), self.subresource)


def entry_json(manager: str, operation: str, api_version: str, time: str | None,
               tree: Obj, subresource: str) -> Obj:
    """A managedFields entry as Kubernetes writes it (``tree`` is its FieldsV1 tree)."""
    out: Obj = {}
    if manager:
        out["manager"] = manager
    out["operation"] = operation
    if api_version:
        out["apiVersion"] = api_version
    if time is not None:
        out["time"] = time
    out["fieldsType"] = FIELDS_V1
    out["fieldsV1"] = tree
    if subresource:
        out["subresource"] = subresource
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


# ---- entries being updated, without field sets where none is needed --------------------------


IdentityKey = tuple[str, str, str, str]


def identity_key(manager: str, operation: str, api_version: str,
                 subresource: str) -> IdentityKey:
    """A tuple that is equal for two entries exactly when their ``identity`` strings are."""
    return (manager, operation, api_version if operation != APPLY else "", subresource)


@dataclass
class EntryDraft:
    """A managedFields entry being updated. Its fields are the union of its stored FieldsV1
    trees (``raw``) until ``fields`` is set; they are only parsed if a write takes some."""

    manager: str
    operation: str
    api_version: str
    time: str | None
    subresource: str
    raw: list[Any]
    fields: FieldSet | None = None
    _canonical: Obj | None = field(default=None, repr=False, compare=False)

    def tree(self) -> Obj:
        """The FieldsV1 tree of the entry's current fields, as :func:`fields_v1` writes it."""
        if self.fields is not None:
            return fields_v1(self.fields)
        if self._canonical is None:
            self._canonical = canonical_fields_v1(self.raw)
        return self._canonical

    def current_fields(self) -> FieldSet:
        if self.fields is None:
            out: set[Path] = set()
            for tree in self.raw:
                out |= parse_fields_v1(tree if isinstance(tree, dict) else {})
            self.fields = frozenset(out)
        return self.fields

    def drop(self, paths: Iterable[Path]) -> None:
        """Take ``paths`` out of the entry's fields (editing its tree, not parsing it)."""
        if self.fields is not None:
            self.fields = self.fields - frozenset(paths)
            return
        tree = self.tree()
        for path in paths:
            _drop_member(tree, path)
        self.raw = [tree]  # a canonical tree parses to the set it was written from

    def entry(self) -> ManagedEntry:
        return ManagedEntry(self.manager, self.operation, self.api_version,
                            self.current_fields(), self.time, self.subresource)


def _drop_member(tree: Obj, path: Path) -> None:
    """Edit ``tree`` (as :func:`fields_v1` writes it) into the tree of its set without
    ``path``: a member with children loses its ``"."``; a childless one goes, and so do the
    ancestors left without children (or, if they are members themselves, become ``{}``)."""
    trail: list[tuple[Obj, str]] = []
    node = tree
    for token in path:
        below = node.get(token)
        if below is None:
            return
        trail.append((node, token))
        node = below
    if not trail:
        return
    if "." in node:
        del node["."]
        return
    if node:
        return  # not a member
    for parent, token in reversed(trail):
        del parent[token]
        if parent is tree:
            return
        if len(parent) == 1 and "." in parent:
            parent.clear()  # a member that has lost its last child
            return
        if parent:
            return


def decode_drafts(raw: Any) -> dict[IdentityKey, EntryDraft]:
    """:func:`decode_entries`, as drafts (same order, same merging of duplicates)."""
    out: dict[IdentityKey, EntryDraft] = {}
    if not isinstance(raw, list):
        return out
    for item in raw:
        if not isinstance(item, dict) or item.get("fieldsType") != FIELDS_V1:
            continue
        tree = item.get("fieldsV1")
        manager = _text(item, "manager")
        operation = _text(item, "operation")
        api_version = _text(item, "apiVersion")
        subresource = _text(item, "subresource")
        key = identity_key(manager, operation, api_version, subresource)
        previous = out.get(key)
        if previous is not None:
            previous.raw.append(tree)
            continue
        time = item.get("time")
        out[key] = EntryDraft(manager, operation, api_version,
                              time if isinstance(time, str) else None, subresource, [tree])
    return out


def store_drafts(obj: Obj, drafts: Iterable[EntryDraft]) -> Obj:
    """:func:`store_managed_fields` for drafts; trees of untouched entries are not re-derived
    from field sets."""
    kept: list[tuple[EntryDraft, Obj]] = []
    updaters = 0
    for draft in drafts:
        tree = draft.tree()
        if tree:
            kept.append((draft, tree))
            updaters += draft.operation != APPLY
    if updaters > MAX_UPDATE_MANAGERS:
        return store_managed_fields(obj, [draft.entry() for draft, _ in kept])
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    if not kept:
        meta.pop("managedFields", None)
        return obj
    kept.sort(key=lambda d: (d[0].operation, d[0].time or "", d[0].manager, d[0].api_version,
                             d[0].subresource))
    meta["managedFields"] = [
        entry_json(d.manager, d.operation, d.api_version, d.time, tree, d.subresource)
        for d, tree in kept]
    return obj
