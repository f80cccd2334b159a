"""The cluster image store: what a container registry is to KubeVirt's ``containerDisk``.

The control plane keeps image blobs in ``DATA_DIR/images/``, content-addressed by sha256
(``images/sha256/HEX``, read-only files; uploads stream into ``images/tmp/`` first, are fsynced
and renamed into place, and are never held whole in memory). An ``Image`` object
(``virtshift.io/v1alpha1``, cluster-scoped) describes one image:

- ``metadata.name``: :func:`image_name` of the reference (a stable DNS-1123 subdomain);
- ``spec.reference``: the exact string users write in ``containerDisk.image`` or
  ``kernelBoot.container.image``;
- ``spec.blobs`` (optional): the blobs that make the image complete, ``[disk]`` or
  ``[kernel]`` / ``[kernel, initrd]``; without it the first uploaded blob decides the type and
  ``disk`` or ``kernel`` alone completes the image;
- ``spec.cmdline`` (optional, kernel images): the default kernel command line;
- ``status``: ``type`` (``disk`` | ``kernel``), ``phase`` (``Uploading`` | ``Ready`` |
  ``Failed``), ``message``, ``size`` (bytes of all blobs), ``format`` and ``virtualSize`` (disk
  images), ``blobs`` (``{disk|kernel|initrd: {sha256, size}}``, what is served) and
  ``pendingBlobs`` (an import in progress).

Subresources, after the API server's bearer-token authentication:

- ``PUT /apis/virtshift.io/v1alpha1/images/NAME/{disk,kernel,initrd}``: the body is the blob
  (``application/octet-stream``, streamed, at most ``max_size`` bytes, by default 20 GiB or
  ``$VIRTSHIFT_IMAGE_MAX_SIZE``); an ``X-Virtshift-Sha256`` header is verified. The answer is the
  updated Image. Uploaded blobs are staged in ``pendingBlobs``; when every blob the image needs
  is staged they replace ``blobs`` in one write (phase ``Ready``). Re-importing a Ready image
  keeps it Ready and serving the old blobs until the new set is complete; a failed upload drops
  the staged blobs (phase ``Failed`` unless a complete older import is still served).
- ``GET`` (and ``HEAD``) of the same path streams the blob, with ``Range`` support for resumable
  downloads and the blob's digest in ``X-Virtshift-Sha256``.

Errors are Kubernetes ``Status`` objects: 404 unknown image or blob, 400 bad input (digest
mismatch, unreadable disk image, a disk with a backing file), 413 too large, 409 when the same
blob of the same image is already being uploaded, 415 for another content type.

Garbage collection: blobs no Image names (``status.blobs`` or ``pendingBlobs``) are deleted by
:meth:`ImageStore.collect`, which runs at start, after every upload, and whenever an Image is
deleted (a watch on the store), so ``kubectl delete image`` / ``virtshift image rm`` frees the
space at once; no finalizer is needed. Collection and the commit of an upload (rename + status
update) hold one lock, so a freshly committed blob is never collected. At start, leftover
temporary files are removed and Images left ``Uploading`` by a previous process are marked
``Failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.apiserver.app import ApiServer
from virtshift.apiserver.auth import ADMIN_GROUPS, ADMIN_USER, UserInfo
from virtshift.apiserver.http import json_response
from virtshift.apiserver.meta import store_key
from virtshift.apiserver.resources import WriteContext
from virtshift.errors import (
    ApiError,
    BadRequest,
    Compacted,
    Conflict,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
    StoreError,
    UnsupportedMediaType,
    VirtshiftError,
)
from virtshift.storage.blobfile import discard, fsync_dir, sync_close, write_chunks

log = logging.getLogger(__name__)

IMAGE_GROUP = "virtshift.io"
IMAGE_VERSION = "v1alpha1"
IMAGE_PLURAL = "images"
DISK = "disk"
KERNEL = "kernel"
INITRD = "initrd"
PARTS = (DISK, KERNEL, INITRD)
SHA256_HEADER = "X-Virtshift-Sha256"
OCTET_STREAM = "application/octet-stream"
DEFAULT_MAX_SIZE = 20 * 1024**3
MAX_SIZE_ENV = "VIRTSHIFT_IMAGE_MAX_SIZE"
DISK_FORMATS = ("qcow2", "raw")
FIELD_MANAGER = "virtshift-imagestore"
PHASE_UPLOADING = "Uploading"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"
MAX_NAME = 253
_HASH_LEN = 10
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_WRITE_BATCH = 4 * 1024 * 1024
_QCOW2_MAGIC = b"QFI\xfb"
_STATUS_RETRIES = 8
_QEMU_IMG_TIMEOUT = 120.0


# (status, image) -> the new status
Mutation = Callable[[Obj, Obj], Obj]


class ImageStoreConfigError(VirtshiftError):
    pass


class ImageUploadRace(Conflict):
    """The same blob of the same image is being uploaded by another request."""


def image_kind() -> KindInfo:
    kind = REGISTRY.by_resource(IMAGE_GROUP, IMAGE_VERSION, IMAGE_PLURAL)
    if kind is None:
        raise RuntimeError("the Image kind is not registered")
    return kind


def image_name(reference: str) -> str:
    """The ``Image`` object name for ``reference``: a readable, valid DNS-1123 subdomain that is
    stable and unique per exact reference (lowercased, runs of other characters become ``-``,
    then ``-`` and the first 10 hex digits of the reference's sha256), at most 253 characters."""
    digest = hashlib.sha256(reference.encode()).hexdigest()[:_HASH_LEN]
    base = re.sub(r"[^a-z0-9]+", "-", reference.lower()).strip("-")
    base = base[: MAX_NAME - _HASH_LEN - 1].rstrip("-")
    return f"{base or 'image'}-{digest}"


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.match(value))


