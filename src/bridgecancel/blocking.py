"""Token-aware blocking calls: each waits on a stdlib primitive and on a token together.

Every function here waits like the call it wraps (same return value, same timeout
semantics, same exceptions) and, in addition, raises `Cancelled` as soon as the token
fires: the token given as ``token=``, else `current_token()` (which, outside a
bridgecancel worker, never fires: the functions then simply call the wrapped method).

Cancellation semantics, common to all of them:

* A token that has already fired raises `Cancelled` before any waiting, even if the
  primitive is ready (an event set, an item queued): each call is a checkpoint.
* A cancel never alters the primitive: the queue keeps its items, a lock or semaphore
  keeps its state, the event is not set, the socket stays open and in its mode. A
  notification that the cancelled waiter had already received is passed on to another
  waiter. The exceptions are the operations that have started to act on the world:
  `sendall` may have sent part of the data, `connect` leaves the connection attempt
  running (close the socket), and the process functions stop the child.
* Timeouts are seconds or None (no limit); a negative or NaN timeout is refused with
  `ValueError` (the stdlib calls disagree on what it would mean).
* Wake-up is event-driven (no polling) for events, conditions, semaphores, queues,
  futures, sockets, descriptors, and child processes on Linux (pidfd). `Lock` and
  `RLock` cannot be woken from outside without being released, so `acquire` waits on
  them in slices of at most `POLL_SLICE` seconds (10 ms), as do child processes where
  the OS has no pidfd, and descriptors where ``select.poll`` is missing (Windows).

Waking a thread that waits on a condition variable uses the internals of CPython's
``threading.Condition`` (its waiter list); where they are not as expected, the waits fall
back to `POLL_SLICE` slices, with the same semantics.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import io
import math
import os
import queue
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Final, Protocol, TypeVar

from ._exceptions import Cancelled
from ._token import _NEVER, CancelToken, current_token

__all__ = (
    "DEFAULT_GRACE",
    "POLL_SLICE",
    "accept",
    "acquire",
    "connect",
    "future_result",
    "queue_get",
    "queue_put",
    "recv",
    "run_subprocess",
    "sendall",
    "wait_condition",
    "wait_event",
    "wait_process",
    "wait_readable",
    "wait_writable",
)

T = TypeVar("T")

POLL_SLICE: Final = 0.01
"""The longest slice (seconds) of a wait that cannot be woken from outside: the bound
on how late such a wait notices a cancel."""

DEFAULT_GRACE: Final = 5.0
"""Seconds a child process gets between SIGTERM and SIGKILL when its wait is cancelled."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


_Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_Command = _Arg | Sequence[_Arg]


# -- arguments ------------------------------------------------------------------------


def _token(token: CancelToken | None, caller: str) -> CancelToken:
    if token is None:
        return current_token()
    if not isinstance(token, CancelToken):
        raise TypeError(
            f"{caller}(token=...) takes a CancelToken, got {token!r}; "
            "pass source.token rather than the source"
        )
    return token


