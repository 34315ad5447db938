"""Every use of CPython internals in bridgecancel.blocking, behind one start-up probe.

A thread waiting in ``Condition.wait`` sleeps on a private waiter lock; releasing that
lock from the cancelling thread wakes it at once, with no polling. That takes the
condition's internals (``_waiters``, ``_release_save``, ``_acquire_restore``,
``_is_owned``) and the conditions hidden inside ``Event`` (``_cond``), ``Semaphore``
(``_cond``, ``_value``), ``queue.Queue`` (``not_empty``, ``not_full``, ``_qsize``) and
``concurrent.futures.Future`` (``_condition``). This module is the only one that touches
them. `_probe` checks every one at import; if any is not as expected, `AVAILABLE` is
False and the blocking waits fall back to waiting in slices with the public methods.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from typing import Any

from .._tokens import CancelToken
from ._common import cancelled

__all__ = (
    "AVAILABLE",
    "event_condition",
    "future_condition",
    "is_owned",
    "queue_conditions",
    "queue_is_empty",
    "queue_is_full",
    "semaphore_condition",
    "semaphore_is_free",
    "wait",
    "wakeable",
)


def _condition_works(cond: threading.Condition) -> bool:
    """The condition internals behave as `wait` needs (call with `cond` not held)."""
    if not isinstance(cond._waiters, collections.deque):  # type: ignore[attr-defined]
        return False
    with cond:
        if not cond._is_owned():  # type: ignore[attr-defined]
            return False
        saved = cond._release_save()  # type: ignore[attr-defined]
        released = not cond._is_owned()  # type: ignore[attr-defined]
        cond._acquire_restore(saved)  # type: ignore[attr-defined]
        if not (released and cond._is_owned()):  # type: ignore[attr-defined]
            return False
        # The cancel side releases the waiter lock itself, so a notify may meet it
        # released; CPython tolerates that since gh-92530 (3.10.5).
        gone = threading.Lock()
        cond._waiters.append(gone)  # type: ignore[attr-defined]
        try:
            cond.notify()
        except RuntimeError:
            return False
        finally:
            if gone in cond._waiters:  # type: ignore[attr-defined]
                cond._waiters.remove(gone)  # type: ignore[attr-defined]
    return True


def _probe() -> bool:
    """Whether every internal this module uses is there and works as expected."""
    try:
        sem = threading.Semaphore(1)
        q: queue.Queue[int] = queue.Queue(1)
        empty_before = q._qsize() == 0
        q.put(1)
        conditions = [
            threading.Condition(threading.Lock()),
            threading.Condition(threading.RLock()),
            threading.Event()._cond,  # type: ignore[attr-defined]
            sem._cond,  # type: ignore[attr-defined]
            q.not_empty,
            q.not_full,
            concurrent.futures.Future()._condition,
        ]
        return (
            all(isinstance(c, threading.Condition) and _condition_works(c) for c in conditions)
            and sem._value == 1
            and empty_before
            and q._qsize() == 1
        )
    except (AttributeError, TypeError, RuntimeError):
        return False


AVAILABLE: bool = _probe()
"""Whether condition waits can be woken by a token (else the waits poll in slices)."""


# -- the internals, one accessor each ---------------------------------------------------


def wakeable(cond: threading.Condition) -> bool:
    """Whether `wait` can wake a waiter on `cond` (a subclass may differ inside)."""
    return AVAILABLE and isinstance(getattr(cond, "_waiters", None), collections.deque)


def is_owned(cond: threading.Condition) -> bool:
    """Whether the calling thread holds `cond`."""
    if AVAILABLE:
        return bool(cond._is_owned())  # type: ignore[attr-defined]
    try:
        cond.notify(0)  # checks ownership, wakes nobody
    except RuntimeError:
        return False
    return True


def event_condition(event: threading.Event) -> threading.Condition:
    cond: threading.Condition = event._cond  # type: ignore[attr-defined]
    return cond


def semaphore_condition(sem: threading.Semaphore) -> threading.Condition:
    cond: threading.Condition = sem._cond  # type: ignore[attr-defined]
    return cond


def semaphore_is_free(sem: threading.Semaphore) -> bool:
    return bool(sem._value)


def _shut_down(q: queue.Queue[Any]) -> bool:
    # Python 3.13's Queue.shutdown(): a shut-down queue no longer blocks.
    return bool(getattr(q, "is_shutdown", False))


def queue_conditions(q: queue.Queue[Any]) -> tuple[threading.Condition, threading.Condition]:
    """The queue's (not_empty, not_full) conditions."""
    return q.not_empty, q.not_full


