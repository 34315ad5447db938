"""CancelOnDisconnectMiddleware against a scripted server: the ASGI contract, message by message.

The scripted server behaves like the real ones where it matters: its ``receive`` always
yields first (as hypercorn's does), and it can report ``http.disconnect`` once during the
final ``send`` (hypercorn) or on every ``receive`` after the response (uvicorn).
The same behaviours under real servers are in test_asgi.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import MutableMapping
from typing import Any

import anyio
import pytest
import sniffio
import trio

import bridgecancel
from bridgecancel.asgi import CancelOnDisconnectMiddleware

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, Any]  # as the ASGI spec (and the middleware) types it
HTTP_SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}


class ScriptedServer:
    """A server side: messages for the app's receive, and a record of what it sent."""

    def __init__(self, *messages: Message, disconnect_on_final_send: bool = False) -> None:
        self.to_app: list[Message] = list(messages)
        self.arrived = anyio.Event()
        self.reads = 0  # messages handed out by receive
        self.sent: list[Message] = []
        self.disconnect_on_final_send = disconnect_on_final_send
        self.repeat_disconnect_after_response = False
        self.response_complete = False

    def push(self, message: Message) -> None:
        self.to_app.append(message)
        self.wake()

    def wake(self) -> None:
        self.arrived.set()
        self.arrived = anyio.Event()

    async def receive(self) -> Message:
        await anyio.lowlevel.checkpoint()  # like hypercorn: always yields first
        while True:
            if self.repeat_disconnect_after_response and self.response_complete:
                self.reads += 1
                return {"type": "http.disconnect"}
            if self.to_app:
                self.reads += 1
                return self.to_app.pop(0)
            await self.arrived.wait()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        final = message["type"] == "http.response.body" and not message.get("more_body")
        if final:
            self.response_complete = True
            self.wake()  # a receive() waiting now returns the disconnect (uvicorn)
            if self.disconnect_on_final_send:
                self.push({"type": "http.disconnect"})
                await anyio.wait_all_tasks_blocked()  # let the middleware read it now


def body(data: bytes, more: bool) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


async def respond(send: Any, data: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": data})


async def test_body_messages_reach_the_app_in_order_and_untouched() -> None:
    messages = [body(b"a", True), body(b"bc", True), body(b"", False)]
    server = ScriptedServer(*messages)
    received: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.wait_all_tasks_blocked()  # the middleware has read everything
        assert server.reads == 3
        for _ in messages:
            received.append(await receive())
        await respond(send)

    await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert len(received) == 3
    assert all(got is sent for got, sent in zip(received, messages, strict=True))


async def test_receive_hands_back_a_held_message_without_yielding() -> None:
    """Starlette's is_disconnected() polls receive() inside an already cancelled scope."""
    first, second = body(b"x", True), body(b"y", False)
    server = ScriptedServer(first)
    got: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as polled:
            polled.cancel()
            got.append(await receive())  # held: returned at once, no checkpoint
        assert not polled.cancelled_caught
        with anyio.CancelScope() as polled_again:
            polled_again.cancel()
            got.append(await receive())  # nothing held: the cancelled wait loses nothing
        assert polled_again.cancelled_caught
        server.push(second)
        got.append(await receive())
        await respond(send)

    await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert got == [first, second]
    assert got[0] is first
    assert got[1] is second


@pytest.mark.parametrize(("max_buffered", "expected_reads"), [(250, 3), (100, 1), (0, 1)])
async def test_read_ahead_stops_at_the_bound_until_the_app_reads(
    max_buffered: int, expected_reads: int
) -> None:
    chunks = [body(bytes([i]) * 100, True) for i in range(9)] + [body(b"", False)]
    server = ScriptedServer(*chunks)
    received: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.wait_all_tasks_blocked()
        assert server.reads == expected_reads  # stopped at the bound
        received.append(await receive())
        await anyio.wait_all_tasks_blocked()
        assert server.reads == expected_reads + 1  # room again: one more read
        while received[-1].get("more_body"):
            received.append(await receive())
        await respond(send)

    middleware = CancelOnDisconnectMiddleware(app, max_buffered=max_buffered)
    await middleware(HTTP_SCOPE, server.receive, server.send)
    assert received == chunks


async def test_a_disconnect_before_the_response_cancels_the_app() -> None:
    server = ScriptedServer(body(b"", False))
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        server.push({"type": "http.disconnect"})
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    with anyio.fail_after(5):
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert outcome == ["cancelled"]
    assert server.sent == []  # nobody to answer


async def test_the_app_sees_the_disconnect_on_every_later_receive() -> None:
    server = ScriptedServer(body(b"", False), {"type": "http.disconnect"})
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope(shield=True):
            for _ in range(3):
                seen.append((await receive())["type"])

    await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert seen == ["http.request", "http.disconnect", "http.disconnect"]
    assert server.reads == 2  # the middleware stopped reading at the disconnect


async def test_a_disconnect_during_the_final_send_cancels_nothing() -> None:
    """hypercorn reports the disconnect while the response's last message is sent."""
    server = ScriptedServer(body(b"", False), disconnect_on_final_send=True)
    finished = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)
        await anyio.wait_all_tasks_blocked()  # the middleware has read the disconnect
        assert server.reads == 2
        await anyio.lowlevel.checkpoint()  # a cancelled app would stop here
        finished.append(True)

    await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert finished == [True]


