"""Node registration and heartbeats: the agent's ``Node`` object (kubelet's and virt-handler's
share of it)."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from virtshift import __version__
from virtshift.api.kinds import Obj

HEARTBEAT_ANNOTATION = "kubevirt.io/heartbeat"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
# Where this node keeps persistent volumes (the hostpath provisioner's directory per volume).
STORAGE_ROOT_ANNOTATION = "virtshift.io/storage-root"
# Bytes free for new volumes on the storage root's filesystem (the provisioner's capacity check).
STORAGE_FREE_ANNOTATION = "virtshift.io/storage-available"
# Memory kept back from VMs for the host, QEMU overhead and the agent itself.
RESERVED_MEMORY_KI = 1024 * 1024


@dataclass(frozen=True)
class NodeFacts:
    name: str
    address: str
    port: int
    cpus: int
    memory_ki: int
    accel: str
    qemu_version: str
    storage_root: str = ""
    storage_free: int = -1

    @staticmethod
    def memory_total_ki() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
        raise RuntimeError("MemTotal missing from /proc/meminfo")


def rfc3339(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def node_labels(facts: NodeFacts) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": facts.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        SCHEDULABLE_LABEL: "true",
        "kubevirt.io/accelerator": facts.accel,
    }


def node_status(facts: NodeFacts, now: datetime.datetime, *, ready_since: str | None) -> Obj:
    """The status the agent reports (capacity, allocatable, Ready, addresses, nodeInfo)."""
    stamp = rfc3339(now)
    allocatable_ki = max(facts.memory_ki - RESERVED_MEMORY_KI, 0)
    uname = os.uname()
    return {
        "capacity": {"cpu": str(facts.cpus), "memory": f"{facts.memory_ki}Ki", "pods": "110"},
        "allocatable": {"cpu": str(facts.cpus), "memory": f"{allocatable_ki}Ki", "pods": "110"},
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": f"virtshift node agent is posting ready status ({facts.accel})",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": ready_since or stamp,
        }],
        "addresses": [
            {"type": "InternalIP", "address": facts.address},
            {"type": "Hostname", "address": facts.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": facts.port}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "osImage": _os_image(),
            "kernelVersion": uname.release,
            "kubeletVersion": f"virtshift-{__version__}",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": f"qemu://{facts.qemu_version}",
            "machineID": _machine_id(),
            "systemUUID": "",
            "bootID": _boot_id(),
        },
    }


def node_object(facts: NodeFacts, now: datetime.datetime) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": facts.name,
            "labels": node_labels(facts),
            "annotations": {HEARTBEAT_ANNOTATION: rfc3339(now), **(
                {STORAGE_ROOT_ANNOTATION: facts.storage_root} if facts.storage_root else {}), **(
                {STORAGE_FREE_ANNOTATION: str(facts.storage_free)}
                if facts.storage_root and facts.storage_free >= 0 else {})},
        },
        "spec": {},
    }


def _os_image() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
