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
    """A field path rendered like ``k8s.io/apimachinery/pkg/util/validation/field.Path``.

    Paths are built for every checked field but rendered only for the few that end up in a
    cause, so a derived path only records its parent and step and renders on first ``str``.
    """

    __slots__ = ("_arg", "_parent", "_text")

    def __init__(self, *names: str) -> None:
        self._text: str | None = ".".join(names)
        self._parent: Path | None = None
        # The step from the parent: child names, an index, or an already bracketed key.
        self._arg: tuple[str, ...] | int | str = ""

    def child(self, *names: str) -> Path:
        p = Path.__new__(Path)
        p._text = None
        p._parent = self
        p._arg = names
        return p

    def index(self, i: int) -> Path:
        p = Path.__new__(Path)
        p._text = None
        p._parent = self
        p._arg = i if type(i) is int else f"[{i}]"  # rendered lazily when it is an int
        return p

    def key(self, k: str) -> Path:
        p = Path.__new__(Path)
        p._text = None
        p._parent = self
        p._arg = f"[{k}]"
        return p

    def __str__(self) -> str:
        text = self._text
        if text is not None:
            return text
        assert self._parent is not None
        text = str(self._parent)
        arg = self._arg
        if isinstance(arg, tuple):
            for name in arg:
                text = f"{text}.{name}" if text else name
        elif isinstance(arg, str):
            text = f"{text}{arg}"
        else:
            text = f"{text}[{arg}]"
        self._text = text
        return text

    def __repr__(self) -> str:
        return f"Path({str(self)!r})"


def cause(type_: str, field: Path | str, message: str) -> FieldError:
    return FieldError(type=type_, field=str(field), message=message)


def as_dict(value: Any) -> Obj:
    """``value`` if it is a mapping, else an empty dict (a nil struct pointer)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def dicts(value: Any) -> list[Obj]:
    """The list items of ``value``; non-mapping items read as empty mappings.

    A plain list of plain dicts is returned as it is (callers only read the list)."""
    if type(value) is list:
        for v in value:
            if type(v) is not dict:
                break
        else:
            return value
    elif not isinstance(value, list):
        return []
    return [v if isinstance(v, dict) else {} for v in value]


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


