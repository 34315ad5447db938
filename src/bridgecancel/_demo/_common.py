"""What every demo case shares: run one job under bridgecancel and under today's anchor,
cancel both at the same moment, time them, and word the row."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Final, Literal

import anyio
import anyio.to_process
import anyio.to_thread

from .._stats import WorkerStatistics, statistics
from ._work import ended_at, started

__all__ = (
    "PROCESS_ANCHOR",
    "WORK_SECONDS",
    "Job",
    "Start",
    "compare",
    "process_anchor",
    "thread_anchor",
)

WORK_SECONDS: Final = 0.5
"""How long each job works when nothing stops it (what the anchors show)."""

_PATIENCE: Final = 30.0  # seconds to wait for a job to start or end before giving up

Job = Callable[[str, float], None]
"""A job from `_work`: ``job(mark, seconds)``."""

Start = Callable[[Job, str], Awaitable[object]]
"""One way to run a job: ``await start(job, mark)`` runs ``job(mark, WORK_SECONDS)``."""


@dataclass(frozen=True)
class _Side:
    """How one side of a case went, in seconds from the cancel."""

    returned: float  # until its caller had control back
    ended: float | None  # until the work itself ended (None: it never said; killed)


async def _race(job: Job, bridgecancel: Start, anchor: Start) -> tuple[_Side, _Side]:
    """Start `job` both ways, cancel both once both run; return once both have ended."""
    with tempfile.TemporaryDirectory(prefix="bridgecancel-demo-") as tmp:
        marks = (os.path.join(tmp, "bridgecancel"), os.path.join(tmp, "anchor"))
        scopes = (anyio.CancelScope(), anyio.CancelScope())
        returned = [0.0, 0.0]

        async def run(side: int, start: Start) -> None:
            with scopes[side]:
                await start(job, marks[side])
            returned[side] = time.monotonic()

        async with anyio.create_task_group() as group:
            group.start_soon(run, 0, bridgecancel)
            group.start_soon(run, 1, anchor)
            with anyio.fail_after(_PATIENCE):
                while not all(started(mark) for mark in marks):
                    await anyio.sleep(0.002)
            cancelled_at = time.monotonic()
            for scope in scopes:
                scope.cancel()
        # The anchor's worker may run on after its caller is back: wait for the work.
        with anyio.fail_after(_PATIENCE):
            while ended_at(marks[1]) is None:
                await anyio.sleep(0.005)
        sides = []
        for side, mark in enumerate(marks):
            end = ended_at(mark)
            ended = None if end is None else max(0.0, end - cancelled_at)
            sides.append(_Side(returned[side] - cancelled_at, ended))
        return sides[0], sides[1]


def thread_anchor(backend: str) -> tuple[str, Start]:
    """What a user runs blocking work in a thread with today, on `backend`."""
    if backend == "asyncio":

        async def to_thread(job: Job, mark: str) -> None:
            await asyncio.to_thread(job, mark, WORK_SECONDS)

        return "asyncio.to_thread", to_thread

    async def run_sync(job: Job, mark: str) -> None:
        await anyio.to_thread.run_sync(job, mark, WORK_SECONDS)

    return "anyio.to_thread.run_sync", run_sync


PROCESS_ANCHOR: Final = "anyio.to_process.run_sync"


async def process_anchor(job: Job, mark: str) -> None:
    """What an anyio user runs blocking work in a process with today (its default)."""
    await anyio.to_process.run_sync(job, mark, WORK_SECONDS)


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _moved(before: WorkerStatistics, after: WorkerStatistics) -> str:
    """The outcome counters that moved between two snapshots."""
    moved = [
        f.name
        for f in fields(WorkerStatistics)
        if f.name != "running" and getattr(after, f.name) > getattr(before, f.name)
    ]
    return ", ".join(moved) or "no outcome counted"


def _anchor_text(name: str, worker: str, side: _Side) -> str:
    back = _seconds(side.returned)
    if side.ended is not None and side.ended > side.returned + 0.05:
        return f"{name}: caller back in {back}; {worker} ran on {_seconds(side.ended)}"
    return f"{name}: caller waited {back}; {worker} ran to the end"


async def compare(
    case: str,
    backend: str,
    kind: Literal["threads", "processes"],
    job: Job,
    bridgecancel: Start,
    anchor: tuple[str, Start],
    settings: str = "-",
) -> dict[str, str]:
    """The row of one case: `job` cancelled under bridgecancel and under `anchor`."""
    worker = "thread" if kind == "threads" else "process"
    before = getattr(statistics(), kind)
    ours, theirs = await _race(job, bridgecancel, anchor[1])
    outcome = _moved(before, getattr(statistics(), kind))
    return {
        "case": case,
        "backend": backend,
        "settings": settings,
        "bridgecancel": f"{outcome}: caller back in {_seconds(ours.returned)}, {worker} stopped",
        "anchor": _anchor_text(anchor[0], worker, theirs),
    }
