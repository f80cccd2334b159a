"""Store write throughput against the raw SQLite baseline.

``raw_sqlite_inserts`` is what plain ``sqlite3`` can do with one durable (WAL +
``synchronous=FULL``) transaction per row; ``store_creates`` is what ``SqliteStore`` does with
``concurrency`` callers creating objects at once (group commit folds them into few transactions).

Run as a script: ``python bench/store_raw.py [-n 2000] [-c 64] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from virtshift.store.sqlite import SqliteStore


def sample_object(i: int) -> dict[str, Any]:
    """A VirtualMachine-sized object (about 1 KB of JSON)."""
    name = f"vm-{i:07d}"
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"00000000-0000-4000-8000-{i:012d}",
            "labels": {"app": "bench", "kubevirt.io/vm": name},
            "annotations": {"bench.virtshift.io/index": str(i)},
        },
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "metadata": {"labels": {"kubevirt.io/vm": name}},
                "spec": {
                    "domain": {
                        "cpu": {"cores": 1, "sockets": 1, "threads": 1},
                        "memory": {"guest": "128Mi"},
                        "devices": {
                            "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                            "interfaces": [{"name": "default", "masquerade": {}}],
                        },
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [
                        {
                            "name": "containerdisk",
                            "containerDisk": {"image": "virtshift/testguest:latest"},
                        }
                    ],
                },
            },
        },
    }


def _key(i: int) -> str:
    return f"/registry/kubevirt.io/virtualmachines/default/vm-{i:07d}"


def raw_sqlite_inserts(path: str | Path, n: int) -> float:
    """Inserts per second of ``n`` single-row durable transactions with plain sqlite3."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
            " revision INTEGER NOT NULL)"
        )
        values = [json.dumps(sample_object(i), separators=(",", ":")) for i in range(n)]
        start = time.perf_counter()
        for i, value in enumerate(values):
            conn.execute(
                "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?)", (_key(i), value, i + 1)
            )  # autocommit: one transaction, one fsync per row
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return n / elapsed


async def store_creates_async(path: str | Path, n: int, concurrency: int) -> float:
    """Creates per second of ``n`` objects through SqliteStore, ``concurrency`` at a time."""
    objects = [sample_object(i) for i in range(n)]
    store = SqliteStore(path, compact_interval=0)
    await store.start()
    try:
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < n:
                i = next_index
                next_index += 1
                await store.create(_key(i), objects[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        elapsed = time.perf_counter() - start
    finally:
        await store.close()
    return n / elapsed


def store_creates(path: str | Path, n: int, concurrency: int) -> float:
    """Synchronous wrapper of :func:`store_creates_async` (runs its own event loop)."""
    return asyncio.run(store_creates_async(path, n, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="objects to write")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--dir", help="directory for the databases (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="store-raw-") as tmp:
        raw = raw_sqlite_inserts(Path(tmp) / "raw.sqlite", args.n)
        store = store_creates(Path(tmp) / "store.sqlite", args.n, args.concurrency)
        seq = store_creates(Path(tmp) / "store-seq.sqlite", args.n, 1)
    print(f"raw sqlite3, 1 durable insert per transaction: {raw:10.0f} inserts/s")
    print(f"SqliteStore, concurrency {args.concurrency:4d}:          {store:10.0f} creates/s")
    print(f"SqliteStore, concurrency    1:          {seq:10.0f} creates/s")
    print(f"ratio store(c={args.concurrency}) / raw: {store / raw:.2f}")
    print(f"ratio store(c=1) / raw: {seq / raw:.2f}")


if __name__ == "__main__":
    main()
