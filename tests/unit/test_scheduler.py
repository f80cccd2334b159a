"""Placement of VMIs on nodes: requests, filters, scores and the FitError message."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.controller.scheduler import (
    Placement,
    Requests,
    effective_taints,
    node_usage,
    place,
    tolerates,
    vcpus,
    vmi_requests,
)

Obj = dict[str, Any]
MI = 1024 * 1024
GI = 1024 * MI
# The launcher's overhead for a 1Gi, 1 vCPU VMI with graphics: page tables (1Gi/512, rounded
# as upstream), 220Mi for the processes, 8Mi per vCPU, 8Mi IO thread, 32Mi video.
OVERHEAD_1GI = 1_073_742_000 // 512 + (220 + 8 + 8 + 32) * MI


def node(name: str, cpu: str = "4", memory: str = "8Gi", *, labels: dict[str, str] | None = None,
         taints: list[Obj] | None = None, unschedulable: bool = False,
         ready: str | None = "True") -> Obj:
    spec: Obj = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    conditions = [] if ready is None else [{"type": "Ready", "status": ready}]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  **(labels or {})}},
            "spec": spec,
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                       "capacity": {"cpu": cpu, "memory": memory, "pods": "110"},
                       "conditions": conditions}}


def vmi(name: str = "v", *, memory: str = "1Gi", cpu: str | None = None, node_name: str = "",
        phase: str = "Scheduling", **spec: Any) -> Obj:
    domain: Obj = {"cpu": {"sockets": 1, "cores": 1, "threads": 1},
                   "memory": {"guest": memory},
                   "resources": {"requests": {"memory": memory}}}
    if cpu is not None:
        domain["resources"]["requests"]["cpu"] = cpu
    status: Obj = {"phase": phase}
    if node_name:
        status["nodeName"] = node_name
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {"domain": domain, **spec}, "status": status}


def placed(nodes: list[Obj], target: Obj | None = None, others: list[Obj] | None = None
           ) -> Placement:
    return place(target or vmi(), nodes, others or [])


def taint(key: str, effect: str = "NoSchedule", value: str = "") -> Obj:
    t = {"key": key, "effect": effect}
    if value:
        t["value"] = value
    return t


# ---- requests -----------------------------------------------------------------------------


def test_requests_of_a_small_vmi() -> None:
    assert vmi_requests(vmi()) == Requests(100, GI + OVERHEAD_1GI)


def test_cpu_requests() -> None:
    assert vmi_requests(vmi(cpu="1500m")).cpu_milli == 1500
    limited = vmi()
    limited["spec"]["domain"]["resources"]["limits"] = {"cpu": "2"}
    assert vmi_requests(limited).cpu_milli == 2000
    wide = vmi()
    wide["spec"]["domain"]["cpu"] = {"sockets": 2, "cores": 2, "threads": 2}
    assert vmi_requests(wide).cpu_milli == 800  # 100m per vCPU
    wide["spec"]["domain"]["cpu"]["dedicatedCpuPlacement"] = True
    assert vmi_requests(wide).cpu_milli == 8000  # a whole CPU each


def test_vcpus() -> None:
    assert vcpus({"cpu": {"sockets": 2, "cores": 3, "threads": 2}}) == 12
    assert vcpus({"cpu": {"cores": 4}}) == 4
    assert vcpus({"resources": {"limits": {"cpu": "2500m"}}}) == 3
    assert vcpus({"resources": {"requests": {"cpu": "2"}}}) == 2
    assert vcpus({}) == 1


def test_memory_request_sources_and_overheads() -> None:
    base = vmi_requests(vmi()).memory
    guest_only = vmi()
    del guest_only["spec"]["domain"]["resources"]
    assert vmi_requests(guest_only).memory == base
    headless = vmi()
    headless["spec"]["domain"]["devices"] = {"autoattachGraphicsDevice": False}
    assert vmi_requests(headless).memory == base - 32 * MI
    tpm = vmi()
    tpm["spec"]["domain"]["devices"] = {"tpm": {}}
    assert vmi_requests(tpm).memory == base + 53 * MI
    probed = vmi(readinessProbe={"exec": {"command": ["true"]}},
                 livenessProbe={"exec": {"command": ["true"]}})
    assert vmi_requests(probed).memory == base + 2 * 10 * MI + 100 * MI
    wide = vmi()
    wide["spec"]["domain"]["cpu"]["sockets"] = 4
    assert vmi_requests(wide).memory == base + 3 * 8 * MI
    # Guaranteed QoS (limits equal requests) reserves 100Mi more.
    guaranteed = vmi(cpu="1")
    guaranteed["spec"]["domain"]["resources"]["limits"] = {"cpu": "1", "memory": "1Gi"}
    assert vmi_requests(guaranteed).memory == base + 100 * MI


# ---- fitting ------------------------------------------------------------------------------


def test_no_nodes() -> None:
    assert placed([]) == Placement(None, "no nodes available to schedule pods",
                                   "Unschedulable")


def test_requests_against_allocatable() -> None:
    assert placed([node("small", memory="1Gi"), node("big", memory="2Gi")]).node == "big"
    result = placed([node("small", memory="1Gi"), node("tiny", cpu="50m")])
    assert result.node is None and result.reason == "Unschedulable"
    assert result.message == (
        "0/2 nodes are available: 1 Insufficient cpu, 1 Insufficient memory. preemption: "
        "0/2 nodes are available: 2 No preemption victims found for incoming pod.")


def test_exact_fit() -> None:
    need = vmi_requests(vmi())
    exact = node("n", cpu="100m", memory=str(need.memory))
    assert placed([exact]).node == "n"
    short = node("n", cpu="100m", memory=str(need.memory - 1))
    assert placed([short]).node is None


def test_capacity_when_allocatable_is_missing() -> None:
    n = node("n", memory="2Gi")
    del n["status"]["allocatable"]
    assert placed([n]).node == "n"


def test_vmis_already_placed_use_up_the_node() -> None:
    nodes = [node("a", memory="3Gi"), node("b", memory="2Gi")]
    # Empty nodes: the one with the most room left.
    assert placed(nodes).node == "a"
    busy = [vmi("x", node_name="a", phase="Running")]
    assert placed(nodes, others=busy).node == "b"
    # Two placed VMIs fill "a"; "b" has one slot.
    full = [*busy, vmi("y", node_name="a", phase="Scheduled"),
            vmi("z", node_name="b", phase="Running")]
    result = placed(nodes, others=full)
    assert result.node is None
    assert result.message.startswith("0/2 nodes are available: 2 Insufficient memory.")


def test_only_active_vmis_and_never_itself_count() -> None:
    nodes = [node("a", memory="2Gi")]
    done = [vmi("x", node_name="a", phase=p) for p in ("Succeeded", "Failed", "Pending")]
    assert placed(nodes, others=done).node == "a"
    unplaced = [vmi("x", phase="Scheduling")]  # no node yet
    assert placed(nodes, others=unplaced).node == "a"
    me = vmi("me", node_name="a", phase="Scheduled")  # e.g. re-placed after an update
    assert placed(nodes, target=me, others=[me]).node == "a"


def test_node_usage() -> None:
    vmis = [vmi("x", node_name="a", phase="Running"), vmi("y", node_name="a", phase="Unknown"),
            vmi("z", node_name="b", phase="Failed")]
    one = vmi_requests(vmis[0])
    assert node_usage(vmis) == {"a": one + one}
    assert node_usage(vmis, exclude_uid="uid-x") == {"a": one}


# ---- node selection -----------------------------------------------------------------------


def test_node_selector() -> None:
    nodes = [node("a", memory="4Gi"), node("b", labels={"disk": "ssd"})]
    assert placed(nodes, vmi(nodeSelector={"disk": "ssd"})).node == "b"
    result = placed(nodes, vmi(nodeSelector={"disk": "nvme"}))
    assert result.node is None
    assert result.message == (
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector. "
        "preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.")


def required(*terms: Obj) -> Obj:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": list(terms)}}}


def expr(key: str, operator: str, *vals: str) -> Obj:
    e: Obj = {"key": key, "operator": operator}
    if vals:
        e["values"] = list(vals)
    return e


NODES = [node("a", labels={"zone": "z1", "gen": "3"}),
         node("b", labels={"zone": "z2", "gen": "5", "gpu": "yes"}),
         node("c", labels={"zone": "z3"})]


@pytest.mark.parametrize(("terms", "fits"), [
    ([{"matchExpressions": [expr("zone", "In", "z2", "z3")]}], {"b", "c"}),
    ([{"matchExpressions": [expr("zone", "NotIn", "z2", "z3")]}], {"a"}),
    ([{"matchExpressions": [expr("gpu", "Exists")]}], {"b"}),
    ([{"matchExpressions": [expr("gpu", "DoesNotExist")]}], {"a", "c"}),
    ([{"matchExpressions": [expr("gen", "Gt", "4")]}], {"b"}),
    ([{"matchExpressions": [expr("gen", "Lt", "4")]}], {"a"}),  # c has no gen label
    ([{"matchExpressions": [expr("zone", "In", "z1"), expr("gen", "Gt", "4")]}], set()),
    ([{"matchExpressions": [expr("zone", "In", "z1")]},  # terms are ORed
      {"matchExpressions": [expr("gen", "Gt", "4")]}], {"a", "b"}),
    ([{"matchFields": [expr("metadata.name", "In", "c")]}], {"c"}),
    ([{"matchFields": [expr("metadata.name", "NotIn", "c")]}], {"a", "b"}),
    ([{"matchFields": [expr("metadata.labels", "In", "c")]}], set()),
    ([{}], set()),  # an empty term matches nothing
    ([], set()),
])
def test_required_node_affinity(terms: list[Obj], fits: set[str]) -> None:
    target = vmi(affinity=required(*terms))
    got = {n["metadata"]["name"] for n in NODES if placed([n], target).node is not None}
    assert got == fits


def test_preferred_node_affinity_wins_among_fitting_nodes() -> None:
    nodes = [node("a", memory="16Gi"), node("b", labels={"zone": "z2"})]
    assert placed(nodes).node == "a"  # most room
    preferred = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "preference": {"matchExpressions": [expr("zone", "In", "z2")]}}]}}
    assert placed(nodes, vmi(affinity=preferred)).node == "b"


def test_schedulable_label_false_excludes_the_node() -> None:
    nodes = [node("a", labels={"kubevirt.io/schedulable": "false"}), node("b", memory="2Gi")]
    assert placed(nodes).node == "b"
    assert "1 node(s) didn't match Pod's node affinity/selector" in placed(nodes[:1]).message


def test_ties_go_to_the_first_name() -> None:
    assert placed([node("n2"), node("n1"), node("n3")]).node == "n1"


# ---- taints, cordons and readiness --------------------------------------------------------


def test_taints_and_tolerations() -> None:
    tainted = node("a", memory="16Gi", taints=[taint("dedicated", value="db")])
    plain = node("b")
    assert placed([tainted, plain]).node == "b"
    result = placed([tainted])
    assert result.message == (
        "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: db}. "
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.")
    for toleration in ({"key": "dedicated", "operator": "Equal", "value": "db"},
                       {"key": "dedicated", "value": "db"},  # Equal by default
                       {"key": "dedicated", "operator": "Exists"},
                       {"operator": "Exists"},  # everything
                       {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}):
        assert placed([tainted, plain], vmi(tolerations=[toleration])).node == "a", toleration
    for toleration in ({"key": "dedicated", "value": "web"},
                       {"key": "other", "operator": "Exists"},
                       {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}):
        assert placed([tainted, plain], vmi(tolerations=[toleration])).node == "b", toleration


def test_no_execute_taints_filter_too() -> None:
    result = placed([node("a", taints=[taint("evict", "NoExecute")])])
    assert "untolerated taint {evict: }" in result.message


def test_prefer_no_schedule_only_scores() -> None:
    soft = node("a", memory="16Gi", taints=[taint("spot", "PreferNoSchedule")])
    assert placed([soft]).node == "a"
    assert placed([soft, node("b")]).node == "b"
    tolerant = vmi(tolerations=[{"key": "spot", "operator": "Exists"}])
    assert placed([soft, node("b")], tolerant).node == "a"


def test_tolerates() -> None:
    t = taint("k", value="v")
    assert tolerates({"key": "k", "value": "v"}, t)
    assert not tolerates({"key": "k", "value": "w"}, t)
    assert not tolerates({"key": "k", "operator": "Gte", "value": "v"}, t)
    assert tolerates({"operator": "Exists", "effect": "NoSchedule"}, t)
    assert not tolerates({"operator": "Exists", "effect": "NoExecute"}, t)


def test_cordoned_node() -> None:
    cordoned = node("a", memory="16Gi", unschedulable=True)
    assert placed([cordoned, node("b")]).node == "b"
    assert placed([cordoned]).message == (
        "0/1 nodes are available: 1 node(s) were unschedulable. preemption: 0/1 nodes are "
        "available: 1 Preemption is not helpful for scheduling.")
    tolerant = vmi(tolerations=[{"key": "node.kubernetes.io/unschedulable",
                                 "operator": "Exists", "effect": "NoSchedule"}])
    assert placed([cordoned], tolerant).node == "a"


@pytest.mark.parametrize(("ready", "key"), [
    ("False", "node.kubernetes.io/not-ready"),
    ("Unknown", "node.kubernetes.io/unreachable"),
    (None, "node.kubernetes.io/unreachable"),  # never reported
])
def test_nodes_that_are_not_ready(ready: str | None, key: str) -> None:
    sick = node("a", memory="16Gi", ready=ready)
    assert effective_taints(sick) == [{"key": key, "effect": "NoSchedule"}]
    assert placed([sick, node("b")]).node == "b"
    assert placed([sick]).message.startswith(
        f"0/1 nodes are available: 1 node(s) had untolerated taint {{{key}: }}.")
    tolerant = vmi(tolerations=[{"key": key, "operator": "Exists"}])
    assert placed([sick], tolerant).node == "a"


def test_effective_taints_are_not_duplicated() -> None:
    n = node("a", ready="False", unschedulable=True,
              taints=[taint("node.kubernetes.io/not-ready")])
    assert effective_taints(n) == [taint("node.kubernetes.io/not-ready"),
                                   taint("node.kubernetes.io/unschedulable")]
    assert effective_taints(node("b")) == []


def test_fit_message_counts_each_reason() -> None:
    nodes = [node("a", memory="1Gi"), node("b", labels={"x": "y"}), node("c", ready="False"),
             node("d", unschedulable=True)]
    result = placed(nodes, vmi(nodeSelector={"disk": "ssd"}))
    assert result.message == (
        "0/4 nodes are available: 1 node(s) had untolerated taint "
        "{node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable, 2 node(s) didn't "
        "match Pod's node affinity/selector. preemption: 0/4 nodes are available: 4 "
        "Preemption is not helpful for scheduling.")
    # The documented example.
    nodes = [node("a", memory="1Gi", labels={"disk": "ssd"}), node("b"), node("c")]
    assert placed(nodes, vmi(nodeSelector={"disk": "ssd"})).message == (
        "0/3 nodes are available: 1 Insufficient memory, 2 node(s) didn't match Pod's node "
        "affinity/selector. preemption: 0/3 nodes are available: 1 No preemption victims "
        "found for incoming pod, 2 Preemption is not helpful for scheduling.")
