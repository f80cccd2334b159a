"""CDI's upload path on the API server: ``UploadTokenRequest`` and the upload proxy.

* ``POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/NS/uploadtokenrequests`` with
  ``spec.pvcName``: the caller must be allowed to create ``uploadtokenrequests`` in NS. The
  answer is the request with ``status.token``; nothing is stored (as TokenReview). The token is
  ``v1.<payload>.<signature>``: a base64url JSON payload (operation, namespace, claim, expiry)
  signed with HMAC-SHA256 under the server's own key (``DIR/upload-token-key``, made on first
  start), good for :data:`TOKEN_TTL` seconds (CDI: 5 minutes).
* The upload proxy (cdi-uploadproxy) on the API server's own listener: ``POST``
  ``/v1beta1/upload`` and ``/v1beta1/upload-async`` (``HEAD`` of either probes), authorized by
  ``Authorization: Bearer <upload token>`` instead of a user's token; the ``v1alpha1`` paths
  are served too. The claim must exist, be an upload target, not be populated yet, and be ready
  on its node (:data:`ANN_POD_READY`); then the body is streamed to the node agent that holds the
  claim's volume (the node of the PersistentVolume's affinity, or for a shared volume the node
  chosen to populate it), over HTTPS with the proxy token
  (as :mod:`virtshift.apiserver.vmiproxy` does). Both paths answer once the disk is written:
  ``upload-async`` is accepted for virtctl's probe but does not return early.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from virtshift.api.cdi import (
    ANN_POD_PHASE,
    ANN_POD_READY,
    ANN_UPLOAD_TARGET,
    POD_SUCCEEDED,
    populate_source,
    populating_node,
)
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.apiserver.auth import UserInfo
from virtshift.apiserver.http import json_response, read_body
from virtshift.apiserver.resources import Resources
from virtshift.apiserver.reviews import authorize
from virtshift.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)

GROUP = "upload.cdi.kubevirt.io"
VERSION = "v1beta1"
PLURAL = "uploadtokenrequests"
TOKEN_TTL = 300
"""Seconds an upload token is good for (CDI's 5 minutes)."""
TOKEN_TTL_ENV = "VIRTSHIFT_UPLOAD_TOKEN_TTL"
KEY_FILE = "upload-token-key"
OPERATION = "Upload"
UPLOAD_PATHS = frozenset({f"/{v}/{p}" for v in ("v1beta1", "v1alpha1")
                          for p in ("upload", "upload-async")})
READY_WAIT = 10.0
"""Seconds the proxy waits for a claim to become ready before answering 503 (as CDI does)."""
CHUNK = 1024 * 1024
_AUTH = re.compile(r"(?i)^Bearer\s+([A-Za-z0-9\-._~+/=]+)$")


class TokenError(Unauthorized):
    """An upload token that is malformed, forged or expired."""


# ---- tokens (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadClaim:
    """What a valid upload token allows: uploading into ``namespace/pvc``."""

    namespace: str
    pvc: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(key: bytes, namespace: str, pvc: str, *, now: float,
                ttl: int = TOKEN_TTL) -> str:
    payload = {"op": OPERATION, "ns": namespace, "pvc": pvc, "iat": int(now),
               "exp": int(now) + ttl}
    body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    sig = hmac.new(key, f"v1.{body}".encode(), hashlib.sha256).digest()
    return f"v1.{body}.{_b64(sig)}"


def verify_token(key: bytes, token: str, *, now: float) -> UploadClaim:
    """The claim ``token`` grants; :class:`TokenError` when it is not a valid, unexpired upload
    token signed with ``key``."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "v1":
        raise TokenError("invalid upload token")
    try:
        sig = _unb64(parts[2])
        payload = json.loads(_unb64(parts[1]))
    except (ValueError, TypeError):
        raise TokenError("invalid upload token") from None
    expected = hmac.new(key, f"v1.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, expected) or not isinstance(payload, dict):
        raise TokenError("invalid upload token")
    ns, pvc, exp = payload.get("ns"), payload.get("pvc"), payload.get("exp")
    if (payload.get("op") != OPERATION or not isinstance(ns, str) or not ns
            or not isinstance(pvc, str) or not pvc or not isinstance(exp, int)):
        raise TokenError("invalid upload token")
    if now >= exp:
        raise TokenError("upload token expired")
    return UploadClaim(ns, pvc, exp)


def bearer(header: str) -> str | None:
    m = _AUTH.match(header.strip())
    return m.group(1) if m else None


def ensure_key(data_dir: Path) -> bytes:
    """The signing key in ``data_dir`` (created on first start, 0600), so that tokens stay
    valid across a restart of the API server."""
    path = data_dir / KEY_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def token_ttl(env: Mapping[str, str]) -> int:
    raw = env.get(TOKEN_TTL_ENV, "")
    try:
        return max(1, int(raw)) if raw else TOKEN_TTL
    except ValueError:
        return TOKEN_TTL


# ---- claim checks (pure) -----------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _annotations(obj: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(_dict(obj.get("metadata")).get("annotations"))


def is_upload_target(pvc: Mapping[str, Any]) -> bool:
    src = populate_source(pvc)
    return ANN_UPLOAD_TARGET in _annotations(pvc) or (src is not None and src.type == "upload")


def upload_refusal(pvc: Mapping[str, Any], name: str) -> ApiError | None:
    """Why the proxy cannot take an upload into ``pvc`` now, or None. A claim that may become
    ready (not bound yet, its node not ready yet) is a 503; the others are 400."""
    if not is_upload_target(pvc):
        return BadRequest(f"PVC {name} is not an upload target")
    ann = _annotations(pvc)
    if ann.get(ANN_POD_PHASE) == POD_SUCCEEDED:
        return BadRequest(f"rejecting Upload Request for PVC {name} that already finished "
                          "uploading")
    if _dict(pvc.get("status")).get("phase") != "Bound":
        return ServiceUnavailable(f"PVC {name} is not bound yet: it is not ready for upload",
                                  retry_after=2)
    if str(ann.get(ANN_POD_READY, "")).lower() != "true":
        return ServiceUnavailable(f"upload server for PVC {name} is not ready yet",
                                  retry_after=2)
    return None


def agent_base(node: Mapping[str, Any]) -> str | None:
    """``https://ADDRESS:PORT`` of a Node's agent endpoint, or None when it publishes none."""
    status = _dict(node.get("status"))
    address = next((a.get("address") for a in status.get("addresses") or []
                    if _dict(a).get("type") == "InternalIP"), None)
    port = _dict(_dict(status.get("daemonEndpoints")).get("kubeletEndpoint")).get("Port")
    if not address or not port:
        return None
    host = f"[{address}]" if ":" in str(address) else str(address)
    return f"https://{host}:{port}"


# ---- the service -------------------------------------------------------------------------------


class UploadService:
    def __init__(self, resources: Resources, registry: Registry, key: bytes, *,
                 proxy_token: str, agent_tls: ssl.SSLContext, ttl: int = TOKEN_TTL,
                 ready_wait: float = READY_WAIT) -> None:
        self.resources = resources
        self.registry = registry
        self.key = key
        self.proxy_token = proxy_token
        self.agent_tls = agent_tls
        self.ttl = ttl
        self.ready_wait = ready_wait
        self._busy: set[tuple[str, str]] = set()  # claims with an upload under way

    def _kind(self, group: str, kind: str) -> KindInfo:
        return self.registry.require(group, "v1" if not group else "v1beta1", kind)

    # ---- UploadTokenRequest --------------------------------------------------------------------

    async def handle_group(self, request: web.Request, user: UserInfo,
                           segs: list[str]) -> web.StreamResponse | None:
        """``/apis/upload.cdi.kubevirt.io/<segs>``: the create of an UploadTokenRequest; None
        for anything else (discovery and the generic verbs)."""
        if (len(segs) < 4 or segs[0] != VERSION or segs[1] != "namespaces"
                or segs[3] != PLURAL):
            return None
        if len(segs) != 4 or request.method != "POST":
            raise MethodNotAllowed("the server does not allow this method on the requested "
                                   "resource")
        return await self.token_request(request, user, segs[2])

    async def token_request(self, request: web.Request, user: UserInfo,
                            namespace: str) -> web.Response:
        allowed, _ = authorize(user, {"namespace": namespace, "verb": "create",
                                      "group": GROUP, "resource": PLURAL})
        if not allowed:
            raise Forbidden(f'{PLURAL}.{GROUP} is forbidden: User "{user.username}" cannot '
                            f'create resource "{PLURAL}" in API group "{GROUP}" in the '
                            f'namespace "{namespace}"', group=GROUP, kind=PLURAL)
        body = await read_body(request)
        if not isinstance(body, dict):
            raise BadRequest("UploadTokenRequest must be an object")
        spec = _dict(body.get("spec"))
        pvc_name = spec.get("pvcName")
        if not isinstance(pvc_name, str) or not pvc_name:
            raise BadRequest("spec.pvcName: Required value: the claim to upload into")
        try:
            pvc = await self.resources.get(self._kind("", "PersistentVolumeClaim"), namespace,
                                           pvc_name)
        except NotFound:
            raise BadRequest(f"PVC {namespace}/{pvc_name} does not exist") from None
        if not is_upload_target(pvc):
            raise BadRequest(f"PVC {pvc_name} is not an upload target")
        now = time.time()
        meta = _dict(body.get("metadata"))
        out: Obj = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "UploadTokenRequest",
            "metadata": {"name": str(meta.get("name") or ""), "namespace": namespace,
                         "creationTimestamp": datetime.datetime.fromtimestamp(
                             int(now), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
            "spec": {"pvcName": pvc_name},
            "status": {"token": issue_token(self.key, namespace, pvc_name, now=now,
                                            ttl=self.ttl)},
        }
        if not out["metadata"]["name"]:
            del out["metadata"]["name"]
        return json_response(out, 201)

    # ---- the proxy -----------------------------------------------------------------------------

    async def handle_proxy(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path not in UPLOAD_PATHS:
            raise NotFound("the server could not find the requested resource")
        if request.method not in ("POST", "HEAD"):
            raise MethodNotAllowed(f"{request.method} {path}: use POST (HEAD to probe)")
        header = request.headers.get("Authorization", "")
        if not header:
            raise BadRequest("the upload needs an Authorization: Bearer <upload token> header")
        token = bearer(header)
        if token is None:
            raise BadRequest("malformed Authorization header: expected Bearer <upload token>")
        claim = verify_token(self.key, token, now=time.time())
        pvc = await self._ready_claim(claim.namespace, claim.pvc)
        if request.method == "HEAD":
            return web.Response(status=200)
        key = (claim.namespace, claim.pvc)
        if key in self._busy:
            raise Conflict(f"an upload to PVC {claim.namespace}/{claim.pvc} is already in "
                           "progress")
        self._busy.add(key)
        try:
            url = await self._agent_url(claim.namespace, claim.pvc, pvc)
            return await self._forward(request, url, claim.pvc)
        finally:
            self._busy.discard(key)

    async def _ready_claim(self, ns: str, name: str) -> Obj:
        """The claim once it can take the upload; waits up to ``ready_wait`` for readiness."""
        kind = self._kind("", "PersistentVolumeClaim")
        deadline = time.monotonic() + self.ready_wait
        while True:
            try:
                pvc = await self.resources.get(kind, ns, name)
            except NotFound:
                raise NotFound(f"rejecting Upload Request for PVC {name} that doesn't exist",
                               name=name, kind="persistentvolumeclaims") from None
            refusal = upload_refusal(pvc, name)
            if refusal is None:
                return pvc
            if not isinstance(refusal, ServiceUnavailable) or time.monotonic() >= deadline:
                raise refusal
            await asyncio.sleep(0.5)

    async def _agent_url(self, ns: str, name: str, pvc: Obj) -> str:
        volume = str(_dict(pvc.get("spec")).get("volumeName") or "")
        try:
            pv = await self.resources.get(self._kind("", "PersistentVolume"), None, volume)
        except NotFound:
            raise ServiceUnavailable(f"PVC {name} is bound to volume {volume!r}, which does "
                                     "not exist") from None
        node_name = populating_node(pv)
        if not node_name:
            raise ServiceUnavailable(f"volume {volume} of PVC {name} is on no node")
        try:
            node = await self.resources.get(self._kind("", "Node"), None, node_name)
        except NotFound:
            raise ServiceUnavailable(f"node {node_name} of PVC {name} is not registered"
                                     ) from None
        base = agent_base(node)
        if base is None:
            raise ServiceUnavailable(f"node {node_name} publishes no agent endpoint")
        return f"{base}/v1/namespaces/{ns}/persistentvolumeclaims/{name}/upload"

    async def _forward(self, request: web.Request, url: str, name: str) -> web.StreamResponse:
        headers = {"Authorization": f"Bearer {self.proxy_token}",
                   "Content-Type": "application/octet-stream"}
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(CHUNK):
                yield chunk

        # A session per upload (uploads are few and long): nothing to close at shutdown.
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=None, connect=10),
                    connector=aiohttp.TCPConnector(ssl=self.agent_tls)) as session, \
                    session.post(url, data=body(), headers=headers) as resp:
                payload = await resp.read()
                out = web.Response(status=resp.status, body=payload)
                out.headers["Content-Type"] = resp.headers.get("Content-Type",
                                                               "text/plain; charset=utf-8")
                return out
        except (aiohttp.ClientError, OSError) as e:
            raise ServiceUnavailable(f"upload to PVC {name}: cannot reach its node agent: {e}"
                                     ) from None


def register_upload(server: Any, data_dir: Path, *, proxy_token: str,
                    agent_tls: ssl.SSLContext) -> UploadService:
    """Serve UploadTokenRequest and the upload proxy on ``server`` (an
    :class:`~virtshift.apiserver.app.ApiServer`)."""
    service = UploadService(server.resources, server.registry, ensure_key(data_dir),
                            proxy_token=proxy_token, agent_tls=agent_tls,
                            ttl=token_ttl(os.environ))
    server.group_handlers[GROUP] = service.handle_group
    server.upload_proxy = service.handle_proxy
    return service
