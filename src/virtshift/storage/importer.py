"""The volume importer: what CDI's importer, upload server and cloner pods do, as a child process.

The node agent calls :func:`run` with an :class:`ImportArgs`; it starts
``python -m virtshift.storage.importer`` (so that downloading, decompression and copying run on
another core and never block the agent's event loop) and returns an :class:`ImportResult` or raises
:class:`ImportFailed`. The child writes ``DEST/.disk.img.partial`` (and, for images that need
``qemu-img``, a seekable scratch copy ``DEST/.disk.img.scratch``), fsyncs it and renames it to
``DEST/disk.img`` only once it is complete and verified: a failed or cancelled import removes its
partial files and never touches an existing ``disk.img``.

Sources (``ImportArgs.source``):

- ``http``: an http(s) URL, with a CA bundle (``ca_file``), ``insecure`` (no TLS verification),
  basic auth (``username``/``password``) and extra ``"Name: value"`` headers; ``checksum``
  (``sha256:HEX``, also md5, sha1, sha512) is verified over the bytes as served.
- ``registry``: ``docker://host[:port]/repo[:tag|@digest]`` through the registry v2 API
  (anonymous, basic, or a bearer token from the registry's ``WWW-Authenticate`` challenge); the
  disk is the file under ``disk/`` of the image's layers, as in a containerDisk (the last layer that
  has one wins). HTTPS first; with ``insecure`` a plain-HTTP registry is accepted too.
- ``stdin``: the bytes of an upload, fed by :func:`run` from an async iterator; ``size`` (optional)
  gives progress and detects a body cut short.
- ``file``: a raw or qcow2 file (clone source, snapshot). A raw file is cloned by reflink
  (``FICLONE``) when the filesystem can, else copied extent by extent (``SEEK_DATA``/``SEEK_HOLE``
  and ``copy_file_range``) so holes stay holes.
- ``blank``: a sparse raw disk of the capacity.

The bytes are sniffed by their magic: a gzip or xz layer is decompressed on the fly; qcow2 (and
vmdk, vhdx, vdi, vpc) goes to the scratch file and through ``qemu-img convert -O raw``; anything
else is raw and streams straight into the target, seeking over all-zero blocks (the disk stays
sparse).
CDI takes any bytes as raw; virtshift refuses a stream under 512 bytes, and one that is clearly text
(its first 4 KiB have no NUL byte and read as UTF-8, e.g. an HTML error page). An ISO is raw.
Images with a backing file or an external data file are refused. An image smaller than the
capacity is grown (sparsely) to it, as CDI's resize does; a larger one fails.

Failure reasons (:attr:`ImportFailed.reason`, mirrored into the DataVolume's conditions):

=====================  =========  ==========================================================
reason                 retryable  when
=====================  =========  ==========================================================
ConnectionFailed       yes        refused, unreachable, name not resolved, timed out
TLSError               no         the server's certificate does not verify
Unauthorized           no         HTTP 401 / 403
NotFound               no         HTTP 404 / 410, a registry tag that does not exist
HTTPError              no         another 4xx
ServerError            yes        HTTP 5xx
TransferInterrupted    yes        the body ended before Content-Length (or the upload size)
ChecksumMismatch       no         the served bytes do not match ``checksum``
InvalidImage           no         not a disk image, a corrupt compressed stream, a backing file
ImageTooLarge          no         the virtual size is larger than the capacity
ConversionFailed       no         ``qemu-img`` could not read or convert the image
ImagePullFailed        no         a registry image without a ``disk/`` file, a bad manifest
InvalidSource          no         an unusable URL, a missing source file, bad arguments
Error                  no         anything else (e.g. the volume is full)
=====================  =========  ==========================================================

The child reports on stdout, one JSON object per line: ``{"progress": 12.5}`` (percent of the
known total of source bytes, at most twice a second), then ``{"result": {...}}`` or ``{"error":
{"reason", "message", "retryable"}}``. Secrets never reach its command line: :class:`ImportArgs`
travels as JSON in the environment variable :data:`ARGS_ENV`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import hashlib
import http.client
import io
import json
import lzma
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from virtshift.errors import VirtshiftError

SourceKind = Literal["http", "registry", "blank", "stdin", "file"]
SOURCES: tuple[str, ...] = ("http", "registry", "blank", "stdin", "file")
ARGS_ENV = "VIRTSHIFT_IMPORT_ARGS"
DISK_NAME = "disk.img"
PARTIAL_NAME = ".disk.img.partial"
SCRATCH_NAME = ".disk.img.scratch"
CHUNK = 1 << 20
BLOCK = 64 << 10
MIN_IMAGE = 512
SNIFF = 4096
PROGRESS_INTERVAL = 0.5
NET_TIMEOUT = 60.0
QEMU_IMG_TIMEOUT = 3600.0
FICLONE = 0x40049409
_ZERO_BLOCK = bytes(BLOCK)
_CHECKSUM_ALGOS = ("sha256", "sha512", "sha1", "md5")
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
# the contract (parent and child)


class ImportFailed(VirtshiftError):
    """An import that did not produce a disk; ``reason`` is a CamelCase word for the DataVolume's
    conditions (see the module's table), ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, reason: str = "Error", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class ImportArgs:
    source: SourceKind
    dest_dir: Path
    capacity: int
    url: str = ""
    path: str = ""
    ca_file: str = ""
    insecure: bool = False
    username: str = ""
    password: str = ""
    headers: tuple[str, ...] = ()
    checksum: str = ""
    size: int = 0  # stdin: the upload's size when known (progress, cut-off detection)

    def to_json(self) -> str:
        data = asdict(self)
        data["dest_dir"] = str(self.dest_dir)
        data["headers"] = list(self.headers)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ImportArgs:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("source") not in SOURCES:
            raise ImportFailed("importer arguments are unreadable", reason="InvalidSource")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["dest_dir"] = Path(str(known.get("dest_dir", "")))
        known["headers"] = tuple(str(h) for h in known.get("headers") or ())
        return cls(**known)


@dataclass(frozen=True)
class ImportResult:
    format: str
    compression: str
    virtual_size: int
    bytes_read: int
    seconds: float


def validate(args: ImportArgs) -> None:
    """Refuse arguments that cannot work (raises :class:`ImportFailed`, reason InvalidSource)."""
    def bad(message: str) -> ImportFailed:
        return ImportFailed(message, reason="InvalidSource", retryable=False)

    if args.source not in SOURCES:
        raise bad(f"unknown import source {args.source!r}")
    if args.capacity <= 0:
        raise bad(f"the volume's capacity must be positive, not {args.capacity}")
    if not str(args.dest_dir) or not args.dest_dir.is_absolute():
        raise bad(f"the destination must be an absolute directory, not {str(args.dest_dir)!r}")
    if args.source == "http":
        scheme = urllib.parse.urlsplit(args.url).scheme
        if scheme not in ("http", "https"):
            raise bad(f"{redact(args.url)!r} is not an http(s) URL")
    if args.source == "registry":
        parse_registry_url(args.url)
    if args.source == "file" and not args.path:
        raise bad("a file import needs a path")
    if args.checksum:
        parse_checksum(args.checksum)
    for h in args.headers:
        if ":" not in h:
            raise bad(f"extra header {h.split(':')[0][:40]!r} is not of the form 'Name: value'")


def redact(url: str) -> str:
    """``url`` without user information (for messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def parse_checksum(text: str) -> tuple[str, str]:
    algo, sep, digest = text.partition(":")
    algo = algo.strip().lower()
    digest = digest.strip().lower()
    if not sep or algo not in _CHECKSUM_ALGOS or not re.fullmatch(r"[0-9a-f]+", digest) \
            or len(digest) != hashlib.new(algo).digest_size * 2:
        raise ImportFailed(f"checksum {text!r} is not ALGO:HEX with ALGO one of "
                           f"{', '.join(_CHECKSUM_ALGOS)}", reason="InvalidSource")
    return algo, digest


@dataclass(frozen=True)
class RegistryRef:
    host: str        # host[:port]
    repository: str
    reference: str   # a tag or a digest


def parse_registry_url(url: str) -> RegistryRef:
    """``docker://host[:port]/repo[:tag|@digest]`` (the host is required: no registry is
    implied)."""
    if not url.startswith("docker://"):
        raise ImportFailed(f"registry URL {url!r} does not start with docker://",
                           reason="InvalidSource")
    rest = url[len("docker://"):]
    host, _, path = rest.partition("/")
    if not host or not path or not ("." in host or ":" in host or host == "localhost"):
        raise ImportFailed(f"registry URL {url!r} needs a registry host and a repository",
                           reason="InvalidSource")
    if "@" in path:
        repo, _, ref = path.partition("@")
    else:
        repo, colon, tag = path.rpartition(":")
        if not colon or "/" in tag:
            repo, ref = path, "latest"
        else:
            ref = tag
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo) or not ref:
        raise ImportFailed(f"registry URL {url!r} has an invalid repository or tag",
                           reason="InvalidSource")
    return RegistryRef(host, repo, ref)


# ---------------------------------------------------------------------------------------------
# the parent side


def partial_files(dest_dir: Path) -> tuple[Path, Path]:
    return dest_dir / PARTIAL_NAME, dest_dir / SCRATCH_NAME


def discard_partials(dest_dir: Path) -> None:
    for p in partial_files(dest_dir):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _child_env(args: ImportArgs) -> dict[str, str]:
    env = dict(os.environ)
    env[ARGS_ENV] = args.to_json()
    src_root = str(Path(__file__).resolve().parents[2])
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = src_root + (os.pathsep + old if old else "")
    return env


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _feed(proc: asyncio.subprocess.Process, chunks: AsyncIterator[bytes]
                ) -> BaseException | None:
    """Copy the upload into the child's stdin; an exception of the iterator is returned (the
    child is then killed, so that it never takes a cut-off upload for a complete one)."""
    assert proc.stdin is not None
    try:
        async for chunk in chunks:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return None  # the child stopped reading: its own report says why
    except asyncio.CancelledError:
        raise
    except Exception as e:
        _kill(proc)
        return e
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write_eof()
        await proc.stdin.drain()
    return None


async def _tail(stream: asyncio.StreamReader, keep: int = 4000) -> str:
    text = b""
    while chunk := await stream.read(65536):
        text = (text + chunk)[-keep:]
    return text.decode(errors="replace")


async def run(args: ImportArgs, *, stdin: AsyncIterator[bytes] | None = None,
              on_progress: Callable[[float], Awaitable[None]] | None = None) -> ImportResult:
    """Import ``args`` into ``args.dest_dir / "disk.img"`` in a child process.

    Cancelling the call kills the child (and any ``qemu-img`` it runs) and removes the partial
    files. Raises :class:`ImportFailed`.
    """
    validate(args)
    if args.source == "stdin" and stdin is None:
        raise ImportFailed("an upload import needs the stdin iterator", reason="InvalidSource")
    argv = [sys.executable, "-m", "virtshift.storage.importer", "--source", args.source,
            "--dest-dir", str(args.dest_dir)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env(args),
        start_new_session=True, limit=1 << 20)
    assert proc.stdout is not None and proc.stderr is not None
    feeder = asyncio.create_task(_feed(proc, stdin)) if stdin is not None else None
    stderr = asyncio.create_task(_tail(proc.stderr))
    final: dict[str, Any] | None = None
    try:
        async for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "progress" in msg:
                if on_progress is not None:
                    await on_progress(float(msg["progress"]))
            elif "result" in msg or "error" in msg:
                final = msg
        rc = await proc.wait()
        feed_error = await feeder if feeder is not None else None
        err_text = await stderr
    except BaseException:
        _kill(proc)
        for task in (feeder, stderr):
            if task is not None:
                task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 10)
        discard_partials(args.dest_dir)
        raise
    if feed_error is not None:
        discard_partials(args.dest_dir)
        raise ImportFailed(f"the upload was interrupted: {feed_error}",
                           reason="TransferInterrupted", retryable=True)
    if final is not None and "result" in final and rc == 0:
        r = final["result"]
        return ImportResult(format=str(r["format"]), compression=str(r["compression"]),
                            virtual_size=int(r["virtual_size"]),
                            bytes_read=int(r["bytes_read"]), seconds=float(r["seconds"]))
    discard_partials(args.dest_dir)
    if final is not None and "error" in final:
        e = final["error"]
        raise ImportFailed(str(e.get("message", "")), reason=str(e.get("reason") or "Error"),
                           retryable=bool(e.get("retryable")))
    tail = err_text.strip().splitlines()[-1:] if err_text.strip() else []
    raise ImportFailed(f"the importer exited with status {rc}"
                       + (f": {tail[0]}" if tail else ""), reason="Error", retryable=True)


# ---------------------------------------------------------------------------------------------
# the child side: reporting


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
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
            standalone: bool = True) -> int:
    """``qemu-img convert`` ``src`` (a backing chain is flattened) to a raw ``dst``; returns the
    virtual size."""
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


def import_stream(chunks: Iterator[bytes], meter: Meter, args: ImportArgs, what: str
                  ) -> _Outcome:
    """Decode ``chunks`` into the partial disk (not yet renamed)."""
    partial, scratch = partial_files(args.dest_dir)
    head, chunks = _peek(chunks, 8)
    compression = sniff_compression(head)
    if compression:
        chunks = _decompress(chunks, compression, what)
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
    if fmt == "qcow2":
        vsize = _qcow2_virtual_size(head)
        if vsize > args.capacity:
            raise _too_large(vsize, args.capacity, what)
    with open(scratch, "xb", buffering=0) as f:
        for c in chunks:
            view = memoryview(c)
            while view:
                view = view[f.write(view) or 0:]
    meter.verify(what)
    try:
        vsize = convert(scratch, fmt, partial, args.capacity, what)
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


if __name__ == "__main__":
    sys.exit(main())


