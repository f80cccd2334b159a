"""The launcher's converter: VMI spec (as admission leaves it) to a QEMU command line."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtshift.api.admission import AdmissionConfig, default
from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.controller.vm import build_vmi
from virtshift.launcher.common import MAX_SOCKET_PATH
from virtshift.launcher.converter import (
    Conversion,
    DiskFile,
    EfiFirmware,
    KernelBoot,
    LaunchContext,
    LauncherError,
    PortForward,
    TapNetwork,
    UserNetwork,
    convert,
    efi_secure_boot,
    qemu_argv,
)
from virtshift.launcher.network import stable_mac

Obj = dict[str, Any]

CORPUS = Path("/work/shared/reference/kubevirt-examples")
UUID = "6a1a2e4c-0000-4000-8000-000000000001"
CFG = AdmissionConfig(new_uuid=lambda: UUID)
RUN = Path("/run/virtshift-test/vmi")
MIB = 1024 * 1024
_VMI_INFO = REGISTRY.by_api_version("kubevirt.io/v1", "VirtualMachineInstance")
assert _VMI_INFO is not None
VMI_KIND: KindInfo = _VMI_INFO


# ---- argv readers -------------------------------------------------------------------------


def values(argv: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """The value after every occurrence of ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def value(argv: tuple[str, ...] | list[str], flag: str) -> str:
    found = values(argv, flag)
    assert len(found) == 1, (flag, found)
    return found[0]


def devices(argv: tuple[str, ...]) -> list[Obj]:
    return [json.loads(v) for v in values(argv, "-device")]


def device(argv: tuple[str, ...], qdev_id: str) -> Obj:
    found = [d for d in devices(argv) if d.get("id") == qdev_id]
    assert len(found) == 1, (qdev_id, devices(argv))
    return found[0]


def drivers(argv: tuple[str, ...]) -> list[str]:
    return [str(d["driver"]) for d in devices(argv)]


def blockdevs(argv: tuple[str, ...]) -> dict[str, Obj]:
    nodes = [json.loads(v) for v in values(argv, "-blockdev")]
    return {str(n["node-name"]): n for n in nodes}


def keyvals(option: str) -> dict[str, str]:
    """``a=1,b=2`` (QEMU's key=value syntax; no doubled commas in the tested values)."""
    out = {}
    for part in option.split(","):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def disk_file(argv: tuple[str, ...], qdev_id: str) -> str:
    """The file a disk device reads, through its format node."""
    nodes = blockdevs(argv)
    fmt = nodes[device(argv, qdev_id)["drive"]]
    return str(nodes[fmt["file"]]["filename"])


# ---- building inputs ----------------------------------------------------------------------


def vmi(name: str = "testvm", namespace: str = "ns", **spec: Any) -> Obj:
    """A small VMI with one virtio disk; ``spec`` keys replace the defaults."""
    base: Obj = {
        "domain": {
            "memory": {"guest": "128Mi"},
            "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
        },
        "volumes": [{"name": "root", "containerDisk": {"image": "img"}}],
    }
    base.update(spec)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


def ctx(**kw: Any) -> LaunchContext:
    kw.setdefault("run_dir", RUN)
    kw.setdefault("disks", {"root": DiskFile("/var/lib/img/root.qcow2", "qcow2")})
    return LaunchContext(**kw)


def domain(obj: Obj) -> Obj:
    d = obj["spec"]["domain"]
    assert isinstance(d, dict)
    return d


def problems(obj: Obj, context: LaunchContext | None = None) -> tuple[str, ...]:
    with pytest.raises(LauncherError) as info:
        convert(obj, context or ctx())
    return info.value.fields


# ---- the example corpus -------------------------------------------------------------------


def _fake_file(volume: Obj) -> DiskFile:
    name = volume["name"]
    if "cloudInitNoCloud" in volume or "cloudInitConfigDrive" in volume:
        return DiskFile(f"/var/lib/vs/{name}.iso", "raw")
    if "containerDisk" in volume or "emptyDisk" in volume:
        return DiskFile(f"/var/lib/vs/{name}.qcow2", "qcow2")
    return DiskFile(f"/var/lib/vs/{name}.img", "raw")


def _vm_to_vmi(vm: Obj) -> Obj:
    vm = copy.deepcopy(vm)
    vm["metadata"].setdefault("namespace", "default")
    vm["metadata"]["uid"] = "0f0f0f0f-0000-4000-8000-000000000000"
    return build_vmi(vm, [])


def corpus_vmis() -> list[tuple[str, Obj]]:
    """Every VM/VMI of the corpus as the VMI the platform would run (admission-defaulted)."""
    out = []
    for path in sorted(CORPUS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            kind = doc.get("kind")
            if kind == "VirtualMachineInstance":
                obj = copy.deepcopy(doc)
                obj["metadata"].setdefault("namespace", "default")
            elif kind == "VirtualMachine":
                obj = _vm_to_vmi(doc)
            elif kind == "VirtualMachinePool":
                template = doc["spec"]["virtualMachineTemplate"]
                obj = _vm_to_vmi({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                  "metadata": {"name": f"{doc['metadata']['name']}-0"},
                                  "spec": template["spec"]})
            elif kind == "VirtualMachineInstanceReplicaSet":
                template = copy.deepcopy(doc["spec"]["template"])
                obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                       "metadata": {**template.get("metadata", {}), "namespace": "default",
                                    "name": f"{doc['metadata']['name']}abcde"},
                       "spec": template["spec"]}
            else:
                continue
            out.append((str(path.relative_to(CORPUS)), default(VMI_KIND, obj, config=CFG)))
    return out


CORPUS_VMIS = corpus_vmis()

# What each manifest must come out as: disk buses by disk name, guest memory in MiB, rng,
# the pod interface's name, or the fields the converter must refuse.
EXPECTED: dict[str, Obj] = {
    "vm-alpine-datavolume.yaml": {"disks": {"datavolumedisk1": "virtio"}, "mib": 128},
    "vm-cirros-csmall.yaml": {"disks": {"containerdisk": "sata", "cloudinitdisk": "virtio"},
                              "mib": 128},
    "vm-cirros.yaml": {"disks": {"containerdisk": "virtio", "cloudinitdisk": "virtio"},
                       "mib": 128},
    "vm-pool-cirros.yaml": {"disks": {"containerdisk": "virtio"}, "mib": 128},
    "vmi-alpine-efi.yaml": {"disks": {"containerdisk": "virtio"}, "mib": 1024, "efi": True},
    "vmi-ephemeral.yaml": {"disks": {"containerdisk": "virtio"}, "mib": 128},
    "vmi-fedora.yaml": {"disks": {"containerdisk": "virtio", "cloudinitdisk": "virtio"},
                        "mib": 977, "rng": True, "iface": "default"},  # 1024M = 976.56Mi
    "vmi-host-disk.yaml": {"disks": {"host-disk": "virtio"}, "mib": 128},
    "vmi-masquerade.yaml": {"disks": {"containerdisk": "virtio", "cloudinitdisk": "virtio"},
                            "mib": 977, "rng": True, "iface": "testmasquerade"},
    "vmi-migratable.yaml": {"disks": {"containerdisk": "virtio"}, "mib": 128,
                            "iface": "default"},
    "vmi-multus-multiple-net.yaml": {"error": ("spec.networks[1].multus",)},
    "vmi-nocloud.yaml": {"disks": {"containerdisk": "virtio", "cloudinitdisk": "virtio",
                                   "emptydisk": "virtio"}, "mib": 128},
    "vmi-pvc.yaml": {"disks": {"pvcdisk": "virtio"}, "mib": 128},
    "vmi-replicaset-cirros.yaml": {"disks": {"containerdisk": "virtio"}, "mib": 128},
    "vmi-sriov.yaml": {"error": ("spec.domain.devices.interfaces[1].sriov",)},
}
BUS_DRIVERS = {"virtio": "virtio-blk-pci", "sata": "ide-hd", "scsi": "scsi-hd"}