async def test_a_server_repeating_the_disconnect_is_read_once() -> None:
    """uvicorn returns http.disconnect from every receive() once the response is complete."""
    server = ScriptedServer(body(b"", False))
    server.repeat_disconnect_after_response = True
    finished = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        await respond(send)
        await anyio.wait_all_tasks_blocked()
        await anyio.lowlevel.checkpoint()  # a cancelled app would stop here
        finished.append(server.reads)

    with anyio.fail_after(5):
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert finished == [2]


async def test_a_response_with_trailers_is_complete_after_its_trailers() -> None:
    server = ScriptedServer(body(b"", False))
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        server.push({"type": "http.disconnect"})  # before the trailers: cancels
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    assert outcome == ["cancelled"]

    server = ScriptedServer(body(b"", False))

    async def complete_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": []})
        server.push({"type": "http.disconnect"})  # after the trailers: cancels nothing
        await anyio.wait_all_tasks_blocked()
        await anyio.lowlevel.checkpoint()
        outcome.append("finished")

    await CancelOnDisconnectMiddleware(complete_app)(HTTP_SCOPE, server.receive, server.send)
    assert outcome == ["cancelled", "finished"]


async def test_deadline_before_the_response_sends_503() -> None:
    server = ScriptedServer(body(b"", False))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        await CancelOnDisconnectMiddleware(app, timeout=0.05)(
            HTTP_SCOPE, server.receive, server.send
        )
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert server.sent[0]["status"] == 503
    assert not server.sent[1].get("more_body")


async def test_deadline_answers_503_even_if_the_app_swallowed_the_cancellation() -> None:
    server = ScriptedServer(body(b"", False))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return  # a misbehaving app: returns without a response

    with anyio.fail_after(5):
        await CancelOnDisconnectMiddleware(app, timeout=0.05)(
            HTTP_SCOPE, server.receive, server.send
        )
    assert server.sent[0]["status"] == 503


async def test_deadline_after_the_response_started_leaves_it_unfinished() -> None:
    server = ScriptedServer(body(b"", False))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        await CancelOnDisconnectMiddleware(app, timeout=0.05)(
            HTTP_SCOPE, server.receive, server.send
        )
    # Nothing after the partial body: the server closes a response left unfinished.
    assert [m.get("more_body") for m in server.sent] == [None, True]


async def test_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        raise AssertionError("the middleware must not read a non-HTTP scope")

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not send in a non-HTTP scope")

    middleware = CancelOnDisconnectMiddleware(app, timeout=0.01)
    for kind in ("lifespan", "websocket"):
        scope = {"type": kind}
        await middleware(scope, receive, send)
        assert seen[-1][0] is scope
        assert seen[-1][1] is receive
        assert seen[-1][2] is send


async def test_an_app_error_propagates_as_itself() -> None:
    server = ScriptedServer(body(b"", False))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("from the app")

    with pytest.raises(KeyError, match="from the app"):
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)


