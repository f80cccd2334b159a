"""Node lifecycle: heartbeat observation, Ready=Unknown with the unreachable taints, their removal
when heartbeats resume, the scheduler refusing lost nodes, VMI failover and the timings."""

from __future__ import annotations

import copy
import datetime
import random
from typing import Any, cast

import pytest

from virtshift.agent.main import AgentError, heartbeat_seconds
from virtshift.api.kinds import REGISTRY
from virtshift.client.rest import Client
from virtshift.controller.events import build_event
from virtshift.controller.node import (
    HEARTBEAT_ANNOTATION,
    MESSAGE_STOPPED_POSTING,
    NODE_AGENT_FINALIZER,
    REASON_NODE_STATUS_UNKNOWN,
    REASON_NODE_UNRESPONSIVE,
    NodeConfigError,
    NodeDecision,
    NodeTimings,
    Observation,
    observe,
    reconcile_failover,
    reconcile_node,
    timings_from_env,
)
from virtshift.controller.nodeloop import NodeController
from virtshift.controller.scheduler import SCHEDULABLE_LABEL, TAINT_UNREACHABLE, place
from virtshift.controller.vm import DeleteVMI, VMInputs, reconcile_vm

Obj = dict[str, Any]

T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
TS0 = "2026-05-06T07:08:09Z"
TIMINGS = NodeTimings(heartbeat=10, grace=40, failover=60)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def make_node(name: str = "node01", *, ready: str = "True", beat: str = TS0,
              transition: str = TS0, taints: list[Obj] | None = None,
              schedulable: str = "true") -> Obj:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "5", "uid": f"uid-{name}",
                     "labels": {SCHEDULABLE_LABEL: schedulable,
                                "kubernetes.io/hostname": name},
                     "annotations": {HEARTBEAT_ANNOTATION: beat}},
        "spec": {"taints": list(taints or [])},
        "status": {"allocatable": {"cpu": "4", "memory": "8Gi"},
                   "conditions": [{"type": "Ready", "status": ready,
                                   "reason": "KubeletReady", "message": "posting",
                                   "lastHeartbeatTime": beat,
                                   "lastTransitionTime": transition}]},
    }


def applied(node: Obj, d: NodeDecision) -> Obj:
    """The node as the loop would leave it after writing ``d``."""
    out = copy.deepcopy(node)
    if d.status is not None:
        out["status"] = d.status
    if d.taints is not None:
        out["spec"]["taints"] = d.taints
    if d.labels is not None:
        out["metadata"]["labels"] = d.labels
    return out


def ready_of(node: Obj) -> Obj:
    return next(c for c in node["status"]["conditions"] if c["type"] == "Ready")


