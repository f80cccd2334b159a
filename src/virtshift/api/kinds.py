"""Every kind the API serves, as data.

A kind is one :class:`KindInfo` entry: its group, version, names, scope, printer columns and the
OpenAPI definition that validates it. The API server, discovery, OpenAPI documents, tables and the
CLI all read this registry; adding a kind is adding an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

CORE_SCHEMA_SOURCE = "core"
KUBEVIRT_SCHEMA_SOURCE = "kubevirt"
CDI_SCHEMA_SOURCE = "cdi"


@dataclass(frozen=True)
class PrinterColumn:
    """A column of ``kubectl get`` output (a CRD ``additionalPrinterColumns`` entry)."""

    name: str
    type: str  # string | integer | number | boolean | date
    json_path: str  # a kubectl-style JSONPath, e.g. .status.printableStatus
    priority: int = 0  # > 0: only with -o wide
    description: str = ""
    format: str = ""


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")


@dataclass(frozen=True)
class KindInfo:
    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    # Columns after Name. An empty tuple means the default single Age column.
    columns: tuple[PrinterColumn, ...] = ()
    # (source, definition name) in the OpenAPI definitions; source is "kubevirt", "cdi" or "core".
    schema: tuple[str, str] | None = None
    has_status: bool = True
    # Core kinds take strategic merge patches; custom resources do not.
    builtin: bool = False
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )
    # Extra fields usable in fieldSelector besides metadata.name / metadata.namespace.
    selectable_fields: tuple[str, ...] = ()
    # Fields outside .spec that count as user intent for metadata.generation.
    generation_ignores_status: bool = True
    extra: Obj = field(default_factory=dict, compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """``plural.group`` as used in Status messages (``virtualmachines.kubevirt.io``)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``Kind.group`` as used in Invalid messages (``VirtualMachine.kubevirt.io``)."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def columns_or_default(self) -> tuple[PrinterColumn, ...]:
        return self.columns or (AGE,)


def _ready(cond: str = "Ready") -> str:
    return f".status.conditions[?(@.type=='{cond}')].status"


_KV_CATEGORIES = ("all",)

