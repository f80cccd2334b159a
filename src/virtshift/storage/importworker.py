"""The importer's child process (``python -m virtshift.storage.importer``): sources, format
detection, decompression, conversion and the sparse writer. :mod:`virtshift.storage.importer`
documents the behaviour and holds the contract; this module is imported only by the child (so the
agent never loads it, and the child never loads asyncio)."""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import http.client
import io
import json
import lzma
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virtshift.storage.importer import (
    ARGS_ENV,
    DISK_NAME,
    SOURCES,
    ImportArgs,
    ImportFailed,
    ImportResult,
    RegistryRef,
    discard_partials,
    parse_checksum,
    parse_registry_url,
    partial_files,
    redact,
    validate,
)

CHUNK = 1 << 20
BLOCK = 64 << 10
MIN_IMAGE = 512
SNIFF = 4096
PROGRESS_INTERVAL = 0.5
NET_TIMEOUT = 60.0
QEMU_IMG_TIMEOUT = 3600.0
FICLONE = 0x40049409
_ZERO_BLOCK = bytes(BLOCK)
_MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
# magic at offset 0 -> qemu-img format name; these need a seekable file and qemu-img
_QEMU_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
)
_VDI_MAGIC_AT_64 = b"\x7f\x10\xda\xbe"
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"

# ---------------------------------------------------------------------------------------------
# the child side: reporting


_EMIT_LOCK = threading.Lock()


def _emit(obj: dict[str, Any]) -> None:
    line = json.dumps(obj) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class Meter:
    """Counts (and optionally hashes) the bytes as served, and reports progress."""

    def __init__(self, total: int = 0, checksum: str = "") -> None:
        self.total = total
        self.done = 0
        self._last = 0.0
        self._algo, self._want = parse_checksum(checksum) if checksum else ("", "")
        self._hash = hashlib.new(self._algo) if self._algo else None

    def add(self, data: bytes | bytearray | memoryview) -> None:
        self.done += len(data)
        if self._hash is not None:
            self._hash.update(data)
        self.tick()

    def count(self, n: int) -> None:
        self.done += n
        self.tick()

    def tick(self) -> None:
        if self.total <= 0:
            return
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            _emit({"progress": round(min(self.done * 100.0 / self.total, 100.0), 2)})

    def verify(self, what: str) -> None:
        if self._hash is None:
            return
        got = self._hash.hexdigest()
        if got != self._want:
            raise ImportFailed(f"checksum mismatch for {what}: expected {self._algo}:"
                               f"{self._want}, got {self._algo}:{got}",
                               reason="ChecksumMismatch", retryable=False)


# ---------------------------------------------------------------------------------------------
# the child side: sources


