"""PersistentVolumeClaim update validation (kube-apiserver's rules for claims): after creation
the spec is immutable except ``resources.requests`` of a bound claim (expansion, never below
``status.capacity``), and the fields a binder fills in once (``volumeName``,
``storageClassName``)."""

from __future__ import annotations

from typing import Any

from virtshift.api.admission import quantity
from virtshift.api.admission._util import FORBIDDEN, Obj
from virtshift.errors import FieldError

_ONCE = ("volumeName", "storageClassName")  # may go from unset to set


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _bytes(value: Any) -> int | None:
    try:
        return quantity.parse_value(value).value()
    except (ValueError, TypeError):
        return None


def validate_update(new: Obj, old: Obj) -> list[FieldError]:
    ns, os_ = _dict(new.get("spec")), _dict(old.get("spec"))
    bound = _dict(old.get("status")).get("phase") == "Bound"
    errors: list[FieldError] = []
    rest_new = {k: v for k, v in ns.items() if k != "resources"}
    rest_old = {k: v for k, v in os_.items() if k != "resources"}
    for key in _ONCE:
        if not rest_old.get(key) and key in rest_new:
            rest_old[key] = rest_new[key]
    requests_changed = (_dict(_dict(ns.get("resources")).get("requests"))
                        != _dict(_dict(os_.get("resources")).get("requests")))
    if rest_new != rest_old or (requests_changed and not bound):
        errors.append(FieldError(FORBIDDEN, "spec", "spec is immutable after creation except "
                                 "resources.requests and volumeAttributesClassName for bound "
                                 "claims"))
        return errors
    asked = _bytes(_dict(_dict(ns.get("resources")).get("requests")).get("storage"))
    has = _bytes(_dict(_dict(old.get("status")).get("capacity")).get("storage"))
    if requests_changed and asked is not None and has is not None and asked < has:
        errors.append(FieldError(FORBIDDEN, "spec.resources.requests.storage",
                                 "field can not be less than status.capacity"))
    return errors
