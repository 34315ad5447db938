"""Scopes to tokens and back: `open_token`, `cancel_on`, and the pieces the bridges share.

Only anyio's public API is used; trio's own public API where a trio-only route is needed.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import anyio

from ._supervise import CALLER_CANCELLED
from ._token import CancelSource, CancelToken, informative_source

if TYPE_CHECKING:
    import trio

__all__ = ("cancel_on", "open_token")

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


@asynccontextmanager
async def open_token() -> AsyncIterator[CancelToken]:
    """Yield a token that fires when the enclosing cancel scope is cancelled.

    For blocking work started some other way than `run_sync` (a thread of your own, a
    library callback). The token carries the scope's effective deadline for information
    (it fires when the scope is cancelled, not by itself at that deadline) and respects
    shields; it is closed when the block exits, so it does not outlive the scope. Its
    ``on_cancel`` callbacks run in another thread, never in the event loop's.
    """
    await anyio.lowlevel.checkpoint()
    source = source_for_caller()
    leaving = [False]
    # The body's exception is held until the task group has exited, so that it
    # propagates as itself rather than wrapped in an exception group.
    failure: BaseException | None = None
    try:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_fire_when_cancelled, source, leaving)
                try:
                    yield source.token
                except BaseException as exc:
                    failure = exc
                finally:
                    # The body can leave because of the cancel before the watcher has
                    # run: fire here too, or the token never would.
                    if anyio.current_effective_deadline() == -math.inf or isinstance(
                        failure, anyio.get_cancelled_exc_class()
                    ):
                        source._cancel_detached(CALLER_CANCELLED)
                    leaving[0] = True
                    group.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # The watcher's share of the enclosing scope's cancellation: it must not
            # replace an error the body raised.
            if failure is None:
                raise
        if failure is not None:
            raise failure
    finally:
        del failure
        source.close()


async def _fire_when_cancelled(source: CancelSource, leaving: list[bool]) -> None:
    # Woken either by the enclosing scope's cancellation (the token must fire) or by
    # open_token() leaving (it must not: nothing outside was cancelled).
    try:
        await anyio.sleep_forever()
    finally:
        if not leaving[0]:
            source._cancel_detached(CALLER_CANCELLED)


@contextmanager
def cancel_on(token: CancelToken) -> Iterator[anyio.CancelScope]:
    """Cancel the block when `token` fires, from whatever thread fires it.

    Use it in async code: ``with cancel_on(token) as scope:``. ``scope`` is the anyio
    `CancelScope` around the block, so ``scope.cancelled_caught`` tells whether the
    token stopped it. This is how a GUI thread, a signal handler or sync code cancels
    async work.
    """
    if not isinstance(token, CancelToken):
        raise TypeError(
            f"cancel_on() takes a CancelToken, got {token!r}; pass source.token"
        )
    cancel_soon = threadsafe_caller()
    with anyio.CancelScope() as scope, token.on_cancel(cancel_soon, scope.cancel):
        yield scope


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
