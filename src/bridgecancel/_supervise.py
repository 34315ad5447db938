"""The structured semantics (docs/structured.md), once for every kind of job: fire, escalate,
wait, deliver, count.

A kind of job (a thread's in `_threads`, a process's in `_process._run`, a cluster call's in
`dask`, a Celery call's in `celery`) is a `Job`: how to fire its token, wait for it,
interrupt it and kill it, and what it produced. This module owns what happens around it:

1. When the caller is cancelled, the job's token fires at once, from the event loop
   thread but without running user callbacks there (`Job.fire` is detached).
2. A job that ignores its token is escalated: `interrupt_after` seconds after the cancel
   (or after the job's function began, if it had not yet), `Cancelled` is raised in its
   Python code; `kill_after` seconds later its worker is killed. Every wait is shielded:
   the call returns only once the job has ended.
3. Delivery: a job that stopped because of the cancel becomes the caller's native
   cancellation; a value or error it produced anyway is handed over, and the
   cancellation comes at the caller's next checkpoint; under plain asyncio, where nothing
   would deliver it again, a cancellation still standing is raised instead
   (`_backend.asyncio_cancel_pending`).
4. The job is counted in exactly one outcome and, if cancelled, logged; `statistics()`
   reads the counts. A job's life is one `JobState`, and the running count is the number
   of jobs in `JobState.RUNNING`.

The checks of the arguments `run_sync` and `run_process` share live here too: a bad call
fails before any worker or limiter token is touched, so it never breaks a pool or another
job. Uses anyio's public API only.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import os
import threading
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, get_args

import anyio

from ._backend import asyncio_cancel_pending, cancel_requests, canceller_reason
from ._tokens import CALLER_CANCELLED, DEADLINE_REASON
from ._util import check_seconds, describe

__all__ = (
    "DEFAULT_INTERRUPT_AFTER",
    "DEFAULT_KILL_AFTER",
    "INTERRUPT_RETRY",
    "Job",
    "JobKind",
    "JobState",
    "JobStatistics",
    "Outcome",
    "Statistics",
    "abandon",
    "check_call",
    "check_func",
    "check_options",
    "deliver",
    "deliver_cancelled",
    "escalate",
    "record",
    "statistics",
    "wait_shielded",
)

# -- escalation timing ---------------------------------------------------------------------

DEFAULT_INTERRUPT_AFTER: Final = 1.0
"""Seconds from the cancel to raising `Cancelled` inside a process job that ignores its
token (`run_process`'s default; threads are interrupted only when asked)."""

DEFAULT_KILL_AFTER: Final = 2.0
"""Seconds from the interrupt to killing a worker process that is still running."""

INTERRUPT_RETRY: Final = 0.01
"""Seconds between interrupts of a thread job that swallowed the previous one."""


# -- outcomes and statistics ---------------------------------------------------------------

Outcome = Literal[
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
]
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

JobKind = Literal["threads", "processes", "cluster", "celery"]
"""What ran a job, as `Statistics` files it."""

_SINGULAR: Final = {
    "threads": "thread", "processes": "process", "cluster": "cluster", "celery": "celery"
}

logger: Final = logging.getLogger("bridgecancel")


@dataclass(frozen=True)
class JobStatistics:
    """How the jobs of one kind ended: counts of finished jobs per outcome, and of jobs
    running now.

    Attributes:
        completed: jobs that ended without being cancelled.
        cooperative: cancelled jobs whose worker stopped by itself (it raised
            `Cancelled` or returned after the token fired).
        interrupted: jobs stopped by raising `Cancelled` inside the worker.
        killed: process jobs whose worker was killed, and Celery calls whose pool
            process was (``kill_after``).
        abandoned: cancelled jobs left running (``abandon_on_cancel=True``), counted
            when the caller leaves them.
        crashed: process, cluster and Celery jobs whose worker died by itself
            (`BrokenWorkerError`).
        never_started: jobs cancelled before their function began, which then never ran
            (they cost their worker nothing).
        running: jobs whose function is running in a worker right now (for the cluster
            and Celery: calls handed to it that have not ended).
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
    """A snapshot of how bridgecancel's jobs ended, per kind of job."""

    threads: JobStatistics
    processes: JobStatistics
    cluster: JobStatistics
    """Calls made with `bridgecancel.dask.run_on_cluster`."""
    celery: JobStatistics
    """Calls made with `bridgecancel.celery.run_on_celery`."""


class _Counters:
    """The counts behind `statistics`: outcomes, and jobs in `JobState.RUNNING`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._counts: dict[JobKind, dict[str, int]] = {
            kind: dict.fromkeys((*OUTCOMES, "running"), 0) for kind in get_args(JobKind)
        }

    def move(self, job: Job, state: JobState) -> bool:
        """Put `job` in `state`, keeping the running count; False if it was abandoned.

        An abandoned job's worker may still run it, but its caller has left and counted
        it: what the worker does with it from then on changes nothing.
        """
        with self.lock:
            old = job.state
            if old is _ABANDONED:
                return False
            job.state = state
            if old is _RUNNING:
                self._counts[job.kind]["running"] -= 1
            if state is _RUNNING:
                self._counts[job.kind]["running"] += 1
        return True

    def count(self, kind: JobKind, outcome: Outcome) -> None:
        with self.lock:
            self._counts[kind][outcome] += 1

    def snapshot(self) -> Statistics:
        with self.lock:
            return Statistics(
                **{kind: JobStatistics(**counts) for kind, counts in self._counts.items()}
            )

    def after_fork_in_child(self) -> None:
        """In a forked child: another thread (a metrics exporter reading `statistics`)
        may have held the lock at the fork, and is not here to release it. The child
        keeps the outcomes so far; none of the parent's jobs runs in it."""
        self.lock = threading.Lock()
        for counts in self._counts.values():
            counts["running"] = 0


counters: Final = _Counters()
if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=counters.after_fork_in_child)


