"""Placement of VirtualMachineInstances on nodes: kube-scheduler's job for virt-launcher pods.

Upstream KubeVirt renders a virt-launcher pod per VMI and kube-scheduler places it. virtshift has
no pods, so :func:`place` is a pure function that plays both parts: it derives the requests the
launcher pod would carry from the VMI spec, then runs the scheduler's default filters and scores
over ``core/v1`` Node objects.

Requests (``pkg/virt-controller/services/renderresources.go``), simplified:

* memory: ``domain.resources.requests.memory`` (admission defaults it to ``memory.guest``), else
  ``memory.guest``, else the memory limit; plus the launcher overhead of ``GetMemoryOverhead``:
  page tables (request / 512), 220Mi for the launcher processes, 8Mi per vCPU, 8Mi for the IO
  thread, 32Mi of video RAM unless ``autoattachGraphicsDevice`` is false, 53Mi for a TPM, 1Gi for
  VFIO devices (GPUs, host devices, SR-IOV), 1Mi for downward metrics, 256Mi for SEV, 100Mi with
  dedicated CPUs or guaranteed QoS, 128Mi on arm64 and the exec-probe overheads. Hugepages count
  as memory (no hugepage resources), and the additional overhead ratio is not configurable.
* cpu: ``domain.resources.requests.cpu``, else the CPU limit, else one whole CPU per vCPU with
  ``dedicatedCpuPlacement``, else vCPUs / ``cpuAllocationRatio`` (10): 100m per vCPU, vCPUs being
  cores * sockets * threads.

Filters, in kube-scheduler's order, each node failing on the first plugin that rejects it:
NodeUnschedulable (``spec.unschedulable`` unless the unschedulable taint is tolerated),
TaintToleration (NoSchedule/NoExecute taints; a node whose Ready condition is not True carries the
``node.kubernetes.io/not-ready`` (False) or ``node.kubernetes.io/unreachable`` (Unknown, missing)
NoSchedule taint the node lifecycle controller would add), NodeAffinity (``spec.nodeSelector``,
required node affinity terms with In/NotIn/Exists/DoesNotExist/Gt/Lt and ``matchFields`` on
``metadata.name``; nodes labelled ``kubevirt.io/schedulable: "false"`` fail here too, as the
launcher pod's ``kubevirt.io/schedulable`` node selector would make them), NodeResourcesFit
(``status.allocatable`` minus the requests of the VMIs already placed on the node).

Scores, with the default profile's weights: NodeAffinity preferred terms (2), TaintToleration
PreferNoSchedule (3), NodeResourcesFit LeastAllocated (1), NodeResourcesBalancedAllocation (1).
Ties go to the node whose name sorts first (kube-scheduler picks one of them at random).

With no fit the result carries the scheduler's FitError text, preemption part included, e.g.
``0/3 nodes are available: 1 Insufficient memory, 2 node(s) didn't match Pod's node
affinity/selector. preemption: 0/3 nodes are available: 1 No preemption victims found for
incoming pod, 2 Preemption is not helpful for scheduling.`` (virtshift has no preemption, so the
nodes that only lack resources have no victims and the others cannot be helped).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtshift.api.admission import quantity

CPU_ALLOCATION_RATIO = 10
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
TAINT_NOT_READY = "node.kubernetes.io/not-ready"
TAINT_UNREACHABLE = "node.kubernetes.io/unreachable"
TAINT_UNSCHEDULABLE = "node.kubernetes.io/unschedulable"

ERR_UNSCHEDULABLE = "node(s) were unschedulable"
ERR_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
ERR_NO_NODES = "no nodes available to schedule pods"
ERR_VOLUME_AFFINITY = "node(s) had volume node affinity conflict"
PREEMPTION_NO_VICTIMS = "No preemption victims found for incoming pod"
PREEMPTION_NOT_HELPFUL = "Preemption is not helpful for scheduling"
# Phases whose VMIs hold resources on their node.
_ACTIVE_PHASES = ("Scheduling", "Scheduled", "Running", "Unknown", "WaitingForSync")

_MI = 1024 * 1024


@dataclass(frozen=True)
class Requests:
    """What a VMI's launcher would request: milli-CPUs and bytes of memory."""

    cpu_milli: int
    memory: int

    def __add__(self, other: Requests) -> Requests:
        return Requests(self.cpu_milli + other.cpu_milli, self.memory + other.memory)


@dataclass(frozen=True)
class Placement:
    """The chosen node, or ``node`` None with the scheduler's ``message``."""

    node: str | None
    message: str = ""
    reason: str = ""  # "Unschedulable" when no node fits


