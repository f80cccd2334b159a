"""Which namespaces may take new objects, kept by a watch on the store.

Every create in a namespace checks that the namespace exists and is not terminating (Kubernetes'
NamespaceLifecycle admission, which reads an informer's cache). Reading the namespace from the
store on every create costs a database read each time; this cache answers from memory once a
namespace was seen active, and forgets it as soon as the watch shows any change to it (an update
that sets ``deletionTimestamp``, a delete). Like an informer, it may lag a change made by another
API server process by the time that process takes to wake this one (a millisecond or so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from virtshift.store.base import Store

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


class NamespaceCache:
    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self._active: set[str] = set()
        self._changed: dict[str, int] = {}  # name -> revision of its last change the watch saw
        self._watching = False
        self._task: asyncio.Task[None] | None = None

    def is_active(self, name: str) -> bool:
        """True when ``name`` is known to exist and not to be terminating."""
        return self._watching and name in self._active

    def remember(self, name: str, revision: int) -> None:
        """``name`` was read active at ``revision`` (ignored if the watch already saw a later
        change, or is not running)."""
        if self._watching and self._changed.get(name, 0) <= revision:
            self._active.add(name)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="namespace-cache")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._forget()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _forget(self) -> None:
        self._watching = False
        self._active.clear()
        self._changed.clear()

    async def _run(self) -> None:
        while True:
            # Every change after this revision reaches the loop below (replayed from the
            # store's history if the watch subscribes later), so reads from now on may fill.
            events = self.store.watch(self.prefix, self.store.revision)
            self._watching = True
            try:
                async for ev in events:
                    name = ev.key[len(self.prefix):]
                    self._changed[name] = ev.revision
                    self._active.discard(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("namespace cache watch failed; reading namespaces directly")
            finally:
                self._forget()
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(RETRY_SECONDS)
