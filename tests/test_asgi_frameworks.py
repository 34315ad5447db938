"""Web frameworks under real servers: Starlette and FastAPI with the middleware, Django without.

Starlette and FastAPI run under uvicorn (asyncio) and hypercorn (asyncio and trio); Django's
async views run under uvicorn, with no bridgecancel middleware: Django cancels an async
view itself when its client disconnects, and `run_sync` inside the view passes that on.
"""

from __future__ import annotations

import hashlib
import logging
import types
from typing import Annotated, Any

import anyio
import anyio.from_thread
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import bridgecancel
from _servers import (
    PROMPTLY,
    Probe,
    connect,
    fetch,
    http_request,
    leave_while_blocked,
    read_all,
    serve,
    watch_body_reads,
)
from bridgecancel.asgi import CancelOnDisconnectMiddleware, threaded

pytestmark = pytest.mark.anyio

BODY = bytes(range(256)) * 800  # 200 KiB: several messages on every server
DIGEST = hashlib.sha256(BODY).hexdigest().encode()


@pytest.fixture
def anyio_backend(server_and_backend: tuple[str, str]) -> str:
    """Each test once per server (conftest's `server_and_backend`), on that server's loop."""
    return server_and_backend[1]


# ---------------------------------------------------------------------------- Starlette


