"""``virtshift up --api-workers 2``: two API server processes on one port and one store.

Connections land on either process (SO_REUSEPORT). Whatever process serves a watch must deliver
every write, whichever process took it, in revision order; optimistic concurrency must hold
across processes; and the platform must survive kill -9 with its workers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

CM_URL = "/api/v1/namespaces/default/configmaps"
WATCHES = 16
WRITES = 40
DEADLINE = 60.0


def _wait_worker(p: PlatformProcess) -> int:
    pidfile = p.data_dir / "api-worker-1.pid"
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if pidfile.exists() and "API worker serving" in p.log_text():
            return int(pidfile.read_text())
        time.sleep(0.05)
    raise TimeoutError("the API worker did not start:\n" + p.log_text())


def _serving_pids(port: int) -> set[int]:
    """PIDs of the processes holding established server-side connections on ``port``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    pids = set()
    for part in out.split("pid=")[1:]:
        pids.add(int(part.split(",")[0]))
    return pids


def _session(p: PlatformProcess, *, fresh: bool) -> aiohttp.ClientSession:
    cfg = p.config()
    return aiohttp.ClientSession(
        base_url=cfg.server,
        connector=aiohttp.TCPConnector(ssl=cfg.ssl_context(), force_close=fresh),
        headers={"Authorization": f"Bearer {cfg.token}"})


async def _watch(session: aiohttp.ClientSession, rv: str, opened: asyncio.Event,
                 want: int) -> list[tuple[str, str, int]]:
    events: list[tuple[str, str, int]] = []
    params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "60"}
    async with session.get(CM_URL, params=params) as resp:
        assert resp.status == 200
        opened.set()
        async for line in resp.content:
            ev = json.loads(line)
            meta = ev["object"]["metadata"]
            events.append((ev["type"], meta["name"], int(meta["resourceVersion"])))
            if len(events) == want:
                break
    return events


async def _exercise(p: PlatformProcess, worker: int) -> None:
    port = int(p.config().server.rsplit(":", 1)[1])
    async with _session(p, fresh=True) as writer:
        async with writer.get(CM_URL) as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        sessions = [_session(p, fresh=False) for _ in range(WATCHES)]
        try:
            opened = [asyncio.Event() for _ in sessions]
            watches = [asyncio.create_task(_watch(s, rv, o, WRITES))
                       for s, o in zip(sessions, opened, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), DEADLINE)
            # 16 connections, spread by the kernel: both processes serve some of them
            assert {p.proc.pid if p.proc else 0, worker} <= _serving_pids(port)

            created: dict[str, int] = {}

            async def create(i: int) -> None:
                body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": f"cm-{i:03d}"}, "data": {"i": str(i)}}
                async with writer.post(CM_URL, json=body) as r:  # a new connection each time
                    assert r.status == 201, await r.text()
                    created[f"cm-{i:03d}"] = int((await r.json())["metadata"]["resourceVersion"])

            await asyncio.gather(*(create(i) for i in range(WRITES)))
            assert len(set(created.values())) == WRITES  # one revision sequence
            expected = sorted(((rev, name) for name, rev in created.items()))
            for got in await asyncio.wait_for(asyncio.gather(*watches), DEADLINE):
                assert [(rev, name) for _, name, rev in got] == expected
                assert {t for t, _, _ in got} == {"ADDED"}
        finally:
            for s in sessions:
                await s.close()

        # Compare-and-swap across processes: of two updates from the same revision, over
        # separate connections, exactly one wins.
        async with writer.get(f"{CM_URL}/cm-000") as r:
            current = await r.json()

        async def update(value: str) -> int:
            body = {**current, "data": {"i": value}}
            async with writer.put(f"{CM_URL}/cm-000", json=body) as r:
                return r.status

        statuses = sorted(await asyncio.gather(*(update(f"new-{v}") for v in range(6))))
        assert statuses == [200, 409, 409, 409, 409, 409]


def test_two_api_processes_share_the_store_and_watches(tmp_path: Path) -> None:
    # No controller: its client connections would only add shutdown noise to the log, and
    # the log below must show no traceback from either API process.
    p = PlatformProcess(tmp_path / "data", args=["--api-workers", "2", "--no-controllers"]
                        ).start()
    try:
        worker = _wait_worker(p)
        asyncio.run(_exercise(p, worker))
        # One store writer process commits the writes of both (store/sqliteremote.py).
        assert "store writer serving" in p.log_text()
        asyncio.run(_survive_writer_kill(p, int((p.data_dir / "store-writer.pid").read_text())))
    finally:
        p.stop()
    assert "Traceback" not in p.log_text()


async def _survive_writer_kill(p: PlatformProcess, pid: int) -> None:
    """kill -9 of the store writer: the platform restarts it and writes succeed again (those
    in flight meanwhile fail with a 500, as with a store that went away)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    async with _session(p, fresh=True) as session:
        for i in itertools.count():
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"after-kill-{i}"}}
            async with session.post(CM_URL, json=body) as r:
                if r.status == 201:
                    break
                assert r.status == 500, await r.text()
                assert (await r.json())["reason"] == "InternalError"
            assert time.monotonic() < deadline, "no write succeeded after the writer restart"
            await asyncio.sleep(0.1)
    assert int((p.data_dir / "store-writer.pid").read_text()) != pid


def test_api_workers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--api-workers must be 1 or more"):
        PlatformProcess(tmp_path / "data", args=["--api-workers", "0"]).start()


async def _refused_in_terminating_namespace(p: PlatformProcess, *, at_once: bool) -> None:
    ns_url = "/api/v1/namespaces"
    cm_url = "/api/v1/namespaces/doomed/configmaps"

    def cm(name: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}

    async with _session(p, fresh=True) as s:
        async with s.post(ns_url, json={"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": "doomed"}}) as r:
            assert r.status == 201
        for i in range(8):  # the namespace is now known active (cached) on the processes
            async with s.post(cm_url, json=cm(f"before-{i}")) as r:
                assert r.status == 201
        async with s.delete(f"{ns_url}/doomed") as r:  # no controller: stays Terminating
            assert r.status == 200
        deadline = time.monotonic() + DEADLINE
        attempt = 0
        while True:
            attempt += 1
            async with s.post(cm_url, json=cm(f"after-{attempt}")) as r:
                body = await r.json()
            if r.status == 403:
                assert "because it is being terminated" in body["message"]
                break
            # Another API process may take a moment to see the deletion (as an informer).
            assert not at_once, (r.status, body)
            assert r.status == 201 and time.monotonic() < deadline, (r.status, body)
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("workers", [1, 2])
def test_no_creates_in_a_terminating_namespace(tmp_path: Path, workers: int) -> None:
    p = PlatformProcess(tmp_path / "data",
                        args=["--api-workers", str(workers), "--no-controllers"]).start()
    try:
        if workers > 1:
            _wait_worker(p)
        asyncio.run(_refused_in_terminating_namespace(p, at_once=workers == 1))
    finally:
        p.stop()
