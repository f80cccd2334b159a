"""Disk and volume rules of a VMI spec.

Upstream: ``validateVolumes``, ``validateBootOrder``, ``validateKernelBoot`` and
``validateVirtualMachineInstanceSpecVolumeDisks`` in
``pkg/virt-api/webhooks/validating-webhook/admitters/vmi-create-admitter.go``, and
``ValidateDisks`` / ``ValidateContainerDisks`` in ``pkg/storage/admitters/disks.go``.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re

from virtshift.api.admission import _k8s, quantity
from virtshift.api.admission._util import (
    INVALID,
    NOT_FOUND,
    NOT_SUPPORTED,
    REQUIRED,
    Obj,
    Path,
    as_dict,
    as_int,
    as_str,
    cause,
    dicts,
    is_set,
)
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

ARRAY_LEN_MAX = 256
MAX_STR_LEN = 256
CLOUD_INIT_USER_MAX_LEN = 2048
CLOUD_INIT_NETWORK_MAX_LEN = 2048

# The VolumeSource members, each of which makes a volume's one source.
VOLUME_SOURCES = (
    "persistentVolumeClaim", "sysprep", "cloudInitNoCloud", "cloudInitConfigDrive",
    "containerDisk", "ephemeral", "emptyDisk", "hostDisk", "dataVolume", "configMap", "secret",
    "downwardAPI", "serviceAccount", "downwardMetrics", "memoryDump", "containerPath",
)
DISK_TARGETS = ("disk", "lun", "cdrom")
SUPPORTED_BUSES = ("virtio", "scsi", "sata", "usb")
_SERIAL = re.compile(r"^[A-Za-z0-9_.+-]+$")
_VOLUME_SOURCE_SET = frozenset(VOLUME_SOURCES)
# A disk with no other keys than these has none of the optional settings validate_disks checks.
_PLAIN_DISK_KEYS = frozenset({"name", *DISK_TARGETS})
_NAME_NOT_FOUND = "{} '{}' not found."
# A volume with no other keys than these has nothing validate_volumes checks beyond its name
# and its number of sources.
_PLAIN_VOLUME_KEYS = frozenset(
    {"name", "containerDisk", "persistentVolumeClaim", "emptyDisk", "ephemeral"}
)


def _disk_target(disk: Obj) -> tuple[str, Obj]:
    for target in DISK_TARGETS:
        if isinstance(disk.get(target), dict):
            return target, disk[target]
    return "", {}


def validate_disks(field: Path, disks: list[Obj]) -> list[FieldError]:
    """``ValidateDisks``; ``field`` is the ``...devices.disks`` path."""
    errs: list[FieldError] = []
    # Upstream builds the "domain.devices.disks" variants of a few paths below by appending to
    # the disks path itself, producing e.g. spec.domain.devices.disks.domain.devices.disks[0].
    seen: dict[str, int] = {}
    for idx, disk in enumerate(disks):
        at = field.index(idx)
        name = as_str(disk.get("name"))
        if name in seen:
            errs.append(cause(
                INVALID, at.child("name"),
                f"{at} and {field.index(seen[name])} must not have the same Name.",
            ))
        else:
            seen[name] = idx
        if sum(1 for t in DISK_TARGETS if disk.get(t) is not None) > 1:
            errs.append(cause(INVALID, at, f"{at} can only have a single target type defined"))
        target_type, target = _disk_target(disk)
        bus = as_str(target.get("bus"))
        if _PLAIN_DISK_KEYS.issuperset(disk) and "pciAddress" not in as_dict(disk.get("disk")):
            # Just a name and targets: only the bus and the name's form are left to check.
            errs.extend(_validate_bus(field, idx, disk, target_type, bus))
            if len(name) > _k8s.LABEL_MAX or not _k8s.is_dns1123_label(name):
                odd_name = field.child("domain", "devices", "disks").index(idx).child("name")
                for msg in _k8s.dns1123_label(name):
                    errs.append(cause(INVALID, odd_name, msg))
            continue
        pci = as_str(as_dict(disk.get("disk")).get("pciAddress"))
        if pci:
            odd = field.child("domain", "devices", "disks", "disk").index(idx)
            if as_str(as_dict(disk.get("disk")).get("bus")) != "virtio":
                errs.append(cause(
                    INVALID, odd.child("pciAddress"),
                    f"disk {odd.child('name')} - setting a PCI address is only possible with "
                    "bus type virtio.",
                ))
            if not _k8s.is_pci_address(pci):
                errs.append(cause(
                    INVALID, odd.child("pciAddress"),
                    f"disk {odd.child('name')} has malformed PCI address ({pci}).",
                ))
        boot_order = as_int(disk.get("bootOrder"))
        if boot_order is not None and boot_order < 1:
            errs.append(cause(
                INVALID, at.child("bootOrder"), f"{at} must have a boot order > 0, if supplied"
            ))
        errs.extend(_validate_bus(field, idx, disk, target_type, bus))
        serial = as_str(disk.get("serial"))
        if serial and not _SERIAL.match(serial):
            errs.append(cause(
                INVALID, at.child("serial"),
                f"{at} must be made up of the following characters [A-Za-z0-9_.+-], if specified",
            ))
        if serial and len(serial) > MAX_STR_LEN:
            errs.append(cause(
                INVALID, at.child("serial"),
                f"{at} must be less than or equal to {MAX_STR_LEN} in length, if specified",
            ))
        cache = as_str(disk.get("cache"))
        if cache and cache not in ("none", "writethrough", "writeback"):
            errs.append(cause(
                INVALID, at.child("cache"), f"{at.child('cache')} has invalid value {cache}"
            ))
        io = as_str(disk.get("io"))
        if io and io not in ("native", "threads"):
            errs.append(cause(
                NOT_SUPPORTED, field.child("domain", "devices", "disks").index(idx).child("io"),
                f"Disk IO mode for {field} is not supported. Supported modes are: native, "
                "threads.",
            ))
        policy = disk.get("errorPolicy")
        if policy is not None and policy not in ("stop", "ignore", "report", "enospace"):
            errs.append(cause(
                INVALID, at.child("errorPolicy"),
                f'{at.child("errorPolicy")} has invalid value "{policy}"',
            ))
        # The disk name becomes a container name, so it must be a DNS-1123 label.
        odd_name = field.child("domain", "devices", "disks").index(idx).child("name")
        for msg in _k8s.dns1123_label(name):
            errs.append(cause(INVALID, odd_name, msg))
        errs.extend(_validate_block_size(at, disk, bus))
    return errs


def _validate_bus(
    field: Path, idx: int, disk: Obj, target_type: str, bus: str
) -> list[FieldError]:
    errs: list[FieldError] = []
    if not bus or (bus == "virtio" and target_type != "cdrom"):
        return errs  # nothing below applies
    at = field.index(idx)
    if bus == "ide":
        errs.append(cause(INVALID, at.child(target_type, "bus"), "IDE bus is not supported"))
    elif bus == "virtio":
        # virtio cannot carry a CD-ROM on q35.
        if target_type == "cdrom":
            errs.append(cause(
                INVALID, at.child("cdrom", "bus"), f"Bus type {bus} is invalid for CD-ROM device"
            ))
    elif bus == "sata":
        if as_dict(disk.get("disk")).get("readonly") is True:
            errs.append(cause(
                INVALID, at.child("disk", "bus"), f"{bus} hard-disks do not support read-only."
            ))
    elif bus not in ("scsi", "usb"):
        errs.append(cause(
            INVALID, at.child(target_type, "bus"),
            f"{at} is set with an unrecognized bus {bus}, must be one of: "
            f"[{' '.join(SUPPORTED_BUSES)}]",
        ))
    if disk.get("dedicatedIOThread") is True and bus != "virtio":
        errs.append(cause(
            NOT_SUPPORTED, field.child("domain", "devices", "disks").index(idx),
            f"IOThreads are not supported for disks on a {bus} bus",
        ))
    return errs


def _block_size_errors(at: Path, kind: str, size: int) -> list[FieldError]:
    path = at.child("blockSize", "custom", kind)
    if size < 512:
        msg = f"Provided size of {size} is less than the supported minimum size of 512"
    elif size > 2097152:
        msg = f"Provided size of {size} is greater than the supported maximum size of 2097152"
    elif size & (size - 1):
        msg = f"Provided size of {size} is not a power of 2"
    else:
        return []
    return [cause(INVALID, path, msg)]


def _validate_block_size(at: Path, disk: Obj, bus: str) -> list[FieldError]:
    block = as_dict(disk.get("blockSize"))
    custom = block.get("custom")
    if not isinstance(custom, dict):
        return []
    match = block.get("matchVolume")
    if isinstance(match, dict) and match.get("enabled") is not False:
        return [cause(
            INVALID, at.child("blockSize"),
            "Block size matching can't be enabled together with a custom value",
        )]
    logical = as_int(custom.get("logical")) or 0
    physical = as_int(custom.get("physical")) or 0
    discard = as_int(custom.get("discardGranularity"))
    if logical > physical:
        return [cause(
            INVALID, at.child("blockSize", "custom", "logical"),
            f"Logical size {logical} must be the same or less than the physical size of "
            f"{physical}",
        )]
    if bus == "sata" and logical != 512:
        return [cause(
            INVALID, at.child("blockSize", "custom", "logical"),
            f"Logical size {logical} must be 512 for SATA devices",
        )]
    if discard is not None and logical and discard % logical:
        return [cause(
            INVALID, at.child("blockSize", "custom", "discardGranularity"),
            f"Discard granularity {discard} must be multiples of logical size {logical}",
        )]
    return [
        *_block_size_errors(at, "logical", logical),
        *_block_size_errors(at, "physical", physical),
    ]


def validate_path(field: Path, path: str) -> list[FieldError]:
    """``ValidatePath``: an absolute file path without relative components."""
    if path == "/":
        return [cause(INVALID, field, f"{field} must not point to root")]
    cleaned = posixpath.normpath(posixpath.join("/", path))
    if cleaned.startswith("//"):
        cleaned = cleaned[1:]
    if cleaned != path.removesuffix("/"):
        return [cause(
            INVALID, field,
            f"{field} must be an absolute path to a file without relative components",
        )]
    return []


def validate_container_disks(field: Path, spec: Obj) -> list[FieldError]:
    """``ValidateContainerDisks`` plus a required ``image``.

    An absent or empty ``containerDisk.image`` is reported as Required at
    ``volumes[i].containerDisk.image``: the schema marks ``image`` required, and upstream's
    webhooks let an empty string through to fail at pull time, which virtshift does not mirror.
    """
    errs: list[FieldError] = []
    for idx, volume in enumerate(dicts(spec.get("volumes"))):
        disk = volume.get("containerDisk")
        if not isinstance(disk, dict):
            continue
        image, path = as_str(disk.get("image")), as_str(disk.get("path"))
        if image and not path:
            continue  # nothing to report
        at = field.child("volumes").index(idx).child("containerDisk")
        if not image:
            errs.append(cause(REQUIRED, at.child("image"), ""))
        if path:
            errs.extend(validate_path(at, path))
    return errs


def validate_boot_order(
    field: Path, spec: Obj, boot_orders: set[int]
) -> list[FieldError]:
    """``validateBootOrder``: disks name existing volumes, LUNs sit on claims, downward
    metrics on virtio disks, and boot orders are unique (``boot_orders`` collects them)."""
    errs: list[FieldError] = []
    volumes = {as_str(v.get("name")): v for v in dicts(spec.get("volumes"))}
    disks_at = field.child("domain", "devices", "disks")
    devices = as_dict(as_dict(spec.get("domain")).get("devices"))
    for idx, disk in enumerate(dicts(devices.get("disks"))):
        at = disks_at.index(idx)
        name = as_str(disk.get("name"))
        volume = volumes.get(name)
        if volume is None:
            errs.append(cause(
                INVALID, at.child("name"), _NAME_NOT_FOUND.format(at.child("Name"), name)
            ))
        elif is_set(disk, "lun") and not (
            is_set(volume, "persistentVolumeClaim") or is_set(volume, "dataVolume")
        ):
            errs.append(cause(
                INVALID, at.child("lun"),
                f"{at.child('lun')} can only be mapped to a DataVolume or PersistentVolumeClaim "
                "volume.",
            ))
        if volume is not None and is_set(volume, "downwardMetrics"):
            target = disk.get("disk")
            if not isinstance(target, dict):
                errs.append(cause(
                    REQUIRED, at.child("disk"),
                    "DownwardMetrics volume must be mapped to a disk, but disk is not set on "
                    f"{at.child('disk')}.",
                ))
            elif as_str(target.get("bus")) not in ("", "virtio"):
                errs.append(cause(
                    INVALID, at.child("disk", "bus"),
                    f"DownwardMetrics volume must be mapped to virtio bus, but "
                    f"{at.child('disk', 'bus')} is set to {as_str(target.get('bus'))}",
                ))
        order = as_int(disk.get("bootOrder"))
        if order is not None:
            if order in boot_orders:
                errs.append(cause(
                    INVALID, at.child("bootOrder"),
                    f"Boot order for {at.child('bootOrder')} already set for a different device.",
                ))
            boot_orders.add(order)
    return errs


def validate_volume_disks(field: Path, spec: Obj) -> list[FieldError]:
    """``validateVirtualMachineInstanceSpecVolumeDisks`` (VMI create only): every volume but a
    memory dump has a disk or filesystem. Upstream reports it at ``spec.domain.volumes[i]``."""
    devices = as_dict(as_dict(spec.get("domain")).get("devices"))
    names = {as_str(d.get("name")) for d in dicts(devices.get("disks"))}
    names |= {as_str(f.get("name")) for f in dicts(devices.get("filesystems"))}
    errs: list[FieldError] = []
    for idx, volume in enumerate(dicts(spec.get("volumes"))):
        name = as_str(volume.get("name"))
        if is_set(volume, "memoryDump") or name in names:
            continue
        at = field.child("domain", "volumes").index(idx).child("name")
        errs.append(cause(INVALID, at, _NAME_NOT_FOUND.format(at, name)))
    return errs


def _b64_decode(value: str) -> bytes | None:
    """Go's ``base64.StdEncoding``: padded, line breaks ignored."""
    try:
        return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return None


