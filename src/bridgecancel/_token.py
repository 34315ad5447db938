"""Cancel tokens: `CancelSource`, `CancelToken`, `Registration`, `any_of`, `current_token`.

Standard library only: the process-side worker imports this module, and it must start fast.
A token's state lives on the token; a source is the right to fire it.
"""

from __future__ import annotations

import heapq
import math
import operator
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from types import SimpleNamespace, TracebackType
from typing import TYPE_CHECKING, Any, Final, final

from ._exceptions import Cancelled

if sys.version_info >= (3, 11):
    from typing import Self, TypeVarTuple, Unpack
else:  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup
    from typing_extensions import Self, TypeVarTuple, Unpack

__all__ = (
    "CancelSource",
    "CancelToken",
    "Registration",
    "any_of",
    "check_cancelled",
    "current_token",
)

PosArgsT = TypeVarTuple("PosArgsT")

DEADLINE_REASON: Final = "deadline exceeded"


def _check_deadline(deadline: float) -> float:
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        raise TypeError(
            f"deadline must be a float in time.monotonic() terms, got {deadline!r}"
        )
    deadline = float(deadline)
    if math.isnan(deadline):
        raise ValueError(
            "deadline is NaN: pass a time.monotonic() value, or math.inf for none"
        )
    return deadline


def _check_seconds(seconds: float) -> float:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise TypeError(f"seconds must be a number, got {seconds!r}")
    seconds = float(seconds)
    if math.isnan(seconds):
        raise ValueError("seconds is NaN: pass a number of seconds, or math.inf for none")
    return seconds


def _report_unraisable(exc: BaseException, message: str, obj: object) -> None:
    """Hand a callback error nobody can catch to ``sys.unraisablehook``.

    The hook's argument type cannot be built from Python, so the default hook is
    replaced by an equivalent print; custom hooks (pytest's, an app's) get an object
    with the same attributes.
    """
    # Never raise: in the timer thread an error here would kill the thread, and no
    # later deadline would fire.
    if sys.unraisablehook is not sys.__unraisablehook__:
        try:
            sys.unraisablehook(
                SimpleNamespace(
                    exc_type=type(exc),
                    exc_value=exc,
                    exc_traceback=exc.__traceback__,
                    err_msg=message,
                    object=obj,
                )
            )
            return
        except BaseException as hook_exc:  # as CPython does when the hook fails
            _print_unraisable(hook_exc, "Exception ignored in sys.unraisablehook", obj)
    _print_unraisable(exc, message, obj)


