"""The node network of ``virtshift up --nodes N``: where each node agent lives and how it reaches
the control plane.

Two layouts:

- ``netns`` (N > 1, root, ``ip`` available; or ``--node-network netns``): a Linux bridge in the
  root namespace holds the platform's address ``x.y.z.1/24``; node ``i`` is a network namespace
  joined to the bridge by a veth pair, with address ``x.y.z.(10+i)/24``, a default route via the
  bridge address and loopback up. The agent (and so its QEMUs) runs inside the namespace, and
  setting the host end of its veth down cuts that node off alone (:func:`cut_off`).
- ``loopback``: every agent on its own loopback address (``127.0.0.1`` for a single node,
  ``127.0.1.i`` for several); nodes share the host's network, so they cannot be cut off alone.

Names derive from a hash of the data directory, so two platforms (two test clusters) coexist;
the /24 is chosen once among those not in use on the host and kept in ``DIR/node-network.json``
so that a restart re-uses the namespaces that still exist (VMs outlive the platform).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from virtshift.errors import VirtshiftError

log = logging.getLogger(__name__)

STATE_FILE = "node-network.json"
POOL = ipaddress.IPv4Network("10.251.0.0/16")
FIRST_NODE_HOST = 10
LOCK_FILE = Path("/run/lock/virtshift-nodenet.lock")
MODES = ("auto", "netns", "loopback")


class NodeNetworkError(VirtshiftError):
    pass


def node_name(index: int) -> str:
    return f"node{index:02d}"


def node_index(name: str) -> int:
    m = re.fullmatch(r"node(\d+)", name)
    if m is None or int(m.group(1)) < 1:
        raise NodeNetworkError(f"not a platform node name: {name!r} (expected nodeNN)")
    return int(m.group(1))


def loopback_address(index: int, nodes: int) -> str:
    """The agent address of node ``index`` in the loopback layout."""
    return "127.0.0.1" if nodes == 1 else f"127.0.1.{index}"


def tag_for(data_dir: Path) -> str:
    """Six hex digits naming this platform's interfaces and namespaces."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:6]