def make_vmi(name: str, node: str = "node01", phase: str = "Running", *,
             finalizers: tuple[str, ...] = (NODE_AGENT_FINALIZER,)) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                         "finalizers": list(finalizers)},
            "spec": {"domain": {"memory": {"guest": "128Mi"}}},
            "status": {"phase": phase, "nodeName": node,
                       "phaseTransitionTimestamps": [
                           {"phase": "Running", "phaseTransitionTimestamp": TS0}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


# ---- timings ---------------------------------------------------------------------------------


def test_timings_defaults_and_environment() -> None:
    assert timings_from_env({}) == NodeTimings(10.0, 40.0, 60.0)
    assert timings_from_env({"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "1",
                             "VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "4",
                             "VIRTSHIFT_NODE_FAILOVER_SECONDS": "2.5"}) == NodeTimings(1, 4, 2.5)


@pytest.mark.parametrize("env, fragment", [
    ({"VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "soon"}, "not a number"),
    ({"VIRTSHIFT_NODE_FAILOVER_SECONDS": "0"}, "positive"),
    ({"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "-1"}, "positive"),
    ({"VIRTSHIFT_NODE_FAILOVER_SECONDS": "nan"}, "positive"),
    ({"VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "10"}, "must exceed the heartbeat"),
    ({"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "5",
      "VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "4"}, "must exceed the heartbeat"),
])
def test_invalid_timings_are_refused(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(NodeConfigError, match=fragment):
        timings_from_env(env)


def test_the_controller_refuses_invalid_timings_at_start() -> None:
    env = {"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "10",
           "VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS": "5"}
    with pytest.raises(NodeConfigError, match="VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS=5 must"):
        NodeController(cast(Client, None), REGISTRY, env=env)
    ok = NodeController(cast(Client, None), REGISTRY, env={})
    assert ok.timings == NodeTimings()


def test_agent_heartbeat_interval() -> None:
    assert heartbeat_seconds({}) == 10.0
    assert heartbeat_seconds({"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": "0.5"}) == 0.5
    for bad in ("0", "-2", "x", "inf"):
        with pytest.raises(AgentError, match="VIRTSHIFT_NODE_HEARTBEAT_SECONDS"):
            heartbeat_seconds({"VIRTSHIFT_NODE_HEARTBEAT_SECONDS": bad})


# ---- heartbeats and Ready ---------------------------------------------------------------------


def test_observation_moves_only_when_the_heartbeat_changes() -> None:
    node = make_node()
    first = observe(None, node, T0)
    assert first.seen_at == T0
    assert observe(first, node, at(30)) is first  # same stamps: still seen at T0
    beat = make_node(beat="2026-05-06T07:08:19Z")
    assert observe(first, beat, at(30)).seen_at == at(30)
    # A controller restart (no previous observation) grants a full grace period.
    assert observe(None, node, at(500)).seen_at == at(500)


def test_a_fresh_node_is_left_alone_and_looked_at_when_grace_runs_out() -> None:
    d = reconcile_node(make_node(), Observation(("", ""), T0), at(15), TIMINGS)
    assert (d.status, d.taints, d.labels, d.lost) == (None, None, None, False)
    assert d.recheck_after == pytest.approx(25.5)


def test_a_silent_node_becomes_unknown_tainted_and_unschedulable() -> None:
    node = make_node(taints=[{"key": "other", "effect": "NoSchedule"}])
    d = reconcile_node(node, Observation(("", ""), T0), at(41), TIMINGS)
    assert d.lost is True
    assert d.status is not None
    ready = ready_of({"status": d.status})
    assert ready["status"] == "Unknown"
    assert ready["reason"] == REASON_NODE_STATUS_UNKNOWN
    assert ready["message"] == MESSAGE_STOPPED_POSTING == "Kubelet stopped posting node status."
    assert ready["lastHeartbeatTime"] == TS0  # kept
    assert ready["lastTransitionTime"] == "2026-05-06T07:08:50Z"
    assert d.status["allocatable"] == node["status"]["allocatable"]  # the rest is kept
    assert d.taints == [{"key": "other", "effect": "NoSchedule"},
                        {"key": TAINT_UNREACHABLE, "effect": "NoSchedule",
                         "timeAdded": "2026-05-06T07:08:50Z"},
                        {"key": TAINT_UNREACHABLE, "effect": "NoExecute",
                         "timeAdded": "2026-05-06T07:08:50Z"}]
    assert d.labels is not None and d.labels[SCHEDULABLE_LABEL] == "false"
    assert d.labels["kubernetes.io/hostname"] == "node01"
    assert d.recheck_after == pytest.approx(TIMINGS.failover + 0.5)

    # Once written, the next pass has nothing more to do.
    again = reconcile_node(applied(node, d), Observation(("", ""), T0), at(50), TIMINGS)
    assert again == NodeDecision()


def test_exactly_at_the_grace_period_the_node_is_still_ready() -> None:
    d = reconcile_node(make_node(), Observation(("", ""), T0), at(40), TIMINGS)
    assert d.status is None and not d.lost


def test_missing_taints_are_added_back_on_an_unknown_node() -> None:
    node = make_node(ready="Unknown", schedulable="false")
    d = reconcile_node(node, Observation(("", ""), T0), at(100), TIMINGS)
    assert d.status is None and not d.lost and d.labels is None
    assert d.taints is not None
    assert {(t["key"], t["effect"]) for t in d.taints} == {
        (TAINT_UNREACHABLE, "NoSchedule"), (TAINT_UNREACHABLE, "NoExecute")}


def test_resumed_heartbeats_remove_the_unreachable_taints_only() -> None:
    taints = [{"key": TAINT_UNREACHABLE, "effect": "NoSchedule", "timeAdded": TS0},
              {"key": TAINT_UNREACHABLE, "effect": "NoExecute", "timeAdded": TS0},
              {"key": "kubevirt.io/drain", "effect": "NoSchedule"}]
    # The agent wrote Ready=True and schedulable=true itself.
    node = make_node(ready="True", taints=taints, beat="2026-05-06T07:10:00Z")
    d = reconcile_node(node, Observation(("", ""), at(110)), at(111), TIMINGS)
    assert d.taints == [{"key": "kubevirt.io/drain", "effect": "NoSchedule"}]
    assert d.status is None and d.labels is None and not d.lost


def test_between_the_agents_two_writes_nothing_is_done() -> None:
    # The agent patches the heartbeat annotation first, then its status.
    node = make_node(ready="Unknown", schedulable="true",
                     taints=[{"key": TAINT_UNREACHABLE, "effect": "NoSchedule"}])
    d = reconcile_node(node, Observation(("", ""), at(100)), at(100), TIMINGS)
    assert (d.status, d.taints, d.labels) == (None, None, None)


# ---- the scheduler refuses lost nodes -----------------------------------------------------------


def test_scheduler_refuses_a_node_the_lifecycle_marked_lost() -> None:
    lost = make_node("node01")
    d = reconcile_node(lost, Observation(("", ""), T0), at(60), TIMINGS)
    lost = applied(lost, d)
    healthy = make_node("node02")
    vmi = make_vmi("v", node="", phase="Scheduling")
    assert place(vmi, [lost, healthy], []).node == "node02"
    refused = place(vmi, [lost], [])
    assert refused.node is None
    assert "untolerated taint {node.kubernetes.io/unreachable: }" in refused.message
    # Each mark alone is enough: the Unknown condition, the taints, the label.
    only_condition = make_node(ready="Unknown")
    only_taint = make_node(taints=[{"key": TAINT_UNREACHABLE, "effect": "NoExecute"}])
    only_label = make_node(schedulable="false")
    for node in (only_condition, only_taint, only_label):
        assert place(vmi, [node], []).node is None
    # A VMI tolerating the unreachable taint is not refused by the taint (but by the label).
    tolerant = copy.deepcopy(vmi)
    tolerant["spec"]["tolerations"] = [{"key": TAINT_UNREACHABLE, "operator": "Exists"}]
    assert place(tolerant, [only_taint], []).node == "node01"
    assert place(tolerant, [lost], []).node is None


# ---- failover ------------------------------------------------------------------------------------


def test_failover_waits_for_its_grace() -> None:
    node = make_node(ready="Unknown", transition=TS0)
    d = reconcile_failover(node, [make_vmi("a")], at(30), TIMINGS)
    assert d.actions == [] and d.recheck_after == pytest.approx(30.5)
    assert reconcile_failover(make_node(), [make_vmi("a")], at(999), TIMINGS).actions == []


def test_failover_fails_the_lost_nodes_vmis() -> None:
    node = make_node(ready="Unknown", transition=TS0)
    vmis = [make_vmi("running"), make_vmi("scheduled", phase="Scheduled", finalizers=()),
            make_vmi("elsewhere", node="node02"),
            make_vmi("done", phase="Succeeded"),  # final, agent finalizer still held
            make_vmi("gone", phase="Failed", finalizers=()),
            make_vmi("placing", phase="Scheduling")]
    d = reconcile_failover(node, vmis, at(61), TIMINGS)
    by_name = {a.key[1]: a for a in d.actions}
    assert set(by_name) == {"running", "scheduled", "done"}

    running = by_name["running"]
    assert running.uid == "uid-running" and running.drop_finalizer is True
    assert running.status is not None
    assert running.status["phase"] == "Failed"
    assert running.status["reason"] == REASON_NODE_UNRESPONSIVE == "NodeUnresponsive"
    assert running.status["nodeName"] == "node01"
    assert running.status["phaseTransitionTimestamps"][-1] == {
        "phase": "Failed", "phaseTransitionTimestamp": "2026-05-06T07:09:10Z"}
    ready = [c for c in running.status["conditions"] if c["type"] == "Ready"]
    assert len(ready) == 1 and ready[0]["status"] == "False"
    assert running.message == ("virt-handler on node node01 is not responsive, marking VMI as "
                               "failed")
    assert by_name["scheduled"].drop_finalizer is False
    assert by_name["done"].status is None and by_name["done"].drop_finalizer is True


def test_the_vm_controller_restarts_an_always_vm_whose_vmi_failed_on_a_lost_node() -> None:
    node = make_node(ready="Unknown", transition=TS0)
    vmi = make_vmi("v")
    vmi["metadata"]["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1",
                                           "kind": "VirtualMachine", "name": "v",
                                           "uid": "uid-vm", "controller": True}]
    (action,) = reconcile_failover(node, [vmi], at(61), TIMINGS).actions
    assert action.status is not None
    failed = {**vmi, "status": action.status,
              "metadata": {**vmi["metadata"], "finalizers": []}}
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "v", "namespace": "ns", "uid": "uid-vm", "generation": 1},
          "spec": {"runStrategy": "Always", "template": {"spec": vmi["spec"]}},
          "status": {}}
    plan = reconcile_vm(VMInputs(vm, failed, at(62), randint=random.Random(1).randrange))
    deletes = [a for a in plan.actions if isinstance(a, DeleteVMI)]
    assert deletes == [DeleteVMI("v", "uid-v")]


# ---- events --------------------------------------------------------------------------------------


def test_event_about_a_vmi_and_a_node() -> None:
    vmi = make_vmi("v")
    vmi["metadata"]["resourceVersion"] = "12"
    ev = build_event(vmi, REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance"),
                     "Normal", REASON_NODE_UNRESPONSIVE, "gone", now=T0, unique=255)
    assert ev["metadata"] == {"name": "v.ff", "namespace": "ns"}
    assert ev["involvedObject"] == {"apiVersion": "kubevirt.io/v1",
                                    "kind": "VirtualMachineInstance", "name": "v",
                                    "namespace": "ns", "uid": "uid-v", "resourceVersion": "12"}
    assert (ev["type"], ev["reason"], ev["message"], ev["count"]) == (
        "Normal", "NodeUnresponsive", "gone", 1)
    assert ev["source"] == {"component": "virt-controller"}
    assert ev["firstTimestamp"] == ev["lastTimestamp"] == TS0
    node_ev = build_event(make_node(), REGISTRY.require("", "v1", "Node"), "Warning", "R", "m",
                          now=T0, unique=16)
    assert node_ev["metadata"] == {"name": "node01.10", "namespace": "default"}
    assert node_ev["involvedObject"]["apiVersion"] == "v1"
    assert "namespace" not in node_ev["involvedObject"]
