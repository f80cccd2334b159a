"""VirtualMachineInstance defaulting, as KubeVirt's VMI mutating webhook applies it on create.

Upstream: ``pkg/virt-api/webhooks/mutating-webhook/mutators/vmi-mutator.go`` calls
``pkg/defaults.SetDefaultVirtualMachineInstance``, which runs
``SetDefaultVirtualMachineInstanceSpec`` (also used by the VM admitter on a copy of the template),
the generated ``v1.SetObjectDefaults_VirtualMachineInstance`` (``api/core/v1/defaults.go``) and the
per-architecture defaults (``pkg/defaults/amd64.go``). Functions mutate the mapping passed in.

Not applied here: status fields (phase Pending, memory and CPU topology status, runtimeUser),
Hyper-V feature dependencies, CPU/memory hotplug limits (maxSockets/maxGuest under the LiveUpdate
rollout strategy), presets and namespace LimitRanges.
"""

from __future__ import annotations

from fractions import Fraction

from virtshift.api.admission import quantity
from virtshift.api.admission._util import Obj, as_dict, as_list, as_str, dicts, ensure_dict
from virtshift.api.admission.config import AdmissionConfig

DEFAULT_CPU_MODEL = "host-model"  # v1.DefaultCPUModel
VMI_FINALIZER = "foregroundDeleteVirtualMachine"  # v1.VirtualMachineInstanceFinalizer

_HYPERV_FEATURES = (
    "relaxed", "vapic", "vpindex", "runtime", "synic", "reset", "frequencies",
    "reenlightenment", "tlbflush", "ipi", "evmcs",
)
_TIMERS = ("hpet", "pit", "rtc", "kvm", "hyperv")


def default_spec(spec: Obj, cfg: AdmissionConfig) -> None:
    """``SetDefaultVirtualMachineInstanceSpec``: the spec-level defaults, in upstream order."""
    domain = ensure_dict(spec, "domain")
    # setDefaultArchitecture: the cluster's default architecture.
    if not as_str(spec.get("architecture")):
        spec["architecture"] = cfg.architecture
    # setDefaultMachineType: domain.machine.type from the cluster config ("q35" on amd64).
    machine = ensure_dict(domain, "machine")
    if not as_str(machine.get("type")):
        machine["type"] = cfg.machine_type
    _default_resource_requests(domain, cfg)
    _default_guest_memory(domain)
    default_cpu_topology(domain)
    _default_pull_policies(spec)
    # setDefaultEvictionStrategy: the cluster-wide evictionStrategy, if one is configured.
    if spec.get("evictionStrategy") is None and cfg.eviction_strategy is not None:
        spec["evictionStrategy"] = cfg.eviction_strategy
    default_network_interface(spec, cfg)
    _default_volume_disks(spec)


def default_vmi(obj: Obj, cfg: AdmissionConfig) -> None:
    """``SetDefaultVirtualMachineInstance`` plus the mutator's metadata changes (create only)."""
    spec = ensure_dict(obj, "spec")
    default_spec(spec, cfg)
    _object_defaults(spec, cfg)
    _arch_defaults(spec, cfg)
    if cfg.add_finalizers:
        meta = ensure_dict(obj, "metadata")
        finalizers = [f for f in as_list(meta.get("finalizers")) if isinstance(f, str)]
        if VMI_FINALIZER not in finalizers:
            meta["finalizers"] = [*finalizers, VMI_FINALIZER]


def _quantity(value: object) -> quantity.Quantity | None:
    try:
        return quantity.parse_value(value)
    except ValueError:
        return None


def _nonzero(resources: Obj, key: str) -> bool:
    q = _quantity(resources.get(key)) if key in resources else None
    return q is not None and not q.is_zero()