def test_corpus_is_fully_covered() -> None:
    names = [n for n, _ in CORPUS_VMIS]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(EXPECTED)


def _corpus_ctx(obj: Obj, **kw: Any) -> LaunchContext:
    return ctx(disks={v["name"]: _fake_file(v) for v in obj["spec"]["volumes"]}, **kw)


@pytest.mark.parametrize(("name", "obj"), CORPUS_VMIS, ids=[n for n, _ in CORPUS_VMIS])
def test_corpus_converts(name: str, obj: Obj) -> None:
    want = EXPECTED[name]
    if "error" in want:
        assert problems(obj, _corpus_ctx(obj)) == want["error"]
        return
    efi = EfiFirmware("/usr/share/OVMF/OVMF_CODE_4M.fd", "/run/vars.fd") if want.get(
        "efi") else None
    conv = convert(obj, _corpus_ctx(obj, efi=efi))
    argv = conv.argv
    assert argv[0] == "qemu-system-x86_64"
    assert value(argv, "-machine").split(",")[0] == "q35"
    assert value(argv, "-accel") == "tcg"
    assert value(argv, "-cpu") == "max"  # host-model under TCG
    cpu = domain(obj)["cpu"]
    assert keyvals(value(argv, "-smp")) == {
        "cpus": "1", "sockets": str(cpu["sockets"]), "cores": str(cpu["cores"]),
        "threads": str(cpu["threads"]), "maxcpus": "1"}
    assert value(argv, "-m") == f"size={want['mib']}M"
    assert conv.memory_bytes == want["mib"] * MIB
    # Every disk, on its bus, backed by the file prepared for its volume, no boot order given.
    assert {d.name: d.bus for d in conv.disks} == want["disks"]
    for disk_name, bus in want["disks"].items():
        qdev = device(argv, f"ua-{disk_name}")
        assert qdev["driver"] == BUS_DRIVERS[bus]
        assert "bootindex" not in qdev
        assert disk_file(argv, f"ua-{disk_name}") == _fake_file(
            next(v for v in obj["spec"]["volumes"] if v["name"] == disk_name)).path
    assert "-boot" not in argv
    # Sockets and logs under the run directory.
    chardevs = [keyvals(c) for c in values(argv, "-chardev")]
    paths = {c.get("id", ""): c["path"] for c in chardevs}
    assert paths == {"qmp": f"{RUN}/qmp.sock", "serial0": f"{RUN}/serial.sock",
                     "ga0": f"{RUN}/ga.sock"}
    assert value(argv, "-pidfile") == f"{RUN}/qemu.pid"
    assert value(argv, "-vnc") == f"unix:{RUN}/vnc.sock"
    # The firmware UUID admission (or the VM controller) set.
    assert value(argv, "-uuid") == domain(obj)["firmware"]["uuid"]
    assert ("virtio-rng-pci" in drivers(argv)) == bool(want.get("rng"))
    # One pod interface: user-mode networking with the MAC derived from the VM's identity.
    iface_name = want.get("iface", "default")
    meta = obj["metadata"]
    (iface,) = conv.interfaces
    assert iface.name == iface_name and iface.backend == "user"
    assert iface.mac == stable_mac(meta["namespace"], meta["name"], iface_name)
    assert device(argv, f"ua-{iface_name}")["mac"] == iface.mac
    assert keyvals(value(argv, "-netdev"))["user"] == ""
    assert conv.warnings == ()


def test_corpus_efi_example_needs_ovmf() -> None:
    obj = dict(CORPUS_VMIS)["vmi-alpine-efi.yaml"]
    assert problems(obj, _corpus_ctx(obj)) == ("spec.domain.firmware.bootloader.efi",)
    argv = convert(obj, _corpus_ctx(obj, efi=EfiFirmware("/c.fd", "/v.fd"))).argv
    assert value(argv, "-machine") == "q35,pflash0=pflash0,pflash1=pflash1"
    assert device(argv, "video0")["driver"] == "bochs-display"


def test_corpus_masquerade_ports_become_hostfwd() -> None:
    obj = dict(CORPUS_VMIS)["vmi-masquerade.yaml"]
    ports = obj["spec"]["domain"]["devices"]["interfaces"][0]["ports"]
    forwards = tuple(PortForward("127.0.0.1", 20000 + p["port"], p["port"], p["protocol"])
                     for p in ports)
    conv = convert(obj, _corpus_ctx(obj, networks={"testmasquerade": UserNetwork(forwards)}))
    netdev = value(conv.argv, "-netdev")
    assert netdev.endswith(",hostfwd=tcp:127.0.0.1:20080-10.0.2.2:80")


# ---- machine, CPU, memory, accelerator ----------------------------------------------------


def test_header_of_the_command_line() -> None:
    conv = convert(vmi(), ctx(qemu="/opt/qemu/bin/qemu-system-x86_64"))
    argv = conv.argv
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert value(argv, "-name") == "guest=ns_testvm,debug-threads=on"
    for flag in ("-nodefaults", "-no-user-config", "-no-shutdown"):
        assert flag in argv
    assert value(argv, "-display") == "none"
    assert value(argv, "-mon") == "chardev=qmp,mode=control"
    assert "-S" not in argv and "-incoming" not in argv and not conv.start_paused
    assert conv.machine == "q35"


def test_missing_machine_type_defaults_to_q35_and_pc_is_accepted() -> None:
    assert value(convert(vmi(), ctx()).argv, "-machine") == "q35"
    obj = vmi()
    domain(obj)["machine"] = {"type": "pc-i440fx-rhel7.6.0"}
    conv = convert(obj, ctx())
    assert conv.machine == "pc" and value(conv.argv, "-machine") == "pc"
    domain(obj)["machine"] = {"type": "pc-q35-rhel9.4.0"}
    assert value(convert(obj, ctx()).argv, "-machine") == "q35"
    domain(obj)["machine"] = {"type": "virt"}
    assert problems(obj) == ("spec.domain.machine.type",)


