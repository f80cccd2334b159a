"""``meta.k8s.io`` Table rendering, as kube-apiserver produces it for ``kubectl get``.

Custom resources follow apiextensions' table convertor: a ``Name`` column, then the kind's printer
columns (a lone ``Age`` column when none are declared). Each cell takes the *first* value the
column's JSONPath selects; a path that selects nothing gives a ``null`` cell (kubectl prints it
blank). ``string`` columns print the value as client-go's JSONPath printer does (maps and lists
as compact JSON, ``null`` as ``<no value>``); ``integer``, ``number`` and ``boolean`` columns keep
JSON types (``null`` on a type mismatch); ``date`` columns become a human duration such as
``3m20s`` (``<unknown>`` for a zero time, ``<invalid>`` for an unparsable one).

Built-in kinds use the column sets and cell rules of kube-apiserver's own printers; the server
always renders their wide (priority 1) columns and kubectl hides them without ``-o wide``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from virtshift.api.jsonpath import JSONPath, compile_path
from virtshift.api.kinds import KINDS, KindInfo, PrinterColumn
from virtshift.errors import BadRequest

__all__ = ["NAME_DESCRIPTION", "build_table", "column_definitions", "human_duration"]

Obj = dict[str, Any]
CellFn = Callable[[Mapping[str, Any], datetime], Any]

NAME_DESCRIPTION = (
    "The object's name, unique among objects of its kind in a namespace (or in the cluster for "
    "cluster-scoped kinds). Clients choose it at creation; it cannot be changed afterwards."
)
AGE_DESCRIPTION = (
    "How long ago the object was created, from metadata.creationTimestamp (set by the server "
    "on creation, in UTC)."
)
_CRD_COLUMN_DESCRIPTION = "Custom resource definition column (in JSONPath format): "

# ---- durations and timestamps ---------------------------------------------------------------

_NS = 1_000_000_000


def _tdiv(a: int, b: int) -> int:
    """Integer division truncating toward zero, like Go."""
    q = abs(a) // b
    return q if a >= 0 else -q


def _human_ns(ns: int) -> str:
    seconds = _tdiv(ns, _NS)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 60 * 2:
        return f"{seconds}s"
    minutes = ns // (60 * _NS)
    if minutes < 10:
        s = seconds % 60
        return f"{minutes}m" if s == 0 else f"{minutes}m{s}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = ns // (3600 * _NS)
    if hours < 8:
        m = minutes % 60
        return f"{hours}h" if m == 0 else f"{hours}h{m}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        h = hours % 24
        return f"{hours // 24}d" if h == 0 else f"{hours // 24}d{h}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if dy == 0 else f"{years}y{dy}d"
    return f"{hours // 24 // 365}y"


def human_duration(seconds: float) -> str:
    """A duration as Kubernetes prints ages (``duration.HumanDuration``), e.g. ``2d3h``.

    About two significant units: seconds below 2 minutes, minutes and seconds below 10 minutes,
    minutes below 3 hours, hours and minutes below 8 hours, hours below 2 days, days and hours
    below 8 days, days below 2 years, years and days below 8 years, then years. A duration of
    -1s or more in the past is ``0s`` (clock skew); anything more negative is ``<invalid>``.
    """
    return _human_ns(int(seconds * _NS))


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})")
_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


def _parse_time(value: str) -> datetime | None:
    """An RFC 3339 timestamp, or None if it does not parse."""
    m = _RFC3339.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    zone = m.group(8)
    try:
        if zone == "Z":
            tz = UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        return datetime(year, month, day, hour, minute, sec, micro, tzinfo=tz)
    except ValueError:
        return None


def _aware(now: datetime) -> datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _elapsed(ts: datetime, now: datetime) -> str:
    delta = _aware(now) - ts
    ns = (delta.days * 86400 + delta.seconds) * _NS + delta.microseconds * 1000
    return _human_ns(ns)


def _timestamp(value: Any) -> datetime | None:
    """A metav1.Time / MicroTime field; None when unset, zero or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    ts = _parse_time(value)
    if ts is None or ts == _ZERO_TIME:
        return None
    return ts


