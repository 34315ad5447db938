"""CancelOnDisconnectMiddleware under servers started as their own command: granian, daphne,
and gunicorn with uvicorn's worker.

Each server runs once per module, in a subprocess, as its users start it, and serves
``_served_app:app`` (``tests/_served_app.py``): a raw ASGI app whose ``/mw/...`` routes go
through the middleware and ``/plain/...`` routes do not. The test is the client: it sends
a request with a raw socket, asks the app over HTTP (``/state``) what the request's handler
and `run_sync` worker did, and closes its socket mid-request. The server runs its own event
loop in its own process: granian with ``--loop asyncio``, daphne on Twisted's asyncio
reactor, gunicorn's worker on uvicorn's asyncio loop. The client runs on asyncio.

What each server does by itself, which the tests pin down too: granian and gunicorn never
cancel a handler whose client left; daphne cancels it ``--application-close-timeout``
seconds later (10 by default; 1 here), and reads the whole request body before it calls
the app, so a client that leaves mid-upload never reaches the app at all, and one that
leaves after sending more than the middleware reads ahead is not seen until the handler
reads it.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from _servers import PROMPTLY, connect, fetch, http_request

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
STARTUP = 30.0  # seconds a server may take to import itself and the app, and listen
DAPHNE_CLOSE_TIMEOUT = 1  # daphne's --application-close-timeout here (its default is 10)


def _command(server: str, port: int) -> list[str]:
    """How users start `server` (one worker process, so one app instance answers /state)."""
    app = "_served_app:app"
    if server == "granian":
        return [
            sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "asyncio",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-ws", app,
        ]  # fmt: skip
    if server == "daphne":
        return [
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0",
            "--application-close-timeout", str(DAPHNE_CLOSE_TIMEOUT), app,
        ]  # fmt: skip
    if server == "gunicorn":
        # uvicorn's own uvicorn.workers is deprecated in favour of the uvicorn-worker package.
        return [
            sys.executable, "-m", "gunicorn", "--worker-class", "uvicorn_worker.UvicornWorker",
            "--workers", "1", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
            "--log-level", "warning", app,
        ]  # fmt: skip
    raise ValueError(server)  # pragma: no cover - a typo in the parameters


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A server in a subprocess, serving ``_served_app:app`` on 127.0.0.1."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                _command(name, self.port), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.ids = (f"{name}-{n}" for n in itertools.count())

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self) -> None:
        deadline = time.monotonic() + STARTUP
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as client:
                    client.sendall(http_request(path="/ping"))
                    if client.recv(100).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not answer in {STARTUP} s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            self.process.kill()
            self.process.wait()

    # -- the client's side, on the test's event loop

    async def state(self, request_id: str) -> dict[str, Any]:
        """What request `request_id`'s handler and worker did, from the server's app."""
        status, body = await fetch(self.port, http_request(path=f"/state?id={request_id}"))
        assert status == 200, (status, body)
        record: dict[str, Any] = json.loads(body)
        return record

    async def wait_for(self, request_id: str, key: str) -> dict[str, Any]:
        """Poll the request's record until it has `key`; return the record."""
        with anyio.fail_after(10):
            while key not in (record := await self.state(request_id)):
                await anyio.sleep(0.01)
        return record

    async def no_worker_running(self) -> bool:
        with anyio.fail_after(10):
            while (await self.state("none"))["threads_running"]:
                await anyio.sleep(0.01)
        return True

    async def leave_while_blocked(
        self, path: str, *, seconds: float | None = None, body: bytes = b""
    ) -> tuple[dict[str, Any], float]:
        """Request `path`, close the connection once its worker is blocked, wait for the
        handler to end; returns its record and when the client left."""
        request_id = next(self.ids)
        target = f"{path}?id={request_id}" + (f"&seconds={seconds}" if seconds else "")
        client = await connect(self.port)
        await client.send(http_request("POST" if body else "GET", target, body))
        await self.wait_for(request_id, "started_at")
        left_at = time.monotonic()
        await client.aclose()
        return await self.wait_for(request_id, "done_at"), left_at


