"""API server worker processes (``virtshift up --api-workers N``).

One Python process serves requests on one CPU. With ``--api-workers N``, ``virtshift up`` starts
N-1 more API server processes beside its own: each binds the same addresses with
``SO_REUSEPORT`` (the kernel spreads new connections over them), opens the same SQLite store in
shared mode and serves the whole API with the same credentials and certificates, read from the
data directory. The first process owns the store (its lock, compaction and checkpoints) and
writes the kubeconfigs; workers never bootstrap anything. Watches work on every process: each
publishes to its watchers what any process committed, in revision order.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from aiohttp import web

from virtshift.aio import stop_on_signals
from virtshift.apiserver.app import ApiServer
from virtshift.apiserver.auth import TokenAuthenticator
from virtshift.apiserver.pki import load_pki
from virtshift.apiserver.server import (
    COMPONENTS_KUBECONFIG,
    ConfigurationError,
    assemble,
    open_store,
    parse_listen,
    serving_context,
)
from virtshift.client import kubeconfig
from virtshift.errors import VirtshiftError

log = logging.getLogger(__name__)


def worker_argv(python: str, data_dir: Path, listening: tuple[str, ...],
                store_url: str | None) -> list[str]:
    """The command line of one worker serving ``listening`` (HOST:PORT, the first is the
    address clients use)."""
    argv = _component_argv(python, "api-worker", data_dir, store_url)
    for address in listening:
        argv += ["--listen", address]
    return argv


def store_writer_argv(python: str, data_dir: Path, store_url: str | None) -> list[str]:
    """The command line of the store writer process of ``virtshift up --api-workers N``."""
    return _component_argv(python, "store-writer", data_dir, store_url)


def _component_argv(python: str, command: str, data_dir: Path,
                    store_url: str | None) -> list[str]:
    argv = [python, "-m", "virtshift.cli.main", command, "--data-dir", str(data_dir)]
    if store_url:
        argv += ["--store", store_url]
    return argv


async def serve_worker(data_dir: Path, listening: list[str], store_url: str | None) -> None:
    """Serve until SIGTERM or SIGINT. Needs the data directory the first process prepared."""
    if not listening:
        raise ConfigurationError("an API worker needs at least one --listen address")
    pki = load_pki(data_dir / "pki")
    if not pki.serving_cert.exists():
        raise ConfigurationError(f"{data_dir} has no API server certificates: start "
                                 "`virtshift up` first; it starts its workers itself")
    auth = TokenAuthenticator(data_dir / "tokens.json")
    try:
        component_token = kubeconfig.load(data_dir / COMPONENTS_KUBECONFIG).token
    except kubeconfig.ConfigError as e:
        raise ConfigurationError(f"cannot read the components' credentials: {e}") from e
    store = open_store(store_url, data_dir, worker=True)
    await store.start()
    runner: web.AppRunner | None = None
    server: ApiServer | None = None
    try:
        server, _ = assemble(data_dir, store, pki, auth, component_token)
        host, port = parse_listen(listening[0])
        if host in ("0.0.0.0", "::"):  # as the first process reports a wildcard address
            host = "127.0.0.1"
        server.server_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        ssl_ctx: ssl.SSLContext = serving_context(pki)
        for address in listening:
            h, p = parse_listen(address)
            site = web.TCPSite(runner, h, p, ssl_context=ssl_ctx, reuse_address=True,
                               reuse_port=True)
            try:
                await site.start()
            except OSError as e:
                raise ConfigurationError(f"cannot listen on {address}: {e.strerror or e}"
                                         ) from e
        log.info("API worker serving %s", ", ".join(listening))
        stop = stop_on_signals()
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        if server is not None and server.vmi_proxy is not None:
            await server.vmi_proxy.close()
        await store.close()


def check_workers(count: int) -> int:
    if count < 1:
        raise VirtshiftError("--api-workers must be 1 or more")
    return count
