"""``virtshift image-upload dv|pvc NAME``: virtctl's image-upload.

Creates the target (a DataVolume with ``spec.source.upload: {}`` or a PersistentVolumeClaim
annotated as an upload target) unless it exists or ``--no-create`` says it must, waits until
its node is ready to receive (DataVolume phase ``UploadReady``, or the claim's
``cdi.kubevirt.io/storage.pod.ready``), asks for an upload token (``UploadTokenRequest``) and
streams the file to the upload proxy with a progress bar on stderr, then waits for the
DataVolume (or the claim) to be ``Succeeded``. After a failed or cut-off upload the target stays
ready: the same command (or ``--no-create``) uploads again.

The upload proxy URL: ``--uploadproxy-url``, else the ``CDIConfig`` ``config``'s
``spec.uploadProxyURLOverride`` or ``status.uploadProxyURL`` when set, else the API server of
the kubeconfig (virtshift serves the proxy on the API server's own port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from virtshift.api import cdi
from virtshift.api.admission import quantity
from virtshift.api.kinds import REGISTRY, KindInfo, Obj
from virtshift.cli.images import checked_file, file_chunks, human_size
from virtshift.client import kubeconfig
from virtshift.client.rest import Client
from virtshift.errors import ApiError, NotFound, VirtshiftError

USER_AGENT = "virtshift-image-upload"
CHUNK = 4 * 1024 * 1024
UPLOAD_PATH = "/v1beta1/upload"
UPLOAD_ASYNC_PATH = "/v1beta1/upload-async"
TOKEN_REQUEST_NAME = "token-for-virtctl"
POLL_INTERVAL = 0.5
PHASE_UPLOAD_READY = "UploadReady"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
WAITING_PHASES = ("WaitForFirstConsumer", "PendingPopulation")
VOLUME_MODES = {"block": "Block", "filesystem": "Filesystem"}
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod")


class UploadCommandError(VirtshiftError):
    pass


# ---- arguments (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    kind: str  # "dv" | "pvc"
    name: str
    namespace: str
    image_path: Path
    size: str = ""  # canonical quantity, "" when not given
    storage_class: str = ""
    access_mode: str = ""
    volume_mode: str = ""  # "Block" | "Filesystem" | ""
    force_bind: bool = False
    no_create: bool = False
    insecure: bool = False
    uploadproxy_url: str = ""
    wait_secs: int = 300


def parse_size(text: str) -> tuple[str, int]:
    """A Kubernetes quantity (``10Gi``, ``500Mi``) as (canonical text, bytes)."""
    try:
        q = quantity.parse(text.strip())
    except ValueError as e:
        raise UploadCommandError(f"validation failed for size={text}: {e}") from None
    if q.value() <= 0:
        raise UploadCommandError(f"validation failed for size={text}: the size must be "
                                 "positive")
    return str(q), q.value()


def options(resource: str, name: str, namespace: str, *, image_path: str | None,
            size: str | None = None, storage_class: str | None = None,
            access_mode: str | None = None, volume_mode: str | None = None,
            force_bind: bool = False, no_create: bool = False, insecure: bool = False,
            uploadproxy_url: str | None = None, wait_secs: int = 300) -> Options:
    """Check the command line as virtctl does; :class:`UploadCommandError` when wrong."""
    kind = resource.lower()
    if kind not in ("dv", "pvc"):
        raise UploadCommandError(f"invalid resource type {resource}: use dv or pvc")
    if not name:
        raise UploadCommandError("expecting two args: dv|pvc NAME")
    if not image_path:
        raise UploadCommandError("--image-path must be provided")
    mode = (volume_mode or "").lower()
    if mode and mode not in VOLUME_MODES:
        raise UploadCommandError(f"Invalid volume mode '{volume_mode}'. Valid values are "
                                 "'block' and 'filesystem'.")
    if access_mode:
        if access_mode == "ReadOnlyMany":
            raise UploadCommandError("cannot upload to a readonly volume, use either "
                                     "ReadWriteOnce or ReadWriteMany if supported")
        if access_mode not in ACCESS_MODES:
            raise UploadCommandError(f"invalid access mode {access_mode}: use one of "
                                     f"{', '.join(m for m in ACCESS_MODES if 'Only' not in m)}")
    canonical = parse_size(size)[0] if size else ""
    if wait_secs < 0:
        raise UploadCommandError("--wait-secs must be 0 or more")
    return Options(kind, name, namespace, Path(image_path), canonical, storage_class or "",
                   access_mode or "", VOLUME_MODES.get(mode, ""), force_bind, no_create,
                   insecure, uploadproxy_url or "", wait_secs)


def proxy_base(flag: str, cdi_config: Mapping[str, Any] | None, server: str) -> str:
    """The upload proxy's URL: the flag, the CDIConfig's override or status, else the API
    server; ``https://`` is prepended to a URL without a scheme."""
    url = flag
    if not url and cdi_config:
        url = str((cdi_config.get("spec") or {}).get("uploadProxyURLOverride") or "") or str(
            (cdi_config.get("status") or {}).get("uploadProxyURL") or "")
    url = url or server
    if "://" not in url:
        url = f"https://{url}"
    return url


