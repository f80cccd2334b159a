"""An async client for the Kubernetes-style REST API (any registered kind)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from virtshift.api.kinds import KindInfo, Obj
from virtshift.client.kubeconfig import ClusterConfig
from virtshift.errors import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    Expired,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
)

log = logging.getLogger(__name__)

_ERRORS: dict[tuple[int, str], type[ApiError]] = {
    (404, "NotFound"): NotFound,
    (409, "AlreadyExists"): AlreadyExists,
    (409, "Conflict"): Conflict,
    (410, "Expired"): Expired,
    (410, "Gone"): Expired,
    (422, "Invalid"): Invalid,
    (400, "BadRequest"): BadRequest,
    (401, "Unauthorized"): Unauthorized,
    (403, "Forbidden"): Forbidden,
}


def error_from_status(code: int, body: Any) -> ApiError:
    status = body if isinstance(body, dict) else {}
    reason = str(status.get("reason", ""))
    message = str(status.get("message") or f"HTTP {code}")
    cls = _ERRORS.get((code, reason))
    if cls is None:
        cls = next((c for (k, _), c in _ERRORS.items() if k == code), ApiError)
    err = cls(message)
    err.code = code
    return err


@dataclass(frozen=True)
class WatchEvent:
    type: str
    object: Obj


def resource_path(kind: KindInfo, namespace: str | None = None, name: str | None = None,
                  subresource: str = "") -> str:
    base = f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"
    if kind.namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{kind.plural}"
    if name:
        base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
    return base


CONNECTION_LIMIT = 512


class Client:
    """One HTTP session to the API server. Close it with :meth:`close`."""

    def __init__(self, config: ClusterConfig, *, user_agent: str = "virtshift") -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self.user_agent = user_agent

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Every reflector holds a watch connection for good (the controller process runs
            # dozens), so the pool must leave room for them plus the writes.
            self._session = aiohttp.ClientSession(
                base_url=self.config.server,
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(),
                                               limit=CONNECTION_LIMIT),
                headers={"Authorization": f"Bearer {self.config.token}",
                         "User-Agent": self.user_agent,
                         "Accept": "application/json"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, path, data=data, params=params,
                                        headers=headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError:
                payload = {"message": text}
            if resp.status >= 400:
                raise error_from_status(resp.status, payload)
            return payload

    async def get(self, kind: KindInfo, namespace: str | None, name: str) -> Obj:
        out: Obj = await self.request("GET", resource_path(kind, namespace, name))
        return out

    async def list(self, kind: KindInfo, namespace: str | None = None, *,
                   label_selector: str = "", field_selector: str = "") -> Obj:
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        out: Obj = await self.request("GET", resource_path(kind, namespace), params=params)
        return out

    async def create(self, kind: KindInfo, namespace: str | None, obj: Obj) -> Obj:
        out: Obj = await self.request("POST", resource_path(kind, namespace), body=obj)
        return out

    async def update(self, kind: KindInfo, namespace: str | None, obj: Obj,
                     subresource: str = "") -> Obj:
        name = obj["metadata"]["name"]
        out: Obj = await self.request("PUT", resource_path(kind, namespace, name, subresource),
                                      body=obj)
        return out

    async def patch(self, kind: KindInfo, namespace: str | None, name: str, patch: Any, *,
                    patch_type: str = "application/merge-patch+json",
                    subresource: str = "") -> Obj:
        out: Obj = await self.request("PATCH",
                                      resource_path(kind, namespace, name, subresource),
                                      body=patch, content_type=patch_type)
        return out

    async def delete(self, kind: KindInfo, namespace: str | None, name: str, *,
                     propagation: str | None = None, uid: str | None = None) -> Obj:
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        if uid:
            body["preconditions"] = {"uid": uid}
        out: Obj = await self.request("DELETE", resource_path(kind, namespace, name), body=body)
        return out

    async def watch(self, kind: KindInfo, namespace: str | None = None, *,
                    resource_version: str = "", timeout_seconds: int = 300,
                    field_selector: str = "", label_selector: str = ""
                    ) -> AsyncIterator[WatchEvent]:
        """Events until the server ends the stream. An ERROR event raises its ApiError."""
        params = {"watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if resource_version:
            params["resourceVersion"] = resource_version
        if field_selector:
            params["fieldSelector"] = field_selector
        if label_selector:
            params["labelSelector"] = label_selector
        tmo = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        async with self.session.get(resource_path(kind, namespace), params=params,
                                    timeout=tmo) as resp:
            if resp.status >= 400:
                text = await resp.text()
                raise error_from_status(resp.status, json.loads(text) if text else None)
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if ev.get("type") == "ERROR":
                        obj = ev.get("object") or {}
                        raise error_from_status(int(obj.get("code", 500)), obj)
                    yield WatchEvent(ev["type"], ev["object"])


async def wait_ready(client: Client, deadline: float) -> None:
    """Poll /readyz until the server answers or ``deadline`` (loop time) passes."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with client.session.get("/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError as e:
            if loop.time() > deadline:
                raise TimeoutError(f"API server not ready: {e}") from e
        if loop.time() > deadline:
            raise TimeoutError("API server not ready")
        await asyncio.sleep(0.05)
