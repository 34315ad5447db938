"""`ThreadPoolExecutor`: a ``concurrent.futures`` thread pool whose jobs see their own token.

Standard library only, like the tokens: sync code and asyncio's default executor use it
with no anyio loaded. The facade loads it on first use all the same, because
``concurrent.futures`` loads ``logging``, which a worker process has no use for.

It stays the base class: every job goes through the base class's ``submit``, so the
queue, the threads, ``shutdown``, ``map``, ``BrokenThreadPool`` and the future's states
are the base class's own, on every Python version. What it adds:

* each call is wrapped in a `_Job`, whose ``run`` (in the worker thread) makes the
  job's `CancelSource` and makes its token current while the function runs, in the
  context the function runs in (asyncio's, for ``asyncio.to_thread``);
* the future ``submit`` returns is a `JobFuture`, whose ``cancel()`` also fires the token
  of a job that is running;
* ``shutdown(cancel_futures=True)`` fires the token of every job that has not ended.

Executor jobs are not structured (nothing waits for the thread), so they are not
counted in `bridgecancel.statistics()`, which describes the structured jobs of
`run_sync` and `run_process` (and lives on the anyio side, which this module must not
import).
"""

from __future__ import annotations

import concurrent.futures
import functools
import types
from collections.abc import Callable
from contextvars import Context
from typing import Any, Final, ParamSpec, TypeVar

from ._tokens import CancelSource, CancelToken, _current

__all__ = ("EXECUTOR_SHUTDOWN", "FUTURE_CANCELLED", "JobFuture", "ThreadPoolExecutor")

P = ParamSpec("P")
T = TypeVar("T")

# The reasons an executor job's token carries. (asyncio hands a task's cancel message to
# the asyncio future the task awaits, but cancels the concurrent future under it with a
# bare ``cancel()``, which takes no message on any Python version: a job run through
# ``asyncio.to_thread`` or ``run_in_executor`` gets FUTURE_CANCELLED.)
FUTURE_CANCELLED: Final = "the future was cancelled"
"""A job's token, fired by ``future.cancel()`` (asyncio's too, for an awaiting task)."""

EXECUTOR_SHUTDOWN: Final = "the executor is shutting down"
"""A job's token, fired by ``shutdown(cancel_futures=True)``."""


class _Jobs:
    """What an executor's jobs share: the running ones, and whether they must stop."""

    __slots__ = ("running", "stopping")

    def __init__(self) -> None:
        # A dict, whose single operations are atomic, rather than a lock every job would
        # take twice.
        self.running: dict[_Job, None] = {}
        self.stopping: str | None = None  # the reason, once shutdown(cancel_futures=True)


class _Job:
    """One call submitted to the executor, run by the base class's worker as
    ``job.run(fn, args, kwargs)``.

    The job's source is made in the worker, when the job begins (a job cancelled while
    queued never needs one). A cancel that comes before then is kept as `reason`, and
    `run` fires it once the source exists. Neither side takes a lock: each publishes
    before it looks at the other's field, so at least one of them fires the token. (The
    same goes for `_Jobs.stopping` and `_Jobs.running`.)

    The job outlives its run (its future keeps it, for ``cancel()``), so it never holds
    the call: that travels in the base class's work item, which drops it after the run,
    as for the base class's own jobs.
    """

    __slots__ = ("ended", "jobs", "reason", "source")

    def __init__(self, jobs: _Jobs) -> None:
        self.jobs = jobs
        self.source: CancelSource | None = None
        self.reason: str | None = None
        self.ended = False

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``fn(*args, **kwargs)`` with the job's token current (in the worker).

        The base class calls this only once the future is running: a job cancelled
        while queued never gets here.
        """
        jobs = self.jobs
        running = jobs.running
        running[self] = None
        source = self.source = CancelSource()
        # After publishing the source and the job: see the class docstring.
        reason = self.reason or jobs.stopping
        if reason is not None:
            source._cancel_detached(reason)
        token = source._token
        try:
            if type(fn) is _PARTIAL and _is_context_run(fn.func):
                # asyncio.to_thread submits partial(ctx.run, func, *args): the function
                # runs in `ctx`, a copy of the caller's context, so the token is made
                # current in there, and only for the call (a context of the caller's own,
                # submitted the same way, is left as it was).
                return fn.func(
                    _call_with_token, token, *fn.args, *args, **{**fn.keywords, **kwargs}
                )
            if _is_context_run(fn):  # submit(ctx.run, func, *args)
                return fn(_call_with_token, token, *args, **kwargs)
            reset = _current.set(token)
            try:
                return fn(*args, **kwargs)
            finally:
                _current.reset(reset)
        finally:
            self.ended = True
            running.pop(self, None)

    def fire(self, reason: str) -> None:
        """Tell the job to stop: fire its token now, or as it begins if it has not.

        User callbacks (``on_cancel``) run in bridgecancel's callback thread, never in
        the caller, which may be an event loop (asyncio cancels the future from its
        loop), ``shutdown`` or ``map``; so this never raises and never blocks.
        """
        if self.ended:  # its token is nobody's business any more
            return
        if self.reason is None:
            self.reason = reason
        source = self.source  # after publishing the reason: see the class docstring
        if source is not None:
            source._cancel_detached(reason)


_PARTIAL: Final = functools.partial
_BUILTIN_METHOD: Final = types.BuiltinMethodType


def _is_context_run(fn: object) -> bool:
    """Whether `fn` is the ``run`` method of a `contextvars.Context`."""
    return (
        type(fn) is _BUILTIN_METHOD
        and type(fn.__self__) is Context
        and fn.__name__ == "run"
    )


def _call_with_token(token: CancelToken, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with `token` current, in the context it is called in."""
    reset = _current.set(token)
    try:
        return fn(*args, **kwargs)
    finally:
        _current.reset(reset)


