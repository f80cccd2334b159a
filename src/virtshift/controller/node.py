"""Node lifecycle (kube-controller-manager's node lifecycle controller, with KubeVirt's node
controller for the VMIs): pure decisions; :mod:`virtshift.controller.nodeloop` applies them.

Heartbeats: a node agent posts its ``Ready`` condition (``lastHeartbeatTime``) and the
``kubevirt.io/heartbeat`` annotation every heartbeat interval. As in Kubernetes, the controller
does not compare those stamps with its own clock (nodes' clocks may differ): it remembers when
it last *saw* them change (:func:`observe`) and judges the age of that observation.

* A node not seen to heartbeat for longer than the node monitor grace period (40 s, as
  ``--node-monitor-grace-period``) gets ``Ready`` = ``Unknown`` (reason ``NodeStatusUnknown``,
  message ``Kubelet stopped posting node status.``, ``lastHeartbeatTime`` kept), the taints
  ``node.kubernetes.io/unreachable`` ``NoSchedule`` and ``NoExecute`` (``timeAdded``) and the
  label ``kubevirt.io/schedulable=false``, so the scheduler places nothing there.
* When heartbeats resume the agent itself writes ``Ready`` = ``True`` and
  ``kubevirt.io/schedulable=true`` (it does on every heartbeat); the controller then removes the
  unreachable taints.
* Failover: VMIs on a node whose ``Ready`` has not been ``True`` for longer than the failover
  grace (60 s after the transition) are marked ``Failed`` with reason ``NodeUnresponsive``
  (KubeVirt's ``NodeUnresponsiveReason``), lose the node agent's finalizer (the agent is not
  there to remove it) and get an Event; the VM controller then acts on its runStrategy.

Timings come from the environment (:func:`timings_from_env`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.kinds import Obj
from virtshift.controller.scheduler import SCHEDULABLE_LABEL, TAINT_UNREACHABLE
from virtshift.controller.vmi import (
    FINAL_PHASES,
    as_dict,
    as_list,
    get_condition,
    key_of,
    meta,
    parse_time,
    phase,
    rfc3339,
    status_of,
)
from virtshift.envsettings import positive_seconds
from virtshift.errors import VirtshiftError

HEARTBEAT_ANNOTATION = "kubevirt.io/heartbeat"
NODE_AGENT_FINALIZER = "virtshift.io/node-agent"
REASON_NODE_STATUS_UNKNOWN = "NodeStatusUnknown"
MESSAGE_STOPPED_POSTING = "Kubelet stopped posting node status."
REASON_NODE_UNRESPONSIVE = "NodeUnresponsive"
"""KubeVirt's ``NodeUnresponsiveReason`` (VMI ``status.reason`` and Event reason)."""
UNREACHABLE_EFFECTS = ("NoSchedule", "NoExecute")

ENV_HEARTBEAT = "VIRTSHIFT_NODE_HEARTBEAT_SECONDS"
ENV_GRACE = "VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS"
ENV_FAILOVER = "VIRTSHIFT_NODE_FAILOVER_SECONDS"
DEFAULT_HEARTBEAT = 10.0
DEFAULT_GRACE = 40.0
DEFAULT_FAILOVER = 60.0


class NodeConfigError(VirtshiftError):
    """Invalid node timing settings."""


@dataclass(frozen=True)
class NodeTimings:
    heartbeat: float = DEFAULT_HEARTBEAT
    """The agents' heartbeat interval (only checked against the grace period here)."""
    grace: float = DEFAULT_GRACE
    """Node monitor grace period: no heartbeat seen for this long makes a node Unknown."""
    failover: float = DEFAULT_FAILOVER
    """How long a node stays NotReady before its VMIs are failed."""


