"""A raw ASGI app for the servers the tests run as their own command in a subprocess.

``tests/test_asgi_servers.py`` serves ``_served_app:app`` with granian, daphne and gunicorn
(with uvicorn's worker), each as users start it, and asks it over HTTP what its handlers
and workers did:

- ``/mw/work?id=ID&seconds=S``: through `CancelOnDisconnectMiddleware`, a `run_sync`
  worker waits on its token for up to S seconds (30 by default), then answers ``worked``;
- ``/plain/work?id=ID&seconds=S``: the same, without the middleware;
- ``/mw/after?id=ID&seconds=S``: answers ``answered`` first, then does the same work
  (as a background task would);
- ``/mw/upload?id=ID``: through the middleware, reads its whole body, answers its size;
- ``/state?id=ID``: what request ID's handler and worker did, as JSON (``{}`` for an ID
  no handler has seen);
- ``/ping``: ``pong``.

Times are ``time.monotonic()``, which on Linux is the same clock in every process, so a
test can compare them with its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import anyio

import bridgecancel
from bridgecancel.asgi import CancelOnDisconnectMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FOREVER = 30.0

# Request ID -> what its handler and worker did. Written by the worker thread and the
# handler, read by /state in the event loop: single assignments to a dict, no lock needed.
records: dict[str, dict[str, Any]] = {}


def block(record: dict[str, Any], seconds: float) -> None:
    """The worker: wait on the job's token for up to `seconds`; stop if it fired."""
    token = bridgecancel.current_token()
    record["started_at"] = time.monotonic()
    fired = token.wait(seconds)
    record["fired_at"] = time.monotonic()
    record["reason"] = token.reason
    record["fired"] = fired
    token.check()


async def work(record: dict[str, Any], seconds: float) -> None:
    try:
        await bridgecancel.run_sync(block, record, seconds)
    except anyio.get_cancelled_exc_class():
        record["outcome"] = "cancelled"
        raise
    except BaseException as exc:
        record["outcome"] = repr(exc)
        raise
    else:
        record["outcome"] = "returned"
    finally:
        record["done_at"] = time.monotonic()


async def upload(record: dict[str, Any], receive: Receive, send: Send) -> None:
    record["called_at"] = time.monotonic()
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                record["outcome"] = message["type"]
                return
            size += len(message.get("body", b""))
            record["read"] = size
            if not message.get("more_body", False):
                break
    except anyio.get_cancelled_exc_class():
        record["outcome"] = "cancelled"
        raise
    finally:
        record["done_at"] = time.monotonic()
    record["outcome"] = "read"
    await respond(send, str(size).encode())


async def respond(send: Send, body: bytes, content_type: bytes = b"text/plain") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def endpoints(scope: Scope, receive: Receive, send: Send) -> None:
    query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
    path = scope["path"]
    if path == "/ping":
        await respond(send, b"pong")
    elif path == "/state":
        record = dict(records.get(query["id"], {}))
        record["threads_running"] = bridgecancel.statistics().threads.running
        await respond(send, json.dumps(record).encode(), b"application/json")
    elif path.endswith("/work"):
        await work(records.setdefault(query["id"], {}), float(query.get("seconds", FOREVER)))
        await respond(send, b"worked")
    elif path.endswith("/after"):
        await respond(send, b"answered")
        await work(records.setdefault(query["id"], {}), float(query.get("seconds", FOREVER)))
    elif path.endswith("/upload"):
        await upload(records.setdefault(query["id"], {}), receive, send)
    else:
        await respond(send, b"no such page")


guarded = CancelOnDisconnectMiddleware(endpoints)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``/mw/...`` through the middleware, everything else without it."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["path"].startswith("/mw/"):
        await guarded(scope, receive, send)
    else:
        await endpoints(scope, receive, send)
