"""HTTP helpers: exact content types, request bodies, content negotiation, query parameters."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson
import yaml
from aiohttp import web

from virtshift.apiserver import protobuf
from virtshift.errors import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

JSON = "application/json"
YAML_TYPES = ("application/yaml", "application/apply-patch+yaml", "text/yaml",
              "application/x-yaml")
MAX_BODY = 3 * 1024 * 1024  # Kubernetes' limit on a request body (3 MiB)
TABLE_GROUP = "meta.k8s.io"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def json_response(obj: Any, status: int = 200, *, content_type: str = JSON,
                  warnings: list[str] | None = None) -> web.Response:
    """A response whose Content-Type is exactly ``content_type`` (no charset suffix)."""
    resp = web.Response(body=dumps(obj), status=status)
    resp.headers["Content-Type"] = content_type
    for w in warnings or []:
        resp.headers.add("Warning", warning_header(w))
    return resp


def warning_header(text: str) -> str:
    """An RFC 7234 warning (code 299) as Kubernetes sends it; control and non-ASCII characters
    are escaped so the header is always valid."""
    quoted = json.dumps(text, ensure_ascii=True)  # escapes quotes, controls and non-ASCII
    return f"299 - {quoted}"


@dataclass(frozen=True)
class MediaType:
    type: str
    params: dict[str, str]


def parse_accept(header: str) -> list[MediaType]:
    out: list[MediaType] = []
    for part in header.split(","):
        part = part.strip()
        if not part:
            continue
        pieces = [p.strip() for p in part.split(";")]
        params: dict[str, str] = {}
        for p in pieces[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        out.append(MediaType(pieces[0].lower(), params))
    return out


def wants_table(request: web.Request) -> str | None:
    """The Table version (``v1``/``v1beta1``) the client asked for, if any."""
    for mt in parse_accept(request.headers.get("Accept", "")):
        if mt.params.get("as") == "Table" and mt.params.get("g") == TABLE_GROUP:
            return mt.params.get("v", "v1")
    return None


def accepts_json(request: web.Request) -> bool:
    header = request.headers.get("Accept", "")
    if not header:
        return True
    for mt in parse_accept(header):
        if mt.type in (JSON, "*/*", "application/*") or mt.type in YAML_TYPES:
            return True
    return False


async def read_body(request: web.Request, *, allow_empty: bool = False) -> Any:
    """Decode a JSON or YAML body. Malformed input -> 400, too large -> 413, other type -> 415."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise RequestEntityTooLarge("Request entity too large: limit is 3145728")
    raw = bytearray()
    if request.content_length:  # the common case: one read of a known size
        try:
            raw += await request.content.readexactly(request.content_length)
        except asyncio.IncompleteReadError as e:
            raise BadRequest("the body of the request ended before its Content-Length") from e
    else:
        async for chunk in request.content.iter_chunked(65536):
            raw += chunk
            if len(raw) > MAX_BODY:
                raise RequestEntityTooLarge("Request entity too large: limit is 3145728")
    if not raw.strip():
        if allow_empty:
            return None
        raise BadRequest("the body of the request was empty")
    ctype = request.headers.get("Content-Type", JSON).split(";")[0].strip().lower()
    if ctype == protobuf.PROTOBUF:
        return protobuf.decode(bytes(raw))
    if ctype == JSON or ctype.endswith("+json") or ctype == "":
        try:
            return orjson.loads(bytes(raw))
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"couldn't decode the body as JSON: {e}") from e
    text = bytes(raw).decode("utf-8", errors="replace")
    if ctype in YAML_TYPES:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise BadRequest(f"error converting YAML to JSON: {_one_line(str(e))}") from e
        if len(docs) != 1:
            raise BadRequest("the body of the request must hold exactly one YAML document")
        return _json_safe(docs[0])
    raise UnsupportedMediaType(
        f'the body of the request was in an unknown format "{ctype}" - accepted media types '
        "include: application/json, application/yaml")


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _json_safe(value: Any) -> Any:
    """YAML timestamps and other non-JSON scalars become strings, as Kubernetes' converter does."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"the body holds a number JSON cannot represent: {value}")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "isoformat"):
        iso: str = value.isoformat()
        return iso.replace("+00:00", "Z")
    return str(value)


def query_bool(request: web.Request, name: str) -> bool:
    v = request.query.get(name, "")
    return v.lower() in ("true", "1")


def query_int(request: web.Request, name: str, default: int = 0) -> int:
    v = request.query.get(name)
    if v in (None, ""):
        return default
    try:
        n = int(v)
    except ValueError as e:
        raise BadRequest(f"invalid value for {name}: {v!r} is not an integer") from e
    if n < 0:
        raise BadRequest(f"invalid value for {name}: must not be negative")
    return n
