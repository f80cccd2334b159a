"""VirtualMachineInstanceMigration admission.

Upstream: ``mutators/migration-create-mutator.go`` (selector label and finalizer),
``admitters/migration-create-admitter.go`` and ``admitters/migration-update-admitter.go``.

The create admitter's checks against the target VMI (exists, not final, migratable, no other
migration in flight) read other objects: :func:`create_denial` decides them from what the API
server read from the store, and :func:`denied` words the refusal as kube-apiserver words a
webhook's (``400``, no reason). They apply to every caller, KubeVirt's own components included,
as upstream's webhook does.
"""

from __future__ import annotations

from collections.abc import Iterable

# A module import: virtshift.api.migration itself imports this package (quantity).
from virtshift.api import migration as live
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
CREATE_VALIDATOR = "migration-create-validator.kubevirt.io"


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


def denied(message: str, webhook: str = CREATE_VALIDATOR) -> str:
    """kube-apiserver's wording of a validating webhook's refusal (``ToStatusErr``)."""
    return f'admission webhook "{webhook}" denied the request: {message}'


def create_denial(migration: Obj, vmi: Obj | None, migrations: Iterable[Obj]) -> str | None:
    """``MigrationCreateAdmitter.Admit`` past its spec check: why creating ``migration`` is
    refused, or None to admit it.

    ``vmi`` is the VMI named by ``spec.vmiName`` in the migration's namespace (None when there is
    none) and ``migrations`` the namespace's stored migrations. Upstream's messages, in
    upstream's order; one check is virtshift's: the VMI must be ``Running`` (upstream admits a
    migration of a VMI that has not started yet and leaves it pending until it runs).
    """
    namespace = as_str(as_dict(migration.get("metadata")).get("namespace"))
    vmi_name = as_str(as_dict(migration.get("spec")).get("vmiName"))
    if vmi is None:
        return f'the VMI "{namespace}/{vmi_name}" does not exist'
    phase = as_str(as_dict(vmi.get("status")).get("phase"))
    if phase in FINAL_PHASES:
        return "Cannot migrate VMI in finalized state."
    if phase != "Running":
        return f'Cannot migrate VMI that is not running (phase "{phase}").'
    migratable, why = live.is_live_migratable(vmi)
    if not migratable:
        reason, _, message = why.partition(": ")
        return f"Cannot migrate VMI, Reason: {reason}, Message: {message}"
    # EnsureNoMigrationConflict: any migration of the VMI (by selector label) that is not final.
    for other in migrations:
        labels = as_dict(as_dict(other.get("metadata")).get("labels"))
        if labels.get(SELECTOR_LABEL) != vmi_name:
            continue
        if as_str(as_dict(other.get("status")).get("phase")) in live.FINAL_PHASES:
            continue
        uid = as_str(as_dict(other.get("metadata")).get("uid"))
        other_vmi = as_str(as_dict(other.get("spec")).get("vmiName"))
        return (f"in-flight migration detected. Active migration job ({uid}) is currently "
                f"already in progress for VMI {other_vmi}.")
    return None
