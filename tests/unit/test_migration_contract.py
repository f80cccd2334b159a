"""The pure migration contract: configuration, MigrationPolicy matching, eviction strategy,
LiveMigratable, progress, and the node agent's choice of mirrored disks and target ports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from virtshift.agent.migration import EFI_VARS_NODE, mirrored_disks, target_ports
from virtshift.api.migration import (
    PROGRESS_ANNOTATION,
    MigrationConfig,
    cluster_config,
    cluster_eviction_strategy,
    effective_config,
    eviction_strategy,
    is_live_migratable,
    progress_of,
    select_policy,
)
from virtshift.launcher.context import DiskFile, EfiFirmware, LaunchContext
from virtshift.launcher.converter import convert
from virtshift.launcher.migration import MirroredDisk

Obj = dict[str, Any]
GIB = 1024 ** 3
MIB = 1024 ** 2


# ---- builders -------------------------------------------------------------------------------


def kubevirt(name: str = "kubevirt", **migrations: Any) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
            "metadata": {"name": name, "namespace": "kubevirt"},
            "spec": {"configuration": {"migrations": migrations}}}


def policy(name: str, *, ns: dict[str, str] | None = None, vmi: dict[str, str] | None = None,
           selectors: bool = True, **spec: Any) -> Obj:
    body: Obj = dict(spec)
    if selectors:
        sel: Obj = {}
        if ns is not None:
            sel["namespaceSelector"] = ns
        if vmi is not None:
            sel["virtualMachineInstanceSelector"] = vmi
        body["selectors"] = sel
    return {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": name}, "spec": body}


def names(chosen: Any) -> str | None:
    return None if chosen is None else str(chosen["metadata"]["name"])


def namespace(**labels: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "ns", "labels": labels}}


def vmi(labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "v", "namespace": "ns",
                         "labels": {"kubevirt.io/nodeName": "node1", **(labels or {})}},
            "spec": spec, "status": {"phase": "Running"}}


# ---- MigrationConfig ------------------------------------------------------------------------


def test_defaults_are_kubevirts() -> None:
    c = MigrationConfig()
    assert (c.parallel_migrations_per_cluster, c.parallel_outbound_migrations_per_node) == (5, 2)
    assert (c.completion_timeout_per_gib, c.progress_timeout) == (150, 150)
    assert c.bandwidth_bytes == 0  # "0Mi": unlimited
    assert c.node_drain_taint_key == "kubevirt.io/drain"
    assert not (c.allow_auto_converge or c.allow_post_copy or c.allow_workload_disruption)
    assert "maxDowntimeMs" not in c.to_status()


def test_merged_takes_only_well_typed_fields() -> None:
    c = MigrationConfig().merged({
        "parallelMigrationsPerCluster": 9, "allowPostCopy": True, "bandwidthPerMigration": "64Mi",
        "maxDowntimeMs": 500, "nodeDrainTaintKey": "example.com/drain",
        # wrong types are ignored, not coerced
        "progressTimeout": "300", "allowAutoConverge": "true", "completionTimeoutPerGiB": True,
        "parallelOutboundMigrationsPerNode": None, "unknownField": 1})
    assert c.parallel_migrations_per_cluster == 9
    assert c.allow_post_copy is True
    assert c.bandwidth_per_migration == "64Mi"
    assert c.max_downtime_ms == 500
    assert c.node_drain_taint_key == "example.com/drain"
    assert c.progress_timeout == 150
    assert c.allow_auto_converge is False
    assert c.completion_timeout_per_gib == 150
    assert c.parallel_outbound_migrations_per_node == 2


def test_merged_accepts_an_integer_bandwidth() -> None:
    c = MigrationConfig().merged({"bandwidthPerMigration": 1000})
    assert c.bandwidth_per_migration == "1000"
    assert c.bandwidth_bytes == 1000


@pytest.mark.parametrize(("value", "expected"), [
    ("64Mi", 64 * MIB), ("1Gi", GIB), ("100M", 100_000_000), ("0", 0), ("0Mi", 0),
    ("-5Mi", 0), ("nonsense", 0)])
def test_bandwidth_bytes(value: str, expected: int) -> None:
    assert MigrationConfig(bandwidth_per_migration=value).bandwidth_bytes == expected


def test_status_round_trip() -> None:
    c = MigrationConfig(parallel_migrations_per_cluster=3, bandwidth_per_migration="32Mi",
                        allow_auto_converge=True, allow_workload_disruption=True,
                        max_downtime_ms=250, unsafe_migration_override=True)
    status = c.to_status()
    assert status["bandwidthPerMigration"] == "32Mi"
    assert status["maxDowntimeMs"] == 250
    assert status["allowAutoConverge"] is True
    assert MigrationConfig.from_status(json.loads(json.dumps(status))) == c
    assert MigrationConfig.from_status({}) == MigrationConfig()


def test_completion_timeout_counts_memory_and_disks_at_least_one_gib() -> None:
    c = MigrationConfig()
    assert c.completion_timeout_s(128 * MIB) == 150.0
    assert c.completion_timeout_s(2 * GIB) == 300.0
    assert c.completion_timeout_s(GIB, GIB) == 300.0
    assert MigrationConfig(completion_timeout_per_gib=10).completion_timeout_s(
        8 * GIB) == 80.0


# ---- cluster configuration ------------------------------------------------------------------


def test_cluster_config_without_a_kubevirt_cr_is_the_default() -> None:
    assert cluster_config([]) == MigrationConfig()


def test_cluster_config_reads_the_first_cr_by_name() -> None:
    crs = [kubevirt("zz", parallelMigrationsPerCluster=1),
           kubevirt("aa", parallelMigrationsPerCluster=7, allowAutoConverge=True)]
    c = cluster_config(crs)
    assert c.parallel_migrations_per_cluster == 7
    assert c.allow_auto_converge is True
    assert c.parallel_outbound_migrations_per_node == 2


def test_cluster_config_tolerates_missing_sections() -> None:
    cr = {"metadata": {"name": "kubevirt"}, "spec": {}}
    assert cluster_config([cr]) == MigrationConfig()


def test_cluster_eviction_strategy() -> None:
    assert cluster_eviction_strategy([]) is None
    cr = {"metadata": {"name": "kubevirt"},
          "spec": {"configuration": {"evictionStrategy": "LiveMigrate"}}}
    assert cluster_eviction_strategy([cr]) == "LiveMigrate"
    assert cluster_eviction_strategy([kubevirt()]) is None


# ---- MigrationPolicy matching (upstream's matchPolicy) --------------------------------------


def test_a_policy_applies_only_when_all_its_labels_match() -> None:
    p = policy("p", ns={"team": "a"}, vmi={"tier": "db", "zone": "1"})
    assert names(select_policy([p], {"team": "a"}, {"tier": "db", "zone": "1"})) == "p"
    assert select_policy([p], {"team": "a"}, {"tier": "db"}) is None
    assert select_policy([p], {"team": "b"}, {"tier": "db", "zone": "1"}) is None
    assert select_policy([p], {}, {"tier": "db", "zone": "1"}) is None
    assert select_policy([p], {"team": "a"}, {"tier": "web", "zone": "1"}) is None


def test_empty_selectors_match_everything_but_missing_selectors_nothing() -> None:
    assert names(select_policy([policy("any")], {}, {"x": "y"})) == "any"
    assert names(select_policy([policy("any", ns={}, vmi={})], {}, {})) == "any"
    assert select_policy([policy("none", selectors=False)], {}, {"x": "y"}) is None


def test_the_policy_matching_most_labels_wins() -> None:
    ps = [policy("a-broad", vmi={"tier": "db"}),
          policy("z-narrow", ns={"team": "a"}, vmi={"tier": "db"}),
          policy("b-catchall")]
    assert names(select_policy(ps, {"team": "a"}, {"tier": "db"})) == "z-narrow"
    assert names(select_policy(ps, {"team": "b"}, {"tier": "db"})) == "a-broad"
    assert names(select_policy(ps, {}, {})) == "b-catchall"


def test_equal_totals_prefer_vmi_labels_then_the_lowest_name() -> None:
    # upstream: with as many matched labels in all, the one matching more VMI labels wins
    ns_only = policy("a-ns", ns={"team": "a"})
    vmi_only = policy("z-vmi", vmi={"tier": "db"})
    assert names(select_policy([ns_only, vmi_only], {"team": "a"}, {"tier": "db"})) == "z-vmi"
    assert names(select_policy([vmi_only, ns_only], {"team": "a"}, {"tier": "db"})) == "z-vmi"
    twins = [policy("b", vmi={"tier": "db"}), policy("a", vmi={"tier": "db"}),
             policy("c", vmi={"tier": "db"})]
    assert names(select_policy(twins, {}, {"tier": "db"})) == "a"


def test_effective_config_applies_the_policy_over_the_cluster() -> None:
    crs = [kubevirt(bandwidthPerMigration="1Gi", completionTimeoutPerGiB=50)]
    ps = [policy("fast", vmi={"fast": "yes"}, allowAutoConverge=True,
                 bandwidthPerMigration="2Gi")]
    config, name = effective_config(crs, ps, namespace(), vmi({"fast": "yes"}))
    assert name == "fast"
    assert config.allow_auto_converge is True
    assert config.bandwidth_per_migration == "2Gi"
    assert config.completion_timeout_per_gib == 50  # the cluster's, the policy leaves it
    config, name = effective_config(crs, ps, namespace(), vmi())
    assert (config, name) == (cluster_config(crs), None)
    config, name = effective_config([], [], None, vmi())
    assert (config, name) == (MigrationConfig(), None)


def test_effective_config_uses_namespace_labels() -> None:
    ps = [policy("prod", ns={"env": "prod"}, allowPostCopy=True, allowWorkloadDisruption=False)]
    config, name = effective_config([], ps, namespace(env="prod"), vmi())
    assert name == "prod"
    assert config.allow_post_copy is True
    assert config.allow_workload_disruption is False
    assert effective_config([], ps, namespace(env="dev"), vmi())[1] is None


def test_a_policy_allowing_post_copy_allows_workload_disruption_unless_it_says() -> None:
    # upstream ApplyMigrationPolicy: allowWorkloadDisruption follows allowPostCopy when unset
    ps = [policy("pc", allowPostCopy=True)]
    config, _ = effective_config([], ps, namespace(), vmi())
    assert config.allow_post_copy is True
    assert config.allow_workload_disruption is True


# ---- eviction strategy, LiveMigratable, progress --------------------------------------------


def test_eviction_strategy_prefers_the_vmi_then_the_cluster() -> None:
    assert eviction_strategy(vmi(evictionStrategy="External"), "LiveMigrate") == "External"
    assert eviction_strategy(vmi(), "LiveMigrateIfPossible") == "LiveMigrateIfPossible"
    assert eviction_strategy(vmi(), None) == "None"
    assert eviction_strategy(vmi(evictionStrategy=""), None) == "None"


def test_is_live_migratable() -> None:
    obj = vmi()
    assert is_live_migratable(obj) == (
        False, "LiveMigratable: the node agent has not reported it yet")
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True"},
                                   {"type": "LiveMigratable", "status": "True"}]
    assert is_live_migratable(obj) == (True, "")
    obj["status"]["conditions"][1] = {
        "type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable",
        "message": "hostDisk root is not shared"}
    assert is_live_migratable(obj) == (
        False, "DisksNotLiveMigratable: hostDisk root is not shared")


def test_progress_of() -> None:
    def vmim(annotation: str | None) -> Obj:
        anns = {} if annotation is None else {PROGRESS_ANNOTATION: annotation}
        return {"metadata": {"name": "m", "annotations": anns}}

    data = {"status": "active", "transferredBytes": 10, "remainingBytes": 5}
    assert progress_of(vmim(json.dumps(data))) == data
    assert progress_of(vmim(None)) == {}
    assert progress_of(vmim("{not json")) == {}
    assert progress_of(vmim("[1, 2]")) == {}
    assert progress_of({}) == {}


# ---- the agent: mirrored disks and target ports ---------------------------------------------


RUN = Path("/run/virtshift-test/vmi")


def converted(volumes: list[Obj], disks: list[Obj] | None = None, *, efi: bool = False,
              files: dict[str, DiskFile] | None = None) -> tuple[Obj, Any]:
    domain: Obj = {"memory": {"guest": "128Mi"},
                   "devices": {"disks": disks if disks is not None else [
                       {"name": v["name"], "disk": {"bus": "virtio"}} for v in volumes]}}
    if efi:
        domain["firmware"] = {"bootloader": {"efi": {"secureBoot": False}}}
    obj: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "metadata": {"name": "v", "namespace": "ns"},
                "spec": {"domain": domain, "volumes": volumes}}
    prepared = {v["name"]: DiskFile(f"/var/lib/vs/{v['name']}.img",
                                    "qcow2" if "hostDisk" not in v else "raw")
                for v in volumes}
    prepared.update(files or {})
    ctx = LaunchContext(run_dir=RUN, disks=prepared,
                        efi=EfiFirmware("/ovmf/code.fd", "/run/vars.fd") if efi else None)
    return obj, convert(obj, ctx)


def test_container_disk_mirrors_its_top_layer_empty_disk_in_full() -> None:
    obj, conv = converted([{"name": "root", "containerDisk": {"image": "img"}},
                           {"name": "scratch", "emptyDisk": {"capacity": "1Gi"}}])
    nodes = {d.name: d.node_name for d in conv.disks}
    assert mirrored_disks(obj, conv) == [MirroredDisk(nodes["root"], "top"),
                                         MirroredDisk(nodes["scratch"], "full")]


def test_shared_host_disks_and_read_only_media_are_not_mirrored() -> None:
    volumes = [
        {"name": "root", "containerDisk": {"image": "img"}},
        {"name": "shared", "hostDisk": {"path": "/srv/a.img", "type": "Disk", "shared": True}},
        {"name": "local", "hostDisk": {"path": "/srv/b.img", "type": "Disk"}},
        {"name": "cidata", "cloudInitNoCloud": {"userData": "#!/bin/sh\n"}},
        {"name": "ro", "emptyDisk": {"capacity": "1Gi"}},
    ]
    disks = [{"name": "root", "disk": {"bus": "virtio"}},
             {"name": "shared", "disk": {"bus": "virtio"}},
             {"name": "local", "disk": {"bus": "virtio"}},
             {"name": "cidata", "cdrom": {"bus": "sata"}},
             {"name": "ro", "disk": {"bus": "virtio", "readonly": True}}]
    obj, conv = converted(volumes, disks, files={
        "cidata": DiskFile("/var/lib/vs/cidata.iso", "raw", readonly=True, kind="cdrom")})
    nodes = {d.name: d.node_name for d in conv.disks}
    assert mirrored_disks(obj, conv) == [MirroredDisk(nodes["root"], "top"),
                                         MirroredDisk(nodes["local"], "full")]


def test_uefi_variables_move_with_the_vm() -> None:
    obj, conv = converted([{"name": "root", "containerDisk": {"image": "img"}}], efi=True)
    mirrored = mirrored_disks(obj, conv)
    assert mirrored[-1] == MirroredDisk(EFI_VARS_NODE, "full")
    assert len(mirrored) == 2
    obj, conv = converted([{"name": "root", "containerDisk": {"image": "img"}}])
    assert all(d.node != EFI_VARS_NODE for d in mirrored_disks(obj, conv))


def test_target_ports() -> None:
    assert target_ports({}) == (None, None)
    assert target_ports({"targetDirectMigrationNodePorts": {"49152": 0}}) == (49152, None)
    assert target_ports({"targetDirectMigrationNodePorts": {
        "49153": 1, "49152": 0, "junk": 0, "49999": 7}}) == (49152, 49153)
    assert target_ports({"targetDirectMigrationNodePorts": "49152"}) == (None, None)
