"""CPU, memory, machine and firmware rules of a VMI spec.

Upstream: the ``validateMemory*``, ``validateCPU*``, ``validateCpuPinning``, ``validateNUMA``,
``validateRealtime``, ``validateEmulatedMachine``, ``validateFirmware*`` and
``validateDomainSpec`` helpers of
``pkg/virt-api/webhooks/validating-webhook/admitters/vmi-create-admitter.go``.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

from virtshift.api.admission import quantity
from virtshift.api.admission._util import (
    INVALID,
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
from virtshift.api.admission.storage import MAX_STR_LEN, validate_kernel_boot
from virtshift.errors import FieldError

_ZERO = quantity.Quantity(Fraction(0), quantity.DECIMAL_SI)
_ONE_M = quantity.parse("1M")
_ONE_M_VALUE = _ONE_M.value()
_SERIAL = re.compile(r"^[A-Za-z0-9_.+-]+$")
_CPU_RULE_KEYS = frozenset({"numa", "isolateEmulatorThread", "features", "realtime"})
_CPU_FEATURE_POLICIES = ("", "force", "require", "optional", "disable", "forbid")


class _Resources:
    """The quantities of ``domain.resources``, malformed ones reported once."""

    def __init__(self, field: Path, domain: Obj, errs: list[FieldError]) -> None:
        resources = as_dict(domain.get("resources"))
        self.field = field
        self._values: dict[tuple[str, str], quantity.Quantity] = {}
        if not resources:
            return
        for group in ("requests", "limits"):
            for key, value in as_dict(resources.get(group)).items():
                try:
                    self._values[(group, key)] = quantity.parse_value(value)
                except ValueError:
                    at = field.child("domain", "resources", group, key)
                    errs.append(cause(INVALID, at, quantity.FORMAT_ERROR))

    def get(self, group: str, key: str) -> quantity.Quantity:
        return self._values.get((group, key), _ZERO)

    def path(self, group: str, key: str) -> Path:
        return self.field.child("domain", "resources", group, key)


def _must_be_positive(at: Path, q: quantity.Quantity) -> FieldError:
    return cause(INVALID, at, f"{at} '{q}': must be greater than or equal to 0.")


def _vcpus(cpu: Obj) -> int:
    """``hwutil.GetNumberOfVCPUs``: cores x sockets x threads, zeros ignored."""
    total = as_int(cpu.get("cores")) or 0
    for key in ("sockets", "threads"):
        n = as_int(cpu.get(key)) or 0
        if n:
            total = n if total == 0 else total * n
    return total


def _below_one_m(q: quantity.Quantity) -> bool:
    """``q < 1M``, decided on the (cached) integer value where it can be."""
    value = q.value()  # ceil(amount): amount <= value < amount + 1
    if value != _ONE_M_VALUE:
        return value < _ONE_M_VALUE
    return q.amount < _ONE_M.amount


def validate_resources(field: Path, spec: Obj) -> list[FieldError]:
    """Memory and CPU requests/limits, hugepages and guest memory."""
    errs: list[FieldError] = []
    domain = as_dict(spec.get("domain"))
    res = _Resources(field, domain, errs)
    mem_req, mem_lim = res.get("requests", "memory"), res.get("limits", "memory")
    cpu_req, cpu_lim = res.get("requests", "cpu"), res.get("limits", "cpu")
    mem_req_value, mem_lim_value = mem_req.value(), mem_lim.value()
    # validateMemoryRequestsNegativeOrNull
    if mem_req_value < 0:
        errs.append(_must_be_positive(res.path("requests", "memory"), mem_req))
    elif mem_req_value > 0 and _below_one_m(mem_req):
        at = res.path("requests", "memory")
        errs.append(cause(INVALID, at, f"{at} '{mem_req}': must be greater than or equal to 1M."))
    # validateMemoryLimitsNegativeOrNull
    if mem_lim_value < 0:
        errs.append(_must_be_positive(res.path("limits", "memory"), mem_lim))
    if mem_lim_value > 0 and mem_req_value > mem_lim_value:
        errs.append(cause(
            INVALID, res.path("requests", "memory"),
            f"{res.path('requests', 'memory')} '{mem_req}' is greater than "
            f"{res.path('limits', 'memory')} '{mem_lim}'",
        ))
    memory = as_dict(domain.get("memory"))
    if isinstance(memory.get("hugepages"), dict):
        errs.extend(_validate_hugepages(field, memory, mem_req))
    # validateGuestMemoryLimit
    guest = memory.get("guest")
    if guest is not None:
        try:
            guest_q = quantity.parse_value(guest)
        except ValueError:
            errs.append(cause(INVALID, field.child("domain", "memory", "guest"),
                              quantity.FORMAT_ERROR))
        else:
            limit = mem_lim_value
            if limit != 0 and limit < guest_q.value():
                guest_at = field.child("domain", "memory", "guest")
                errs.append(cause(
                    INVALID, guest_at,
                    f"{guest_at} '{guest_q}' must be equal to or less than the memory limit "
                    f"{res.path('limits', 'memory')} '{mem_lim}'",
                ))
    # validateCPURequestNotNegative / validateCPULimitNotNegative
    cpu_req_milli, cpu_lim_milli = cpu_req.milli_value(), cpu_lim.milli_value()
    if cpu_req_milli < 0:
        errs.append(_must_be_positive(res.path("requests", "cpu"), cpu_req))
    if cpu_lim_milli < 0:
        errs.append(_must_be_positive(res.path("limits", "cpu"), cpu_lim))
    # validateCpuRequestDoesNotExceedLimit
    if cpu_lim_milli > 0 and cpu_req_milli > cpu_lim_milli:
        errs.append(cause(
            INVALID, res.path("requests", "cpu"),
            f"{res.path('requests', 'cpu')} '{cpu_req}' is greater than "
            f"{res.path('limits', 'cpu')} '{cpu_lim}'",
        ))
    cpu = domain.get("cpu")
    if isinstance(cpu, dict) and cpu.get("dedicatedCpuPlacement") is True:
        errs.extend(_validate_cpu_pinning(field, cpu, res))
    return errs


def _validate_hugepages(
    field: Path, memory: Obj, mem_req: quantity.Quantity
) -> list[FieldError]:
    """``validateHugepagesMemoryRequests``; upstream names the page size
    ``spec.domain.hugepages.size`` in these messages."""
    hugepages = memory.get("hugepages")
    if not isinstance(hugepages, dict):
        return []
    size_at = field.child("domain", "hugepages", "size")
    page = hugepages.get("pageSize")
    req_at = field.child("domain", "resources", "requests", "memory")
    try:
        size = quantity.parse_value(page)
    except ValueError:
        return [cause(INVALID, size_at, f"{size_at} '{as_str(page)}': {quantity.FORMAT_ERROR}")]
    if size.value() and mem_req.value() < size.value():
        return [cause(
            INVALID, req_at,
            f"{req_at} '{mem_req}' must be equal to or larger than page size {size_at} "
            f"'{as_str(page)}'",
        )]
    if size.value() and mem_req.value() % size.value():
        return [cause(
            INVALID, req_at,
            f"{req_at} '{mem_req}' is not a multiple of the page size {size_at} '{as_str(page)}'",
        )]
    return []


def _validate_cpu_pinning(field: Path, cpu: Obj, res: _Resources) -> list[FieldError]:
    """``validateCpuPinning`` (dedicatedCpuPlacement), without the arm64 thread rule."""
    errs: list[FieldError] = []
    req_mem, lim_mem = res.path("requests", "memory"), res.path("limits", "memory")
    req_cpu, lim_cpu = res.path("requests", "cpu"), res.path("limits", "cpu")
    dedicated = field.child("domain", "cpu", "dedicatedCpuPlacement")
    cores = field.child("domain", "cpu", "cores")
    r_mem, l_mem = res.get("requests", "memory").value(), res.get("limits", "memory").value()
    r_cpu_q, l_cpu_q = res.get("requests", "cpu"), res.get("limits", "cpu")
    r_cpu, l_cpu = r_cpu_q.value(), l_cpu_q.value()
    vcpus = _vcpus(cpu)
    if l_mem == 0 and r_mem == 0:
        errs.append(cause(INVALID, lim_mem, f"{req_mem} or {lim_mem} should be provided"))
    if r_cpu > 0 and r_cpu * 1000 != r_cpu_q.milli_value():
        errs.append(cause(INVALID, req_cpu, "provided resources CPU requests must be an interger"))
    if l_cpu > 0 and l_cpu * 1000 != l_cpu_q.milli_value():
        errs.append(cause(INVALID, lim_cpu, "provided resources CPU limits must be an interger"))
    if r_mem > 0 and l_mem > 0 and r_mem != l_mem:
        errs.append(cause(INVALID, req_mem, f"{req_mem} must be equal to {lim_mem}"))
    if r_cpu == 0 and l_cpu == 0 and vcpus == 0:
        errs.append(cause(
            INVALID, dedicated,
            f"either {req_cpu} or {lim_cpu} or {cores} must be provided when "
            "DedicatedCPUPlacement is true ",
        ))
    if r_cpu > 0 and l_cpu > 0 and r_cpu != l_cpu:
        errs.append(cause(
            INVALID, dedicated,
            f"{req_cpu} or {lim_cpu} must be equal when DedicatedCPUPlacement is true ",
        ))
    if (r_cpu > 0 or l_cpu > 0) and vcpus > 0 and r_cpu != vcpus and l_cpu != vcpus:
        errs.append(cause(
            INVALID, dedicated,
            f"{req_cpu} or {lim_cpu} must not be provided at the same time with {cores} when "
            "DedicatedCPUPlacement is true ",
        ))
    threads = as_int(cpu.get("threads")) or 0
    if threads > 2:
        errs.append(cause(
            INVALID, dedicated,
            f"Not more than two threads must be provided at "
            f"{field.child('domain', 'cpu', 'threads')} (got {threads}) when "
            "DedicatedCPUPlacement is true",
        ))
    return errs


def validate_cpu(field: Path, spec: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """Topology counts, NUMA, emulator-thread isolation, feature policies and realtime."""
    domain = as_dict(spec.get("domain"))
    cpu = as_dict(domain.get("cpu"))
    if not cpu:
        return []  # every rule below reads a field of cpu
    errs: list[FieldError] = []
    cpu_at = field.child("domain", "cpu")
    # The topology counts are unsigned upstream; a negative one fails to decode there.
    for key in ("cores", "sockets", "threads", "maxSockets"):
        n = as_int(cpu.get(key))
        if n is not None and n < 0:
            at = cpu_at.child(key)
            errs.append(cause(INVALID, at, f"{at} '{n}': must be greater than or equal to 0."))
    if _CPU_RULE_KEYS.isdisjoint(cpu):
        return errs  # none of the fields the rules below read
    dedicated = cpu.get("dedicatedCpuPlacement") is True
    numa = as_dict(cpu.get("numa"))
    passthrough = cpu_at.child("numa", "guestMappingPassthrough")
    if is_set(numa, "guestMappingPassthrough"):
        if not cfg.gate("NUMA"):
            errs.append(cause(
                INVALID, passthrough,
                f"NUMA feature gate is not enabled in kubevirt-config, invalid entry {passthrough}",
            ))
        if not dedicated:
            errs.append(cause(
                INVALID, passthrough,
                f"{cpu_at.child('dedicatedCpuPlacement')} must be set to true when NUMA topology "
                f"strategy is set in {passthrough}",
            ))
        if not is_set(as_dict(domain.get("memory")), "hugepages"):
            errs.append(cause(
                INVALID, passthrough,
                f"{field.child('domain', 'memory', 'hugepages')} must be requested when NUMA "
                f"topology strategy is set in {passthrough}",
            ))
    if cpu.get("isolateEmulatorThread") is True and not dedicated:
        errs.append(cause(
            INVALID, cpu_at.child("isolateEmulatorThread"),
            "IsolateEmulatorThread should be only set in combination with DedicatedCPUPlacement",
        ))
    for idx, feature in enumerate(dicts(cpu.get("features"))):
        policy = as_str(feature.get("policy"))
        if policy not in _CPU_FEATURE_POLICIES:
            errs.append(cause(
                NOT_SUPPORTED, cpu_at.child("features").index(idx).child("policy"),
                f"CPU feature {as_str(feature.get('name'))} uses policy {policy} that is not "
                "supported.",
            ))
    if is_set(cpu, "realtime"):
        if not dedicated:
            errs.append(cause(
                REQUIRED, cpu_at.child("dedicatedCpuPlacement"),
                f"{cpu_at.child('dedicatedCpuPlacement')} must be set to true when "
                f"{cpu_at.child('realtime')} is used",
            ))
        if not is_set(numa, "guestMappingPassthrough"):
            errs.append(cause(
                REQUIRED, passthrough,
                f"{passthrough} must be defined when {cpu_at.child('realtime')} is used",
            ))
    return errs


@functools.lru_cache(maxsize=16)
def _machine_patterns(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """The compiled emulated-machine regexes of a cluster configuration."""
    return tuple(re.compile(p) for p in patterns)


def validate_machine(field: Path, spec: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """``validateEmulatedMachine``: the machine type matches one of the (unanchored) regexes."""
    machine_type = as_str(as_dict(as_dict(spec.get("domain")).get("machine")).get("type"))
    if not machine_type:
        return []
    for pattern in _machine_patterns(cfg.emulated_machines):
        if pattern.search(machine_type):
            return []
    at = field.child("domain", "machine", "type")
    return [cause(
        INVALID, at,
        f"{at} is not supported: {machine_type} (allowed values: "
        f"[{' '.join(cfg.emulated_machines)}])",
    )]


def validate_firmware(field: Path, spec: Obj) -> list[FieldError]:
    """Firmware serial, bootloader exclusivity, kernel boot and the SecureBoot/SMM pairing."""
    domain = as_dict(spec.get("domain"))
    if not isinstance(domain.get("firmware"), dict):
        return []  # no serial, bootloader or kernel boot
    errs: list[FieldError] = []
    firmware = as_dict(domain.get("firmware"))
    fw_at = field.child("domain", "firmware")
    serial = as_str(firmware.get("serial"))
    if serial:
        if len(serial) > MAX_STR_LEN:
            errs.append(cause(
                INVALID, fw_at.child("serial"),
                f"{fw_at.child('serial')} must be less than or equal to {MAX_STR_LEN} in length, "
                "if specified",
            ))
        if not _SERIAL.match(serial):
            errs.append(cause(
                INVALID, fw_at.child("serial"),
                f"{fw_at.child('serial')} must be made up of the following characters "
                "[A-Za-z0-9_.+-], if specified",
            ))
    bootloader = as_dict(firmware.get("bootloader"))
    if is_set(bootloader, "efi") and is_set(bootloader, "bios"):
        at = fw_at.child("bootloader")
        errs.append(cause(
            INVALID, at, f"{at} has both EFI and BIOS configured, but they are mutually exclusive."
        ))
    kernel_boot = firmware.get("kernelBoot")
    if isinstance(kernel_boot, dict):
        errs.extend(validate_kernel_boot(fw_at.child("kernelBoot"), kernel_boot))
    efi = bootloader.get("efi")
    if isinstance(efi, dict) and efi.get("secureBoot") is not False:
        smm = as_dict(domain.get("features")).get("smm")
        if not isinstance(smm, dict) or smm.get("enabled") is False:
            at = field.child("domain")
            errs.append(cause(
                INVALID, at,
                f"{at} has EFI SecureBoot enabled. SecureBoot requires SMM, which is currently "
                "disabled.",
            ))
    return errs