def _deadline(timeout: float | None, caller: str) -> float | None:
    """The monotonic deadline for `timeout` seconds from now (None: wait forever)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"{caller}() timeout must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(
            f"{caller}() timeout must be a non-negative number of seconds or None "
            f"(for no limit), got {timeout!r}"
        )
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _cancelled(token: CancelToken) -> Cancelled:
    cancelled: Cancelled = Cancelled._create(token, token.reason)
    return cancelled


def _check_type(obj: object, expected: type | tuple[type, ...], caller: str, hint: str) -> None:
    if not isinstance(obj, expected):
        raise TypeError(f"{caller}() needs {hint}, got {obj!r}")


# -- waiting on a threading.Condition ---------------------------------------------------


def _notify_tolerates_released_waiter() -> bool:
    """Whether ``Condition.notify`` skips a waiter lock that is already released.

    The cancel side releases the waiter lock itself, so a notify may meet it released;
    CPython tolerates that since gh-92530 (3.10.5). Probed rather than version-checked.
    """
    cond = threading.Condition(threading.Lock())
    if not isinstance(getattr(cond, "_waiters", None), collections.deque):
        return False
    released = threading.Lock()
    with cond:
        cond._waiters.append(released)  # type: ignore[attr-defined]
        try:
            cond.notify()
        except RuntimeError:
            return False
        finally:
            if released in cond._waiters:  # type: ignore[attr-defined]
                cond._waiters.remove(released)  # type: ignore[attr-defined]
    return True


_WAKEABLE_CONDITIONS: Final = _notify_tolerates_released_waiter()


def _wakeable(cond: threading.Condition) -> bool:
    return _WAKEABLE_CONDITIONS and isinstance(getattr(cond, "_waiters", None), collections.deque)


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


def _wait_cond(cond: threading.Condition, token: CancelToken, timeout: float | None) -> bool:
    """``cond.wait(timeout)`` that also wakes when `token` fires. The caller holds `cond`.

    Returns True if notified, False on timeout (a notify that arrives just after the
    timeout counts, rather than being lost as in ``Condition.wait``). Raises `Cancelled`
    if the token fired, after passing on a notification it may have consumed.
    """
    if token.cancel_called:
        raise _cancelled(token)
    if not _wakeable(cond):
        return _wait_cond_sliced(cond, token, timeout)
    # As Condition.wait does, with a waiter lock the token can release too.
    waiter = threading.Lock()
    waiter.acquire()
    waker = _Waker(waiter)
    waiters: collections.deque[Any] = cond._waiters  # type: ignore[attr-defined]
    waiters.append(waiter)
    saved = cond._release_save()  # type: ignore[attr-defined]
    got = False
    try:
        with token.on_cancel(waker):
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
        raise _cancelled(token)
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


def _wait_cond_sliced(cond: threading.Condition, token: CancelToken, timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = _remaining(deadline)
        step = POLL_SLICE if remaining is None else min(POLL_SLICE, remaining)
        notified = cond.wait(step)
        if token.cancel_called:
            if notified:
                cond.notify()
            raise _cancelled(token)
        if notified:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


# -- threading and queue primitives -----------------------------------------------------


def wait_event(
    event: threading.Event, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """``event.wait(timeout)``, raising `Cancelled` as soon as the token fires.

    Returns True once the event is set, False if `timeout` seconds pass first. A
    cancel leaves the event as it was. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    _check_type(event, threading.Event, "wait_event", "a threading.Event")
    deadline = _deadline(timeout, "wait_event")
    token = _token(token, "wait_event")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return event.wait(timeout)
    cond: threading.Condition = event._cond  # type: ignore[attr-defined]
    with cond:
        if event.is_set():
            return True
        return _wait_cond(cond, token, _remaining(deadline))


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
    _check_type(cond, threading.Condition, "wait_condition", "a threading.Condition")
    if not callable(predicate):
        raise TypeError(
            f"wait_condition() needs a predicate to call, got {predicate!r}; "
            "pass e.g. `lambda: len(items) > 0`"
        )
    deadline = _deadline(timeout, "wait_condition")
    token = _token(token, "wait_condition")
    if not cond._is_owned():  # type: ignore[attr-defined]
        raise RuntimeError(
            "cannot wait on un-acquired lock: call wait_condition() inside `with cond:`"
        )
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return cond.wait_for(predicate, timeout)
    result = predicate()
    while not result:
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            break
        _wait_cond(cond, token, remaining)
        result = predicate()
    return result


