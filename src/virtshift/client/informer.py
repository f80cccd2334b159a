"""List-then-watch reflectors feeding an in-memory cache, with re-list on expiry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from virtshift.api.kinds import KindInfo, Obj
from virtshift.client.rest import Client
from virtshift.errors import ApiError, Expired

log = logging.getLogger(__name__)

Handler = Callable[[str, KindInfo, Obj], None]


class Reflector:
    """Keeps one kind's objects (all namespaces) in step with the server; calls ``handler``
    with ("ADDED"|"MODIFIED"|"DELETED", kind, object) for every change, and ``on_synced`` once
    after the first full list."""

    def __init__(self, client: Client, kind: KindInfo, handler: Handler,
                 on_synced: Callable[[KindInfo], None], *, label_selector: str = "") -> None:
        self.client = client
        self.label_selector = label_selector
        self.kind = kind
        self.handler = handler
        self.on_synced = on_synced
        self.known: dict[tuple[str, str], Obj] = {}
        self._synced = False

    @staticmethod
    def _key(obj: Obj) -> tuple[str, str]:
        meta = obj.get("metadata", {})
        return meta.get("namespace", ""), meta.get("name", "")

    async def _relist(self) -> str:
        listing = await self.client.list(self.kind, label_selector=self.label_selector)
        fresh = {self._key(o): o for o in listing.get("items", [])}
        for key, old in list(self.known.items()):
            if key not in fresh:
                del self.known[key]
                self.handler("DELETED", self.kind, old)
        for key, obj in fresh.items():
            event = "MODIFIED" if key in self.known else "ADDED"
            self.known[key] = obj
            self.handler(event, self.kind, obj)
        if not self._synced:
            self._synced = True
            self.on_synced(self.kind)
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    async def run(self) -> None:
        backoff = 0.2
        rv = ""
        while True:
            try:
                if not rv:
                    rv = await self._relist()
                async for ev in self.client.watch(self.kind, resource_version=rv,
                                                  label_selector=self.label_selector):
                    if ev.type == "BOOKMARK":
                        rv = ev.object.get("metadata", {}).get("resourceVersion", rv)
                        continue
                    obj = ev.object
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    key = self._key(obj)
                    if ev.type == "DELETED":
                        self.known.pop(key, None)
                    else:
                        self.known[key] = obj
                    self.handler(ev.type, self.kind, obj)
                backoff = 0.2
            except Expired:
                rv = ""
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                log.warning("watch of %s failed: %s; retrying", self.kind.plural, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                rv = ""
