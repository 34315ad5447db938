"""Cancel tokens: `CancelSource`, `CancelToken`, `any_of`.

Standard library only: the process-side worker imports this module, and it must start fast.
A token's state lives on the token (`_token_state`, which also says how it fires); a
source is the right to fire it. `Registration` is in `_registration`, `current_token` in
`_token_current`.
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
from typing import TYPE_CHECKING, Any, final

from ._compat import PosArgsT, Unpack
from ._exceptions import Cancelled
from ._registration import FOLLOWER, INLINE, USER, LeftOnExit, Registration
from ._seconds import check_deadline, check_seconds
from ._token_daemons import report_unraisable
from ._token_daemons import runner as _runner
from ._token_state import Deferred, TokenState, close_fds, poke, set_slot

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = ("CancelSource", "CancelToken", "any_of", "informative_source")


def _new_token(deadline: float, never: bool = False) -> CancelToken:
    fields = TokenState()
    set_slot(fields, "cancel_called", False)
    fields._reason = None
    fields._deadline = fields._fires_at = deadline
    fields._callbacks = {}
    fields._once = {}
    fields._wait_locks = deque()
    fields._fds = None
    fields._timer_entry = None
    fields._never = never
    fields.__class__ = CancelToken  # same layout: CancelToken adds no slots
    return fields  # type: ignore[return-value]


@final
class CancelToken(TokenState):
    """A read-only view of a cancellation: safe to hand to any code, in any thread.

    Get one from `CancelSource.token`, or `current_token()` inside a worker. Firing it
    takes no lock, so a signal handler may cancel its source at any instant.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        @property
        def cancel_called(self) -> bool:
            """True once cancelled or once the deadline has passed; never goes back.

            A plain attribute read (no call, no lock, no clock): cheaper than
            ``threading.Event.is_set()``, for hot loops.
            """

    def __new__(cls, *args: object, **kwargs: object) -> CancelToken:
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
    def _fired(self) -> bool:  # the older private name, still read by other modules
        return self.cancel_called

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
        self, fn: Callable[..., object], args: tuple[Any, ...], kind: int
    ) -> Registration:
        registration = Registration(self, fn, args)
        if self._never:
            return registration
        callbacks = self._callbacks
        callbacks[registration] = kind
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

@final
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