def _since(value: Any, now: datetime) -> str:
    """``translateTimestampSince``: ``<unknown>`` for an unset time."""
    ts = _timestamp(value)
    return "<unknown>" if ts is None else _elapsed(ts, now)


def _date_cell(value: str, now: datetime) -> str:
    """A CRD ``date`` cell (``ConvertToHumanReadableDateType`` after query-parameter parsing)."""
    if value in ("", "null"):
        return "<unknown>"
    ts = _parse_time(value)
    if ts is None:
        return "<invalid>"
    if ts == _ZERO_TIME:
        return "<unknown>"
    return _elapsed(ts, now)


# ---- values as client-go prints them --------------------------------------------------------


def _go_float(v: float) -> str:
    """``fmt.Sprint(float64)``: shortest digits, exponent form below 1e-4 or from 1e6."""
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "0"
    sign, digits, exp = Decimal(repr(v)).normalize().as_tuple()
    assert isinstance(exp, int)
    mantissa = "".join(str(d) for d in digits)
    point = len(mantissa) + exp  # position of the decimal point
    x = point - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 6:
        body = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
        return f"{neg}{body}e{'+' if x >= 0 else '-'}{abs(x):02d}"
    if point <= 0:
        return f"{neg}0.{'0' * -point}{mantissa}"
    if point >= len(mantissa):
        return f"{neg}{mantissa}{'0' * (point - len(mantissa))}"
    return f"{neg}{mantissa[:point]}.{mantissa[point:]}"


def _go_json(v: Any) -> str:
    """``json.Marshal``: compact, sorted keys, HTML-safe escapes."""
    text = json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _print_value(v: Any) -> str:
    """What client-go's JSONPath printer writes for one result."""
    if v is None:
        return "<no value>"
    if isinstance(v, dict | list):
        return _go_json(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _go_float(v)
    return str(v)


def _crd_cell(col_type: str, value: Any, now: datetime) -> Any:
    if col_type == "string":
        return _print_value(value)
    if value is None:
        return None
    if col_type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)
    if col_type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)
    if col_type == "boolean":
        return value if isinstance(value, bool) else None
    if col_type == "date":
        return _date_cell(value, now) if isinstance(value, str) else None
    return None


# ---- quantities -----------------------------------------------------------------------------

_QUANTITY = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(.*)")
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_SUFFIX = {e: s for s, e in _DECIMAL.items()}
_BINARY_SUFFIX = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def _canonical_quantity(text: str) -> str:
    """A resource quantity in canonical form (``1.5Gi`` -> ``1536Mi``, ``1000M`` -> ``1G``).

    Strings that are not quantities are returned unchanged.
    """
    m = _QUANTITY.fullmatch(text.strip())
    if m is None:
        return text
    sign, number, suffix = m.groups()
    try:
        value = Decimal(number)
        if suffix in _BINARY:
            fmt, value = "binary", value * (Decimal(2) ** _BINARY[suffix])
        elif suffix in _DECIMAL:
            fmt, value = "decimal", value.scaleb(_DECIMAL[suffix])
        elif re.fullmatch(r"[eE][+-]?\d+", suffix):
            fmt, value = "exponent", value.scaleb(int(suffix[1:]))
        else:
            return text
    except InvalidOperation:
        return text
    # quantities keep at most nanosecond-style precision, rounding up
    value = value.quantize(Decimal("1e-9"), rounding=ROUND_CEILING) if value % 1 else value
    if sign == "-":
        value = -value
    if value == 0:
        return "0"
    if fmt == "binary" and (abs(value) < 1024 or value != value.to_integral_value()):
        fmt = "decimal"
    neg = "-" if value < 0 else ""
    if fmt == "binary":
        n, exp = int(abs(value)), 0
        while n % 1024 == 0 and exp < len(_BINARY_SUFFIX) - 1:
            n //= 1024
            exp += 1
        return f"{neg}{n}{_BINARY_SUFFIX[exp]}"
    _, digits, exponent = abs(value).normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = int("".join(str(d) for d in digits))
    while exponent % 3 != 0:
        mantissa *= 10
        exponent -= 1
    if fmt == "exponent" or exponent not in _DECIMAL_SUFFIX:
        return f"{neg}{mantissa}" + (f"e{exponent}" if exponent else "")
    return f"{neg}{mantissa}{_DECIMAL_SUFFIX[exponent]}"


