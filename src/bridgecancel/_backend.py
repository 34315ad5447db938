"""What differs between asyncio and trio, in one place: which backend runs the caller,
its deadline in `time.monotonic` terms, calling into its loop from any thread, the cheap
trio-only routes (trio's own cancel scopes, system tasks, parking a task), hearing that a
task has ended, and plain asyncio's cancellation requests.

Only anyio's public API is used, and trio's own public API where a trio-only route is
needed; trio is never imported here (it is read from ``sys.modules`` once a trio task is
running, so asyncio users never load it). No other module of the package touches trio's
or asyncio's own API for the caller's backend.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._tokens import (
    CALLER_CANCELLED,
    DEADLINE_REASON,
    CancelSource,
    informative_source,
)

if TYPE_CHECKING:
    import trio


def on_trio() -> bool:
    """True if the current thread runs a trio task (without importing trio to find out)."""
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_task())


def caller_deadline(trio_task: bool = False) -> float:
    """The calling task's effective deadline in `time.monotonic` terms.

    `trio_task`: the caller runs in trio (asks trio directly, which is cheaper).
    """
    if trio_task:
        trio = sys.modules["trio"]
        deadline: float = trio.current_effective_deadline()
        if deadline == math.inf or deadline == -math.inf:
            return deadline
        now: float = trio.current_time()
        return time.monotonic() + (deadline - now)
    deadline = anyio.current_effective_deadline()
    if deadline == math.inf or deadline == -math.inf:
        return deadline
    return time.monotonic() + (deadline - anyio.current_time())


def source_for_caller(trio_task: bool = False) -> CancelSource:
    """A source for a job or block: it carries the caller's effective deadline for
    information, and fires only when the caller's scope is cancelled (never by itself at
    that deadline, which the caller may push back later)."""
    deadline = caller_deadline(trio_task)
    if deadline == math.inf:
        return CancelSource()  # no deadline to report: the plain source is the same, cheaper
    if deadline == -math.inf:
        source = CancelSource()
        source.cancel(CALLER_CANCELLED)  # no callbacks yet: nothing runs here
        return source
    return informative_source(deadline)


def threadsafe_caller() -> Callable[[Callable[[], object]], None]:
    """A function that runs a callback in this event loop's thread, from any thread."""
    loop_thread = threading.get_ident()
    post: Callable[[Callable[[], object]], object]
    if on_trio():
        trio_token: trio.lowlevel.TrioToken = sys.modules["trio"].lowlevel.current_trio_token()
        post = trio_token.run_sync_soon
    else:
        post = asyncio.get_running_loop().call_soon_threadsafe

    def call_in_loop(fn: Callable[[], object]) -> None:
        if threading.get_ident() == loop_thread:
            fn()
            return
        try:
            post(fn)
        except RuntimeError:  # the run has finished, the loop closed: nothing to cancel
            pass

    return call_in_loop


# -- trio's own routes ---------------------------------------------------------------------


def new_cancel_scope(trio_task: bool) -> Any:
    """A cancel scope for this backend: trio's own if `trio_task` (anyio's wraps one and
    costs twice as much to enter), anyio's elsewhere. Both have ``cancel()``, ``deadline``
    and ``cancel_called``."""
    return sys.modules["trio"].CancelScope() if trio_task else anyio.CancelScope()


