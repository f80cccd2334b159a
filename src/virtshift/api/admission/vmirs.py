"""VirtualMachineInstanceReplicaSet admission.

Upstream: ``admitters/vmirs-admitter.go``: the template (undefaulted) passes the VMI spec rules,
and the selector matches the template's labels.
"""

from __future__ import annotations

from virtshift.api.admission import vmi
from virtshift.api.admission._util import (
    INVALID,
    REQUIRED,
    Obj,
    Path,
    as_dict,
    as_list,
    as_str,
    cause,
    dicts,
)
from virtshift.api.admission.config import AdmissionConfig
from virtshift.errors import FieldError

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def selector_error(selector: Obj) -> str:
    """Why ``selector`` is not a valid label selector (``metav1.LabelSelectorAsSelector``)."""
    for expr in dicts(selector.get("matchExpressions")):
        op = as_str(expr.get("operator"))
        values = as_list(expr.get("values"))
        if op not in _OPERATORS:
            return f'"{op}" is not a valid label selector operator'
        if op in ("In", "NotIn") and not values:
            return "for 'in', 'notin' operators, values set can't be empty"
        if op in ("Exists", "DoesNotExist") and values:
            return "values set must be empty for exists and does not exist"
    return ""


def selector_matches(selector: Obj, labels: Obj) -> bool:
    """Whether a (valid) label selector matches ``labels``."""
    for key, value in as_dict(selector.get("matchLabels")).items():
        if labels.get(key) != value:
            return False
    for expr in dicts(selector.get("matchExpressions")):
        key, op = as_str(expr.get("key")), as_str(expr.get("operator"))
        values = as_list(expr.get("values"))
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def validate(obj: Obj, cfg: AdmissionConfig) -> list[FieldError]:
    """``ValidateVMIRSSpec``."""
    field = Path("spec")
    spec = as_dict(obj.get("spec"))
    template = spec.get("template")
    if not isinstance(template, dict):
        return [cause(REQUIRED, field.child("template"), "missing virtual machine template.")]
    errs = vmi.validate_spec(field.child("template", "spec"), as_dict(template.get("spec")), cfg)
    selector = as_dict(spec.get("selector"))
    error = selector_error(selector)
    labels = as_dict(as_dict(template.get("metadata")).get("labels"))
    if error:
        errs.append(cause(INVALID, field.child("selector"), error))
    # A missing selector selects nothing.
    elif spec.get("selector") is None or not selector_matches(selector, labels):
        errs.append(cause(INVALID, field.child("selector"), "selector does not match labels."))
    return errs