class JobFuture(concurrent.futures.Future[T]):
    """The future of a `ThreadPoolExecutor` job: `cancel` also tells a running job to stop.

    The base class's ``submit`` makes the future (so the base class's queue, shutdown and
    broken-pool handling keep it as their own), and `ThreadPoolExecutor.submit` then
    gives it this class, which adds only `cancel`. A second future per job, made here
    and mirrored from the base class's, would cost each job another future's condition,
    state changes and wake-up.
    """

    _bridgecancel_job: _Job

    def cancel(self) -> bool:
        """Cancel the job, as ``concurrent.futures.Future.cancel`` does, and more.

        A job still queued is cancelled and never runs: True. A running job cannot be
        cancelled (False, and it keeps running), but its token fires, with the reason
        ``"the future was cancelled"``, so that a job that watches its token stops.
        A job that has ended: False, and nothing happens.
        """
        if super().cancel():
            return True
        self._bridgecancel_job.fire(FUTURE_CANCELLED)
        return False


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A `concurrent.futures.ThreadPoolExecutor` whose jobs see their own token.

    The same constructor and behaviour as the base class, and in addition:

    * inside each job, `current_token()` is that job's own token (so
      `check_cancelled()`, `CancelToken.wait` and the `bridgecancel.blocking` waits
      work there as in `run_sync`), also in the copy of the caller's context that
      ``asyncio.to_thread`` runs the function in;
    * ``future.cancel()`` on a running job fires its token (reason ``"the future was
      cancelled"``) and returns False, as the ``Future`` contract says: the job still
      runs, now told to stop. On a queued job it returns True and the job never runs;
    * ``shutdown(cancel_futures=True)`` also fires the token of every running job
      (reason ``"the executor is shutting down"``);
    * set as an event loop's default executor
      (``loop.set_default_executor(bridgecancel.ThreadPoolExecutor())``), it makes every
      ``asyncio.to_thread()`` and ``loop.run_in_executor(None, ...)`` job's token fire
      when the task awaiting it is cancelled: asyncio cancels the future it waits on.

    Not structured: asyncio does not wait for the thread, so the awaiting task is
    cancelled at once while the job stops in its own time (`run_sync` waits for it).
    The token's ``on_cancel`` callbacks run in bridgecancel's callback thread, never in
    the canceller's (an event loop's, say); their errors go to ``sys.unraisablehook``.
    An exception in a job, a job that ignores its token, ``submit`` after shutdown,
    ``map`` (whose early exit cancels the rest, which now tells running ones to stop)
    and ``with executor:`` behave as in the base class. The jobs are not counted in
    `statistics()`.

    Args:
        max_workers: the most threads it runs at once (None: the base class's default).
        thread_name_prefix: the start of its threads' names.
        initializer: called with `initargs` at the start of each worker thread; if it
            raises, the pool is broken (``BrokenThreadPool``), as in the base class.
        initargs: the arguments of `initializer`.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)
        # Shared with the jobs, which never hold the executor (as the base class's
        # workers hold it only weakly, so that a dropped executor ends its threads).
        self._bridgecancel_jobs = _Jobs()

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; inside it, `current_token()` is its token.

        Returns:
            the job's future; its ``cancel()`` also fires the token of a running job.

        Raises:
            RuntimeError: after ``shutdown()``, as the base class does.
        """
        job = _Job(self._bridgecancel_jobs)
        future = super().submit(job.run, fn, args, kwargs)
        future._bridgecancel_job = job  # type: ignore[attr-defined]
        # The job may be running already: it needs nothing from its future. A shutdown
        # that cancelled it meanwhile did so as the base class would (it never runs).
        future.__class__ = JobFuture
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down as the base class does; with `cancel_futures`, also fire the token
        of every job that is running, so that each stops if it watches its token.

        Queued jobs are cancelled and never run (the base class's behaviour); with
        `wait` (the default) this returns once every worker thread has exited.
        """
        if not cancel_futures:
            super().shutdown(wait)
            return
        # The base class first: once it returns, nothing is queued (it cancelled what
        # was) and nothing new is accepted. A job that begins from now on sees
        # `stopping`; one that began before is in `running`.
        super().shutdown(wait=False, cancel_futures=True)
        jobs = self._bridgecancel_jobs
        jobs.stopping = EXECUTOR_SHUTDOWN
        for job in jobs.running.copy():  # copy(): one atomic step, as jobs come and go
            job.fire(EXECUTOR_SHUTDOWN)
        if wait:
            super().shutdown(wait=True)