def _default_resource_requests(domain: Obj, cfg: AdmissionConfig) -> None:
    """``setDefaultResourceRequests``: requests follow limits, then guest memory."""
    resources = ensure_dict(domain, "resources")
    limits = as_dict(resources.get("limits"))
    requests = as_dict(resources.get("requests"))

    def put(key: str, value: object) -> None:
        ensure_dict(resources, "requests")[key] = value

    # A CPU or memory limit without a request copies the limit into the request.
    if limits:
        if _nonzero(limits, "cpu") and not _nonzero(requests, "cpu"):
            put("cpu", limits["cpu"])
        if _nonzero(limits, "memory") and not _nonzero(requests, "memory"):
            put("memory", limits["memory"])
        requests = as_dict(resources.get("requests"))
    # No memory request: use domain.memory.guest, else the hugepage size (with overcommit).
    if "memory" not in requests:
        memory = as_dict(domain.get("memory"))
        source = memory.get("guest")
        if source is None and "hugepages" in memory:
            page = as_dict(memory.get("hugepages")).get("pageSize")
            source = page if _quantity(page) is not None else None
        q = _quantity(source) if source is not None else None
        if q is not None and q.value() > 0:
            if cfg.memory_overcommit == 100:
                put("memory", source)
            else:
                scaled = quantity.Quantity(
                    Fraction(q.value() * 100 // cfg.memory_overcommit), q.format
                )
                put("memory", quantity.canonical(scaled))
    # A configured cluster cpuRequest other than the 100m default is written into the spec.
    if cfg.cpu_request is not None and _quantity(cfg.cpu_request) != _quantity("100m"):
        cpu = as_dict(domain.get("cpu"))
        if "cpu" not in as_dict(resources.get("requests")) and not cpu.get(
            "dedicatedCpuPlacement"
        ):
            put("cpu", cfg.cpu_request)


def _default_guest_memory(domain: Obj) -> None:
    """``setGuestMemory``: guest memory from the memory request, limit or hugepage size."""
    memory = as_dict(domain.get("memory"))
    if memory.get("guest") is not None:
        return
    memory = ensure_dict(domain, "memory")
    resources = as_dict(domain.get("resources"))
    requests = as_dict(resources.get("requests"))
    limits = as_dict(resources.get("limits"))
    if _nonzero(requests, "memory"):
        memory["guest"] = requests["memory"]
    elif _nonzero(limits, "memory"):
        memory["guest"] = limits["memory"]
    elif memory.get("hugepages") is not None:
        page = as_dict(memory.get("hugepages")).get("pageSize")
        if _quantity(page) is not None:
            memory["guest"] = page


def default_cpu_topology(domain: Obj) -> None:
    """``SetDefaultGuestCPUTopology``: with no topology, one core and thread per socket and
    as many sockets as the CPU limit (else request) asks for, rounded up; 1 by default."""
    cpu = as_dict(domain.get("cpu"))
    if cpu.get("cores") or cpu.get("sockets") or cpu.get("threads"):
        return
    cpu = ensure_dict(domain, "cpu")
    resources = as_dict(domain.get("resources"))
    sockets = 1
    for source in (as_dict(resources.get("limits")), as_dict(resources.get("requests"))):
        if "cpu" in source:
            q = _quantity(source["cpu"])
            sockets = max(q.value(), 0) if q is not None else sockets
            break
    cpu["sockets"] = sockets
    cpu["cores"] = 1
    cpu["threads"] = 1


def _default_pull_policies(spec: Obj) -> None:
    """``setDefaultPullPoliciesOnContainerDisks``: Always for ``:latest`` or untagged images,
    IfNotPresent otherwise."""
    for volume in dicts(spec.get("volumes")):
        disk = volume.get("containerDisk")
        if not isinstance(disk, dict) or as_str(disk.get("imagePullPolicy")):
            continue
        image = as_str(disk.get("image"))
        untagged = not any(c in image for c in ":@")
        disk["imagePullPolicy"] = (
            "Always" if image.endswith(":latest") or untagged else "IfNotPresent"
        )


def default_network_interface(spec: Obj, cfg: AdmissionConfig) -> None:
    """``vmispec.SetDefaultNetworkInterface``: with no networks and no interfaces, and
    ``autoattachPodInterface`` not false, attach the pod network as ``default`` using the
    cluster's default binding (upstream default: bridge)."""
    domain = as_dict(spec.get("domain"))
    devices = as_dict(domain.get("devices"))
    if devices.get("autoattachPodInterface") is False:
        return
    if as_list(spec.get("networks")) or as_list(devices.get("interfaces")):
        return
    binding = cfg.network_interface
    if binding not in ("bridge", "masquerade"):
        # Upstream rejects slirp ("discontinued") and ignores unknown values; add nothing.
        return
    if binding == "bridge" and not cfg.bridge_on_pod_network:
        return
    ensure_dict(ensure_dict(spec, "domain"), "devices")["interfaces"] = [
        {"name": "default", binding: {}}
    ]
    spec["networks"] = [{"name": "default", "pod": {}}]


def _default_volume_disks(spec: Obj) -> None:
    """``SetDefaultVolumeDisk``: every volume without a disk or filesystem of the same name
    gets a bare disk entry (its target is filled in by the object defaults)."""
    devices = ensure_dict(ensure_dict(spec, "domain"), "devices")
    named = {as_str(d.get("name")) for d in dicts(devices.get("disks"))}
    named |= {as_str(f.get("name")) for f in dicts(devices.get("filesystems"))}
    added = [
        {"name": as_str(v.get("name"))}
        for v in dicts(spec.get("volumes"))
        if as_str(v.get("name")) not in named
    ]
    if added:
        devices["disks"] = [*as_list(devices.get("disks")), *added]


def _enable(feature: object) -> None:
    if isinstance(feature, dict) and feature.get("enabled") is None:
        feature["enabled"] = True


def _object_defaults(spec: Obj, cfg: AdmissionConfig) -> None:
    """The generated ``SetObjectDefaults_VirtualMachineInstance`` and the ``SetDefaults_*``
    functions of ``api/core/v1/defaults.go``."""
    domain = ensure_dict(spec, "domain")
    # SetDefaults_VirtualMachineInstance: empty firmware and features structs.
    firmware = ensure_dict(domain, "firmware")
    features = ensure_dict(domain, "features")
    # SetDefaults_Firmware: a random firmware UUID when none is given.
    if not as_str(firmware.get("uuid")):
        firmware["uuid"] = cfg.new_uuid()
    # SetDefaults_FeatureState and friends: a present feature is enabled unless it says not.
    ensure_dict(features, "acpi")
    _enable(features.get("acpi"))
    for name in ("apic", "smm", "pvspinlock"):
        _enable(features.get(name))
    hyperv = features.get("hyperv")
    if isinstance(hyperv, dict):
        for name in (*_HYPERV_FEATURES, "vendorid"):
            _enable(hyperv.get(name))
        synic_timer = hyperv.get("synictimer")
        if isinstance(synic_timer, dict):
            _enable(synic_timer)
            _enable(synic_timer.get("direct"))
        spinlocks = hyperv.get("spinlocks")
        if isinstance(spinlocks, dict):
            _enable(spinlocks)
            if spinlocks.get("enabled") is True and spinlocks.get("spinlocks") is None:
                spinlocks["spinlocks"] = 4096
    timer = as_dict(as_dict(domain.get("clock")).get("timer"))
    for name in _TIMERS:
        _enable(timer.get(name))
    devices = ensure_dict(domain, "devices")
    for disk in as_list(devices.get("disks")):
        if not isinstance(disk, dict):
            continue
        # SetDefaults_DiskDevice: a disk with no target is a plain disk.
        if all(disk.get(t) is None for t in ("disk", "cdrom", "lun")):
            disk["disk"] = {}
        cdrom = disk.get("cdrom")
        # SetDefaults_CDRomTarget: read-only, tray closed.
        if isinstance(cdrom, dict):
            if cdrom.get("readonly") is None:
                cdrom["readonly"] = True
            if not as_str(cdrom.get("tray")):
                cdrom["tray"] = "closed"
    watchdog = devices.get("watchdog")
    if isinstance(watchdog, dict):
        # SetDefaults_Watchdog (by host architecture) and the model's default action.
        if cfg.architecture == "s390x":
            if watchdog.get("diag288") is None:
                watchdog["diag288"] = {}
        elif watchdog.get("i6300esb") is None:
            watchdog["i6300esb"] = {}
        for model in ("i6300esb", "diag288"):
            m = watchdog.get(model)
            if isinstance(m, dict) and not as_str(m.get("action")):
                m["action"] = "reset"
    # setDefaults_Input: USB tablets.
    for device in as_list(devices.get("inputs")):
        if isinstance(device, dict):
            if not as_str(device.get("bus")):
                device["bus"] = "usb"
            if not as_str(device.get("type")):
                device["type"] = "tablet"
    # SetDefaults_Probe: the Kubernetes probe defaults.
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = spec.get(probe_name)
        if isinstance(probe, dict):
            for key, floor, value in (
                ("timeoutSeconds", 1, 1),
                ("periodSeconds", 1, 10),
                ("successThreshold", 1, 1),
                ("failureThreshold", 1, 3),
            ):
                current = probe.get(key)
                if not isinstance(current, int) or current < floor:
                    probe[key] = value


def _arch_defaults(spec: Obj, cfg: AdmissionConfig) -> None:
    """``setDefaultCPUArch``: amd64 disk buses and watchdog, then the default CPU model.

    Only amd64 is modelled; arm64/s390x disk-bus and bootloader defaults are not applied.
    """
    domain = ensure_dict(spec, "domain")
    if as_str(spec.get("architecture")) not in ("arm64", "s390x"):
        # setDefaultAmd64DisksBus: SATA wherever a disk, CD-ROM or LUN names no bus.
        for disk in dicts(as_dict(domain.get("devices")).get("disks")):
            for target in ("disk", "cdrom", "lun"):
                t = disk.get(target)
                if isinstance(t, dict) and not as_str(t.get("bus")):
                    t["bus"] = "sata"
    # setDefaultCPUModel: the cluster's cpuModel, else host-model.
    cpu = ensure_dict(domain, "cpu")
    if not as_str(cpu.get("model")):
        cpu["model"] = cfg.cpu_model or DEFAULT_CPU_MODEL