def _validate_cloud_init(at: Path, source_type: str, source: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    src = at.child(source_type)
    counts = {"user": 0, "network": 0}
    lengths = {"user": 0, "network": 0}
    for kind, ref, b64, plain in (
        ("user", "secretRef", "userDataBase64", "userData"),
        ("network", "networkDataSecretRef", "networkDataBase64", "networkData"),
    ):
        if as_str(as_dict(source.get(ref)).get("name")):
            counts[kind] += 1
        encoded = as_str(source.get(b64))
        if encoded:
            counts[kind] += 1
            decoded = _b64_decode(encoded)
            if decoded is None:
                errs.append(cause(
                    INVALID, src.child(b64),
                    f"{src.child(b64)}.{source_type}.{b64} is not a valid base64 value.",
                ))
            lengths[kind] = len(decoded or b"")
        text = as_str(source.get(plain))
        if text:
            counts[kind] += 1
            lengths[kind] = len(text.encode())
    if counts["user"] > 1:
        errs.append(cause(INVALID, src, f"{src} must have only one userdatasource set."))
    if lengths["user"] > CLOUD_INIT_USER_MAX_LEN:
        errs.append(cause(
            INVALID, src,
            f"{src} userdata exceeds {CLOUD_INIT_USER_MAX_LEN} byte limit. Should use "
            "UserDataSecretRef for larger data.",
        ))
    if counts["network"] > 1:
        errs.append(cause(INVALID, src, f"{src} must have only one networkdata source set."))
    if lengths["network"] > CLOUD_INIT_NETWORK_MAX_LEN:
        errs.append(cause(
            INVALID, src,
            f"{src} networkdata exceeds {CLOUD_INIT_NETWORK_MAX_LEN} byte limit. Should use "
            "NetworkDataSecretRef for larger data.",
        ))
    if counts["user"] == 0 and counts["network"] == 0:
        errs.append(cause(
            INVALID, src,
            f"{src} must have at least one userdatasource or one networkdatasource set.",
        ))
    return errs


def _validate_host_disk(at: Path, host_disk: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    errs: list[FieldError] = []
    if not cfg.gate("HostDisk"):
        errs.append(cause(INVALID, at, "HostDisk feature gate is not enabled"))
    path = at.child("hostDisk", "path")
    if not as_str(host_disk.get("path")):
        errs.append(cause(NOT_FOUND, path, f"{path} is required for hostDisk volume"))
    disk_type = as_str(host_disk.get("type"))
    type_at = at.child("hostDisk", "type")
    if disk_type not in ("Disk", "DiskOrCreate"):
        errs.append(cause(
            INVALID, type_at,
            f"{type_at} has invalid value '{disk_type}', allowed are 'Disk' or 'DiskOrCreate'",
        ))
    capacity = host_disk.get("capacity")
    if disk_type == "Disk" and capacity is not None:
        try:
            nonzero = not quantity.parse_value(capacity).is_zero()
        except ValueError:
            nonzero = True
        if nonzero:
            errs.append(cause(
                INVALID, at.child("hostDisk", "capacity"),
                f"{at.child('hostDisk', 'capacity')} is allowed to pass only with {type_at} "
                "equal to 'DiskOrCreate'",
            ))
    return errs


def validate_volumes(field: Path, volumes: list[Obj], cfg: AdmissionConfig) -> list[FieldError]:
    """``validateVolumes``; ``field`` is the ``...volumes`` path."""
    errs: list[FieldError] = []
    seen: dict[str, int] = {}
    singletons = {"serviceAccount": 0, "downwardMetrics": 0, "memoryDump": 0}
    for idx, volume in enumerate(volumes):
        at = field.index(idx)
        name = as_str(volume.get("name"))
        if name in seen:
            errs.append(cause(
                INVALID, at.child("name"),
                f"{at} and {field.index(seen[name])} must not have the same Name.",
            ))
        else:
            seen[name] = idx
        # Only counted below, so the volume's own key order does as well as VOLUME_SOURCES'.
        sources = [s for s, v in volume.items() if v is not None and s in _VOLUME_SOURCE_SET]
        for s in sources:
            if s in singletons:
                singletons[s] += 1
        if len(sources) != 1:
            errs.append(cause(INVALID, at, f"{at} must have exactly one source type set"))
        if _PLAIN_VOLUME_KEYS.issuperset(volume):
            continue
        data_volume = volume.get("dataVolume")
        if isinstance(data_volume, dict) and not as_str(data_volume.get("name")):
            errs.append(cause(REQUIRED, at.child("name"), "DataVolume 'name' must be set"))
        for source_type in ("cloudInitNoCloud", "cloudInitConfigDrive"):
            source = volume.get(source_type)
            if isinstance(source, dict):
                errs.extend(_validate_cloud_init(at, source_type, source))
                break
        if is_set(volume, "downwardMetrics") and not cfg.gate("DownwardMetrics"):
            errs.append(cause(
                INVALID, at,
                "downwardMetrics disks are not allowed: DownwardMetrics feature gate is not "
                "enabled.",
            ))
        host_disk = volume.get("hostDisk")
        if isinstance(host_disk, dict):
            errs.extend(_validate_host_disk(at, host_disk, cfg))
        for source_type, key in (
            ("configMap", "name"), ("secret", "secretName"), ("serviceAccount",
                                                              "serviceAccountName"),
        ):
            source = volume.get(source_type)
            if isinstance(source, dict) and not as_str(source.get(key)):
                required = at.child(source_type, key)
                errs.append(cause(INVALID, required, f"{required} is a required field"))
    for source_type, label in (
        ("serviceAccount", "serviceAccount"),
        ("downwardMetrics", "downwardMetric"),
        ("memoryDump", "memory dump"),
    ):
        if singletons[source_type] > 1:
            errs.append(cause(INVALID, field, f"{field} must have max one {label} volume set"))
    return errs


def validate_kernel_boot(field: Path, kernel_boot: Obj) -> list[FieldError]:
    """``validateKernelBoot``; ``field`` is ``...firmware.kernelBoot``."""
    container = kernel_boot.get("container")
    if not isinstance(container, dict):
        if as_str(kernel_boot.get("kernelArgs")):
            return [cause(
                INVALID, field.child("kernelArgs"),
                "kernel arguments cannot be provided without an external kernel",
            )]
        return []
    at = field.child("container")
    errs: list[FieldError] = []
    if not as_str(container.get("image")):
        errs.append(cause(REQUIRED, at.child("image"), f"{at} must be defined with an image"))
    kernel = as_str(container.get("kernelPath"))
    initrd = as_str(container.get("initrdPath"))
    if not kernel and not initrd:
        errs.append(cause(
            REQUIRED, at,
            f"{at} must be defined with at least one of the following: kernelPath, initrdPath",
        ))
    if kernel:
        errs.extend(validate_path(at.child("kernelPath"), kernel))
    if initrd:
        errs.extend(validate_path(at.child("initrdPath"), initrd))
    return errs


def too_many(field: Path, items: list[object]) -> FieldError | None:
    if len(items) > ARRAY_LEN_MAX:
        return cause(
            INVALID, field, f"{field} list exceeds the {ARRAY_LEN_MAX} element limit in length"
        )
    return None
