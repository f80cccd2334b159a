"""Pieces of the SQLite store (:mod:`virtshift.store.sqlite`): row codecs, key-range SQL, the
writer's op and batch records, and the per-watcher event queues."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

from virtshift.store.base import Event, Record, Value

_EventType = Literal["PUT", "DELETE"]


class _RawEvent(NamedTuple):
    """An event as stored: values still JSON text, decoded per watcher (fresh dicts)."""

    revision: int
    type: _EventType
    key: str
    value: str
    prev_value: str | None  # for DELETE: None in storage, the deleted value when decoded
    create_revision: int


class _RawRecord(NamedTuple):
    key: str
    value: str
    revision: int
    create_revision: int


# datetimes, dataclasses and subclasses of str/int/dict/list are not JSON: let the strict encoder
# refuse them as it always did.
_STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
           | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _dumps(value: Value) -> str:
    """Compact JSON of a dict; ValueError for NaN/Infinity or strings SQLite cannot store.

    orjson does the common case. It writes NaN and Infinity as ``null`` and refuses integers
    beyond 64 bits, non-string keys and lone surrogates, so a value whose text holds ``null`` or
    that orjson refuses goes through the standard library's stricter encoder instead.
    """
    if not isinstance(value, dict):
        raise TypeError(f"store values must be dicts, not {type(value).__name__}")
    try:
        data = orjson.dumps(value, option=_STRICT)
    except TypeError:
        pass
    else:
        if b"null" not in data:
            return data.decode()
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    _check_utf8(text, "value")
    return text


def _meta(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def _revisions(conn: sqlite3.Connection) -> tuple[int, int]:
    """(revision, compacted revision) in one query."""
    meta = dict(conn.execute(
        "SELECT name, value FROM meta WHERE name IN ('revision', 'compacted')").fetchall())
    return int(meta.get("revision", 0)), int(meta.get("compacted", 0))


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text: {exc}") from None


def _loads(text: str | bytes) -> Value:
    value: Value = orjson.loads(text)
    return value


def _record(raw: _RawRecord) -> Record:
    return Record(
        key=raw.key,
        value=_loads(raw.value),
        revision=raw.revision,
        create_revision=raw.create_revision,
    )


def _event(raw: _RawEvent) -> Event:
    if raw.type == "DELETE":
        prev: Value | None = _loads(raw.value)
    else:
        prev = None if raw.prev_value is None else _loads(raw.prev_value)
    return Event(
        type=raw.type,
        key=raw.key,
        value=_loads(raw.value),
        revision=raw.revision,
        create_revision=raw.create_revision,
        prev_value=prev,
    )


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``.

    SQLite compares TEXT byte-wise (UTF-8), which orders like code points, so incrementing the
    last code point that can be incremented gives the exclusive upper bound of a prefix range.
    ``None`` means no upper bound (empty prefix, or only U+10FFFF characters).
    """
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _range_sql(prefix: str) -> tuple[str, list[Any]]:
    """SQL condition (and its parameters) selecting keys that start with ``prefix``."""
    upper = prefix_upper_bound(prefix)
    if upper is None:
        return "key >= ?", [prefix]
    return "key >= ? AND key < ?", [prefix, upper]


# --- writer ops ---------------------------------------------------------------------------------


@dataclass
class _Op:
    kind: Literal["create", "update", "delete", "compact"]
    future: asyncio.Future[Any]
    key: str = ""
    value: str = ""
    expected_revision: int | None = None
    keep: int = 0


@dataclass
class _BatchResult:
    """What the writer thread hands back to the event loop after one transaction."""

    outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = field(
        default_factory=lambda: []
    )
    events: list[_RawEvent] = field(default_factory=lambda: [])
    revision: int = 0
    compacted: int = 0


# --- watchers -----------------------------------------------------------------------------------


class _Watcher:
    """A live subscription: a bounded queue of raw events, filled on the event loop thread."""

    def __init__(self, prefix: str, maxsize: int) -> None:
        self.prefix = prefix
        self.maxsize = maxsize
        self.queue: deque[_RawEvent] = deque()
        self.ended = False
        self.overflowed = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, raw: _RawEvent) -> bool:
        """Queue an event; False when the watcher is (now) ended."""
        if self.ended:
            return False
        if len(self.queue) >= self.maxsize:
            self.overflowed = True
            self.end()
            return False
        self.queue.append(raw)
        self._wake()
        return True

    def end(self) -> None:
        self.ended = True
        self.queue.clear()
        self._wake()

    def trim(self, upto: int) -> None:
        """Drop queued events already delivered (revision <= ``upto``)."""
        while self.queue and self.queue[0].revision <= upto:
            self.queue.popleft()

    async def get(self) -> _RawEvent | None:
        """The next live event, or None once the watcher is ended."""
        while not self.queue:
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.ended:
            return None
        return self.queue.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# Aliases for use inside SqliteStore, whose ``list`` method shadows the builtin in class scope.
_EventList = list[_RawEvent]
_OpList = list[_Op]


# --- the store ----------------------------------------------------------------------------------