def timings_from_env(env: Mapping[str, str]) -> NodeTimings:
    """The node timings from ``VIRTSHIFT_NODE_HEARTBEAT_SECONDS`` (10),
    ``VIRTSHIFT_NODE_MONITOR_GRACE_SECONDS`` (40) and ``VIRTSHIFT_NODE_FAILOVER_SECONDS`` (60);
    the grace period must exceed the heartbeat interval."""
    t = NodeTimings(positive_seconds(env, ENV_HEARTBEAT, DEFAULT_HEARTBEAT, NodeConfigError),
                    positive_seconds(env, ENV_GRACE, DEFAULT_GRACE, NodeConfigError),
                    positive_seconds(env, ENV_FAILOVER, DEFAULT_FAILOVER, NodeConfigError))
    if t.grace <= t.heartbeat:
        raise NodeConfigError(
            f"{ENV_GRACE}={t.grace:g} must exceed the heartbeat interval "
            f"{ENV_HEARTBEAT}={t.heartbeat:g}: every healthy node would be declared lost")
    return t


# ---- heartbeats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """The heartbeat stamps last seen on a node and when the controller saw them change."""

    stamps: tuple[str, str]
    seen_at: datetime.datetime


def heartbeat_stamps(node: Mapping[str, Any]) -> tuple[str, str]:
    """(the ``kubevirt.io/heartbeat`` annotation, Ready's ``lastHeartbeatTime``)."""
    annotation = as_dict(meta(node).get("annotations")).get(HEARTBEAT_ANNOTATION)
    ready = get_condition(node, "Ready") or {}
    return str(annotation or ""), str(ready.get("lastHeartbeatTime") or "")


def observe(previous: Observation | None, node: Mapping[str, Any],
            now: datetime.datetime) -> Observation:
    """The observation after seeing ``node`` at ``now``: a node seen for the first time (or
    after a controller restart) gets a full grace period, as in Kubernetes."""
    stamps = heartbeat_stamps(node)
    if previous is not None and previous.stamps == stamps:
        return previous
    return Observation(stamps, now)


def ready_status(node: Mapping[str, Any]) -> str:
    cond = get_condition(node, "Ready")
    return str(cond.get("status") or "Unknown") if cond is not None else "Unknown"


def not_ready_since(node: Mapping[str, Any]) -> datetime.datetime | None:
    """When the node's Ready condition left True (None while it is True or unknown when)."""
    cond = get_condition(node, "Ready")
    if cond is None or cond.get("status") == "True":
        return None
    return parse_time(cond.get("lastTransitionTime"))


def _taints(node: Mapping[str, Any]) -> list[Obj]:
    return [dict(t) for t in as_list(as_dict(node.get("spec")).get("taints"))
            if isinstance(t, dict)]


def _is_unreachable(taint: Mapping[str, Any]) -> bool:
    return taint.get("key") == TAINT_UNREACHABLE and taint.get("effect") in UNREACHABLE_EFFECTS


# ---- the node decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeDecision:
    """What to write on the node: a new ``status`` (None: leave it), new ``spec.taints`` and
    labels (None: leave them), whether it was just declared lost (for an Event), and when to
    look again (seconds; None: only on a change)."""

    status: Obj | None = None
    taints: list[Obj] | None = None
    labels: dict[str, str] | None = None
    lost: bool = False
    recheck_after: float | None = None