def _ssl_context(args: ImportArgs) -> ssl.SSLContext:
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=args.ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ImportFailed(f"cannot load the CA bundle: {e}", reason="InvalidSource") from e


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _connection_failure(url: str, e: BaseException) -> ImportFailed:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ImportFailed(f"{redact(url)}: TLS verification failed: {reason.verify_message}",
                            reason="TLSError", retryable=False)
    if isinstance(reason, ssl.SSLError):
        return ImportFailed(f"{redact(url)}: TLS error: {reason}", reason="TLSError",
                            retryable=False)
    if isinstance(reason, ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(reason, socket.gaierror):
        text = f"cannot resolve the host ({reason.strerror})"
    elif isinstance(reason, (TimeoutError, socket.timeout)):
        text = "timed out"
    else:
        text = str(reason) or type(reason).__name__
    return ImportFailed(f"cannot reach {redact(url)}: {text}", reason="ConnectionFailed",
                        retryable=True)


def _status_failure(url: str, code: int, phrase: str) -> ImportFailed:
    text = f"{redact(url)}: the server answered {code} {phrase}".rstrip() + " (expected 200)"
    if code in (401, 403):
        return ImportFailed(text, reason="Unauthorized", retryable=False)
    if code in (404, 410):
        return ImportFailed(text, reason="NotFound", retryable=False)
    if code >= 500 or code in (408, 429):
        return ImportFailed(text, reason="ServerError", retryable=True)
    return ImportFailed(text, reason="HTTPError", retryable=False)


class _Opener:
    """GET requests with the import's TLS settings; redirects are followed."""

    def __init__(self, args: ImportArgs) -> None:
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        self.https = _ssl_context(args)
        handlers.append(urllib.request.HTTPSHandler(context=self.https))
        self.opener = urllib.request.build_opener(*handlers)

    def get(self, url: str, headers: dict[str, str]) -> Any:
        req = urllib.request.Request(url, headers=headers, method="GET")
        try:
            return self.opener.open(req, timeout=NET_TIMEOUT)
        except urllib.error.HTTPError as e:
            e.close()
            raise
        except (urllib.error.URLError, OSError) as e:
            raise _connection_failure(url, e) from e


def _extra_headers(args: ImportArgs) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in args.headers:
        name, _, value = h.partition(":")
        out[name.strip()] = value.strip()
    return out


def _read_body(resp: Any, url: str, meter: Meter, length: int) -> Iterator[bytes]:
    """The response body in chunks, counted by ``meter``; a body shorter than ``length`` (its
    Content-Length, if any) fails TransferInterrupted."""
    got = 0
    try:
        while True:
            try:
                data = resp.read(CHUNK)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise ImportFailed(f"{redact(url)}: the transfer broke off after {got} bytes"
                                   f"{f' of {length}' if length else ''}: {e}",
                                   reason="TransferInterrupted", retryable=True) from e
            if not data:
                break
            got += len(data)
            meter.add(data)
            yield data
    finally:
        resp.close()
    if length and got < length:
        raise ImportFailed(f"{redact(url)}: the transfer broke off after {got} of {length} "
                           "bytes", reason="TransferInterrupted", retryable=True)


def http_source(args: ImportArgs, meter: Meter) -> Iterator[bytes]:
    headers = _extra_headers(args)
    if args.username or args.password:
        headers["Authorization"] = _basic(args.username, args.password)
    headers.setdefault("Accept-Encoding", "identity")
    opener = _Opener(args)
    try:
        resp = opener.get(args.url, headers)
    except urllib.error.HTTPError as e:
        raise _status_failure(args.url, e.code, str(e.reason)) from e
    length = int(resp.headers.get("Content-Length") or 0)
    meter.total = length
    return _read_body(resp, args.url, meter, length)


def stdin_source(args: ImportArgs, meter: Meter) -> Iterator[bytes]:
    meter.total = args.size
    stream = sys.stdin.buffer
    got = 0
    while True:
        data = stream.read(CHUNK)
        if not data:
            break
        got += len(data)
        meter.add(data)
        yield data
    if args.size and got < args.size:
        raise ImportFailed(f"the upload ended after {got} of {args.size} bytes",
                           reason="TransferInterrupted", retryable=True)


class _Registry:
    """A registry v2 client: anonymous, basic, or a bearer token from the challenge."""

    def __init__(self, args: ImportArgs, ref: RegistryRef) -> None:
        self.args, self.ref = args, ref
        self.opener = _Opener(args)
        self.scheme = "https"
        self.auth = _basic(args.username, args.password) if args.username else ""

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.host}/v2/{self.ref.repository}/{path}"

    def get(self, path: str, accept: str = "") -> Any:
        headers = {"Accept": accept} if accept else {}
        tried_token = False
        while True:
            if self.auth:
                headers["Authorization"] = self.auth
            url = self.url(path)
            try:
                return self.opener.get(url, headers)
            except urllib.error.HTTPError as e:
                challenge = e.headers.get("WWW-Authenticate", "") if e.headers else ""
                if e.code == 401 and not tried_token and challenge:
                    tried_token = True
                    self.auth = self._answer(challenge)
                    continue
                if e.code == 404:
                    raise ImportFailed(f"{redact(self.args.url)}: {url} answered 404 Not Found",
                                       reason="NotFound", retryable=False) from e
                raise _status_failure(url, e.code, str(e.reason)) from e
            except ImportFailed as e:
                # docker's insecure-registries rule: HTTPS first, plain HTTP if allowed
                if self.args.insecure and self.scheme == "https" and e.reason in (
                        "TLSError", "ConnectionFailed"):
                    self.scheme = "http"
                    continue
                raise

    def _answer(self, challenge: str) -> str:
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if not self.args.username:
                raise ImportFailed(f"{redact(self.args.url)}: the registry wants credentials",
                                   reason="Unauthorized", retryable=False)
            return _basic(self.args.username, self.args.password)
        if kind.lower() != "bearer":
            raise ImportFailed(f"{redact(self.args.url)}: unsupported registry authentication "
                               f"{kind!r}", reason="Unauthorized", retryable=False)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", "")
        if not realm:
            raise ImportFailed(f"{redact(self.args.url)}: bearer challenge without a realm",
                               reason="Unauthorized", retryable=False)
        query = urllib.parse.urlencode({k: v for k, v in fields.items()
                                        if k in ("service", "scope")})
        token_url = realm + ("&" if "?" in realm else "?") + query if query else realm
        headers = {}
        if self.args.username:
            headers["Authorization"] = _basic(self.args.username, self.args.password)
        try:
            with self.opener.get(token_url, headers) as resp:
                body = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise _status_failure(token_url, e.code, str(e.reason)) from e
        except ValueError as e:
            raise ImportFailed(f"{token_url}: the token answer is not JSON",
                               reason="Unauthorized", retryable=False) from e
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else ""
        if not token:
            raise ImportFailed(f"{token_url}: no token in the answer", reason="Unauthorized",
                               retryable=False)
        return f"Bearer {token}"

    def manifest(self) -> dict[str, Any]:
        reference = self.ref.reference
        for _ in range(2):
            with self.get(f"manifests/{reference}", _MANIFEST_TYPES) as resp:
                try:
                    doc = json.loads(resp.read(4 << 20))
                except ValueError as e:
                    raise ImportFailed(f"{redact(self.args.url)}: the manifest is not JSON",
                                       reason="ImagePullFailed") from e
            if not isinstance(doc, dict):
                break
            if "manifests" in doc:  # an index: take linux/amd64, else the first
                entries = [m for m in doc["manifests"] if isinstance(m, dict)]
                chosen = next((m for m in entries
                               if m.get("platform", {}).get("architecture") == "amd64"
                               and m.get("platform", {}).get("os") == "linux"),
                              entries[0] if entries else None)
                if chosen is None:
                    break
                reference = str(chosen.get("digest"))
                continue
            if isinstance(doc.get("layers"), list):
                return doc
            break
        raise ImportFailed(f"{redact(self.args.url)}: not an image manifest",
                           reason="ImagePullFailed", retryable=False)


