"""Live migration: the names, phases and configuration shared by the controller, the node agents,
the API server and the CLI (pure; no I/O).

How a migration runs (KubeVirt's protocol, with a node agent in virt-handler's place):

1. A ``VirtualMachineInstanceMigration`` (VMIM) is created (``kubectl create``, ``virtshift
   migrate``, the VM ``migrate`` subresource, or the evacuation of a drained node). Admission
   labels it ``kubevirt.io/vmi-name=<vmi>`` and refuses it when the VMI is not running, not
   ``LiveMigratable`` or already migrating.
2. The controller holds the ``kubevirt.io/migrationJobFinalize`` finalizer on it, waits for a
   slot (parallel migrations per cluster and outbound per node), picks a target node with the
   scheduler (never the source), and writes the VMI: label ``kubevirt.io/migrationTargetNodeName``
   and ``status.migrationState`` {migrationUid, sourceNode, targetNode, sourcePod, targetPod,
   migrationPolicyName, migrationConfiguration}. The VMIM goes Scheduling -> Scheduled.
3. The target agent (it watches VMIs carrying its name in that label) prepares the disks, starts
   QEMU with ``-incoming defer`` and, for node-local writable disks, an NBD server that the source
   mirrors into; it reports ``targetNodeAddress``, ``targetDirectMigrationNodePorts``
   (``{"<port>": 0}`` for the migration stream, ``{"<port>": 1}`` for NBD) and
   ``targetNodeDomainDetected``/``targetNodeDomainReadyTimestamp``. The VMIM becomes
   PreparingTarget, then TargetReady.
4. The source agent mirrors local disks (when any), then migrates over TCP, applying the
   effective configuration (bandwidth, downtime, auto-converge, post-copy, timeouts). It reports
   ``startTimestamp`` and ``mode``, keeps the VMIM annotation :data:`PROGRESS_ANNOTATION` up to
   date, and finally ``completed``/``failed``/``failureReason``/``endTimestamp``. The VMIM is
   Running meanwhile.
5. On success the controller moves the VMI to the target (``status.nodeName``, the
   ``kubevirt.io/nodeName`` label; the target label goes) and the VMIM ends Succeeded; the source
   agent then discards its paused QEMU, the target agent owns the VMI. On failure the source QEMU
   keeps running, the target's is discarded, the VMIM ends Failed.
6. Cancel: deleting an unfinished VMIM (``virtshift migrate-cancel``) makes the controller set
   ``abortRequested``; the source agent cancels QEMU's migration and reports ``abortStatus``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from virtshift.api.admission import quantity

Obj = dict[str, Any]

NODE_NAME_LABEL = "kubevirt.io/nodeName"
MIGRATION_TARGET_LABEL = "kubevirt.io/migrationTargetNodeName"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
MIGRATION_FINALIZER = "kubevirt.io/migrationJobFinalize"
PROGRESS_ANNOTATION = "virtshift.io/migration-progress"
"""On the VMIM, written by the source agent while the migration runs: JSON with
``status``, ``transferredBytes``, ``remainingBytes``, ``totalBytes``, ``dirtyRate`` (pages/s),
``iteration``, ``mbps``, ``elapsedMs`` and, once known, ``downtimeMs``."""
DEFAULT_DRAIN_TAINT_KEY = "kubevirt.io/drain"

PENDING, SCHEDULING, SCHEDULED = "Pending", "Scheduling", "Scheduled"
PREPARING_TARGET, TARGET_READY, RUNNING = "PreparingTarget", "TargetReady", "Running"
SUCCEEDED, FAILED = "Succeeded", "Failed"
ACTIVE_PHASES = ("", PENDING, SCHEDULING, SCHEDULED, PREPARING_TARGET, TARGET_READY, RUNNING)
FINAL_PHASES = (SUCCEEDED, FAILED)

PORT_MIGRATION = 0
PORT_NBD = 1

EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")
GIB = 1024 ** 3


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class MigrationConfig:
    """The effective migration configuration; defaults are KubeVirt's
    (``pkg/virt-config/virt-config.go``)."""

    parallel_migrations_per_cluster: int = 5
    parallel_outbound_migrations_per_node: int = 2
    bandwidth_per_migration: str = "0Mi"
    """0 is unlimited."""
    completion_timeout_per_gib: int = 150
    progress_timeout: int = 150
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    allow_workload_disruption: bool = False
    max_downtime_ms: int | None = None
    """None keeps QEMU's own default (300 ms)."""
    node_drain_taint_key: str = DEFAULT_DRAIN_TAINT_KEY
    unsafe_migration_override: bool = False

    @property
    def bandwidth_bytes(self) -> int:
        """Bytes per second; 0 means unlimited."""
        try:
            return max(quantity.parse(self.bandwidth_per_migration).value(), 0)
        except ValueError:
            return 0

    def to_status(self) -> Obj:
        """The VMI's ``status.migrationState.migrationConfiguration`` (KubeVirt's field names)."""
        out: Obj = {
            "allowAutoConverge": self.allow_auto_converge,
            "allowPostCopy": self.allow_post_copy,
            "allowWorkloadDisruption": self.allow_workload_disruption,
            "bandwidthPerMigration": self.bandwidth_per_migration,
            "completionTimeoutPerGiB": self.completion_timeout_per_gib,
            "nodeDrainTaintKey": self.node_drain_taint_key,
            "parallelMigrationsPerCluster": self.parallel_migrations_per_cluster,
            "parallelOutboundMigrationsPerNode": self.parallel_outbound_migrations_per_node,
            "progressTimeout": self.progress_timeout,
            "unsafeMigrationOverride": self.unsafe_migration_override,
        }
        if self.max_downtime_ms is not None:
            out["maxDowntimeMs"] = self.max_downtime_ms
        return out

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> MigrationConfig:
        return cls().merged(data)

    def merged(self, data: Mapping[str, Any]) -> MigrationConfig:
        """This configuration with the fields ``data`` sets (a KubeVirt CR's
        ``configuration.migrations``, a MigrationPolicy's spec, or a stored status)."""
        fields = {
            "parallelMigrationsPerCluster": ("parallel_migrations_per_cluster", int),
            "parallelOutboundMigrationsPerNode": ("parallel_outbound_migrations_per_node", int),
            "bandwidthPerMigration": ("bandwidth_per_migration", str),
            "completionTimeoutPerGiB": ("completion_timeout_per_gib", int),
            "progressTimeout": ("progress_timeout", int),
            "allowAutoConverge": ("allow_auto_converge", bool),
            "allowPostCopy": ("allow_post_copy", bool),
            "allowWorkloadDisruption": ("allow_workload_disruption", bool),
            "maxDowntimeMs": ("max_downtime_ms", int),
            "nodeDrainTaintKey": ("node_drain_taint_key", str),
            "unsafeMigrationOverride": ("unsafe_migration_override", bool),
        }
        changes: dict[str, Any] = {}
        for key, (attr, typ) in fields.items():
            value = data.get(key)
            if value is None:
                continue
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if (typ is int and is_int) or (typ is bool and isinstance(value, bool)):
                changes[attr] = value
            elif typ is str and isinstance(value, str | int):
                changes[attr] = str(value)
        return replace(self, **changes)

    def completion_timeout_s(self, memory_bytes: int, disk_bytes: int = 0) -> float:
        """KubeVirt's acceptable completion time: completionTimeoutPerGiB x (guest memory plus
        migrated disks, in GiB), at least one GiB's worth."""
        gib = max((memory_bytes + disk_bytes) / GIB, 1.0)
        return self.completion_timeout_per_gib * gib


