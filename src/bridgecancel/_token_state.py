"""A token's state, and how it fires: without a lock, so a signal handler may fire it.

Standard library only. `_token.CancelToken` is a read-only `TokenState`; its source
fires it through the methods here, and the deadline timer through `_fire_for_deadline`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._registration import FOLLOWER, USER
from ._seconds import check_deadline
from ._token_daemons import Entry, report_unraisable
from ._token_daemons import timer as _timer

if TYPE_CHECKING:
    from ._registration import Registration

__all__ = ("DEADLINE_REASON", "Deferred", "TokenState", "close_fds", "poke", "set_slot")

DEADLINE_REASON: Final = "deadline exceeded"

# Writes to a token's private slots (users cannot assign to a token's attributes).
set_slot = object.__setattr__
Deferred = list[tuple[object, Callable[..., object], tuple[Any, ...]]]


class TokenState:
    """A token's storage and how it fires. `_token._new_token` fills it with plain
    stores (cheap: every job makes a token), then makes it a `CancelToken`, which refuses
    assignment; it changes later only through `set_slot`."""

    # State changes are single atomic operations (a slot store, a dict pop or
    # setdefault, a lock release), never a lock a canceller waits on: the thread that
    # fires a token may be a signal handler that interrupted this token's own code.
    __slots__ = (
        "_callbacks",
        "_once",
        "_deadline",
        "_fds",
        "_fires_at",
        "_wait_locks",
        "_never",
        "_reason",
        "_timer_entry",
        "__weakref__",
        "cancel_called",
    )

    # Registration -> USER, INLINE or FOLLOWER, insertion-ordered.
    _callbacks: dict[Registration, int]
    # What only the first of racing threads may set, by atomic dict.setdefault: the
    # first firer's (reason,) under "reason", the pipe under "fds".
    _once: dict[str, Any]
    _deadline: float  # what the token reports
    _fds: tuple[int, int] | None
    _fires_at: float  # when it fires by itself
    # The locks of threads blocked in wait(), each released once by the firer.
    _wait_locks: deque[Any]
    _never: bool
    _reason: str | None
    _timer_entry: Entry | None

    if TYPE_CHECKING:  # a plain slot, set through set_slot; read-only on CancelToken

        @property
        def cancel_called(self) -> bool: ...

    def _fire(self, reason: str | None, deferred: Deferred | None) -> list[BaseException]:
        """Fire the token; return the errors its callbacks raised.

        With `deferred`, user callbacks (this token's and its followers') are appended
        to it rather than run. Takes no lock: safe in a signal handler that interrupted
        any of this token's methods.
        """
        if self.cancel_called:
            return []
        mine = (reason,)
        first = self._once.setdefault("reason", mine)
        # Every caller stores the same first reason before the flag, so once any
        # cancel() returns the token reads as cancelled, with its first reason.
        set_slot(self, "_reason", first[0])
        set_slot(self, "cancel_called", True)
        if first is not mine:
            return []
        waiters = self._wait_locks
        while waiters:
            try:
                waiters.popleft().release()
            except IndexError:  # emptied meanwhile by a waiter leaving
                break
        fds = self._fds
        if fds is not None:
            poke(fds)
        entry = self._timer_entry
        if entry is not None:
            _timer.discard(entry)
        errors: list[BaseException] = []
        callbacks = self._callbacks
        # Registrations added from now on see the flag and run themselves.
        for registration in reversed(list(callbacks)):
            kind = callbacks.pop(registration, 0)
            if not kind:
                continue  # unregistered, or run by on_cancel, meanwhile
            fn, args = registration._fn, registration._args
            registration._token = None
            if kind == FOLLOWER:
                follower = args[0]()
                if follower is not None:
                    errors += follower._token._fire(first[0], deferred)
            elif kind == USER and deferred is not None:
                deferred.append((self, fn, args))
            else:
                try:
                    fn(*args)
                except BaseException as exc:  # every callback runs; errors go together
                    errors.append(exc)
        return errors

    def _fire_for_deadline(self, entry: Entry) -> None:
        """Called by the timer thread; callbacks run in it, errors to the hook."""
        if self._timer_entry is entry:  # not closed or moved meanwhile
            for exc in self._fire(DEADLINE_REASON, None):
                report_unraisable(exc, "Exception in on_cancel callback", self)

    def _set_deadline(self, deadline: float) -> None:
        deadline = check_deadline(deadline)
        set_slot(self, "_deadline", deadline)
        set_slot(self, "_fires_at", deadline)
        pending = not self.cancel_called and deadline != math.inf
        passed = pending and deadline <= time.monotonic()
        # Published before the timer can see it: the timer fires an entry only while
        # it is the token's current one (so racing setters leave inert entries).
        entry = Entry(self, deadline) if pending and not passed else None
        old = self._timer_entry
        set_slot(self, "_timer_entry", entry)
        if old is not None:
            _timer.discard(old)
        if entry is not None:
            _timer.add(entry)
        elif passed:
            for exc in self._fire(DEADLINE_REASON, None):
                report_unraisable(exc, "Exception in on_cancel callback", self)

    def _drop_callbacks(self) -> None:
        entry = self._timer_entry
        if entry is not None:
            set_slot(self, "_timer_entry", None)
            _timer.discard(entry)
        callbacks = self._callbacks
        if callbacks:
            for registration in list(callbacks):
                if callbacks.pop(registration, 0):
                    registration._token = None


def close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        os.close(fd)


def poke(fds: tuple[int, int]) -> None:
    try:
        os.write(fds[1], b"\0")
    except OSError:  # full (it is readable already) or closed (nobody selects on it)
        pass
