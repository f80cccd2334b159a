"""The node's image cache: fetch the blobs of the cluster's images and keep them by sha256.

Layout of ``cache_dir``: ``sha256/HEX`` (complete, verified, read-only blobs, shared by every VM
of the node as the backing file of its overlays) and ``tmp/HEX.partial`` (downloads in
progress). A download that breaks off is resumed from the partial file with an HTTP ``Range``
request, by the next attempt or by the next :meth:`ImageCache.resolve`; a blob is verified
against its sha256 before it is renamed into place. One cache directory belongs to one node
agent (downloads are serialized per blob inside the process, not across processes).

Lookups go by ``spec.reference`` (a field selector): the exact reference first, then the same
reference with ``:latest`` added or removed, as container runtimes treat an untagged reference.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from virtshift.api.kinds import Obj
from virtshift.client.rest import Client, error_from_status, resource_path
from virtshift.errors import ApiError, NotFound, VirtshiftError
from virtshift.storage.blobfile import discard, fsync_dir, sync_close, write_chunks
from virtshift.storage.imagestore import (
    DISK,
    INITRD,
    KERNEL,
    PHASE_READY,
    SHA256_HEADER,
    image_kind,
    image_name,
    is_sha256,
    status_blobs,
)

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_WRITE_BATCH = 4 * 1024 * 1024
_READ_TIMEOUT = 60.0


class ImageError(VirtshiftError):
    """A failure to provide the image a VM names (the node reports it as ``ErrImagePull``)."""

    reason = "ErrImagePull"

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(message)
        self.reference = reference


class ImageNotFound(ImageError):
    def __init__(self, reference: str) -> None:
        super().__init__(reference, f'image "{reference}" not found in the cluster image store '
                                    f"(import it with: virtshift image import {reference} FILE)")


class ImageNotReady(ImageError):
    """The Image exists but is being uploaded, failed, or lacks a blob it needs."""


class ImagePullError(ImageError):
    """Downloading or verifying a blob failed (after retries)."""


class OverlayError(VirtshiftError):
    pass


@dataclass(frozen=True)
class ResolvedImage:
    """Local files for an image. Disk images: ``disk`` and ``format``; kernel images:
    ``kernel``, optional ``initrd`` and the image's default ``cmdline``."""

    reference: str
    name: str  # the Image object's name
    type: str  # disk | kernel
    disk: Path | None = None
    format: str | None = None  # qcow2 | raw
    virtual_size: int | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # blob -> sha256


def reference_candidates(reference: str) -> list[str]:
    """The reference, then with ``:latest`` added (untagged) or removed."""
    out = [reference]
    last = reference.rsplit("/", 1)[-1]
    if "@" in last:
        return out
    if ":" not in last:
        out.append(f"{reference}:latest")
    elif reference.endswith(":latest"):
        out.append(reference[: -len(":latest")])
    return out


def _escape_selector_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


# ---- file helpers (worker threads) -------------------------------------------------------------