def cluster_config(kubevirts: Iterable[Mapping[str, Any]]) -> MigrationConfig:
    """The KubeVirt CR's ``spec.configuration.migrations`` over KubeVirt's defaults (the
    first CR, by name, when there are several)."""
    crs = sorted(kubevirts, key=lambda o: str(_dict(o.get("metadata")).get("name", "")))
    if not crs:
        return MigrationConfig()
    conf = _dict(_dict(_dict(crs[0].get("spec")).get("configuration")).get("migrations"))
    return MigrationConfig().merged(conf)


def cluster_eviction_strategy(kubevirts: Iterable[Mapping[str, Any]]) -> str | None:
    crs = sorted(kubevirts, key=lambda o: str(_dict(o.get("metadata")).get("name", "")))
    if not crs:
        return None
    value = _dict(_dict(crs[0].get("spec")).get("configuration")).get("evictionStrategy")
    return value if isinstance(value, str) and value else None


def _labels(obj: Mapping[str, Any] | None) -> dict[str, str]:
    labels = _dict(_dict((obj or {}).get("metadata")).get("labels"))
    return {str(k): str(v) for k, v in labels.items()}


def select_policy(policies: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, str],
                  vmi_labels: Mapping[str, str]) -> Mapping[str, Any] | None:
    """KubeVirt's MigrationPolicy matching: a policy applies when every label of its
    ``namespaceSelector`` and ``virtualMachineInstanceSelector`` is on the namespace and the VMI
    (a policy without ``selectors`` matches nothing); among those, the one matching the most
    labels wins, then the one matching more VMI labels, then the lowest name."""
    best: tuple[int, int, str] | None = None
    chosen: Mapping[str, Any] | None = None
    for policy in policies:
        if not isinstance(_dict(policy.get("spec")).get("selectors"), dict):
            continue
        selectors = _dict(_dict(policy.get("spec")).get("selectors"))
        ns_sel = _dict(selectors.get("namespaceSelector"))
        vmi_sel = _dict(selectors.get("virtualMachineInstanceSelector"))
        if any(namespace_labels.get(str(k)) != str(v) for k, v in ns_sel.items()):
            continue
        if any(vmi_labels.get(str(k)) != str(v) for k, v in vmi_sel.items()):
            continue
        name = str(_dict(policy.get("metadata")).get("name", ""))
        rank = (-(len(ns_sel) + len(vmi_sel)), -len(vmi_sel), name)
        if best is None or rank < best:
            best, chosen = rank, policy
    return chosen


