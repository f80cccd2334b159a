"""virtctl's ``migrate`` and ``migrate-cancel``, with progress until the migration ends.

``virtshift migrate NAME`` calls ``PUT .../virtualmachines/NAME/migrate`` with
``MigrateOptions`` {addedNodeSelector, dryRun}, prints virtctl's ``VM NAME was scheduled to
migrate``, then (unless ``--no-wait``) follows the ``VirtualMachineInstanceMigration`` the
server created: its phase, and the source agent's progress annotation
(:data:`~virtshift.api.migration.PROGRESS_ANNOTATION`), until it is Succeeded or Failed.
``virtshift migrate-cancel NAME`` deletes the VM's unfinished migration, as virtctl does.

The formatting and selection helpers are pure; :mod:`virtshift.cli.nodes` (drain) uses them
too.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from urllib.parse import quote

from virtshift.api.kinds import REGISTRY, Obj
from virtshift.api.migration import (
    FAILED,
    FINAL_PHASES,
    SUCCEEDED,
    VMI_NAME_LABEL,
    migration_state,
    progress_of,
)
from virtshift.cli.vm import VmCommandError, _dry_run, _one_line, _run, subresource_path
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound

VMIM = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstanceMigration")
VMI = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance")
EVENT = REGISTRY.require("", "v1", "Event")
DEFAULT_TIMEOUT = 600.0
POLL_INTERVAL = 0.5
FIND_TIMEOUT = 30.0
"""How long ``migrate`` looks for the migration the server created before giving up."""


# ---- pure helpers ------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(obj.get("metadata"))


def phase_of(obj: Mapping[str, Any]) -> str:
    return str(_dict(obj.get("status")).get("phase") or "")


def parse_seconds(value: str) -> float:
    """A duration: seconds, or a number with ``s``, ``m`` or ``h``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", value.strip())
    if m is None:
        raise VmCommandError(f"invalid duration {value!r}: seconds, or a number with s, m or h "
                             "(e.g. 90, 30s, 10m)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 1}[m.group(2)]


def parse_selector(items: Iterable[str]) -> dict[str, str]:
    """``--addedNodeSelector`` values: ``k=v`` or ``k1=v1,k2=v2`` (virtctl's StringToString)."""
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise VmCommandError(f"invalid --addedNodeSelector {item!r}: expected KEY=VALUE "
                                     "(e.g. kubernetes.io/hostname=node1)")
            out[key.strip()] = value.strip()
    return out


def format_bytes(n: float) -> str:
    """Binary units: ``512 B``, ``1.5 KiB``, ``412.0 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def format_progress(phase: str, progress: Mapping[str, Any]) -> str:
    """One progress line: the phase, then, when the source agent reports it, transferred /
    total memory, remaining, dirty rate, iteration, throughput and elapsed time."""
    parts: list[str] = []
    transferred = _number(progress, "transferredBytes")
    total = _number(progress, "totalBytes")
    remaining = _number(progress, "remainingBytes")
    if transferred is not None and total:
        percent = min(100.0, 100.0 * transferred / total)
        parts.append(f"{format_bytes(transferred)} / {format_bytes(total)} "
                     f"transferred ({percent:.0f}%)")
    elif transferred is not None:
        parts.append(f"{format_bytes(transferred)} transferred")
    if remaining is not None:
        parts.append(f"{format_bytes(remaining)} remaining")
    dirty = _number(progress, "dirtyRate")
    if dirty is not None:
        parts.append(f"dirty rate {dirty:.0f} pages/s")
    iteration = _number(progress, "iteration")
    if iteration is not None:
        parts.append(f"iteration {iteration:.0f}")
    mbps = _number(progress, "mbps")
    if mbps is not None:
        parts.append(f"{mbps:.0f} Mbps" if mbps >= 10 else f"{mbps:.1f} Mbps")
    elapsed = _number(progress, "elapsedMs")
    if elapsed is not None:
        parts.append(f"{elapsed / 1000:.1f}s")
    head = phase or "Pending"
    return f"{head}: {', '.join(parts)}" if parts else head


def _created(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("creationTimestamp") or "")


def newest(vmims: Iterable[Mapping[str, Any]], *, exclude: Iterable[str] = ()
           ) -> Mapping[str, Any] | None:
    """The newest migration by creationTimestamp (then name), skipping names in ``exclude``."""
    skip = set(exclude)
    candidates = [m for m in vmims if str(_meta(m).get("name", "")) not in skip]
    if not candidates:
        return None
    return max(candidates, key=lambda m: (_created(m), str(_meta(m).get("name", ""))))


def for_vmi(vmims: Iterable[Mapping[str, Any]], vmi_name: str) -> list[Mapping[str, Any]]:
    """The migrations of ``vmi_name``: by ``spec.vmiName`` (virtctl) or the selector label."""
    return [m for m in vmims
            if _dict(m.get("spec")).get("vmiName") == vmi_name
            or _dict(_meta(m).get("labels")).get(VMI_NAME_LABEL) == vmi_name]


def active_migration(vmims: Iterable[Mapping[str, Any]], vmi_name: str
                     ) -> Mapping[str, Any] | None:
    """The migration ``migrate-cancel`` deletes: one of ``vmi_name`` not yet Succeeded or
    Failed, preferring one not already being deleted, then the newest."""
    active = [m for m in for_vmi(vmims, vmi_name) if phase_of(m) not in FINAL_PHASES]
    if not active:
        return None
    return max(active, key=lambda m: (not _meta(m).get("deletionTimestamp"), _created(m),
                                      str(_meta(m).get("name", ""))))


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def state_of(vmim: Mapping[str, Any], vmi: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``migrationState`` describing this migration: the VMI's when it is this migration's
    (same ``migrationUid``), else the VMIM's own ``status.migrationState``."""
    uid = _meta(vmim).get("uid")
    vmi_state = migration_state(vmi or {})
    if vmi_state and (not uid or vmi_state.get("migrationUid") in (None, uid)):
        return vmi_state
    return _dict(_dict(vmim.get("status")).get("migrationState"))


def _event_time(event: Mapping[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime")
               or _created(event))


def failure_reason(vmim: Mapping[str, Any], vmi: Mapping[str, Any] | None,
                   events: Iterable[Mapping[str, Any]] = ()) -> str:
    """Why a migration failed: the migration state's ``failureReason``, else a true condition
    of the VMIM, else its newest Warning event."""
    state = state_of(vmim, vmi)
    reason = state.get("failureReason")
    if isinstance(reason, str) and reason:
        return _one_line(reason)
    if state.get("abortRequested") or state.get("abortStatus"):
        return "the migration was cancelled"
    for cond in _dict(vmim.get("status")).get("conditions") or []:
        c = _dict(cond)
        if c.get("status") == "True" and (c.get("message") or c.get("reason")):
            text = str(c.get("message") or c.get("reason"))
            return _one_line(f"{c.get('type')}: {text}" if c.get("type") else text)
    warnings = [e for e in events if e.get("type") == "Warning" and e.get("message")]
    if warnings:
        latest = max(warnings, key=_event_time)
        return _one_line(f"{latest.get('reason') or 'Warning'}: {latest.get('message')}")
    return "no reason was reported"


def migrated_summary(vmim: Mapping[str, Any], vmi: Mapping[str, Any] | None) -> str:
    """``node-a -> node-b in 12.3s, downtime 45 ms``, with what is known."""
    state = state_of(vmim, vmi)
    source = state.get("sourceNode") or "?"
    target = state.get("targetNode") or "?"
    text = f"{source} -> {target}"
    start, end = parse_time(state.get("startTimestamp")), parse_time(state.get("endTimestamp"))
    if start is not None and end is not None:
        text += f" in {max((end - start).total_seconds(), 0.0):.1f}s"
    downtime = _number(progress_of(vmim), "downtimeMs")
    if downtime is not None:
        text += f", downtime {downtime:.0f} ms"
    return text


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    text: str


def outcome(vmim: Mapping[str, Any], vmi: Mapping[str, Any] | None,
            events: Iterable[Mapping[str, Any]] = ()) -> Outcome:
    """The last line of a finished migration."""
    name = _meta(vmim).get("name", "")
    if phase_of(vmim) == SUCCEEDED:
        return Outcome(True, f"Migration {name} succeeded: {migrated_summary(vmim, vmi)}")
    return Outcome(False, f"Migration {name} failed: {failure_reason(vmim, vmi, events)}")


# ---- output ------------------------------------------------------------------------------------


class ProgressView:
    """Progress lines: on a terminal one line rewritten in place, otherwise a line per
    change."""

    def __init__(self, out: IO[str] | None = None, *, tty: bool | None = None,
                 prefix: str = "") -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.prefix = prefix
        self._last: str | None = None
        self._open = False

    def update(self, line: str) -> None:
        if line == self._last:
            return
        self._last = line
        if self.tty:
            self.out.write(f"\r{self.prefix}{line}\x1b[K")
            self._open = True
        else:
            self.out.write(f"{self.prefix}{line}\n")
        self.out.flush()

    def end(self) -> None:
        """Leave the rewritten line; what is printed next starts on a fresh one."""
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False


# ---- API ---------------------------------------------------------------------------------------


async def get_or_none(client: Client, kind: Any, namespace: str, name: str) -> Obj | None:
    try:
        return await client.get(kind, namespace, name)
    except NotFound:
        return None


async def list_migrations(client: Client, namespace: str, vmi_name: str | None = None
                          ) -> list[Obj]:
    selector = f"{VMI_NAME_LABEL}={vmi_name}" if vmi_name is not None else ""
    listed = await client.list(VMIM, namespace, label_selector=selector)
    return [i for i in listed.get("items") or [] if isinstance(i, dict)]


async def migration_events(client: Client, namespace: str, name: str) -> list[Obj]:
    """Events about one migration (best effort: an empty list when they cannot be read)."""
    try:
        listed = await client.list(
            EVENT, namespace, field_selector=f"involvedObject.name={name},"
                                             "involvedObject.kind=VirtualMachineInstanceMigration")
    except ApiError:
        return []
    return [e for e in listed.get("items") or [] if isinstance(e, dict)
            and _dict(e.get("involvedObject")).get("name") == name]


async def find_migration(client: Client, namespace: str, vmi_name: str, known: set[str],
                         within: float = FIND_TIMEOUT, interval: float = POLL_INTERVAL) -> Obj:
    """The newest migration of ``vmi_name`` not among ``known`` (the ones listed before the
    request), waiting up to ``within`` seconds for it to show."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = newest(await list_migrations(client, namespace, vmi_name), exclude=known)
        if found is not None:
            return dict(found)
        if loop.time() >= deadline:
            raise VmCommandError(f"the migration of {vmi_name} did not show up within "
                                 f"{within:g}s")
        await asyncio.sleep(interval)


async def follow(client: Client, namespace: str, vmim_name: str, vmi_name: str,
                 within: float, view: ProgressView, *,
                 interval: float = POLL_INTERVAL) -> Outcome:
    """Show a migration's progress until it is Succeeded or Failed (or deleted); a
    VmCommandError after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        vmim = await get_or_none(client, VMIM, namespace, vmim_name)
        if vmim is None:
            view.end()
            return Outcome(False, f"Migration {vmim_name} was deleted before it finished "
                                  "(cancelled)")
        phase = phase_of(vmim)
        view.update(format_progress(phase, progress_of(vmim)))
        if phase in FINAL_PHASES:
            view.end()
            vmi = await get_or_none(client, VMI, namespace, vmi_name)
            events = await migration_events(client, namespace, vmim_name) \
                if phase == FAILED else []
            return outcome(vmim, vmi, events)
        if loop.time() >= deadline:
            view.end()
            raise VmCommandError(
                f"timed out after {within:g}s waiting for migration {vmim_name} (phase "
                f"{phase or 'Pending'}); it goes on: 'virtshift migrate-cancel {vmi_name}' "
                "stops it")
        await asyncio.sleep(interval)


async def migrate(client: Client, namespace: str, name: str, *, selector: Mapping[str, str],
                  dry_run: bool, wait: bool, within: float,
                  out: IO[str] | None = None) -> int:
    stream = out or sys.stdout
    body: Obj = {}
    if selector:
        body["addedNodeSelector"] = dict(selector)
    if dry_run:
        body["dryRun"] = ["All"]
    known: set[str] = set()
    if wait and not dry_run:
        known = {str(_meta(m).get("name", ""))
                 for m in await list_migrations(client, namespace, name)}
    try:
        reply = await client.request(
            "PUT", subresource_path(namespace, "virtualmachines", name, "migrate"), body=body)
    except ApiError as e:
        raise VmCommandError(f"Error migrating VirtualMachine {_one_line(e.message)}") from e
    print(f"VM {name} was scheduled to migrate", file=stream, flush=True)
    if dry_run or not wait:
        return 0
    if isinstance(reply, dict) and reply.get("kind") == "VirtualMachineInstanceMigration" \
            and _meta(reply).get("name"):
        vmim_name = str(_meta(reply)["name"])
    else:
        vmim_name = str(_meta(await find_migration(client, namespace, name, known))["name"])
    print(f"Migration {vmim_name}", file=stream, flush=True)
    result = await follow(client, namespace, vmim_name, name, within, ProgressView(stream))
    if not result.succeeded:
        raise VmCommandError(result.text)
    print(result.text, file=stream, flush=True)
    return 0


async def migrate_cancel(client: Client, namespace: str, name: str, *, dry_run: bool,
                         out: IO[str] | None = None) -> int:
    """virtctl's migrate-cancel: delete the VM's migration that is not final yet."""
    listed = await client.list(VMIM, namespace)
    found = active_migration([i for i in listed.get("items") or [] if isinstance(i, dict)],
                             name)
    if found is None:
        raise VmCommandError(f"Found no migration to cancel for {name}")
    vmim_name = str(_meta(found).get("name", ""))
    body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
    params: dict[str, str] | None = None
    if dry_run:  # DeleteOptions.dryRun, and the query parameter (what our server reads)
        body["dryRun"] = ["All"]
        params = {"dryRun": "All"}
    path = (f"/apis/kubevirt.io/v1/namespaces/{quote(namespace, safe='')}/"
            f"virtualmachineinstancemigrations/{quote(vmim_name, safe='')}")
    try:
        await client.request("DELETE", path, body=body, params=params)
    except ApiError as e:
        raise VmCommandError(f"Error canceling migration {vmim_name} of a VirtualMachine "
                             f"{name}: {_one_line(e.message)}") from e
    print(f"VM {name} was scheduled to migrate-cancel", file=out or sys.stdout, flush=True)
    return 0


# ---- commands ----------------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    selector = parse_selector(args.added_node_selector or [])
    timeout = parse_seconds(args.timeout)
    _dry_run(args, {})  # virtctl's "Dry Run execution" line
    return _run(args, lambda client, ns: migrate(
        client, ns, args.name, selector=selector, dry_run=args.dry_run, wait=not args.no_wait,
        within=timeout))


def _cmd_migrate_cancel(args: argparse.Namespace) -> int:
    _dry_run(args, {})
    return _run(args, lambda client, ns: migrate_cancel(client, ns, args.name,
                                                        dry_run=args.dry_run))


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=None,
                        help="namespace (default: the kubeconfig context's, else default)")
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS,
                        help="kubeconfig to use (default $KUBECONFIG, else the data dir's)")
    common.add_argument("--dry-run", action="store_true",
                        help="ask the server to validate only, without changing anything")

    text = "live-migrate a virtual machine to another node and show the progress"
    p = subparsers.add_parser("migrate", help=text, description=text, parents=[common])
    p.add_argument("name", metavar="NAME", help="the VM")
    p.add_argument("--addedNodeSelector", "--added-node-selector", dest="added_node_selector",
                   action="append", metavar="KEY=VALUE",
                   help="an extra node selector for this migration only (repeatable, or "
                        "k1=v1,k2=v2); it can only narrow the VM's own constraints")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the migration is created, without following it")
    p.add_argument("--timeout", default=str(int(DEFAULT_TIMEOUT)), metavar="SECONDS",
                   help="how long to follow the migration (default 600; 30s, 10m, 1h work)")
    p.set_defaults(func=_cmd_migrate)

    text = "cancel the live migration of a virtual machine"
    p = subparsers.add_parser("migrate-cancel", help=text, description=text, parents=[common])
    p.add_argument("name", metavar="NAME", help="the VM")
    p.set_defaults(func=_cmd_migrate_cancel)