def queue_is_empty(q: queue.Queue[Any]) -> bool:
    """Whether a get would block (call holding ``q.not_empty``)."""
    return not q._qsize() and not _shut_down(q)


def queue_is_full(q: queue.Queue[Any]) -> bool:
    """Whether a put would block (call holding ``q.not_full``)."""
    return 0 < q.maxsize <= q._qsize() and not _shut_down(q)


def future_condition(fut: concurrent.futures.Future[Any]) -> threading.Condition:
    return fut._condition


# -- a condition wait that the token can wake -------------------------------------------


class _Waker:
    """The cancel side of one condition wait: releases the waiter's lock to wake it."""

    __slots__ = ("done", "mutex", "released", "waiter")

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter
        self.mutex = threading.Lock()
        self.done = False
        self.released = False

    def __call__(self) -> None:
        # Runs in the cancelling thread (or at once, if the token has fired).
        with self.mutex:
            if self.done:
                return
            try:
                self.waiter.release()
            except RuntimeError:  # a notify released it first: the waiter is awake
                return
            self.released = True

    def finish(self) -> bool:
        """Stop any later wake-up; return whether the cancel side released the lock."""
        with self.mutex:
            self.done = True
            return self.released


def wait(cond: threading.Condition, token: CancelToken, timeout: float | None) -> bool:
    """``cond.wait(timeout)`` that also wakes when `token` fires. The caller holds `cond`.

    Only when `AVAILABLE`. Returns True if notified, False on timeout (a notify that
    arrives just after the timeout counts, rather than being lost as in
    ``Condition.wait``). Raises `Cancelled` if the token fired, after passing on a
    notification it may have consumed.
    """
    if token.cancel_called:
        raise cancelled(token)
    # As Condition.wait does, with a waiter lock the token can release too.
    waiter = threading.Lock()
    waiter.acquire()
    waker = _Waker(waiter)
    waiters: collections.deque[Any] = cond._waiters  # type: ignore[attr-defined]
    waiters.append(waiter)
    saved = cond._release_save()  # type: ignore[attr-defined]
    got = False
    try:
        with token._on_cancel_inline(waker):
            if timeout is None:
                got = waiter.acquire()
            elif timeout > 0:
                got = waiter.acquire(True, min(timeout, threading.TIMEOUT_MAX))
            else:
                got = waiter.acquire(False)
    finally:
        by_cancel = waker.finish()
        cond._acquire_restore(saved)  # type: ignore[attr-defined]
        notified = _settle_waiter(waiters, waiter, got, by_cancel)
    if token.cancel_called:
        if notified:
            cond.notify()
        raise cancelled(token)
    return notified


def _settle_waiter(
    waiters: collections.deque[Any], waiter: Any, got: bool, by_cancel: bool
) -> bool:
    """Take `waiter` off the condition; return whether a notify counted it as woken.

    Called with the condition held, once the cancel side can no longer act. A notify
    pops the waiter and counts it only if its release succeeded, so the count follows
    from the lock's history: one initial acquire, one more if the wait got it, and the
    releases by the cancel side and by a notify.
    """
    try:
        waiters.remove(waiter)
    except ValueError:
        releases = 1 + got - bool(waiter.locked())
        return releases - by_cancel == 1
    return False