def acquire(lock: _Lock, timeout: float | None = None, *, token: CancelToken | None = None) -> bool:
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
    deadline = _deadline(timeout, "acquire")
    token = _token(token, "acquire")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return lock.acquire() if timeout is None else lock.acquire(True, timeout)
    if isinstance(lock, threading.Semaphore) and _wakeable(lock._cond):  # type: ignore[attr-defined]
        return _acquire_semaphore(lock, token, deadline)
    while True:
        remaining = _remaining(deadline)
        step = POLL_SLICE if remaining is None else min(POLL_SLICE, remaining)
        if lock.acquire(True, step) if step > 0 else lock.acquire(False):
            return True
        if token.cancel_called:
            raise _cancelled(token)
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _acquire_semaphore(
    sem: threading.Semaphore, token: CancelToken, deadline: float | None
) -> bool:
    cond: threading.Condition = sem._cond  # type: ignore[attr-defined]
    while True:
        if sem.acquire(False):
            return True
        with cond:
            while not sem._value:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    return False
                _wait_cond(cond, token, remaining)


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
    _check_type(q, queue.Queue, "queue_get", "a queue.Queue (or a subclass)")
    deadline = _deadline(timeout, "queue_get")
    token = _token(token, "queue_get")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return q.get(True, timeout)
    while True:
        try:
            return q.get(False)
        except queue.Empty:
            pass
        with q.not_empty:
            while not q._qsize() and not getattr(q, "is_shutdown", False):
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                _wait_cond(q.not_empty, token, remaining)


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
    _check_type(q, queue.Queue, "queue_put", "a queue.Queue (or a subclass)")
    deadline = _deadline(timeout, "queue_put")
    token = _token(token, "queue_put")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return q.put(item, True, timeout)
    while True:
        try:
            return q.put(item, False)
        except queue.Full:
            pass
        with q.not_full:
            while 0 < q.maxsize <= q._qsize() and not getattr(q, "is_shutdown", False):
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise queue.Full
                _wait_cond(q.not_full, token, remaining)


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
    _check_type(
        fut,
        concurrent.futures.Future,
        "future_result",
        "a concurrent.futures.Future (for an asyncio future, await it instead)",
    )
    deadline = _deadline(timeout, "future_result")
    token = _token(token, "future_result")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never:
        return fut.result(timeout)
    cond: threading.Condition = fut._condition
    with cond:
        while not fut.done():
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                break
            _wait_cond(cond, token, remaining)
    # Done, or timed out: let the future raise exactly what result() raises.
    return fut.result(timeout=0)


# -- descriptors and sockets ------------------------------------------------------------

_HAVE_POLL: Final = hasattr(select, "poll")
_READ: Final = getattr(select, "POLLIN", 1)  # not POLLPRI: urgent data is not for recv()
_WRITE: Final = getattr(select, "POLLOUT", 4)
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)


def _fd_of(fd: int | _HasFileno, caller: str) -> int:
    if isinstance(fd, int) and not isinstance(fd, bool):
        number = fd
    elif callable(getattr(fd, "fileno", None)):
        number = fd.fileno()  # type: ignore[union-attr]
    else:
        raise TypeError(
            f"{caller}() needs a file descriptor (an int) or an object with fileno(), got {fd!r}"
        )
    if number < 0:
        raise ValueError(f"{caller}() got file descriptor {number}: is it closed?")
    return number


