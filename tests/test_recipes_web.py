"""The database and download recipes, end to end under real servers on 127.0.0.1.

A FastAPI endpoint runs blocking work through `run_sync` under
`CancelOnDisconnectMiddleware`; a raw-socket client asks for it and leaves; the work
must stop on the far side (PostgreSQL, SQLite, an HTTP server) and the endpoint's
resources must stay usable. Each runs under uvicorn, hypercorn on asyncio and hypercorn's
trio worker; the worker-side recipes also run without a server, on asyncio and trio.

PostgreSQL comes from the session's `pg_server` fixture (tests/_postgres.py): the server
``BRIDGECANCEL_TEST_PG_DSN`` names, or one started for the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from fastapi import FastAPI

import bridgecancel
from _servers import connect, fetch, http_request, listening_socket
from bridgecancel.asgi import CancelOnDisconnectMiddleware
from test_recipes import load  # tests/ is on sys.path (pytest's rootdir import mode)

pg_recipe = load("recipe_postgres")
sqlite_recipe = load("recipe_sqlite")
socket_recipe = load("recipe_socket_download")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 1.0  # "gone within a second": what the issue promises, end to end
PATIENCE = 10.0  # how long to wait for something that should happen at all

pytestmark = pytest.mark.anyio


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
def pg_dsn(pg_server: str) -> str:
    return pg_server


@pytest.fixture
def monitor(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A second connection that watches pg_stat_activity."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def active_queries(monitor: psycopg.Connection[Any], pid: int) -> int:
    return int(pg_recipe._active_queries(monitor, pid))


async def wait_until(predicate: Callable[[], bool], timeout: float = PATIENCE) -> float:
    """Seconds until `predicate()` (called in a thread) is true; fails after `timeout`."""
    waited = await anyio.to_thread.run_sync(pg_recipe._wait_for, predicate, timeout)
    assert waited is not None, f"still not true after {timeout} s: {predicate}"
    return float(waited)


async def test_pg_query_returns_its_rows(anyio_backend: str, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = await bridgecancel.run_sync(pg_recipe.query, conn, "SELECT 6 * %s", (7,))
    assert rows == [(42,)]


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.slow
async def test_pg_query_stops_on_the_server_when_the_scope_is_cancelled(
    anyio_backend: str, pg_dsn: str, monitor: psycopg.Connection[Any], autocommit: bool
) -> None:
    before = bridgecancel.statistics().threads
    with psycopg.connect(pg_dsn, autocommit=autocommit) as conn:
        pid = conn.info.backend_pid
        async with anyio.create_task_group() as group:
            group.start_soon(bridgecancel.run_sync, pg_recipe.query, conn, "SELECT pg_sleep(30)")
            await wait_until(lambda: active_queries(monitor, pid) == 1)
            group.cancel_scope.cancel()
        # The scope exits only after the worker did: the query must be gone already.
        assert active_queries(monitor, pid) == 0
        # The worker raised Cancelled: it stopped because of its token.
        assert bridgecancel.statistics().threads.cooperative == before.cooperative + 1
        # The same connection (same server process) answers the next query.
        rows = await bridgecancel.run_sync(pg_recipe.query, conn, "SELECT pg_backend_pid()")
        assert rows == [(pid,)]
        assert conn.info.transaction_status in (
            psycopg.pq.TransactionStatus.IDLE, psycopg.pq.TransactionStatus.INTRANS
        )


async def test_pg_cancel_from_elsewhere_is_not_mistaken_for_ours(
    anyio_backend: str, pg_dsn: str
) -> None:
    # statement_timeout cancels the query too; the recipe must not call that Cancelled.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '50ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            await bridgecancel.run_sync(pg_recipe.query, conn, "SELECT pg_sleep(30)")
        assert await bridgecancel.run_sync(pg_recipe.query, conn, "SELECT 1") == [(1,)]


def test_pg_disarm_waits_for_a_cancel_on_its_way() -> None:
    # A cancel still being sent when the worker hands the connection back could hit the
    # next request's query: disarm() must wait for it, and nothing may be sent after.
    sending = threading.Event()
    release = threading.Event()
    sent: list[float] = []

    class FakeConnection:
        def cancel_safe(self, timeout: float) -> None:
            sending.set()
            release.wait(PATIENCE)
            sent.append(time.monotonic())

    canceller = pg_recipe._Canceller(FakeConnection())
    firing = threading.Thread(target=canceller, name="test canceller")
    firing.start()
    assert sending.wait(PATIENCE)
    disarmed: list[float] = []
    def disarm() -> None:
        canceller.disarm()
        disarmed.append(time.monotonic())

    disarming = threading.Thread(target=disarm, name="test disarm")
    disarming.start()
    disarming.join(0.2)
    assert disarming.is_alive()  # still waiting: the cancel is on its way
    assert not disarmed
    release.set()
    firing.join(PATIENCE)
    disarming.join(PATIENCE)
    assert disarmed
    assert sent
    assert sent[0] <= disarmed[0]
    canceller()  # after disarm: nothing is sent
    assert len(sent) == 1


# -- real servers ---------------------------------------------------------------------------


@asynccontextmanager
async def serve(server: str, backend: str, app: Any) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 with its lifespan (the PostgreSQL app connects there).

    Unlike ``_servers.serve`` (lifespan off), uvicorn binds its own socket here, with
    lifespan on; hypercorn runs on the test's backend, asyncio or trio.
    """
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="on", log_config=None, access_log=False
        )
        instance = uvicorn.Server(config)
        async with anyio.create_task_group() as group:
            group.start_soon(instance.serve)
            with anyio.fail_after(PATIENCE):
                while not instance.started:
                    await anyio.sleep(0.01)
            try:
                yield instance.servers[0].sockets[0].getsockname()[1]
            finally:
                instance.should_exit = True
    else:
        from hypercorn.config import Config

        hypercorn_serve: Callable[..., Coroutine[Any, Any, None]]  # the same call on either backend
        if backend == "trio":
            from hypercorn.trio import serve as hypercorn_serve
        else:
            from hypercorn.asyncio import serve as hypercorn_serve
        listener = listening_socket()
        port = listener.getsockname()[1]
        hypercorn_config = Config()
        hypercorn_config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns and closes it
        hypercorn_config.accesslog = None
        hypercorn_config.errorlog = None
        hypercorn_config.graceful_timeout = PATIENCE
        stop = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: hypercorn_serve(
                    app, hypercorn_config, shutdown_trigger=stop.wait, mode="asgi"
                )
            )
            try:
                # hypercorn accepts connections only once the lifespan startup is done: a
                # first answer (any status) says the app is ready.
                with anyio.fail_after(PATIENCE):
                    await fetch(port, http_request("GET", "/"))
                yield port
            finally:
                stop.set()