# ---- small readers ---------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _qty(value: Any) -> quantity.Quantity | None:
    if value is None:
        return None
    try:
        return quantity.parse_value(value)
    except (ValueError, TypeError):
        return None


def _bytes(value: Any) -> int | None:
    q = _qty(value)
    return q.value() if q is not None else None


def _milli(value: Any) -> int | None:
    q = _qty(value)
    return q.milli_value() if q is not None else None


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---- requests --------------------------------------------------------------------------------


def vcpus(domain: Mapping[str, Any]) -> int:
    """``GetNumberOfVCPUs``: cores * sockets * threads (each at least 1), else the CPU limit or
    request rounded up; at least 1."""
    cpu = domain.get("cpu")
    if isinstance(cpu, dict):
        n = 1
        for key in ("cores", "sockets", "threads"):
            n *= max(_int(cpu.get(key), 1), 1)
        return max(n, 1)
    resources = _dict(domain.get("resources"))
    for source in (_dict(resources.get("limits")), _dict(resources.get("requests"))):
        q = _qty(source.get("cpu"))
        if q is not None:
            return max(q.value(), 1)
    return 1


def _memory_request(domain: Mapping[str, Any]) -> int:
    resources = _dict(domain.get("resources"))
    for value in (_dict(resources.get("requests")).get("memory"),
                  _dict(domain.get("memory")).get("guest"),
                  _dict(resources.get("limits")).get("memory")):
        b = _bytes(value)
        if b is not None and b > 0:
            return b
    return 0