def statistics() -> Statistics:
    """Return a frozen record of how thread, process, cluster and Celery jobs have ended so
    far."""
    return counters.snapshot()


def _log_cancelled(kind: JobKind, outcome: Outcome, func: object, reason: str | None) -> None:
    """Log a cancelled job: DEBUG when it stopped by itself, WARNING when forced."""
    level = logging.DEBUG if outcome in ("cooperative", "never_started") else logging.WARNING
    if logger.isEnabledFor(level):
        name = getattr(func, "__qualname__", None) or repr(func)
        logger.log(
            level, "%s job %s ended %s after cancel (reason: %s)",
            _SINGULAR[kind], name, outcome, reason,
        )


# -- the job -------------------------------------------------------------------------------


class JobState(enum.Enum):
    """Where a job is in its life. It moves only forward:
    ``QUEUED -> RUNNING -> FINISHED``, or ``QUEUED -> DROPPED``; a cluster or Celery call
    is ``RUNNING`` from the moment the cluster or Celery has it, and ``DROPPED`` from there
    if its task never started. ``ABANDONED`` is where its caller leaves it
    (``abandon_on_cancel``), from any state: its worker's later moves are ignored."""

    QUEUED = "queued"
    """Waiting for a worker: its function has not begun."""
    RUNNING = "running"
    """Its function has begun in a worker and not ended."""
    FINISHED = "finished"
    """Its function began and has ended (returned or raised), or its worker died or was
    killed and has been reaped."""
    DROPPED = "dropped"
    """It ended without its function beginning: cancelled before it began, or it could
    not be loaded, or its worker died first."""
    ABANDONED = "abandoned"
    """Its caller left it running (``abandon_on_cancel=True``)."""


_QUEUED: Final = JobState.QUEUED
_RUNNING: Final = JobState.RUNNING
_FINISHED: Final = JobState.FINISHED
_DROPPED: Final = JobState.DROPPED
_ABANDONED: Final = JobState.ABANDONED


class Job:
    """One call's job, as the supervisor sees it; each kind of job subclasses it.

    A subclass moves its job through the `JobState`s with `move` and supplies how to
    signal it (`_cancel`, `interrupt`, `kill`), how to wait for it (`wait`), and what came
    of it (`outcome`, `stopped_by_cancel`, `result`).
    """

    __slots__ = ("deadline", "func", "interrupt_after", "kill_after", "reason", "state")

    kind: ClassVar[JobKind]

    def __init__(
        self,
        func: Callable[..., Any],
        deadline: float,
        interrupt_after: float | None = None,
        kill_after: float | None = None,
    ) -> None:
        self.func = func
        self.deadline = deadline  # the caller's effective deadline at the start (monotonic)
        self.interrupt_after = interrupt_after  # from the cancel (or the start); None: never
        self.kill_after = kill_after  # from the interrupt (or the cancel); None: never
        self.reason: str | None = None  # what it was fired with; None while not fired
        self.state = _QUEUED

    @property
    def began(self) -> bool:
        """Its function has begun (it may have ended since)."""
        return self.state is _RUNNING or self.state is _FINISHED

    @property
    def ended(self) -> bool:
        """It has ended, or will never start."""
        return self.state is _FINISHED or self.state is _DROPPED

    def move(self, state: JobState) -> bool:
        """Put the job in `state` (see `_Counters.move`); False if it was abandoned."""
        return counters.move(self, state)

    def fire(self, reason: str) -> None:
        """Fire the job's token, once, without blocking and without running user
        callbacks here."""
        if self.reason is None:
            self.reason = reason
            self._cancel(reason)

    # -- what each kind of job supplies ------------------------------------------------

    def _cancel(self, reason: str) -> None:
        """Tell the job's worker that its token fired."""
        raise NotImplementedError

    async def wait(self, *, until_started: bool = False) -> None:
        """Return once the job has ended (or began, if `until_started`). Cancellable."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Raise `Cancelled` in the job's Python code, until it ends (with
        `interrupt_after` only)."""
        raise NotImplementedError

    def kill(self) -> None:
        """Kill the worker (with `kill_after` only); `wait` returns once it is reaped."""
        raise NotImplementedError

    def outcome(self) -> Outcome:
        """How the job ended; called once it has."""
        raise NotImplementedError

    @property
    def stopped_by_cancel(self) -> bool:
        """The job ended by raising `Cancelled` for the token this call fired, or its
        worker was killed."""
        raise NotImplementedError

    def result(self) -> Any:
        """The job's return value, or raise its error."""
        raise NotImplementedError


