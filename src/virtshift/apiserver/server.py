"""Starting the API server: store, credentials, TLS, bootstrap objects, kubeconfig."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from virtshift import native
from virtshift.api.bootstrap import ca_cert_hash
from virtshift.api.kinds import REGISTRY, Registry
from virtshift.api.schema import SchemaSet, default_schemas
from virtshift.apiserver.app import ApiServer
from virtshift.apiserver.auth import (
    ADMIN_GROUPS,
    ADMIN_USER,
    COMPONENT_USER,
    TokenAuthenticator,
    UserInfo,
)
from virtshift.apiserver.join import JoinService, ensure_join_token
from virtshift.apiserver.pki import Pki, ensure_pki
from virtshift.apiserver.resources import WriteContext
from virtshift.apiserver.upload import register_upload
from virtshift.apiserver.vmiproxy import VMIProxy
from virtshift.client import kubeconfig
from virtshift.errors import AlreadyExists, VirtshiftError
from virtshift.storage.imagestore import register_image_store
from virtshift.store.base import Store
from virtshift.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

BOOTSTRAP_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class ConfigurationError(VirtshiftError):
    pass


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None


def open_store(url: str | None, data_dir: Path, *, workers: int = 1,
               worker: bool = False) -> Store:
    """The store at ``url`` (default: ``DATA_DIR/store.db``). With more than one API server
    process (``workers``), every process opens it shared and writes through the store writer
    process; only the first owns it (its lock and compaction)."""
    # Tuning for tests and small machines: how many revisions of history watches can resume
    # from, and how often old history is compacted away.
    history = int(_env_number("VIRTSHIFT_STORE_HISTORY", 10000))
    interval = 0.0 if worker else _env_number("VIRTSHIFT_COMPACT_INTERVAL", 60.0)
    shared = worker or workers > 1
    # Shared, the writes go through the store writer process (store/sqliteremote.py).
    return SqliteStore(store_path(url, data_dir), history=history, compact_interval=interval,
                       shared=shared, lock=not worker, remote_writer=shared)


def store_path(url: str | None, data_dir: Path) -> Path:
    """The SQLite file of the store at ``url`` (default: ``DATA_DIR/store.db``)."""
    if not url:
        return data_dir / "store.db"
    if url.startswith("sqlite://"):
        return Path(url[len("sqlite://"):])
    raise ConfigurationError(f"unsupported --store {url!r}: use sqlite:///PATH")


@dataclass
class RunningApiServer:
    runner: web.AppRunner
    store: Store
    server: ApiServer
    url: str
    kubeconfig: Path
    pki: Pki
    join_token: str = ""
    node_url: str | None = None
    """Where node agents reach the API on the node network (``node_address``), if anywhere."""
    listening: tuple[str, ...] = ()
    """Every HOST:PORT served (API worker processes serve the same)."""

    @property
    def ca_cert_hash(self) -> str:
        return ca_cert_hash(self.pki.ca_pem())

    @property
    def components_kubeconfig(self) -> Path:
        """Credentials of virtshift's own controllers and node agents (KubeVirt's service
        accounts: admission lets them manage VMIs' specs and reserved labels)."""
        return self.kubeconfig.parent / COMPONENTS_KUBECONFIG

    @property
    def agent_token_file(self) -> Path:
        return self.kubeconfig.parent / AGENT_TOKEN_FILE

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.server.vmi_proxy is not None:
            await self.server.vmi_proxy.close()
        await self.store.close()


AGENT_TOKEN_FILE = "agent-proxy-token"


def agent_proxy_token(data_dir: Path) -> str:
    """The secret the API server presents to node agents (created on first start, 0600)."""
    path = data_dir / AGENT_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


COMPONENTS_KUBECONFIG = "components.kubeconfig"
ADMIN = UserInfo(ADMIN_USER, "", ADMIN_GROUPS)


def _admin_token(data_dir: Path, auth: TokenAuthenticator, *, file: str = "kubeconfig",
                 user: UserInfo = ADMIN) -> str:
    """Reuse the token of an existing kubeconfig; issue one on first start."""
    path = data_dir / file
    if path.exists():
        try:
            cfg = kubeconfig.load(path)
            if auth.authenticate(cfg.token) is not None:
                return cfg.token
        except kubeconfig.ConfigError as e:
            log.warning("ignoring unreadable kubeconfig: %s", e)
    return auth.issue(user)


