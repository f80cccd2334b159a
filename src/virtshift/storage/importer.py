"""The volume importer: what CDI's importer, upload server and cloner pods do, as a child process.

The node agent calls :func:`run` with an :class:`ImportArgs`; it starts
``python -m virtshift.storage.importer`` (so that downloading, decompression and copying run on
another core and never block the agent's event loop) and returns an :class:`ImportResult` or raises
:class:`ImportFailed`. The child writes ``DEST/.disk.img.partial`` (and, for images that need
``qemu-img``, a seekable scratch copy ``DEST/.disk.img.scratch``), fsyncs it and renames it to
``DEST/disk.img`` only once it is complete and verified: a failed or cancelled import removes its
partial files and never touches an existing ``disk.img``. One importer works on a volume at a
time (an exclusive ``flock`` of the volume directory, also held by its ``qemu-img``), and the child
is killed with its parent (``PR_SET_PDEATHSIG``), so a restarted node agent simply starts over.

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

Code: this module holds the contract and the parent side; the child's work is in
:mod:`virtshift.storage.importworker` (sources, sniffing, decompression, writers, qemu-img) and
:mod:`virtshift.storage.importnet` (HTTP and registry, loaded only for those sources).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import asyncio

from virtshift.errors import VirtshiftError

SourceKind = Literal["http", "registry", "blank", "stdin", "file"]
SOURCES: tuple[str, ...] = ("http", "registry", "blank", "stdin", "file")
ARGS_ENV = "VIRTSHIFT_IMPORT_ARGS"
PARENT_ENV = "VIRTSHIFT_IMPORT_PARENT"  # the parent's pid: the child dies with it
DISK_NAME = "disk.img"
PARTIAL_NAME = ".disk.img.partial"
SCRATCH_NAME = ".disk.img.scratch"
_CHECKSUM_ALGOS = ("sha256", "sha512", "sha1", "md5")


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
    """One import. ``dest_dir``: the volume directory (the result is ``dest_dir/disk.img``);
    ``capacity``: the volume's bytes; ``url``: http(s) or ``docker://`` URL; ``path``: the file
    of a ``file`` import; ``ca_file``: a PEM bundle to trust; ``insecure``: no TLS
    verification; ``username``/``password``: basic auth or registry credentials; ``headers``:
    extra ``"Name: value"`` request headers; ``checksum``: ``ALGO:HEX`` of the bytes as served;
    ``size``: the size of a ``stdin`` upload when known (progress, and a shorter body fails)."""

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
    size: int = 0

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
    """``format``/``compression``: what was detected; ``virtual_size``: the image's own size
    (the disk is then grown to the capacity); ``bytes_read``: bytes received from the source."""

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
    env[PARENT_ENV] = str(os.getpid())
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
    import asyncio

    assert proc.stdin is not None
    source = aiter(chunks)
    while True:
        try:
            chunk = await anext(source)
        except StopAsyncIteration:
            break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            _kill(proc)
            return e
        try:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return None  # the child stopped reading: its own report says why
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
    import asyncio

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


def main(argv: list[str] | None = None) -> int:
    """The child's entry point (see :mod:`virtshift.storage.importworker`)."""
    from virtshift.storage.importworker import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    sys.exit(main())
