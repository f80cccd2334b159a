"""The node agent's upload server (CDI's ``cdi-upload-<claim>`` pod): the API server's upload
proxy streams an image here, and it becomes the claim's ``disk.img``.

``POST /v1/namespaces/{ns}/persistentvolumeclaims/{name}/upload`` (proxy token, as every agent
endpoint): the claim must be bound to a hostpath volume that this node populates (its own, or a
shared one chosen for it) and not be populated yet. The body (raw, qcow2, gzip or xz) goes
through :func:`virtshift.storage.importer.run` with source ``stdin``, which writes ``disk.img``
only once the image is complete and valid. The claim's annotations tell the story
(:func:`virtshift.agent.populate.patch_state`): ``Running`` with the progress while bytes
arrive, ``Succeeded`` and ``100.0%`` at the end; after a failed or cut-off upload the claim
stays ``Running`` and ready for another try, with the reason and message of the failure, and no
disk is left behind. One upload at a time per claim (409 for another).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from virtshift.agent.disks import DiskError, volume_roots
from virtshift.agent.populate import capacity_bytes, patch_state, percent, volume_dir
from virtshift.api.cdi import POD_RUNNING, POD_SUCCEEDED, pod_phase, populating_node
from virtshift.api.kinds import REGISTRY, Obj
from virtshift.client.rest import Client
from virtshift.errors import (
    ApiError,
    BadRequest,
    Conflict,
    InternalError,
    NotFound,
    ServiceUnavailable,
    VirtshiftError,
)

log = logging.getLogger(__name__)

PATH = "/v1/namespaces/{ns}/persistentvolumeclaims/{name}/upload"
CHUNK = 1024 * 1024
PROGRESS_INTERVAL = 1.0
"""Seconds between two progress annotations on the claim."""
REASON_INTERRUPTED = "TransferInterrupted"  # the importer's reason for a cut-off body
REASON_FAILED = "UploadFailed"


class UploadCutOff(VirtshiftError):
    """The body ended (or the connection dropped) before Content-Length bytes arrived."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Target:
    directory: Path
    capacity: int


def upload_target(pvc: Obj, pv: Obj, *, node: str, roots: tuple[Path, ...]) -> Target:
    """Where ``pvc``'s volume lives on this node (under one of ``roots``), and its capacity
    (pure but for path resolution); :class:`ApiError` when the claim cannot take an upload
    here."""
    name = str(_dict(pvc.get("metadata")).get("name"))
    if pod_phase(pvc) == POD_SUCCEEDED:
        raise BadRequest(f"PVC {name} already finished uploading")
    where = populating_node(pv)
    pv_name = str(_dict(pv.get("metadata")).get("name"))
    if where and where != node:
        raise ServiceUnavailable(f"volume {pv_name} of PVC {name} is on node {where}, not on "
                                 f"{node}")
    try:
        directory = volume_dir(pv, roots)
    except DiskError as e:
        raise BadRequest(f"PVC {name}: {e}") from None
    capacity = capacity_bytes(pv)
    if capacity <= 0:
        raise BadRequest(f"volume {pv_name} of PVC {name} has no capacity")
    return Target(directory, capacity)


