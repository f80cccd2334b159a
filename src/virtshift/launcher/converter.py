"""VMI spec to QEMU command line: the role of KubeVirt's domain converter plus libvirt's.

:func:`convert` is pure: it reads the VMI (as decoded JSON) and a :class:`LaunchContext` (what
the node agent prepared: disk files, kernel, firmware, networking, the run directory) and returns
the argv with a description of the devices it created. Nothing is read from the host.

Choices, where upstream leaves them to libvirt or to the node:
- The VMI is expected to be defaulted by admission already (machine type, guest memory, disk
  buses, pod interface); where a field is still missing, the upstream default is used (q35,
  SATA disks, one vCPU, memory from ``resources.requests.memory``). Memory is rounded up to
  whole MiB, as libvirt aligns it.
- Pod networking (masquerade and bridge bindings) is QEMU user-mode networking: the guest gets
  the second address of ``vmNetworkCIDR`` (default 10.0.2.0/24, so 10.0.2.2, gateway 10.0.2.1)
  by DHCP; the agent's port forwards become ``hostfwd`` rules. A tap device can be given instead.
- A MAC address not set in the spec is derived from namespace, name and interface name, so it
  is stable across restarts of the same VM (52:54:00 prefix).
- Disk cache defaults to ``none`` when the agent found O_DIRECT usable for the file, else to
  ``writethrough`` (KubeVirt's rule); I/O errors stop the VM unless ``errorPolicy`` says else.
- ``-no-shutdown``: a guest power-off leaves QEMU alive in the ``shutdown`` state, so how the VM
  ended stays observable (QMP ``query-status``) until the supervisor reaps it, even across an
  agent restart.
- Features that need host devices or machinery virtshift lacks (SR-IOV, Multus, host devices,
  GPUs, virtiofs, TPM, sound, hugepages, launch security...) raise :class:`LauncherError`
  naming the field; hints the guest can run without (CPU pinning, hyper-v enlightenments...)
  are reported in :attr:`Conversion.warnings`.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

from virtshift.api.admission import quantity
from virtshift.api.admission.vmi_defaults import default_cpu_topology
from virtshift.launcher.common import LauncherError, RunDir
from virtshift.launcher.context import (
    Conversion,
    DiskFile,
    DiskInfo,
    EfiFirmware,
    InterfaceInfo,
    KernelBoot,
    LaunchContext,
    PortForward,
    TapNetwork,
    UserNetwork,
)
from virtshift.launcher.network import convert_interfaces

__all__ = [
    "Conversion", "DiskFile", "DiskInfo", "EfiFirmware", "InterfaceInfo", "KernelBoot",
    "LaunchContext", "LauncherError", "PortForward", "TapNetwork", "UserNetwork", "convert",
    "efi_secure_boot", "qemu_argv",
]

Obj = dict[str, Any]
MIB = 1024 * 1024

_VIDEO = {"vga": "VGA", "bochs": "bochs-display", "cirrus": "cirrus-vga",
          "virtio": "virtio-vga", "ramfb": "ramfb"}
_WATCHDOG_ACTIONS = {"poweroff": "poweroff", "reset": "reset", "shutdown": "shutdown"}
_ERROR_POLICIES = {"stop": ("stop", "stop"), "ignore": ("ignore", "ignore"),
                   "report": ("report", "report"), "enospace": ("enospc", "report")}
_UNSUPPORTED_DEVICES = {
    "gpus": "GPUs are not supported", "hostDevices": "host devices are not supported",
    "filesystems": "virtiofs filesystems are not supported",
    "sound": "sound devices are not supported",
    "clientPassthrough": "USB client passthrough is not supported",
    "downwardMetrics": "the downward metrics device is not supported",
}
_WARN_CPU = ("dedicatedCpuPlacement", "isolateEmulatorThread", "realtime")


def qemu_argv(vmi: Obj, ctx: LaunchContext) -> list[str]:
    """The QEMU command line for ``vmi`` (see :func:`convert`)."""
    return list(convert(vmi, ctx).argv)


def efi_secure_boot(vmi: Obj) -> bool | None:
    """None for a BIOS VMI, else whether its EFI bootloader asks for secure boot (default on)."""
    efi = _d(_d(_d(_d(vmi.get("spec")).get("domain")).get("firmware")).get("bootloader")).get("efi")
    if not isinstance(efi, dict):
        return None
    return efi.get("secureBoot") is not False


def convert(vmi: Obj, ctx: LaunchContext) -> Conversion:
    """Convert; raise :class:`LauncherError` listing every unsupported or invalid field."""
    return _Converter(vmi, ctx).run()


# ---- implementation -----------------------------------------------------------------------------


def _d(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Obj]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _esc(value: str) -> str:
    """A value inside QEMU's key=value option syntax (commas are doubled)."""
    return value.replace(",", ",,")


