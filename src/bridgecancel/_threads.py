"""`run_sync`: anyio's worker threads, with the caller's cancellation reaching the worker.

The thread itself is always started by ``anyio.to_thread.run_sync``, so everything anyio
sets up in a worker (``anyio.from_thread.*``, the limiter, contextvars, no current async
library) stays as it is. What differs per backend is how the caller learns that it was
cancelled while the thread runs, since anyio's shielded wait does not say:

* asyncio: the thread runs with ``abandon_on_cancel=True`` behind our own hold on the
  limiter, so the cancellation arrives as an exception; we fire the token and wait for
  the job ourselves under a shield.
* trio: the thread runs with ``abandon_on_cancel=False`` (so ``from_thread.run`` keeps
  running inside the caller's cancel scopes) and a watcher task blocks in
  ``trio.lowlevel.wait_task_rescheduled``; trio calls its abort hook the moment the
  caller's scope is cancelled, and the hook fires the token.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from ._bridge import (
    CALLER_CANCELLED,
    on_trio,
    redeliver_asyncio_cancel,
    source_for_caller,
)
from ._exceptions import Cancelled
from ._interrupt import RETRY_INTERVAL, JobGuard
from ._stats import Outcome, counters, log_cancelled
from ._token import CancelSource, _current

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:  # pragma: no cover - exercised on 3.10 only
    from typing_extensions import TypeVarTuple, Unpack

__all__ = ("run_sync",)

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

# Job states.
_QUEUED: Final = 0
_RUNNING: Final = 1
_DONE: Final = 2
_DROPPED: Final = 3  # the caller left before the job started: it never will


class _Unlimited:
    """A limiter that never waits: the real limiter is held by the caller instead."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    # trio.to_thread.run_sync takes any "CapacityLimiter-like" object with these two.
    async def acquire_on_behalf_of(self, borrower: object) -> None:
        return None

    def release_on_behalf_of(self, borrower: object) -> None:
        return None


_UNLIMITED: Final[Any] = _Unlimited()


class _ThreadJob:
    """One call's job: runs in the worker thread, tells the caller when it is done."""

    __slots__ = (
        "abandoned",
        "args",
        "done",
        "exception",
        "func",
        "guard",
        "interrupt_after",
        "lock",
        "on_done",
        "result",
        "source",
        "state",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        source: CancelSource,
        interrupt_after: float | None = None,
    ) -> None:
        self.func = func
        self.args = args
        self.source = source
        self.lock = threading.Lock()
        self.state = _QUEUED
        self.result: Any = None
        self.exception: BaseException | None = None
        self.on_done: Callable[[], object] | None = None
        self.abandoned = False
        # Escalation, only when asked for: set up here so the hot path pays nothing.
        self.interrupt_after = interrupt_after
        self.guard: JobGuard | None = None
        self.done: threading.Event | None = None
        if interrupt_after is not None:
            self.guard = JobGuard(source.token)
            self.done = threading.Event()
            source.token.on_cancel(self._start_interrupter)

    def _start_interrupter(self) -> None:
        threading.Thread(
            target=self._interrupt_until_done, name="bridgecancel interrupter", daemon=True
        ).start()

    def _interrupt_until_done(self) -> None:
        """After `interrupt_after` seconds, raise `Cancelled` in the job until it ends.

        Runs in its own short-lived thread, started only when the token fires, so that
        escalation works the same on every backend and costs nothing otherwise. The
        guard never lets an interrupt reach the wrapper or a later job on this thread;
        it is retried every RETRY_INTERVAL in case the job swallowed the first one.
        """
        done, guard = self.done, self.guard
        assert done is not None
        assert guard is not None
        if done.wait(self.interrupt_after):
            return
        while not done.is_set():
            guard.interrupt()
            done.wait(RETRY_INTERVAL)

    def run(self) -> Any:
        """The worker thread's side: never start a cancelled job; record how it ended."""
        token = self.source._token
        with self.lock:
            if self.state == _DROPPED:
                return None
            self.state = _RUNNING
        if token._fired:
            self._finish(None, Cancelled._create(token, token._reason), started=False)
            raise Cancelled._create(token, token._reason)
        counters.started("threads")
        _current.set(token)
        try:
            guard = self.guard
            result = self.func(*self.args) if guard is None else guard.run(self.func, *self.args)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(
                    f"{_name(self.func)} returned a coroutine: it is async, so await it "
                    "directly instead of passing it to run_sync()"
                )
        except BaseException as exc:
            self._finish(None, exc)
            raise
        self._finish(result, None)
        return result

    def _finish(
        self, result: Any, exception: BaseException | None, *, started: bool = True
    ) -> None:
        with self.lock:
            self.state = _DONE
            self.result = result
            self.exception = exception
            on_done = self.on_done
        if self.done is not None:
            self.done.set()
        if started:
            token = self.source._token
            outcome: Outcome
            if not token._fired:
                outcome = "completed"
            elif self.guard is not None and self.guard.interrupted:
                outcome = "interrupted"
            elif self.abandoned:
                outcome = "abandoned"
            else:
                outcome = "cooperative"
            counters.finished("threads", outcome)
            if outcome != "completed":
                log_cancelled("threads", outcome, self.func, token._reason)
        if on_done is not None:
            on_done()

    def drop_if_queued(self) -> bool:
        """Make sure a job that has not started never will; True if it had not."""
        with self.lock:
            if self.state == _QUEUED:
                self.state = _DROPPED
                if self.done is not None:
                    self.done.set()
                return True
            return False

    def ended_by_own_token(self) -> bool:
        exception = self.exception
        return isinstance(exception, Cancelled) and exception.token is self.source._token


