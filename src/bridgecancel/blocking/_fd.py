"""Token-aware waits on file descriptors and sockets.

The descriptor and the token's own `fileno()` are polled together, so a wait wakes the
moment either is ready: no slices, except where ``select.poll`` is missing (Windows).
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import time
from typing import Any, Final, Protocol

from .._tokens import CancelToken
from ._common import begin, cancelled, check_type, remaining, timed_out, wait_sliced

__all__ = (
    "HAVE_POLL",
    "READ",
    "WRITE",
    "accept",
    "connect",
    "recv",
    "sendall",
    "wait_fd",
    "wait_readable",
    "wait_writable",
)

HAVE_POLL: Final = hasattr(select, "poll")
READ: Final = getattr(select, "POLLIN", 1)  # not POLLPRI: urgent data is not for recv()
WRITE: Final = getattr(select, "POLLOUT", 4)
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)
# A non-blocking connect in progress: EINPROGRESS (POSIX), WSAEWOULDBLOCK (Windows).
_CONNECTING: Final = {errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)}


class HasFileno(Protocol):
    """An object with a file descriptor: a socket, a file, a pipe."""

    def fileno(self) -> int: ...


def _fd_of(fd: int | HasFileno, api: str) -> int:
    if isinstance(fd, int) and not isinstance(fd, bool):
        number = fd
    elif callable(getattr(fd, "fileno", None)):
        number = fd.fileno()  # type: ignore[union-attr]
    else:
        raise TypeError(
            f"{api}() needs a file descriptor (an int) or an object with fileno(), got {fd!r}"
        )
    if number < 0:
        raise ValueError(f"{api}() got file descriptor {number}: is it closed?")
    return number


def wait_fd(fd: int, events: int, token: CancelToken, deadline: float | None) -> bool:
    """Wait until `fd` is ready for `events` (True) or the deadline passes (False).

    Raises `Cancelled` when the token fires. Errors and hang-ups count as ready, so that
    the call that follows reports them.
    """
    if token.cancel_called:
        raise cancelled(token)
    if not HAVE_POLL:  # pragma: no cover - Windows: select() takes sockets only
        want = ([fd], []) if events & READ else ([], [fd])
        return wait_sliced(lambda s: any(select.select(*want, [fd], s)), token, deadline)
    poller = select.poll()
    poller.register(fd, events)
    if not token._never:
        poller.register(token.fileno(), select.POLLIN)
    while True:
        left = remaining(deadline)
        ready = poller.poll(None if left is None else math.ceil(left * 1000))
        if token.cancel_called:
            raise cancelled(token)
        if any(ready_fd == fd for ready_fd, _ in ready):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _wait_for(
    fd: int | HasFileno,
    events: int,
    timeout: float | None,
    token: CancelToken | None,
    api: str,
) -> bool:
    number = _fd_of(fd, api)
    token, deadline, _ = begin(api, token, timeout)
    return wait_fd(number, events, token, deadline)


def wait_readable(
    fd: int | HasFileno, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """Wait until `fd` (a descriptor, or an object with ``fileno()``) is readable.

    Returns True when it is (an error or hang-up counts, so that the read reports it),
    False if `timeout` seconds pass first. Reads nothing. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    return _wait_for(fd, READ, timeout, token, "wait_readable")


def wait_writable(
    fd: int | HasFileno, timeout: float | None = None, *, token: CancelToken | None = None
) -> bool:
    """Wait until `fd` (a descriptor, or an object with ``fileno()``) is writable.

    Returns True when it is (an error or hang-up counts), False if `timeout` seconds
    pass first. Writes nothing. Event-driven: no polling.

    Raises:
        Cancelled: if the token fires before or during the wait.
    """
    return _wait_for(fd, WRITE, timeout, token, "wait_writable")


def _open_socket(
    sock: socket.socket, token: CancelToken | None, api: str
) -> tuple[CancelToken, float | None] | None:
    """The opening of the socket calls: the token and the socket timeout's deadline.

    None means: call the socket method as it is (the token can never fire, or the
    socket is non-blocking and the method raises rather than waits).
    """
    check_type(sock, socket.socket, api, "a socket.socket")
    token, _, never = begin(api, token)
    timeout = sock.gettimeout()
    if never or timeout == 0.0:
        return None
    return token, None if timeout is None else time.monotonic() + timeout


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
    opened = _open_socket(sock, token, "recv")
    tls = hasattr(sock, "pending")  # ssl.SSLSocket: takes no flags, may hold data
    if opened is None or (tls and sock.pending()):  # type: ignore[attr-defined]
        return sock.recv(bufsize, flags)
    token, deadline = opened
    while True:
        if not wait_fd(sock.fileno(), READ, token, deadline):
            raise timed_out()
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
    opened = _open_socket(sock, token, "sendall")
    if opened is None:
        return sock.sendall(data, flags)
    token, deadline = opened
    if hasattr(sock, "pending"):  # ssl.SSLSocket: whole records, no flags
        if not wait_fd(sock.fileno(), WRITE, token, deadline):
            raise timed_out()
        return sock.sendall(data, flags)
    view = memoryview(data).cast("B")
    sent = 0
    while sent < len(view):
        if not wait_fd(sock.fileno(), WRITE, token, deadline):
            raise timed_out()
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
    opened = _open_socket(sock, token, "accept")
    if opened is not None and not wait_fd(sock.fileno(), READ, *opened):
        raise timed_out()
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
    opened = _open_socket(sock, token, "connect")
    if opened is None:
        return sock.connect(address)
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        err = sock.connect_ex(address)
        if err in _CONNECTING:
            if not wait_fd(sock.fileno(), WRITE, *opened):
                raise timed_out()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err and err != errno.EISCONN:
            raise OSError(err, os.strerror(err))  # the errno's subclass, as connect()
    finally:
        sock.settimeout(timeout)
