"""VirtualMachine admission: the VM mutator's defaults and the VM admitter's rules.

Upstream: ``pkg/virt-api/webhooks/mutating-webhook/mutators/vm-mutator.go`` with
``pkg/defaults.SetVirtualMachineDefaults``, and
``pkg/virt-api/webhooks/validating-webhook/admitters/vms-admitter.go`` with
``pkg/storage/admitters/data-volume-template.go``. The admitter validates a copy of the template
with ``SetDefaultVirtualMachineInstanceSpec`` applied; that copy is not stored.

Not done here: applying instance types and preferences (they need the store), clone
authorization of DataVolume templates and the volume-request (hotplug) status checks.
"""

from __future__ import annotations

from virtshift.api.admission import network, vmi, vmi_defaults
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
    ensure_dict,
    is_set,
)
from virtshift.api.admission.cdi import SOURCES as DV_SOURCES
from virtshift.api.admission.cdi import present
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

RUN_STRATEGIES = ("Halted", "Manual", "Always", "RerunOnFailure", "Once")
CLUSTER_INSTANCETYPE = "virtualmachineclusterinstancetype"
CLUSTER_PREFERENCE = "virtualmachineclusterpreference"
INFER_FAILURE_POLICIES = ("Ignore", "Reject")


def default_vm(obj: Obj, cfg: AdmissionConfig) -> None:
    """The VM mutator (create and update)."""
    spec = ensure_dict(obj, "spec")
    # setDefaultInstancetypeKind / setDefaultPreferenceKind: cluster-scoped kinds by default.
    for key, kind in (("instancetype", CLUSTER_INSTANCETYPE), ("preference", CLUSTER_PREFERENCE)):
        matcher = spec.get(key)
        if isinstance(matcher, dict) and not as_str(matcher.get("kind")) and not as_str(
            matcher.get("inferFromVolume")
        ):
            matcher["kind"] = kind
    template = spec.get("template")
    if not isinstance(template, dict):
        return  # left for the validator to reject
    tspec = ensure_dict(template, "spec")
    # setDefaultArchitecture and setVMDefaultMachineType on the template.
    if not as_str(tspec.get("architecture")):
        tspec["architecture"] = cfg.architecture
    machine = ensure_dict(ensure_dict(tspec, "domain"), "machine")
    if not as_str(machine.get("type")):
        machine["type"] = cfg.machine_type


def _own(parent: Obj | None, key: str) -> Obj | None:
    """Replace ``parent[key]`` by a shallow copy when it is a mapping, and return the copy."""
    value = parent.get(key) if parent is not None else None
    if not isinstance(value, dict):
        return None
    copied: Obj = dict(value)
    parent[key] = copied  # type: ignore[index]
    return copied


def defaulted_copy(obj: Obj, cfg: AdmissionConfig) -> Obj:
    """:func:`default_vm` applied to a copy of ``obj``: only the mappings the defaulting
    writes into (the object, its spec, the instancetype and preference matchers, the template,
    its spec, domain and machine) are copied; everything else is shared with ``obj``."""
    out = dict(obj)
    spec = _own(out, "spec")
    _own(spec, "instancetype")
    _own(spec, "preference")
    _own(_own(_own(_own(spec, "template"), "spec"), "domain"), "machine")
    default_vm(out, cfg)
    return out


def _validate_matchers(spec: Obj, old_spec: Obj | None) -> list[FieldError]:
    """``validateInstancetypeMatcher`` / ``validatePreferenceMatcher`` (and the update check)
    of the VM mutator."""
    errs: list[FieldError] = []
    for key, label in (("instancetype", "InstancetypeMatcher"), ("preference",
                                                                 "PreferenceMatcher")):
        matcher = spec.get(key)
        if not isinstance(matcher, dict):
            continue
        at = Path("spec", key)
        name, infer = as_str(matcher.get("name")), as_str(matcher.get("inferFromVolume"))
        if not name and not infer:
            errs.append(cause(
                NOT_FOUND, at, f"Either Name or InferFromVolume should be provided within the "
                f"{label}",
            ))
        if infer:
            if name:
                errs.append(cause(
                    NOT_FOUND, at.child("name"),
                    f"Name should not be provided when InferFromVolume is used within the {label}",
                ))
            if as_str(matcher.get("kind")):
                errs.append(cause(
                    NOT_FOUND, at.child("kind"),
                    f"Kind should not be provided when InferFromVolume is used within the {label}",
                ))
        policy = matcher.get("inferFromVolumeFailurePolicy")
        if policy is not None and policy not in INFER_FAILURE_POLICIES:
            errs.append(cause(
                INVALID, at.child("inferFromVolumeFailurePolicy"),
                f"Invalid value '{policy}' for InferFromVolumeFailurePolicy",
            ))
        old = as_dict(old_spec.get(key)) if old_spec is not None else {}
        old_revision = as_str(old.get("revisionName"))
        if (
            old and old_revision and old != matcher
            and as_str(old.get("name")) != name
            and as_str(matcher.get("revisionName")) == old_revision
        ):
            errs.append(cause(
                INVALID, at.child("revisionName"),
                "the Matcher Name has been updated without updating the RevisionName",
            ))
    return errs


