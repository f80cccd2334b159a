"""The store writer process (store/sqliteremote.py): stores in shared mode with
``remote_writer=True`` send their writes to a real ``virtshift store-writer`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.unit.test_store_shared import collect
from virtshift.errors import KeyExists, KeyNotFound, RevisionMismatch, StoreError
from virtshift.store.sqlite import SqliteStore
from virtshift.store.sqliteremote import writer_socket

DEADLINE = 30.0


class Writer:
    """A ``virtshift store-writer`` process for one store file."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtshift.cli.main", "store-writer", "--data-dir",
             str(self.db.parent), "--store", f"sqlite://{self.db}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    w = Writer(tmp_path / "store.db")
    w.start()
    yield w
    w.stop()


@pytest.fixture
async def pair(tmp_path: Path, writer: Writer) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    db = writer.db
    owner = SqliteStore(db, compact_interval=0, shared=True, remote_writer=True)
    await owner.start()
    other = SqliteStore(db, compact_interval=0, shared=True, lock=False, remote_writer=True)
    await other.start()
    yield owner, other
    await other.close()
    await owner.close()


async def test_both_stores_write_one_revision_sequence_and_watch_it(
        pair: tuple[SqliteStore, SqliteStore]) -> None:
    a, b = pair
    got_a = asyncio.create_task(collect(a.watch("/k/", 0), 60))
    got_b = asyncio.create_task(collect(b.watch("/k/", 0), 60))
    await asyncio.sleep(0)
    records = await asyncio.gather(*[(a if i % 2 else b).create(f"/k/{i:03d}", {"i": i})
                                     for i in range(60)])
    assert sorted(r.revision for r in records) == list(range(1, 61))
    for got in (await got_a, await got_b):
        assert [e.revision for e in got] == list(range(1, 61))
        assert {e.key for e in got} == {f"/k/{i:03d}" for i in range(60)}
    assert a.revision == b.revision == 60
    # The writes are in the file, for any reader.
    assert (await b.get("/k/007")) is not None and (await a.get("/k/008")) is not None


async def test_the_stores_errors_come_back_as_they_are(
        pair: tuple[SqliteStore, SqliteStore]) -> None:
    a, b = pair
    first = await a.create("/x", {"v": 1})
    with pytest.raises(KeyExists):
        await b.create("/x", {"v": 2})
    with pytest.raises(KeyNotFound):
        await b.update("/nope", {"v": 1}, None)
    updated = await b.update("/x", {"v": 3}, first.revision)
    with pytest.raises(RevisionMismatch) as stale:
        await a.update("/x", {"v": 4}, first.revision)
    assert stale.value.current == updated.revision
    # Of several concurrent compare-and-swaps from one revision, exactly one wins.
    results = await asyncio.gather(
        *[(a if i % 2 else b).update("/x", {"v": 10 + i}, updated.revision) for i in range(6)],
        return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, RevisionMismatch) for r in results if isinstance(r, BaseException))
    gone = await a.delete("/x")
    assert gone.value["v"] in range(10, 16) and await b.get("/x") is None
    assert await a.compact(0) == gone.revision


async def test_a_writer_restart_fails_only_the_writes_in_between(
        tmp_path: Path, writer: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    from virtshift.store import sqliteremote
    store = SqliteStore(writer.db, compact_interval=0, shared=True, remote_writer=True)
    await store.start()
    try:
        before = await store.create("/a", {"n": 1})
        monkeypatch.setattr(sqliteremote, "CONNECT_TIMEOUT", 0.5)
        assert writer.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(StoreError):
            await store.create("/b", {"n": 2})  # lost in flight or refused: never a hang
        writer.start()  # as `virtshift up` restarts it
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            try:
                after = await store.create("/c", {"n": 3})
                break
            except StoreError:
                assert asyncio.get_running_loop().time() < deadline, "no reconnection"
        assert after.revision > before.revision
        assert (await store.get("/a")) is not None and (await store.get("/c")) is not None
    finally:
        await store.close()


def test_one_writer_process_per_store(tmp_path: Path, writer: Writer) -> None:
    sock = writer_socket(writer.db.resolve())
    deadline = time.monotonic() + DEADLINE
    while not sock.exists():
        assert time.monotonic() < deadline, "the writer process did not start"
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "virtshift.cli.main", "store-writer", "--data-dir",
         str(tmp_path), "--store", f"sqlite://{writer.db}"],
        capture_output=True, text=True, timeout=DEADLINE, env=os.environ)
    assert second.returncode != 0
    assert "another store writer process serves" in second.stderr
    assert "Traceback" not in second.stderr