def test_machine_features() -> None:
    obj = vmi()
    domain(obj)["features"] = {"acpi": {"enabled": False}, "smm": {}}
    assert value(convert(obj, ctx()).argv, "-machine") == "q35,acpi=off,smm=on"
    domain(obj)["features"] = {"acpi": {}, "smm": {"enabled": False}}
    assert value(convert(obj, ctx()).argv, "-machine") == "q35,smm=off"


@pytest.mark.parametrize(("accel", "cpu"), [("tcg", "max"), ("kvm", "host")])
def test_accelerator_and_host_model(accel: str, cpu: str) -> None:
    conv = convert(vmi(), ctx(accel=accel))
    assert value(conv.argv, "-accel") == accel
    assert value(conv.argv, "-cpu") == cpu == conv.cpu_model
    obj = vmi()
    domain(obj)["cpu"] = {"model": "host-passthrough"}
    assert value(convert(obj, ctx(accel=accel)).argv, "-cpu") == cpu


def test_named_cpu_model_with_features() -> None:
    obj = vmi()
    domain(obj)["cpu"] = {"model": "Skylake-Client", "features": [
        {"name": "vmx"}, {"name": "pcid", "policy": "require"},
        {"name": "hle", "policy": "disable"}, {"name": "rtm", "policy": "forbid"},
        {"name": "ssbd", "policy": "optional"}]}
    assert value(convert(obj, ctx(accel="kvm")).argv, "-cpu") == (
        "Skylake-Client,+vmx,+pcid,-hle,-rtm,+ssbd")


def test_cpu_topology() -> None:
    obj = vmi()
    domain(obj)["cpu"] = {"sockets": 2, "cores": 3, "threads": 2}
    conv = convert(obj, ctx())
    assert keyvals(value(conv.argv, "-smp")) == {
        "cpus": "12", "sockets": "2", "cores": "3", "threads": "2", "maxcpus": "12"}
    assert (conv.vcpus, conv.sockets, conv.cores, conv.threads) == (12, 2, 3, 2)


def test_cpu_topology_with_max_sockets_leaves_room_for_hotplug() -> None:
    obj = vmi()
    domain(obj)["cpu"] = {"sockets": 1, "cores": 2, "threads": 1, "maxSockets": 4}
    assert keyvals(value(convert(obj, ctx()).argv, "-smp")) == {
        "cpus": "2", "sockets": "4", "cores": "2", "threads": "1", "maxcpus": "8"}


def test_cpu_topology_from_resources_when_not_defaulted() -> None:
    obj = vmi()
    domain(obj)["resources"] = {"requests": {"cpu": "3"}}
    conv = convert(obj, ctx())
    assert (conv.vcpus, conv.sockets, conv.cores, conv.threads) == (3, 3, 1, 1)
    domain(obj)["resources"] = {"limits": {"cpu": "1500m"}, "requests": {"cpu": "1"}}
    assert convert(obj, ctx()).sockets == 2  # the limit wins and is rounded up
    domain(obj)["cpu"] = {"cores": 2}  # a partial topology: the rest is 1
    conv = convert(obj, ctx())
    assert (conv.vcpus, conv.sockets, conv.cores, conv.threads) == (2, 1, 2, 1)


def test_invalid_cpu_count() -> None:
    obj = vmi()
    domain(obj)["cpu"] = {"sockets": "two", "cores": -1}
    assert problems(obj) == ("spec.domain.cpu.sockets", "spec.domain.cpu.cores")


@pytest.mark.parametrize(("memory", "resources", "mib"), [
    ({"guest": "1Gi"}, {}, 1024),
    ({"guest": "1G"}, {}, 954),  # 953.67Mi, rounded up to whole MiB
    ({"guest": "512Mi"}, {"requests": {"memory": "2Gi"}}, 512),  # guest wins over request
    ({}, {"requests": {"memory": "256Mi"}}, 256),
    ({}, {"limits": {"memory": "300Mi"}}, 300),
    ({"guest": "1572864Ki"}, {}, 1536),
])
def test_guest_memory(memory: Obj, resources: Obj, mib: int) -> None:
    obj = vmi()
    domain(obj)["memory"] = memory
    domain(obj)["resources"] = resources
    conv = convert(obj, ctx())
    assert value(conv.argv, "-m") == f"size={mib}M"
    assert conv.memory_bytes == mib * MIB


@pytest.mark.parametrize(("memory", "resources", "field"), [
    ({}, {}, "spec.domain.memory.guest"),
    ({"guest": "lots"}, {}, "spec.domain.memory.guest"),
    ({"guest": "0"}, {}, "spec.domain.memory.guest"),
    ({}, {"requests": {"memory": "-1Gi"}}, "spec.domain.resources.requests.memory"),
])
def test_invalid_or_missing_memory(memory: Obj, resources: Obj, field: str) -> None:
    obj = vmi()
    domain(obj)["memory"] = memory
    domain(obj)["resources"] = resources
    assert problems(obj) == (field,)


# ---- firmware -----------------------------------------------------------------------------


def test_firmware_uuid_serial_and_stable_default_uuid() -> None:
    obj = vmi()
    domain(obj)["firmware"] = {"uuid": UUID, "serial": "abc,def"}
    argv = convert(obj, ctx()).argv
    assert value(argv, "-uuid") == UUID
    assert value(argv, "-smbios") == (
        "type=1,manufacturer=KubeVirt,product=None,family=KubeVirt,serial=abc,,def")
    first = value(convert(vmi(), ctx()).argv, "-uuid")
    assert first == value(convert(vmi(), ctx()).argv, "-uuid")
    assert first != value(convert(vmi(name="other"), ctx()).argv, "-uuid")


def test_kernel_boot() -> None:
    obj = vmi()
    domain(obj)["firmware"] = {"kernelBoot": {
        "kernelArgs": "console=ttyS0 root=/dev/vda",
        "container": {"image": "k", "kernelPath": "/boot/vmlinuz", "initrdPath": "/boot/i"}}}
    argv = convert(obj, ctx(kernel_boot=KernelBoot("/k/vmlinuz", "/k/initrd.img"))).argv
    assert value(argv, "-kernel") == "/k/vmlinuz"
    assert value(argv, "-initrd") == "/k/initrd.img"
    assert value(argv, "-append") == "console=ttyS0 root=/dev/vda"
    # The agent's command line replaces kernelArgs; no initrd, no -initrd.
    argv = convert(obj, ctx(kernel_boot=KernelBoot("/k/vmlinuz", None, "quiet"))).argv
    assert value(argv, "-append") == "quiet"
    assert "-initrd" not in argv
    # Without the prepared files the VMI cannot run.
    assert problems(obj) == ("spec.domain.firmware.kernelBoot.container",)


