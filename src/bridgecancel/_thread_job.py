"""A thread job: what runs in the worker thread, and the `_supervise.Job` the caller sees.

`_threads` starts it on anyio's worker threads; this module says how it starts, ends,
is dropped before it starts, and is signalled (its token fired, `Cancelled` raised in it).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._bridge import threadsafe_caller
from ._describe import describe
from ._exceptions import Cancelled
from ._stats import Outcome, counters
from ._token import CancelSource
from ._token_current import _current

if TYPE_CHECKING:
    from ._interrupt import JobGuard

__all__ = ("DONE", "DROPPED", "UNLIMITED", "ThreadJob")

# Job states.
QUEUED: Final = 0
RUNNING: Final = 1
DONE: Final = 2
DROPPED: Final = 3  # the caller left before the job started: it never will


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


class ThreadJob:
    """One call's job: runs in a worker thread; the `_supervise.Job` of a thread."""

    kind: Final = "threads"
    kill_after: Final = None  # a thread cannot be killed

    __slots__ = (
        "_claim",
        "_event",
        "args",
        "began",
        "done",
        "exception",
        "func",
        "guard",
        "in_worker",
        "interrupt_after",
        "on_done",
        "source",
        "state",
        "value",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        source: CancelSource,
        interrupt_after: float | None,
    ) -> None:
        self.func = func
        self.args = args
        self.source = source
        # Whoever pops this first decides: the worker (the job starts) or the caller
        # (it never will). list.pop() is atomic, so the hot path takes no lock.
        self._claim = [None]
        self.state = QUEUED
        self.began = False
        self.in_worker = False
        self.value: Any = None
        self.exception: BaseException | None = None
        self.on_done: Callable[[], object] | None = None
        self._event: anyio.Event | None = None
        # Escalation, only when asked for: set up here so the hot path pays nothing.
        self.interrupt_after = interrupt_after
        self.guard: JobGuard | None = None
        self.done: threading.Event | None = None
        if interrupt_after is not None:
            from ._interrupt import JobGuard  # ctypes, loaded only by those who use it

            self.guard = JobGuard(source.token)
            self.done = threading.Event()

    # -- the worker thread's side -----------------------------------------------------

    def run(self) -> Any:
        """Run the job unless the caller dropped it or its token already fired."""
        try:
            self._claim.pop()
        except IndexError:
            return None  # dropped: the caller has left
        self.state = RUNNING
        self.in_worker = True
        counters.started("threads")
        token = self.source._token
        if token.cancel_called:  # cancelled before it began: it never does
            cancelled = Cancelled._create(token, token._reason)
            self._end(None, cancelled)
            raise cancelled
        self.began = True
        _current.set(token)
        try:
            guard = self.guard
            value = self.func(*self.args) if guard is None else guard.run(self.func, *self.args)
            if inspect.iscoroutine(value):
                value.close()
                raise TypeError(
                    f"{describe(self.func)} returned a coroutine: it is async, so await it "
                    "directly instead of passing it to run_sync()"
                )
        except BaseException as exc:
            self._end(None, exc)
            raise
        self._end(value, None)
        return value

    def _end(self, value: Any, exception: BaseException | None) -> None:
        self.value = value
        self.exception = exception
        self.state = DONE
        if self.done is not None:
            self.done.set()
        on_done = self.on_done  # read after the state is set: see wait()
        if on_done is not None:
            on_done()

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
        self.state = DROPPED
        if self.done is not None:
            self.done.set()
        if self.on_done is not None:
            self.on_done()
        return True

    @property
    def deadline(self) -> float:
        return self.source._token._deadline

    @property
    def started(self) -> bool:
        return self.began

    @property
    def ended(self) -> bool:
        return self.state >= DONE

    @property
    def reason(self) -> str | None:
        token = self.source._token
        return token._reason if token.cancel_called else None

    def fire(self, reason: str) -> None:
        self.source._cancel_detached(reason)

    async def wait(self, *, until_started: bool = False) -> None:
        if self.state >= DONE or (until_started and self.began):
            return
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
            self.on_done = functools.partial(threadsafe_caller(), event.set)
            if self.state >= DONE:  # it ended before it could see on_done
                event.set()
        await event.wait()

    def interrupt(self) -> None:
        threading.Thread(
            target=self._interrupt_until_done, name="bridgecancel interrupter", daemon=True
        ).start()

    def _interrupt_until_done(self) -> None:
        """Raise `Cancelled` in the job, again every RETRY_INTERVAL if it swallows it."""
        from ._interrupt import RETRY_INTERVAL

        done, guard = self.done, self.guard
        assert done is not None
        assert guard is not None
        while not done.is_set():
            guard.interrupt()
            done.wait(RETRY_INTERVAL)

    def kill(self) -> None:  # pragma: no cover - kill_after is None for threads
        raise NotImplementedError("worker threads cannot be killed")

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
