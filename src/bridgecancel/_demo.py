"""``python -m bridgecancel demo``: cancel real blocking work and show how it ended."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import fields
from typing import Any

import anyio
import anyio.from_thread

from ._stats import WorkerStatistics, statistics
from ._threads import run_sync
from ._token import current_token

Case = tuple[str, str, float]  # (what ran, how it ended, seconds from cancel to exit)


def _outcome(before: WorkerStatistics, after: WorkerStatistics) -> str:
    """Name the outcome counters that moved between two snapshots."""
    moved = [
        f.name
        for f in fields(WorkerStatistics)
        if f.name != "running" and getattr(after, f.name) > getattr(before, f.name)
    ]
    return ", ".join(moved) or "unknown"


async def _cancel_once_started(
    start: Callable[[anyio.Event], Coroutine[Any, Any, object]],
) -> tuple[float, bool]:
    """Run `start` in a scope, cancel the scope once the worker says it is running.

    Returns the seconds from ``scope.cancel()`` to the scope's exit (with the worker
    finished) and whether the scope caught the cancellation.
    """
    ready = anyio.Event()
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(start, ready)
            await ready.wait()
            cancelled_at = time.perf_counter()
            scope.cancel()
    return time.perf_counter() - cancelled_at, scope.cancelled_caught


def _wait_on_token(ready: anyio.Event) -> None:
    anyio.from_thread.run_sync(ready.set)
    current_token().wait()
    current_token().check()


def _cpu_loop(ready: anyio.Event) -> int:
    token = current_token()
    anyio.from_thread.run_sync(ready.set)
    total = 0
    while True:
        for i in range(10_000):
            total += i * i
        token.check()


def _ignore_token(ready: anyio.Event) -> int:
    anyio.from_thread.run_sync(ready.set)
    total = 0
    while True:  # never looks at its token: only interrupt_after stops it
        total += 1


async def thread_cases() -> list[Case]:
    """The thread cases: a worker waiting on its token, and a CPU loop checking it."""
    cases: list[Case] = []
    for label, func in (
        ("thread waiting in token.wait()", _wait_on_token),
        ("thread in a CPU loop calling token.check()", _cpu_loop),
    ):
        before = statistics().threads

        async def start(ready: anyio.Event, func: Callable[..., object] = func) -> None:
            await run_sync(func, ready)

        seconds, _ = await _cancel_once_started(start)
        cases.append((label, _outcome(before, statistics().threads), seconds))

    before = statistics().threads

    async def start_stubborn(ready: anyio.Event) -> None:
        await run_sync(_ignore_token, ready, interrupt_after=0.1)

    seconds, _ = await _cancel_once_started(start_stubborn)
    label = "thread ignoring its token, interrupt_after=0.1"
    cases.append((label, _outcome(before, statistics().threads), seconds))
    return cases


DemoCases = Callable[[], Awaitable[list[Case]]]


def _extra_case_groups() -> list[DemoCases]:
    """Cases from the other modules: blocking waits in threads, then processes."""
    from ._demo_blocking import demo_blocking_cases
    from ._proc_demo import demo_process_cases

    return [demo_blocking_cases, demo_process_cases]


async def _all_cases() -> list[Case]:
    cases = await thread_cases()
    for group in _extra_case_groups():
        cases.extend(await group())
    return cases


def main() -> int:
    # The table shows how each job ended; the WARNING records would repeat it.
    logging.getLogger("bridgecancel").addHandler(logging.NullHandler())
    backends = ["asyncio"]
    if importlib.util.find_spec("trio") is not None:
        backends.append("trio")
    else:
        print("trio is not installed (pip install 'bridgecancel[trio]'): asyncio only\n")
    width = 52
    for backend in backends:
        print(f"== {backend} ==")
        print(f"{'case':<{width}} {'how it ended':<16} cancel took")
        for label, ended, seconds in anyio.run(_all_cases, backend=backend):
            print(f"{label:<{width}} {ended:<16} {seconds * 1000:8.2f} ms")
        print()
    running = statistics()
    if running.threads.running or running.processes.running:
        print(f"jobs still running after the demo: {running}")
        return 1
    print("every worker stopped when its scope was cancelled; none is left running")
    return 0
