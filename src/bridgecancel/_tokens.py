"""Cancel tokens: `CancelSource`, `CancelToken`, `Registration`, `any_of`, `Cancelled`, the
reasons bridgecancel's own cancellations carry, and the current job's token
(`current_token`, `check_cancelled`).

Standard library only: the worker process imports this module, and it must start fast.
A token's state lives on the token, and the token fires without taking a lock, so a
signal handler may fire it at any instant; a source is the right to fire it. The deadline
timer and the thread that runs detached callbacks are in `_timer`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, final

from ._timer import Entry, report_unraisable
from ._timer import runner as _runner
from ._timer import timer as _timer
from ._util import PosArgsT, Self, Unpack, check_deadline, check_seconds

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = (
    "CALLER_CANCELLED",
    "DEADLINE_REASON",
    "INTERRUPTED_REASON",
    "UNCLOSED_REASON",
    "CancelSource",
    "CancelToken",
    "Cancelled",
    "Registration",
    "any_of",
    "check_cancelled",
    "current_token",
    "informative_source",
    "shield",
    "use_token",
)

# -- the reasons bridgecancel's own cancellations carry ------------------------------------

DEADLINE_REASON: Final = "deadline exceeded"
"""A token whose deadline passed; also a job's, when its caller's deadline did."""

CALLER_CANCELLED: Final = "the caller was cancelled"
"""A job's token, when its caller was cancelled for any other reason."""

INTERRUPTED_REASON: Final = "interrupted"
"""The `Cancelled` raised inside a worker by ``interrupt_after=``."""

UNCLOSED_REASON: Final = "the iteration was left unclosed"
"""An `iterate` token, when its iteration was dropped, or its task ended, unclosed."""


# -- Cancelled -----------------------------------------------------------------------------


class _NoPublicConstructor(type):
    """Metaclass that stops users from building an instance by calling the class.

    `Cancelled` means "this token fired"; letting users construct one would let code
    claim a cancellation that never happened. Library code uses ``_create``.
    """

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor: "
            "call token.check() or token.sleep() to raise it"
        )

    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


class Cancelled(BaseException, metaclass=_NoPublicConstructor):
    """Raised by token code in a worker when its `CancelToken` has fired.

    A `BaseException`, like `asyncio.CancelledError` and `trio.Cancelled`, so that
    ``except Exception:`` in user code does not swallow it. Let it propagate: the
    bridge turns it back into the caller's native cancellation.

    Attributes:
        token: the token that fired (``None`` once it has crossed a process boundary).
        reason: the reason given to ``CancelSource.cancel()``, or ``"deadline exceeded"``.
    """

    token: CancelToken | None
    reason: str | None

    def __init__(self, token: CancelToken | None, reason: str | None) -> None:
        super().__init__(reason if reason is not None else "cancelled")
        self.token = token
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # The token belongs to one process; a copy carries only the reason.
        return (_rebuild_cancelled, (self.reason,))


def _rebuild_cancelled(reason: str | None) -> Cancelled:
    cancelled: Cancelled = Cancelled._create(None, reason)
    return cancelled


# -- registrations -------------------------------------------------------------------------

# How a registration runs when its token fires: its mode, as the value in the token's
# callbacks dict.
USER: Final = 1  # a user's callback: with `_cancel_detached`, runs in the runner thread
INLINE: Final = 2  # bridgecancel's own quick, non-blocking wake-up: runs in the canceller
FOLLOWER: Final = 3  # a child or `any_of` source: fires in the same way as this token


