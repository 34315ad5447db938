"""CancelOnDisconnectMiddleware under real servers on loopback, with raw ASGI apps and raw sockets.

Each test runs under uvicorn (asyncio) and under hypercorn on both of its workers (asyncio
and trio), in the test's own event loop.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import _proc_helpers
import bridgecancel
from _servers import (
    FOREVER,
    PROMPTLY,
    Probe,
    connect,
    fetch,
    http_request,
    leave_while_blocked,
    parse,
    read_all,
    serve,
    watch_body_reads,
)
from bridgecancel.asgi import CancelOnDisconnectMiddleware

pytestmark = pytest.mark.anyio

Scope = MutableMapping[str, Any]  # as the ASGI spec (and the middleware) types it
App = Callable[..., Any]


@pytest.fixture
def anyio_backend(server_and_backend: tuple[str, str]) -> str:
    """Each test once per server (conftest's `server_and_backend`), on that server's loop."""
    return server_and_backend[1]


async def respond(send: Any, body: bytes = b"ok", status: int = 200) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def with_ping(handler: App) -> App:
    """Route ``/ping`` to a plain 200, other requests to `handler`; answer lifespan events."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # hypercorn always runs it
            await lifespan(receive, send)
        elif scope["path"] == "/ping":
            await respond(send, b"pong")
        else:
            await handler(scope, receive, send)

    return app


async def still_serving(port: int) -> None:
    assert await fetch(port, http_request(path="/ping")) == (200, b"pong")


def assert_no_worker_running() -> None:
    assert bridgecancel.statistics().threads.running == 0


class CancelledRequests(logging.Handler):
    """The `bridgecancel` logger's records of cancelled requests; `arrived` is set by each.

    The middleware logs in the request's task, so `emit` runs in the event loop's thread.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.arrived = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "duration_ms"):
            self.records.append(record)
            self.arrived.set()


@pytest.fixture
def cancelled_requests() -> Iterator[CancelledRequests]:
    logger = logging.getLogger("bridgecancel")
    handler = CancelledRequests()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("keep_alive", [False, True], ids=["close", "keep-alive"])
async def test_client_leaving_mid_request_stops_the_worker(server: str, keep_alive: bool) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking()
        await respond(send)

    request = http_request(path="/work", close=not keep_alive)
    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        left_at = await leave_while_blocked(port, probe, request)
        assert probe.fired is True
        assert probe.fired_at - left_at < PROMPTLY
        assert probe.reason == "client disconnected"  # the middleware's own reason (issue 16)
        assert probe.cancelled
        assert_no_worker_running()
        await still_serving(port)


@pytest.mark.slow
async def test_without_the_middleware_the_server_does_not_cancel(server: str) -> None:
    """Why the middleware exists: the server leaves a handler running after its client left."""
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking(0.3)
        await respond(send)

    async with serve(server, with_ping(handler)) as port:
        client = await connect(port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(10):
            await probe.started.wait()
        await client.aclose()
        with anyio.fail_after(10):
            await probe.done.wait()
        assert probe.fired is False  # ran its full time
        assert not probe.cancelled
        await still_serving(port)


async def test_a_client_that_waits_gets_its_response(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking(0.05)
        await respond(send, b"finished")

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        assert await fetch(port, http_request(path="/work")) == (200, b"finished")
        assert probe.fired is False
        assert not probe.cancelled


@pytest.mark.slow
async def test_a_disconnect_after_the_response_cancels_nothing(server: str) -> None:
    """Servers report a disconnect as the response completes; work after it runs on."""
    probe = Probe()
    after_response = anyio.Event()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await respond(send, b"early")
        after_response.set()
        await probe.run_blocking(0.3)  # like a background task

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        assert await fetch(port, http_request(path="/work")) == (200, b"early")
        with anyio.fail_after(10):
            await probe.done.wait()
        assert after_response.is_set()
        assert probe.fired is False
        assert not probe.cancelled
        await still_serving(port)


async def test_keep_alive_connection_serves_the_next_request(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await respond(send, b"first")
        await probe.run_blocking(0.05)

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        async with await connect(port) as client:
            await client.send(http_request(path="/work", close=False))
            await client.send(http_request(path="/ping"))
            responses = await read_all(client)
        assert responses.count(b"HTTP/1.1 200") == 2
        assert responses.endswith(b"pong")
        with anyio.fail_after(10):
            await probe.done.wait()
        assert probe.fired is False


async def test_a_streaming_response_stops_when_the_client_leaves(server: str) -> None:
    sent = []
    stopped = anyio.Event()
    outcome: list[str] = []

    async def streamer(scope: Scope, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        try:
            while True:  # a raw ASGI streamer that never looks at receive()
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
                sent.append(1)
                await anyio.sleep(0.01)
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        except BaseException as exc:
            outcome.append(repr(exc))
            raise
        finally:
            stopped.set()

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(streamer))) as port:
        client = await connect(port)
        await client.send(http_request(path="/stream"))
        assert b"200" in await client.receive()
        await client.aclose()
        with anyio.fail_after(10):
            await stopped.wait()
        assert outcome == ["cancelled"]
        await still_serving(port)


async def test_posted_body_is_replayed_after_the_middleware_read_it(server: str) -> None:
    """The app reads the body only after the middleware has read all of it from the server."""
    body = bytes(range(256)) * 800  # 200 KiB: several messages on both servers
    read_by_middleware: list[anyio.Event] = []

    async def echo(scope: Scope, receive: Any, send: Any) -> None:
        await read_by_middleware[0].wait()
        chunks = []
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await respond(send, hashlib.sha256(b"".join(chunks)).hexdigest().encode())

    app, event = watch_body_reads(CancelOnDisconnectMiddleware(with_ping(echo)))
    read_by_middleware.append(event)
    async with serve(server, app) as port:
        with anyio.fail_after(10):
            status, digest = await fetch(port, http_request("POST", "/echo", body))
        assert status == 200
        assert digest == hashlib.sha256(body).hexdigest().encode()
        await still_serving(port)


async def test_upload_past_the_bound_is_read_as_the_app_reads(server: str) -> None:
    """A body larger than max_buffered still arrives whole, read as the app asks for it."""
    body = b"0123456789abcdef" * 65536  # 1 MiB against a 64 KiB bound
    held_at_start: list[int] = []

    limit = 64 * 1024
    reached_bound = anyio.Event()

    def count_reads(app: App) -> App:
        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            read = [0]

            async def counting_receive() -> Any:
                message = await receive()
                read[0] += len(message.get("body", b""))
                if read[0] >= limit:
                    reached_bound.set()
                return message

            scope["test.bytes_read"] = read
            await app(scope, counting_receive, send)

        return wrapped

    async def slow_reader(scope: Scope, receive: Any, send: Any) -> None:
        await reached_bound.wait()
        # Time for a middleware that ignored its bound to read on (the server has the
        # whole body by now); this one stops.
        await anyio.sleep(0.2)
        held_at_start.append(scope["test.bytes_read"][0])
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await respond(send, str(size).encode())

    app = count_reads(CancelOnDisconnectMiddleware(with_ping(slow_reader), max_buffered=limit))
    async with serve(server, app) as port:
        with anyio.fail_after(10):
            assert await fetch(port, http_request("POST", "/upload", body)) == (
                200,
                str(len(body)).encode(),
            )
    # Each server hands over at most 64 KiB at once (uvicorn may join what it has).
    assert held_at_start[0] <= limit + 256 * 1024


async def test_deadline_before_the_response_answers_503(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking()
        await respond(send)

    app = CancelOnDisconnectMiddleware(with_ping(handler), timeout=0.2)
    async with serve(server, app) as port:
        with anyio.fail_after(10):
            status, body = await fetch(port, http_request(path="/work"))
        assert status == 503
        assert b"took longer" in body
        assert probe.fired is True
        assert probe.cancelled
        assert_no_worker_running()
        await still_serving(port)


@pytest.mark.slow
async def test_deadline_after_the_response_started_closes_the_connection(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        await probe.run_blocking()
        await send({"type": "http.response.body", "body": b"rest"})

    # Long enough for the first part to go out even on a loaded machine.
    app = CancelOnDisconnectMiddleware(with_ping(handler), timeout=0.5)
    async with serve(server, app) as port:
        async with await connect(port) as client:
            await client.send(http_request(path="/work"))
            with anyio.fail_after(10):
                response = await read_all(client)  # ends: the server closed the connection
        assert response.startswith(b"HTTP/1.1 200")
        assert b"partial" in response
        assert not response.endswith(b"0\r\n\r\n")  # no final chunk: cut short, not complete
        assert b"rest" not in response
        assert probe.fired is True
        assert_no_worker_running()
        await still_serving(port)


@pytest.mark.slow
async def test_deadline_does_not_cut_a_response_that_completed(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await respond(send, b"done")
        await probe.run_blocking(0.7)  # runs past the deadline, after the response

    app = CancelOnDisconnectMiddleware(with_ping(handler), timeout=0.5)
    async with serve(server, app) as port:
        assert await fetch(port, http_request(path="/work")) == (200, b"done")
        with anyio.fail_after(10):
            await probe.done.wait()
        assert probe.fired is False
        assert not probe.cancelled


async def test_app_error_reaches_the_server_as_itself(server: str) -> None:
    async def failing(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        raise LookupError("boom")

    seen: list[BaseException] = []

    def outermost(app: App) -> App:
        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except BaseException as exc:
                seen.append(exc)
                await respond(send, b"handled", status=500)

        return wrapped

    app = outermost(CancelOnDisconnectMiddleware(with_ping(failing)))
    async with serve(server, app) as port:
        assert await fetch(port, http_request(path="/fail")) == (500, b"handled")
        await still_serving(port)
    assert len(seen) == 1
    assert type(seen[0]) is LookupError


async def test_response_is_parsed_whole(server: str) -> None:
    """The helper the other tests use: a chunked streaming response parses to its body."""

    async def chunks(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"bc", b"def"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with serve(server, CancelOnDisconnectMiddleware(chunks)) as port:
        client = await connect(port)
        async with client:
            await client.send(http_request(path="/"))
            assert parse(await read_all(client)) == (200, b"abcdef")


async def test_open_token_in_a_handler_fires_when_the_client_leaves(server: str) -> None:
    """Work started some other way (a thread of the app's own) gets the request's token."""
    fired = threading.Event()
    started = anyio.Event()
    left = anyio.Event()
    threads: list[threading.Thread] = []

    def own_thread(token: bridgecancel.CancelToken) -> None:
        if token.wait(FOREVER):
            fired.set()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        try:
            async with bridgecancel.open_token() as token:
                thread = threading.Thread(target=own_thread, args=(token,))
                thread.start()
                threads.append(thread)
                started.set()
                await anyio.sleep_forever()
        finally:
            left.set()

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        client = await connect(port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(10):
            await started.wait()
        await client.aclose()
        with anyio.fail_after(10):
            await left.wait()
        await anyio.to_thread.run_sync(threads[0].join, PROMPTLY)
        assert fired.is_set()
        assert not threads[0].is_alive()
        await still_serving(port)


async def test_lifespan_and_websocket_pass_through_under_the_server(server: str) -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    lifespan_events: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                lifespan_events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"].upper()})
        await send({"type": "websocket.close", "code": 1000})

    async with serve(server, CancelOnDisconnectMiddleware(app, timeout=5)) as port:
        ws = WSConnection(ConnectionType.CLIENT)
        events: list[object] = []
        async with await connect(port) as stream:
            await stream.send(ws.send(Request(host="127.0.0.1", target="/ws")))
            with anyio.fail_after(10):
                while not any(isinstance(e, CloseConnection) for e in events):
                    ws.receive_data(await stream.receive())
                    for event in ws.events():
                        events.append(event)
                        if isinstance(event, AcceptConnection):
                            await stream.send(ws.send(TextMessage(data="hello")))
        texts = [e.data for e in events if isinstance(e, TextMessage)]
        assert texts == ["HELLO"]
        assert lifespan_events == ["lifespan.startup"]
    assert lifespan_events == ["lifespan.startup", "lifespan.shutdown"]


async def test_client_leaving_stops_a_run_process_job(server: str, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    outcome: list[str] = []
    left = anyio.Event()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        try:
            await bridgecancel.run_process(_proc_helpers.wait_for_cancel, str(marker))
            outcome.append("returned")
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        finally:
            left.set()

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        client = await connect(port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(30):  # a worker process may have to start first
            while not marker.exists():
                await anyio.sleep(0.01)
        await client.aclose()
        with anyio.fail_after(10):
            await left.wait()
        assert outcome == ["cancelled"]
        assert bridgecancel.statistics().processes.running == 0
        await still_serving(port)


async def test_client_leaving_mid_upload_cancels_the_reader(server: str) -> None:
    outcome: list[str] = []
    reading = anyio.Event()
    left = anyio.Event()

    async def reader(scope: Scope, receive: Any, send: Any) -> None:
        try:
            while True:
                message = await receive()
                reading.set()
                if message["type"] != "http.request" or not message.get("more_body"):
                    outcome.append(message["type"])
                    break
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        finally:
            left.set()
        await respond(send)

    async with serve(server, CancelOnDisconnectMiddleware(with_ping(reader))) as port:
        client = await connect(port)
        head = http_request("POST", "/upload", b"")
        head = head.replace(b"Content-Length: 0", b"Content-Length: 1000000")
        await client.send(head + b"x" * 1000)  # a thousandth of what it announced
        with anyio.fail_after(10):
            await reading.wait()
        await client.aclose()
        with anyio.fail_after(10):
            await left.wait()
        assert outcome == ["cancelled"]
        await still_serving(port)


async def test_a_request_cancelled_by_its_client_leaving_is_logged_once(
    server: str, cancelled_requests: CancelledRequests
) -> None:
    """One INFO record (method, path, why, how long): uvicorn writes no access line for it."""
    probe = Probe()

    handler_started: list[float] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        handler_started.append(time.monotonic())
        await probe.run_blocking()
        await respond(send)

    request = http_request("POST", "/work?key=secret", b"data")
    async with serve(server, CancelOnDisconnectMiddleware(with_ping(handler))) as port:
        left_at = await leave_while_blocked(port, probe, request)
        with anyio.fail_after(10):
            await cancelled_requests.arrived.wait()
        await still_serving(port)  # a request that completes is not logged
    [record] = cancelled_requests.records
    assert (record.name, record.levelno) == ("bridgecancel", logging.INFO)
    fields = (record.method, record.path, record.reason)  # type: ignore[attr-defined]
    assert fields == ("POST", "/work", "client disconnected")
    duration: float = record.duration_ms  # type: ignore[attr-defined]
    ran_at_least = (left_at - handler_started[0]) * 1000  # until its client left
    assert ran_at_least <= duration < ran_at_least + 10_000
    message = record.getMessage()
    assert message.startswith("POST /work cancelled after ")
    assert message.endswith(f"{round(duration)} ms: client disconnected")
    assert "secret" not in message  # the query string is left out


@pytest.mark.slow
async def test_a_request_past_its_deadline_is_logged_once(
    server: str, cancelled_requests: CancelledRequests
) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking()
        await respond(send)

    app = CancelOnDisconnectMiddleware(with_ping(handler), timeout=0.2)
    async with serve(server, app) as port:
        with anyio.fail_after(10):
            assert (await fetch(port, http_request(path="/slow")))[0] == 503
            await cancelled_requests.arrived.wait()
        await still_serving(port)
    [record] = cancelled_requests.records
    assert record.levelno == logging.INFO
    fields = (record.method, record.path, record.reason)  # type: ignore[attr-defined]
    assert fields == ("GET", "/slow", "deadline exceeded")
    duration: float = record.duration_ms  # type: ignore[attr-defined]
    assert 150 <= duration < 10_000  # it ran until its 200 ms deadline
    message = f"GET /slow cancelled after {round(duration)} ms: deadline exceeded"
    assert record.getMessage() == message
