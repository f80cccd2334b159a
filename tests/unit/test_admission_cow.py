"""The VM admitter's partial copy of a template spec defaults exactly like a deep copy, and
leaves the template as it was (checked on every corpus manifest and its mutations)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_admission_fast import CFG, GATED, documents, variants
from virtshift.api.admission import vm, vmi_defaults
from virtshift.api.admission.vm import defaultable_copy
from virtshift.api.jsonvalue import clone


def _specs(doc: Any) -> list[Any]:
    """The VMI specs of ``doc`` (a VM's template spec, a VMI's spec) and the doc itself."""
    out: list[Any] = [doc]
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if isinstance(spec, dict):
        out.append(spec)
        template = spec.get("template")
        if isinstance(template, dict):
            out.append(template.get("spec"))
    return [s for s in out if isinstance(s, dict)]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_defaultable_copy_defaults_like_a_deep_copy(name: str, doc: dict[str, Any]) -> None:
    for variant in variants(doc, name):
        for spec in _specs(variant):
            before = json.dumps(spec)
            for cfg in (CFG, GATED):
                expected = clone(spec)
                vmi_defaults.default_spec(expected, cfg)
                got = defaultable_copy(spec)
                vmi_defaults.default_spec(got, cfg)
                assert json.dumps(got) == json.dumps(expected)
                assert json.dumps(spec) == before


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_vm_defaulted_copy_is_the_deep_copy_defaulted(name: str, doc: dict[str, Any]) -> None:
    for variant in variants(doc, name):
        for obj in (variant, *(_specs(variant)[1:])):
            before = json.dumps(obj)
            for cfg in (CFG, GATED):
                expected = clone(obj)
                vm.default_vm(expected, cfg)
                got = vm.defaulted_copy(obj, cfg)
                assert json.dumps(got) == json.dumps(expected)
                assert json.dumps(obj) == before
