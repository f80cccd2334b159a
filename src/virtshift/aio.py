"""Small asyncio helpers shared by the components (owned tasks, cancelled on exit)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Iterable
from typing import Any


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them to end."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await t


async def until_first(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` as tasks until one of them ends, then cancel the others (e.g. the two
    directions of a proxied stream)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stop_tasks(tasks)


def stop_on_signals() -> asyncio.Event:
    """An event set when the process gets SIGINT or SIGTERM (a component's way to stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
