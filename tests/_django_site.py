"""A Django site for tests/test_django.py, served by uvicorn in a process of its own.

    BRIDGECANCEL_TEST_PG_DSN=... BRIDGECANCEL_DJANGO_TABLE=... python tests/_django_site.py

Django's settings are process-wide, and another test file configures Django in the test
process without a database: so this site, configured for PostgreSQL, runs apart. It
prints ``port N`` once it listens on 127.0.0.1:N (a free port), then serves until
SIGTERM. Its database: the PostgreSQL server of the DSN as ``default`` (with
``ATOMIC_REQUESTS``, and a table the test made, one ``tag`` column) and an in-memory
SQLite database as ``lite``.

The views record how they end, and the backend process of their PostgreSQL connection,
in `EVENTS`, which ``GET /status`` returns with bridgecancel's counts of this process.
``name`` (a query parameter) tells one request's events from another's.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import django
import psycopg.conninfo
from django.conf import settings
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

import bridgecancel
from bridgecancel.django import cancel_queries_on, cancellable

EVENTS: list[dict[str, Any]] = []
TABLE = os.environ.get("BRIDGECANCEL_DJANGO_TABLE", "bridgecancel_django_rows")
# Every connection of this site says so in pg_stat_activity.
APPLICATION_NAME = f"bridgecancel django site {os.getpid()}"
# One /sleep at a time: a second one runs only once the first has left its thread.
ONE_AT_A_TIME = anyio.CapacityLimiter(1)
# Counts to ten billion: minutes, unless interrupted.
SLOW_SQLITE_QUERY = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000000000)
    SELECT count(*) FROM n
"""


ViewT = TypeVar("ViewT", bound=Callable[..., Any])


def non_atomic(view: ViewT) -> ViewT:
    """``transaction.non_atomic_requests``, typed (Django has no type information)."""
    opted_out: ViewT = transaction.non_atomic_requests(view)
    return opted_out


@contextmanager
def recorded(request: HttpRequest, view: str, *, pid: int | None = None) -> Iterator[str]:
    """Record the view's start (with its backend `pid`) and how it ended, in its finally."""
    name = request.GET.get("name", "")
    EVENTS.append(
        {"view": view, "name": name, "event": "started", "pid": pid,
         "thread": threading.current_thread().name}
    )
    ended = "returned"
    try:
        yield name
    except bridgecancel.Cancelled:
        ended = "cancelled"
        raise
    except BaseException as exc:
        ended = type(exc).__name__
        raise
    finally:
        EVENTS.append({"view": view, "name": name, "event": ended})


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def sleep_body(request: HttpRequest, view: str) -> HttpResponse:
    """``SELECT pg_sleep(seconds)`` through Django's cursor (30 s by default)."""
    seconds = float(request.GET.get("seconds", "30"))
    with recorded(request, view, pid=backend_pid()), connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return HttpResponse(b"slept")


@cancellable(limiter=ONE_AT_A_TIME)
def sleep(request: HttpRequest) -> HttpResponse:
    return sleep_body(request, "sleep")


def plain_sleep(request: HttpRequest) -> HttpResponse:
    """The anchor: the same view without the decorator."""
    return sleep_body(request, "plain_sleep")


@cancellable(timeout=0.5)
def deadline_sleep(request: HttpRequest) -> HttpResponse:
    return sleep_body(request, "deadline_sleep")


def one_body(request: HttpRequest, view: str) -> HttpResponse:
    pid = backend_pid()
    with recorded(request, view, pid=pid):
        return HttpResponse(str(pid).encode())


@cancellable
def one(request: HttpRequest) -> HttpResponse:
    """Answers its backend's pid at once."""
    return one_body(request, "one")


def plain_one(request: HttpRequest) -> HttpResponse:
    return one_body(request, "plain_one")


def insert_row(request: HttpRequest) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", [request.GET["tag"]])


@cancellable
def insert_then_sleep(request: HttpRequest) -> HttpResponse:
    """Inserts a row, then sleeps (in the request's transaction: ATOMIC_REQUESTS)."""
    insert_row(request)
    return sleep_body(request, "insert_then_sleep")


@non_atomic
@cancellable
def insert_non_atomic_then_sleep(request: HttpRequest) -> HttpResponse:
    """The same, opted out of ATOMIC_REQUESTS (above the decorator): the row is committed."""
    insert_row(request)
    return sleep_body(request, "insert_non_atomic_then_sleep")


@cancellable
def insert(request: HttpRequest) -> HttpResponse:
    insert_row(request)
    return HttpResponse(b"inserted")


@cancellable
def sqlite_count(request: HttpRequest) -> HttpResponse:
    with recorded(request, "sqlite_count"), connections["lite"].cursor() as cursor:
        cursor.execute(SLOW_SQLITE_QUERY)
        return HttpResponse(str(cursor.fetchone()[0]).encode())


def orm_job(request: HttpRequest) -> None:
    """ORM code that an async view runs through run_sync itself, with the helper."""
    try:
        with cancel_queries_on():
            sleep_body(request, "run_sync_orm")
    finally:
        connections.close_all()


@non_atomic  # Django refuses ATOMIC_REQUESTS for async views
async def run_sync_orm(request: HttpRequest) -> HttpResponse:
    await bridgecancel.run_sync(orm_job, request)
    return HttpResponse(b"slept")


@non_atomic
async def status(request: HttpRequest) -> JsonResponse:
    threads = bridgecancel.statistics().threads
    return JsonResponse(
        {"events": EVENTS, "running": threads.running, "cooperative": threads.cooperative}
    )


urlpatterns = [
    path("sleep", sleep),
    path("plain-sleep", plain_sleep),
    path("deadline-sleep", deadline_sleep),
    path("one", one),
    path("plain-one", plain_one),
    path("insert-then-sleep", insert_then_sleep),
    path("insert-non-atomic-then-sleep", insert_non_atomic_then_sleep),
    path("insert", insert),
    path("sqlite-count", sqlite_count),
    path("run-sync-orm", run_sync_orm),
    path("status", status),
]


def configure() -> None:
    params = psycopg.conninfo.conninfo_to_dict(os.environ["BRIDGECANCEL_TEST_PG_DSN"])
    settings.configure(
        DEBUG=False,
        SECRET_KEY="only for the tests",
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,  # errors go to stderr, which the test keeps
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
                "USER": params.get("user", ""),
                "NAME": params.get("dbname", ""),
                "ATOMIC_REQUESTS": True,
                "CONN_MAX_AGE": 0,
                "OPTIONS": {"application_name": APPLICATION_NAME},
            },
            "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        },
    )
    django.setup(set_prefix=False)


async def serve() -> None:
    import uvicorn
    from django.core.asgi import get_asgi_application

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(f"port {listener.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        get_asgi_application(), log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    await uvicorn.Server(config).serve(sockets=[listener])


if __name__ == "__main__":
    configure()
    asyncio.run(serve())
