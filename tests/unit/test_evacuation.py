"""The evacuation controller's decision: which VMIs of a drained node get a migration, slots,
active migrations, eviction strategies and the backoff after failures."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from virtshift.api.migration import MigrationConfig, cluster_config, cluster_eviction_strategy
from virtshift.controller.evacuation import (
    EVACUATION_ANNOTATION,
    MESSAGE_NOT_MIGRATABLE,
    REASON_FAILED_CREATE,
    backoff_left,
    has_drain_taint,
    new_migration,
    plan_evacuation,
)

Obj = dict[str, Any]

T0 = datetime.datetime(2026, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
DRAIN = {"key": "kubevirt.io/drain", "value": "draining", "effect": "NoSchedule"}


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def node(name: str = "node01", taints: list[Obj] | None = None) -> Obj:
    return {"metadata": {"name": name}, "spec": {"taints": taints if taints is not None
                                                  else [DRAIN]}}


def vmi(name: str, *, on: str = "node01", phase: str = "Running",
        strategy: str | None = "LiveMigrate", migratable: bool = True, ns: str = "ns",
        evacuation: str | None = None) -> Obj:
    spec: Obj = {}
    if strategy is not None:
        spec["evictionStrategy"] = strategy
    status: Obj = {"phase": phase, "nodeName": on, "conditions": [
        {"type": "LiveMigratable", "status": "True" if migratable else "False",
         "reason": "" if migratable else "DisksNotLiveMigratable", "message": "local disk"}]}
    if evacuation:
        status["evacuationNodeName"] = evacuation
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": spec, "status": status}


def vmim(name: str, vmi_name: str, phase: str = "Running", *, ns: str = "ns",
         evacuation: bool = False, created: float = 0,
         failed_at: float | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": ns, "creationTimestamp": stamp(created)}
    if evacuation:
        meta["annotations"] = {EVACUATION_ANNOTATION: "node01"}
    status: Obj = {"phase": phase}
    if failed_at is not None:
        status["phaseTransitionTimestamps"] = [
            {"phase": "Failed", "phaseTransitionTimestamp": stamp(failed_at)}]
    return {"metadata": meta, "spec": {"vmiName": vmi_name}, "status": status}


def names(plan: Any) -> list[str]:
    return [e.key[1] for e in plan.evacuate]


def test_drain_taint_key_comes_from_the_kubevirt_cr() -> None:
    assert has_drain_taint(node(), "kubevirt.io/drain")
    assert has_drain_taint(node(taints=[{**DRAIN, "effect": "NoExecute"}]), "kubevirt.io/drain")
    assert not has_drain_taint(node(taints=[{**DRAIN, "effect": "PreferNoSchedule"}]),
                               "kubevirt.io/drain")
    assert not has_drain_taint(node(taints=[]), "kubevirt.io/drain")
    kv = {"metadata": {"name": "kubevirt"}, "spec": {"configuration": {
        "evictionStrategy": "LiveMigrateIfPossible",
        "migrations": {"nodeDrainTaintKey": "example.com/maintenance"}}}}
    config = cluster_config([kv])
    assert config.node_drain_taint_key == "example.com/maintenance"
    custom = node(taints=[{"key": "example.com/maintenance", "effect": "NoSchedule"}])
    plan = plan_evacuation(custom, [vmi("a", strategy=None)], [], config,
                           cluster_eviction_strategy([kv]), T0)
    assert names(plan) == ["a"]
    assert plan_evacuation(node(), [vmi("a")], [], config, None, T0).evacuate == []


def test_untainted_node_is_not_evacuated() -> None:
    assert plan_evacuation(node(taints=[]), [vmi("a")], [], MigrationConfig(), None,
                           T0).evacuate == []


def test_the_migration_object() -> None:
    plan = plan_evacuation(node(), [vmi("a")], [], MigrationConfig(), None, T0)
    (ev,) = plan.evacuate
    assert ev.key == ("ns", "a") and ev.uid == "uid-a" and ev.mark is True
    assert ev.migration == new_migration(vmi("a"), "node01") == {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "kubevirt-evacuation-", "namespace": "ns",
                     "labels": {"kubevirt.io/vmi-name": "a"},
                     "annotations": {"kubevirt.io/evacuationMigration": "node01"}},
        "spec": {"vmiName": "a"}}
    again = plan_evacuation(node(), [vmi("a", evacuation="node01")], [], MigrationConfig(),
                            None, T0)
    assert again.evacuate[0].mark is False  # evacuationNodeName already set


def test_eviction_strategies() -> None:
    vmis = [vmi("live"), vmi("live-stuck", migratable=False),
            vmi("ifpossible", strategy="LiveMigrateIfPossible"),
            vmi("ifpossible-stuck", strategy="LiveMigrateIfPossible", migratable=False),
            vmi("none", strategy="None"), vmi("external", strategy="External"),
            vmi("default", strategy=None)]
    plan = plan_evacuation(node(), vmis, [], MigrationConfig(parallel_migrations_per_cluster=10,
                                                             parallel_outbound_migrations_per_node=10),
                           None, T0)
    assert sorted(names(plan)) == ["ifpossible", "live"]
    assert [(e.key[1], e.reason, e.message) for e in plan.events] == [
        ("live-stuck", REASON_FAILED_CREATE, MESSAGE_NOT_MIGRATABLE)]
    assert plan.recheck_after == 60.0
    # The cluster's strategy applies to VMIs without their own.
    plan = plan_evacuation(node(), [vmi("default", strategy=None)], [], MigrationConfig(),
                           "LiveMigrate", T0)
    assert names(plan) == ["default"]


def test_only_running_vmis_of_this_node() -> None:
    vmis = [vmi("elsewhere", on="node02"), vmi("scheduled", phase="Scheduled"),
            vmi("failed", phase="Failed"), vmi("running")]
    deleting = vmi("deleting")
    deleting["metadata"]["deletionTimestamp"] = stamp(0)
    plan = plan_evacuation(node(), [*vmis, deleting], [], MigrationConfig(), None, T0)
    assert names(plan) == ["running"]


def test_an_active_migration_is_not_duplicated() -> None:
    vmis = [vmi("a"), vmi("b"), vmi("c")]
    migrations = [vmim("m-a", "a", "Scheduling"), vmim("m-b", "b", "Succeeded"),
                  vmim("m-c", "c", "Failed")]
    plan = plan_evacuation(node(), vmis, migrations,
                           MigrationConfig(parallel_outbound_migrations_per_node=5), None, T0)
    assert sorted(names(plan)) == ["b", "c"]  # c's failure was not an evacuation: no backoff
    # The same name in another namespace is another VMI.
    plan = plan_evacuation(node(), [vmi("a", ns="other")], [vmim("m-a", "a")],
                           MigrationConfig(), None, T0)
    assert names(plan) == ["a"]


@pytest.mark.parametrize("cluster, per_node, active_elsewhere, active_here, expected", [
    (5, 2, 0, 0, 2),   # the node's outbound limit
    (5, 2, 0, 1, 1),   # one slot taken by a migration from this node
    (3, 5, 2, 0, 1),   # the cluster's limit, counting other nodes' migrations
    (2, 5, 2, 0, 0),
    (5, 2, 0, 2, 0),
])
def test_parallel_limits(cluster: int, per_node: int, active_elsewhere: int, active_here: int,
                         expected: int) -> None:
    vmis = [vmi(f"v{i}") for i in range(4)]
    vmis += [vmi(f"busy{i}") for i in range(active_here)]
    vmis += [vmi(f"far{i}", on="node02") for i in range(active_elsewhere)]
    migrations = ([vmim(f"m-busy{i}", f"busy{i}") for i in range(active_here)]
                  + [vmim(f"m-far{i}", f"far{i}", "PreparingTarget")
                     for i in range(active_elsewhere)])
    config = MigrationConfig(parallel_migrations_per_cluster=cluster,
                             parallel_outbound_migrations_per_node=per_node)
    plan = plan_evacuation(node(), vmis, migrations, config, None, T0)
    assert names(plan) == [f"v{i}" for i in range(expected)]
    assert plan.recheck_after == 5.0  # more are waiting for a slot


def test_failed_evacuations_back_off() -> None:
    a = vmi("a")
    first = vmim("kubevirt-evacuation-1", "a", "Failed", evacuation=True, created=0,
                 failed_at=10)
    assert backoff_left(a, [first], at(10)) == 20.0
    assert backoff_left(a, [first], at(25)) == 5.0
    assert backoff_left(a, [first], at(30)) == 0.0
    second = vmim("kubevirt-evacuation-2", "a", "Failed", evacuation=True, created=31,
                  failed_at=40)
    assert backoff_left(a, [first, second], at(40)) == 40.0  # doubled
    many = [vmim(f"kubevirt-evacuation-{i}", "a", "Failed", evacuation=True, created=i,
                 failed_at=i) for i in range(10)]
    assert backoff_left(a, many, at(9)) == 300.0  # capped
    # A success resets the count; a user's migration does not count.
    ok = vmim("kubevirt-evacuation-3", "a", "Succeeded", evacuation=True, created=50)
    assert backoff_left(a, [first, second, ok], at(51)) == 0.0
    user = vmim("mine", "a", "Failed", created=60, failed_at=60)
    assert backoff_left(a, [user], at(60)) == 0.0

    plan = plan_evacuation(node(), [a, vmi("b")], [first], MigrationConfig(), None, at(12))
    assert names(plan) == ["b"]
    assert plan.recheck_after == pytest.approx(18.5)
    plan = plan_evacuation(node(), [a], [first], MigrationConfig(), None, at(31))
    assert names(plan) == ["a"]
