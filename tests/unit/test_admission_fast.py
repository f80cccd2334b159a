"""Admission and schema validation give the same results as before their speed-up.

Every manifest of the example corpus (and the create benchmark's VirtualMachine) is run through
defaulting, schema validation (Strict, Warn and Ignore) and KubeVirt's semantic validation (create
and update, as a user and as a component), together with deterministic mutations of each: every
field deleted, set to null, set to values of other types and to odd strings and quantities, unknown
fields added, list items duplicated and lists grown past KubeVirt's 256 items.
``admission_snapshot.json`` holds, per manifest, a SHA-256 of all those results as the code
computed them before the speed-up; the test recomputes them. A hypothesis test also checks the
schema checker's shortcuts against its general path on random values.

Regenerate the snapshot (only when a behaviour change is intended) with
``python tests/unit/test_admission_fast.py > tests/unit/admission_snapshot.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bench.api_store import _api_object
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CORPUS
from virtshift.api import admission
from virtshift.api.admission import AdmissionConfig
from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.api.schema import SchemaSet, default_schemas
from virtshift.errors import Invalid

SNAPSHOT = Path(__file__).with_name("admission_snapshot.json")
CFG = AdmissionConfig(new_uuid=lambda: "6a1a2e4c-0000-4000-8000-000000000001")
GATED = AdmissionConfig(new_uuid=lambda: "6a1a2e4c-0000-4000-8000-000000000002",
                        feature_gates=frozenset(), bridge_on_pod_network=False,
                        cpu_request="250m", memory_overcommit=150)

Obj = dict[str, Any]

# Values a field is replaced with (a few per field, picked by a seeded generator).
REPLACEMENTS: tuple[Any, ...] = (
    None, 0, -1, 1, 7, 2**40, 2**70, 1.5, 2.0, True, False, "", "x", "Invalid Name!", "a" * 70,
    "128Mi", "0", "-1Gi", "1e3", "500m", "1.5Gi", "abc", "virtio", "sata", "Halted", "Always",
    "10.0.0.1", [], [{}], ["x"], {}, {"x": 1}, {"name": "x"},
)


def sample_vm(i: int) -> Obj:
    """The create benchmark's VirtualMachine."""
    vm: Obj = _api_object(i)
    return vm


def documents() -> list[tuple[str, Obj]]:
    docs: list[tuple[str, Obj]] = [("bench/vm-0000001", sample_vm(1))]
    for path in sorted(CORPUS.rglob("*.yaml")):
        for n, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and _kind(doc) is not None:
                docs.append((f"{path.relative_to(CORPUS)}#{n}", doc))
    return docs


def _kind(doc: Obj) -> KindInfo | None:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    return REGISTRY.by_api_version(api_version, kind)


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*at, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def variants(doc: Obj, seed: str) -> Iterator[Obj]:
    """``doc`` and deterministic mutations of it."""
    rng = random.Random(seed)
    yield json.loads(json.dumps(doc))
    for path in list(_paths(doc)):
        if len(path) < 2 or path[0] in ("apiVersion", "kind"):
            continue
        parent_path, last = path[:-1], path[-1]
        value = _get(doc, path)
        mutated = json.loads(json.dumps(doc))
        parent = _get(mutated, parent_path)
        del parent[last]
        yield mutated
        for replacement in rng.sample(REPLACEMENTS, 5):
            mutated = json.loads(json.dumps(doc))
            _get(mutated, parent_path)[last] = json.loads(json.dumps(replacement))
            yield mutated
        if isinstance(value, dict):
            mutated = json.loads(json.dumps(doc))
            _get(mutated, path)["bogusField"] = {"a": 1}
            yield mutated
        if isinstance(value, list) and value:
            mutated = json.loads(json.dumps(doc))
            target = _get(mutated, path)
            target.append(json.loads(json.dumps(target[0])))
            yield mutated
            # Past the 256 items KubeVirt allows, with the names kept unique where there are.
            mutated = json.loads(json.dumps(doc))
            target = _get(mutated, path)
            for i in range(257):
                item = json.loads(json.dumps(value[0]))
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    item["name"] = f"{item['name']}-{i}"
                target.append(item)
            yield mutated
        if isinstance(value, str):
            for text in (value.upper(), value + "-", "1" + value, value + "Gi"):
                mutated = json.loads(json.dumps(doc))
                _get(mutated, parent_path)[last] = text
                yield mutated
        if isinstance(value, int) and not isinstance(value, bool):
            for number in (value * 1000, -value, str(value)):
                mutated = json.loads(json.dumps(doc))
                _get(mutated, parent_path)[last] = number
                yield mutated