def validate(
    obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
) -> list[FieldError]:
    """``VMsAdmitter.Admit`` (with the VM mutator's matcher checks first)."""
    spec = as_dict(obj.get("spec"))
    old_spec = as_dict(old.get("spec")) if old is not None else None
    errs = _validate_matchers(spec, old_spec)
    if errs:
        return errs
    template = spec.get("template")
    if not isinstance(template, dict):
        return [cause(REQUIRED, Path("spec", "template"), "missing virtual machine template.")]
    # Only the template's spec is defaulted, and only the mappings and lists the defaulting
    # writes into are copied: the rest of the copy shares the original's values (nothing below
    # writes to them).
    checked = dict(spec)
    checked_template = dict(template)
    checked["template"] = checked_template
    original = template.get("spec")
    tspec = defaultable_copy(original) if isinstance(original, dict) else {}
    checked_template["spec"] = tspec
    vmi_defaults.default_spec(tspec, cfg)
    if old is None:
        # Upstream validates creation-only network rules against "spec", not the template.
        errs = network.validate_creation(Path("spec"), tspec)
        if errs:
            return errs
    field = Path("spec")
    errs = [
        *vmi.validate_metadata(
            field.child("template", "metadata"), as_dict(template.get("metadata")), cfg, internal
        ),
        *vmi.validate_spec(field.child("template", "spec"), tspec, cfg),
        *_validate_data_volume_templates(field, checked),
        *_validate_run_strategy(field, checked, cfg),
        *_validate_sockets(field, tspec),
    ]
    if errs:
        return errs
    errs = _validate_dv_namespaces(obj, old)
    if errs:
        return errs
    return _validate_in_progress(obj, old)


def defaultable_copy(spec: Obj) -> Obj:
    """A copy of a VMI spec that :func:`vmi_defaults.default_spec` may change without
    changing ``spec``: the spec and every mapping or list the defaulting writes into (domain,
    its machine, memory, cpu, devices, resources and requests, the volumes and their
    containerDisks) are copied; all else is shared with ``spec``."""
    out = dict(spec)
    domain = _own(out, "domain")
    for key in ("machine", "memory", "cpu", "devices"):
        _own(domain, key)
    _own(_own(domain, "resources"), "requests")
    volumes = out.get("volumes")
    if isinstance(volumes, list):
        copied: list[object] = []
        for volume in volumes:
            if isinstance(volume, dict):
                volume = dict(volume)
                disk = volume.get("containerDisk")
                if isinstance(disk, dict):
                    volume["containerDisk"] = dict(disk)
            copied.append(volume)
        out["volumes"] = copied
    return out


