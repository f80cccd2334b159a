"""Cloud-init seed disks: NoCloud (volume label ``cidata``) and ConfigDrive (``config-2``) ISOs,
built from a VMI's ``cloudInitNoCloud`` / ``cloudInitConfigDrive`` volume."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virtshift.errors import VirtshiftError

Files = dict[str, bytes]


class CloudInitError(VirtshiftError):
    pass


def _text(source: Mapping[str, Any], plain: str, b64: str, what: str) -> bytes | None:
    if isinstance(source.get(plain), str):
        return str(source[plain]).encode()
    if isinstance(source.get(b64), str):
        try:
            return base64.b64decode(str(source[b64]), validate=True)
        except (binascii.Error, ValueError) as e:
            raise CloudInitError(f"{what}: {b64} is not valid base64: {e}") from e
    return None


def nocloud_files(source: Mapping[str, Any], *, instance_id: str, hostname: str,
                  secrets: Mapping[str, Mapping[str, bytes]] | None = None) -> Files:
    """The files of a NoCloud seed for a ``cloudInitNoCloud`` volume source.

    ``secrets`` maps secret names (``secretRef``/``networkDataSecretRef``) to their decoded data.
    """
    user = _text(source, "userData", "userDataBase64", "cloudInitNoCloud")
    user = user if user is not None else _secret(source, "secretRef", ("userdata", "userData"),
                                                 secrets)
    network = _text(source, "networkData", "networkDataBase64", "cloudInitNoCloud")
    network = network if network is not None else _secret(
        source, "networkDataSecretRef", ("networkdata", "networkData"), secrets)
    files: Files = {
        "meta-data": f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n".encode(),
        "user-data": user if user is not None else b"",
    }
    if network is not None:
        files["network-config"] = network
    return files


def configdrive_files(source: Mapping[str, Any], *, instance_id: str, hostname: str,
                      secrets: Mapping[str, Mapping[str, bytes]] | None = None) -> Files:
    """The files of an OpenStack ConfigDrive seed for a ``cloudInitConfigDrive`` volume."""
    user = _text(source, "userData", "userDataBase64", "cloudInitConfigDrive")
    user = user if user is not None else _secret(source, "secretRef", ("userdata", "userData"),
                                                 secrets)
    network = _text(source, "networkData", "networkDataBase64", "cloudInitConfigDrive")
    network = network if network is not None else _secret(
        source, "networkDataSecretRef", ("networkdata", "networkData"), secrets)
    meta = {"uuid": instance_id, "hostname": hostname, "name": hostname}
    files: Files = {"openstack/latest/meta_data.json": json.dumps(meta).encode()}
    if user is not None:
        files["openstack/latest/user_data"] = user
    if network is not None:
        files["openstack/latest/network_data.json"] = network
    return files


def _secret(source: Mapping[str, Any], field: str, keys: tuple[str, ...],
            secrets: Mapping[str, Mapping[str, bytes]] | None) -> bytes | None:
    ref = source.get(field)
    if not isinstance(ref, Mapping) or not ref.get("name"):
        return None
    name = str(ref["name"])
    data = (secrets or {}).get(name)
    if data is None:
        raise CloudInitError(f'secret "{name}" ({field}) was not found')
    for key in keys:
        if key in data:
            return data[key]
    raise CloudInitError(f'secret "{name}" has none of the keys {", ".join(keys)}')


def write_iso(path: Path, label: str, files: Files) -> Path:
    """An ISO 9660 image (Joliet and Rock Ridge) holding ``files``; atomic."""
    tool = shutil.which("genisoimage") or shutil.which("mkisofs")
    if tool is None:
        raise CloudInitError("genisoimage is not installed (make setup installs it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="seed-", dir=path.parent) as tmp:
        root = Path(tmp) / "root"
        for rel, data in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        partial = Path(tmp) / "seed.iso"
        proc = subprocess.run([tool, "-quiet", "-output", str(partial), "-volid", label,
                               "-joliet", "-rock", str(root)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise CloudInitError(f"building the {label} ISO failed: {proc.stderr.strip()}")
        partial.replace(path)
    return path


async def build_seed(path: Path, label: str, files: Files) -> Path:
    return await asyncio.to_thread(write_iso, path, label, files)
