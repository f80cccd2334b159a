"""Unit tests of the SQLite store (virtshift.store.sqlite)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from virtshift.errors import Compacted, KeyExists, KeyNotFound, RevisionMismatch, StoreError
from virtshift.store import sqlite as sqlite_mod
from virtshift.store.base import Event, Store
from virtshift.store.sqlite import SqliteStore
from virtshift.store.sqliteparts import prefix_upper_bound

DEADLINE = 20.0  # seconds; generous, only reached when something is broken


async def wait_for(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` until true; fail after ``DEADLINE`` seconds."""
    deadline = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def collect(it: AsyncIterator[Event], until: Callable[[list[Event]], bool]) -> list[Event]:
    """Read events from ``it`` until ``until(events)`` holds (or the iterator ends)."""
    events: list[Event] = []

    async def run() -> None:
        async for ev in it:
            events.append(ev)
            if until(events):
                return

    await asyncio.wait_for(run(), DEADLINE)
    return events


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db", compact_interval=0)
    await s.start()
    yield s
    await s.close()


def test_implements_store_protocol(tmp_path: Path) -> None:
    s: Store = SqliteStore(tmp_path / "x.db")  # checked by mypy when tests are type-checked
    assert isinstance(s, SqliteStore)


# --- CRUD and CAS -------------------------------------------------------------------------------


async def test_crud(store: SqliteStore) -> None:
    assert store.revision == 0
    assert await store.get("/a") is None

    created = await store.create("/a", {"n": 1, "s": "é"})
    assert (created.key, created.value, created.revision, created.create_revision) == (
        "/a",
        {"n": 1, "s": "é"},
        1,
        1,
    )
    assert store.revision == 1
    assert await store.get("/a") == created

    updated = await store.update("/a", {"n": 2}, 1)
    assert (updated.value, updated.revision, updated.create_revision) == ({"n": 2}, 2, 1)
    assert await store.get("/a") == updated

    unconditional = await store.update("/a", {"n": 3}, None)
    assert unconditional.revision == 3

    deleted = await store.delete("/a")
    assert (deleted.value, deleted.revision, deleted.create_revision) == ({"n": 3}, 4, 1)
    assert await store.get("/a") is None
    assert store.revision == 4

    recreated = await store.create("/a", {"n": 4})
    assert (recreated.revision, recreated.create_revision) == (5, 5)