def memory_overhead(spec: Mapping[str, Any], request: int) -> int:
    """The launcher's memory on top of the guest's (``GetMemoryOverhead``, simplified)."""
    domain = _dict(spec.get("domain"))
    devices = _dict(domain.get("devices"))
    kilo = -(-request // 1000)  # ScaledValue(Kilo) rounds up
    overhead = kilo * 1000 // 512  # page tables
    overhead += (25 + 100 + 25 + 40 + 30) * _MI  # monitor, launcher, virtlogd, virtqemud, qemu
    overhead += 8 * _MI * vcpus(domain)
    overhead += 8 * _MI  # IO thread
    if devices.get("autoattachGraphicsDevice") is not False:
        overhead += 32 * _MI
    if spec.get("architecture") == "arm64":
        overhead += 128 * _MI
    interfaces = [_dict(i) for i in _list(devices.get("interfaces"))]
    if (_list(devices.get("hostDevices")) or _list(devices.get("gpus"))
            or any("sriov" in i for i in interfaces)):
        overhead += 1024 * _MI
    if any("downwardMetrics" in _dict(v) for v in _list(spec.get("volumes"))):
        overhead += _MI
    liveness = "exec" in _dict(spec.get("livenessProbe"))
    readiness = "exec" in _dict(spec.get("readinessProbe"))
    overhead += 10 * _MI * (int(liveness) + int(readiness))
    if liveness or readiness:
        overhead += 100 * _MI
    launch = _dict(domain.get("launchSecurity"))
    if "sev" in launch or "snp" in launch:
        overhead += 256 * _MI
    tpm = devices.get("tpm")
    if isinstance(tpm, dict) and tpm.get("enabled") is not False:
        overhead += 53 * _MI
    if _dict(domain.get("cpu")).get("dedicatedCpuPlacement") or _guaranteed(domain):
        overhead += 100 * _MI
    return overhead


def _guaranteed(domain: Mapping[str, Any]) -> bool:
    resources = _dict(domain.get("resources"))
    requests, limits = _dict(resources.get("requests")), _dict(resources.get("limits"))
    return all(
        key in limits and _qty(limits[key]) == _qty(requests.get(key, limits[key]))
        for key in ("cpu", "memory")
    )


def vmi_requests(vmi: Mapping[str, Any]) -> Requests:
    """The CPU and memory the VMI's launcher pod would request."""
    spec = _dict(vmi.get("spec"))
    domain = _dict(spec.get("domain"))
    resources = _dict(domain.get("resources"))
    cpu = _milli(_dict(resources.get("requests")).get("cpu"))
    if cpu is None:
        cpu = _milli(_dict(resources.get("limits")).get("cpu"))
    if cpu is None:
        n = vcpus(domain)
        dedicated = _dict(domain.get("cpu")).get("dedicatedCpuPlacement")
        cpu = n * 1000 if dedicated else n * 1000 // CPU_ALLOCATION_RATIO
    memory = _memory_request(domain)
    return Requests(cpu, memory + memory_overhead(spec, memory))


# ---- node predicates -------------------------------------------------------------------------


def node_ready_status(node: Mapping[str, Any]) -> str:
    for cond in _list(_dict(node.get("status")).get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown")
    return "Unknown"


def effective_taints(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The node's taints plus those kube-controller-manager's node lifecycle controller and the
    node controller would add for a NotReady, unreachable or cordoned node."""
    taints = [t for t in _list(_dict(node.get("spec")).get("taints")) if isinstance(t, dict)]
    keys = {(t.get("key"), t.get("effect")) for t in taints}

    def add(key: str) -> None:
        if (key, "NoSchedule") not in keys:
            taints.append({"key": key, "effect": "NoSchedule"})

    ready = node_ready_status(node)
    if ready == "False":
        add(TAINT_NOT_READY)
    elif ready != "True":
        add(TAINT_UNREACHABLE)
    if _dict(node.get("spec")).get("unschedulable") is True:
        add(TAINT_UNSCHEDULABLE)
    return taints


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """``Toleration.ToleratesTaint``."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    if operator == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    return False


def _tolerated(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    return any(tolerates(t, taint) for t in tolerations)


def _requirement_matches(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key = str(req.get("key", ""))
    op = req.get("operator")
    values = [str(v) for v in _list(req.get("values"))]
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def term_matches(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """A NodeSelectorTerm: all its requirements hold; a term without any matches nothing."""
    meta = _dict(node.get("metadata"))
    labels = {str(k): str(v) for k, v in _dict(meta.get("labels")).items()}
    exprs = [e for e in _list(term.get("matchExpressions")) if isinstance(e, dict)]
    fields = [f for f in _list(term.get("matchFields")) if isinstance(f, dict)]
    if not exprs and not fields:
        return False
    if not all(_requirement_matches(e, labels) for e in exprs):
        return False
    names = {"metadata.name": str(meta.get("name", ""))}
    return all(
        f.get("key") == "metadata.name" and f.get("operator") in ("In", "NotIn")
        and _requirement_matches(f, names) for f in fields
    )


def _node_affinity(spec: Mapping[str, Any]) -> dict[str, Any]:
    return _dict(_dict(spec.get("affinity")).get("nodeAffinity"))


def matches_affinity(spec: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """The NodeAffinity filter: nodeSelector, required terms and KubeVirt's schedulable label."""
    labels = _dict(_dict(node.get("metadata")).get("labels"))
    if labels.get(SCHEDULABLE_LABEL) == "false":
        return False
    selector = _dict(spec.get("nodeSelector"))
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = _node_affinity(spec).get("requiredDuringSchedulingIgnoredDuringExecution")
    if isinstance(required, dict):
        terms = [t for t in _list(required.get("nodeSelectorTerms")) if isinstance(t, dict)]
        return any(term_matches(t, node) for t in terms)
    return True


def node_allocatable(node: Mapping[str, Any]) -> Requests:
    status = _dict(node.get("status"))
    alloc = _dict(status.get("allocatable")) or _dict(status.get("capacity"))
    return Requests(_milli(alloc.get("cpu")) or 0, _bytes(alloc.get("memory")) or 0)


def _phase(vmi: Mapping[str, Any]) -> str:
    return str(_dict(vmi.get("status")).get("phase") or "")


def node_usage(placed: Iterable[Mapping[str, Any]], exclude_uid: str = "") -> dict[str, Requests]:
    """The requests of the VMIs holding resources, per node name."""
    used: dict[str, Requests] = {}
    for vmi in placed:
        node = _dict(vmi.get("status")).get("nodeName")
        if not node or _phase(vmi) not in _ACTIVE_PHASES:
            continue
        if exclude_uid and _dict(vmi.get("metadata")).get("uid") == exclude_uid:
            continue
        used[str(node)] = used.get(str(node), Requests(0, 0)) + vmi_requests(vmi)
    return used


# ---- the scheduling cycle --------------------------------------------------------------------


def _filter(spec: Mapping[str, Any], node: Mapping[str, Any], need: Requests,
            used: Requests) -> tuple[list[str], bool]:
    """Failure reasons for one node and whether they are unresolvable by preemption."""
    tolerations = [t for t in _list(spec.get("tolerations")) if isinstance(t, dict)]
    if _dict(node.get("spec")).get("unschedulable") is True and not _tolerated(
            tolerations, {"key": TAINT_UNSCHEDULABLE, "effect": "NoSchedule"}):
        return [ERR_UNSCHEDULABLE], True
    for taint in effective_taints(node):
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if taint.get("key") == TAINT_UNSCHEDULABLE:
            continue  # NodeUnschedulable's business
        if not _tolerated(tolerations, taint):
            return [f"node(s) had untolerated taint {{{taint.get('key', '')}: "
                    f"{taint.get('value', '') or ''}}}"], True
    if not matches_affinity(spec, node):
        return [ERR_AFFINITY], True
    alloc = node_allocatable(node)
    reasons: list[str] = []
    if need.cpu_milli > alloc.cpu_milli - used.cpu_milli:
        reasons.append("Insufficient cpu")
    if need.memory > alloc.memory - used.memory:
        reasons.append("Insufficient memory")
    return reasons, False


def _score(spec: Mapping[str, Any], node: Mapping[str, Any], need: Requests,
           used: Requests) -> tuple[float, float, float, float]:
    """Raw plugin scores: preferred affinity weight sum, intolerable PreferNoSchedule taints,
    LeastAllocated and BalancedAllocation (0-100)."""
    preferred = 0.0
    for pref in _list(_node_affinity(spec).get(
            "preferredDuringSchedulingIgnoredDuringExecution")):
        if isinstance(pref, dict) and term_matches(_dict(pref.get("preference")), node):
            preferred += _int(pref.get("weight"))
    tolerations = [t for t in _list(spec.get("tolerations")) if isinstance(t, dict)
                   and (not t.get("effect") or t.get("effect") == "PreferNoSchedule")]
    prefer_no = sum(1 for t in effective_taints(node)
                    if t.get("effect") == "PreferNoSchedule" and not _tolerated(tolerations, t))
    alloc = node_allocatable(node)
    fractions = []
    least = 0.0
    for have, want in ((alloc.cpu_milli, used.cpu_milli + need.cpu_milli),
                       (alloc.memory, used.memory + need.memory)):
        if have <= 0:
            fractions.append(1.0)
            continue
        least += max(have - want, 0) * 100 / have / 2
        fractions.append(min(want / have, 1.0))
    mean = sum(fractions) / len(fractions)
    std = math.sqrt(sum((f - mean) ** 2 for f in fractions) / len(fractions))
    return preferred, float(prefer_no), least, (1 - std) * 100


def _fit_message(total: int, failures: Mapping[str, tuple[list[str], bool]]) -> str:
    histogram: Counter[str] = Counter()
    preemption: Counter[str] = Counter()
    for reasons, unresolvable in failures.values():
        histogram.update(reasons)
        preemption[PREEMPTION_NOT_HELPFUL if unresolvable else PREEMPTION_NO_VICTIMS] += 1

    def render(counts: Counter[str]) -> str:
        return ", ".join(sorted(f"{n} {reason}" for reason, n in counts.items()))

    return (f"0/{total} nodes are available: {render(histogram)}. preemption: 0/{total} nodes "
            f"are available: {render(preemption)}.")


def place(vmi: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]],
          placed: Iterable[Mapping[str, Any]], *, volume_node: str = "") -> Placement:
    """Choose a node for ``vmi`` among ``nodes``, given the VMIs already ``placed`` (any VMIs:
    only those with ``status.nodeName`` in an active phase count, and never ``vmi`` itself).
    ``volume_node`` is where its bound node-local volumes are (the VolumeBinding filter)."""
    if not nodes:
        return Placement(None, ERR_NO_NODES, "Unschedulable")
    spec = _dict(vmi.get("spec"))
    need = vmi_requests(vmi)
    usage = node_usage(placed, str(_dict(vmi.get("metadata")).get("uid", "")))
    failures: dict[str, tuple[list[str], bool]] = {}
    feasible: list[Mapping[str, Any]] = []
    for node in nodes:
        name = str(_dict(node.get("metadata")).get("name", ""))
        reasons, unresolvable = _filter(spec, node, need, usage.get(name, Requests(0, 0)))
        if not reasons and volume_node and name != volume_node:
            reasons, unresolvable = [ERR_VOLUME_AFFINITY], True  # VolumeBinding, after Fit
        if reasons:
            failures[name] = (reasons, unresolvable)
        else:
            feasible.append(node)
    if not feasible:
        return Placement(None, _fit_message(len(nodes), failures), "Unschedulable")
    raw = {str(_dict(n.get("metadata")).get("name", "")):
           _score(spec, n, need, usage.get(str(_dict(n.get("metadata")).get("name", "")),
                                           Requests(0, 0)))
           for n in feasible}
    max_pref = max(s[0] for s in raw.values())
    max_taint = max(s[1] for s in raw.values())

    def total(name: str) -> float:
        pref, taint, least, balanced = raw[name]
        affinity = pref * 100 / max_pref if max_pref > 0 else 0.0
        toleration = (max_taint - taint) * 100 / max_taint if max_taint > 0 else 100.0
        return 2 * affinity + 3 * toleration + least + balanced

    best = min(raw, key=lambda name: (-total(name), name))
    return Placement(best)