# ---- built-in printers ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Col:
    name: str
    type: str
    description: str
    cell: CellFn
    priority: int = 0
    format: str = ""


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    cur: Any = obj
    for part in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _str(obj: Mapping[str, Any], *path: str) -> str:
    v = _get(obj, *path)
    return v if isinstance(v, str) else ""


def _dict(obj: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    v = _get(obj, *path)
    return v if isinstance(v, Mapping) else {}


def _list(obj: Mapping[str, Any], *path: str) -> Sequence[Any]:
    v = _get(obj, *path)
    return v if isinstance(v, list) else []


def _name(obj: Mapping[str, Any], _now: datetime) -> str:
    return _str(obj, "metadata", "name")


def _age(obj: Mapping[str, Any], now: datetime) -> str:
    return _since(_get(obj, "metadata", "creationTimestamp"), now)


def _name_col() -> _Col:
    return _Col("Name", "string", NAME_DESCRIPTION, _name, format="name")


def _age_col() -> _Col:
    return _Col("Age", "string", AGE_DESCRIPTION, _age)


def _text(*path: str) -> CellFn:
    return lambda obj, _now: _str(obj, *path)


def _or_default(default: str, *path: str) -> CellFn:
    return lambda obj, _now: _str(obj, *path) or default


def _access_modes(modes: Sequence[Any]) -> str:
    short = [("ReadWriteOnce", "RWO"), ("ReadOnlyMany", "ROX"), ("ReadWriteMany", "RWX"),
             ("ReadWriteOncePod", "RWOP")]
    return ",".join(abbrev for mode, abbrev in short if mode in modes)


def _deleting_phase(obj: Mapping[str, Any]) -> str:
    if _get(obj, "metadata", "deletionTimestamp") is not None:
        return "Terminating"
    return _str(obj, "status", "phase")


_BETA_STORAGE_CLASS = "volume.beta.kubernetes.io/storage-class"


def _volume_class(obj: Mapping[str, Any]) -> str:
    annotations = _dict(obj, "metadata", "annotations")
    if _BETA_STORAGE_CLASS in annotations:
        return str(annotations[_BETA_STORAGE_CLASS])
    return _str(obj, "spec", "storageClassName")


# Node


def _node_status(obj: Mapping[str, Any], _now: datetime) -> str:
    ready: Mapping[str, Any] | None = None
    for cond in _list(obj, "status", "conditions"):
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            ready = cond  # the last Ready condition wins, as in a map keyed by type
    status = ["Unknown" if ready is None else
              "Ready" if ready.get("status") == "True" else "NotReady"]
    if _get(obj, "spec", "unschedulable") is True:
        status.append("SchedulingDisabled")
    return ",".join(status)


_ROLE_PREFIX = "node-role.kubernetes.io/"


def _node_roles(obj: Mapping[str, Any], _now: datetime) -> str:
    roles: set[str] = set()
    for key, value in _dict(obj, "metadata", "labels").items():
        if key.startswith(_ROLE_PREFIX) and key[len(_ROLE_PREFIX):]:
            roles.add(key[len(_ROLE_PREFIX):])
        elif key == "kubernetes.io/role" and value:
            roles.add(str(value))
    return ",".join(sorted(roles)) or "<none>"


def _node_address(kind: str) -> CellFn:
    def cell(obj: Mapping[str, Any], _now: datetime) -> str:
        for addr in _list(obj, "status", "addresses"):
            if isinstance(addr, Mapping) and addr.get("type") == kind:
                return str(addr.get("address", ""))
        return "<none>"

    return cell


# Event


def _event_first(obj: Mapping[str, Any], now: datetime) -> str:
    if _timestamp(obj.get("firstTimestamp")) is None:
        return _since(obj.get("eventTime"), now)
    return _since(obj.get("firstTimestamp"), now)


def _event_last(obj: Mapping[str, Any], now: datetime) -> str:
    series = obj.get("series")
    if isinstance(series, Mapping):
        return _since(series.get("lastObservedTime"), now)
    if _timestamp(obj.get("lastTimestamp")) is None:
        return _event_first(obj, now)
    return _since(obj.get("lastTimestamp"), now)


def _event_count(obj: Mapping[str, Any], _now: datetime) -> int:
    series = obj.get("series")
    if isinstance(series, Mapping):
        count = series.get("count")
        return count if isinstance(count, int) and not isinstance(count, bool) else 0
    count = obj.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count == 0:
        return 1
    return count


def _event_object(obj: Mapping[str, Any], _now: datetime) -> str:
    kind = _str(obj, "involvedObject", "kind").lower()
    name = _str(obj, "involvedObject", "name")
    return f"{kind}/{name}" if name else kind


def _event_source(obj: Mapping[str, Any], _now: datetime) -> str:
    component = _str(obj, "source", "component") or _str(obj, "reportingComponent")
    instance = _str(obj, "source", "host") or _str(obj, "reportingInstance")
    return f"{component}, {instance}" if instance else component


# PersistentVolumeClaim / PersistentVolume


def _pvc_bound(obj: Mapping[str, Any]) -> bool:
    return bool(_str(obj, "spec", "volumeName"))


def _pvc_capacity(obj: Mapping[str, Any], _now: datetime) -> str:
    if not _pvc_bound(obj):
        return ""
    return _quantity(_get(obj, "status", "capacity", "storage"))


def _pvc_access_modes(obj: Mapping[str, Any], _now: datetime) -> str:
    return _access_modes(_list(obj, "status", "accessModes")) if _pvc_bound(obj) else ""


def _quantity(value: Any) -> str:
    if isinstance(value, str) and value:
        return _canonical_quantity(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _canonical_quantity(str(value))
    return "0"


def _pv_claim(obj: Mapping[str, Any], _now: datetime) -> str:
    ref = _get(obj, "spec", "claimRef")
    if not isinstance(ref, Mapping):
        return ""
    return f"{_str(ref, 'namespace')}/{_str(ref, 'name')}"


# StorageClass


def _sc_name(obj: Mapping[str, Any], _now: datetime) -> str:
    annotations = _dict(obj, "metadata", "annotations")
    default = any(annotations.get(k) == "true" for k in (
        "storageclass.kubernetes.io/is-default-class",
        "storageclass.beta.kubernetes.io/is-default-class"))
    name = _str(obj, "metadata", "name")
    return f"{name} (default)" if default else name


def _count(*paths: tuple[str, ...]) -> CellFn:
    def cell(obj: Mapping[str, Any], _now: datetime) -> int:
        return sum(len(_dict(obj, *p)) for p in paths)

    return cell


_PRINTERS: dict[tuple[str, str], tuple[_Col, ...]] = {
    ("", "Namespace"): (
        _name_col(),
        _Col("Status", "string", "The namespace's lifecycle phase: Active or Terminating.",
             _text("status", "phase")),
        _age_col(),
    ),
    ("", "Node"): (
        _name_col(),
        _Col("Status", "string", "Readiness from the node's Ready condition, plus "
             "SchedulingDisabled when the node is cordoned.", _node_status),
        _Col("Roles", "string", "Roles taken from the node's node-role.kubernetes.io/<role> "
             "labels.", _node_roles),
        _age_col(),
        _Col("Version", "string", "The kubelet version the node reports.",
             _text("status", "nodeInfo", "kubeletVersion")),
        _Col("Internal-IP", "string", "The node's first InternalIP address.",
             _node_address("InternalIP"), priority=1),
        _Col("External-IP", "string", "The node's first ExternalIP address.",
             _node_address("ExternalIP"), priority=1),
        _Col("OS-Image", "string", "The operating system image the node reports.",
             _or_default("<unknown>", "status", "nodeInfo", "osImage"), priority=1),
        _Col("Kernel-Version", "string", "The kernel version the node reports.",
             _or_default("<unknown>", "status", "nodeInfo", "kernelVersion"), priority=1),
        _Col("Container-Runtime", "string", "The container runtime and version the node "
             "reports.", _or_default("<unknown>", "status", "nodeInfo",
                                     "containerRuntimeVersion"), priority=1),
    ),
    ("", "Event"): (
        _Col("Last Seen", "string", "How long ago the event was last observed.", _event_last),
        _Col("Type", "string", "Normal or Warning.", _text("type")),
        _Col("Reason", "string", "A short, machine-readable reason for the event.",
             _text("reason")),
        _Col("Object", "string", "The object the event is about, as kind/name.",
             _event_object),
        _Col("Subobject", "string", "The part of the object the event is about, if any.",
             _text("involvedObject", "fieldPath"), priority=1),
        _Col("Source", "string", "The component (and host) that reported the event.",
             _event_source, priority=1),
        _Col("Message", "string", "A human-readable description of the event.",
             lambda obj, _now: _str(obj, "message").strip()),
        _Col("First Seen", "string", "How long ago the event was first observed.",
             _event_first, priority=1),
        _Col("Count", "string", "How many times the event has occurred.", _event_count,
             priority=1),
        _Col("Name", "string", NAME_DESCRIPTION, _name, priority=1, format="name"),
    ),
    ("", "ConfigMap"): (
        _name_col(),
        _Col("Data", "string", "The number of keys in data and binaryData.",
             _count(("data",), ("binaryData",))),
        _age_col(),
    ),
    ("", "Secret"): (
        _name_col(),
        _Col("Type", "string", "The secret's type, e.g. Opaque.", _text("type")),
        _Col("Data", "string", "The number of keys in data.", _count(("data",))),
        _age_col(),
    ),
    ("", "PersistentVolumeClaim"): (
        _name_col(),
        _Col("Status", "string", "The claim's phase: Pending, Bound or Lost (Terminating "
             "while being deleted).", lambda obj, _now: _deleting_phase(obj)),
        _Col("Volume", "string", "The persistent volume bound to the claim.",
             _text("spec", "volumeName")),
        _Col("Capacity", "string", "The storage capacity of the bound volume.", _pvc_capacity),
        _Col("Access Modes", "string", "The access modes of the bound volume (RWO, ROX, RWX, "
             "RWOP).", _pvc_access_modes),
        _Col("StorageClass", "string", "The claim's storage class.",
             lambda obj, _now: _volume_class(obj)),
        _Col("VolumeAttributesClass", "string", "The claim's volume attributes class.",
             _or_default("<unset>", "spec", "volumeAttributesClassName")),
        _age_col(),
        _Col("VolumeMode", "string", "Filesystem or Block.",
             _or_default("<unset>", "spec", "volumeMode"), priority=1),
    ),
    ("", "PersistentVolume"): (
        _name_col(),
        _Col("Capacity", "string", "The volume's storage capacity.",
             lambda obj, _now: _quantity(_get(obj, "spec", "capacity", "storage"))),
        _Col("Access Modes", "string", "The volume's access modes (RWO, ROX, RWX, RWOP).",
             lambda obj, _now: _access_modes(_list(obj, "spec", "accessModes"))),
        _Col("Reclaim Policy", "string", "What happens to the volume when its claim is "
             "released: Retain, Delete or Recycle.",
             _text("spec", "persistentVolumeReclaimPolicy")),
        _Col("Status", "string", "The volume's phase (Terminating while being deleted).",
             lambda obj, _now: _deleting_phase(obj)),
        _Col("Claim", "string", "The claim bound to the volume, as namespace/name.", _pv_claim),
        _Col("StorageClass", "string", "The volume's storage class.",
             lambda obj, _now: _volume_class(obj)),
        _Col("VolumeAttributesClass", "string", "The volume's volume attributes class.",
             _or_default("<unset>", "spec", "volumeAttributesClassName")),
        _Col("Reason", "string", "Why the volume is in its current phase, if known.",
             _text("status", "reason")),
        _age_col(),
        _Col("VolumeMode", "string", "Filesystem or Block.",
             _or_default("<unset>", "spec", "volumeMode"), priority=1),
    ),
    ("storage.k8s.io", "StorageClass"): (
        _Col("Name", "string", NAME_DESCRIPTION, _sc_name, format="name"),
        _Col("Provisioner", "string", "The volume plugin that provisions volumes of this "
             "class.", _text("provisioner")),
        _Col("ReclaimPolicy", "string", "The reclaim policy of volumes provisioned for this "
             "class (Delete by default).", _or_default("Delete", "reclaimPolicy")),
        _Col("VolumeBindingMode", "string", "When volumes are bound and provisioned: Immediate "
             "or WaitForFirstConsumer.", _or_default("Immediate", "volumeBindingMode")),
        _Col("AllowVolumeExpansion", "string", "Whether claims of this class may be resized.",
             lambda obj, _now: obj.get("allowVolumeExpansion") is True),
        _age_col(),
    ),
}

# ---- custom resource columns ----------------------------------------------------------------


def _compile_columns(kinds: Sequence[KindInfo]) -> dict[str, JSONPath]:
    """Compile every printer-column path of the registry; an invalid one raises ValueError."""
    compiled: dict[str, JSONPath] = {}
    for kind in kinds:
        for col in kind.columns_or_default():
            if col.json_path not in compiled:
                try:
                    compiled[col.json_path] = compile_path(col.json_path)
                except ValueError as e:
                    raise ValueError(f"{kind.qualified_kind} column {col.name!r}: {e}") from None
    return compiled


_COLUMN_PATHS = _compile_columns(KINDS)


def _crd_column(col: PrinterColumn) -> _Col:
    path = _COLUMN_PATHS.get(col.json_path) or compile_path(col.json_path)

    def cell(obj: Mapping[str, Any], now: datetime) -> Any:
        found = path.find(obj)
        return _crd_cell(col.type, found[0], now) if found else None

    return _Col(col.name, col.type, col.description or _CRD_COLUMN_DESCRIPTION + col.json_path,
                cell, priority=col.priority, format=col.format)


@functools.lru_cache(maxsize=256)
def _columns(kind: KindInfo) -> tuple[_Col, ...]:
    if kind.builtin:
        printer = _PRINTERS.get((kind.group, kind.kind))
        if printer is not None:
            return printer
    return (_name_col(), *(_crd_column(c) for c in kind.columns_or_default()))


def column_definitions(kind: KindInfo) -> list[dict[str, Any]]:
    """The Table ``columnDefinitions`` for ``kind`` (wide columns included, priority 1)."""
    return [{"name": c.name, "type": c.type, "format": c.format, "description": c.description,
             "priority": c.priority} for c in _columns(kind)]


_INCLUDE = ("None", "Metadata", "Object")


def build_table(
    kind: KindInfo,
    objects: list[dict[str, Any]],
    *,
    include_object: str = "Metadata",
    list_meta: Mapping[str, Any],
    now: datetime,
    table_version: str = "v1",
    no_headers: bool = False,
) -> dict[str, Any]:
    """Render ``objects`` of ``kind`` as a ``meta.k8s.io`` Table.

    ``include_object`` chooses each row's ``object``: ``Metadata`` (a PartialObjectMetadata),
    ``Object`` (the object itself) or ``None`` (``null``). ``list_meta`` supplies the Table's
    ``resourceVersion``, ``continue`` and ``remainingItemCount``; ``now`` is the reference time
    for ages. ``table_version`` (``v1`` or ``v1beta1``) sets the Table's and the
    PartialObjectMetadata's apiVersion. ``no_headers`` omits the column definitions (``null``),
    as upstream does for ``TableOptions.noHeaders``. Rows share structure with ``objects``.
    """
    if include_object not in _INCLUDE:
        raise BadRequest(f"unrecognized includeObject value: {json.dumps(include_object)}")
    api_version = f"meta.k8s.io/{table_version}"
    cols = _columns(kind)
    rows: list[dict[str, Any]] = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [c.cell(obj, now) for c in cols]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object == "Metadata":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": api_version,
                             "metadata": obj.get("metadata") or {}}
        else:
            row["object"] = None
        rows.append(row)
    meta: dict[str, Any] = {}
    if list_meta.get("resourceVersion"):
        meta["resourceVersion"] = list_meta["resourceVersion"]
    if list_meta.get("continue"):
        meta["continue"] = list_meta["continue"]
    if list_meta.get("remainingItemCount") is not None:
        meta["remainingItemCount"] = list_meta["remainingItemCount"]
    return {
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": meta,
        "columnDefinitions": None if no_headers else column_definitions(kind),
        "rows": rows,
    }
