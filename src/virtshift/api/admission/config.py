"""The cluster configuration admission reads (the KubeVirt CR's ``spec.configuration``).

Field defaults are plain upstream KubeVirt's defaults (``pkg/virt-config/virt-config.go``), except
where a comment says otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


def _new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class AdmissionConfig:
    # architectureConfiguration.defaultArchitecture (upstream: the virt-api host's GOARCH).
    architecture: str = "amd64"
    # architectureConfiguration.amd64.machineType (DefaultAMD64MachineType).
    machine_type: str = "q35"
    # architectureConfiguration.amd64.emulatedMachines (DefaultAMD64EmulatedMachines); regexes.
    emulated_machines: tuple[str, ...] = ("q35*", "pc-q35*")
    # cpuModel; empty means v1.DefaultCPUModel ("host-model").
    cpu_model: str = ""
    # cpuRequest; None is upstream's 100m default, which the defaults leave out of the VMI spec.
    cpu_request: str | None = None
    # developerConfiguration.memoryOvercommit (percent).
    memory_overcommit: int = 100
    # network.defaultNetworkInterface (DefaultNetworkInterface = "bridge").
    network_interface: str = "bridge"
    # network.permitBridgeInterfaceOnPodNetwork (default true).
    bridge_on_pod_network: bool = True
    # evictionStrategy; plain KubeVirt leaves it unset (HCO sets LiveMigrate).
    eviction_strategy: str | None = None
    # developerConfiguration.featureGates. None turns gating off (every gate counts as enabled),
    # so the example corpus (vmi-host-disk.yaml needs HostDisk) passes with the default config.
    feature_gates: frozenset[str] | None = None
    # Upstream's mutators add the foregroundDeleteVirtualMachine (VMI) and
    # kubevirt.io/migrationJobFinalize (migration) finalizers. Off unless a controller removes them.
    add_finalizers: bool = False
    # Source of firmware UUIDs for VMIs that have none (upstream: a random UUID).
    new_uuid: Callable[[], str] = field(default=_new_uuid, compare=False)

    def gate(self, name: str) -> bool:
        return self.feature_gates is None or name in self.feature_gates


DEFAULT_CONFIG = AdmissionConfig()
