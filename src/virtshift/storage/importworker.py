"""The importer's child process (``python -m virtshift.storage.importer``): sources, format
detection, decompression, conversion and the sparse writer. :mod:`virtshift.storage.importer`
documents the behaviour and holds the contract; this module is imported only by the child (so the
agent never loads it, and the child never loads asyncio)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import lzma
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virtshift.storage.importer import (
    ARGS_ENV,
    DISK_NAME,
    PARENT_ENV,
    SOURCES,
    ImportArgs,
    ImportFailed,
    ImportResult,
    discard_partials,
    parse_checksum,
    partial_files,
    redact,
    validate,
)
from virtshift.storage.sparse import copy_extents, data_extents, reflink

CHUNK = 1 << 20
BLOCK = 64 << 10
MIN_IMAGE = 512
SNIFF = 4096
PROGRESS_INTERVAL = 0.5
NET_TIMEOUT = 60.0
QEMU_IMG_TIMEOUT = 3600.0
WRITEBACK_STEP = 64 << 20
_ZERO_BLOCK = bytes(BLOCK)
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
# the child side: sources (http and registry: virtshift.storage.importnet)


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
    output comes in pieces of at most 1 MiB whatever the compression ratio."""
    limit = CHUNK

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


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range that is complete to the disk now (``POSIX_FADV_DONTNEED`` starts the
    write-back of its dirty pages and lets the page cache go), so that the disk writes overlap the
    copy and the final fsync has little left to do: a durable 1 GiB copy on ext4 takes ~0.7 s
    instead of ~1 s."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class SparseWriter:
    """Writes a raw stream at increasing offsets, skipping all-zero 64 KiB blocks."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        self.fd, self.limit, self.what = fd, limit, what
        self.offset = 0
        self._written_back = 0

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
        if self.offset - self._written_back >= WRITEBACK_STEP:
            start_writeback(self.fd, self._written_back, self.offset - self._written_back)
            self._written_back = self.offset

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written


# the volume directory's lock (see execute); qemu-img inherits it, so that a qemu-img outliving a
# killed importer still keeps the next importer of the volume waiting
_volume_lock: list[int] = []


def _qemu_img(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["qemu-img", *argv], capture_output=True, text=True,
                              timeout=QEMU_IMG_TIMEOUT, check=False, pass_fds=_volume_lock)
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
    # O_DIRECT writes (-t none) in parallel (-W): the copy is durable as written, which is
    # faster than writing through the page cache and fsyncing; a file system without O_DIRECT
    # (tmpfs) gets the cached write
    p = _qemu_img("convert", "-q", "-t", "none", "-W", "-f", fmt, "-O", "raw", str(src), str(dst))
    if p.returncode != 0:
        dst.unlink(missing_ok=True)
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
    """Copy the data extents of ``src_fd`` (holes stay holes), writing back as it goes."""

    def written(pos: int, n: int) -> None:
        start_writeback(dst_fd, pos, n)
        meter.count(n)

    copy_extents(src_fd, dst_fd, data_extents(src_fd, size), WRITEBACK_STEP, written)


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
            if reflink(src_fd, dst_fd):
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
    try:
        lock = os.open(args.dest_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ImportFailed(f"the volume directory {args.dest_dir} is not usable: {e.strerror}",
                           reason="InvalidSource") from e
    # One importer per volume at a time: another one (say, left running by an agent that was
    # killed) finishes first, then this one starts over from its own partial files.
    fcntl.flock(lock, fcntl.LOCK_EX)
    _volume_lock[:] = [lock]
    discard_partials(args.dest_dir)
    meter = Meter(checksum=args.checksum if args.source in ("http", "stdin", "file") else "")
    try:
        if args.source == "blank":
            out = import_blank(args)
        elif args.source == "file":
            out = import_file(args, meter)
        elif args.source == "http":
            from virtshift.storage.importnet import http_source

            out = import_stream(http_source(args, meter), meter, args, redact(args.url))
        elif args.source == "stdin":
            out = import_stream(stdin_source(args, meter), meter, args, "the upload")
        else:
            from virtshift.storage.importnet import registry_source

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


def _die_with_parent() -> None:
    """Ask Linux for SIGKILL when the parent (the node agent) dies: its successor restarts the
    import, and the volume lock makes it wait for a qemu-img still running."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.environ.get(PARENT_ENV, str(os.getppid())) != str(os.getppid()):
        os._exit(1)  # the parent died before the request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtshift.storage.importer",
                                     description="Import a disk into a volume directory "
                                     f"(arguments as JSON in ${ARGS_ENV}).")
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--dest-dir", required=True)
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _die_with_parent()
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