class UploadServer:
    def __init__(self, client: Client, *, node: str, storage_root: Path | None) -> None:
        self.client = client
        self.node = node
        self.storage_root = storage_root
        self._busy: set[tuple[str, str]] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        key = (ns, name)
        try:
            if key in self._busy:
                raise Conflict(f"an upload to PVC {ns}/{name} is already in progress")
            self._busy.add(key)
            try:
                return await self._upload(request, ns, name)
            finally:
                self._busy.discard(key)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)

    async def _target(self, ns: str, name: str) -> Target:
        if self.storage_root is None:
            raise ServiceUnavailable("this node has no storage root")
        try:
            pvc = await self.client.get(REGISTRY.require("", "v1", "PersistentVolumeClaim"),
                                        ns, name)
        except NotFound:
            raise NotFound(f"PVC {ns}/{name} not found", name=name,
                           kind="persistentvolumeclaims") from None
        volume = str(_dict(pvc.get("spec")).get("volumeName") or "")
        if _dict(pvc.get("status")).get("phase") != "Bound" or not volume:
            raise ServiceUnavailable(f"PVC {name} is not bound yet")
        try:
            pv = await self.client.get(REGISTRY.require("", "v1", "PersistentVolume"), None,
                                       volume)
        except NotFound:
            raise ServiceUnavailable(f"volume {volume} of PVC {name} not found") from None
        roots = await volume_roots(self.client, pv, self.storage_root)
        return await asyncio.to_thread(upload_target, pvc, pv, node=self.node, roots=roots)

    async def _upload(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        from virtshift.storage.importer import ImportArgs, ImportFailed, run

        target = await self._target(ns, name)
        await asyncio.to_thread(target.directory.mkdir, parents=True, exist_ok=True)
        expected = request.content_length
        received = 0
        last = 0.0

        async def body() -> AsyncIterator[bytes]:
            nonlocal received
            try:
                async for chunk in request.content.iter_chunked(CHUNK):
                    received += len(chunk)
                    yield chunk
            except Exception as e:  # a dropped connection: aiohttp's payload errors, OSError
                raise UploadCutOff(f"the upload was cut off after {received} bytes: "
                                   f"{e or type(e).__name__}") from e
            if expected is not None and received < expected:
                raise UploadCutOff(f"the upload was cut off after {received} of {expected} "
                                   "bytes")

        async def progress(pct: float) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PROGRESS_INTERVAL:
                return
            last = now
            try:
                await patch_state(self.client, ns, name, phase=POD_RUNNING,
                                  progress=percent(min(pct, 99.99)))
            except ApiError as e:
                log.warning("progress of the upload to %s/%s: %s", ns, name, e)

        await patch_state(self.client, ns, name, phase=POD_RUNNING, progress=percent(0),
                          reason="", message="", ready=True)
        log.info("upload into %s/%s (%s bytes) started", ns, name,
                 expected if expected is not None else "unknown")
        args = ImportArgs(source="stdin", dest_dir=target.directory, capacity=target.capacity,
                          size=expected or 0)
        try:
            await run(args, stdin=body(), on_progress=progress)
        except (UploadCutOff, ImportFailed) as e:
            # The importer's own verdict wins (it may stop reading early, e.g. an image too
            # large); a short body is a cut-off only when it said the transfer was interrupted.
            cut = isinstance(e, UploadCutOff) or e.reason == REASON_INTERRUPTED
            if cut:
                reason = REASON_INTERRUPTED
                message = (f"the upload was cut off after {received} of {expected} bytes; "
                           "upload again" if expected is not None else str(e))
            else:
                reason = getattr(e, "reason", "") or REASON_FAILED
                message = str(e)
            log.warning("upload into %s/%s failed (%s): %s", ns, name, reason, message)
            await self._ready_again(ns, name, reason, message)
            raise BadRequest(f"upload into PVC {name} failed: {message}") from None
        except Exception as e:
            await self._ready_again(ns, name, REASON_FAILED, str(e))
            raise InternalError(f"upload into PVC {name} failed: {e}") from e
        await patch_state(self.client, ns, name, phase=POD_SUCCEEDED, progress="100.0%",
                          reason="Completed", message="Upload Successful", ready=False)
        log.info("upload into %s/%s done (%d bytes)", ns, name, received)
        return web.Response(status=200, text="")

    async def _ready_again(self, ns: str, name: str, reason: str, message: str) -> None:
        try:
            await patch_state(self.client, ns, name, phase=POD_RUNNING, progress=percent(0),
                              reason=reason, message=message, ready=True)
        except ApiError as e:
            log.warning("cannot report the failed upload into %s/%s: %s", ns, name, e)
