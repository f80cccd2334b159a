"""The fast managed-fields bookkeeping against the implementation it replaced.

The oracle below is the previous ``update_managed_fields`` and what it used, copied verbatim
(path sets, a full diff, FieldsV1 re-encoding). Every case compares the two results byte for byte
(``orjson.dumps``): managedFields order, ``time``, ``fieldsType`` and ``fieldsV1`` key order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path as FilePath
from typing import Any, Final, NamedTuple

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtshift.api.gojson import json_equal
from virtshift.api.jsonvalue import clone
from virtshift.api.kinds import KINDS, KindInfo
from virtshift.api.smp import list_type
from virtshift.api.ssa import update_managed_fields

Obj = dict[str, Any]
Names = tuple[str, ...]
Path = tuple[str, ...]
FieldSet = frozenset[Path]

APPLY: Final = "Apply"
UPDATE: Final = "Update"
FIELDS_V1: Final = "FieldsV1"
MAX_UPDATE_MANAGERS: Final = 10
ANCIENT_CHANGES: Final = "ancient-changes"


# ---- the oracle: the previous implementation, verbatim ----------------------------------------


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


_STRIPPED: Final[FieldSet] = frozenset({
    ("f:apiVersion",),
    ("f:kind",),
    ("f:metadata",),
    *(("f:metadata", f"f:{name}") for name in (
        "name", "namespace", "creationTimestamp", "selfLink", "uid", "clusterName",
        "generation", "managedFields", "resourceVersion", "deletionTimestamp",
        "deletionGracePeriodSeconds")),
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


# ---- update ----------------------------------------------------------------------------------


def oracle_update_managed_fields(kind: KindInfo, old: Obj | None, new: Obj, *, manager: str,
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
    if isinstance(given, list) and given and not subresource:
        entries = decode_entries(given)
    else:
        entries = decode_managed_fields(old)
    before = _with_zero(kind, _without_managed(old))
    diff = diff_fieldset(kind, before, _with_zero(kind, result))
    changed = _ownable(kind, subresource, diff.changed)
    mine = ManagedEntry(manager, operation, kind.api_version, frozenset(), None, subresource)
    managers = {e.identity: replace(e, fields=e.fields - changed - diff.removed)
                for e in entries}
    if changed:
        previous = managers.get(mine.identity, mine)
        managers[mine.identity] = replace(previous, fields=previous.fields | changed, time=now)
    return store_managed_fields(result, managers.values())




# ---- inputs ------------------------------------------------------------------------------------

EXAMPLES: Final = FilePath("/work/shared/reference/kubevirt-examples")
NOW: Final = "2026-12-01T12:00:00Z"
LATER: Final = "2026-12-01T13:00:00Z"
KIND_LIST: Final = list({(k.group, k.version, k.kind): k for k in KINDS}.values())


def _manifests() -> list[Obj]:
    if not EXAMPLES.is_dir():
        return []
    out: list[Obj] = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict))
    return out


def _bench_object(i: int) -> Obj:
    """bench/api_store.py's _api_object(i), as the API server hands it over after admission."""
    name = f"vm-{i:07d}"
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": "bench", "kubevirt.io/vm": name},
                     "annotations": {"bench.virtshift.io/index": str(i)},
                     "namespace": "default", "uid": f"00000000-0000-4000-8000-{i:012d}",
                     "creationTimestamp": NOW, "generation": 1},
        "spec": {"runStrategy": "Halted", "template": {
            "metadata": {"labels": {"kubevirt.io/vm": name}},
            "spec": {"domain": {"cpu": {"cores": 1, "sockets": 1, "threads": 1},
                                "memory": {"guest": "128Mi"},
                                "devices": {"disks": [{"name": "containerdisk",
                                                       "disk": {"bus": "virtio"}}],
                                            "interfaces": [{"name": "default",
                                                            "masquerade": {}}]},
                                "machine": {"type": "q35"}},
                     "networks": [{"name": "default", "pod": {}}],
                     "volumes": [{"name": "containerdisk",
                                  "containerDisk": {"image": "virtshift/testguest:latest"}}],
                     "architecture": "amd64"}}},
    }


def _node() -> Obj:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "labels": {"a": "1"}, "finalizers": ["a", "b", "x", "a"]},
        "spec": {"taints": [{"key": "k1", "effect": "NoSchedule"}], "podCIDRs": ["10.0.0.0/24"]},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "MemoryPressure", "status": "False"},
            {"type": "Ready", "status": "Unknown"},
        ], "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}},
    }


