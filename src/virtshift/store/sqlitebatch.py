"""One group-commit transaction of SqliteStore in a fixed number of statements.

The writer thread gives up the GIL around every SQLite call and must take it back afterwards,
which costs up to a switch interval while the event loop thread is busy; and the transaction
holds the database's write lock (and, shared, the other processes' flock) all that time. So a
batch is not applied op by op: :func:`read_rows` reads every row the batch touches in one
query, :func:`plan` (pure) works out each op's outcome and the batch's writes in Python, and
:func:`write` writes them in one statement per table. Ops see the batch's earlier ops exactly
as if each had been applied alone, in order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtshift.errors import KeyExists, KeyNotFound, RevisionMismatch
from virtshift.store.sqliteparts import _Op, _RawEvent, _RawRecord

Row = tuple[str, int, int]
"""An object row: (value, revision, create_revision)."""

_CHUNK = 500  # rows per statement: far below SQLite's limit on parameters (32,766 and up)


@dataclass
class Plan:
    """What one batch does: each op's outcome, in order, and the writes that make it so."""

    outcomes: list[tuple[Any, BaseException | None]] = field(default_factory=lambda: [])
    events: list[_RawEvent] = field(default_factory=lambda: [])
    upserts: dict[str, Row] = field(default_factory=lambda: {})
    deletes: list[str] = field(default_factory=lambda: [])
    compact_to: int | None = None  # delete the events up to this revision
    revision: int = 0
    compacted: int = 0


def plan(ops: Sequence[_Op], rows: Mapping[str, Row], revision: int, compacted: int) -> Plan:
    """The outcomes and writes of ``ops`` applied in order to the objects ``rows`` (every
    existing row of a key the ops name), starting at ``revision``/``compacted``."""
    out = Plan(revision=revision, compacted=compacted)
    state: dict[str, Row | None] = dict(rows)  # None: deleted by this batch
    for op in ops:
        if op.kind == "compact":
            target = max(out.compacted, out.revision - op.keep)
            if target > out.compacted:
                out.compacted = out.compact_to = target
            out.outcomes.append((target, None))
            continue
        key = op.key
        current = state.get(key)
        if op.kind == "create":
            if current is not None:
                out.outcomes.append((None, KeyExists(f"key {key!r} exists")))
                continue
            rev = out.revision + 1
            state[key] = (op.value, rev, rev)
            out.events.append(_RawEvent(rev, "PUT", key, op.value, None, rev))
            out.outcomes.append((_RawRecord(key, op.value, rev, rev), None))
            out.revision = rev
            continue
        if current is None:
            out.outcomes.append((None, KeyNotFound(f"key {key!r} not found")))
            continue
        old_value, old_rev, create_rev = current
        if op.expected_revision is not None and op.expected_revision != old_rev:
            out.outcomes.append((None, RevisionMismatch(old_rev)))
            continue
        rev = out.revision + 1
        if op.kind == "update":
            state[key] = (op.value, rev, create_rev)
            out.events.append(_RawEvent(rev, "PUT", key, op.value, old_value, create_rev))
            out.outcomes.append((_RawRecord(key, op.value, rev, create_rev), None))
        else:
            state[key] = None
            out.events.append(_RawEvent(rev, "DELETE", key, old_value, None, create_rev))
            out.outcomes.append((_RawRecord(key, old_value, rev, create_rev), None))
        out.revision = rev
    for key, final in state.items():
        if final is None:
            if key in rows:
                out.deletes.append(key)
        elif rows.get(key) != final:
            out.upserts[key] = final
    return out


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def read_rows(conn: sqlite3.Connection, ops: Sequence[_Op]) -> dict[str, Row]:
    """The existing rows of every key ``ops`` name, in one query (per 500 keys)."""
    keys = list(dict.fromkeys(op.key for op in ops if op.kind != "compact"))
    rows: dict[str, Row] = {}
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        for key, value, revision, create_revision in conn.execute(
            "SELECT key, value, revision, create_revision FROM objects"
            f" WHERE key IN ({marks})", chunk,
        ):
            rows[key] = (value, revision, create_revision)
    return rows


def write(conn: sqlite3.Connection, p: Plan) -> int:
    """Write ``p``'s objects and events (not the meta row); the number of events compacted."""
    upserts = [(k, *row) for k, row in p.upserts.items()]
    for chunk in _chunks(upserts):
        conn.execute(
            "INSERT INTO objects (key, value, revision, create_revision) VALUES "
            + ",".join(["(?, ?, ?, ?)"] * len(chunk))
            + " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " revision = excluded.revision, create_revision = excluded.create_revision",
            [v for row in chunk for v in row],
        )
    for chunk in _chunks(p.deletes):
        conn.execute(f"DELETE FROM objects WHERE key IN ({','.join('?' * len(chunk))})", chunk)
    compacted_rows = 0
    if p.compact_to is not None:
        # Before this batch's events are written, as when each op ran alone.
        compacted_rows = max(0, conn.execute(
            "DELETE FROM events WHERE revision <= ?", (p.compact_to,)).rowcount)
    for chunk in _chunks(p.events):
        conn.execute(
            "INSERT INTO events (revision, key, type, value, prev_value, create_revision) VALUES "
            + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
            [v for e in chunk
             for v in (e.revision, e.key, e.type, e.value, e.prev_value, e.create_revision)],
        )
    return compacted_rows

