"""``virtshift up``: the API server, the controller and node agents in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from virtshift.api.kinds import REGISTRY
from virtshift.apiserver.server import start_api_server
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.controller.manager import run_controllers

log = logging.getLogger(__name__)


async def up(data_dir: Path, listen: str, *, nodes: int, accel: str,
             store_url: str | None) -> None:
    api = await start_api_server(data_dir, listen, store_url=store_url)
    tune_gc()
    client = Client(kubeconfig.load(api.components_kubeconfig),
                    user_agent="virtshift-controller")
    tasks = [asyncio.create_task(run_controllers(client, REGISTRY), name="controllers")]
    for i in range(1, nodes + 1):
        agent = AgentProcess(f"node{i:02d}", data_dir, api.components_kubeconfig,
                             api.agent_token_file,
                             accel)
        tasks.append(asyncio.create_task(agent.run(), name=f"agent-{agent.node}"))
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


class AgentProcess:
    """One node agent as its own process (``virtshift agent``), restarted when it exits: VMs
    keep running meanwhile and the new agent re-attaches to them."""

    def __init__(self, node: str, data_dir: Path, kubeconfig_path: Path, token_file: Path,
                 accel: str) -> None:
        self.node = node
        self.data_dir = data_dir / "nodes" / node
        self.argv = [sys.executable, "-m", "virtshift.cli.main", "--kubeconfig",
                     str(kubeconfig_path), "agent", "--node-name", node,
                     "--data-dir", str(self.data_dir),
                     "--accel", accel, "--proxy-token-file", str(token_file)]

    async def run(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.data_dir / "agent.pid"
        backoff = 0.5
        while True:
            started = asyncio.get_running_loop().time()
            proc = await asyncio.create_subprocess_exec(*self.argv, preexec_fn=_die_with_parent)
            pidfile.write_text(f"{proc.pid}\n")
            try:
                code = await proc.wait()
            except asyncio.CancelledError:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 10)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
                raise
            ran = asyncio.get_running_loop().time() - started
            backoff = 0.5 if ran > 30 else min(backoff * 2, 10.0)
            log.warning("node agent %s exited with %s; restarting in %.1fs", self.node, code,
                        backoff)
            await asyncio.sleep(backoff)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the platform process dies, even by kill -9 (the agent then
    detaches from its VMs, which keep running)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


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
