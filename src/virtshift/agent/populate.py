"""The node agent's volume populator: the importer, clone and upload pods of CDI, for the volumes
this node holds (the contract is :mod:`virtshift.api.cdi`).

The agent watches claims and volumes. A bound claim with ``virtshift.io/populate`` whose
PersistentVolume lies on this node and whose pod phase is not final gets one owned task:

* ``http``, ``registry``, ``blank``, ``clone`` and ``snapshot`` run
  :func:`virtshift.storage.importer.run` in the volume directory, reporting ``Running``, the
  progress (at most once a second) and then ``Succeeded``. A retryable failure (the server did not
  answer, a 5xx, a body cut off) counts a restart and tries again after 2, 4, 8 ... s, up to
  :data:`MAX_RESTARTS`; anything else, or the last retry, ends ``Failed`` with the importer's reason
  and message. Credentials (``secretRef``, ``secretExtraHeaders``) and CA bundles
  (``certConfigMap``) are read from the claim's namespace when the import starts.
* ``upload`` claims are marked ready (``cdi.kubevirt.io/storage.pod.ready``) once bound here; the
  upload endpoint (:mod:`virtshift.agent.upload`) does the transfer.

A claim that goes away (or loses its source) cancels its task; the importer then removes its
partial files. After an agent restart an unfinished population starts over.

Expansion: when the storage controller has grown a bound volume's capacity beyond the claim's
``status.capacity``, the agent grows ``disk.img`` (sparse) to the new size - through QEMU's
``block_resize`` when a running VM has it open (``online_resize``), so the guest sees the new
size at once - then writes the claim's ``status.capacity``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from virtshift.agent.loopdev import LoopDevices
from virtshift.aio import stop_tasks
from virtshift.api import cdi
from virtshift.api.admission import quantity
from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.client.informer import Reflector
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound, VirtshiftError

log = logging.getLogger(__name__)

MAX_RESTARTS = 4
PROGRESS_INTERVAL = 1.0

Key = tuple[str, str]
_UNSET: Any = object()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _annotations(obj: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(_dict(obj.get("metadata")).get("annotations"))


async def patch_state(client: Client, namespace: str, name: str, *, phase: str | None = None,
                      progress: str | None = None, reason: str | None = None,
                      message: str | None = None, ready: bool | None = None,
                      restarts: int | None = None) -> Obj:
    """Write the pod's part of the contract on a claim (a merge patch of its annotations);
    arguments left None are not changed; an empty ``reason``/``message`` removes them."""
    ann: dict[str, str | None] = {}
    if phase is not None:
        ann[cdi.ANN_POD_PHASE] = phase
    if progress is not None:
        ann[cdi.ANN_PROGRESS] = progress
    if reason is not None:
        ann[cdi.ANN_RUNNING_REASON] = reason or None
    if message is not None:
        ann[cdi.ANN_RUNNING_MESSAGE] = message or None
    if ready is not None:
        ann[cdi.ANN_POD_READY] = "true" if ready else "false"
    if restarts is not None:
        ann[cdi.ANN_POD_RESTARTS] = str(restarts)
    return await client.patch(REGISTRY.require("", "v1", "PersistentVolumeClaim"), namespace,
                              name, {"metadata": {"annotations": ann}})


def percent(value: float) -> str:
    return f"{max(0.0, min(100.0, value)):.2f}%"


def volume_dir(pv: Mapping[str, Any], roots: tuple[Path, ...]) -> Path:
    """The directory of a hostPath volume, which must lie under one of ``roots``."""
    from virtshift.agent.disks import DiskError, confined

    name = str(_dict(pv.get("metadata")).get("name"))
    path = str(_dict(_dict(pv.get("spec")).get("hostPath")).get("path") or "")
    if not path:
        raise DiskError(f"persistentvolume {name} is not a hostPath volume")
    return confined(path, roots)


def capacity_bytes(pv: Mapping[str, Any]) -> int:
    value = _dict(_dict(pv.get("spec")).get("capacity")).get("storage")
    try:
        size = quantity.parse_value(value).value()
    except (ValueError, TypeError):
        return 0
    return size - size % 512


def wants_work(pvc: Mapping[str, Any], pv: Mapping[str, Any] | None, node: str) -> bool:
    """Whether this node should populate ``pvc`` now (pure)."""
    source = cdi.populate_source(pvc)
    if source is None or pv is None or _dict(pvc.get("metadata")).get("deletionTimestamp"):
        return False
    if _dict(pvc.get("status")).get("phase") != "Bound" or cdi.populating_node(pv) != node:
        return False
    phase = cdi.pod_phase(pvc)
    if phase in (cdi.POD_SUCCEEDED, cdi.POD_FAILED):
        return False
    if source.type == "upload":
        return _annotations(pvc).get(cdi.ANN_POD_READY) != "true"
    return True


def wants_expansion(pvc: Mapping[str, Any], pv: Mapping[str, Any], node: str) -> bool:
    """A bound, populated claim whose volume grew beyond its ``status.capacity`` (pure)."""
    if _dict(pvc.get("status")).get("phase") != "Bound" or cdi.populating_node(pv) != node:
        return False
    if not cdi.populated(pvc):
        return False
    has = _dict(_dict(pvc.get("status")).get("capacity")).get("storage")
    try:
        return capacity_bytes(pv) > quantity.parse_value(has).value()
    except (ValueError, TypeError):
        return False


class Populator:
    """Populates the claims bound to volumes of this node."""

    def __init__(self, client: Client, *, node_name: str, storage_root: Path,
                 work_dir: Path,
                 online_resize: Callable[[Path, int], Awaitable[bool]] | None = None,
                 proxy_token: str = "") -> None:
        self.client = client
        self.proxy_token = proxy_token
        self.online_resize = online_resize
        self.resizing: dict[Key, asyncio.Task[None]] = {}
        self.node = node_name
        self.storage_root = storage_root
        self.work_dir = work_dir
        self.pvc_kind: KindInfo = REGISTRY.require("", "v1", "PersistentVolumeClaim")
        self.pv_kind: KindInfo = REGISTRY.require("", "v1", "PersistentVolume")
        self.pvcs: dict[Key, Obj] = {}
        self.pvs: dict[str, Obj] = {}
        self.tasks: dict[Key, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        meta = _dict(obj.get("metadata"))
        if kind.plural == "persistentvolumes":
            if event == "DELETED":
                self.pvs.pop(str(meta.get("name")), None)
            else:
                self.pvs[str(meta.get("name"))] = obj
        else:
            key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
            if event == "DELETED":
                self.pvcs.pop(key, None)
            else:
                self.pvcs[key] = obj
        self._wake.set()

    async def run(self) -> None:
        synced: set[str] = set()
        reflectors = [Reflector(self.client, k, self._on_event, lambda k: synced.add(k.plural))
                      for k in (self.pv_kind, self.pvc_kind)]
        watchers = [asyncio.create_task(r.run(), name=f"populator-{r.kind.plural}")
                    for r in reflectors]
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if len(synced) == 2:
                    self._sync()
                for t in watchers:
                    if t.done():
                        t.result()
        finally:
            await stop_tasks([*watchers, *self.tasks.values(), *self.resizing.values()])

    def _claim_pv(self, pvc: Mapping[str, Any]) -> Obj | None:
        volume = str(_dict(pvc.get("spec")).get("volumeName") or "")
        return self.pvs.get(volume) if volume else None

    def _sync(self) -> None:
        for key, task in list(self.tasks.items()):
            pvc = self.pvcs.get(key)
            if task.done():
                del self.tasks[key]
            elif pvc is None or cdi.populate_source(pvc) is None or _dict(
                    pvc.get("metadata")).get("deletionTimestamp"):
                log.info("claim %s/%s is gone: stopping its population", *key)
                task.cancel()
        for key, pvc in self.pvcs.items():
            if key in self.tasks:
                continue
            pv = self._claim_pv(pvc)
            if pv is not None and wants_work(pvc, pv, self.node):
                self.tasks[key] = asyncio.create_task(self._populate(key),
                                                      name=f"populate-{key[0]}-{key[1]}")
            elif (pv is not None and key not in self.resizing
                  and wants_expansion(pvc, pv, self.node)):
                self.resizing[key] = asyncio.create_task(self._expand(key, pv),
                                                         name=f"expand-{key[0]}-{key[1]}")
        for key, task in list(self.resizing.items()):
            if task.done():
                del self.resizing[key]

    async def _expand(self, key: Key, pv: Obj) -> None:
        ns, name = key
        size = capacity_bytes(pv)
        try:
            image = volume_dir(pv, await self._roots(pv)) / "disk.img"
            how = "offline"
            if await asyncio.to_thread(image.exists):
                current = (await asyncio.to_thread(image.stat)).st_size
                block = _dict(pv.get("spec")).get("volumeMode") == "Block"
                if current < size:
                    if block:  # the loop device shows the new size once the file has it
                        await asyncio.to_thread(os.truncate, image, size)
                        await asyncio.to_thread(LoopDevices.set_capacity, image)
                    if self.online_resize is not None and await self.online_resize(image, size):
                        how = "online"
                    elif not block:
                        await asyncio.to_thread(os.truncate, image, size)
            capacity = _dict(_dict(pv.get("spec")).get("capacity")).get("storage")
            await self.client.patch(self.pvc_kind, ns, name,
                                    {"status": {"capacity": {"storage": capacity}}},
                                    subresource="status")
            log.info("expanded %s/%s to %s (%s)", ns, name, capacity, how)
        except (ApiError, OSError, VirtshiftError) as e:
            log.warning("expansion of %s/%s: %s", ns, name, e)
            await asyncio.sleep(2)
            self._wake.set()

    async def _populate(self, key: Key) -> None:
        ns, name = key
        try:
            pvc = self.pvcs[key]
            pv = self._claim_pv(pvc)
            source = cdi.populate_source(pvc)
            if pv is None or source is None:
                return
            if source.type == "upload":
                await patch_state(self.client, ns, name, phase=cdi.POD_RUNNING, ready=True)
                log.info("claim %s/%s is ready for upload", ns, name)
                return
            restarts = int(str(_annotations(pvc).get(cdi.ANN_POD_RESTARTS) or "0") or 0)
            await self._attempts(key, pv, source, restarts)
        except asyncio.CancelledError:
            raise
        except (ApiError, OSError, VirtshiftError) as e:
            log.warning("population of %s/%s: %s", ns, name, e)
            await asyncio.sleep(2)
            self._wake.set()  # try again on the next pass

    async def _attempts(self, key: Key, pv: Obj, source: cdi.PopulateSource,
                        restarts: int) -> None:
        from virtshift.storage.importer import ImportFailed

        ns, name = key
        backoff = 2.0
        while True:
            await patch_state(self.client, ns, name, phase=cdi.POD_RUNNING, reason="",
                              message="", restarts=restarts)
            try:
                result = await self._import_once(key, pv, source)
            except ImportFailed as e:
                restarts += 1
                final = not e.retryable or restarts > MAX_RESTARTS
                log.warning("population of %s/%s failed (%s%s): %s", ns, name, e.reason,
                            "" if final else f", retry in {backoff:.0f} s", e)
                await patch_state(self.client, ns, name,
                                  phase=cdi.POD_FAILED if final else cdi.POD_RUNNING,
                                  reason=e.reason, message=str(e), restarts=restarts)
                if final:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            await patch_state(self.client, ns, name, phase=cdi.POD_SUCCEEDED,
                              progress=percent(100), reason="Completed",
                              message="Import Complete", restarts=restarts)
            log.info("populated %s/%s from %s (%s%s, %d bytes in %.2f s)", ns, name,
                     source.type, result.format,
                     f"+{result.compression}" if result.compression else "",
                     result.bytes_read, result.seconds)
            return

    async def _import_once(self, key: Key, pv: Obj, source: cdi.PopulateSource) -> Any:
        from virtshift.storage.importer import ImportArgs, ImportFailed, run

        ns, name = key
        dest = volume_dir(pv, await self._roots(pv))
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        capacity = capacity_bytes(pv)
        last = [0.0]

        async def progress(value: float) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_INTERVAL:
                return
            last[0] = now
            with contextlib.suppress(ApiError):
                await patch_state(self.client, ns, name, progress=percent(value))

        with tempfile.TemporaryDirectory(dir=self._work()) as tmp:
            if source.type in ("http", "registry"):
                args = await self._remote_args(ns, source, dest, capacity, Path(tmp))
            elif source.type == "blank":
                args = ImportArgs(source="blank", dest_dir=dest, capacity=capacity)
            elif source.type == "clone":
                origin = await self._clone_source(source)
                if isinstance(origin, Path):
                    args = ImportArgs(source="file", dest_dir=dest, capacity=capacity,
                                      path=str(origin))
                else:  # host-assisted: stream it from the node that holds it
                    bundle = Path(tmp) / "cluster-ca.pem"
                    await asyncio.to_thread(bundle.write_bytes, self.client.config.ca_pem)
                    args = ImportArgs(source="http", dest_dir=dest, capacity=capacity,
                                      url=origin, ca_file=str(bundle), headers=(
                                          f"Authorization: Bearer {self.proxy_token}",))
            elif source.type == "snapshot":
                from virtshift.agent.disks import DiskError, confined

                try:
                    path = confined(source.path, (self.storage_root,))
                except DiskError as e:
                    raise ImportFailed(str(e), reason="SnapshotNotFound",
                                       retryable=False) from e
                args = ImportArgs(source="file", dest_dir=dest, capacity=capacity,
                                  path=str(path))
            else:
                raise ImportFailed(f"unknown source type {source.type}", reason="Error",
                                   retryable=False)
            return await run(args, on_progress=progress)

    async def _roots(self, pv: Obj) -> tuple[Path, ...]:
        from virtshift.agent.disks import volume_roots

        return await volume_roots(self.client, pv, self.storage_root)

    def _work(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    async def _clone_source(self, source: cdi.PopulateSource) -> Path | str:
        """The source claim's disk: its path when this node reaches it, else the URL of its
        node's volume export."""
        from virtshift.agent.disks import DiskError
        from virtshift.api.cdi import pv_node
        from virtshift.storage.importer import ImportFailed

        ns, name = source.source_namespace, source.source_name
        try:
            pvc = await self.client.get(self.pvc_kind, ns, name)
            volume = str(_dict(pvc.get("spec")).get("volumeName") or "")
            pv = await self.client.get(self.pv_kind, None, volume) if volume else None
        except NotFound:
            pv = None
        if pv is None:
            raise ImportFailed(f'clone source persistentvolumeclaim "{ns}/{name}" is not bound '
                               "to a volume", reason="CloneSourceNotFound", retryable=True)
        if pv_node(pv) and pv_node(pv) != self.node:
            return await self._export_url(pv, f"{ns}/{name}")
        try:
            image = volume_dir(pv, await self._roots(pv)) / "disk.img"
        except DiskError as e:
            raise ImportFailed(str(e), reason="CloneSourceNotFound", retryable=False) from e
        if not await asyncio.to_thread(image.exists):
            raise ImportFailed(f'clone source "{ns}/{name}" has no disk yet',
                               reason="CloneSourceNotFound", retryable=True)
        return image

    async def _export_url(self, pv: Obj, what: str) -> str:
        from virtshift.api.cdi import pv_node
        from virtshift.storage.importer import ImportFailed

        node_name = pv_node(pv)
        try:
            node = await self.client.get(REGISTRY.require("", "v1", "Node"), None, node_name)
        except NotFound as e:
            raise ImportFailed(f'clone source "{what}" is on node {node_name}, which is gone',
                               reason="CloneSourceNotFound", retryable=True) from e
        url = agent_url(node)
        if not url or not self.proxy_token:
            raise ImportFailed(f'clone source "{what}" is on node {node_name}, which publishes '
                               "no agent endpoint", reason="CloneSourceNotFound", retryable=True)
        return f"{url}/v1/persistentvolumes/{_dict(pv.get('metadata')).get('name')}/disk.img"

    async def _insecure_registries(self) -> set[str]:
        """CDIConfig ``config``'s ``spec.insecureRegistries``: registries reached over plain
        HTTP or without verifying their certificate."""
        try:
            config = await self.client.get(
                REGISTRY.require("cdi.kubevirt.io", "v1beta1", "CDIConfig"), None, "config")
        except NotFound:
            return set()
        return {str(r) for r in _dict(config.get("spec")).get("insecureRegistries") or []}

    async def _remote_args(self, ns: str, source: cdi.PopulateSource, dest: Path,
                           capacity: int, tmp: Path) -> Any:
        from virtshift.storage.importer import ImportArgs, ImportFailed

        username = password = ""
        headers = list(source.extra_headers)
        ca_file = ""
        secret_kind = REGISTRY.require("", "v1", "Secret")
        try:
            if source.secret_ref:
                data = _secret_data(await self.client.get(secret_kind, ns, source.secret_ref))
                username = data.get("accessKeyId", "")
                password = data.get("secretKey", "")
            for ref in source.secret_extra_headers:
                data = _secret_data(await self.client.get(secret_kind, ns, ref))
                headers.extend(v for v in data.values() if ":" in v)
            if source.cert_config_map:
                cm = await self.client.get(REGISTRY.require("", "v1", "ConfigMap"), ns,
                                           source.cert_config_map)
                pem = "\n".join(str(v) for v in _dict(cm.get("data")).values())
                bundle = tmp / "ca.pem"
                await asyncio.to_thread(bundle.write_text, pem)
                ca_file = str(bundle)
        except NotFound as e:
            raise ImportFailed(f"{e}", reason="Error", retryable=True) from e
        insecure = source.insecure_skip_verify
        if source.type == "registry":
            insecure = insecure or registry_host(source.url) in await self._insecure_registries()
        return ImportArgs(source="registry" if source.type == "registry" else "http",
                          dest_dir=dest, capacity=capacity, url=source.url, ca_file=ca_file,
                          insecure=insecure, username=username,
                          password=password, headers=tuple(headers), checksum=source.checksum)


