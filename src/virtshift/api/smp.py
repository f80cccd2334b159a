"""Strategic merge patch, as kube-apiserver applies it to the built-in kinds.

``application/strategic-merge-patch+json`` is JSON merge patch plus per-field list semantics:
lists a type declares with ``patchStrategy:"merge"`` merge item by item (maps by their
``patchMergeKey``, scalars as a set) instead of being replaced, and the patch can carry
directives — ``$patch`` (replace/delete), ``$retainKeys``, ``$setElementOrder/<list>`` and
``$deleteFromPrimitiveList/<list>`` — which kubectl's client-side apply sends. Custom resources
do not take it (415).

Which lists merge is data: :func:`list_type`, built from the ``patchStrategy``/
``patchMergeKey``/``listType`` tags of k8s.io/api and the KubeVirt/CDI OpenAPI documents.
Server-side apply (:mod:`virtshift.api.ssa`) reads the same table.

Patch values taken verbatim lose their directive keys, as decoding the result into a typed
object drops them upstream (under fieldValidation=Strict upstream rejects such a patch
instead). Deviations on inputs kubectl never sends: a list that only exists in the patch but
has a ``$setElementOrder`` is merged into an empty list (upstream keeps its ``$patch: delete``
items as plain items), and a ``$deleteFromPrimitiveList`` for a list without merge strategy
deletes instead of replacing the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from virtshift.api.gojson import (
    PatchServerError,
    go_format,
    go_json_type,
    go_kind,
    json_equal,
    rejected,
)
from virtshift.api.jsonvalue import clone
from virtshift.api.kinds import KindInfo
from virtshift.errors import BadRequest, UnsupportedMediaType

Obj = dict[str, Any]
Names = tuple[str, ...]
"""A field path by field names only, from the object root; list items are transparent."""

SMP_UNSUPPORTED_MESSAGE: Final = (
    "the body of the request was in an unknown format - accepted media types include: "
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
)
DIRECTIVE: Final = "$patch"
RETAIN_KEYS: Final = "$retainKeys"
SET_ELEMENT_ORDER: Final = "$setElementOrder"
DELETE_FROM_PRIMITIVE_LIST: Final = "$deleteFromPrimitiveList"


# ---- list semantics of the served kinds ------------------------------------------------------


@dataclass(frozen=True)
class ListType:
    """How one list field merges.

    ``relation`` is the server-side apply list type (``x-kubernetes-list-type``): ``atomic``
    (owned and replaced as a whole), ``set`` (of scalars) or ``map`` (items identified by
    ``keys``). ``smp_merge``/``smp_merge_key`` are the strategic merge patch tags
    (``patchStrategy:"merge"``, ``patchMergeKey``); a list without them is replaced by a patch.
    ``atomic_items`` marks items that are owned whole (``+structType=atomic``).
    """

    relation: Literal["atomic", "set", "map"] = "atomic"
    keys: tuple[str, ...] = ()
    smp_merge: bool = False
    smp_merge_key: str = ""
    atomic_items: bool = False


ATOMIC: Final = ListType()
_SET_MERGE: Final = ListType("set", smp_merge=True)
_BY_TYPE: Final = ListType("map", ("type",), smp_merge=True, smp_merge_key="type")
_BY_NAME: Final = ListType("map", ("name",))

# ObjectMeta at the object root, for every kind (custom resources get the built-in ObjectMeta
# schema there too). k8s.io/apimachinery meta/v1 types.go: finalizers +listType=set,
# patchStrategy=merge; ownerReferences +listType=map/+listMapKey=uid, patchMergeKey=uid, and
# OwnerReference is +structType=atomic; managedFields is atomic.
_ROOT_META_LISTS: Final[Mapping[Names, ListType]] = {
    ("metadata", "finalizers"): _SET_MERGE,
    ("metadata", "ownerReferences"): ListType(
        "map", ("uid",), smp_merge=True, smp_merge_key="uid", atomic_items=True),
}

# The built-in kinds, from k8s.io/api core/v1 types.go. Every list not named is atomic and
# replaced by strategic merge patches: NamespaceSpec.finalizers, NodeSpec.taints,
# NodeStatus.images/volumesInUse/volumesAttached, PVC/PV accessModes, PV mountOptions,
# StorageClass mountOptions/allowedTopologies, label selector requirements. Event, ConfigMap
# and Secret have no lists.
_BUILTIN_LISTS: Final[Mapping[str, Mapping[Names, ListType]]] = {
    "Namespace": {("status", "conditions"): _BY_TYPE},
    "Node": {
        ("spec", "podCIDRs"): _SET_MERGE,
        ("status", "conditions"): _BY_TYPE,
        # Declared merge-by-type although types repeat (InternalIP twice); upstream keeps it.
        ("status", "addresses"): _BY_TYPE,
    },
    "PersistentVolumeClaim": {("status", "conditions"): _BY_TYPE},
}

# Custom resources: lists without x-kubernetes-list-type are atomic for server-side apply (so
# disks, interfaces, volumes, networks are owned whole — as on a real cluster, where a VM's
# managedFields show "f:disks":{}). These are the map/set lists the KubeVirt and CDI OpenAPI
# documents declare, outside embedded ObjectMeta.
_VMI_SPEC_LISTS: Final[Mapping[str, ListType]] = {
    "resourceClaims": _BY_NAME,
    "topologySpreadConstraints": ListType("map", ("topologyKey", "whenUnsatisfiable")),
    "utilityVolumes": _BY_NAME,
}


def _under(prefix: Names, lists: Mapping[str, ListType]) -> dict[Names, ListType]:
    return {(*prefix, name): lt for name, lt in lists.items()}


_CUSTOM_LISTS: Final[Mapping[tuple[str, str], Mapping[Names, ListType]]] = {
    ("kubevirt.io", "VirtualMachineInstance"): _under(("spec",), _VMI_SPEC_LISTS),
    ("kubevirt.io", "VirtualMachine"): _under(("spec", "template", "spec"), _VMI_SPEC_LISTS),
    ("kubevirt.io", "VirtualMachineInstanceReplicaSet"): _under(
        ("spec", "template", "spec"), _VMI_SPEC_LISTS),
    ("pool.kubevirt.io", "VirtualMachinePool"): _under(
        ("spec", "virtualMachineTemplate", "spec", "template", "spec"), _VMI_SPEC_LISTS),
    ("kubevirt.io", "KubeVirt"): {
        ("spec", "configuration", "supportContainerResources"): ListType("map", ("type",)),
        ("spec", "configuration", "tlsConfiguration", "ciphers"): ListType("set"),
    },
    ("snapshot.kubevirt.io", "VirtualMachineSnapshot"): {
        ("status", "indications"): ListType("set"),
        ("status", "snapshotVolumes", "includedVolumes"): ListType("set"),
        ("status", "snapshotVolumes", "excludedVolumes"): ListType("set"),
    },
    ("snapshot.kubevirt.io", "VirtualMachineRestore"): {
        ("status", "deletedDataVolumes"): ListType("set"),
    },
    ("cdi.kubevirt.io", "CDIConfig"): {
        ("spec", "podResourceRequirements", "claims"): _BY_NAME,
        ("status", "defaultPodResourceRequirements", "claims"): _BY_NAME,
    },
}


def list_type(kind: KindInfo, names: Names) -> ListType:
    """The merge semantics of the list at ``names`` (field names from the root) in ``kind``."""
    found = _ROOT_META_LISTS.get(names)
    if found is not None:
        return found
    if kind.builtin:
        table = _BUILTIN_LISTS.get(kind.kind)
    else:
        table = _CUSTOM_LISTS.get((kind.group, kind.kind))
    if table is None:
        return ATOMIC
    return table.get(names, ATOMIC)


# ---- strategic merge patch -------------------------------------------------------------------

_DROP: Final = object()
_DIRECTIVE_PREFIXES: Final = (RETAIN_KEYS, SET_ELEMENT_ORDER, DELETE_FROM_PRIMITIVE_LIST)


def _discard_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _discard_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_discard_nulls(v) for v in value]
    return value


def _remove_directives(value: Any) -> Any:
    """``value`` as strategicpatch's removeDirectives leaves it: a map carrying ``$patch`` is
    dropped (``_DROP`` at the top), as are such list items; other directive keys go too."""
    if isinstance(value, dict):
        if DIRECTIVE in value:
            return _DROP
        out: Obj = {}
        for k, v in value.items():
            if k.startswith(_DIRECTIVE_PREFIXES):
                continue
            cleaned = _remove_directives(v)
            if cleaned is not _DROP:
                out[k] = cleaned
        return out
    if isinstance(value, list):
        cleaned = [_remove_directives(v) for v in value]
        return [c for c in cleaned if c is not _DROP]
    return value


def _strip_directive_keys(value: Any) -> Any:
    """``value`` with directive keys removed and nothing else: what decoding a patch value that
    was taken verbatim into a typed object keeps (unknown ``$`` keys are dropped)."""
    if isinstance(value, dict):
        return {k: _strip_directive_keys(v) for k, v in value.items()
                if k != DIRECTIVE and not k.startswith(_DIRECTIVE_PREFIXES)}
    if isinstance(value, list):
        return [_strip_directive_keys(v) for v in value]
    return value


def _take_patch_value(original: Obj, key: str, value: Any) -> None:
    cleaned = _remove_directives(_discard_nulls(value))
    if cleaned is _DROP:
        original.pop(key, None)
    else:
        original[key] = cleaned


def _extract_key(key: str, prefix: str) -> str:
    head, sep, rest = key.partition("/")
    if not sep or head != prefix:
        if prefix == DELETE_FROM_PRIMITIVE_LIST:
            raise BadRequest("invalid patch format of primitive list")
        raise BadRequest("invalid patch format of setElementOrder list")
    return rest


def _no_merge_key(item: Any, key: str) -> PatchServerError:
    return PatchServerError(
        f"map: {go_format(item)} does not contain declared merge key: {key}")


def _merge_key_value(item: Any, key: str) -> Any:
    if not isinstance(item, dict):
        raise PatchServerError(
            f"expected a map[string]interface {{}}, but received a {go_kind(item)}")
    if key not in item:
        raise _no_merge_key(item, key)
    return item[key]


def _element_kind(*lists: list[Any]) -> str:
    """The common Go type of the elements; errors as upstream for mixed lists and lists of lists."""
    found = ""
    for items in lists:
        for item in items:
            kind = go_kind(item)
            if not found:
                found = kind
                if kind == "[]interface {}":
                    raise rejected("lists of lists are not supported")
            elif kind != found:
                raise PatchServerError("list element types are not identical: "
                                       + go_format(list(lists)))
    if not found:
        raise PatchServerError("no elements in any of the given slices")
    return found


def _index(items: list[Any], item: Any, merge_key: str) -> int:
    """Position of ``item`` in ``items``, by merge key value for maps; -1 when absent."""
    probe = item.get(merge_key) if merge_key and isinstance(item, dict) else item
    for i, candidate in enumerate(items):
        value = candidate.get(merge_key) if merge_key and isinstance(candidate, dict) \
            else candidate
        if json_equal(probe, value):
            return i
    return -1


def _partition(merged: list[Any], by: list[Any], merge_key: str) -> tuple[list[Any], list[Any]]:
    """Split ``merged`` into (items also in ``by``, server-only items)."""
    ours: list[Any] = []
    server: list[Any] = []
    for item in merged:
        if merge_key:
            _merge_key_value(item, merge_key)
        (ours if _index(by, item, merge_key) >= 0 else server).append(item)
    return ours, server


def _sort_by(items: list[Any], order: list[Any], merge_key: str) -> list[Any]:
    if merge_key:
        for item in [*items, *order]:
            _merge_key_value(item, merge_key)

    def position(item: Any) -> int:
        idx = _index(order, item, merge_key)
        return idx if idx >= 0 else len(order)

    return sorted(items, key=position)


def _normalize_order(ours: list[Any], server: list[Any], our_order: list[Any],
                     server_order: list[Any], merge_key: str) -> list[Any]:
    """Patch items in patch order, server-only items in live order, interleaved by live order."""
    right = _sort_by(ours, our_order, merge_key)
    left = _sort_by(server, server_order, merge_key)
    out: list[Any] = []
    i = j = 0
    while i < len(left) or j < len(right):
        if i >= len(left):
            out.append(right[j])
            j += 1
        elif j >= len(right):
            out.append(left[i])
            i += 1
        else:
            li = _index(server_order, left[i], merge_key)
            ri = _index(server_order, right[j], merge_key)
            if li >= 0 and ri >= 0 and li < ri:
                out.append(left[i])
                i += 1
            else:
                out.append(right[j])
                j += 1
    return out


def _merge_slice(kind: KindInfo, original: list[Any], patch: list[Any], merge_key: str,
                 names: Names, delete_list: bool) -> list[Any]:
    if not original and not patch:
        return original
    elem = _element_kind(original, patch)
    if elem != "map[string]interface {}":
        if delete_list:
            return [v for v in original if _index(patch, v, "") < 0]
        merged: list[Any] = []
        for v in [*original, *patch]:
            if _index(merged, v, "") < 0:
                merged.append(v)
        ours, server = _partition(merged, patch, "")
        return _normalize_order(ours, server, patch, original, "")
    if not merge_key:
        raise PatchServerError("cannot merge lists without merge key for type struct")
    plain: list[Any] = []
    replace = False
    for item in patch:
        directive = item.get(DIRECTIVE, _DROP)
        if directive is _DROP:
            plain.append(item)
        elif directive == "delete":
            gone = _merge_key_value(item, merge_key)
            original = [o for o in original
                        if not (isinstance(o, dict) and merge_key in o
                                and json_equal(o[merge_key], gone))]
        elif directive == "replace":
            replace = True
        elif directive == "merge":
            raise PatchServerError("merging lists cannot yet be specified in the patch")
        else:
            raise PatchServerError(
                f"unknown patch type: {go_format(directive)} in map: {go_format(item)}")
    if replace:
        original, plain = [_strip_directive_keys(_discard_nulls(p)) for p in plain], []
    merged = list(original)
    for item in plain:
        wanted = _merge_key_value(item, merge_key)
        for i, candidate in enumerate(merged):
            if not isinstance(candidate, dict):
                raise PatchServerError(f"value for key {i} is not a map.")
            if merge_key in candidate and json_equal(candidate[merge_key], wanted):
                merged[i] = _smp_map(kind, candidate, item, names)
                break
        else:
            merged.append(_strip_directive_keys(_discard_nulls(item)))
    ours, server = _partition(merged, plain, merge_key)
    return _normalize_order(ours, server, plain, original, merge_key)


def _merge_list_field(kind: KindInfo, original: list[Any], patch: list[Any], names: Names,
                      delete_list: bool) -> list[Any]:
    lt = list_type(kind, names)
    if lt.smp_merge:
        return _merge_slice(kind, original, patch, lt.smp_merge_key, names, delete_list)
    if delete_list:
        return [v for v in original if _index(patch, v, "") < 0]
    return list(_strip_directive_keys(_discard_nulls(patch)))


def _map_directive(patch: Obj) -> Obj:
    directive = patch[DIRECTIVE]
    if directive == "replace":
        return dict(_strip_directive_keys(patch))
    if directive == "delete":
        return {}
    raise PatchServerError(
        f"unknown patch type: {go_format(directive)} in map: {go_format(patch)}")


def _apply_retain_keys(original: Obj, patch: Obj) -> None:
    if RETAIN_KEYS not in patch:
        return
    retain = patch.pop(RETAIN_KEYS)
    if not isinstance(retain, list):
        raise BadRequest("invalid patch format of retainKeys")
    keep = [k for k in retain if isinstance(k, str)]
    for key, value in patch.items():
        if value is None or key.startswith((DELETE_FROM_PRIMITIVE_LIST, SET_ELEMENT_ORDER)):
            continue
        if key not in keep:
            raise BadRequest("invalid patch format of retainKeys")
    for key in [k for k in original if k not in keep]:
        del original[key]


def _check_order(patch_list: list[Any], order: list[Any], merge_key: str) -> None:
    """The patch list's items must appear in ``$setElementOrder``'s relative order."""
    if not patch_list or not order:
        return
    items = patch_list
    if merge_key:
        for item in items:
            if not isinstance(item, dict):
                raise PatchServerError(f"expected a map[string]interface {{}}, but received "
                                       f"a {go_kind(item)}")
        items = [i for i in items if i.get(DIRECTIVE) != "delete"]
    pi = oi = 0
    while pi < len(items) and oi < len(order):
        if isinstance(items[pi], dict) and DIRECTIVE in items[pi]:
            pi += 1
            continue
        if merge_key:
            same = json_equal(_merge_key_value(items[pi], merge_key),
                              _merge_key_value(order[oi], merge_key))
        else:
            same = items[pi] == order[oi] and go_kind(items[pi]) == go_kind(order[oi])
        if same:
            pi += 1
        oi += 1
    if pi < len(items) and oi >= len(order):
        raise PatchServerError(
            f"The order in patch list:\n{go_format(patch_list)}\n doesn't match "
            f"{SET_ELEMENT_ORDER} list:\n{go_format(order)}\n")


def _apply_set_element_order(kind: KindInfo, original: Obj, patch: Obj, names: Names) -> None:
    for directive in [k for k in patch if k.startswith(SET_ELEMENT_ORDER)]:
        order = patch.pop(directive)
        if not isinstance(order, list):
            raise PatchServerError(
                f"expected a []interface {{}}, but received a {go_kind(order)}")
        field = _extract_key(directive, SET_ELEMENT_ORDER)
        lt = list_type(kind, (*names, field))
        merge_key = lt.smp_merge_key if lt.smp_merge else ""
        has_original, has_patch = field in original, field in patch
        original_list = original.get(field, [])
        patch_list = patch.get(field, [])
        if not isinstance(original_list, list) or not isinstance(patch_list, list):
            bad = patch_list if isinstance(original_list, list) else original_list
            raise PatchServerError(
                f"expected a []interface {{}}, but received a {go_kind(bad)}")
        _check_order(patch_list, order, merge_key)
        if not has_original and not has_patch:
            continue
        if has_original and not has_patch:
            merged = list(original_list)
        else:
            merged = _merge_list_field(kind, original_list, patch_list, (*names, field), False)
        ours, server = _partition(merged, order, merge_key)
        if merged:
            _element_kind(original_list, patch_list)
        original[field] = _normalize_order(ours, server, order, original_list, merge_key)
        patch.pop(field, None)


def _smp_map(kind: KindInfo, original: Obj, patch: Obj, names: Names) -> Obj:
    """Merge ``patch`` into ``original`` (both owned by the caller and mutated)."""
    if DIRECTIVE in patch:
        return _map_directive(patch)
    _apply_retain_keys(original, patch)
    _apply_set_element_order(kind, original, patch, names)
    regular = [k for k in patch if not k.startswith(DELETE_FROM_PRIMITIVE_LIST)]
    deletions = [k for k in patch if k.startswith(DELETE_FROM_PRIMITIVE_LIST)]
    for raw_key in [*regular, *deletions]:
        value = patch[raw_key]
        delete_list = raw_key in deletions
        key = _extract_key(raw_key, DELETE_FROM_PRIMITIVE_LIST) if delete_list else raw_key
        if value is None:
            original.pop(key, None)
            continue
        if key not in original or go_kind(original[key]) != go_kind(value):
            if not delete_list:
                _take_patch_value(original, key, value)
            continue
        current = original[key]
        if isinstance(current, dict):
            original[key] = _smp_map(kind, current, value, (*names, key))
        elif isinstance(current, list):
            original[key] = _merge_list_field(kind, current, value, (*names, key), delete_list)
        else:
            _take_patch_value(original, key, value)
    return original


def strategic_merge_patch(kind: KindInfo, obj: Obj, patch: Any) -> Obj:
    """Apply a strategic merge patch (``application/strategic-merge-patch+json``) to ``obj``.

    Only built-in kinds take it; for custom resources this is UnsupportedMediaType (415) with
    kube-apiserver's message. Maps merge recursively and ``null`` deletes; lists are replaced
    unless :func:`list_type` declares a merge strategy, in which case maps merge by the merge
    key and scalars as a set. The directives ``$patch`` (replace/delete, in maps and lists),
    ``$retainKeys``, ``$setElementOrder/<list>`` and ``$deleteFromPrimitiveList/<list>`` are
    honoured as kubectl sends them.
    """
    if not kind.builtin:
        raise UnsupportedMediaType(SMP_UNSUPPORTED_MESSAGE)
    if patch is None:
        return clone(obj)
    if not isinstance(patch, dict):
        raise BadRequest(f"json: cannot unmarshal {go_json_type(patch)} into Go value of type "
                         "map[string]interface {}")
    return _smp_map(kind, clone(obj), clone(patch), ())
