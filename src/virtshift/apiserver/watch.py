"""Watch streams: newline-delimited JSON events over a chunked HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from virtshift.api.kinds import KindInfo, Obj
from virtshift.api.selectors import FieldSelector, LabelSelector
from virtshift.api.tables import build_table
from virtshift.apiserver import meta as m
from virtshift.apiserver.http import dumps
from virtshift.apiserver.resources import Resources
from virtshift.errors import BadRequest, Compacted
from virtshift.store.base import Event

log = logging.getLogger(__name__)

WATCH_CONTENT_TYPE = "application/json;stream=watch"
BOOKMARK_EVERY = 10.0  # seconds of quiet between BOOKMARK events
LIVENESS_CHECK = 2.0
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_END = object()


class WatchStream:
    """One client's watch: initial state (when asked), then changes, bookmarks and timeout."""

    def __init__(
        self,
        request: web.Request,
        resources: Resources,
        kind: KindInfo,
        namespace: str | None,
        *,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
        table_version: str | None,
        include_object: str,
    ) -> None:
        self.request = request
        self.res = resources
        self.kind = kind
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.table_version = table_version
        self.include_object = include_object
        self.last_revision = 0

    def _selected(self, obj: Obj) -> bool:
        return self.res._selected(obj, self.labels, self.fields)

    def _render(self, obj: Obj) -> Obj:
        if not self.table_version:
            return obj
        rv = obj.get("metadata", {}).get("resourceVersion", "")
        table = build_table(self.kind, [obj], include_object=self.include_object,
                            list_meta={"resourceVersion": rv},
                            now=datetime.datetime.now(datetime.UTC),
                            table_version=self.table_version)
        return table

    def _api_object(self, value: dict[str, Any], revision: int) -> Obj:
        return m.api_object(self.kind, value, revision)

    def translate(self, ev: Event) -> tuple[str, Obj] | None:
        """A store event as the watch event this client sees, honouring selector transitions."""
        obj = self._api_object(ev.value, ev.revision)
        if ev.type == "DELETE":
            return ("DELETED", obj) if self._selected(obj) else None
        now_in = self._selected(obj)
        was_in = ev.prev_value is not None and self._selected(
            self._api_object(ev.prev_value, ev.revision))
        if now_in and was_in:
            return "MODIFIED", obj
        if now_in:
            return "ADDED", obj
        if was_in:
            return "DELETED", obj
        return None

    async def _pump(self, source: AsyncIterator[Event], queue: asyncio.Queue[object]) -> None:
        try:
            async for ev in source:
                await queue.put(ev)
        except Compacted as e:
            await queue.put(e)
        finally:
            await queue.put(_END)

    async def serve(self) -> web.StreamResponse:
        q = self.request.query
        rv_param = q.get("resourceVersion", "")
        send_initial = q.get("sendInitialEvents", "").lower() == "true"
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout_param = q.get("timeoutSeconds")
        try:
            timeout = float(timeout_param) if timeout_param else random.uniform(1800, 3600)
        except ValueError as e:
            raise BadRequest(f"invalid timeoutSeconds {timeout_param!r}") from e

        initial: list[Obj] = []
        if send_initial or rv_param in ("", "0"):
            initial, list_meta = await self.res.list_objects(self.kind, self.namespace,
                                                     labels=self.labels, fields=self.fields)
            start = int(list_meta["resourceVersion"])
        else:
            try:
                start = int(rv_param)
            except ValueError as e:
                raise BadRequest(f"invalid resourceVersion {rv_param!r}") from e

        resp = web.StreamResponse(status=200)
        resp.headers["Content-Type"] = WATCH_CONTENT_TYPE
        resp.headers["Cache-Control"] = "no-cache, private"
        resp.enable_chunked_encoding()
        await resp.prepare(self.request)

        queue: asyncio.Queue[object] = asyncio.Queue()
        source = self.res.store.watch(m.store_key(self.kind, self.namespace), start)
        pump = asyncio.create_task(self._pump(source, queue), name="watch-pump")
        self.last_revision = start
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for obj in initial:
                await self._send(resp, "ADDED", self._render(obj))
            if send_initial and bookmarks:
                await self._bookmark(resp, end_of_initial=True)
            last_sent = loop.time()
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wait = min(deadline - now, LIVENESS_CHECK)
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if self.request.transport is None or self.request.transport.is_closing():
                        break
                    if bookmarks and loop.time() - last_sent >= BOOKMARK_EVERY:
                        await self._bookmark(resp)
                        last_sent = loop.time()
                    continue
                if item is _END:
                    break
                if isinstance(item, Compacted):
                    err = self.res.compacted_to_expired(item)
                    await self._send(resp, "ERROR", err.status())
                    break
                assert isinstance(item, Event)
                self.last_revision = item.revision
                out = self.translate(item)
                if out is not None:
                    await self._send(resp, out[0], self._render(out[1]))
                    last_sent = loop.time()
        except (ConnectionResetError, ConnectionError):
            log.debug("watch client went away")
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        with contextlib.suppress(ConnectionResetError, ConnectionError):
            await resp.write_eof()
        return resp

    async def _send(self, resp: web.StreamResponse, type_: str, obj: Obj) -> None:
        await resp.write(dumps({"type": type_, "object": obj}) + b"\n")

    async def _bookmark(self, resp: web.StreamResponse, *, end_of_initial: bool = False) -> None:
        meta: Obj = {"resourceVersion": str(self.last_revision)}
        if end_of_initial:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        await self._send(resp, "BOOKMARK", {"kind": self.kind.kind,
                                            "apiVersion": self.kind.api_version,
                                            "metadata": meta})
