"""KubeVirt's subresource API group, ``subresources.kubevirt.io`` (versions ``v1``, ``v1alpha3``).

Wiring (app.py), for a path ``/apis/subresources.kubevirt.io/...``:

* ``GET /apis/subresources.kubevirt.io`` -> ``json_response(api_group())``; list the same group in
  ``/apis`` (``APIGroupList``) and in the aggregated discovery document.
* ``GET /apis/subresources.kubevirt.io/{version}`` -> ``json_response(resource_list(version))``
  (``None`` for an unknown version: 404).
* ``/apis/subresources.kubevirt.io/{version}/namespaces/{ns}/{resource}/{name}/{subresource}``
  (any method; ``version`` in :data:`VERSIONS`) ->
  ``code, body = await handle_subresource(self.resources, self.registry, request.method, ns,
  resource, name, subresource, await request.read(), self.user(request))``;
  answer ``code`` with ``body`` as JSON, or with an empty body when ``body`` is None (upstream's
  ``202 Accepted`` has none). Errors are raised as :class:`~virtshift.errors.ApiError` and become
  Status objects like every other error.

Implemented here: ``PUT virtualmachines/{start,stop,restart}`` with upstream's rules
(``pkg/virt-api/rest/lifecycle.go``):

* start (StartOptions ``paused``, ``dryRun``): 409 ``VM is already running`` while a VMI exists
  that is not final and not Unknown/unset; ``Halted`` becomes ``Always`` (``running: true`` for
  VMs that use ``spec.running``), or with ``paused`` gets a Start request carrying
  ``{"paused": "true"}``; ``Manual``/``RerunOnFailure`` get a Start request (Stop+Start after a
  final VMI; ``RerunOnFailure`` refuses a Failed one); ``Always``/``Once`` refuse.
* stop (StopOptions ``gracePeriod``, ``dryRun``): a grace period is first written into the live
  VMI's ``spec.terminationGracePeriodSeconds``; ``Always``/``Once`` become ``Halted``
  (``running: false``); ``Manual``/``RerunOnFailure`` get a Stop request for the VMI's UID;
  ``Halted`` only takes a Stop request with a shorter grace period.
* restart (RestartOptions ``gracePeriodSeconds`` 0 only, ``dryRun``): Stop+Start requests for
  every strategy but ``Halted``/``Once``; with ``gracePeriodSeconds: 0`` the VMI is also deleted at
  once (upstream deletes its launcher pod), and the VM controller recreates it.

A request queued while another is pending fails as upstream does (500 ``stop/start already
underway``), except a Stop, which replaces the queue. Any request clears ``status.startFailure``.

And ``PUT virtualmachines/migrate`` (MigrateOptions ``addedNodeSelector``, ``dryRun``; upstream's
``MigrateVMRequestHandler``): 404 when the VM or its VMI does not exist, 409 ``VM is not running``
unless the VMI is ``Running``; then a VirtualMachineInstanceMigration ``kubevirt-migrate-vm-*``
for the VMI is created through the ordinary create path (admission included, as virt-api's
service account); a refusal comes back as upstream's 500 ``Internal error occurred: ...``.

Other listed subresources are served elsewhere (or not yet): they answer 404 here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import yaml

from virtshift.api.gojson import go_json_type
from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.apiserver.auth import COMPONENT_USER, UserInfo
from virtshift.apiserver.resources import PATCH_MERGE, Resources, WriteContext
from virtshift.errors import (
    ApiError,
    BadRequest,
    Conflict,
    InternalError,
    MethodNotAllowed,
    NotFound,
)

GROUP = "subresources.kubevirt.io"
VERSIONS = ("v1", "v1alpha3")
FIELD_MANAGER = "virt-api"
ATTEMPTS = 8

# The resource list virt-api serves for each version (names only: namespaced, no verbs).
RESOURCES = (
    "expand-vm-spec",
    "virtualmachineinstances/vnc",
    "virtualmachineinstances/vnc/screenshot",
    "virtualmachineinstances/console",
    "virtualmachineinstances/portforward",
    "virtualmachineinstances/pause",
    "virtualmachineinstances/unpause",
    "virtualmachineinstances/freeze",
    "virtualmachineinstances/unfreeze",
    "virtualmachineinstances/softreboot",
    "virtualmachineinstances/reset",
    "virtualmachineinstances/backup",
    "virtualmachineinstances/evacuate/cancel",
    "virtualmachineinstances/objectgraph",
    "virtualmachineinstances/usbredir",
    "virtualmachineinstances/vsock",
    "virtualmachines/start",
    "virtualmachines/stop",
    "virtualmachines/restart",
    "virtualmachines/migrate",
    "virtualmachines/expand-spec",
    "virtualmachines/portforward",
    "virtualmachines/addvolume",
    "virtualmachines/removevolume",
    "virtualmachines/memorydump",
    "virtualmachines/removememorydump",
    "virtualmachines/evacuate/cancel",
    "virtualmachines/objectgraph",
    "virtualmachineinstances/guestosinfo",
    "virtualmachineinstances/userlist",
    "virtualmachineinstances/filesystemlist",
    "virtualmachineinstances/addvolume",
    "virtualmachineinstances/removevolume",
    "virtualmachineinstances/sev/fetchcertchain",
    "virtualmachineinstances/sev/querylaunchmeasurement",
    "virtualmachineinstances/sev/setupsession",
    "virtualmachineinstances/sev/injectlaunchsecret",
)

VM_RECOVERY_REQUIRED = (
    "VM recovery required: Volume migration failed, leaving some volumes pointing to "
    "non-consistent targets; manual intervention is needed to reassign them to their original "
    "volumes."
)
TEST_FAILED = "jsonpatch test operation does not apply"
UNDERWAY = "unable to complete request: stop/start already underway"
MIGRATION_GENERATE_NAME = "kubevirt-migrate-vm-"


def api_group() -> Obj:
    versions = [{"groupVersion": f"{GROUP}/{v}", "version": v} for v in VERSIONS]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": versions,
            "preferredVersion": versions[0]}


def resource_list(version: str) -> Obj | None:
    """The ``APIResourceList`` of ``GET /apis/subresources.kubevirt.io/{version}``."""
    if version not in VERSIONS:
        return None
    return {
        "kind": "APIResourceList", "apiVersion": version, "groupVersion": f"{GROUP}/{version}",
        "resources": [{"name": r, "singularName": "", "namespaced": True, "kind": "",
                       "verbs": None} for r in RESOURCES],
    }


# ---- errors as virt-api words them -------------------------------------------------------------


def _conflict(name: str, message: str) -> Conflict:
    return Conflict(f'Operation cannot be fulfilled on virtualmachine.kubevirt.io "{name}": '
                    f"{message}", name=name, group="kubevirt.io", kind="virtualmachine")


def _internal(message: str) -> InternalError:
    return InternalError(f"Internal error occurred: {message}")


# ---- request bodies ----------------------------------------------------------------------------

_OPTION_FIELDS: dict[str, dict[str, str]] = {
    "StartOptions": {"paused": "bool", "dryRun": "[]string"},
    "StopOptions": {"gracePeriod": "int64", "dryRun": "[]string"},
    "RestartOptions": {"gracePeriodSeconds": "int64", "dryRun": "[]string"},
    "MigrateOptions": {"addedNodeSelector": "map[string]string", "dryRun": "[]string"},
}


def _go_type_error(struct: str, key: str, gotype: str, value: Any) -> str | None:
    """encoding/json's complaint about ``value`` for field ``key`` of Go type ``gotype``."""
    target = f"Go struct field {struct}.{key}"
    if gotype == "[]string" and isinstance(value, list):
        elems = list(value)
    elif gotype == "map[string]string" and isinstance(value, dict):
        elems = list(value.values())
    else:
        ok = (gotype == "bool" and isinstance(value, bool)) or (
            gotype == "int64" and isinstance(value, int) and not isinstance(value, bool))
        return None if ok else f"{go_json_type(value)} into {target} of type {gotype}"
    bad = [v for v in elems if v is not None and not isinstance(v, str)]
    return f"{go_json_type(bad[0])} into {target} of type string" if bad else None