ODD: Final[list[Obj]] = [
    {},
    {"metadata": None},
    {"metadata": {"name": {"nested": 1}, "uid": ["x"], "generation": {}, "labels": {}}},
    {"apiVersion": {"a": 1}, "kind": [], "metadata": {"finalizers": []}},
    {"spec": 5, "status": "x"},
    {"spec": [], "status": [1, 2]},
    {"spec": {"resources": 1, "taints": [{"key": "a"}, {"key": "a", "effect": "x"}]},
     "status": {"daemonEndpoints": 3, "nodeInfo": {"a": None}}},
    {"involvedObject": {"kind": "Pod"}, "source": None, "reason": "x"},
    {"metadata": {"finalizers": ["a", {"x": 1}], "ownerReferences": [{"uid": "u"}, {"x": 1}]}},
    {"metadata": {"finalizers": ["a", "a", "b"], "ownerReferences": [{"uid": "u"}, {"uid": "u"}]},
     "spec": {"": {"": 1}, "f:x": {".": {}}, "é": [True, 1, 1.0, None]}},
]


def _docs() -> list[Obj]:
    return [*_manifests(), _bench_object(1), _node(), *ODD]


def _bytes(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(obj).encode()


def _both(kind: KindInfo, old: Obj | None, new: Obj, **kw: Any) -> Obj:
    """The new implementation's result, asserted byte-identical to the oracle's; neither input
    may change."""
    old_before, new_before = _bytes(old), _bytes(new)
    expected = oracle_update_managed_fields(kind, clone(old), clone(new), **kw)
    got = update_managed_fields(kind, old, new, **kw)
    assert _bytes(got) == _bytes(expected)
    assert _bytes(old) == old_before and _bytes(new) == new_before
    return got


def _updates(obj: Obj) -> Iterator[tuple[str, str, Obj]]:
    """(manager, subresource, new) for the common writes to ``obj``."""
    status = clone(obj)
    status["status"] = {"printableStatus": "Stopped", "ready": False, "conditions": [
        {"type": "Ready", "status": "False", "lastProbeTime": None}]}
    yield "virt-controller", "status", status
    status2 = clone(status)
    status2["status"]["conditions"].append({"type": "Paused", "status": "True"})
    status2["status"]["ready"] = True
    yield "virt-handler", "status", status2
    yield "virt-controller", "", status2
    meta = clone(obj)
    meta.setdefault("metadata", {}) if isinstance(meta.get("metadata"), dict) else None
    if isinstance(meta.get("metadata"), dict):
        meta["metadata"]["finalizers"] = ["kubevirt.io/virtualMachineControllerFinalize"]
        meta["metadata"]["labels"] = {"app": "changed", "new": "x"}
        meta["metadata"]["resourceVersion"] = "17"
    yield "virt-controller", "", meta
    spec = clone(meta)
    spec.pop("spec", None)
    spec["spec"] = {"running": True}
    yield "kubectl-edit", "", spec
    yield "kubectl-edit", "", clone(spec)
    shape = clone(obj)
    shape["spec"] = 7
    shape["status"] = {"x": {"y": [1]}}
    yield "other", "", shape
    yield "other", "scale", shape


def _trimmed(obj: Obj) -> Obj:
    """``obj`` with one field changed and some removed, as its creator might edit it."""
    out = clone(obj)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        labels = meta.get("labels")
        if isinstance(labels, dict) and labels:
            first = next(iter(labels))
            labels[first] = "edited"
            labels.pop(list(labels)[-1]) if len(labels) > 1 else None
        else:
            meta["labels"] = {"edited": "x"}
    spec = out.get("spec")
    if isinstance(spec, dict) and spec:
        spec.pop(list(spec)[-1])
    return out


def _check_history(kind: KindInfo, doc: Obj) -> None:
    live = _both(kind, None, clone(doc), manager="kubectl-create", now=NOW)
    live = _both(kind, live, _trimmed(live), manager="kubectl-create", now=NOW)
    live = _both(kind, live, _trimmed(live), manager="kubectl-create", now=NOW)
    for i, (manager, subresource, new) in enumerate(_updates(live)):
        live = _both(kind, live, new, manager=manager, subresource=subresource,
                     now=f"2026-12-01T12:{i + 1:02}:00Z")
    given = clone(live)
    if isinstance(given.get("metadata"), dict):
        entries = given["metadata"].get("managedFields") or []
        given["metadata"]["managedFields"] = [*reversed(entries), {"manager": "bad"}]
        _both(kind, live, given, manager="x", now=LATER)
        _both(kind, None, given, manager="x", now=LATER)
        _both(kind, None, given, manager="x", now=LATER, subresource="status")
        given["metadata"]["managedFields"] = [{}]
        _both(kind, live, given, manager="x", now=LATER)
        _both(kind, None, given, manager="x", now=LATER)
        given["metadata"]["managedFields"] = []
        _both(kind, None, given, manager="x", now=LATER)


# ---- tests ---------------------------------------------------------------------------------------


def test_the_examples_are_there() -> None:
    assert len(_manifests()) >= 25


@pytest.mark.parametrize("kind", KIND_LIST, ids=lambda k: f"{k.group or 'core'}.{k.kind}")
def test_creates_match_the_oracle(kind: KindInfo) -> None:
    for doc in _docs():
        for subresource in ("", "status", "scale"):
            for manager, operation in (("kubectl-create", UPDATE), ("", UPDATE), ("a", APPLY)):
                _both(kind, None, clone(doc), manager=manager, operation=operation,
                      subresource=subresource, now=NOW)


@pytest.mark.parametrize("kind", KIND_LIST, ids=lambda k: f"{k.group or 'core'}.{k.kind}")
def test_update_histories_match_the_oracle(kind: KindInfo) -> None:
    for doc in _docs():
        _check_history(kind, doc)


def test_many_managers_fold_into_ancient_changes_as_before() -> None:
    kind = next(k for k in KINDS if k.kind == "VirtualMachine")
    live = _both(kind, None, _bench_object(3), manager="m00", now="2024-01-01T00:00:00Z")
    for i in range(1, 14):
        new = clone(live)
        new["metadata"]["labels"][f"l{i}"] = "x"
        live = _both(kind, live, new, manager=f"m{i:02}", now=f"2024-01-01T00:00:{i:02}Z")
        status = clone(live)
        status["status"] = {"n": i}
        live = _both(kind, live, status, manager=f"s{i:02}", subresource="status",
                     now=f"2024-01-01T00:00:{i:02}Z")
    assert any(e["manager"] == ANCIENT_CHANGES for e in live["metadata"]["managedFields"])


_KEYS: Final = st.sampled_from(["metadata", "spec", "status", "apiVersion", "kind", "name",
                                "labels", "finalizers", "conditions", "template", "domain",
                                "devices", "disks", "type", "resources", "taints", "key",
                                "involvedObject", "source", "nodeInfo", "daemonEndpoints",
                                "ownerReferences", "uid", "x", ""])
_SCALARS: Final = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(
    [0.0, 1.0, 1.5]), st.sampled_from(["", "a", "b", "Ready", "é"]))