def test_kernel_args_without_container_are_ignored_with_a_warning() -> None:
    obj = vmi()
    domain(obj)["firmware"] = {"kernelBoot": {"kernelArgs": "quiet"}}
    conv = convert(obj, ctx(kernel_boot=KernelBoot("/k/vmlinuz")))
    assert "-kernel" not in conv.argv and "-append" not in conv.argv
    assert conv.warnings == ("spec.domain.firmware.kernelBoot.kernelArgs: ignored without a "
                             "kernel boot container",)


def test_efi_secure_boot() -> None:
    obj = vmi()
    domain(obj)["firmware"] = {"bootloader": {"efi": {}}}  # secureBoot defaults to true
    assert efi_secure_boot(obj) is True
    conv = convert(obj, ctx(efi=EfiFirmware("/ovmf/code.secboot.fd", "/run/vars.fd", True)))
    argv = conv.argv
    assert value(argv, "-machine") == "q35,smm=on,pflash0=pflash0,pflash1=pflash1"
    nodes = blockdevs(argv)
    assert nodes["pflash0"] == {"driver": "file", "filename": "/ovmf/code.secboot.fd",
                                "node-name": "pflash0", "read-only": True}
    assert nodes["pflash1"]["filename"] == "/run/vars.fd"
    assert nodes["pflash1"]["read-only"] is False
    assert value(argv, "-global") == "driver=cfi.pflash01,property=secure,value=on"
    # The node's firmware must match what the VMI asks for.
    assert problems(obj, ctx(efi=EfiFirmware("/c.fd", "/v.fd", False))) == (
        "spec.domain.firmware.bootloader.efi",)
    domain(obj)["machine"] = {"type": "pc"}
    assert problems(obj, ctx(efi=EfiFirmware("/c.fd", "/v.fd", True))) == (
        "spec.domain.firmware.bootloader.efi.secureBoot",)


def test_bios_and_plain_efi() -> None:
    assert efi_secure_boot(vmi()) is None
    obj = vmi()
    domain(obj)["firmware"] = {"bootloader": {"efi": {"secureBoot": False}}}
    assert efi_secure_boot(obj) is False
    argv = convert(obj, ctx(efi=EfiFirmware("/c.fd", "/v.fd"))).argv
    assert "-global" not in argv
    assert value(argv, "-machine") == "q35,pflash0=pflash0,pflash1=pflash1"
    domain(obj)["firmware"] = {"bootloader": {"bios": {"useSerial": True}}}
    conv = convert(obj, ctx())
    assert "pflash" not in value(conv.argv, "-machine")
    assert conv.warnings == ("spec.domain.firmware.bootloader.bios.useSerial: ignored",)


def test_reboot_policy_terminate() -> None:
    obj = vmi()
    assert "-action" not in convert(obj, ctx()).argv
    domain(obj)["rebootPolicy"] = "Terminate"
    assert value(convert(obj, ctx()).argv, "-action") == "reboot=shutdown"


# ---- disks --------------------------------------------------------------------------------


def disks_vmi(disks: list[Obj], **spec: Any) -> tuple[Obj, LaunchContext]:
    names = [d["name"] for d in disks]
    obj = vmi(**spec)
    domain(obj)["devices"]["disks"] = disks
    obj["spec"]["volumes"] = [{"name": n, "persistentVolumeClaim": {"claimName": n}}
                              for n in names]
    return obj, ctx(disks={n: DiskFile(f"/d/{n}.img") for n in names})


def test_disk_buses() -> None:
    obj, context = disks_vmi([
        {"name": "a", "disk": {"bus": "virtio"}},
        {"name": "b", "disk": {"bus": "sata"}},
        {"name": "c", "cdrom": {"bus": "sata", "readonly": True}},
        {"name": "d", "disk": {"bus": "scsi"}},
        {"name": "e", "cdrom": {"bus": "scsi"}},
        {"name": "f", "lun": {}},
        {"name": "g", "disk": {"bus": "usb"}},
    ])
    conv = convert(obj, context)
    argv = conv.argv
    assert device(argv, "ua-a")["driver"] == "virtio-blk-pci"
    assert {k: device(argv, "ua-b")[k] for k in ("driver", "bus")} == {
        "driver": "ide-hd", "bus": "ide.0"}
    assert {k: device(argv, "ua-c")[k] for k in ("driver", "bus")} == {
        "driver": "ide-cd", "bus": "ide.1"}
    for qdev_id, driver, scsi_id in (("ua-d", "scsi-hd", 0), ("ua-e", "scsi-cd", 1),
                                     ("ua-f", "scsi-hd", 2)):
        qdev = device(argv, qdev_id)
        assert qdev["driver"] == driver
        assert (qdev["bus"], qdev["scsi-id"], qdev["lun"]) == ("scsi0.0", scsi_id, 0)
    assert {k: device(argv, "ua-g")[k] for k in ("driver", "bus")} == {
        "driver": "usb-storage", "bus": "usb0.0"}
    # One controller of each kind, declared before use.
    assert drivers(argv).count("virtio-scsi-pci") == 1
    assert drivers(argv).count("qemu-xhci") == 1
    assert [(d.name, d.bus, d.device, d.readonly) for d in conv.disks] == [
        ("a", "virtio", "disk", False), ("b", "sata", "disk", False),
        ("c", "sata", "cdrom", True), ("d", "scsi", "disk", False),
        ("e", "scsi", "cdrom", True), ("f", "scsi", "lun", False),
        ("g", "usb", "disk", False)]
    for info in conv.disks:
        assert disk_file(argv, info.qdev_id) == f"/d/{info.name}.img" == info.path
        assert blockdevs(argv)[info.node_name]["driver"] == "raw"


def test_block_device_lun_uses_scsi_block() -> None:
    obj, _ = disks_vmi([{"name": "l", "lun": {"bus": "scsi"}}])
    argv = convert(obj, ctx(disks={"l": DiskFile("/dev/sdb")})).argv
    assert device(argv, "ua-l")["driver"] == "scsi-block"
    fmt = blockdevs(argv)[device(argv, "ua-l")["drive"]]
    assert blockdevs(argv)[fmt["file"]]["driver"] == "host_device"


def test_sata_controllers_beyond_six_disks() -> None:
    obj, context = disks_vmi([{"name": f"s{i}", "disk": {"bus": "sata"}} for i in range(8)])
    argv = convert(obj, context).argv
    assert [device(argv, f"ua-s{i}")["bus"] for i in range(8)] == [
        "ide.0", "ide.1", "ide.2", "ide.3", "ide.4", "ide.5", "ahci1.0", "ahci1.1"]
    assert drivers(argv).count("ich9-ahci") == 1
    obj["spec"]["domain"]["machine"] = {"type": "pc"}  # no built-in AHCI on i440fx
    argv = convert(obj, context).argv
    assert device(argv, "ua-s0")["bus"] == "ahci0.0"
    assert device(argv, "ua-s7")["bus"] == "ahci1.1"
    assert drivers(argv).count("ich9-ahci") == 2


