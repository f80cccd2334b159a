"""``virtshift create vm``: print a VirtualMachine manifest, as ``virtctl create vm`` does."""

from __future__ import annotations

import argparse
import base64
import binascii
import random
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from virtshift.api.kinds import Obj
from virtshift.cli.vm import RUN_STRATEGIES, VmCommandError

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.String alphabet
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE]|m)?$")


def _random(n: int) -> str:
    return "".join(random.choice(_NAME_CHARS) for _ in range(n))


def _params(flag: str, value: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """virtctl's ``key:value,key:value`` flag values (a value may contain ':')."""
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition(":")
        if not sep or not key or not val:
            raise VmCommandError(f'failed to parse "--{flag}" flag: {item!r} is not key:value '
                                 f"(supported: {', '.join(allowed)})")
        if key not in allowed:
            raise VmCommandError(f'failed to parse "--{flag}" flag: unknown param {key!r} '
                                 f"(supported: {', '.join(allowed)})")
        if key in out:
            raise VmCommandError(f'failed to parse "--{flag}" flag: {key!r} given twice')
        out[key] = val
    return out


def _quantity(flag: str, value: str) -> str:
    if not _QUANTITY.match(value):
        raise VmCommandError(f'failed to parse "--{flag}" flag: invalid quantity {value!r}')
    return value


def _base64(flag: str, value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VmCommandError(f'failed to parse "--{flag}" flag: not valid base64') from None
    return value


def _matcher(flag: str, value: str, kinds: tuple[str, str]) -> Obj:
    kind, sep, name = value.rpartition("/")
    if not name or (sep and not kind):
        raise VmCommandError(f'failed to parse "--{flag}" flag: expected [KIND/]NAME')
    if kind and kind.lower() not in kinds:
        raise VmCommandError(f'failed to parse "--{flag}" flag: invalid kind {kind!r}, '
                             f"supported values are: {', '.join(kinds)}")
    out: Obj = {"name": name}
    if kind:
        out["kind"] = kind
    return out


@dataclass
class _Builder:
    vm: Obj
    boot_orders: dict[int, str]

    @property
    def spec(self) -> Obj:
        spec: Obj = self.vm["spec"]["template"]["spec"]
        return spec

    def add_volume(self, flag: str, volume: Obj, bootorder: str | None) -> None:
        name = volume["name"]
        if any(v["name"] == name for v in self.spec.setdefault("volumes", [])):
            raise VmCommandError(f'failed to parse "--{flag}" flag: there is already a volume '
                                 f"with name {name!r}")
        self.spec["volumes"].append(volume)
        if bootorder is not None:
            if not bootorder.isdigit() or int(bootorder) == 0:
                raise VmCommandError(f'failed to parse "--{flag}" flag: bootorder must be a '
                                     "number greater than 0")
            order = int(bootorder)
            if order in self.boot_orders:
                raise VmCommandError(f'failed to parse "--{flag}" flag: bootorder {order} was '
                                     "specified multiple times")
            self.boot_orders[order] = name
            self.spec["domain"]["devices"].setdefault("disks", []).append(
                {"name": name, "bootOrder": order})

    def add_data_volume(self, flag: str, name: str, dv_spec: Obj, bootorder: str | None
                        ) -> None:
        self.add_volume(flag, {"name": name, "dataVolume": {"name": name}}, bootorder)
        self.vm["spec"].setdefault("dataVolumeTemplates", []).append(
            {"metadata": {"name": name}, "spec": dv_spec})


def _import_source(flag: str, p: dict[str, str]) -> Obj:
    kind = p["type"]
    if kind == "blank":
        return {"blank": {}}
    if kind in ("http", "registry"):
        if "url" not in p:
            raise VmCommandError(f'failed to parse "--{flag}" flag: type {kind} needs url')
        return {kind: {"url": p["url"]}}
    if kind == "pvc":
        ns, _, name = p.get("src", "").rpartition("/")
        if not ns or not name:
            raise VmCommandError(f'failed to parse "--{flag}" flag: type pvc needs '
                                 "src:NAMESPACE/NAME")
        return {"pvc": {"namespace": ns, "name": name}}
    raise VmCommandError(f'failed to parse "--{flag}" flag: unknown source type {kind!r} '
                         "(blank, http, registry or pvc)")


def build_vm(args: argparse.Namespace) -> Obj:
    """The VirtualMachine ``virtctl create vm`` would print for these options."""
    name: str = args.name or f"vm-{_random(5)}"
    if args.run_strategy not in RUN_STRATEGIES:
        raise VmCommandError(f'failed to parse "--run-strategy" flag: invalid RunStrategy '
                             f'"{args.run_strategy}", supported values are: '
                             f"{', '.join(RUN_STRATEGIES)}")
    if args.memory is not None and args.instancetype:
        raise VmCommandError("--memory and --instancetype are mutually exclusive")
    if args.termination_grace_period < 0:
        raise VmCommandError("--termination-grace-period must be 0 or more")
    domain: Obj = {"devices": {}, "resources": {}}
    if not args.instancetype:
        domain["memory"] = {"guest": _quantity("memory", args.memory or "512Mi")}
    metadata: Obj = {"name": name}
    if args.namespace:
        metadata["namespace"] = args.namespace
    vm: Obj = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": metadata,
        "spec": {
            "runStrategy": args.run_strategy,
            "template": {"spec": {
                "domain": domain,
                "terminationGracePeriodSeconds": args.termination_grace_period,
            }},
        },
    }
    if args.instancetype:
        vm["spec"]["instancetype"] = _matcher(
            "instancetype", args.instancetype,
            ("virtualmachineinstancetype", "virtualmachineclusterinstancetype"))
    if args.preference:
        vm["spec"]["preference"] = _matcher(
            "preference", args.preference,
            ("virtualmachinepreference", "virtualmachineclusterpreference"))
    b = _Builder(vm, {})
    # virtctl's fixed order without boot orders: containerdisk > PVC > blank > imported
    for i, value in enumerate(args.volume_containerdisk or []):
        p = _params("volume-containerdisk", value, ("src", "name", "bootorder"))
        if "src" not in p:
            raise VmCommandError('failed to parse "--volume-containerdisk" flag: src must be '
                                 "specified")
        b.add_volume("volume-containerdisk",
                     {"name": p.get("name") or f"{name}-containerdisk-{i}",
                      "containerDisk": {"image": p["src"]}}, p.get("bootorder"))
    for value in args.volume_pvc or []:
        p = _params("volume-pvc", value, ("src", "name", "bootorder"))
        if "src" not in p:
            raise VmCommandError('failed to parse "--volume-pvc" flag: src must be specified')
        if "/" in p["src"]:
            raise VmCommandError('failed to parse "--volume-pvc" flag: not allowed to specify '
                                 f"the namespace of pvc {p['src']!r}")
        b.add_volume("volume-pvc", {"name": p.get("name") or p["src"],
                                    "persistentVolumeClaim": {"claimName": p["src"]}},
                     p.get("bootorder"))
    for i, value in enumerate(args.volume_blank or []):
        p = _params("volume-blank", value, ("size", "name"))
        if "size" not in p:
            raise VmCommandError('failed to parse "--volume-blank" flag: size must be '
                                 "specified")
        b.add_data_volume("volume-blank", p.get("name") or f"{name}-blank-{i}",
                          {"source": {"blank": {}}, "storage": {"resources": {"requests": {
                              "storage": _quantity("volume-blank", p["size"])}}}}, None)
    for value in args.volume_import or []:
        p = _params("volume-import", value,
                    ("type", "url", "src", "size", "name", "bootorder"))
        if "type" not in p:
            raise VmCommandError('failed to parse "--volume-import" flag: type must be '
                                 "specified")
        dv_spec: Obj = {"source": _import_source("volume-import", p), "storage": {}}
        if "size" in p:
            dv_spec["storage"] = {"resources": {"requests": {
                "storage": _quantity("volume-import", p["size"])}}}
        elif p["type"] != "pvc":
            raise VmCommandError('failed to parse "--volume-import" flag: size must be '
                                 f"specified for type {p['type']}")
        b.add_data_volume("volume-import", p.get("name") or f"imported-volume-{_random(4)}",
                          dv_spec, p.get("bootorder"))
    cloud_init: Obj = {}
    if args.cloud_init_user_data and (args.user or args.ssh_key):
        raise VmCommandError("--cloud-init-user-data and --user/--ssh-key are mutually "
                             "exclusive")
    if args.cloud_init_user_data:
        cloud_init["userDataBase64"] = _base64("cloud-init-user-data",
                                               args.cloud_init_user_data)
    elif args.user or args.ssh_key:
        config: Obj = {}
        if args.user:
            config["user"] = args.user
        if args.ssh_key:
            config["ssh_authorized_keys"] = list(args.ssh_key)
        cloud_init["userData"] = "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)
    if args.cloud_init_network_data:
        cloud_init["networkDataBase64"] = _base64("cloud-init-network-data",
                                                  args.cloud_init_network_data)
    if cloud_init:
        b.add_volume("cloud-init-user-data", {"name": "cloudinitdisk",
                                              "cloudInitNoCloud": cloud_init}, None)
    return vm


class _ManifestDumper(yaml.SafeDumper):
    """Keys sorted as virtctl's YAML has them; multi-line strings (user data) as blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def manifest_yaml(obj: Obj) -> str:
    return yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=True, default_flow_style=False)


def _cmd_create_vm(args: argparse.Namespace) -> int:
    sys.stdout.write(manifest_yaml(build_vm(args)))
    return 0



def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=None,
                        help="namespace (default: the kubeconfig context's, else default)")
    create = subparsers.add_parser("create", help="create a resource manifest (create vm)")
    create_sub = create.add_subparsers(dest="create_kind", required=True, metavar="KIND")
    p = create_sub.add_parser("vm", help="print a VirtualMachine manifest",
                              description="Print a VirtualMachine manifest, as virtctl create "
                                          "vm does. Without boot orders, volumes boot in the "
                                          "order containerdisk > PVC > blank > imported.",
                              parents=[common])
    p.add_argument("--name", default=None, help="the VM's name (default vm-XXXXX)")
    p.add_argument("--run-strategy", default="Always",
                   help=f"the RunStrategy ({', '.join(RUN_STRATEGIES)}; default Always)")
    p.add_argument("--termination-grace-period", type=int, default=180,
                   help="the termination grace period in seconds (default 180)")
    p.add_argument("--memory", default=None,
                   help="guest memory (default 512Mi; not with --instancetype)")
    p.add_argument("--instancetype", default=None, metavar="[KIND/]NAME",
                   help="an instance type (default kind virtualmachineclusterinstancetype)")
    p.add_argument("--preference", default=None, metavar="[KIND/]NAME",
                   help="a preference (default kind virtualmachineclusterpreference)")
    p.add_argument("--volume-containerdisk", action="append", metavar="src:IMAGE[,name:N]"
                   "[,bootorder:N]", help="a containerDisk volume (repeatable)")
    p.add_argument("--volume-pvc", action="append", metavar="src:CLAIM[,name:N][,bootorder:N]",
                   help="a PersistentVolumeClaim volume (repeatable)")
    p.add_argument("--volume-blank", action="append", metavar="size:SIZE[,name:N]",
                   help="a blank DataVolume (repeatable)")
    p.add_argument("--volume-import", action="append",
                   metavar="type:blank|http|registry|pvc,...",
                   help="a DataVolume imported from url:URL (http, registry) or "
                        "src:NS/NAME (pvc), with size:SIZE[,name:N][,bootorder:N] "
                        "(repeatable)")
    p.add_argument("--cloud-init-user-data", default=None, metavar="BASE64",
                   help="base64-encoded cloud-init user data")
    p.add_argument("--cloud-init-network-data", default=None, metavar="BASE64",
                   help="base64-encoded cloud-init network data")
    p.add_argument("--user", default=None,
                   help="a user for a generated #cloud-config (with --ssh-key)")
    p.add_argument("--ssh-key", action="append", metavar="KEY",
                   help="an authorized SSH public key for a generated #cloud-config "
                        "(repeatable)")
    p.set_defaults(func=_cmd_create_vm)
