"""DataVolume admission (``cdi.kubevirt.io``).

Upstream: CDI ``pkg/apiserver/webhooks/datavolume-validate.go`` and ``util.go``. The checks
that read other objects (the source PVC, snapshot or DataSource of a clone, an existing target
PVC) are not made here.

``spec.pvc`` / ``spec.storage`` count as given when the key is present, even as JSON null: the
corpus example ``clone-datavolume.yaml`` has an empty ``storage:`` and relies on CDI defaulting
it. Upstream's Go decoding would read that null as absent, and ``kubectl apply`` drops the null
before sending; :func:`default_datavolume` therefore gives a clone with neither an empty
``storage`` (size, class and modes then come from the source and the cluster's defaults).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from virtshift.api.admission import quantity
from virtshift.api.admission._util import (
    DUPLICATE,
    INVALID,
    Obj,
    Path,
    as_dict,
    as_list,
    as_str,
    cause,
    is_set,
)
from virtshift.errors import FieldError

NAME_MAX = 253  # DNS1123SubdomainMaxLength
SOURCES = (
    "http", "s3", "gcs", "registry", "pvc", "upload", "blank", "imageio", "vddk", "snapshot",
)
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


def present(spec: Obj, key: str) -> bool:
    """``spec.pvc``/``spec.storage`` given (see the module note on null)."""
    return key in spec


def validate(obj: Obj, old: Obj | None) -> list[FieldError]:
    """``dataVolumeValidatingWebhook.Admit``."""
    spec = as_dict(obj.get("spec"))
    if old is not None:
        old_spec = as_dict(old.get("spec"))
        if spec != old_spec and not _checkpoint_update(spec, old_spec):
            return [cause(DUPLICATE, "DataVolume.Spec", "Cannot update DataVolume Spec")]
    name = as_str(as_dict(obj.get("metadata")).get("name"))
    if len(name) > NAME_MAX:
        return [cause(INVALID, "", f"Name cannot be longer than {NAME_MAX} characters")]
    return validate_spec(Path("spec"), spec)


def _checkpoint_update(spec: Obj, old_spec: Obj) -> bool:
    """A multi-stage (VDDK/ImageIO) import may change only its checkpoints."""
    source = as_dict(spec.get("source"))
    if not as_list(spec.get("checkpoints")) or not (
        is_set(source, "vddk") or is_set(source, "imageio")
    ):
        return False

    def strip(s: Obj) -> Obj:
        return {k: v for k, v in s.items() if k not in ("checkpoints", "finalCheckpoint")}

    return strip(spec) == strip(old_spec)


def validate_spec(field: Path, spec: Obj) -> list[FieldError]:
    """``validateDataVolumeSpec``: the first problem found, as upstream returns early."""
    has_pvc, has_storage = present(spec, "pvc"), present(spec, "storage")
    if not has_pvc and not has_storage:
        return [cause(INVALID, field.child("PVC"), "Missing Data volume PVC")]
    if has_pvc and has_storage:
        return [cause(
            INVALID, field.child("PVC", "Storage"),
            "Duplicate storage definition, both target storage and target pvc defined",
        )]
    target_name = "PVC" if has_pvc else "Storage"
    target = as_dict(spec.get("pvc" if has_pvc else "storage"))
    size_error = _validate_size(field, spec, target_name, target)
    if size_error is not None:
        return [size_error]
    class_name = as_str(target.get("storageClassName"))
    if len(class_name) > NAME_MAX:
        return [cause(INVALID, "", f"Name cannot be longer than {NAME_MAX} characters")]
    modes = [as_str(m) for m in as_list(target.get("accessModes"))]
    modes_at = field.child("PVC", "accessModes")
    if has_pvc:
        if not modes:
            return [cause(
                INVALID, modes_at, "Required value: at least 1 access mode is required"
            )]
        if len(modes) > 1:
            return [cause(INVALID, modes_at, "PVC multiple accessModes")]
    if any(m not in ACCESS_MODES for m in modes):
        return [cause(
            INVALID, modes_at,
            f'Unsupported value: "{modes[0]}": supported values: "ReadOnlyMany", '
            '"ReadWriteMany", "ReadWriteOnce"',
        )]
    data_source, data_source_ref = target.get("dataSource"), target.get("dataSourceRef")
    if data_source is not None or data_source_ref is not None:
        return _validate_external_population(field, spec, data_source, data_source_ref)
    has_source, has_ref = is_set(spec, "source"), is_set(spec, "sourceRef")
    if has_source == has_ref:
        return [cause(
            INVALID, field.child("source"),
            "Data volume should have either Source or SourceRef, or be externally populated",
        )]
    if has_ref:
        return _validate_source_ref(field, as_dict(spec.get("sourceRef")))
    return validate_source(field, spec)


def _validate_size(field: Path, spec: Obj, name: str, target: Obj) -> FieldError | None:
    """``validateStorageSize``: a positive size, or none for a clone with ``storage``."""
    source = as_dict(spec.get("source"))
    is_clone = (
        is_set(spec, "sourceRef") or is_set(source, "pvc") or is_set(source, "snapshot")
    )
    requests = as_dict(as_dict(target.get("resources")).get("requests"))
    at = field.child(name, "resources", "requests", "size")
    if "storage" in requests:
        try:
            size = quantity.parse_value(requests["storage"])
        except ValueError:
            return cause(INVALID, at, quantity.FORMAT_ERROR)
        if size.amount <= 0:
            return cause(INVALID, at, f"{name} size can't be equal or less than zero")
        return None
    if name == "PVC" or not is_clone:
        return cause(INVALID, at, f"{name} size is missing")
    return None


def _validate_external_population(
    field: Path, spec: Obj, data_source: object, data_source_ref: object
) -> list[FieldError]:
    errs: list[FieldError] = []
    if is_set(spec, "source") or is_set(spec, "sourceRef"):
        errs.append(cause(
            INVALID, field.child("source"),
            "External population is incompatible with Source and SourceRef",
        ))
    if data_source is not None and data_source_ref is not None and data_source != data_source_ref:
        errs.append(cause(INVALID, "", "DataSourceRef and DataSource must match"))
    for value, label, at in (
        (data_source, "DataSource", field.child("dataSource")),
        (data_source_ref, "DataSourceRef", field.child("dataSourceRef")),
    ):
        if value is None:
            continue
        ref = as_dict(value)
        if label == "DataSourceRef" and as_str(ref.get("namespace")):
            errs.append(cause(
                INVALID, at.child("namespace", ""),
                "Invalid value: DataSourceRef namespace not supported",
            ))
        if not as_str(ref.get("name")):
            errs.append(cause(INVALID, at.child("name", ""), f"Required value: {label} name"))
        if not as_str(ref.get("kind")):
            errs.append(cause(INVALID, at.child("kind"), f"Required value: {label} kind"))
        if not as_str(ref.get("apiGroup")) and ref.get("kind") != "PersistentVolumeClaim":
            errs.append(cause(
                INVALID, at.child("apiGroup", ""),
                f"Required value: {label} apiGroup when kind is not 'PersistentVolumeClaim'",
            ))
    return errs


def _validate_source_ref(field: Path, ref: Obj) -> list[FieldError]:
    kind = as_str(ref.get("kind"))
    if not kind:
        return [cause(INVALID, field.child("sourceRef", "Kind"), "Missing sourceRef kind")]
    if kind != "DataSource":
        return [cause(
            INVALID, field.child("sourceRef", "Kind"),
            f"Unsupported sourceRef kind {kind}, currently only DataSource is supported",
        )]
    if not as_str(ref.get("name")):
        return [cause(INVALID, field.child("sourceRef", "Name"), "Missing sourceRef name")]
    return []


def source_url_error(url: str) -> str:
    """``validateSourceURL``: an absolute http(s)/gs URI, as ``url.ParseRequestURI`` reads it."""
    if not url:
        return "source URL is empty"
    scheme = _SCHEME.match(url)
    if _BAD_URL_CHARS.search(url) or (scheme is None and not url.startswith("/")):
        return f"Invalid source URL: {url}"
    try:
        urlsplit(url)
    except ValueError:
        return f"Invalid source URL: {url}"
    if scheme is None or scheme.group(1).lower() not in ("http", "https", "gs"):
        return f"Invalid source URL scheme: {url}"
    return ""


def _check_url(field: Path, url: str, source_type: str) -> list[FieldError]:
    error = source_url_error(url)
    if error:
        return [cause(
            INVALID, field.child("source", source_type, "url"), f"{field.child('source')} {error}"
        )]
    return []


def validate_source(field: Path, spec: Obj) -> list[FieldError]:
    """The ``spec.source`` part of ``validateDataVolumeSpec``."""
    source = as_dict(spec.get("source"))
    count = sum(1 for s in SOURCES if is_set(source, s))
    if count == 0:
        return [cause(INVALID, field.child("source"), "Missing Data volume source")]
    if count > 1:
        return [cause(INVALID, field.child("source"), "Multiple Data volume sources")]
    content_type = as_str(spec.get("contentType"))
    if content_type not in ("", "kubevirt", "archive"):
        return [cause(
            INVALID, field.child("contentType"), "ContentType not one of: kubevirt, archive"
        )]
    for key, label in (("http", "HTTP"), ("s3", "S3"), ("gcs", "GCS")):
        if is_set(source, key):
            errs = _check_url(field, as_str(as_dict(source.get(key)).get("url")), label)
            if errs:
                return errs
    if is_set(source, "blank") and content_type == "archive":
        return [cause(
            INVALID, field.child("contentType"),
            "SourceType cannot be blank and the contentType be archive",
        )]
    registry = source.get("registry")
    if isinstance(registry, dict):
        errs = _validate_registry(field, registry, content_type)
        if errs:
            return errs
    imageio = source.get("imageio")
    if isinstance(imageio, dict):
        if not all(as_str(imageio.get(k)) for k in ("secretRef", "certConfigMap", "diskId")):
            at = field.child("source", "Imageio")
            return [cause(INVALID, at, f"{at} source Imageio is not valid")]
        errs = _check_url(field, as_str(imageio.get("url")), "ImageIO")
        if errs:
            return errs
    vddk = source.get("vddk")
    if isinstance(vddk, dict):
        if not all(as_str(vddk.get(k)) for k in ("secretRef", "uuid", "backingFile", "thumbprint")):
            at = field.child("source", "VDDK")
            return [cause(INVALID, at, f"{at} source VDDK is not valid")]
        errs = _check_url(field, as_str(vddk.get("url")), "VDDK")
        if errs:
            return errs
    for key, label, noun in (("pvc", "PVC", "PVC"), ("snapshot", "Snapshot", "snapshot")):
        ref = source.get(key)
        if isinstance(ref, dict) and not (
            as_str(ref.get("namespace")) and as_str(ref.get("name"))
        ):
            at = field.child("source", label)
            return [cause(INVALID, at, f"{at} source {noun} is not valid")]
    return []


def _validate_registry(field: Path, registry: Obj, content_type: str) -> list[FieldError]:
    if content_type not in ("", "kubevirt"):
        return [cause(
            INVALID, field.child("contentType"),
            "ContentType must be kubevirt when Source is Registry",
        )]
    at = field.child("source", "Registry")
    url, image_stream = registry.get("url"), registry.get("imageStream")
    if (url is None) == (image_stream is None):
        return [cause(INVALID, at, "Source registry should have either URL or ImageStream")]
    if url is not None:
        text = as_str(url)
        scheme = _SCHEME.match(text)
        if scheme is None or scheme.group(1).lower() not in ("docker", "oci"):
            return [cause(
                INVALID, at.child("URL"), f"Illegal registry source URL scheme {text}"
            )]
    pull = registry.get("pullMethod")
    if pull is not None and pull not in ("pod", "node"):
        return [cause(
            INVALID, at.child("importMethod"),
            f'ImportMethod {pull} is neither pod, node or ""',
        )]
    if image_stream is not None and not as_str(image_stream):
        return [cause(
            INVALID, at.child("importMethod"), "Source registry ImageStream is not valid"
        )]
    if image_stream is not None and pull != "node":
        return [cause(
            INVALID, at.child("importMethod"),
            "Source registry ImageStream is supported only with node pull import method",
        )]
    return []


def default_datavolume(obj: Obj) -> None:
    """A clone (PVC, snapshot or DataSource source) with neither ``pvc`` nor ``storage`` gets
    ``storage: {}``: everything about the target is then inherited or defaulted."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or spec.get("pvc") is not None:
        return
    if spec.get("storage") is not None:
        return
    source = spec.get("source")
    is_clone = (isinstance(source, dict) and bool(
        source.get("pvc") or source.get("snapshot"))) or bool(spec.get("sourceRef"))
    if is_clone:
        spec["storage"] = {}
