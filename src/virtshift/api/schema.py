"""OpenAPI schemas of the served kinds, and validation against them.

Three sources of Swagger 2.0 ``definitions`` are used: ``core`` (our own, shipped in
``api/schemas/core.json``) and ``kubevirt`` / ``cdi`` (the upstream documents, read at run time
from a directory: ``$VIRTSHIFT_OPENAPI_DIR``, else ``shared/reference/openapi`` next to the
repository). A kind names its definition with ``KindInfo.schema = (source, name)``.

Validation follows what Kubernetes does for custom resources with structural schemas: values
are type checked, required fields and enums enforced, ``null`` dropped from non-nullable fields,
and fields the schema does not know are pruned; ``fieldValidation`` decides whether a pruned
field is an error (Strict), a warning (Warn) or nothing (Ignore). Every problem is collected
into one :class:`~virtshift.errors.Invalid`.

The apimachinery types (ObjectMeta, Time, Quantity, ...) of every source resolve to the core
definitions, so metadata is checked and published the same way for every kind.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final

from virtshift.api.jsonvalue import clone, clone_py
from virtshift.api.kinds import (
    CDI_SCHEMA_SOURCE,
    CORE_SCHEMA_SOURCE,
    KUBEVIRT_SCHEMA_SOURCE,
    KindInfo,
)
from virtshift.errors import BadRequest, FieldError, Invalid, VirtshiftError

Obj = dict[str, Any]
DefKey = tuple[str, str]
"""(source, definition name) of one definition."""

OPENAPI_DIR_ENV: Final = "VIRTSHIFT_OPENAPI_DIR"
SOURCE_FILES: Final[Mapping[str, str]] = {
    KUBEVIRT_SCHEMA_SOURCE: "kubevirt-swagger.json",
    CDI_SCHEMA_SOURCE: "cdi-swagger.json",
}
# Located through the package, not __file__: a compiled build of this module lives elsewhere.
CORE_SCHEMA_FILE: Final = Path(str(resources.files("virtshift.api"))) / "schemas" / "core.json"
FIELD_VALIDATION_DIRECTIVES: Final = ("Ignore", "Warn", "Strict")

# Names the definitions of each source get in published documents; sources do not share a
# namespace (kubevirt's and CDI's "v1.Condition" differ), so the non-core ones are prefixed.
PUBLIC_PREFIX: Final[Mapping[str, str]] = {
    CORE_SCHEMA_SOURCE: "",
    KUBEVIRT_SCHEMA_SOURCE: "io.kubevirt.",
    CDI_SCHEMA_SOURCE: "io.kubevirt.cdi.",
}

_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
QUANTITY: Final = "io.k8s.apimachinery.pkg.api.resource.Quantity"
OBJECT_META: Final = _META + "ObjectMeta"
LIST_META: Final = _META + "ListMeta"

# Apimachinery definitions of the upstream sources that are replaced by the core ones.
# kubevirt spells them "k8s.io.apimachinery.pkg...", CDI "v1.ObjectMeta", "resource.Quantity".
_ALIASED_META = (
    "ObjectMeta", "OwnerReference", "ManagedFieldsEntry", "FieldsV1", "Time", "MicroTime",
    "Duration", "LabelSelector", "LabelSelectorRequirement", "ListMeta", "Patch",
)
_CDI_ALIASES: Final[Mapping[str, str]] = {
    **{f"v1.{n}": _META + n for n in _ALIASED_META},
    "resource.Quantity": QUANTITY,
    "runtime.RawExtension": "io.k8s.apimachinery.pkg.runtime.RawExtension",
    "intstr.IntOrString": "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
}
_KUBEVIRT_APIMACHINERY = "k8s.io.apimachinery."


class SchemaError(VirtshiftError):
    """The schema documents cannot be found or do not make sense."""


def find_openapi_dir() -> Path:
    """Where the upstream swagger documents live (see the module doc)."""
    env = os.environ.get(OPENAPI_DIR_ENV)
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    else:
        package = Path(str(resources.files("virtshift"))).resolve()  # src/virtshift
        candidates.append(package.parent.parent.parent / "shared" / "reference" / "openapi")
    for c in candidates:
        if all((c / f).is_file() for f in SOURCE_FILES.values()):
            return c
    wanted = " and ".join(SOURCE_FILES.values())
    looked = ", ".join(str(c) for c in candidates)
    raise SchemaError(
        f"OpenAPI documents not found: set {OPENAPI_DIR_ENV} to a directory holding {wanted} "
        f"(looked in {looked})"
    )


def _read_definitions(path: Path) -> dict[str, Obj]:
    try:
        with path.open(encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SchemaError(f"cannot read OpenAPI document {path}: {e}") from e
    definitions = doc.get("definitions") if isinstance(doc, dict) else None
    if not isinstance(definitions, dict):
        raise SchemaError(f"{path} has no definitions")
    return definitions


# ------------------------------------------------------------------------------------------------
# Compiled schema nodes
# ------------------------------------------------------------------------------------------------

_ANY, _OBJECT, _ARRAY, _SCALAR = range(4)

_TYPE_NAMES: Final[Mapping[type, str]] = {
    dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
    float: "number", type(None): "null",
}
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


class _Node:
    """One compiled schema. Nodes of named definitions are shared (and may be cyclic)."""

    __slots__ = (
        "additional", "enum", "fmt", "int_max", "int_min", "items", "kind", "nullable", "pattern",
        "pattern_text", "plain", "preserve", "props", "required", "types",
    )

    def __init__(self) -> None:
        self.kind = _ANY
        self.nullable = False
        self.types: frozenset[str] = frozenset()
        self.fmt = ""
        self.enum: tuple[Any, ...] = ()
        self.pattern: re.Pattern[str] | None = None
        self.pattern_text = ""
        self.props: dict[str, _Node] = {}
        self.required: tuple[str, ...] = ()
        self.additional: _Node | None = None
        self.items: _Node | None = None
        self.preserve = False
        # The Python types of values this node accepts as they are, without a check or a copy
        # (see _plain_types); set by _finish once the node's graph is compiled.
        self.plain: frozenset[type] = frozenset()
        # The ints this node accepts as they are (an empty range when it checks them).
        self.int_min = 1
        self.int_max = 0

    def copy_from(self, other: _Node) -> None:
        """Take ``other``'s schema (not what _finish derives from it: plain, int_min/max)."""
        self.kind = other.kind
        self.nullable = other.nullable
        self.types = other.types
        self.fmt = other.fmt
        self.enum = other.enum
        self.pattern = other.pattern
        self.pattern_text = other.pattern_text
        self.props = other.props
        self.required = other.required
        self.additional = other.additional
        self.items = other.items
        self.preserve = other.preserve