@pytest.fixture(
    scope="module",
    params=[
        "granian",  # the quickest to start: kept in the quick subset
        pytest.param("daphne", marks=pytest.mark.slow),
        pytest.param("gunicorn", marks=pytest.mark.slow),
    ],
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One server per module and parameter, started before the tests that use it."""
    name: str = request.param
    server = Served(name, tmp_path_factory.mktemp(name) / "server.log")
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


@pytest.fixture
def anyio_backend() -> str:
    """The client's loop; each server runs its own, in its own process."""
    return "asyncio"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_client_leaving_mid_request_stops_the_worker(served: Served, method: str) -> None:
    body = b"x" * 200_000 if method == "POST" else b""  # several messages, never read
    record, left_at = await served.leave_while_blocked("/mw/work", body=body)
    assert record["fired"] is True
    assert record["fired_at"] - left_at < PROMPTLY
    assert record["reason"] == "client disconnected"
    assert record["outcome"] == "cancelled"
    assert await served.no_worker_running()


async def test_a_client_that_waits_gets_its_response(served: Served) -> None:
    request_id = next(served.ids)
    request = http_request(path=f"/mw/work?id={request_id}&seconds=0.05")
    assert await fetch(served.port, request) == (200, b"worked")
    record = await served.state(request_id)
    assert record["fired"] is False  # the whole job ran: nothing cancelled it
    assert record["outcome"] == "returned"


async def test_a_disconnect_after_the_response_cancels_nothing(served: Served) -> None:
    """daphne reports ``http.disconnect`` as each response finishes; work after it runs on."""
    request_id = next(served.ids)
    request = http_request(path=f"/mw/after?id={request_id}&seconds=0.05")
    assert await fetch(served.port, request) == (200, b"answered")
    record = await served.wait_for(request_id, "done_at")
    assert record["fired"] is False
    assert record["outcome"] == "returned"


@pytest.mark.slow
async def test_without_the_middleware(served: Served) -> None:
    """What the server does by itself: granian and gunicorn let the handler run on; daphne
    cancels it once its --application-close-timeout has passed (checked once a second)."""
    seconds = 30 if served.name == "daphne" else 0.3
    record, left_at = await served.leave_while_blocked("/plain/work", seconds=seconds)
    if served.name == "daphne":
        assert record["fired"] is True
        assert record["reason"] == "the caller was cancelled"  # a plain task.cancel()
        assert DAPHNE_CLOSE_TIMEOUT <= record["fired_at"] - left_at < DAPHNE_CLOSE_TIMEOUT + 5
    else:
        assert record["fired"] is False  # ran its full time
        assert record["outcome"] == "returned"


async def _start_upload(served: Served, request_id: str) -> anyio.abc.SocketStream:
    """A POST that announces 1 MB and sends a thousandth of it."""
    client = await connect(served.port)
    head = http_request("POST", f"/mw/upload?id={request_id}", b"")
    await client.send(head.replace(b"Content-Length: 0", b"Content-Length: 1000000") + b"x" * 1000)
    return client


@pytest.mark.parametrize(
    "served", ["granian", pytest.param("gunicorn", marks=pytest.mark.slow)], indirect=True
)
async def test_client_leaving_mid_upload_cancels_the_reader(served: Served) -> None:
    """granian and uvicorn hand the app the body as it arrives: the disconnect is seen."""
    request_id = next(served.ids)
    client = await _start_upload(served, request_id)
    with anyio.fail_after(10):
        while (await served.state(request_id)).get("read") != 1000:
            await anyio.sleep(0.01)
    await client.aclose()
    record = await served.wait_for(request_id, "done_at")
    assert record["outcome"] == "cancelled"


@pytest.mark.slow
@pytest.mark.parametrize("served", ["daphne"], indirect=True)
async def test_daphne_never_calls_the_app_for_an_upload_cut_short(served: Served) -> None:
    """daphne reads the whole body before it calls the app: a client that leaves mid-upload
    never reaches it, so there is nothing to cancel (and nothing to see before the end)."""
    request_id = next(served.ids)
    client = await _start_upload(served, request_id)
    await anyio.sleep(0.3)  # time for a server that streams the body to call the app
    assert "called_at" not in await served.state(request_id)
    await client.aclose()
    await anyio.sleep(0.3)
    assert "called_at" not in await served.state(request_id)


@pytest.mark.slow
@pytest.mark.parametrize("served", ["daphne"], indirect=True)
async def test_daphne_body_past_the_bound_hides_the_disconnect(served: Served) -> None:
    """daphne queues the whole body, then the disconnect behind it: the middleware, which
    reads ahead only up to max_buffered (1 MiB), does not see a client leave whose larger
    body the handler has not read; daphne's own close timeout cancels the handler then."""
    body = b"x" * 3_000_000
    record, left_at = await served.leave_while_blocked("/mw/work", body=body)
    assert record["fired"] is True
    assert record["reason"] == "the caller was cancelled"  # daphne's, not the middleware's
    assert record["fired_at"] - left_at >= DAPHNE_CLOSE_TIMEOUT
