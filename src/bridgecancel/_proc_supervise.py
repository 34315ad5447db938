"""Wait for a started job; on cancel, fire its token, escalate, then deliver.

This is the structured-cancellation core of the bridge (DESIGN section 3), written
against a small `Job` protocol so that thread and process workers can share it:

1. Wait for the job. If the caller is cancelled meanwhile, fire the job's token at once.
2. Give the worker `interrupt_after` seconds to stop by itself, then interrupt it
   (`Cancelled` raised in its Python code); give it `kill_after` more seconds, then kill
   it. Each stage is optional. These waits are shielded: the call returns only once the
   job has ended (or its worker has been reaped).
3. Deliver: a value or an error from the job is handed over even after a cancel (and the
   cancellation is then delivered at the caller's next checkpoint); a job that stopped
   because of the cancel turns into the caller's native cancellation.

Uses anyio's public API only, so it works under anyio on asyncio and trio, and from
plain asyncio and plain trio code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

import anyio

from ._bridge import redeliver_asyncio_cancel
from ._stats import Outcome
from ._token import DEADLINE_REASON

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")

CALLER_REASON: Final = "the caller was cancelled"

# How long past the caller's deadline to wait for its scope to fire, when the worker
# saw the deadline pass first. The scope fires at the deadline itself; this is slack.
_DEADLINE_SLACK: Final = 1.0


class Job(Protocol[T_co]):
    """A job running in a worker, as `supervise` sees it."""

    async def wait(self) -> None:
        """Return once the job has ended. Cancellable, and may be called again after."""

    def cancel(self, reason: str) -> None:
        """Fire the job's token (without blocking)."""

    def interrupt(self) -> None:
        """Raise `Cancelled` in the job's Python code."""

    def kill(self) -> None:
        """Kill the worker; `wait` then returns once it has been reaped."""

    @property
    def stopped_by_cancel(self) -> bool:
        """True if the job ended by raising `Cancelled` for its token, or was killed."""

    def result(self) -> T_co:
        """The job's return value, or raise its error."""


async def supervise(
    job: Job[T],
    *,
    interrupt_after: float | None,
    kill_after: float | None,
    deadline: float,
    on_ended: Callable[[Outcome, str | None], None],
) -> T:
    """Wait for `job`, cancel and escalate if the caller is cancelled, then deliver.

    Args:
        job: a job that has started in a worker.
        interrupt_after: seconds from the cancel to the interrupt (None: no interrupt).
        kill_after: seconds from the interrupt, or from the cancel if there is no
            interrupt stage, to the kill (None: never kill).
        deadline: the caller's effective deadline when the job started (anyio clock).
        on_ended: called once, as soon as the job has ended and before delivery, with
            how it ended and the cancel reason (None if it was not cancelled).
    """
    cancelled: BaseException | None = None
    reason: str | None = None
    outcome: Outcome = "completed"
    try:
        await job.wait()
    except anyio.get_cancelled_exc_class() as exc:
        cancelled = exc
        reason = DEADLINE_REASON if anyio.current_time() >= deadline else CALLER_REASON
        job.cancel(reason)
        outcome = await _escalate(job, interrupt_after, kill_after)
    on_ended(outcome, reason)

    if cancelled is None:
        if job.stopped_by_cancel and deadline != math.inf:
            # The worker saw the caller's deadline pass before the caller's own scope
            # did; report it as that scope's cancellation, which fires any moment now.
            await anyio.sleep_until(deadline + _DEADLINE_SLACK)
        return job.result()
    if job.stopped_by_cancel:
        raise cancelled
    try:
        return job.result()  # nothing is lost: the value or error still comes back
    finally:
        redeliver_asyncio_cancel(cancelled)


async def _escalate(
    job: Job[object], interrupt_after: float | None, kill_after: float | None
) -> Outcome:
    first = interrupt_after if interrupt_after is not None else kill_after
    if await _wait_shielded(job, first):
        return "cooperative"
    if interrupt_after is not None:
        job.interrupt()
        if await _wait_shielded(job, kill_after):
            return "interrupted"
    job.kill()
    await _wait_shielded(job, None)
    return "killed"


async def _wait_shielded(job: Job[object], timeout: float | None) -> bool:
    """Wait up to `timeout` seconds (None: for ever) for the job; True if it ended.

    Shielded from the caller's cancellation, which is being handled. Plain asyncio's
    ``Task.cancel()`` gets through anyio shields; such a cancel is absorbed here, as
    asyncio would coalesce it with the one being handled.
    """
    end = math.inf if timeout is None else anyio.current_time() + timeout
    with anyio.CancelScope(shield=True):
        while True:
            try:
                with anyio.CancelScope(deadline=end):
                    await job.wait()
                    return True
            except anyio.get_cancelled_exc_class():
                pass
            if anyio.current_time() >= end:
                return False
    raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see the loop
