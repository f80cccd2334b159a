"""The migration create admitter's store-dependent checks, as a pure function."""

from __future__ import annotations

from typing import Any

import pytest

from virtshift.api.admission.migration import create_denial, denied

MIG = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"vmiName": "vmi"}}


def _vmi(phase: str, *conds: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "vmi"}, "status": {"phase": phase, "conditions": list(conds)}}


MIGRATABLE = {"type": "LiveMigratable", "status": "True"}


def _other(vmi: str, phase: str, uid: str = "u1") -> dict[str, Any]:
    return {"metadata": {"name": "o", "uid": uid, "labels": {"kubevirt.io/vmi-name": vmi}},
            "spec": {"vmiName": vmi}, "status": {"phase": phase} if phase else {}}


def test_order_and_messages() -> None:
    assert create_denial(MIG, None, []) == 'the VMI "ns/vmi" does not exist'
    assert create_denial(MIG, _vmi("Failed", MIGRATABLE), []) == (
        "Cannot migrate VMI in finalized state.")
    assert create_denial(MIG, _vmi("Scheduled", MIGRATABLE), []) == (
        'Cannot migrate VMI that is not running (phase "Scheduled").')
    blocked = {"type": "LiveMigratable", "status": "False",
               "reason": "InterfaceNotLiveMigratable", "message": "bridge on pod network"}
    assert create_denial(MIG, _vmi("Running", blocked), []) == (
        "Cannot migrate VMI, Reason: InterfaceNotLiveMigratable, Message: bridge on pod network")
    assert create_denial(MIG, _vmi("Running", MIGRATABLE), []) is None


@pytest.mark.parametrize("phase", ["", "Pending", "Scheduling", "Running", "Unknown"])
def test_unfinished_migration_of_the_same_vmi_conflicts(phase: str) -> None:
    assert create_denial(MIG, _vmi("Running", MIGRATABLE), [_other("vmi", phase, "abc")]) == (
        "in-flight migration detected. Active migration job (abc) is currently already in "
        "progress for VMI vmi.")


def test_finished_or_foreign_migrations_do_not_conflict() -> None:
    others = [_other("vmi", "Succeeded"), _other("vmi", "Failed"), _other("another", "Running")]
    assert create_denial(MIG, _vmi("Running", MIGRATABLE), others) is None


def test_denied_wording() -> None:
    assert denied("x") == (
        'admission webhook "migration-create-validator.kubevirt.io" denied the request: x')