async def test_errors(store: SqliteStore) -> None:
    await store.create("/k", {"v": 1})
    with pytest.raises(KeyExists):
        await store.create("/k", {"v": 2})
    with pytest.raises(KeyNotFound):
        await store.update("/missing", {"v": 1}, None)
    with pytest.raises(KeyNotFound):
        await store.delete("/missing")
    with pytest.raises(RevisionMismatch) as mismatch:
        await store.update("/k", {"v": 2}, 99)
    assert mismatch.value.current == 1
    with pytest.raises(RevisionMismatch) as mismatch:
        await store.delete("/k", expected_revision=7)
    assert mismatch.value.current == 1
    # failed writes consume no revision and change nothing
    assert store.revision == 1
    record = await store.get("/k")
    assert record is not None and record.value == {"v": 1}
    with pytest.raises(TypeError):
        await store.create("/bad", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.create("/bad", {"x": float("nan")})
    with pytest.raises(ValueError, match="UTF-8"):
        await store.create("/bad", {"x": "\ud800"})  # a lone surrogate cannot be stored
    with pytest.raises(ValueError, match="UTF-8"):
        await store.create("/bad\udfff", {})
    assert store.revision == 1


async def test_concurrent_cas_only_one_wins(store: SqliteStore) -> None:
    rec = await store.create("/cas", {"n": 0})
    results = await asyncio.gather(
        *(store.update("/cas", {"n": i}, rec.revision) for i in range(20)), return_exceptions=True
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, RevisionMismatch)]
    assert len(wins) == 1 and len(conflicts) == 19
    assert all(c.current == wins[0].revision for c in conflicts)

    creates = await asyncio.gather(
        *(store.create("/dup", {"i": i}) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in creates) == 1
    assert sum(isinstance(r, KeyExists) for r in creates) == 9
    assert store.revision == 3  # create, one update, one create: no revision holes


async def test_returned_values_are_fresh(store: SqliteStore) -> None:
    value = {"spec": {"list": [1, 2]}}
    rec = await store.create("/f", value)
    value["spec"]["list"].append(3)
    rec.value["spec"]["list"].append(4)
    got = await store.get("/f")
    assert got is not None and got.value == {"spec": {"list": [1, 2]}}
    got.value["x"] = 1
    again = await store.get("/f")
    assert again is not None and again.value == {"spec": {"list": [1, 2]}}
    listed = await store.list("/")
    listed.records[0].value["y"] = 1
    again = await store.get("/f")
    assert again is not None and again.value == {"spec": {"list": [1, 2]}}


async def test_unexpected_sqlite_error_fails_only_that_op(store: SqliteStore) -> None:
    # A trigger makes SQLite itself fail the insert of one key.
    raw = sqlite3.connect(store.path)
    raw.execute(
        "CREATE TRIGGER reject BEFORE INSERT ON objects WHEN NEW.key = '/bad'"
        " BEGIN SELECT RAISE(ABORT, 'rejected by test'); END"
    )
    raw.commit()
    raw.close()
    keys = [f"/ok/{i}" for i in range(10)]
    results = await asyncio.gather(
        *(store.create(k, {}) for k in [*keys[:5], "/bad", *keys[5:]]), return_exceptions=True
    )
    bad = results.pop(5)
    assert isinstance(bad, StoreError) and "rejected by test" in str(bad)
    assert all(not isinstance(r, BaseException) for r in results)
    assert sorted(r.revision for r in results) == list(range(1, 11))  # type: ignore[union-attr]
    assert store.revision == 10
    assert (await store.create("/after", {})).revision == 11


# --- list ---------------------------------------------------------------------------------------


async def test_list_prefix_and_paging(store: SqliteStore) -> None:
    for i in range(25):
        await store.create(f"/r/ns/obj-{i:02d}", {"i": i})
    await store.create("/r/ns", {"edge": "no slash"})
    await store.create("/r/nt/x", {})
    await store.create("/r/ns0/y", {})
    await store.create("/q", {})

    everything = await store.list("/r/ns/")
    assert [r.key for r in everything.records] == [f"/r/ns/obj-{i:02d}" for i in range(25)]
    assert (everything.more, everything.remaining, everything.revision) == (False, 0, 29)

    pages = []
    start_after = None
    while True:
        page = await store.list("/r/ns/", limit=10, start_after=start_after)
        pages.append(page)
        if not page.more:
            break
        start_after = page.records[-1].key
    assert [len(p.records) for p in pages] == [10, 10, 5]
    assert [(p.more, p.remaining) for p in pages] == [(True, 15), (True, 5), (False, 0)]
    keys = [r.key for p in pages for r in p.records]
    assert keys == [r.key for r in everything.records]

    exact = await store.list("/r/ns/", limit=25)
    assert (exact.more, exact.remaining) == (False, 0)
    assert len((await store.list("")).records) == 29
    assert [r.key for r in (await store.list("/r/n")).records][:1] == ["/r/ns"]
    assert (await store.list("/none/")).records == []
    with pytest.raises(ValueError):
        await store.list("/", limit=-1)


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("/a/") == "/a0"
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"


async def test_list_unicode_prefix(store: SqliteStore) -> None:
    await store.create("/ü/1", {})
    await store.create("/ü\U0010ffff", {})
    await store.create("/ý", {})
    assert [r.key for r in (await store.list("/ü")).records] == ["/ü/1", "/ü\U0010ffff"]


# --- watch --------------------------------------------------------------------------------------


async def test_watch_history_then_live(store: SqliteStore) -> None:
    a = await store.create("/w/a", {"v": 1})
    await store.create("/x/other", {})
    b = await store.update("/w/a", {"v": 2}, a.revision)
    watch = store.watch("/w/", 0)
    first = await anext(watch)
    assert (first.type, first.key, first.value, first.prev_value) == ("PUT", "/w/a", {"v": 1}, None)
    second = await anext(watch)
    assert (second.revision, second.value, second.prev_value, second.create_revision) == (
        b.revision,
        {"v": 2},
        {"v": 1},
        a.revision,
    )
    deleted = await store.delete("/w/a")
    third = await asyncio.wait_for(anext(watch), DEADLINE)
    assert (third.type, third.revision, third.value, third.prev_value) == (
        "DELETE",
        deleted.revision,
        {"v": 2},
        {"v": 2},
    )
    assert third.create_revision == a.revision
    await watch.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: not store._watchers, "unsubscribe on aclose")


async def test_watch_unsubscribes_when_consumer_breaks(store: SqliteStore) -> None:
    await store.create("/u/1", {})

    async def first_event() -> Event:
        async for ev in store.watch("/u/", 0):
            return ev  # abandons the iterator without aclose()
        raise AssertionError("no event")

    assert (await first_event()).key == "/u/1"
    await wait_for(lambda: not store._watchers, "the abandoned watch to unsubscribe")


async def test_watch_from_future_revision(store: SqliteStore) -> None:
    await store.create("/w/1", {})
    watch = store.watch("/w/", store.revision + 2)
    task = asyncio.ensure_future(anext(watch))
    for i in range(2, 6):
        await store.create(f"/w/{i}", {})
    ev = await asyncio.wait_for(task, DEADLINE)
    assert ev.revision == 4


