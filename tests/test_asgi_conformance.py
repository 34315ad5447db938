"""What Starlette's own test suite found wrapped in CancelOnDisconnectMiddleware, kept here.

``.ci/starlette_conformance.py`` runs Starlette's tests bare and with every app wrapped in
the middleware. The differences it found are pinned down here under a real server, where
they show every time rather than now and then.

``test_request_is_disconnected[trio]`` fails wrapped now and then: after its response, the
app calls ``request.is_disconnected()``, which polls ``receive()`` in an already cancelled
scope. Bare, the server's ``receive()`` returns ``http.disconnect`` at once: the response
is complete. Wrapped, the middleware hands over the disconnect only once its watcher has
read it from the server, and the watcher, woken by the app's last ``send``, has not run
yet when the app polls (under uvicorn, whose ``send`` does not yield, never; under
Starlette's TestClient on trio, whose scheduler picks either task first, now and then).
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from _servers import fetch, http_request, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's


def polls_after_its_response(seen: list[bool]) -> Any:
    """Answers, then records what ``request.is_disconnected()`` says."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        await PlainTextResponse("ok")(scope, receive, send)
        seen.append(await request.is_disconnected())

    return app


async def test_uvicorn_reports_the_disconnect_after_the_response() -> None:
    """Bare: what an app sees from uvicorn once its response is complete."""
    seen: list[bool] = []
    async with serve("uvicorn", polls_after_its_response(seen)) as port:
        assert await fetch(port, http_request(path="/")) == (200, b"ok")
    assert seen == [True]
