"""SQLite implementation of the :class:`~virtshift.store.base.Store` protocol.

The model is etcd / k3s kine: one global revision that increases by one on every successful
write, the current state in ``objects`` and the change history in ``events`` (used to replay
watches), trimmed by compaction.

Durability and concurrency:

* The database runs in WAL mode with ``synchronous=FULL``: a write is acknowledged only after its
  transaction committed and the WAL was fsynced.
* Every write goes through one dedicated writer thread with *group commit*: callers enqueue ops
  and await asyncio futures; the thread drains every pending op, applies them in one transaction
  (each op gets its own revision; existence and compare-and-swap checks are per op and a failed
  check fails only that op), commits once, then hands the results back to the event loop, which
  publishes the events to watchers (in revision order) and resolves the futures.
* Reads (``get``, ``list``, watch history) use a separate connection on the event loop thread.
  WAL readers never block the writer, and since futures resolve only after the commit, a read
  sees every acknowledged write.

One store per database file: the store holds an exclusive ``flock`` on ``<path>.lock``.

Several processes (the API server's workers) may share one file when every store on it is opened
with ``shared=True``; only the owning one takes the lock (``lock=True``). SQLite's write lock
still serialises the transactions, so a shared writer reads the revision inside its transaction
and revisions stay one global sequence. Each process publishes to its own watchers what the
``events`` table holds after the last revision it has published: right after its own commits,
and when another process wakes it after committing (:mod:`virtshift.store.sqliteshare`), with a
slow poll of ``meta.revision`` in case a wake-up was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtshift.errors import Compacted, StoreError
from virtshift.store import sqlitebatch
from virtshift.store.base import Event, ListResult, Record, Value
from virtshift.store.sqliteparts import (
    _BatchResult,
    _check_utf8,
    _dumps,
    _event,
    _EventList,
    _meta,
    _Op,
    _OpList,
    _range_sql,
    _RawEvent,
    _RawRecord,
    _record,
    _revisions,
    _Watcher,
)
from virtshift.store.sqliteshare import Notifier, owner_lock

if TYPE_CHECKING:
    from virtshift.store.sqliteremote import WriterClient

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL,
    create_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    value TEXT NOT NULL,
    prev_value TEXT,
    create_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', 1), ('revision', 0), ('compacted', 0);
"""

_MAX_BATCH = 1000  # ops per group-commit transaction
_HISTORY_PAGE = 1000  # events read per query while replaying a watch
_VACUUM_MIN_FREE_PAGES = 256  # run incremental_vacuum after a compaction above this