def agent_url(node: Mapping[str, Any]) -> str:
    """``https://address:port`` of a node's agent (InternalIP and the kubelet endpoint port),
    "" when it publishes none."""
    status = _dict(node.get("status"))
    address = next((str(_dict(a).get("address")) for a in status.get("addresses") or []
                    if _dict(a).get("type") == "InternalIP"), "")
    port = _dict(_dict(status.get("daemonEndpoints")).get("kubeletEndpoint")).get("Port")
    if not address or not port:
        return ""
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}"


def registry_host(url: str) -> str:
    """``host[:port]`` of a ``docker://host[:port]/repo:tag`` URL."""
    return url.removeprefix("docker://").split("/", 1)[0]


class VolumeExport:
    """``GET /v1/persistentvolumes/{name}/disk.img`` on the agent: a volume of this node as a
    raw stream, for a host-assisted clone on another node (behind the agent's token check)."""

    def __init__(self, client: Client, *, node: str, storage_root: Path | None) -> None:
        self.client = client
        self.node = node
        self.storage_root = storage_root

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/persistentvolumes/{name}/disk.img", self.serve)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        from virtshift.agent.disks import DiskError, volume_roots

        name = request.match_info["name"]
        try:
            pv = await self.client.get(REGISTRY.require("", "v1", "PersistentVolume"), None,
                                       name)
        except NotFound:
            raise web.HTTPNotFound(text=f'persistentvolume "{name}" not found') from None
        if cdi.populating_node(pv) != self.node:
            raise web.HTTPNotFound(text=f"persistentvolume {name} is not on {self.node}")
        try:
            image = volume_dir(pv, await volume_roots(self.client, pv, self.storage_root))
        except DiskError as e:
            raise web.HTTPForbidden(text=str(e)) from None
        image = image / "disk.img"
        if not await asyncio.to_thread(image.is_file):
            raise web.HTTPNotFound(text=f"persistentvolume {name} has no disk yet")
        return web.FileResponse(image, headers={"Content-Type": "application/octet-stream"})


def _secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    out = {str(k): base64.b64decode(str(v)).decode(errors="replace")
           for k, v in _dict(secret.get("data")).items()}
    out.update({str(k): str(v) for k, v in _dict(secret.get("stringData")).items()})
    return out
