"""The aiohttp application: authentication, routing, and the Kubernetes REST verbs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from virtshift.api import bootstrap
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.api.schema import SchemaSet
from virtshift.api.selectors import (
    FieldSelector,
    LabelSelector,
    parse_field_selector,
    parse_label_selector,
)
from virtshift.api.tables import build_table
from virtshift.apiserver import meta as m
from virtshift.apiserver import openapi, subresources
from virtshift.apiserver.auth import TokenAuthenticator, UserInfo
from virtshift.apiserver.discovery import AGGREGATED_V2, Discovery, version_info
from virtshift.apiserver.http import (
    JSON,
    MAX_BODY,
    accepts_json,
    json_response,
    parse_accept,
    query_bool,
    query_int,
    read_body,
    wants_table,
)
from virtshift.apiserver.nscache import NamespaceCache
from virtshift.apiserver.resources import (
    PATCH_APPLY_JSON,
    PATCH_APPLY_YAML,
    Resources,
    WriteContext,
)
from virtshift.apiserver.reviews import handle_review
from virtshift.apiserver.vmiproxy import VMIProxy, is_vmi_subresource
from virtshift.apiserver.watch import WatchStream
from virtshift.errors import (
    ApiError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    RequestEntityTooLarge,
    Unauthorized,
)
from virtshift.store.base import Store

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
PROTOBUF_V2 = (
    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
)
USER_KEY = web.RequestKey("virtshift_user", UserInfo)


# A handler for a subresource outside the generic verbs (blob upload/download, streams):
# (request, user, kind, namespace, name, subresource) -> response.
ExtraHandler = Callable[
    [web.Request, UserInfo, KindInfo, "str | None", str, str], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Target:
    """A parsed resource URL."""

    kind: KindInfo
    namespace: str | None
    name: str | None
    subresource: str


class ApiServer:
    def __init__(self, store: Store, registry: Registry, schemas: SchemaSet,
                 authenticator: TokenAuthenticator, server_address: str = "") -> None:
        self.store = store
        self.registry = registry
        self.schemas = schemas
        self.auth = authenticator
        self.resources = Resources(store, registry, schemas)
        self.discovery = Discovery(registry)
        self.server_address = server_address
        self._openapi_v2: Obj | None = None
        self._openapi_v2_pb: bytes | None = None
        self._openapi_v3_index: Obj | None = None
        self._openapi_v3_docs: dict[tuple[str, str], Obj | None] = {}
        # (group, plural, subresource) -> handler; see ExtraHandler.
        self.extra_subresources: dict[tuple[str, str, str], ExtraHandler] = {}
        self.vmi_proxy: VMIProxy | None = None
        # Node bootstrap under /virtshift/ (apiserver/join.py), outside the API's auth.
        self.bootstrap: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        # CDI's upload proxy (/v1beta1/upload...), authorized by upload tokens (upload.py).
        self.upload_proxy: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        # group -> handler of /apis/GROUP/... paths it serves itself (None: the generic verbs).
        self.group_handlers: dict[str, Callable[
            [web.Request, UserInfo, list[str]], Awaitable[web.StreamResponse | None]]] = {}

    # ---- application ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY + 1024)
        # One handler does what middlewares would (errors, then authentication), without
        # aiohttp's per-middleware wrappers on every request.
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_startup.append(self._start_caches)
        app.on_cleanup.append(self._stop_caches)
        return app

    async def _start_caches(self, _: web.Application) -> None:
        ns_kind = self.registry.require("", "v1", "Namespace")
        self.resources.namespaces = NamespaceCache(self.store, m.store_key(ns_kind, None))
        self.resources.namespaces.start()

    async def _stop_caches(self, _: web.Application) -> None:
        cache, self.resources.namespaces = self.resources.namespaces, None
        if cache is not None:
            await cache.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._authenticated(request)
        except ApiError as e:
            return self.error_response(e)
        except web.HTTPRequestEntityTooLarge:
            return self.error_response(RequestEntityTooLarge(
                f"Request entity too large: limit is {MAX_BODY}"))
        except web.HTTPException:
            raise
        except (ConnectionResetError, ConnectionError):
            raise
        except Exception as e:
            log.exception("internal error serving %s %s", request.method, request.path)
            return self.error_response(InternalError(f"Internal error occurred: {e}"))

    @staticmethod
    def error_response(e: ApiError) -> web.Response:
        resp = json_response(e.status(), e.code)
        if e.retry_after is not None:
            resp.headers["Retry-After"] = str(e.retry_after)
        return resp

    async def _authenticated(self, request: web.Request) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await self.dispatch(request)
        if self.bootstrap is not None and request.path.startswith(bootstrap.PREFIX):
            return await self.bootstrap(request)
        if self.upload_proxy is not None and request.path.startswith(("/v1beta1/upload",
                                                                      "/v1alpha1/upload")):
            return await self.upload_proxy(request)
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        user = self.auth.authenticate(token) if token else None
        if user is None:
            raise Unauthorized("Unauthorized")
        request[USER_KEY] = user
        return await self.dispatch(request)

    @staticmethod
    def user(request: web.Request) -> UserInfo:
        return request[USER_KEY]

    # ---- routing -------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in OPEN_PATHS:
            return web.Response(text="ok", content_type="text/plain")
        if path == "/version":
            return json_response(version_info())
        if path.startswith("/openapi/"):
            return self.serve_openapi(request, path)
        segs = [s for s in path.split("/") if s]
        if not segs:
            return json_response({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez",
                                            "/openapi/v2", "/openapi/v3", "/readyz",
                                            "/version"]})
        if segs[0] == "api":
            if len(segs) == 1:
                return self.serve_discovery(request, core=True)
            if segs[1] != "v1":
                raise _unknown_resource()
            if len(segs) == 2:
                return self.serve_resource_list("", "v1")
            return await self.serve_resource(request, "", "v1", segs[2:])
        if segs[0] == "apis":
            if len(segs) == 1:
                return self.serve_discovery(request, core=False)
            if segs[1] == subresources.GROUP:
                return await self.serve_kubevirt_subresource(request, segs[2:])
            if len(segs) == 2:
                group_doc = self.discovery.api_group(segs[1])
                if group_doc is None:
                    raise _unknown_resource()
                return json_response(group_doc)
            if len(segs) == 3:
                return self.serve_resource_list(segs[1], segs[2])
            group_handler = self.group_handlers.get(segs[1])
            if group_handler is not None:
                served = await group_handler(request, self.user(request), segs[2:])
                if served is not None:
                    return served
            review = handle_review(request, segs[1], segs[2], segs[3:])
            if review is not None:
                return await review(self.user(request), self.resources)
            return await self.serve_resource(request, segs[1], segs[2], segs[3:])
        raise _unknown_resource()

    async def serve_kubevirt_subresource(self, request: web.Request,
                                         segs: list[str]) -> web.StreamResponse:
        """``/apis/subresources.kubevirt.io/...``: VM lifecycle (start, stop, restart) and the
        VMI subresources that the node agent serves (console, vnc, portforward, pause...)."""
        if not segs:
            return json_response(subresources.api_group())
        version = segs[0]
        if len(segs) == 1:
            doc = subresources.resource_list(version)
            if doc is None:
                raise _unknown_resource()
            return json_response(doc)
        rest = segs[1:]
        if (version not in subresources.VERSIONS or len(rest) < 5 or rest[0] != "namespaces"
                or rest[2] not in ("virtualmachines", "virtualmachineinstances")):
            raise _unknown_resource()
        ns, resource, name, sub = rest[1], rest[2], rest[3], rest[4]
        user = self.user(request)
        if resource == "virtualmachineinstances" and is_vmi_subresource(sub):
            if self.vmi_proxy is None:
                raise _unknown_resource()
            return await self.vmi_proxy.handle(request, user, ns, name, sub, rest[5:])
        if len(rest) != 5:
            raise _unknown_resource()
        code, body = await subresources.handle_subresource(
            self.resources, self.registry, request.method, ns, resource, name, sub,
            await request.read(), user)
        if body is None:
            return web.Response(status=code)
        return json_response(body, status=code)

    def serve_discovery(self, request: web.Request, *, core: bool) -> web.Response:
        for mt in parse_accept(request.headers.get("Accept", "")):
            if (mt.params.get("g") == "apidiscovery.k8s.io" and mt.params.get("v") == "v2"
                    and mt.params.get("as") == "APIGroupDiscoveryList"):
                return json_response(self.discovery.aggregated(core), content_type=AGGREGATED_V2)
        if core:
            return json_response(self.discovery.api_versions(self.server_address))
        return json_response(self.discovery.api_group_list())

    def serve_resource_list(self, group: str, version: str) -> web.Response:
        doc = self.discovery.resource_list(group, version)
        if doc is None:
            raise _unknown_resource()
        return json_response(doc)

    def serve_openapi(self, request: web.Request, path: str) -> web.Response:
        if path == "/openapi/v2":
            if self._openapi_v2 is None:
                self._openapi_v2 = openapi.openapi_v2(self.registry, self.schemas)
            for mt in parse_accept(request.headers.get("Accept", "")):
                if mt.type in PROTOBUF_V2:
                    if self._openapi_v2_pb is None:
                        self._openapi_v2_pb = openapi.openapi_v2_protobuf(self._openapi_v2)
                    resp = web.Response(body=self._openapi_v2_pb)
                    resp.headers["Content-Type"] = mt.type
                    return resp
            return json_response(self._openapi_v2)
        if path == "/openapi/v3":
            if self._openapi_v3_index is None:
                self._openapi_v3_index = openapi.openapi_v3_index(self.registry, self.schemas)
            return json_response(self._openapi_v3_index)
        rest = path[len("/openapi/v3/"):]
        parts = rest.split("/")
        if parts[0] == "api" and len(parts) == 2:
            gv = ("", parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            gv = (parts[1], parts[2])
        else:
            raise _unknown_resource()
        if gv not in self._openapi_v3_docs:
            self._openapi_v3_docs[gv] = openapi.openapi_v3_group_version(
                self.registry, self.schemas, gv[0], gv[1])
        doc = self._openapi_v3_docs[gv]
        if doc is None:
            raise _unknown_resource()
        return json_response(doc)

    def parse_target(self, group: str, version: str, segs: list[str]) -> Target:
        if segs and segs[0] == "watch":
            segs = segs[1:]
        ns: str | None = None
        if (len(segs) >= 3 and segs[0] == "namespaces"
                and self.registry.by_resource(group, version, segs[2]) is not None
                and self.registry.by_resource(group, version, segs[2]).namespaced):  # type: ignore[union-attr]
            ns = segs[1]
            segs = segs[2:]
        if not segs or len(segs) > 3:
            raise _unknown_resource()
        kind = self.registry.by_resource(group, version, segs[0])
        if kind is None:
            raise _unknown_resource()
        if ns is None and kind.namespaced and len(segs) > 1:
            raise _unknown_resource()
        name = segs[1] if len(segs) > 1 else None
        sub = segs[2] if len(segs) > 2 else ""
        if sub and not (
            (sub == "status" and kind.has_status)
            or (sub == "finalize" and kind.group == "" and kind.kind == "Namespace")
            or (kind.group, kind.plural, sub) in self.extra_subresources
        ):
            raise _unknown_resource()
        return Target(kind, ns, name, sub)

    # ---- the verbs -----------------------------------------------------------------------------

    def _ctx(self, request: web.Request) -> WriteContext:
        q = request.query
        dry_run = q.getall("dryRun", [])
        for d in dry_run:
            if d != "All":
                raise BadRequest(f'Invalid value: "{d}": supported values: "All"')
        validation = q.get("fieldValidation", "Warn") or "Warn"
        if validation not in ("Strict", "Warn", "Ignore"):
            raise BadRequest(f'Invalid value: "{validation}": fieldValidation must be one of '
                             '"Ignore", "Warn", or "Strict"')
        manager = q.get("fieldManager", "")
        if not manager:
            manager = request.headers.get("User-Agent", "unknown").split("/")[0] or "unknown"
        if len(manager) > 128:
            raise BadRequest("fieldManager: Too long: may not be longer than 128 characters")
        return WriteContext(self.user(request), dry_run=bool(dry_run), field_manager=manager,
                            field_validation=validation)

    def _selectors(self, request: web.Request, kind: KindInfo
                   ) -> tuple[LabelSelector | None, FieldSelector | None]:
        ls = request.query.get("labelSelector", "")
        fs = request.query.get("fieldSelector", "")
        return (parse_label_selector(ls) if ls else None,
                parse_field_selector(fs, kind) if fs else None)

    def _respond(self, request: web.Request, kind: KindInfo, obj: Obj, status: int = 200,
                 warnings: list[str] | None = None) -> web.Response:
        table = wants_table(request)
        if table and obj.get("kind") == kind.kind:
            body = build_table(kind, [obj], include_object=self._include(request),
                               list_meta={"resourceVersion": obj.get("metadata", {}).get(
                                   "resourceVersion", "")},
                               now=datetime.datetime.now(datetime.UTC), table_version=table)
            return json_response(body, status, warnings=warnings,
                                 content_type=f"application/json;as=Table;v={table};"
                                              "g=meta.k8s.io")
        if not accepts_json(request):
            raise NotAcceptable("only the following media types are accepted: application/json, "
                                "application/yaml")
        return json_response(obj, status, warnings=warnings)

    @staticmethod
    def _include(request: web.Request) -> str:
        inc = request.query.get("includeObject", "Metadata") or "Metadata"
        if inc not in ("None", "Metadata", "Object"):
            raise BadRequest(f"includeObject: unsupported value {inc!r}")
        return inc

    async def serve_resource(self, request: web.Request, group: str, version: str,
                             segs: list[str]) -> web.StreamResponse:
        target = self.parse_target(group, version, segs)
        kind, ns, name, sub = target.kind, target.namespace, target.name, target.subresource
        method = request.method
        watching = bool(segs and segs[0] == "watch") or query_bool(request, "watch")
        if name is None:
            if method == "GET":
                if watching:
                    return await self._watch(request, kind, ns)
                return await self._list(request, kind, ns)
            if method == "POST":
                if ns is None and kind.namespaced:
                    raise MethodNotAllowed("the server does not allow this method on the "
                                           "requested resource")
                ctx = self._ctx(request)
                body = await read_body(request)
                obj = await self.resources.create(kind, ns, body, ctx)
                return self._respond(request, kind, obj, 201, ctx.warnings)
            if method == "DELETE":
                ctx, options = await self._delete_ctx(request)
                labels, fields = self._selectors(request, kind)
                items = await self.resources.delete_collection(kind, ns, options, ctx,
                                                               labels=labels, fields=fields)
                return json_response({"kind": kind.list_kind, "apiVersion": kind.api_version,
                                      "metadata": {}, "items": items})
            raise MethodNotAllowed("the server does not allow this method on the requested "
                                   "resource")
        extra = self.extra_subresources.get((kind.group, kind.plural, sub)) if sub else None
        if extra is not None:
            return await extra(request, self.user(request), kind, ns, name, sub)
        if watching:
            raise MethodNotAllowed("watch of a single object: use fieldSelector=metadata.name")
        if method == "GET":
            return self._respond(request, kind, await self.resources.get(kind, ns, name))
        if method == "PUT":
            ctx = self._ctx(request)
            body = await read_body(request)
            obj = await self.resources.update(kind, ns, name, body, ctx,
                                              subresource="" if sub == "finalize" else sub)
            return self._respond(request, kind, obj, 200, ctx.warnings)
        if method == "PATCH":
            if sub == "finalize":
                raise MethodNotAllowed("finalize takes PUT")
            ctx = self._ctx(request)
            ptype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            body = await read_body(request)
            force = query_bool(request, "force")
            if force and ptype not in (PATCH_APPLY_YAML, PATCH_APPLY_JSON):
                raise BadRequest("force: Forbidden: may not be specified for non-apply patch")
            obj, created = await self.resources.patch(kind, ns, name, ptype, body, ctx,
                                                      subresource=sub, force=force)
            return self._respond(request, kind, obj, 201 if created else 200, ctx.warnings)
        if method == "DELETE":
            if sub:
                raise MethodNotAllowed("the server does not allow this method on the requested "
                                       "resource")
            ctx, options = await self._delete_ctx(request)
            obj, gone = await self.resources.delete(kind, ns, name, options, ctx)
            if gone and not kind.builtin:
                return json_response(self.resources.deleted_status(kind, obj))
            return json_response(obj)
        raise MethodNotAllowed("the server does not allow this method on the requested resource")

    async def _delete_ctx(self, request: web.Request) -> tuple[WriteContext, Obj]:
        """The write context and DeleteOptions of a DELETE: ``dryRun`` may come in the query
        or, as Kubernetes also accepts, in the DeleteOptions body."""
        ctx = self._ctx(request)
        options = await self._delete_options(request)
        body_dry = options.get("dryRun")
        if body_dry is not None:
            if not isinstance(body_dry, list) or any(d != "All" for d in body_dry):
                raise BadRequest(f'Invalid value: {json.dumps(body_dry)}: supported values: '
                                 '"All"')
            if body_dry:
                ctx = dataclasses.replace(ctx, dry_run=True)
        return ctx, options

    async def _delete_options(self, request: web.Request) -> Obj:
        body: Any = await read_body(request, allow_empty=True)
        options: Obj = body if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            raise BadRequest("DeleteOptions must be an object")
        q = request.query
        if "propagationPolicy" in q:
            options["propagationPolicy"] = q["propagationPolicy"]
        if "orphanDependents" in q:
            options["orphanDependents"] = q["orphanDependents"].lower() == "true"
        if "gracePeriodSeconds" in q:
            options["gracePeriodSeconds"] = query_int(request, "gracePeriodSeconds")
        return options

    async def _list(self, request: web.Request, kind: KindInfo,
                    ns: str | None) -> web.Response:
        labels, fields = self._selectors(request, kind)
        limit = query_int(request, "limit")
        items, list_meta = await self.resources.list_objects(
            kind, ns, labels=labels, fields=fields, limit=limit,
            continue_token=request.query.get("continue") or None)
        table = wants_table(request)
        if table:
            body = build_table(kind, items, include_object=self._include(request),
                               list_meta=list_meta, now=datetime.datetime.now(datetime.UTC),
                               table_version=table)
            return json_response(body, content_type=f"application/json;as=Table;v={table};"
                                                     "g=meta.k8s.io")
        if not accepts_json(request):
            raise NotAcceptable("only the following media types are accepted: application/json")
        return json_response({"kind": kind.list_kind, "apiVersion": kind.api_version,
                              "metadata": list_meta, "items": items}, content_type=JSON)

    async def _watch(self, request: web.Request, kind: KindInfo,
                     ns: str | None) -> web.StreamResponse:
        labels, fields = self._selectors(request, kind)
        stream = WatchStream(request, self.resources, kind, ns, labels=labels, fields=fields,
                             table_version=wants_table(request),
                             include_object=self._include(request))
        return await stream.serve()


def _unknown_resource() -> NotFound:
    return NotFound("the server could not find the requested resource")