def _plain_types(node: _Node) -> frozenset[type]:
    """The types of non-null values :func:`_check` returns unchanged and without errors."""
    if node.kind == _ANY:
        return frozenset({str, int, float, bool})  # scalars: clone() returns them as they are
    if node.kind != _SCALAR:
        return frozenset()
    types = node.types
    plain: set[type] = set()
    if not node.enum:
        if "string" in types and node.fmt not in ("date-time", "byte") and node.pattern is None:
            plain.add(str)
        if "boolean" in types:
            plain.add(bool)
        if "number" in types:
            plain.add(float)
    return frozenset(plain)


def _plain_ints(node: _Node) -> tuple[int, int]:
    """The range of ints :func:`_check` returns unchanged and without errors (any int of an
    ``_ANY`` node is in its ``plain`` types already)."""
    if node.kind != _SCALAR or node.enum or not node.types & {"integer", "number"}:
        return 1, 0
    return _INT32 if node.fmt == "int32" else _INT64


def _finish(root: _Node) -> None:
    """Set the shortcuts (``plain``, ``int_min``, ``int_max``) of every node reachable from
    ``root``, once all of them are compiled: nodes are not changed after that."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        node.plain = _plain_types(node)
        node.int_min, node.int_max = _plain_ints(node)
        stack.extend(node.props.values())
        if node.additional is not None:
            stack.append(node.additional)
        if node.items is not None:
            stack.append(node.items)




class _Ctx:
    __slots__ = ("errors", "mode", "warnings")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.errors: list[FieldError] = []
        self.warnings: list[str] = []

    def unknown(self, path: str) -> None:
        if self.mode == "Strict":
            self.errors.append(FieldError("FieldValueUnknown", path, ""))
        elif self.mode == "Warn":
            self.warnings.append(f'unknown field "{path}"')

    def type_error(self, path: str, value: Any, expected: str) -> None:
        got = _TYPE_NAMES.get(type(value), type(value).__name__)
        self.errors.append(FieldError(
            "FieldValueTypeInvalid", path,
            f'"{got}": {path} in body must be of type {expected}: "{got}"',
        ))




def _expected(node: _Node) -> str:
    order = ("object", "array", "integer", "number", "boolean", "string")
    if node.kind == _OBJECT:
        return "object"
    if node.kind == _ARRAY:
        return "array"
    return ",".join(t for t in order if t in node.types)


def _quote(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _check(node: _Node, value: Any, path: str, ctx: _Ctx) -> Any:
    """Validate ``value`` against ``node``; return its pruned copy, errors go to ``ctx``."""
    kind = node.kind
    if kind == _OBJECT:
        if not isinstance(value, dict):
            ctx.type_error(path, value, "object")
            return clone_py(value)
        out: Obj = {}
        props = node.props
        additional = node.additional
        prefix = f"{path}." if path else ""
        for key, sub_value in value.items():
            sub = props.get(key)
            if sub is None:
                if additional is not None:
                    sub = additional
                elif node.preserve:
                    out[key] = clone_py(sub_value)
                    continue
                else:
                    ctx.unknown(prefix + key)
                    continue
            if sub_value is None:
                if sub.nullable or sub.kind == _ANY:
                    out[key] = None
                continue  # null in a non-nullable field is pruned, as for structural schemas
            t = type(sub_value)
            if t in sub.plain or (t is int and sub.int_min <= sub_value <= sub.int_max):
                out[key] = sub_value
                continue
            out[key] = _check(sub, sub_value, prefix + key, ctx)
        for name in node.required:
            if name not in out:
                ctx.errors.append(FieldError("FieldValueRequired", prefix + name, ""))
        return out
    if kind == _ARRAY:
        if not isinstance(value, list):
            ctx.type_error(path, value, "array")
            return clone_py(value)
        items = node.items
        if items is None:
            return clone_py(value)
        plain = items.plain
        result: list[Any] = []
        item: Any  # (declared: mypyc would infer None from the null check below)
        for i, item in enumerate(value):
            if type(item) in plain:
                result.append(item)
                continue
            item_path = f"{path}[{i}]"
            if item is None and not (items.nullable or items.kind == _ANY):
                ctx.type_error(item_path, item, _expected(items))
                result.append(None)
                continue
            result.append(_check(items, item, item_path, ctx))
        return result
    if kind == _SCALAR:
        return _check_scalar(node, value, path, ctx)
    return clone_py(value)


def _check_scalar(node: _Node, value: Any, path: str, ctx: _Ctx) -> Any:
    types = node.types
    t = type(value)
    if t is str:
        if "string" not in types:
            ctx.type_error(path, value, _expected(node))
            return value
        fmt = node.fmt
        if fmt == "date-time":
            if not _DATE_TIME.match(value):
                _format_error(path, value, fmt, ctx)
                return value
        elif fmt == "byte":
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                _format_error(path, value, fmt, ctx)
                return value
        if node.pattern is not None and not node.pattern.match(value):
            ctx.errors.append(FieldError(
                "FieldValueInvalid", path,
                f"{_quote(value)}: {path} in body should match '{node.pattern_text}'",
            ))
            return value
    elif t is bool:
        if "boolean" not in types:
            ctx.type_error(path, value, _expected(node))
            return value
    elif t is int:
        if "integer" not in types and "number" not in types:
            ctx.type_error(path, value, _expected(node))
            return value
        if not _in_range(node.fmt, value, path, ctx):
            return value
    elif t is float:
        if "number" not in types:
            if "integer" in types and value.is_integer():
                value = int(value)
                if not _in_range(node.fmt, value, path, ctx):
                    return value
            else:
                ctx.type_error(path, value, _expected(node))
                return value
    else:
        ctx.type_error(path, value, _expected(node))
        return clone_py(value)
    if node.enum and value not in node.enum:
        supported = ", ".join(_quote(e) for e in node.enum)
        ctx.errors.append(FieldError(
            "FieldValueNotSupported", path, f"{_quote(value)}: supported values: {supported}",
        ))
    return value


def _format_error(path: str, value: Any, fmt: str, ctx: _Ctx) -> None:
    ctx.errors.append(FieldError(
        "FieldValueTypeInvalid", path,
        f"{_quote(value)}: {path} in body must be of type {fmt}: {_quote(value)}",
    ))


def _in_range(fmt: str, value: int, path: str, ctx: _Ctx) -> bool:
    bounds = _INT32 if fmt == "int32" else _INT64
    if value < bounds[0]:
        ctx.errors.append(FieldError(
            "FieldValueInvalid", path,
            f"{value}: {path} in body should be greater than or equal to {bounds[0]}",
        ))
        return False
    if value > bounds[1]:
        ctx.errors.append(FieldError(
            "FieldValueInvalid", path,
            f"{value}: {path} in body should be less than or equal to {bounds[1]}",
        ))
        return False
    return True


# ------------------------------------------------------------------------------------------------
# The schema set
# ------------------------------------------------------------------------------------------------


class SchemaSet:
    """The definitions of every source, with validators compiled on first use."""

    def __init__(self, sources: Mapping[str, Mapping[str, Obj]]) -> None:
        if CORE_SCHEMA_SOURCE not in sources:
            raise SchemaError("the core schema source is missing")
        self._defs: dict[str, Mapping[str, Obj]] = dict(sources)
        self._nodes: dict[DefKey, _Node] = {}
        self._roots: dict[DefKey, _Node] = {}
        self._kind_roots: dict[Any, _Node] = {}  # KindInfo.schema -> _root_node(canonical)
        self._published: dict[tuple[DefKey, str], tuple[Obj, tuple[DefKey, ...]]] = {}

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, openapi_dir: Path | None = None) -> SchemaSet:
        """Read core.json and the upstream documents from ``openapi_dir``.

        Without ``openapi_dir`` the directory is found by :func:`find_openapi_dir`.
        """
        directory = openapi_dir if openapi_dir is not None else find_openapi_dir()
        sources: dict[str, Mapping[str, Obj]] = {
            CORE_SCHEMA_SOURCE: _read_definitions(CORE_SCHEMA_FILE),
        }
        for source, filename in SOURCE_FILES.items():
            path = directory / filename
            if not path.is_file():
                raise SchemaError(
                    f"OpenAPI document {path} not found (set {OPENAPI_DIR_ENV} to the "
                    f"directory holding {filename})"
                )
            sources[source] = _read_definitions(path)
        return cls(sources)

    # ---- names ----------------------------------------------------------------------------

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self._defs)

    def canonical(self, source: str, name: str) -> DefKey:
        """The definition actually used for ``name`` of ``source`` (meta types go to core)."""
        core = self._defs[CORE_SCHEMA_SOURCE]
        if source == KUBEVIRT_SCHEMA_SOURCE and name.startswith(_KUBEVIRT_APIMACHINERY):
            alias = "io." + name.replace("k8s.io.", "k8s.", 1)
            if alias in core:
                return CORE_SCHEMA_SOURCE, alias
        elif source == CDI_SCHEMA_SOURCE:
            alias = _CDI_ALIASES.get(name, "")
            if alias in core:
                return CORE_SCHEMA_SOURCE, alias
        return source, name

    def has(self, source: str, name: str) -> bool:
        src, canonical = self.canonical(source, name) if source in self._defs else (source, name)
        return canonical in self._defs.get(src, {})

    def definition(self, source: str, name: str) -> Obj:
        """The raw definition (after aliasing); refs are local to its source."""
        src, canonical = self.canonical(source, name)
        try:
            return self._defs[src][canonical]
        except KeyError:
            raise SchemaError(f"no definition {name!r} in the {source} schemas") from None

    def public_name(self, source: str, name: str) -> str:
        """The name ``name`` of ``source`` has in published OpenAPI documents."""
        src, canonical = self.canonical(source, name)
        return PUBLIC_PREFIX.get(src, f"{src}.") + canonical

    def kind_definition(self, kind: KindInfo) -> DefKey | None:
        """The canonical definition of a kind, or None for a kind without schema."""
        if kind.schema is None:
            return None
        source, name = kind.schema
        key = self.canonical(source, name)
        self.definition(*key)  # fail early on a typo in the registry
        return key

    # ---- publishing -----------------------------------------------------------------------

    def published(self, key: DefKey, ref_prefix: str = "#/definitions/") -> Obj:
        """One definition as published: refs rewritten to ``ref_prefix`` + public names."""
        return self._publish(key, ref_prefix)[0]

    def closure(self, roots: Iterable[DefKey]) -> list[DefKey]:
        """``roots`` and every definition they reference, transitively, in a stable order."""
        seen: dict[DefKey, None] = {}
        stack = [self.canonical(*r) for r in roots]
        stack.reverse()
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen[key] = None
            refs = self._publish(key, "#/definitions/")[1]
            stack.extend(reversed([r for r in refs if r not in seen]))
        return list(seen)

    def published_definitions(
        self, roots: Iterable[DefKey], ref_prefix: str = "#/definitions/"
    ) -> dict[str, Obj]:
        """Public name -> published definition for ``roots`` and all they reference."""
        return {
            self.public_name(*key): self._publish(key, ref_prefix)[0]
            for key in self.closure(roots)
        }

    def _publish(self, key: DefKey, ref_prefix: str) -> tuple[Obj, tuple[DefKey, ...]]:
        cached = self._published.get((key, ref_prefix))
        if cached is not None:
            return cached
        source = key[0]
        refs: dict[DefKey, None] = {}

        def rewrite(value: Any) -> Any:
            if isinstance(value, dict):
                out: Obj = {}
                for k, v in value.items():
                    if k == "$ref" and isinstance(v, str):
                        target = self._ref_key(source, v)
                        refs[target] = None
                        out[k] = ref_prefix + self.public_name(*target)
                    else:
                        out[k] = rewrite(v)
                return out
            if isinstance(value, list):
                return [rewrite(v) for v in value]
            return value

        result = (rewrite(self.definition(*key)), tuple(refs))
        self._published[(key, ref_prefix)] = result
        return result

    def _ref_key(self, source: str, ref: str) -> DefKey:
        if not ref.startswith("#/definitions/"):
            raise SchemaError(f"unsupported $ref {ref!r} in the {source} schemas")
        key = self.canonical(source, ref[len("#/definitions/"):])
        if key[1] not in self._defs[key[0]]:
            raise SchemaError(f"dangling $ref {ref!r} in the {source} schemas")
        return key

    # ---- validation -----------------------------------------------------------------------

    def validate(
        self, kind: KindInfo, obj: Obj, *, field_validation: str = "Strict"
    ) -> tuple[Obj, list[str]]:
        """Check ``obj`` against the kind's schema.

        Returns a pruned deep copy and the warnings to send back (unknown fields under
        ``Warn``). Raises :class:`Invalid` listing every problem; unknown fields are problems
        under ``Strict`` only. A kind without schema accepts anything.
        """
        if field_validation not in FIELD_VALIDATION_DIRECTIVES:
            raise BadRequest(
                f'fieldValidation: Unsupported value: "{field_validation}": supported values: '
                '"Ignore", "Warn", "Strict"'
            )
        if not isinstance(obj, dict):
            raise BadRequest(f"the body of a {kind.kind} must be a JSON object")
        root = self._kind_roots.get(kind.schema) if kind.schema is not None else None
        if root is None:
            key = self.kind_definition(kind)
            if key is None:
                return clone(obj), []
            root = self._root_node(key)
            self._kind_roots[kind.schema] = root
        ctx = _Ctx(field_validation)
        pruned = _check(root, obj, "", ctx)
        if ctx.errors:
            metadata = obj.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            raise Invalid.for_object(
                kind.kind, kind.group, name if isinstance(name, str) else "", ctx.errors
            )
        assert isinstance(pruned, dict)
        return pruned, ctx.warnings

    def _root_node(self, key: DefKey) -> _Node:
        """The node of a top-level kind.

        It always knows apiVersion, kind and metadata, and never requires status (the
        server, not the client, writes status).
        """
        root = self._roots.get(key)
        if root is not None:
            return root
        node = self._def_node(key)
        root = _Node()
        root.copy_from(node)
        if root.kind != _OBJECT:
            root.kind = _OBJECT
            root.types = frozenset({"object"})
            root.preserve = True
        string = _Node()
        string.kind = _SCALAR
        string.types = frozenset({"string"})
        root.props = {
            "apiVersion": string,
            "kind": string,
            "metadata": self._def_node((CORE_SCHEMA_SOURCE, OBJECT_META)),
            **node.props,
        }
        root.required = tuple(r for r in node.required if r != "status")
        _finish(root)
        self._roots[key] = root
        return root

    def _def_node(self, key: DefKey) -> _Node:
        node = self._nodes.get(key)
        if node is not None:
            return node
        node = _Node()
        self._nodes[key] = node  # registered before filling: definitions may be recursive
        source, name = key
        special = _special_node(name)
        if special is not None:
            node.copy_from(special)
        else:
            self._fill(node, source, self.definition(source, name))
        return node

    def _compile(self, source: str, schema: Obj) -> _Node:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._def_node(self._ref_key(source, ref))
            if schema.get("nullable") and not target.nullable:
                node = _Node()
                node.copy_from(target)
                node.nullable = True
                return node
            return target
        node = _Node()
        self._fill(node, source, schema)
        return node

    def _fill(self, node: _Node, source: str, schema: Obj) -> None:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            node.copy_from(self._def_node(self._ref_key(source, ref)))
            node.nullable = node.nullable or bool(schema.get("nullable"))
            return
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            self._fill_all_of(node, source, schema, all_of)
            return
        raw_type = schema.get("type")
        types = set(raw_type if isinstance(raw_type, list) else [raw_type] if raw_type else [])
        node.nullable = bool(schema.get("nullable")) or "null" in types
        types.discard("null")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        props = schema.get("properties")
        additional = schema.get("additionalProperties")
        if schema.get("x-kubernetes-int-or-string") or schema.get("format") == "int-or-string":
            types = {"integer", "string"}
        elif not types and (isinstance(props, dict) or isinstance(additional, dict)):
            types = {"object"}
        elif not types:
            any_of = schema.get("anyOf") or schema.get("oneOf")
            if isinstance(any_of, list):
                types = {t for s in any_of if isinstance(s, dict)
                         for t in ([s.get("type")] if isinstance(s.get("type"), str) else [])}
        node.types = frozenset(types)
        if not types:
            node.kind = _ANY
        elif types == {"object"}:
            node.kind = _OBJECT
            node.preserve = preserve
            if isinstance(props, dict):
                node.props = {k: self._compile(source, v) for k, v in props.items()
                              if isinstance(v, dict)}
            if isinstance(additional, dict):
                node.additional = self._compile(source, additional)
            elif additional is True:
                node.additional = _Node()
            required = schema.get("required")
            if isinstance(required, list):
                node.required = tuple(r for r in required if isinstance(r, str))
        elif types == {"array"}:
            node.kind = _ARRAY
            items = schema.get("items")
            if isinstance(items, dict):
                node.items = self._compile(source, items)
        elif types & {"object", "array"}:
            node.kind = _ANY  # a mix of structured and scalar types: not checked
        else:
            node.kind = _SCALAR
            fmt = schema.get("format")
            node.fmt = fmt if isinstance(fmt, str) else ""
            enum = schema.get("enum")
            if isinstance(enum, list) and enum:
                node.enum = tuple(enum)
            pattern = schema.get("pattern")
            if isinstance(pattern, str):
                node.pattern = re.compile(pattern)
                node.pattern_text = pattern

    def _fill_all_of(self, node: _Node, source: str, schema: Obj, all_of: list[Any]) -> None:
        parts = [self._compile(source, s) for s in all_of if isinstance(s, dict)]
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        if any(k in rest for k in ("type", "properties", "additionalProperties", "$ref")):
            parts.append(self._compile(source, rest))
        structured = [p for p in parts if p.kind != _ANY]
        if not structured:
            node.kind = _ANY
            return
        node.copy_from(structured[0])
        if node.kind == _OBJECT:
            props: dict[str, _Node] = {}
            required: list[str] = []
            for p in structured:
                if p.kind == _OBJECT:
                    props.update(p.props)
                    required.extend(r for r in p.required if r not in required)
                    node.preserve = node.preserve or p.preserve
                    node.additional = node.additional or p.additional
            node.props = props
            node.required = tuple(required)
        node.nullable = any(p.nullable for p in parts) or bool(schema.get("nullable"))


def _special_node(name: str) -> _Node | None:
    """Apimachinery types whose JSON form is not what their definition says."""
    if name == QUANTITY:
        node = _Node()
        node.kind = _SCALAR
        node.types = frozenset({"string", "integer", "number"})
        node.pattern = re.compile(_QUANTITY_PATTERN)
        node.pattern_text = _QUANTITY_PATTERN
        return node
    return None


@functools.cache
def default_schemas() -> SchemaSet:
    """The process-wide :class:`SchemaSet` (loaded once, from :func:`find_openapi_dir`)."""
    return SchemaSet.load()
