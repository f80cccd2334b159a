"""The Store protocol: revisioned key/value objects with watch, modelled on etcd.

One global revision counter increases by one on every successful write (create, update, delete);
that revision is the object's ``metadata.resourceVersion``. Values are JSON objects (dicts); the
store does not interpret them. Keys are strings such as
``/registry/kubevirt.io/virtualmachines/default/vm1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Value = dict[str, Any]


@dataclass(frozen=True)
class Record:
    key: str
    value: Value
    revision: int  # the revision of the last write to this key (mod revision)
    create_revision: int


@dataclass(frozen=True)
class Event:
    """One change. For ``DELETE``, ``value`` is the value the key held when it was deleted."""

    type: Literal["PUT", "DELETE"]
    key: str
    value: Value
    revision: int
    create_revision: int
    prev_value: Value | None  # None when the PUT created the key


@dataclass(frozen=True)
class ListResult:
    records: list[Record]
    revision: int  # the store's current revision when the list was read
    more: bool  # True when ``limit`` cut the result short
    remaining: int  # how many more keys match after the last returned one


class Store(Protocol):
    """What the API server needs from a store.

    Errors: ``KeyExists`` (create of an existing key), ``KeyNotFound`` (update/delete of a missing
    key), ``RevisionMismatch`` (compare-and-swap failed), ``Compacted`` (watch from a revision
    no longer in history). All in :mod:`virtshift.errors`.
    """

    async def start(self) -> None:
        """Open the store and start its background tasks (compaction)."""

    async def close(self) -> None:
        """Flush, stop background tasks, end every open watch, close."""

    @property
    def revision(self) -> int:
        """The current (latest committed) revision; 0 for an empty store."""

    @property
    def compacted_revision(self) -> int:
        """Watches must start after this revision; older ones raise ``Compacted``."""

    async def create(self, key: str, value: Value) -> Record:
        """Store a new key. Durable when it returns. The record may hold ``value`` itself: the
        caller gives it away."""

    async def get(self, key: str) -> Record | None: ...

    async def list(
        self, prefix: str, *, limit: int = 0, start_after: str | None = None
    ) -> ListResult:
        """Keys with ``prefix`` in key order, after ``start_after`` when given;
        ``limit`` 0 means all."""

    async def update(self, key: str, value: Value, expected_revision: int | None) -> Record:
        """Replace the value if the key's current revision is ``expected_revision``
        (``None``: unconditionally). Durable when it returns."""

    async def delete(self, key: str, expected_revision: int | None = None) -> Record:
        """Delete the key; returns the deleted record with the revision of the delete."""

    def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        """Every change to keys under ``prefix`` with revision > ``after_revision``, in revision
        order, first from history, then live, until the iterator is closed or the store closes.
        Raises ``Compacted`` (on first iteration) when ``after_revision`` < ``compacted_revision``.
        A watcher that falls too far behind is ended (the iterator stops); clients re-list."""

    async def compact(self, keep: int) -> int:
        """Drop history older than the newest ``keep`` revisions; returns the new compacted
        revision."""