def netns_supported() -> str | None:
    """Why namespaced nodes are impossible here, or None when they are possible."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def choose_mode(requested: str, nodes: int) -> str:
    """``netns`` or ``loopback`` for ``--node-network requested`` with ``nodes`` agents."""
    if requested not in MODES:
        raise NodeNetworkError(f"--node-network must be one of {', '.join(MODES)}")
    if nodes == 0:
        return "loopback"
    if requested == "loopback":
        if nodes > 1:
            log.warning("nodes share the host's network (--node-network loopback): a node "
                        "cannot be cut off alone")
        return "loopback"
    why_not = netns_supported()
    if requested == "netns":
        if why_not is not None:
            raise NodeNetworkError(f"--node-network netns: {why_not}")
        return "netns"
    if nodes > 1 and why_not is None:
        return "netns"
    if nodes > 1:
        log.warning("nodes share the host's network (%s): a node cannot be cut off alone",
                    why_not)
    return "loopback"


@dataclass(frozen=True)
class NodeNetwork:
    """The bridge and namespaces of one platform (names are stable for its data dir)."""

    tag: str
    subnet: ipaddress.IPv4Network

    @property
    def bridge(self) -> str:
        return f"vs{self.tag}br"

    @property
    def bridge_mac(self) -> str:
        """Locally administered, derived from the tag (stable across restarts)."""
        t = self.tag
        return f"02:76:{t[0:2]}:{t[2:4]}:{t[4:6]}:01"

    @property
    def gateway(self) -> str:
        """The platform's address on the node network (the bridge's)."""
        return str(self.subnet.network_address + 1)

    def address(self, node: str) -> str:
        return str(self.subnet.network_address + FIRST_NODE_HOST + node_index(node))

    def netns(self, node: str) -> str:
        return f"vs{self.tag}-{node}"

    def host_veth(self, node: str) -> str:
        """The root-namespace end of the node's veth pair (down = node cut off)."""
        return f"vs{self.tag}h{node_index(node)}"

    def node_veth(self, node: str) -> str:
        return f"vs{self.tag}n{node_index(node)}"

    # ---- life cycle ------------------------------------------------------------------------

    def ensure(self, nodes: list[str]) -> None:
        """Create what is missing of the bridge and the nodes' namespaces (idempotent: a
        restart keeps namespaces that still hold VMs)."""
        if not _link_exists(self.bridge):
            _ip("link", "add", self.bridge, "type", "bridge")
        # A fixed MAC: a bridge otherwise takes its lowest port's, which changes as nodes come
        # and go, and namespaces kept across a restart would hold a stale ARP entry for it.
        _ip("link", "set", "dev", self.bridge, "address", self.bridge_mac)
        cidr = f"{self.gateway}/{self.subnet.prefixlen}"
        if cidr not in _addresses(self.bridge):
            _ip("addr", "add", cidr, "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        existing = set(list_netns())
        for node in nodes:
            ns, host, peer = self.netns(node), self.host_veth(node), self.node_veth(node)
            if ns not in existing:
                _ip("netns", "add", ns)
            if not _link_exists(peer, ns):
                if _link_exists(host):
                    _ip("link", "del", host)
                _ip("link", "add", host, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            ncidr = f"{self.address(node)}/{self.subnet.prefixlen}"
            if ncidr not in _addresses(peer, ns):
                _ip("-n", ns, "addr", "add", ncidr, "dev", peer)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", peer, "up")
            _ip("-n", ns, "route", "replace", "default", "via", self.gateway)
            _ip("-n", ns, "neigh", "flush", "dev", peer, check=False)

    def teardown(self) -> list[str]:
        """Remove the namespaces with no process left inside, their veths, and the bridge
        when no namespace remains; return the namespaces kept (VMs still run there)."""
        kept: list[str] = []
        prefix = f"vs{self.tag}-"
        for ns in list_netns():
            if not ns.startswith(prefix):
                continue
            if netns_pids(ns):
                kept.append(ns)
                continue
            _ip("netns", "del", ns, check=False)
            with contextlib.suppress(NodeNetworkError):
                host = self.host_veth(ns[len(prefix):])
                if _link_exists(host):
                    _ip("link", "del", host, check=False)
        if not kept and _link_exists(self.bridge):
            _ip("link", "del", self.bridge, check=False)
        return kept

    def cut_off(self, node: str) -> None:
        """Isolate ``node`` (its agent and VMs) from the control plane and the other nodes."""
        _ip("link", "set", self.host_veth(node), "down")

    def reconnect(self, node: str) -> None:
        _ip("link", "set", self.host_veth(node), "up")


def load(data_dir: Path) -> NodeNetwork | None:
    """The node network remembered in ``data_dir`` (None when it never had one)."""
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return NodeNetwork(tag=str(doc["tag"]), subnet=ipaddress.IPv4Network(doc["subnet"]))


def prepare(data_dir: Path, nodes: list[str]) -> NodeNetwork:
    """The node network of ``data_dir``: the remembered one, else a /24 of 10.251.0.0/16 that
    no interface or route of the host uses (nor another platform's state), created now."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with _host_lock():
        net = load(data_dir)
        if net is None:
            tag = tag_for(data_dir)
            net = NodeNetwork(tag=tag, subnet=_free_subnet(tag))
            tmp = data_dir / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps({"tag": net.tag, "subnet": str(net.subnet)}) + "\n")
            tmp.replace(data_dir / STATE_FILE)
        net.ensure(nodes)
    return net


def cut_off(data_dir: Path, node: str) -> None:
    """Set node ``node`` of the platform in ``data_dir`` off the network (for tests)."""
    _require(data_dir).cut_off(node)


def reconnect(data_dir: Path, node: str) -> None:
    _require(data_dir).reconnect(node)


def host_veth(data_dir: Path, node: str) -> str:
    return _require(data_dir).host_veth(node)


def _require(data_dir: Path) -> NodeNetwork:
    net = load(data_dir)
    if net is None:
        raise NodeNetworkError(f"{data_dir} has no node network (nodes are on loopback)")
    return net


# ---- the host ----------------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> str:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NodeNetworkError(f"ip {' '.join(args)}: {e}") from e
    if check and out.returncode != 0:
        raise NodeNetworkError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _link_exists(name: str, netns: str | None = None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _addresses(dev: str, netns: str | None = None) -> set[str]:
    out = _ip(*(["-n", netns] if netns else []), "-j", "addr", "show", "dev", dev,
              check=False)
    try:
        doc = json.loads(out or "[]")
    except ValueError:
        return set()
    return {f"{a['local']}/{a['prefixlen']}" for link in doc
            for a in link.get("addr_info", []) if "local" in a}


def list_netns() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).splitlines()
            if line.strip()]


def netns_pids(ns: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", ns, check=False).split() if p.isdigit()]


def _used_networks() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network] = []
    with contextlib.suppress(ValueError):
        for link in json.loads(_ip("-4", "-j", "addr", "show", check=False) or "[]"):
            for a in link.get("addr_info", []):
                used.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}",
                                                  strict=False))
    with contextlib.suppress(ValueError):
        for r in json.loads(_ip("-4", "-j", "route", "show", "table", "all", check=False)
                            or "[]"):
            dst = r.get("dst", "")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.IPv4Network(dst, strict=False))
    return used


def _free_subnet(tag: str) -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(POOL.subnets(new_prefix=24))
    start = int(tag, 16) % len(candidates)
    for k in range(len(candidates)):
        net = candidates[(start + k) % len(candidates)]
        if net.network_address == POOL.network_address:
            continue
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NodeNetworkError(f"no free /24 left in {POOL} for the node network")


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Serialise choosing and creating node networks among the platforms of this host."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
