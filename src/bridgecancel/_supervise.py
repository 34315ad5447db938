"""Section 3 of the design, once for every kind of worker: fire, escalate, wait, deliver, count.

A kind of worker (`_threads`, `_processes`) supplies a `Job`: how to fire its token, how to
wait for it, interrupt it and kill it, and what it produced. This module owns what
happens around it:

1. When the caller is cancelled, the job's token fires at once, from the event loop
   thread but without running user callbacks there (`Job.fire` is detached).
2. A job that ignores its token is escalated: `interrupt_after` seconds after the cancel
   (or after the job's function began, if it had not yet), `Cancelled` is raised in its
   Python code; `kill_after` seconds later its worker is killed. Every wait is shielded:
   the call returns only once the job has ended.
3. Delivery: a job that stopped because of the cancel becomes the caller's native
   cancellation; a value or error it produced anyway is handed over, and the
   cancellation comes at the caller's next checkpoint (`redeliver_asyncio_cancel`).
4. The job is counted in exactly one outcome and, if cancelled, logged.

Uses anyio's public API only, so it works under anyio on asyncio and trio, and from plain
asyncio and plain trio code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import anyio

from bridgecancel._backend import cancel_requests, redeliver_asyncio_cancel
from bridgecancel._tokens import CALLER_CANCELLED

from ._tokens import DEADLINE_REASON
from ._util import check_seconds, describe

__all__ = (
    "CALLER_CANCELLED",
    "Job",
    "Outcome",
    "Statistics",
    "WorkerStatistics",
    "abandon",
    "cancel_reason",
    "check_call",
    "deliver",
    "deliver_cancelled",
    "escalate",
    "record",
    "redeliver_asyncio_cancel",
    "statistics",
)

class Job(Protocol):
    """A job in a worker, as the supervisor sees it."""

    @property
    def kind(self) -> Kind:
        """Which statistics count the job."""

    @property
    def func(self) -> object:
        """The function the job runs (for logs)."""

    @property
    def in_worker(self) -> bool:
        """True once `counters.started` counted the job as running."""

    @property
    def interrupt_after(self) -> float | None:
        """Seconds from the cancel (or the start) to the interrupt; None: never."""

    @property
    def kill_after(self) -> float | None:
        """Seconds from the interrupt to the kill; None: never (always for threads)."""

    @property
    def deadline(self) -> float:
        """The caller's effective deadline at the start, in `time.monotonic` terms."""

    @property
    def started(self) -> bool:
        """True once the job's function has begun (it may have ended since)."""

    @property
    def ended(self) -> bool:
        """True once the job has ended, or will never start."""

    @property
    def reason(self) -> str | None:
        """The reason its token fired with, or None if it has not fired."""

    def fire(self, reason: str) -> None:
        """Fire the job's token without blocking and without running user callbacks here."""

    async def wait(self, *, until_started: bool = False) -> None:
        """Return once the job has ended (or began, if `until_started`). Cancellable."""

    def interrupt(self) -> None:
        """Raise `Cancelled` in the job's Python code, until it ends."""

    def kill(self) -> None:
        """Kill the worker; `wait` returns once it has been reaped."""

    def outcome(self) -> Outcome:
        """How the job ended; called once it has."""

    @property
    def stopped_by_cancel(self) -> bool:
        """True if the job ended by raising `Cancelled` for its token, or was killed."""

    def result(self) -> Any:
        """The job's return value, or raise its error."""


def cancel_reason(job: Job) -> str:
    """Why the caller was cancelled, as the job's token reports it."""
    return DEADLINE_REASON if time.monotonic() >= job.deadline else CALLER_CANCELLED


def record(job: Job) -> None:
    """Count the ended job in exactly one outcome; log it if it ran and was cancelled."""
    outcome = job.outcome()
    counters.finished(job.kind, outcome, was_running=job.in_worker)
    reason = job.reason
    if reason is not None and outcome != "never_started":
        log_cancelled(job.kind, outcome, job.func, reason)