class BackgroundTask:
    """``fn()`` running beside the current task, held by no nursery or task group, until
    `stop` reaps it; what it raises (other than its own cancellation) is kept in `error`.

    The backend's own primitives rather than an anyio task group, which would cost more
    than a small request handler: on trio a system task (a nursery cannot be opened in the
    middle of a call whose cancel scope it would nest inside), on asyncio a task. It runs
    in a copy of the current context, as a task started here would.
    """

    __slots__ = ("_done", "_scope", "_task", "error")

    def __init__(self, fn: Callable[[], Awaitable[object]], *, name: str, trio_task: bool) -> None:
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        if trio_task:
            trio = sys.modules["trio"]
            self._scope = trio.CancelScope()
            self._done = trio.Event()
            trio.lowlevel.spawn_system_task(
                self._run_in_system_task, fn, name=name, context=contextvars.copy_context()
            )
        else:
            self._task = asyncio.get_running_loop().create_task(self._run_in_task(fn), name=name)

    async def _run_in_task(self, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc

    async def _run_in_system_task(self, fn: Callable[[], Awaitable[object]]) -> None:
        # A system task must not raise: what escapes is handed over in `error`.
        try:
            with self._scope:
                await fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Cancel the task, unless it has ended, and wait until it has."""
        task = self._task
        if task is None:
            if not self._done.is_set():
                self._scope.cancel()
                with sys.modules["trio"].CancelScope(shield=True):
                    await self._done.wait()
        elif not task.done():
            task.cancel()
            # Shielded like trio's branch, so that a scope of the caller's that is
            # cancelled meanwhile cannot replace what the caller is returning or raising;
            # asyncio.wait never raises the task's cancellation in this one.
            with anyio.CancelScope(shield=True):
                await asyncio.wait((task,))


def spawn_system_task(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run ``fn(*args)`` in a trio system task, in a copy of the current context.

    It belongs to no nursery, so it must not raise; whoever spawns it reaps it.
    """
    sys.modules["trio"].lowlevel.spawn_system_task(fn, *args, context=contextvars.copy_context())


async def park_trio_task(
    host: Callable[[], Awaitable[object]], on_cancel: Callable[[BaseException], None]
) -> None:
    """Run `host` in a trio system task and keep the calling task parked until it ends.

    The moment the caller's scope is cancelled, ``on_cancel(exc)`` is called with the
    cancellation trio would have raised (in trio's thread, synchronously; see
    `canceller_reason`) and the caller stays parked: it returns only when `host` has ended,
    and trio delivers the cancellation at its next checkpoint. `host` must not raise.
    """
    lowlevel = sys.modules["trio"].lowlevel
    caller = lowlevel.current_task()

    async def hosted() -> None:
        try:
            await host()
        finally:
            lowlevel.reschedule(caller)

    def abort(raise_cancel: Callable[[], object]) -> Any:
        try:
            raise_cancel()  # builds the Cancelled (or KeyboardInterrupt), nothing more
        except BaseException as exc:
            on_cancel(exc)
        return lowlevel.Abort.FAILED

    lowlevel.spawn_system_task(hosted, context=contextvars.copy_context())
    await lowlevel.wait_task_rescheduled(abort)


# -- the end of a task ------------------------------------------------------------------------


def current_task() -> object:
    """The task running the caller (an ``asyncio.Task``, a trio ``Task``), or None."""
    if on_trio():
        return sys.modules["trio"].lowlevel.current_task()
    try:
        return asyncio.current_task()
    except RuntimeError:  # pragma: no cover - no running loop: no task
        return None


class TaskExitWatch:
    """Calls ``callback()`` in the event loop's thread once the current task has ended
    (returned, raised or been cancelled), unless withdrawn first.

    asyncio: a done callback on the task. trio has none, so an instrument (one per run,
    added on first use) hears every task exit and calls the watches filed for it.
    `callback` must not raise; it should hold no strong reference to what it acts on,
    since the task (or the run) holds it until the task ends.
    """

    __slots__ = ("_callback", "_exits", "_thread", "task")

    def __init__(self, callback: Callable[[], object]) -> None:
        self._callback = callback
        self._thread = threading.get_ident()
        self._exits: _TrioTaskExits | None = None
        if on_trio():
            self.task: Any = sys.modules["trio"].lowlevel.current_task()
            self._exits = _trio_task_exits()
            self._exits.watches.setdefault(self.task, {})[self] = None
        else:
            self.task = current_task()
            if self.task is not None:
                self.task.add_done_callback(self._task_done)

    def _task_done(self, task: object = None) -> None:
        self._callback()

    def withdraw(self) -> None:
        """Never call back. Only in the loop's thread: elsewhere (a garbage collection
        in another thread) it does nothing, and the callback must find nothing to do."""
        if threading.get_ident() != self._thread:
            return
        exits = self._exits
        if exits is not None:
            watches = exits.watches.get(self.task)
            if watches is not None:
                watches.pop(self, None)
                if not watches:
                    del exits.watches[self.task]
        elif self.task is not None:
            self.task.remove_done_callback(self._task_done)


class _TrioTaskExits:
    """A trio instrument (duck-typed: trio calls the hooks an object defines) that calls
    the watches filed for each task as it exits."""

    def __init__(self) -> None:
        self.watches: dict[Any, dict[TaskExitWatch, None]] = {}

    def task_exited(self, task: object) -> None:
        # A hook that raises is removed by trio: callbacks must not raise.
        watches = self.watches.pop(task, None)
        if watches:
            for watch in watches:
                watch._callback()


_trio_exits_var: Any = None  # trio.lowlevel.RunVar, made on first use


def _trio_task_exits() -> _TrioTaskExits:
    """This trio run's instrument, added to the run on first use."""
    global _trio_exits_var
    lowlevel = sys.modules["trio"].lowlevel
    if _trio_exits_var is None:
        _trio_exits_var = lowlevel.RunVar("bridgecancel task exits")
    try:
        exits: _TrioTaskExits = _trio_exits_var.get()
    except LookupError:
        exits = _TrioTaskExits()
        lowlevel.add_instrument(exits)
        _trio_exits_var.set(exits)
    return exits


# -- why the caller was cancelled ------------------------------------------------------------

_ANYIO_SCOPE: Final = "Cancelled via cancel scope "
_ANYIO_REASON: Final = "; reason: "


def canceller_reason(exc: BaseException | None) -> str | None:
    """The reason the canceller gave, read from the cancellation it raised, or None.

    trio's `Cancelled` carries it (``reason``, and ``source == "deadline"`` for a
    deadline); plain asyncio's ``CancelledError`` carries ``Task.cancel(msg)``'s message;
    anyio's scopes on asyncio cancel with the message ``Cancelled via cancel scope ...``,
    followed by ``; reason: ...`` when ``CancelScope.cancel(reason=...)`` was given one
    (anyio 4.11 and later; a deadline's is ``deadline exceeded``).
    """
    if exc is None:
        return None
    if isinstance(exc, asyncio.CancelledError):
        message = exc.args[0] if exc.args else None
        if not isinstance(message, str) or not message:
            return None
        if message.startswith(_ANYIO_SCOPE):
            _, found, given = message.partition(_ANYIO_REASON)
            return given if found and given else None
        return message
    trio = sys.modules.get("trio")
    if trio is not None and isinstance(exc, trio.Cancelled):
        if getattr(exc, "source", None) == "deadline":
            return DEADLINE_REASON
        trio_reason = getattr(exc, "reason", None)
        return trio_reason if isinstance(trio_reason, str) and trio_reason else None
    return None


# -- plain asyncio's cancellation requests -------------------------------------------------


def cancel_requests(exc: BaseException) -> int:
    """How many cancellations of the current asyncio task are pending (3.11+; else 0)."""
    if sys.version_info >= (3, 11) and isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None:
            return task.cancelling()
    return 0


def asyncio_cancel_pending(exc: BaseException, requests: int) -> bool:
    """Whether a plain asyncio cancellation, caught as `exc` to wait for a job, still
    stands now that the job has finished: then it is raised, whatever the job produced.

    anyio's cancel scopes and trio deliver a cancellation again at the caller's next
    checkpoint by themselves (the effective deadline is then -inf), so there the job's
    value or error is handed over first. A plain ``Task.cancel()`` is delivered once:
    handing over a value instead would lose it whenever the call is the task's last
    await. It stands unless its requester withdrew it meanwhile (Python 3.11+): an
    ``asyncio.timeout()`` block, ``wait_for()`` or task group that calls
    ``Task.uncancel()`` leaves fewer requests than `requests`, the count
    (``Task.cancelling()``) when it was caught.
    """
    if not isinstance(exc, asyncio.CancelledError):
        return False
    if anyio.current_effective_deadline() == -math.inf:
        return False
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None and task.cancelling() < requests:
            return False
    return True