_VALUES: Final = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner,
                                                                          max_size=5)),
    max_leaves=25)
_ROOTS: Final = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _graft(doc: Obj, extra: Obj) -> Obj:
    out = clone(doc)
    for key, value in extra.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KIND_LIST), base=st.sampled_from([{}, _bench_object(2), _node()]),
       first=_ROOTS, second=_ROOTS, subresource=st.sampled_from(["", "status"]))
def test_random_objects_match_the_oracle(kind: KindInfo, base: Obj, first: Obj, second: Obj,
                                         subresource: str) -> None:
    created = _both(kind, None, _graft(base, first), manager="one", now=NOW)
    updated = _both(kind, created, _graft(created, second), manager="two",
                    subresource=subresource, now=LATER)
    _both(kind, updated, _graft(created, first), manager="one", now="2026-12-01T14:00:00Z")
    _both(kind, updated, _trimmed(updated), manager="one", now="2026-12-01T14:00:00Z")
    _both(kind, updated, _trimmed(updated), manager="two", subresource=subresource, now=LATER)
    _both(kind, None, _graft(base, second), manager="two", subresource=subresource, now=NOW)


_TOKENS: Final = st.sampled_from([
    "f:a", "f:b", "f:", "f:.", ".", 'k:{"name":"x"}', 'k:{"b":1,"a":2}', 'k:{"a":2,"b":1}',
    'k:{"a":2, "b":1}', 'v:"x"', 'v: "x"', "v:1", "v:1.0", "v:1e400", "v:bad", "i:0", "x", "",
    "k:", "zz:1"])
_RAW_TREES: Final[st.SearchStrategy[Any]] = st.recursive(
    st.one_of(st.just({}), st.none(), st.integers(0, 1), st.just([])),
    lambda inner: st.dictionaries(_TOKENS, inner, max_size=5), max_leaves=30)


