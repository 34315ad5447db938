"""CancelOnDisconnectMiddleware's cheap path, under real servers on loopback.

The middleware starts its watcher (the task that reads the server's ``receive``) only
when the app first waits: an app that answers without waiting costs no task, and a
watcher that was started never outlives its request. Runs under uvicorn (asyncio) and
hypercorn on both of its workers.

The tests find the watcher by its task name, the one private name they use
(`bridgecancel.asgi._WATCHER_NAME`): whether a task runs is what the cheap path is about,
and the middleware has no public way to say so.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio
import pytest

from _servers import (
    Probe,
    connect,
    fetch,
    http_request,
    leave_while_blocked,
    on_trio,
    read_all,
    serve,
)
from bridgecancel.asgi import _WATCHER_NAME, CancelOnDisconnectMiddleware
from test_asgi import Scope, assert_no_worker_running, respond, still_serving, with_ping

pytestmark = pytest.mark.anyio

QUICK_REQUESTS = 20


@pytest.fixture
def anyio_backend(server_and_backend: tuple[str, str]) -> str:
    """Each test once per server (conftest's `server_and_backend`), on that server's loop."""
    return server_and_backend[1]


def live_watchers() -> list[str]:
    """Names of the middleware's watcher tasks still alive in this event loop."""
    if not on_trio():
        return [
            task.get_name()
            for task in asyncio.all_tasks()
            if task.get_name() == _WATCHER_NAME and not task.done()
        ]
    trio = sys.modules["trio"]
    found = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task.name == _WATCHER_NAME:
            found.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


class CountingReceive:
    """Wraps an app outside the middleware: counts the server's receive() calls per request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.reads: list[int] = []
        self.watchers_after: list[list[str]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reads = 0

        async def counting_receive() -> Any:
            nonlocal reads
            reads += 1
            return await receive()

        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.reads.append(reads)
            self.watchers_after.append(live_watchers())


async def test_quick_answers_on_one_connection_then_a_client_that_leaves(server: str) -> None:
    """Requests that never wait take the cheap path; the next one is watched all the same."""
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        if scope["path"] == "/quick":
            await respond(send, b"quick")  # no await that waits, under uvicorn
        else:
            await probe.run_blocking()
            await respond(send)

    counted = CountingReceive(CancelOnDisconnectMiddleware(with_ping(handler)))
    async with serve(server, counted) as port:
        async with await connect(port) as client:
            for _ in range(QUICK_REQUESTS - 1):
                await client.send(http_request(path="/quick", close=False))
            await client.send(http_request(path="/quick"))
            responses = await read_all(client)
        assert responses.count(b"HTTP/1.1 200") == QUICK_REQUESTS
        assert responses.count(b"quick") == QUICK_REQUESTS
        if server == "uvicorn":
            # uvicorn's send does not wait: no watcher started, the server never read.
            assert counted.reads == [0] * QUICK_REQUESTS
        await leave_while_blocked(port, probe, http_request(path="/work", close=False))
        assert probe.fired is True
        assert probe.cancelled
        await still_serving(port)
    assert counted.watchers_after == [[]] * len(counted.watchers_after)
    assert_no_worker_running()


async def test_an_app_whose_first_wait_is_receive_gets_the_body(server: str) -> None:
    """No watcher runs before the app first waits; waiting in receive starts it."""
    bodies = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        bodies.append(b"".join(chunks))
        await respond(send, str(len(bodies[-1])).encode())

    data = bytes(range(256)) * 1000
    counted = CountingReceive(CancelOnDisconnectMiddleware(with_ping(handler)))
    async with serve(server, counted) as port:
        assert await fetch(port, http_request("POST", "/upload", data)) == (200, b"256000")
    assert bodies == [data]
    assert counted.reads[-1] >= 1
    assert counted.watchers_after == [[]] * len(counted.watchers_after)


async def test_no_watcher_outlives_a_cancelled_request(server: str) -> None:
    probe = Probe()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        await probe.run_blocking()
        await respond(send)

    counted = CountingReceive(CancelOnDisconnectMiddleware(with_ping(handler)))
    async with serve(server, counted) as port:
        client = await connect(port)
        await client.send(http_request(path="/work"))
        with anyio.fail_after(10):
            await probe.started.wait()
        watching = live_watchers()  # the handler waits: its watcher runs
        await client.aclose()
        with anyio.fail_after(10):
            await probe.done.wait()
            while not counted.watchers_after:
                await anyio.sleep(0.01)
    assert watching == [_WATCHER_NAME]
    assert probe.cancelled
    assert counted.reads[0] >= 1  # the watcher ran: it read the disconnect
    assert counted.watchers_after == [[]]
