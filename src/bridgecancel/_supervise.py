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

import asyncio
import math
import sys
import time
from typing import Any, Final, Protocol

import anyio

from ._stats import Kind, Outcome, counters, log_cancelled
from ._token_state import DEADLINE_REASON

__all__ = (
    "CALLER_CANCELLED",
    "Job",
    "abandon",
    "cancel_reason",
    "deliver",
    "deliver_cancelled",
    "escalate",
    "record",
    "redeliver_asyncio_cancel",
)

CALLER_CANCELLED: Final = "the caller was cancelled"


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


def cancel_requests(exc: BaseException) -> int:
    """How many cancellations of the current asyncio task are pending (3.11+; else 0)."""
    if sys.version_info >= (3, 11) and isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None:
            return task.cancelling()
    return 0


def redeliver_asyncio_cancel(exc: BaseException, requests: int) -> None:
    """Ask again for a plain asyncio cancellation that was caught to hand over a result.

    anyio's cancel scopes and trio redeliver by themselves (the effective deadline is
    then -inf). A plain ``Task.cancel()`` fires once, so it is requested again at the
    task's next suspension, unless its requester has withdrawn it by then: an
    ``asyncio.timeout()`` block or task group that exited without another checkpoint
    calls ``Task.uncancel()`` (Python 3.11+), and its cancellation must not escape it.
    The same rule on every Python: a pending ``Task.cancel()`` flag set here would
    outlive the block on 3.11 and 3.12, and a task ending with it set loses its result.

    `requests` is ``Task.cancelling()`` when the cancellation was caught: one requester
    withdrawing leaves fewer, and a second request (a bare ``Task.cancel()`` absorbed
    while the job ended) keeps it pending.
    """
    if not isinstance(exc, asyncio.CancelledError):
        return
    if anyio.current_effective_deadline() == -math.inf:
        return
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - the bridge always runs in a task
        return
    message = exc.args[0] if exc.args else None
    asyncio.get_running_loop().call_soon(_cancel_again, task, requests, message)


def _cancel_again(task: asyncio.Task[Any], requests: int, message: object) -> None:
    if task.done():
        return
    if sys.version_info >= (3, 11):
        if task.cancelling() < requests:
            return  # withdrawn: the timeout or task group that asked has exited
        task.uncancel()  # keep the count as it was, so asyncio.timeout() still works
    task.cancel(message)
