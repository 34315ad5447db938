"""Recipe: a web request whose client leaves stops its PostgreSQL query on the server.

Needs psycopg 3, FastAPI and uvicorn, and a PostgreSQL server to connect to:

    python -m pip install "psycopg[binary]" fastapi uvicorn
    BRIDGECANCEL_TEST_PG_DSN="host=127.0.0.1 port=<port> user=bridgecancel" \\
        python examples/recipe_postgres.py

(``bash .ci/postgres.sh`` starts such a server on a free port and prints its DSN.)

A FastAPI endpoint runs ``SELECT pg_sleep(30)`` with psycopg 3 through `run_sync`, under
`CancelOnDisconnectMiddleware`. When the client closes its socket, the middleware cancels
the request, `run_sync` fires the worker's token, and the token's ``on_cancel`` calls the
connection's ``cancel_safe()``: PostgreSQL stops the query (it leaves
``pg_stat_activity`` at once), psycopg raises ``QueryCanceled`` in the worker, and
``token.check()`` turns that into ``Cancelled``. The connection stays open and usable.

Two details make this safe to use on a connection that serves request after request:

* The cancel request goes to whatever the connection is running when it lands. So the
  worker *disarms* the callback before it hands the connection back, and disarming waits
  for a cancel already on its way: a late cancel can never hit the next request's query.
* A cancel that lands just before the query reaches the server finds nothing to stop.
  ``token.check()`` right before ``execute`` narrows that window to the time the query
  takes to travel; ``statement_timeout`` is the server-side backstop for the rest.

Without the middleware, the same endpoint keeps the query running for its full 30 s
after the client has gone: servers do not cancel a handler whose client left, and
``anyio.to_thread.run_sync`` would wait for the thread even if they did.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import psycopg.errors
import uvicorn
from fastapi import FastAPI, Request
from psycopg.abc import Query

from bridgecancel import current_token, run_sync
from bridgecancel.asgi import CancelOnDisconnectMiddleware, threaded

# The process id keeps runs side by side (CI runs suites at once) apart in pg_stat_activity.
THREADED_APP = f"bridgecancel recipe, threaded, pid {os.getpid()}"


class _Canceller:
    """``conn.cancel_safe()`` for a token's ``on_cancel``, until disarmed."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._armed = True

    def __call__(self) -> None:
        with self._lock:
            if self._armed:
                self._conn.cancel_safe(timeout=10)

    def disarm(self) -> None:
        """Stop for good; if a cancel is being sent right now, wait until it is done."""
        with self._lock:
            self._armed = False


def query(conn: psycopg.Connection[Any], sql: Query, params: Sequence[object] = ()) -> list[Any]:
    """Run `sql` on `conn` and return its rows; cancel it on the server if the token fires.

    Call it in a worker thread (`run_sync`); one query at a time per connection. On
    cancel it raises `Cancelled`, and the connection is ready for the next query.
    """
    token = current_token()
    canceller = _Canceller(conn)
    try:
        with token.on_cancel(canceller):
            token.check()  # cancelled already: do not start a query nobody will cancel
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql, params)
                    return cursor.fetchall()
            except psycopg.errors.QueryCanceled:
                if not conn.autocommit:
                    conn.rollback()  # leave the failed transaction: the connection is reusable
                token.check()  # cancelled by our token: raise Cancelled
                raise  # cancelled by someone else (statement_timeout, an admin): say so
    finally:
        canceller.disarm()


# -- the web endpoint ----------------------------------------------------------------


def make_app(dsn: str) -> FastAPI:
    """A FastAPI app with one PostgreSQL connection, cancelled when its client leaves.

    ``GET /sleep?seconds=30`` runs ``pg_sleep``; ``GET /one`` runs ``SELECT 1``. The
    connection's backend pid is ``app.state.backend_pid`` once the app has started.
    ``GET /sleep-threaded?seconds=30`` does the same in a plain ``def`` endpoint made
    cancellable with ``@threaded``, on a connection of its own per request (its
    ``application_name`` is `THREADED_APP`).
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = await run_sync(lambda: psycopg.connect(dsn, autocommit=True))
        app.state.conn = conn
        app.state.lock = anyio.Lock()  # one query at a time on the one connection
        app.state.backend_pid = conn.info.backend_pid
        try:
            yield
        finally:
            await run_sync(conn.close)

    app = FastAPI(lifespan=lifespan)

    async def run_query(request: Request, sql: Query, params: Sequence[object] = ()) -> Any:
        async with request.app.state.lock:
            rows = await run_sync(query, request.app.state.conn, sql, params)
        return rows[0][0]

    @app.get("/sleep")
    async def sleep(request: Request, seconds: float = 30.0) -> dict[str, str]:
        await run_query(request, "SELECT pg_sleep(%s)", (seconds,))
        return {"slept": str(seconds)}

    @app.get("/one")
    async def one(request: Request) -> dict[str, Any]:
        return {"one": await run_query(request, "SELECT 1")}

    @app.get("/sleep-threaded")
    @threaded  # FastAPI's plain-def style, run through run_sync: the token works inside
    def sleep_threaded(seconds: float = 30.0) -> dict[str, str]:
        with psycopg.connect(dsn, autocommit=True, application_name=THREADED_APP) as conn:
            query(conn, "SELECT pg_sleep(%s)", (seconds,))
        return {"slept": str(seconds)}

    app.add_middleware(CancelOnDisconnectMiddleware)
    return app


# -- the demonstration: a real uvicorn, a client that leaves --------------------------


def _active_queries(monitor: psycopg.Connection[Any], pid: int) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `predicate()` is true, polled every 5 ms; None on timeout."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if predicate():
            return time.perf_counter() - started
        time.sleep(0.005)
    return None


def _client_leaves(port: int, monitor: psycopg.Connection[Any], pid: int) -> float | None:
    """Ask for a 30 s query, leave once it runs; seconds until it left pg_stat_activity."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /sleep?seconds=30 HTTP/1.1\r\nHost: demo\r\n\r\n")
        if _wait_for(lambda: _active_queries(monitor, pid) == 1, 10) is None:
            raise RuntimeError("the query never started")
    # The socket is closed: the client has gone.
    return _wait_for(lambda: _active_queries(monitor, pid) == 0, 30)


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return response


async def main(dsn: str) -> None:
    app = make_app(dsn)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        while not server.started:
            await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        pid = app.state.backend_pid
        with psycopg.connect(dsn, autocommit=True) as monitor:
            gone = await anyio.to_thread.run_sync(_client_leaves, port, monitor, pid)
        if gone is None:
            print("the query is STILL RUNNING 30 s after the client left")
        else:
            print(f"client left: the query left pg_stat_activity {gone * 1000:.0f} ms later")
        answer = await anyio.to_thread.run_sync(_get, port, "/one")
        print("next request on the same connection:", answer.rsplit(b"\r\n", 1)[-1].decode())
        server.should_exit = True


if __name__ == "__main__":
    dsn = os.environ.get("BRIDGECANCEL_TEST_PG_DSN")
    if not dsn:
        sys.exit("set BRIDGECANCEL_TEST_PG_DSN (bash .ci/postgres.sh prints one)")
    anyio.run(main, dsn)
