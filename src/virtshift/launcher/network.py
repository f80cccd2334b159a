"""VMI interfaces to QEMU NICs and network backends (part of the pure converter).

The pod network, with the masquerade or bridge binding, becomes QEMU user-mode networking
(or a tap device the agent prepared). The guest gets the second address of ``vmNetworkCIDR``
(default 10.0.2.0/24: guest 10.0.2.2, gateway 10.0.2.1, DNS 10.0.2.3) by DHCP, like KubeVirt's
masquerade layout; the agent's port forwards become ``hostfwd`` rules. Interfaces without a
``bootOrder`` get no option ROM, as in KubeVirt.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from virtshift.launcher.context import InterfaceInfo, LaunchContext, TapNetwork, UserNetwork

Obj = dict[str, Any]
DEFAULT_VM_CIDR = "10.0.2.0/24"
NIC_MODELS = {
    "virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
    "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci", "pcnet": "pcnet",
}
UNSUPPORTED_BINDINGS = ("sriov", "macvtap", "passt", "passtBinding", "slirp", "binding")


@dataclass
class NetworkArgs:
    argv: list[str] = field(default_factory=list)
    interfaces: list[InterfaceInfo] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    boot_indexes: bool = False


def _dicts(value: Any) -> list[Obj]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _esc(value: str) -> str:
    return value.replace(",", ",,")


def stable_mac(namespace: str, name: str, interface: str) -> str:
    """A locally administered-looking QEMU MAC (52:54:00 prefix) derived from the VM's identity."""
    digest = hashlib.sha256(f"{namespace}/{name}/{interface}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def convert_interfaces(spec: Obj, ctx: LaunchContext, *, namespace: str, name: str,
                       transitional: bool) -> NetworkArgs:
    out = NetworkArgs()
    devices = spec.get("domain", {}).get("devices", {})
    networks = {str(n.get("name")): (i, n) for i, n in enumerate(_dicts(spec.get("networks")))}
    pods = 0
    for i, iface in enumerate(_dicts(devices.get("interfaces"))):
        path = f"spec.domain.devices.interfaces[{i}]"
        iname = str(iface.get("name"))
        bad = [b for b in UNSUPPORTED_BINDINGS if iface.get(b) is not None]
        if bad:
            out.problems.append((f"{path}.{bad[0]}", f"interface {iname!r}: the {bad[0]} "
                                 "binding is not supported (masquerade or bridge on the pod "
                                 "network)"))
            continue
        if iname not in networks:
            out.problems.append((path, f"interface {iname!r} has no network of the same name"))
            continue
        npath, network = f"spec.networks[{networks[iname][0]}]", networks[iname][1]
        if "pod" not in network:
            kind = next((k for k in network if k != "name"), "unknown")
            out.problems.append((f"{npath}.{kind}", f"network {iname!r}: {kind} networks are "
                                 "not supported (only the pod network)"))
            continue
        pods += 1
        if pods > 1:
            out.problems.append((npath, "only one pod network is allowed"))
            continue
        model = str(iface.get("model") or "virtio")
        driver = NIC_MODELS.get(model)
        if driver is None:
            out.problems.append((f"{path}.model", f"interface model {model!r} is not "
                                 f"supported ({', '.join(NIC_MODELS)})"))
            continue
        if driver == "virtio-net-pci" and transitional:
            driver += "-transitional"
        mac = _mac(out, path, iface) or stable_mac(namespace, name, iname)
        backend = ctx.networks.get(iname, UserNetwork())
        netdev = f"net{i}"
        guest_ip = gateway = None
        if isinstance(backend, TapNetwork):
            out.argv += ["-netdev", f"tap,id={netdev},ifname={_esc(backend.ifname)},"
                         "script=no,downscript=no"]
        else:
            hostname = str(spec.get("hostname") or name)
            user = _user_netdev(out, npath, netdev, network.get("pod") or {}, backend, hostname)
            if user is None:
                continue
            opts, guest_ip, gateway = user
            out.argv += ["-netdev", opts]
        qdev: Obj = {"driver": driver, "id": f"ua-{iname}", "netdev": netdev, "mac": mac}
        boot = iface.get("bootOrder")
        if isinstance(boot, int):
            qdev["bootindex"] = boot
            out.boot_indexes = True
        else:
            qdev["romfile"] = ""
        out.argv += ["-device", json.dumps(qdev, separators=(",", ":"))]
        for key in ("pciAddress", "dhcpOptions", "acpiIndex"):
            if iface.get(key):
                out.warnings.append(f"{path}.{key}: ignored")
        if iface.get("state") == "down":
            out.warnings.append(f"{path}.state: link down at start is not supported")
        out.interfaces.append(InterfaceInfo(
            name=iname, qdev_id=f"ua-{iname}", mac=mac, model=model,
            backend="tap" if isinstance(backend, TapNetwork) else "user",
            guest_ip=guest_ip, gateway=gateway))
    return out


def _mac(out: NetworkArgs, path: str, iface: Obj) -> str | None:
    given = iface.get("macAddress")
    if not given:
        return None
    mac = str(given).lower().replace("-", ":")
    parts = mac.split(":")
    if len(parts) != 6 or not all(
            len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        out.problems.append((f"{path}.macAddress", f"invalid MAC address {given!r}"))
    return mac


def _user_netdev(out: NetworkArgs, path: str, netdev: str, pod: Obj, backend: UserNetwork,
                 hostname: str) -> tuple[str, str, str] | None:
    cidr = str(pod.get("vmNetworkCIDR") or DEFAULT_VM_CIDR)
    try:
        net = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        out.problems.append((f"{path}.pod.vmNetworkCIDR", f"invalid IPv4 CIDR {cidr!r}"))
        return None
    if net.num_addresses < 8:
        out.problems.append((f"{path}.pod.vmNetworkCIDR", f"{cidr} is too small (at least /29)"))
        return None
    gateway, guest, dns = (str(net.network_address + k) for k in (1, 2, 3))
    opts = (f"user,id={netdev},net={net},host={gateway},dhcpstart={guest},dns={dns},"
            f"hostname={_esc(hostname)}")
    if pod.get("vmIPv6NetworkCIDR"):
        out.warnings.append(f"{path}.pod.vmIPv6NetworkCIDR: ignored (user-mode IPv6)")
    for fwd in backend.forwards:
        proto = fwd.protocol.lower()
        if proto not in ("tcp", "udp"):
            out.problems.append((path, f"port forward protocol {fwd.protocol!r} is not "
                                 "supported (TCP, UDP)"))
            return None
        opts += f",hostfwd={proto}:{fwd.host_ip}:{fwd.host_port}-{guest}:{fwd.guest_port}"
    return opts, guest, gateway
