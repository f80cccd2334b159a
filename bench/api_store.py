"""API server benchmark: creates/s, gets/s, a 1,000-object list and watch delivery latency
through HTTPS, each beside raw SQLite doing the same work in the same run.

Run: ``.venv/bin/python bench/api_store.py [--seconds 8] [-c 32] [--api-workers 2]``
(``make bench``). Prints a Markdown table for docs/benchmarks.md.

Creates and gets are driven by ``wrk`` (C, from Debian; ``scripts/setup-system.sh`` installs
it) with ``bench/wrk_api.lua``, so that the load generator takes little of the machine's CPU;
every response must be a success, and the objects wrk created are counted back through the API.
The list and the watch latency use an aiohttp client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.store_raw import _key, raw_sqlite_inserts, sample_object
from virtshift.testing.platform import PlatformProcess

NS_URL = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_api.lua"


def _api_object(i: int) -> dict[str, Any]:
    obj = sample_object(i)
    meta = obj["metadata"]
    return {**obj, "metadata": {"name": meta["name"], "labels": meta["labels"],
                                "annotations": meta["annotations"]}}


async def wait_workers(platform: PlatformProcess, count: int) -> None:
    """Until every extra API server process listens (each logs that it serves)."""
    deadline = time.monotonic() + 60
    while platform.log_text().count("API worker serving") < count - 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the API workers did not start:\n" + platform.log_text())
        await asyncio.sleep(0.1)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[idx]


# ---- raw SQLite baselines ----------------------------------------------------------------------

def raw_gets(path: Path, n: int, total: int) -> float:
    db = sqlite3.connect(path)
    keys = [_key(random.randrange(total)) for _ in range(n)]
    t0 = time.perf_counter()
    for k in keys:
        row = db.execute("SELECT value FROM kv WHERE key = ?", (k,)).fetchone()
        json.loads(row[0])
    dt = time.perf_counter() - t0
    db.close()
    return n / dt


def raw_list(path: Path, count: int) -> float:
    db = sqlite3.connect(path)
    t0 = time.perf_counter()
    rows = db.execute("SELECT value FROM kv ORDER BY key LIMIT ?", (count,)).fetchall()
    items = [json.loads(r[0]) for r in rows]
    json.dumps({"items": items})
    dt = time.perf_counter() - t0
    db.close()
    return dt


def raw_commit_latency(path: Path, n: int) -> list[float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT OR REPLACE INTO kv(key, value, revision) VALUES (?, ?, 0)",
                   (f"lat-{i}", json.dumps(sample_object(i))))
        db.execute("COMMIT")
        out.append(time.perf_counter() - t0)
    db.close()
    return out


# ---- through the API ---------------------------------------------------------------------------

def wrk(platform: PlatformProcess, mode: str, seconds: float, connections: int,
        work: Path, names: list[str] | None = None) -> tuple[float, int]:
    """Run wrk against the VM collection: (requests/s, requests completed). Fails on any
    response that is not a success."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run scripts/setup-system.sh (make setup)")
    cfg = platform.config()
    body = _api_object(0)
    body["metadata"]["name"] = "NAMEPLACEHOLDER"
    (work / "body.json").write_text(json.dumps(body))
    if names is not None:
        (work / "names.txt").write_text("\n".join(names) + "\n")
    env = {**os.environ, "BENCH_TOKEN": cfg.token, "BENCH_MODE": mode,
           "BENCH_BODY": str(work / "body.json"), "BENCH_NAMES": str(work / "names.txt")}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(WRK_SCRIPT),
         cfg.server + NS_URL], env=env, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    if rate is None or done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(rate.group(1)), int(done.group(1))


class Api:
    def __init__(self, platform: PlatformProcess) -> None:
        cfg = platform.config()
        self.cfg = cfg
        self.session = aiohttp.ClientSession(
            base_url=cfg.server,
            connector=aiohttp.TCPConnector(ssl=cfg.ssl_context(), limit=256),
            headers={"Authorization": f"Bearer {cfg.token}"})

    async def close(self) -> None:
        await self.session.close()

    async def names(self) -> list[str]:
        """Every VM's name (paged, as kubectl does)."""
        names: list[str] = []
        cont = ""
        while True:
            params = {"limit": "5000", **({"continue": cont} if cont else {})}
            async with self.session.get(NS_URL, params=params) as r:
                body = await r.json()
            names += [item["metadata"]["name"] for item in body["items"]]
            cont = body["metadata"].get("continue", "")
            if not cont:
                return names

    async def list_time(self, count: int) -> float:
        t0 = time.perf_counter()
        async with self.session.get(NS_URL, params={"limit": str(count)}) as r:
            body = await r.json()
        assert len(body["items"]) == count, len(body["items"])
        return time.perf_counter() - t0

    async def watch_latency(self, watchers: int, writes: int) -> list[float]:
        """Per delivery: time from sending a write to a watcher receiving its event."""
        async with self.session.get(NS_URL, params={"limit": "1"}) as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        sent: dict[str, float] = {}
        latencies: list[float] = []
        ready = asyncio.Event()
        opened = 0

        async def watcher() -> None:
            nonlocal opened
            params = {"watch": "true", "resourceVersion": rv,
                      "fieldSelector": "metadata.namespace=default", "timeoutSeconds": "120"}
            async with self.session.get(NS_URL, params=params,
                                        timeout=aiohttp.ClientTimeout(total=None)) as resp:
                opened += 1
                if opened == watchers:
                    ready.set()
                got = 0
                async for line in resp.content:
                    ev = json.loads(line)
                    name = ev["object"]["metadata"]["name"]
                    if name in sent:
                        latencies.append(time.perf_counter() - sent[name])
                        got += 1
                        if got == writes:
                            return

        tasks = [asyncio.create_task(watcher()) for _ in range(watchers)]
        await asyncio.wait_for(ready.wait(), 60)
        for i in range(writes):
            name = f"lat-{i:05d}"
            obj = _api_object(10_000_000 + i)
            obj["metadata"]["name"] = name
            sent[name] = time.perf_counter()
            async with self.session.post(NS_URL, json=obj) as r:
                assert r.status == 201, await r.text()
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return latencies


