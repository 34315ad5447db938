"""Django sync views made cancellable (`bridgecancel.django`), end to end.

A Django 5 site (tests/_django_site.py) runs under uvicorn on 127.0.0.1 in a process of
its own, with PostgreSQL (the session's `pg_server`) as its database; a raw-socket client
asks for a view and leaves; a monitor connection watches ``pg_stat_activity``. Django's
ASGI handler runs on asyncio only, so there is one backend here, asyncio, and the tests
themselves are plain functions (the site has its own event loop).

What is asserted, for a ``@cancellable`` view whose client leaves in the middle of
``SELECT pg_sleep(30)`` through Django's cursor: the query leaves ``pg_stat_activity``
within `PROMPT` of the client leaving, and the connection is closed; the view's
``finally`` ran, with `Cancelled`; other sync views were served meanwhile; no worker
thread is left running and the next view takes the limiter's one slot. The anchor: the
same view without the decorator keeps its query running after the client left.
(Django gives each request a thread of its own for its sync code, so there a stuck view
does not queue the others either; it holds its thread, connection and query to the end.)
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import asgiref.sync
import psycopg
import pytest
from psycopg import sql

from _postgres import wait_for
from bridgecancel.django import cancellable

SITE = Path(__file__).resolve().parent / "_django_site.py"
PROMPT = 1.0  # "gone within a second" of the client leaving, as the recipes promise
PATIENCE = 10.0  # how long to wait for something that should happen at all
STARTUP = 30.0  # seconds the site may take to import Django and listen


# -- the site ----------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, bytes]:
    """One request with ``Connection: close``; (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as client:
        client.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return int(head.split(b" ", 2)[1]), body


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


@dataclass
class Site:
    port: int
    table: str  # quoted, as SQL names it
    process: subprocess.Popen[str]
    errors: IO[str]

    def status(self) -> dict[str, Any]:
        status, body = get(self.port, "/status")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def event(self, name: str, *, ended: bool = False) -> dict[str, Any] | None:
        """Request `name`'s view's start (with its backend's pid), or how it ended."""
        for record in self.status()["events"]:
            if record["name"] == name and (record["event"] != "started") == ended:
                return dict(record)
        return None

    def wait_event(self, name: str, *, ended: bool = False) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            record = self.event(name, ended=ended)
            if record is not None:
                found.append(record)
            return record is not None

        assert wait_for(seen, PATIENCE) is not None, f"no event for {name!r}: {self.log()}"
        return found[0]

    def log(self) -> str:
        self.errors.seek(0)
        return self.errors.read()


@pytest.fixture(scope="module")
def site(pg_server: str) -> Iterator[Site]:
    """The site in its own process, with a table of its own (runs side by side differ)."""
    table = sql.Identifier(f"bridgecancel_django_{os.getpid()}")
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE TABLE {} (tag text)").format(table))
    try:
        with tempfile.TemporaryFile("w+") as errors, _site(pg_server, table, errors) as site:
            yield site
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP TABLE {}").format(table))


@contextmanager
def _site(pg_server: str, table: sql.Identifier, errors: IO[str]) -> Iterator[Site]:
    name = table.as_string()  # quoted: "bridgecancel_django_<pid>"
    process = subprocess.Popen(
        [sys.executable, "-u", str(SITE)],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env={
            **os.environ, "BRIDGECANCEL_TEST_PG_DSN": pg_server, "BRIDGECANCEL_DJANGO_TABLE": name
        },
    )
    try:
        assert process.stdout is not None
        site = Site(0, name, process, errors)
        line = _first_line(process.stdout)
        assert line.startswith("port "), f"the site did not start: {line!r}\n{site.log()}"
        site.port = int(line.split()[1])
        yield site
    finally:
        process.terminate()
        try:
            process.wait(PATIENCE)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung site
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _first_line(stdout: IO[str]) -> str:
    ready, _, _ = select.select([stdout], [], [], STARTUP)
    if not ready:  # pragma: no cover - the site hangs at import
        pytest.fail(f"the site printed nothing in {STARTUP} s")
    return stdout.readline()


@pytest.fixture
def monitor(pg_server: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of the test's own that watches pg_stat_activity."""
    with psycopg.connect(pg_server, autocommit=True) as conn:
        yield conn


def running(monitor: psycopg.Connection[Any], pid: int) -> bool:
    """Whether backend `pid` is running a query."""
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,)
    ).fetchone()
    assert row is not None
    return bool(row[0])


