"""Image names, blob sets, format sniffing and CLI formatting of the cluster image store."""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtshift.apiserver import meta
from virtshift.cli.images import human_age, human_size
from virtshift.errors import BadRequest
from virtshift.storage.imagecache import reference_candidates
from virtshift.storage.imagestore import (
    _detect_by_magic,
    declared_blobs,
    image_kind,
    image_name,
    required_blobs,
)


def _valid(name: str) -> bool:
    return meta.validate_name(image_kind(), name) == []


@pytest.mark.parametrize(("reference", "expected_prefix"), [
    ("registry:5000/kubevirt/cirros-container-disk-demo:devel",
     "registry-5000-kubevirt-cirros-container-disk-demo-devel-"),
    ("virtshift/testguest:latest", "virtshift-testguest-latest-"),
    ("quay.io/containerdisks/fedora@sha256:" + "ab" * 32,
     "quay-io-containerdisks-fedora-sha256-" + "ab" * 32 + "-"),
    ("Upper/Case:TAG", "upper-case-tag-"),
])
def test_image_name_is_readable_and_valid(reference: str, expected_prefix: str) -> None:
    name = image_name(reference)
    digest = hashlib.sha256(reference.encode()).hexdigest()[:10]
    assert name == expected_prefix + digest
    assert _valid(name)


def test_image_name_is_stable_and_distinguishes_references() -> None:
    assert image_name("a/b:c") == image_name("a/b:c")
    # Sanitizing maps these to the same readable part; the hash keeps them apart.
    refs = ["a/b:c", "a-b-c", "A/B:C", "a/b:c ", "a//b::c"]
    assert len({image_name(r) for r in refs}) == len(refs)


@pytest.mark.parametrize("reference", ["", ":::", "///", "ÄÖÜ", "-", ".", "x" * 1000,
                                       "a/" * 300 + "b:latest"])
def test_image_name_edge_cases(reference: str) -> None:
    name = image_name(reference)
    assert _valid(name), name
    assert len(name) <= 253


@given(st.text(max_size=400))
def test_image_name_always_valid(reference: str) -> None:
    name = image_name(reference)
    assert len(name) <= 253
    assert _valid(name)


def test_declared_and_required_blobs() -> None:
    assert declared_blobs({"blobs": ["disk"]}) == ("disk",)
    assert declared_blobs({"blobs": ["kernel", "initrd"]}) == ("kernel", "initrd")
    assert declared_blobs({"blobs": ["kernel", "kernel"]}) == ("kernel",)
    for bad in (["disk", "kernel"], ["initrd"], [], ["nope"], "disk", None):
        assert declared_blobs({"blobs": bad}) is None
    assert required_blobs({"spec": {"blobs": ["kernel", "initrd"]}}) == ("kernel", "initrd")
    assert required_blobs({"spec": {}}, "initrd") == ("kernel",)
    assert required_blobs({"spec": {}}, "disk") == ("disk",)
    assert required_blobs({"spec": {}, "status": {"type": "kernel"}}) == ("kernel",)


def test_reference_candidates() -> None:
    assert reference_candidates("a/b") == ["a/b", "a/b:latest"]
    assert reference_candidates("a/b:latest") == ["a/b:latest", "a/b"]
    assert reference_candidates("host:5000/a/b") == ["host:5000/a/b", "host:5000/a/b:latest"]
    assert reference_candidates("a/b:v1") == ["a/b:v1"]
    assert reference_candidates("a/b@sha256:" + "0" * 64) == ["a/b@sha256:" + "0" * 64]


def _qcow2_header(size: int, backing_offset: int = 0) -> bytes:
    return b"QFI\xfb" + struct.pack(">I", 3) + struct.pack(">Q", backing_offset) + \
        struct.pack(">I", 0) + struct.pack(">I", 16) + struct.pack(">Q", size) + b"\0" * 64


def test_detect_by_magic(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 4096)
    assert _detect_by_magic(raw) == ("raw", 4096)
    q = tmp_path / "q"
    q.write_bytes(_qcow2_header(1 << 30))
    assert _detect_by_magic(q) == ("qcow2", 1 << 30)
    backed = tmp_path / "backed"
    backed.write_bytes(_qcow2_header(1 << 30, backing_offset=512))
    with pytest.raises(BadRequest, match="backing file"):
        _detect_by_magic(backed)


def test_human_formats() -> None:
    assert human_size(0) == "0B"
    assert human_size(1023) == "1023B"
    assert human_size(1536) == "1.5KiB"
    assert human_size(20 * 1024**3) == "20.0GiB"
    now = datetime.datetime(2026, 1, 2, 12, 0, 0, tzinfo=datetime.UTC)
    assert human_age("2026-01-02T11:59:15Z", now) == "45s"
    assert human_age("2026-01-02T11:55:00Z", now) == "5m"
    assert human_age("2026-01-02T09:00:00Z", now) == "3h"
    assert human_age("2025-12-30T12:00:00Z", now) == "3d"
    assert human_age("garbage", now) == "<unknown>"