def starlette_app(probe: Probe, body_read: list[anyio.Event]) -> Starlette:
    async def work(request: Request) -> Response:
        await probe.run_blocking()
        return PlainTextResponse("finished")

    async def body(request: Request) -> Response:
        await body_read[0].wait()  # the middleware has read the whole body already
        data = await request.body()
        disconnected = await request.is_disconnected()
        return PlainTextResponse(f"{hashlib.sha256(data).hexdigest()} {disconnected}")

    async def stream(request: Request) -> Response:
        await body_read[0].wait()
        digest = hashlib.sha256()
        async for chunk in request.stream():
            digest.update(chunk)
        return PlainTextResponse(digest.hexdigest())

    async def streaming(request: Request) -> Response:
        async def chunks() -> Any:
            yield b"first chunk\n"
            await probe.run_blocking()  # the client leaves while this runs
            yield b"never sent\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong")

    return Starlette(
        routes=[
            Route("/work", work),
            Route("/body", body, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/streaming", streaming),
            Route("/ping", ping),
        ],
        middleware=[Middleware(CancelOnDisconnectMiddleware)],
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def starlette(probe: Probe) -> Any:
    body_read: list[anyio.Event] = []
    app, event = watch_body_reads(starlette_app(probe, body_read))
    body_read.append(event)
    return app


async def test_starlette_endpoint_stops_its_worker_when_the_client_leaves(
    server: str, starlette: Any, probe: Probe
) -> None:
    async with serve(server, starlette) as port:
        left_at = await leave_while_blocked(port, probe, http_request(path="/work"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.cancelled
        assert bridgecancel.statistics().threads.running == 0
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


async def test_starlette_request_body_after_the_middleware_read_it(
    server: str, starlette: Any
) -> None:
    async with serve(server, starlette) as port:
        with anyio.fail_after(10):
            status, text = await fetch(port, http_request("POST", "/body", BODY))
    assert status == 200
    assert text == DIGEST + b" False"  # whole body; the waiting client is not disconnected


async def test_starlette_request_stream_after_the_middleware_read_it(
    server: str, starlette: Any
) -> None:
    async with serve(server, starlette) as port:
        with anyio.fail_after(10):
            assert await fetch(port, http_request("POST", "/stream", BODY)) == (200, DIGEST)


async def test_starlette_streaming_response_stops_when_the_client_leaves(
    server: str, starlette: Any, probe: Probe
) -> None:
    async with serve(server, starlette) as port:
        client = await connect(port)
        await client.send(http_request(path="/streaming"))
        with anyio.fail_after(10):
            await probe.started.wait()  # the first chunk has been sent
        await client.aclose()
        with anyio.fail_after(10):
            await probe.done.wait()
        assert probe.fired is True
        assert bridgecancel.statistics().threads.running == 0
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


async def test_starlette_client_that_waits_gets_its_response(server: str, probe: Probe) -> None:
    async def quick(request: Request) -> Response:
        await probe.run_blocking(0.05)
        return PlainTextResponse("finished")

    app = Starlette(
        routes=[Route("/quick", quick)], middleware=[Middleware(CancelOnDisconnectMiddleware)]
    )
    async with serve(server, app) as port:
        assert await fetch(port, http_request(path="/quick")) == (200, b"finished")
    assert probe.fired is False


# ---------------------------------------------------------------------------- FastAPI


@threaded
def scale(factor: int = 1) -> int:
    """A sync dependency, made cancellable (module level: annotations name it)."""
    return factor * 10


def fastapi_app(probe: Probe) -> FastAPI:
    app = FastAPI()
    app.add_middleware(CancelOnDisconnectMiddleware, timeout=5)

    @app.get("/items/{item_id}")
    @threaded
    def read_item(
        item_id: int, scaled: Annotated[int, Depends(scale)], q: str = "none"
    ) -> dict[str, object]:
        return {"item_id": item_id, "q": q, "scaled": scaled}

    @app.get("/work")
    @threaded
    def work() -> str:  # the common FastAPI style: a plain def endpoint
        try:
            return str(probe.block())
        finally:
            anyio.from_thread.run_sync(probe.done.set)

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    return app


async def test_fastapi_threaded_endpoint_gets_its_parameters(server: str, probe: Probe) -> None:
    async with serve(server, fastapi_app(probe)) as port:
        status, body = await fetch(port, http_request(path="/items/7?q=hello&factor=4"))
        assert status == 200
        assert body == b'{"item_id":7,"q":"hello","scaled":40}'
        status, body = await fetch(port, http_request(path="/items/oops"))
        assert status == 422  # FastAPI still validates the path parameter


async def test_fastapi_threaded_endpoint_stops_when_the_client_leaves(
    server: str, probe: Probe
) -> None:
    async with serve(server, fastapi_app(probe)) as port:
        # FastAPI's own handler awaits the threaded endpoint, whose worker sets probe.done
        # as it leaves.
        left_at = await leave_while_blocked(port, probe, http_request(path="/work"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert await fetch(port, http_request(path="/ping")) == (200, b'"pong"')


def fastapi_reports(middleware: str) -> Any:
    """A FastAPI app with three @threaded functions: a dependency and two endpoints.

    `middleware`: "add_middleware", "wrapped" (around the whole app) or "none".
    """
    app = FastAPI()
    if middleware == "add_middleware":
        app.add_middleware(CancelOnDisconnectMiddleware)

    @threaded
    def page_size(size: int = 10) -> int:
        return size

    @app.get("/report")
    @threaded
    def report(size: int = Depends(page_size)) -> int:
        return size

    @app.get("/other")
    @threaded
    def other() -> int:
        return 1

    return CancelOnDisconnectMiddleware(app) if middleware == "wrapped" else app


def bridgecancel_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridgecancel" and r.levelno == logging.WARNING
    ]


async def test_a_threaded_endpoint_without_the_middleware_warns_once(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once per @threaded function: each warning names one that nothing cancels."""
    caplog.set_level(logging.WARNING, logger="bridgecancel")
    warned: list[list[str]] = []
    async with serve(server, fastapi_reports("none")) as port:
        for path in ("/report", "/report", "/other", "/other"):
            assert (await fetch(port, http_request(path=path)))[0] == 200
            warned.append(bridgecancel_warnings(caplog))
    assert [len(w) for w in warned] == [2, 2, 3, 3]
    for message, name in zip(warned[-1], ("page_size", "report", "other"), strict=True):
        assert f".{name}()" in message
        assert "without CancelOnDisconnectMiddleware" in message
        assert "app.add_middleware(CancelOnDisconnectMiddleware)" in message
        assert "app = CancelOnDisconnectMiddleware(app)" in message


@pytest.mark.parametrize("middleware", ["add_middleware", "wrapped"])
async def test_a_threaded_endpoint_under_the_middleware_does_not_warn(
    server: str, middleware: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridgecancel")
    async with serve(server, fastapi_reports(middleware)) as port:
        for path in ("/report", "/other"):
            assert (await fetch(port, http_request(path=path)))[0] == 200
    assert bridgecancel_warnings(caplog) == []


# ---------------------------------------------------------------------------- Django


_django_views: dict[str, Any] = {}


@pytest.fixture(scope="module")
def django_asgi() -> Any:
    """Django configured once for this process: two async views, no middleware."""
    import django
    from django.conf import settings
    from django.http import HttpResponse
    from django.urls import path

    async def work(request: Any) -> Any:
        await _django_views["probe"].run_blocking()
        return HttpResponse(b"finished")

    async def ping(request: Any) -> Any:
        return HttpResponse(b"pong")

    urlconf: Any = types.ModuleType("bridgecancel_test_urls")  # a module filled in here
    urlconf.urlpatterns = [path("work", work), path("ping", ping)]
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="only for the tests",
            ALLOWED_HOSTS=["127.0.0.1"],
            ROOT_URLCONF=urlconf,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
        )
    django.setup(set_prefix=False)
    from django.core.handlers.asgi import ASGIHandler

    return ASGIHandler()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Django's ASGI handler is asyncio-only
async def test_django_async_view_stops_its_worker_when_the_client_leaves(
    django_asgi: Any, probe: Probe
) -> None:
    _django_views["probe"] = probe
    async with serve("uvicorn", django_asgi) as port:
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")
        left_at = await leave_while_blocked(port, probe, http_request(path="/work"))
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.cancelled
        assert bridgecancel.statistics().threads.running == 0
        assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


async def test_raw_response_reader_sees_a_complete_response(server: str) -> None:
    """The helper: a keep-alive connection's response is read whole by read_all."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("x"))])
    async with serve(server, app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send(http_request(path="/"))
            assert (await read_all(stream)).endswith(b"\r\n\r\nx")
