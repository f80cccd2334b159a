"""``virtshift image``: the cluster image store (what a registry is to ``containerDisk``).

- ``virtshift image import NAME FILE``: upload a disk image (qcow2 or raw) as reference NAME;
- ``virtshift image import NAME --kernel K [--initrd I] [--cmdline ARGS]``: a kernel image for
  ``firmware.kernelBoot.container.image``;
- ``virtshift image list``: REFERENCE TYPE SIZE PHASE AGE;
- ``virtshift image rm NAME``: delete the Image (its blobs are collected by the control plane).

Uploads stream the files (never read whole), send their sha256 for the server to verify, check
the digest the server recorded, and show progress when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any, Protocol

import aiohttp

from virtshift.api.kinds import Obj
from virtshift.client import kubeconfig
from virtshift.client.rest import Client, error_from_status, resource_path
from virtshift.errors import AlreadyExists, ApiError, NotFound, VirtshiftError
from virtshift.storage.imagestore import (
    DISK,
    INITRD,
    KERNEL,
    OCTET_STREAM,
    PHASE_READY,
    SHA256_HEADER,
    image_kind,
    image_name,
    pending_blobs,
    status_blobs,
)

CHUNK = 4 * 1024 * 1024
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
USER_AGENT = "virtshift-image"


class ImageCommandError(VirtshiftError):
    pass


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("image", help="manage the cluster image store (containerDisks)",
                              description="The cluster image store: what a container registry "
                                          "is to KubeVirt's containerDisk.")
    sub = p.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    imp = sub.add_parser(
        "import", help="upload a disk image, or a kernel and initrd, as image NAME",
        description="Upload a disk image (qcow2 or raw) as NAME, the reference a containerDisk "
                    "names; or, with --kernel, a kernel (and initrd) for "
                    "firmware.kernelBoot.container.image.")
    imp.add_argument("name", metavar="NAME",
                     help="the image reference, e.g. virtshift/testguest:latest")
    imp.add_argument("file", metavar="FILE", nargs="?", type=Path,
                     help="a disk image file (qcow2 or raw)")
    imp.add_argument("--kernel", type=Path, help="a kernel image (for kernelBoot)")
    imp.add_argument("--initrd", type=Path, help="an initrd to go with --kernel")
    imp.add_argument("--cmdline", help="the default kernel command line (with --kernel)")
    imp.set_defaults(func=_cmd_import)
    ls = sub.add_parser("list", aliases=["ls"], help="list the images")
    ls.set_defaults(func=_cmd_list)
    rm = sub.add_parser("rm", aliases=["delete"], help="delete an image")
    rm.add_argument("name", metavar="NAME", help="the image reference (or Image object name)")
    rm.set_defaults(func=_cmd_rm)


# ---- plumbing ----------------------------------------------------------------------------------


def _run(args: argparse.Namespace, action: Callable[[Client], Awaitable[int]]) -> int:
    cfg = kubeconfig.load(kubeconfig.locate(args.kubeconfig))

    async def main() -> int:
        client = Client(cfg, user_agent=USER_AGENT)
        try:
            return await action(client)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ImageCommandError(
                f"cannot talk to the API server at {cfg.server}: {e or type(e).__name__}"
            ) from e
        finally:
            await client.close()

    return asyncio.run(main())


class Counter(Protocol):
    def update(self, n: int) -> None: ...


class Progress:
    """A one-line progress indicator on stderr, shown only on a terminal."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._shown = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._shown >= 0.2 or self.done >= self.total):
            self._shown = now
            pct = 100 * self.done // self.total if self.total else 100
            rate = self.done / max(now - self.started, 1e-6)
            sys.stderr.write(f"\r{self.label}: {pct:3d}% {human_size(self.done)} of "
                             f"{human_size(self.total)} ({human_size(int(rate))}/s)\x1b[K")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(created: str, now: datetime.datetime) -> str:
    """kubectl's short durations: 45s, 5m, 3h, 2d."""
    try:
        then = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    s = max(int((now - then).total_seconds()), 0)
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        return f"{s // 3600}h{s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def checked_file(path: Path, what: str, error: type[Exception] = ImageCommandError) -> int:
    """The size of ``path``, a non-empty regular file; ``error`` (one readable line) if not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file or directory") from None
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from e
    if not path.is_file():
        raise error(f"{what} {path}: not a regular file")
    if st.st_size == 0:
        raise error(f"{what} {path}: the file is empty")
    return st.st_size


def _read_hash(f: IO[bytes], hasher: Any) -> int:
    chunk = f.read(CHUNK)
    hasher.update(chunk)
    return len(chunk)


async def sha256_file(path: Path, progress: Progress) -> str:
    hasher = hashlib.sha256()
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while n := await asyncio.to_thread(_read_hash, f, hasher):
            progress.update(n)
    finally:
        f.close()
    progress.finish()
    return hasher.hexdigest()


async def file_chunks(path: Path, progress: Counter) -> AsyncIterator[bytes]:
    """The file's bytes, read off the event loop, counted into ``progress`` as they go."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            progress.update(len(chunk))
            yield chunk
    finally:
        f.close()


async def find_image(client: Client, reference: str) -> Obj | None:
    """The Image whose ``spec.reference`` is exactly ``reference``."""
    escaped = reference.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
    found = await client.list(image_kind(), None, field_selector=f"spec.reference={escaped}")
    items: list[Obj] = found.get("items") or []
    preferred = image_name(reference)
    items.sort(key=lambda o: (o["metadata"]["name"] != preferred, o["metadata"]["name"]))
    return items[0] if items else None


