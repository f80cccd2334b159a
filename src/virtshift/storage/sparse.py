"""Copying sparse files fast: a reflink where the filesystem shares extents (XFS, btrfs), else
``copy_file_range`` over the data extents only (``SEEK_DATA``/``SEEK_HOLE``), holes left as
holes. Used by the importer's file source (clones, restores) and by snapshots."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable

FICLONE = 0x40049409  # ioctl: share all extents of another file

Extents = list[tuple[int, int]]


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` share ``src_fd``'s extents; False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError:
        return False
    return True


def data_extents(fd: int, size: int) -> Extents:
    """The (start, end) ranges of ``fd`` holding data."""
    out: Extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole after pos
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def copy_extents(src_fd: int, dst_fd: int, extents: Extents, step: int,
                 after: Callable[[int, int], None] | None = None) -> int:
    """Copy ``extents`` of ``src_fd`` to the same offsets of ``dst_fd``, ``step`` bytes at a
    time, calling ``after(offset, length)`` for each piece; returns the bytes copied."""
    copied = 0
    for start, end in extents:
        pos = start
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, min(end - pos, step), pos, pos)
            if n == 0:
                break
            if after is not None:
                after(pos, n)
            pos += n
            copied += n
    return copied
