"""What the node agent reports in a VMI's status (virt-handler's share of it). Pure functions.

Only what was observed is reported: interfaces carry an IP once the guest agent (or the
user-mode DHCP lease) tells it, ``guestOSInfo`` only when a guest agent answered, and a field is
left out rather than guessed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.agent.migration import mirrored_disks
from virtshift.api.kinds import Obj
from virtshift.launcher.context import Conversion
from virtshift.launcher.guestagent import GuestInterface
from virtshift.launcher.supervisor import ExitInfo

NODE_AGENT_FINALIZER = "virtshift.io/node-agent"
"""Held by the node agent while a VMI's QEMU may run; removed once it has stopped."""

FINAL_PHASES = ("Succeeded", "Failed")


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def condition(ctype: str, status: str, now: str, *, reason: str = "", message: str = "",
              old: Sequence[Mapping[str, Any]] = ()) -> Obj:
    """A condition whose ``lastTransitionTime`` is kept when its status did not change."""
    cond: Obj = {"type": ctype, "status": status, "lastProbeTime": None,
                 "lastTransitionTime": now}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    for prev in old:
        if prev.get("type") == ctype and prev.get("status") == status:
            cond["lastTransitionTime"] = prev.get("lastTransitionTime", now)
    return cond


def set_conditions(old: Sequence[Mapping[str, Any]], new: Sequence[Obj],
                   drop: Sequence[str] = ()) -> list[Obj]:
    """``old`` with the types of ``new`` replaced (in place of the old entry) and ``drop``
    removed."""
    replaced = {c["type"]: c for c in new}
    out: list[Obj] = []
    for c in old:
        t = c.get("type")
        if t in drop:
            continue
        if t in replaced:
            out.append(replaced.pop(str(t)))
        else:
            out.append(dict(c))
    out.extend(replaced.values())
    return out


def with_phase(status: Mapping[str, Any], phase: str, now: str) -> Obj:
    """``status`` with ``phase`` and, on a change, a new phaseTransitionTimestamps entry."""
    out = dict(status)
    if status.get("phase") != phase:
        stamps = [dict(s) for s in _list(status.get("phaseTransitionTimestamps"))
                  if isinstance(s, dict)]
        stamps.append({"phase": phase, "phaseTransitionTimestamp": now})
        out["phaseTransitionTimestamps"] = stamps
    out["phase"] = phase
    return out


# ---- live migratability ------------------------------------------------------------------------

def live_migratable(vmi: Mapping[str, Any], now: str,
                    old: Sequence[Mapping[str, Any]] = (), *,
                    shared: frozenset[str] = frozenset()) -> Obj:
    """The ``LiveMigratable`` condition by KubeVirt's rules: node-local disks and a bridge
    binding on the pod network block live migration; ``shared`` names the volumes every node
    sees (ReadWriteMany claims on shared storage)."""
    spec = _dict(vmi.get("spec"))
    for vol in _list(spec.get("volumes")):
        vol = _dict(vol)
        if "hostDisk" in vol and _dict(vol["hostDisk"]).get("shared") is not True:
            return condition("LiveMigratable", "False", now, reason="DisksNotLiveMigratable",
                             message=f"cannot migrate VMI: hostDisk {vol.get('name')} is local "
                                     "to the node (not shared)", old=old)
        for src in ("persistentVolumeClaim", "dataVolume"):
            if src in vol and vol.get("name") not in shared:
                return condition(
                    "LiveMigratable", "False", now, reason="DisksNotLiveMigratable",
                    message=f"cannot migrate VMI: PVC {vol.get('name')} is not shared, live "
                            "migration requires that all PVCs must be shared (using "
                            "ReadWriteMany access mode)", old=old)
    networks = {str(_dict(n).get("name")): _dict(n) for n in _list(spec.get("networks"))}
    ifaces = _list(_dict(_dict(spec.get("domain")).get("devices")).get("interfaces"))
    for iface in ifaces:
        iface = _dict(iface)
        if "bridge" in iface and "pod" in networks.get(str(iface.get("name")), {}):
            return condition("LiveMigratable", "False", now, reason="InterfaceNotLiveMigratable",
                             message="cannot migrate VMI which does not use masquerade, bridge "
                                     "with kubevirt.io/allow-pod-bridge-network-live-migration "
                                     "VM annotation or a migratable plugin to connect to the "
                                     "pod network", old=old)
    return condition("LiveMigratable", "True", now, old=old)


# ---- running and final status ------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """What the agent saw of one running QEMU."""

    paused: bool = False
    paused_reason: str = "PausedByUser"
    agent_connected: bool = False
    guest_os: Mapping[str, str] | None = None
    guest_interfaces: Sequence[GuestInterface] | None = None
    software_emulation: bool = True
    volume_targets: Mapping[str, str] = field(default_factory=dict)


