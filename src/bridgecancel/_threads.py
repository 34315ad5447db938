"""`run_sync`: anyio's worker threads, with the caller's cancellation reaching the worker.

This module holds the thread job (what runs in the worker thread, and the `_supervise.Job`
the caller sees) and how it is run on each backend; `_supervise` decides what a
cancellation does to it. The thread itself is always started by
``anyio.to_thread.run_sync``, so everything anyio sets up in a worker
(``anyio.from_thread.*``, contextvars, no current async library) stays as it is. The
caller holds the limiter itself, with the job as borrower (so a nested call from
``from_thread.run`` borrows a token of its own, as in anyio). What differs per backend is
how the caller learns that it was cancelled while the thread runs, since anyio's shielded
wait does not say:

* asyncio: the thread runs with ``abandon_on_cancel=True``, so the cancellation arrives
  as an exception; the supervisor then fires the token and waits for the job.
* trio: the thread runs with ``abandon_on_cancel=False`` (so ``from_thread.run`` keeps
  running inside the caller's cancel scopes) and a watcher task blocks in
  ``trio.lowlevel.wait_task_rescheduled`` (`_backend.park_trio_task`); trio calls its abort
  hook the moment the caller's scope is cancelled, and the hook fires the token.

The trio and asyncio calls themselves are `_backend`'s; this module only composes them.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import anyio
import anyio.to_thread

from . import _supervise as supervise
from ._backend import (
    new_cancel_scope,
    on_trio,
    park_trio_task,
    source_for_caller,
    spawn_system_task,
    threadsafe_caller,
)
from ._supervise import INTERRUPT_RETRY, Job, JobKind, JobState, Outcome, check_call
from ._tokens import Cancelled, CancelSource, _current
from ._util import PosArgsT, Unpack, describe

if TYPE_CHECKING:
    from ._interrupt import JobGuard

__all__ = ("run_sync",)

T = TypeVar("T")


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
    ``anyio.from_thread`` works inside the worker (including nested `run_sync` calls).
    In addition, `current_token()` in the worker fires the moment the calling task is
    cancelled (by its cancel scope, a deadline, a failing task group or nursery,
    ``asyncio.timeout`` or ``Task.cancel()``). The token's ``deadline`` is the caller's
    effective deadline when the call began, for information (to pass on as a socket or
    query timeout): the token fires when the caller's scope is cancelled, never by itself,
    so a deadline the caller pushes back later does not stop the job.

    The token is fired from the event loop thread, but its ``on_cancel`` callbacks then
    run in another thread, so they never block the loop, and their errors go to
    ``sys.unraisablehook``; waiters (``token.wait()``, ``bridgecancel.blocking``) wake at
    once all the same.

    The call returns only when the worker has finished, unless `abandon_on_cancel` is
    true. If the worker raises `Cancelled` for this token, the caller sees its native
    cancellation. If the worker returns normally after the cancel, its result is
    returned and the cancellation is delivered at the caller's next checkpoint (under
    plain asyncio, which would not deliver it again, a cancellation still standing is
    raised as ``CancelledError`` once the worker has finished: see the structured
    cancellation page of the docs). A job cancelled while waiting for the limiter never
    starts.

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
        TypeError: if `func` is not a sync callable (an async function, an async
            generator function, or returns a coroutine), or `limiter` is not an
            ``anyio.CapacityLimiter``.
        ValueError: if `interrupt_after` is negative or NaN.
    """
    interrupt_after, _ = check_call("run_sync", func, limiter, interrupt_after=interrupt_after)
    if cancellable is not None:
        abandon_on_cancel = cancellable
        warnings.warn(
            "The `cancellable=` keyword argument is deprecated (as in anyio 4.1); "
            "use `abandon_on_cancel=` instead",
            DeprecationWarning,
            stacklevel=2,
        )
    trio_task = on_trio()
    job = ThreadJob(func, args, source_for_caller(trio_task), interrupt_after)
    try:
        result: T
        if job.source._token.cancel_called:  # the caller is cancelled already
            await anyio.sleep_forever()  # its own cancellation, at once; the job never starts
        if abandon_on_cancel:
            result = await _run_abandoning(job, limiter)
        elif trio_task:
            result = await _run_on_trio(job, limiter or _default_limiter())
        else:
            result = await _run_on_asyncio(job, limiter or _default_limiter())
        return result
    finally:
        _drop_if_queued(job)
        job.source.close()


_default_limiter: Final = anyio.to_thread.current_default_thread_limiter


def _drop_if_queued(job: ThreadJob) -> None:
    """The caller leaves: a job no worker has taken never runs (counted never_started)."""
    if job.drop_if_queued():
        supervise.record(job)


async def _run_abandoning(job: ThreadJob, limiter: anyio.CapacityLimiter | None) -> Any:
    try:
        await anyio.to_thread.run_sync(job.run, abandon_on_cancel=True, limiter=limiter)
    except anyio.get_cancelled_exc_class() as exc:
        if job.exception is exc:  # the worker itself raised the backend's cancellation
            return await supervise.deliver(job)
        if job.drop_if_queued():
            supervise.record(job)
        else:
            supervise.abandon(job, exc)
        raise
    except BaseException as exc:
        if not _raised_by_job(job, exc):
            _record_if_ended(job)
            raise
    return await supervise.deliver(job)