def connected(monitor: psycopg.Connection[Any], pid: int) -> bool:
    """Whether backend `pid` still exists: its client has not closed the connection."""
    row = monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row is not None
    return bool(row[0])


def rows(monitor: psycopg.Connection[Any], site: Site, tag: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE tag = %s").format(sql.SQL(site.table))
    row = monitor.execute(query, (tag,)).fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def client_leaves(port: int, path: str) -> Iterator[None]:
    """A client that asks for `path` and leaves (closes its socket) at the block's end."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        yield


def seconds_until(predicate: Callable[[], bool]) -> float:
    waited = wait_for(predicate, PATIENCE)
    assert waited is not None, f"still not true after {PATIENCE} s"
    return waited


def query_started(site: Site, monitor: psycopg.Connection[Any], name: str) -> int:
    """Wait until request `name`'s view runs its query; its backend's pid."""
    pid = site.wait_event(name)["pid"]
    assert isinstance(pid, int)
    seconds_until(lambda: running(monitor, pid))
    return pid


# -- the decorator, without a server ------------------------------------------------------


def test_cancellable_keeps_the_views_name_and_docstring_and_makes_it_async() -> None:
    def report(request: object) -> str:
        """Builds the report."""
        return "done"

    for decorated in (cancellable(report), cancellable(timeout=5)(report)):
        assert decorated.__name__ == "report"
        assert decorated.__doc__ == "Builds the report."
        assert asgiref.sync.iscoroutinefunction(decorated)  # how Django tells an async view


def test_cancellable_refuses_what_is_not_a_sync_view() -> None:
    async def async_view(request: object) -> str:
        return "done"

    def generator_view(request: object) -> Iterator[bytes]:
        yield b"done"

    with pytest.raises(TypeError, match="already async"):
        cancellable(async_view)
    with pytest.raises(TypeError, match="generator"):
        cancellable(generator_view)
    not_a_view: Any = 42
    with pytest.raises(TypeError, match="view function"):
        cancellable(not_a_view)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.0}, ValueError),
        ({"timeout": math.nan}, ValueError),
        ({"timeout": "30"}, TypeError),
        ({"limiter": 3}, TypeError),
        ({"interrupt_after": -1.0}, ValueError),
    ],
)
def test_cancellable_checks_its_options(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        cancellable(**options)


# -- under uvicorn, with PostgreSQL ---------------------------------------------------------


@pytest.mark.slow  # the site: a Django process of its own, started once for the module
def test_client_leaves_and_the_query_leaves_pg_stat_activity(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    with client_leaves(site.port, "/sleep?name=leaves"):
        pid = query_started(site, monitor, "leaves")
        # Meanwhile other sync views are served, cancellable or not.
        assert get(site.port, "/one?name=meanwhile")[0] == 200
        assert get(site.port, "/plain-one?name=meanwhile-plain")[0] == 200
    gone = seconds_until(lambda: not running(monitor, pid))
    assert gone < PROMPT
    # Its connection was closed at the view's end, not kept in the worker thread.
    assert seconds_until(lambda: not connected(monitor, pid)) < PROMPT
    # The view's finally ran, on Cancelled; no worker thread runs on.
    assert site.wait_event("leaves", ended=True)["event"] == "cancelled"
    assert site.status()["running"] == 0
    # The view's limiter has one slot: the next /sleep gets it.
    assert get(site.port, "/sleep?seconds=0&name=next") == (200, b"slept")


@pytest.mark.slow
def test_without_the_decorator_the_query_runs_on(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    # The anchor: the same view, plain. Django cancels the request's task, but the view's
    # thread runs on, and so does its query.
    with client_leaves(site.port, "/plain-sleep?name=anchor"):
        pid = query_started(site, monitor, "anchor")
        assert get(site.port, "/plain-one?name=anchor-meanwhile")[0] == 200
    stopped = wait_for(lambda: not running(monitor, pid), PROMPT)
    assert stopped is None, f"the query stopped {stopped} s after the client left"
    assert site.event("anchor", ended=True) is None  # and the view is still in it
    # Stop it from here rather than wait 30 s; the view then ends with the database error.
    monitor.execute("SELECT pg_cancel_backend(%s)", (pid,))
    assert site.wait_event("anchor", ended=True)["event"] == "OperationalError"


@pytest.mark.slow
def test_a_view_that_returns_closes_its_connection(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    status, body = get(site.port, "/one?name=returns")
    assert status == 200
    pid = int(body)
    assert seconds_until(lambda: not connected(monitor, pid)) < PROMPT
    assert site.wait_event("returns", ended=True)["event"] == "returned"


@pytest.mark.slow
def test_the_deadline_stops_the_query_and_answers_503(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    started = time.monotonic()
    status, body = get(site.port, "/deadline-sleep?name=deadline")  # timeout=0.5, 30 s query
    took = time.monotonic() - started
    assert status == 503
    assert b"took longer" in body
    assert took < 0.5 + PROMPT
    pid = site.wait_event("deadline")["pid"]
    assert not running(monitor, pid)  # stopped before the response was sent
    assert seconds_until(lambda: not connected(monitor, pid)) < PROMPT
    assert site.wait_event("deadline", ended=True)["event"] == "cancelled"


@pytest.mark.slow
def test_a_cancelled_view_rolls_back_its_atomic_request(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    # ATOMIC_REQUESTS: the view's row is in its transaction, which the cancel rolls back.
    with client_leaves(site.port, "/insert-then-sleep?tag=rolled-back&name=atomic"):
        pid = query_started(site, monitor, "atomic")
        assert rows(monitor, site, "rolled-back") == 0  # not committed yet
    assert seconds_until(lambda: not running(monitor, pid)) < PROMPT
    assert site.wait_event("atomic", ended=True)["event"] == "cancelled"
    assert rows(monitor, site, "rolled-back") == 0
    # A view that returns commits its transaction.
    assert get(site.port, "/insert?tag=committed") == (200, b"inserted")
    assert rows(monitor, site, "committed") == 1
    # transaction.non_atomic_requests (here above the decorator) opts a view out.
    with client_leaves(site.port, "/insert-non-atomic-then-sleep?tag=autocommit&name=non"):
        pid = query_started(site, monitor, "non")
        assert rows(monitor, site, "autocommit") == 1  # committed at once
    assert seconds_until(lambda: not running(monitor, pid)) < PROMPT


@pytest.mark.slow
def test_sqlite_query_is_interrupted_when_the_client_leaves(site: Site) -> None:
    with client_leaves(site.port, "/sqlite-count?name=lite"):
        site.wait_event("lite")
        left = time.monotonic()
    ended = site.wait_event("lite", ended=True)
    assert time.monotonic() - left < PROMPT + 0.5  # polling /status included
    assert ended["event"] == "cancelled"


@pytest.mark.slow
def test_orm_code_in_run_sync_stops_with_cancel_queries_on(
    site: Site, monitor: psycopg.Connection[Any]
) -> None:
    # An async view running ORM code through run_sync itself, in cancel_queries_on().
    with client_leaves(site.port, "/run-sync-orm?name=helper"):
        pid = query_started(site, monitor, "helper")
    assert seconds_until(lambda: not running(monitor, pid)) < PROMPT
    assert seconds_until(lambda: not connected(monitor, pid)) < PROMPT
    assert site.wait_event("helper", ended=True)["event"] == "cancelled"