def _wait_fd(fd: int, events: int, token: CancelToken, deadline: float | None) -> bool:
    """Wait until `fd` is ready for `events` (True) or the deadline passes (False).

    Raises `Cancelled` when the token fires. Errors and hang-ups count as ready, so that
    the call that follows reports them.
    """
    if token.cancel_called:
        raise _cancelled(token)
    if not _HAVE_POLL:  # pragma: no cover - Windows: select() takes sockets only
        return _wait_fd_sliced(fd, events, token, deadline)
    poller = select.poll()
    poller.register(fd, events)
    if not token._never:
        poller.register(token.fileno(), select.POLLIN)
    while True:
        remaining = _remaining(deadline)
        ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
        if token.cancel_called:
            raise _cancelled(token)
        if any(ready_fd == fd for ready_fd, _ in ready):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _wait_fd_sliced(
    fd: int, events: int, token: CancelToken, deadline: float | None
) -> bool:  # pragma: no cover - Windows only
    want_read = bool(events & _READ)
    while True:
        remaining = _remaining(deadline)
        step = POLL_SLICE if remaining is None else min(POLL_SLICE, remaining)
        readable, writable, errored = select.select(
            [fd] if want_read else [], [] if want_read else [fd], [fd], step
        )
        if token.cancel_called:
            raise _cancelled(token)
        if readable or writable or errored:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def wait_readable(
    fd: int | _HasFileno, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """Wait until `fd` (a descriptor, or an object with ``fileno()``) is readable.

    Returns True when it is (an error or hang-up counts, so that the read reports it),
    False if `timeout` seconds pass first. Reads nothing. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    number = _fd_of(fd, "wait_readable")
    deadline = _deadline(timeout, "wait_readable")
    return _wait_fd(number, _READ, _token(token, "wait_readable"), deadline)


def wait_writable(
    fd: int | _HasFileno, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """Wait until `fd` (a descriptor, or an object with ``fileno()``) is writable.

    Returns True when it is (an error or hang-up counts), False if `timeout` seconds
    pass first. Writes nothing. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    number = _fd_of(fd, "wait_writable")
    deadline = _deadline(timeout, "wait_writable")
    return _wait_fd(number, _WRITE, _token(token, "wait_writable"), deadline)


def _check_socket(sock: object, caller: str) -> None:
    _check_type(sock, socket.socket, caller, "a socket.socket")


def _socket_deadline(sock: socket.socket) -> float | None:
    timeout = sock.gettimeout()
    return None if timeout is None else time.monotonic() + timeout


def _timed_out() -> TimeoutError:
    return TimeoutError("timed out")  # what a socket with a timeout raises


def recv(
    sock: socket.socket, bufsize: int, flags: int = 0, *, token: CancelToken | None = None
) -> bytes:
    """``sock.recv(bufsize, flags)``, raising `Cancelled` as soon as the token fires.

    Follows the socket's own timeout: ``None`` waits for data, a number raises
    `TimeoutError` after that long, and a non-blocking socket raises `BlockingIOError`
    at once, as ``recv`` does. A cancelled call reads nothing: the socket stays open and
    unchanged. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    _check_socket(sock, "recv")
    token = _token(token, "recv")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never or sock.gettimeout() == 0.0:
        return sock.recv(bufsize, flags)
    tls = hasattr(sock, "pending")  # ssl.SSLSocket: takes no flags, may hold data
    if tls and sock.pending():  # type: ignore[attr-defined]
        return sock.recv(bufsize, flags)
    deadline = _socket_deadline(sock)
    while True:
        if not _wait_fd(sock.fileno(), _READ, token, deadline):
            raise _timed_out()
        if tls:
            return sock.recv(bufsize, flags)
        try:
            # MSG_DONTWAIT: never block here, even if another reader took the data.
            return sock.recv(bufsize, flags | _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue


def sendall(
    sock: socket.socket, data: Any, flags: int = 0, *, token: CancelToken | None = None
) -> None:
    """``sock.sendall(data, flags)``, raising `Cancelled` as soon as the token fires.

    The socket's timeout bounds the whole call, as for ``sendall``. A cancel can come
    after part of the data was sent (the count is lost, as when ``sendall`` fails): the
    socket stays open, but what the peer received is unknown, so close it. Event-driven.

    Raises:
        Cancelled: if the token fires before or during the sending.
    """
    _check_socket(sock, "sendall")
    token = _token(token, "sendall")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never or sock.gettimeout() == 0.0:
        return sock.sendall(data, flags)
    if hasattr(sock, "pending"):  # ssl.SSLSocket: whole records, no flags
        if not _wait_fd(sock.fileno(), _WRITE, token, _socket_deadline(sock)):
            raise _timed_out()
        return sock.sendall(data, flags)
    view = memoryview(data).cast("B")
    deadline = _socket_deadline(sock)
    sent = 0
    while sent < len(view):
        if not _wait_fd(sock.fileno(), _WRITE, token, deadline):
            raise _timed_out()
        try:
            sent += sock.send(view[sent:], flags | _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue


def accept(sock: socket.socket, *, token: CancelToken | None = None) -> tuple[socket.socket, Any]:
    """``sock.accept()``, raising `Cancelled` as soon as the token fires.

    Follows the listening socket's timeout, as ``accept`` does. A cancelled call accepts
    nothing: pending connections stay queued. Event-driven: no polling. (On a blocking
    socket shared by several acceptors, one that loses the race for a connection waits
    in ``accept`` for the next one without seeing the token: give the socket a timeout.)

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    _check_socket(sock, "accept")
    token = _token(token, "accept")
    if token.cancel_called:
        raise _cancelled(token)
    if token._never or sock.gettimeout() == 0.0:
        return sock.accept()
    if not _wait_fd(sock.fileno(), _READ, token, _socket_deadline(sock)):
        raise _timed_out()
    return sock.accept()


def connect(sock: socket.socket, address: Any, *, token: CancelToken | None = None) -> None:
    """``sock.connect(address)``, raising `Cancelled` as soon as the token fires.

    Follows the socket's timeout. The connection is made in non-blocking mode and the
    socket's mode is restored before returning or raising. A cancel leaves the attempt
    in progress in the OS, as a timeout does: close the socket. Host names are resolved
    before the wait, without the token: pass an IP address for a cancellable connect.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    _check_socket(sock, "connect")
    token = _token(token, "connect")
    if token.cancel_called:
        raise _cancelled(token)
    timeout = sock.gettimeout()
    if token._never or timeout == 0.0:
        return sock.connect(address)
    deadline = _socket_deadline(sock)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(address)
        if err in _CONNECTING:
            if not _wait_fd(sock.fileno(), _WRITE, token, deadline):
                raise _timed_out()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err and err != errno.EISCONN:
            raise OSError(err, os.strerror(err))  # the errno's subclass, as connect()
    finally:
        sock.settimeout(timeout)


# A non-blocking connect in progress: EINPROGRESS (POSIX), WSAEWOULDBLOCK (Windows).
_CONNECTING: Final = {errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)}


# -- child processes --------------------------------------------------------------------


def _pidfd(pid: int) -> int | None:
    """A descriptor readable once `pid` exits (Linux 5.3+), or None."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # pragma: no cover - not Linux
        return None
    try:
        fd: int = pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    return fd


def _wait_exit(proc: subprocess.Popen[Any], token: CancelToken, deadline: float | None) -> bool:
    """Wait until the child exits (True, not reaped yet) or the deadline passes (False)."""
    if proc.returncode is not None:
        return True
    fd = _pidfd(proc.pid)
    if fd is not None:
        try:
            return _wait_fd(fd, select.POLLIN, token, deadline)
        finally:
            os.close(fd)
    while proc.poll() is None:  # no pidfd: slices
        if token.cancel_called:
            raise _cancelled(token)
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return False
        token.wait(POLL_SLICE if remaining is None else min(POLL_SLICE, remaining))
    return True


def _own_group(proc: subprocess.Popen[Any]) -> int | None:
    """The child's process group, if it leads one of its own (else None)."""
    try:
        pgid = os.getpgid(proc.pid)
    except (ProcessLookupError, AttributeError):  # gone, or not POSIX
        return None
    return pgid if pgid == proc.pid and pgid != os.getpgrp() else None


def _signal(proc: subprocess.Popen[Any], pgid: int | None, signum: int) -> None:
    if pgid is None:
        if proc.returncode is None:
            proc.send_signal(signum)
        return
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process but zombies is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed user
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no procfs: trust kill(0)
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class _Stopper:
    """Stops a child: SIGTERM from the cancelling thread, the rest in the waiting one.

    Registered with ``on_cancel`` while the child is waited on, so the child gets its
    SIGTERM the moment ``cancel()`` is called, while the waiter wakes up. The waiter
    calls `finish` before it reaps the child, after which no signal is sent from the
    callback (a reaped child's pid can be reused).
    """

    __slots__ = ("done", "mutex", "pgid", "proc", "terminated")

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.pgid = _own_group(proc) if proc.returncode is None else None
        self.mutex = threading.Lock()
        self.done = False
        self.terminated = False

    def __call__(self) -> None:
        with self.mutex:
            if not self.done and not self.terminated:
                self.terminated = True
                _signal(self.proc, self.pgid, signal.SIGTERM)

    def finish(self) -> None:
        with self.mutex:
            self.done = True

    def stop(self, grace: float) -> None:
        """Terminate the child (its whole group if it leads one), kill it after `grace`.

        Returns once the child is reaped and nothing but zombies is left in its group
        (a killed process takes a moment to die). The child's own children in the
        group get the rest of the grace; a group has no descriptor to wait on, so it is
        checked every `POLL_SLICE`. Its id cannot be reused while any member is left.
        """
        proc, pgid = self.proc, self.pgid
        end = time.monotonic() + grace
        with self.mutex:
            self.done = True
            if not self.terminated:
                self.terminated = True
                _signal(proc, pgid, signal.SIGTERM)
        killed = False
        if not _wait_exit(proc, _NEVER, end):
            _signal(proc, pgid, signal.SIGKILL)
            killed = True
        proc.wait()
        if pgid is None:
            return
        while _group_alive(pgid):
            if not killed and time.monotonic() >= end:
                _signal(proc, pgid, signal.SIGKILL)
                killed = True
            time.sleep(POLL_SLICE)


def wait_process(
    proc: subprocess.Popen[Any],
    timeout: float | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    token: CancelToken | None = None,
) -> int:
    """``proc.wait(timeout)``, stopping the child and raising `Cancelled` on cancel.

    Returns the child's exit code. On cancel (also when the token has already fired),
    the child gets SIGTERM, and SIGKILL if it has not exited `grace` seconds later; if
    it leads its own process group (``start_new_session=True`` or ``process_group=0``),
    the signals go to the whole group, whose members also get the rest of `grace`.
    `Cancelled` is raised once the child is reaped and its group is empty.
    Event-driven where the OS has pidfd (Linux 5.3+); elsewhere slices of `POLL_SLICE`.

    Raises:
        Cancelled: if the token fires before or during the wait.
        subprocess.TimeoutExpired: if `timeout` seconds pass first (the child runs on).
    """
    _check_type(proc, subprocess.Popen, "wait_process", "a subprocess.Popen")
    deadline = _deadline(timeout, "wait_process")
    grace = _check_grace(grace, "wait_process")
    token = _token(token, "wait_process")
    if token._never:
        return proc.wait(timeout)
    stopper = _Stopper(proc)
    try:
        with token.on_cancel(stopper):
            if token.cancel_called:
                raise _cancelled(token)
            if not _wait_exit(proc, token, deadline):
                raise subprocess.TimeoutExpired(proc.args, timeout)  # type: ignore[arg-type]
    except Cancelled:
        stopper.stop(grace)
        raise
    stopper.finish()
    return proc.wait()


def _check_grace(grace: float, caller: str) -> float:
    if not isinstance(grace, (int, float)) or isinstance(grace, bool):
        raise TypeError(f"{caller}() grace must be a number of seconds, got {grace!r}")
    if math.isnan(grace) or grace < 0:
        raise ValueError(
            f"{caller}() grace must be a non-negative number of seconds, got {grace!r}"
        )
    return float(grace)


def _codec(encoding: str | None, errors: str | None) -> tuple[str, str]:
    """The encoding and error handler ``Popen`` would use for text pipes."""
    probe = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)
    return probe.encoding, probe.errors or "strict"


