"""Node maintenance, as kubectl does it: ``virtshift cordon|uncordon|drain NODE``.

``cordon`` sets the Node's ``spec.unschedulable``; ``uncordon`` clears it and removes the drain
taint. ``drain`` cordons, adds the drain taint (the KubeVirt CR's
``spec.configuration.migrations.nodeDrainTaintKey``, default ``kubevirt.io/drain``, effect
NoSchedule) so that the controller's evacuation live-migrates what can move, and then handles
every VMI on the node by its eviction strategy, as KubeVirt's eviction webhook handles
``kubectl drain``:

- ``None`` (or ``LiveMigrateIfPossible`` on a VMI that is not LiveMigratable): the VMI is
  deleted; its VM restarts it elsewhere when its runStrategy says so.
- ``LiveMigrate`` / ``LiveMigrateIfPossible`` on a LiveMigratable VMI: wait for the migration.
- ``LiveMigrate`` on a VMI that is not LiveMigratable, or ``External``: the VMI blocks the
  drain until it leaves by other means or ``--timeout`` passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from virtshift.api.kinds import REGISTRY, Obj
from virtshift.api.migration import (
    FAILED,
    FINAL_PHASES,
    NODE_NAME_LABEL,
    cluster_config,
    cluster_eviction_strategy,
    eviction_strategy,
    is_live_migratable,
    progress_of,
)
from virtshift.cli.migrate import (
    DEFAULT_TIMEOUT,
    ProgressView,
    format_progress,
    list_migrations,
    migration_events,
    newest,
    outcome,
    parse_seconds,
    phase_of,
)
from virtshift.cli.vm import VmCommandError, _run
from virtshift.client.rest import Client
from virtshift.errors import Conflict, NotFound

NODE = REGISTRY.require("", "v1", "Node")
VMI = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance")
KUBEVIRT = REGISTRY.require("kubevirt.io", "v1", "KubeVirt")
DRAIN_INTERVAL = 1.0
UPDATE_ATTEMPTS = 8


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ---- pure --------------------------------------------------------------------------------------


def drain_taint(key: str) -> Obj:
    return {"key": key, "effect": "NoSchedule"}


def _taints(node: Mapping[str, Any]) -> list[Obj]:
    return [t for t in _dict(node.get("spec")).get("taints") or [] if isinstance(t, dict)]


def has_taint(node: Mapping[str, Any], key: str) -> bool:
    return any(t.get("key") == key and t.get("effect") == "NoSchedule" for t in _taints(node))


def is_cordoned(node: Mapping[str, Any]) -> bool:
    return bool(_dict(node.get("spec")).get("unschedulable"))


def set_cordon(node: Obj, cordoned: bool) -> bool:
    """Set or clear ``spec.unschedulable`` in place; whether it changed."""
    if is_cordoned(node) == cordoned:
        return False
    spec = node.setdefault("spec", {})
    if cordoned:
        spec["unschedulable"] = True
    else:
        spec.pop("unschedulable", None)
    return True


def add_taint(node: Obj, key: str) -> bool:
    """Add the drain taint in place; whether it changed."""
    if has_taint(node, key):
        return False
    node.setdefault("spec", {})["taints"] = [*_taints(node), drain_taint(key)]
    return True


def remove_taint(node: Obj, key: str) -> bool:
    """Remove every taint with ``key`` in place; whether it changed."""
    taints = _taints(node)
    kept = [t for t in taints if t.get("key") != key]
    if len(kept) == len(taints):
        return False
    spec = node.setdefault("spec", {})
    if kept:
        spec["taints"] = kept
    else:
        spec.pop("taints", None)
    return True


Action = Literal["migrate", "delete", "block"]


@dataclass(frozen=True)
class Eviction:
    """What draining does with one VMI, and why (for the printed line)."""

    action: Action
    reason: str


def drain_decision(vmi: Mapping[str, Any], cluster_default: str | None) -> Eviction:
    """KubeVirt's eviction rules for one VMI on a node being drained."""
    name = str(_dict(vmi.get("metadata")).get("name", ""))
    strategy = eviction_strategy(vmi, cluster_default)
    migratable, why = is_live_migratable(vmi)
    if strategy == "LiveMigrate":
        if migratable:
            return Eviction("migrate", "eviction strategy LiveMigrate")
        return Eviction("block", f"VMI {name} is configured with an eviction strategy but is "
                                 f"not live-migratable ({why})")
    if strategy == "LiveMigrateIfPossible":
        if migratable:
            return Eviction("migrate", "eviction strategy LiveMigrateIfPossible")
        return Eviction("delete", f"eviction strategy LiveMigrateIfPossible, not "
                                  f"live-migratable ({why})")
    if strategy == "External":
        return Eviction("block", "eviction strategy External: an external controller must "
                                 "move it")
    return Eviction("delete", f"eviction strategy {strategy}")


