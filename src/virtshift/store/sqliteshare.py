"""Wake-ups between processes that share one SQLite store file (``SqliteStore(shared=True)``).

Each sharing store binds a Unix datagram socket in a directory named after the store file, and
after every commit its writer thread sends one byte to every other socket there. The receiving
store then reads the new events from the database (the datagram carries no data, so a lost or
coalesced one costs nothing but latency; a slow poll covers that). Socket paths must stay under
108 bytes, so the directory lives in ``$XDG_RUNTIME_DIR`` or ``/tmp``, keyed by a hash of the
store's absolute path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtshift.errors import StoreError

_INBOX_NAME = re.compile(r"^[0-9]+-[0-9a-f]{8}$")  # the directory holds other files too
_RELIST_SECONDS = 1.0


def owner_lock(store_path: Path) -> int:
    """Take the exclusive ``flock`` on ``<store>.lock`` that makes a process the file's one
    owner (or its only user); the returned descriptor holds it until closed."""
    return exclusive_lock(f"{store_path}.lock", f"{store_path} is in use by another store")


def exclusive_lock(path: str, taken: str) -> int:
    """An exclusive ``flock`` on ``path`` (created), held until the descriptor is closed;
    StoreError(``taken``) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(taken) from None
    return fd


def notify_dir(store_path: Path) -> Path:
    digest = hashlib.sha256(str(store_path.resolve()).encode()).hexdigest()[:20]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"virtshift-{os.getuid()}" / digest


class Notifier:
    def __init__(self, store_path: Path) -> None:
        self.dir = notify_dir(store_path)
        self.path: Path | None = None
        self.inbox: socket.socket | None = None
        self._outbox: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: list[Path] = []  # the stores' inboxes, listed at most once a second
        self._listed_at = 0.0

    def open(self, loop: asyncio.AbstractEventLoop, on_wake: Callable[[], None]) -> None:
        """Bind this store's socket and call ``on_wake`` on ``loop`` when it is woken."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.setblocking(False)
        path = self.dir / f"{os.getpid()}-{secrets.token_hex(4)}"  # (see _INBOX_NAME)
        try:
            inbox.bind(str(path))
        except OSError:
            inbox.close()
            raise
        outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        outbox.setblocking(False)
        self.inbox, self._outbox, self.path = inbox, outbox, path
        self._loop = loop
        loop.add_reader(inbox.fileno(), on_wake)

    def drain(self) -> None:
        """Discard the pending wake-ups (the caller then reads the database once)."""
        assert self.inbox is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.inbox.recv(64):
                pass

    def notify_others(self) -> None:
        """Wake every other store on the file. Writer thread; never raises."""
        if self._outbox is None:
            return
        now = time.monotonic()
        if now - self._listed_at > _RELIST_SECONDS:  # a new store waits for this (or its poll)
            try:
                self._targets = [self.dir / name for name in os.listdir(self.dir)
                                 if _INBOX_NAME.match(name)]
            except OSError:
                return
            self._listed_at = now
        for target in self._targets:
            if target == self.path:
                continue
            try:
                self._outbox.sendto(b".", str(target))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    target.unlink()  # left behind by a process that died
                self._listed_at = 0.0
            except OSError:
                pass  # its queue is full (it has wake-ups pending) or it is going away

    def close(self) -> None:
        if self._loop is not None and self.inbox is not None:
            self._loop.remove_reader(self.inbox.fileno())
        for sock in (self.inbox, self._outbox):
            if sock is not None:
                sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # only when no other store is left on the file
        self.inbox = self._outbox = self.path = None
