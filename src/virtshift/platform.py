"""``virtshift up``: the API server, the controller and node agents in the foreground."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from virtshift import nodenet
from virtshift.aio import stop_on_signals, stop_tasks
from virtshift.apiserver.pki import ensure_node_cert
from virtshift.apiserver.server import start_api_server
from virtshift.apiserver.worker import check_workers, store_writer_argv, worker_argv

log = logging.getLogger(__name__)


async def up(data_dir: Path, listen: str, *, nodes: int, accel: str,
             store_url: str | None, controllers: bool = True,
             node_network: str = "auto", hostdisk_dirs: tuple[Path, ...] = (),
             api_workers: int = 1) -> None:
    check_workers(api_workers)
    names = [nodenet.node_name(i) for i in range(1, nodes + 1)]
    mode = nodenet.choose_mode(node_network, nodes)
    net = await asyncio.to_thread(nodenet.prepare, data_dir, names) if mode == "netns" else None
    # With several API processes, one process commits all their writes (sqliteremote.py); it
    # runs before the API server, whose bootstrap writes through it, and stops after it.
    writer = (ChildProcess("store writer", store_writer_argv(sys.executable, data_dir, store_url),
                           data_dir / "store-writer.pid") if api_workers > 1 else None)
    writer_task = asyncio.create_task(writer.run(), name=writer.name) if writer else None
    try:
        api = await start_api_server(data_dir, listen, store_url=store_url,
                                     node_address=net.gateway if net else None,
                                     workers=api_workers)
    except BaseException:
        if writer_task is not None:
            await stop_tasks([writer_task])
        if net is not None:
            await asyncio.to_thread(net.teardown)
        raise
    tune_gc()
    base = [sys.executable, "-m", "virtshift.cli.main", "--kubeconfig",
            str(api.components_kubeconfig)]
    children = [ChildProcess(f"api worker {i}",
                             worker_argv(sys.executable, data_dir, api.listening, store_url),
                             data_dir / f"api-worker-{i}.pid")
                for i in range(1, api_workers)]
    if controllers:
        children.append(ChildProcess("controller", [*base, "controller"],
                                     data_dir / "controller.pid"))
    for i, node in enumerate(names, start=1):
        node_dir = data_dir / "nodes" / node
        if net is not None:
            assert api.node_url is not None
            # As a remote node would: over the node network, bootstrapped by the join token.
            argv = ["ip", "netns", "exec", net.netns(node), sys.executable, "-m",
                    "virtshift.cli.main", "node", "join", "--server", api.node_url,
                    "--token", api.join_token, "--ca-cert-hash", api.ca_cert_hash,
                    "--node-name", node, "--address", net.address(node),
                    "--data-dir", str(node_dir), "--accel", accel]
        else:
            address = nodenet.loopback_address(i, nodes)
            cert, key = ensure_node_cert(api.pki, node, [address])
            argv = [*base, "agent", "--node-name", node, "--data-dir", str(node_dir),
                    "--address", address, "--accel", accel, "--proxy-token-file",
                    str(api.agent_token_file), "--tls-cert", str(cert), "--tls-key", str(key)]
        for shared in hostdisk_dirs:  # e.g. a mount every node shares (hostDisk shared: true)
            argv += ["--hostdisk-dir", str(shared)]
        children.append(ChildProcess(f"agent {node}", argv, node_dir / "agent.pid"))
    tasks = [asyncio.create_task(c.run(), name=c.name) for c in children]
    print(f"virtshift is up: API {api.url}", flush=True)
    if net is not None:
        print(f"  nodes: network namespaces {net.netns('nodeNN')} on bridge {net.bridge} "
              f"({net.subnet}); the API is also at {api.node_url}", flush=True)
    print(f"  kubectl --kubeconfig {api.kubeconfig} get namespaces", flush=True)
    print("  to add a node (from a machine that reaches the API; see docs/nodes.md):",
          flush=True)
    print(f"  virtshift node join --server {api.url} --token {api.join_token} "
          f"--ca-cert-hash {api.ca_cert_hash}", flush=True)
    stop = stop_on_signals()
    try:
        await stop.wait()
    finally:
        await stop_tasks(tasks)
        await api.stop()
        if writer_task is not None:
            await stop_tasks([writer_task])
        if net is not None:
            kept = await asyncio.to_thread(net.teardown)
            if kept:
                log.warning("keeping the node network: VMs still run in %s", ", ".join(kept))


class ChildProcess:
    """A component in its own process (the controller, ``virtshift controller``; a node agent,
    ``virtshift agent``), restarted with backoff when it exits. A node agent's VMs keep
    running meanwhile and the new agent re-attaches to them. The child gets SIGTERM if the
    platform dies, even by kill -9."""

    def __init__(self, name: str, argv: list[str], pidfile: Path) -> None:
        self.name = name
        self.argv = argv
        self.pidfile = pidfile

    async def run(self) -> None:
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        backoff = 0.5
        while True:
            started = asyncio.get_running_loop().time()
            proc = await asyncio.create_subprocess_exec(*self.argv, preexec_fn=_die_with_parent)
            fresh = self.pidfile.with_name(self.pidfile.name + ".new")
            fresh.write_text(f"{proc.pid}\n")
            fresh.replace(self.pidfile)  # readers never see it empty
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
            log.warning("%s exited with %s; restarting in %.1fs", self.name, code, backoff)
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
