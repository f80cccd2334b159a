"""Pure parts of the node network and the join protocol: names, addresses, formats."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from virtshift import nodenet
from virtshift.api.bootstrap import (
    HASH_RE,
    TOKEN_RE,
    ca_cert_hash,
    new_join_token,
    valid_node_name,
)
from virtshift.apiserver.pki import ensure_pki


def test_names_fit_linux_limits_and_differ_per_data_dir(tmp_path: Path) -> None:
    a = nodenet.NodeNetwork(nodenet.tag_for(tmp_path / "a"), ipaddress.IPv4Network(
        "10.251.7.0/24"))
    b = nodenet.NodeNetwork(nodenet.tag_for(tmp_path / "b"), a.subnet)
    for node in ("node01", "node99"):
        for name in (a.bridge, a.host_veth(node), a.node_veth(node)):
            assert len(name) <= 15, name
    assert a.bridge != b.bridge and a.netns("node01") != b.netns("node01")
    assert nodenet.tag_for(tmp_path / "a") == a.tag  # stable
    assert a.gateway == "10.251.7.1"
    assert a.address("node01") == "10.251.7.11" and a.address("node02") == "10.251.7.12"
    assert a.host_veth("node01") != a.host_veth("node02")


def test_node_index_and_loopback_addresses() -> None:
    assert nodenet.node_name(3) == "node03" and nodenet.node_index("node03") == 3
    with pytest.raises(nodenet.NodeNetworkError):
        nodenet.node_index("worker")
    assert nodenet.loopback_address(1, 1) == "127.0.0.1"
    assert [nodenet.loopback_address(i, 3) for i in (1, 2, 3)] == [
        "127.0.1.1", "127.0.1.2", "127.0.1.3"]


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodenet, "netns_supported", lambda: None)
    assert nodenet.choose_mode("auto", 1) == "loopback"
    assert nodenet.choose_mode("auto", 2) == "netns"
    assert nodenet.choose_mode("netns", 1) == "netns"
    assert nodenet.choose_mode("loopback", 3) == "loopback"
    assert nodenet.choose_mode("netns", 0) == "loopback"
    monkeypatch.setattr(nodenet, "netns_supported", lambda: "not running as root")
    assert nodenet.choose_mode("auto", 2) == "loopback"
    with pytest.raises(nodenet.NodeNetworkError, match="not running as root"):
        nodenet.choose_mode("netns", 2)
    with pytest.raises(nodenet.NodeNetworkError):
        nodenet.choose_mode("bridge", 2)


def test_join_token_and_node_names() -> None:
    tokens = {new_join_token() for _ in range(20)}
    assert len(tokens) == 20 and all(TOKEN_RE.fullmatch(t) for t in tokens)
    assert valid_node_name("node03") and valid_node_name("worker-1.example.com")
    assert not valid_node_name("Node03") and not valid_node_name("-x")
    assert not valid_node_name("a_b")


def test_ca_cert_hash_is_of_the_public_key(tmp_path: Path) -> None:
    pki = ensure_pki(tmp_path / "pki", ["10.251.7.1"])
    digest = ca_cert_hash(pki.ca_pem())
    assert HASH_RE.fullmatch(digest)
    # the serving certificate is re-issued for new hosts; the CA (and its hash) stays
    ensure_pki(tmp_path / "pki", ["10.251.8.1"])
    assert ca_cert_hash(pki.ca_pem()) == digest
    other = ensure_pki(tmp_path / "other", [])
    assert ca_cert_hash(other.ca_pem()) != digest
