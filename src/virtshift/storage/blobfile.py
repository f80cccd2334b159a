"""Durable blob files shared by the image store (server side) and the node image cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any


def write_chunks(f: IO[bytes], hasher: Any, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``f``, feeding each to ``hasher`` too."""
    for c in chunks:
        hasher.update(c)
        f.write(c)


def sync_close(f: IO[bytes]) -> None:
    """Flush, fsync and close ``f``."""
    f.flush()
    os.fsync(f.fileno())
    f.close()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Remove a temporary file (quick; safe to call while a task is being cancelled)."""
    path.unlink(missing_ok=True)