def family(part: str) -> str:
    """The image type a blob belongs to: ``disk`` or ``kernel``."""
    return DISK if part == DISK else KERNEL


def declared_blobs(spec: Obj) -> tuple[str, ...] | None:
    """``spec.blobs`` when it is a valid list (one family, ``kernel`` with any ``initrd``)."""
    raw = spec.get("blobs")
    if not isinstance(raw, list) or not raw or not all(p in PARTS for p in raw):
        return None
    parts = tuple(dict.fromkeys(raw))
    families = {family(p) for p in parts}
    if len(families) != 1 or (KERNEL in families and KERNEL not in parts):
        return None
    return parts


def required_blobs(image: Obj, part: str | None = None) -> tuple[str, ...]:
    """The blobs that complete ``image``: ``spec.blobs``, else ``disk`` or ``kernel`` (by the
    type in status, else by ``part``)."""
    declared = declared_blobs(image.get("spec") or {})
    if declared is not None:
        return declared
    kind = (image.get("status") or {}).get("type") or (family(part) if part else DISK)
    return (DISK,) if kind == DISK else (KERNEL,)


def status_blobs(image: Obj) -> dict[str, Obj]:
    """``status.blobs`` entries that are well formed (the blobs served)."""
    return _blob_map((image.get("status") or {}).get("blobs"))


def pending_blobs(image: Obj) -> dict[str, Obj]:
    """``status.pendingBlobs``: blobs of an import in progress."""
    return _blob_map((image.get("status") or {}).get("pendingBlobs"))


def _blob_map(raw: Any) -> dict[str, Obj]:
    if not isinstance(raw, dict):
        return {}
    return {p: b for p, b in raw.items()
            if p in PARTS and isinstance(b, dict) and is_sha256(b.get("sha256"))}


# ---- disk formats ------------------------------------------------------------------------------


