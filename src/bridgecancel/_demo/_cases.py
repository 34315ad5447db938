"""The cases ``python -m bridgecancel demo`` runs, in order, on each backend.

A case is ``async def case(backend: str) -> dict[str, str]``, run inside
``anyio.run(case, backend, backend=backend)``, returning one row with exactly the keys
`ROW_KEYS`. Register a new case by adding it to `CASES`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from ._process_cases import (
    process_ignoring_its_token,
    process_ignoring_the_interrupt,
    process_waiting_on_its_token,
)
from ._thread_cases import (
    thread_blocked_in_queue_get,
    thread_blocked_in_recv,
    thread_cpu_loop,
    thread_ignoring_its_token,
    thread_running_a_subprocess,
    thread_waiting_on_its_token,
)

__all__ = ("CASES", "ROW_KEYS", "Case")

Case = Callable[[str], Awaitable[dict[str, str]]]

ROW_KEYS: Final = ("case", "backend", "settings", "bridgecancel", "anchor")

CASES: Final[list[Case]] = [
    thread_waiting_on_its_token,
    thread_cpu_loop,
    thread_ignoring_its_token,
    thread_blocked_in_queue_get,
    thread_blocked_in_recv,
    thread_running_a_subprocess,
    process_waiting_on_its_token,
    process_ignoring_its_token,
    process_ignoring_the_interrupt,
    # The integrator registers the web case (bridgecancel._demo_web) and the cluster
    # case (bridgecancel._demo_cluster) here.
]