def _raised_by_job(job: ThreadJob, exc: BaseException) -> bool:
    """Whether `exc` is what the job raised, rather than anyio's own error (or anyio's
    form of the job's), which the caller raises as it is."""
    return job.exception is exc


def _record_if_ended(job: ThreadJob) -> None:
    """Count a job that ended, when anyio's error is raised rather than its outcome."""
    if job.state is _FINISHED or job.state is _DROPPED:
        supervise.record(job)


async def _acquire(job: ThreadJob, limiter: anyio.CapacityLimiter) -> None:
    """Borrow a token for the job: at once if one is free, else wait in line."""
    try:
        limiter.acquire_on_behalf_of_nowait(job)
    except anyio.WouldBlock:
        await limiter.acquire_on_behalf_of(job)


# -- asyncio -------------------------------------------------------------------------------


async def _run_on_asyncio(job: ThreadJob, limiter: anyio.CapacityLimiter) -> Any:
    await _acquire(job, limiter)
    try:
        try:
            value = await anyio.to_thread.run_sync(
                job.run, abandon_on_cancel=True, limiter=UNLIMITED
            )
        except anyio.get_cancelled_exc_class() as exc:
            if job.exception is exc:  # the worker itself raised CancelledError
                return await supervise.deliver(job)
            # The caller was cancelled while the job was queued or running.
            job.drop_if_queued()
            return await supervise.deliver_cancelled(job, exc)
        except BaseException as exc:
            if not _raised_by_job(job, exc):
                _record_if_ended(job)
                raise
            return await supervise.deliver(job)
        supervise.record(job)
        return value
    finally:
        limiter.release_on_behalf_of(job)


# -- trio ----------------------------------------------------------------------------------


class _TrioCall:
    """One thread call on trio, hosted by a system task while the caller waits.

    The caller is parked (`_backend.park_trio_task`); trio calls its abort hook the moment
    the caller's scope is cancelled. The hook cancels the host's scope (so
    ``from_thread.run`` and ``from_thread.check_cancelled()`` in the worker see the
    cancellation, as they would in the caller's scopes), fires the token, starts the
    escalation if asked for, and declines the abort: the caller waits on until the job
    has ended, so that a result returned after the cancel is kept. This costs one task
    and no nursery per call.
    """

    __slots__ = ("failure", "job", "scope")

    def __init__(self, job: ThreadJob) -> None:
        self.job = job
        self.scope = new_cancel_scope(trio_task=True)
        self.failure: BaseException | None = None

    async def run(self) -> Any:
        await park_trio_task(self._host, self._abort)
        failure, self.failure = self.failure, None
        if failure is not None:
            try:
                raise failure
            finally:
                del failure  # no cycle through this frame's traceback
        job = self.job
        if job.state is _DROPPED:  # the host's scope was cancelled before the thread
            supervise.record(job)  # started: the caller's own cancellation, at once
            await anyio.sleep_forever()
        if job.stopped_by_cancel:
            return await supervise.deliver(job)  # the caller's own cancellation
        supervise.record(job)
        return job.result()

    def _abort(self, cancelled: BaseException) -> None:
        job = self.job
        reason = supervise.cancel_reason(job, cancelled)
        self.scope.cancel(reason)  # trio tells the worker's thread call at once, synchronously
        job.fire(reason)
        if job.interrupt_after is not None:
            spawn_system_task(_escalate_shielded, job)

    async def _host(self) -> None:
        job = self.job
        try:
            with self.scope:
                await anyio.to_thread.run_sync(job.run, limiter=UNLIMITED)
        except BaseException as exc:  # a system task must not raise: hand it over
            if not _raised_by_job(job, exc):
                _record_if_ended(job)
                self.failure = exc
        finally:
            job.drop_if_queued()  # the scope was cancelled before it reached a thread


async def _escalate_shielded(job: ThreadJob) -> None:
    with anyio.CancelScope(shield=True):
        await supervise.escalate(job)


async def _run_on_trio(job: ThreadJob, limiter: anyio.CapacityLimiter) -> Any:
    await _acquire(job, limiter)
    try:
        return await _TrioCall(job).run()
    finally:
        limiter.release_on_behalf_of(job)


# -- the thread job ------------------------------------------------------------------------


def thread_name(func: object) -> str:
    """``bridgecancel: module.qualname``: a worker thread's name while it runs `func`.

    Never the name of whatever started the thread (trio names a thread after its caller's
    task, which is bridgecancel's private host task here). A partial is named after its
    function, an object with no ``__qualname__`` after its class.
    """
    while isinstance(func, functools.partial):
        func = func.func
    named = func if hasattr(func, "__qualname__") else type(func)
    qualname = getattr(named, "__qualname__", "?")
    module = getattr(named, "__module__", None)
    return f"bridgecancel: {module}.{qualname}" if module else f"bridgecancel: {qualname}"


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


