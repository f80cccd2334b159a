"""Kubeconfig files: written by the control plane, read by every client."""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from virtshift.errors import VirtshiftError


class ConfigError(VirtshiftError):
    pass


@dataclass(frozen=True)
class ClusterConfig:
    server: str
    ca_pem: bytes
    token: str
    namespace: str = "default"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        return ctx


def default_home() -> Path:
    return Path(os.environ.get("VIRTSHIFT_HOME") or Path.home() / ".virtshift")


def render(server: str, ca_pem: bytes, token: str, *, cluster: str = "virtshift",
           user: str = "virtshift-admin") -> str:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode(),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user,
                                                   "namespace": "default"}}],
        "current-context": cluster,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def locate(explicit: str | None = None) -> Path:
    """``--kubeconfig``, then ``KUBECONFIG``, then the default data directory's kubeconfig."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("KUBECONFIG")
    if env:
        return Path(env.split(os.pathsep)[0])
    return default_home() / "kubeconfig"


def load(path: Path) -> ClusterConfig:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no kubeconfig at {path}: is `virtshift up` running?") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read kubeconfig {path}: {e}") from e
    try:
        current = doc.get("current-context")
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
        ca = base64.b64decode(cluster["certificate-authority-data"])
        return ClusterConfig(cluster["server"], ca, user["token"],
                             ctx.get("namespace") or "default")
    except (KeyError, StopIteration, TypeError, AttributeError) as e:
        raise ConfigError(f"kubeconfig {path} is incomplete: {e}") from e
