"""Node bootstrap (kubeadm's token discovery and TLS bootstrap, much simplified): how a node
agent on another machine, or in a node namespace, gets what it needs from the control plane.

- ``GET /virtshift/v1/cluster-info`` (no credentials): the cluster CA, which the joining node
  checks against the ``sha256:`` hash it was given (:func:`virtshift.api.bootstrap.ca_cert_hash`)
  before trusting it.
- ``POST /virtshift/v1/join`` (``Authorization: Bearer JOIN_TOKEN``; body ``{"nodeName": ...,
  "address": ...}``): the CA, the bearer token the agent uses against the API, the agent proxy
  token, and a serving certificate and key for the node's address issued by the cluster CA.

The join token is created once and kept in ``DIR/join-token`` (0600). Any other credential gets
a Kubernetes ``Status``: 401 for an unknown or missing token, 403 for an API token that is not
the join token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from aiohttp import web

from virtshift.api.bootstrap import (
    API_VERSION,
    CLUSTER_INFO_PATH,
    JOIN_PATH,
    TOKEN_RE,
    new_join_token,
    valid_node_name,
)
from virtshift.apiserver.auth import TokenAuthenticator
from virtshift.apiserver.http import json_response, read_body
from virtshift.apiserver.pki import Pki, ensure_node_cert
from virtshift.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, Unauthorized

log = logging.getLogger(__name__)

JOIN_TOKEN_FILE = "join-token"


def ensure_join_token(data_dir: Path) -> str:
    """The cluster's join token (created on first start, 0600)."""
    path = data_dir / JOIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if TOKEN_RE.fullmatch(token):
            return token
        log.warning("replacing the malformed join token in %s", path)
    token = new_join_token()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


class JoinService:
    """Serves the two bootstrap paths under ``/virtshift/`` (outside the Kubernetes API and
    its authentication)."""

    def __init__(self, pki: Pki, auth: TokenAuthenticator, *, join_token: str,
                 api_token: str, proxy_token: str) -> None:
        self.pki = pki
        self.auth = auth
        self.join_token = join_token
        self.api_token = api_token
        self.proxy_token = proxy_token

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path == CLUSTER_INFO_PATH:
            self._method(request, "GET")
            return json_response({"apiVersion": API_VERSION, "kind": "ClusterInfo",
                                  "caCert": self.pki.ca_pem().decode()})
        if path == JOIN_PATH:
            self._method(request, "POST")
            self._authorize(request)
            return await self._join(request)
        raise NotFound("the server could not find the requested resource")

    @staticmethod
    def _method(request: web.Request, allowed: str) -> None:
        if request.method != allowed:
            raise MethodNotAllowed(f"the server does not allow this method on the requested "
                                   f"resource: {request.method} {request.path}")

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if token and hmac.compare_digest(token.encode(), self.join_token.encode()):
            return
        user = self.auth.authenticate(token) if token else None
        if user is None:
            raise Unauthorized("Unauthorized")
        raise Forbidden(f'nodes is forbidden: User "{user.username}" cannot join nodes: '
                        "a join token is required")

    async def _join(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        if not isinstance(body, dict):
            raise BadRequest("the join request must be a JSON object")
        node = body.get("nodeName")
        address = body.get("address")
        if not isinstance(node, str) or not valid_node_name(node):
            raise BadRequest(f"nodeName: Invalid value: {node!r}: a lowercase RFC 1123 "
                             "subdomain must consist of lower case alphanumeric characters, "
                             "'-' or '.'")
        try:
            ip = ipaddress.ip_address(str(address))
        except ValueError:
            raise BadRequest(f"address: Invalid value: {address!r}: must be an IP address"
                             ) from None
        cert, key = await asyncio.to_thread(ensure_node_cert, self.pki, node, [str(ip)])
        log.info("node %s joined (address %s, from %s)", node, ip, request.remote)
        return json_response({
            "apiVersion": API_VERSION,
            "kind": "NodeCredentials",
            "nodeName": node,
            "caCert": self.pki.ca_pem().decode(),
            "token": self.api_token,
            "agentProxyToken": self.proxy_token,
            "tlsCert": cert.read_text(),
            "tlsKey": key.read_text(),
        })
