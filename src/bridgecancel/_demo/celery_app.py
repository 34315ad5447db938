"""The Celery app of the demo's Celery case and of ``benchmarks/bench_celery.py``.

The workers the case starts load `app` (``celery -A bridgecancel._demo.celery_app
worker``), with Redis at ``BRIDGECANCEL_DEMO_REDIS_URL``; the caller makes an app of its
own for each run with `make_app`, since a Celery app keeps the connections of its first
broker, and sends the tasks by name. The tasks are the Dask case's (`cluster.waiting_task`,
`cluster.now`), registered with Celery, and the smallest task, `add`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from celery import Celery

from ..celery import install
from . import cluster

__all__ = ("ADD", "NOW", "URL_VARIABLE", "WAITING", "app", "make_app")

URL_VARIABLE: Final = "BRIDGECANCEL_DEMO_REDIS_URL"

WAITING: Final = "bridgecancel_demo.waiting_task"
"""Report "started" over UDP, wait up to `seconds` on the token, report the stop time."""
NOW: Final = "bridgecancel_demo.now"
"""When the task started, on the worker (``time.monotonic()``)."""
ADD: Final = "bridgecancel_demo.add"
"""The smallest task: what a call costs."""


def _add(a: int, b: int) -> int:
    return a + b


def make_app(url: str) -> Celery:
    """An app wired for bridgecancel, with Redis at `url` as broker and result backend."""
    new = Celery("bridgecancel_demo")
    new.conf.update(
        broker_url=url,
        result_backend=url,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        result_expires=600,
    )
    install(new)
    task: Callable[..., Callable[[Callable[..., Any]], Any]] = new.task
    task(name=WAITING)(cluster.waiting_task)
    task(name=NOW)(cluster.now)
    task(name=ADD)(_add)
    return new


app = make_app(os.environ.get(URL_VARIABLE, "redis://127.0.0.1:6379/0"))