def upload_url(base: str, path: str) -> str:
    """``base`` with ``path`` appended, unless ``base`` already names it."""
    if path in base:
        return base
    parts = urlsplit(base)
    joined = parts.path.rstrip("/") + path
    return urlunsplit((parts.scheme, parts.netloc, joined, parts.query, parts.fragment))


def storage_spec(opts: Options) -> Obj:
    spec: Obj = {"resources": {"requests": {"storage": opts.size}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    if opts.access_mode:
        spec["accessModes"] = [opts.access_mode]
    if opts.volume_mode:
        spec["volumeMode"] = opts.volume_mode
    return spec


def dv_manifest(opts: Options) -> Obj:
    meta: Obj = {"name": opts.name, "namespace": opts.namespace}
    if opts.force_bind:
        meta["annotations"] = {cdi.ANN_BIND_IMMEDIATE: "true"}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": meta,
            "spec": {"source": {"upload": {}}, "contentType": "kubevirt",
                     "storage": storage_spec(opts)}}


def pvc_manifest(opts: Options) -> Obj:
    ann = upload_annotations()
    if opts.force_bind:
        ann[cdi.ANN_BIND_IMMEDIATE] = "true"
    spec = storage_spec(opts)
    spec.setdefault("accessModes", ["ReadWriteOnce"])
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": opts.name, "namespace": opts.namespace, "annotations": ann},
            "spec": spec}


def upload_annotations() -> dict[str, str]:
    return {cdi.ANN_UPLOAD_TARGET: "", cdi.ANN_CONTENT_TYPE: "kubevirt",
            cdi.ANN_POPULATE: cdi.PopulateSource(type="upload").to_json()}


def _ann(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, dict) else None
    return ann if isinstance(ann, dict) else {}


def existing_pvc_problem(pvc: Mapping[str, Any], opts: Options) -> str | None:
    """Why an existing claim cannot take this upload (virtctl's checks), or None."""
    ann = _ann(pvc)
    if ann.get(cdi.ANN_POD_PHASE) == cdi.POD_SUCCEEDED:
        return f"PVC {opts.name} already successfully imported/cloned/updated"
    is_target = cdi.ANN_UPLOAD_TARGET in ann or (
        (src := cdi.populate_source(pvc)) is not None and src.type == "upload")
    if not opts.no_create and not is_target:
        return f"PVC {opts.name} not available for upload"
    return None


def dv_ready(dv: Mapping[str, Any], force_bind: bool) -> bool:
    """True once the DataVolume takes uploads; refuses (as virtctl) a DataVolume waiting for
    its first consumer unless ``force_bind``."""
    phase = str((dv.get("status") or {}).get("phase") or "")
    if phase in WAITING_PHASES and not force_bind:
        raise UploadCommandError(f"cannot upload to DataVolume in {phase} phase, make sure the "
                                 "PVC is Bound, or use force-bind flag")
    name = (dv.get("metadata") or {}).get("name")
    if phase == PHASE_SUCCEEDED:
        raise UploadCommandError(f"DataVolume {name} already succeeded: nothing to upload into")
    if phase == PHASE_FAILED:
        raise UploadCommandError(f"DataVolume {name} failed: {_dv_message(dv)}")
    return phase == PHASE_UPLOAD_READY


def pvc_waits_for_consumer(pvc: Mapping[str, Any], classes: list[Obj]) -> bool:
    """A Pending claim that only a consumer would bind: its class (named, else the default
    one) binds WaitForFirstConsumer and the claim does not ask for immediate binding."""
    if ((pvc.get("status") or {}).get("phase") == "Bound"
            or _ann(pvc).get(cdi.ANN_BIND_IMMEDIATE) == "true"):
        return False
    name = str((pvc.get("spec") or {}).get("storageClassName") or "")
    for sc in classes:
        meta = sc.get("metadata") or {}
        default = (meta.get("annotations") or {}).get(
            "storageclass.kubernetes.io/is-default-class") == "true"
        if (meta.get("name") == name) if name else default:
            return str(sc.get("volumeBindingMode") or "") == "WaitForFirstConsumer"
    return False