def _prepare(data_dir: Path, hosts: list[str]) -> tuple[Pki, TokenAuthenticator, str, str]:
    """The data directory, certificates, the admin credential and the components' credential
    (blocking file work)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pki = ensure_pki(data_dir / "pki", hosts)
    auth = TokenAuthenticator(data_dir / "tokens.json")
    return (pki, auth, _admin_token(data_dir, auth),
            _admin_token(data_dir, auth, file=COMPONENTS_KUBECONFIG, user=COMPONENT_USER))


async def bootstrap(server: ApiServer) -> None:
    ns_kind = server.registry.by_kind("", "v1", "Namespace")
    assert ns_kind is not None
    ctx = WriteContext(UserInfo(ADMIN_USER, "", ADMIN_GROUPS), field_manager="virtshift")
    for ns in BOOTSTRAP_NAMESPACES:
        with contextlib.suppress(AlreadyExists):
            await server.resources.create(
                ns_kind, None, {"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": ns}}, ctx)


def assemble(data_dir: Path, store: Store, pki: Pki, auth: TokenAuthenticator,
             component_token: str, *, registry: Registry = REGISTRY,
             schemas: SchemaSet | None = None) -> tuple[ApiServer, str]:
    """The API server with every handler registered (image store, console proxy, uploads,
    node join), and its join token. Each API server process builds the same."""
    server = ApiServer(store, registry, schemas or default_schemas(), auth)
    register_image_store(server, data_dir)
    proxy_token = agent_proxy_token(data_dir)
    server.vmi_proxy = VMIProxy(server.resources, registry, proxy_token,
                                ssl.create_default_context(cafile=str(pki.ca_cert)))
    register_upload(server, data_dir, proxy_token=proxy_token,
                    agent_tls=ssl.create_default_context(cafile=str(pki.ca_cert)))
    join_token = ensure_join_token(data_dir)
    server.bootstrap = JoinService(pki, auth, join_token=join_token, api_token=component_token,
                                   proxy_token=proxy_token).handle
    return server, join_token


def serving_context(pki: Pki) -> ssl.SSLContext:
    ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ssl_ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    return ssl_ctx


async def start_api_server(
    data_dir: Path,
    listen: str = "127.0.0.1:6443",
    *,
    store_url: str | None = None,
    registry: Registry = REGISTRY,
    schemas: SchemaSet | None = None,
    node_address: str | None = None,
    workers: int = 1,
) -> RunningApiServer:
    """Serve on ``listen`` and, when given, also on ``node_address`` (the platform's address
    on the node network; the same port when it is free there). The serving certificate
    covers both. ``workers`` > 1: more API server processes will share the store and the
    ports (``SO_REUSEPORT``; see :mod:`virtshift.apiserver.worker`)."""
    host, port = parse_listen(listen)
    hosts = [host, *([node_address] if node_address else [])]
    if host in ("0.0.0.0", "::"):
        hosts += _host_addresses()
    pki, auth, token, component_token = _prepare(data_dir, hosts)
    store = open_store(store_url, data_dir, workers=workers)
    await store.start()
    server, join_token = assemble(data_dir, store, pki, auth, component_token,
                                  registry=registry, schemas=schemas)
    await bootstrap(server)
    ssl_ctx = serving_context(pki)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    reuse_port = workers > 1 or None
    site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, reuse_address=True,
                       reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await store.close()
        raise ConfigurationError(f"cannot listen on {listen}: {e.strerror or e}") from e
    actual_port = port
    sockets = getattr(site._server, "sockets", None) or []  # asyncio's or uvloop's Server
    if sockets:
        actual_port = int(sockets[0].getsockname()[1])
    url_host = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        url_host = "127.0.0.1"
    url = f"https://{url_host}:{actual_port}"
    node_url = None
    listening = [f"{host}:{actual_port}"]
    if node_address and host in ("0.0.0.0", "::"):
        node_url = f"https://{node_address}:{actual_port}"  # the wildcard covers it
    elif node_address:
        try:
            node_port = await _listen_also(runner, node_address, actual_port, ssl_ctx,
                                           reuse_port=reuse_port)
        except OSError as e:
            await runner.cleanup()
            await store.close()
            raise ConfigurationError(f"cannot listen on the node network address "
                                     f"{node_address}: {e.strerror or e}") from e
        node_url = f"https://{node_address}:{node_port}"
        listening.append(f"{node_address}:{node_port}")
    server.server_address = f"{url_host}:{actual_port}"
    cfg_path = data_dir / "kubeconfig"
    kubeconfig.write(data_dir / COMPONENTS_KUBECONFIG,
                     kubeconfig.render(url, pki.ca_pem(), component_token))
    kubeconfig.write(cfg_path, kubeconfig.render(url, pki.ca_pem(), token))
    log.info("API server listening on %s; kubeconfig at %s; hot modules: %s", url, cfg_path,
             native.state)
    return RunningApiServer(runner, store, server, url, cfg_path, pki, join_token, node_url,
                            tuple(listening))


async def _listen_also(runner: web.AppRunner, host: str, port: int,
                       ssl_ctx: ssl.SSLContext, *, reuse_port: bool | None = None) -> int:
    """Serve ``runner`` on ``host`` too: on ``port`` when free there, else on any port."""
    for candidate in (port, 0):
        site = web.TCPSite(runner, host, candidate, ssl_context=ssl_ctx, reuse_address=True,
                           reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:
            if candidate == 0:
                raise
            continue
        sockets = getattr(site._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else candidate
    raise AssertionError("unreachable")


def _host_addresses() -> list[str]:
    """This machine's name and addresses, for a certificate served on a wildcard address."""
    name = socket.gethostname()
    out = [name]
    with contextlib.suppress(OSError):
        out += [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
    return out
