"""The Celery app and tasks of tests/test_celery.py: the test imports it, and its workers
load it (``celery -A _celery_tasks worker``).

Redis is ``BRIDGECANCEL_TEST_REDIS_URL``; the test session sets it (and calls `configure`)
before anything is sent. Each pool's worker consumes a queue of its own, so a test picks
the pool with ``.set(queue=...)``.
Tasks report to the test over loopback TCP, so the tests wait on events, not sleeps.
"""

from __future__ import annotations

import contextvars
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from bridgecancel import blocking, current_token
from bridgecancel.celery import install

app = Celery("bridgecancel_tests")


def configure(url: str) -> None:
    """Point the app at the Redis server `url` (broker and result backend)."""
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        result_expires=600,
    )


configure(os.environ.get("BRIDGECANCEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
install(app)


def task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@app.task(...)``, typed (Celery is not): the task is an ``Any``."""
    decorate: Callable[[Callable[..., Any]], Any] = app.task(**options)
    return decorate


class CustomError(Exception):
    """An error of the tests' own, which must arrive as itself."""


def _report(port: int, message: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(message.encode() + b"\n")
    return conn


@task()
def add(a: int, b: int) -> int:
    return a + b


@task()
def token_facts() -> tuple[bool, bool, float | None]:
    """Whether the task's token is its own (not the never-cancelled token every code
    outside a job sees), whether it fired, and the time it has left."""
    token = current_token()
    outside = contextvars.Context().run(current_token)
    remaining: float | None = token.remaining()
    if remaining == float("inf"):
        remaining = None  # JSON has no infinity
    return token is not outside, token.cancel_called, remaining


@task()
def wait_for_cancel(port: int) -> str:
    """Tell the test it started (and in which process), wait on the token, tell how it
    stopped, then stop."""
    token = current_token()
    with _report(port, f"started {os.getpid()}"):
        pass
    started = time.monotonic()
    fired = token.wait(30)
    with _report(port, f"stopped fired={fired} after={time.monotonic() - started:.3f} "
                 f"reason={token.reason}"):
        pass
    token.check()
    return "not cancelled"


@task()
def blocked_in_queue_get(port: int) -> None:
    """Blocked in a token-aware queue wait, with an on_cancel callback registered."""
    token = current_token()
    token.on_cancel(lambda: _report(port, "callback ran").close())
    with _report(port, "started"):
        pass
    try:
        blocking.queue_get(queue.Queue())  # nothing is ever put: only the cancel ends it
    finally:
        with _report(port, f"stopped fired={token.cancel_called}"):
            pass


@task()
def ignore_token(port: int) -> list[Any]:
    """Run to the end whatever the token says: until the test sends "go"."""
    with _report(port, f"started {os.getpid()}") as conn:
        conn.recv(16)
    return [42, current_token().cancel_called]


@task()
def stuck(port: int) -> None:
    """Ignore the token for ever (only a kill ends it)."""
    with _report(port, f"started {os.getpid()}"):
        pass
    while True:
        time.sleep(0.05)


@task()
def crash(port: int) -> None:
    with _report(port, f"started {os.getpid()}"):
        pass
    os._exit(3)


@task()
def raise_value_error() -> None:
    raise ValueError("raised on the worker")


@task()
def raise_custom_error() -> None:
    raise CustomError("raised on the worker")


@task()
def pid() -> int:
    return os.getpid()


@task(bind=True, max_retries=1)
def retry_later(self: Any, port: int, countdown: float) -> str:
    """The first attempt reports and asks Celery to retry after `countdown` seconds; the
    second reports and returns."""
    with _report(port, f"attempt {self.request.retries}"):
        pass
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return "second attempt"


@task(base=Task)
def outside_the_app_s_task_class(port: int) -> bool:
    """A task whose class derives from celery.Task, not from the app's Task: its body
    runs outside bridgecancel (the worker logs an error); until the test sends "go"."""
    with _report(port, f"started {os.getpid()}") as conn:
        conn.recv(16)
    outside = contextvars.Context().run(current_token)
    return current_token() is not outside
