"""Several stores (processes) on one SQLite file: ``SqliteStore(shared=True)``.

The API server's workers each open the store in shared mode. Revisions must stay one global
sequence, every store's watchers must see every store's writes in revision order, and compare-
and-swap must hold across stores.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtshift.errors import KeyExists, RevisionMismatch
from virtshift.store.base import Event
from virtshift.store.sqlite import SqliteStore
from virtshift.store.sqliteshare import notify_dir

DEADLINE = 30.0


async def collect(it: AsyncIterator[Event], count: int) -> list[Event]:
    events: list[Event] = []

    async def run() -> None:
        async for ev in it:
            events.append(ev)
            if len(events) == count:
                return

    await asyncio.wait_for(run(), DEADLINE)
    return events


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    owner = SqliteStore(tmp_path / "store.db", compact_interval=0, shared=True)
    await owner.start()
    worker = SqliteStore(tmp_path / "store.db", compact_interval=0, shared=True, lock=False)
    await worker.start()
    yield owner, worker
    await worker.close()
    await owner.close()


async def test_writes_interleave_into_one_revision_sequence(
        pair: tuple[SqliteStore, SqliteStore]) -> None:
    a, b = pair
    watch_a = a.watch("/k/", 0)
    watch_b = b.watch("/k/", 0)
    got_a = asyncio.create_task(collect(watch_a, 40))
    got_b = asyncio.create_task(collect(watch_b, 40))
    await asyncio.sleep(0)
    writes = [(a if i % 2 else b).create(f"/k/{i:03d}", {"i": i}) for i in range(40)]
    records = await asyncio.gather(*writes)
    revisions = sorted(r.revision for r in records)
    assert revisions == list(range(revisions[0], revisions[0] + 40))  # no gap, no duplicate
    for events in (await got_a, await got_b):
        assert [e.revision for e in events] == revisions
        assert {e.key for e in events} == {f"/k/{i:03d}" for i in range(40)}
    # Each store moved its revision on when it published the last event to its watchers.
    assert a.revision == b.revision == revisions[-1]


async def test_conditional_writes_see_the_other_store(
        pair: tuple[SqliteStore, SqliteStore]) -> None:
    a, b = pair
    rec = await a.create("/k/x", {"v": 1})
    with pytest.raises(KeyExists):
        await b.create("/k/x", {"v": 2})
    updated = await b.update("/k/x", {"v": 2}, rec.revision)
    with pytest.raises(RevisionMismatch):
        await a.update("/k/x", {"v": 3}, rec.revision)
    got = await a.get("/k/x")
    assert got is not None and got.value == {"v": 2} and got.revision == updated.revision
    listed = await a.list("/k/")
    assert listed.revision >= updated.revision


async def test_other_process_writes_reach_watchers(tmp_path: Path) -> None:
    """A second OS process writes; this process's watcher sees each write, in order."""
    path = tmp_path / "store.db"
    owner = SqliteStore(path, compact_interval=0, shared=True)
    await owner.start()
    try:
        watch = owner.watch("/p/", owner.revision)
        got = asyncio.create_task(collect(watch, 60))
        await asyncio.sleep(0)
        script = textwrap.dedent(f"""
            import asyncio
            from virtshift.store.sqlite import SqliteStore
            async def main():
                s = SqliteStore({str(path)!r}, compact_interval=0, shared=True, lock=False)
                await s.start()
                await asyncio.gather(*(s.create(f"/p/child-{{i:03d}}", {{"i": i}})
                                       for i in range(30)))
                await s.close()
            asyncio.run(main())
        """)
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
        mine = [await owner.create(f"/p/own-{i:03d}", {"i": i}) for i in range(30)]
        assert await asyncio.wait_for(child.wait(), DEADLINE) == 0
        events = await got
        revisions = [e.revision for e in events]
        assert revisions == sorted(revisions) and len(set(revisions)) == 60
        keys = {e.key for e in events}
        assert {f"/p/child-{i:03d}" for i in range(30)} <= keys
        assert {r.key for r in mine} <= keys
    finally:
        await owner.close()


async def test_wake_ups_deliver_without_polling(tmp_path: Path) -> None:
    """With the poll off, another store's commit reaches this store's watchers through its
    wake-up alone."""
    a = SqliteStore(tmp_path / "s.db", compact_interval=0, shared=True, poll_interval=3600)
    b = SqliteStore(tmp_path / "s.db", compact_interval=0, shared=True, lock=False,
                    poll_interval=3600)
    await a.start()
    await b.start()
    try:
        got = asyncio.create_task(collect(a.watch("/w/", a.revision), 5))
        await asyncio.sleep(0)
        for i in range(5):
            await b.create(f"/w/{i}", {"i": i})
        assert [e.key for e in await got] == [f"/w/{i}" for i in range(5)]
    finally:
        await b.close()
        await a.close()
    assert not notify_dir(tmp_path / "s.db").exists()  # the last store out removed it all


async def test_unshared_store_still_refuses_a_second_opener(tmp_path: Path) -> None:
    owner = SqliteStore(tmp_path / "store.db", compact_interval=0, shared=True)
    await owner.start()
    try:
        other = SqliteStore(tmp_path / "store.db", compact_interval=0)
        with pytest.raises(Exception, match="in use by another store"):
            await other.start()
    finally:
        await owner.close()


async def test_a_failed_write_does_not_skip_the_other_stores_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that writes nothing still reads the shared revision; the store must not take
    it as published, or its watchers would never get the other store's events."""
    # a never polls and b's wake-ups are lost: only a's own batches make it read what b wrote
    a = SqliteStore(tmp_path / "s.db", compact_interval=0, shared=True, poll_interval=3600)
    b = SqliteStore(tmp_path / "s.db", compact_interval=0, shared=True, lock=False)
    await a.start()
    await b.start()
    assert b._notifier is not None
    monkeypatch.setattr(b._notifier, "notify_others", lambda: None)
    try:
        await _failed_write_scenario(a, b)
    finally:
        await b.close()
        await a.close()


async def _failed_write_scenario(a: SqliteStore, b: SqliteStore) -> None:
    await a.create("/k/exists", {"v": 0})
    watch = a.watch("/k/", a.revision)
    got = asyncio.create_task(collect(watch, 3))
    await asyncio.sleep(0)
    for i in range(3):
        await b.create(f"/k/from-b-{i}", {"i": i})
    with pytest.raises(KeyExists):
        await a.create("/k/exists", {"v": 1})
    events = await got
    assert [e.key for e in events] == [f"/k/from-b-{i}" for i in range(3)]
