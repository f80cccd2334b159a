"""The node agent's HTTP endpoints, called by the API server on behalf of an authorized user
(virt-handler's console server and REST API). Every request carries the control plane's proxy
token; users never reach the agent directly.

``/v1/namespaces/{ns}/virtualmachineinstances/{name}/...``:

- ``console``, ``vnc``, ``portforward/{port}``: websockets (binary frames) spliced to the VM's
  serial socket, VNC socket, or a guest TCP port;
- ``pause``, ``unpause``, ``softreboot``, ``reset`` (PUT) and ``guestosinfo`` (GET).

``/v1/namespaces/{ns}/persistentvolumeclaims/{name}/upload`` (POST): an image streamed by the
upload proxy into a claim's volume (:mod:`virtshift.agent.upload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from virtshift.agent.populate import VolumeExport
from virtshift.agent.upload import UploadServer
from virtshift.agent.vmis import Domain, VMISync
from virtshift.aio import until_first
from virtshift.errors import ApiError, BadRequest, Conflict, Unauthorized
from virtshift.launcher.common import LauncherError
from virtshift.launcher.qmp import QmpError

log = logging.getLogger(__name__)

PREFIX = "/v1/namespaces/{ns}/virtualmachineinstances/{name}"
CHUNK = 64 * 1024
RECOVERY_WAIT = 30.0  # seconds a request waits for a restarted agent to find its VMs again


async def splice_ws(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy websocket binary/text frames to ``writer`` and ``reader``'s bytes to the websocket
    until either side closes."""

    async def up() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                writer.write(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                writer.write(msg.data.encode())
            else:
                break
            await writer.drain()

    async def down() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            await ws.send_bytes(data)

    try:
        await until_first(up(), down())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        await ws.close()


class AgentEndpoints:
    def __init__(self, sync: VMISync, token: str) -> None:
        self.sync = sync
        self.token = token

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._auth)
        app.router.add_get(PREFIX + "/console", self._wrap(self.console))
        app.router.add_get(PREFIX + "/vnc", self._wrap(self.vnc))
        app.router.add_get(PREFIX + "/portforward/{port}", self._wrap(self.portforward))
        app.router.add_get(PREFIX + "/portforward/{port}/{protocol}",
                           self._wrap(self.portforward))
        app.router.add_put(PREFIX + "/pause", self._wrap(self.pause))
        app.router.add_put(PREFIX + "/unpause", self._wrap(self.unpause))
        app.router.add_put(PREFIX + "/softreboot", self._wrap(self.softreboot))
        app.router.add_put(PREFIX + "/reset", self._wrap(self.reset))
        app.router.add_get(PREFIX + "/guestosinfo", self._wrap(self.guestosinfo))
        app.router.add_get("/healthz", self._healthz)
        UploadServer(self.sync.client, node=self.sync.node,
                     storage_root=self.sync.preparer.storage_root).routes(app)
        VolumeExport(self.sync.client, node=self.sync.node,
                     storage_root=self.sync.preparer.storage_root).routes(app)

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not self.token or not hmac.compare_digest(given, self.token):
                return _error(Unauthorized("Unauthorized"))
        return await handler(request)

    @staticmethod
    def _wrap(fn: Callable[[web.Request, Domain], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            self_: AgentEndpoints = request.app["endpoints"]
            try:
                # after a restart, VMs are "not here" until their QEMUs are attached again
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self_.sync.recovered.wait(), RECOVERY_WAIT)
                dom = self_.sync.domain_of(request.match_info["ns"], request.match_info["name"])
                return await fn(request, dom)
            except ApiError as e:
                return _error(e)
            except (LauncherError, QmpError) as e:
                return _error(Conflict(str(e)))
        return handler

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    async def _splice(request: web.Request,
                      connect: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                      what: str) -> web.StreamResponse:
        """Connect to ``what`` first (so a failure is a plain HTTP error), then upgrade to the
        websocket and splice the two."""
        try:
            reader, writer = await connect
        except OSError as e:
            raise Conflict(f"cannot connect to {what}: {e}") from e
        ws = web.WebSocketResponse(protocols=("plain.kubevirt.io",), max_msg_size=0)
        await ws.prepare(request)
        await splice_ws(ws, reader, writer)
        return ws

    async def _splice_unix(self, request: web.Request, path: str) -> web.StreamResponse:
        return await self._splice(request, asyncio.open_unix_connection(path), path)

    async def console(self, request: web.Request, dom: Domain) -> web.StreamResponse:
        return await self._splice_unix(request, str(dom.run.serial_socket))

    async def vnc(self, request: web.Request, dom: Domain) -> web.StreamResponse:
        return await self._splice_unix(request, str(dom.run.vnc_socket))

    async def portforward(self, request: web.Request, dom: Domain) -> web.StreamResponse:
        try:
            port = int(request.match_info["port"])
        except ValueError:
            raise BadRequest(f"invalid port {request.match_info['port']!r}") from None
        protocol = request.match_info.get("protocol", "tcp").lower()
        if protocol != "tcp" or not 0 < port < 65536:
            raise BadRequest(f"cannot forward {protocol} port {port}: only TCP ports 1-65535")
        host_port = await self.sync.forward(dom, port)
        return await self._splice(
            request, asyncio.open_connection(self.sync.address, host_port), f"guest port {port}")

    @staticmethod
    async def _paused(dom: Domain) -> bool:
        assert dom.sup is not None
        return await dom.sup.status() in ("paused", "prelaunch", "suspended")

    async def pause(self, _request: web.Request, dom: Domain) -> web.StreamResponse:
        if await self._paused(dom):
            raise Conflict("VMI is already paused")
        await self.sync.set_paused(dom, True)
        return web.Response(status=200)

    async def unpause(self, _request: web.Request, dom: Domain) -> web.StreamResponse:
        if not await self._paused(dom):
            raise Conflict("VMI is not paused")
        await self.sync.set_paused(dom, False)
        return web.Response(status=200)

    async def softreboot(self, _request: web.Request, dom: Domain) -> web.StreamResponse:
        assert dom.sup is not None
        if await self._paused(dom):
            raise Conflict("VMI is paused")
        await dom.sup.soft_reboot()
        return web.Response(status=200)

    async def reset(self, _request: web.Request, dom: Domain) -> web.StreamResponse:
        assert dom.sup is not None
        await dom.sup.reset()
        return web.Response(status=200)

    async def guestosinfo(self, _request: web.Request, dom: Domain) -> web.StreamResponse:
        assert dom.sup is not None
        info = await dom.sup.guest_agent_ping(timeout_s=2.0)
        if info is None:
            raise Conflict("VMI does not have guest agent connected")
        os_info = await dom.sup.guest_osinfo() or {}
        ifaces = await dom.sup.guest_interfaces() or []
        body = {"guestAgentVersion": info.version, "supportedCommands": [
            {"name": c, "enabled": True} for c in info.commands],
            "os": os_info, "hostname": os_info.get("hostname", ""),
            "interfaces": [{"interfaceName": i.name, "mac": i.mac,
                            "ipAddresses": list(i.ip_addresses)} for i in ifaces]}
        return web.json_response(body)


def _error(e: ApiError) -> web.Response:
    return web.json_response(e.status(), status=e.code)
