"""VirtualMachineInstance admission: the shared spec validation and the VMI create/update rules.

Upstream: ``ValidateVirtualMachineInstanceSpec``, ``ValidateVirtualMachineInstanceMetadata`` and
``ValidateVirtualMachineInstanceMandatoryFields`` in
``pkg/virt-api/webhooks/validating-webhook/admitters/vmi-create-admitter.go``, and
``vmi-update-admitter.go``. :func:`validate_spec` is shared with the VM, replica set and pool
templates (with ``spec.template.spec`` style paths).

Not checked: affinity and topology spread constraints, Hyper-V feature dependencies, arm64 and
multi-architecture rules, CPU hotplug limits, launch security, and the feature gates of GPUs,
host devices, virtiofs, VSOCK and persistent reservations.
"""

from __future__ import annotations

import ipaddress

from virtshift.api.admission import _k8s, compute, network, quantity, storage
from virtshift.api.admission._util import (
    INVALID,
    NOT_SUPPORTED,
    REQUIRED,
    Obj,
    Path,
    as_dict,
    as_list,
    as_str,
    cause,
    dicts,
    is_set,
)
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

# Labels only KubeVirt's own service accounts may set on a VMI (restrictedVmiLabels).
RESTRICTED_LABELS = (
    "kubevirt.io/created-by",
    "kubevirt.io/migrationJobUID",
    "kubevirt.io/nodeName",
    "kubevirt.io/migrationTargetNodeName",
    "kubevirt.io/schedulable",
    "kubevirt.io/install-strategy",
)
SIDECAR_ANNOTATION = "hooks.kubevirt.io/hookSidecars"
IGNITION_ANNOTATION = "kubevirt.io/ignitiondata"
EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")
IO_THREADS_POLICIES = ("shared", "auto", "supplementalPool")
DNS_POLICIES = ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None", "")


