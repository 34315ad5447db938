"""Token-aware waits on `threading` and `queue` primitives and on `concurrent.futures`.

Events, conditions, semaphores, queues and futures all wait on a `threading.Condition`
inside; `_condition.wait` wakes such a wait when the token fires. Where CPython's internals
are not as expected (`_condition.AVAILABLE` is False), each wait calls the primitive's own
public method in slices instead, with the same semantics. Plain locks cannot be woken
from outside without being released, so they are always waited on in slices.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .._tokens import CancelToken
from . import _condition
from ._common import begin, cancelled, check_type, remaining, wait_sliced

__all__ = (
    "acquire",
    "future_result",
    "queue_get",
    "queue_put",
    "wait_condition",
    "wait_event",
)

T = TypeVar("T")


class SupportsAcquire(Protocol):
    """A lock or semaphore: `threading.Lock`, `RLock`, `Semaphore`, `BoundedSemaphore`."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


def _wait_until(
    cond: threading.Condition,
    ready: Callable[[], object],
    token: CancelToken,
    deadline: float | None,
) -> bool:
    """Wait holding `cond` until `ready()` is true (True) or the deadline passes (False)."""
    while not ready():
        left = remaining(deadline)
        if left is not None and left <= 0:
            return False
        _condition.wait(cond, token, left)
    return True


