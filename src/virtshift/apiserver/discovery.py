"""Discovery documents: legacy (/api, /apis, /apis/G/V) and aggregated (apidiscovery.k8s.io/v2)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from virtshift import __version__
from virtshift.api.kinds import KindInfo, Obj, Registry

AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
AGGREGATED_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"

KUBE_MAJOR = "1"
KUBE_MINOR = "37"


@dataclass(frozen=True)
class VirtualResource:
    """A create-only review resource (SelfSubjectReview and friends)."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str


REVIEWS: tuple[VirtualResource, ...] = (
    VirtualResource("authentication.k8s.io", "v1", "selfsubjectreviews", "selfsubjectreview",
                    "SelfSubjectReview"),
    VirtualResource("authorization.k8s.io", "v1", "selfsubjectaccessreviews",
                    "selfsubjectaccessreview", "SelfSubjectAccessReview"),
    VirtualResource("authorization.k8s.io", "v1", "selfsubjectrulesreviews",
                    "selfsubjectrulesreview", "SelfSubjectRulesReview"),
)


def version_info() -> Obj:
    return {
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": f"v{KUBE_MAJOR}.{KUBE_MINOR}.0+virtshift.{__version__}",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a (python)",
        "compiler": "cpython",
        "platform": "linux/amd64",
    }


def _storage_hash(kind: KindInfo) -> str:
    digest = hashlib.sha256(f"{kind.group}/{kind.version}/{kind.kind}".encode()).digest()
    import base64

    return base64.b64encode(digest[:8]).decode()


class Discovery:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def groups(self) -> dict[str, list[str]]:
        out = {g: list(v) for g, v in self.registry.groups().items()}
        for r in REVIEWS:
            versions = out.setdefault(r.group, [])
            if r.version not in versions:
                versions.append(r.version)
        return out

    def api_versions(self, server_address: str) -> Obj:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
            ],
        }

    def _group(self, name: str, versions: list[str]) -> Obj:
        gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}

    def api_group_list(self) -> Obj:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(g, v) for g, v in self.groups().items() if g],
        }

    def api_group(self, group: str) -> Obj | None:
        versions = self.groups().get(group)
        if not group or not versions:
            return None
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group(group, versions)}

    def resource_list(self, group: str, version: str) -> Obj | None:
        if version not in self.groups().get(group, []):
            return None
        resources: list[Obj] = []
        for k in self.registry.in_group_version(group, version):
            entry: Obj = {
                "name": k.plural,
                "singularName": k.singular,
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": list(k.verbs),
                "storageVersionHash": _storage_hash(k),
            }
            if k.short_names:
                entry["shortNames"] = list(k.short_names)
            if k.categories:
                entry["categories"] = list(k.categories)
            resources.append(entry)
            if k.has_status:
                resources.append({"name": f"{k.plural}/status", "singularName": "",
                                  "namespaced": k.namespaced, "kind": k.kind,
                                  "verbs": ["get", "patch", "update"]})
            if k.group == "" and k.kind == "Namespace":
                resources.append({"name": "namespaces/finalize", "singularName": "",
                                  "namespaced": False, "kind": "Namespace",
                                  "verbs": ["update"]})
        for r in REVIEWS:
            if r.group == group and r.version == version:
                resources.append({"name": r.plural, "singularName": r.singular,
                                  "namespaced": False, "kind": r.kind, "verbs": ["create"]})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": resources}

    def aggregated(self, core: bool) -> Obj:
        """The apidiscovery.k8s.io/v2 document for ``/api`` (core) or ``/apis``."""
        items: list[Obj] = []
        for group, versions in self.groups().items():
            if (group == "") != core:
                continue
            vitems: list[Obj] = []
            for version in versions:
                rl = self.resource_list(group, version)
                assert rl is not None
                resources: list[Obj] = []
                by_name: dict[str, Obj] = {}
                for r in rl["resources"]:
                    name: str = r["name"]
                    if "/" in name:
                        parent, _, sub = name.partition("/")
                        owner = by_name.get(parent)
                        if owner is not None:
                            owner.setdefault("subresources", []).append({
                                "subresource": sub,
                                "responseKind": {"group": group, "version": version,
                                                 "kind": r["kind"]},
                                "verbs": r["verbs"],
                            })
                        continue
                    entry: Obj = {
                        "resource": name,
                        "responseKind": {"group": group, "version": version, "kind": r["kind"]},
                        "scope": "Namespaced" if r["namespaced"] else "Cluster",
                        "singularResource": r["singularName"],
                        "verbs": r["verbs"],
                    }
                    if r.get("shortNames"):
                        entry["shortNames"] = r["shortNames"]
                    if r.get("categories"):
                        entry["categories"] = r["categories"]
                    by_name[name] = entry
                    resources.append(entry)
                vitems.append({"version": version, "resources": resources,
                               "freshness": "Current"})
            items.append({"metadata": {"name": group, "creationTimestamp": None},
                          "versions": vitems})
        return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
                "metadata": {}, "items": items}