def _json(obj: Obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _enabled(feature: Any, default: bool) -> bool:
    if not isinstance(feature, dict):
        return default
    return feature.get("enabled") is not False


class _Converter:
    def __init__(self, vmi: Obj, ctx: LaunchContext) -> None:
        self.vmi = vmi
        self.ctx = ctx
        self.rundir = RunDir.of(ctx.run_dir)
        meta = _d(vmi.get("metadata"))
        self.name = str(meta.get("name") or "vmi")
        self.namespace = str(meta.get("namespace") or "default")
        self.spec = _d(vmi.get("spec"))
        self.domain = _d(self.spec.get("domain"))
        self.devices = _d(self.domain.get("devices"))
        self.argv: list[str] = [ctx.qemu]
        self.problems: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.controllers: set[str] = set()
        self.boot_indexes = False
        self.iothreads = 0
        self.machine_extra: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def add(self, *args: str) -> None:
        self.argv.extend(args)

    def run(self) -> Conversion:
        self.rundir.check_socket_paths()
        self._check_unsupported()
        self._firmware()
        machine = self._machine()
        cpu_model, (sockets, cores, threads, maxcpus) = self._cpu()
        memory = self._memory()
        paused = self.spec.get("startStrategy") == "Paused"
        self._consoles()
        disks = self._disks(machine)
        interfaces = self._interfaces()
        self._misc_devices()
        if self.problems:
            text = "; ".join(f"{p}: {m}" for p, m in self.problems)
            raise LauncherError(f"cannot run VMI {self.namespace}/{self.name}: {text}",
                                fields=tuple(p for p, _ in self.problems))
        if self.boot_indexes:
            self.add("-boot", "strict=on" + (",menu=on,splash-time=10000" if paused else ""))
        if paused:
            self.add("-S")
        if self.ctx.incoming is not None:
            self.add("-incoming", self.ctx.incoming)
        vcpus = sockets * cores * threads
        self.argv[1:1] = [
            "-name", f"guest={self.namespace}_{self.name},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-shutdown",
            "-msg", "timestamp=on", "-accel", self.ctx.accel, "-machine", machine,
            "-cpu", cpu_model,
            "-smp", f"cpus={vcpus},sockets={max(maxcpus, vcpus) // (cores * threads)},"
            f"cores={cores},threads={threads},maxcpus={max(maxcpus, vcpus)}",
            "-m", f"size={memory // MIB}M",
            "-pidfile", str(self.rundir.pidfile),
            "-chardev",
            f"socket,id=qmp,path={_esc(str(self.rundir.qmp_socket))},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        return Conversion(
            argv=tuple(self.argv), machine=machine.split(",")[0], cpu_model=cpu_model,
            vcpus=vcpus, sockets=sockets, cores=cores, threads=threads, memory_bytes=memory,
            start_paused=paused, disks=tuple(disks), interfaces=tuple(interfaces),
            warnings=tuple(self.warnings),
        )

    # -- validation of what cannot run here --

    def _check_unsupported(self) -> None:
        arch = self.spec.get("architecture")
        if arch not in (None, "", "amd64"):
            self.problem("spec.architecture", f"architecture {arch!r} is not supported (amd64)")
        for key, message in _UNSUPPORTED_DEVICES.items():
            value = self.devices.get(key)
            # An empty list has no device; an empty struct ({}) is present, hence enabled
            # (clientPassthrough and downwardMetrics have no fields at all).
            if value is not None and value != []:
                self.problem(f"spec.domain.devices.{key}", message)
        tpm = self.devices.get("tpm")
        if isinstance(tpm, dict) and tpm.get("enabled") is not False:
            self.problem("spec.domain.devices.tpm", "TPM devices are not supported")
        if self.domain.get("launchSecurity") is not None:
            self.problem("spec.domain.launchSecurity", "launch security is not supported")
        memory = _d(self.domain.get("memory"))
        if memory.get("hugepages") is not None:
            self.problem("spec.domain.memory.hugepages", "hugepages are not supported")
        if memory.get("maxGuest") is not None:
            self.warnings.append("spec.domain.memory.maxGuest: memory hotplug is not supported")
        cpu = _d(self.domain.get("cpu"))
        if _d(cpu.get("numa")).get("guestMappingPassthrough") is not None:
            self.problem("spec.domain.cpu.numa", "NUMA guest mapping passthrough is not supported")
        for key in _WARN_CPU:
            if cpu.get(key):
                self.warnings.append(f"spec.domain.cpu.{key}: ignored (no CPU pinning here)")
        firmware = _d(self.domain.get("firmware"))
        if firmware.get("acpi") is not None:
            self.problem("spec.domain.firmware.acpi", "custom ACPI tables are not supported")
        if _d(self.domain.get("features")).get("hyperv") is not None:
            self.warnings.append("spec.domain.features.hyperv: Hyper-V enlightenments ignored")
        clock = _d(self.domain.get("clock"))
        if clock.get("timezone") or _d(clock.get("utc")).get("offsetSeconds"):
            self.warnings.append("spec.domain.clock: the guest RTC runs in UTC without offset")

    # -- machine, CPU, memory --

    def _machine(self) -> str:
        mtype = str(_d(self.domain.get("machine")).get("type") or "q35")
        if mtype == "q35" or mtype.startswith("pc-q35"):
            machine = "q35"
        elif mtype == "pc" or mtype.startswith("pc-i440fx"):
            machine = "pc"
        else:
            self.problem("spec.domain.machine.type", f"machine type {mtype!r} is not supported "
                         "(q35 or pc)")
            return "q35"
        features = _d(self.domain.get("features"))
        opts = [machine]
        if not _enabled(features.get("acpi"), True):
            opts.append("acpi=off")
        smm = features.get("smm")
        if efi_secure_boot(self.vmi):
            if machine != "q35":
                self.problem("spec.domain.firmware.bootloader.efi.secureBoot",
                             "secure boot needs machine type q35")
            opts.append("smm=on")
        elif isinstance(smm, dict):
            opts.append("smm=on" if _enabled(smm, True) else "smm=off")
        return ",".join(opts + self.machine_extra)

    def _cpu(self) -> tuple[str, tuple[int, int, int, int]]:
        domain = copy.deepcopy(self.domain)
        default_cpu_topology(domain)
        cpu = _d(domain.get("cpu"))
        counts = []
        for key in ("sockets", "cores", "threads"):
            value = cpu.get(key) or 1
            if not isinstance(value, int) or value < 1:
                self.problem(f"spec.domain.cpu.{key}", f"must be a positive integer, not {value!r}")
                value = 1
            counts.append(value)
        sockets, cores, threads = counts
        max_sockets = cpu.get("maxSockets")
        maxcpus = (max_sockets if isinstance(max_sockets, int) else 0) * cores * threads
        model = str(cpu.get("model") or "host-model")
        if model in ("host-model", "host-passthrough"):
            qemu_model = "host" if self.ctx.accel == "kvm" else "max"
        else:
            qemu_model = model
        flags = []
        for feat in _l(cpu.get("features")):
            policy = feat.get("policy") or "require"
            sign = "-" if policy in ("disable", "forbid") else "+"
            flags.append(f"{sign}{feat.get('name')}")
        return ",".join([qemu_model, *flags]), (sockets, cores, threads, maxcpus)

    def _memory(self) -> int:
        memory = _d(self.domain.get("memory"))
        resources = _d(self.domain.get("resources"))
        for path, value in (
            ("spec.domain.memory.guest", memory.get("guest")),
            ("spec.domain.resources.requests.memory", _d(resources.get("requests")).get("memory")),
            ("spec.domain.resources.limits.memory", _d(resources.get("limits")).get("memory")),
        ):
            if value is None:
                continue
            try:
                amount = quantity.parse_value(value).value()
            except ValueError:
                self.problem(path, f"invalid quantity {value!r}")
                return MIB
            if amount <= 0:
                self.problem(path, f"guest memory must be positive, not {value!r}")
                return MIB
            return -(-amount // MIB) * MIB
        self.problem("spec.domain.memory.guest",
                     "guest memory is required (memory.guest or resources.requests.memory)")
        return MIB

    # -- firmware --

    def _firmware(self) -> None:
        firmware = _d(self.domain.get("firmware"))
        uid = firmware.get("uuid") or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"virtshift:{self.namespace}/{self.name}"))
        self.add("-uuid", str(uid))
        smbios = "type=1,manufacturer=KubeVirt,product=None,family=KubeVirt"
        if firmware.get("serial"):
            smbios += f",serial={_esc(str(firmware['serial']))}"
        self.add("-smbios", smbios)
        bootloader = _d(firmware.get("bootloader"))
        if _d(bootloader.get("bios")).get("useSerial"):
            self.warnings.append("spec.domain.firmware.bootloader.bios.useSerial: ignored")
        secure = efi_secure_boot(self.vmi)
        if secure is not None:
            self._efi(secure)
        kernel_boot = firmware.get("kernelBoot")
        if isinstance(kernel_boot, dict):
            self._kernel_boot(kernel_boot)
        if self.domain.get("rebootPolicy") == "Terminate":
            self.add("-action", "reboot=shutdown")

    def _efi(self, secure: bool) -> None:
        path = "spec.domain.firmware.bootloader.efi"
        efi = self.ctx.efi
        if efi is None:
            self.problem(path, "EFI firmware (OVMF) is not installed on this node")
            return
        if secure != efi.secure_boot:
            self.problem(path, f"secureBoot={secure} but the node prepared "
                         f"{'secure boot' if efi.secure_boot else 'plain'} OVMF firmware")
            return
        self.add("-blockdev", _json({"driver": "file", "filename": efi.code,
                                     "node-name": "pflash0", "read-only": True}),
                 "-blockdev", _json({"driver": "file", "filename": efi.vars,
                                     "node-name": "pflash1", "read-only": False}))
        if secure:
            self.add("-global", "driver=cfi.pflash01,property=secure,value=on")
        self.machine_extra.append("pflash0=pflash0,pflash1=pflash1")

    def _kernel_boot(self, kernel_boot: Obj) -> None:
        container = kernel_boot.get("container")
        args = kernel_boot.get("kernelArgs")
        if not isinstance(container, dict):
            if args:
                self.warnings.append("spec.domain.firmware.kernelBoot.kernelArgs: ignored "
                                     "without a kernel boot container")
            return
        kb = self.ctx.kernel_boot
        if kb is None:
            self.problem("spec.domain.firmware.kernelBoot.container",
                         "the kernel boot files were not prepared")
            return
        self.add("-kernel", kb.kernel)
        if kb.initrd:
            self.add("-initrd", kb.initrd)
        cmdline = kb.cmdline if kb.cmdline is not None else (args or "")
        if cmdline:
            self.add("-append", str(cmdline))

    # -- consoles, graphics, agent channel --

    def _consoles(self) -> None:
        run = self.rundir
        if self.devices.get("autoattachSerialConsole") is not False:
            self.add("-chardev", f"socket,id=serial0,path={_esc(str(run.serial_socket))},"
                     f"server=on,wait=off,logfile={_esc(str(run.serial_log))},logappend=on",
                     "-serial", "chardev:serial0")
        if self.devices.get("autoattachGraphicsDevice") is not False:
            video = _d(self.devices.get("video")).get("type")
            if not video:
                video = "bochs" if efi_secure_boot(self.vmi) is not None else "vga"
            driver = _VIDEO.get(str(video))
            if driver is None:
                self.problem("spec.domain.devices.video.type",
                             f"video type {video!r} is not supported ({', '.join(_VIDEO)})")
            else:
                self.add("-device", _json({"driver": driver, "id": "video0"}))
            self.add("-vnc", f"unix:{_esc(str(run.vnc_socket))}")
        self.add("-chardev", f"socket,id=ga0,path={_esc(str(run.ga_socket))},server=on,wait=off",
                 "-device", _json({"driver": self._virtio("virtio-serial-pci"),
                                   "id": "virtio-serial0"}),
                 "-device", _json({"driver": "virtserialport", "bus": "virtio-serial0.0",
                                   "chardev": "ga0", "name": "org.qemu.guest_agent.0"}))

    def _virtio(self, driver: str) -> str:
        return driver + "-transitional" if self.devices.get("useVirtioTransitional") else driver

    # -- disks --

    def _disks(self, machine: str) -> list[DiskInfo]:
        volumes = {str(v.get("name")): (i, v) for i, v in enumerate(_l(self.spec.get("volumes")))}
        entries: list[tuple[str, Obj]] = [
            (f"spec.domain.devices.disks[{i}]", d)
            for i, d in enumerate(_l(self.devices.get("disks")))
        ]
        listed = {str(d.get("name")) for _, d in entries}
        for name, (i, _) in volumes.items():
            if name not in listed:
                kind = self.ctx.disks[name].kind if name in self.ctx.disks else "disk"
                entries.append((f"spec.volumes[{i}]", {"name": name, kind: {}}))
        infos: list[DiskInfo] = []
        sata_units = 0
        scsi_units = 0
        for index, (path, disk) in enumerate(entries):
            name = str(disk.get("name"))
            if name not in volumes:
                self.problem(path, f"no volume named {name!r}")
                continue
            vpath, volume = f"spec.volumes[{volumes[name][0]}]", volumes[name][1]
            if "downwardMetrics" in volume:
                self.problem(vpath, "downwardMetrics volumes are not supported")
                continue
            file = self.ctx.disks.get(name)
            if file is None:
                source = next((k for k in volume if k != "name"), "unknown")
                self.problem(vpath, f"no disk file was prepared for {source} volume {name!r}")
                continue
            device = next((t for t in ("disk", "cdrom", "lun") if isinstance(disk.get(t), dict)),
                          file.kind)
            target = _d(disk.get(device))
            bus = str(target.get("bus") or ("scsi" if device == "lun" else "sata"))
            pvc = _d(volume.get("persistentVolumeClaim"))
            readonly = bool(file.readonly or target.get("readonly") or pvc.get("readOnly")
                            or device == "cdrom")
            qdev: Obj = {"id": f"ua-{name}", "drive": f"drive{index}"}
            if bus == "virtio" and device == "disk":
                qdev["driver"] = self._virtio("virtio-blk-pci")
                if disk.get("dedicatedIOThread"):
                    self.iothreads += 1
                    self.add("-object", f"iothread,id=iothread{self.iothreads}")
                    qdev["iothread"] = f"iothread{self.iothreads}"
            elif bus == "sata" and device in ("disk", "cdrom"):
                if device == "disk" and readonly:
                    self.problem(f"{path}.disk.readonly", "read-only SATA disks are not "
                                 "supported by QEMU (use bus virtio or scsi)")
                    continue
                controller, unit = divmod(sata_units, 6)
                sata_units += 1
                qdev["driver"] = "ide-hd" if device == "disk" else "ide-cd"
                qdev["bus"] = self._sata_bus(machine, controller, unit)
            elif bus == "scsi":
                self._controller("scsi")
                qdev["driver"] = {"disk": "scsi-hd", "cdrom": "scsi-cd", "lun": (
                    "scsi-block" if file.path.startswith("/dev/") else "scsi-hd")}[device]
                qdev.update({"bus": "scsi0.0", "channel": 0, "scsi-id": scsi_units, "lun": 0})
                scsi_units += 1
            elif bus == "usb" and device == "disk":
                self._controller("usb")
                qdev.update({"driver": "usb-storage", "bus": "usb0.0"})
            else:
                self.problem(f"{path}.{device}.bus", f"bus {bus!r} is not supported for a "
                             f"{device} (disk: virtio, sata, scsi, usb; cdrom: sata, scsi; "
                             "lun: scsi)")
                continue
            direct = self._cache(path, disk, file, qdev, readonly, device)
            if direct is None:
                continue
            node: Obj = {"driver": "host_device" if file.path.startswith("/dev/") else "file",
                         "node-name": f"file{index}", "filename": file.path,
                         "read-only": readonly, "cache": {"direct": direct, "no-flush": False}}
            io = disk.get("io")
            if io == "native" and not direct:
                self.problem(f"{path}.io", "io 'native' needs cache 'none'")
                continue
            if io in ("native", "threads"):
                node["aio"] = io
            fmt: Obj = {"driver": file.format, "node-name": f"drive{index}", "file": f"file{index}",
                        "read-only": readonly, "cache": {"direct": direct, "no-flush": False}}
            if not readonly:
                fmt["discard"] = "unmap"
            self.add("-blockdev", _json(node), "-blockdev", _json(fmt))
            boot = disk.get("bootOrder")
            if isinstance(boot, int):
                qdev["bootindex"] = boot
                self.boot_indexes = True
            if disk.get("serial"):
                qdev["serial"] = str(disk["serial"])
            if disk.get("shareable"):
                qdev["share-rw"] = True
            custom = _d(_d(disk.get("blockSize")).get("custom"))
            if custom:
                qdev["logical_block_size"] = custom.get("logical")
                qdev["physical_block_size"] = custom.get("physical")
            self.add("-device", _json(qdev))
            infos.append(DiskInfo(name=name, qdev_id=qdev["id"], node_name=f"drive{index}",
                                  bus=bus, device=device, path=file.path, readonly=readonly,
                                  boot_index=qdev.get("bootindex"), shared=file.shared))
        return infos

    def _controller(self, kind: str) -> None:
        if kind not in self.controllers:
            self.controllers.add(kind)
            driver = self._virtio("virtio-scsi-pci") if kind == "scsi" else "qemu-xhci"
            self.add("-device", _json({"driver": driver, "id": f"{kind}0"}))

    def _sata_bus(self, machine: str, controller: int, unit: int) -> str:
        # q35 has an AHCI controller built in (buses ide.0..ide.5); others get ich9-ahci ones.
        if machine.startswith("q35") and controller == 0:
            return f"ide.{unit}"
        if f"ahci{controller}" not in self.controllers:
            self.controllers.add(f"ahci{controller}")
            self.add("-device", _json({"driver": "ich9-ahci", "id": f"ahci{controller}"}))
        return f"ahci{controller}.{unit}"

    def _cache(self, path: str, disk: Obj, file: DiskFile, qdev: Obj, readonly: bool,
               device: str) -> bool | None:
        """Set write-cache and error policy on the device; return cache.direct (None: invalid)."""
        mode = disk.get("cache") or ("none" if file.direct_io else "writethrough")
        if mode not in ("none", "writethrough", "writeback"):
            self.problem(f"{path}.cache", f"cache mode {mode!r} is not supported "
                         "(none, writethrough, writeback)")
            return None
        if device == "cdrom" or readonly:
            return mode == "none"
        qdev["write-cache"] = "off" if mode == "writethrough" else "on"
        policy = disk.get("errorPolicy") or "stop"
        if policy not in _ERROR_POLICIES:
            self.problem(f"{path}.errorPolicy", f"error policy {policy!r} is not supported")
            return None
        if qdev["driver"] != "usb-storage":
            qdev["werror"], qdev["rerror"] = _ERROR_POLICIES[policy]
        return mode == "none"

    # -- network --

    def _interfaces(self) -> list[InterfaceInfo]:
        result = convert_interfaces(self.spec, self.ctx, namespace=self.namespace, name=self.name,
                                    transitional=bool(self.devices.get("useVirtioTransitional")))
        self.add(*result.argv)
        self.problems.extend(result.problems)
        self.warnings.extend(result.warnings)
        self.boot_indexes |= result.boot_indexes
        return result.interfaces

    # -- the rest --

    def _misc_devices(self) -> None:
        if self.devices.get("disableHotplug") is not True:
            self._controller("scsi")  # hotplugged volumes attach to SCSI, as in KubeVirt
        for i, inp in enumerate(_l(self.devices.get("inputs"))):
            kind, bus = inp.get("type") or "tablet", inp.get("bus") or "usb"
            drivers = {("tablet", "usb"): "usb-tablet", ("keyboard", "usb"): "usb-kbd",
                       ("tablet", "virtio"): "virtio-tablet-pci",
                       ("keyboard", "virtio"): "virtio-keyboard-pci"}
            if (kind, bus) not in drivers:
                self.problem(f"spec.domain.devices.inputs[{i}]",
                             f"input {kind!r} on bus {bus!r} is not supported")
                continue
            qdev: Obj = {"driver": drivers[(kind, bus)], "id": f"ua-{inp.get('name') or i}"}
            if bus == "usb":
                self._controller("usb")
                qdev["bus"] = "usb0.0"
            self.add("-device", _json(qdev))
        if self.devices.get("autoattachMemBalloon") is not False:
            self.add("-device", _json({"driver": self._virtio("virtio-balloon-pci"),
                                       "id": "balloon0"}))
        if self.devices.get("rng") is not None:
            self.add("-object", _json({"qom-type": "rng-random", "id": "rng0",
                                       "filename": "/dev/urandom"}),
                     "-device", _json({"driver": self._virtio("virtio-rng-pci"), "rng": "rng0",
                                       "id": "rng0-dev"}))
        watchdog = self.devices.get("watchdog")
        if isinstance(watchdog, dict):
            model = _d(watchdog.get("i6300esb"))
            action = str(model.get("action") or "reset")
            if "i6300esb" not in watchdog and watchdog.get("i6300esb") is None and any(
                    k not in ("name", "i6300esb") for k in watchdog):
                self.problem("spec.domain.devices.watchdog", "only the i6300esb model is "
                             "supported")
            elif action not in _WATCHDOG_ACTIONS:
                self.problem("spec.domain.devices.watchdog.i6300esb.action",
                             f"watchdog action {action!r} is not supported")
            else:
                self.add("-device", _json({"driver": "i6300esb", "id": "watchdog0"}),
                         "-action", f"watchdog={_WATCHDOG_ACTIONS[action]}")
        for i, panic in enumerate(_l(self.devices.get("panicDevices"))):
            if (panic.get("model") or "isa") != "isa":
                self.problem(f"spec.domain.devices.panicDevices[{i}].model",
                             "only the isa panic device is supported")
            else:
                self.add("-device", _json({"driver": "pvpanic", "id": f"panic{i}"}))
