"""Kubernetes Events from the controller (client-go's ``EventRecorder``, simplified).

:func:`build_event` makes a ``core/v1`` Event about an object (pure); :func:`record` creates it
through the API. Events are a best-effort side channel, as upstream: a failure to write one is
logged and never fails the reconcile that emitted it. An object without a namespace (a Node)
gets its Events in ``default``, as kubelet's and the node lifecycle controller's do. There is
no aggregation: each call makes a new Event with ``count`` 1.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.client.rest import Client
from virtshift.errors import ApiError

log = logging.getLogger(__name__)

COMPONENT = "virt-controller"
NORMAL, WARNING = "Normal", "Warning"


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    value = obj.get("metadata")
    return value if isinstance(value, dict) else {}


def build_event(obj: Mapping[str, Any], kind: KindInfo, type_: str, reason: str,
                message: str, *, now: datetime.datetime, unique: int) -> Obj:
    """An Event about ``obj`` (of ``kind``); ``unique`` makes its name (``OBJ.<hex>``)."""
    meta = _meta(obj)
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "") or "default"
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: Obj = {
        "apiVersion": f"{kind.group}/{kind.version}" if kind.group else kind.version,
        "kind": kind.kind,
        "name": name,
        "uid": str(meta.get("uid") or ""),
        "resourceVersion": str(meta.get("resourceVersion") or ""),
    }
    if kind.namespaced:
        involved["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{unique:x}", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


_last_unique = 0


def _unique() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process (client-go names
    Events by the timestamp in hex too)."""
    global _last_unique
    _last_unique = max(time.time_ns(), _last_unique + 1)
    return _last_unique


async def record(client: Client, obj: Mapping[str, Any], kind_info: KindInfo, type_: str,
                 reason: str, message: str) -> Obj | None:
    """Create an Event about ``obj``; returns it, or None when the API refused it (logged)."""
    event = build_event(obj, kind_info, type_, reason, message,
                        now=datetime.datetime.now(datetime.UTC), unique=_unique())
    event_kind = REGISTRY.require("", "v1", "Event")
    try:
        return await client.create(event_kind, event["metadata"]["namespace"], event)
    except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
        log.warning("cannot record event %s on %s %s: %s", reason, kind_info.kind,
                    event["involvedObject"]["name"], e)
        return None