async def test_watch_events_are_fresh_per_watcher(store: SqliteStore) -> None:
    w1, w2 = store.watch("/f/", 0), store.watch("/f/", 0)
    await store.create("/f/1", {"a": []})
    e1, e2 = await anext(w1), await anext(w2)
    e1.value["a"].append(1)
    assert e2.value == {"a": []}


@pytest.mark.parametrize("page", [1000, 7])
async def test_watch_no_gaps_under_concurrent_writes(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    monkeypatch.setattr(sqlite_mod, "_HISTORY_PAGE", page)  # small pages: replay in many reads
    written: dict[str, list[int]] = {"/w/": [], "/o/": []}

    async def writer(n: int, prefix: str) -> None:
        for i in range(60):
            key = f"{prefix}{n}-{i}"
            rec = await store.create(key, {"i": i})
            written[prefix].append(rec.revision)
            rec = await store.update(key, {"i": -i}, rec.revision)
            written[prefix].append(rec.revision)
            if i % 3 == 0:
                written[prefix].append((await store.delete(key)).revision)

    async def watcher(start_at: int, back: int = 5) -> tuple[int, list[Event]]:
        await wait_for(lambda: store.revision >= start_at, "writes to start")
        after = max(store.revision - back, 0) if start_at else 0
        events: list[Event] = []
        async for ev in store.watch("/w/", after):
            if ev.key == "/w/~end":
                break
            events.append(ev)
        return after, events

    watchers = [asyncio.create_task(watcher(at)) for at in (0, 1, 50, 200, 400)]
    await asyncio.gather(*(writer(n, p) for n in range(4) for p in ("/w/", "/o/")))
    # late watchers replay (almost) everything from history, in pages
    watchers.append(asyncio.create_task(watcher(1, back=10**6)))
    watchers.append(asyncio.create_task(watcher(1, back=333)))
    await wait_for(lambda: len(store._watchers.get("/w/", ())) == len(watchers), "subscriptions")
    await store.create("/w/~end", {})
    results = await asyncio.wait_for(asyncio.gather(*watchers), DEADLINE)
    expected_all = sorted(written["/w/"])
    assert len(expected_all) == 4 * (60 * 2 + 20)
    for after, events in results:
        revisions = [e.revision for e in events]
        assert revisions == [r for r in expected_all if r > after], f"after={after}"
        assert all(e.key.startswith("/w/") for e in events)


async def test_watch_compacted(store: SqliteStore) -> None:
    for i in range(10):
        await store.create(f"/c/{i}", {"i": i})
    assert await store.compact(3) == 7
    assert store.compacted_revision == 7
    assert await store.compact(5) == 7  # never goes backwards
    watch = store.watch("/c/", 5)
    with pytest.raises(Compacted) as exc:
        await anext(watch)
    assert (exc.value.requested, exc.value.compacted) == (5, 7)
    ok = store.watch("/c/", 7)
    assert [(await anext(ok)).revision for _ in range(3)] == [8, 9, 10]
    assert await store.compact(0) == 10
    with pytest.raises(ValueError):
        await store.compact(-1)


async def test_slow_watcher_is_ended_alone(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db", compact_interval=0, watch_queue_size=50) as store:
        await store.create("/s/first", {})
        slow = store.watch("/s/", 0)
        assert (await anext(slow)).revision == 1  # subscribed, now stops reading
        fast = store.watch("/s/", 0)
        assert (await anext(fast)).revision == 1
        fast_events: list[Event] = []

        async def read_fast() -> None:
            async for ev in fast:
                fast_events.append(ev)
                if ev.revision == 201:
                    return

        reader = asyncio.create_task(read_fast())
        for i in range(200):
            await store.create(f"/s/{i}", {})
        await asyncio.wait_for(reader, DEADLINE)
        assert [e.revision for e in fast_events] == list(range(2, 202))
        rest = await collect(slow, lambda evs: False)  # ends by itself
        assert len(rest) == 0
        # the store is healthy and new watches work
        rec = await store.create("/s/after", {})
        again = store.watch("/s/", rec.revision - 1)
        assert (await anext(again)).key == "/s/after"


async def test_close_ends_watchers_and_rejects_ops(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db", compact_interval=0)
    await store.start()
    watch = store.watch("/", 0)
    pending = asyncio.create_task(collect(watch, lambda evs: False))
    await store.create("/x", {})
    await wait_for(lambda: store._watchers != {}, "subscription")
    await store.close()
    events = await asyncio.wait_for(pending, DEADLINE)
    assert [e.key for e in events] == ["/x"]
    with pytest.raises(StoreError):
        await store.create("/y", {})
    with pytest.raises(StoreError):
        await store.get("/x")
    await store.close()  # idempotent


async def test_one_store_per_file(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "l.db", compact_interval=0):
        with pytest.raises(StoreError, match="in use"):
            await SqliteStore(tmp_path / "l.db").start()


# --- compaction ---------------------------------------------------------------------------------


def _count_events(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return count
    finally:
        conn.close()


async def test_background_compaction_bounds_history(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with SqliteStore(path, history=5, compact_interval=0.02) as store:
        for i in range(40):
            await store.create(f"/b/{i}", {"pad": "x" * 2000})
        await wait_for(lambda: store.compacted_revision == 35, "background compaction")
        assert _count_events(path) == 5
        with pytest.raises(Compacted):
            await anext(store.watch("/b/", 10))
        # deleting everything keeps history bounded too
        for i in range(40):
            await store.delete(f"/b/{i}")
        await wait_for(lambda: store.compacted_revision == 75, "background compaction")
        assert _count_events(path) == 5
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# --- persistence --------------------------------------------------------------------------------


async def test_revisions_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    async with SqliteStore(path, compact_interval=0) as store:
        for i in range(10):
            await store.create(f"/p/{i}", {"i": i})
        await store.update("/p/3", {"i": 33}, 4)
        await store.delete("/p/4")
        await store.compact(4)
        before = await store.list("/p/")
        revision, compacted = store.revision, store.compacted_revision
    async with SqliteStore(path, compact_interval=0) as store:
        assert (store.revision, store.compacted_revision) == (revision, compacted) == (12, 8)
        assert await store.list("/p/") == before
        nxt = await store.create("/p/new", {})
        assert nxt.revision == 13
        history = await collect(store.watch("/p/", compacted), lambda evs: len(evs) == 5)
        assert [e.revision for e in history] == [9, 10, 11, 12, 13]
        assert history[3].type == "DELETE" and history[3].key == "/p/4"


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from virtshift.store.sqlite import SqliteStore

    async def main(path):
        store = SqliteStore(path, compact_interval=0)
        await store.start()
        print("ready", flush=True)
        counter = 0

        async def worker(w):
            nonlocal counter
            while True:
                counter += 1
                key = f"/k/{counter:07d}"
                rec = await store.create(key, {"n": counter, "w": w})
                print(key, rec.revision, flush=True)

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_kill_9_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    acknowledged: dict[str, int] = {}
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert line.strip() == b"ready"
        while len(acknowledged) < 500:
            line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
            assert line, "child exited early"
            acked_key, acked_rev = line.decode().split()
            acknowledged[acked_key] = int(acked_rev)
    finally:
        proc.send_signal(signal.SIGKILL)
    # lines the child printed before it died were acknowledged too
    rest = await asyncio.wait_for(proc.stdout.read(), DEADLINE)
    # print(flush=True) writes each line with one write() to a pipe (atomic below PIPE_BUF), so
    # only complete lines exist; still, ignore anything after the last newline.
    for text in rest.decode().split("\n")[:-1]:
        acked_key, acked_rev = text.split()
        acknowledged[acked_key] = int(acked_rev)
    assert await proc.wait() == -signal.SIGKILL

    async with SqliteStore(path, compact_interval=0) as store:
        for key, rev in acknowledged.items():
            rec = await store.get(key)
            assert rec is not None, f"acknowledged {key} lost"
            assert rec.revision == rev == rec.create_revision
            assert rec.value["n"] == int(key.rsplit("/", 1)[1])
        top = max(acknowledged.values())
        assert store.revision >= top
        listed = await store.list("/k/")
        assert len(listed.records) == store.revision  # one create per revision, no holes
        assert sorted(r.revision for r in listed.records) == list(range(1, store.revision + 1))
        nxt = await store.create("/after-crash", {})
        assert nxt.revision == store.revision == listed.revision + 1


# --- group commit -------------------------------------------------------------------------------


async def test_group_commit_batches_concurrent_writes(store: SqliteStore) -> None:
    async def timed(make: Callable[[], Awaitable[object]]) -> tuple[float, int]:
        commits = store.stats["commits"]
        start = time.perf_counter()
        await make()
        return time.perf_counter() - start, store.stats["commits"] - commits

    async def sequential() -> None:
        for i in range(200):
            await store.create(f"/seq/{i}", {"i": i})

    async def concurrent() -> None:
        await asyncio.gather(*(store.create(f"/con/{i}", {"i": i}) for i in range(200)))

    seq_time, seq_commits = await timed(sequential)
    con_time, con_commits = await timed(concurrent)
    assert seq_commits == 200
    assert con_commits <= 20, f"200 concurrent creates took {con_commits} transactions"
    assert store.stats["max_batch"] >= 10
    assert store.revision == 400
    # loose: batching should make the concurrent run clearly faster
    assert con_time < seq_time, (con_time, seq_time)
