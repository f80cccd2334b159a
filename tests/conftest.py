from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtshift.testing.platform import PlatformProcess

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "reference" / "kubevirt-examples"
KUBECTL = shutil.which("kubectl", path=str(REPO / ".venv" / "bin")) or "kubectl"


@dataclass
class Kubectl:
    kubeconfig: Path
    cache_dir: Path

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir",
               str(self.cache_dir), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run(*args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    p = PlatformProcess(tmp_path_factory.mktemp("platform"))
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def kubectl(platform: PlatformProcess, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    return Kubectl(platform.kubeconfig, tmp_path_factory.mktemp("kubectl-cache"))


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    name += "-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:6]
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def pytest_report_header() -> list[str]:
    return [f"kubectl: {KUBECTL}", f"corpus: {CORPUS} (exists: {CORPUS.exists()})",
            f"VIRTSHIFT_OPENAPI_DIR={os.environ.get('VIRTSHIFT_OPENAPI_DIR', '')}"]