def vmi_key(vmi: Mapping[str, Any]) -> str:
    meta = _dict(vmi.get("metadata"))
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def on_node(vmis: Iterable[Mapping[str, Any]], node: str) -> list[Mapping[str, Any]]:
    """The VMIs a drain must clear: on ``node`` (label and, when set, status) and not final."""
    out: list[Mapping[str, Any]] = []
    for vmi in vmis:
        labels = _dict(_dict(vmi.get("metadata")).get("labels"))
        status_node = _dict(vmi.get("status")).get("nodeName")
        if labels.get(NODE_NAME_LABEL) != node or (status_node and status_node != node):
            continue
        if phase_of(vmi) in FINAL_PHASES:
            continue
        out.append(vmi)
    return sorted(out, key=vmi_key)


# ---- API ---------------------------------------------------------------------------------------


async def edit_node(client: Client, name: str, change: Callable[[Obj], bool], *,
                    dry_run: bool = False) -> tuple[Obj, bool]:
    """Read the Node, apply ``change`` (in place; True when it changed something) and write it
    back, retrying on conflicts. Returns the node and whether it changed (with ``dry_run``:
    would change; nothing is written)."""
    for _ in range(UPDATE_ATTEMPTS):
        node = await client.get(NODE, None, name)
        changed = change(node)
        if not changed or dry_run:
            return node, changed
        try:
            return await client.update(NODE, None, node), True
        except Conflict:
            continue
    raise VmCommandError(f"node/{name}: too many conflicting updates, try again")


async def drain_settings(client: Client) -> tuple[str, str | None]:
    """The drain taint key and the cluster's default eviction strategy (KubeVirt CR)."""
    listed = await client.list(KUBEVIRT)
    crs = [i for i in listed.get("items") or [] if isinstance(i, dict)]
    return cluster_config(crs).node_drain_taint_key, cluster_eviction_strategy(crs)


async def cordon(client: Client, name: str, *, dry_run: bool = False,
                 out: IO[str] | None = None) -> bool:
    """kubectl cordon; whether the node changed."""
    _, changed = await edit_node(client, name, lambda n: set_cordon(n, True), dry_run=dry_run)
    suffix = " (dry run)" if dry_run else ""
    print(f"node/{name} {'cordoned' if changed else 'already cordoned'}{suffix}",
          file=out or sys.stdout, flush=True)
    return changed


async def uncordon(client: Client, name: str, *, dry_run: bool = False,
                   out: IO[str] | None = None) -> bool:
    """kubectl uncordon, also removing the drain taint."""
    key, _ = await drain_settings(client)

    def change(node: Obj) -> bool:
        cordon_changed = set_cordon(node, False)
        return remove_taint(node, key) or cordon_changed

    _, changed = await edit_node(client, name, change, dry_run=dry_run)
    suffix = " (dry run)" if dry_run else ""
    print(f"node/{name} {'uncordoned' if changed else 'already uncordoned'}{suffix}",
          file=out or sys.stdout, flush=True)
    return changed


@dataclass
class _Tracked:
    """What the drain has said and done about one VMI."""

    uid: str
    said: set[str] = field(default_factory=set)
    deleted: bool = False
    view: ProgressView | None = None
    vmim: str = ""
    known: set[str] | None = None
    """Migrations already final when the drain first saw the VMI (not this drain's)."""
    status: str = ""
    """Why it is still on the node (for the timeout message)."""


