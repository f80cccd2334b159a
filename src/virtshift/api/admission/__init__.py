"""Admission: KubeVirt's and CDI's mutating and validating webhooks, as plain functions.

:func:`default` is the mutating step (a defaulted deep copy) and :func:`validate` the semantic
validating step, both dispatched by (group, kind). Kinds without rules pass through unchanged and
without errors. Schema (OpenAPI) validation is a separate step and not repeated here.

``old`` is the stored object on update and ``None`` on create. ``internal`` marks a request made
by virtshift's own controllers, which upstream recognises by KubeVirt's service accounts: they may
change a VMI's spec and reserved labels.
"""

from __future__ import annotations

from collections.abc import Callable

from virtshift.api.admission import cdi, migration, pvc, vm, vmi, vmi_defaults, vmirs
from virtshift.api.admission._util import Obj
from virtshift.api.admission.config import DEFAULT_CONFIG, AdmissionConfig
from virtshift.api.jsonvalue import clone
from virtshift.api.kinds import KindInfo
from virtshift.errors import FieldError

__all__ = ["DEFAULT_CONFIG", "AdmissionConfig", "default", "validate"]

KUBEVIRT = "kubevirt.io"
CDI = "cdi.kubevirt.io"

_Defaulter = Callable[[Obj, bool, AdmissionConfig], None]
_Validator = Callable[[Obj, Obj | None, AdmissionConfig, bool], list[FieldError]]


def _default_vmi(obj: Obj, update: bool, cfg: AdmissionConfig) -> None:
    if not update:  # the VMI mutator patches only on create
        vmi_defaults.default_vmi(obj, cfg)


def _default_migration(obj: Obj, update: bool, cfg: AdmissionConfig) -> None:
    if not update:
        migration.default_migration(obj, cfg)


def _validate_vmi(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                  ) -> list[FieldError]:
    if old is None:
        return vmi.validate_create(obj, cfg, internal)
    return vmi.validate_update(obj, old, internal)


def _validate_vm(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                 ) -> list[FieldError]:
    return vm.validate(obj, old, cfg, internal)


def _validate_migration(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                        ) -> list[FieldError]:
    return migration.validate(obj, old)


def _validate_vmirs(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                    ) -> list[FieldError]:
    return vmirs.validate(obj, cfg)


def _validate_dv(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                 ) -> list[FieldError]:
    return cdi.validate(obj, old)


def _validate_pvc(obj: Obj, old: Obj | None, cfg: AdmissionConfig, internal: bool
                  ) -> list[FieldError]:
    return pvc.validate_update(obj, old) if old is not None else []


def _default_dv(obj: Obj, update: bool, cfg: AdmissionConfig) -> None:
    cdi.default_datavolume(obj)


_DEFAULTERS: dict[tuple[str, str], _Defaulter] = {
    (CDI, "DataVolume"): _default_dv,
    (KUBEVIRT, "VirtualMachineInstance"): _default_vmi,
    (KUBEVIRT, "VirtualMachineInstanceMigration"): _default_migration,
}

_VALIDATORS: dict[tuple[str, str], _Validator] = {
    (KUBEVIRT, "VirtualMachineInstance"): _validate_vmi,
    (KUBEVIRT, "VirtualMachine"): _validate_vm,
    (KUBEVIRT, "VirtualMachineInstanceMigration"): _validate_migration,
    (KUBEVIRT, "VirtualMachineInstanceReplicaSet"): _validate_vmirs,
    (CDI, "DataVolume"): _validate_dv,
    ("", "PersistentVolumeClaim"): _validate_pvc,
}


def default(
    kind: KindInfo,
    obj: Obj,
    *,
    old: Obj | None = None,
    config: AdmissionConfig = DEFAULT_CONFIG,
) -> Obj:
    """A deep copy of ``obj`` with the mutating webhook's defaults applied (``obj`` itself when
    the kind has no defaults). For VirtualMachines, only the parts the defaults change are
    copied: the result shares the rest with ``obj``, so neither may be changed in place.

    Pass ``old`` on update: the VMI and migration mutators only act on create.
    """
    if kind.group == KUBEVIRT and kind.kind == "VirtualMachine":
        # Copies only what the VM mutator changes; the rest is shared with ``obj``.
        return vm.defaulted_copy(obj, config)
    defaulter = _DEFAULTERS.get((kind.group, kind.kind))
    if defaulter is None:
        return obj  # nothing to default: no copy needed
    out: Obj = clone(obj)
    defaulter(out, old is not None, config)
    return out


def validate(
    kind: KindInfo,
    obj: Obj,
    old: Obj | None,
    *,
    config: AdmissionConfig = DEFAULT_CONFIG,
    internal: bool = False,
) -> list[FieldError]:
    """The validating webhook's causes for ``obj`` (empty when it is admitted)."""
    validator = _VALIDATORS.get((kind.group, kind.kind))
    if validator is None:
        return []
    return validator(obj, old, config, internal)