@pytest.mark.parametrize("outcome", ["error", "response"])
async def test_a_cancelled_outer_scope_never_changes_what_the_app_did(outcome: str) -> None:
    # Issue 17, item 1: the middleware's task is in a cancelled scope as the app returns
    # (a framework's cleanup cancelled it). On asyncio the wait for the watcher was not
    # shielded, so an error the app raised, or a response it sent in full, ended in a
    # cancellation instead.
    server = ScriptedServer(body(b"", False))
    outer = anyio.CancelScope()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0)  # the watcher starts at the app's first wait
        outer.cancel()
        if outcome == "error":
            raise KeyError("from the app")
        await respond(send)

    middleware = CancelOnDisconnectMiddleware(app)
    if outcome == "error":
        with pytest.raises(KeyError, match="from the app"), outer:
            await middleware(HTTP_SCOPE, server.receive, server.send)
    else:
        with outer:
            await middleware(HTTP_SCOPE, server.receive, server.send)
            returned = True
        assert returned  # the middleware returned as the app did, no cancellation
        assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]


async def test_an_outer_cancellation_propagates() -> None:
    server = ScriptedServer(body(b"", False))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05) as outer:
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
        pytest.fail("the middleware swallowed its caller's cancellation")
    assert outer.cancelled_caught
    assert server.sent == []  # an outer cancel is not a deadline: no 503


def test_bad_options_are_rejected_with_what_to_do() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(TypeError, match="ASGI app"):
        CancelOnDisconnectMiddleware(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass None for no deadline"):
        CancelOnDisconnectMiddleware(app, timeout=0)
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds.*NaN"):
        CancelOnDisconnectMiddleware(app, timeout=math.nan)
    with pytest.raises(TypeError, match="timeout"):
        CancelOnDisconnectMiddleware(app, timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_buffered"):
        CancelOnDisconnectMiddleware(app, max_buffered=-1)
    with pytest.raises(TypeError, match="max_buffered"):
        CancelOnDisconnectMiddleware(app, max_buffered=1.5)  # type: ignore[arg-type]
    middleware = CancelOnDisconnectMiddleware(app, timeout=2, max_buffered=0)
    assert (middleware.app, middleware.timeout, middleware.max_buffered) == (app, 2, 0)


async def test_the_deadline_reaches_the_workers_token() -> None:
    server = ScriptedServer(body(b"", False))
    remaining: list[float] = []

    def worker() -> None:
        remaining.append(bridgecancel.current_token().remaining())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await bridgecancel.run_sync(worker)
        await respond(send)

    await CancelOnDisconnectMiddleware(app, timeout=30)(HTTP_SCOPE, server.receive, server.send)
    assert 0 < remaining[0] <= 30


async def test_an_error_from_the_servers_receive_reaches_the_apps_receive() -> None:
    first = body(b"a", True)
    server = ScriptedServer(first)
    calls = [0]
    scripted_receive = server.receive

    async def failing_receive() -> Message:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("the server's receive failed")
        return await scripted_receive()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert await receive() is first
        await receive()

    with pytest.raises(OSError, match="receive failed"):
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, failing_receive, server.send)


def running_tasks() -> set[object]:
    """The tasks alive in this event loop now (trio's system tasks included)."""
    if sniffio.current_async_library() == "trio":
        tasks: set[object] = set()
        pending = [trio.lowlevel.current_root_task()]
        while pending:
            task = pending.pop()
            if task is not None:
                tasks.add(task)
                pending.extend(t for n in task.child_nurseries for t in n.child_tasks)
        return tasks
    return set(asyncio.all_tasks())


MALFORMED: list[Any] = [None, {}, {"body": b"x", "more_body": False}, [], "http.request", 42]


@pytest.mark.parametrize("after_a_body", [False, True], ids=["first", "after-a-body"])
@pytest.mark.parametrize(
    "malformed", MALFORMED, ids=["None", "empty-dict", "no-type", "list", "str", "int"]
)
async def test_a_malformed_message_from_the_server_raises_in_the_apps_receive(
    malformed: Any, after_a_body: bool
) -> None:
    """A server's message that is not a dict with a "type" fails the app's receive() at once."""
    first = body(b"a", True)
    server = ScriptedServer(*([first] if after_a_body else []), malformed)
    received: list[Message] = []
    tasks_before = running_tasks()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            received.append(await receive())

    with anyio.fail_after(5), pytest.raises(TypeError) as raised:
        await CancelOnDisconnectMiddleware(app)(HTTP_SCOPE, server.receive, server.send)
    message = str(raised.value)
    assert "not an ASGI message" in message
    assert repr(malformed) in message
    assert received == ([first] if after_a_body else [])
    assert server.sent == []
    assert running_tasks() == tasks_before  # the watcher has ended