def interfaces_status(conv: Conversion, observed: Observed) -> list[Obj]:
    """``status.interfaces``: one entry per QEMU NIC; the guest agent adds its IPs and in-guest
    name where the MAC matches."""
    by_mac = {g.mac.lower(): g for g in observed.guest_interfaces or () if g.mac}
    out: list[Obj] = []
    for iface in conv.interfaces:
        entry: Obj = {"name": iface.name, "mac": iface.mac, "infoSource": "domain",
                      "podInterfaceName": "eth0" if iface.backend == "user" else iface.name,
                      "queueCount": 1}
        guest = by_mac.get(iface.mac.lower())
        if guest is not None:
            entry["infoSource"] = "domain, guest-agent"
            entry["interfaceName"] = guest.name
            ips = [ip.split("/", 1)[0] for ip in guest.ip_addresses if ip]
            if ips:
                entry["ipAddress"] = ips[0]
                entry["ipAddresses"] = ips
            entry["linkState"] = "up"
        out.append(entry)
    return out


def running_status(vmi: Mapping[str, Any], conv: Conversion, observed: Observed,
                   now: datetime.datetime, *, node: str) -> Obj:
    """The status of a VMI whose QEMU runs on this node."""
    ts = rfc3339(now)
    old = _dict(vmi.get("status"))
    old_conds = [c for c in _list(old.get("conditions")) if isinstance(c, dict)]
    status = with_phase(old, "Running", ts)
    status["nodeName"] = node
    status.pop("reason", None)
    conds: list[Obj] = [
        condition("Ready", "True", ts, old=old_conds),
        live_migratable(vmi, ts, old_conds,
                        shared=frozenset(d.name for d in conv.disks if d.shared)),
    ]
    drop = ["Synchronized", "PodScheduled"]
    if observed.paused:
        conds[0] = condition("Ready", "False", ts, reason="Paused", message="VMI was paused",
                             old=old_conds)
        conds.append(condition("Paused", "True", ts, reason=observed.paused_reason,
                               message="VMI was paused by user", old=old_conds))
    else:
        drop.append("Paused")
    if observed.agent_connected:
        conds.append(condition("AgentConnected", "True", ts, old=old_conds))
    else:
        drop.append("AgentConnected")
    if observed.software_emulation:
        conds.append(condition("SoftwareEmulation", "True", ts, reason="SoftwareEmulation",
                               message="the VM runs under QEMU's TCG: /dev/kvm is not used "
                                       "on this node", old=old_conds))
    status["conditions"] = set_conditions(old_conds, conds, drop)
    status["interfaces"] = interfaces_status(conv, observed)
    if observed.guest_os:
        status["guestOSInfo"] = dict(observed.guest_os)
    else:
        status.pop("guestOSInfo", None)
    status["machine"] = {"type": conv.machine}
    status["migrationMethod"] = ("BlockMigration" if mirrored_disks(vmi, conv)
                                 else "LiveMigration")
    status["currentCPUTopology"] = {"sockets": conv.sockets, "cores": conv.cores,
                                    "threads": conv.threads}
    mem = f"{conv.memory_bytes // (1024 * 1024)}Mi"
    status["memory"] = {"guestAtBoot": mem, "guestCurrent": mem, "guestRequested": mem}
    status["qosClass"] = status.get("qosClass") or "Burstable"
    status["volumeStatus"] = [
        {"name": d.name, "target": observed.volume_targets.get(d.name, d.qdev_id)}
        for d in conv.disks]
    return status


def final_status(vmi: Mapping[str, Any], exit_info: ExitInfo | None,
                 now: datetime.datetime, *, failed_reason: str = "") -> Obj:
    """The status of a VMI whose QEMU has stopped (``exit_info``) or never ran."""
    ts = rfc3339(now)
    old = _dict(vmi.get("status"))
    old_conds = [c for c in _list(old.get("conditions")) if isinstance(c, dict)]
    if exit_info is None:
        phase, reason, message = "Failed", failed_reason or "NotStarted", (
            "the VMI stopped before its QEMU was started")
    else:
        phase, reason, message = exit_info.phase, exit_info.kind.value, exit_info.reason
    status = with_phase(old, phase, ts)
    status["reason"] = reason
    ready = condition("Ready", "False", ts, reason="PodTerminating" if phase == "Succeeded"
                      else "PodFailed", message=message, old=old_conds)
    status["conditions"] = set_conditions(old_conds, [ready],
                                          ["Paused", "AgentConnected", "LiveMigratable"])
    for key in ("interfaces", "guestOSInfo"):
        status.pop(key, None)
    return status


def sync_failure_status(vmi: Mapping[str, Any], reason: str, message: str,
                        now: datetime.datetime) -> Obj:
    """A VMI that could not be started (image missing, bad spec): ``Synchronized`` False with
    the reason (``ErrImagePull``, ``FailedCreate``...), phase unchanged."""
    ts = rfc3339(now)
    old = _dict(vmi.get("status"))
    old_conds = [c for c in _list(old.get("conditions")) if isinstance(c, dict)]
    out = dict(old)
    out["conditions"] = set_conditions(
        old_conds, [condition("Synchronized", "False", ts, reason=reason, message=message,
                              old=old_conds)])
    return out
