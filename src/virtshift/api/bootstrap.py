"""The node bootstrap protocol shared by the API server (``apiserver/join.py``) and
``virtshift node join`` (``agent/join.py``): paths, token and hash formats (pure; no I/O).

- ``GET CLUSTER_INFO_PATH`` (no credentials): ``{"caCert": PEM}``.
- ``POST JOIN_PATH`` (``Authorization: Bearer JOIN_TOKEN``, body ``{"nodeName", "address"}``):
  ``{"caCert", "token", "agentProxyToken", "tlsCert", "tlsKey"}``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

from cryptography import x509
from cryptography.hazmat.primitives import serialization

PREFIX = "/virtshift/"
CLUSTER_INFO_PATH = "/virtshift/v1/cluster-info"
JOIN_PATH = "/virtshift/v1/join"
API_VERSION = "virtshift.io/v1"

TOKEN_RE = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
"""kubeadm's bootstrap token format."""
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_NODE_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


def new_join_token() -> str:
    """A fresh token in kubeadm's format, ``[a-z0-9]{6}.[a-z0-9]{16}``."""
    pick = secrets.choice
    return ("".join(pick(_TOKEN_ALPHABET) for _ in range(6)) + "." +
            "".join(pick(_TOKEN_ALPHABET) for _ in range(16)))


def valid_node_name(name: str) -> bool:
    """A lowercase RFC 1123 subdomain, as Kubernetes requires of Node names."""
    return len(name) <= 253 and _NODE_NAME_RE.fullmatch(name) is not None


def ca_cert_hash(ca_pem: bytes) -> str:
    """kubeadm's ``--discovery-token-ca-cert-hash``: ``sha256:`` and the hex SHA-256 of the
    CA certificate's DER SubjectPublicKeyInfo (the first certificate of ``ca_pem``)."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()