def status_message(code: int, body: bytes) -> str:
    """One line from a proxy error answer (a Status object or plain text)."""
    text = body.decode(errors="replace").strip()
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("message"):
        text = str(doc["message"])
    return f"unexpected return value {code}, {' '.join(text.split()) or 'no message'}"


# ---- progress ----------------------------------------------------------------------------------


class ProgressBar:
    """``[#####     ]  45% 12.0MiB / 27.0MiB 5.1MiB/s`` on stderr: redrawn on a terminal,
    otherwise a line at each quarter."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str] | None = None,
                 tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._drawn = 0.0
        self._quarter = -1

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.WIDTH)
        rate = self.done / max(now - self.started, 1e-6)
        return (f"[{'#' * filled}{' ' * (self.WIDTH - filled)}] {int(frac * 100):3d}% "
                f"{human_size(self.done)} / {human_size(self.total)} "
                f"{human_size(int(rate))}/s")

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._drawn >= 0.2 or self.done >= self.total:
                self._drawn = now
                self.stream.write(f"\r{self.line(now)}\x1b[K")
                self.stream.flush()
            return
        quarter = 4 * self.done // self.total if self.total else 4
        if quarter > self._quarter:
            self._quarter = quarter
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- the command -------------------------------------------------------------------------------


def _kind(group: str, version: str, kind: str) -> KindInfo:
    return REGISTRY.require(group, version, kind)


PVC = _kind("", "v1", "PersistentVolumeClaim")
DV = _kind("cdi.kubevirt.io", "v1beta1", "DataVolume")
STORAGE_CLASS = _kind("storage.k8s.io", "v1", "StorageClass")
CDI_CONFIG = _kind("cdi.kubevirt.io", "v1beta1", "CDIConfig")
TOKEN_REQUEST = _kind("upload.cdi.kubevirt.io", "v1beta1", "UploadTokenRequest")


def say(text: str) -> None:
    print(text, flush=True)


async def _get(client: Client, kind: KindInfo, ns: str | None, name: str) -> Obj | None:
    try:
        return await client.get(kind, ns, name)
    except NotFound:
        return None


class Uploader:
    def __init__(self, client: Client, cfg: kubeconfig.ClusterConfig, opts: Options) -> None:
        self.client = client
        self.cfg = cfg
        self.opts = opts

    async def run(self) -> int:
        opts = self.opts
        size = checked_file(opts.image_path, "open", UploadCommandError)
        await self.ensure_target()
        await self.wait_ready()
        base = proxy_base(opts.uploadproxy_url,
                          await self._optional(CDI_CONFIG, None, "config"), self.cfg.server)
        say(f"Uploading data to {base}")
        token = await self.token()
        await self.upload(base, token, size)
        say("Uploading data completed successfully, waiting for processing to complete, you "
            "can hit ctrl-c without interrupting the progress")
        await self.wait_done()
        say("Processing completed successfully")
        say(f"Uploading {opts.image_path} completed successfully")
        return 0

    async def _optional(self, kind: KindInfo, ns: str | None, name: str) -> Obj | None:
        try:
            return await _get(self.client, kind, ns, name)
        except ApiError:
            return None

    async def ensure_target(self) -> None:
        opts = self.opts
        ns = opts.namespace
        pvc = await _get(self.client, PVC, ns, opts.name)
        if pvc is not None:
            if opts.kind == "dv" and await _get(self.client, DV, ns, opts.name) is None:
                raise UploadCommandError(f"No DataVolume is associated with the existing PVC "
                                         f"{ns}/{opts.name}")
            problem = existing_pvc_problem(pvc, opts)
            if problem:
                raise UploadCommandError(problem)
            ann: dict[str, str] = {}
            if cdi.populate_source(pvc) is None or cdi.ANN_UPLOAD_TARGET not in _ann(pvc):
                ann.update(upload_annotations())
            if opts.force_bind and _ann(pvc).get(cdi.ANN_BIND_IMMEDIATE) != "true":
                ann[cdi.ANN_BIND_IMMEDIATE] = "true"
                if opts.kind == "dv":
                    await self._force_bind_dv()
            if ann:
                await self.client.patch(PVC, ns, opts.name, {"metadata": {"annotations": ann}})
            say(f"Using existing PVC {ns}/{opts.name}")
            return
        if opts.kind == "dv" and await _get(self.client, DV, ns, opts.name) is not None:
            if opts.force_bind:
                await self._force_bind_dv()
            say(f"Using existing DataVolume {ns}/{opts.name}")
            return
        if opts.no_create:
            raise UploadCommandError(f"PVC {ns}/{opts.name} not found")
        if not opts.size:
            raise UploadCommandError("when creating a resource, the size must be specified")
        if opts.storage_class:
            await self.client.get(STORAGE_CLASS, None, opts.storage_class)
        if opts.kind == "dv":
            await self.client.create(DV, ns, dv_manifest(opts))
            say(f"DataVolume {ns}/{opts.name} created")
        else:
            await self.client.create(PVC, ns, pvc_manifest(opts))
            say(f"PersistentVolumeClaim {ns}/{opts.name} created")

    async def _force_bind_dv(self) -> None:
        """--force-bind on an existing DataVolume: ask for immediate binding after all."""
        await self.client.patch(DV, self.opts.namespace, self.opts.name, {
            "metadata": {"annotations": {cdi.ANN_BIND_IMMEDIATE: "true"}}})

    async def wait_ready(self) -> None:
        opts = self.opts
        deadline = time.monotonic() + opts.wait_secs
        logged = False
        while True:
            if opts.kind == "dv":
                dv = await _get(self.client, DV, opts.namespace, opts.name)
                ready = dv is not None and dv_ready(dv, opts.force_bind)
            else:
                pvc = await _get(self.client, PVC, opts.namespace, opts.name)
                ready = pvc is not None and str(
                    _ann(pvc).get(cdi.ANN_POD_READY, "")).lower() == "true"
                if pvc is not None and not ready and not opts.force_bind:
                    classes = (await self.client.list(STORAGE_CLASS)).get("items") or []
                    if pvc_waits_for_consumer(pvc, classes):
                        raise UploadCommandError(
                            f"cannot upload to PVC {opts.name}: it waits for its first "
                            "consumer (WaitForFirstConsumer), make sure the PVC is Bound, or "
                            "use force-bind flag")
            if ready:
                if logged:
                    say("Pod now ready")
                return
            if not logged:
                say(f"Waiting for PVC {opts.name} upload pod to be ready...")
                logged = True
            if time.monotonic() >= deadline:
                raise UploadCommandError(f"timed out after {opts.wait_secs}s waiting for PVC "
                                         f"{opts.name} to be ready for upload")
            await asyncio.sleep(POLL_INTERVAL)

    async def token(self) -> str:
        body: Obj = {"apiVersion": TOKEN_REQUEST.api_version, "kind": TOKEN_REQUEST.kind,
                     "metadata": {"name": TOKEN_REQUEST_NAME},
                     "spec": {"pvcName": self.opts.name}}
        out = await self.client.create(TOKEN_REQUEST, self.opts.namespace, body)
        token = str((out.get("status") or {}).get("token") or "")
        if not token:
            raise UploadCommandError("the server returned no upload token")
        return token

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.opts.insecure:
            return False
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=self.cfg.ca_pem.decode())
        return ctx

    async def upload(self, base: str, token: str, size: int) -> None:
        auth = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()),
                                         timeout=timeout) as session:
            url = upload_url(base, UPLOAD_ASYNC_PATH)
            try:
                async with session.head(url, headers=auth) as probe:
                    if probe.status != 200:
                        url = upload_url(base, UPLOAD_PATH)
            except aiohttp.ClientError:
                url = upload_url(base, UPLOAD_PATH)
            bar = ProgressBar(size)
            headers = {**auth, "Content-Type": "application/octet-stream",
                       "Content-Length": str(size)}
            try:
                async with session.post(url, data=file_chunks(self.opts.image_path, bar),
                                        headers=headers) as resp:
                    body = await resp.read()
            finally:
                bar.finish()
            if resp.status != 200:
                raise UploadCommandError(status_message(resp.status, body))

    async def wait_done(self) -> None:
        opts = self.opts
        while True:
            if opts.kind == "dv":
                dv = await self.client.get(DV, opts.namespace, opts.name)
                phase = str((dv.get("status") or {}).get("phase") or "")
                if phase == PHASE_SUCCEEDED:
                    return
                if phase == PHASE_FAILED:
                    raise UploadCommandError(f"DataVolume {opts.name} failed: "
                                             f"{_dv_message(dv)}")
            else:
                pvc = await self.client.get(PVC, opts.namespace, opts.name)
                phase = str(_ann(pvc).get(cdi.ANN_POD_PHASE) or "")
                if phase == cdi.POD_SUCCEEDED:
                    return
                if phase == cdi.POD_FAILED:
                    raise UploadCommandError(
                        f"PVC {opts.name} failed: "
                        f"{_ann(pvc).get(cdi.ANN_RUNNING_MESSAGE) or 'no message'}")
            await asyncio.sleep(POLL_INTERVAL)


def _dv_message(dv: Mapping[str, Any]) -> str:
    for cond in (dv.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Running" and cond.get("message"):
            return str(cond["message"])
    return "no message"


def _run(args: argparse.Namespace, action: Callable[[Client, kubeconfig.ClusterConfig],
                                                    Awaitable[int]]) -> int:
    cfg = kubeconfig.load(kubeconfig.locate(args.kubeconfig))

    async def main() -> int:
        client = Client(cfg, user_agent=USER_AGENT)
        try:
            return await action(client, cfg)
        except ApiError as e:
            raise UploadCommandError(" ".join(e.message.split()) or f"HTTP {e.code}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UploadCommandError(f"cannot talk to the server: {e or type(e).__name__}"
                                     ) from e
        finally:
            await client.close()

    return asyncio.run(main())


def _cmd(args: argparse.Namespace) -> int:
    def action(client: Client, cfg: kubeconfig.ClusterConfig) -> Awaitable[int]:
        opts = options(args.resource, args.name, args.namespace or cfg.namespace,
                       image_path=args.image_path, size=args.size,
                       storage_class=args.storage_class, access_mode=args.access_mode,
                       volume_mode=args.volume_mode, force_bind=args.force_bind,
                       no_create=args.no_create, insecure=args.insecure,
                       uploadproxy_url=args.uploadproxy_url, wait_secs=args.wait_secs)
        return Uploader(client, cfg, opts).run()

    # Check the arguments before touching the cluster.
    options(args.resource, args.name, args.namespace or "default", image_path=args.image_path,
            size=args.size, access_mode=args.access_mode, volume_mode=args.volume_mode,
            wait_secs=args.wait_secs)
    return _run(args, action)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "image-upload", help="Upload a VM image to a DataVolume/PersistentVolumeClaim.",
        description="Upload a local disk image (raw, qcow2, optionally .gz or .xz) to a new or "
                    "existing DataVolume or PersistentVolumeClaim, through the upload proxy.",
        epilog="examples:\n"
               "  virtshift image-upload dv fedora-dv --size=10Gi "
               "--image-path=/images/fedora.qcow2\n"
               "  virtshift image-upload dv fedora-dv --no-create "
               "--image-path=/images/fedora.qcow2\n"
               "  virtshift image-upload pvc fedora-pvc --size=10Gi --force-bind "
               "--image-path=/images/fedora.qcow2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("resource", metavar="dv|pvc", help="upload into a DataVolume or a PVC")
    p.add_argument("name", metavar="NAME", help="the DataVolume/PVC name")
    p.add_argument("-n", "--namespace", default=None,
                   help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", default=argparse.SUPPRESS,
                   help="kubeconfig to use (default $KUBECONFIG, else the data dir's)")
    p.add_argument("--image-path", default=None, help="Path to the local VM image.")
    p.add_argument("--size", default=None,
                   help="The size of the DataVolume/PVC to create (ex. 10Gi, 500Mi).")
    p.add_argument("--insecure", action="store_true",
                   help="Allow insecure server connections when using HTTPS.")
    p.add_argument("--uploadproxy-url", default=None,
                   help="The URL of the cdi-upload proxy service (default: the CDIConfig's, "
                        "else the API server's).")
    p.add_argument("--storage-class", default=None, help="The storage class for the PVC.")
    p.add_argument("--access-mode", default=None, help="The access mode for the PVC.")
    p.add_argument("--volume-mode", default=None,
                   help="The VolumeMode (block/filesystem) of the PVC to create.")
    p.add_argument("--force-bind", action="store_true",
                   help="Force bind the PVC, ignoring the WaitForFirstConsumer logic.")
    p.add_argument("--no-create", action="store_true",
                   help="Don't attempt to create a new DataVolume/PVC.")
    p.add_argument("--wait-secs", type=int, default=300,
                   help="Seconds to wait for upload pod to start (default 300).")
    p.set_defaults(func=_cmd)
