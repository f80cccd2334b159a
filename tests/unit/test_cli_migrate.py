"""``virtshift migrate`` / ``migrate-cancel`` (virtshift.cli.migrate) and the drain decisions of
virtshift.cli.nodes.

The pure parts (progress lines, picking migrations, outcomes, eviction per strategy) are tested
on plain objects; the verbs run against a real API server (``virtshift up --nodes 0
--no-controllers``) where the test plays the controller and the node agents through the
components' credentials, as KubeVirt's own components write VMIs, migrations and status.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from virtshift.api.kinds import REGISTRY
from virtshift.api.migration import PROGRESS_ANNOTATION
from virtshift.cli import main
from virtshift.cli.migrate import (
    ProgressView,
    active_migration,
    failure_reason,
    format_bytes,
    format_progress,
    migrate,
    newest,
    outcome,
    parse_seconds,
    parse_selector,
)
from virtshift.cli.nodes import Eviction, drain_decision
from virtshift.cli.vm import VmCommandError
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.testing.platform import PlatformProcess

Obj = dict[str, Any]
VMI = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance")
VMIM = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstanceMigration")
VM = REGISTRY.require("kubevirt.io", "v1", "VirtualMachine")
NS = "default"
MIB = 1024 ** 2


# ---- pure: formatting --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (412 * MIB, "412.0 MiB"),
    (1024 ** 3, "1.0 GiB"), (3 * 1024 ** 4, "3.0 TiB"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_progress_with_the_agents_annotation() -> None:
    progress = {"status": "active", "transferredBytes": 256 * MIB, "totalBytes": 1024 * MIB,
                "remainingBytes": 768 * MIB, "dirtyRate": 1200, "iteration": 2,
                "mbps": 940.4, "elapsedMs": 2500}
    assert format_progress("Running", progress) == (
        "Running: 256.0 MiB / 1.0 GiB transferred (25%), 768.0 MiB remaining, "
        "dirty rate 1200 pages/s, iteration 2, 940 Mbps, 2.5s")


def test_format_progress_without_progress_or_phase() -> None:
    assert format_progress("Scheduling", {}) == "Scheduling"
    assert format_progress("", {}) == "Pending"
    # Partial or odd data: what is known, nothing invented.
    assert format_progress("Running", {"transferredBytes": 10, "mbps": 2.25,
                                       "iteration": True}) == \
        "Running: 10 B transferred, 2.2 Mbps"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("1.5", 1.5)])
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


def test_parse_seconds_and_selector_errors() -> None:
    with pytest.raises(VmCommandError, match="invalid duration '5d'"):
        parse_seconds("5d")
    assert parse_selector(["a=b,c=d", "e=f"]) == {"a": "b", "c": "d", "e": "f"}
    with pytest.raises(VmCommandError, match="expected KEY=VALUE"):
        parse_selector(["novalue"])


def test_progress_view_rewrites_one_line_on_a_terminal() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    view.update("Pending")
    view.update("Pending")
    view.update("Running: 1 B transferred")
    view.end()
    assert out.getvalue() == "\rPending\x1b[K\rRunning: 1 B transferred\x1b[K\n"
    out = io.StringIO()
    view = ProgressView(out, tty=False, prefix="VMI a/b: ")
    for line in ("Pending", "Pending", "Running"):
        view.update(line)
    view.end()
    assert out.getvalue() == "VMI a/b: Pending\nVMI a/b: Running\n"


# ---- pure: picking migrations ------------------------------------------------------------------


def _vmim(name: str, vmi: str, phase: str = "", created: str = "2026-01-01T00:00:00Z",
          **meta: Any) -> Obj:
    return {"metadata": {"name": name, "creationTimestamp": created, "uid": f"uid-{name}",
                         "labels": {"kubevirt.io/vmi-name": vmi}, **meta},
            "spec": {"vmiName": vmi}, "status": {"phase": phase} if phase else {}}


def test_newest_skips_known_migrations() -> None:
    items = [_vmim("old", "a", "Succeeded", "2026-01-01T00:00:00Z"),
             _vmim("new", "a", "", "2026-01-01T00:00:05Z")]
    assert newest(items) == items[1]
    assert newest(items, exclude={"new"}) == items[0]
    assert newest(items, exclude={"new", "old"}) is None


def test_active_migration_is_the_unfinished_one_of_that_vmi() -> None:
    items = [
        _vmim("done", "a", "Succeeded", "2026-01-01T00:00:09Z"),
        _vmim("failed", "a", "Failed", "2026-01-01T00:00:09Z"),
        _vmim("other-vmi", "b", "Running", "2026-01-01T00:00:09Z"),
        _vmim("deleting", "a", "Running", "2026-01-01T00:00:08Z",
              deletionTimestamp="2026-01-01T00:00:10Z"),
        _vmim("running", "a", "Running", "2026-01-01T00:00:01Z"),
    ]
    assert active_migration(items, "a") == items[4]  # not the one already being cancelled
    assert active_migration(items[:4], "a") == items[3]
    assert active_migration(items[:3], "a") is None
    assert active_migration(items, "c") is None
    # virtctl matches spec.vmiName; a migration without the label still counts.
    unlabelled = {"metadata": {"name": "x"}, "spec": {"vmiName": "c"}, "status": {}}
    assert active_migration([unlabelled], "c") == unlabelled


# ---- pure: outcomes ----------------------------------------------------------------------------


def _state(uid: str, **fields: Any) -> Obj:
    return {"status": {"migrationState": {"migrationUid": uid, **fields}}}


def test_outcome_succeeded_reports_nodes_time_and_downtime() -> None:
    vmim = _vmim("m", "a", "Succeeded")
    vmim["metadata"]["annotations"] = {PROGRESS_ANNOTATION: json.dumps({"downtimeMs": 45})}
    vmi = _state("uid-m", sourceNode="node-1", targetNode="node-2",
                 startTimestamp="2026-01-01T00:00:00Z",
                 endTimestamp="2026-01-01T00:00:12.500000Z")
    result = outcome(vmim, vmi)
    assert result.succeeded
    assert result.text == "Migration m succeeded: node-1 -> node-2 in 12.5s, downtime 45 ms"


def test_outcome_ignores_the_state_of_another_migration() -> None:
    vmim = _vmim("m", "a", "Succeeded")
    vmim["status"]["migrationState"] = {"sourceNode": "x", "targetNode": "y"}
    vmi = _state("uid-other", sourceNode="p", targetNode="q")
    assert outcome(vmim, vmi).text == "Migration m succeeded: x -> y"


def test_failure_reason_sources_in_order() -> None:
    vmim = _vmim("m", "a", "Failed")
    vmim["status"]["conditions"] = [
        {"type": "migrationRejectedByResourceQuota", "status": "False", "message": "no"},
        {"type": "migrationBlockedByBackup", "status": "True", "message": "backup running"}]
    events = [
        {"type": "Normal", "reason": "Created", "message": "fine",
         "lastTimestamp": "2026-01-01T00:00:09Z"},
        {"type": "Warning", "reason": "FailedMigration", "message": "old",
         "lastTimestamp": "2026-01-01T00:00:01Z"},
        {"type": "Warning", "reason": "FailedMigration", "message": "target  gone\nbye",
         "lastTimestamp": "2026-01-01T00:00:05Z"}]
    vmi = _state("uid-m", failed=True, failureReason="QEMU: migration\n  aborted")
    assert failure_reason(vmim, vmi, events) == "QEMU: migration aborted"
    assert failure_reason(vmim, _state("uid-m", failed=True, abortRequested=True)) == \
        "the migration was cancelled"
    assert failure_reason(vmim, None, events) == "migrationBlockedByBackup: backup running"
    vmim["status"].pop("conditions")
    assert failure_reason(vmim, None, events) == "FailedMigration: target gone bye"
    assert failure_reason(vmim, None) == "no reason was reported"
    result = outcome(vmim, vmi, events)
    assert not result.succeeded
    assert result.text == "Migration m failed: QEMU: migration aborted"


# ---- pure: drain decisions ---------------------------------------------------------------------


def _vmi(name: str, strategy: str | None = None, migratable: bool | None = None) -> Obj:
    vmi: Obj = {"metadata": {"name": name, "namespace": NS}, "spec": {}, "status": {}}
    if strategy is not None:
        vmi["spec"]["evictionStrategy"] = strategy
    if migratable is not None:
        vmi["status"]["conditions"] = [{
            "type": "LiveMigratable", "status": "True" if migratable else "False",
            **({} if migratable else {"reason": "DisksNotLiveMigratable",
                                      "message": "cannot migrate VMI: PVC d is not shared"})}]
    return vmi


NOT_MIGRATABLE = "DisksNotLiveMigratable: cannot migrate VMI: PVC d is not shared"


@pytest.mark.parametrize(("strategy", "migratable", "cluster", "expected"), [
    (None, True, None, Eviction("delete", "eviction strategy None")),
    ("None", True, "LiveMigrate", Eviction("delete", "eviction strategy None")),
    (None, True, "LiveMigrate", Eviction("migrate", "eviction strategy LiveMigrate")),
    ("LiveMigrate", True, None, Eviction("migrate", "eviction strategy LiveMigrate")),
    ("LiveMigrate", False, None, Eviction(
        "block", "VMI v is configured with an eviction strategy but is not live-migratable "
                 f"({NOT_MIGRATABLE})")),
    ("LiveMigrateIfPossible", True, None,
     Eviction("migrate", "eviction strategy LiveMigrateIfPossible")),
    ("LiveMigrateIfPossible", False, None, Eviction(
        "delete", f"eviction strategy LiveMigrateIfPossible, not live-migratable "
                  f"({NOT_MIGRATABLE})")),
    ("External", True, None, Eviction(
        "block", "eviction strategy External: an external controller must move it")),
])
def test_drain_decision(strategy: str | None, migratable: bool, cluster: str | None,
                        expected: Eviction) -> None:
    assert drain_decision(_vmi("v", strategy, migratable), cluster) == expected


def test_drain_decision_before_the_agent_reports_migratability() -> None:
    decision = drain_decision(_vmi("v", "LiveMigrate"), None)
    assert decision.action == "block"
    assert "the node agent has not reported it yet" in decision.reason


# ---- against a real API server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    """The API server alone: the test plays the controllers and agents."""
    p = PlatformProcess(tmp_path_factory.mktemp("migrate-cli"), args=["--no-controllers"])
    p.start()
    yield p
    p.stop()


@pytest.fixture
async def admin(api_only: PlatformProcess) -> AsyncIterator[Client]:
    c = Client(api_only.config())
    yield c
    await c.close()


@pytest.fixture
async def system(api_only: PlatformProcess) -> AsyncIterator[Client]:
    """KubeVirt's components' identity (may set reserved labels and status)."""
    c = Client(kubeconfig.load(api_only.data_dir / "components.kubeconfig"))
    yield c
    await c.close()


async def _cli(*argv: str) -> int | str | None:
    def run() -> int | str | None:
        try:
            main.run(list(argv))
        except SystemExit as e:
            return e.code
        raise AssertionError("main.run did not exit")

    return await asyncio.to_thread(run)


async def running_vmi(system: Client, name: str, node: str = "node-1", *,
                      strategy: str | None = None, migratable: bool = True) -> Obj:
    """A VMI as the scheduler and a node agent leave it: on ``node``, Running."""
    spec: Obj = {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}
    if strategy is not None:
        spec["evictionStrategy"] = strategy
    await system.create(VMI, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"kubevirt.io/nodeName": node}}, "spec": spec})
    cond: Obj = {"type": "LiveMigratable", "status": "True" if migratable else "False"}
    if not migratable:
        cond.update(reason="DisksNotLiveMigratable", message="cannot migrate VMI: PVC d is "
                                                              "not shared")
    return await system.patch(VMI, NS, name, {"status": {
        "phase": "Running", "nodeName": node, "conditions": [cond]}}, subresource="status")


async def stopped_vm(admin: Client, name: str) -> None:
    await admin.create(VM, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"runStrategy": "Manual", "template": {"spec": {"domain": {
            "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}}})


async def until(predicate: Any, what: str, within: float = 20.0) -> Any:
    """Poll ``predicate`` (a coroutine function) until it returns something true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_migrate_a_missing_or_stopped_vm_is_one_line(
        api_only: PlatformProcess, admin: Client, capsys: pytest.CaptureFixture[str]) -> None:
    k = str(api_only.kubeconfig)
    assert await _cli("--kubeconfig", k, "migrate", "nothere") == 1
    assert capsys.readouterr().err == ('error: Error migrating VirtualMachine '
                                       'virtualmachine.kubevirt.io "nothere" not found\n')
    await stopped_vm(admin, "stopped")
    assert await _cli("--kubeconfig", k, "migrate", "stopped", "--no-wait") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: Error migrating VirtualMachine ")
    assert captured.err.count("\n") == 1
    assert await _cli("--kubeconfig", k, "migrate", "stopped", "--timeout", "1d") == 1
    assert "invalid duration '1d'" in capsys.readouterr().err


