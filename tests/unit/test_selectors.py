"""Label and field selectors: parsing, matching and upstream error messages."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.api.selectors import (
    EVERYTHING,
    NOTHING,
    field_value,
    label_selector_from_dict,
    parse_field_selector,
    parse_label_selector,
)
from virtshift.errors import BadRequest


def _kind(group: str, version: str, kind: str) -> KindInfo:
    info = REGISTRY.by_kind(group, version, kind)
    assert info is not None
    return info


VM = _kind("kubevirt.io", "v1", "VirtualMachine")
VMI = _kind("kubevirt.io", "v1", "VirtualMachineInstance")
MIGRATION_POLICY = _kind("migrations.kubevirt.io", "v1alpha1", "MigrationPolicy")
NODE = _kind("", "v1", "Node")
NAMESPACE = _kind("", "v1", "Namespace")
EVENT = _kind("", "v1", "Event")
SECRET = _kind("", "v1", "Secret")
CONFIGMAP = _kind("", "v1", "ConfigMap")
PV = _kind("", "v1", "PersistentVolume")

LABELS = {"app": "web", "tier": "front", "version": "3", "empty": ""}

# ---- label selectors: matching --------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),
        ("app in (web,db)", True),
        ("app in (db)", False),
        ("missing in (x)", False),
        ("app notin (db,cache)", True),
        ("app notin (web)", False),
        ("missing notin (x)", True),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("empty=", True),
        ("empty in ()", True),
        ("app=web,tier=front", True),
        ("app=web,tier=back", False),
        ("app=web, tier in (front, back) ,!missing", True),
        ("version>2", True),
        ("version<3", False),
        ("app>1", False),
        ("in=x", False),  # 'in' is a valid key where a key is expected
    ],
)
def test_label_selector_matches(selector: str, matches: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is matches


def test_label_selector_against_no_labels() -> None:
    assert parse_label_selector("!a").matches(None)
    assert not parse_label_selector("a").matches({})
    assert parse_label_selector("").matches(None)


def test_label_selector_is_sorted_and_printable() -> None:
    sel = parse_label_selector("z=1,a in (c,b),!m,k")
    assert str(sel) == "a in (b,c),k,!m,z=1"
    assert not sel.empty()
    assert parse_label_selector("").empty()


def test_requires_exact_match() -> None:
    assert parse_label_selector("a=1,b in (2)").requires_exact_match("a") == "1"
    assert parse_label_selector("a=1,b in (2)").requires_exact_match("b") == "2"
    assert parse_label_selector("a!=1").requires_exact_match("a") is None
    assert parse_label_selector("a in (1,2)").requires_exact_match("a") is None


# ---- label selectors: errors ----------------------------------------------------------------

_NAME_PART = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used "
    "for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("a b", "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"),
        ("a=b c", "found 'c', expected: ',' or 'end of string'"),
        ("a in b", "unable to parse requirement: found 'b' expected: '('"),
        ("a in (b", "unable to parse requirement: found '', expected: ',' or ')'"),
        ("a=(b)", "unable to parse requirement: found '(', expected: identifier"),
        ("a,", "found '', expected: identifier after ','"),
        ("=a", "found '=', expected: !, identifier, or 'end of string'"),
        ("!", "unable to parse requirement: found '', expected: identifier"),
        ("a:b", f'unable to parse requirement: <nil>: Invalid value: "a:b": {_NAME_PART}'),
        (
            "a=-x",
            'unable to parse requirement: values[0][a]: Invalid value: "-x": a valid label must '
            "be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character (e.g. 'MyValue',  or "
            "'my_value',  or '12345', regex used for validation is "
            "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
        ),
        (
            "a>x",
            'unable to parse requirement: values[0]: Invalid value: "x": for \'Gt\', \'Lt\' '
            "operators, the value must be an integer",
        ),
        (
            "Example.com/a=b",
            'unable to parse requirement: <nil>: Invalid value: "Example.com/a": prefix part a '
            "lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character (e.g. "
            "'example.com', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ),
        ("x" * 64, 'unable to parse requirement: <nil>: Invalid value: "' + "x" * 64
         + '": name part must be no more than 63 characters'),
    ],
)
def test_label_selector_errors(selector: str, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_label_selector(selector)
    assert err.value.message == message
    assert err.value.status()["code"] == 400


# ---- metav1.LabelSelector objects -----------------------------------------------------------


def test_label_selector_from_dict() -> None:
    sel = label_selector_from_dict({
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "back"]},
            {"key": "version", "operator": "NotIn", "values": ["1"]},
            {"key": "app", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    })
    assert sel.matches(LABELS)
    assert not sel.matches({**LABELS, "legacy": "yes"})
    assert not sel.matches({**LABELS, "tier": "db"})
    assert str(sel) == "app=web,app,!legacy,tier in (back,front),version notin (1)"


def test_label_selector_from_dict_nil_and_empty() -> None:
    assert label_selector_from_dict(None) is NOTHING
    assert not NOTHING.matches({})
    assert not NOTHING.matches(LABELS)
    assert label_selector_from_dict({}) is EVERYTHING
    assert label_selector_from_dict({"matchLabels": None, "matchExpressions": []}) is EVERYTHING
    assert EVERYTHING.matches(None)


@pytest.mark.parametrize(
    ("sel", "message"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]},
         '"Equals" is not a valid label selector operator'),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
         "values: Invalid value: null: for 'in', 'notin' operators, values set can't be empty"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
         'values: Invalid value: ["b"]: values set must be empty for exists and does not exist'),
        ({"matchLabels": {"a b": "c"}}, f'key: Invalid value: "a b": {_NAME_PART}'),
    ],
)
def test_label_selector_from_dict_errors(sel: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as err:
        label_selector_from_dict(sel)
    assert err.value.message == message


# ---- field selectors ------------------------------------------------------------------------


def _vmi(name: str, phase: str, node: str = "") -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": "ns1"},
                           "status": {"phase": phase}}
    if node:
        obj["status"]["nodeName"] = node
    return obj


def test_field_selector_on_custom_resource() -> None:
    sel = parse_field_selector("status.phase=Running,metadata.namespace==ns1", VMI)
    assert sel.matches(_vmi("a", "Running"))
    assert not sel.matches(_vmi("a", "Pending"))
    assert parse_field_selector("status.nodeName!=node01", VMI).matches(_vmi("a", "Running"))
    assert parse_field_selector("status.nodeName=", VMI).matches(_vmi("a", "Running"))
    assert not parse_field_selector("status.nodeName=", VMI).matches(_vmi("a", "R", "n1"))
    assert parse_field_selector("", VMI).matches(_vmi("a", "Running"))


def test_field_selector_exact_name() -> None:
    assert parse_field_selector("metadata.name=foo", VM).exact_name() == "foo"
    assert parse_field_selector("metadata.name==foo", VM).exact_name() == "foo"
    assert parse_field_selector("metadata.name!=foo", VM).exact_name() is None
    assert parse_field_selector("metadata.namespace=x", VM).exact_name() is None
    sel = parse_field_selector("metadata.name=foo", VM)
    assert sel.matches({"metadata": {"name": "foo"}})
    assert not sel.matches({"metadata": {"name": "bar"}})


def test_field_selector_escapes() -> None:
    sel = parse_field_selector(r"metadata.name=a\,b\=c\\d", VM)
    assert sel.exact_name() == "a,b=c\\d"
    assert str(sel) == r"metadata.name=a\,b\=c\\d"


@pytest.mark.parametrize(
    ("kind", "selector", "message"),
    [
        (VM, "spec.foo=1", "field label not supported: spec.foo"),
        (VM, "metadata.name=a,spec.foo=1", "field label not supported: spec.foo"),
        (MIGRATION_POLICY, "metadata.namespace=x", "field label not supported: metadata.namespace"),
        (NODE, "metadata.namespace=x", "field label not supported: metadata.namespace"),
        (NODE, "status.phase=x", "field label not supported: status.phase"),
        (NAMESPACE, "spec.finalizers=x", "field label not supported: spec.finalizers"),
        (EVENT, "message=x", "field label not supported: message"),
        (SECRET, "data=x", "field label not supported: data"),
        (CONFIGMAP, "spec.foo=x",
         '"spec.foo" is not a known field selector: only "metadata.name", "metadata.namespace"'),
        (VM, "metadata.name = a", "field label not supported: metadata.name "),
        (VM, "abc", "invalid selector: 'abc'; can't understand 'abc'"),
        (VM, "metadata.name=a,b", "invalid selector: 'metadata.name=a,b'; can't understand 'b'"),
        (VM, r"metadata.name=a\x", r"invalid field selector: invalid escape sequence: \x"),
        (VM, "metadata.name=a\\", "invalid field selector: invalid escape sequence: \\"),
        (VM, "metadata.name==a=b", "invalid field selector: unescaped character in value: 61"),
    ],
)
def test_field_selector_errors(kind: KindInfo, selector: str, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_field_selector(selector, kind)
    assert err.value.message == message


@pytest.mark.parametrize(
    ("kind", "selector"),
    [
        (NODE, "metadata.name=n1,spec.unschedulable=true"),
        (NAMESPACE, "status.phase=Active"),
        (EVENT, "involvedObject.kind=VirtualMachine,reason=Started,type=Normal,source=x"),
        (SECRET, "type=Opaque,metadata.namespace=default"),
        (CONFIGMAP, "metadata.namespace=default"),
        (PV, "metadata.namespace="),  # the default conversion accepts it even cluster-scoped
        (MIGRATION_POLICY, "metadata.name=p"),
    ],
)
def test_field_selector_supported_fields(kind: KindInfo, selector: str) -> None:
    parse_field_selector(selector, kind)


def test_node_unschedulable_is_a_boolean_string() -> None:
    sel = parse_field_selector("spec.unschedulable=false", NODE)
    assert sel.matches({"metadata": {"name": "n1"}, "spec": {}})
    assert not sel.matches({"metadata": {"name": "n1"}, "spec": {"unschedulable": True}})
    cordoned = parse_field_selector("spec.unschedulable=true", NODE)
    assert cordoned.matches({"metadata": {"name": "n1"}, "spec": {"unschedulable": True}})


def test_event_fields() -> None:
    event = {
        "metadata": {"name": "vm1.1", "namespace": "ns1"},
        "involvedObject": {"kind": "VirtualMachine", "name": "vm1", "namespace": "ns1"},
        "reason": "Started",
        "type": "Normal",
        "reportingComponent": "virt-controller",
        "source": {},
    }
    assert field_value(EVENT, event, "source") == "virt-controller"
    assert field_value(EVENT, event, "involvedObject.name") == "vm1"
    assert field_value(EVENT, event, "involvedObject.uid") == ""
    sel = parse_field_selector("involvedObject.name=vm1,involvedObject.kind=VirtualMachine,"
                               "source=virt-controller", EVENT)
    assert sel.matches(event)
    event["source"] = {"component": "kubelet"}
    assert field_value(EVENT, event, "source") == "kubelet"
    assert not sel.matches(event)


def test_field_value_stringifies_scalars() -> None:
    obj = {"spec": {"n": 3, "b": False, "m": {"x": 1}}}
    assert field_value(VM, obj, "spec.n") == "3"
    assert field_value(VM, obj, "spec.b") == "false"
    assert field_value(VM, obj, "spec.m") == ""
    assert field_value(VM, obj, "spec.missing") == ""