@settings(max_examples=600, deadline=None)
@given(trees=st.lists(_RAW_TREES, max_size=3))
def test_canonical_trees_match_parse_then_encode(trees: list[Any]) -> None:
    from virtshift.api import managedfields as mf

    fields: set[Path] = set()
    for tree in trees:
        fields |= parse_fields_v1(tree if isinstance(tree, dict) else {})
    expected = fields_v1(fields)
    got = mf.canonical_fields_v1(trees)
    assert _bytes(got) == _bytes(expected)
    assert _bytes(mf.fields_v1(fields)) == _bytes(expected)
    assert mf.parse_fields_v1(got) == frozenset(fields)
    for path in {p[:i] for p in fields for i in range(1, len(p) + 1)} | {("f:zz",)}:
        assert mf.fields_v1_has(got, path) == (path in fields)
    # decoding entries carrying these trees: one draft per identity, as decode_entries merges
    raw = [{"manager": "m", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": t}
           for t in trees]
    drafts = list(mf.decode_drafts(raw).values())
    entries = decode_entries(raw)
    assert [(d.manager, d.operation, d.api_version, d.time, d.subresource, d.current_fields())
            for d in drafts] == [(e.manager, e.operation, e.api_version, e.time, e.subresource,
                                  e.fields) for e in entries]


_ENTRIES: Final = st.lists(st.fixed_dictionaries(
    {"manager": st.sampled_from(["a", "b", "one", ""]),
     "operation": st.sampled_from(["Update", "Apply", ""]),
     "apiVersion": st.sampled_from(["kubevirt.io/v1", "v1", ""]),
     "fieldsType": st.sampled_from(["FieldsV1", "FieldsV1", "FieldsV1", "x"]),
     "fieldsV1": st.one_of(_RAW_TREES, st.just({"f:metadata": {"f:labels": {"f:x": {}}},
                                                  "f:spec": {".": {}, "f:a": {}}}))},
    optional={"time": st.sampled_from([NOW, LATER, "", 5]),
              "subresource": st.sampled_from(["status", ""])}), max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KIND_LIST), first=_ROOTS, second=_ROOTS, entries=_ENTRIES,
       replace_them=st.booleans(), subresource=st.sampled_from(["", "status"]))
def test_stored_entries_of_any_shape_match_the_oracle(kind: KindInfo, first: Obj, second: Obj,
                                                      entries: list[Obj], replace_them: bool,
                                                      subresource: str) -> None:
    old = _graft({"metadata": {"labels": {"x": "1"}}, "spec": {"a": 1}}, first)
    if not isinstance(old.get("metadata"), dict):
        old["metadata"] = {}
    old["metadata"]["managedFields"] = entries
    new = _graft(old, second)
    if replace_them and isinstance(new.get("metadata"), dict):
        new["metadata"]["managedFields"] = list(reversed(entries))
    elif isinstance(new.get("metadata"), dict):
        new["metadata"].pop("managedFields", None)
    _both(kind, old, new, manager="one", subresource=subresource, now=LATER)
    _both(kind, old, clone(old), manager="b", subresource=subresource, now=LATER)
    _both(kind, None, new, manager="b", subresource=subresource, now=LATER)


_LOOKALIKES: Final = [(1, True), (1, 1.0), (0, False), (0.0, False), ([1], [True]),
                      ({"x": 1}, {"x": 1.0}), ([{"name": "a", "v": 1}], [{"name": "a", "v": True}]),
                      (float("nan"), float("nan")), ([float("nan")], [float("nan")]),
                      (None, float("inf")), ({"b": 1, "a": 2}, {"a": 2, "b": 1}), (2**70, 2**70),
                      ([2**70], [2**70]), ({"a": None}, {"a": None})]


@pytest.mark.parametrize(("before", "after"), _LOOKALIKES)
@pytest.mark.parametrize("kind", [k for k in KIND_LIST if k.kind in ("VirtualMachine", "Node")],
                         ids=lambda k: k.kind)
def test_values_python_calls_equal_but_json_does_not(kind: KindInfo, before: Any, after: Any,
                                                     ) -> None:
    base = _bench_object(4)
    for where in ("spec", "metadata", "status"):
        old_doc = _graft(base, {where: {**base.get(where, {}), "odd": {"deep": [before]},
                                        "flat": before}})
        old = _both(kind, None, old_doc, manager="one", now=NOW)
        new = clone(old)
        new[where]["odd"] = {"deep": [after]}
        new[where]["flat"] = after
        for subresource in ("", "status"):
            _both(kind, old, new, manager="two", subresource=subresource, now=LATER)
            _both(kind, old, new, manager="one", subresource=subresource, now=LATER)
    shared = clone(base)
    shared["spec"]["same"] = before
    old = _both(kind, None, shared, manager="one", now=NOW)
    new = {**old, "spec": {**old["spec"]}}  # shares the value object itself
    _both(kind, old, new, manager="two", now=LATER)
