"""Network and interface rules of a VMI spec.

Upstream: ``pkg/network/admitter`` (``validator.go``, ``netsource.go``, ``netiface.go``,
``binding.go``, ``admit.go``, ``slirp.go``) plus the interface boot-order check of
``vmi-create-admitter.go``. Feature-gated bindings (passt, macvtap, binding plugins) are not
checked.
"""

from __future__ import annotations

import ipaddress
import re

from virtshift.api.admission import _k8s
from virtshift.api.admission._util import (
    DUPLICATE,
    INVALID,
    NOT_SUPPORTED,
    REQUIRED,
    Obj,
    Path,
    as_dict,
    as_int,
    as_list,
    as_str,
    cause,
    dicts,
    is_set,
)
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

INTERFACE_MODELS = ("e1000", "e1000e", "igb", "ne2k_pci", "pcnet", "rtl8139", "virtio")
BINDING_METHODS = ("bridge", "slirp", "masquerade", "sriov", "macvtap", "passt")
INTERFACE_STATES = ("absent", "down", "up")
_IFACE_NAME = re.compile(r"^[A-Za-z0-9-_]+$")
_HEX = "[0-9A-Fa-f]"
_MAC_SEP = re.compile(rf"^{_HEX}{{2}}([:-]){_HEX}{{2}}(\1{_HEX}{{2}})*$")
_MAC_DOT = re.compile(rf"^{_HEX}{{4}}(\.{_HEX}{{4}})*$")
_NAME_NOT_FOUND = "{} '{}' not found."


def _mac_bytes(mac: str) -> int | None:
    """Bytes in a MAC address as Go's ``net.ParseMAC`` reads it; None when malformed."""
    if _MAC_SEP.match(mac):
        n = (len(mac) + 1) // 3
    elif _MAC_DOT.match(mac):
        n = (len(mac) + 1) // 5 * 2
    else:
        return None
    return n if n in (6, 8, 20) else None


def validate_creation(field: Path, spec: Obj) -> list[FieldError]:
    """``ValidateCreation``: slirp is discontinued."""
    errs: list[FieldError] = []
    ifaces = dicts(as_dict(as_dict(spec.get("domain")).get("devices")).get("interfaces"))
    for idx, iface in enumerate(ifaces):
        if is_set(iface, "slirp"):
            errs.append(cause(
                INVALID,
                field.child("domain", "devices", "interfaces").index(idx).child("slirp"),
                "Slirp interface support has been discontinued since v1.3",
            ))
    return errs


_PLAIN_NETWORK_KEYS = frozenset({"name", "pod"})
_PLAIN_IFACE_KEYS = frozenset({"name", "masquerade", "bridge"})


def _plainly_valid(networks: list[Obj], ifaces: list[Obj], cfg: AdmissionConfig) -> bool:
    """Whether :func:`validate` finds nothing, decided for the common shape only: pod networks
    (at most one) and interfaces with just a name and a masquerade or bridge binding, paired
    one to one by valid names. False means "not decided" (the full checks run)."""
    names: set[str] = set()
    pods = 0
    for net in networks:
        if not _PLAIN_NETWORK_KEYS.issuperset(net):
            return False
        name = net.get("name")
        if type(name) is not str or name in names or net.get("pod") is None:
            return False
        names.add(name)
        pods += 1
    if pods > 1 or len(ifaces) != len(names):
        return False
    seen: set[str] = set()
    for iface in ifaces:
        if not _PLAIN_IFACE_KEYS.issuperset(iface):
            return False
        name = iface.get("name")
        if type(name) is not str or name not in names or name in seen:
            return False
        seen.add(name)
        if not _IFACE_NAME.match(name):
            return False
        if iface.get("bridge") is not None and not cfg.bridge_on_pod_network:
            return False
    return True