def _decode(data: bytes, codec: tuple[str, str]) -> str:
    # As Popen.communicate does in text mode: decode, then universal newlines.
    return data.decode(*codec).replace("\r\n", "\n").replace("\r", "\n")


class _Output:
    """What a child wrote to its pipes so far."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[bytes]] = {}

    def of(self, file: IO[bytes] | None) -> bytes | None:
        if file is None:
            return None
        return b"".join(self.chunks.get(id(file), []))


def _communicate(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    token: CancelToken,
    deadline: float | None,
    output: _Output,
) -> None:
    """``proc.communicate(data)`` that also wakes when the token fires; no reaping.

    Raises `Cancelled` or `subprocess.TimeoutExpired` (without output: the caller adds
    it) with the pipes still open.
    """
    if proc.stdin is not None and not data:
        proc.stdin.close()
    if not _HAVE_POLL:  # pragma: no cover - Windows
        _communicate_sliced(proc, data, token, deadline, output)
        return
    poller = select.poll()
    files: dict[int, IO[bytes]] = {}
    if proc.stdin is not None and data:
        files[proc.stdin.fileno()] = proc.stdin
        poller.register(proc.stdin.fileno(), select.POLLOUT)
    for file in (proc.stdout, proc.stderr):
        if file is not None:
            output.chunks[id(file)] = []
            files[file.fileno()] = file
            poller.register(file.fileno(), _READ)
    if not token._never:
        poller.register(token.fileno(), select.POLLIN)
    view = memoryview(data or b"")
    offset = 0
    while files:
        remaining = _remaining(deadline)
        ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
        if token.cancel_called:
            raise _cancelled(token)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, 0)
        for fd, _ in ready:
            file = files.get(fd)
            if file is None:
                continue
            if file is proc.stdin:
                try:
                    offset += os.write(fd, view[offset : offset + select.PIPE_BUF])
                except BrokenPipeError:
                    offset = len(view)
                done = offset >= len(view)
            else:
                chunk = os.read(fd, 65536)
                output.chunks[id(file)].append(chunk)
                done = not chunk
            if done:
                poller.unregister(fd)
                del files[fd]
                file.close()
    if not _wait_exit(proc, token, deadline):
        raise subprocess.TimeoutExpired(proc.args, 0)


def _communicate_sliced(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    token: CancelToken,
    deadline: float | None,
    output: _Output,
) -> None:  # pragma: no cover - Windows only
    first = True
    while True:
        remaining = _remaining(deadline)
        step = POLL_SLICE if remaining is None else min(POLL_SLICE, remaining)
        try:
            out, err = proc.communicate(data if first else None, timeout=step)
        except subprocess.TimeoutExpired:
            first = False
            if token.cancel_called:
                raise _cancelled(token) from None
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        for file, chunk in ((proc.stdout, out), (proc.stderr, err)):
            if file is not None:
                output.chunks[id(file)] = [chunk]
        return


def run_subprocess(
    args: _Command,
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    grace: float = DEFAULT_GRACE,
    token: CancelToken | None = None,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(args, ...)``, stopping the child and raising `Cancelled` on cancel.

    Takes ``subprocess.run``'s arguments (`input`, `capture_output`, `timeout`, `check`,
    and ``Popen``'s: ``stdout``, ``text``, ``cwd``, ...) and returns the same
    `subprocess.CompletedProcess`. The child is started in a new session (its own
    process group) unless ``start_new_session`` or ``process_group`` is given, so that
    a cancel or a timeout reaches the processes it starts too.

    On cancel (including a token that has already fired: the child is then never
    started), the group gets SIGTERM, then SIGKILL `grace` seconds later if anything is
    left in it; `Cancelled` is raised once the child is reaped and the group is empty.
    On timeout, the group is killed at once, as ``subprocess.run`` kills the child.
    Event-driven on Linux (pipes and pidfd); elsewhere slices of `POLL_SLICE`.

    Raises:
        Cancelled: if the token fires before or while the child runs.
        subprocess.TimeoutExpired: if `timeout` seconds pass first (with the output so far).
        subprocess.CalledProcessError: if `check` is true and the exit code is not 0.
        ValueError: for argument combinations ``subprocess.run`` refuses.
    """
    deadline = _deadline(timeout, "run_subprocess")
    grace = _check_grace(grace, "run_subprocess")
    token = _token(token, "run_subprocess")
    if token.cancel_called:
        raise _cancelled(token)
    # Pipes stay binary; text mode is applied here, as Popen.communicate does it.
    text = popen_kwargs.pop("text", None)
    universal_newlines = popen_kwargs.pop("universal_newlines", None)
    encoding = popen_kwargs.pop("encoding", None)
    errors = popen_kwargs.pop("errors", None)
    text_mode = bool(text or universal_newlines or encoding or errors)
    codec = _codec(encoding, errors) if text_mode else None
    if input is not None:
        if "stdin" in popen_kwargs:
            raise ValueError("stdin and input arguments may not both be used.")
        popen_kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        if "stdout" in popen_kwargs or "stderr" in popen_kwargs:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    if "start_new_session" not in popen_kwargs and "process_group" not in popen_kwargs:
        popen_kwargs["start_new_session"] = True
    data = _encode_input(input, codec)
    output = _Output()
    proc: subprocess.Popen[bytes] = subprocess.Popen(args, **popen_kwargs)
    stopper = _Stopper(proc)
    try:
        with token.on_cancel(stopper):
            _communicate(proc, data, token, deadline, output)
        stopper.finish()
    except Cancelled:
        stopper.stop(grace)
        raise
    except subprocess.TimeoutExpired:
        stopper.stop(0)  # no grace: subprocess.run kills at once
        raise subprocess.TimeoutExpired(
            proc.args, timeout or 0, output.of(proc.stdout), output.of(proc.stderr)
        ) from None
    except BaseException:
        stopper.stop(0)
        raise
    finally:
        for file in (proc.stdin, proc.stdout, proc.stderr):
            if file is not None:
                file.close()
    returncode = proc.wait()
    stdout, stderr = output.of(proc.stdout), output.of(proc.stderr)
    result: subprocess.CompletedProcess[Any] = subprocess.CompletedProcess(
        proc.args,
        returncode,
        _decode(stdout, codec) if codec and stdout is not None else stdout,
        _decode(stderr, codec) if codec and stderr is not None else stderr,
    )
    if check:
        result.check_returncode()
    return result


def _encode_input(input: bytes | str | None, codec: tuple[str, str] | None) -> bytes | None:
    if input is None:
        return None
    if isinstance(input, str):
        if codec is None:
            raise TypeError(
                "run_subprocess() got str input without text mode: pass bytes, "
                "or text=True (or an encoding)"
            )
        return input.encode(*codec)
    if codec is not None:
        raise TypeError(
            "run_subprocess() in text mode takes str input, got bytes: decode it, or drop text=True"
        )
    return bytes(input)
