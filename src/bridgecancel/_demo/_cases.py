"""The cases ``python -m bridgecancel demo`` runs, in order, on each backend.

A case is ``async def case(backend: str) -> dict[str, str]``, run inside
``anyio.run(case, backend, backend=backend)``, returning one row with exactly the keys
`ROW_KEYS`. Register a new case by adding it to `CASES`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from . import _work
from ._common import Comparison
from .celery_case import celery_cancel
from .cluster import cluster_cancel
from .executor import executor_cancel
from .web import web_disconnect

__all__ = ("CASES", "ROW_KEYS", "Case", "describe")

Case = Callable[[str], Awaitable[dict[str, str]]]

ROW_KEYS: Final = ("case", "backend", "settings", "bridgecancel", "anchor")

# Short escalation, so that the stubborn process cases end quickly; the rows show it.
_ESCALATION: Final = {"interrupt_after": 0.1, "kill_after": 0.2}

CASES: Final[list[Case]] = [
    Comparison("thread: token.sleep()", _work.wait_on_token, "threads"),
    Comparison("thread: CPU loop calling token.check()", _work.cpu_loop, "threads"),
    Comparison(
        "thread: ignores its token", _work.ignore_token, "threads", {"interrupt_after": 0.1}
    ),
    Comparison("thread: blocking.queue_get()", _work.queue_get, "threads"),
    Comparison("thread: blocking.recv() on loopback", _work.recv, "threads"),
    Comparison("thread: blocking.run_subprocess(sleep)", _work.subprocess_sleep, "threads"),
    Comparison("process: token.sleep()", _work.wait_on_token, "processes", _ESCALATION),
    Comparison("process: ignores its token", _work.ignore_token, "processes", _ESCALATION),
    Comparison(
        "process: ignores token and interrupt", _work.ignore_everything, "processes", _ESCALATION
    ),
    web_disconnect,
    cluster_cancel,
    executor_cancel,
    celery_cancel,
]


def describe(case: Case) -> str:
    """What the progress line calls `case`."""
    if isinstance(case, Comparison):
        return case.case
    return getattr(case, "__name__", repr(case)).replace("_", " ")