def _name(func: object) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _check_func(func: object) -> None:
    if not callable(func):
        raise TypeError(f"run_sync() needs a callable to run in a thread, got {func!r}")
    if inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{_name(func)} is an async function: await it directly instead of "
            "passing it to run_sync()"
        )


async def run_sync(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: Unpack[PosArgsT],
    abandon_on_cancel: bool = False,
    cancellable: bool | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> T:
    """Call ``func(*args)`` in a worker thread; its token fires if the caller is cancelled.

    A drop-in for `anyio.to_thread.run_sync`: same arguments and behaviour, and
    ``anyio.from_thread`` works inside the worker. In addition, `current_token()` in the
    worker fires the moment the calling task is cancelled (by its cancel scope, a
    deadline, a failing task group or nursery, ``asyncio.timeout`` or
    ``Task.cancel()``), and carries the caller's effective deadline.

    The call returns only when the worker has finished, unless `abandon_on_cancel` is
    true. If the worker raises `Cancelled` for this token, the caller sees its native
    cancellation. If the worker returns normally after the cancel, its result is
    returned and the cancellation is delivered at the caller's next checkpoint. A job
    cancelled while waiting for the limiter never starts.

    Args:
        func: a synchronous callable.
        args: positional arguments for `func`.
        abandon_on_cancel: on cancel, fire the token and return at once, leaving the
            thread to finish on its own (its result is then discarded).
        cancellable: deprecated alias of `abandon_on_cancel`, as in anyio.
        limiter: the capacity limiter bounding concurrent threads; anyio's default
            thread limiter if omitted.
        interrupt_after: if the worker has not finished this many seconds after its
            token fired, raise `Cancelled` inside it at its next Python bytecode (so
            ``finally`` blocks run), retried every 10 ms if swallowed; never delivered
            after the job ended nor into a later job on the same thread. C calls are not
            interrupted: use `bridgecancel.blocking` or `CancelToken.on_cancel` there.
            Off (None) by default.

    Raises:
        TypeError: if `func` is not callable, or is (or returns) a coroutine.
        ValueError: if `interrupt_after` is negative or NaN.
    """
    _check_func(func)
    if interrupt_after is not None:
        interrupt_after = _check_interrupt_after(interrupt_after)
    if cancellable is not None:
        abandon_on_cancel = cancellable
        warnings.warn(
            "The `cancellable=` keyword argument is deprecated (as in anyio 4.1); "
            "use `abandon_on_cancel=` instead",
            DeprecationWarning,
            stacklevel=2,
        )
    job = _ThreadJob(func, args, source_for_caller(), interrupt_after)
    try:
        result: T
        if abandon_on_cancel:
            result = await _run_abandoning(job, limiter)
        elif on_trio():
            result = await _run_on_trio(job, limiter)
        else:
            result = await _run_on_asyncio(job, limiter)
        return result
    finally:
        job.drop_if_queued()  # a job the caller left before it started never runs
        job.source.close()


def _check_interrupt_after(seconds: object) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"interrupt_after must be a number of seconds or None, got {seconds!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(
            f"interrupt_after must be a non-negative number of seconds, got {seconds}; "
            "pass None to never interrupt"
        )
    return float(seconds)