KINDS: tuple[KindInfo, ...] = (
    # ---- core/v1 -------------------------------------------------------------------------
    KindInfo(
        "", "v1", "Namespace", "namespaces", "namespace", False, ("ns",),
        columns=(PrinterColumn("Status", "string", ".status.phase"), AGE),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.Namespace"), builtin=True,
        selectable_fields=("status.phase",),
    ),
    KindInfo(
        "", "v1", "Node", "nodes", "node", False, ("no",),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.Node"), builtin=True,
        selectable_fields=("spec.unschedulable",),
    ),
    KindInfo(
        "", "v1", "Event", "events", "event", True, ("ev",),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.Event"), builtin=True, has_status=False,
        selectable_fields=(
            "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
            "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
            "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
        ),
    ),
    KindInfo(
        "", "v1", "ConfigMap", "configmaps", "configmap", True, ("cm",),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.ConfigMap"), builtin=True, has_status=False,
    ),
    KindInfo(
        "", "v1", "Secret", "secrets", "secret", True,
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.Secret"), builtin=True, has_status=False,
        selectable_fields=("type",),
    ),
    KindInfo(
        "", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim", True,
        ("pvc",), schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.PersistentVolumeClaim"),
        builtin=True,
    ),
    KindInfo(
        "", "v1", "PersistentVolume", "persistentvolumes", "persistentvolume", False, ("pv",),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.core.v1.PersistentVolume"), builtin=True,
    ),
    # ---- storage.k8s.io/v1 ---------------------------------------------------------------
    KindInfo(
        "storage.k8s.io", "v1", "StorageClass", "storageclasses", "storageclass", False, ("sc",),
        schema=(CORE_SCHEMA_SOURCE, "io.k8s.api.storage.v1.StorageClass"), builtin=True,
        has_status=False,
    ),
    # ---- kubevirt.io/v1 ------------------------------------------------------------------
    KindInfo(
        "kubevirt.io", "v1", "VirtualMachine", "virtualmachines", "virtualmachine", True,
        ("vm", "vms"), _KV_CATEGORIES,
        columns=(
            AGE,
            PrinterColumn("Status", "string", ".status.printableStatus",
                          description="Human Readable Status"),
            PrinterColumn("Ready", "string", _ready()),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1.VirtualMachine"),
    ),
    KindInfo(
        "kubevirt.io", "v1", "VirtualMachineInstance", "virtualmachineinstances",
        "virtualmachineinstance", True, ("vmi", "vmis"), _KV_CATEGORIES,
        columns=(
            AGE,
            PrinterColumn("Phase", "string", ".status.phase"),
            PrinterColumn("IP", "string", ".status.interfaces[0].ipAddress"),
            PrinterColumn("NodeName", "string", ".status.nodeName"),
            PrinterColumn("Ready", "string", _ready()),
            PrinterColumn("Live-Migratable", "string", _ready("LiveMigratable"), priority=1),
            PrinterColumn("Paused", "string", _ready("Paused"), priority=1),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1.VirtualMachineInstance"),
        selectable_fields=("status.phase", "status.nodeName"),
    ),
    KindInfo(
        "kubevirt.io", "v1", "VirtualMachineInstanceMigration",
        "virtualmachineinstancemigrations", "virtualmachineinstancemigration", True,
        ("vmim", "vmims"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Phase", "string", ".status.phase",
                          description="The current phase of VM instance migration"),
            PrinterColumn("VMI", "string", ".spec.vmiName",
                          description="The name of the VMI to perform the migration on"),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1.VirtualMachineInstanceMigration"),
    ),
    KindInfo(
        "kubevirt.io", "v1", "VirtualMachineInstanceReplicaSet",
        "virtualmachineinstancereplicasets", "virtualmachineinstancereplicaset", True,
        ("vmirs", "vmirss"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Desired", "integer", ".spec.replicas",
                          description="Number of desired VirtualMachineInstances"),
            PrinterColumn("Current", "integer", ".status.replicas",
                          description="Number of managed and not final or deleted "
                                      "VirtualMachineInstances"),
            PrinterColumn("Ready", "integer", ".status.readyReplicas",
                          description="Number of managed VirtualMachineInstances which are "
                                      "ready to receive traffic"),
            AGE,
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1.VirtualMachineInstanceReplicaSet"),
    ),
    KindInfo(
        "kubevirt.io", "v1", "KubeVirt", "kubevirts", "kubevirt", True, ("kv", "kvs"),
        _KV_CATEGORIES,
        columns=(AGE, PrinterColumn("Phase", "string", ".status.phase")),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1.KubeVirt"),
    ),
    # ---- migrations.kubevirt.io/v1alpha1 -------------------------------------------------
    KindInfo(
        "migrations.kubevirt.io", "v1alpha1", "MigrationPolicy", "migrationpolicies",
        "migrationpolicy", False, (),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1alpha1.MigrationPolicy"),
    ),
    # ---- instancetype.kubevirt.io/v1beta1 ------------------------------------------------
    KindInfo(
        "instancetype.kubevirt.io", "v1beta1", "VirtualMachineInstancetype",
        "virtualmachineinstancetypes", "virtualmachineinstancetype", True,
        ("vminstancetype", "vminstancetypes", "vmf", "vmfs"), _KV_CATEGORIES,
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineInstancetype"), has_status=False,
    ),
    KindInfo(
        "instancetype.kubevirt.io", "v1beta1", "VirtualMachineClusterInstancetype",
        "virtualmachineclusterinstancetypes", "virtualmachineclusterinstancetype", False,
        ("vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineClusterInstancetype"),
        has_status=False,
    ),
    KindInfo(
        "instancetype.kubevirt.io", "v1beta1", "VirtualMachinePreference",
        "virtualmachinepreferences", "virtualmachinepreference", True,
        ("vmpref", "vmprefs", "vmp", "vmps"), _KV_CATEGORIES,
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachinePreference"), has_status=False,
    ),
    KindInfo(
        "instancetype.kubevirt.io", "v1beta1", "VirtualMachineClusterPreference",
        "virtualmachineclusterpreferences", "virtualmachineclusterpreference", False,
        ("vmcp", "vmcps"),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineClusterPreference"),
        has_status=False,
    ),
    # ---- snapshot.kubevirt.io/v1beta1 ----------------------------------------------------
    KindInfo(
        "snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshot", "virtualmachinesnapshots",
        "virtualmachinesnapshot", True, ("vmsnapshot", "vmsnapshots"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("SourceKind", "string", ".spec.source.kind"),
            PrinterColumn("SourceName", "string", ".spec.source.name"),
            PrinterColumn("Phase", "string", ".status.phase"),
            PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse"),
            PrinterColumn("CreationTime", "date", ".status.creationTime"),
            PrinterColumn("Error", "string", ".status.error.message"),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineSnapshot"),
    ),
    KindInfo(
        "snapshot.kubevirt.io", "v1beta1", "VirtualMachineSnapshotContent",
        "virtualmachinesnapshotcontents", "virtualmachinesnapshotcontent", True,
        ("vmsnapshotcontent", "vmsnapshotcontents"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("ReadyToUse", "boolean", ".status.readyToUse"),
            PrinterColumn("CreationTime", "date", ".status.creationTime"),
            PrinterColumn("Error", "string", ".status.error.message"),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineSnapshotContent"),
    ),
    KindInfo(
        "snapshot.kubevirt.io", "v1beta1", "VirtualMachineRestore", "virtualmachinerestores",
        "virtualmachinerestore", True, ("vmrestore", "vmrestores"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("TargetKind", "string", ".spec.target.kind"),
            PrinterColumn("TargetName", "string", ".spec.target.name"),
            PrinterColumn("Complete", "boolean", ".status.complete"),
            PrinterColumn("RestoreTime", "date", ".status.restoreTime"),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineRestore"),
    ),
    # ---- clone.kubevirt.io/v1beta1 -------------------------------------------------------
    KindInfo(
        "clone.kubevirt.io", "v1beta1", "VirtualMachineClone", "virtualmachineclones",
        "virtualmachineclone", True, ("vmclone", "vmclones"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Phase", "string", ".status.phase"),
            PrinterColumn("SourceVirtualMachine", "string", ".spec.source.name"),
            PrinterColumn("TargetVirtualMachine", "string", ".spec.target.name"),
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachineClone"),
    ),
    # ---- pool.kubevirt.io/v1beta1 --------------------------------------------------------
    KindInfo(
        "pool.kubevirt.io", "v1beta1", "VirtualMachinePool", "virtualmachinepools",
        "virtualmachinepool", True, ("vmpool", "vmpools"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Desired", "integer", ".spec.replicas",
                          description="Number of desired VirtualMachines"),
            PrinterColumn("Current", "integer", ".status.replicas",
                          description="Number of managed and not final or deleted "
                                      "VirtualMachines"),
            PrinterColumn("Ready", "integer", ".status.readyReplicas",
                          description="Number of managed VirtualMachines which are ready to "
                                      "receive traffic"),
            AGE,
        ),
        schema=(KUBEVIRT_SCHEMA_SOURCE, "v1beta1.VirtualMachinePool"),
    ),
    # ---- cdi.kubevirt.io/v1beta1 ---------------------------------------------------------
    KindInfo(
        "cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes", "datavolume", True,
        ("dv", "dvs"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Phase", "string", ".status.phase",
                          description="The phase the data volume is in"),
            PrinterColumn("Progress", "string", ".status.progress",
                          description="Transfer progress in percentage if known, N/A otherwise"),
            PrinterColumn("Restarts", "integer", ".status.restartCount",
                          description="The number of times the transfer has been restarted."),
            AGE,
        ),
        schema=(CDI_SCHEMA_SOURCE, "v1beta1.DataVolume"),
    ),
    KindInfo(
        "cdi.kubevirt.io", "v1beta1", "DataSource", "datasources", "datasource", True,
        ("das",), _KV_CATEGORIES,
        schema=(CDI_SCHEMA_SOURCE, "v1beta1.DataSource"),
    ),
    KindInfo(
        "cdi.kubevirt.io", "v1beta1", "DataImportCron", "dataimportcrons", "dataimportcron",
        True, ("dic", "dics"), _KV_CATEGORIES,
        columns=(
            PrinterColumn("Format", "string", ".status.sourceFormat",
                          description="The format in which created sources are saved"),
        ),
        schema=(CDI_SCHEMA_SOURCE, "v1beta1.DataImportCron"),
    ),
    KindInfo(
        "cdi.kubevirt.io", "v1beta1", "CDIConfig", "cdiconfigs", "cdiconfig", False,
        schema=(CDI_SCHEMA_SOURCE, "v1beta1.CDIConfig"),
    ),
    KindInfo(
        "upload.cdi.kubevirt.io", "v1beta1", "UploadTokenRequest", "uploadtokenrequests",
        "uploadtokenrequest", True, ("utr", "utrs"),
        schema=(CDI_SCHEMA_SOURCE, "v1beta1.UploadTokenRequest"),
    ),
    # ---- virtshift.io/v1alpha1: the cluster image store ---------------------------------
    KindInfo(
        "virtshift.io", "v1alpha1", "Image", "images", "image", False, ("img",),
        columns=(
            PrinterColumn("Reference", "string", ".spec.reference",
                          description="The image reference a containerDisk names"),
            PrinterColumn("Type", "string", ".status.type"),
            PrinterColumn("Size", "integer", ".status.size"),
            PrinterColumn("Phase", "string", ".status.phase"),
            AGE,
        ),
        selectable_fields=("spec.reference",),
    ),
    # ---- operators' configuration kinds (accepted and stored; no schema is published) ----
    KindInfo(
        "hco.kubevirt.io", "v1beta1", "HyperConverged", "hyperconvergeds", "hyperconverged",
        True, ("hco", "hcos"), _KV_CATEGORIES,
        columns=(AGE,),
    ),
    KindInfo(
        "hco.kubevirt.io", "v1", "HyperConverged", "hyperconvergeds", "hyperconverged",
        True, ("hco", "hcos"), _KV_CATEGORIES,
        columns=(AGE,),
    ),
    KindInfo(
        "hostpathprovisioner.kubevirt.io", "v1beta1", "HostPathProvisioner",
        "hostpathprovisioners", "hostpathprovisioner", False, (),
        columns=(AGE,),
    ),
)


class Registry:
    """Lookups over :data:`KINDS`."""

    def __init__(self, kinds: tuple[KindInfo, ...] = KINDS) -> None:
        self.kinds = kinds
        self._by_resource: dict[tuple[str, str, str], KindInfo] = {}
        self._by_kind: dict[tuple[str, str, str], KindInfo] = {}
        for k in kinds:
            self._by_resource[(k.group, k.version, k.plural)] = k
            self._by_kind[(k.group, k.version, k.kind)] = k

    def by_resource(self, group: str, version: str, plural: str) -> KindInfo | None:
        return self._by_resource.get((group, version, plural))

    def by_kind(self, group: str, version: str, kind: str) -> KindInfo | None:
        return self._by_kind.get((group, version, kind))

    def require(self, group: str, version: str, kind: str) -> KindInfo:
        """A kind the code relies on being registered (a KeyError names it if not)."""
        found = self._by_kind.get((group, version, kind))
        if found is None:
            raise KeyError(f"kind {group}/{version} {kind} is not registered")
        return found

    def by_api_version(self, api_version: str, kind: str) -> KindInfo | None:
        group, _, version = api_version.rpartition("/")
        return self.by_kind(group, version, kind)

    def groups(self) -> dict[str, list[str]]:
        """Group name -> served versions, preferred first, in registration order."""
        out: dict[str, list[str]] = {}
        for k in self.kinds:
            versions = out.setdefault(k.group, [])
            if k.version not in versions:
                versions.append(k.version)
        return out

    def in_group_version(self, group: str, version: str) -> list[KindInfo]:
        return [k for k in self.kinds if k.group == group and k.version == version]


REGISTRY = Registry()