def validate_spec(field: Path, spec: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """``ValidateVirtualMachineInstanceSpec`` plus the network validator."""
    domain = as_dict(spec.get("domain"))
    devices = as_dict(domain.get("devices"))
    limit = storage.ARRAY_LEN_MAX
    if len(as_list(devices.get("disks"))) > limit:
        return [_too_many(field.child("domain", "devices", "disks"), devices.get("disks"))]
    if len(as_list(spec.get("volumes"))) > limit:
        return [_too_many(field.child("volumes"), spec.get("volumes"))]
    errs: list[FieldError] = []
    errs.extend(_validate_names(field, spec))
    errs.extend(compute.validate_resources(field, spec))
    errs.extend(compute.validate_machine(field, spec, cfg))
    errs.extend(compute.validate_cpu(field, spec, cfg))
    errs.extend(_validate_start_strategy(field, spec))
    if len(as_list(devices.get("interfaces"))) > limit:
        return [*errs, _too_many(field.child("domain", "devices", "interfaces"),
                                 devices.get("interfaces"))]
    if len(as_list(spec.get("networks"))) > limit:
        return [*errs, _too_many(field.child("networks"), spec.get("networks"))]
    boot_orders: set[int] = set()
    errs.extend(storage.validate_boot_order(field, spec, boot_orders))
    errs.extend(network.validate(field, spec, cfg))
    errs.extend(network.validate_boot_order(field, spec, boot_orders))
    errs.extend(_validate_inputs(field, devices))
    policy = domain.get("ioThreadsPolicy")
    if policy is not None and policy not in IO_THREADS_POLICIES:
        errs.append(cause(
            INVALID, field.child("domain", "ioThreadsPolicy"), f"Invalid IOThreadsPolicy ({policy})"
        ))
    errs.extend(_validate_probes(field, spec))
    errs.extend(storage.validate_disks(
        field.child("domain", "devices", "disks"), dicts(devices.get("disks"))
    ))
    errs.extend(compute.validate_firmware(field, spec))
    errs.extend(storage.validate_volumes(field.child("volumes"), dicts(spec.get("volumes")), cfg))
    errs.extend(storage.validate_container_disks(field, spec))
    errs.extend(_validate_access_credentials(field.child("accessCredentials"), spec))
    errs.extend(_validate_dns(field, spec))
    strategy = spec.get("evictionStrategy")
    if strategy is not None and strategy not in EVICTION_STRATEGIES:
        at = field.child("evictionStrategy")
        errs.append(cause(INVALID, at, f"{at} is set with an unrecognized option: {strategy}"))
    errs.extend(_validate_sound(field, devices))
    if is_set(devices, "downwardMetrics") and not cfg.gate("DownwardMetrics"):
        errs.append(cause(
            INVALID, field.child("domain", "devices", "downwardMetrics"),
            "downwardMetrics virtio serial is not allowed: DownwardMetrics feature gate is not "
            "enabled",
        ))
    return errs


def _too_many(at: Path, items: object) -> FieldError:
    error = storage.too_many(at, as_list(items))
    assert error is not None
    return error


def _validate_names(field: Path, spec: Obj) -> list[FieldError]:
    if "hostname" not in spec and "subdomain" not in spec:
        return []
    errs: list[FieldError] = []
    hostname = as_str(spec.get("hostname"))
    if hostname:
        msgs = _k8s.dns1123_label(hostname)
        if msgs:
            at = field.child("hostname")
            errs.append(cause(
                INVALID, at,
                f"{at} does not conform to the kubernetes DNS_LABEL rules : {', '.join(msgs)}",
            ))
    subdomain = as_str(spec.get("subdomain"))
    if subdomain:
        msgs = _k8s.dns1123_subdomain(subdomain)
        if msgs:
            at = field.child("subdomain")
            errs.append(cause(
                INVALID, at,
                f"{at} does not conform to the kubernetes DNS_SUBDOMAIN rules : {', '.join(msgs)}",
            ))
    return errs


def _validate_start_strategy(field: Path, spec: Obj) -> list[FieldError]:
    strategy = spec.get("startStrategy")
    if strategy is None:
        return []
    at = field.child("startStrategy")
    if strategy != "Paused":
        return [cause(INVALID, at, f"{at} is set with an unrecognized option: {strategy}")]
    if is_set(spec, "livenessProbe"):
        return [cause(
            INVALID, at,
            f"either {at} or {field.child('livenessProbe')} should be provided.Pausing VMI with "
            "LivenessProbe is not supported",
        )]
    return []


def _validate_inputs(field: Path, devices: Obj) -> list[FieldError]:
    if "inputs" not in devices:
        return []
    errs: list[FieldError] = []
    for idx, device in enumerate(dicts(devices.get("inputs"))):
        at = field.child("domain", "devices", "inputs").index(idx)
        if as_str(device.get("bus")) not in ("virtio", "usb", ""):
            errs.append(cause(
                INVALID, at.child("bus"), "Input device can have only virtio or usb bus."
            ))
        if as_str(device.get("type")) != "tablet":
            errs.append(cause(INVALID, at.child("type"), "Input device can have only tablet type."))
    return errs


def _validate_probes(field: Path, spec: Obj) -> list[FieldError]:
    if not isinstance(spec.get("readinessProbe"), dict) and not isinstance(
        spec.get("livenessProbe"), dict
    ):
        return []
    errs: list[FieldError] = []
    no_pod = network.pod_interface_count(spec) < 1
    for name in ("readinessProbe", "livenessProbe"):
        probe = spec.get(name)
        if not isinstance(probe, dict):
            continue
        at = field.child(name)
        handlers = sum(
            1 for h in ("httpGet", "tcpSocket", "exec", "guestAgentPing") if is_set(probe, h)
        )
        if handlers > 1:
            errs.append(cause(INVALID, at, f"{at} must have exactly one probe type set"))
        if handlers < 1:
            errs.append(cause(
                REQUIRED, at,
                f"either {at.child('tcpSocket')}, {at.child('exec')} or {at.child('httpGet')} "
                f"must be set if a {at} is specified",
            ))
        if no_pod:
            for handler in ("httpGet", "tcpSocket"):
                if is_set(probe, handler):
                    h_at = at.child(handler)
                    errs.append(cause(
                        INVALID, h_at, f"{h_at} is only allowed if the Pod Network is attached"
                    ))
    return errs


def _validate_access_credentials(field: Path, spec: Obj) -> list[FieldError]:
    """``validateAccessCredentials``."""
    if not spec.get("accessCredentials") or not isinstance(spec.get("accessCredentials"), list):
        return []  # no credentials: nothing to check
    creds = dicts(spec.get("accessCredentials"))
    too_many = storage.too_many(field, as_list(spec.get("accessCredentials")))
    if too_many is not None:
        return [too_many]
    volumes = dicts(spec.get("volumes"))
    has_no_cloud = any(is_set(v, "cloudInitNoCloud") for v in volumes)
    has_config_drive = any(is_set(v, "cloudInitConfigDrive") for v in volumes)
    errs: list[FieldError] = []
    for idx, cred in enumerate(creds):
        at = field.index(idx)
        count = 0
        ssh = cred.get("sshPublicKey")
        if isinstance(ssh, dict):
            count += 1
            method = as_dict(ssh.get("propagationMethod"))
            methods = 0
            if is_set(method, "noCloud"):
                methods += 1
                if not has_no_cloud:
                    errs.append(cause(
                        INVALID, at.child("sshPublicKey", "propagationMethod"),
                        f"{at} requires a noCloud volume to exist when the noCloud "
                        "propagationMethod is in use.",
                    ))
            if is_set(method, "configDrive"):
                methods += 1
                if not has_config_drive:
                    errs.append(cause(
                        INVALID, at.child("sshPublicKey", "propagationMethod"),
                        f"{at} requires a configDrive volume to exist when the configDrive "
                        "propagationMethod is in use.",
                    ))
            agent = method.get("qemuGuestAgent")
            if isinstance(agent, dict):
                methods += 1
                if not as_list(agent.get("users")):
                    errs.append(cause(
                        INVALID,
                        at.child("sshPublicKey", "propagationMethod", "qemuGuestAgent", "users"),
                        f"{at} requires at least one user to be present in the users list",
                    ))
            errs.extend(_source_and_method(at.child("sshPublicKey"), at, ssh, methods))
        password = cred.get("userPassword")
        if isinstance(password, dict):
            count += 1
            method = as_dict(password.get("propagationMethod"))
            methods = 1 if is_set(method, "qemuGuestAgent") else 0
            errs.extend(_source_and_method(at.child("userPassword"), at, password, methods))
        if count != 1:
            errs.append(cause(
                INVALID, at, f"{at} must have exactly one access credential type set"
            ))
    return errs


def _source_and_method(kind_at: Path, at: Path, cred: Obj, methods: int) -> list[FieldError]:
    errs: list[FieldError] = []
    if not is_set(as_dict(cred.get("source")), "secret"):
        errs.append(cause(
            INVALID, kind_at.child("source"), f"{at} must have exactly one source set"
        ))
    if methods != 1:
        errs.append(cause(
            INVALID, kind_at.child("propagationMethod"),
            f"{at} must have exactly one propagationMethod set",
        ))
    return errs


def _validate_dns(field: Path, spec: Obj) -> list[FieldError]:
    """``validateDNSPolicy`` and ``validatePodDNSConfig`` (copied upstream from Kubernetes,
    with their bare ``nameservers``/``searchDomains``/``options`` fields)."""
    if spec.get("dnsPolicy") is None and spec.get("dnsConfig") is None:
        return []  # the default policy and no config
    errs: list[FieldError] = []
    policy = as_str(spec.get("dnsPolicy"))
    if policy not in DNS_POLICIES:
        errs.append(cause(
            NOT_SUPPORTED, field.child("dnsPolicy"),
            f"DNSPolicy: {policy} is not supported, valid values: [{' '.join(DNS_POLICIES)}]",
        ))
    config = spec.get("dnsConfig")
    if policy == "None":
        if not isinstance(config, dict):
            return [*errs, cause(
                REQUIRED, field.child("dnsConfig"),
                "must provide `dnsConfig` when `dnsPolicy` is None",
            )]
        if not as_list(config.get("nameservers")):
            return [*errs, cause(
                REQUIRED, "nameservers",
                "must provide at least one DNS nameserver when `dnsPolicy` is None",
            )]
    if not isinstance(config, dict):
        return errs
    nameservers = [as_str(n) for n in as_list(config.get("nameservers"))]
    if len(nameservers) > 3:
        errs.append(cause(
            INVALID, "nameservers",
            f"must not have more than 3 nameservers: [{' '.join(nameservers)}]",
        ))
    for ns in nameservers:
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            errs.append(cause(INVALID, "nameservers", f"must be valid IP address: {ns}"))
    searches = [as_str(s) for s in as_list(config.get("searches"))]
    if len(searches) > 6:
        errs.append(cause(INVALID, "searchDomains", "must not have more than 6 search paths"))
    if len(" ".join(searches)) > 256:
        errs.append(cause(
            INVALID, "searchDomains",
            "must not have more than 256 characters (including spaces) in the search list",
        ))
    for search in searches:
        for msg in _k8s.dns1123_subdomain(search):
            errs.append(cause(INVALID, "searchDomains", msg))
    for option in dicts(config.get("options")):
        if not as_str(option.get("name")):
            errs.append(cause(INVALID, "options", "Option.Name must not be empty"))
    return errs


def _validate_sound(field: Path, devices: Obj) -> list[FieldError]:
    sound = devices.get("sound")
    if not isinstance(sound, dict):
        return []
    errs: list[FieldError] = []
    if as_str(sound.get("model")) not in ("", "ich9", "ac97"):
        errs.append(cause(
            INVALID, field.child("Sound"),
            "Sound device type is not supported. Options: 'ich9' or 'ac97'",
        ))
    if not as_str(sound.get("name")):
        errs.append(cause(INVALID, field.child("Sound"), "Sound device requires a name field."))
    return errs


def validate_metadata(
    field: Path, metadata: Obj, cfg: AdmissionConfig, internal: bool
) -> list[FieldError]:
    """``ValidateVirtualMachineInstanceMetadata``: reserved labels and gated annotations."""
    errs: list[FieldError] = []
    labels = as_dict(metadata.get("labels"))
    if not internal and labels and not labels.keys().isdisjoint(RESTRICTED_LABELS):
        errs.append(cause(
            NOT_SUPPORTED, field.child("labels"),
            "creation of the following reserved kubevirt.io/ labels on a VMI object is "
            "prohibited",
        ))
    annotations = as_dict(metadata.get("annotations"))
    if as_str(annotations.get(IGNITION_ANNOTATION)) and not cfg.gate(
        "ExperimentalIgnitionSupport"
    ):
        errs.append(cause(
            INVALID, field.child("annotations"),
            "ExperimentalIgnitionSupport feature gate is not enabled in kubevirt-config, invalid "
            f"entry {field.child('annotations', IGNITION_ANNOTATION)}",
        ))
    if as_str(annotations.get(SIDECAR_ANNOTATION)) and not cfg.gate("Sidecar"):
        errs.append(cause(
            INVALID, field.child("annotations"),
            "sidecar feature gate is not enabled in kubevirt-config, invalid entry "
            f"{field.child('annotations', SIDECAR_ANNOTATION)}",
        ))
    return errs


def mandatory_fields(field: Path, spec: Obj) -> list[FieldError]:
    """``ValidateVirtualMachineInstanceMandatoryFields`` (VMIs only, after defaults): some
    memory must be asked for. Upstream sets no field on this cause."""
    domain = as_dict(spec.get("domain"))
    memory = domain.get("memory")
    requested = as_dict(as_dict(domain.get("resources")).get("requests")).get("memory")
    try:
        zero = requested is None or quantity.parse_value(requested).value() == 0
    except ValueError:
        zero = False
    memory_set = isinstance(memory, dict) and (
        is_set(memory, "guest") or is_set(memory, "hugepages")
    )
    if zero and not memory_set:
        return [cause(
            REQUIRED, "",
            "no memory requested, at least one of "
            f"'{field.child('domain', 'memory', 'guest')}', "
            f"'{field.child('domain', 'memory', 'hugepages', 'size')}' or "
            f"'{field.child('domain', 'resources', 'requests', 'memory')}' must be set",
        )]
    return []


def validate_create(obj: Obj, cfg: AdmissionConfig, internal: bool) -> list[FieldError]:
    """``VMICreateAdmitter.Admit``."""
    spec = as_dict(obj.get("spec"))
    field = Path("spec")
    return [
        *validate_spec(field, spec, cfg),
        *network.validate_creation(field, spec),
        *storage.validate_volume_disks(field, spec),
        *mandatory_fields(field, spec),
        *validate_metadata(Path("metadata"), as_dict(obj.get("metadata")), cfg, internal),
    ]


def validate_update(obj: Obj, old: Obj, internal: bool) -> list[FieldError]:
    """``VMIUpdateAdmitter.Admit``: the spec and reserved labels belong to KubeVirt.

    Callers acting as KubeVirt itself (``internal``) may change both; upstream then re-checks
    hotplugged volumes, which virtshift leaves to its controllers.
    """
    if internal:
        return []
    if obj.get("spec") != old.get("spec"):
        return [cause(NOT_SUPPORTED, "", "update of VMI object is restricted")]
    new_labels = as_dict(as_dict(obj.get("metadata")).get("labels"))
    old_labels = as_dict(as_dict(old.get("metadata")).get("labels"))
    if any(new_labels.get(k) != old_labels.get(k) for k in RESTRICTED_LABELS):
        return [cause(
            NOT_SUPPORTED, "",
            "modification of the following reserved kubevirt.io/ labels on a VMI object is "
            "prohibited",
        )]
    return []