class LeftOnExit:
    """A context manager whose exit calls `_leave` (unregister, close), and no more."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._leave()

    def _leave(self) -> object:
        raise NotImplementedError


class Registration(LeftOnExit):
    """A callback registered with `CancelToken.on_cancel`.

    Use it as a context manager to unregister on exit, or call `unregister`.
    """

    __slots__ = ("_args", "_fn", "_token", "__weakref__")

    def __init__(
        self, token: CancelToken | None, fn: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._token = token  # None once it ran, is running, or was unregistered
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
        # Whoever pops a registration from the dict runs or drops it: exactly once.
        if not token._callbacks.pop(self, 0):
            return False
        self._token = None
        return True

    _leave = unregister


# -- tokens and sources --------------------------------------------------------------------

# Writes to a token's slots (users cannot assign to a token's attributes).
set_slot: Final = object.__setattr__
_object_new: Final = object.__new__
Deferred = list[tuple[object, Callable[..., object], tuple[Any, ...]]]
"""User callbacks to run later, each with its token (see `CancelSource._cancel_detached`)."""


class CancelToken:
    """A read-only view of a cancellation: safe to hand to any code, in any thread.

    Get one from `CancelSource.token`, or `current_token()` inside a worker. Firing it
    takes no lock, so a signal handler may cancel its source at any instant.
    """

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

    # Registration -> its mode (USER, INLINE or FOLLOWER), insertion-ordered.
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

    if TYPE_CHECKING:  # a plain slot, set only through set_slot

        @property
        def cancel_called(self) -> bool:
            """True once cancelled or once the deadline has passed; never goes back.

            A plain attribute read (no call, no lock, no clock): cheaper than
            ``threading.Event.is_set()``, for hot loops.
            """

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        raise TypeError(
            "CancelToken cannot be created directly: make a CancelSource and use its "
            ".token, or call current_token()"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"CancelToken is read-only: cannot set {name!r}; cancel it through its "
            "CancelSource"
        )

    def __repr__(self) -> str:
        if self.cancel_called:
            state = f"cancelled, reason={self._reason!r}"
        elif self._never:
            state = "never cancelled"
        else:
            state = "pending"
        if self._deadline != math.inf:
            state += f", remaining={self.remaining():.3f}s"
        return f"<CancelToken {state}>"

    # -- reading ----------------------------------------------------------------------

    # `cancel_called` is a plain slot: workers read it in hot loops, and a slot read
    # costs a fraction of threading.Event.is_set().

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
        if self.cancel_called:
            raise Cancelled._create(self, self._reason)

    # -- waiting ----------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token fires (True) or `timeout` seconds pass (False).

        Event-driven: it wakes as soon as `cancel` is called, without polling.
        """
        if self.cancel_called:
            return True
        if timeout is None:
            timeout = -1
        else:
            timeout = check_seconds(
                timeout, "wait", "timeout", none="to wait for ever", negative=True
            )
            if timeout > threading.TIMEOUT_MAX:  # math.inf: acquire would overflow
                timeout = -1
            elif timeout <= 0:
                return False
        # A lock of its own, released by the firer: a waiter interrupted at any point
        # (KeyboardInterrupt, say) can hold up no other waiter.
        waiter = _allocate_lock()
        waiter.acquire()
        waiters = self._wait_locks
        waiters.append(waiter)
        try:
            # After publishing: the firer either releases this lock or set the flag first.
            if self.cancel_called:
                return True
            return waiter.acquire(True, timeout) or self.cancel_called
        finally:
            try:
                waiters.remove(waiter)
            except ValueError:  # the firer took it
                pass

    def sleep(self, seconds: float) -> None:
        """Sleep like `time.sleep`, but raise `Cancelled` as soon as the token fires."""
        if self.wait(check_seconds(seconds, "sleep", "seconds")):
            raise Cancelled._create(self, self._reason)

    def fileno(self) -> int:
        """A descriptor that becomes readable when the token fires, for ``select``.

        Created on first use and closed when the token is garbage collected. Do not
        read from it or close it.
        """
        fds = self._fds
        if fds is None:
            new = os.pipe()
            os.set_blocking(new[1], False)
            fds = self._once.setdefault("fds", new)
            if fds is not new:  # another thread made one first
                close_fds(new)
                return int(fds[0])
            weakref.finalize(self, close_fds, fds)
            set_slot(self, "_fds", fds)
            # After publishing: a firer either saw the pipe or set the flag first.
            if self.cancel_called:
                poke(fds)
        return fds[0]

    # -- callbacks and children -------------------------------------------------------

    def on_cancel(
        self, fn: Callable[[Unpack[PosArgsT]], object], *args: Unpack[PosArgsT]
    ) -> Registration:
        """Run ``fn(*args)`` once when the token fires.

        The callback runs in the thread that fires the token (the deadline timer's
        thread for a deadline; bridgecancel's callback thread when the bridge cancels
        a job for its caller), outside any lock, newest registration first; it may use
        the token and register more callbacks. If the token has already fired, it runs
        at once in the caller. Errors from callbacks surface together from
        `CancelSource.cancel` as an exception group (otherwise they go to
        ``sys.unraisablehook``).
        """
        if not callable(fn):
            raise TypeError(f"on_cancel() needs a callable, got {fn!r}")
        return self._register(fn, args, USER)

    def _on_cancel_inline(self, fn: Callable[..., object], *args: Any) -> Registration:
        """`on_cancel` for bridgecancel's own wake-ups, which run in the cancelling
        thread even for `CancelSource._cancel_detached`. `fn` must be quick, never block
        and never raise."""
        return self._register(fn, args, INLINE)

    def _register(
        self, fn: Callable[..., object], args: tuple[Any, ...], mode: int
    ) -> Registration:
        registration = Registration(self, fn, args)
        if self._never:
            return registration
        callbacks = self._callbacks
        callbacks[registration] = mode
        # After publishing: the firer either took it from the dict, or set the flag
        # before and one of us pops it now.
        if self.cancel_called and callbacks.pop(registration, 0):
            registration._token = None
            fn(*args)
        return registration

    def child(self, *, deadline: float = math.inf) -> CancelSource:
        """A new source cancelled when this token is; it can also be cancelled alone.

        Its deadline is the earlier of `deadline` and this token's. Close the child
        (or use it as a context manager) when done, so this token forgets it.
        """
        deadline = check_deadline(deadline)
        source = CancelSource(deadline=min(deadline, self._fires_at))
        if self._deadline < source._token._deadline:
            set_slot(source._token, "_deadline", self._deadline)  # reported, never fired at
        if not self._never:
            source._follow(self)
        return source

    # -- firing (by its source, the deadline timer, or a parent) ------------------------

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
            mode = callbacks.pop(registration, 0)
            if not mode:
                continue  # unregistered, or run by on_cancel, meanwhile
            fn, args = registration._fn, registration._args
            registration._token = None
            if mode == FOLLOWER:
                follower = args[0]()
                if follower is not None:
                    errors += follower._token._fire(first[0], deferred)
            elif mode == USER and deferred is not None:
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