@asynccontextmanager
async def client_leaves_after(port: int, path: str) -> AsyncIterator[None]:
    """A raw-socket client that asks for `path` and leaves (closes) at the block's end."""
    async with await connect(port) as stream:
        await stream.send(http_request("GET", path, close=False))
        yield


@pytest.mark.slow
class TestUnderRealServers:
    """Each test once per server: uvicorn, hypercorn on asyncio, hypercorn's trio worker."""

    @pytest.fixture
    def anyio_backend(self, server_and_backend: tuple[str, str]) -> str:
        return server_and_backend[1]

    async def test_pg_client_leaves_and_the_query_leaves_pg_stat_activity(
        self, server: str, anyio_backend: str, pg_dsn: str, monitor: psycopg.Connection[Any]
    ) -> None:
        app = pg_recipe.make_app(pg_dsn)
        async with serve(server, anyio_backend, app) as port:
            pid = app.state.backend_pid
            async with client_leaves_after(port, "/sleep?seconds=30"):
                await wait_until(lambda: active_queries(monitor, pid) == 1)
            # The client has closed its socket.
            gone = await wait_until(lambda: active_queries(monitor, pid) == 0)
            assert gone < PROMPT
            assert await fetch(port, http_request("GET", "/one")) == (200, b'{"one":1}')
            assert app.state.backend_pid == pid  # the same connection served it

    async def test_pg_threaded_def_endpoint_stops_its_query_too(
        self, server: str, anyio_backend: str, pg_dsn: str, monitor: psycopg.Connection[Any]
    ) -> None:
        app = pg_recipe.make_app(pg_dsn)

        def running() -> int:
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND state = 'active'",
                (pg_recipe.THREADED_APP,),
            ).fetchone()
            assert row is not None
            return int(row[0])

        async with serve(server, anyio_backend, app) as port:
            async with client_leaves_after(port, "/sleep-threaded?seconds=30"):
                await wait_until(lambda: running() == 1)
            gone = await wait_until(lambda: running() == 0)
            assert gone < PROMPT
            status, body = await fetch(port, http_request("GET", "/sleep-threaded?seconds=0"))
            assert (status, body) == (200, b'{"slept":"0.0"}')

    async def test_pg_without_the_middleware_the_query_runs_on(
        self, server: str, anyio_backend: str, pg_dsn: str, monitor: psycopg.Connection[Any]
    ) -> None:
        # The anchor: the same app without the middleware. The server does not cancel the
        # handler when its client leaves, so the query runs to its end.
        app = pg_recipe.make_app(pg_dsn)
        app.user_middleware.clear()  # before the app starts: Starlette builds its stack then
        async with serve(server, anyio_backend, app) as port:
            pid = app.state.backend_pid
            async with client_leaves_after(port, "/sleep?seconds=2"):
                await wait_until(lambda: active_queries(monitor, pid) == 1)
            gone = await anyio.to_thread.run_sync(
                pg_recipe._wait_for, lambda: active_queries(monitor, pid) == 0, PROMPT
            )
            assert gone is None, f"the query stopped {gone} s after the client left"
            await wait_until(lambda: active_queries(monitor, pid) == 0)  # its natural end

    async def test_sqlite_client_leaves_and_the_query_is_interrupted(
        self, server: str, anyio_backend: str
    ) -> None:
        recorder = Recorder()
        app = worker_app(recorder, sqlite_recipe.query_one, ":memory:", sqlite_recipe.SLOW_QUERY)
        stopped = await leave_once_started(server, anyio_backend, app, recorder)
        assert recorder.outcome == "cancelled"
        assert stopped < PROMPT

    async def test_http_download_client_leaves_and_the_download_stops(
        self, server: str, anyio_backend: str
    ) -> None:
        served: list[str] = []
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        http_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as upstream:
            upstream.start_soon(listener.serve, lambda s: _slow_http(s, served))
            recorder = Recorder()
            received: list[int] = [0]
            app = worker_app(
                recorder, socket_recipe.http_get, "127.0.0.1", http_port, "/big", received
            )
            stopped = await leave_once_started(
                server, anyio_backend, app, recorder, ready=lambda: received[-1] > 0
            )
            assert recorder.outcome == "cancelled"
            assert stopped < PROMPT
            # The download's socket was shut down: the upstream server saw its client go.
            with anyio.fail_after(PATIENCE):
                while not served:
                    await anyio.sleep(0.01)
            upstream.cancel_scope.cancel()


