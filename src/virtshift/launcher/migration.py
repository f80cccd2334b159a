"""Live migration between two QEMUs over QMP (the libvirt part of a KubeVirt migration).

Target (:func:`prepare_incoming`): QEMU was started with ``-incoming defer`` (and ``-S`` when
node-local disks are copied); the writable node-local disks are exported over NBD for the source to
mirror into, and QEMU listens for the migration stream. When the stream completes
(:func:`finish_incoming`) the NBD exports go and the guest is resumed.

Source (:class:`OutgoingMigration`): node-local disks are mirrored to the target's NBD exports in
``write-blocking`` mode (every guest write reaches both sides once the mirror is ready), then RAM
and device state migrate over TCP. Capabilities and parameters come from the effective migration
configuration: bandwidth, downtime limit, auto-converge, post-copy. Two timeouts follow KubeVirt:
completion (``completionTimeoutPerGiB`` x GiB to move: then post-copy if allowed, else abort) and
progress (remaining data not shrinking for ``progressTimeout``: abort). Aborting or failing leaves
the source running; after ``completed`` the source stays paused (``postmigrate``) and must never
run the guest again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from virtshift.api.migration import MigrationConfig
from virtshift.launcher.common import LauncherError
from virtshift.launcher.qmp import QmpCommandError, QmpError, QmpSession

log = logging.getLogger(__name__)

POLL_S = 0.05
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: QEMU's own default caps a migration at 128 MiB/s
MIRROR_READY_TIMEOUT_S = 600.0
IN_FLIGHT = ("setup", "active", "pre-switchover", "device", "postcopy-active",
             "postcopy-paused", "postcopy-recover", "wait-unplug")


class MigrationFailed(LauncherError):
    """The migration did not complete; the source still runs the guest."""

    def __init__(self, message: str, *, aborted: bool = False) -> None:
        super().__init__(message)
        self.aborted = aborted


@dataclass(frozen=True)
class MirroredDisk:
    node: str
    """The block node on both sides (the converter names format nodes ``drive{i}``)."""
    sync: Literal["top", "full"]
    """``top`` for an overlay whose backing image both nodes hold (containerDisk)."""


@dataclass
class Progress:
    status: str = "setup"
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_rate: int = 0
    iteration: int = 0
    mbps: float = 0.0
    elapsed_ms: int = 0
    downtime_ms: int | None = None
    mode: str = "PreCopy"
    disk_remaining_bytes: int = 0
    cpu_throttle_percentage: int = 0
    """Auto-converge's current guest CPU throttle."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status, "transferredBytes": self.transferred_bytes,
            "remainingBytes": self.remaining_bytes, "totalBytes": self.total_bytes,
            "dirtyRate": self.dirty_rate, "iteration": self.iteration,
            "mbps": round(self.mbps, 1), "elapsedMs": self.elapsed_ms, "mode": self.mode,
            "diskRemainingBytes": self.disk_remaining_bytes,
            "cpuThrottlePercentage": self.cpu_throttle_percentage}
        if self.downtime_ms is not None:
            out["downtimeMs"] = self.downtime_ms
        return out


def _inet(host: str, port: int) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


async def prepare_incoming(qmp: QmpSession, *, address: str, port: int, nbd_port: int | None,
                           exports: Sequence[str], post_copy: bool) -> None:
    """Make a ``-incoming defer`` QEMU wait for the migration on ``address:port``, with the
    block nodes ``exports`` writable over NBD on ``nbd_port``."""
    caps = [{"capability": "events", "state": True}]
    if post_copy:
        caps.append({"capability": "postcopy-ram", "state": True})
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    if exports:
        if nbd_port is None:
            raise LauncherError("disks to receive but no NBD port")
        await qmp.execute("nbd-server-start", {"addr": _inet(address, nbd_port)})
        for node in exports:
            await qmp.execute("block-export-add", {"type": "nbd", "id": f"exp-{node}",
                                                   "node-name": node, "name": node,
                                                   "writable": True})
    await qmp.execute("migrate-incoming", {"uri": f"tcp:{address}:{port}"})


async def incoming_status(qmp: QmpSession) -> str:
    """``active``, ``completed``, ``failed``... of the incoming side (``none`` before)."""
    out = await qmp.execute("query-migrate")
    return str(out.get("status", "none")) if isinstance(out, dict) else "none"