class _ChunkReader(io.RawIOBase):
    """A file-like view of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            self._buf = next(self._chunks, b"")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _disk_member(name: str) -> bool:
    clean = name.lstrip("./")
    return clean.startswith("disk/") and len(clean) > len("disk/")


def registry_source(args: ImportArgs, meter: Meter) -> Iterator[bytes]:
    ref = parse_registry_url(args.url)
    reg = _Registry(args, ref)
    manifest = reg.manifest()
    layers = [la for la in manifest["layers"] if isinstance(la, dict) and la.get("digest")]
    for layer in reversed(layers):
        digest = str(layer["digest"])
        resp = reg.get(f"blobs/{digest}")
        length = int(resp.headers.get("Content-Length") or layer.get("size") or 0)
        meter.total = length
        raw = io.BufferedReader(_ChunkReader(_read_body(resp, reg.url(f"blobs/{digest}"),
                                                           meter, length)), CHUNK)
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")  # noqa: SIM115 (closed with raw)
            for member in tar:
                if member.isreg() and _disk_member(member.name):
                    f = tar.extractfile(member)
                    assert f is not None
                    while data := f.read(CHUNK):
                        yield data
                    # drain the layer so that its bytes are counted (and the body checked)
                    while raw.read(CHUNK):
                        pass
                    return
        except tarfile.TarError as e:
            raise ImportFailed(f"{redact(args.url)}: layer {digest} is not a tar archive: {e}",
                               reason="ImagePullFailed", retryable=False) from e
        finally:
            raw.close()
    raise ImportFailed(f"{redact(args.url)}: the image has no disk/ file in its layers",
                       reason="ImagePullFailed", retryable=False)


# ---------------------------------------------------------------------------------------------
# the child side: decoding and sinks


def _peek(chunks: Iterator[bytes], n: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``n`` bytes (fewer at the end of the stream), and all chunks from the start."""
    head: list[bytes] = []
    size = 0
    for c in chunks:
        head.append(c)
        size += len(c)
        if size >= n:
            break
    joined = b"".join(head)

    def again() -> Iterator[bytes]:
        if joined:
            yield joined
        yield from chunks

    return joined[:n], again()


