"""The node agent's pure parts: VMI status reports, merge patches, OVMF selection."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from virtshift.agent.disks import confined, prepare_efi
from virtshift.agent.status import (
    Observed,
    final_status,
    live_migratable,
    running_status,
    set_conditions,
    sync_failure_status,
)
from virtshift.agent.vmis import conversion_from_json, status_patch
from virtshift.launcher.context import Conversion, DiskInfo, InterfaceInfo
from virtshift.launcher.guestagent import GuestInterface
from virtshift.launcher.supervisor import ExitInfo, ExitKind

T0 = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(seconds=30)


def conv() -> Conversion:
    return Conversion(
        argv=("qemu-system-x86_64",), machine="q35", cpu_model="max", vcpus=2, sockets=1,
        cores=2, threads=1, memory_bytes=128 * 1024 * 1024, start_paused=False,
        disks=(DiskInfo("root", "ua-root", "drive-root", "virtio", "disk", "/x", False, 1),),
        interfaces=(InterfaceInfo("default", "ua-default", "52:54:00:aa:bb:cc", "virtio",
                                  "user", "10.0.2.2", "10.0.2.1"),),
        warnings=())


def vmi(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "v", "namespace": "d", "uid": "u1"},
            "spec": {"domain": {"devices": {"interfaces": [{"name": "default",
                                                            "masquerade": {}}]}},
                     "networks": [{"name": "default", "pod": {}}],
                     "volumes": [{"name": "root", "containerDisk": {"image": "x"}}]},
            "status": {"phase": "Scheduled", "nodeName": "n1", **status}}


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), None)


def test_running_status_reports_only_what_was_observed() -> None:
    st = running_status(vmi(), conv(), Observed(), T0, node="n1")
    assert st["phase"] == "Running" and st["nodeName"] == "n1"
    assert st["phaseTransitionTimestamps"][-1] == {"phase": "Running",
                                                   "phaseTransitionTimestamp":
                                                   "2026-12-01T10:00:00Z"}
    assert cond(st, "Ready")["status"] == "True"  # type: ignore[index]
    assert cond(st, "AgentConnected") is None and "guestOSInfo" not in st
    iface = st["interfaces"][0]
    assert iface == {"name": "default", "mac": "52:54:00:aa:bb:cc", "infoSource": "domain",
                     "podInterfaceName": "eth0", "queueCount": 1}  # no IP until observed
    assert st["currentCPUTopology"] == {"sockets": 1, "cores": 2, "threads": 1}
    assert st["memory"]["guestAtBoot"] == "128Mi"
    assert st["migrationMethod"] == "BlockMigration"  # containerDisk is node-local


def test_guest_agent_data_and_pause() -> None:
    obs = Observed(paused=True, agent_connected=True, guest_os={"id": "tg"},
                   guest_interfaces=(GuestInterface("eth0", "52:54:00:AA:BB:CC",
                                                    ("10.0.2.2/24", "fe80::1/64")),))
    st = running_status(vmi(), conv(), obs, T0, node="n1")
    iface = st["interfaces"][0]
    assert iface["ipAddress"] == "10.0.2.2" and iface["ipAddresses"] == ["10.0.2.2", "fe80::1"]
    assert iface["interfaceName"] == "eth0" and iface["infoSource"] == "domain, guest-agent"
    assert st["guestOSInfo"] == {"id": "tg"}
    assert cond(st, "Paused")["reason"] == "PausedByUser"  # type: ignore[index]
    assert cond(st, "Ready")["status"] == "False"  # type: ignore[index]
    # unpaused: the Paused condition goes away, Ready's transition time moves
    again = running_status({**vmi(), "status": st}, conv(), Observed(agent_connected=True),
                           T1, node="n1")
    assert cond(again, "Paused") is None
    assert cond(again, "Ready")["lastTransitionTime"] == "2026-12-01T10:00:30Z"  # type: ignore
    assert cond(again, "AgentConnected")["lastTransitionTime"] == (  # type: ignore[index]
        "2026-12-01T10:00:00Z")


def test_final_status_by_exit_kind() -> None:
    running = running_status(vmi(), conv(), Observed(agent_connected=True), T0, node="n1")
    base = {**vmi(), "status": running}
    for kind, phase in ((ExitKind.GUEST_SHUTDOWN, "Succeeded"), (ExitKind.STOPPED, "Succeeded"),
                        (ExitKind.KILLED, "Succeeded"), (ExitKind.CRASHED, "Failed"),
                        (ExitKind.GUEST_PANICKED, "Failed")):
        st = final_status(base, ExitInfo(kind, "why"), T1)
        assert st["phase"] == phase and st["reason"] == kind.value
        assert cond(st, "Ready")["status"] == "False"  # type: ignore[index]
        assert cond(st, "AgentConnected") is None and "interfaces" not in st
    never = final_status(vmi(), None, T1, failed_reason="FailedCreate")
    assert never["phase"] == "Failed" and never["reason"] == "FailedCreate"


def test_live_migratable_reasons() -> None:
    ok = live_migratable(vmi(), "t")
    assert ok["status"] == "True"
    bridged = vmi()
    bridged["spec"]["domain"]["devices"]["interfaces"] = [{"name": "default", "bridge": {}}]
    assert live_migratable(bridged, "t")["reason"] == "InterfaceNotLiveMigratable"
    pvc = vmi()
    pvc["spec"]["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "c"}})
    assert live_migratable(pvc, "t")["reason"] == "DisksNotLiveMigratable"


def test_sync_failure_keeps_phase_and_other_conditions() -> None:
    base = vmi(conditions=[{"type": "Ready", "status": "False"}])
    st = sync_failure_status(base, "ErrImagePull", 'image "x" not found', T0)
    assert st["phase"] == "Scheduled"
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Synchronized"]
    assert cond(st, "Synchronized")["reason"] == "ErrImagePull"  # type: ignore[index]


def test_set_conditions_replaces_in_place_and_drops() -> None:
    old = [{"type": "A", "status": "True"}, {"type": "B", "status": "True"},
           {"type": "C", "status": "True"}]
    out = set_conditions(old, [{"type": "B", "status": "False"}, {"type": "D", "status": "X"}],
                         drop=["C"])
    assert out == [{"type": "A", "status": "True"}, {"type": "B", "status": "False"},
                   {"type": "D", "status": "X"}]


def test_status_patch_nulls_removed_keys() -> None:
    assert status_patch({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5}) == {"b": 5, "c": None}
    assert status_patch({"a": 1}, {"a": 1}) == {}


def test_conversion_round_trips_through_json() -> None:
    import dataclasses
    import json

    c = conv()
    assert conversion_from_json(json.loads(json.dumps(dataclasses.asdict(c)))) == c


def test_prepare_efi_picks_ovmf_and_copies_vars(tmp_path: Path) -> None:
    ovmf = tmp_path / "ovmf"
    ovmf.mkdir()
    for name in ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE_4M.secboot.fd",
                 "OVMF_VARS_4M.ms.fd"):
        (ovmf / name).write_bytes(name.encode())
    run = tmp_path / "run"
    run.mkdir()
    efi = {"spec": {"domain": {"firmware": {"bootloader": {"efi": {"secureBoot": False}}}}}}
    fw = prepare_efi(efi, run, ovmf)
    assert fw is not None and fw.code.endswith("OVMF_CODE_4M.fd") and not fw.secure_boot
    assert Path(fw.vars).read_bytes() == b"OVMF_VARS_4M.fd" and Path(fw.vars).parent == run
    secure = {"spec": {"domain": {"firmware": {"bootloader": {"efi": {}}}}}}  # default: on
    (run / "efi-vars.fd").unlink()
    fw = prepare_efi(secure, run, ovmf)
    assert fw is not None and fw.secure_boot and fw.code.endswith("secboot.fd")
    assert prepare_efi({"spec": {}}, run, ovmf) is None
    assert prepare_efi(efi, run, tmp_path / "none") is None


def test_hostdisk_paths_are_confined(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    assert confined(str(allowed / "sub" / "d.img"), [allowed]) == allowed / "sub" / "d.img"
    import pytest

    from virtshift.agent.disks import DiskError
    with pytest.raises(DiskError, match="outside"):
        confined(str(allowed / ".." / "escape.img"), [allowed])
    (allowed / "link").symlink_to("/etc")
    with pytest.raises(DiskError, match="outside"):
        confined(str(allowed / "link" / "passwd"), [allowed])
