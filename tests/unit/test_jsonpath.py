"""The printer-column JSONPath subset."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.api.jsonpath import compile_path, evaluate, first
from virtshift.api.kinds import REGISTRY

VMI: dict[str, Any] = {
    "metadata": {
        "name": "vmi1",
        "labels": {"kubevirt.io/domain": "vmi1", "app": "web"},
        "annotations": {"a.b/c": "dotted"},
    },
    "spec": {"replicas": 3, "running": True},
    "status": {
        "phase": "Running",
        "nodeName": "node01",
        "interfaces": [
            {"name": "default", "ipAddress": "10.0.0.5", "mtu": 1500},
            {"name": "extra", "ipAddress": "10.0.1.5", "mtu": 9000},
        ],
        "conditions": [
            {"type": "LiveMigratable", "status": "False"},
            {"type": "Ready", "status": "True"},
            {"type": "Paused", "status": "False", "extra": None},
        ],
        "empty": [],
        "nothing": None,
    },
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (".status.phase", ["Running"]),
        (".spec.replicas", [3]),
        (".spec.running", [True]),
        (".status.interfaces[0].ipAddress", ["10.0.0.5"]),
        (".status.interfaces[1].name", ["extra"]),
        (".status.interfaces[-1].name", ["extra"]),
        (".status.interfaces[*].ipAddress", ["10.0.0.5", "10.0.1.5"]),
        (".status.interfaces[0:1].name", ["default"]),
        (".status.interfaces[1:].name", ["extra"]),
        (".status.conditions[?(@.type=='Ready')].status", ["True"]),
        (".status.conditions[?(@.type==\"Ready\")].status", ["True"]),
        (".status.conditions[?(@.type!='Ready')].type", ["LiveMigratable", "Paused"]),
        (".status.conditions[?(@.type == 'Paused')].status", ["False"]),
        (".status.interfaces[?(@.mtu>1500)].name", ["extra"]),
        (".status.interfaces[?(@.mtu<=1500)].name", ["default"]),
        (".status.interfaces[?(@.mtu==9000)].name", ["extra"]),
        (".status.conditions[?(@.extra)].type", ["Paused"]),
        (".metadata.labels['kubevirt.io/domain']", ["vmi1"]),
        ('.metadata.labels["kubevirt.io/domain"]', ["vmi1"]),
        (".metadata.annotations.a\\.b/c", ["dotted"]),
        (".metadata.annotations['a.b/c']", ["dotted"]),
        (".metadata.labels.*", ["web", "vmi1"]),
        ("..ipAddress", ["10.0.0.5", "10.0.1.5"]),
        ("{.status.nodeName}", ["node01"]),
        ("$.status.nodeName", ["node01"]),
        (".status.nothing", [None]),
        (".status.interfaces[?(@.name=='missing')].ipAddress", []),
    ],
)
def test_evaluate(path: str, expected: list[Any]) -> None:
    assert evaluate(VMI, path) == expected


@pytest.mark.parametrize(
    "path",
    [
        ".status.missing",
        ".status.missing.deeper",
        ".status.phase.deeper",
        ".status.interfaces.name",  # a field of a list selects nothing
        ".status.interfaces[5].name",  # out of range: a runtime error, so nothing
        ".status.empty[0]",
        ".status.interfaces[-3]",
        ".status.phase[0]",  # indexing a string
        ".status[*]",  # [*] on a map
        ".metadata[?(@.name=='vmi1')]",  # a filter over a map
        ".status.conditions[?(@.type==1)].status",  # string compared with a number
        ".spec[?(@.running==true)]",
    ],
)
def test_evaluate_yields_nothing(path: str) -> None:
    assert evaluate(VMI, path) == []


def test_filter_against_bool_literal() -> None:
    obj = {"items": [{"n": "a", "ok": True}, {"n": "b", "ok": False}, {"n": "c"}]}
    assert evaluate(obj, ".items[?(@.ok==true)].n") == ["a"]
    assert evaluate(obj, ".items[?(@.ok!=true)].n") == ["b"]
    assert evaluate(obj, ".items[?(@.ok)].n") == ["a", "b"]


def test_filter_comparing_two_paths() -> None:
    obj = {"items": [{"a": 1, "b": 1}, {"a": 1, "b": 2}]}
    assert evaluate(obj, ".items[?(@.a==@.b)].b") == [1]


def test_first() -> None:
    assert first(VMI, ".status.interfaces[*].ipAddress") == "10.0.0.5"
    assert first(VMI, ".status.missing") is None


def test_root_path() -> None:
    assert evaluate({"a": 1}, ".") == [{"a": 1}]


def test_compile_is_cached_and_reusable() -> None:
    p = compile_path(".status.phase")
    assert p is compile_path(".status.phase")
    assert p.find({"status": {"phase": "Pending"}}) == ["Pending"]
    assert p.find("not an object") == []


@pytest.mark.parametrize(
    "path",
    [
        "",
        "status.phase",
        ".status.",
        ".status..",
        ".status[",
        ".status[0",
        ".status[abc]",
        ".status[1:2:3]",
        ".status[?(@.type=='Ready']",
        ".status[?@.type=='Ready']",
        ".status[?(@.type==Ready)]",
        ".status['unterminated]",
        ".status['a''b']",
        ".a b",
        ".status[?('x')]",
    ],
)
def test_invalid_paths_raise(path: str) -> None:
    with pytest.raises(ValueError, match="invalid JSONPath"):
        compile_path(path)


def test_every_registry_column_path_parses() -> None:
    paths = {c.json_path for k in REGISTRY.kinds for c in k.columns_or_default()}
    assert ".status.conditions[?(@.type=='Ready')].status" in paths
    for path in paths:
        compile_path(path)
