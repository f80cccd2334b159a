"""``virtshift cordon|uncordon|drain`` (virtshift.cli.nodes) against a real API server.

The platform runs without controllers or nodes (``--nodes 0 --no-controllers``): the test
creates the Node objects and plays the scheduler, the evacuation controller and the node
agents with the components' credentials, so every step the drain waits for is under its
control.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.unit.test_cli_migrate import _cli, running_vmi, until
from virtshift.api.kinds import REGISTRY
from virtshift.api.migration import PROGRESS_ANNOTATION
from virtshift.cli.nodes import Drain, add_taint, on_node, remove_taint, set_cordon
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.errors import NotFound
from virtshift.testing.platform import PlatformProcess

Obj = dict[str, Any]
NODE = REGISTRY.require("", "v1", "Node")
VMI = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstance")
VMIM = REGISTRY.require("kubevirt.io", "v1", "VirtualMachineInstanceMigration")
KUBEVIRT = REGISTRY.require("kubevirt.io", "v1", "KubeVirt")
NS = "default"
OTHER_TAINT = {"key": "example.com/gpu", "value": "yes", "effect": "NoExecute"}


# ---- pure --------------------------------------------------------------------------------------


def test_node_edits() -> None:
    node: Obj = {"spec": {"taints": [OTHER_TAINT]}}
    assert set_cordon(node, True) and node["spec"]["unschedulable"] is True
    assert not set_cordon(node, True)
    assert add_taint(node, "kubevirt.io/drain")
    assert not add_taint(node, "kubevirt.io/drain")
    assert node["spec"]["taints"] == [OTHER_TAINT, {"key": "kubevirt.io/drain",
                                                    "effect": "NoSchedule"}]
    assert remove_taint(node, "kubevirt.io/drain") and not remove_taint(node, "kubevirt.io/drain")
    assert set_cordon(node, False)
    assert node == {"spec": {"taints": [OTHER_TAINT]}}
    bare: Obj = {}
    assert not remove_taint(bare, "kubevirt.io/drain") and not set_cordon(bare, False)


def test_on_node_keeps_unfinished_vmis_of_that_node() -> None:
    def vmi(name: str, label: str, node: str | None, phase: str) -> Obj:
        return {"metadata": {"name": name, "namespace": NS,
                             "labels": {"kubevirt.io/nodeName": label}},
                "status": {"phase": phase, **({"nodeName": node} if node else {})}}

    items = [vmi("b", "n1", "n1", "Running"), vmi("a", "n1", None, "Scheduled"),
             vmi("done", "n1", "n1", "Succeeded"), vmi("moved", "n1", "n2", "Running"),
             vmi("elsewhere", "n2", "n2", "Running")]
    assert [v["metadata"]["name"] for v in on_node(items, "n1")] == ["a", "b"]


# ---- against a real API server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    p = PlatformProcess(tmp_path_factory.mktemp("nodes-cli"), args=["--no-controllers"])
    p.start()
    yield p
    p.stop()


@pytest.fixture
async def system(api_only: PlatformProcess) -> AsyncIterator[Client]:
    c = Client(kubeconfig.load(api_only.data_dir / "components.kubeconfig"))
    yield c
    await c.close()


@pytest.fixture
async def admin(api_only: PlatformProcess) -> AsyncIterator[Client]:
    c = Client(api_only.config())
    yield c
    await c.close()


async def make_node(client: Client, name: str, taints: list[Obj] | None = None) -> Obj:
    spec: Obj = {"taints": taints} if taints else {}
    return await client.create(NODE, None, {"apiVersion": "v1", "kind": "Node",
                                            "metadata": {"name": name}, "spec": spec})


async def test_cordon_and_uncordon(api_only: PlatformProcess, admin: Client,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    await make_node(admin, "maint", [OTHER_TAINT])
    k = str(api_only.kubeconfig)
    assert await _cli("--kubeconfig", k, "cordon", "maint") == 0
    assert (await admin.get(NODE, None, "maint"))["spec"]["unschedulable"] is True
    assert await _cli("--kubeconfig", k, "cordon", "maint") == 0
    # Someone drained it earlier: uncordon also lifts the drain taint, and only that taint.
    node = await admin.get(NODE, None, "maint")
    node["spec"]["taints"].append({"key": "kubevirt.io/drain", "effect": "NoSchedule"})
    await admin.update(NODE, None, node)
    assert await _cli("--kubeconfig", k, "uncordon", "maint") == 0
    spec = (await admin.get(NODE, None, "maint"))["spec"]
    assert "unschedulable" not in spec or spec["unschedulable"] is False
    assert spec["taints"] == [OTHER_TAINT]
    assert await _cli("--kubeconfig", k, "uncordon", "maint") == 0
    assert await _cli("--kubeconfig", k, "cordon", "maint", "--dry-run") == 0
    assert "unschedulable" not in (await admin.get(NODE, None, "maint"))["spec"]
    assert capsys.readouterr().out.splitlines() == [
        "node/maint cordoned", "node/maint already cordoned", "node/maint uncordoned",
        "node/maint already uncordoned", "node/maint cordoned (dry run)"]
    assert await _cli("--kubeconfig", k, "cordon", "ghost") == 1
    assert capsys.readouterr().err == 'error: nodes "ghost" not found\n'
    assert await _cli("--kubeconfig", k, "drain", "ghost") == 1
    assert capsys.readouterr().err == 'error: nodes "ghost" not found\n'


async def test_drain_uses_the_configured_taint_key(
        api_only: PlatformProcess, admin: Client, capsys: pytest.CaptureFixture[str]) -> None:
    await make_node(admin, "empty")
    await admin.create(KUBEVIRT, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"migrations": {"nodeDrainTaintKey": "example.com/drain"}}}})
    try:
        k = str(api_only.kubeconfig)
        assert await _cli("--kubeconfig", k, "drain", "empty") == 0
        assert capsys.readouterr().out.splitlines() == [
            "node/empty cordoned", "node/empty tainted example.com/drain:NoSchedule",
            "node/empty drained"]
        spec = (await admin.get(NODE, None, "empty"))["spec"]
        assert spec == {"unschedulable": True, "taints": [
            {"key": "example.com/drain", "effect": "NoSchedule"}]}
        assert await _cli("--kubeconfig", k, "uncordon", "empty") == 0
        assert (await admin.get(NODE, None, "empty"))["spec"].get("taints") in (None, [])
    finally:
        await admin.delete(KUBEVIRT, NS, "kubevirt")


async def test_drain_by_eviction_strategy(api_only: PlatformProcess, admin: Client,
                                          system: Client,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    await make_node(admin, "busy")
    await running_vmi(system, "plain", "busy")  # no strategy: None, deleted
    await running_vmi(system, "ext", "busy", strategy="External")
    await running_vmi(system, "pinned", "busy", strategy="LiveMigrate", migratable=False)
    await running_vmi(system, "mobile", "busy", strategy="LiveMigrate")
    await running_vmi(system, "bystander", "other-node")
    k = str(api_only.kubeconfig)

    assert await _cli("--kubeconfig", k, "drain", "busy", "--dry-run") == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "node/busy cordoned (dry run)",
        "node/busy tainted kubevirt.io/drain:NoSchedule (dry run)",
        "VMI default/ext blocks the drain: eviction strategy External: an external "
        "controller must move it (dry run)",
        "evicting VMI default/mobile (live migration) (dry run)",
        "VMI default/pinned blocks the drain: VMI pinned is configured with an eviction "
        "strategy but is not live-migratable (DisksNotLiveMigratable: cannot migrate VMI: PVC "
        "d is not shared) (dry run)",
        "evicting VMI default/plain (delete: eviction strategy None) (dry run)"]
    assert captured.err.startswith("error: node/busy cannot be drained: VMI default/ext (")
    assert (await admin.get(NODE, None, "busy"))["spec"] == {}

    out = io.StringIO()
    drain = asyncio.create_task(Drain(admin, "busy", timeout=60, out=out, interval=0.1).run())

    async def printed(line: str) -> Any:
        if drain.done():
            drain.result()  # raise what ended it
            raise AssertionError(f"the drain ended early:\n{out.getvalue()}")
        return line in out.getvalue().splitlines()

    await until(lambda: printed("evicting VMI default/mobile (live migration)"), "mobile")
    await until(lambda: printed("VMI default/plain evicted"), "plain deleted")
    with pytest.raises(NotFound):
        await admin.get(VMI, NS, "plain")
    spec = (await admin.get(NODE, None, "busy"))["spec"]
    assert spec == {"unschedulable": True,
                    "taints": [{"key": "kubevirt.io/drain", "effect": "NoSchedule"}]}

    # The evacuation controller migrates "mobile"; the agents report progress, then success.
    vmim = await system.create(VMIM, NS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "kubevirt-evacuation-"}, "spec": {"vmiName": "mobile"}})
    name = vmim["metadata"]["name"]
    await system.patch(VMIM, NS, name, {"metadata": {"annotations": {PROGRESS_ANNOTATION:
        json.dumps({"transferredBytes": 1024, "totalBytes": 4096, "iteration": 1})}}})
    await system.patch(VMIM, NS, name, {"status": {"phase": "Running"}}, subresource="status")
    await until(lambda: printed("VMI default/mobile: Running: 1.0 KiB / 4.0 KiB transferred "
                                "(25%), iteration 1"), "progress")
    await system.patch(VMI, NS, "mobile", {"status": {"migrationState": {
        "migrationUid": vmim["metadata"]["uid"], "sourceNode": "busy", "targetNode": "spare",
        "completed": True}}}, subresource="status")
    await system.patch(VMIM, NS, name, {"status": {"phase": "Succeeded"}}, subresource="status")
    await until(lambda: printed(f"VMI default/mobile: Migration {name} succeeded: busy -> "
                                "spare"), "the outcome")
    await system.patch(VMI, NS, "mobile", {"status": {"nodeName": "spare"}}, subresource="status")
    await system.patch(VMI, NS, "mobile", {"metadata": {"labels": {
        "kubevirt.io/nodeName": "spare"}}})
    await until(lambda: printed("VMI default/mobile evicted"), "mobile gone")

    # Two VMIs block the drain: a second drain gives up after its timeout, naming them.
    assert await _cli("--kubeconfig", k, "drain", "busy", "--timeout", "1") == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == ["node/busy already cordoned",
                                             "VMI default/ext blocks the drain: eviction "
                                             "strategy External: an external controller must "
                                             "move it (waiting)"]
    assert captured.err == (
        "error: drain of node/busy timed out after 1s; still on the node: VMI default/ext "
        "(blocked: eviction strategy External: an external controller must move it); "
        "VMI default/pinned (blocked: VMI pinned is configured with an eviction strategy but "
        "is not live-migratable (DisksNotLiveMigratable: cannot migrate VMI: PVC d is not "
        "shared))\n")

    # Once they are gone (an external controller, the user), the first drain completes.
    assert not drain.done()
    await admin.delete(VMI, NS, "ext")
    await admin.delete(VMI, NS, "pinned")
    assert await asyncio.wait_for(drain, 30) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1] == "node/busy drained"
    assert "VMI default/ext evicted" in lines and "VMI default/pinned evicted" in lines
    assert await admin.get(VMI, NS, "bystander")