async def detect_format(path: Path) -> tuple[str, int]:
    """(format, virtual size) of a disk image; ``qemu-img info`` when installed, else magic
    bytes. Raises BadRequest for unreadable or unsupported images and for images with a
    backing file (which would reach outside the store)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return await asyncio.to_thread(_detect_by_magic, path)
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "info", "--output=json", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _QEMU_IMG_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BadRequest("the disk image could not be inspected: qemu-img info timed out"
                         ) from None
    if proc.returncode != 0:
        detail = " ".join(err.decode(errors="replace").split())
        raise BadRequest(f"not a disk image qemu can read: {detail}")
    info: Any = json.loads(out)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise BadRequest("disk images with a backing file are not accepted: flatten it first "
                         "(qemu-img convert -O qcow2 IN OUT)")
    fmt = str(info.get("format", ""))
    _check_format(fmt)
    return fmt, int(info.get("virtual-size") or 0)


def _detect_by_magic(path: Path) -> tuple[str, int]:
    with path.open("rb") as f:
        header = f.read(32)
    if header[:4] != _QCOW2_MAGIC:
        return "raw", path.stat().st_size
    if len(header) < 32:
        raise BadRequest("not a disk image qemu can read: truncated qcow2 header")
    backing_offset, = struct.unpack(">Q", header[8:16])
    if backing_offset:
        raise BadRequest("disk images with a backing file are not accepted: flatten it first "
                         "(qemu-img convert -O qcow2 IN OUT)")
    size, = struct.unpack(">Q", header[24:32])
    return "qcow2", int(size)


def _check_format(fmt: str) -> None:
    if fmt not in DISK_FORMATS:
        raise BadRequest(f"unsupported disk format {fmt!r}: convert it with "
                         "qemu-img convert -O qcow2 IN OUT")


# ---- file helpers (run in a worker thread) -----------------------------------------------------


def _install(tmp: Path, final: Path) -> bool:
    """Move a verified blob into place (read-only); False when it was already there."""
    if final.exists():
        tmp.unlink()
        return False
    tmp.chmod(0o444)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return True


class ImageStore:
    """The blobs of the cluster's images and the HTTP handlers that move them."""

    def __init__(self, server: ApiServer, root: Path, *, max_size: int = DEFAULT_MAX_SIZE
                 ) -> None:
        self.server = server
        self.resources = server.resources
        self.kind = image_kind()
        self.root = root
        self.blob_dir = root / "sha256"
        self.tmp_dir = root / "tmp"
        self.max_size = max_size
        self._lock = asyncio.Lock()
        self._uploading: set[tuple[str, str]] = set()
        self._ctx = WriteContext(UserInfo(ADMIN_USER, "", ADMIN_GROUPS),
                                 field_manager=FIELD_MANAGER)
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start recovery and the collector (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="image-store-gc")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        try:
            await self.recover()
        finally:
            self._ready.set()
        prefix = store_key(self.kind, None)
        while True:
            try:
                revision = self.server.store.revision
                await self.collect()
                async for event in self.server.store.watch(prefix, revision):
                    if event.type == "DELETE":
                        await self.collect()
            except Compacted:
                continue
            except StoreError as e:
                log.info("image store collector stopped: %s", e)
                return
            await asyncio.sleep(1.0)  # the watch ended (store closing or watcher too slow)

    async def recover(self) -> None:
        """After a restart: drop temporary files and fail imports no process is finishing."""
        removed = await asyncio.to_thread(self._clear_tmp)
        if removed:
            log.info("image store: removed %d unfinished upload(s)", removed)
        items, _ = await self.resources.list_objects(self.kind, None)
        for item in items:
            status = item.get("status") or {}
            if status.get("phase") == PHASE_UPLOADING or status.get("pendingBlobs"):
                name = item["metadata"]["name"]
                try:
                    await self._update_status(name, _failed(
                        "upload interrupted: the control plane restarted; import it again"))
                except NotFound:
                    continue

    def _clear_tmp(self) -> int:
        n = 0
        for p in self.tmp_dir.iterdir():
            p.unlink()
            n += 1
        return n

    # ---- garbage collection --------------------------------------------------------------------

    async def referenced(self) -> set[str]:
        """Digests named by any Image's ``status.blobs`` or ``status.pendingBlobs``."""
        items, _ = await self.resources.list_objects(self.kind, None)
        return {b["sha256"] for item in items
                for b in (*status_blobs(item).values(), *pending_blobs(item).values())}

    async def collect(self) -> list[str]:
        """Delete the blobs no Image refers to; returns their digests."""
        async with self._lock:
            keep = await self.referenced()
            removed = await asyncio.to_thread(self._sweep, keep)
        if removed:
            log.info("image store: removed %d unreferenced blob(s)", len(removed))
        return removed

    def _sweep(self, keep: set[str]) -> list[str]:
        removed: list[str] = []
        for p in self.blob_dir.iterdir():
            if is_sha256(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # ---- HTTP ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request, user: UserInfo, kind: KindInfo,
                     namespace: str | None, name: str, subresource: str) -> web.StreamResponse:
        del user, kind, namespace  # any authenticated user; Images are cluster-scoped
        if self._task is None:
            self.start()
        await self._ready.wait()
        if request.method == "PUT":
            return await self.upload(request, name, subresource)
        if request.method in ("GET", "HEAD"):
            return await self.download(name, subresource)
        raise MethodNotAllowed(f"{request.method} is not supported on images/{subresource}: "
                               "use PUT to upload, GET to download")

    async def download(self, name: str, part: str) -> web.StreamResponse:
        image = await self.resources.get(self.kind, None, name)
        blob = status_blobs(image).get(part)
        if blob is None:
            raise NotFound(f'image "{name}" has no {part} blob', name=name,
                           group=IMAGE_GROUP, kind=IMAGE_PLURAL)
        path = self.blob_path(blob["sha256"])
        if not path.is_file():
            raise NotFound(f'the {part} blob of image "{name}" is missing from the store',
                           name=name, group=IMAGE_GROUP, kind=IMAGE_PLURAL)
        return web.FileResponse(path, headers={SHA256_HEADER: blob["sha256"],
                                               "Cache-Control": "no-cache"})

    async def upload(self, request: web.Request, name: str, part: str) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", OCTET_STREAM).split(";")[0].strip().lower()
        if ctype not in (OCTET_STREAM, ""):
            raise UnsupportedMediaType(f'blob uploads take "{OCTET_STREAM}", not "{ctype}"')
        expected = request.headers.get(SHA256_HEADER, "").strip().lower() or None
        if expected is not None and not is_sha256(expected):
            raise BadRequest(f"{SHA256_HEADER} must be 64 hex digits")
        length = request.content_length
        if length is not None and length > self.max_size:
            raise self._too_large()
        image = await self.resources.get(self.kind, None, name)
        reference = (image.get("spec") or {}).get("reference")
        if not isinstance(reference, str) or not reference:
            raise BadRequest(f'image "{name}" has no spec.reference')
        allowed = self._allowed(image, part)
        key = (name, part)
        if key in self._uploading:
            raise ImageUploadRace(f'the {part} blob of image "{name}" is already being uploaded',
                                  name=name, group=IMAGE_GROUP, kind=IMAGE_PLURAL)
        self._uploading.add(key)
        try:
            await self._update_status(name, self._begin(part))
            result = await self._receive_and_commit(request, name, part, allowed, expected,
                                                    length)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._mark_failed(name, part, e)
            raise
        finally:
            self._uploading.discard(key)
        await self.collect()
        return json_response(result)

    @staticmethod
    def _allowed(image: Obj, part: str) -> tuple[str, ...]:
        """The blobs an import that includes ``part`` may consist of; BadRequest if ``part``
        does not belong to the image."""
        spec = image.get("spec") or {}
        if "blobs" in spec and declared_blobs(spec) is None:
            raise BadRequest(f"spec.blobs must be [disk], [kernel] or [kernel, initrd], got "
                             f"{spec.get('blobs')!r}")
        declared = declared_blobs(spec)
        if declared is not None and part not in declared:
            raise BadRequest(f'image "{image["metadata"]["name"]}" takes the blobs '
                             f"{list(declared)}, not {part}")
        return declared or ((DISK,) if part == DISK else (KERNEL, INITRD))

    @staticmethod
    def _begin(part: str) -> Mutation:
        def mutate(status: Obj, image: Obj) -> Obj:
            if status.get("phase") != PHASE_READY:
                status.update(type=family(part), phase=PHASE_UPLOADING)
            status["message"] = f"receiving {part}"
            return status
        return mutate

    async def _receive_and_commit(self, request: web.Request, name: str, part: str,
                                  allowed: tuple[str, ...], expected: str | None,
                                  length: int | None) -> Obj:
        tmp, digest, size = await self._receive(request, length)
        try:
            if expected is not None and digest != expected:
                raise BadRequest(f"sha256 mismatch: the {part} received has {digest}, "
                                 f"{SHA256_HEADER} says {expected}")
            blob: Obj = {"sha256": digest, "size": size}
            if part == DISK:
                blob["format"], blob["virtualSize"] = await detect_format(tmp)
            async with self._lock:
                await asyncio.to_thread(_install, tmp, self.blob_path(digest))
                try:
                    return await self._update_status(name, self._commit(name, part, blob,
                                                                        allowed))
                except NotFound:
                    log.info("image %s was deleted while its %s was uploaded", name, part)
                    raise
        finally:
            discard(tmp)

    def _commit(self, name: str, part: str, blob: Obj, allowed: tuple[str, ...]) -> Mutation:
        """Stage the blob in ``status.pendingBlobs``; once the import is complete (every
        required blob staged, no other upload of the image running) the staged set replaces
        ``status.blobs`` in one status write, so readers never see a half-replaced image."""
        def mutate(status: Obj, image: Obj) -> Obj:
            pending = {p: b for p, b in (status.get("pendingBlobs") or {}).items()
                       if p in allowed and p != part and isinstance(b, dict)}
            pending[part] = blob
            missing = [p for p in required_blobs(image, part) if p not in pending]
            busy = [p for (n, p) in self._uploading if n == name and p != part]
            if missing or busy:
                status["pendingBlobs"] = pending
                status["message"] = f"waiting for {', '.join(missing or busy)}"
                if status.get("phase") != PHASE_READY:
                    status.update(type=family(part), phase=PHASE_UPLOADING)
                return status
            out: Obj = {"type": family(part), "phase": PHASE_READY, "blobs": pending,
                        "size": sum(int(b.get("size") or 0) for b in pending.values())}
            disk = pending.get(DISK)
            if disk is not None:
                out["format"], out["virtualSize"] = disk.get("format"), disk.get("virtualSize")
            return out
        return mutate

    async def _receive(self, request: web.Request, length: int | None) -> tuple[Path, str, int]:
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
        tmp = Path(tmp_name)
        f = os.fdopen(fd, "wb")
        hasher = hashlib.sha256()
        size = 0
        try:
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in request.content.iter_chunked(1024 * 1024):
                size += len(chunk)
                if size > self.max_size:
                    raise self._too_large()
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    await asyncio.to_thread(write_chunks, f, hasher, pending)
                    pending, pending_size = [], 0
            await asyncio.to_thread(write_chunks, f, hasher, pending)
            await asyncio.to_thread(sync_close, f)
            if length is not None and size != length:
                raise BadRequest(f"incomplete upload: received {size} of {length} bytes")
            if size == 0:
                raise BadRequest("the body of the request was empty: send the blob")
        except BaseException:
            f.close()
            discard(tmp)
            raise
        return tmp, hasher.hexdigest(), size

    def _too_large(self) -> RequestEntityTooLarge:
        return RequestEntityTooLarge(f"Request entity too large: the image store takes blobs "
                                     f"of at most {self.max_size} bytes")

    # ---- status --------------------------------------------------------------------------------

    async def _update_status(self, name: str, mutate: Mutation) -> Obj:
        """Read-modify-write of ``status`` with retries on conflicts: ``mutate(status, image)``
        returns the new status."""
        for _attempt in range(_STATUS_RETRIES):
            image = await self.resources.get(self.kind, None, name)
            status = dict(image.get("status") or {})
            image["status"] = mutate(status, image)
            try:
                return await self.resources.update(self.kind, None, name, image, self._ctx,
                                                   subresource="status")
            except Conflict:
                continue
        raise Conflict(f'image "{name}" is changing too fast to update its status',
                       name=name, group=IMAGE_GROUP, kind=IMAGE_PLURAL)

    async def _mark_failed(self, name: str, part: str, error: Exception) -> None:
        message = error.message if isinstance(error, ApiError) else str(error) or repr(error)
        try:
            await self._update_status(name, _failed(f"uploading {part} failed: {message}"))
        except NotFound:
            log.info("image %s is gone; its failed %s upload is not recorded", name, part)
        except ApiError as e:
            log.warning("cannot record the failed %s upload of image %s: %s", part, name, e)


def _failed(message: str) -> Mutation:
    """Drop the staged blobs; an image still serving a complete import stays Ready."""
    def mutate(status: Obj, image: Obj) -> Obj:
        status.pop("pendingBlobs", None)
        complete = all(p in status_blobs(image) for p in required_blobs(image))
        if status.get("phase") == PHASE_READY and complete:
            status["message"] = f"the last import failed: {message}"
        else:
            status["phase"] = PHASE_FAILED
            status["message"] = message
        return status
    return mutate


def register_image_store(server: ApiServer, data_dir: Path) -> ImageStore:
    """Serve the Image blob subresources from ``data_dir/images``; the collector starts now if
    an event loop is running, else with the first request."""
    raw = os.environ.get(MAX_SIZE_ENV, "")
    try:
        max_size = int(raw) if raw else DEFAULT_MAX_SIZE
    except ValueError:
        raise ImageStoreConfigError(
            f"{MAX_SIZE_ENV} must be a number of bytes, got {raw!r}") from None
    store = ImageStore(server, data_dir / "images", max_size=max_size)
    for part in PARTS:
        server.extra_subresources[(IMAGE_GROUP, IMAGE_PLURAL, part)] = store.handle
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return store  # no running loop: the collector starts with the first request
    store.start()
    return store