async def finish_incoming(qmp: QmpSession, *, exports: Sequence[str]) -> None:
    """The stream completed: stop serving disks and run the guest (it was started ``-S`` when
    there were disks to receive; otherwise QEMU resumed it by itself)."""
    if exports:
        for node in exports:
            with contextlib.suppress(QmpCommandError):
                await qmp.execute("block-export-del", {"id": f"exp-{node}", "mode": "hard"})
        with contextlib.suppress(QmpCommandError):
            await qmp.execute("nbd-server-stop")
    status = await qmp.execute("query-status")
    if isinstance(status, dict) and status.get("status") in ("paused", "prelaunch"):
        await qmp.execute("cont")


ProgressSink = Callable[[Progress], Awaitable[None]]


@dataclass
class OutgoingMigration:
    """One outgoing live migration, driven by :meth:`run`; :meth:`abort` cancels it."""

    qmp: QmpSession
    address: str
    port: int
    config: MigrationConfig
    memory_bytes: int
    nbd_port: int | None = None
    disks: Sequence[MirroredDisk] = ()
    disk_bytes: int = 0
    report: ProgressSink | None = None
    report_every_s: float = 1.0
    """Progress goes to the API server no more than this often, and not at all for a migration
    that completes within that time (keeping the control plane quiet during short ones)."""
    progress: Progress = field(default_factory=Progress)
    _abort: asyncio.Event = field(default_factory=asyncio.Event)
    _mirrors: list[str] = field(default_factory=list)
    _was_running: bool = True

    def abort(self) -> None:
        self._abort.set()

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()

    async def run(self) -> Progress:
        """Migrate; return the final progress (status ``completed``) or raise MigrationFailed."""
        started = time.monotonic()
        try:
            current = await self.qmp.execute("query-migrate")
            status = current.get("status") if isinstance(current, dict) else None
            if status in ("completed", *IN_FLIGHT):
                # a node agent restarted mid-way: QEMU went on alone; follow it to the end
                log.info("resuming the follow-up of a migration QEMU reports as %s", status)
                return await self._follow(started)
            await self._configure()
            if self.disks:
                await self._mirror(started)
            self._check_abort()
            await self.qmp.execute("migrate", {"uri": f"tcp:{self.address}:{self.port}"})
            return await self._follow(started)
        except MigrationFailed:
            await self._cleanup()
            raise
        except QmpError as e:
            await self._cleanup()
            raise MigrationFailed(f"migration failed: {e}") from e
        except asyncio.CancelledError:
            await self._cleanup()
            raise

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise MigrationFailed("migration was cancelled on request", aborted=True)

    async def _configure(self) -> None:
        c = self.config
        state = await self.qmp.execute("query-status")
        self._was_running = isinstance(state, dict) and state.get("status") == "running"
        caps = [{"capability": "events", "state": True},
                {"capability": "auto-converge", "state": c.allow_auto_converge},
                {"capability": "postcopy-ram", "state": c.allow_post_copy}]
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {"max-bandwidth": c.bandwidth_bytes or UNLIMITED_BANDWIDTH}
        if c.max_downtime_ms is not None:
            params["downtime-limit"] = c.max_downtime_ms
        await self.qmp.execute("migrate-set-parameters", params)

    async def _mirror(self, started: float) -> None:
        if self.nbd_port is None:
            raise MigrationFailed("the target exported no disks (no NBD port)")
        for disk in self.disks:
            job = f"mirror-{disk.node}"
            await self.qmp.execute("drive-mirror", {
                "job-id": job, "device": disk.node, "sync": disk.sync, "mode": "existing",
                "format": "raw", "copy-mode": "write-blocking",
                "target": f"nbd:{self.address}:{self.nbd_port}:exportname={disk.node}"})
            self._mirrors.append(job)
        deadline = time.monotonic() + MIRROR_READY_TIMEOUT_S
        last_report = time.monotonic()
        while True:
            self._check_abort()
            jobs = {str(j.get("device")): j for j in await self.qmp.execute("query-block-jobs")
                    if isinstance(j, dict)}
            missing = [m for m in self._mirrors if m not in jobs]
            if missing:
                raise MigrationFailed(f"disk mirror {missing[0]} stopped before it was ready")
            remaining = sum(int(j.get("len", 0)) - int(j.get("offset", 0))
                            for j in jobs.values())
            self.progress.status = "mirroring"
            self.progress.disk_remaining_bytes = max(remaining, 0)
            self.progress.elapsed_ms = int((time.monotonic() - started) * 1000)
            if all(jobs[m].get("ready") for m in self._mirrors):
                return
            if time.monotonic() > deadline:
                raise MigrationFailed("disk mirror did not converge in time")
            if self.report and time.monotonic() - last_report >= self.report_every_s:
                last_report = time.monotonic()
                await self.report(self.progress)
            await asyncio.sleep(POLL_S)

    async def _follow(self, started: float) -> Progress:
        c = self.config
        completion = c.completion_timeout_s(self.memory_bytes, self.disk_bytes)
        best_remaining: int | None = None
        best_at = time.monotonic()
        last_report = time.monotonic()
        while True:
            info = await self.qmp.execute("query-migrate")
            info = info if isinstance(info, dict) else {}
            status = str(info.get("status", "none"))
            self._update(info, status, started)
            if status == "completed":
                self.progress.disk_remaining_bytes = 0
                return self.progress
            if status in ("failed", "cancelled"):
                why = info.get("error-desc") or status
                raise MigrationFailed(f"migration {status}: {why}",
                                      aborted=self._abort.is_set())
            if self._abort.is_set():
                await self._cancel()
                continue
            now = time.monotonic()
            remaining = self.progress.remaining_bytes
            if best_remaining is None or remaining < best_remaining:
                best_remaining, best_at = remaining, now
            if self.progress.mode != "PostCopy":
                if now - started > completion:
                    if c.allow_post_copy and status == "active":
                        log.info("migration exceeded %.0fs: switching to post-copy", completion)
                        await self.qmp.execute("migrate-start-postcopy")
                        self.progress.mode = "PostCopy"
                    else:
                        await self._cancel()
                        raise MigrationFailed(
                            f"migration timed out: not completed within {completion:.0f}s "
                            f"(completionTimeoutPerGiB {c.completion_timeout_per_gib})")
                elif now - best_at > c.progress_timeout:
                    await self._cancel()
                    raise MigrationFailed(
                        f"migration made no progress for {c.progress_timeout}s "
                        f"(progressTimeout); {remaining} bytes remained")
            if self.report and now - last_report >= self.report_every_s:
                last_report = now
                await self.report(self.progress)
            await asyncio.sleep(POLL_S)

    def _update(self, info: dict[str, Any], status: str, started: float) -> None:
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        assert isinstance(ram, dict)
        p = self.progress
        p.status = status
        p.transferred_bytes = int(ram.get("transferred", p.transferred_bytes))
        p.remaining_bytes = int(ram.get("remaining", p.remaining_bytes))
        p.total_bytes = int(ram.get("total", p.total_bytes))
        p.dirty_rate = int(ram.get("dirty-pages-rate", p.dirty_rate))
        p.iteration = int(ram.get("dirty-sync-count", p.iteration))
        p.mbps = float(ram.get("mbps", p.mbps))
        p.elapsed_ms = int(info.get("total-time", (time.monotonic() - started) * 1000))
        p.cpu_throttle_percentage = int(info.get("cpu-throttle-percentage", 0))
        if status == "postcopy-active":
            p.mode = "PostCopy"
        if "downtime" in info:
            p.downtime_ms = int(info["downtime"])

    async def _cancel(self) -> None:
        with contextlib.suppress(QmpCommandError):
            await self.qmp.execute("migrate_cancel")

    async def _cleanup(self) -> None:
        """After a failure: no mirror jobs left, the guest running on the source."""
        with contextlib.suppress(QmpError):
            await self._cancel()
            for _ in range(200):
                info = await self.qmp.execute("query-migrate")
                if not isinstance(info, dict) or info.get("status") not in (
                        *IN_FLIGHT, "cancelling"):
                    break
                await asyncio.sleep(POLL_S)
            for job in self._mirrors:
                with contextlib.suppress(QmpCommandError):
                    await self.qmp.execute("block-job-cancel", {"device": job, "force": True})
            status = await self.qmp.execute("query-status")
            if (self._was_running and self.progress.mode != "PostCopy"
                    and isinstance(status, dict)
                    and status.get("status") in ("paused", "finish-migrate")):
                # a failed switch-over leaves the source paused; it still owns the guest (after
                # post-copy began the guest's memory is split and it must not run here)
                await self.qmp.execute("cont")
