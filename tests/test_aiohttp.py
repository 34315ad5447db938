"""aiohttp's server (not ASGI): `run_sync` in a handler, with and without handler cancellation.

aiohttp cancels a handler whose client disconnected only when asked to:
``web.run_app(app, handler_cancellation=True)`` or ``web.AppRunner(app,
handler_cancellation=True)`` (aiohttp 3.9 and later; off by default). With it on, the
cancellation reaches `run_sync`, whose worker's token fires; with it off, the handler and
its worker run to their end. No middleware is involved. aiohttp runs on asyncio only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiohttp import web

import bridgecancel
from _servers import (
    PROMPTLY,
    Probe,
    connect,
    fetch,
    http_request,
    leave_while_blocked,
    listening_socket,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def aiohttp_app(probe: Probe, seconds: float = 30.0) -> web.Application:
    async def work(request: web.Request) -> web.Response:
        await probe.run_blocking(seconds)
        return web.Response(text="finished")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_get("/ping", ping)
    return app


@asynccontextmanager
async def serve_aiohttp(app: web.Application, *, handler_cancellation: bool) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 in the test's loop, as ``web.run_app`` would; yield the port."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation, access_log=None)
    await runner.setup()
    sock = listening_socket()
    try:
        await web.SockSite(runner, sock).start()
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()
        sock.close()


async def test_handler_cancellation_stops_the_worker_when_the_client_leaves() -> None:
    probe = Probe()
    async with serve_aiohttp(aiohttp_app(probe), handler_cancellation=True) as port:
        left_at = await leave_while_blocked(port, probe, http_request(path="/work"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.reason == "the caller was cancelled"  # aiohttp's task.cancel()
        assert probe.cancelled
        assert bridgecancel.statistics().threads.running == 0
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


async def test_handler_cancellation_leaves_a_client_that_waits_alone() -> None:
    probe = Probe()
    async with serve_aiohttp(aiohttp_app(probe, 0.05), handler_cancellation=True) as port:
        assert await fetch(port, http_request(path="/work")) == (200, b"finished")
    assert probe.fired is False
    assert not probe.cancelled


@pytest.mark.slow
async def test_without_handler_cancellation_the_worker_runs_on() -> None:
    """aiohttp's default: the handler, and its worker, outlive the client."""
    probe = Probe()
    async with serve_aiohttp(aiohttp_app(probe, 0.3), handler_cancellation=False) as port:
        client = await connect(port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(10):
            await probe.started.wait()
        await client.aclose()
        with anyio.fail_after(10):
            await probe.done.wait()
        assert probe.fired is False  # ran its full time
        assert not probe.cancelled
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")