# -- SQLite and an HTTP download, the same way ----------------------------------------------


class Recorder:
    """What a worker did: started (an event for the test), how it ended, when."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.outcome: str | None = None

    def run(self, fn: Callable[..., object], *args: object) -> object:
        self.started.set()
        try:
            result = fn(*args)
        except bridgecancel.Cancelled:
            self.outcome = "cancelled"
            raise
        except BaseException as exc:
            self.outcome = f"raised {exc!r}"
            raise
        else:
            self.outcome = "returned"
            return result
        finally:
            self.ended.set()


def worker_app(recorder: Recorder, fn: Callable[..., object], *args: object) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        await bridgecancel.run_sync(recorder.run, fn, *args)
        return {"done": "yes"}

    app.add_middleware(CancelOnDisconnectMiddleware)
    return app


async def leave_once_started(
    server: str, backend: str, app: FastAPI, recorder: Recorder,
    ready: Callable[[], bool] = lambda: True,
) -> float:
    """Run /work, leave once the worker runs and `ready()`; seconds from leaving to its end."""
    async with serve(server, backend, app) as port:
        async with client_leaves_after(port, "/work"):
            assert await anyio.to_thread.run_sync(recorder.started.wait, PATIENCE)
            await wait_until(ready)
            left = time.perf_counter()
        assert await anyio.to_thread.run_sync(recorder.ended.wait, PATIENCE)
        stopped = time.perf_counter() - left
        # The server serves on.
        status, _ = await fetch(port, http_request("GET", "/docs"))
        assert status == 200
    return stopped


async def _slow_http(stream: anyio.abc.SocketStream, served: list[str]) -> None:
    """An HTTP server that sends a chunked body, a chunk every 10 ms, until the client goes."""
    async with stream:
        try:
            await stream.receive()  # the request (one read is enough for a GET)
            await stream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                await stream.send(b"400\r\n" + socket_recipe.CHUNK + b"\r\n")
                await anyio.sleep(0.01)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            served.append("client went away")


async def test_http_download_completes(anyio_backend: str) -> None:
    body = bytes(range(256)) * 100

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            await stream.send(head + body)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as upstream:
        upstream.start_soon(listener.serve, handle)
        received: list[int] = [0]
        data = await bridgecancel.run_sync(socket_recipe.http_get, "127.0.0.1", port, "/", received)
        upstream.cancel_scope.cancel()
    assert data == body
    assert received[-1] == len(body)


# -- the script runs as documented ---------------------------------------------------------


@pytest.mark.slow
def test_postgres_recipe_script_runs(pg_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recipe_postgres.py")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "BRIDGECANCEL_TEST_PG_DSN": pg_dsn},
    )
    assert result.returncode == 0, result.stderr
    assert "the query left pg_stat_activity" in result.stdout
    assert '{"one":1}' in result.stdout