def test_missing_bus_is_sata_for_disks_and_scsi_for_luns() -> None:
    obj, context = disks_vmi([{"name": "a", "disk": {}}, {"name": "b", "lun": {}}])
    argv = convert(obj, context).argv
    assert device(argv, "ua-a")["driver"] == "ide-hd"
    assert device(argv, "ua-b")["driver"] == "scsi-hd"


@pytest.mark.parametrize(("disk", "field"), [
    ({"name": "a", "disk": {"bus": "ide"}}, "spec.domain.devices.disks[0].disk.bus"),
    ({"name": "a", "cdrom": {"bus": "virtio"}}, "spec.domain.devices.disks[0].cdrom.bus"),
    ({"name": "a", "cdrom": {"bus": "usb"}}, "spec.domain.devices.disks[0].cdrom.bus"),
    ({"name": "a", "lun": {"bus": "sata"}}, "spec.domain.devices.disks[0].lun.bus"),
    ({"name": "a", "disk": {"bus": "sata", "readonly": True}},
     "spec.domain.devices.disks[0].disk.readonly"),
    ({"name": "a", "disk": {"bus": "virtio"}, "cache": "unsafe"},
     "spec.domain.devices.disks[0].cache"),
    ({"name": "a", "disk": {"bus": "virtio"}, "io": "native"},
     "spec.domain.devices.disks[0].io"),
    ({"name": "a", "disk": {"bus": "virtio"}, "errorPolicy": "panic"},
     "spec.domain.devices.disks[0].errorPolicy"),
])
def test_invalid_disks(disk: Obj, field: str) -> None:
    obj, context = disks_vmi([disk])
    assert problems(obj, context) == (field,)


def test_disk_without_volume_or_file() -> None:
    obj = vmi()
    domain(obj)["devices"]["disks"].append({"name": "ghost", "disk": {"bus": "virtio"}})
    assert problems(obj) == ("spec.domain.devices.disks[1]",)
    obj = vmi()
    obj["spec"]["volumes"][0] = {"name": "root", "dataVolume": {"name": "dv"}}
    with pytest.raises(LauncherError, match="no disk file was prepared for dataVolume volume"):
        convert(obj, ctx(disks={}))
    obj["spec"]["volumes"][0] = {"name": "root", "downwardMetrics": {}}
    assert problems(obj) == ("spec.volumes[0]",)


def test_volume_without_disk_entry_uses_the_prepared_kind() -> None:
    obj = vmi()
    obj["spec"]["volumes"].append({"name": "iso", "containerDisk": {"image": "x"}})
    conv = convert(obj, ctx(disks={"root": DiskFile("/r.qcow2", "qcow2"),
                                   "iso": DiskFile("/x.iso", kind="cdrom")}))
    assert device(conv.argv, "ua-iso")["driver"] == "ide-cd"
    assert conv.disks[-1].readonly and conv.disks[-1].device == "cdrom"


@pytest.mark.parametrize(("given", "direct_io", "direct", "write_cache"), [
    (None, True, True, "on"),  # cache none where O_DIRECT works
    (None, False, False, "off"),  # else writethrough
    ("none", True, True, "on"),
    ("writethrough", True, False, "off"),
    ("writeback", False, False, "on"),
])
def test_cache_modes(given: str | None, direct_io: bool, direct: bool,
                     write_cache: str) -> None:
    disk: Obj = {"name": "a", "disk": {"bus": "virtio"}}
    if given:
        disk["cache"] = given
    obj, _ = disks_vmi([disk])
    argv = convert(obj, ctx(disks={"a": DiskFile("/a.img", direct_io=direct_io)})).argv
    qdev = device(argv, "ua-a")
    assert qdev["write-cache"] == write_cache
    fmt = blockdevs(argv)[qdev["drive"]]
    assert fmt["cache"] == {"direct": direct, "no-flush": False}
    assert blockdevs(argv)[fmt["file"]]["cache"] == fmt["cache"]


def test_io_modes() -> None:
    obj, _ = disks_vmi([{"name": "a", "disk": {"bus": "virtio"}, "io": "native"},
                        {"name": "b", "disk": {"bus": "virtio"}, "io": "threads"}])
    argv = convert(obj, ctx(disks={"a": DiskFile("/a", direct_io=True),
                                   "b": DiskFile("/b")})).argv
    nodes = blockdevs(argv)
    assert nodes[nodes[device(argv, "ua-a")["drive"]]["file"]]["aio"] == "native"
    assert nodes[nodes[device(argv, "ua-b")["drive"]]["file"]]["aio"] == "threads"


@pytest.mark.parametrize(("policy", "werror", "rerror"), [
    (None, "stop", "stop"), ("stop", "stop", "stop"), ("ignore", "ignore", "ignore"),
    ("report", "report", "report"), ("enospace", "enospc", "report")])
def test_error_policy(policy: str | None, werror: str, rerror: str) -> None:
    disk: Obj = {"name": "a", "disk": {"bus": "scsi"}}
    if policy:
        disk["errorPolicy"] = policy
    obj, context = disks_vmi([disk])
    qdev = device(convert(obj, context).argv, "ua-a")
    assert (qdev["werror"], qdev["rerror"]) == (werror, rerror)


def test_readonly_disks() -> None:
    obj, _ = disks_vmi([
        {"name": "a", "disk": {"bus": "virtio", "readonly": True}},
        {"name": "b", "disk": {"bus": "virtio"}},
        {"name": "c", "disk": {"bus": "scsi"}},
    ])
    obj["spec"]["volumes"][2]["persistentVolumeClaim"]["readOnly"] = True
    conv = convert(obj, ctx(disks={"a": DiskFile("/a"), "b": DiskFile("/b", readonly=True),
                                   "c": DiskFile("/c")}))
    assert [d.readonly for d in conv.disks] == [True, True, True]
    nodes = blockdevs(conv.argv)
    for info in conv.disks:
        fmt = nodes[info.node_name]
        assert fmt["read-only"] is True and nodes[fmt["file"]]["read-only"] is True
        assert "discard" not in fmt
        assert "werror" not in device(conv.argv, info.qdev_id)


def test_disk_extras() -> None:
    obj, context = disks_vmi([{
        "name": "a", "disk": {"bus": "virtio"}, "dedicatedIOThread": True, "serial": "SN1",
        "shareable": True, "blockSize": {"custom": {"logical": 512, "physical": 4096}}}])
    argv = convert(obj, context).argv
    assert value(argv, "-object") == "iothread,id=iothread1"
    qdev = device(argv, "ua-a")
    assert (qdev["iothread"], qdev["serial"], qdev["share-rw"]) == ("iothread1", "SN1", True)
    assert (qdev["logical_block_size"], qdev["physical_block_size"]) == (512, 4096)
    assert blockdevs(argv)[qdev["drive"]]["discard"] == "unmap"