def _new_token(deadline: float, never: bool = False) -> CancelToken:
    """A token, built without `CancelToken.__new__`, which refuses users."""
    token: CancelToken = _object_new(CancelToken)
    set_slot(token, "cancel_called", False)
    set_slot(token, "_reason", None)
    set_slot(token, "_deadline", deadline)
    set_slot(token, "_fires_at", deadline)
    set_slot(token, "_callbacks", {})
    set_slot(token, "_once", {})
    set_slot(token, "_wait_locks", deque())
    set_slot(token, "_fds", None)
    set_slot(token, "_timer_entry", None)
    set_slot(token, "_never", never)
    return token


def close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        os.close(fd)


def poke(fds: tuple[int, int]) -> None:
    try:
        os.write(fds[1], b"\0")
    except OSError:  # full (it is readable already) or closed (nobody selects on it)
        pass


class CancelSource(LeftOnExit):
    """The right to cancel a `CancelToken`.

    Args:
        deadline: when the token fires by itself, in `time.monotonic` terms.
    """

    __slots__ = ("_parents", "_token", "__weakref__")

    def __init__(self, *, deadline: float = math.inf) -> None:
        self._token = _new_token(math.inf)
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
        return self._token.cancel_called

    @property
    def deadline(self) -> float:
        """The token's deadline in `time.monotonic` terms (`math.inf`: none).

        Setting it makes the token fire by itself when that time comes.
        """
        return self._token._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._token._set_deadline(value)

    def _inform(self, deadline: float) -> None:
        """Report `deadline` on the token without ever firing at it (see
        `informative_source`)."""
        set_slot(self._token, "_deadline", check_deadline(deadline))

    def cancel_after(self, seconds: float) -> None:
        """Set the deadline `seconds` from now."""
        seconds = check_seconds(seconds, "cancel_after", "seconds", negative=True)
        self._token._set_deadline(time.monotonic() + seconds)

    def cancel(self, reason: str | None = None) -> None:
        """Fire the token. Idempotent and thread-safe; the first reason wins.

        The token's callbacks, and those of its children, run in the calling thread
        before this returns. Safe to call from a signal handler (see the concepts page
        of the docs): it takes no lock.

        Raises:
            BaseExceptionGroup: if any `on_cancel` callbacks raised; all of them ran.
        """
        errors = self._token._fire(reason, None)
        if errors:
            raise BaseExceptionGroup("errors raised by on_cancel callbacks", errors)

    def _cancel_detached(self, reason: str | None) -> None:
        """`cancel`, but user callbacks run in bridgecancel's callback thread.

        The calling thread (the event loop's, for the bridge) only sets the flag and
        wakes every waiter: `CancelToken.wait`, `fileno`, the `bridgecancel.blocking`
        waits and the tokens that follow this one. Errors go to ``sys.unraisablehook``.
        Never raises and never runs user code.
        """
        deferred: Deferred = []
        for exc in self._token._fire(reason, deferred):  # from internal wake-ups only
            report_unraisable(exc, "Exception in an internal on_cancel callback", self)
        if deferred:
            _runner.submit(deferred)

    def close(self) -> None:
        """Detach from parent tokens and drop callbacks, without cancelling."""
        parents, self._parents = self._parents, []
        for registration in parents:
            registration.unregister()
        self._token._drop_callbacks()

    _leave = close

    def _follow(self, parent: CancelToken) -> None:
        """Fire when `parent` does, without the parent keeping this source alive."""
        holder: list[Registration] = []

        def forget(_: object) -> None:
            for registration in holder:
                registration.unregister()

        ref = weakref.ref(self, forget)
        registration = parent._register(_cancel_follower, (ref, parent), FOLLOWER)
        holder.append(registration)
        self._parents.append(registration)

    def _follow_while(self, parent: CancelToken) -> Registration:
        """Fire when `parent` does, until the registration returned is unregistered.

        Unlike `_follow`, the source keeps no record of it: for a parent that lasts a
        short while and is replaced (each step of `iterate` has its own job token), so
        that a long iteration does not pile up registrations.
        """
        return parent._register(_cancel_follower, (weakref.ref(self), parent), FOLLOWER)


