"""``virtshift up``: the API server, the controller and node agents in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from pathlib import Path

from virtshift.api.kinds import REGISTRY
from virtshift.apiserver.server import start_api_server
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.controller.gc import GarbageCollector

log = logging.getLogger(__name__)


async def up(data_dir: Path, listen: str, *, nodes: int, accel: str,
             store_url: str | None) -> None:
    api = await start_api_server(data_dir, listen, store_url=store_url)
    tune_gc()
    client = Client(kubeconfig.load(api.kubeconfig), user_agent="virtshift-controller")
    tasks = [asyncio.create_task(GarbageCollector(client, REGISTRY).run(), name="gc")]
    if nodes:
        log.warning("node agents are not part of this build yet: running the control plane only "
                    "(--nodes %d, accel %s)", nodes, accel)
    print(f"virtshift is up: API {api.url}", flush=True)
    print(f"  kubectl --kubeconfig {api.kubeconfig} get namespaces", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        done_waiter = asyncio.create_task(stop.wait())
        finished, _ = await asyncio.wait([done_waiter, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
        for t in finished:
            if t is not done_waiter and t.exception() is not None:
                log.error("component %s failed: %s", t.get_name(), t.exception())
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await client.close()
        await api.stop()


def tune_gc() -> None:
    """The API server allocates many short-lived JSON trees, which are freed by reference
    counting; the cyclic collector's default thresholds would otherwise re-scan every live
    object thousands of times a second under load (measured: a 1,000-object list took 4x
    longer). Objects alive after start-up are frozen out of collection entirely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def default_accel() -> str:
    return os.environ.get("VIRTSHIFT_ACCEL", "auto")
