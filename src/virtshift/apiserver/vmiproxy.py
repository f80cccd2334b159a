"""VMI subresources served by the VMI's node agent (virt-api -> virt-handler): ``console``,
``vnc``, ``portforward/{port}[/{protocol}]`` (websockets, subprotocol ``plain.kubevirt.io``),
``pause``, ``unpause``, ``softreboot``, ``reset`` (PUT) and ``guestosinfo`` (GET).

The API server has authenticated the caller; it finds the VMI and its node, then calls the
agent's endpoint (``Node.status.addresses`` InternalIP and ``daemonEndpoints.kubeletEndpoint``)
over HTTPS (the agent's certificate is issued by the cluster CA, and checked) with the control
plane's proxy token, and splices the websocket through.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
from aiohttp import web

from virtshift.aio import until_first
from virtshift.api.kinds import Obj, Registry
from virtshift.apiserver.auth import UserInfo
from virtshift.apiserver.resources import Resources
from virtshift.client.rest import error_from_status
from virtshift.errors import (
    BadRequest,
    Conflict,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)

STREAMS = ("console", "vnc", "portforward")
ACTIONS = {"pause": "PUT", "unpause": "PUT", "softreboot": "PUT", "reset": "PUT",
           "guestosinfo": "GET"}
SUBPROTOCOL = "plain.kubevirt.io"


def is_vmi_subresource(name: str) -> bool:
    return name in STREAMS or name in ACTIONS


class VMIProxy:
    def __init__(self, resources: Resources, registry: Registry, token: str,
                 agent_tls: ssl.SSLContext) -> None:
        self.resources = resources
        self.registry = registry
        self.token = token
        self.agent_tls = agent_tls
        """Verifies node agents' certificates (issued by the cluster CA)."""
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=10),
                connector=aiohttp.TCPConnector(ssl=self.agent_tls))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _target(self, ns: str, name: str) -> tuple[Obj, str]:
        vmi_kind = self.registry.require("kubevirt.io", "v1", "VirtualMachineInstance")
        node_kind = self.registry.require("", "v1", "Node")
        try:
            vmi = await self.resources.get(vmi_kind, ns, name)
        except NotFound:
            raise NotFound(f'virtualmachineinstance.kubevirt.io "{name}" not found',
                           name=name, group="kubevirt.io",
                           kind="virtualmachineinstances") from None
        status = vmi.get("status") or {}
        if status.get("phase") != "Running":
            raise BadRequest(f"VMI {name} is not running" if status.get("phase") != "Scheduled"
                             else f"VMI {name} is not running yet")
        node_name = status.get("nodeName")
        try:
            node = await self.resources.get(node_kind, None, str(node_name))
        except NotFound:
            raise ServiceUnavailable(f"node {node_name} of VMI {name} is not registered"
                                     ) from None
        nstatus = node.get("status") or {}
        address = next((a.get("address") for a in nstatus.get("addresses") or []
                        if a.get("type") == "InternalIP"), None)
        port = ((nstatus.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
        if not address or not port:
            raise ServiceUnavailable(f"node {node_name} publishes no agent endpoint")
        host = f"[{address}]" if ":" in str(address) else str(address)
        return vmi, f"https://{host}:{port}/v1/namespaces/{ns}/virtualmachineinstances/{name}"

    async def handle(self, request: web.Request, user: UserInfo, ns: str, name: str,
                     sub: str, rest: list[str]) -> web.StreamResponse:
        del user  # authenticated by the caller; every authenticated user may use a VMI here
        if sub in ACTIONS:
            if rest:
                raise NotFound("the server could not find the requested resource")
            if request.method != ACTIONS[sub]:
                raise MethodNotAllowed(f"the server does not allow this method on the "
                                       f"requested resource: {request.method} "
                                       f"virtualmachineinstances/{sub}")
            _, base = await self._target(ns, name)
            return await self._call(request.method, f"{base}/{sub}")
        if sub == "portforward":
            if not 1 <= len(rest) <= 2:
                raise BadRequest("portforward needs a port: portforward/{port}[/{protocol}]")
        elif rest:
            raise NotFound("the server could not find the requested resource")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest(f"{sub} is a websocket subresource: send an Upgrade: websocket "
                             "request")
        _, base = await self._target(ns, name)
        url = "/".join([base, sub, *rest])
        try:
            upstream = await self.session.ws_connect(
                url, protocols=(SUBPROTOCOL,), max_msg_size=0,
                headers={"Authorization": f"Bearer {self.token}"})
        except aiohttp.WSServerHandshakeError as e:
            raise Conflict(f"{sub} of VMI {name}: the node agent refused: {e.message}"
                           ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise ServiceUnavailable(f"{sub} of VMI {name}: cannot reach its node agent: {e}"
                                     ) from None
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=0)
        await ws.prepare(request)
        await splice(ws, upstream)
        return ws

    async def _call(self, method: str, url: str) -> web.StreamResponse:
        try:
            async with self.session.request(
                    method, url, headers={"Authorization": f"Bearer {self.token}"}) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    try:
                        parsed = json.loads(body) if body else None
                    except ValueError:
                        parsed = {"message": body.decode(errors="replace")}
                    raise error_from_status(resp.status, parsed)
                return web.Response(status=resp.status, body=body,
                                    content_type=resp.content_type or "application/json")
        except (aiohttp.ClientError, OSError) as e:
            raise ServiceUnavailable(f"cannot reach the node agent: {e}") from None


async def splice(a: web.WebSocketResponse, b: aiohttp.ClientWebSocketResponse) -> None:
    """Forward frames both ways between two websockets until one closes."""

    async def pump(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            else:
                break

    try:
        await until_first(pump(a, b), pump(b, a))
    finally:
        await b.close()
        await a.close()
