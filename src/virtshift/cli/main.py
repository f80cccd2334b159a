"""``virtshift``: run the platform and act on it (virtctl's verbs).

Each command family lives in its own module under ``virtshift.cli`` exposing
``register(subparsers)``; the module adds its subcommands with ``set_defaults(func=...)``,
where ``func(args) -> int`` is the exit code. Errors are :class:`VirtshiftError`: one line on
stderr, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop

from virtshift import __version__
from virtshift.client.kubeconfig import default_home
from virtshift.errors import VirtshiftError

# Command families, each a module with register(subparsers).
COMMAND_MODULES = ("virtshift.cli.images", "virtshift.cli.vm", "virtshift.cli.createvm",
                   "virtshift.cli.migrate", "virtshift.cli.nodes", "virtshift.cli.upload")


def _up(args: argparse.Namespace) -> int:
    from virtshift.platform import default_accel, up

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.nodes < 0:
        raise VirtshiftError("--nodes must be 0 or more")
    workers = args.api_workers if args.api_workers is not None else _env_workers()
    uvloop.run(up(args.data_dir or default_home(), args.listen, nodes=args.nodes,
                  controllers=not args.no_controllers, node_network=args.node_network,
                  accel=args.accel or default_accel(), store_url=args.store,
                  hostdisk_dirs=tuple(d.resolve() for d in args.hostdisk_dir),
                  api_workers=workers))
    return 0


def _env_workers() -> int:
    raw = os.environ.get("VIRTSHIFT_API_WORKERS", "") or "1"
    try:
        return int(raw)
    except ValueError:
        raise VirtshiftError(f"VIRTSHIFT_API_WORKERS must be a number, got {raw!r}") from None


def _api_worker(args: argparse.Namespace) -> int:
    from virtshift.apiserver.worker import serve_worker
    from virtshift.platform import tune_gc

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s api-worker %(name)s: %(message)s",
    )
    tune_gc()
    uvloop.run(serve_worker(args.data_dir, args.listen, args.store))
    return 0


def _store_writer(args: argparse.Namespace) -> int:
    from virtshift.apiserver.server import store_path
    from virtshift.store.sqliteremote import serve_writer

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s store-writer %(name)s: %(message)s",
    )
    uvloop.run(serve_writer(store_path(args.store, args.data_dir)))
    return 0


def _controller(args: argparse.Namespace) -> int:
    from virtshift.client import kubeconfig
    from virtshift.controller.manager import run

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s controller %(name)s: %(message)s",
    )
    uvloop.run(run(kubeconfig.locate(args.kubeconfig)))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from virtshift.agent.main import AgentConfig, NodeAgent
    from virtshift.client import kubeconfig
    from virtshift.platform import default_accel

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s agent[{args.node_name}] %(name)s: %(message)s",
    )
    config = AgentConfig(node_name=args.node_name, kubeconfig=kubeconfig.locate(args.kubeconfig),
                         data_dir=args.data_dir, address=args.address,
                         accel=args.accel or default_accel(),
                         proxy_token_file=args.proxy_token_file,
                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                         hostdisk_dirs=tuple(args.hostdisk_dir))
    uvloop.run(NodeAgent(config).run())
    return 0


def _node_join(args: argparse.Namespace) -> int:
    import socket

    from virtshift.agent.join import JoinOptions, join
    from virtshift.agent.main import NodeAgent
    from virtshift.platform import default_accel

    name = args.node_name or socket.gethostname().split(".")[0].lower()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s agent[{name}] %(name)s: %(message)s",
    )
    config = join(JoinOptions(
        server=args.server, token=args.token, ca_cert_hash=args.ca_cert_hash,
        insecure_skip_ca_verification=args.insecure_skip_ca_verification, node_name=name,
        address=args.address, data_dir=args.data_dir or default_home() / "node",
        accel=args.accel or default_accel(), hostdisk_dirs=tuple(args.hostdisk_dir)))
    uvloop.run(NodeAgent(config).run())
    return 0


def _add_node_join(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="this machine as a node of a cluster")
    verbs = node.add_subparsers(dest="node_command", required=True, metavar="VERB")
    j = verbs.add_parser("join", help="join a control plane with a join token and run a node "
                         "agent in the foreground (see docs/nodes.md)")
    j.add_argument("--server", required=True, help="the API server, https://HOST:PORT")
    j.add_argument("--token", required=True, help="the join token printed by virtshift up")
    j.add_argument("--ca-cert-hash", default=None, metavar="sha256:HEX",
                   help="the cluster CA's public key hash printed by virtshift up")
    j.add_argument("--insecure-skip-ca-verification", action="store_true",
                   help="join without --ca-cert-hash, trusting whatever CA the server shows")
    j.add_argument("--node-name", default=None, help="the Node's name (default: host name)")
    j.add_argument("--address", default=None,
                   help="the node's IP (default: the local address that reaches --server)")
    j.add_argument("--data-dir", type=Path, default=None,
                   help="the node's state directory (default $VIRTSHIFT_HOME/node)")
    j.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    j.add_argument("--hostdisk-dir", type=Path, action="append", default=[],
                   help="a directory hostDisk volumes may use (repeatable)")
    j.add_argument("-v", "--verbose", action="store_true")
    j.set_defaults(func=_node_join)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtshift", description="virtshift: KubeVirt's API and "
                                "real QEMU virtual machines, without a Kubernetes cluster")
    p.add_argument("--version", action="version", version=f"virtshift {__version__}")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig to use (default $KUBECONFIG, else the data dir's)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="run the platform in the foreground")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="state directory (default $VIRTSHIFT_HOME or ~/.virtshift)")
    up.add_argument("--listen", default="127.0.0.1:6443",
                    help="HOST:PORT for the API (default 127.0.0.1:6443; port 0 picks one)")
    up.add_argument("--nodes", type=int, default=1, help="node agents to run (0: control plane)")
    up.add_argument("--node-network", choices=("auto", "netns", "loopback"), default="auto",
                    help="where node agents live: netns (own network namespaces on a bridge), "
                         "loopback (127.0.1.N); auto: netns for several nodes when root")
    up.add_argument("--no-controllers", action="store_true",
                    help="serve the API and store only, without the controllers (to measure "
                         "or debug the API server alone)")
    up.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                    help="accelerator for VMs (default $VIRTSHIFT_ACCEL or auto)")
    up.add_argument("--store", default=None, help="store URL (default sqlite in the data dir)")
    up.add_argument("--hostdisk-dir", type=Path, action="append", default=[],
                    help="a directory every node's hostDisk volumes may use, such as a shared "
                         "mount (repeatable; default: DIR/nodes/NODE/hostdisks per node)")
    up.add_argument("--api-workers", type=int, default=None, metavar="N",
                    help="API server processes sharing the port and the store (default "
                         "$VIRTSHIFT_API_WORKERS or 1; one per CPU core serves the most "
                         "requests)")
    up.add_argument("-v", "--verbose", action="store_true")
    up.set_defaults(func=_up)
    worker = sub.add_parser("api-worker", help="one more API server process (virtshift up "
                            "--api-workers starts them)")
    worker.add_argument("--data-dir", type=Path, required=True)
    worker.add_argument("--listen", action="append", required=True, metavar="HOST:PORT",
                        help="an address to serve with SO_REUSEPORT (repeatable)")
    worker.add_argument("--store", default=None)
    worker.add_argument("-v", "--verbose", action="store_true")
    worker.set_defaults(func=_api_worker)
    writer = sub.add_parser("store-writer", help="commit the writes of the API server "
                            "processes (virtshift up --api-workers N starts it)")
    writer.add_argument("--data-dir", type=Path, required=True)
    writer.add_argument("--store", default=None)
    writer.add_argument("-v", "--verbose", action="store_true")
    writer.set_defaults(func=_store_writer)
    ctl = sub.add_parser("controller", help="run the controllers (virtshift up starts them)")
    ctl.add_argument("-v", "--verbose", action="store_true")
    ctl.set_defaults(func=_controller)
    agent = sub.add_parser("agent", help="run one node agent (virtshift up starts them)")
    agent.add_argument("--node-name", required=True)
    agent.add_argument("--data-dir", type=Path, required=True, help="the node's state directory")
    agent.add_argument("--address", default="127.0.0.1",
                       help="the node's address (agent endpoint, forwarded ports)")
    agent.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    agent.add_argument("--proxy-token-file", type=Path, default=None,
                       help="the API server's proxy token (authenticates console/vnc calls)")
    agent.add_argument("--tls-cert", type=Path, required=True,
                       help="the agent endpoint's certificate (issued by the cluster CA)")
    agent.add_argument("--tls-key", type=Path, required=True, help="its private key")
    agent.add_argument("--hostdisk-dir", type=Path, action="append", default=[],
                       help="a directory hostDisk volumes may use (repeatable)")
    agent.add_argument("-v", "--verbose", action="store_true")
    agent.set_defaults(func=_agent)
    _add_node_join(sub)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return p


def run(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except VirtshiftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