async def test_migrate_cancel_without_a_migration(
        api_only: PlatformProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _cli("--kubeconfig", str(api_only.kubeconfig), "migrate-cancel", "idle") == 1
    assert capsys.readouterr().err == "error: Found no migration to cancel for idle\n"


async def test_migrate_cancel_deletes_the_active_migration(
        api_only: PlatformProcess, system: Client, capsys: pytest.CaptureFixture[str]) -> None:
    await running_vmi(system, "cancelme")
    finished = await system.create(VMIM, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "cancelme-done"}, "spec": {"vmiName": "cancelme"}})
    await system.patch(VMIM, NS, "cancelme-done", {"status": {"phase": "Succeeded"}},
                       subresource="status")
    await system.create(VMIM, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "cancelme-live"}, "spec": {"vmiName": "cancelme"}})
    k = str(api_only.kubeconfig)
    assert await _cli("--kubeconfig", k, "migrate-cancel", "cancelme", "--dry-run") == 0
    assert capsys.readouterr().out == ("Dry Run execution\n"
                                       "VM cancelme was scheduled to migrate-cancel\n")
    names = {m["metadata"]["name"] for m in (await system.list(VMIM, NS))["items"]}
    assert {"cancelme-done", "cancelme-live"} <= names
    assert await _cli("--kubeconfig", k, "migrate-cancel", "cancelme") == 0
    assert capsys.readouterr().out == "VM cancelme was scheduled to migrate-cancel\n"
    names = {m["metadata"]["name"] for m in (await system.list(VMIM, NS))["items"]}
    assert "cancelme-live" not in names
    assert "cancelme-done" in names  # a finished migration is history, not cancelled
    assert finished["metadata"]["labels"] == {"kubevirt.io/vmi-name": "cancelme"}
    assert await _cli("--kubeconfig", k, "migrate-cancel", "cancelme") == 1
    assert capsys.readouterr().err == "error: Found no migration to cancel for cancelme\n"