def _cancel_follower(ref: weakref.ref[CancelSource], parent: CancelToken) -> None:
    # Runs only if the parent had fired when the follower registered (see _fire).
    source = ref()
    if source is not None:
        source.cancel(parent._reason)


def informative_source(deadline: float) -> CancelSource:
    """A source whose token reports `deadline` but never fires by itself at it.

    For a job's token: the caller's scope is what cancels it, so a deadline the caller
    has since pushed back never stops the job. ``token.child(deadline=d)`` fires at its
    own `d` only.
    """
    source = CancelSource()
    source._inform(deadline)
    return source


def any_of(*tokens: CancelToken) -> CancelSource:
    """A new source cancelled as soon as any of `tokens` is (with that token's reason)."""
    for token in tokens:
        if not isinstance(token, CancelToken):
            raise TypeError(
                f"any_of() takes CancelToken objects, got {token!r}; "
                "pass source.token rather than the source"
            )
    source = CancelSource(deadline=min((t._fires_at for t in tokens), default=math.inf))
    reported = min((token._deadline for token in tokens), default=math.inf)
    if reported < source._token._deadline:
        set_slot(source._token, "_deadline", reported)
    for token in tokens:
        if not token._never:
            source._follow(token)
    return source


# -- the current job's token ---------------------------------------------------------------

_NEVER: Final = _new_token(math.inf, never=True)
_current: ContextVar[CancelToken] = ContextVar("bridgecancel_current_token")