def effective_config(kubevirts: Iterable[Mapping[str, Any]],
                     policies: Iterable[Mapping[str, Any]],
                     namespace: Mapping[str, Any] | None,
                     vmi: Mapping[str, Any]) -> tuple[MigrationConfig, str | None]:
    """The configuration a migration of ``vmi`` runs with, and the policy that shaped it."""
    config = cluster_config(kubevirts)
    policy = select_policy(policies, _labels(namespace), _labels(vmi))
    if policy is None:
        return config, None
    spec = _dict(policy.get("spec"))
    if isinstance(spec.get("allowPostCopy"), bool) and spec.get("allowWorkloadDisruption") is None:
        # as upstream: allowWorkloadDisruption follows a policy's allowPostCopy unless it is set
        spec = {**spec, "allowWorkloadDisruption": spec["allowPostCopy"]}
    return (config.merged(spec),
            str(_dict(policy.get("metadata")).get("name", "")) or None)


def eviction_strategy(vmi: Mapping[str, Any], cluster_default: str | None) -> str:
    """The VMI's ``spec.evictionStrategy``, else the cluster's, else ``None``."""
    value = _dict(vmi.get("spec")).get("evictionStrategy")
    if isinstance(value, str) and value:
        return value
    return cluster_default or "None"


def is_live_migratable(vmi: Mapping[str, Any]) -> tuple[bool, str]:
    """The VMI's ``LiveMigratable`` condition as (status, "Reason: message")."""
    for cond in _dict(vmi.get("status")).get("conditions") or []:
        c = _dict(cond)
        if c.get("type") == "LiveMigratable":
            ok = c.get("status") == "True"
            return ok, "" if ok else f"{c.get('reason', '')}: {c.get('message', '')}"
    return False, "LiveMigratable: the node agent has not reported it yet"


def migration_state(vmi: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(_dict(vmi.get("status")).get("migrationState"))


def progress_of(vmim: Mapping[str, Any]) -> dict[str, Any]:
    raw = _dict(_dict(vmim.get("metadata")).get("annotations")).get(PROGRESS_ANNOTATION)
    if not isinstance(raw, str):
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
