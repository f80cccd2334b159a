"""Small helpers shared by the admission modules: field paths, causes and safe access.

Objects arrive as decoded JSON (``dict``/``list``/scalars). Admission runs after (or without)
schema validation, so every accessor tolerates a wrong type by treating it as absent, the way a
nil pointer reads in KubeVirt's Go types.
"""

from __future__ import annotations

from typing import Any

from virtshift.errors import FieldError

Obj = dict[str, Any]

# Kubernetes StatusCause types (k8s.io/apimachinery metav1.CauseType*).
INVALID = "FieldValueInvalid"
REQUIRED = "FieldValueRequired"
NOT_SUPPORTED = "FieldValueNotSupported"
DUPLICATE = "FieldValueDuplicate"
FORBIDDEN = "FieldValueForbidden"
NOT_FOUND = "FieldValueNotFound"


class Path:
    """A field path rendered like ``k8s.io/apimachinery/pkg/util/validation/field.Path``."""

    __slots__ = ("_text",)

    def __init__(self, *names: str) -> None:
        self._text = ".".join(names)

    @classmethod
    def _raw(cls, text: str) -> Path:
        p = cls()
        p._text = text
        return p

    def child(self, *names: str) -> Path:
        text = self._text
        for name in names:
            text = f"{text}.{name}" if text else name
        return Path._raw(text)

    def index(self, i: int) -> Path:
        return Path._raw(f"{self._text}[{i}]")

    def key(self, k: str) -> Path:
        return Path._raw(f"{self._text}[{k}]")

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Path({self._text!r})"


def cause(type_: str, field: Path | str, message: str) -> FieldError:
    return FieldError(type=type_, field=str(field), message=message)


def as_dict(value: Any) -> Obj:
    """``value`` if it is a mapping, else an empty dict (a nil struct pointer)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def dicts(value: Any) -> list[Obj]:
    """The list items of ``value``; non-mapping items read as empty mappings."""
    return [as_dict(v) for v in as_list(value)]


def is_set(mapping: Obj, key: str) -> bool:
    """Whether a pointer-typed field is non-nil: present and not JSON null."""
    return mapping.get(key) is not None


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return None


def ensure_dict(mapping: Obj, key: str) -> Obj:
    """``mapping[key]`` as a dict, creating (or replacing a non-dict) if needed."""
    value = mapping.get(key)
    if not isinstance(value, dict):
        value = {}
        mapping[key] = value
    return value