def reconcile_node(node: Mapping[str, Any], seen: Observation, now: datetime.datetime,
                   timings: NodeTimings) -> NodeDecision:
    """The node lifecycle decision for ``node``, last seen heartbeating at ``seen``."""
    age = (now - seen.seen_at).total_seconds()
    taints = _taints(node)
    labels = {str(k): str(v) for k, v in as_dict(meta(node).get("labels")).items()}
    ready = ready_status(node)
    if age <= timings.grace:
        recheck = max(timings.grace - age, 0.0) + 0.5
        if ready == "True" and any(_is_unreachable(t) for t in taints):
            # Heartbeats resumed: the agent wrote Ready and the schedulable label itself.
            return NodeDecision(taints=[t for t in taints if not _is_unreachable(t)],
                                recheck_after=recheck)
        return NodeDecision(recheck_after=recheck)

    ts = rfc3339(now)
    status: Obj | None = None
    if ready != "Unknown":
        old = status_of(node)
        conds = [dict(c) for c in as_list(old.get("conditions")) if isinstance(c, dict)]
        held = get_condition(node, "Ready") or {}
        new: Obj = {"type": "Ready", "status": "Unknown",
                    "reason": REASON_NODE_STATUS_UNKNOWN, "message": MESSAGE_STOPPED_POSTING,
                    "lastTransitionTime": ts}
        if held.get("lastHeartbeatTime"):
            new["lastHeartbeatTime"] = held["lastHeartbeatTime"]
        conds = [c for c in conds if c.get("type") != "Ready"] + [new]
        status = {**old, "conditions": conds}
    have = {(t.get("key"), t.get("effect")) for t in taints}
    added = [{"key": TAINT_UNREACHABLE, "effect": effect, "timeAdded": ts}
             for effect in UNREACHABLE_EFFECTS if (TAINT_UNREACHABLE, effect) not in have]
    new_labels = None
    if labels.get(SCHEDULABLE_LABEL) != "false":
        new_labels = {**labels, SCHEDULABLE_LABEL: "false"}
    return NodeDecision(status=status, taints=taints + added if added else None,
                        labels=new_labels, lost=status is not None,
                        recheck_after=timings.failover + 0.5 if status is not None else None)


# ---- failover ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailVMI:
    """Drop the node agent's finalizer (when ``drop_finalizer``), then mark the VMI Failed
    (``status``, None for a VMI already final) and record an Event (``message``)."""

    key: tuple[str, str]
    uid: str
    status: Obj | None
    drop_finalizer: bool
    message: str


@dataclass(frozen=True)
class FailoverDecision:
    actions: list[FailVMI] = field(default_factory=list)
    recheck_after: float | None = None


def event_message(node_name: str) -> str:
    return f"virt-handler on node {node_name} is not responsive, marking VMI as failed"


def failed_status(vmi: Mapping[str, Any], node_name: str, now: datetime.datetime) -> Obj:
    """The VMI status after its node was lost: ``Failed``, reason ``NodeUnresponsive``."""
    ts = rfc3339(now)
    old = status_of(vmi)
    stamps = [s for s in as_list(old.get("phaseTransitionTimestamps")) if isinstance(s, dict)]
    conds = [dict(c) for c in as_list(old.get("conditions"))
             if isinstance(c, dict) and c.get("type") != "Ready"]
    conds.append({"type": "Ready", "status": "False", "reason": REASON_NODE_UNRESPONSIVE,
                  "message": f"node {node_name} is not responding", "lastProbeTime": None,
                  "lastTransitionTime": ts})
    return {**old, "phase": "Failed", "reason": REASON_NODE_UNRESPONSIVE, "conditions": conds,
            "phaseTransitionTimestamps": [*stamps, {"phase": "Failed",
                                                    "phaseTransitionTimestamp": ts}]}


def reconcile_failover(node: Mapping[str, Any], vmis: Iterable[Mapping[str, Any]],
                       now: datetime.datetime, timings: NodeTimings) -> FailoverDecision:
    """Fail the VMIs of a node that has been NotReady longer than the failover grace, and free
    the ones whose agent finalizer would otherwise keep them forever."""
    since = not_ready_since(node)
    if since is None:
        return FailoverDecision()
    left = timings.failover - (now - since).total_seconds()
    if left > 0:
        return FailoverDecision(recheck_after=left + 0.5)
    name = str(meta(node).get("name") or "")
    actions: list[FailVMI] = []
    for vmi in vmis:
        if status_of(vmi).get("nodeName") != name:
            continue
        held = NODE_AGENT_FINALIZER in as_list(meta(vmi).get("finalizers"))
        final = phase(vmi) in FINAL_PHASES
        if final and not held:
            continue
        if phase(vmi) in ("", "Pending", "Scheduling"):
            continue  # not placed yet (nodeName is only a leftover)
        actions.append(FailVMI(key_of(vmi), str(meta(vmi).get("uid") or ""),
                               None if final else failed_status(vmi, name, now), held,
                               event_message(name)))
    return FailoverDecision(actions)
