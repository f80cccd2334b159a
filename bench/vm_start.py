"""VM start benchmark: virtshift beside bare QEMU running the same command line, in one run.

- start latency: VM created -> VMI Running, and -> ``TESTGUEST-READY`` on the serial console,
  p50/p95 over ``--runs`` starts; the baseline starts ``qemu-system-x86_64`` with the argv the
  node agent used (copied run directory) and waits for the same marker.
- burst: ``--burst`` VMs created at once until all VMIs are Running and all consoles show the
  marker, beside as many bare QEMUs started at once.
- memory the platform adds per running VM: RSS of the API server + controller process and the
  node agent before and after the burst, divided by the number of VMs (QEMU excluded).

Run: ``.venv/bin/python bench/vm_start.py [--runs 10] [--burst 20]``; prints Markdown for
docs/benchmarks.md. Guests boot the test guest by kernelBoot under TCG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

MARKER = b"TESTGUEST-READY"
KERNEL_IMAGE = "virtshift/testguest-kernel:latest"
VIRTSHIFT = Path(sys.executable).parent / "virtshift"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def vm(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"runStrategy": "Always", "template": {"spec": {
                "terminationGracePeriodSeconds": 0,
                "domain": {"firmware": {"kernelBoot": {"container": {
                    "image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz",
                    "initrdPath": "/boot/initrd.img"}}},
                           "devices": {}, "memory": {"guest": "128Mi"}}}}}}


class Api:
    def __init__(self, p: PlatformProcess) -> None:
        cfg = p.config()
        self.server = cfg.server
        self.s = requests.Session()
        self.s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
        self.s.headers["Authorization"] = f"Bearer {cfg.token}"
        ca = p.data_dir / "bench-ca.pem"
        ca.write_bytes(cfg.ca_pem)
        self.s.verify = str(ca)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.s.request(method, self.server + path, json=body, timeout=30)
        if r.status_code >= 400 and r.status_code != 404:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content and r.status_code != 404 else None


VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"
VMIS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances"


def run_dir(p: PlatformProcess, uid: str) -> Path:
    return p.data_dir / "nodes" / "node01" / "vms" / uid


def wait(pred: Any, timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(what)


def has_marker(path: Path) -> bool:
    try:
        return MARKER in path.read_bytes()
    except OSError:
        return False


def start_vms(api: Api, p: PlatformProcess, names: list[str]) -> tuple[list[float], list[float],
                                                                       list[str]]:
    """Create VMs at once; seconds to Running and to the marker for each, and the VMI uids."""
    t0 = time.perf_counter()
    for n in names:
        api.call("POST", VMS, vm(n))
    running: dict[str, float] = {}
    ready: dict[str, float] = {}
    uids: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(ready) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"VMs not ready: {set(names) - set(ready)}")
        items = api.call("GET", VMIS)["items"]
        now = time.perf_counter() - t0
        for vmi in items:
            name = vmi["metadata"]["name"]
            if name not in names:
                continue
            uids[name] = vmi["metadata"]["uid"]
            if name not in running and (vmi.get("status") or {}).get("phase") == "Running":
                running[name] = now
        for name, uid in uids.items():
            if name not in ready and has_marker(run_dir(p, uid) / "serial.log"):
                ready[name] = time.perf_counter() - t0
                running.setdefault(name, ready[name])
        time.sleep(0.01)
    return ([running[n] for n in names], [ready[n] for n in names], [uids[n] for n in names])


def delete_vms(api: Api, names: list[str]) -> None:
    for n in names:
        api.call("DELETE", f"{VMS}/{n}")
    wait(lambda: not [v for v in api.call("GET", VMIS)["items"]
                      if v["metadata"]["name"] in names], 120, "VMIs gone", 0.1)


def bare_qemu(argv: list[str], src_run: Path, copies: int) -> tuple[list[float], list[int]]:
    """Start ``copies`` QEMUs with ``argv`` (run dir rewritten to a fresh copy each) at once;
    seconds until each serial log shows the marker, and their pids."""
    dirs = []
    for _ in range(copies):
        d = Path(tempfile.mkdtemp(prefix="bq-", dir="/tmp"))
        if (src_run / "disks").exists():
            shutil.copytree(src_run / "disks", d / "disks")
        dirs.append(d)
    procs = []
    t0 = time.perf_counter()
    for d in dirs:
        args = [a.replace(str(src_run), str(d)) for a in argv]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    ready: dict[int, float] = {}
    deadline = time.monotonic() + 300
    while len(ready) < copies:
        if time.monotonic() > deadline:
            raise TimeoutError("bare QEMU did not reach the marker")
        for i, d in enumerate(dirs):
            if i not in ready and has_marker(d / "serial.log"):
                ready[i] = time.perf_counter() - t0
        time.sleep(0.005)
    for pr in procs:
        pr.send_signal(signal.SIGKILL)
        pr.wait()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return [ready[i] for i in range(copies)], [pr.pid for pr in procs]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--burst", type=int, default=20)
    args = ap.parse_args()
    images = GuestImages.locate()
    data = Path(tempfile.mkdtemp(prefix="vs-bench-"))
    p = PlatformProcess(data, args=["--nodes", "1", "--accel", "tcg"])
    p.start()
    try:
        api = Api(p)
        wait(lambda: api.call("GET", "/api/v1/nodes/node01"), 60, "node01")
        subprocess.run([str(VIRTSHIFT), "--kubeconfig", str(p.kubeconfig), "image", "import",
                        KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
                        str(images.initrd), "--cmdline", "console=ttyS0 quiet"], check=True,
                       capture_output=True)
        # warm-up: the node fetches and caches the image once
        _, _, uids = start_vms(api, p, ["warmup"])
        argv = json.loads((run_dir(p, uids[0]) / "supervisor.json").read_text())["argv"]
        src_run = run_dir(p, uids[0])
        keep = Path(tempfile.mkdtemp(prefix="vs-bench-run-"))
        shutil.copytree(src_run, keep / "run", ignore=shutil.ignore_patterns("*.sock"))
        delete_vms(api, ["warmup"])
        src_copy = keep / "run"
        argv = [a.replace(str(src_run), str(src_copy)) for a in argv]

        run_lat: list[float] = []
        ready_lat: list[float] = []
        bare_lat: list[float] = []
        for i in range(args.runs):
            bare, _ = bare_qemu(argv, src_copy, 1)
            bare_lat += bare
            r, m, _ = start_vms(api, p, [f"seq{i}"])
            run_lat += r
            ready_lat += m
            delete_vms(api, [f"seq{i}"])

        agent_pid = int((data / "nodes" / "node01" / "agent.pid").read_text())
        assert p.proc is not None
        before = rss_kib(p.proc.pid) + rss_kib(agent_pid)
        names = [f"burst{i}" for i in range(args.burst)]
        b_run, b_ready, _ = start_vms(api, p, names)
        after = rss_kib(p.proc.pid) + rss_kib(agent_pid)
        delete_vms(api, names)
        bare_burst, _ = bare_qemu(argv, src_copy, args.burst)
        shutil.rmtree(keep, ignore_errors=True)
    finally:
        p.stop()
        for pidfile in data.glob("nodes/*/vms/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)

    def ms(v: float) -> str:
        return f"{v * 1000:,.0f} ms"

    b50, b95 = statistics.median(bare_lat), percentile(bare_lat, 95)
    m50, m95 = statistics.median(ready_lat), percentile(ready_lat, 95)
    print(f"runs={args.runs} burst={args.burst} (TCG, kernelBoot test guest, 128Mi)\n")
    print("| measure | virtshift | bare QEMU | ratio | added |")
    print("|---|---|---|---|---|")
    print(f"| created -> VMI Running p50 / p95 | {ms(statistics.median(run_lat))} / "
          f"{ms(percentile(run_lat, 95))} | | | |")
    print(f"| created -> TESTGUEST-READY p50 | {ms(m50)} | {ms(b50)} | {m50 / b50:.2f} | "
          f"{ms(m50 - b50)} |")
    print(f"| created -> TESTGUEST-READY p95 | {ms(m95)} | {ms(b95)} | {m95 / b95:.2f} | "
          f"{ms(m95 - b95)} |")
    print(f"| burst of {args.burst}: all VMIs Running | {ms(max(b_run))} | | | |")
    print(f"| burst of {args.burst}: all TESTGUEST-READY | {ms(max(b_ready))} | "
          f"{ms(max(bare_burst))} | {max(b_ready) / max(bare_burst):.2f} | "
          f"{ms(max(b_ready) - max(bare_burst))} |")
    print(f"| platform RSS added per running VM (API+controller+agent) | "
          f"{(after - before) / args.burst / 1024:.2f} MiB | | | |")


if __name__ == "__main__":
    main()
