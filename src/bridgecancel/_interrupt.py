"""Interrupt escalation for worker threads: raise `Cancelled` inside a job that ignores its token.

`JobGuard` wraps one job in a (possibly pooled) worker thread. From any other thread,
`JobGuard.interrupt` asks the interpreter to raise `Cancelled` in the worker at its next
Python bytecode checkpoint (``PyThreadState_SetAsyncExc``), but only while the job runs:

* an injection still pending when the job ends is cleared before `JobGuard.run` returns,
  so it never surfaces in the code around the job or in a later job on the same thread;
* while an injected `Cancelled` propagates (the job's ``finally`` blocks run), no second
  one is injected; if the job swallowed it (``except BaseException: pass``) and runs on,
  the next `interrupt` call injects again. The caller re-calls `interrupt` every
  ``_supervise.INTERRUPT_RETRY`` seconds until the job has ended.

Limits: a thread blocked in C code (``time.sleep``, a socket read, a lock) sees the
exception only when that call returns; use `bridgecancel.blocking` or
`CancelToken.on_cancel` to wake such calls. Like ``KeyboardInterrupt``, the exception can
land anywhere in the job's Python code, including inside library code that is not written
for it. CPython only (it needs ``ctypes.pythonapi``).

Standard library only.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar, final

from ._tokens import (
    INTERRUPTED_REASON,
    Cancelled,
    CancelToken,
    _NoPublicConstructor,
    shield_state,
)

__all__ = (
    "INTERRUPTED_REASON",
    "JobGuard",
)

T = TypeVar("T")


# int PyThreadState_SetAsyncExc(unsigned long id, PyObject *exc): exc is a class (the
# interpreter instantiates it in the target thread), or NULL to clear a pending one.
# Two prototypes, because a py_object argument cannot be NULL.
_set_async_exc: Final = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_async_exc: Final = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)

# Guard states.
_IDLE: Final = 0
_RUNNING: Final = 1
_DONE: Final = 2


class _InjectableMeta(_NoPublicConstructor):
    """Lets the interpreter build the injected exception by calling its class."""

    def __call__(cls, *args: object, **kwargs: object) -> Any:
        return cls._create(*args, **kwargs)


class _Injected(Cancelled, metaclass=_InjectableMeta):
    """Base of the per-guard classes handed to ``PyThreadState_SetAsyncExc``.

    The interpreter instantiates the class with no arguments, in the worker thread, when
    the exception is delivered; the instance records the delivery on its guard.
    """

    _guard: ClassVar[JobGuard]

    def __init__(self) -> None:
        guard = type(self)._guard
        super().__init__(guard._token, INTERRUPTED_REASON)
        guard._delivered(self)


@final
class JobGuard:
    """One job in a worker thread, which another thread may interrupt.

    Create it anywhere; call `run` once, in the worker thread; call `interrupt` from any
    thread while the job runs.

    Args:
        token: the job's token; the injected `Cancelled` carries it, with reason
            `INTERRUPTED_REASON`.
    """

    __slots__ = (
        "_exc_class",
        "_held",
        "_held_raised",
        "_holding",
        "_ident",
        "_injections",
        "_last",
        "_lock",
        "_pending",
        "_state",
        "_token",
    )

    def __init__(self, token: CancelToken) -> None:
        if not isinstance(token, CancelToken):
            raise TypeError(f"JobGuard() needs the job's CancelToken, got {token!r}")
        self._token = token
        self._lock = threading.Lock()
        self._state = _IDLE
        self._ident = 0
        self._exc_class: type[_Injected] | None = None
        self._injections = 0
        self._pending = False  # injected, not delivered yet
        self._holding = False  # in a `shield` block: interrupts are held, not injected
        self._held = False  # one fell due while holding: raised as the block ends
        self._held_raised = False  # a held one was raised
        self._last: weakref.ref[_Injected] | None = None  # the last delivered instance

    @property
    def finished(self) -> bool:
        """True once `run` has returned or raised (no injection can happen after that)."""
        return self._state == _DONE

    @property
    def interrupted(self) -> bool:
        """True if an injected `Cancelled` was raised in the job (even if it swallowed it),
        or one held by a `shield` block was raised as the block ended."""
        return self._last is not None or self._held_raised

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in this thread, open to `interrupt` while it runs.

        Returns or raises what `fn` does; an injected cancellation that `fn` let through
        is raised as a plain `Cancelled` with `INTERRUPTED_REASON`. An injection that had
        not been delivered when `fn` finished is dropped.

        Raises:
            RuntimeError: if called a second time.
        """
        with self._lock:
            if self._ident:
                raise RuntimeError("JobGuard.run() runs one job: create a guard per job")
            self._ident = threading.get_ident()
        shielding = shield_state
        outer, shielding.interrupter = shielding.interrupter, self
        try:
            return self._run(fn, *args)
        finally:
            shielding.interrupter = outer

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        failure: BaseException | None = None
        # interrupt() may inject from this store on; there is no bytecode checkpoint
        # between it and the try, so every injection is delivered inside the try.
        self._state = _RUNNING
        try:
            result = fn(*args)
        except BaseException as exc:
            # First thing after the job: no interrupt() starts from here on. No bytecode
            # checkpoint lies between fn's end and this store, so an injection is either
            # delivered inside fn (it was running) or dropped just below.
            self._state = _DONE
            failure = exc
        else:
            self._state = _DONE
        # An interrupt() that saw the job running may still be injecting (_clear waits
        # for it on the lock), and a pending injection may be delivered on the way into
        # _clear: at most two deliveries, each caught here, and the third _clear runs
        # with nothing left to deliver. Inline, so no checkpoint sits outside a try.
        try:
            self._clear()
        except _Injected:
            try:
                self._clear()
            except _Injected:
                self._clear()
        if failure is None:
            return result
        try:
            if isinstance(failure, _Injected):
                raise self._plain(failure)
            raise failure
        finally:
            failure = None  # no cycle through this frame

    def _clear(self) -> None:
        with self._lock:
            if self._injections:
                _clear_async_exc(self._ident, None)
            self._pending = False

    def _plain(self, exc: _Injected) -> Cancelled:
        """The injected exception as a plain `Cancelled`, with its traceback and context."""
        cancelled: Cancelled = Cancelled._create(self._token, INTERRUPTED_REASON)
        cancelled.__context__ = exc.__context__
        cancelled.__suppress_context__ = exc.__suppress_context__
        return cancelled.with_traceback(exc.__traceback__)

    def interrupt(self) -> bool:
        """Raise `Cancelled` in the job's thread at its next bytecode, if it still runs.

        Safe from any thread, any number of times. It does nothing (and returns False)
        when the job is not running, when an injection is already pending, or while an
        injected `Cancelled` is still propagating (so the job's ``finally`` blocks run
        undisturbed). It injects again once the job has swallowed the previous one.

        Returns:
            True if it armed an injection.
        """
        with self._lock:
            if self._state != _RUNNING or self._pending:
                return False
            if self._holding:
                self._held = True  # raised as the shield block ends
                return False
            last = self._last
            if last is not None and last() is not None:
                return False
            exc_class = self._exc_class
            if exc_class is None:
                exc_class = self._exc_class = _exception_class_for(self)
            if _set_async_exc(self._ident, exc_class) != 1:  # pragma: no cover
                # 0: no such thread (cannot happen while run() is in it); >1: the
                # interpreter asks to revert.
                _clear_async_exc(self._ident, None)
                return False
            self._injections += 1
            self._pending = True
            return True

    # -- `_tokens.shield`, in the job's own thread ------------------------------------------

    def hold(self) -> None:
        """A `shield` block begins: hold interrupts, and withdraw one on its way."""
        with self._lock:
            self._holding = True
            if self._pending:  # injected, not delivered: it would land inside the block
                _clear_async_exc(self._ident, None)
                self._pending = False
                self._held = True

    def release(self) -> bool:
        """The `shield` block ends: True if an interrupt fell due in it (raise it now)."""
        with self._lock:
            self._holding = False
            due, self._held = self._held, False
            if due:
                self._held_raised = True
            return due

    def _delivered(self, exc: _Injected) -> None:
        # Runs in the worker thread, from the interpreter, without the lock (the thread
        # could hold it). Plain stores: `interrupt` reads _pending after _last.
        self._last = weakref.ref(exc)
        self._pending = False


def _exception_class_for(guard: JobGuard) -> type[_Injected]:
    class InterruptedCancelled(_Injected):
        _guard = guard

    # Shown in tracebacks as the exception it stands for.
    InterruptedCancelled.__name__ = InterruptedCancelled.__qualname__ = "Cancelled"
    InterruptedCancelled.__module__ = "bridgecancel"
    return InterruptedCancelled
