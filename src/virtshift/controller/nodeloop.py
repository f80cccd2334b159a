"""The node controller's loop: node lifecycle, VMI failover and evacuation, one node at a time.

Decisions are pure (:mod:`virtshift.controller.node`, :mod:`virtshift.controller.evacuation`);
this loop keeps Reflector-fed caches of Nodes, VMIs, migrations and the KubeVirt CR, reconciles
node keys from a work queue (a VMI or migration event queues the VMI's node; a KubeVirt CR event
queues every node) and applies the decisions, each write pinned to the resourceVersion it was
decided on. Every pass also schedules the next look at the node (when its grace period or
failover grace would run out, or a migration slot or backoff might free up).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping

from virtshift.api.kinds import KindInfo, Obj, Registry
from virtshift.api.migration import cluster_config, cluster_eviction_strategy
from virtshift.client.rest import Client
from virtshift.controller import events
from virtshift.controller.evacuation import (
    REASON_SUCCESSFUL_CREATE,
    EvacuationPlan,
    plan_evacuation,
)
from virtshift.controller.manager import (
    ObjectCache,
    WorkQueue,
    remove_finalizers,
    run_reflectors,
    serve,
)
from virtshift.controller.node import (
    NODE_AGENT_FINALIZER,
    REASON_NODE_UNRESPONSIVE,
    FailoverDecision,
    NodeDecision,
    NodeTimings,
    Observation,
    observe,
    ready_status,
    reconcile_failover,
    reconcile_node,
    timings_from_env,
)
from virtshift.controller.vmi import Key, key_of, meta, status_of
from virtshift.errors import BadRequest, Forbidden, Invalid, NotFound

log = logging.getLogger(__name__)

ADMISSION_REFUSED_RECHECK = 10.0


class NodeController:
    """Node lifecycle (Ready=Unknown, unreachable taints), VMI failover on lost nodes and the
    evacuation of drained nodes."""

    def __init__(self, client: Client, registry: Registry, timings: NodeTimings | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.timings = timings or timings_from_env(os.environ if env is None else env)
        kind = registry.require
        self.node_kind = kind("", "v1", "Node")
        self.vmi_kind = kind("kubevirt.io", "v1", "VirtualMachineInstance")
        self.vmim_kind = kind("kubevirt.io", "v1", "VirtualMachineInstanceMigration")
        self.kv_kind = kind("kubevirt.io", "v1", "KubeVirt")
        self.nodes, self.vmis, self.vmims, self.kubevirts = (
            ObjectCache(), ObjectCache(), ObjectCache(), ObjectCache())
        self._caches = {self.node_kind.plural: self.nodes, self.vmi_kind.plural: self.vmis,
                        self.vmim_kind.plural: self.vmims, self.kv_kind.plural: self.kubevirts}
        self.seen: dict[str, Observation] = {}
        self.queue = WorkQueue()
        self.synced = asyncio.Event()

    # ---- events --------------------------------------------------------------------------------

    def _queue_node_of(self, vmi: Obj | None) -> None:
        node = status_of(vmi).get("nodeName") if vmi is not None else None
        if node:
            self.queue.add(("", str(node)))

    def _on_event(self, event: str, kind: KindInfo, obj: Obj) -> None:
        self._caches[kind.plural].apply(event, obj)
        if kind is self.node_kind:
            self.queue.add(key_of(obj))
        elif kind is self.vmi_kind:
            self._queue_node_of(obj)
        elif kind is self.vmim_kind:
            ns = key_of(obj)[0]
            name = str((obj.get("spec") or {}).get("vmiName") or "")
            self._queue_node_of(self.vmis.get((ns, name)))
        else:
            for key in self.nodes.objects:
                self.queue.add(key)

    async def run(self) -> None:
        log.info("node controller: heartbeat %gs, grace %gs, failover %gs",
                 self.timings.heartbeat, self.timings.grace, self.timings.failover)
        tasks = await run_reflectors(self.client, [self.node_kind, self.vmi_kind,
                                                   self.vmim_kind, self.kv_kind],
                                     self._on_event, self.synced, "node")
        await serve("Node", tasks, self.synced, self.queue, self.reconcile)

    # ---- one pass ------------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> bool:
        name = key[1]
        node = self.nodes.get(key)
        if node is None:
            self.seen.pop(name, None)
            return True
        now = datetime.datetime.now(datetime.UTC)
        seen = self.seen[name] = observe(self.seen.get(name), node, now)
        decision = reconcile_node(node, seen, now, self.timings)
        node = await self._apply_node(node, decision)
        rechecks = [decision.recheck_after]

        failover = reconcile_failover(node, self.vmis.values(), now, self.timings)
        await self._apply_failover(node, failover)
        rechecks.append(failover.recheck_after)

        if ready_status(node) == "True":  # a lost node cannot send its VMIs anywhere
            kubevirts = self.kubevirts.values()
            plan = plan_evacuation(node, self.vmis.values(), self.vmims.values(),
                                   cluster_config(kubevirts),
                                   cluster_eviction_strategy(kubevirts), now)
            rechecks.append(await self._apply_evacuation(name, plan))
        due = [r for r in rechecks if r is not None]
        if due:
            self.queue.add_after(key, min(due))
        return True

    async def _apply_node(self, node: Obj, decision: NodeDecision) -> Obj:
        name = key_of(node)[1]
        if decision.status is not None:
            node = await self.client.update(self.node_kind, None,
                                            {**node, "status": decision.status},
                                            subresource="status")
            self.nodes.put(node)
            log.warning("node %s: no heartbeat for more than %gs: Ready=Unknown, tainted "
                        "unreachable", name, self.timings.grace)
        if decision.taints is not None or decision.labels is not None:
            patch: Obj = {"metadata": {"resourceVersion": meta(node).get("resourceVersion")}}
            if decision.labels is not None:
                patch["metadata"]["labels"] = decision.labels
            if decision.taints is not None:
                patch["spec"] = {"taints": decision.taints or None}
            node = await self.client.patch(self.node_kind, None, name, patch)
            self.nodes.put(node)
            if decision.status is None and decision.labels is None:
                log.info("node %s: heartbeats resumed: unreachable taints removed", name)
        if decision.lost:
            await events.record(self.client, node, self.node_kind, events.NORMAL,
                                REASON_NODE_UNRESPONSIVE,
                                "virt-handler is not responsive, marking node as unresponsive")
        return node

    async def _apply_failover(self, node: Obj, decision: FailoverDecision) -> None:
        node_name = key_of(node)[1]
        for action in decision.actions:
            vmi = self.vmis.get(action.key)
            if vmi is None or str(meta(vmi).get("uid")) != action.uid:
                continue
            ns, name = action.key
            try:
                # The finalizer goes first: until the VMI is Failed nobody else writes it, so
                # the two writes do not race the VM controller's reaction to the failure.
                if action.drop_finalizer:
                    out = await remove_finalizers(self.client, self.vmi_kind, self.vmis, vmi,
                                                  (NODE_AGENT_FINALIZER,))
                    if out is None:
                        continue
                    vmi = out
                if action.status is not None:
                    vmi = await self.client.update(self.vmi_kind, ns,
                                                   {**vmi, "status": action.status},
                                                   subresource="status")
                    self.vmis.put(vmi)
                    log.warning("VMI %s/%s: node %s lost: Failed (%s)", ns, name, node_name,
                                REASON_NODE_UNRESPONSIVE)
                    await events.record(self.client, vmi, self.vmi_kind, events.NORMAL,
                                        REASON_NODE_UNRESPONSIVE, action.message)
            except NotFound:
                continue

    async def _apply_evacuation(self, node_name: str, plan: EvacuationPlan) -> float | None:
        recheck = plan.recheck_after
        for ev in plan.events:
            vmi = self.vmis.get(ev.key)
            if vmi is not None:
                await events.record(self.client, vmi, self.vmi_kind, ev.type, ev.reason,
                                    ev.message)
        for action in plan.evacuate:
            vmi = self.vmis.get(action.key)
            if vmi is None or str(meta(vmi).get("uid")) != action.uid:
                continue
            ns, name = action.key
            try:
                if action.mark:
                    vmi = await self.client.update(
                        self.vmi_kind, ns,
                        {**vmi, "status": {**status_of(vmi), "evacuationNodeName": node_name}},
                        subresource="status")
                    self.vmis.put(vmi)
                created = await self.client.create(self.vmim_kind, ns, action.migration)
            except NotFound:
                continue
            except (Invalid, Forbidden, BadRequest) as e:
                # Admission refused it (not running, not LiveMigratable, already migrating):
                # not now; look again later.
                log.info("node %s: evacuation of VMI %s/%s not possible now: %s", node_name,
                         ns, name, e)
                recheck = min(recheck or ADMISSION_REFUSED_RECHECK, ADMISSION_REFUSED_RECHECK)
                continue
            self.vmims.put(created)
            vmim_name = str(meta(created).get("name"))
            log.info("node %s: evacuating VMI %s/%s with migration %s", node_name, ns, name,
                     vmim_name)
            await events.record(self.client, vmi, self.vmi_kind, events.NORMAL,
                                REASON_SUCCESSFUL_CREATE, f"Created Migration {vmim_name}")
        return recheck
