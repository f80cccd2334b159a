"""Import benchmark: virtshift's importer (``virtshift.storage.importer.run``) beside plain shell
pipelines, importing the same 1 GiB image from the same local HTTP server in one run.

The image: 1 GiB of virtual size, in each 16 MiB a 10 MiB run of random bytes, then zeros (640 MiB
of data, nothing compressible but the zeros), written as ``disk.qcow2`` and, with ``--variants``,
``disk.raw``, ``disk.raw.gz`` (gzip -1) and ``disk.raw.xz`` (xz -0 -T0). The server is a separate
process (aiohttp ``FileResponse``, i.e. ``sendfile``) on 127.0.0.1. For each variant, ``--runs``
times, in alternating order:

- virtshift: ``run(ImportArgs(source="http", ...))`` into a fresh volume directory, from the call
  to its return (child start, download, decompression, ``qemu-img convert -O raw`` for qcow2,
  growth to the capacity, fsync and rename included);
- baseline, the same work with standard tools, the output fsynced as the importer does:
  qcow2: ``curl -sS -o scratch URL && qemu-img convert -f qcow2 -O raw scratch out && sync out``;
  raw: ``curl -sS -o out URL && sync out``;
  raw.gz: ``curl -sS URL | gzip -dc > out && sync out``;
  raw.xz: ``curl -sS URL | xz -dc > out && sync out``.

Throughput is the virtual size (1 GiB) over the wall time; the goal (issue 6) is at least 90% of
the baseline's. Before each timed run the benchmark calls sync(2), so that no run pays for the
write-back of the one before. Files live under ``--dir`` (default /var/tmp) and are deleted
afterwards.

Run: ``.venv/bin/python bench/import_http.py [--runs 3] [--variants qcow2,raw,raw.gz,raw.xz]``;
prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtshift.storage.importer import ImportArgs, run
from virtshift.testing.guest import free_tcp_port

GiB = 1 << 30
MiB = 1 << 20
SERVER = """
import sys
from aiohttp import web
root = sys.argv[1]
app = web.Application()
app.router.add_static("/", root)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def make_raw(path: Path) -> None:
    with path.open("wb") as f:
        for _ in range(GiB // (16 * MiB)):
            f.write(os.urandom(10 * MiB))
            f.seek(6 * MiB, os.SEEK_CUR)
        f.truncate(GiB)


def make_variants(d: Path, variants: list[str]) -> dict[str, Path]:
    raw = d / "disk.raw"
    make_raw(raw)
    out: dict[str, Path] = {}
    for v in variants:
        target = d / f"disk.{v}"
        if v == "qcow2":
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                            str(target)], check=True)
        elif v == "raw.gz":
            with target.open("wb") as f:
                subprocess.run(["gzip", "-1", "-c", str(raw)], stdout=f, check=True)
        elif v == "raw.xz":
            with target.open("wb") as f:
                subprocess.run(["xz", "-0", "-T0", "-c", str(raw)], stdout=f, check=True)
        elif v != "raw":
            raise SystemExit(f"unknown variant {v}")
        out[v] = target if v != "raw" else raw
    return out


def baseline_cmd(variant: str, url: str, scratch: Path, out: Path) -> str:
    if variant == "qcow2":
        return (f"curl -sS -o {scratch} {url} && qemu-img convert -f qcow2 -O raw {scratch} "
                f"{out} && sync {out}")
    if variant == "raw":
        return f"curl -sS -o {out} {url} && sync {out}"
    tool = "gzip" if variant == "raw.gz" else "xz"
    return f"curl -sS {url} | {tool} -dc > {out} && sync {out}"


def run_baseline(variant: str, url: str, work: Path) -> float:
    work.mkdir()
    try:
        cmd = baseline_cmd(variant, url, work / "scratch", work / "out.img")
        t0 = time.perf_counter()
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(work)


async def run_ours(url: str, work: Path) -> float:
    try:
        t0 = time.perf_counter()
        result = await run(ImportArgs(source="http", dest_dir=work, capacity=GiB, url=url))
        elapsed = time.perf_counter() - t0
        assert result.virtual_size == GiB, result
        return elapsed
    finally:
        shutil.rmtree(work)


def verify(url: str, raw: Path, work: Path) -> None:
    """One import, compared with the source image (so the numbers are of correct imports)."""
    work.mkdir()
    try:
        asyncio.run(run(ImportArgs(source="http", dest_dir=work, capacity=GiB, url=url)))
        subprocess.run(["cmp", str(raw), str(work / "disk.img")], check=True)
    finally:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="qcow2,raw,raw.gz,raw.xz")
    ap.add_argument("--dir", default="/var/tmp")
    opts = ap.parse_args()
    variants = opts.variants.split(",")
    top = Path(tempfile.mkdtemp(prefix="bench-import-", dir=opts.dir))
    server = None
    try:
        t0 = time.perf_counter()
        files = make_variants(top, variants)
        print(f"images made in {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{v} {files[v].stat().st_size / MiB:.0f} MiB" for v in variants),
              file=sys.stderr)
        port = free_tcp_port()
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(top), str(port)])
        deadline = time.monotonic() + 30
        while subprocess.run(["curl", "-sf", "-o", "/dev/null", "-r", "0-0",
                              f"http://127.0.0.1:{port}/disk.raw"]).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the HTTP server did not start")
            time.sleep(0.1)
        rows = []
        for v in variants:
            url = f"http://127.0.0.1:{port}/{files[v].name}"
            verify(url, top / "disk.raw", top / "verify")
            ours: list[float] = []
            base: list[float] = []
            for i in range(opts.runs):
                order = [0, 1] if i % 2 == 0 else [1, 0]
                for which in order:
                    os.sync()  # start each run without the previous run's dirty pages
                    if which == 0:
                        base.append(run_baseline(v, url, top / "base"))
                    else:
                        (top / "ours").mkdir()
                        ours.append(asyncio.run(run_ours(url, top / "ours")))
                print(f"{v} run {i + 1}: virtshift {ours[-1]:.2f} s, baseline {base[-1]:.2f} s",
                      file=sys.stderr)
            mo, mb = statistics.median(ours), statistics.median(base)
            rows.append((v, files[v].stat().st_size, mo, mb))
        print(f"\n1 GiB virtual size, {opts.runs} runs each, medians\n")
        print("| image (served size) | virtshift | baseline | ratio (throughput) | goal |")
        print("|---|---|---|---|---|")
        for v, size, mo, mb in rows:
            print(f"| {v} ({size / MiB:.0f} MiB) | {mo:.2f} s, {GiB / MiB / mo:.0f} MiB/s | "
                  f"{mb:.2f} s, {GiB / MiB / mb:.0f} MiB/s | {mb / mo:.2f} | >= 0.90 |")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
