"""Shared by the blocking tests: a worker thread, and one harness per primitive that can
put a wrapped call in a state where it blocks.

`Worker` makes a token current in its thread by hand (`bridgecancel._tokens._current`),
as a bridgecancel worker would; it will use the public `use_token` once that exists.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bridgecancel import Cancelled, CancelToken, blocking
from bridgecancel._tokens import _current

PY = sys.executable
LONG = 30.0  # seconds a wait would last if nothing woke it: never reached in a passing test
PROMPT = 2.0  # generous bound for "stopped promptly" on a shared, noisy machine


# -- helpers ----------------------------------------------------------------------------


def thread_state(thread: threading.Thread) -> str:
    """The kernel's state letter for `thread` (S: sleeping in a wait)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.001)


def wait_blocked(thread: threading.Thread) -> None:
    """Wait until `thread` sleeps in the kernel, in several reads in a row.

    Reads are 2 ms apart with this thread idle, so a thread that was only waiting for
    the GIL gets it and moves on: a steady "S" means it is in the wait under test.
    """
    deadline = time.monotonic() + 10.0
    steady = 0
    while steady < 5:
        assert time.monotonic() < deadline, "the worker never blocked"
        steady = steady + 1 if thread_state(thread) == "S" else 0
        time.sleep(0.002)


