"""``virtshift node join``: a node agent that bootstraps itself from a join token.

1. Fetch the cluster CA from ``/virtshift/v1/cluster-info`` (over TLS, not yet verified) and
   check it against ``--ca-cert-hash`` (kubeadm's ``sha256:`` of the CA's public key); without
   a hash, refuse unless ``--insecure-skip-ca-verification``.
2. Over TLS verified by that CA, present the join token to ``/virtshift/v1/join`` with the
   node's name and address; receive the agent's API token, the proxy token and a serving
   certificate for the node's address.
3. Write them under ``DATA_DIR/join/`` and run the node agent in the foreground.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtshift.agent.main import AgentConfig
from virtshift.api.bootstrap import (
    CLUSTER_INFO_PATH,
    HASH_RE,
    JOIN_PATH,
    TOKEN_RE,
    ca_cert_hash,
    valid_node_name,
)
from virtshift.client import kubeconfig
from virtshift.errors import VirtshiftError

log = logging.getLogger(__name__)

TIMEOUT = 15.0


class JoinError(VirtshiftError):
    pass


@dataclass(frozen=True)
class JoinOptions:
    server: str
    token: str
    data_dir: Path
    node_name: str
    ca_cert_hash: str | None = None
    insecure_skip_ca_verification: bool = False
    address: str | None = None
    accel: str = "auto"
    hostdisk_dirs: tuple[Path, ...] = ()


def _check(opts: JoinOptions) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(opts.server)
    if parsed.scheme != "https" or not parsed.hostname:
        raise JoinError(f"--server must be an https:// URL, got {opts.server!r}")
    if not TOKEN_RE.fullmatch(opts.token):
        raise JoinError("--token must look like abcdef.0123456789abcdef (as printed by "
                        "virtshift up)")
    if opts.ca_cert_hash is not None and not HASH_RE.fullmatch(opts.ca_cert_hash.lower()):
        raise JoinError("--ca-cert-hash must be sha256: followed by 64 hex digits")
    if opts.ca_cert_hash is None and not opts.insecure_skip_ca_verification:
        raise JoinError("refusing to join without --ca-cert-hash (pass "
                        "--insecure-skip-ca-verification to trust any control plane)")
    if not valid_node_name(opts.node_name):
        raise JoinError(f"--node-name {opts.node_name!r} is not a valid node name (lower "
                        "case alphanumeric characters, '-' or '.')")
    return parsed.hostname, parsed.port or 443


def _request(url: str, ctx: ssl.SSLContext, *, token: str | None = None,
             body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=ctx) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        if e.code in (401, 403):
            raise JoinError(f"the control plane refused the join token ({e.code}: "
                            f"{message})") from None
        raise JoinError(f"join failed: {e.code} {message}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise JoinError(f"the control plane at {url} does not present a certificate "
                            f"of the cluster CA: {reason.verify_message}") from None
        raise JoinError(f"cannot reach the control plane at {url}: {reason}") from None
    except (OSError, ValueError) as e:
        raise JoinError(f"cannot reach the control plane at {url}: {e}") from None
    if not isinstance(doc, dict):
        raise JoinError(f"unexpected answer from {url}")
    return doc


def fetch_ca(opts: JoinOptions) -> bytes:
    """The cluster CA, checked against ``--ca-cert-hash`` when given."""
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    doc = _request(opts.server.rstrip("/") + CLUSTER_INFO_PATH, unverified)
    ca = str(doc.get("caCert") or "").encode()
    try:
        actual = ca_cert_hash(ca)
    except ValueError:
        raise JoinError(f"{opts.server} sent no usable CA certificate") from None
    if opts.ca_cert_hash is not None and not hmac.compare_digest(
            actual, opts.ca_cert_hash.lower()):
        raise JoinError(f"the cluster CA's hash is {actual}, not the expected "
                        f"{opts.ca_cert_hash}: refusing to join")
    return ca


def local_address(host: str, port: int) -> str:
    """The address this machine uses to reach ``host`` (the node's address by default)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError as e:
        raise JoinError(f"cannot reach the control plane at {host}:{port}: {e}") from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def join(opts: JoinOptions) -> AgentConfig:
    """Bootstrap credentials from the control plane; the agent's configuration."""
    host, port = _check(opts)
    address = opts.address or local_address(host, port)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise JoinError(f"--address must be an IP address, got {address!r}") from None
    ca = fetch_ca(opts)
    verified = ssl.create_default_context(cadata=ca.decode())
    creds = _request(opts.server.rstrip("/") + JOIN_PATH, verified, token=opts.token,
                     body={"nodeName": opts.node_name, "address": address})
    try:
        api_token, proxy_token = str(creds["token"]), str(creds["agentProxyToken"])
        cert, key = str(creds["tlsCert"]), str(creds["tlsKey"])
    except KeyError as e:
        raise JoinError(f"the control plane's join answer lacks {e}") from None
    directory = opts.data_dir / "join"
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    cfg = directory / "kubeconfig"
    kubeconfig.write(cfg, kubeconfig.render(opts.server.rstrip("/"), ca, api_token,
                                            user=f"node-{opts.node_name}"))
    _write_private(directory / "ca.crt", ca)
    _write_private(directory / "agent-proxy-token", proxy_token.encode() + b"\n")
    _write_private(directory / "node.crt", cert.encode())
    _write_private(directory / "node.key", key.encode())
    log.info("joined %s as node %s (address %s)", opts.server, opts.node_name, address)
    return AgentConfig(node_name=opts.node_name, kubeconfig=cfg, data_dir=opts.data_dir,
                       address=address, accel=opts.accel,
                       proxy_token_file=directory / "agent-proxy-token",
                       hostdisk_dirs=opts.hostdisk_dirs, tls_cert=directory / "node.crt",
                       tls_key=directory / "node.key")
