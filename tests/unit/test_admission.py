"""Admission: defaulting and semantic validation of KubeVirt and CDI objects."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.conftest import CORPUS
from virtshift.api.admission import AdmissionConfig, default, validate
from virtshift.api.admission import quantity as q
from virtshift.api.kinds import REGISTRY, KindInfo
from virtshift.errors import FieldError, Invalid

UUID = "6a1a2e4c-0000-4000-8000-000000000001"
CFG = AdmissionConfig(new_uuid=lambda: UUID)

Obj = dict[str, Any]


def _kind(api_version: str, kind: str) -> KindInfo:
    info = REGISTRY.by_api_version(api_version, kind)
    assert info is not None
    return info


VMI = _kind("kubevirt.io/v1", "VirtualMachineInstance")
VM = _kind("kubevirt.io/v1", "VirtualMachine")
VMIM = _kind("kubevirt.io/v1", "VirtualMachineInstanceMigration")
VMIRS = _kind("kubevirt.io/v1", "VirtualMachineInstanceReplicaSet")
DV = _kind("cdi.kubevirt.io/v1beta1", "DataVolume")
CM = _kind("v1", "ConfigMap")


def _corpus() -> list[tuple[str, Obj]]:
    docs = []
    for path in sorted(CORPUS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(CORPUS)), doc))
    return docs


def load(name: str) -> Obj:
    doc = yaml.safe_load((CORPUS / name).read_text())
    assert isinstance(doc, dict)
    return doc


def admit(kind: KindInfo, obj: Obj, old: Obj | None = None, **kw: Any) -> list[FieldError]:
    return validate(kind, default(kind, obj, old=old, config=CFG), old, config=CFG, **kw)


def fields(errs: list[FieldError]) -> list[str]:
    return [e.field for e in errs]


def only(errs: list[FieldError]) -> FieldError:
    assert len(errs) == 1, [e.text() for e in errs]
    return errs[0]


def vmi_obj(**spec: Any) -> Obj:
    """A minimal valid VMI (vmi-ephemeral.yaml) with ``spec`` keys replaced."""
    obj = load("vmi-ephemeral.yaml")
    obj["spec"].update(spec)
    return obj


def vm_obj() -> Obj:
    return load("vm-cirros.yaml")


# ---- the example corpus -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "doc"), _corpus(), ids=[n for n, _ in _corpus()])
def test_corpus_passes_after_defaulting(name: str, doc: Obj) -> None:
    kind = _kind(doc["apiVersion"], doc["kind"])
    defaulted = default(kind, doc, config=CFG)
    assert validate(kind, defaulted, None, config=CFG) == []
    # Defaulting is idempotent and the result still passes as an update of itself.
    assert default(kind, defaulted, config=CFG) == defaulted
    assert validate(kind, defaulted, defaulted, config=CFG) == []


# ---- defaulting ---------------------------------------------------------------------------


def test_vmi_fedora_defaults() -> None:
    original = load("vmi-fedora.yaml")
    snapshot = copy.deepcopy(original)
    out = default(VMI, original, config=CFG)
    assert original == snapshot  # a deep copy is returned
    spec = out["spec"]
    domain = spec["domain"]
    assert spec["architecture"] == "amd64"
    assert domain["machine"] == {"type": "q35"}
    assert domain["resources"] == {"requests": {"memory": "1024M"}}
    assert domain["memory"] == {"guest": "1024M"}
    assert domain["cpu"] == {"cores": 1, "sockets": 1, "threads": 1, "model": "host-model"}
    assert domain["firmware"] == {"uuid": UUID}
    assert domain["features"] == {"acpi": {"enabled": True}}
    # Given interfaces/networks are kept; explicit buses too.
    assert domain["devices"]["interfaces"] == [{"masquerade": {}, "name": "default"}]
    assert spec["networks"] == [{"name": "default", "pod": {}}]
    assert [d["disk"]["bus"] for d in domain["devices"]["disks"]] == ["virtio", "virtio"]
    assert spec["volumes"][0]["containerDisk"]["imagePullPolicy"] == "IfNotPresent"
    assert spec["terminationGracePeriodSeconds"] == 0
    assert "status" not in out
    assert "finalizers" not in out["metadata"]


def test_vmi_default_pod_network_uses_bridge_then_config() -> None:
    out = default(VMI, load("vmi-ephemeral.yaml"), config=CFG)
    assert out["spec"]["domain"]["devices"]["interfaces"] == [{"name": "default", "bridge": {}}]
    assert out["spec"]["networks"] == [{"name": "default", "pod": {}}]
    masq = default(VMI, load("vmi-ephemeral.yaml"), config=AdmissionConfig(
        network_interface="masquerade", new_uuid=lambda: UUID))
    assert masq["spec"]["domain"]["devices"]["interfaces"] == [
        {"name": "default", "masquerade": {}}
    ]


def test_vmi_no_pod_network_when_autoattach_off() -> None:
    obj = load("vmi-ephemeral.yaml")
    obj["spec"]["domain"]["devices"]["autoattachPodInterface"] = False
    out = default(VMI, obj, config=CFG)
    assert "networks" not in out["spec"]
    assert "interfaces" not in out["spec"]["domain"]["devices"]


def test_vmi_disk_defaults() -> None:
    obj = vmi_obj()
    devices = obj["spec"]["domain"]["devices"]
    devices["disks"] = [
        {"name": "containerdisk", "disk": {}},
        {"name": "iso", "cdrom": {}},
    ]
    obj["spec"]["volumes"].append({"name": "iso", "persistentVolumeClaim": {"claimName": "c"}})
    obj["spec"]["volumes"].append({"name": "scratch", "emptyDisk": {"capacity": "1Gi"}})
    out = default(VMI, obj, config=CFG)
    disks = out["spec"]["domain"]["devices"]["disks"]
    assert disks == [
        {"name": "containerdisk", "disk": {"bus": "sata"}},
        {"name": "iso", "cdrom": {"bus": "sata", "readonly": True, "tray": "closed"}},
        # SetDefaultVolumeDisk adds a disk for a volume without one.
        {"name": "scratch", "disk": {"bus": "sata"}},
    ]
    assert admit(VMI, obj) == []


def test_vmi_resource_defaults() -> None:
    obj = vmi_obj()
    domain = obj["spec"]["domain"]
    del domain["memory"]
    domain["resources"] = {"limits": {"cpu": "2", "memory": "1Gi"}}
    out = default(VMI, obj, config=CFG)["spec"]["domain"]
    assert out["resources"]["requests"] == {"cpu": "2", "memory": "1Gi"}
    assert out["memory"] == {"guest": "1Gi"}
    assert (out["cpu"]["sockets"], out["cpu"]["cores"], out["cpu"]["threads"]) == (2, 1, 1)


def test_vmi_pull_policy_and_misc_defaults() -> None:
    obj = vmi_obj()
    obj["spec"]["volumes"][0]["containerDisk"]["image"] = "quay.io/containerdisks/fedora"
    obj["spec"]["domain"]["devices"]["watchdog"] = {"name": "w"}
    obj["spec"]["domain"]["devices"]["inputs"] = [{"name": "tablet"}]
    obj["spec"]["readinessProbe"] = {"guestAgentPing": {}}
    spec = default(VMI, obj, config=CFG)["spec"]
    assert spec["volumes"][0]["containerDisk"]["imagePullPolicy"] == "Always"
    assert spec["domain"]["devices"]["watchdog"] == {"name": "w", "i6300esb": {"action": "reset"}}
    assert spec["domain"]["devices"]["inputs"] == [{"name": "tablet", "bus": "usb",
                                                   "type": "tablet"}]
    assert spec["readinessProbe"] == {
        "guestAgentPing": {}, "timeoutSeconds": 1, "periodSeconds": 10,
        "successThreshold": 1, "failureThreshold": 3,
    }


def test_vmi_defaults_only_on_create_and_finalizer_opt_in() -> None:
    obj = load("vmi-ephemeral.yaml")
    assert default(VMI, obj, old=obj, config=CFG) == obj
    cfg = AdmissionConfig(add_finalizers=True, new_uuid=lambda: UUID)
    assert default(VMI, obj, config=cfg)["metadata"]["finalizers"] == [
        "foregroundDeleteVirtualMachine"
    ]


def test_vm_defaults() -> None:
    out = default(VM, load("vm-cirros-csmall.yaml"), config=CFG)
    tspec = out["spec"]["template"]["spec"]
    assert tspec["architecture"] == "amd64"
    assert tspec["domain"]["machine"] == {"type": "q35"}
    # The VM mutator leaves everything else to the VMI mutator.
    assert tspec["domain"]["devices"]["disks"][0] == {"disk": {}, "name": "containerdisk"}
    assert "interfaces" not in tspec["domain"]["devices"]
    assert out["spec"]["instancetype"] == {"kind": "VirtualMachineInstancetype", "name": "csmall"}
    obj = vm_obj()
    obj["spec"]["instancetype"] = {"name": "u1.small"}
    obj["spec"]["preference"] = {"name": "fedora"}
    out = default(VM, obj, config=CFG)
    assert out["spec"]["instancetype"]["kind"] == "virtualmachineclusterinstancetype"
    assert out["spec"]["preference"]["kind"] == "virtualmachineclusterpreference"


def test_migration_selector_label() -> None:
    out = default(VMIM, load("migration-job.yaml"), config=CFG)
    assert out["metadata"]["labels"] == {"kubevirt.io/vmi-name": "vmi-migratable"}


def test_kinds_without_rules_pass_through() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert default(CM, cm) == cm
    assert validate(CM, cm, None) == []


# ---- VirtualMachine -------------------------------------------------------------------------


def test_vm_running_and_run_strategy_exclusive() -> None:
    obj = vm_obj()
    obj["spec"]["running"] = True
    err = only(admit(VM, obj))
    assert (err.type, err.field) == ("FieldValueInvalid", "spec.running")
    assert err.message == (
        "Running and RunStrategy are mutually exclusive. Note that Running is deprecated, "
        "please use RunStrategy instead"
    )


def test_vm_run_strategy_required_and_valid() -> None:
    obj = vm_obj()
    del obj["spec"]["runStrategy"]
    err = only(admit(VM, obj))
    assert (err.field, err.message) == ("spec.running", "RunStrategy must be specified")
    obj["spec"]["runStrategy"] = "Sometimes"
    err = only(admit(VM, obj))
    assert (err.field, err.message) == ("spec.runStrategy", "Invalid RunStrategy (Sometimes)")
    obj["spec"]["runStrategy"] = "WaitAsReceiver"
    assert admit(VM, obj) == []
    gated = AdmissionConfig(feature_gates=frozenset(), new_uuid=lambda: UUID)
    err = only(validate(VM, obj, None, config=gated))
    assert "DecentralizedLiveMigration feature gate is not enabled" in err.message


def test_vm_template_required() -> None:
    obj = vm_obj()
    del obj["spec"]["template"]
    err = only(admit(VM, obj))
    assert (err.type, err.field, err.message) == (
        "FieldValueRequired", "spec.template", "missing virtual machine template."
    )


def test_vm_template_paths_are_prefixed() -> None:
    obj = vm_obj()
    obj["spec"]["template"]["spec"]["domain"]["devices"]["disks"].append(
        {"name": "missing", "disk": {"bus": "virtio"}}
    )
    err = only(admit(VM, obj))
    assert err.field == "spec.template.spec.domain.devices.disks[2].name"
    assert err.message == "spec.template.spec.domain.devices.disks[2].Name 'missing' not found."


def test_vm_data_volume_template_must_be_referenced() -> None:
    obj = load("vm-alpine-datavolume.yaml")
    obj["spec"]["template"]["spec"]["volumes"][0]["dataVolume"]["name"] = "other"
    err = only(admit(VM, obj))
    assert (err.type, err.field) == ("FieldValueRequired", "spec.dataVolumeTemplate[0]")
    obj = load("vm-alpine-datavolume.yaml")
    del obj["spec"]["dataVolumeTemplates"][0]["spec"]["pvc"]
    err = only(admit(VM, obj))
    assert (err.field, err.message) == (
        "spec.dataVolumeTemplate[0].PVC.Storage", "Missing Data volume PVC or Storage"
    )


def test_vm_snapshot_in_progress_blocks_spec_update() -> None:
    old = default(VM, vm_obj(), config=CFG)
    new = copy.deepcopy(old)
    new["spec"]["runStrategy"] = "Always"
    new["status"] = {"snapshotInProgress": "snap-1"}
    err = only(validate(VM, new, old, config=CFG))
    assert (err.type, err.field) == ("FieldValueNotSupported", "spec")
    assert err.message == 'Cannot update VM spec until snapshot "snap-1" completes'


def test_vm_instancetype_matcher_needs_name() -> None:
    obj = vm_obj()
    obj["spec"]["instancetype"] = {"kind": "VirtualMachineInstancetype"}
    err = only(admit(VM, obj))
    assert (err.type, err.field) == ("FieldValueNotFound", "spec.instancetype")


# ---- VirtualMachineInstance: devices and volumes ------------------------------------------


def test_disk_without_volume() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["devices"]["disks"].append({"name": "nothere", "disk": {}})
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == ("FieldValueInvalid", "spec.domain.devices.disks[1].name")
    assert err.message == "spec.domain.devices.disks[1].Name 'nothere' not found."


def test_duplicate_disk_names() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["devices"]["disks"].append(
        {"name": "containerdisk", "disk": {"bus": "virtio"}}
    )
    err = only(admit(VMI, obj))
    assert err.field == "spec.domain.devices.disks[1].name"
    assert err.message == (
        "spec.domain.devices.disks[1] and spec.domain.devices.disks[0] must not have the same Name."
    )


def test_duplicate_volume_names() -> None:
    obj = vmi_obj()
    obj["spec"]["volumes"].append({"name": "containerdisk", "emptyDisk": {"capacity": "1Gi"}})
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == ("FieldValueInvalid", "spec.volumes[1].name")
    assert err.message == "spec.volumes[1] and spec.volumes[0] must not have the same Name."


def test_volume_with_two_sources() -> None:
    obj = vmi_obj()
    obj["spec"]["volumes"][0]["emptyDisk"] = {"capacity": "1Gi"}
    err = only(admit(VMI, obj))
    assert (err.field, err.message) == (
        "spec.volumes[0]", "spec.volumes[0] must have exactly one source type set"
    )


def test_container_disk_image_required() -> None:
    obj = vmi_obj()
    obj["spec"]["volumes"][0]["containerDisk"]["image"] = ""
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == ("FieldValueRequired", "spec.volumes[0].containerDisk.image")


def test_cloud_init_needs_data() -> None:
    obj = load("vmi-nocloud.yaml")
    obj["spec"]["volumes"][1]["cloudInitNoCloud"] = {}
    err = only(admit(VMI, obj))
    assert (err.field, err.message) == (
        "spec.volumes[1].cloudInitNoCloud",
        "spec.volumes[1].cloudInitNoCloud must have at least one userdatasource or one "
        "networkdatasource set.",
    )
    obj["spec"]["volumes"][1]["cloudInitNoCloud"] = {"userDataBase64": "%%%"}
    err = only(admit(VMI, obj))
    assert err.field == "spec.volumes[1].cloudInitNoCloud.userDataBase64"
    obj["spec"]["volumes"][1]["cloudInitNoCloud"] = {"secretRef": {"name": "s"}}
    assert admit(VMI, obj) == []


def test_host_disk_rules() -> None:
    obj = load("vmi-host-disk.yaml")
    obj["spec"]["volumes"][0]["hostDisk"] = {"type": "Nope"}
    errs = admit(VMI, obj)
    assert [(e.type, e.field) for e in errs] == [
        ("FieldValueNotFound", "spec.volumes[0].hostDisk.path"),
        ("FieldValueInvalid", "spec.volumes[0].hostDisk.type"),
    ]
    assert errs[0].message == "spec.volumes[0].hostDisk.path is required for hostDisk volume"
    gated = AdmissionConfig(feature_gates=frozenset(), new_uuid=lambda: UUID)
    errs = validate(VMI, default(VMI, load("vmi-host-disk.yaml"), config=gated), None,
                    config=gated)
    assert [(e.field, e.message) for e in errs] == [
        ("spec.volumes[0]", "HostDisk feature gate is not enabled")
    ]


def test_disk_bus_must_be_supported() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["devices"]["disks"][0]["disk"]["bus"] = "floppy"
    err = only(admit(VMI, obj))
    assert err.field == "spec.domain.devices.disks[0].disk.bus"
    assert err.message == (
        "spec.domain.devices.disks[0] is set with an unrecognized bus floppy, must be one of: "
        "[virtio scsi sata usb]"
    )


def test_boot_order_rules() -> None:
    obj = load("vmi-nocloud.yaml")
    disks = obj["spec"]["domain"]["devices"]["disks"]
    disks[0]["bootOrder"] = 1
    disks[1]["bootOrder"] = 1
    disks[2]["bootOrder"] = 0
    errs = admit(VMI, obj)
    assert sorted(fields(errs)) == [
        "spec.domain.devices.disks[1].bootOrder",
        "spec.domain.devices.disks[2].bootOrder",
    ]
    by_field = {e.field: e.message for e in errs}
    assert by_field["spec.domain.devices.disks[1].bootOrder"] == (
        "Boot order for spec.domain.devices.disks[1].bootOrder already set for a different "
        "device."
    )
    assert by_field["spec.domain.devices.disks[2].bootOrder"] == (
        "spec.domain.devices.disks[2] must have a boot order > 0, if supplied"
    )


def test_kernel_boot_container_needs_image() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["firmware"] = {
        "kernelBoot": {"container": {"kernelPath": "/boot/vmlinuz"}}
    }
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == (
        "FieldValueRequired", "spec.domain.firmware.kernelBoot.container.image"
    )
    assert err.message == "spec.domain.firmware.kernelBoot.container must be defined with an image"


# ---- VirtualMachineInstance: networks ------------------------------------------------------


def test_duplicate_interface_names() -> None:
    obj = load("vmi-migratable.yaml")
    obj["spec"]["domain"]["devices"]["interfaces"].append({"name": "default", "bridge": {}})
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == (
        "FieldValueDuplicate", "spec.domain.devices.interfaces[1].name"
    )
    assert err.message == "Only one interface can be connected to one specific network"


def test_interface_without_network_and_network_without_interface() -> None:
    obj = load("vmi-migratable.yaml")
    obj["spec"]["domain"]["devices"]["interfaces"][0]["name"] = "other"
    errs = admit(VMI, obj)
    assert [(e.type, e.field, e.message) for e in errs] == [
        ("FieldValueInvalid", "spec.domain.devices.interfaces[0].name",
         "Masquerade interface only implemented with pod network"),
        ("FieldValueRequired", "spec.networks[0].name",
         "spec.networks[0].name 'default' not found."),
        ("FieldValueInvalid", "spec.domain.devices.interfaces[0].name",
         "spec.domain.devices.interfaces[0].name 'other' not found."),
    ]


def test_more_than_one_pod_network() -> None:
    obj = load("vmi-migratable.yaml")
    obj["spec"]["domain"]["devices"]["interfaces"].append({"name": "second", "bridge": {}})
    obj["spec"]["networks"].append({"name": "second", "pod": {}})
    err = only(admit(VMI, obj))
    assert (err.type, err.field, err.message) == (
        "FieldValueDuplicate", "spec.interfaces",
        "more than one interface is connected to a pod network in spec.interfaces",
    )


def test_multus_needs_network_name() -> None:
    obj = load("vmi-multus-multiple-net.yaml")
    obj["spec"]["networks"][1]["multus"] = {}
    err = only(admit(VMI, obj))
    assert (err.type, err.field, err.message) == (
        "FieldValueRequired", "spec.networks[1]", "CNI delegating plugin must have a networkName"
    )


# ---- VirtualMachineInstance: compute ------------------------------------------------------


def test_guest_memory_above_limit() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["memory"] = {"guest": "2Gi"}
    obj["spec"]["domain"]["resources"] = {"limits": {"memory": "1Gi"}}
    errs = admit(VMI, obj)
    guest = [e for e in errs if e.field == "spec.domain.memory.guest"]
    assert len(guest) == 1
    assert guest[0].message == (
        "spec.domain.memory.guest '2Gi' must be equal to or less than the memory limit "
        "spec.domain.resources.limits.memory '1Gi'"
    )


def test_negative_cpu_topology() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["cpu"] = {"cores": -1, "sockets": 1}
    err = only(admit(VMI, obj))
    assert (err.field, err.message) == (
        "spec.domain.cpu.cores", "spec.domain.cpu.cores '-1': must be greater than or equal to 0."
    )


def test_memory_is_mandatory_for_vmis() -> None:
    obj = vmi_obj()
    del obj["spec"]["domain"]["memory"]
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == ("FieldValueRequired", "")
    assert err.message.startswith("no memory requested, at least one of 'spec.domain.memory.guest'")


def test_secure_boot_needs_smm() -> None:
    obj = load("vmi-alpine-efi.yaml")
    obj["spec"]["domain"]["firmware"]["bootloader"]["efi"] = {}
    err = only(admit(VMI, obj))
    assert err.field == "spec.domain"
    obj["spec"]["domain"]["features"] = {"smm": {}}
    assert admit(VMI, obj) == []


def test_unsupported_machine_type() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["machine"] = {"type": "pc-i440fx"}
    err = only(admit(VMI, obj))
    assert err.field == "spec.domain.machine.type"
    assert err.message == (
        "spec.domain.machine.type is not supported: pc-i440fx (allowed values: [q35* pc-q35*])"
    )


# ---- VirtualMachineInstance: metadata and updates -----------------------------------------


def test_reserved_labels() -> None:
    obj = vmi_obj()
    obj["metadata"]["labels"]["kubevirt.io/nodeName"] = "node01"
    err = only(admit(VMI, obj))
    assert (err.type, err.field) == ("FieldValueNotSupported", "metadata.labels")
    assert admit(VMI, obj, internal=True) == []


def test_vmi_spec_is_immutable() -> None:
    old = default(VMI, load("vmi-ephemeral.yaml"), config=CFG)
    new = copy.deepcopy(old)
    new["spec"]["domain"]["memory"]["guest"] = "256Mi"
    err = only(validate(VMI, new, old, config=CFG))
    assert (err.type, err.field, err.message) == (
        "FieldValueNotSupported", "", "update of VMI object is restricted"
    )
    assert validate(VMI, new, old, config=CFG, internal=True) == []
    relabelled = copy.deepcopy(old)
    relabelled["metadata"]["labels"]["kubevirt.io/nodeName"] = "node01"
    assert only(validate(VMI, relabelled, old, config=CFG)).message.startswith(
        "modification of the following reserved kubevirt.io/ labels"
    )
    annotated = copy.deepcopy(old)
    annotated["metadata"]["annotations"] = {"note": "fine"}
    assert validate(VMI, annotated, old, config=CFG) == []


# ---- VirtualMachineInstanceMigration and ReplicaSet ----------------------------------------


def test_migration_rules() -> None:
    obj = load("migration-job.yaml")
    obj["spec"] = {}
    err = only(admit(VMIM, obj))
    assert (err.type, err.field, err.message) == (
        "FieldValueRequired", "spec.vmiName", "vmiName is missing"
    )
    old = default(VMIM, load("migration-job.yaml"), config=CFG)
    new = copy.deepcopy(old)
    new["spec"]["vmiName"] = "other"
    assert only(validate(VMIM, new, old)).message == (
        "update of Migration object's spec is restricted"
    )
    new = copy.deepcopy(old)
    new["metadata"]["labels"]["kubevirt.io/vmi-name"] = "other"
    assert only(validate(VMIM, new, old)).message == (
        "selector label can't be modified on an in-flight migration"
    )
    new["status"] = {"phase": "Succeeded"}
    assert validate(VMIM, new, old) == []


def test_replica_set_selector_must_match() -> None:
    obj = load("vmi-replicaset-cirros.yaml")
    obj["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    err = only(admit(VMIRS, obj))
    assert (err.field, err.message) == ("spec.selector", "selector does not match labels.")


# ---- DataVolume --------------------------------------------------------------------------


def dv_obj(spec: Obj) -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "dv"}, "spec": spec}


STORAGE = {"resources": {"requests": {"storage": "1Gi"}}}


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({"source": {"blank": {}}}, "spec.PVC", "Missing Data volume PVC"),
    ({"source": {"blank": {}}, "pvc": {}, "storage": STORAGE}, "spec.PVC.Storage",
     "Duplicate storage definition, both target storage and target pvc defined"),
    ({"storage": STORAGE}, "spec.source",
     "Data volume should have either Source or SourceRef, or be externally populated"),
    ({"source": {"blank": {}}, "sourceRef": {"kind": "DataSource", "name": "x"},
      "storage": STORAGE}, "spec.source",
     "Data volume should have either Source or SourceRef, or be externally populated"),
    ({"source": {}, "storage": STORAGE}, "spec.source", "Missing Data volume source"),
    ({"source": {"blank": {}, "upload": {}}, "storage": STORAGE}, "spec.source",
     "Multiple Data volume sources"),
    ({"source": {"http": {"url": "not a url"}}, "storage": STORAGE}, "spec.source.HTTP.url",
     "spec.source Invalid source URL: not a url"),
    ({"source": {"http": {"url": "ftp://example.com/x.img"}}, "storage": STORAGE},
     "spec.source.HTTP.url", "spec.source Invalid source URL scheme: ftp://example.com/x.img"),
    ({"sourceRef": {"kind": "PVC", "name": "x"}, "storage": STORAGE}, "spec.sourceRef.Kind",
     "Unsupported sourceRef kind PVC, currently only DataSource is supported"),
    ({"source": {"blank": {}}, "storage": {}}, "spec.Storage.resources.requests.size",
     "Storage size is missing"),
    ({"source": {"blank": {}}, "pvc": {"accessModes": ["ReadWriteOnce"],
                                       "resources": {"requests": {"storage": "0"}}}},
     "spec.PVC.resources.requests.size", "PVC size can't be equal or less than zero"),
    ({"source": {"blank": {}}, "pvc": {"resources": {"requests": {"storage": "1Gi"}}}},
     "spec.PVC.accessModes", "Required value: at least 1 access mode is required"),
    ({"source": {"registry": {"url": "http://x/y"}}, "storage": STORAGE},
     "spec.source.Registry.URL", "Illegal registry source URL scheme http://x/y"),
])
def test_data_volume_rules(spec: Obj, field: str, message: str) -> None:
    err = only(admit(DV, dv_obj(spec)))
    assert (err.type, err.field, err.message) == ("FieldValueInvalid", field, message)


def test_data_volume_spec_is_immutable() -> None:
    old = load("cdi/import-kubevirt-datavolume.yaml")
    new = copy.deepcopy(old)
    new["spec"]["storage"]["resources"]["requests"]["storage"] = "1Gi"
    err = only(validate(DV, new, old))
    assert (err.type, err.field, err.message) == (
        "FieldValueDuplicate", "DataVolume.Spec", "Cannot update DataVolume Spec"
    )
    relabelled = copy.deepcopy(old)
    relabelled["metadata"]["labels"] = {"a": "b"}
    assert validate(DV, relabelled, old) == []


# ---- the Status the causes become ---------------------------------------------------------


def test_causes_render_as_kubernetes_status() -> None:
    obj = vm_obj()
    obj["spec"]["running"] = False
    errs = admit(VM, obj)
    status = Invalid.for_object("VirtualMachine", "kubevirt.io", "vm-cirros", errs).status()
    assert status["code"] == 422
    assert status["message"] == (
        'VirtualMachine.kubevirt.io "vm-cirros" is invalid: spec.running: Invalid value: '
        "Running and RunStrategy are mutually exclusive. Note that Running is deprecated, "
        "please use RunStrategy instead"
    )
    assert status["details"]["causes"][0]["field"] == "spec.running"


# ---- quantities ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical", "value"), [
    ("128Mi", "128Mi", 128 * 2**20),
    ("1024M", "1024M", 1024 * 10**6),
    ("2048Mi", "2Gi", 2 * 2**30),
    ("1536", "1536", 1536),
    ("0.5", "500m", 1),
    ("100m", "100m", 1),
    ("2000", "2k", 2000),
    ("1e3", "1e3", 1000),
    ("1.5Gi", "1536Mi", 3 * 2**29),
    ("0", "0", 0),
])
def test_quantity(text: str, canonical: str, value: int) -> None:
    parsed = q.parse(text)
    assert q.canonical(parsed) == canonical
    assert parsed.value() == value


@pytest.mark.parametrize("text", ["", "Mi", "1 Gi", "1Xi", "--1", "1.2.3"])
def test_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="quantities must match"):
        q.parse(text)


def test_malformed_quantity_is_reported() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["resources"] = {"requests": {"memory": "lots"}}
    errs = admit(VMI, obj)
    assert "spec.domain.resources.requests.memory" in fields(errs)


def test_disk_name_must_be_a_dns_label() -> None:
    obj = vmi_obj()
    obj["spec"]["domain"]["devices"]["disks"][0]["name"] = "Root_Disk"
    obj["spec"]["volumes"][0]["name"] = "Root_Disk"
    err = only(admit(VMI, obj))
    # Upstream appends "domain.devices.disks" to the disks path here; kept as it reports it.
    assert err.field == "spec.domain.devices.disks.domain.devices.disks[0].name"
    assert err.message.startswith("a lowercase RFC 1123 label must consist of")


def test_data_volume_template_namespace() -> None:
    obj = load("vm-alpine-datavolume.yaml")
    obj["metadata"]["namespace"] = "default"
    obj["spec"]["dataVolumeTemplates"][0]["metadata"]["namespace"] = "elsewhere"
    err = only(admit(VM, obj))
    assert (err.field, err.message) == (
        "spec.dataVolumeTemplates[0]",
        "Embedded DataVolume namespace elsewhere differs from VM namespace default",
    )