class Worker:
    """Runs `fn` in a thread (with `token` as its current token, if given)."""

    def __init__(self, fn: Callable[[], Any], *, current: CancelToken | None = None) -> None:
        self.fn = fn
        self.current = current
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self.cpu = 0.0
        self.switches = 0
        self.entered = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test blocking worker")
        self.thread.start()

    def _run(self) -> None:
        if self.current is not None:
            _current.set(self.current)
        before = resource.getrusage(resource.RUSAGE_THREAD)
        self.entered.set()
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.perf_counter()
            after = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            self.switches = after.ru_nvcsw - before.ru_nvcsw

    def join(self, timeout: float = PROMPT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"

    def cancelled(self, token: CancelToken) -> Cancelled:
        self.join()
        assert isinstance(self.error, Cancelled), f"expected Cancelled, got {self.error!r}"
        assert self.error.token is token
        return self.error


# -- one harness per primitive ----------------------------------------------------------


class Harness:
    """A primitive in a state where the wrapped call blocks, plus what to check."""

    event_driven = True

    def block(self, token: CancelToken | None) -> Any:
        raise NotImplementedError

    def is_waiting(self, thread: threading.Thread) -> bool:
        """True once `thread` is blocked in the call (default: asleep in the kernel)."""
        wait_blocked(thread)
        return True

    def make_ready(self) -> None:
        """From another thread: let a blocked call succeed."""
        raise NotImplementedError

    def check_result(self, result: Any) -> None:
        raise NotImplementedError

    def timeout_call(self, token: CancelToken) -> None:
        """Call with a short timeout while not ready; assert the wrapped call's outcome."""
        raise NotImplementedError

    def assert_unchanged(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CondHarness(Harness):
    """Primitives built on a threading.Condition: a waiter shows in its waiter list."""

    cond: threading.Condition

    def is_waiting(self, thread: threading.Thread) -> bool:
        wait_until(lambda: len(self.cond._waiters) > 0, "the worker waits")  # type: ignore[attr-defined]
        return True

    def assert_no_waiters(self) -> None:
        assert len(self.cond._waiters) == 0  # type: ignore[attr-defined]


class EventHarness(CondHarness):
    def __init__(self) -> None:
        self.event = threading.Event()
        self.cond = self.event._cond  # type: ignore[attr-defined]

    def block(self, token: CancelToken | None) -> Any:
        return blocking.wait_event(self.event, token=token)

    def make_ready(self) -> None:
        self.event.set()

    def check_result(self, result: Any) -> None:
        assert result is True

    def timeout_call(self, token: CancelToken) -> None:
        assert blocking.wait_event(self.event, 0.05, token=token) is False
        assert blocking.wait_event(self.event, 0, token=token) is False

    def assert_unchanged(self) -> None:
        assert not self.event.is_set()
        self.assert_no_waiters()


class ConditionHarness(CondHarness):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[int] = []

    def block(self, token: CancelToken | None) -> Any:
        with self.cond:
            result = blocking.wait_condition(self.cond, lambda: list(self.items), token=token)
            assert self.cond._is_owned()  # type: ignore[attr-defined]
            return result

    def make_ready(self) -> None:
        with self.cond:
            self.items.append(1)
            self.cond.notify()

    def check_result(self, result: Any) -> None:
        assert result == [1]

    def timeout_call(self, token: CancelToken) -> None:
        with self.cond:
            assert blocking.wait_condition(self.cond, lambda: self.items, 0.05, token=token) == []
            assert self.cond._is_owned()  # type: ignore[attr-defined]

    def assert_unchanged(self) -> None:
        assert self.items == []
        assert self.cond.acquire(False)  # nobody kept the lock
        self.cond.release()
        self.assert_no_waiters()


class Holder:
    """A thread that holds a lock until told to release it (an RLock must be held by
    another thread to block this one)."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test lock holder")
        self.thread.start()
        assert self.acquired.wait(10)

    def _run(self) -> None:
        with self.lock:
            self.acquired.set()
            self.release.wait()

    def stop(self) -> None:
        self.release.set()
        self.thread.join(10)


class LockHarness(Harness):
    event_driven = False  # C locks: slices of POLL_SLICE

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.lock = factory()
        self.holder: Holder | None = Holder(self.lock)

    def block(self, token: CancelToken | None) -> Any:
        got = blocking.acquire(self.lock, token=token)
        if got:
            self.lock.release()
        return got

    def make_ready(self) -> None:
        if self.holder is not None:
            self.holder.stop()
            self.holder = None

    def check_result(self, result: Any) -> None:
        assert result is True

    def timeout_call(self, token: CancelToken) -> None:
        assert blocking.acquire(self.lock, 0.05, token=token) is False
        assert blocking.acquire(self.lock, 0, token=token) is False

    def assert_unchanged(self) -> None:
        # Still held by the holder; free and acquirable once it lets go.
        assert not self.lock.acquire(False)
        self.make_ready()
        assert self.lock.acquire(False)
        self.lock.release()

    def close(self) -> None:
        self.make_ready()


class SemaphoreHarness(CondHarness):
    def __init__(self, factory: Callable[[int], threading.Semaphore]) -> None:
        self.sem = factory(1)
        assert self.sem.acquire(False)  # now at zero
        self.cond = self.sem._cond  # type: ignore[attr-defined]

    def block(self, token: CancelToken | None) -> Any:
        got = blocking.acquire(self.sem, token=token)
        if got:
            self.sem.release()
        return got

    def make_ready(self) -> None:
        self.sem.release()

    def check_result(self, result: Any) -> None:
        assert result is True

    def timeout_call(self, token: CancelToken) -> None:
        assert blocking.acquire(self.sem, 0.05, token=token) is False

    def assert_unchanged(self) -> None:
        assert self.sem._value == 0
        self.assert_no_waiters()


class QueueGetHarness(CondHarness):
    def __init__(self, factory: Callable[[], queue.Queue[int]] = queue.Queue) -> None:
        self.q = factory()
        self.cond = self.q.not_empty

    def block(self, token: CancelToken | None) -> Any:
        return blocking.queue_get(self.q, token=token)

    def make_ready(self) -> None:
        self.q.put(7)

    def check_result(self, result: Any) -> None:
        assert result == 7
        assert self.q.qsize() == 0

    def timeout_call(self, token: CancelToken) -> None:
        with pytest.raises(queue.Empty):
            blocking.queue_get(self.q, 0.05, token=token)
        with pytest.raises(queue.Empty):
            blocking.queue_get(self.q, 0, token=token)

    def assert_unchanged(self) -> None:
        assert self.q.qsize() == 0
        self.assert_no_waiters()
        self.q.put(8)
        assert self.q.get_nowait() == 8


class QueuePutHarness(CondHarness):
    def __init__(self) -> None:
        self.q: queue.Queue[int] = queue.Queue(maxsize=1)
        self.q.put(1)
        self.cond = self.q.not_full

    def block(self, token: CancelToken | None) -> Any:
        return blocking.queue_put(self.q, 2, token=token)

    def make_ready(self) -> None:
        assert self.q.get() == 1

    def check_result(self, result: Any) -> None:
        assert result is None
        assert self.q.get_nowait() == 2

    def timeout_call(self, token: CancelToken) -> None:
        with pytest.raises(queue.Full):
            blocking.queue_put(self.q, 3, 0.05, token=token)

    def assert_unchanged(self) -> None:
        assert list(self.q.queue) == [1]
        self.assert_no_waiters()


class FutureHarness(CondHarness):
    def __init__(self) -> None:
        self.fut: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.cond = self.fut._condition

    def block(self, token: CancelToken | None) -> Any:
        return blocking.future_result(self.fut, token=token)

    def make_ready(self) -> None:
        self.fut.set_result("done")

    def check_result(self, result: Any) -> None:
        assert result == "done"

    def timeout_call(self, token: CancelToken) -> None:
        with pytest.raises(concurrent.futures.TimeoutError):
            blocking.future_result(self.fut, 0.05, token=token)

    def assert_unchanged(self) -> None:
        assert not self.fut.done()
        assert self.fut.set_running_or_notify_cancel()  # still pending, not cancelled
        self.assert_no_waiters()


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class RecvHarness(Harness):
    def __init__(self) -> None:
        self.a, self.b = socket_pair()

    def block(self, token: CancelToken | None) -> Any:
        return blocking.recv(self.a, 100, token=token)

    def make_ready(self) -> None:
        self.b.sendall(b"data")

    def check_result(self, result: Any) -> None:
        assert result == b"data"

    def timeout_call(self, token: CancelToken) -> None:
        self.a.settimeout(0.05)
        try:
            with pytest.raises(TimeoutError):
                blocking.recv(self.a, 100, token=token)
        finally:
            self.a.settimeout(None)

    def assert_unchanged(self) -> None:
        assert self.a.fileno() >= 0
        assert self.a.gettimeout() is None
        self.b.sendall(b"after")  # nothing was consumed, the socket still works
        assert self.a.recv(100) == b"after"

    def close(self) -> None:
        self.a.close()
        self.b.close()


class SendallHarness(Harness):
    def __init__(self) -> None:
        self.a, self.b = socket_pair()
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.prefilled = 0
        self.a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.prefilled += self.a.send(b"x" * 65536)
        self.a.setblocking(True)
        self.payload = b"y" * 100_000

    def block(self, token: CancelToken | None) -> Any:
        return blocking.sendall(self.a, self.payload, token=token)

    def _drain(self, limit: int) -> bytes:
        received = bytearray()
        self.b.settimeout(5)
        while len(received) < limit:
            chunk = self.b.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)

    def make_ready(self) -> None:
        self.drained = self._drain(self.prefilled + len(self.payload))

    def check_result(self, result: Any) -> None:
        assert result is None
        assert self.drained == b"x" * self.prefilled + self.payload

    def timeout_call(self, token: CancelToken) -> None:
        self.a.settimeout(0.05)
        try:
            with pytest.raises(TimeoutError):
                blocking.sendall(self.a, b"z", token=token)
        finally:
            self.a.settimeout(None)

    def assert_unchanged(self) -> None:
        assert self.a.gettimeout() is None
        self.a.shutdown(socket.SHUT_WR)
        assert self._drain(10**9) == b"x" * self.prefilled  # nothing of the payload went

    def close(self) -> None:
        self.a.close()
        self.b.close()


class AcceptHarness(Harness):
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.clients: list[socket.socket] = []

    def block(self, token: CancelToken | None) -> Any:
        conn, addr = blocking.accept(self.listener, token=token)
        with conn:
            return addr

    def make_ready(self) -> None:
        self.clients.append(socket.create_connection(self.listener.getsockname()))

    def check_result(self, result: Any) -> None:
        assert result == self.clients[0].getsockname()

    def timeout_call(self, token: CancelToken) -> None:
        self.listener.settimeout(0.05)
        try:
            with pytest.raises(TimeoutError):
                blocking.accept(self.listener, token=token)
        finally:
            self.listener.settimeout(None)

    def assert_unchanged(self) -> None:
        self.make_ready()
        conn, addr = self.listener.accept()
        conn.close()
        assert addr == self.clients[-1].getsockname()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.listener.close()


class ConnectHarness(Harness):
    """A listener with a full backlog: further connects hang (SYNs dropped)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.filler = socket.create_connection(self.address)
        self.sock = socket.socket()

    def block(self, token: CancelToken | None) -> Any:
        blocking.connect(self.sock, self.address, token=token)
        return self.sock.getpeername()

    def make_ready(self) -> None:
        conn, _ = self.listener.accept()  # frees the backlog: the SYN retry gets in
        conn.close()

    def check_result(self, result: Any) -> None:
        assert result == self.address

    def timeout_call(self, token: CancelToken) -> None:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                blocking.connect(sock, self.address, token=token)
            assert sock.gettimeout() == 0.2

    def assert_unchanged(self) -> None:
        assert self.sock.fileno() >= 0
        assert self.sock.gettimeout() is None  # blocking mode restored

    def close(self) -> None:
        self.sock.close()
        self.filler.close()
        self.listener.close()


class ReadableHarness(Harness):
    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def block(self, token: CancelToken | None) -> Any:
        return blocking.wait_readable(self.r, token=token)

    def make_ready(self) -> None:
        os.write(self.w, b"!")

    def check_result(self, result: Any) -> None:
        assert result is True
        assert os.read(self.r, 10) == b"!"

    def timeout_call(self, token: CancelToken) -> None:
        assert blocking.wait_readable(self.r, 0.05, token=token) is False

    def assert_unchanged(self) -> None:
        os.write(self.w, b"?")
        assert os.read(self.r, 10) == b"?"

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class WritableHarness(Harness):
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self.filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                self.filled += os.write(self.w, b"x" * 65536)
        os.set_blocking(self.w, True)

    def block(self, token: CancelToken | None) -> Any:
        return blocking.wait_writable(self.w, token=token)

    def make_ready(self) -> None:
        os.read(self.r, 65536)

    def check_result(self, result: Any) -> None:
        assert result is True

    def timeout_call(self, token: CancelToken) -> None:
        assert blocking.wait_writable(self.w, 0.05, token=token) is False

    def assert_unchanged(self) -> None:
        total = 0
        os.set_blocking(self.r, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                total += len(os.read(self.r, 65536))
        assert total == self.filled

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


HARNESSES: dict[str, Callable[[], Harness]] = {
    "event": EventHarness,
    "condition": ConditionHarness,
    "lock": lambda: LockHarness(threading.Lock),
    "rlock": lambda: LockHarness(threading.RLock),
    "semaphore": lambda: SemaphoreHarness(threading.Semaphore),
    "bounded_semaphore": lambda: SemaphoreHarness(threading.BoundedSemaphore),
    "queue_get": QueueGetHarness,
    "lifo_queue_get": lambda: QueueGetHarness(queue.LifoQueue),
    "queue_put": QueuePutHarness,
    "future": FutureHarness,
    "recv": RecvHarness,
    "sendall": SendallHarness,
    "accept": AcceptHarness,
    "connect": ConnectHarness,
    "wait_readable": ReadableHarness,
    "wait_writable": WritableHarness,
}
EVENT_DRIVEN = [name for name in HARNESSES if name not in ("lock", "rlock")]
