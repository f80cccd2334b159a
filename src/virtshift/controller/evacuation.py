"""Evacuation of drained nodes (KubeVirt's evacuation controller,
``pkg/virt-controller/watch/drain/evacuation``): pure decisions; the loop lives in
:mod:`virtshift.controller.nodeloop`.

A node carrying the drain taint (key ``spec.configuration.migrations.nodeDrainTaintKey`` of the
KubeVirt CR, default ``kubevirt.io/drain``; effect ``NoSchedule``, or ``NoExecute``) has its
running VMIs live-migrated away:

* a VMI whose eviction strategy (its own ``spec.evictionStrategy``, else the cluster's) is
  ``LiveMigrate``, or ``LiveMigrateIfPossible`` while its ``LiveMigratable`` condition is True,
  gets ``status.evacuationNodeName`` = the node and a ``VirtualMachineInstanceMigration``
  (generateName ``kubevirt-evacuation-``, label ``kubevirt.io/vmi-name``, annotation
  ``kubevirt.io/evacuationMigration`` = the node), unless it already has an unfinished one;
* a ``LiveMigrate`` VMI that is not LiveMigratable gets a ``FailedCreate`` Event
  ("VirtualMachineInstance is not migrateable") and stays; ``None``/``External`` VMIs and
  non-migratable ``LiveMigrateIfPossible`` ones are left to whoever drains the node (the
  ``virtshift drain`` CLI stops them);
* at most ``parallelMigrationsPerCluster`` unfinished migrations exist in the cluster and
  ``parallelOutboundMigrationsPerNode`` from this node: with no free slot the node is looked at
  again in 5 s;
* after failed evacuation migrations of a VMI (since its last success) the next one waits
  20 s, doubling per further failure up to 5 min, from the last failure (KubeVirt's migration
  backoff for evacuations, reason ``MigrationBackoff``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from virtshift.api.kinds import Obj
from virtshift.api.migration import (
    ACTIVE_PHASES,
    FAILED,
    SUCCEEDED,
    VMI_NAME_LABEL,
    MigrationConfig,
    eviction_strategy,
    is_live_migratable,
)
from virtshift.controller.vmi import (
    as_dict,
    as_list,
    is_deleting,
    is_final,
    key_of,
    meta,
    parse_time,
    phase,
    status_of,
)

EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
GENERATE_NAME = "kubevirt-evacuation-"
REASON_SUCCESSFUL_CREATE = "SuccessfulCreate"
REASON_FAILED_CREATE = "FailedCreate"
REASON_BACKOFF = "MigrationBackoff"
MESSAGE_NOT_MIGRATABLE = "VirtualMachineInstance is not migrateable"
DRAIN_EFFECTS = ("NoSchedule", "NoExecute")
NO_SLOT_RECHECK = 5.0
BACKOFF_BASE = 20.0
BACKOFF_MAX = 300.0


def has_drain_taint(node: Mapping[str, Any], key: str) -> bool:
    return any(isinstance(t, dict) and t.get("key") == key and t.get("effect") in DRAIN_EFFECTS
               for t in as_list(as_dict(node.get("spec")).get("taints")))


def vmim_active(vmim: Mapping[str, Any]) -> bool:
    return phase(vmim) in ACTIVE_PHASES


def vmim_vmi(vmim: Mapping[str, Any]) -> tuple[str, str]:
    return key_of(vmim)[0], str(as_dict(vmim.get("spec")).get("vmiName") or "")


def new_migration(vmi: Mapping[str, Any], node_name: str) -> Obj:
    ns, name = key_of(vmi)
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": GENERATE_NAME, "namespace": ns,
                     "labels": {VMI_NAME_LABEL: name},
                     "annotations": {EVACUATION_ANNOTATION: node_name}},
        "spec": {"vmiName": name},
    }


def _ended_at(vmim: Mapping[str, Any]) -> datetime.datetime | None:
    """When the VMIM failed (its Failed phase transition), else when it was created."""
    for stamp in reversed(as_list(status_of(vmim).get("phaseTransitionTimestamps"))):
        if isinstance(stamp, dict) and stamp.get("phase") == FAILED:
            t = parse_time(stamp.get("phaseTransitionTimestamp"))
            if t is not None:
                return t
    return parse_time(meta(vmim).get("creationTimestamp"))


def backoff_left(vmi: Mapping[str, Any], vmims: Iterable[Mapping[str, Any]],
                 now: datetime.datetime, base: float = BACKOFF_BASE,
                 cap: float = BACKOFF_MAX) -> float:
    """Seconds until another evacuation migration of ``vmi`` may start (0: now)."""
    key = key_of(vmi)
    mine = [m for m in vmims if vmim_vmi(m) == key
            and EVACUATION_ANNOTATION in as_dict(meta(m).get("annotations"))]
    mine.sort(key=lambda m: (str(meta(m).get("creationTimestamp") or ""),
                             str(meta(m).get("name") or "")), reverse=True)
    failures = 0
    last: datetime.datetime | None = None
    for m in mine:
        if phase(m) == SUCCEEDED:
            break
        if is_deleting(m) or phase(m) != FAILED:
            continue
        failures += 1
        if last is None:
            last = _ended_at(m)
    if failures == 0 or last is None:
        return 0.0
    delay = min(base * 2 ** (failures - 1), cap)
    return float(max((last - now).total_seconds() + delay, 0.0))


@dataclass(frozen=True)
class Evacuate:
    """Set ``status.evacuationNodeName`` (when ``mark``), then create ``migration``."""

    key: tuple[str, str]
    uid: str
    mark: bool
    migration: Obj


@dataclass(frozen=True)
class VMIEvent:
    key: tuple[str, str]
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class EvacuationPlan:
    evacuate: list[Evacuate] = field(default_factory=list)
    events: list[VMIEvent] = field(default_factory=list)
    recheck_after: float | None = None


def plan_evacuation(node: Mapping[str, Any], vmis: Iterable[Mapping[str, Any]],
                    vmims: Iterable[Mapping[str, Any]], config: MigrationConfig,
                    cluster_strategy: str | None, now: datetime.datetime, *,
                    backoff_base: float = BACKOFF_BASE) -> EvacuationPlan:
    """What the evacuation controller does for ``node`` given every VMI and VMIM."""
    if not has_drain_taint(node, config.node_drain_taint_key):
        return EvacuationPlan()
    name = str(meta(node).get("name") or "")
    all_vmims = list(vmims)
    on_node = [v for v in vmis if status_of(v).get("nodeName") == name]
    on_node_keys = {key_of(v) for v in on_node}
    active = [m for m in all_vmims if vmim_active(m) and not is_deleting(m)]
    migrating = {vmim_vmi(m) for m in active}

    candidates: list[Mapping[str, Any]] = []
    not_migratable: list[Mapping[str, Any]] = []
    for vmi in on_node:
        if is_final(vmi) or is_deleting(vmi) or phase(vmi) != "Running":
            continue
        strategy = eviction_strategy(vmi, cluster_strategy)
        migratable, _ = is_live_migratable(vmi)
        if strategy == "LiveMigrateIfPossible" and not migratable:
            continue
        if strategy not in ("LiveMigrate", "LiveMigrateIfPossible"):
            continue
        if not migratable:
            not_migratable.append(vmi)
            continue
        if key_of(vmi) in migrating:
            continue
        candidates.append(vmi)
    if not candidates and not not_migratable:
        return EvacuationPlan()

    events: list[VMIEvent] = []
    recheck: float | None = None

    def later(seconds: float) -> None:
        nonlocal recheck
        recheck = seconds if recheck is None else min(recheck, seconds)

    ready: list[Mapping[str, Any]] = []
    for vmi in sorted(candidates, key=key_of):
        wait = backoff_left(vmi, all_vmims, now, base=backoff_base)
        if wait > 0:
            later(wait + 0.5)
        else:
            ready.append(vmi)

    from_node = sum(1 for m in active if vmim_vmi(m) in on_node_keys)
    free = min(config.parallel_migrations_per_cluster - len(active),
               config.parallel_outbound_migrations_per_node - from_node)
    if free <= 0:
        if ready:
            later(NO_SLOT_RECHECK)
        return EvacuationPlan([], events, recheck)
    chosen = ready[:free]
    if len(ready) > free:
        later(NO_SLOT_RECHECK)
    for vmi in sorted(not_migratable, key=key_of)[:max(free - len(chosen), 0)]:
        events.append(VMIEvent(key_of(vmi), "Normal", REASON_FAILED_CREATE,
                               MESSAGE_NOT_MIGRATABLE))
    if not_migratable:
        later(60.0)  # the VMI may become migratable; the Event is refreshed meanwhile
    evacuate = [Evacuate(key_of(v), str(meta(v).get("uid") or ""),
                         status_of(v).get("evacuationNodeName") != name, new_migration(v, name))
                for v in chosen]
    return EvacuationPlan(evacuate, events, recheck)