def test_boot_order() -> None:
    obj, context = disks_vmi([{"name": "a", "disk": {"bus": "virtio"}, "bootOrder": 2},
                              {"name": "b", "cdrom": {"bus": "sata"}, "bootOrder": 1},
                              {"name": "c", "disk": {"bus": "virtio"}}])
    conv = convert(obj, context)
    assert device(conv.argv, "ua-a")["bootindex"] == 2
    assert device(conv.argv, "ua-b")["bootindex"] == 1
    assert "bootindex" not in device(conv.argv, "ua-c")
    assert [d.boot_index for d in conv.disks] == [2, 1, None]
    assert value(conv.argv, "-boot") == "strict=on"


def test_virtio_transitional() -> None:
    obj = vmi()
    domain(obj)["devices"].update({"useVirtioTransitional": True, "rng": {}})
    found = set(drivers(convert(obj, ctx()).argv))
    for driver in ("virtio-blk-pci", "virtio-scsi-pci", "virtio-balloon-pci",
                   "virtio-rng-pci", "virtio-serial-pci"):
        assert f"{driver}-transitional" in found
        assert driver not in found


# ---- consoles and other devices -----------------------------------------------------------


def test_serial_console_and_graphics() -> None:
    argv = convert(vmi(), ctx()).argv
    (serial,) = [c for c in map(keyvals, values(argv, "-chardev")) if c["id"] == "serial0"]
    assert serial == {"socket": "", "id": "serial0", "path": f"{RUN}/serial.sock",
                      "server": "on", "wait": "off", "logfile": f"{RUN}/serial.log",
                      "logappend": "on"}
    assert value(argv, "-serial") == "chardev:serial0"
    assert device(argv, "video0")["driver"] == "VGA"
    obj = vmi()
    domain(obj)["devices"].update({"autoattachSerialConsole": False,
                                   "autoattachGraphicsDevice": False})
    argv = convert(obj, ctx()).argv
    assert "-serial" not in argv and "-vnc" not in argv
    assert "video0" not in [d.get("id") for d in devices(argv)]
    # The guest agent channel is always there.
    port = [d for d in devices(argv) if d["driver"] == "virtserialport"]
    assert port == [{"driver": "virtserialport", "bus": "virtio-serial0.0", "chardev": "ga0",
                     "name": "org.qemu.guest_agent.0"}]


@pytest.mark.parametrize(("video", "driver"), [
    ("vga", "VGA"), ("bochs", "bochs-display"), ("cirrus", "cirrus-vga"),
    ("virtio", "virtio-vga"), ("ramfb", "ramfb")])
def test_video_types(video: str, driver: str) -> None:
    obj = vmi()
    domain(obj)["devices"]["video"] = {"type": video}
    assert device(convert(obj, ctx()).argv, "video0")["driver"] == driver


def test_unknown_video_type() -> None:
    obj = vmi()
    domain(obj)["devices"]["video"] = {"type": "qxl"}
    assert problems(obj) == ("spec.domain.devices.video.type",)


def test_rng_balloon_and_hotplug_controller() -> None:
    argv = convert(vmi(), ctx()).argv
    assert "virtio-rng-pci" not in drivers(argv)
    assert "virtio-balloon-pci" in drivers(argv)
    assert "virtio-scsi-pci" in drivers(argv)  # hotplug target
    obj = vmi()
    domain(obj)["devices"].update({"rng": {}, "autoattachMemBalloon": False,
                                   "disableHotplug": True})
    argv = convert(obj, ctx()).argv
    assert device(argv, "rng0-dev") == {"driver": "virtio-rng-pci", "rng": "rng0",
                                        "id": "rng0-dev"}
    assert json.loads(value(argv, "-object")) == {"qom-type": "rng-random", "id": "rng0",
                                                  "filename": "/dev/urandom"}
    assert "virtio-balloon-pci" not in drivers(argv)
    assert "virtio-scsi-pci" not in drivers(argv)


@pytest.mark.parametrize(("watchdog", "action"), [
    ({"name": "w", "i6300esb": {}}, "reset"),
    ({"name": "w", "i6300esb": {"action": "poweroff"}}, "poweroff"),
    ({"name": "w", "i6300esb": {"action": "shutdown"}}, "shutdown"),
])
def test_watchdog(watchdog: Obj, action: str) -> None:
    obj = vmi()
    domain(obj)["devices"]["watchdog"] = watchdog
    argv = convert(obj, ctx()).argv
    assert device(argv, "watchdog0")["driver"] == "i6300esb"
    assert value(argv, "-action") == f"watchdog={action}"


def test_unsupported_watchdogs() -> None:
    obj = vmi()
    domain(obj)["devices"]["watchdog"] = {"name": "w", "diag288": {}}
    assert problems(obj) == ("spec.domain.devices.watchdog",)
    domain(obj)["devices"]["watchdog"] = {"name": "w", "i6300esb": {"action": "explode"}}
    assert problems(obj) == ("spec.domain.devices.watchdog.i6300esb.action",)


def test_inputs_and_panic_devices() -> None:
    obj = vmi()
    domain(obj)["devices"].update({
        "inputs": [{"name": "tab", "type": "tablet", "bus": "usb"},
                   {"name": "kbd", "type": "keyboard", "bus": "virtio"}],
        "panicDevices": [{"model": "isa"}]})
    argv = convert(obj, ctx()).argv
    assert device(argv, "ua-tab") == {"driver": "usb-tablet", "id": "ua-tab", "bus": "usb0.0"}
    assert device(argv, "ua-kbd") == {"driver": "virtio-keyboard-pci", "id": "ua-kbd"}
    assert device(argv, "panic0")["driver"] == "pvpanic"
    assert drivers(argv).count("qemu-xhci") == 1
    domain(obj)["devices"]["inputs"] = [{"name": "m", "type": "mouse", "bus": "ps2"}]
    domain(obj)["devices"]["panicDevices"] = [{"model": "hyperv"}]
    assert problems(obj) == ("spec.domain.devices.inputs[0]",
                             "spec.domain.devices.panicDevices[0].model")


def test_paused_start_and_incoming_migration() -> None:
    obj, context = disks_vmi([{"name": "a", "disk": {"bus": "virtio"}, "bootOrder": 1}],
                             startStrategy="Paused")
    conv = convert(obj, LaunchContext(run_dir=RUN, disks=context.disks, incoming="defer"))
    assert conv.start_paused
    assert value(conv.argv, "-boot") == "strict=on,menu=on,splash-time=10000"
    assert "-S" in conv.argv
    assert value(conv.argv, "-incoming") == "defer"


def test_run_dir_too_deep() -> None:
    deep = Path("/" + "d" * (MAX_SOCKET_PATH - len("/qmp.sock") + 1))
    with pytest.raises(LauncherError, match="too deep"):
        convert(vmi(), ctx(run_dir=deep))


def test_relative_run_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    argv = convert(vmi(), ctx(run_dir=Path("rel"))).argv
    assert value(argv, "-pidfile") == f"{tmp_path}/rel/qemu.pid"


def test_qemu_argv_is_the_conversion_argv() -> None:
    assert qemu_argv(vmi(), ctx()) == list(convert(vmi(), ctx()).argv)


# ---- networking ---------------------------------------------------------------------------