def wait_event(
    event: threading.Event, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """``event.wait(timeout)``, raising `Cancelled` as soon as the token fires.

    Returns True once the event is set, False if `timeout` seconds pass first. A
    cancel leaves the event as it was. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    check_type(event, threading.Event, "wait_event", "a threading.Event")
    token, deadline, never = begin("wait_event", token, timeout)
    if never:
        return event.wait(timeout)
    if not _condition.AVAILABLE:
        return wait_sliced(event.wait, token, deadline)
    cond = _condition.event_condition(event)
    with cond:
        if event.is_set():
            return True
        return _condition.wait(cond, token, remaining(deadline))


def wait_condition(
    cond: threading.Condition,
    predicate: Callable[[], T],
    timeout: float | None = None,
    *,
    token: CancelToken | None = None,
) -> T:
    """``cond.wait_for(predicate, timeout)``, raising `Cancelled` as soon as the token fires.

    Call it holding `cond`, as with ``wait_for``; it returns holding it, with the last
    value of `predicate` (falsy if the timeout passed), and raises `Cancelled` holding
    it too. A notification the cancelled waiter had received is passed on to another
    waiter. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
        RuntimeError: if the calling thread does not hold `cond`.
    """
    check_type(cond, threading.Condition, "wait_condition", "a threading.Condition")
    if not callable(predicate):
        raise TypeError(
            f"wait_condition() needs a predicate to call, got {predicate!r}; "
            "pass e.g. `lambda: len(items) > 0`"
        )
    if not _condition.is_owned(cond):
        raise RuntimeError(
            "cannot wait on un-acquired lock: call wait_condition() inside `with cond:`"
        )
    token, deadline, never = begin("wait_condition", token, timeout)
    if never:
        return cond.wait_for(predicate, timeout)
    result = predicate()
    if _condition.wakeable(cond):
        while not result:
            left = remaining(deadline)
            if left is not None and left <= 0:
                break
            _condition.wait(cond, token, left)
            result = predicate()
        return result

    def attempt(seconds: float) -> bool:
        nonlocal result
        notified = cond.wait(seconds)
        if notified and token.cancel_called:
            cond.notify()  # pass on the notification this waiter consumed
            raise cancelled(token)
        result = predicate()
        return bool(result)

    if not result:
        wait_sliced(attempt, token, deadline)
    return result


def acquire(
    lock: SupportsAcquire, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """``lock.acquire(timeout=timeout)``, raising `Cancelled` as soon as the token fires.

    For `threading.Lock`, `RLock`, `Semaphore` and `BoundedSemaphore` (and any object
    whose ``acquire(blocking, timeout)`` works like theirs). Returns True once acquired,
    False if `timeout` seconds pass first; ``timeout=0`` tries once without waiting.
    A cancelled call has not acquired anything.

    Semaphores are event-driven. `Lock` and `RLock` are implemented in C and cannot be
    woken without being released, so they are waited on in slices of `POLL_SLICE`
    seconds: a cancel is noticed within 10 ms.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    if not callable(getattr(lock, "acquire", None)):
        raise TypeError(
            f"acquire() needs a Lock, RLock, Semaphore or BoundedSemaphore, got {lock!r}"
        )
    token, deadline, never = begin("acquire", token, timeout)
    if never:
        return lock.acquire() if timeout is None else lock.acquire(True, timeout)
    if isinstance(lock, threading.Semaphore) and _condition.AVAILABLE:
        cond = _condition.semaphore_condition(lock)
        while not lock.acquire(False):
            with cond:
                free = functools.partial(_condition.semaphore_is_free, lock)
                if not _wait_until(cond, free, token, deadline):
                    return False
        return True

    def attempt(seconds: float) -> bool:
        return lock.acquire(True, seconds) if seconds > 0 else lock.acquire(False)

    return wait_sliced(attempt, token, deadline)


def queue_get(
    q: queue.Queue[T], timeout: float | None = None, *, token: CancelToken | None = None
) -> T:
    """``q.get(timeout=timeout)``, raising `Cancelled` as soon as the token fires.

    For `queue.Queue` and its subclasses (`LifoQueue`, `PriorityQueue`, ...; the item is
    taken with ``q.get(block=False)``, so overrides of ``get`` and ``_get`` apply). A
    cancelled call takes nothing. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
        queue.Empty: if `timeout` seconds pass with the queue empty.
    """
    return _queue_op("queue_get", q, lambda block, t: q.get(block, t), timeout, token)


def _queue_op(
    api: str,
    q: queue.Queue[Any],
    op: Callable[[bool, float | None], T],
    timeout: float | None,
    token: CancelToken | None,
) -> T:
    """Call ``op(block, timeout)``, a get or a put on `q`, waiting while it cannot act."""
    check_type(q, queue.Queue, api, "a queue.Queue (or a subclass)")
    token, deadline, never = begin(api, token, timeout)
    if never:
        return op(True, timeout)
    putting = api == "queue_put"
    busy = queue.Full if putting else queue.Empty
    if not _condition.AVAILABLE:
        done: list[T] = []

        def attempt(seconds: float) -> bool:
            try:
                done.append(op(True, seconds))
            except busy:
                return False
            return True

        if wait_sliced(attempt, token, deadline):
            return done[0]
        raise busy
    not_empty, not_full = _condition.queue_conditions(q)
    cond, blocked = (
        (not_full, _condition.queue_is_full) if putting else (not_empty, _condition.queue_is_empty)
    )
    while True:
        try:
            return op(False, None)
        except busy:
            pass
        with cond:
            if not _wait_until(cond, lambda: not blocked(q), token, deadline):
                raise busy


def queue_put(
    q: queue.Queue[T], item: T, timeout: float | None = None, *, token: CancelToken | None = None
) -> None:
    """``q.put(item, timeout=timeout)``, raising `Cancelled` as soon as the token fires.

    Waits only if the queue is bounded and full. A cancelled call puts nothing.
    Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
        queue.Full: if `timeout` seconds pass with the queue full.
    """
    return _queue_op("queue_put", q, lambda block, t: q.put(item, block, t), timeout, token)


def future_result(
    fut: concurrent.futures.Future[T],
    timeout: float | None = None,
    *,
    token: CancelToken | None = None,
) -> T:
    """``fut.result(timeout)``, raising `Cancelled` as soon as the token fires.

    Returns the future's result or raises its exception, as ``result`` does. A cancel
    leaves the future alone (it is not cancelled: call ``fut.cancel()`` in an
    ``on_cancel`` callback for that). Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
        TimeoutError: if `timeout` seconds pass first (``concurrent.futures.TimeoutError``).
        concurrent.futures.CancelledError: if the future was cancelled.
    """
    check_type(
        fut,
        concurrent.futures.Future,
        "future_result",
        "a concurrent.futures.Future (for an asyncio future, await it instead)",
    )
    token, deadline, never = begin("future_result", token, timeout)
    if never:
        return fut.result(timeout)
    if _condition.AVAILABLE:
        cond = _condition.future_condition(fut)
        with cond:
            _wait_until(cond, fut.done, token, deadline)
    else:
        wait_sliced(lambda s: bool(concurrent.futures.wait([fut], s).done), token, deadline)
    # Done, or timed out: let the future raise exactly what result() raises.
    return fut.result(timeout=0)