def _guard(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return ["ok", fn(*args, **kw)]
    except Invalid as e:
        return ["invalid", str(e), [[c.type, c.field, c.message] for c in e.causes]]
    except Exception as e:  # the snapshot records whatever happens
        return ["error", type(e).__name__, str(e)]


def _errors(errs: Any) -> Any:
    return [[e.type, e.field, e.message] for e in errs]


def results(kind: KindInfo, obj: Obj, base: Obj) -> Any:
    """Everything admission and schema validation say about ``obj`` (``base`` is the old object
    of an update)."""
    schemas = default_schemas()
    before = json.dumps(obj)
    out: list[Any] = []
    for cfg in (CFG, GATED):
        defaulted = _guard(admission.default, kind, obj, config=cfg)
        out.append(defaulted)
        out.append(_guard(admission.default, kind, obj, old=base, config=cfg))
        if defaulted[0] != "ok":
            continue
        d = defaulted[1]
        after_default = json.dumps(d)
        for mode in ("Strict", "Warn", "Ignore") if cfg is CFG else ("Strict",):
            out.append(_guard(schemas.validate, kind, d, field_validation=mode))
        for internal in (False, True):
            out.append(_guard(lambda *a, **k: _errors(admission.validate(*a, **k)),
                              kind, d, None, config=cfg, internal=internal))
        out.append(_guard(lambda *a, **k: _errors(admission.validate(*a, **k)),
                          kind, d, base, config=cfg, internal=False))
        out.append(json.dumps(d) == after_default)
    out.append(json.dumps(obj) == before)
    return out


def document_digest(doc: Obj, name: str) -> str:
    kind = _kind(doc)
    assert kind is not None
    h = hashlib.sha256()
    for variant in variants(doc, name):
        h.update(json.dumps(results(kind, variant, doc), sort_keys=False,
                            default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def _snapshot() -> dict[str, str]:
    data = json.loads(SNAPSHOT.read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_same_results_as_before(name: str, doc: Obj) -> None:
    assert document_digest(doc, name) == _snapshot()[name]


def test_snapshot_covers_every_document() -> None:
    assert sorted(_snapshot()) == sorted(n for n, _ in documents())


if __name__ == "__main__":
    json.dump({n: document_digest(d, n) for n, d in documents()}, sys.stdout, indent=1)
    sys.stdout.write("\n")


# ---- the schema checker's shortcuts against its general path ------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "128Mi", "virtio", "2024-01-01T00:00:00Z", "aGk=", "1.5"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["name", "bus", "x", "cores", "image"]), children,
                      max_size=3),
    max_leaves=8,
)


def _general_path_schemas() -> SchemaSet:
    """A schema set whose nodes take no shortcut: every value goes through ``_check``."""
    general = SchemaSet.load()
    for doc in (sample_vm(0), *(d for _, d in documents())):
        kind = _kind(doc)
        assert kind is not None
        key = general.kind_definition(kind)
        if key is not None:  # kinds without schema accept anything
            general._root_node(key)  # compiled (and finished) before the shortcuts are turned off
    for node in general._nodes.values():  # the compiled nodes
        node.plain, node.int_min, node.int_max = frozenset(), 1, 0
    for node in general._roots.values():
        stack = [node]
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            n.plain, n.int_min, n.int_max = frozenset(), 1, 0
            stack.extend(n.props.values())
            stack.extend(x for x in (n.additional, n.items) if x is not None)
    return general


_GENERAL: list[SchemaSet] = []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schema_shortcuts_match_general_path(data: st.DataObject) -> None:
    if not _GENERAL:
        _GENERAL.append(_general_path_schemas())
    name, doc = data.draw(st.sampled_from(documents()))
    kind = _kind(doc)
    assert kind is not None
    obj = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in _paths(obj) if len(p) >= 2 and p[0] not in ("apiVersion", "kind")]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        _get(obj, path[:-1])[path[-1]] = data.draw(_JSON_VALUES)
    for mode in ("Strict", "Warn", "Ignore"):
        fast = _guard(default_schemas().validate, kind, obj, field_validation=mode)
        general = _guard(_GENERAL[0].validate, kind, obj, field_validation=mode)
        assert json.dumps(fast, default=repr) == json.dumps(general, default=repr), name
