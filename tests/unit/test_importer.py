"""The importer's pure parts: argument checks, URL and checksum parsing, format sniffing, the
streaming decompressor and the sparse writer (on a real temporary file)."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from pathlib import Path

import pytest

from virtshift.storage.importer import (
    ImportArgs,
    ImportFailed,
    parse_checksum,
    parse_registry_url,
    redact,
    validate,
)
from virtshift.storage.importworker import (
    BLOCK,
    Meter,
    SparseWriter,
    _decompress,
    looks_like_text,
    sniff_compression,
    sniff_format,
)


def test_args_travel_as_json_with_secrets_and_headers() -> None:
    args = ImportArgs(source="http", dest_dir=Path("/v/pvc-1"), capacity=1 << 30,
                      url="https://h/x.img", username="u", password="p w",
                      headers=("X-A: 1", "X-B: two"), checksum="sha256:" + "0" * 64, size=7)
    again = ImportArgs.from_json(args.to_json())
    assert again == args
    with pytest.raises(ImportFailed) as e:
        ImportArgs.from_json('{"source": "ftp"}')
    assert e.value.reason == "InvalidSource"


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"capacity": 0}, "capacity"),
    ({"dest_dir": Path("relative")}, "absolute"),
    ({"url": "ftp://h/x"}, "not an http(s) URL"),
    ({"checksum": "crc32:abcd"}, "checksum"),
    ({"checksum": "sha256:abc"}, "checksum"),
    ({"headers": ("NoColon",)}, "Name: value"),
])
def test_validate_refuses_unusable_arguments(changes: dict[str, object], fragment: str) -> None:
    base: dict[str, object] = {"source": "http", "dest_dir": Path("/v/d"), "capacity": 1 << 20,
                               "url": "http://127.0.0.1/x.img"}
    base.update(changes)
    with pytest.raises(ImportFailed) as e:
        validate(ImportArgs(**base))  # type: ignore[arg-type]
    assert e.value.reason == "InvalidSource" and not e.value.retryable
    assert fragment in str(e.value)


def test_redact_hides_user_information() -> None:
    assert redact("https://user:secret@h.example:8443/a.img") == "https://h.example:8443/a.img"
    assert redact("http://h/a.img") == "http://h/a.img"


@pytest.mark.parametrize(("text", "algo"), [
    ("sha256:" + "a" * 64, "sha256"), ("SHA512:" + "B" * 128, "sha512"),
    ("md5:" + "c" * 32, "md5"), ("sha1:" + "d" * 40, "sha1"),
])
def test_checksum_forms(text: str, algo: str) -> None:
    got_algo, digest = parse_checksum(text)
    assert got_algo == algo and digest == text.split(":")[1].lower()


def test_meter_verifies_the_served_bytes() -> None:
    data = b"disk bytes" * 100
    good = Meter(checksum="sha256:" + hashlib.sha256(data).hexdigest())
    good.add(data[:10])
    good.add(data[10:])
    good.verify("x")
    assert good.done == len(data)
    bad = Meter(checksum="md5:" + "0" * 32)
    bad.add(data)
    with pytest.raises(ImportFailed) as e:
        bad.verify("http://h/x.img")
    assert e.value.reason == "ChecksumMismatch" and not e.value.retryable
    assert hashlib.md5(data).hexdigest() in str(e.value)


@pytest.mark.parametrize(("url", "host", "repo", "ref"), [
    ("docker://registry:5000/kubevirt/cirros-container-disk-demo:devel", "registry:5000",
     "kubevirt/cirros-container-disk-demo", "devel"),
    ("docker://127.0.0.1:5000/disk", "127.0.0.1:5000", "disk", "latest"),
    ("docker://quay.io/a/b@sha256:" + "1" * 64, "quay.io", "a/b", "sha256:" + "1" * 64),
    ("docker://localhost/a", "localhost", "a", "latest"),
])
def test_registry_urls(url: str, host: str, repo: str, ref: str) -> None:
    r = parse_registry_url(url)
    assert (r.host, r.repository, r.reference) == (host, repo, ref)


@pytest.mark.parametrize("url", ["http://h/x", "docker://cirros", "docker://h.io/",
                                 "docker://h.io/UPPER:tag"])
def test_bad_registry_urls(url: str) -> None:
    with pytest.raises(ImportFailed) as e:
        parse_registry_url(url)
    assert e.value.reason == "InvalidSource"


def test_sniffing() -> None:
    assert sniff_compression(gzip.compress(b"x")) == "gz"
    assert sniff_compression(lzma.compress(b"x")) == "xz"
    assert sniff_compression(b"QFI\xfb") == ""
    assert sniff_format(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert sniff_format(b"KDMV" + bytes(60)) == "vmdk"
    assert sniff_format(bytes(64) + b"\x7f\x10\xda\xbe") == "vdi"
    assert sniff_format(bytes(4096)) == "raw"
    # an ISO (32 KiB of zeros, then CD001) is raw
    assert sniff_format(bytes(32768) + b"\x01CD001") == "raw"


@pytest.mark.parametrize(("head", "text"), [
    (b"<!DOCTYPE html><html><body>Not here</body></html>", True),
    (b"404 page not found\n", True),
    ("Grüße, ein Text".encode() + "é".encode()[:1], True),  # a character cut at the end
    (bytes(512), False),                       # zeros: a disk with an empty boot sector
    (b"\xeb\x63\x90" + bytes(509), False),      # an MBR boot sector
    (b"\xff\xfe\xfd" * 100, False),             # binary without NUL, not UTF-8
])
def test_text_is_not_a_disk(head: bytes, text: bool) -> None:
    assert looks_like_text(head) is text


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("kind", ["gz", "xz"])
def test_decompress_streams_several_members_and_bounds_output(kind: str) -> None:
    part1 = os.urandom(100_000) + bytes(20 << 20)   # 20 MiB of zeros compress very well
    part2 = b"second member" * 1000
    pack = gzip.compress if kind == "gz" else lzma.compress
    blob = pack(part1) + pack(part2)
    out = list(_decompress(iter(_chunks(blob, 7000)), kind, "t"))
    assert b"".join(out) == part1 + part2
    assert max(len(o) for o in out) <= 1 << 20


@pytest.mark.parametrize("kind", ["gz", "xz"])
def test_decompress_truncated_or_corrupt(kind: str) -> None:
    pack = gzip.compress if kind == "gz" else lzma.compress
    blob = pack(os.urandom(50_000))
    with pytest.raises(ImportFailed) as e:
        list(_decompress(iter([blob[: len(blob) // 2]]), kind, "u"))
    assert e.value.reason == "InvalidImage" and "ends early" in str(e.value)
    broken = blob[:20] + bytes(b ^ 0x55 for b in blob[20:200]) + blob[200:]
    with pytest.raises(ImportFailed) as e:
        list(_decompress(iter([broken]), kind, "u"))
    assert e.value.reason == "InvalidImage"


def test_sparse_writer_skips_zero_blocks(tmp_path: Path) -> None:
    data = bytearray(32 * BLOCK)
    data[0:100] = os.urandom(100)                 # block 0
    data[10 * BLOCK + 5: 10 * BLOCK + 9] = b"abcd"  # block 10
    data[-1] = 1                                  # the last block
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        w = SparseWriter(fd, len(data), "t")
        for c in _chunks(bytes(data), 3 * BLOCK + 17):  # chunks not aligned on blocks
            w.write(c)
        os.ftruncate(fd, w.offset)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(data)
    # at most the touched blocks (each may straddle two chunks) are allocated
    assert os.stat(path).st_blocks * 512 <= 6 * BLOCK


def test_sparse_writer_refuses_more_than_the_capacity(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        w = SparseWriter(fd, 1000, "http://h/big.img")
        w.write(b"x" * 600)
        with pytest.raises(ImportFailed) as e:
            w.write(b"y" * 600)
    finally:
        os.close(fd)
    assert e.value.reason == "ImageTooLarge" and not e.value.retryable
    assert "1200" in str(e.value) and "1000" in str(e.value)
