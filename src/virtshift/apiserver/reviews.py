"""SelfSubjectReview (kubectl auth whoami) and the access reviews (kubectl auth can-i)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from virtshift.api.kinds import Obj
from virtshift.apiserver.auth import UserInfo
from virtshift.apiserver.http import json_response, read_body
from virtshift.apiserver.resources import Resources
from virtshift.errors import BadRequest, MethodNotAllowed

ReviewHandler = Callable[[UserInfo, Resources], Awaitable[web.Response]]

SUPERUSER_GROUP = "system:masters"


def authorize(user: UserInfo, attributes: Obj) -> tuple[bool, str]:
    """The authorizer: members of system:masters may do anything; RBAC roles are not served yet,
    so every other user is denied with that reason."""
    if SUPERUSER_GROUP in user.groups:
        return True, ""
    return False, "no RBAC policy matched"


def _user_info(user: UserInfo) -> Obj:
    info: Obj = {"username": user.username, "groups": list(user.groups)}
    if user.uid:
        info["uid"] = user.uid
    if user.extra:
        info["extra"] = user.extra
    return info


def handle_review(request: web.Request, group: str, version: str,
                  segs: list[str]) -> ReviewHandler | None:
    """The handler for a review URL, or None when the URL is not a review."""
    if version != "v1" or len(segs) != 1:
        return None
    kinds = {
        ("authentication.k8s.io", "selfsubjectreviews"): "SelfSubjectReview",
        ("authorization.k8s.io", "selfsubjectaccessreviews"): "SelfSubjectAccessReview",
        ("authorization.k8s.io", "selfsubjectrulesreviews"): "SelfSubjectRulesReview",
    }
    kind = kinds.get((group, segs[0]))
    if kind is None:
        return None

    async def handler(user: UserInfo, _resources: Resources) -> web.Response:
        if request.method != "POST":
            raise MethodNotAllowed("the server does not allow this method on the requested "
                                   "resource")
        body = await read_body(request, allow_empty=True) or {}
        if not isinstance(body, dict):
            raise BadRequest(f"{kind} must be an object")
        out: Obj = {"kind": kind, "apiVersion": f"{group}/v1",
                    "metadata": {"creationTimestamp": None}}
        spec = body.get("spec") or {}
        if kind == "SelfSubjectReview":
            out["status"] = {"userInfo": _user_info(user)}
        elif kind == "SelfSubjectAccessReview":
            attrs = spec.get("resourceAttributes") or spec.get("nonResourceAttributes")
            if not isinstance(attrs, dict):
                raise BadRequest("spec: Invalid value: exactly one of nonResourceAttributes or "
                                 "resourceAttributes must be specified")
            allowed, reason = authorize(user, attrs)
            out["spec"] = spec
            out["status"] = {"allowed": allowed}
            if reason:
                out["status"]["reason"] = reason
        else:
            out["spec"] = spec
            if SUPERUSER_GROUP in user.groups:
                out["status"] = {
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    "incomplete": False,
                }
            else:
                out["status"] = {"resourceRules": [], "nonResourceRules": [],
                                 "incomplete": False}
        return json_response(out, 201)

    return handler
