"""A group-commit batch planned at once gives each op the outcome it gets applied alone, in
order (store/sqlitebatch.py), and writes what that sequence leaves behind."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtshift.errors import KeyExists, KeyNotFound, RevisionMismatch
from virtshift.store import sqlitebatch
from virtshift.store.sqlite import _SCHEMA as SCHEMA
from virtshift.store.sqliteparts import _Op, _RawEvent, _RawRecord


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def op(loop: asyncio.AbstractEventLoop, kind: Any, key: str = "", value: str = "",
       expected: int | None = None, keep: int = 0) -> _Op:
    return _Op(kind=kind, future=loop.create_future(), key=key, value=value,
               expected_revision=expected, keep=keep)


def test_each_op_sees_the_ones_before_it(loop: asyncio.AbstractEventLoop) -> None:
    rows = {"/a": ("A1", 3, 2)}
    ops = [op(loop, "create", "/b", "B1"),            # rev 11
           op(loop, "create", "/b", "B2"),            # exists now
           op(loop, "update", "/a", "A2", expected=3),  # rev 12
           op(loop, "update", "/a", "A3", expected=3),  # stale now
           op(loop, "delete", "/b"),                  # rev 13
           op(loop, "update", "/b", "B3"),            # gone now
           op(loop, "create", "/b", "B4")]            # rev 14
    p = sqlitebatch.plan(ops, rows, 10, 0)
    assert [type(e).__name__ if e else v for v, e in p.outcomes] == [
        _RawRecord("/b", "B1", 11, 11), "KeyExists", _RawRecord("/a", "A2", 12, 2),
        "RevisionMismatch", _RawRecord("/b", "B1", 13, 11), "KeyNotFound",
        _RawRecord("/b", "B4", 14, 14)]
    assert p.events == [_RawEvent(11, "PUT", "/b", "B1", None, 11),
                        _RawEvent(12, "PUT", "/a", "A2", "A1", 2),
                        _RawEvent(13, "DELETE", "/b", "B1", None, 11),
                        _RawEvent(14, "PUT", "/b", "B4", None, 14)]
    assert p.upserts == {"/a": ("A2", 12, 2), "/b": ("B4", 14, 14)}
    assert p.deletes == [] and p.revision == 14 and p.compact_to is None
    mismatch = p.outcomes[3][1]
    assert isinstance(mismatch, RevisionMismatch) and mismatch.current == 12


def test_deletes_and_compaction(loop: asyncio.AbstractEventLoop) -> None:
    rows = {"/a": ("A", 1, 1), "/b": ("B", 2, 2)}
    ops = [op(loop, "delete", "/a", expected=1), op(loop, "compact", keep=5),
           op(loop, "create", "/c", "C"), op(loop, "delete", "/c"),
           op(loop, "compact", keep=100)]
    p = sqlitebatch.plan(ops, rows, 20, 4)
    assert p.deletes == ["/a"]  # /c came and went within the batch: nothing to write
    assert p.upserts == {}
    assert [v for v, _ in p.outcomes][1] == 16 and p.outcomes[4] == (16, None)
    assert p.compact_to == 16 and p.compacted == 16 and p.revision == 23


def test_failures_change_nothing(loop: asyncio.AbstractEventLoop) -> None:
    p = sqlitebatch.plan([op(loop, "update", "/x", "X"), op(loop, "delete", "/y"),
                          op(loop, "create", "/a", "A"), op(loop, "compact", keep=50)],
                         {"/a": ("A0", 1, 1)}, 7, 3)
    assert [type(e) for _, e in p.outcomes] == [KeyNotFound, KeyNotFound, KeyExists, type(None)]
    assert (p.events, p.upserts, p.deletes, p.revision, p.compact_to) == ([], {}, [], 7, None)


_KEYS = ["/k0", "/k1", "/k2"]
_OPS = st.lists(st.tuples(st.sampled_from(["create", "update", "delete"]),
                          st.sampled_from(_KEYS), st.none() | st.integers(0, 6)),
                min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(initial=st.sets(st.sampled_from(_KEYS)), spec=_OPS)
def test_a_planned_batch_ends_where_one_op_per_transaction_would(
        loop: asyncio.AbstractEventLoop, initial: set[str],
        spec: list[tuple[str, str, int | None]]) -> None:
    """Against a reference: each op applied alone with plain SQL, in order."""
    def fresh() -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.executescript(SCHEMA)
        for i, key in enumerate(sorted(initial)):
            conn.execute("INSERT INTO objects VALUES (?, ?, ?, ?)", (key, f"v{i}", i + 1, i + 1))
        return conn

    ops = [op(loop, kind, key, f"{kind}-{n}", expected)
           for n, (kind, key, expected) in enumerate(spec)]
    ref = fresh()
    rev, want = len(initial), []
    for o in ops:
        row = ref.execute("SELECT value, revision FROM objects WHERE key = ?", (o.key,)).fetchone()
        if o.kind == "create":
            ok = row is None
        else:
            ok = row is not None and o.expected_revision in (None, row[1])
        want.append(ok)
        if not ok:
            continue
        rev += 1
        if o.kind == "create":
            ref.execute("INSERT INTO objects VALUES (?, ?, ?, ?)", (o.key, o.value, rev, rev))
        elif o.kind == "update":
            ref.execute("UPDATE objects SET value = ?, revision = ? WHERE key = ?",
                        (o.value, rev, o.key))
        else:
            ref.execute("DELETE FROM objects WHERE key = ?", (o.key,))

    got = fresh()
    got.execute("BEGIN")
    p = sqlitebatch.plan(ops, sqlitebatch.read_rows(got, ops), len(initial), 0)
    sqlitebatch.write(got, p)
    got.execute("COMMIT")
    assert [e is None for _, e in p.outcomes] == want
    assert p.revision == rev
    assert [r.revision for r in p.events] == list(range(len(initial) + 1, rev + 1))
    query = "SELECT key, value, revision FROM objects ORDER BY key"
    assert got.execute(query).fetchall() == ref.execute(query).fetchall()
    assert got.execute("SELECT count(*) FROM events").fetchone()[0] == rev - len(initial)
