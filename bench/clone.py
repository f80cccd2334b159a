"""Clone benchmark: a 1 GiB volume disk copied by virtshift's importer (``source="file"``, what
a DataVolume ``pvc`` clone runs on the node) beside ``cp --sparse=always`` of the same file, in one
run.

Two sources, both raw 1 GiB ``disk.img`` files: ``full`` (every byte written, random data) and
``sparse`` (1 MiB of random data every 16 MiB, 64 MiB in all, the rest holes). ``--runs`` times, in
alternating order, after a sync(2) each:

- virtshift: ``run(ImportArgs(source="file", path=SRC, capacity=1 GiB))`` into a fresh volume
  directory, from the call to its return: the child process, a reflink (``FICLONE``) if the
  filesystem can, else ``copy_file_range`` over the data extents (``SEEK_DATA``/``SEEK_HOLE``),
  fsync of the copy, rename to ``disk.img`` and fsync of the directory;
- ``cp --sparse=always SRC DST`` (no fsync), and ``cp --sparse=always SRC DST && sync DST`` (the
  same durability as the importer).

With ``--xfs`` (root, ``mkfs.xfs`` from xfsprogs) the same runs are repeated on a loop-mounted XFS
file system made with ``reflink=1``, where the importer's clone is a reflink. The goal (issue 6) is
under 1 s. Files live under ``--dir`` (default /var/tmp) and are deleted afterwards.

Run: ``.venv/bin/python bench/clone.py [--runs 5] [--xfs]``; prints Markdown for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtshift.storage.importer import ImportArgs, run

GiB = 1 << 30
MiB = 1 << 20


def make_sources(d: Path) -> dict[str, Path]:
    full, sparse = d / "full.img", d / "sparse.img"
    with full.open("wb") as f:
        for _ in range(GiB // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    with sparse.open("wb") as f:
        for i in range(GiB // (16 * MiB)):
            f.seek(i * 16 * MiB)
            f.write(os.urandom(MiB))
        f.truncate(GiB)
    os.sync()
    return {"full": full, "sparse": sparse}


async def ours(src: Path, work: Path) -> float:
    t0 = time.perf_counter()
    result = await run(ImportArgs(source="file", dest_dir=work, capacity=GiB, path=str(src)))
    elapsed = time.perf_counter() - t0
    assert result.virtual_size == GiB, result
    return elapsed


def timed_cp(src: Path, dst: Path, durable: bool) -> float:
    cmd = f"cp --sparse=always {src} {dst}" + (f" && sync {dst}" if durable else "")
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True)
    return time.perf_counter() - t0


def measure(sources: dict[str, Path], top: Path, runs: int, label: str
            ) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for name, src in sources.items():
        t_ours: list[float] = []
        t_cp: list[float] = []
        t_cp_sync: list[float] = []
        for i in range(runs):
            steps = ["ours", "cp", "cp+sync"]
            if i % 2:
                steps.reverse()
            for step in steps:
                work = top / f"work-{step}"
                work.mkdir()
                os.sync()
                if step == "ours":
                    t_ours.append(asyncio.run(ours(src, work)))
                    if i == 0:
                        subprocess.run(["cmp", str(src), str(work / "disk.img")], check=True)
                elif step == "cp":
                    t_cp.append(timed_cp(src, work / "disk.img", False))
                else:
                    t_cp_sync.append(timed_cp(src, work / "disk.img", True))
                shutil.rmtree(work)
            print(f"{label} {name} run {i + 1}: virtshift {t_ours[-1]:.3f} s, cp "
                  f"{t_cp[-1]:.3f} s, cp+sync {t_cp_sync[-1]:.3f} s", file=sys.stderr)
        rows.append((label, name, statistics.median(t_ours), statistics.median(t_cp),
                     statistics.median(t_cp_sync)))
    return rows


@contextlib.contextmanager
def xfs_mount(top: Path) -> Iterator[Path]:
    image, mnt = top / "xfs.img", top / "xfs"
    with image.open("wb") as f:
        f.truncate(6 * GiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--xfs", action="store_true", help="also on a loop-mounted XFS (reflink)")
    opts = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-clone-", dir=opts.dir))
    try:
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(top)],
                            capture_output=True, text=True, check=True).stdout.strip()
        rows = measure(make_sources(top), top, opts.runs, fs)
        if opts.xfs:
            with xfs_mount(top) as mnt:
                rows += measure(make_sources(mnt), mnt, opts.runs, "xfs (reflink=1)")
        print(f"\n1 GiB raw disk.img, {opts.runs} runs each, medians\n")
        print("| filesystem | source | virtshift clone | cp --sparse=always | "
              "cp --sparse=always + sync | goal |")
        print("|---|---|---|---|---|---|")
        for label, name, o, c, cs in rows:
            print(f"| {label} | {name} | {o:.3f} s | {c:.3f} s | {cs:.3f} s | < 1 s |")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
