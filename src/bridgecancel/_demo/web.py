"""The demo's web case: a client leaves mid-request under a real server on loopback.

The same blocking handler runs twice on one server: once through `run_sync` under
`CancelOnDisconnectMiddleware`, once the way frameworks run a sync handler today
(`anyio.to_thread.run_sync`, no middleware). A raw-socket client sends a request and closes
its connection while the handler's thread works; the row says how soon each thread stopped.
The server is uvicorn on asyncio and hypercorn's trio worker on trio (the ``web`` extra);
it is imported only here, so the rest of the demo runs without it.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import anyio.from_thread
import anyio.to_thread

from .._backend import on_trio
from .._supervise import statistics
from .._threads import run_sync
from .._tokens import current_token
from ..asgi import CancelOnDisconnectMiddleware

__all__ = ("web_disconnect",)

WORK_SECONDS: Final = 1.5
"""How long the handler's blocking work takes when nothing stops it."""

_Serve = Callable[[Any], Any]  # app -> async context manager yielding the port

_INSTALL = "pip install -e '.[web]' from a checkout"


async def web_disconnect(backend: str) -> dict[str, str]:
    """A client closes its connection mid-request: with bridgecancel, and with the anchor."""
    server = "hypercorn (trio worker)" if backend == "trio" else "uvicorn"
    row = {
        "case": "web: client leaves mid-request",
        "backend": backend,
        "settings": f"{server} on 127.0.0.1, handler work {WORK_SECONDS} s",
    }
    try:
        serve = _server_for_this_backend()
    except ImportError as exc:
        return {
            **row,
            "bridgecancel": f"not run: {exc.name or 'the server'} is not installed ({_INSTALL})",
            "anchor": "not run",
        }
    mine = await _leave_mid_request(serve, cancellable=True)
    left = "no thread left" if statistics().threads.running == 0 else "a thread still running"
    theirs = await _leave_mid_request(serve, cancellable=False)
    return {
        **row,
        "bridgecancel": f"CancelOnDisconnectMiddleware + run_sync: thread stopped "
        f"{_seconds(mine)} after the client left; {left}",
        "anchor": f"anyio.to_thread.run_sync, no middleware: thread ran on {_seconds(theirs)}"
        " after the client left, to the end of its work",
    }


class _Handler:
    """An ASGI app whose handler runs `WORK_SECONDS` of blocking work in a thread."""

    def __init__(self, cancellable: bool) -> None:
        self.cancellable = cancellable
        self.started = anyio.Event()
        self.finished = anyio.Event()
        self.ended_at = math.inf

    def work(self) -> None:
        # Blocking work that watches its token, as a query or a download loop would.
        try:
            anyio.from_thread.run_sync(self.started.set)
            # Outside run_sync the token never fires: the anchor's thread sleeps it out.
            current_token().sleep(WORK_SECONDS)
        finally:
            self.ended_at = time.monotonic()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        try:
            if self.cancellable:
                await run_sync(self.work)
            else:
                await anyio.to_thread.run_sync(self.work)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            self.finished.set()


async def _leave_mid_request(serve: _Serve, *, cancellable: bool) -> float:
    """Seconds from the client closing its connection to the handler's thread ending."""
    handler = _Handler(cancellable)
    app = CancelOnDisconnectMiddleware(handler) if cancellable else handler
    async with serve(app) as port:
        client = await anyio.connect_tcp("127.0.0.1", port)
        await client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        with anyio.fail_after(10):
            await handler.started.wait()
        left_at = time.monotonic()
        await client.aclose()
        with anyio.fail_after(10 + WORK_SECONDS):
            await handler.finished.wait()  # the anchor's handler too: no thread left behind
    return handler.ended_at - left_at


def _server_for_this_backend() -> _Serve:
    """The server for the running backend; raises ImportError if it is not installed."""
    if on_trio():
        import hypercorn.trio  # noqa: F401  (checked now, used in _hypercorn_trio)

        return _hypercorn_trio
    import uvicorn  # noqa: F401

    return _uvicorn


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@asynccontextmanager
async def _uvicorn(app: Any) -> AsyncIterator[int]:
    import uvicorn

    sock = _listening_socket()
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve, [sock])
            try:
                yield sock.getsockname()[1]
            finally:
                server.should_exit = True
    finally:
        sock.close()


@asynccontextmanager
async def _hypercorn_trio(app: Any) -> AsyncIterator[int]:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    sock = _listening_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes it
    config.accesslog = None
    config.errorlog = None
    stop = anyio.Event()

    async def run() -> None:
        await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        try:
            yield port
        finally:
            stop.set()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