async def upload_blob(client: Client, name: str, part: str, path: Path, size: int,
                      digest: str, progress: Progress) -> Obj:
    """PUT one blob; returns the updated Image."""
    headers = {"Content-Type": OCTET_STREAM, SHA256_HEADER: digest,
               "Content-Length": str(size)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
    async with client.session.put(resource_path(image_kind(), None, name, part),
                                  data=file_chunks(path, progress), headers=headers,
                                  timeout=timeout) as resp:
        text = await resp.text()
    progress.finish()
    try:
        payload: Any = json.loads(text) if text else None
    except json.JSONDecodeError:
        payload = {"message": text.strip()}
    if resp.status >= 400:
        raise error_from_status(resp.status, payload)
    if not isinstance(payload, dict):
        raise ImageCommandError(f"the API server answered the {part} upload with {text[:200]!r}")
    return payload


async def _upload_file(client: Client, name: str, part: str, path: Path, size: int) -> Obj:
    digest = await sha256_file(path, Progress(f"hashing {path.name}", size))
    image = await upload_blob(client, name, part, path, size, digest,
                              Progress(f"uploading {path.name}", size))
    recorded = ({**status_blobs(image), **pending_blobs(image)}.get(part) or {}).get("sha256")
    if recorded != digest:
        raise ImageCommandError(f"the server recorded sha256 {recorded} for {path}, which has "
                                f"{digest}")
    return image


# ---- commands ----------------------------------------------------------------------------------


def _cmd_import(args: argparse.Namespace) -> int:
    files: dict[str, Path] = {}
    if args.kernel is not None:
        if args.file is not None:
            raise ImageCommandError("give either FILE (a disk image) or --kernel, not both")
        files[KERNEL] = args.kernel
        if args.initrd is not None:
            files[INITRD] = args.initrd
    else:
        if args.file is None:
            raise ImageCommandError("image import needs FILE (a disk image) or --kernel K")
        if args.initrd is not None or args.cmdline is not None:
            raise ImageCommandError("--initrd and --cmdline go with --kernel")
        files[DISK] = args.file
    sizes = {part: checked_file(path, part if part != DISK else "disk image")
             for part, path in files.items()}
    cmdline: str | None = args.cmdline
    return _run(args, lambda client: import_image(client, args.name, files, sizes, cmdline))


async def import_image(client: Client, reference: str, files: dict[str, Path],
                       sizes: dict[str, int], cmdline: str | None) -> int:
    kind = image_kind()
    spec: Obj = {"reference": reference, "blobs": list(files)}
    if KERNEL in files:
        spec["cmdline"] = cmdline or ""
    image = await find_image(client, reference)
    created = image is None
    if image is None:
        body: Obj = {"apiVersion": kind.api_version, "kind": kind.kind,
                     "metadata": {"name": image_name(reference)}, "spec": spec}
        try:
            image = await client.create(kind, None, body)
        except AlreadyExists:
            image = await client.get(kind, None, image_name(reference))
            if (image.get("spec") or {}).get("reference") != reference:
                raise ImageCommandError(
                    f'the Image object {image_name(reference)} names another reference: '
                    "delete it first") from None
    name = image["metadata"]["name"]
    if not created:
        patch: Obj = {"spec": {**spec, "cmdline": spec.get("cmdline")}}
        image = await client.patch(kind, None, name, patch)
    try:
        for part, path in files.items():
            image = await _upload_file(client, name, part, path, sizes[part])
    except (Exception, asyncio.CancelledError) as e:
        if created:  # leave nothing behind: the Image did not exist before this import
            try:
                await client.delete(kind, None, name)
            except (ApiError, aiohttp.ClientError) as d:
                raise ImageCommandError(f"{e}; removing the incomplete image {name} failed: "
                                        f"{d}") from e
        raise
    status = image.get("status") or {}
    if status.get("phase") != PHASE_READY:
        raise ImageCommandError(f'image "{reference}" is {status.get("phase")}: '
                                f'{status.get("message", "")}'.rstrip(": "))
    detail = status.get("format") or status.get("type")
    print(f'image "{reference}" imported ({detail}, {human_size(int(status.get("size") or 0))})')
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    return _run(args, list_images)


async def list_images(client: Client) -> int:
    items: list[Obj] = (await client.list(image_kind(), None)).get("items") or []
    if not items:
        print("No images found.", file=sys.stderr)
        return 0
    now = datetime.datetime.now(datetime.UTC)
    rows = [("REFERENCE", "TYPE", "SIZE", "PHASE", "AGE")]
    for item in sorted(items, key=lambda o: str((o.get("spec") or {}).get("reference", ""))):
        status = item.get("status") or {}
        size = status.get("size")
        rows.append((
            str((item.get("spec") or {}).get("reference") or item["metadata"]["name"]),
            str(status.get("type") or "<none>"),
            human_size(int(size)) if isinstance(size, int) else "<none>",
            str(status.get("phase") or "Pending"),
            human_age(str(item["metadata"].get("creationTimestamp", "")), now),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    return _run(args, lambda client: remove_image(client, args.name))


async def remove_image(client: Client, ref_or_name: str) -> int:
    kind = image_kind()
    image = await find_image(client, ref_or_name)
    if image is None:
        if not OBJECT_NAME.match(ref_or_name):
            raise ImageCommandError(f'image "{ref_or_name}" not found')
        try:
            image = await client.get(kind, None, ref_or_name)
        except NotFound:
            raise ImageCommandError(f'image "{ref_or_name}" not found') from None
    name = image["metadata"]["name"]
    try:
        await client.delete(kind, None, name)
    except NotFound:
        raise ImageCommandError(f'image "{ref_or_name}" not found') from None
    print(f'image "{(image.get("spec") or {}).get("reference") or name}" deleted')
    return 0