async def deliver(job: Job) -> Any:
    """Hand over what an ended job produced when its caller saw no cancellation.

    A job that stopped because its token fired was cancelled by its caller's scope
    (tokens never fire by themselves at the caller's deadline), which the caller has not
    noticed yet: it gets that native cancellation at this checkpoint.
    """
    record(job)
    if job.stopped_by_cancel:
        await anyio.sleep_forever()
    return job.result()


async def deliver_cancelled(job: Job, cancelled: BaseException) -> Any:
    """The caller was cancelled while `job` was queued or running: fire, escalate, deliver."""
    requests = cancel_requests(cancelled)  # before the waits below absorb any more
    job.fire(cancel_reason(job))
    await escalate(job)
    record(job)
    if job.stopped_by_cancel or not job.started:
        raise cancelled
    try:
        return job.result()  # nothing is lost: the value or error still comes back
    finally:
        redeliver_asyncio_cancel(cancelled, requests)


def abandon(job: Job) -> None:
    """The caller leaves a job a worker has taken (``abandon_on_cancel=True``).

    Its token fires and it is counted abandoned now, not when its worker ends.
    """
    job.fire(cancel_reason(job))
    # A worker has taken the job (it counts it as running, maybe a moment from now).
    counters.finished(job.kind, "abandoned")
    log_cancelled(job.kind, "abandoned", job.func, job.reason)


async def escalate(job: Job) -> None:
    """Wait, shielded, for a job whose token fired; interrupt and kill it when due.

    The timers count from when the job's function began: a job cancelled before it began
    never starts, and the worker still loading it is left alone.
    """
    if not job.started and not await _wait_shielded(job, None, until_started=True):
        return  # pragma: no cover - an untimed wait always ends
    interrupt_after, kill_after = job.interrupt_after, job.kill_after
    first = interrupt_after if interrupt_after is not None else kill_after
    if await _wait_shielded(job, first):
        return
    if interrupt_after is not None:
        job.interrupt()
        if await _wait_shielded(job, kill_after):
            return
    job.kill()
    await _wait_shielded(job, None)


async def _wait_shielded(
    job: Job, timeout: float | None, *, until_started: bool = False
) -> bool:
    """Wait up to `timeout` seconds (None: for ever) for the job; True if it ended.

    Shielded from the caller's cancellation, which is being handled. Plain asyncio's
    ``Task.cancel()`` gets through anyio shields; such a cancel is absorbed here, as
    asyncio coalesces it with the one being handled.
    """
    if job.ended or (until_started and job.started):
        return True
    end = math.inf if timeout is None else anyio.current_time() + timeout
    with anyio.CancelScope(shield=True):
        while True:
            try:
                with anyio.CancelScope(deadline=end):
                    await job.wait(until_started=until_started)
                    return True
            except anyio.get_cancelled_exc_class():
                pass
            if anyio.current_time() >= end:
                return False
    raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see the loop


# -- from _stats --------------------------------------------------------------

# How jobs ended: counts per outcome, and the ``bridgecancel`` logger.

Outcome = Literal[
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
]
Kind = Literal["threads", "processes", "cluster"]
_SINGULAR: Final = {"threads": "thread", "processes": "process", "cluster": "cluster"}

logger: Final = logging.getLogger("bridgecancel")

_OUTCOMES: Final = (
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
)


@dataclass(frozen=True)
class WorkerStatistics:
    """Counts of finished jobs per outcome, and of jobs running now.

    Attributes:
        completed: jobs that ended without being cancelled.
        cooperative: cancelled jobs whose worker stopped by itself (it raised
            `Cancelled` or returned after the token fired).
        interrupted: jobs stopped by raising `Cancelled` inside the worker.
        killed: process jobs whose worker was killed.
        abandoned: cancelled jobs left running (``abandon_on_cancel=True``), counted
            when the caller leaves them.
        crashed: process jobs whose worker died by itself (`BrokenWorkerError`).
        never_started: jobs cancelled before their function began, which then never ran
            (they cost their worker nothing).
        running: jobs whose function is running in a worker right now.
    """

    completed: int
    cooperative: int
    interrupted: int
    killed: int
    abandoned: int
    crashed: int
    never_started: int
    running: int