class SqliteStore:
    """A durable, revisioned, watchable key/value store in one SQLite file.

    ``history``: revisions of change history the background compaction keeps (watches may
    start at most that far back). ``compact_interval``: seconds between background compactions
    (0 or less disables them). ``watch_queue_size``: live events a watcher may have pending
    before it is ended as too slow.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        history: int = 10000,
        compact_interval: float = 60.0,
        watch_queue_size: int = 10000,
        shared: bool = False,
        lock: bool = True,
        poll_interval: float = 0.1,
        remote_writer: bool = False,
    ) -> None:
        if history < 0:
            raise ValueError("history must be >= 0")
        if watch_queue_size < 1:
            raise ValueError("watch_queue_size must be >= 1")
        self.path = Path(path)
        self.history = history
        self.compact_interval = compact_interval
        self.watch_queue_size = watch_queue_size
        self.shared = shared
        self.lock = lock
        self.poll_interval = poll_interval
        # Shared mode: writes go to the store writer process (store/sqliteremote.py).
        self.remote_writer = remote_writer and shared
        self._remote: WriterClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._wlock_fd: int | None = None  # shared mode: taken around each write transaction
        self._notifier: Notifier | None = None  # shared mode: wake-ups from the other processes

        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._writer_done: asyncio.Future[None] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self._watchers: dict[str, set[_Watcher]] = {}
        self._started = False
        self._closing = False
        self._closed = False
        self._writer_dead = False  # set by the writer thread when it exits

        # State visible on the event loop (updated when a batch's results arrive).
        self._revision = 0
        self._compacted = 0
        # State owned by the writer thread.
        self._w_revision = 0
        self._w_compacted = 0
        # Counters (written by the writer thread, read anywhere; ints are safe under the GIL).
        self._commits = 0
        self._writes = 0
        self._max_batch = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (creating it when missing) and start the writer and compactor."""
        if self._started:
            raise StoreError("store already started")
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = owner_lock(self.path) if self.lock else None
        if self.shared:
            self._wlock_fd = os.open(f"{self.path}.wlock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._writer = self._open_writer()
            self._reader = self._open_reader()
        except BaseException:
            self._close_connections()
            self._release_lock()
            raise
        self._revision = self._w_revision
        self._compacted = self._w_compacted
        if self.remote_writer:
            from virtshift.store.sqliteremote import WriterClient, writer_socket

            self._remote = WriterClient(writer_socket(self.path.resolve()), self._complete_batch)
            self._remote.start()
        elif self._writes_in_thread():
            self._writer_done = self._loop.create_future()
            self._thread = threading.Thread(
                target=self._writer_main, name=f"sqlite-writer:{self.path.name}", daemon=True
            )
            self._thread.start()
        self._started = True
        if self.compact_interval > 0:
            self._compactor = asyncio.create_task(
                self._compact_loop(), name=f"sqlite-compactor:{self.path.name}"
            )
        if self.shared:
            self._notifier = Notifier(self.path)
            self._notifier.open(self._loop, self._on_notify)
            self._poller = asyncio.create_task(
                self._poll_loop(), name=f"sqlite-poller:{self.path.name}"
            )
        logger.info(
            "sqlite store %s opened at revision %d (compacted %d)",
            self.path,
            self._revision,
            self._compacted,
        )

    async def close(self) -> None:
        """Finish queued writes, stop the compactor and writer, end every watch, close."""
        if self._closed or self._closing:
            return
        self._closing = True
        if not self._started:
            self._closed = True
            return
        for task in (self._compactor, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._compactor = self._poller = None
        if self._notifier is not None:
            self._notifier.close()
        if self._remote is not None:
            await self._remote.drain(within=10)
            await self._remote.close()
        if self._thread is not None:
            self._ops.put(None)  # the writer finishes everything queued before this, then exits
            if self._writer_done is not None:
                await self._writer_done
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                logger.error("sqlite writer thread for %s did not exit", self.path)
        else:
            self._checkpoint()  # what the writer thread does last
        self._end_watches()
        self._close_connections()
        self._release_lock()
        if self._wlock_fd is not None:
            os.close(self._wlock_fd)
            self._wlock_fd = None
        self._closed = True
        logger.info("sqlite store %s closed at revision %d", self.path, self._revision)

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- properties -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compacted_revision(self) -> int:
        return self._compacted

    @property
    def stats(self) -> dict[str, int]:
        """``commits`` (write transactions), ``writes`` (successful ops), ``max_batch``."""
        return {"commits": self._commits, "writes": self._writes, "max_batch": self._max_batch}

    # --- writes ---------------------------------------------------------------------------------

    # A create or update returns the record with the very dict it was given (the store keeps
    # only its JSON text), instead of decoding that text again.

    async def create(self, key: str, value: Value) -> Record:
        raw: _RawRecord = await self._submit("create", key=key, value=_dumps(value))
        return Record(raw.key, value, raw.revision, raw.create_revision)

    async def update(self, key: str, value: Value, expected_revision: int | None) -> Record:
        raw: _RawRecord = await self._submit(
            "update", key=key, value=_dumps(value), expected_revision=expected_revision
        )
        return Record(raw.key, value, raw.revision, raw.create_revision)

    async def delete(self, key: str, expected_revision: int | None = None) -> Record:
        raw: _RawRecord = await self._submit("delete", key=key, expected_revision=expected_revision)
        return _record(raw)

    async def compact(self, keep: int) -> int:
        if keep < 0:
            raise ValueError("keep must be >= 0")
        compacted: int = await self._submit("compact", keep=keep)
        return compacted

    async def _submit(self, kind: Any, **fields: Any) -> Any:
        self._check_open()
        if "key" in fields:
            _check_utf8(fields["key"], "key")
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._remote is not None:
            await self._remote.send(_Op(kind=kind, future=fut, **fields))
        else:
            self._ops.put(_Op(kind=kind, future=fut, **fields))
        return await fut

    # --- reads ----------------------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        conn = self._read_conn()
        row = conn.execute(
            "SELECT key, value, revision, create_revision FROM objects WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else _record(_RawRecord(*row))

    async def list(
        self, prefix: str, *, limit: int = 0, start_after: str | None = None
    ) -> ListResult:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        conn = self._read_conn()
        cond, params = _range_sql(prefix)
        if start_after is not None:
            cond += " AND key > ?"
            params.append(start_after)
        sql = f"SELECT key, value, revision, create_revision FROM objects WHERE {cond} ORDER BY key"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        conn.execute("BEGIN")  # one snapshot for the revision, the rows and the count
        try:
            revision = _meta(conn, "revision")
            rows = conn.execute(sql, params).fetchall()
            remaining = 0
            if limit and len(rows) == limit:
                rcond, rparams = _range_sql(prefix)
                remaining = conn.execute(
                    f"SELECT COUNT(*) FROM objects WHERE {rcond} AND key > ?",
                    [*rparams, rows[-1][0]],
                ).fetchone()[0]
        finally:
            conn.execute("COMMIT")
        records = [_record(_RawRecord(*row)) for row in rows]
        return ListResult(
            records=records, revision=revision, more=remaining > 0, remaining=remaining
        )

    # --- watch ----------------------------------------------------------------------------------

    def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        return self._watch(prefix, after_revision)

    async def _watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        self._check_open()
        watcher = _Watcher(prefix, self.watch_queue_size)
        # Subscribe before reading history: every event committed after this point is queued,
        # every event committed before it is in the history read below. Dedup by revision.
        self._watchers.setdefault(prefix, set()).add(watcher)
        try:
            last = max(after_revision, 0)
            first_page = True
            while True:
                if watcher.ended:
                    return
                page, compacted = self._read_history(prefix, last)
                if last < compacted:
                    if first_page:
                        raise Compacted(after_revision, compacted)
                    logger.info(
                        "watch on %r ended: history compacted past %d during replay", prefix, last
                    )
                    return
                first_page = False
                for raw in page:
                    yield _event(raw)
                    last = raw.revision
                    if watcher.ended:
                        return
                watcher.trim(last)
                if len(page) < _HISTORY_PAGE:
                    break
            while True:
                raw_or_none = await watcher.get()
                if raw_or_none is None:
                    if watcher.overflowed:
                        logger.warning(
                            "watch on %r ended: more than %d events pending (last delivered %d)",
                            prefix,
                            self.watch_queue_size,
                            last,
                        )
                    return
                if raw_or_none.revision <= last:
                    continue
                last = raw_or_none.revision
                yield _event(raw_or_none)
        finally:
            self._unsubscribe(watcher)

    def _read_history(self, prefix: str, after: int) -> tuple[_EventList, int]:
        if self._closing:
            return [], 0
        conn = self._read_conn()
        cond, params = _range_sql(prefix)
        conn.execute("BEGIN")
        try:
            compacted = _meta(conn, "compacted")
            rows = conn.execute(
                "SELECT revision, type, key, value, prev_value, create_revision FROM events"
                f" WHERE revision > ? AND {cond} ORDER BY revision LIMIT ?",
                [after, *params, _HISTORY_PAGE],
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return [_RawEvent(*row) for row in rows], compacted

    def _unsubscribe(self, watcher: _Watcher) -> None:
        watchers = self._watchers.get(watcher.prefix)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[watcher.prefix]

    def _publish(self, events: Sequence[_RawEvent]) -> None:
        """Queue events (in revision order) to every matching watcher. Event loop thread."""
        if not self._watchers:
            return
        dead: list[_Watcher] = []
        for prefix, watchers in self._watchers.items():
            for raw in events:
                if raw.key.startswith(prefix):
                    for w in watchers:
                        if not w.push(raw) and w.overflowed:
                            dead.append(w)
        for w in dead:
            self._unsubscribe(w)

    # --- background compaction ------------------------------------------------------------------

    async def _compact_loop(self) -> None:
        while True:
            await asyncio.sleep(self.compact_interval)
            try:
                before = self._compacted
                compacted = await self.compact(self.history)
                if compacted != before:
                    logger.debug("compacted %s up to revision %d", self.path, compacted)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("background compaction of %s failed", self.path)

    # --- other processes' writes (shared mode) -------------------------------------------------

    def _on_notify(self) -> None:
        assert self._notifier is not None
        self._notifier.drain()
        self._catch_up_logged()

    async def _poll_loop(self) -> None:
        """A slow poll, in case a wake-up was lost (a process that started meanwhile)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            self._catch_up_logged()

    def _catch_up_logged(self) -> None:
        try:
            self._catch_up()
        except sqlite3.Error:
            logger.exception("reading new events of %s failed", self.path)

    def _end_watches(self) -> None:
        """End every watch of this store (its clients re-list and watch again)."""
        for watchers in self._watchers.values():
            for w in watchers:
                w.end()
        self._watchers.clear()

    def _catch_up(self) -> None:
        """Publish what other processes committed since the last published revision (only the
        events some watcher here wants). Event loop thread; revisions are committed in order,
        so the table has no gaps below its top."""
        if self._closing or self._reader is None:
            return
        conn = self._reader
        if not self._watchers:  # nobody to publish to: only learn where the file is
            revision, compacted = _revisions(conn)
            self._revision = max(self._revision, revision)
            self._compacted = max(self._compacted, compacted)
            return
        while True:
            ranges = [_range_sql(prefix) for prefix in self._watchers]
            conn.execute("BEGIN")
            try:
                top, compacted = _revisions(conn)
                rows = []
                if ranges and top > self._revision and compacted <= self._revision:
                    rows = conn.execute(
                        "SELECT revision, type, key, value, prev_value, create_revision FROM"
                        " events WHERE revision > ? AND revision <= ? AND ("
                        + " OR ".join(f"({cond})" for cond, _ in ranges)
                        + ") ORDER BY revision LIMIT ?",
                        [self._revision, top, *(p for _, ps in ranges for p in ps),
                         _HISTORY_PAGE],
                    ).fetchall()
            finally:
                conn.execute("COMMIT")
            self._compacted = max(self._compacted, compacted)
            if top <= self._revision:
                return
            if ranges and compacted > self._revision:
                # Fell behind past the history: end the watches (clients re-list) and skip on.
                logger.warning("%s: events %d..%d were compacted before this process read "
                               "them; ending its watches", self.path, self._revision, compacted)
                self._end_watches()
            events = [_RawEvent(*row) for row in rows]
            self._publish(events)
            if len(events) < _HISTORY_PAGE:
                self._revision = top
                return
            self._revision = events[-1].revision

    # --- event loop side of the writer ----------------------------------------------------------

    def _complete_batch(self, result: _BatchResult) -> None:
        """Runs on the event loop: publish the batch's events, then resolve its futures."""
        try:
            if not self.shared:
                self._publish(result.events)
                self._revision = max(self._revision, result.revision)
            elif result.events and result.events[0].revision == self._revision + 1:
                self._publish(result.events)
                self._revision = result.events[-1].revision
            else:
                # Another process committed before this batch (or the batch wrote nothing and
                # its revision says only where the others are): publish from the table, in
                # order, and never move the revision past what watchers were given.
                self._catch_up()
        except Exception:
            logger.exception("publishing events of %s failed", self.path)
        self._compacted = max(self._compacted, result.compacted)
        for fut, value, exc in result.outcomes:
            if fut.done():  # the caller was cancelled; the write may still have happened
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    def _to_loop(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.exception("event loop of sqlite store %s is gone", self.path)

    # --- writer thread --------------------------------------------------------------------------

    def _writer_main(self) -> None:
        stopping = False
        try:
            while not stopping:
                op = self._ops.get()
                if op is None:
                    break
                batch = [op]
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                self._run_batch(batch)
            self._checkpoint()
        except BaseException:
            logger.exception("sqlite writer thread of %s crashed", self.path)
        finally:
            self._writer_dead = True
            self._fail_pending()
            self._to_loop(self._writer_finished)

    def _writes_in_thread(self) -> bool:
        """Whether a writer thread applies this store's ops (the store writer process's store
        applies them on its event loop instead)."""
        return True

    def _writer_finished(self) -> None:
        if self._writer_done is not None and not self._writer_done.done():
            self._writer_done.set_result(None)

    def _fail_pending(self) -> None:
        """Fail ops still queued when the writer exits (only after a crash or late submits)."""
        failed: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op is not None:
                failed.append((op.future, None, StoreError("store is closed")))
        if failed:
            self._to_loop(self._complete_batch, _BatchResult(outcomes=failed))

    def _run_batch(self, batch: _OpList) -> None:
        """Apply ``batch`` in one transaction, commit (fsync) once, hand results to the loop.

        A failed check (exists, not found, CAS) fails only its op. An unexpected SQLite error
        while applying an op rolls the transaction back and retries the ops one transaction each,
        so it fails only the op that causes it. An error at COMMIT fails the whole batch (the
        outcome may be ambiguous, so nothing is retried).
        """
        conn = self._writer
        assert conn is not None
        start_rev, start_compacted = self._w_revision, self._w_compacted
        result = _BatchResult()
        compacted_rows = 0
        committing = False
        retry_singly = False
        if self._wlock_fd is not None:
            # Queue on a flock, not on SQLite's busy handler: that one sleeps in steps of
            # milliseconds, this one wakes as soon as the other process commits.
            fcntl.flock(self._wlock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            if self.shared:  # other processes may have written since this one last did
                self._w_revision, self._w_compacted = _revisions(conn)
            start_rev, start_compacted = self._w_revision, self._w_compacted
            planned = sqlitebatch.plan(batch, sqlitebatch.read_rows(conn, batch),
                                       self._w_revision, self._w_compacted)
            compacted_rows = sqlitebatch.write(conn, planned)
            result.outcomes = [(op.future, value, exc)
                               for op, (value, exc) in zip(batch, planned.outcomes, strict=True)]
            result.events = planned.events
            self._w_revision, self._w_compacted = planned.revision, planned.compacted
            if self._w_revision != start_rev:
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'revision'", (self._w_revision,)
                )
            if self._w_compacted != start_compacted:
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'compacted'", (self._w_compacted,)
                )
            committing = True
            conn.execute("COMMIT")
        except Exception as exc:
            logger.exception(
                "sqlite write transaction on %s failed (%d ops%s)",
                self.path,
                len(batch),
                ", at commit" if committing else "",
            )
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("rollback on %s failed", self.path)
            self._w_revision, self._w_compacted = start_rev, start_compacted
            if not committing and len(batch) > 1:
                retry_singly = True
            else:
                error = StoreError(f"write failed: {exc}")
                error.__cause__ = exc
                result = _BatchResult(outcomes=[(op.future, None, error) for op in batch])
        else:
            if result.events or compacted_rows:
                self._commits += 1
            self._writes += len(result.events)
            self._max_batch = max(self._max_batch, len(batch))
        finally:
            if self._wlock_fd is not None:
                fcntl.flock(self._wlock_fd, fcntl.LOCK_UN)
        if self._notifier is not None and result.events:
            self._notifier.notify_others()
        if retry_singly:
            for op in batch:
                self._run_batch([op])
            return
        result.revision = self._w_revision
        result.compacted = self._w_compacted
        self._to_loop(self._complete_batch, result)
        if compacted_rows:
            self._incremental_vacuum()

    def _incremental_vacuum(self) -> None:
        conn = self._writer
        assert conn is not None
        try:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= _VACUUM_MIN_FREE_PAGES:
                conn.execute("PRAGMA incremental_vacuum")
        except sqlite3.Error:
            logger.exception("incremental vacuum of %s failed", self.path)

    def _checkpoint(self) -> None:
        conn = self._writer
        assert conn is not None
        if self.shared and not self.lock:
            return  # the owning process checkpoints; others may still be using the file
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            logger.exception("final checkpoint of %s failed", self.path)

    # --- connections ----------------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            # auto_vacuum only takes effect before the first table exists (new databases).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot put {self.path} in WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.executescript(_SCHEMA)
            revision = _meta(conn, "revision")
            compacted = _meta(conn, "compacted")
            top = conn.execute(
                "SELECT MAX(COALESCE((SELECT MAX(revision) FROM events), 0),"
                " COALESCE((SELECT MAX(revision) FROM objects), 0))"
            ).fetchone()[0]
            if top > revision:  # cannot happen with this code; be safe with foreign writers
                logger.warning("%s: meta revision %d behind data %d", self.path, revision, top)
                revision = top
        except BaseException:
            conn.close()
            raise
        self._w_revision = revision
        self._w_compacted = compacted
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _close_connections(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    logger.exception("closing a connection to %s failed", self.path)
        self._reader = None
        self._writer = None

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _check_open(self) -> None:
        if not self._started:
            raise StoreError("store is not started")
        if self._closing:
            raise StoreError("store is closed")
        if self._writer_dead:
            raise StoreError("store writer has stopped (see the log)")

    def _read_conn(self) -> sqlite3.Connection:
        self._check_open()
        assert self._reader is not None
        return self._reader