def validate(field: Path, spec: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """``Validator.Validate`` of ``pkg/network/admitter``."""
    networks = dicts(spec.get("networks"))
    ifaces = dicts(as_dict(as_dict(spec.get("domain")).get("devices")).get("interfaces"))
    if _plainly_valid(networks, ifaces, cfg):
        return []
    ifaces_at = field.child("domain", "devices", "interfaces")
    nets_at = field.child("networks")
    net_names = [as_str(n.get("name")) for n in networks]
    iface_name_list = [as_str(i.get("name")) for i in ifaces]
    by_name = dict(zip(net_names, networks, strict=True))
    iface_names = set(iface_name_list)
    errs: list[FieldError] = []

    # validateSinglePodNetwork, with what validateSingleNetworkSource and
    # validateMultusNetworkSource report gathered in the same pass.
    pods = 0
    multus_defaults = 0
    source_errs: list[FieldError] = []
    unnamed_multus = -1
    for idx, n in enumerate(networks):
        has_pod = n.get("pod") is not None
        multus = n.get("multus")
        if has_pod:
            pods += 1
        if isinstance(multus, dict):
            if multus.get("default") is True:
                multus_defaults += 1
            if unnamed_multus < 0 and not as_str(multus.get("networkName")):
                unnamed_multus = idx
        if multus is None:
            if not has_pod:
                source_errs.append(cause(
                    REQUIRED, nets_at.index(idx), "should have a network type"
                ))
        elif has_pod:
            source_errs.append(cause(
                REQUIRED, nets_at.index(idx), "should have only one network type"
            ))
    if pods > 1:
        errs.append(cause(
            DUPLICATE, field.child("interfaces"),
            f"more than one interface is connected to a pod network in {field.child('interfaces')}",
        ))
    if multus_defaults > 1:
        errs.append(cause(INVALID, nets_at, "Multus CNI should only have one default network"))
    if pods and multus_defaults:
        errs.append(cause(
            INVALID, nets_at, "Pod network cannot be defined when Multus default network is defined"
        ))
    # validateSingleNetworkSource
    errs.extend(source_errs)
    # validateMultusNetworkSource: the first multus network without a networkName.
    if unnamed_multus >= 0:
        errs.append(cause(
            REQUIRED, nets_at.index(unnamed_multus),
            "CNI delegating plugin must have a networkName",
        ))
    errs.extend(_validate_states(ifaces_at, ifaces, networks))
    errs.extend(_validate_bindings(ifaces_at, ifaces, by_name, cfg))
    # validateNetworkNameUnique
    if len(set(net_names)) != len(net_names):
        seen: set[str] = set()
        for idx, name in enumerate(net_names):
            if name in seen:
                errs.append(cause(
                    DUPLICATE, nets_at.index(idx).child("name"),
                    f'Network with name "{name}" already exists, every network must have a '
                    "unique name",
                ))
            seen.add(name)
    # validateNetworksAssignedToInterfaces
    for idx, name in enumerate(net_names):
        if name not in iface_names:
            at = nets_at.index(idx).child("name")
            errs.append(cause(REQUIRED, at, _NAME_NOT_FOUND.format(at, name)))
    # validateInterfaceNameUnique
    if len(iface_names) != len(iface_name_list):
        seen = set()
        for idx, name in enumerate(iface_name_list):
            if name in seen:
                errs.append(cause(
                    DUPLICATE, ifaces_at.index(idx).child("name"),
                    "Only one interface can be connected to one specific network",
                ))
            seen.add(name)
    # validateInterfacesAssignedToNetworks
    for idx, name in enumerate(iface_name_list):
        if name not in by_name:
            at = ifaces_at.index(idx).child("name")
            errs.append(cause(INVALID, at, _NAME_NOT_FOUND.format(at, name)))
    for idx, iface in enumerate(ifaces):
        errs.extend(_validate_fields(field, ifaces_at, idx, iface, by_name))
    return errs


def _validate_states(
    ifaces_at: Path, ifaces: list[Obj], networks: list[Obj]
) -> list[FieldError]:
    """``validateInterfaceStateValue``."""
    errs: list[FieldError] = []
    if not any(as_str(iface.get("state")) for iface in ifaces):
        return errs  # every check below needs a state
    default_net = next(
        (n for n in networks
         if is_set(n, "pod") or as_dict(n.get("multus")).get("default") is True),
        None,
    )
    for idx, iface in enumerate(ifaces):
        state = as_str(iface.get("state"))
        name = as_str(iface.get("name"))
        at = ifaces_at.index(idx).child("state")
        if state and state not in INTERFACE_STATES:
            errs.append(cause(
                INVALID, at, f"logical {name} interface state value is unsupported: {state}"
            ))
        if is_set(iface, "sriov") and state in ("down", "up"):
            errs.append(cause(
                INVALID, at,
                f'"{name}" interface\'s state "{state}" is not supported for SR-IOV NICs',
            ))
        if state == "absent" and not is_set(iface, "bridge"):
            errs.append(cause(
                INVALID, at,
                f'"{name}" interface\'s state "{state}" is supported only for bridge binding',
            ))
        is_default = default_net is not None and as_str(default_net.get("name")) == name
        if state == "absent" and is_default:
            errs.append(cause(
                INVALID, at,
                f'"{name}" interface\'s state "{state}" is not supported on default networks',
            ))
    return errs


def _validate_bindings(
    ifaces_at: Path, ifaces: list[Obj], by_name: dict[str, Obj], cfg: AdmissionConfig
) -> list[FieldError]:
    """``validateInterfaceBinding`` (binding plugin vs method, masquerade, bridge)."""
    errs: list[FieldError] = []
    for idx, iface in enumerate(ifaces):
        name = as_str(iface.get("name"))
        net = by_name.get(name, {})
        if is_set(iface, "binding") and any(is_set(iface, m) for m in BINDING_METHODS):
            errs.append(cause(
                INVALID, ifaces_at.index(idx).child("binding"),
                f"logical {name} interface cannot have both binding plugin and interface "
                "binding method",
            ))
        if is_set(iface, "masquerade") and not is_set(net, "pod"):
            errs.append(cause(
                INVALID, ifaces_at.index(idx).child("name"),
                "Masquerade interface only implemented with pod network",
            ))
        if is_set(iface, "bridge") and is_set(net, "pod") and not cfg.bridge_on_pod_network:
            errs.append(cause(
                INVALID, ifaces_at.index(idx).child("name"),
                "Bridge on pod network configuration is not enabled under kubevirt-config",
            ))
    return errs


def _validate_fields(
    field: Path, ifaces_at: Path, idx: int, iface: Obj, by_name: dict[str, Obj]
) -> list[FieldError]:
    """``validateInterfacesFields``: name, model, MAC and PCI address, ports, DHCP options."""
    errs: list[FieldError] = []
    at = ifaces_at.index(idx)
    name = as_str(iface.get("name"))
    if not _IFACE_NAME.match(name):
        errs.append(cause(
            INVALID, at.child("name"),
            "Network interface name can only contain alphabetical characters, numbers, dashes "
            "(-) or underscores (_)",
        ))
    model = as_str(iface.get("model"))
    if model and model not in INTERFACE_MODELS:
        errs.append(cause(
            NOT_SUPPORTED, at.child("model"),
            f"interface {at.child('name')} uses model {model} that is not supported.",
        ))
    mac = as_str(iface.get("macAddress"))
    if mac:
        size = _mac_bytes(mac)
        if size is None:
            errs.append(cause(
                INVALID, at.child("macAddress"),
                f"interface {at.child('name')} has malformed MAC address ({mac}).",
            ))
        elif size > 6:
            errs.append(cause(
                INVALID, at.child("macAddress"),
                f"interface {at.child('name')} has MAC address ({mac}) that is too long.",
            ))
    pci = as_str(iface.get("pciAddress"))
    if pci and not _k8s.is_pci_address(pci):
        errs.append(cause(
            INVALID, at.child("pciAddress"),
            f"interface {at.child('name')} has malformed PCI address ({pci}).",
        ))
    if is_set(by_name.get(name, {}), "pod"):
        errs.extend(_validate_ports(at, dicts(iface.get("ports"))))
    options = iface.get("dhcpOptions")
    if isinstance(options, dict):
        errs.extend(_validate_dhcp(field, at, options))
    return errs


def _validate_ports(at: Path, ports: list[Obj]) -> list[FieldError]:
    errs: list[FieldError] = []
    names: set[str] = set()
    for p_idx, port in enumerate(ports):
        name = as_str(port.get("name"))
        if not name:
            continue
        name_at = at.child("ports").index(p_idx).child("name")
        if name in names:
            errs.append(cause(DUPLICATE, name_at, f"Duplicate name of the port: {name}"))
        if not _k8s.is_valid_port_name(name):
            errs.append(cause(INVALID, name_at, f"Invalid name of the port: {name}"))
        names.add(name)
    for p_idx, port in enumerate(ports):
        port_at = at.child("ports").index(p_idx)
        number = as_int(port.get("port")) or 0
        if number == 0:
            errs.append(cause(REQUIRED, port_at, "Port field is mandatory."))
        if number < 0 or number > 65536:
            errs.append(cause(INVALID, port_at, "Port field must be in range 0 < x < 65536."))
        protocol = as_str(port.get("protocol"))
        if protocol and protocol not in ("TCP", "UDP"):
            errs.append(cause(
                INVALID, port_at.child("protocol"), "Unknown protocol, only TCP or UDP allowed"
            ))
    return errs


def _validate_dhcp(field: Path, at: Path, options: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    private = [as_int(o.get("option")) for o in dicts(options.get("privateOptions"))]
    if len(set(private)) < len(private):
        errs.append(cause(
            INVALID, field,
            "Found Duplicates: you have provided duplicate DHCPPrivateOptions",
        ))
    for option in private:
        if option is None or not 224 <= option <= 254:
            errs.append(cause(
                INVALID, field,
                "provided DHCPPrivateOptions are out of range, must be in range 224 to 254",
            ))
    for n_idx, server in enumerate(as_list(options.get("ntpServers"))):
        try:
            ok = isinstance(ipaddress.ip_address(as_str(server)), ipaddress.IPv4Address)
        except ValueError:
            ok = False
        if not ok:
            errs.append(cause(
                INVALID, at.child("dhcpOptions", "ntpServers").index(n_idx),
                "NTP servers must be a list of valid IPv4 addresses.",
            ))
    return errs


def validate_boot_order(field: Path, spec: Obj, boot_orders: set[int]) -> list[FieldError]:
    """``validateInterfaceBootOrder``: positive and unique among disks and interfaces."""
    errs: list[FieldError] = []
    ifaces = dicts(as_dict(as_dict(spec.get("domain")).get("devices")).get("interfaces"))
    for idx, iface in enumerate(ifaces):
        order = as_int(iface.get("bootOrder"))
        if order is None:
            continue
        at = field.child("domain", "devices", "interfaces").index(idx)
        if order < 1:
            errs.append(cause(
                INVALID, at.child("bootOrder"), f"{at} must have a boot order > 0, if supplied"
            ))
            continue
        if order in boot_orders:
            errs.append(cause(
                INVALID, at.child("bootOrder"),
                f"Boot order for {at.child('bootOrder')} already set for a different device.",
            ))
        boot_orders.add(order)
    return errs


def pod_interface_count(spec: Obj) -> int:
    """``getNumberOfPodInterfaces``: pod networks that an interface uses."""
    ifaces = dicts(as_dict(as_dict(spec.get("domain")).get("devices")).get("interfaces"))
    names = {as_str(i.get("name")) for i in ifaces}
    return sum(
        1 for n in dicts(spec.get("networks"))
        if is_set(n, "pod") and as_str(n.get("name")) in names
    )