def net_vmi(interfaces: list[Obj], networks: list[Obj] | None = None, **spec: Any) -> Obj:
    obj = vmi(**spec)
    domain(obj)["devices"]["interfaces"] = interfaces
    obj["spec"]["networks"] = networks if networks is not None else [
        {"name": i["name"], "pod": {}} for i in interfaces]
    return obj


def test_masquerade_is_user_networking() -> None:
    obj = net_vmi([{"name": "default", "masquerade": {}}])
    conv = convert(obj, ctx())
    assert value(conv.argv, "-netdev") == (
        "user,id=net0,net=10.0.2.0/24,host=10.0.2.1,dhcpstart=10.0.2.2,dns=10.0.2.3,"
        "hostname=testvm")
    mac = stable_mac("ns", "testvm", "default")
    assert device(conv.argv, "ua-default") == {
        "driver": "virtio-net-pci", "id": "ua-default", "netdev": "net0", "mac": mac,
        "romfile": ""}
    (iface,) = conv.interfaces
    assert (iface.guest_ip, iface.gateway, iface.model, iface.mac) == (
        "10.0.2.2", "10.0.2.1", "virtio", mac)


def test_port_forwards() -> None:
    obj = net_vmi([{"name": "default", "masquerade": {},
                    "ports": [{"port": 22}, {"port": 53, "protocol": "UDP"}]}])
    forwards = (PortForward("127.0.0.1", 2222, 22), PortForward("", 5353, 53, "UDP"))
    netdev = value(convert(obj, ctx(networks={"default": UserNetwork(forwards)})).argv,
                   "-netdev")
    assert netdev.endswith(",hostfwd=tcp:127.0.0.1:2222-10.0.2.2:22"
                           ",hostfwd=udp::5353-10.0.2.2:53")
    bad = (PortForward("127.0.0.1", 3868, 3868, "SCTP"),)
    assert problems(obj, ctx(networks={"default": UserNetwork(bad)})) == ("spec.networks[0]",)


def test_stable_mac() -> None:
    mac = stable_mac("ns", "vm", "default")
    assert mac == stable_mac("ns", "vm", "default")
    assert mac.startswith("52:54:00:") and len(mac) == 17
    assert len({mac, stable_mac("ns2", "vm", "default"), stable_mac("ns", "vm2", "default"),
                stable_mac("ns", "vm", "eth1")}) == 4


def test_given_mac_address() -> None:
    obj = net_vmi([{"name": "default", "bridge": {}, "macAddress": "DE-AD-00-00-BE-EF"}])
    conv = convert(obj, ctx())
    assert device(conv.argv, "ua-default")["mac"] == "de:ad:00:00:be:ef"
    assert conv.interfaces[0].mac == "de:ad:00:00:be:ef"
    obj = net_vmi([{"name": "default", "bridge": {}, "macAddress": "de:ad:be:ef"}])
    assert problems(obj) == ("spec.domain.devices.interfaces[0].macAddress",)


def test_custom_vm_network_cidr_and_hostname() -> None:
    obj = net_vmi([{"name": "default", "masquerade": {}}],
                  [{"name": "default", "pod": {"vmNetworkCIDR": "192.168.7.0/28",
                                               "vmIPv6NetworkCIDR": "fd10:0:2::/120"}}],
                  hostname="web")
    conv = convert(obj, ctx())
    assert value(conv.argv, "-netdev") == (
        "user,id=net0,net=192.168.7.0/28,host=192.168.7.1,dhcpstart=192.168.7.2,"
        "dns=192.168.7.3,hostname=web")
    assert conv.interfaces[0].guest_ip == "192.168.7.2"
    assert conv.warnings == ("spec.networks[0].pod.vmIPv6NetworkCIDR: ignored (user-mode IPv6)",)


@pytest.mark.parametrize("cidr", ["10.0.0.0/30", "not-a-cidr", "fd00::/64"])
def test_bad_vm_network_cidr(cidr: str) -> None:
    obj = net_vmi([{"name": "default", "masquerade": {}}],
                  [{"name": "default", "pod": {"vmNetworkCIDR": cidr}}])
    assert problems(obj) == ("spec.networks[0].pod.vmNetworkCIDR",)


def test_tap_backend_and_models() -> None:
    obj = net_vmi([{"name": "default", "bridge": {}, "model": "e1000e", "bootOrder": 3}])
    conv = convert(obj, ctx(networks={"default": TapNetwork("vs-tap0")}))
    assert value(conv.argv, "-netdev") == "tap,id=net0,ifname=vs-tap0,script=no,downscript=no"
    qdev = device(conv.argv, "ua-default")
    assert qdev["driver"] == "e1000e" and qdev["bootindex"] == 3 and "romfile" not in qdev
    assert value(conv.argv, "-boot") == "strict=on"
    (iface,) = conv.interfaces
    assert (iface.backend, iface.guest_ip, iface.gateway) == ("tap", None, None)
    obj = net_vmi([{"name": "default", "bridge": {}, "model": "vmxnet3"}])
    assert problems(obj) == ("spec.domain.devices.interfaces[0].model",)


def test_interface_problems() -> None:
    obj = net_vmi([{"name": "a", "masquerade": {}}, {"name": "b", "masquerade": {}},
                   {"name": "c", "masquerade": {}}, {"name": "d", "passt": {}},
                   {"name": "e", "binding": {"name": "x"}}],
                  [{"name": "a", "pod": {}}, {"name": "b", "pod": {}},
                   {"name": "d", "pod": {}}, {"name": "e", "pod": {}}])
    assert problems(obj) == (
        "spec.networks[1]",  # only one pod network
        "spec.domain.devices.interfaces[2]",  # no network named c
        "spec.domain.devices.interfaces[3].passt",
        "spec.domain.devices.interfaces[4].binding",
    )


def test_interface_warnings() -> None:
    obj = net_vmi([{"name": "default", "masquerade": {}, "pciAddress": "0000:81:01.0",
                    "acpiIndex": 3, "state": "down"}])
    assert convert(obj, ctx()).warnings == (
        "spec.domain.devices.interfaces[0].pciAddress: ignored",
        "spec.domain.devices.interfaces[0].acpiIndex: ignored",
        "spec.domain.devices.interfaces[0].state: link down at start is not supported",
    )


def test_no_interfaces_means_no_nic() -> None:
    conv = convert(vmi(), ctx())
    assert "-netdev" not in conv.argv and conv.interfaces == ()


# ---- what cannot run here -----------------------------------------------------------------


@pytest.mark.parametrize(("devices_patch", "field"), [
    ({"gpus": [{"name": "g", "deviceName": "nvidia.com/GP102"}]}, "gpus"),
    ({"hostDevices": [{"name": "h", "deviceName": "x"}]}, "hostDevices"),
    ({"filesystems": [{"name": "f", "virtiofs": {}}]}, "filesystems"),
    ({"sound": {"name": "s"}}, "sound"),
    ({"sound": {}}, "sound"),
    ({"clientPassthrough": {}}, "clientPassthrough"),
    ({"downwardMetrics": {}}, "downwardMetrics"),
    ({"tpm": {}}, "tpm"),
    ({"tpm": {"persistent": True}}, "tpm"),
])
def test_unsupported_devices(devices_patch: Obj, field: str) -> None:
    obj = vmi()
    domain(obj)["devices"].update(devices_patch)
    assert problems(obj) == (f"spec.domain.devices.{field}",)