UNLIMITED: Final[Any] = _Unlimited()

_QUEUED: Final = JobState.QUEUED
_RUNNING: Final = JobState.RUNNING
_FINISHED: Final = JobState.FINISHED
_DROPPED: Final = JobState.DROPPED


class ThreadJob(Job):
    """One call's job: runs in a worker thread; the `_supervise.Job` of a thread."""

    kind: ClassVar[JobKind] = "threads"

    __slots__ = (
        "_claim",
        "_event",
        "_wake",
        "args",
        "ended_event",
        "exception",
        "guard",
        "source",
        "value",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        source: CancelSource,
        interrupt_after: float | None,
    ) -> None:
        super().__init__(func, source._token._deadline, interrupt_after)
        self.args = args
        self.source = source
        # Whoever pops this first decides: the worker (the job starts) or the caller
        # (it never will). list.pop() is atomic, so the hot path takes no lock.
        self._claim = [None]
        self.value: Any = None
        self.exception: BaseException | None = None
        # Set by `wait`: called (from the worker thread) once the job has ended.
        self._wake: Callable[[], object] | None = None
        self._event: anyio.Event | None = None
        # Escalation, only when asked for: set up here so the hot path pays nothing.
        self.guard: JobGuard | None = None
        self.ended_event: threading.Event | None = None  # for the interrupter thread
        if interrupt_after is not None:
            from ._interrupt import JobGuard  # ctypes, loaded only by those who use it

            self.guard = JobGuard(source.token)
            self.ended_event = threading.Event()

    # -- the worker thread's side -----------------------------------------------------

    def run(self) -> Any:
        """Run the job unless the caller dropped it or its token already fired."""
        try:
            self._claim.pop()
        except IndexError:
            return None  # dropped: the caller has left
        token = self.source._token
        if token.cancel_called:  # cancelled before it began: it never does
            cancelled = Cancelled._create(token, token._reason)
            self._end(_DROPPED, None, cancelled)
            raise cancelled
        self.move(_RUNNING)
        _current.set(token)
        func = self.func
        # Named after the job while it runs (what logging's threadName, faulthandler and
        # debuggers show), then given back its pool's own name before the caller can
        # learn that the job ended, so an idle pooled thread looks idle at once.
        thread = threading.current_thread()
        pool_name = thread.name
        thread.name = thread_name(func)
        try:
            guard = self.guard
            value = func(*self.args) if guard is None else guard.run(func, *self.args)
            if inspect.iscoroutine(value):
                value.close()
                raise TypeError(
                    f"{describe(func)} returned a coroutine: it is async, so await it "
                    "directly instead of passing it to run_sync()"
                )
        except BaseException as exc:
            thread.name = pool_name
            self._end(_FINISHED, None, exc)
            raise
        thread.name = pool_name
        self._end(_FINISHED, value, None)
        return value

    def _end(self, state: JobState, value: Any, exception: BaseException | None) -> None:
        self.value = value
        self.exception = exception
        self.move(state)
        self._announce_end()

    def _announce_end(self) -> None:
        if self.ended_event is not None:
            self.ended_event.set()
        wake = self._wake  # read after the state is set: see wait()
        if wake is not None:
            wake()

    # -- the caller's side: `_supervise.Job` ----------------------------------------------

    def drop_if_queued(self) -> bool:
        """Make sure a job that has not started never will; True if this call did it."""
        claim = self._claim
        if not claim:  # taken already (the usual case: no exception on the hot path)
            return False
        try:
            claim.pop()
        except IndexError:  # the worker took it just now
            return False
        self.move(_DROPPED)
        self._announce_end()
        return True

    def _cancel(self, reason: str) -> None:
        self.source._cancel_detached(reason)

    async def wait(self, *, until_started: bool = False) -> None:
        if self.ended or (until_started and self.began):
            return
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
            self._wake = functools.partial(threadsafe_caller(), event.set)
            if self.ended:  # it ended before it could see _wake
                event.set()
        await event.wait()

    def interrupt(self) -> None:
        threading.Thread(
            target=self._interrupt_until_ended, name="bridgecancel interrupter", daemon=True
        ).start()

    def _interrupt_until_ended(self) -> None:
        """Raise `Cancelled` in the job, again every INTERRUPT_RETRY if it swallows it."""
        ended, guard = self.ended_event, self.guard
        assert ended is not None
        assert guard is not None
        while not ended.is_set():
            guard.interrupt()
            ended.wait(INTERRUPT_RETRY)

    def outcome(self) -> Outcome:
        if not self.began:
            return "never_started"
        if self.guard is not None and self.guard.interrupted:
            return "interrupted"
        if self.source._token.cancel_called:
            return "cooperative"
        return "completed"

    @property
    def stopped_by_cancel(self) -> bool:
        exception = self.exception
        return isinstance(exception, Cancelled) and exception.token is self.source._token

    def result(self) -> Any:
        if self.exception is not None:
            raise self.exception
        return self.value