def _print_unraisable(exc: BaseException, message: str, obj: object) -> None:
    try:
        print(f"{message}: {obj!r}", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    except BaseException:  # no usable stderr: nowhere left to report to
        pass


@final
class Registration:
    """A callback registered with `CancelToken.on_cancel`.

    Use it as a context manager to unregister on exit, or call `unregister`.
    """

    __slots__ = ("_args", "_fn", "_token", "__weakref__")

    def __init__(
        self, token: CancelToken | None, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        # _token is None once the callback ran, is running, or was unregistered.
        self._token = token
        self._fn = fn
        self._args = args

    def unregister(self) -> bool:
        """Stop the callback from running.

        Returns:
            True only if this call stopped it; False if it already ran, is running
            now, or was unregistered before.
        """
        token = self._token
        if token is None:
            return False
        with token._lock:
            callbacks = token._callbacks
            if self._token is None or callbacks is None or self not in callbacks:
                return False
            del callbacks[self]
            self._token = None
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.unregister()


@final
class CancelToken:
    """A read-only view of a cancellation: safe to hand to any code, in any thread.

    Get one from `CancelSource.token`, or `current_token()` inside a worker.
    """

    __slots__ = (
        "_callbacks",
        "_deadline",
        "_event",
        "_fds",
        "_fired",
        "_lock",
        "_never",
        "_reason",
        "_timer_entry",
        "__weakref__",
    )

    def __init__(self, deadline: float, *, _never: bool = False) -> None:
        self._fired = False
        self._reason: str | None = None
        self._deadline = deadline
        self._lock = threading.Lock()
        # Insertion-ordered; None once fired (the firing thread took them).
        self._callbacks: dict[Registration, None] | None = {}
        self._event: threading.Event | None = None
        self._fds: tuple[int, int] | None = None
        self._timer_entry: list[Any] | None = None
        self._never = _never

    def __repr__(self) -> str:
        if self._fired:
            state = f"cancelled, reason={self._reason!r}"
        elif self._never:
            state = "never cancelled"
        else:
            state = "pending"
        if self._deadline != math.inf:
            state += f", remaining={self.remaining():.3f}s"
        return f"<CancelToken {state}>"

    # -- reading ----------------------------------------------------------------------

    # Workers read this in hot loops: a property whose getter is C code (attrgetter)
    # costs what threading.Event.is_set() does, a Python getter about 40% more.
    if TYPE_CHECKING:

        @property
        def cancel_called(self) -> bool:
            """True once cancelled or once the deadline has passed; never goes back."""

    else:
        cancel_called = property(
            operator.attrgetter("_fired"),
            doc="True once cancelled or once the deadline has passed; never goes back.",
        )

    @property
    def reason(self) -> str | None:
        """The first reason given to `cancel`, ``"deadline exceeded"``, or None."""
        return self._reason

    @property
    def deadline(self) -> float:
        """The deadline in `time.monotonic` terms, `math.inf` if none."""
        return self._deadline

    def remaining(self) -> float:
        """Seconds until the deadline (never negative; `math.inf` if none)."""
        deadline = self._deadline
        if deadline == math.inf:
            return math.inf
        return max(0.0, deadline - time.monotonic())

    def check(self) -> None:
        """Raise `Cancelled` if this token has fired; otherwise return at once."""
        if self._fired:
            raise Cancelled._create(self, self._reason)

    # -- waiting ----------------------------------------------------------------------

    def _get_event(self) -> threading.Event:
        event = self._event
        if event is None:
            # Allocate outside the lock: a garbage collection run by any allocation may
            # call a collected child's weakref callback, which takes this lock.
            new = threading.Event()
            with self._lock:
                event = self._event
                if event is None:
                    event = self._event = new
                    if self._fired:
                        event.set()
        return event

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token fires (True) or `timeout` seconds pass (False).

        Event-driven: it wakes as soon as `cancel` is called, without polling.
        """
        if self._fired:
            return True
        if timeout is not None:
            if math.isnan(timeout):
                raise ValueError("timeout is NaN: pass seconds as a number, or None")
            if timeout > threading.TIMEOUT_MAX:  # math.inf: Event.wait would overflow
                timeout = None
        return self._get_event().wait(timeout)

    def sleep(self, seconds: float) -> None:
        """Sleep like `time.sleep`, but raise `Cancelled` as soon as the token fires."""
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"sleep length must be a non-negative number, got {seconds}")
        if self.wait(seconds):
            raise Cancelled._create(self, self._reason)

    def fileno(self) -> int:
        """A descriptor that becomes readable when the token fires, for ``select``.

        Created on first use and closed when the token is garbage collected. Do not
        read from it or close it.
        """
        fds = self._fds
        if fds is None:
            new = os.pipe()  # outside the lock, as in _get_event
            os.set_blocking(new[1], False)
            with self._lock:
                fds = self._fds
                if fds is None:
                    fds = self._fds = new
                    if self._fired:
                        os.write(fds[1], b"\0")
            if fds is new:
                weakref.finalize(self, _close_fds, fds)
            else:
                _close_fds(new)
        return fds[0]

    # -- callbacks and children -------------------------------------------------------

    def on_cancel(
        self, fn: Callable[[Unpack[PosArgsT]], object], *args: Unpack[PosArgsT]
    ) -> Registration:
        """Run ``fn(*args)`` once when the token fires.

        The callback runs in the thread that fires the token, outside any lock, newest
        registration first; it may use the token and register more callbacks. If the
        token has already fired, it runs at once in the caller. Errors from callbacks
        surface together from `CancelSource.cancel` as an exception group.
        """
        if not callable(fn):
            raise TypeError(f"on_cancel() needs a callable, got {fn!r}")
        registration = Registration(self, fn, args)
        if self._never:
            return registration
        with self._lock:
            callbacks = self._callbacks
            if callbacks is not None:
                callbacks[registration] = None
                return registration
        registration._token = None
        fn(*args)
        return registration

    def child(self, *, deadline: float = math.inf) -> CancelSource:
        """A new source cancelled when this token is; it can also be cancelled alone.

        Its deadline is the earlier of `deadline` and this token's. Close the child
        (or use it as a context manager) when done, so this token forgets it.
        """
        deadline = min(_check_deadline(deadline), self._deadline)
        source = CancelSource(deadline=deadline)
        if not self._never:
            source._follow(self)
        return source

    # -- firing (the source's side) ---------------------------------------------------

    def _fire(self, reason: str | None) -> list[BaseException]:
        """Fire the token; return the errors its callbacks raised."""
        with self._lock:
            if self._fired:
                return []
            self._reason = reason
            self._fired = True
            callbacks = self._callbacks
            self._callbacks = None
            event = self._event
            fds = self._fds
            entry = self._timer_entry
            self._timer_entry = None
        if event is not None:
            event.set()
        if fds is not None:
            os.write(fds[1], b"\0")
        if entry is not None:
            _timer.discard(entry)
        errors: list[BaseException] = []
        if callbacks:
            for registration in reversed(list(callbacks)):
                fn, args = registration._fn, registration._args
                registration._token = None
                try:
                    fn(*args)
                except BaseException as exc:  # every callback runs; errors go together
                    errors.append(exc)
        return errors

    def _fire_for_deadline(self) -> None:
        for exc in self._fire(DEADLINE_REASON):
            _report_unraisable(exc, "Exception in on_cancel callback", self)

    def _set_deadline(self, deadline: float) -> None:
        deadline = _check_deadline(deadline)
        with self._lock:
            if self._fired:
                self._deadline = deadline
                return
            self._deadline = deadline
            old = self._timer_entry
            self._timer_entry = None
        if old is not None:
            _timer.discard(old)
        if deadline == math.inf:
            return
        if deadline <= time.monotonic():
            self._fire_for_deadline()
            return
        entry = _timer.schedule(self, deadline)
        with self._lock:
            if self._fired or self._deadline != deadline or self._timer_entry is not None:
                stale = True
            else:
                self._timer_entry = entry
                stale = False
        if stale:
            _timer.discard(entry)

    def _drop_callbacks(self) -> None:
        if not self._callbacks and self._timer_entry is None:
            # Nothing to drop (the common case when a run_sync call ends). A callback or
            # deadline being added right now races with close() either way.
            return
        empty: dict[Registration, None] = {}  # allocated outside the lock
        with self._lock:
            callbacks = self._callbacks
            if callbacks is not None:
                for registration in callbacks:
                    registration._token = None
                self._callbacks = empty
            entry = self._timer_entry
            self._timer_entry = None
        if entry is not None:
            _timer.discard(entry)


def _close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        os.close(fd)


@final
class CancelSource:
    """The right to cancel a `CancelToken`.

    Args:
        deadline: when the token fires by itself, in `time.monotonic` terms.
    """

    __slots__ = ("_parents", "_token", "__weakref__")

    def __init__(self, *, deadline: float = math.inf) -> None:
        self._token = CancelToken(math.inf)
        self._parents: list[Registration] = []
        if deadline is not math.inf:
            # Every run_sync call makes a source: the default (no deadline) skips this.
            self._token._set_deadline(deadline)

    def __repr__(self) -> str:
        return f"<CancelSource of {self._token!r}>"

    @property
    def token(self) -> CancelToken:
        """The token this source cancels (the same object every time)."""
        return self._token

    @property
    def cancel_called(self) -> bool:
        """True once the token has fired."""
        return self._token._fired

    @property
    def deadline(self) -> float:
        """When the token fires by itself, in `time.monotonic` terms (`math.inf`: never)."""
        return self._token._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._token._set_deadline(value)

    def cancel_after(self, seconds: float) -> None:
        """Set the deadline `seconds` from now."""
        seconds = _check_seconds(seconds)
        self._token._set_deadline(time.monotonic() + seconds)

    def cancel(self, reason: str | None = None) -> None:
        """Fire the token. Idempotent and thread-safe; the first reason wins.

        Raises:
            BaseExceptionGroup: if any `on_cancel` callbacks raised; all of them ran.
        """
        errors = self._token._fire(reason)
        if errors:
            raise BaseExceptionGroup("errors raised by on_cancel callbacks", errors)

    def close(self) -> None:
        """Detach from parent tokens and drop callbacks, without cancelling."""
        parents, self._parents = self._parents, []
        for registration in parents:
            registration.unregister()
        self._token._drop_callbacks()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _follow(self, parent: CancelToken) -> None:
        """Fire when `parent` does, without the parent keeping this source alive."""
        holder: list[Registration] = []

        def forget(_: object) -> None:
            for registration in holder:
                registration.unregister()

        ref = weakref.ref(self, forget)
        registration = parent.on_cancel(_cancel_follower, ref, parent)
        holder.append(registration)
        self._parents.append(registration)


def _cancel_follower(ref: weakref.ref[CancelSource], parent: CancelToken) -> None:
    source = ref()
    if source is not None:
        source.cancel(parent._reason)


def any_of(*tokens: CancelToken) -> CancelSource:
    """A new source cancelled as soon as any of `tokens` is (with that token's reason)."""
    for token in tokens:
        if not isinstance(token, CancelToken):
            raise TypeError(
                f"any_of() takes CancelToken objects, got {token!r}; "
                "pass source.token rather than the source"
            )
    deadline = min((token._deadline for token in tokens), default=math.inf)
    source = CancelSource(deadline=deadline)
    for token in tokens:
        if not token._never:
            source._follow(token)
    return source


# -- the deadline timer ---------------------------------------------------------------


class _DeadlineTimer:
    """One daemon thread that fires tokens whose deadline passed.

    It exists only while some deadline is pending, so reading `cancel_called` never has
    to consult the clock. Entries are ``[deadline, seq, weakref(token), live]``.
    """

    def __init__(self) -> None:
        # Reentrant: a token with a pending deadline may be collected by a garbage
        # collection that an allocation made while this lock is held, and its weakref
        # callback (_forget) then takes the lock again in the same thread.
        self._cond = threading.Condition(threading.RLock())
        self._heap: list[list[Any]] = []
        self._live = 0
        self._seq = 0
        self._thread: threading.Thread | None = None

    def _after_fork(self) -> None:
        # In a forked child the timer thread is gone (and its lock may be held by a
        # thread that no longer exists): start afresh, keeping the pending deadlines.
        self._cond = threading.Condition(threading.RLock())
        self._thread = None
        if self._live:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="bridgecancel deadline timer", daemon=True
        )
        self._thread.start()

    def schedule(self, token: CancelToken, deadline: float) -> list[Any]:
        with self._cond:
            self._seq += 1
            entry = [deadline, self._seq, weakref.ref(token, self._forget), True]
            heapq.heappush(self._heap, entry)
            self._live += 1
            if self._thread is None:
                self._start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def discard(self, entry: list[Any]) -> None:
        with self._cond:
            if entry[3]:
                entry[3] = False
                self._live -= 1
                if self._live == 0:
                    self._cond.notify()

    def _forget(self, ref: weakref.ref[CancelToken]) -> None:
        # A token with a pending deadline was garbage collected.
        with self._cond:
            for entry in self._heap:
                if entry[2] is ref and entry[3]:
                    entry[3] = False
                    self._live -= 1
            if self._live == 0:
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return self._live

    def _run(self) -> None:
        while True:
            with self._cond:
                heap = self._heap
                while True:
                    while heap and not heap[0][3]:
                        heapq.heappop(heap)
                    if not heap:
                        self._thread = None
                        return
                    delay = heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                entry = heapq.heappop(heap)
                entry[3] = False
                self._live -= 1
            token = entry[2]()
            if token is not None:
                token._fire_for_deadline()


_timer = _DeadlineTimer()
if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_timer._after_fork)

# -- the current token ----------------------------------------------------------------

_NEVER: Final = CancelToken(math.inf, _never=True)
_current: ContextVar[CancelToken] = ContextVar("bridgecancel_current_token")


def current_token() -> CancelToken:
    """The running job's token inside a bridgecancel worker (thread or process).

    Anywhere else, a token that is never cancelled, so library code can call
    ``current_token().check()`` unconditionally.
    """
    return _current.get(_NEVER)


def check_cancelled() -> None:
    """Raise `Cancelled` if the current job's token has fired (see `current_token`)."""
    token = _current.get(_NEVER)
    if token._fired:
        raise Cancelled._create(token, token._reason)
