"""Certificates and credentials generated on first start, kept in the data directory."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVING_DAYS = 825


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path

    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in hosts:
        if h in seen or not h:
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def load_pki(directory: Path) -> Pki:
    """The certificates ``ensure_pki`` made in ``directory`` (for API worker processes)."""
    return Pki(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key")


def ensure_pki(directory: Path, hosts: list[str]) -> Pki:
    """Create the cluster CA once, and a serving certificate covering ``hosts``.

    The serving certificate is re-issued (by the same CA) when a host is missing from it, so a
    new ``--listen`` address keeps working without a new CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert_path = directory / "ca.crt"
    ca_key_path = directory / "ca.key"
    crt_path = directory / "apiserver.crt"
    key_path = directory / "apiserver.key"
    hosts_path = directory / "apiserver.hosts.json"
    now = datetime.datetime.now(datetime.UTC)

    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "virtshift-ca")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _key_pem(ca_key))
        _write_private(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        crt_path.unlink(missing_ok=True)

    wanted = sorted({"127.0.0.1", "localhost", "::1", *hosts})
    have: list[str] = []
    if hosts_path.exists():
        have = json.loads(hosts_path.read_text())
    if crt_path.exists() and key_path.exists() and set(wanted) <= set(have):
        return Pki(ca_cert_path, crt_path, key_path)

    _issue_serving_cert(ca_cert, ca_key, "virtshift-apiserver", wanted, crt_path, key_path)
    _write_private(hosts_path, json.dumps(wanted).encode())
    return Pki(ca_cert_path, crt_path, key_path)


def _issue_serving_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        common_name: str, hosts: list[str], crt_path: Path,
                        key_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVING_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_private(crt_path, cert.public_bytes(serialization.Encoding.PEM))


def ensure_node_cert(pki: Pki, node: str, hosts: list[str]) -> tuple[Path, Path]:
    """A serving certificate for node agent ``node`` (its endpoint on ``hosts``), signed by
    the cluster CA: the API server verifies the agent it proxies consoles to. Reused while it
    covers ``hosts``."""
    directory = pki.ca_cert.parent / "nodes"
    directory.mkdir(parents=True, exist_ok=True)
    crt_path, key_path = directory / f"{node}.crt", directory / f"{node}.key"
    hosts_path = directory / f"{node}.hosts.json"
    wanted = sorted({node, *hosts})
    if crt_path.exists() and key_path.exists() and hosts_path.exists() and \
            set(wanted) <= set(json.loads(hosts_path.read_text())):
        return crt_path, key_path
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    loaded = serialization.load_pem_private_key(
        (pki.ca_cert.parent / "ca.key").read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    _issue_serving_cert(ca_cert, loaded, f"virtshift-node-{node}", wanted, crt_path, key_path)
    _write_private(hosts_path, json.dumps(wanted).encode())
    return crt_path, key_path


def new_token() -> str:
    return secrets.token_urlsafe(32)