async def run(n: int, concurrency: int, watchers: int, writes: int,
              with_controllers: bool = False, seconds: float = 8.0,
              api_workers: int = 2) -> str:
    work = Path(tempfile.mkdtemp(prefix="virtshift-bench-"))
    raw_db = work / "raw.db"
    # fsync latency drifts from minute to minute here: the raw inserts run twice before and
    # twice after the API's creates; the ratio uses their median.
    raw_creates = [raw_sqlite_inserts(raw_db, n), raw_sqlite_inserts(work / "raw-1.db", n)]
    raw_get = raw_gets(raw_db, n, n)
    raw_list_s = raw_list(raw_db, 1000)
    raw_lat = raw_commit_latency(raw_db, 200)

    args = ["--api-workers", str(api_workers)]
    if not with_controllers:
        args.append("--no-controllers")
    platform = PlatformProcess(work / "platform", args=args).start()
    await wait_workers(platform, api_workers)
    api = Api(platform)
    try:
        api_create, sent = await asyncio.to_thread(wrk, platform, "create", seconds,
                                                   concurrency, work)
        names = await api.names()
        if len(names) < sent:
            raise RuntimeError(f"wrk completed {sent} creates but the API lists {len(names)}")
        api_get, _ = await asyncio.to_thread(wrk, platform, "get", seconds / 2, concurrency,
                                             work, names)
        api_list_s = statistics.median([await api.list_time(1000) for _ in range(5)])
        lat = await api.watch_latency(watchers, writes)
    finally:
        await api.close()
        platform.stop()
    raw_creates += [raw_sqlite_inserts(work / f"raw-{i}.db", n) for i in (2, 3)]
    raw_create = statistics.median(raw_creates)

    def ms(v: float) -> str:
        return f"{v * 1000:.1f} ms"

    rows = [
        ("creates/s (durable)", f"{api_create:,.0f}", f"{raw_create:,.0f}",
         f"{api_create / raw_create:.2f}", ">= 0.33"),
        ("gets/s", f"{api_get:,.0f}", f"{raw_get:,.0f}", f"{api_get / raw_get:.3f}", ""),
        ("list 1,000 VMs", ms(api_list_s), ms(raw_list_s), f"{api_list_s / raw_list_s:.1f}x time",
         ""),
        (f"watch delivery p50 ({watchers} watchers)", ms(percentile(lat, 50)),
         ms(percentile(raw_lat, 50)) + " commit", "", ""),
        (f"watch delivery p99 ({watchers} watchers)", ms(percentile(lat, 99)),
         ms(percentile(raw_lat, 99)) + " commit", "", "< 50 ms"),
    ]
    out = ["| measure | virtshift API (HTTPS) | raw SQLite | ratio | goal |",
           "|---|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    out.append("")
    out.append(f"API server processes (--api-workers) {api_workers}; wrk -t1 -c{concurrency}, "
               f"creates for {seconds:g} s ({sent:,} VMs), gets for {seconds / 2:g} s; raw "
               f"SQLite n={n}, inserts/s of its 4 runs (2 before, 2 after the API): "
               f"{' / '.join(f'{r:,.0f}' for r in raw_creates)}; "
               f"{watchers} watchers x {writes} writes ({len(lat)} deliveries)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=2000, help="rows of the raw SQLite baselines")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long wrk creates")
    ap.add_argument("--api-workers", type=int, default=os.cpu_count() or 1,
                    help="API server processes (default: one per CPU)")
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--writes", type=int, default=50)
    ap.add_argument("--with-controllers", action="store_true",
                    help="run the controllers too (each created VM then gets the VM "
                         "controller's finalizer and status: three writes per create)")
    args = ap.parse_args()
    print(asyncio.run(run(args.n, args.concurrency, args.watchers, args.writes,
                          args.with_controllers, args.seconds, args.api_workers)))


if __name__ == "__main__":
    main()