# -- what a cancel does to a job -----------------------------------------------------------


def cancel_reason(job: Job, cancelled: BaseException | None = None) -> str:
    """Why the caller was cancelled, as the job's token reports it: ``deadline exceeded``
    once the caller's deadline has passed; else the canceller's own reason, read from the
    cancellation it raised (`cancelled`), if it gave one; else ``the caller was
    cancelled``."""
    if time.monotonic() >= job.deadline:
        return DEADLINE_REASON
    return canceller_reason(cancelled) or CALLER_CANCELLED


def record(job: Job) -> None:
    """Count the ended job in exactly one outcome; log it if it ran and was cancelled."""
    outcome = job.outcome()
    counters.count(job.kind, outcome)
    if job.reason is not None and outcome != "never_started":
        _log_cancelled(job.kind, outcome, job.func, job.reason)


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
    job.fire(cancel_reason(job, cancelled))
    await escalate(job)
    record(job)
    if job.stopped_by_cancel or not job.began:
        raise cancelled
    if asyncio_cancel_pending(cancelled, requests):
        try:
            job.result()  # a late error is chained to the cancellation, not lost
        except BaseException:
            raise cancelled  # noqa: B904 - the cancellation, with the error as its context
        raise cancelled
    return job.result()  # nothing is lost: the value or error still comes back


def abandon(job: Job, cancelled: BaseException | None = None) -> None:
    """The caller leaves a job a worker has taken (``abandon_on_cancel=True``), as
    `cancelled` (None: its coroutine was closed).

    Its token fires and it is counted abandoned now, not when its worker ends.
    """
    job.fire(cancel_reason(job, cancelled))
    job.move(_ABANDONED)
    counters.count(job.kind, "abandoned")
    _log_cancelled(job.kind, "abandoned", job.func, job.reason)


async def escalate(job: Job) -> None:
    """Wait, shielded, for a job whose token fired; interrupt and kill it when due.

    The timers count from when the job's function began: a job cancelled before it began
    never starts, and the worker still loading it is left alone.
    """
    if not job.began and not await _wait_for_job(job, None, until_started=True):
        return  # pragma: no cover - an untimed wait always ends
    interrupt_after, kill_after = job.interrupt_after, job.kill_after
    first = interrupt_after if interrupt_after is not None else kill_after
    if await _wait_for_job(job, first):
        return
    if interrupt_after is not None:
        job.interrupt()
        if await _wait_for_job(job, kill_after):
            return
    job.kill()
    await _wait_for_job(job, None)


async def _wait_for_job(job: Job, timeout: float | None, *, until_started: bool = False) -> bool:
    """Wait up to `timeout` seconds (None: for ever) for the job; True if it ended."""
    if job.ended or (until_started and job.began):
        return True
    return await wait_shielded(functools.partial(job.wait, until_started=until_started), timeout)


async def wait_shielded(wait: Callable[[], Awaitable[object]], timeout: float | None) -> bool:
    """``await wait()`` for up to `timeout` seconds (None: for ever); True if it returned.

    Shielded from the caller's cancellation, which is being handled. Plain asyncio's
    ``Task.cancel()`` gets through anyio shields; such a cancel is absorbed here, as
    asyncio coalesces it with the one being handled. `wait` must be safe to call again
    after a cancellation.
    """
    end = math.inf if timeout is None else anyio.current_time() + timeout
    with anyio.CancelScope(shield=True):
        while True:
            try:
                with anyio.CancelScope(deadline=end):
                    await wait()
                    return True
            except anyio.get_cancelled_exc_class():
                pass
            if anyio.current_time() >= end:
                return False
    raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see the loop


# -- checking a call -----------------------------------------------------------------------

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
    check_func(api, func)
    return check_options(api, limiter, interrupt_after=interrupt_after, kill_after=kill_after)


def check_options(
    api: str,
    limiter: object,
    *,
    interrupt_after: float | None,
    kill_after: float | None = None,
) -> tuple[float | None, float | None]:
    """Check the options of a call of `api` (`check_call` without the function)."""
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


def check_func(api: str, func: object) -> None:
    """Refuse what is not a sync callable (an async function, an async generator function)."""
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
                f"{describe(func)} is an async function (a coroutine function, async def): "
                f"await it directly instead of passing it to {api}()"
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
