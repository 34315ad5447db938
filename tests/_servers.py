"""Real ASGI servers on loopback, run in the test's own event loop, and raw-socket clients.

uvicorn runs on asyncio only; hypercorn runs on the test's backend (its asyncio or its trio
worker). The listening socket is bound before the server starts, so a client can connect at
once (the connection waits in the backlog until the server accepts it).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import trio

import bridgecancel

# How long a worker would block if nobody cancelled it; a test that waits this long failed.
FOREVER = 30.0
# Generous bound for "promptly" (a test is not a benchmark; the benchmarks measure it).
PROMPTLY = 2.0


def on_trio() -> bool:
    """True if the calling task runs on trio (else on asyncio)."""
    return trio.lowlevel.in_trio_task()


def listening_socket() -> socket.socket:
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on a socket whose proto says
    # TCP, and an accepted socket inherits the listener's (0 unless given), so without it a
    # keep-alive response under uvicorn could wait 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def serve(server: str, app: Any) -> AsyncIterator[int]:
    """Serve `app` with `server` on 127.0.0.1 for the block; yield the port."""
    if server == "uvicorn":
        async with _uvicorn(app) as port:
            yield port
    elif server == "hypercorn":
        async with _hypercorn(app) as port:
            yield port
    else:  # pragma: no cover - a typo in a test's parameters
        raise ValueError(server)


@asynccontextmanager
async def _uvicorn(app: Any) -> AsyncIterator[int]:
    import uvicorn

    sock = listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="auto",  # apps without lifespan support are served all the same
        ws="wsproto",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve, [sock])
            try:
                yield port
            finally:
                server.should_exit = True
    finally:
        sock.close()


@asynccontextmanager
async def _hypercorn(app: Any) -> AsyncIterator[int]:
    from hypercorn.config import Config

    sock = listening_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes it
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 5
    stop = anyio.Event()
    serve_hypercorn: Callable[..., Awaitable[None]]  # the same call on either backend
    if on_trio():
        from hypercorn.trio import serve as serve_hypercorn
    else:
        from hypercorn.asyncio import serve as serve_hypercorn
    async with anyio.create_task_group() as group:
        group.start_soon(_run_hypercorn, serve_hypercorn, app, config, stop)
        try:
            yield port
        finally:
            stop.set()


async def _run_hypercorn(serve_hypercorn: Any, app: Any, config: Any, stop: anyio.Event) -> None:
    await serve_hypercorn(app, config, shutdown_trigger=stop.wait, mode="asgi")


# ---------------------------------------------------------------------------- handlers


class Probe:
    """What a handler's blocking worker did, seen from the test."""

    def __init__(self) -> None:
        self.started = anyio.Event()  # the worker is blocked on its token
        self.done = anyio.Event()  # the handler has left run_sync (either way)
        self.fired: bool | None = None  # whether the worker's token fired
        self.fired_at = math.inf
        self.reason: str | None = None
        self.cancelled = False  # whether the handler saw a cancellation

    def block(self, seconds: float = FOREVER) -> bool:
        """Runs in the worker: wait on the job's token for up to `seconds`."""
        token = bridgecancel.current_token()
        anyio.from_thread.run_sync(self.started.set)
        self.fired = token.wait(seconds)
        self.fired_at = time.monotonic()
        self.reason = token.reason
        token.check()  # a worker that saw its token fire stops with Cancelled
        return self.fired

    async def run_blocking(self, seconds: float = FOREVER) -> None:
        """Runs in the handler: the blocking work, through bridgecancel.run_sync."""
        try:
            await bridgecancel.run_sync(self.block, seconds)
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        finally:
            self.done.set()


def watch_body_reads(app: Any) -> tuple[Any, anyio.Event]:
    """Wrap `app` (outside the middleware): the event is set once the server's last body
    message has been read, so a handler can wait for it before reading the body itself."""
    read_all_body = anyio.Event()

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body"):
                read_all_body.set()
            return message

        await app(scope, recording_receive, send)

    return wrapped, read_all_body


# ---------------------------------------------------------------------------- clients


def http_request(
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(port: int) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port)


async def read_all(stream: anyio.abc.SocketStream) -> bytes:
    """Read until the server closes the connection (or resets it)."""
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return b"".join(chunks)


async def fetch(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one request with ``Connection: close``; return (status, body)."""
    async with await connect(port) as stream:
        await stream.send(request)
        response = await read_all(stream)
    return parse(response)


async def leave_while_blocked(port: int, probe: Probe, request: bytes) -> float:
    """Send `request`, close the connection once the handler's worker is blocked; wait for
    the handler to leave run_sync. Returns when the client left."""
    client = await connect(port)
    await client.send(request)
    with anyio.fail_after(10):
        await probe.started.wait()
    left_at = time.monotonic()
    await client.aclose()
    with anyio.fail_after(10):
        await probe.done.wait()
    return left_at


def parse(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    if not head:
        return 0, b""
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)