@dataclass(frozen=True)
class Statistics:
    """A snapshot of how bridgecancel's thread and process jobs ended."""

    threads: WorkerStatistics
    processes: WorkerStatistics
    # Calls made with bridgecancel.dask: ``running`` counts calls not yet ended.
    cluster: WorkerStatistics


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Kind, dict[str, int]] = {
            kind: dict.fromkeys((*_OUTCOMES, "running"), 0)
            for kind in ("threads", "processes", "cluster")
        }

    def started(self, kind: Kind) -> None:
        with self._lock:
            self._counts[kind]["running"] += 1

    def finished(self, kind: Kind, outcome: Outcome, *, was_running: bool = True) -> None:
        """Count an ended job; `was_running` if `started` counted it as running."""
        with self._lock:
            counts = self._counts[kind]
            if was_running:
                counts["running"] -= 1
            counts[outcome] += 1

    def snapshot(self) -> Statistics:
        with self._lock:
            return Statistics(
                threads=WorkerStatistics(**self._counts["threads"]),
                processes=WorkerStatistics(**self._counts["processes"]),
                cluster=WorkerStatistics(**self._counts["cluster"]),
            )


counters: Final = _Counters()


def statistics() -> Statistics:
    """Return a frozen record of how thread and process jobs have ended so far."""
    return counters.snapshot()


def log_cancelled(kind: Kind, outcome: Outcome, func: object, reason: str | None) -> None:
    """Log a cancelled job: DEBUG when it stopped by itself, WARNING when forced."""
    level = logging.DEBUG if outcome in ("cooperative", "never_started") else logging.WARNING
    if logger.isEnabledFor(level):
        name = getattr(func, "__qualname__", None) or repr(func)
        logger.log(
            level, "%s job %s ended %s after cancel (reason: %s)",
            _SINGULAR[kind], name, outcome, reason,
        )


# -- from _checks -------------------------------------------------------------

# Checks of the arguments `run_sync` and `run_process` share, with errors that say what to do.
#
# A bad call fails here, before any worker or limiter token is touched, so it never breaks
# a pool or another job.

def check_call(
    api: str,
    func: object,
    limiter: object,
    *,
    interrupt_after: float | None,
    kill_after: float | None = None,
) -> tuple[float | None, float | None]:
    """Check a call of `api` (``"run_sync"`` or ``"run_process"``).

    Returns `interrupt_after` and `kill_after` as floats, or None for a stage that never
    comes (None or infinity).
    """
    _check_func(api, func)
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(
            f"{api}() takes limiter=anyio.CapacityLimiter(n) (or None for the default "
            f"limiter), got {limiter!r}; to allow n jobs at once, pass "
            "anyio.CapacityLimiter(n)"
        )
    if interrupt_after is not None:
        interrupt_after = _stage(api, "interrupt_after", interrupt_after)
    if kill_after is not None:
        kill_after = _stage(api, "kill_after", kill_after)
    return interrupt_after, kill_after


# Code flags of `async def` functions and async generators.
_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _check_func(api: str, func: object) -> None:
    if (
        type(func) is types.FunctionType
        and not func.__code__.co_flags & _ASYNC_FLAGS
        and "_is_coroutine_marker" not in func.__dict__  # inspect.markcoroutinefunction
    ):
        return  # a plain def: the common case, checked without inspect
    if not callable(func):
        raise TypeError(f"{api}() needs a callable (a sync function) to run, got {func!r}")
    if isinstance(func, (type, types.BuiltinFunctionType, types.MethodWrapperType)):
        return  # classes and builtins are sync (and this check is on every call)
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    for candidate in (func, target):
        if inspect.iscoroutinefunction(candidate):
            raise TypeError(
                f"{describe(func)} is a coroutine function (async def): await it directly "
                f"instead of passing it to {api}()"
            )
        if inspect.isasyncgenfunction(candidate):
            raise TypeError(
                f"{describe(func)} is an async generator function: iterate it with "
                f"'async for' instead of passing it to {api}()"
            )


def _stage(api: str, name: str, value: float) -> float | None:
    """An escalation stage's seconds; None (never) for infinity."""
    seconds = check_seconds(value, api, name, none="to skip that stage")
    return None if seconds == math.inf else seconds