def test_disabled_or_empty_device_lists_are_fine() -> None:
    obj = vmi()
    domain(obj)["devices"].update({"gpus": [], "hostDevices": [], "filesystems": [],
                                   "tpm": {"enabled": False}})
    convert(obj, ctx())


def test_every_problem_is_reported_at_once() -> None:
    obj = vmi(architecture="arm64")
    domain(obj)["launchSecurity"] = {"sev": {}}
    domain(obj)["memory"]["hugepages"] = {"pageSize": "2Mi"}
    domain(obj)["cpu"] = {"numa": {"guestMappingPassthrough": {}}}
    domain(obj)["firmware"] = {"acpi": {"slicNameRef": "s"}}
    domain(obj)["devices"]["gpus"] = [{"name": "g", "deviceName": "x"}]
    with pytest.raises(LauncherError) as info:
        convert(obj, ctx())
    assert info.value.fields == (
        "spec.architecture", "spec.domain.devices.gpus", "spec.domain.launchSecurity",
        "spec.domain.memory.hugepages", "spec.domain.cpu.numa", "spec.domain.firmware.acpi")
    assert info.value.message.startswith("cannot run VMI ns/testvm: spec.architecture: ")


def test_hints_become_warnings() -> None:
    obj = vmi()
    domain(obj)["cpu"] = {"dedicatedCpuPlacement": True, "isolateEmulatorThread": True}
    domain(obj)["memory"]["maxGuest"] = "1Gi"
    domain(obj)["features"] = {"hyperv": {"relaxed": {}}}
    domain(obj)["clock"] = {"timezone": "Europe/Paris"}
    assert convert(obj, ctx()).warnings == (
        "spec.domain.memory.maxGuest: memory hotplug is not supported",
        "spec.domain.cpu.dedicatedCpuPlacement: ignored (no CPU pinning here)",
        "spec.domain.cpu.isolateEmulatorThread: ignored (no CPU pinning here)",
        "spec.domain.features.hyperv: Hyper-V enlightenments ignored",
        "spec.domain.clock: the guest RTC runs in UTC without offset",
    )


def test_conversion_does_not_modify_the_vmi() -> None:
    obj = net_vmi([{"name": "default", "masquerade": {}}])
    snapshot = copy.deepcopy(obj)
    convert(obj, ctx())
    assert obj == snapshot


# ---- the command line against a real QEMU -------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
OVMF = Path("/usr/share/OVMF")


def run_qemu(conv: Conversion) -> subprocess.CompletedProcess[str]:
    """Start QEMU with the argv plus a QMP monitor on stdin that quits at once: exit status 0
    means every option and device was accepted and the machine was built."""
    argv = [*conv.argv, "-chardev", "stdio,id=test", "-mon", "chardev=test,mode=control"]
    return subprocess.run(argv, input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, text=True, timeout=60)


def _real_cases(tmp: Path) -> list[tuple[str, Obj, LaunchContext]]:
    def image(name: str) -> DiskFile:
        path = tmp / f"{name}.img"
        with path.open("wb") as f:
            f.truncate(MIB)
        return DiskFile(str(path))

    everything, _ = disks_vmi([
        {"name": "a", "disk": {"bus": "virtio"}, "bootOrder": 1, "dedicatedIOThread": True,
         "serial": "S1"},
        {"name": "b", "disk": {"bus": "sata"}, "cache": "writeback"},
        {"name": "c", "cdrom": {"bus": "sata"}},
        {"name": "d", "disk": {"bus": "scsi"}, "errorPolicy": "enospace"},
        {"name": "e", "lun": {}},
        {"name": "f", "disk": {"bus": "usb"}},
        {"name": "g", "cdrom": {"bus": "scsi"}},
    ])
    devs = domain(everything)["devices"]
    devs.update({"interfaces": [{"name": "default", "masquerade": {}, "bootOrder": 2}],
                 "rng": {}, "watchdog": {"name": "w", "i6300esb": {"action": "poweroff"}},
                 "inputs": [{"name": "t", "type": "tablet", "bus": "usb"},
                            {"name": "k", "type": "keyboard", "bus": "virtio"}],
                 "panicDevices": [{"model": "isa"}]})
    everything["spec"]["networks"] = [{"name": "default", "pod": {}}]
    domain(everything)["cpu"] = {"sockets": 1, "cores": 2, "threads": 1, "maxSockets": 2}
    files = {n: image(n) for n in "abcdefg"}
    forwards = UserNetwork((PortForward("127.0.0.1", 0, 22),))
    cases = [("all-devices", everything, ctx(run_dir=tmp / "r1", disks=files,
                                             networks={"default": forwards}))]

    legacy, _ = disks_vmi([{"name": "a", "disk": {"bus": "sata"}, "bootOrder": 1}],
                          startStrategy="Paused")
    domain(legacy)["machine"] = {"type": "pc"}
    domain(legacy)["rebootPolicy"] = "Terminate"
    domain(legacy)["devices"].update({"useVirtioTransitional": True, "rng": {}})
    cases.append(("pc-transitional-paused-incoming", legacy, LaunchContext(
        run_dir=tmp / "r2", disks={"a": image("legacy")}, incoming="defer")))

    code, plain_vars = OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"
    if code.exists() and plain_vars.exists():
        efi = vmi()
        domain(efi)["firmware"] = {"bootloader": {"efi": {"secureBoot": False}}}
        shutil.copy(plain_vars, tmp / "vars.fd")
        cases.append(("efi", efi, ctx(run_dir=tmp / "r3", disks={"root": image("efi")},
                                      efi=EfiFirmware(str(code), str(tmp / "vars.fd")))))
    secure_code, ms_vars = OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd"
    if secure_code.exists() and ms_vars.exists():
        sb = vmi()
        domain(sb)["firmware"] = {"bootloader": {"efi": {"secureBoot": True}}}
        shutil.copy(ms_vars, tmp / "sbvars.fd")
        cases.append(("secure-boot", sb, ctx(
            run_dir=tmp / "r4", disks={"root": image("sb")},
            efi=EfiFirmware(str(secure_code), str(tmp / "sbvars.fd"), True))))
    return cases


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_real_qemu_accepts_the_command_line(tmp_path: Path) -> None:
    for name, obj, context in _real_cases(tmp_path):
        Path(context.run_dir).mkdir()
        proc = run_qemu(convert(obj, context))
        assert proc.returncode == 0, (name, proc.stderr)
        assert '"event": "SHUTDOWN"' in proc.stdout, (name, proc.stdout)
