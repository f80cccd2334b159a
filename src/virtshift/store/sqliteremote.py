"""The store writer process: one process commits every write of a SQLite store that several API
server processes share (``virtshift up --api-workers N`` with N > 1).

Why a process of its own: a store's writer thread takes the GIL back after every SQLite call,
and in an API server process the event loop thread holds it most of the time, so a write
transaction (and the file's write lock) lasted milliseconds longer than its SQL, and the API
processes queued behind each other's GIL waits. The writer process has nothing else to run: its
transactions take the time SQLite and the disk take, and it folds the ops of every API process
into one group commit (one fsync) where each process had its own.

Each API process's :class:`SqliteStore` (``remote_writer=True``) still reads the file itself
and publishes events to its own watchers; only its writes go over a Unix stream socket beside
the store's wake-up sockets (:func:`writer_socket`), as length-prefixed ``marshal`` frames (both
ends are this code, in processes of the same user; the directory is private to that user):

- request: ``(id, kind, key, value, expected_revision, keep)``
- reply, one per transaction that held some of the connection's ops:
  ``([(id, result, error)], events, revision, compacted)``; ``events`` are all the
  transaction's events, which the API process publishes as if its own writer had written them.

A lost connection fails the ops in flight with a StoreError (a write may or may not have been
committed, as when a network store goes away) and the client connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtshift.aio import stop_on_signals, stop_tasks
from virtshift.errors import KeyExists, KeyNotFound, RevisionMismatch, StoreError
from virtshift.store.sqlite import _MAX_BATCH, SqliteStore
from virtshift.store.sqliteparts import _BatchResult, _Op, _RawEvent, _RawRecord
from virtshift.store.sqliteshare import exclusive_lock, notify_dir

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_MAX_FRAME = 64 * 1024 * 1024
CONNECT_TIMEOUT = 30.0  # how long a write waits for the writer process to be reachable


def writer_socket(store_path: Path) -> Path:
    return notify_dir(store_path) / "writer.sock"


def _frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_FRAME:
        raise StoreError(f"store writer frame of {size} bytes")
    return marshal.loads(await reader.readexactly(size))


def _encode_error(exc: BaseException | None) -> tuple[str, Any] | None:
    if exc is None:
        return None
    if isinstance(exc, RevisionMismatch):
        return ("RevisionMismatch", exc.current)
    return (type(exc).__name__, str(exc))


def _decode_error(err: tuple[str, Any]) -> StoreError:
    name, arg = err
    if name == "RevisionMismatch":
        return RevisionMismatch(int(arg))
    cls: type[StoreError] = {"KeyExists": KeyExists, "KeyNotFound": KeyNotFound}.get(
        name, StoreError)
    return cls(str(arg))


# ---- the API process's end ----------------------------------------------------------------


class WriterClient:
    """Sends a store's writes to the writer process; each reply goes to ``on_batch`` (the
    store's :meth:`SqliteStore._complete_batch`, as the results of its own writer thread)."""

    def __init__(self, path: Path, on_batch: Callable[[_BatchResult], None]) -> None:
        self.path = path
        self._on_batch = on_batch
        self._pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._next_id = 0
        self._out: list[bytes] = []
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._idle = asyncio.Event()  # set while no write waits for its reply
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"store-writer-client:{self.path}")

    async def send(self, op: _Op) -> None:
        """Queue ``op`` (its future is resolved by the reply); waits while not connected."""
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT)
            except TimeoutError:
                raise StoreError(f"the store writer process is not reachable at {self.path}"
                                 ) from None
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = (op.future, op.kind)
        self._idle.clear()
        self._out.append(_frame((rid, op.kind, op.key, op.value, op.expected_revision,
                                 op.keep)))
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._writer is not None and self._out:
            self._writer.write(b"".join(self._out))
        self._out.clear()

    async def drain(self, within: float) -> None:
        """Wait (up to ``within`` seconds) for the replies to every write sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        self._fail_pending("the store is closed")

    def _fail_pending(self, why: str) -> None:
        self._out.clear()
        pending, self._pending = self._pending, {}
        self._idle.set()
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(StoreError(why))

    async def _run(self) -> None:
        delay = 0.02
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            delay = 0.02
            self._writer = writer
            self._connected.set()
            try:
                while True:
                    self._deliver(await _read_frame(reader))
            except (asyncio.IncompleteReadError, OSError, StoreError, ValueError, EOFError) as e:
                logger.warning("lost the store writer process (%s); connecting again", e)
            finally:
                self._connected.clear()
                self._writer = None
                writer.close()
                self._fail_pending("the store writer process went away: the write may or may "
                                   "not have been committed")

    def _deliver(self, reply: Any) -> None:
        outcomes, events, revision, compacted = reply
        result = _BatchResult(events=[_RawEvent(*e) for e in events], revision=revision,
                              compacted=compacted)
        for rid, value, err in outcomes:
            entry = self._pending.pop(rid, None)
            if entry is None:
                continue
            fut, kind = entry
            if err is not None:
                result.outcomes.append((fut, None, _decode_error(err)))
            else:
                result.outcomes.append((fut, value if kind == "compact" else _RawRecord(*value),
                                        None))
        if not self._pending:
            self._idle.set()
        self._on_batch(result)


# ---- the writer process --------------------------------------------------------------------


class _WriterStore(SqliteStore):
    """The writer process's store: its ops come from the API processes' connections, and each
    transaction's results go back to the connections whose ops it held."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, shared=True, lock=False, compact_interval=0)
        self.owners: dict[asyncio.Future[Any], tuple[asyncio.StreamWriter, int]] = {}
        self._queued: list[_Op] = []

    def submit(self, writer: asyncio.StreamWriter, request: Any) -> None:
        """Queue one op; what arrived in one turn of the event loop commits together."""
        rid, kind, key, value, expected_revision, keep = request
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.owners[fut] = (writer, rid)
        self._queued.append(_Op(kind=kind, future=fut, key=key, value=value,
                                expected_revision=expected_revision, keep=keep))
        if len(self._queued) == 1:
            self._loop.call_soon(self._commit_queued)

    def _commit_queued(self) -> None:
        # On the event loop thread (this store has no writer thread): the process has nothing
        # else to do meanwhile (the next ops wait in the socket buffers), and nothing waits for
        # the GIL.
        queued, self._queued = self._queued, []
        for i in range(0, len(queued), _MAX_BATCH):
            self._run_batch(queued[i:i + _MAX_BATCH])

    def _writes_in_thread(self) -> bool:
        return False

    def _to_loop(self, callback: Callable[..., object], *args: object) -> None:
        callback(*args)  # from _commit_queued: already on the loop

    def _complete_batch(self, result: _BatchResult) -> None:
        self._revision = max(self._revision, result.revision)
        replies: dict[asyncio.StreamWriter, list[tuple[int, Any, Any]]] = {}
        for fut, value, exc in result.outcomes:
            owner = self.owners.pop(fut, None)
            if owner is None:
                continue
            writer, rid = owner
            plain = tuple(value) if isinstance(value, tuple) else value
            replies.setdefault(writer, []).append((rid, plain, _encode_error(exc)))
        events = [tuple(e) for e in result.events]
        for writer, outcomes in replies.items():
            if not writer.is_closing():
                writer.write(_frame((outcomes, events, result.revision, result.compacted)))


def _claim(store_path: Path) -> tuple[Path, Path, int]:
    """(the store's absolute path, the writer socket's path, the flock that makes this process
    the store's one writer process)."""
    store_path = store_path.resolve()
    sock = writer_socket(store_path)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    guard = exclusive_lock(f"{sock}.lock", f"another store writer process serves {store_path}")
    return store_path, sock, guard


async def serve_writer(store_path: Path) -> None:
    """Run the writer process of ``store_path`` until SIGTERM or SIGINT."""
    store_path, sock, guard = _claim(store_path)
    store = _WriterStore(store_path)
    await store.start()
    clients: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        clients.add(task)
        try:
            while True:
                store.submit(writer, await _read_frame(reader))
        except (asyncio.IncompleteReadError, OSError, StoreError, ValueError, EOFError):
            pass
        finally:
            clients.discard(task)
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    server = await asyncio.start_unix_server(handle, str(sock))
    os.chmod(sock, 0o600)
    logger.info("store writer serving %s at %s", store_path, sock)
    stop = stop_on_signals()
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(clients):
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await store.close()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        os.close(guard)