async def _follow_migration(admin: Client, system: Client, vm: str
                            ) -> tuple[asyncio.Task[int], io.StringIO, Obj]:
    """Start ``migrate`` on ``vm`` and return once its migration exists."""
    await stopped_vm(admin, vm)
    await running_vmi(system, vm)
    # An older, finished migration of the same VMI must not be mistaken for the new one.
    await system.create(VMIM, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": f"{vm}-earlier"}, "spec": {"vmiName": vm}})
    await system.patch(VMIM, NS, f"{vm}-earlier", {"status": {"phase": "Failed"}},
                       subresource="status")
    out = io.StringIO()
    task = asyncio.create_task(migrate(admin, NS, vm, selector={"zone": "b"}, dry_run=False,
                                       wait=True, within=30.0, out=out))

    async def created() -> Obj | None:
        items = (await system.list(VMIM, NS, label_selector=f"kubevirt.io/vmi-name={vm}")
                 )["items"]
        fresh = [m for m in items if m["metadata"]["name"] != f"{vm}-earlier"]
        return fresh[0] if fresh and "\nMigration " in out.getvalue() else None

    vmim: Obj = await until(created, "the migration")
    return task, out, vmim


async def test_migrate_follows_progress_to_success(admin: Client, system: Client) -> None:
    task, out, vmim = await _follow_migration(admin, system, "mover")
    name = vmim["metadata"]["name"]
    assert name.startswith("kubevirt-migrate-vm-")
    assert vmim["spec"] == {"vmiName": "mover", "addedNodeSelector": {"zone": "b"}}
    progress = {"status": "active", "transferredBytes": 64 * MIB, "totalBytes": 256 * MIB,
                "remainingBytes": 192 * MIB, "dirtyRate": 10, "iteration": 1, "mbps": 100,
                "elapsedMs": 700}
    await system.patch(VMIM, NS, name, {"metadata": {"annotations": {
        PROGRESS_ANNOTATION: json.dumps(progress)}}})
    await system.patch(VMIM, NS, name, {"status": {"phase": "Running"}}, subresource="status")

    async def shown() -> bool:
        return "Running: 64.0 MiB / 256.0 MiB transferred (25%)" in out.getvalue()

    await until(shown, "the progress line")
    await system.patch(VMI, NS, "mover", {"status": {"nodeName": "node-2", "migrationState": {
        "migrationUid": vmim["metadata"]["uid"], "sourceNode": "node-1",
        "targetNode": "node-2", "startTimestamp": "2026-01-01T00:00:00Z",
        "endTimestamp": "2026-01-01T00:00:03Z", "completed": True}}}, subresource="status")
    await system.patch(VMIM, NS, name, {"metadata": {"annotations": {
        PROGRESS_ANNOTATION: json.dumps({**progress, "downtimeMs": 12})}}})
    await system.patch(VMIM, NS, name, {"status": {"phase": "Succeeded"}}, subresource="status")
    assert await asyncio.wait_for(task, 30) == 0
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["VM mover was scheduled to migrate", f"Migration {name}"]
    assert lines[-1] == (f"Migration {name} succeeded: node-1 -> node-2 in 3.0s, "
                         "downtime 12 ms")


async def test_migrate_reports_a_failure(admin: Client, system: Client) -> None:
    task, out, vmim = await _follow_migration(admin, system, "stuck")
    name = vmim["metadata"]["name"]
    await system.patch(VMI, NS, "stuck", {"status": {"migrationState": {
        "migrationUid": vmim["metadata"]["uid"], "sourceNode": "node-1",
        "targetNode": "node-2", "failed": True, "completed": True,
        "failureReason": "Live migration stuck for 150 s and has been aborted"}}},
        subresource="status")
    await system.patch(VMIM, NS, name, {"status": {"phase": "Failed"}}, subresource="status")
    with pytest.raises(VmCommandError) as err:
        await asyncio.wait_for(task, 30)
    assert str(err.value) == (f"Migration {name} failed: Live migration stuck for 150 s and "
                              "has been aborted")
    assert out.getvalue().splitlines()[-1] == "Failed"


async def test_migrate_cli_times_out_naming_the_migration(
        api_only: PlatformProcess, admin: Client, system: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    await stopped_vm(admin, "slow")
    await running_vmi(system, "slow")
    assert await _cli("--kubeconfig", str(api_only.kubeconfig), "migrate", "slow",
                      "--timeout", "1s") == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0] == "VM slow was scheduled to migrate"
    assert out[1].startswith("Migration kubevirt-migrate-vm-")
    assert out[2] == "Pending"
    name = out[1].split()[1]
    assert captured.err == (f"error: timed out after 1s waiting for migration {name} (phase "
                            "Pending); it goes on: 'virtshift migrate-cancel slow' stops it\n")
    # --no-wait returns at once; the migration is refused now that one is in flight.
    assert await _cli("--kubeconfig", str(api_only.kubeconfig), "migrate", "slow",
                      "--no-wait") == 1
    assert "in-flight migration detected" in capsys.readouterr().err


def test_the_verbs_are_registered() -> None:
    p = main.parser()
    args = p.parse_args(["migrate", "x", "--addedNodeSelector", "a=b", "-n", "ns",
                         "--no-wait"])
    assert (args.name, args.namespace, args.added_node_selector, args.no_wait) == \
        ("x", "ns", ["a=b"], True)
    assert p.parse_args(["migrate-cancel", "x"]).name == "x"
    assert p.parse_args(["drain", "n1", "--timeout", "30"]).timeout == "30"
