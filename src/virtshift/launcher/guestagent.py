"""Talking to qemu-ga inside the guest, through the host end of its virtio-serial channel.

The channel is a unix socket QEMU listens on (one client at a time); QEMU accepts the connection
whether or not an agent runs in the guest, so "no agent" shows up as silence: every call has a
short timeout. Each call opens a fresh connection and resynchronises first with
``guest-sync-delimited`` (the agent answers with a 0xFF byte before the JSON), which skips any
stale output left by an earlier, abandoned exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtshift.launcher.common import LauncherError

_SENTINEL = b"\xff"
_ids = itertools.count(int.from_bytes(os.urandom(3), "big"))


class GuestAgentError(LauncherError):
    """Base of guest agent failures."""


class GuestAgentUnavailable(GuestAgentError):
    """Nothing answered on the channel in time (no agent running, or the VM is gone)."""


class GuestAgentCommandError(GuestAgentError):
    """The agent answered with an error."""


@dataclass(frozen=True)
class GuestAgentInfo:
    version: str
    commands: tuple[str, ...]
    """The enabled commands."""


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str | None
    ip_addresses: tuple[str, ...]
    """``address/prefix`` strings, IPv4 first."""


class GuestAgent:
    """Client for the agent socket at ``path``; calls are serialised."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout_s: float = 2.0, expect_reply: bool = True) -> Any:
        """Run ``command`` in the guest; its ``return`` value.

        ``expect_reply=False`` is for commands that answer nothing on success
        (``guest-shutdown``): the call returns once the command is sent after a good sync.
        """
        async with self._lock:
            try:
                return await asyncio.wait_for(
                    self._exchange(command, arguments, expect_reply), timeout_s)
            except TimeoutError as e:
                raise GuestAgentUnavailable(
                    f"guest agent: no answer to {command} within {timeout_s}s") from e
            except (OSError, EOFError, asyncio.IncompleteReadError) as e:
                raise GuestAgentUnavailable(f"guest agent channel {self.path}: {e}") from e

    async def _exchange(self, command: str, arguments: dict[str, Any] | None,
                        expect_reply: bool) -> Any:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            sync_id = next(_ids) % (2**31)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            writer.write(_SENTINEL + json.dumps(request).encode() + b"\n")
            await writer.drain()
            await reader.readuntil(_SENTINEL)
            while (await _read_reply(reader)).get("return") != sync_id:
                pass
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            if not expect_reply:
                return None
            reply = await _read_reply(reader)
            if "error" in reply:
                err = reply["error"]
                raise GuestAgentCommandError(
                    f"guest agent {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")
        finally:
            writer.close()
            await _closed(writer)

    async def info(self, *, timeout_s: float = 2.0) -> GuestAgentInfo | None:
        """The agent's version and enabled commands; None when no agent answers."""
        try:
            result = await self.execute("guest-info", timeout_s=timeout_s)
        except GuestAgentUnavailable:
            return None
        commands = tuple(
            str(c.get("name")) for c in result.get("supported_commands", [])
            if isinstance(c, dict) and c.get("enabled", True)
        )
        return GuestAgentInfo(version=str(result.get("version", "")), commands=commands)

    async def osinfo(self, *, timeout_s: float = 2.0) -> dict[str, str] | None:
        """``guest-get-osinfo`` in the shape of a VMI's ``status.guestOSInfo``."""
        try:
            raw = await self.execute("guest-get-osinfo", timeout_s=timeout_s)
        except GuestAgentUnavailable:
            return None
        keys = {"name": "name", "kernelRelease": "kernel-release", "version": "version",
                "prettyName": "pretty-name", "versionId": "version-id",
                "kernelVersion": "kernel-version", "machine": "machine", "id": "id"}
        return {k: str(raw[v]) for k, v in keys.items() if raw.get(v) is not None}

    async def interfaces(self, *, timeout_s: float = 2.0) -> list[GuestInterface] | None:
        """``guest-network-get-interfaces``, loopback left out."""
        try:
            raw = await self.execute("guest-network-get-interfaces", timeout_s=timeout_s)
        except GuestAgentUnavailable:
            return None
        result = []
        for iface in raw or []:
            if iface.get("name") == "lo":
                continue
            addrs = sorted(
                (a for a in iface.get("ip-addresses", []) if isinstance(a, dict)),
                key=lambda a: a.get("ip-address-type") != "ipv4")
            result.append(GuestInterface(
                name=str(iface.get("name")), mac=iface.get("hardware-address"),
                ip_addresses=tuple(f"{a.get('ip-address')}/{a.get('prefix')}" for a in addrs)))
        return result


async def _read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next JSON object line; lines that are not JSON objects (noise) are skipped."""
    while True:
        line = (await reader.readline()).strip(_SENTINEL + b" \r\n")
        if not line:
            if reader.at_eof():
                raise EOFError("guest agent channel closed")
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value


async def _closed(writer: asyncio.StreamWriter) -> None:
    # The peer may have gone first (OSError); the socket is closed either way.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
