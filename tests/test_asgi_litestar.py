"""Litestar under real servers, with CancelOnDisconnectMiddleware in its middleware list.

Litestar does not cancel a handler whose client left; with the middleware, a handler's
`run_sync` worker, or a plain ``def`` handler made cancellable with `threaded`, stops when
its client leaves. Litestar runs on anyio, so these run under uvicorn (asyncio) and
hypercorn on both of its workers (asyncio and trio).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.from_thread
import pytest
from litestar import Litestar, get
from litestar.middleware import DefineMiddleware

import bridgecancel
from _servers import PROMPTLY, Probe, fetch, http_request, leave_while_blocked, serve
from bridgecancel.asgi import CancelOnDisconnectMiddleware, threaded

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(server_and_backend: tuple[str, str]) -> str:
    """Each test once per server (conftest's `server_and_backend`), on that server's loop."""
    return server_and_backend[1]


def litestar_app(probe: Probe, middleware: Any = CancelOnDisconnectMiddleware) -> Litestar:
    """`middleware`: what goes in Litestar's middleware list (None: nothing)."""

    @get("/work")
    async def work() -> str:
        await probe.run_blocking()
        return "finished"

    @get("/quick")
    async def quick() -> str:
        await probe.run_blocking(0.05)
        return "finished"

    @get("/sync")
    @threaded
    def sync_work() -> str:  # a plain def handler, made cancellable
        try:
            return str(probe.block())
        finally:
            anyio.from_thread.run_sync(probe.done.set)

    @get("/ping")
    async def ping() -> str:
        return "pong"

    return Litestar(
        route_handlers=[work, quick, sync_work, ping],
        middleware=[middleware] if middleware is not None else [],
        logging_config=None,  # leave the process's logging alone
    )


async def test_litestar_handler_stops_its_worker_when_the_client_leaves(server: str) -> None:
    probe = Probe()
    async with serve(server, litestar_app(probe)) as port:
        left_at = await leave_while_blocked(port, probe, http_request(path="/work"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.reason == "client disconnected"
        assert probe.cancelled
        assert bridgecancel.statistics().threads.running == 0
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


async def test_litestar_threaded_handler_stops_when_the_client_leaves(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridgecancel")
    probe = Probe()
    async with serve(server, litestar_app(probe)) as port:
        left_at = await leave_while_blocked(port, probe, http_request(path="/sync"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.reason == "client disconnected"
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")
    # Litestar applies its middleware around each route: @threaded sees it there.
    assert [r for r in caplog.records if r.name == "bridgecancel"] == []


async def test_litestar_client_that_waits_gets_its_response(server: str) -> None:
    probe = Probe()
    async with serve(server, litestar_app(probe)) as port:
        assert await fetch(port, http_request(path="/quick")) == (200, b"finished")
    assert probe.fired is False
    assert not probe.cancelled


async def test_litestar_define_middleware_passes_its_options(server: str) -> None:
    """``DefineMiddleware(CancelOnDisconnectMiddleware, timeout=...)``: the deadline applies."""
    probe = Probe()
    # Litestar types ASGI messages as TypedDicts, which mypy does not take for the
    # middleware's MutableMapping[str, Any].
    middleware = DefineMiddleware(CancelOnDisconnectMiddleware, timeout=0.2)  # type: ignore[arg-type]
    async with serve(server, litestar_app(probe, middleware)) as port:
        with anyio.fail_after(10):
            status, body = await fetch(port, http_request(path="/work"))
        assert status == 503
        assert b"took longer" in body
        assert probe.fired is True
        assert probe.reason == "deadline exceeded"


@pytest.mark.slow
@pytest.mark.parametrize(
    "server_and_backend", [pytest.param(("uvicorn", "asyncio"), id="uvicorn-asyncio")]
)
async def test_litestar_without_the_middleware_lets_the_handler_run_on(server: str) -> None:
    probe = Probe()

    @get("/work")
    async def work() -> str:
        await probe.run_blocking(0.3)
        return "finished"

    app = Litestar(route_handlers=[work], logging_config=None)
    async with serve(server, app) as port:
        client = await anyio.connect_tcp("127.0.0.1", port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(10):
            await probe.started.wait()
        await client.aclose()
        with anyio.fail_after(10):
            await probe.done.wait()
    assert probe.fired is False  # ran its full time
    assert not probe.cancelled