def current_token() -> CancelToken:
    """The running job's token inside a bridgecancel worker (thread or process), or the
    token made current by `use_token`.

    Anywhere else, and inside `shield`, a token that is never cancelled, so library code
    can call ``current_token().check()`` unconditionally.
    """
    return _current.get(_NEVER)


def check_cancelled() -> None:
    """Raise `Cancelled` if the current job's token has fired (see `current_token`)."""
    token = _current.get(_NEVER)
    if token.cancel_called:
        raise Cancelled._create(token, token._reason)


@final
class use_token:  # a context manager, named as the function it stands for
    """Make `token` the current token in the block: ``with use_token(token):``.

    For sync code that bridgecancel did not start (a plain test, a thread pool of your
    own, a GUI thread): library code inside the block that calls `current_token()` or
    `check_cancelled()`, or a `bridgecancel.blocking` wait, sees `token`. The token that
    was current before is restored when the block exits. Blocks nest. Per thread (a
    context variable): a thread started inside the block does not inherit it, unless it
    runs in a copy of this context (``contextvars.copy_context().run``, as
    ``anyio.to_thread`` and ``asyncio.to_thread`` do).

    Raises:
        TypeError: if `token` is not a `CancelToken` (pass ``source.token``).
    """

    __slots__ = ("_reset", "_token")

    def __init__(self, token: CancelToken) -> None:
        if not isinstance(token, CancelToken):
            raise TypeError(
                f"use_token() takes a CancelToken, got {token!r}; pass source.token "
                "rather than the source"
            )
        self._token = token
        self._reset: Token[CancelToken] | None = None

    def __enter__(self) -> CancelToken:
        if self._reset is not None:
            raise RuntimeError("this use_token() block is already entered; make one per block")
        self._reset = _current.set(self._token)
        return self._token

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        reset, self._reset = self._reset, None
        assert reset is not None
        _current.reset(reset)


# -- critical sections -------------------------------------------------------------------------


class Interrupter(Protocol):
    """What raises `Cancelled` inside the running job (a thread's `_interrupt.JobGuard`, a
    worker process's signal handler), as `shield` sees it."""

    def hold(self) -> None:
        """From now on, keep an interrupt that falls due (and withdraw one on its way)."""

    def release(self) -> bool:
        """Stop holding; True if an interrupt fell due meanwhile (it is then raised)."""
        ...


class _ShieldState(threading.local):
    """Per thread: how deep in `shield` blocks the thread is, and its job's interrupter."""

    depth = 0
    interrupter: Interrupter | None = None


shield_state: Final = _ShieldState()


@final
class shield:  # a context manager, named as the function it stands for
    """A critical section in a worker: ``with shield():``.

    Inside the block `current_token()` is a token that never fires (so
    `check_cancelled()` does not raise and the `bridgecancel.blocking` waits are not
    cancelled), and an interrupt (``interrupt_after=``) that falls due is held until the
    block ends and raised right after it. After the block the job's token is current
    again, fired if the cancel came meanwhile: check it. Use it around work that must not
    be cut in the middle (a commit, a file being written); keep it short, since the
    caller waits for it. The kill stage of a process job (``kill_after=``) is never held:
    it ends the worker process, critical section or not. Blocks nest; outside a worker
    only the token is shielded.
    """

    __slots__ = ("_using",)

    def __init__(self) -> None:
        self._using: use_token | None = None

    def __enter__(self) -> None:
        if self._using is not None:
            raise RuntimeError("this shield() block is already entered; make one per block")
        state = shield_state
        interrupter = state.interrupter
        if state.depth == 0 and interrupter is not None:
            try:
                interrupter.hold()
            except BaseException:  # an interrupt landed just before the section began
                interrupter.release()
                raise
        state.depth += 1
        self._using = use_token(_NEVER)
        self._using.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        using, self._using = self._using, None
        assert using is not None
        using.__exit__(exc_type, exc_value, traceback)
        state = shield_state
        state.depth -= 1
        interrupter = state.interrupter
        if state.depth == 0 and interrupter is not None and interrupter.release():
            raise Cancelled._create(_current.get(_NEVER), INTERRUPTED_REASON)