class Drain:
    """One ``virtshift drain NODE``: a poll loop until no VMI is left on the node."""

    def __init__(self, client: Client, node: str, *, timeout: float, dry_run: bool = False,
                 out: IO[str] | None = None, interval: float = DRAIN_INTERVAL) -> None:
        self.client = client
        self.node = node
        self.timeout = timeout
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.interval = interval
        self.tracked: dict[str, _Tracked] = {}

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _once(self, t: _Tracked, line: str) -> None:
        if line not in t.said:
            t.said.add(line)
            self.say(line)

    async def run(self) -> int:
        suffix = " (dry run)" if self.dry_run else ""
        key, default = await drain_settings(self.client)
        await cordon(self.client, self.node, dry_run=self.dry_run, out=self.out)
        _, tainted = await edit_node(self.client, self.node, lambda n: add_taint(n, key),
                                     dry_run=self.dry_run)
        if tainted:
            self.say(f"node/{self.node} tainted {key}:NoSchedule{suffix}")
        if self.dry_run:
            return await self._dry_run(default)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            listed = await self.client.list(VMI, label_selector=f"{NODE_NAME_LABEL}={self.node}")
            vmis = on_node([i for i in listed.get("items") or [] if isinstance(i, dict)],
                           self.node)
            present = {vmi_key(v) for v in vmis}
            for gone in sorted(set(self.tracked) - present):
                t = self.tracked.pop(gone)
                if t.view is not None:
                    t.view.end()
                self.say(f"VMI {gone} evicted")
            if not vmis:
                self.say(f"node/{self.node} drained")
                return 0
            for vmi in vmis:
                await self._handle(vmi, default)
            if loop.time() >= deadline:
                for t in self.tracked.values():
                    if t.view is not None:
                        t.view.end()
                left = "; ".join(f"VMI {k} ({t.status})" for k, t in sorted(self.tracked.items()))
                raise VmCommandError(f"drain of node/{self.node} timed out after "
                                     f"{self.timeout:g}s; still on the node: {left}")
            await asyncio.sleep(self.interval)

    async def _handle(self, vmi: Mapping[str, Any], default: str | None) -> None:
        key = vmi_key(vmi)
        meta = _dict(vmi.get("metadata"))
        uid = str(meta.get("uid", ""))
        t = self.tracked.get(key)
        if t is None or t.uid != uid:
            t = self.tracked[key] = _Tracked(uid)
        decision = drain_decision(vmi, default)
        if decision.action == "delete":
            t.status = f"being deleted: {decision.reason}"
            self._once(t, f"evicting VMI {key} (delete: {decision.reason})")
            if not t.deleted and not meta.get("deletionTimestamp"):
                with contextlib.suppress(NotFound, Conflict):  # gone, or replaced meanwhile
                    await self.client.delete(VMI, str(meta.get("namespace", "")),
                                             str(meta.get("name", "")), uid=uid or None)
            t.deleted = True
        elif decision.action == "block":
            t.status = f"blocked: {decision.reason}"
            self._once(t, f"VMI {key} blocks the drain: {decision.reason} (waiting)")
        else:
            self._once(t, f"evicting VMI {key} (live migration)")
            await self._follow(t, vmi)

    async def _follow(self, t: _Tracked, vmi: Mapping[str, Any]) -> None:
        meta = _dict(vmi.get("metadata"))
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        key = f"{ns}/{name}"
        vmims = await list_migrations(self.client, ns, name)
        if t.known is None:
            t.known = {str(_dict(m.get("metadata")).get("name", "")) for m in vmims
                       if phase_of(m) in FINAL_PHASES}
        vmim = newest(vmims, exclude=t.known)
        if vmim is None:
            t.status = "waiting for the evacuation to create a migration"
            return
        vmim_name = str(_dict(vmim.get("metadata")).get("name", ""))
        phase = phase_of(vmim)
        if vmim_name != t.vmim:
            t.vmim = vmim_name
            t.view = ProgressView(self.out, tty=False, prefix=f"VMI {key}: ")
        assert t.view is not None
        if phase in FINAL_PHASES:
            t.view.end()
            events = await migration_events(self.client, ns, vmim_name) if phase == FAILED \
                else []
            result = outcome(vmim, vmi, events)
            t.status = f"last migration {phase.lower()}: {result.text}"
            self._once(t, f"VMI {key}: {result.text}"
                          + ("" if result.succeeded else " (the evacuation retries)"))
            return
        t.status = f"migration {vmim_name} {phase or 'Pending'}"
        t.view.update(format_progress(phase, progress_of(vmim)))

    async def _dry_run(self, default: str | None) -> int:
        listed = await self.client.list(VMI, label_selector=f"{NODE_NAME_LABEL}={self.node}")
        blockers: list[str] = []
        for vmi in on_node([i for i in listed.get("items") or [] if isinstance(i, dict)],
                           self.node):
            key = vmi_key(vmi)
            decision = drain_decision(vmi, default)
            if decision.action == "delete":
                self.say(f"evicting VMI {key} (delete: {decision.reason}) (dry run)")
            elif decision.action == "migrate":
                self.say(f"evicting VMI {key} (live migration) (dry run)")
            else:
                self.say(f"VMI {key} blocks the drain: {decision.reason} (dry run)")
                blockers.append(f"VMI {key} ({decision.reason})")
        if blockers:
            raise VmCommandError(f"node/{self.node} cannot be drained: "
                                 + "; ".join(blockers))
        self.say(f"node/{self.node} drained (dry run)")
        return 0


# ---- commands ----------------------------------------------------------------------------------


def _node_verb(args: argparse.Namespace, verb: str) -> int:
    async def action(client: Client, _ns: str) -> int:
        if verb == "cordon":
            await cordon(client, args.node, dry_run=args.dry_run)
        elif verb == "uncordon":
            await uncordon(client, args.node, dry_run=args.dry_run)
        else:
            return await Drain(client, args.node, timeout=parse_seconds(args.timeout),
                               dry_run=args.dry_run).run()
        return 0

    return _run(args, action)


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS,
                        help="kubeconfig to use (default $KUBECONFIG, else the data dir's)")
    common.add_argument("--dry-run", action="store_true",
                        help="show what would change, without changing anything")
    for verb, text in (
            ("cordon", "mark a node unschedulable (kubectl cordon)"),
            ("uncordon", "mark a node schedulable again and remove the drain taint "
                         "(kubectl uncordon)"),
            ("drain", "cordon a node and move its VMIs away by their eviction strategy "
                      "(kubectl drain)")):
        p = subparsers.add_parser(verb, help=text, description=text, parents=[common])
        p.add_argument("node", metavar="NODE")
        if verb == "drain":
            p.add_argument("--timeout", default=str(int(DEFAULT_TIMEOUT)), metavar="SECONDS",
                           help="give up after this long (default 600; 30s, 10m, 1h work)")
        p.set_defaults(func=lambda args, verb=verb: _node_verb(args, verb), namespace=None)