def _decompress(chunks: Iterator[bytes], kind: str, what: str) -> Iterator[bytes]:
    """Stream-decompress gzip (several members allowed) or xz (several streams allowed); the
    output comes in pieces of at most 4 MiB whatever the compression ratio."""
    limit = CHUNK * 4

    def new() -> Any:
        if kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    d = new()
    finished = False  # a stream ended and only padding followed so far
    try:
        for data in chunks:
            if finished:
                if not data.strip(b"\0"):
                    continue
                d, finished = new(), False
            while True:
                out = d.decompress(data, limit)
                if out:
                    yield out
                if d.eof:
                    data = d.unused_data
                    if data.strip(b"\0"):
                        d = new()
                        continue
                    finished = True
                    break
                if kind == "gz":
                    data = d.unconsumed_tail
                    if not data and len(out) < limit:
                        break
                else:
                    data = b""
                    if d.needs_input:
                        break
        if not finished and not d.eof:
            raise ImportFailed(f"{what}: the {kind} stream ends early", reason="InvalidImage",
                               retryable=False)
    except (zlib.error, lzma.LZMAError, EOFError) as e:
        raise ImportFailed(f"{what}: corrupt {kind} data: {e}", reason="InvalidImage",
                           retryable=False) from e


def sniff_compression(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return "gz"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    return ""


def sniff_format(head: bytes) -> str:
    """``qcow2``/``vmdk``/``vhdx``/``vpc``/``vdi`` by magic, else ``raw``."""
    for magic, fmt in _QEMU_MAGIC:
        if head.startswith(magic):
            return fmt
    if head[64:68] == _VDI_MAGIC_AT_64:
        return "vdi"
    return "raw"


def looks_like_text(head: bytes) -> bool:
    """True for a start of stream that is no disk: no NUL byte, and UTF-8 text (an HTML page,
    an error message, a script)."""
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end
            return False
    return True


def _qcow2_virtual_size(head: bytes) -> int:
    return int.from_bytes(head[24:32], "big") if len(head) >= 32 else 0


def qcow2_standalone(head: bytes, what: str) -> None:
    """Refuse a qcow2 header that names a backing file or an external data file (either could
    make qemu-img read the node's files)."""
    backing_offset = int.from_bytes(head[8:16], "big")
    version = int.from_bytes(head[4:8], "big")
    incompatible = int.from_bytes(head[72:80], "big") if version >= 3 else 0
    if backing_offset:
        size = int.from_bytes(head[16:20], "big")
        name = head[backing_offset:backing_offset + size].decode(errors="replace") \
            if backing_offset + size <= len(head) else "?"
        raise ImportFailed(f"{what}: the image has a backing file ({name}); only standalone "
                           "images can be imported", reason="InvalidImage", retryable=False)
    if incompatible & 0x4:
        raise ImportFailed(f"{what}: the image has an external data file",
                           reason="InvalidImage", retryable=False)


def _too_large(vsize: int, capacity: int, what: str, *, at_least: bool = False) -> ImportFailed:
    size = f"at least {vsize}" if at_least else f"{vsize}"
    return ImportFailed(f"{what}: the image's virtual size {size} bytes is larger than the "
                        f"volume's capacity {capacity} bytes; a larger volume is needed",
                        reason="ImageTooLarge", retryable=False)


class SparseWriter:
    """Writes a raw stream at increasing offsets, skipping all-zero 64 KiB blocks."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        self.fd, self.limit, self.what = fd, limit, what
        self.offset = 0

    def write(self, data: bytes) -> None:
        n = len(data)
        if self.offset + n > self.limit:
            raise _too_large(self.offset + n, self.limit, self.what, at_least=True)
        view = memoryview(data)
        run_start = -1
        i = 0
        while i < n:
            end = min(i + BLOCK, n)
            if end - i == BLOCK:
                zero = data.startswith(_ZERO_BLOCK, i)
            else:
                zero = data[i:end] == _ZERO_BLOCK[:end - i]
            if zero:
                if run_start >= 0:
                    self._pwrite(view[run_start:i], self.offset + run_start)
                    run_start = -1
            elif run_start < 0:
                run_start = i
            i = end
        if run_start >= 0:
            self._pwrite(view[run_start:n], self.offset + run_start)
        self.offset += n

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written


def _qemu_img(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["qemu-img", *argv], capture_output=True, text=True,
                              timeout=QEMU_IMG_TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise ImportFailed("qemu-img is not installed", reason="Error") from e
    except subprocess.TimeoutExpired as e:
        raise ImportFailed(f"qemu-img {argv[0]} timed out", reason="ConversionFailed",
                           retryable=True) from e


def image_info(path: Path, fmt: str, what: str, *, standalone: bool = True) -> dict[str, Any]:
    """``qemu-img info`` of a file; a downloaded one (``standalone``) must not refer to other
    files (a backing file or an external data file could read the node's files)."""
    p = _qemu_img("info", "--output=json", "-f", fmt, str(path))
    if p.returncode != 0:
        raise ImportFailed(f"{what}: not a readable {fmt} image: {p.stderr.strip()[-500:]}",
                           reason="ConversionFailed", retryable=False)
    info: dict[str, Any] = json.loads(p.stdout)
    if not standalone:
        return info
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImportFailed(f"{what}: the image has a backing file "
                           f"({info.get('backing-filename')}); only standalone images can be "
                           "imported", reason="InvalidImage", retryable=False)
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise ImportFailed(f"{what}: the image has an external data file", reason="InvalidImage",
                           retryable=False)
    for extent in data.get("extents") or []:
        if isinstance(extent, dict) and extent.get("filename") not in (None, str(path)):
            raise ImportFailed(f"{what}: the image refers to other files",
                               reason="InvalidImage", retryable=False)
    return info


def convert(src: Path, fmt: str, dst: Path, capacity: int, what: str, *,
            standalone: bool = True, vsize: int = 0) -> int:
    """``qemu-img convert`` ``src`` (a backing chain is flattened) to a raw ``dst``; returns the
    virtual size. ``vsize``: already known from a checked header (no ``qemu-img info``)."""
    if not vsize:
        info = image_info(src, fmt, what, standalone=standalone)
        vsize = int(info.get("virtual-size") or 0)
    if vsize > capacity:
        raise _too_large(vsize, capacity, what)
    p = _qemu_img("convert", "-q", "-W", "-f", fmt, "-O", "raw", str(src), str(dst))
    if p.returncode != 0:
        raise ImportFailed(f"{what}: qemu-img convert failed: {p.stderr.strip()[-500:]}",
                           reason="ConversionFailed", retryable=False)
    return vsize


def _finish(partial: Path, capacity: int, dest_dir: Path) -> None:
    """Grow to the capacity, make durable, and rename into place."""
    fd = os.open(partial, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < capacity:
            os.ftruncate(fd, capacity)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, dest_dir / DISK_NAME)
    dfd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class _Outcome:
    format: str
    compression: str
    virtual_size: int


def prefetch(chunks: Iterator[bytes], depth: int = 8) -> Iterator[bytes]:
    """Iterate ``chunks`` in a thread, ``depth`` chunks ahead: receiving (and decompressing,
    hashing) overlaps writing, on another core (socket reads, zlib, lzma, hashlib and writes all
    release the GIL). Exceptions of ``chunks`` are raised here."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[int, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for c in chunks:
                if not put((0, c)):
                    return
            put((1, None))
        except BaseException as e:
            put((2, e))

    thread = threading.Thread(target=produce, name="importer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item
            elif kind == 1:
                return
            else:
                raise item
    finally:
        stop.set()


def import_stream(chunks: Iterator[bytes], meter: Meter, args: ImportArgs, what: str
                  ) -> _Outcome:
    """Decode ``chunks`` into the partial disk (not yet renamed)."""
    partial, scratch = partial_files(args.dest_dir)
    head, chunks = _peek(chunks, 8)
    compression = sniff_compression(head)
    if compression:
        chunks = _decompress(chunks, compression, what)
    chunks = prefetch(chunks)
    head, chunks = _peek(chunks, SNIFF)
    fmt = sniff_format(head)
    if fmt == "raw":
        if looks_like_text(head):
            raise ImportFailed(f"{what} is not a disk image: it starts with text "
                               f"({head[:60].decode(errors='replace')!r})",
                               reason="InvalidImage", retryable=False)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            writer = SparseWriter(fd, args.capacity, what)
            for c in chunks:
                writer.write(c)
            size = writer.offset
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        if size < MIN_IMAGE:
            raise ImportFailed(f"{what} is not a disk image: only {size} bytes",
                               reason="InvalidImage", retryable=False)
        meter.verify(what)
        return _Outcome("raw", compression, size)
    known = 0
    if fmt == "qcow2":
        qcow2_standalone(head, what)
        known = _qcow2_virtual_size(head)
        if known > args.capacity:
            raise _too_large(known, args.capacity, what)
    with open(scratch, "xb", buffering=0) as f:
        for c in chunks:
            view = memoryview(c)
            while view:
                view = view[f.write(view) or 0:]
    meter.verify(what)
    try:
        vsize = convert(scratch, fmt, partial, args.capacity, what, vsize=known)
    finally:
        scratch.unlink(missing_ok=True)
    return _Outcome(fmt, compression, vsize)


def _copy_sparse(src_fd: int, dst_fd: int, size: int, meter: Meter) -> None:
    """Copy the data extents of ``src_fd`` (holes stay holes)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            n = os.copy_file_range(src_fd, dst_fd, min(hole - pos, 256 << 20), pos, pos)
            if n == 0:
                break
            pos += n
            meter.count(n)
        offset = hole


def _reflink(src_fd: int, dst_fd: int) -> bool:
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError:
        return False
    return True


def import_file(args: ImportArgs, meter: Meter) -> _Outcome:
    partial, _ = partial_files(args.dest_dir)
    src = Path(args.path)
    what = str(src)
    try:
        src_fd = os.open(src, os.O_RDONLY)
    except FileNotFoundError as e:
        raise ImportFailed(f"the source file {src} does not exist", reason="InvalidSource") from e
    try:
        st = os.fstat(src_fd)
        head = os.pread(src_fd, SNIFF, 0)
        fmt = sniff_format(head)
        if args.checksum:
            while data := os.read(src_fd, CHUNK):
                meter.add(data)
            meter.verify(what)
            meter.done = 0
        meter.total = st.st_blocks * 512 if fmt == "raw" else 0
        if fmt != "raw":
            # a local file (clone, snapshot) may be an overlay: its chain is flattened
            vsize = convert(src, fmt, partial, args.capacity, what, standalone=False)
            meter.done = st.st_size
            return _Outcome(fmt, "", vsize)
        if st.st_size > args.capacity:
            raise _too_large(st.st_size, args.capacity, what)
        dst_fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if _reflink(src_fd, dst_fd):
                meter.count(st.st_blocks * 512)
            else:
                os.ftruncate(dst_fd, st.st_size)
                _copy_sparse(src_fd, dst_fd, st.st_size, meter)
        finally:
            os.close(dst_fd)
        return _Outcome("raw", "", st.st_size)
    finally:
        os.close(src_fd)


def import_blank(args: ImportArgs) -> _Outcome:
    partial, _ = partial_files(args.dest_dir)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    return _Outcome("raw", "", args.capacity)


def execute(args: ImportArgs) -> ImportResult:
    """The child's work: import, then rename into place. Raises :class:`ImportFailed`."""
    validate(args)
    started = time.monotonic()
    if not args.dest_dir.is_dir():
        raise ImportFailed(f"the volume directory {args.dest_dir} does not exist",
                           reason="InvalidSource")
    discard_partials(args.dest_dir)
    meter = Meter(checksum=args.checksum if args.source in ("http", "stdin", "file") else "")
    try:
        if args.source == "blank":
            out = import_blank(args)
        elif args.source == "file":
            out = import_file(args, meter)
        elif args.source == "http":
            out = import_stream(http_source(args, meter), meter, args, redact(args.url))
        elif args.source == "stdin":
            out = import_stream(stdin_source(args, meter), meter, args, "the upload")
        else:
            out = import_stream(registry_source(args, meter), meter, args, redact(args.url))
        partial, _ = partial_files(args.dest_dir)
        _finish(partial, args.capacity, args.dest_dir)
    except ImportFailed:
        discard_partials(args.dest_dir)
        raise
    except OSError as e:
        discard_partials(args.dest_dir)
        raise ImportFailed(f"writing the volume failed: {e}", reason="Error",
                           retryable=e.errno in (errno.EIO, errno.EINTR)) from e
    except BaseException:
        discard_partials(args.dest_dir)
        raise
    return ImportResult(format=out.format, compression=out.compression,
                        virtual_size=out.virtual_size,
                        bytes_read=meter.done, seconds=round(time.monotonic() - started, 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtshift.storage.importer",
                                     description="Import a disk into a volume directory "
                                     f"(arguments as JSON in ${ARGS_ENV}).")
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--dest-dir", required=True)
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        text = os.environ.get(ARGS_ENV)
        if not text:
            raise ImportFailed(f"${ARGS_ENV} is not set", reason="InvalidSource")
        args = ImportArgs.from_json(text)
        if args.source != opts.source or str(args.dest_dir) != opts.dest_dir:
            raise ImportFailed("the command line and the arguments disagree",
                               reason="InvalidSource")
        result = execute(args)
    except ImportFailed as e:
        _emit({"error": {"reason": e.reason, "message": e.message, "retryable": e.retryable}})
        return 1
    except Exception as e:
        _emit({"error": {"reason": "Error", "message": f"{type(e).__name__}: {e}",
                         "retryable": False}})
        return 1
    _emit({"progress": 100.0})
    _emit({"result": asdict(result)})
    return 0
