"""The demo's thread and process cases: run one job under bridgecancel and under today's
anchor side by side, cancel each the moment it runs, time both, and word the row."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

import anyio
import anyio.to_process
import anyio.to_thread

from .._process._run import run_process
from .._supervise import JobStatistics, statistics
from .._threads import run_sync
from ._work import ended_at, started

__all__ = ("WORK_SECONDS", "Comparison", "Job")

WORK_SECONDS: Final = 0.5
"""How long each job works when nothing stops it (what the anchors show)."""

_PATIENCE: Final = 30.0  # seconds to wait for a job to start or end before giving up

Job = Callable[[str, float], None]
"""A job from `_work`: ``job(mark, seconds)``."""

Start = Callable[[Job, str], Coroutine[Any, Any, object]]
"""One way to run a job: ``await start(job, mark)`` runs ``job(mark, WORK_SECONDS)``."""


@dataclass(frozen=True)
class _Side:
    """How one side of a case went, in seconds from the cancel."""

    returned: float  # until its caller had control back
    ended: float | None  # until the work itself ended (None: it never said; killed)


async def _cancel_once_started(job: Job, start: Start, mark: str, *, anchor: bool) -> _Side:
    """Run `job` one way and cancel it once it runs; return once the work has ended.

    Each side of a case is cancelled as soon as its own job has started (a process
    side may take longer to start than a thread side), and timed from its own cancel.
    """
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(start, job, mark)
            with anyio.fail_after(_PATIENCE):
                while not started(mark):
                    await anyio.sleep(0.002)
            cancelled_at = time.monotonic()
            scope.cancel()
    returned = time.monotonic()
    # An anchor's worker may run on after its caller is back: wait for the work.
    # (bridgecancel's caller is back only once the work has ended, or was killed.)
    with anyio.fail_after(_PATIENCE):
        while anchor and ended_at(mark) is None:
            await anyio.sleep(0.005)
    end = ended_at(mark)
    ended = None if end is None else max(0.0, end - cancelled_at)
    return _Side(returned - cancelled_at, ended)


async def _race(job: Job, bridgecancel: Start, anchor: Start) -> tuple[_Side, _Side]:
    """Run `job` both ways at once, each cancelled once it runs."""
    with tempfile.TemporaryDirectory(prefix="bridgecancel-demo-") as tmp:
        sides: dict[str, _Side] = {}

        async def run(name: str, start: Start) -> None:
            mark = os.path.join(tmp, name)
            sides[name] = await _cancel_once_started(job, start, mark, anchor=name == "anchor")

        async with anyio.create_task_group() as group:
            group.start_soon(run, "bridgecancel", bridgecancel)
            group.start_soon(run, "anchor", anchor)
        return sides["bridgecancel"], sides["anchor"]


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


def _moved(before: JobStatistics, after: JobStatistics) -> str:
    """The outcome counters that moved between two snapshots."""
    moved = [
        f.name
        for f in fields(JobStatistics)
        if f.name != "running" and getattr(after, f.name) > getattr(before, f.name)
    ]
    return ", ".join(moved) or "no outcome counted"


def _anchor_text(name: str, worker: str, side: _Side) -> str:
    back = _seconds(side.returned)
    if side.ended is not None and side.ended > side.returned + 0.05:
        return f"{name}: caller back in {back}; {worker} ran on {_seconds(side.ended)}"
    return f"{name}: caller waited {back}; {worker} ran to the end"


@dataclass(frozen=True)
class Comparison:
    """A demo case: `job` under bridgecancel (with `options`) and under today's anchor.

    Called as ``await comparison(backend)``, it runs both at once, cancels each as soon
    as its job runs, and returns the row. Threads run with `run_sync` beside
    ``asyncio.to_thread`` (asyncio) or ``anyio.to_thread.run_sync`` (trio); processes
    with `run_process` beside ``anyio.to_process.run_sync``.
    """

    case: str
    job: Job
    kind: Literal["threads", "processes"]
    options: Mapping[str, float] = field(default_factory=dict)

    async def __call__(self, backend: str) -> dict[str, str]:
        if self.kind == "threads":
            run: Callable[..., Awaitable[object]] = run_sync
            worker, anchor = "thread", thread_anchor(backend)
        else:
            run, worker, anchor = run_process, "process", (PROCESS_ANCHOR, process_anchor)

        async def ours(job: Job, mark: str) -> None:
            await run(job, mark, WORK_SECONDS, **self.options)

        before = getattr(statistics(), self.kind)
        mine, theirs = await _race(self.job, ours, anchor[1])
        outcome = _moved(before, getattr(statistics(), self.kind))
        settings = ", ".join(f"{name}={value}" for name, value in self.options.items())
        back = _seconds(mine.returned)
        return {
            "case": self.case,
            "backend": backend,
            "settings": settings or "-",
            "bridgecancel": f"{outcome}: caller back in {back}, {worker} stopped",
            "anchor": _anchor_text(anchor[0], worker, theirs),
        }