async def _run_abandoning(job: _ThreadJob, limiter: anyio.CapacityLimiter | None) -> Any:
    try:
        return await anyio.to_thread.run_sync(job.run, abandon_on_cancel=True, limiter=limiter)
    except anyio.get_cancelled_exc_class():
        with job.lock:
            job.abandoned = True
        job.drop_if_queued()
        job.source.cancel(CALLER_CANCELLED)
        raise
    except Cancelled:
        if job.ended_by_own_token():
            await anyio.sleep_forever()
        raise


# -- asyncio ------------------------------------------------------------------------


async def _run_on_asyncio(job: _ThreadJob, limiter: anyio.CapacityLimiter | None) -> Any:
    async with limiter or anyio.to_thread.current_default_thread_limiter():
        try:
            return await anyio.to_thread.run_sync(
                job.run, abandon_on_cancel=True, limiter=_UNLIMITED
            )
        except asyncio.CancelledError as exc:
            if job.exception is exc:  # the worker itself raised CancelledError
                raise
            cancelled = exc
        except Cancelled:
            if job.ended_by_own_token():
                # The token's deadline fired before the loop noticed the scope's:
                # report it as that scope's cancellation.
                await anyio.sleep_forever()
            raise
        # The caller was cancelled while the job was queued or running.
        job.source.cancel(CALLER_CANCELLED)
        if job.drop_if_queued():
            raise cancelled
        await _wait_done_asyncio(job)
    return _deliver_after_cancel(job, cancelled)


async def _wait_done_asyncio(job: _ThreadJob) -> None:
    """Wait for the job under a shield, absorbing repeated native cancellations."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_set_done, done)
        except RuntimeError:  # pragma: no cover - the loop closed under us
            pass

    with job.lock:
        finished = job.state == _DONE
        if not finished:
            job.on_done = wake
    if finished:
        return
    with anyio.CancelScope(shield=True):
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                # A native Task.cancel() got through the shield; the job still runs,
                # and the cancellation is already being handled.
                continue


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _deliver_after_cancel(job: _ThreadJob, cancelled: BaseException) -> Any:
    """Hand over what the job produced after its caller was cancelled (asyncio)."""
    exception = job.exception
    if job.ended_by_own_token():
        raise cancelled
    redeliver_asyncio_cancel(cancelled)
    if exception is not None:
        raise exception
    return job.result


# -- trio ---------------------------------------------------------------------------


class _TrioWatcher:
    """A task that sleeps in the caller's cancel scopes and fires the token on cancel."""

    __slots__ = ("job", "stopped", "task")

    def __init__(self, job: _ThreadJob) -> None:
        self.job = job
        self.task: Any = None
        self.stopped = False

    async def watch(self) -> None:
        if self.stopped:
            return
        lowlevel = sys.modules["trio"].lowlevel
        self.task = lowlevel.current_task()
        source = self.job.source

        def abort(raise_cancel: object) -> Any:
            source.cancel(CALLER_CANCELLED)
            # Stay blocked: stop() wakes this task once the job is done, so that a
            # result the worker returns after the cancel is not lost.
            return lowlevel.Abort.FAILED

        await lowlevel.wait_task_rescheduled(abort)

    def stop(self) -> None:
        self.stopped = True
        if self.task is not None:
            sys.modules["trio"].lowlevel.reschedule(self.task)


async def _run_on_trio(job: _ThreadJob, limiter: anyio.CapacityLimiter | None) -> Any:
    trio = sys.modules["trio"]
    watcher = _TrioWatcher(job)
    failure: BaseException | None = None
    try:
        # The limiter is held here, before the watcher exists, so that queued jobs
        # cost one limiter wait each and leave at once when cancelled. The nursery only
        # hosts the watcher; the job's exception is raised once it has closed, so that
        # it reaches the caller as itself, not wrapped in a group.
        async with (
            limiter or anyio.to_thread.current_default_thread_limiter(),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(watcher.watch)
            try:
                result = await anyio.to_thread.run_sync(job.run, limiter=_UNLIMITED)
            except BaseException as exc:
                failure = exc
            watcher.stop()
        if failure is None:
            return result
        if job.ended_by_own_token():
            # Cancelled because the caller was, or its deadline passed: give the
            # caller trio's own Cancelled instead.
            await anyio.sleep_forever()
        raise failure
    finally:
        del failure  # no cycle through this frame's traceback
