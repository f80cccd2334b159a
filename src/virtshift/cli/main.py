"""``virtshift``: run the platform and act on it (virtctl's verbs)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from virtshift import __version__
from virtshift.client.kubeconfig import default_home
from virtshift.errors import VirtshiftError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtshift", description=__doc__)
    p.add_argument("--version", action="version", version=f"virtshift {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the platform in the foreground")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="state directory (default $VIRTSHIFT_HOME or ~/.virtshift)")
    up.add_argument("--listen", default="127.0.0.1:6443",
                    help="HOST:PORT for the API (default 127.0.0.1:6443; port 0 picks one)")
    up.add_argument("--nodes", type=int, default=1, help="node agents to run (0: control plane)")
    up.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                    help="accelerator for VMs (default $VIRTSHIFT_ACCEL or auto)")
    up.add_argument("--store", default=None, help="store URL (default sqlite in the data dir)")
    up.add_argument("-v", "--verbose", action="store_true")
    return p


def run(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            from virtshift.platform import default_accel, up

            logging.basicConfig(
                level=logging.DEBUG if args.verbose else logging.INFO,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            if args.nodes < 0:
                raise VirtshiftError("--nodes must be 0 or more")
            uvloop.run(up(args.data_dir or default_home(), args.listen, nodes=args.nodes,
                           accel=args.accel or default_accel(), store_url=args.store))
    except VirtshiftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
