"""Run ``virtshift up`` as a real subprocess for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtshift import nodenet
from virtshift.client import kubeconfig
from virtshift.client.kubeconfig import ClusterConfig


@dataclass
class PlatformProcess:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "kubeconfig"

    def start(self, timeout: float = 60.0) -> PlatformProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.kubeconfig
        before = cfg.stat().st_mtime_ns if cfg.exists() else None
        self.log_path = self.data_dir / "platform.log"
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "virtshift.cli.main", "up", "--data-dir",
               str(self.data_dir), "--listen", "127.0.0.1:0", "--nodes", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtshift up exited with {self.proc.returncode}:\n"
                                   + self.log_text())
            if cfg.exists() and cfg.stat().st_mtime_ns != before:
                return self
            time.sleep(0.05)
        raise TimeoutError("virtshift up did not write its kubeconfig:\n" + self.log_text())

    def config(self) -> ClusterConfig:
        return kubeconfig.load(self.kubeconfig)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove_node_network(self, timeout: float = 10.0) -> None:
        """Remove the node namespaces and bridge that a stopped platform kept because VMs
        still ran in them (call after killing those VMs; waits for them to exit)."""
        net = nodenet.load(self.data_dir)
        if net is None:
            return
        deadline = time.monotonic() + timeout
        while net.teardown() and time.monotonic() < deadline:
            time.sleep(0.2)
