"""Scopes to tokens and back: `open_token` (a scope's cancellation as a token) and `cancel_on`
(a token's firing as a scope's cancellation).

Only anyio's public API is used.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

from ._backend import canceller_reason, source_for_caller, threadsafe_caller
from ._tokens import CALLER_CANCELLED, DEADLINE_REASON, CancelSource, CancelToken

__all__ = (
    "cancel_on",
    "open_token",
)


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
                    cancelled = isinstance(failure, anyio.get_cancelled_exc_class())
                    if cancelled or anyio.current_effective_deadline() == -math.inf:
                        source._cancel_detached(_reason(source, failure if cancelled else None))
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
    cancelled: BaseException | None = None
    try:
        await anyio.sleep_forever()
    except BaseException as exc:
        cancelled = exc
        raise
    finally:
        if not leaving[0]:
            source._cancel_detached(_reason(source, cancelled))
        del cancelled


def _reason(source: CancelSource, cancelled: BaseException | None) -> str:
    """Why the enclosing scope was cancelled (see `_supervise.cancel_reason`)."""
    if time.monotonic() >= source.token.deadline:
        return DEADLINE_REASON
    return canceller_reason(cancelled) or CALLER_CANCELLED


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