def decode_options(struct: str, body: Any) -> Obj:
    """Decode an options body like ``yaml.NewYAMLOrJSONDecoder`` into upstream's struct: unknown
    fields are ignored, an empty body is the zero value, a wrong type is a 400."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        if not body.strip():
            return {}
        try:
            body = json.loads(body)
        except json.JSONDecodeError:
            try:
                body = yaml.safe_load(body)
            except yaml.YAMLError as e:
                raise BadRequest(f"Can not unmarshal Request body to struct, error: "
                                 f"error converting YAML to JSON: {e}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"Can not unmarshal Request body to struct, error: json: cannot "
                         f"unmarshal {go_json_type(body)} into Go value of type v1.{struct}")
    out: Obj = {}
    for key, gotype in _OPTION_FIELDS[struct].items():
        value = body.get(key)
        if value is None:
            continue
        complaint = _go_type_error(struct, key, gotype, value)
        if complaint is not None:
            raise BadRequest(f"Can not unmarshal Request body to struct, error: json: cannot "
                             f"unmarshal {complaint}")
        out[key] = value
    for d in out.get("dryRun", []):
        if d != "All":
            raise BadRequest(f'Invalid value: "{d}": supported values: "All"')
    return out


# ---- shared steps ------------------------------------------------------------------------------


def _phase(vmi: Obj | None) -> str:
    return str(((vmi or {}).get("status") or {}).get("phase") or "")


def _is_final(vmi: Obj | None) -> bool:
    return _phase(vmi) in ("Succeeded", "Failed")


def _run_strategy(vm: Obj) -> str:
    spec = vm.get("spec") or {}
    running, strategy = spec.get("running"), spec.get("runStrategy")
    if running is not None and strategy is not None:
        raise _internal("running and runstrategy are mutually exclusive")
    if running is not None:
        return "Always" if running is True else "Halted"
    return str(strategy) if strategy else "Halted"


def _has_condition(obj: Obj, ctype: str, status: str) -> bool:
    return any(isinstance(c, dict) and c.get("type") == ctype and c.get("status") == status
               for c in (obj.get("status") or {}).get("conditions") or [])


def _context(user: UserInfo, dry_run: bool) -> WriteContext:
    """virt-api writes as KubeVirt itself (its service account may change a VMI's spec, e.g.
    the grace period of a stop); the caller was authenticated before."""
    del user
    return WriteContext(COMPONENT_USER, dry_run=dry_run, field_manager=FIELD_MANAGER)


class _Request:
    """One subresource call: the kinds, the write context and the objects it reads."""

    def __init__(self, resources: Resources, registry: Registry, namespace: str, name: str,
                 user: UserInfo, dry_run: bool) -> None:
        self.resources = resources
        self.vm_kind: KindInfo = registry.require("kubevirt.io", "v1", "VirtualMachine")
        self.vmi_kind: KindInfo = registry.require("kubevirt.io", "v1", "VirtualMachineInstance")
        self.ns, self.name = namespace, name
        self.ctx = _context(user, dry_run)

    async def vm(self) -> Obj:
        try:
            return await self.resources.get(self.vm_kind, self.ns, self.name)
        except NotFound:
            raise NotFound(f'virtualmachine.kubevirt.io "{self.name}" not found',
                           name=self.name, group="kubevirt.io", kind="virtualmachine") from None
        except ApiError as e:
            raise _internal(f"unable to retrieve vm [{self.name}]: {e.message}") from None

    async def vmi(self) -> Obj | None:
        try:
            return await self.resources.get(self.vmi_kind, self.ns, self.name)
        except NotFound:
            return None
        except ApiError as e:
            raise _internal(e.message) from None

    async def change_requests(self, vm: Obj, changes: list[Obj]) -> None:
        """``getChangeRequestJson`` applied with its ``test`` of the current requests."""
        expected = copy.deepcopy((vm.get("status") or {}).get("stateChangeRequests") or [])
        for _ in range(ATTEMPTS):
            status = copy.deepcopy(vm.get("status") or {})
            current = status.get("stateChangeRequests") or []
            if current != expected:
                raise _conflict(self.name, TEST_FAILED)
            if current and not (len(changes) == 1 and changes[0].get("action") == "Stop"):
                raise _internal(UNDERWAY)
            status["stateChangeRequests"] = copy.deepcopy(changes)
            status.pop("startFailure", None)
            try:
                await self.resources.update(self.vm_kind, self.ns, self.name,
                                            {**vm, "status": status}, self.ctx,
                                            subresource="status")
                return
            except Conflict:
                vm = await self.vm()
            except ApiError as e:
                raise _internal(e.message) from None
        raise _conflict(self.name, TEST_FAILED)

    async def set_running(self, vm: Obj, running: bool) -> None:
        """``getRunningPatch``: flip ``runStrategy`` (or ``running``), testing its old value."""
        spec = vm.get("spec") or {}
        field = "runStrategy" if spec.get("runStrategy") is not None else "running"
        expected = spec.get(field)
        value: Any = ("Always" if running else "Halted") if field == "runStrategy" else running
        await self._patch(self.vm_kind, vm, "spec", field, expected, value, self.vm)

    async def set_grace_period(self, vmi: Obj, grace: int) -> None:
        expected = (vmi.get("spec") or {}).get("terminationGracePeriodSeconds")
        await self._patch(self.vmi_kind, vmi, "spec", "terminationGracePeriodSeconds",
                          expected, grace, self._vmi_or_gone)

    async def _vmi_or_gone(self) -> Obj:
        vmi = await self.vmi()
        if vmi is None:
            raise _internal(f'virtualmachineinstances.kubevirt.io "{self.name}" not found')
        return vmi

    async def _patch(self, kind: KindInfo, obj: Obj, section: str, field: str, expected: Any,
                     value: Any, reread: Callable[[], Any]) -> None:
        for _ in range(ATTEMPTS):
            if (obj.get(section) or {}).get(field) != expected:
                raise _conflict(self.name, TEST_FAILED)
            body = {section: {field: value},
                    "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}}
            try:
                await self.resources.patch(kind, self.ns, self.name, PATCH_MERGE, body,
                                           self.ctx)
                return
            except Conflict:
                obj = await reread()
            except ApiError as e:
                raise _internal(e.message) from None
        raise _conflict(self.name, TEST_FAILED)


# ---- the handlers --------------------------------------------------------------------------------


async def _start(req: _Request, opts: Obj) -> None:
    vm = await req.vm()
    vmi = await req.vmi()
    if vmi is not None and not _is_final(vmi) and _phase(vmi) not in ("Unknown", ""):
        raise _conflict(req.name, "VM is already running")
    if _has_condition(vm, "ManualRecoveryRequired", "True"):
        raise _conflict(req.name, VM_RECOVERY_REQUIRED)
    paused = opts.get("paused") is True
    start: Obj = {"action": "Start"}
    if paused:
        start["data"] = {"paused": "true"}
    strategy = _run_strategy(vm)
    if strategy == "Halted":
        if paused:
            await req.change_requests(vm, [start])
        else:
            await req.set_running(vm, True)
    elif strategy in ("RerunOnFailure", "Manual"):
        if strategy == "RerunOnFailure" and _phase(vmi) == "Failed":
            raise _conflict(req.name, "RerunOnFailure does not support starting VM from failed "
                                      "state")
        restart = vmi is not None and (_phase(vmi) == "Succeeded" if strategy == "RerunOnFailure"
                                       else _is_final(vmi))
        uid = ((vmi or {}).get("metadata") or {}).get("uid")
        changes = [{"action": "Stop", "uid": uid}, start] if restart else [start]
        await req.change_requests(vm, changes)
    elif strategy in ("Always", "Once"):
        raise _conflict(req.name, f"{strategy} does not support manual start requests")


async def _stop(req: _Request, opts: Obj) -> None:
    vm = await req.vm()
    strategy = _run_strategy(vm)
    vmi = await req.vmi()
    live = vmi is not None and not _is_final(vmi)
    grace = opts.get("gracePeriod")
    old_grace: int | None = None
    if vmi is not None and live and grace is not None:
        old = (vmi.get("spec") or {}).get("terminationGracePeriodSeconds")
        old_grace = old if isinstance(old, int) else None
        await req.set_grace_period(vmi, grace)
    if strategy in ("Halted", "RerunOnFailure", "Manual"):
        if vmi is None or not live:
            raise _conflict(req.name, "VM is not running")
        if strategy == "Halted" and (grace is None or (
                old_grace is not None and grace >= old_grace)):
            raise _conflict(req.name, "Halted only supports manual stop requests with a shorter "
                                      "graceperiod")
        uid = (vmi.get("metadata") or {}).get("uid")
        await req.change_requests(vm, [{"action": "Stop", "uid": uid}])
    elif strategy in ("Always", "Once"):
        await req.set_running(vm, False)


async def _restart(req: _Request, opts: Obj) -> None:
    grace = opts.get("gracePeriodSeconds")
    if grace is not None and grace > 0:
        raise BadRequest("For force restart, only gracePeriod=0 is supported for now")
    if grace is not None and grace < 0:
        raise BadRequest("gracePeriod has to be greater or equal to 0")
    vm = await req.vm()
    if _has_condition(vm, "VolumesChange", "True"):
        raise _conflict(req.name, VM_RECOVERY_REQUIRED)
    strategy = _run_strategy(vm)
    if strategy in ("Halted", "Once"):
        raise _conflict(req.name, f"RunStategy {strategy} does not support manual restart "
                                  "requests")
    vmi = await req.vmi()
    if vmi is None:
        raise _conflict(req.name, "VM is not running: Halted")
    uid = (vmi.get("metadata") or {}).get("uid")
    await req.change_requests(vm, [{"action": "Stop", "uid": uid}, {"action": "Start"}])
    if grace == 0 and not _is_final(vmi):
        try:
            await req.resources.delete(req.vmi_kind, req.ns, req.name,
                                       {"preconditions": {"uid": uid}}, req.ctx)
        except NotFound:
            pass
        except ApiError as e:
            raise _internal(e.message) from None


async def _migrate(req: _Request, opts: Obj) -> None:
    await req.vm()
    vmi = await req.vmi()
    if vmi is None:
        raise NotFound(f'virtualmachineinstance.kubevirt.io "{req.name}" not found',
                       name=req.name, group="kubevirt.io", kind="virtualmachineinstance")
    if _phase(vmi) != "Running":
        raise _conflict(req.name, "VM is not running")
    spec: Obj = {"vmiName": req.name}
    if opts.get("addedNodeSelector"):
        spec["addedNodeSelector"] = opts["addedNodeSelector"]
    migration = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                 "metadata": {"generateName": MIGRATION_GENERATE_NAME}, "spec": spec}
    kind = req.resources.registry.require("kubevirt.io", "v1",
                                          "VirtualMachineInstanceMigration")
    try:
        await req.resources.create(kind, req.ns, migration, req.ctx)
    except ApiError as e:
        raise _internal(e.message) from None


_HANDLERS = {
    "start": ("StartOptions", _start),
    "stop": ("StopOptions", _stop),
    "restart": ("RestartOptions", _restart),
    "migrate": ("MigrateOptions", _migrate),
}


async def handle_subresource(server_resources: Resources, registry: Registry, method: str,
                             namespace: str, resource: str, name: str, subresource: str,
                             body: Any, user: UserInfo) -> tuple[int, Obj | None]:
    """Serve one subresource request; returns (HTTP status, JSON body or None for no body).

    ``body`` is the raw request body (bytes or str, possibly empty) or already decoded JSON."""
    entry = _HANDLERS.get(subresource) if resource == "virtualmachines" else None
    if entry is None:
        raise NotFound("the server could not find the requested resource")
    if method != "PUT":
        raise MethodNotAllowed(f"the server does not allow this method on the requested "
                               f"resource: {method} {resource}/{subresource}")
    struct, handler = entry
    opts = decode_options(struct, body)
    req = _Request(server_resources, registry, namespace, name, user,
                   dry_run=bool(opts.get("dryRun")))
    await handler(req, opts)
    return 202, None