def _hash_prefix(path: Path, size: int) -> Any:
    """A sha256 object fed with the first ``size`` bytes of ``path``."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        remaining = size
        while remaining:
            chunk = f.read(min(_WRITE_BATCH, remaining))
            if not chunk:
                raise OSError(f"{path} is shorter than {size} bytes")
            hasher.update(chunk)
            remaining -= len(chunk)
    return hasher


def _open_partial(path: Path, offset: int) -> IO[bytes]:
    f = path.open("r+b" if path.exists() else "wb")
    f.truncate(offset)
    f.seek(offset)
    return f


def _install(partial: Path, final: Path) -> None:
    partial.chmod(0o444)
    os.replace(partial, final)
    fsync_dir(final.parent)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class ImageCache:
    """Blobs of the cluster image store, fetched on demand into ``cache_dir``."""

    def __init__(self, cache_dir: Path, client: Client, *, retries: int = 3) -> None:
        self.cache_dir = cache_dir
        self.client = client
        self.retries = retries
        self.blob_dir = cache_dir / "sha256"
        self.tmp_dir = cache_dir / "tmp"
        self.kind = image_kind()
        self.downloaded_bytes = 0  # bytes received from the store (tests and metrics)
        self._locks: dict[str, asyncio.Lock] = {}
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def partial_path(self, sha256: str) -> Path:
        return self.tmp_dir / f"{sha256}.partial"

    # ---- lookups -------------------------------------------------------------------------------

    async def find(self, reference: str) -> Obj:
        """The Image for ``reference``; raises :class:`ImageNotFound`."""
        for candidate in reference_candidates(reference):
            try:
                found = await self.client.list(
                    self.kind, None,
                    field_selector=f"spec.reference={_escape_selector_value(candidate)}")
            except (aiohttp.ClientError, TimeoutError) as e:
                raise ImagePullError(reference, f'looking up image "{reference}": '
                                                f"cannot reach the API server: {e}") from e
            except ApiError as e:
                raise ImagePullError(reference, f'looking up image "{reference}": {e}') from e
            items: list[Obj] = found.get("items") or []
            if items:
                # Prefer the object named after the reference, then ready ones, then by name.
                preferred = image_name(candidate)
                items.sort(key=lambda o: (o["metadata"]["name"] != preferred,
                                          (o.get("status") or {}).get("phase") != PHASE_READY,
                                          o["metadata"]["name"]))
                return items[0]
        raise ImageNotFound(reference)

    async def resolve(self, reference: str) -> ResolvedImage:
        """Local paths for ``reference``, downloading what the cache lacks."""
        image = await self.find(reference)
        name = image["metadata"]["name"]
        status = image.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase != PHASE_READY:
            detail = f": {status['message']}" if status.get("message") else ""
            raise ImageNotReady(reference, f'image "{reference}" is not ready '
                                           f"(phase {phase}){detail}")
        blobs = status_blobs(image)  # the served set: complete by construction
        if DISK not in blobs and KERNEL not in blobs:
            raise ImageNotReady(reference, f'image "{reference}" has neither a disk nor a '
                                           "kernel blob")
        paths: dict[str, Path] = {}
        for part, blob in blobs.items():
            paths[part] = await self.fetch(reference, name, part, blob["sha256"],
                                           int(blob.get("size") or 0))
        digests = {p: b["sha256"] for p, b in blobs.items()}
        if DISK in paths:
            fmt = status.get("format")
            return ResolvedImage(reference, name, DISK, disk=paths[DISK],
                                 format=str(fmt) if fmt else "raw",
                                 virtual_size=status.get("virtualSize"), digests=digests)
        cmdline = (image.get("spec") or {}).get("cmdline")
        return ResolvedImage(reference, name, KERNEL, kernel=paths[KERNEL],
                             initrd=paths.get(INITRD),
                             cmdline=cmdline if isinstance(cmdline, str) else "",
                             digests=digests)

    # ---- downloads -----------------------------------------------------------------------------

    async def fetch(self, reference: str, name: str, part: str, sha256: str, size: int
                    ) -> Path:
        """The cached blob ``sha256``, downloaded from image ``name``'s ``part`` if absent."""
        if not is_sha256(sha256):
            raise ImagePullError(reference, f"image {name} names an invalid {part} digest")
        final = self.blob_path(sha256)
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            if await asyncio.to_thread(final.is_file):
                return final
            last: Exception | None = None
            for attempt in range(1, self.retries + 1):
                try:
                    await self._download(name, part, sha256, size)
                    return final
                except NotFound as e:
                    raise ImagePullError(reference, f'pulling image "{reference}": {e}') from e
                except (aiohttp.ClientError, TimeoutError, OSError, ApiError) as e:
                    last = e
                    log.warning("downloading %s of image %s (attempt %d/%d): %s", part, name,
                                attempt, self.retries, e)
                    await asyncio.sleep(min(0.5 * attempt, 2.0))
            raise ImagePullError(reference, f'pulling image "{reference}": downloading its '
                                            f"{part} failed: {last}")

    async def _download(self, name: str, part: str, sha256: str, size: int) -> None:
        partial = self.partial_path(sha256)
        offset = await asyncio.to_thread(_size_or_zero, partial)
        if size and offset > size:
            offset = 0
        hasher = await asyncio.to_thread(_hash_prefix, partial, offset) if offset else (
            hashlib.sha256())
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=_READ_TIMEOUT)
        path = resource_path(self.kind, None, name, part)
        async with self.client.session.get(path, headers=headers, timeout=timeout) as resp:
            if resp.status == 416:
                # The partial file is not a prefix of this blob (or already complete): restart.
                await asyncio.to_thread(discard, partial)
                raise OSError(f"range {offset}- not satisfiable; restarting from 0")
            if resp.status >= 400:
                text = await resp.text()
                raise error_from_status(resp.status, _json_or_text(text))
            served = resp.headers.get(SHA256_HEADER)
            if served and served != sha256:
                raise NotFound(f"the {part} of image {name} changed (now {served}); "
                               "resolve it again")
            if resp.status == 206:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != offset:
                    raise OSError(f"asked for bytes from {offset}, got them from {start}")
            else:
                offset = 0
                hasher = hashlib.sha256()
            f = await asyncio.to_thread(_open_partial, partial, offset)
            try:
                pending: list[bytes] = []
                pending_size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    pending.append(chunk)
                    pending_size += len(chunk)
                    self.downloaded_bytes += len(chunk)
                    if pending_size >= _WRITE_BATCH:
                        await asyncio.to_thread(write_chunks, f, hasher, pending)
                        pending, pending_size = [], 0
                await asyncio.to_thread(write_chunks, f, hasher, pending)
            finally:
                await asyncio.to_thread(sync_close, f)
        got = await asyncio.to_thread(_size_or_zero, partial)
        if size and got < size:
            raise OSError(f"download of {part} ended at {got} of {size} bytes")
        digest = hasher.hexdigest()
        if digest != sha256 or (size and got != size):
            await asyncio.to_thread(discard, partial)
            raise OSError(f"the {part} downloaded has sha256 {digest} and {got} bytes, "
                          f"expected {sha256} and {size}; retrying from scratch")
        await asyncio.to_thread(_install, partial, self.blob_path(sha256))
        log.info("cached %s of image %s (%s, %d bytes)", part, name, sha256[:12], got)

    # ---- housekeeping --------------------------------------------------------------------------

    async def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete cached blobs (and partial downloads) whose digest is not in ``keep``; the
        caller keeps every blob a VM on the node still uses."""
        wanted = set(keep)

        def sweep() -> list[str]:
            removed: list[str] = []
            for p in self.blob_dir.iterdir():
                if p.name not in wanted:
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
            for p in self.tmp_dir.iterdir():
                if p.name.removesuffix(".partial") not in wanted:
                    p.unlink(missing_ok=True)
            return removed
        return await asyncio.to_thread(sweep)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"message": text}


def _content_range_start(header: str) -> int:
    # "bytes START-END/TOTAL"
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


async def create_overlay(base: Path, base_format: str, dest: Path) -> None:
    """A qcow2 copy-on-write overlay at ``dest`` backed by ``base`` (which never changes)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise OverlayError("qemu-img is not installed (apt-get install qemu-utils)")
    if base_format not in ("qcow2", "raw"):
        raise OverlayError(f"unsupported base image format {base_format!r}")
    base = await asyncio.to_thread(base.resolve)
    tmp = dest.with_name(f".{dest.name}.tmp")
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(tmp),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        await asyncio.to_thread(discard, tmp)
        detail = " ".join(err.decode(errors="replace").split())
        raise OverlayError(f"creating an overlay of {base} at {dest} failed: {detail}")
    await asyncio.to_thread(os.replace, tmp, dest)
