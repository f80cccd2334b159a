"""The API server's namespace cache (virtshift.apiserver.nscache) on a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from virtshift.apiserver.nscache import NamespaceCache
from virtshift.store.sqlite import SqliteStore

PREFIX = "/registry/core/namespaces/"


async def _until(cond: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_forgets_a_namespace_once_it_changes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", compact_interval=0)
    await store.start()
    cache = NamespaceCache(store, PREFIX)
    try:
        rec = await store.create(PREFIX + "a", {"metadata": {"name": "a"}})
        assert not cache.is_active("a")  # not running: answers nothing
        cache.start()
        await _until(lambda: cache._watching, "the watch")
        cache.remember("a", rec.revision)
        assert cache.is_active("a") and not cache.is_active("b")
        changed = await store.update(PREFIX + "a", {"metadata": {
            "name": "a", "deletionTimestamp": "2026-12-01T00:00:00Z"}}, rec.revision)
        await _until(lambda: not cache.is_active("a"), "the change to be seen")
        cache.remember("a", rec.revision)  # a read from before the change: ignored
        assert not cache.is_active("a")
        cache.remember("a", changed.revision)
        assert cache.is_active("a")
        await store.delete(PREFIX + "a")
        await _until(lambda: not cache.is_active("a"), "the delete to be seen")
    finally:
        await cache.stop()
        await store.close()
    assert not cache.is_active("a")