def _validate_run_strategy(field: Path, spec: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """``validateRunStrategy``."""
    errs: list[FieldError] = []
    running, strategy = spec.get("running"), spec.get("runStrategy")
    if running is not None and strategy is not None:
        errs.append(cause(
            INVALID, field.child("running"),
            "Running and RunStrategy are mutually exclusive. Note that Running is deprecated, "
            "please use RunStrategy instead",
        ))
    if running is None and strategy is None:
        errs.append(cause(INVALID, field.child("running"), "RunStrategy must be specified"))
    if strategy is not None:
        at = field.child("runStrategy")
        if strategy == "WaitAsReceiver":
            if not cfg.gate("DecentralizedLiveMigration"):
                errs.append(cause(
                    INVALID, at,
                    f"Invalid RunStrategy ({strategy}), DecentralizedLiveMigration feature gate "
                    "is not enabled in kubevirt resource",
                ))
        elif strategy not in RUN_STRATEGIES:
            errs.append(cause(INVALID, at, f"Invalid RunStrategy ({strategy})"))
    return errs


def _validate_sockets(field: Path, tspec: Obj) -> list[FieldError]:
    """``validateLiveUpdateCPU`` (the LiveUpdate rollout strategy is upstream's default)."""
    cpu = as_dict(as_dict(tspec.get("domain")).get("cpu"))
    sockets, max_sockets = as_int(cpu.get("sockets")) or 0, as_int(cpu.get("maxSockets")) or 0
    if sockets and max_sockets and sockets > max_sockets:
        return [cause(
            INVALID, field.child("template", "spec", "domain", "cpu", "sockets"),
            "Number of sockets in CPU topology is greater than the maximum sockets allowed",
        )]
    return []


def _validate_data_volume_templates(field: Path, spec: Obj) -> list[FieldError]:
    """``ValidateDataVolumeTemplate`` (upstream spells the path ``dataVolumeTemplate``)."""
    templates = dicts(spec.get("dataVolumeTemplates"))
    if not templates:
        return []
    errs: list[FieldError] = []
    volumes = dicts(as_dict(as_dict(spec.get("template")).get("spec")).get("volumes"))
    for idx, template in enumerate(templates):
        at = field.child("dataVolumeTemplate").index(idx)
        problem = _validate_data_volume(at, template)
        if problem:
            errs.extend(problem)
            continue
        name = as_str(as_dict(template.get("metadata")).get("name"))
        referenced = any(
            (is_set(v, "persistentVolumeClaim")
             and as_str(as_dict(v.get("persistentVolumeClaim")).get("claimName")) == name)
            or (is_set(v, "dataVolume")
                and as_str(as_dict(v.get("dataVolume")).get("name")) == name)
            for v in volumes
        )
        if not referenced:
            errs.append(cause(
                REQUIRED, at,
                f"DataVolumeTemplate entry {at} must be referenced in the VMI template's "
                "'volumes' list",
            ))
    return errs


def _validate_data_volume(at: Path, template: Obj) -> list[FieldError]:
    """``validateDataVolume`` of a DataVolume template."""
    if not as_str(as_dict(template.get("metadata")).get("name")):
        return [cause(
            REQUIRED, at.child("name"),
            f"'name' field must not be empty for DataVolumeTemplate entry {at.child('name')}.",
        )]
    spec = as_dict(template.get("spec"))
    has_pvc, has_storage = present(spec, "pvc"), present(spec, "storage")
    if not has_pvc and not has_storage:
        return [cause(INVALID, at.child("PVC", "Storage"), "Missing Data volume PVC or Storage")]
    if has_pvc and has_storage:
        return [cause(
            INVALID, at.child("PVC", "Storage"),
            "Duplicate storage definition, both target storage and target pvc defined",
        )]
    target = as_dict(spec.get("pvc" if has_pvc else "storage"))
    external = is_set(target, "dataSource") or is_set(target, "dataSourceRef")
    sourced = is_set(spec, "source") or is_set(spec, "sourceRef")
    if external and sourced:
        return [cause(
            INVALID, at.child("source"),
            "External population is incompatible with Source and SourceRef",
        )]
    if not external and not sourced:
        return [cause(
            INVALID, at.child("source", "sourceRef"),
            "Data volume should have either Source, SourceRef, or be externally populated",
        )]
    if is_set(spec, "source"):
        source = as_dict(spec.get("source"))
        count = sum(1 for s in DV_SOURCES if is_set(source, s))
        if count == 0:
            return [cause(INVALID, at.child("source"), "Missing dataVolume valid source")]
        if count > 1:
            return [cause(INVALID, at.child("source"), "Multiple dataVolume sources")]
    return []


def _validate_dv_namespaces(obj: Obj, old: Obj | None) -> list[FieldError]:
    """``validateVirtualMachineDataVolumeTemplateNamespace``."""
    templates = dicts(as_dict(obj.get("spec")).get("dataVolumeTemplates"))
    if not templates:
        return []
    if old is not None and as_dict(old.get("spec")).get("dataVolumeTemplates") == as_dict(
        obj.get("spec")
    ).get("dataVolumeTemplates"):
        return []
    namespace = as_str(as_dict(obj.get("metadata")).get("namespace"))
    errs: list[FieldError] = []
    for idx, template in enumerate(templates):
        dv_namespace = as_str(as_dict(template.get("metadata")).get("namespace"))
        if dv_namespace and dv_namespace != namespace:
            errs.append(cause(
                INVALID, Path("spec", "dataVolumeTemplates").index(idx),
                f"Embedded DataVolume namespace {dv_namespace} differs from VM namespace "
                f"{namespace}",
            ))
    return errs


def _validate_in_progress(obj: Obj, old: Obj | None) -> list[FieldError]:
    """``validateSnapshotStatus`` / ``validateRestoreStatus``: no spec changes while a snapshot
    is taken, and no starting while a restore runs."""
    if old is None or obj.get("spec") == old.get("spec"):
        return []
    status = as_dict(obj.get("status"))
    snapshot = status.get("snapshotInProgress")
    if snapshot is not None:
        return [cause(
            NOT_SUPPORTED, "spec", f'Cannot update VM spec until snapshot "{snapshot}" completes'
        )]
    restore = status.get("restoreInProgress")
    if restore is not None and run_strategy(as_dict(obj.get("spec"))) != "Halted":
        return [cause(
            NOT_SUPPORTED, "spec", f'Cannot start VM until restore "{restore}" completes'
        )]
    return []


def run_strategy(spec: Obj) -> str:
    """``VirtualMachine.RunStrategy``: ``running`` maps to Always/Halted; Halted by default."""
    running = spec.get("running")
    if running is not None:
        return "Always" if running is True else "Halted"
    strategy = spec.get("runStrategy")
    return strategy if isinstance(strategy, str) and strategy else "Halted"
