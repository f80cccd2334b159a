"""Live migration benchmark: virtshift beside bare QEMU migrating the same guest between the same
two node network namespaces, in one run.

For each guest size (``--sizes``, default 256Mi and 1Gi) and workload (idle, and a guest
rewriting 64 MiB of random data in a loop), ``--runs`` times:
- virtshift: a VMI boots (kernelBoot test guest, masquerade, no writable disk), then a
  VirtualMachineInstanceMigration is created; the total is creation -> phase Succeeded (target
  QEMU start, both agents, the controller's hand-over included); the downtime is QEMU's, from
  the migration's progress annotation.
- bare QEMU: the same argv (copied from the node agent's run directory, port forwards removed)
  runs in the source node's namespace; the total is from spawning the target QEMU
  (``-incoming defer``) in the target node's namespace to ``completed``, driven over QMP with the
  same capabilities (unlimited bandwidth).
Goal (issue 5): total under 1.5x bare QEMU + 300 ms, downtime within 10 ms of bare QEMU.

Run as root: ``.venv/bin/python bench/migration.py [--runs 3] [--sizes 256Mi,1Gi]``; prints
Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vm_start import KERNEL_IMAGE, VIRTSHIFT, Api, wait
from virtshift.launcher.qmp import QmpSession
from virtshift.testing.guest import GuestImages
from virtshift.testing.platform import PlatformProcess

MARKER = b"TESTGUEST-READY"
DIRTY_MARKER = b"DIRTYING-NOW"
NS = "default"
VMIS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
VMIMS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations"
DIRTY_SCRIPT = ("#!/bin/sh\ndd if=/dev/urandom of=/tmp/src bs=65536 count=1024 2>/dev/null\n"
                "(while :; do cp /tmp/src /tmp/dst; done) &\necho DIRTYING-NOW\n")
IDLE_SCRIPT = "#!/bin/sh\necho DIRTYING-NOW\n"


def vmi(name: str, memory: str, dirty: bool) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "domain": {"firmware": {"kernelBoot": {"container": {
                         "image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz",
                         "initrdPath": "/boot/initrd.img"}}},
                                "devices": {"disks": [{"name": "ci", "disk": {"bus": "virtio"}}],
                                            "interfaces": [{"name": "default",
                                                            "masquerade": {}}]},
                                "memory": {"guest": memory}},
                     "networks": [{"name": "default", "pod": {}}],
                     "volumes": [{"name": "ci", "cloudInitNoCloud": {
                         "userData": DIRTY_SCRIPT if dirty else IDLE_SCRIPT}}]}}


def has(path: Path, *markers: bytes) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return all(m in data for m in markers)


def netns_of(pid: int) -> str:
    out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                         text=True, check=True).stdout.strip()
    if not out:
        raise RuntimeError(f"pid {pid} is not in a named network namespace (run as root)")
    return out


def strip_forwards(argv: list[str]) -> list[str]:
    return [re.sub(r",hostfwd=[^,]*", "", a) if a.startswith("user,") else a for a in argv]


class Bare:
    """The same guest migrated by hand between the two namespaces."""

    def __init__(self, argv: list[str], run: Path, src_ns: str, dst_ns: str,
                 dst_addr: str) -> None:
        self.argv, self.run = strip_forwards(argv), run
        self.src_ns, self.dst_ns, self.dst_addr = src_ns, dst_ns, dst_addr

    def _dir(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"bm-{name}-", dir="/tmp"))
        if (self.run / "disks").exists():
            shutil.copytree(self.run / "disks", d / "disks")
        return d

    def _spawn(self, ns: str, d: Path, extra: list[str]) -> subprocess.Popen[bytes]:
        args = [a.replace(str(self.run), str(d)) for a in self.argv] + extra
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    async def once(self) -> tuple[float, float]:
        src_d, dst_d = self._dir("src"), self._dir("dst")
        procs = []
        try:
            procs.append(self._spawn(self.src_ns, src_d, []))
            wait(lambda: has(src_d / "serial.log", MARKER, DIRTY_MARKER), 300, "bare guest",
                 0.01)
            src = await QmpSession.connect(src_d / "qmp.sock", timeout_s=10)
            t0 = time.perf_counter()
            procs.append(self._spawn(self.dst_ns, dst_d, ["-incoming", "defer"]))
            dst = await QmpSession.connect(dst_d / "qmp.sock", timeout_s=30)
            port = 49152
            caps = {"capabilities": [{"capability": "events", "state": True}]}
            await dst.execute("migrate-set-capabilities", caps)
            await dst.execute("migrate-incoming", {"uri": f"tcp:{self.dst_addr}:{port}"})
            await src.execute("migrate-set-capabilities", caps)
            await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            await src.execute("migrate", {"uri": f"tcp:{self.dst_addr}:{port}"})
            while True:
                info = await src.execute("query-migrate")
                if info.get("status") == "completed":
                    total = time.perf_counter() - t0
                    return total, float(info.get("downtime", 0)) / 1000
                if info.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"bare migration {info}")
                await asyncio.sleep(0.005)
        finally:
            for pr in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGKILL)
                pr.wait()
            shutil.rmtree(src_d, ignore_errors=True)
            shutil.rmtree(dst_d, ignore_errors=True)


def platform_once(api: Api, p: PlatformProcess, name: str, memory: str, dirty: bool
                  ) -> tuple[float, float, dict[str, Any], Path]:
    api.call("POST", VMIS, vmi(name, memory, dirty))
    obj = wait(lambda: (v := api.call("GET", f"{VMIS}/{name}")) and v.get("status", {}).get(
        "phase") == "Running" and v, 300, f"{name} Running", 0.05)
    uid, node = obj["metadata"]["uid"], obj["status"]["nodeName"]
    run = p.data_dir / "nodes" / node / "vms" / uid
    wait(lambda: has(run / "serial.log", MARKER, DIRTY_MARKER), 300, f"{name} ready", 0.01)
    keep = Path(tempfile.mkdtemp(prefix="bm-keep-"))
    shutil.copytree(run, keep / "run", ignore=shutil.ignore_patterns("*.sock"))
    wait(lambda: any(c.get("type") == "LiveMigratable" and c.get("status") == "True"
                     for c in api.call("GET", f"{VMIS}/{name}")["status"].get(
                         "conditions", [])), 60, "LiveMigratable", 0.05)
    t0 = time.perf_counter()
    api.call("POST", VMIMS, {"apiVersion": "kubevirt.io/v1",
                             "kind": "VirtualMachineInstanceMigration",
                             "metadata": {"name": f"{name}-mig"}, "spec": {"vmiName": name}})
    done = wait(lambda: (m := api.call("GET", f"{VMIMS}/{name}-mig")) and m.get(
        "status", {}).get("phase") in ("Succeeded", "Failed") and m, 600, "migration", 0.005)
    total = time.perf_counter() - t0
    if done["status"]["phase"] != "Succeeded":
        raise RuntimeError(f"migration failed: {api.call('GET', f'{VMIS}/{name}')}")
    progress = json.loads(done["metadata"]["annotations"]["virtshift.io/migration-progress"])
    state = api.call("GET", f"{VMIS}/{name}")["status"]["migrationState"]
    argv = json.loads((keep / "run" / "supervisor.json").read_text())["argv"]
    argv = [a.replace(str(run), str(keep / "run")) for a in argv]
    api.call("DELETE", f"{VMIS}/{name}")
    api.call("DELETE", f"{VMIMS}/{name}-mig")
    wait(lambda: api.call("GET", f"{VMIS}/{name}") is None, 120, "VMI gone", 0.1)
    info = {"argv": argv, "source": state["sourceNode"], "target": state["targetNode"]}
    return total, float(progress.get("downtimeMs", 0)) / 1000, info, keep / "run"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="256Mi,1Gi")
    ap.add_argument("--workloads", default="idle,dirtying")
    ap.add_argument("--keep-data", action="store_true", help="keep the platform's data dir")
    args = ap.parse_args()
    images = GuestImages.locate()
    data = Path(tempfile.mkdtemp(prefix="vs-bench-mig-"))
    p = PlatformProcess(data, args=["--nodes", "2", "--accel", "tcg"])
    p.start()
    rows: list[tuple[str, list[float], list[float], list[float], list[float]]] = []
    try:
        api = Api(p)
        for n in ("node01", "node02"):
            wait(lambda n=n: api.call("GET", f"/api/v1/nodes/{n}"), 90, n, 0.1)  # type: ignore
        subprocess.run([str(VIRTSHIFT), "--kubeconfig", str(p.kubeconfig), "image", "import",
                        KERNEL_IMAGE, "--kernel", str(images.vmlinux), "--initrd",
                        str(images.initrd), "--cmdline", "console=ttyS0 quiet"], check=True,
                       capture_output=True)
        nets = {n: netns_of(int((data / "nodes" / n / "agent.pid").read_text()))
                for n in ("node01", "node02")}
        addrs = {n: next(a["address"] for a in api.call("GET", f"/api/v1/nodes/{n}")[
            "status"]["addresses"] if a["type"] == "InternalIP") for n in ("node01", "node02")}
        platform_once(api, p, "warmup", "256Mi", False)  # both nodes cache the kernel
        i = 0
        for size in args.sizes.split(","):
            for dirty in [w == "dirtying" for w in args.workloads.split(",")]:
                vs_t, vs_d, bare_t, bare_d = [], [], [], []
                for _ in range(args.runs):
                    i += 1
                    t, d, info, run = platform_once(api, p, f"m{i}", size, dirty)
                    vs_t.append(t)
                    vs_d.append(d)
                    bare = Bare(info["argv"], run, nets[info["source"]], nets[info["target"]],
                                addrs[info["target"]])
                    bt, bd = asyncio.run(bare.once())
                    bare_t.append(bt)
                    bare_d.append(bd)
                    shutil.rmtree(run.parent, ignore_errors=True)
                rows.append((f"{size} {'dirtying' if dirty else 'idle'}", vs_t, bare_t, vs_d,
                             bare_d))
    finally:
        p.stop()
        for pidfile in data.glob("nodes/*/vms/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        if args.keep_data:
            print(f"data kept in {data}", file=sys.stderr)
        else:
            shutil.rmtree(data, ignore_errors=True)

    def ms(v: float) -> str:
        return f"{v * 1000:,.0f} ms"

    print(f"runs={args.runs} per row (TCG, kernelBoot test guest, two nodes in network "
          "namespaces; medians)\n")
    print("| guest | virtshift total | bare QEMU total | goal 1.5x+300ms | met | "
          "virtshift downtime | bare downtime | difference |")
    print("|---|---|---|---|---|---|---|---|")
    for label, vs_t, bare_t, vs_d, bare_d in rows:
        t, b = statistics.median(vs_t), statistics.median(bare_t)
        d, bd = statistics.median(vs_d), statistics.median(bare_d)
        goal = 1.5 * b + 0.3
        print(f"| {label} | {ms(t)} | {ms(b)} | {ms(goal)} | {'yes' if t <= goal else 'NO'} | "
              f"{ms(d)} | {ms(bd)} | {ms(d - bd)} |")


if __name__ == "__main__":
    main()
