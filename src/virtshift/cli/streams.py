"""Byte streams over KubeVirt's ``plain.kubevirt.io`` websockets (console, VNC, port-forward).

:func:`ws_connect` opens a subresource websocket through a :class:`~virtshift.client.rest.Client`
(its session carries the kubeconfig's bearer token and CA), turning a refused handshake into the
server's Status error. :func:`pump` copies bytes both ways between a websocket and a local
reader/writer pair until either side ends; :func:`pump_stream` does it for an asyncio TCP
connection and :class:`FdReader` reads a file descriptor (stdin) for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import aiohttp

from virtshift.client.rest import Client, error_from_status
from virtshift.errors import ApiError

PROTOCOL = "plain.kubevirt.io"
CHUNK = 64 * 1024
MAX_MESSAGE = 16 * 1024 * 1024
ERROR_BODY_TIMEOUT = 10.0

Reader = Callable[[], Awaitable[bytes]]
"""Returns the next chunk of local bytes, ``b""`` at end of input."""
Writer = Callable[[bytes], Awaitable[None]]
"""Delivers bytes from the websocket to the local side."""
Ended = Literal["local", "remote"]


async def ws_connect(client: Client, path: str) -> aiohttp.ClientWebSocketResponse:
    """Open the websocket at ``path`` (relative to the API server) with ``plain.kubevirt.io``.

    A refused handshake raises the server's error (an :class:`ApiError` subclass carrying the
    Status message and ``code``)."""
    try:
        return await client.session.ws_connect(path, protocols=(PROTOCOL,),
                                               max_msg_size=MAX_MESSAGE)
    except aiohttp.WSServerHandshakeError as e:
        raise await _handshake_error(client, path, e) from None


async def _handshake_error(client: Client, path: str,
                           e: aiohttp.WSServerHandshakeError) -> ApiError:
    """The Status the server gave for ``path``. aiohttp drops a refused handshake's body, so
    send the upgrade request again as a plain request and read the body of the refusal."""
    if e.status < 400:
        err = ApiError(f"websocket handshake with the API server failed: {e.message} "
                       f"(HTTP {e.status})")
        err.code = e.status
        return err
    payload: Any = None
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Protocol": PROTOCOL}
    try:
        timeout = aiohttp.ClientTimeout(total=ERROR_BODY_TIMEOUT)
        async with client.session.get(path, headers=headers, timeout=timeout,
                                      read_until_eof=False) as resp:
            if resp.status >= 400:
                text = await resp.text()
                try:
                    payload = json.loads(text) if text else None
                except json.JSONDecodeError:
                    payload = {"message": text.strip()} if text.strip() else None
                return error_from_status(resp.status, payload)
    except (aiohttp.ClientError, TimeoutError):
        pass
    return error_from_status(e.status, None)


async def pump(ws: aiohttp.ClientWebSocketResponse, read: Reader, write: Writer) -> Ended:
    """Copy ``read()`` into the websocket (binary frames) and the websocket's frames into
    ``write`` until either side ends: end of local input (``b""``) or a local error, or the
    websocket closing. The websocket is closed on return (so the server sees the local side
    go); the caller closes its local side. Returns which side ended first."""

    async def upstream() -> None:
        while data := await read():
            await ws.send_bytes(data)

    async def downstream() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await write(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await write(msg.data.encode())
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return

    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        results = await asyncio.gather(up, down, return_exceptions=True)
        await ws.close()
    for result in results:
        # A connection torn down on either side just ends the stream; anything else is a bug.
        if isinstance(result, Exception) and not isinstance(
                result, (OSError, aiohttp.ClientError, asyncio.CancelledError)):
            raise result
    return "local" if up in done else "remote"


async def pump_stream(ws: aiohttp.ClientWebSocketResponse, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> Ended:
    """:func:`pump` for a TCP connection; closes the connection at the end."""

    async def read() -> bytes:
        return await reader.read(CHUNK)

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        return await pump(ws, read, write)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class FdReader:
    """Reads a file descriptor for :func:`pump` without blocking the loop.

    Pipes and terminals are watched with ``add_reader``; regular files (which are always
    readable) are read in a thread. With ``escape``, that byte ends the input: what precedes it
    is still delivered (virtctl's ``^]``)."""

    def __init__(self, fd: int, *, escape: int | None = None, chunk: int = CHUNK) -> None:
        self.fd = fd
        self.escape = escape
        self.chunk = chunk
        self.escaped = False
        self._eof = False
        self._pollable = not stat.S_ISREG(os.fstat(fd).st_mode)

    async def _wait_readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, on_ready)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    async def read(self) -> bytes:
        if self._eof:
            return b""
        if self._pollable:
            while True:
                await self._wait_readable()
                try:
                    data = os.read(self.fd, self.chunk)
                    break
                except BlockingIOError:
                    continue
        else:
            data = await asyncio.to_thread(os.read, self.fd, self.chunk)
        if self.escape is not None and (at := data.find(bytes([self.escape]))) >= 0:
            self._eof = self.escaped = True
            data = data[:at]
            if not data:
                return b""
        if not data:
            self._eof = True
        return data


def fd_writer(fd: int) -> Writer:
    """A :data:`Writer` for a file descriptor (stdout): writes every byte, waiting for the
    descriptor to take more when it is non-blocking and full."""

    async def wait_writable() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, on_ready)
        try:
            await ready
        finally:
            loop.remove_writer(fd)

    async def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await wait_writable()
                continue
            view = view[n:]

    return write
