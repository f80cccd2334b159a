"""VirtualMachineInstanceMigration admission.

Upstream: ``mutators/migration-create-mutator.go`` (selector label and finalizer),
``admitters/migration-create-admitter.go`` and ``admitters/migration-update-admitter.go``. The
create admitter's checks against the target VMI (exists, not final, migratable, no other
migration in flight) need the store and are left to the caller.
"""

from __future__ import annotations

from virtshift.api.admission._util import (
    NOT_SUPPORTED,
    REQUIRED,
    Obj,
    Path,
    as_dict,
    as_list,
    as_str,
    cause,
    ensure_dict,
)
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

SELECTOR_LABEL = "kubevirt.io/vmi-name"  # v1.MigrationSelectorLabel
FINALIZER = "kubevirt.io/migrationJobFinalize"  # v1.VirtualMachineInstanceMigrationFinalizer
FINAL_PHASES = ("Succeeded", "Failed")


def default_migration(obj: Obj, cfg: AdmissionConfig) -> None:
    """``addMigrationSelectorLabel`` (and, if configured, ``addMigrationFinalizer``)."""
    meta = ensure_dict(obj, "metadata")
    vmi_name = as_str(as_dict(obj.get("spec")).get("vmiName"))
    ensure_dict(meta, "labels")[SELECTOR_LABEL] = vmi_name
    if cfg.add_finalizers:
        finalizers = [f for f in as_list(meta.get("finalizers")) if isinstance(f, str)]
        meta["finalizers"] = [*finalizers, FINALIZER]


def validate(obj: Obj, old: Obj | None) -> list[FieldError]:
    spec = as_dict(obj.get("spec"))
    if old is None:
        # ValidateVirtualMachineInstanceMigrationSpec
        if not as_str(spec.get("vmiName")):
            return [cause(REQUIRED, Path("spec", "vmiName"), "vmiName is missing")]
        return []
    if spec != as_dict(old.get("spec")):
        return [cause(NOT_SUPPORTED, "", "update of Migration object's spec is restricted")]
    return _selector_label_safe(obj, old)


def _selector_label_safe(obj: Obj, old: Obj) -> list[FieldError]:
    """``ensureSelectorLabelSafe``: an in-flight migration keeps its selector label."""
    phase = as_str(as_dict(obj.get("status")).get("phase"))
    old_labels = as_dict(old.get("metadata")).get("labels")
    if phase in FINAL_PHASES or not isinstance(old_labels, dict):
        return []
    if SELECTOR_LABEL not in old_labels:
        return []
    new_labels = as_dict(obj.get("metadata")).get("labels")
    if not isinstance(new_labels, dict):
        return [cause(
            NOT_SUPPORTED, "", "selector label can't be removed from an in-flight migration"
        )]
    if new_labels.get(SELECTOR_LABEL) != old_labels[SELECTOR_LABEL]:
        return [cause(
            NOT_SUPPORTED, "", "selector label can't be modified on an in-flight migration"
        )]
    return []
