"""Tests for bridgecancel.blocking: every wait succeeds, times out and cancels like it should."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import queue
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import bridgecancel
from bridgecancel import Cancelled, CancelSource, CancelToken, blocking
from bridgecancel._token import _current

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
        assert self.sem._value == 0  # type: ignore[attr-defined]
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
        self.cond = self.fut._condition  # type: ignore[attr-defined]

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


@pytest.fixture(params=list(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    made = HARNESSES[request.param]()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=EVENT_DRIVEN)
def event_driven_harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    made = HARNESSES[request.param]()
    try:
        yield made
    finally:
        made.close()


# -- the matrix -------------------------------------------------------------------------


def test_success_when_made_ready_during_the_wait(harness: Harness) -> None:
    source = CancelSource()
    worker = Worker(lambda: harness.block(source.token))
    assert harness.is_waiting(worker.thread)
    harness.make_ready()
    worker.join(10)
    assert worker.error is None
    harness.check_result(worker.result)


def test_success_with_the_never_cancelled_token(harness: Harness) -> None:
    # Outside a worker, current_token() never fires: the plain call is made.
    worker = Worker(lambda: harness.block(None))
    assert harness.is_waiting(worker.thread)
    harness.make_ready()
    worker.join(10)
    assert worker.error is None
    harness.check_result(worker.result)


def test_timeout(harness: Harness) -> None:
    source = CancelSource()
    harness.timeout_call(source.token)
    harness.assert_unchanged()


def test_cancel_before_the_wait(harness: Harness) -> None:
    source = CancelSource()
    source.cancel("early")
    with pytest.raises(Cancelled) as info:
        harness.block(source.token)
    assert info.value.token is source.token
    assert info.value.reason == "early"
    harness.assert_unchanged()


def test_cancel_during_the_wait(harness: Harness) -> None:
    source = CancelSource()
    worker = Worker(lambda: harness.block(source.token))
    assert harness.is_waiting(worker.thread)
    cancelled_at = time.perf_counter()
    source.cancel("stop")
    error = worker.cancelled(source.token)
    assert error.reason == "stop"
    latency = worker.ended_at - cancelled_at
    assert latency < (0.5 if harness.event_driven else 0.5 + blocking.POLL_SLICE)
    harness.assert_unchanged()


def test_cancel_by_deadline_during_the_wait(harness: Harness) -> None:
    source = CancelSource()
    source.cancel_after(0.1)
    worker = Worker(lambda: harness.block(source.token))
    worker.join(10)
    error = worker.cancelled(source.token)
    assert error.reason == "deadline exceeded"
    harness.assert_unchanged()


def test_current_token_is_used_by_default(harness: Harness) -> None:
    source = CancelSource()
    worker = Worker(lambda: harness.block(None), current=source.token)
    assert harness.is_waiting(worker.thread)
    source.cancel()
    worker.cancelled(source.token)
    harness.assert_unchanged()


@pytest.mark.anyio
async def test_run_sync_worker_stops_when_its_scope_is_cancelled(
    harness: Harness, anyio_backend: str
) -> None:
    before = bridgecancel.statistics().threads
    started = threading.Event()
    threads: list[threading.Thread] = []
    errors: list[Cancelled] = []
    tokens: list[CancelToken] = []

    def job() -> Any:
        threads.append(threading.current_thread())
        started.set()
        try:
            return harness.block(None)
        except Cancelled as exc:
            errors.append(exc)
            tokens.append(bridgecancel.current_token())
            raise

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(bridgecancel.run_sync, job)
            await anyio.to_thread.run_sync(started.wait, 10.0)
            await anyio.to_thread.run_sync(harness.is_waiting, threads[0])
            scope.cancel()
    assert scope.cancelled_caught
    assert len(errors) == 1
    assert errors[0].token is tokens[0]  # the job's own token, taken from current_token()
    after = bridgecancel.statistics().threads
    assert after.cooperative == before.cooperative + 1
    harness.assert_unchanged()


def test_waiting_threads_use_no_cpu(event_driven_harness: Harness) -> None:
    harness = event_driven_harness
    source = CancelSource()
    worker = Worker(lambda: harness.block(source.token))
    assert harness.is_waiting(worker.thread)
    time.sleep(0.5)  # the measurement window, not a synchronisation
    source.cancel()
    worker.cancelled(source.token)
    # A 10 ms polling loop would switch ~50 times and use several ms of CPU here.
    assert worker.switches < 20, f"{worker.switches} context switches: is it polling?"
    assert worker.cpu < 0.02, f"{worker.cpu * 1000:.1f} ms of CPU while waiting"


def test_sliced_lock_wait_notices_cancel_within_a_slice() -> None:
    lock = threading.Lock()
    lock.acquire()
    try:
        source = CancelSource()
        worker = Worker(lambda: blocking.acquire(lock, token=source.token))
        wait_blocked(worker.thread)
        cancelled_at = time.perf_counter()
        source.cancel()
        worker.cancelled(source.token)
        assert worker.ended_at - cancelled_at < blocking.POLL_SLICE + 0.5
        assert lock.locked()
    finally:
        lock.release()


# -- notifications are never lost to a cancelled waiter -------------------------------


@pytest.mark.parametrize("cancel_first", [False, True])
def test_a_notify_the_cancelled_waiter_received_goes_to_the_next(cancel_first: bool) -> None:
    q: queue.Queue[str] = queue.Queue()
    source = CancelSource()
    first = Worker(lambda: blocking.queue_get(q, token=source.token))
    wait_until(lambda: len(q.not_empty._waiters) == 1, "the first waiter waits")  # type: ignore[attr-defined]
    second = Worker(lambda: q.get(timeout=LONG))
    wait_until(lambda: len(q.not_empty._waiters) == 2, "the second waiter waits")  # type: ignore[attr-defined]
    with q.mutex:  # Queue.put's body, with the cancel racing the notify
        if cancel_first:
            source.cancel()
        q._put("item")  # type: ignore[attr-defined]
        q.unfinished_tasks += 1
        q.not_empty.notify()  # wakes the first waiter
        if not cancel_first:
            source.cancel()
    first.cancelled(source.token)
    second.join(10)
    assert second.result == "item"
    assert q.qsize() == 0


def test_condition_waiter_cancelled_after_notify_passes_it_on() -> None:
    cond = threading.Condition()
    source = CancelSource()
    first = Worker(lambda: _locked_wait(cond, source.token))
    wait_until(lambda: len(cond._waiters) == 1, "the first waiter waits")  # type: ignore[attr-defined]
    woken = threading.Event()

    def plain() -> None:
        with cond:
            if cond.wait(LONG):
                woken.set()

    second = Worker(plain)
    wait_until(lambda: len(cond._waiters) == 2, "the second waiter waits")  # type: ignore[attr-defined]
    with cond:
        cond.notify()
        source.cancel()
    first.cancelled(source.token)
    second.join(10)
    assert woken.is_set()


def _locked_wait(cond: threading.Condition, token: CancelToken) -> object:
    with cond:
        return blocking.wait_condition(cond, lambda: False, token=token)


def test_semaphore_release_reaches_a_waiter_after_a_cancel() -> None:
    sem = threading.Semaphore(0)
    source = CancelSource()
    first = Worker(lambda: blocking.acquire(sem, token=source.token))
    wait_until(lambda: len(sem._cond._waiters) == 1, "the first waiter waits")  # type: ignore[attr-defined]
    second = Worker(lambda: blocking.acquire(sem, LONG))
    wait_until(lambda: len(sem._cond._waiters) == 2, "the second waiter waits")  # type: ignore[attr-defined]
    with sem._cond:  # type: ignore[attr-defined]
        sem._value += 1  # type: ignore[attr-defined]
        sem._cond.notify()  # type: ignore[attr-defined]
        source.cancel()
    first.cancelled(source.token)
    second.join(10)
    assert second.result is True
    assert sem._value == 0  # type: ignore[attr-defined]


def test_many_cancelled_waiters_leave_the_queue_working() -> None:
    q: queue.Queue[int] = queue.Queue()
    sources = [CancelSource() for _ in range(20)]
    workers = [Worker(lambda s=s: blocking.queue_get(q, token=s.token)) for s in sources]  # type: ignore[misc]
    wait_until(lambda: len(q.not_empty._waiters) == 20, "all wait")  # type: ignore[attr-defined]
    for source in sources[::2]:
        source.cancel()
    for i in range(10):
        q.put(i)
    results = []
    for source, worker in zip(sources, workers, strict=False):
        if source.cancel_called:
            worker.cancelled(source.token)
        else:
            worker.join(10)
            results.append(worker.result)
    assert sorted(results) == list(range(10))
    assert q.qsize() == 0
    assert len(q.not_empty._waiters) == 0  # type: ignore[attr-defined]


# -- primitive-specific behaviour -------------------------------------------------------


def test_event_already_set_returns_at_once() -> None:
    event = threading.Event()
    event.set()
    assert blocking.wait_event(event, token=CancelSource().token) is True


def test_wait_condition_needs_the_lock() -> None:
    cond = threading.Condition()
    with pytest.raises(RuntimeError, match="inside `with cond:`"):
        blocking.wait_condition(cond, lambda: True, token=CancelSource().token)


def test_wait_condition_cancelled_still_holds_the_lock() -> None:
    cond = threading.Condition(threading.RLock())
    source = CancelSource()
    source.cancel_after(0.05)
    with cond, cond:  # recursion level 2 is restored too
        with pytest.raises(Cancelled):
            blocking.wait_condition(cond, lambda: False, token=source.token)
        assert cond._is_owned()  # type: ignore[attr-defined]
    assert cond.acquire(False)
    cond.release()


def test_acquire_rlock_recursion_and_timeout_zero() -> None:
    rlock = threading.RLock()
    token = CancelSource().token
    assert blocking.acquire(rlock, token=token)
    assert blocking.acquire(rlock, 0, token=token)  # reentrant
    rlock.release()
    rlock.release()


def test_queue_get_takes_items_in_the_queue_order() -> None:
    q: queue.PriorityQueue[int] = queue.PriorityQueue()
    for item in (3, 1, 2):
        q.put(item)
    token = CancelSource().token
    assert [blocking.queue_get(q, token=token) for _ in range(3)] == [1, 2, 3]


def test_queue_put_unbounded_never_waits() -> None:
    q: queue.Queue[int] = queue.Queue()
    blocking.queue_put(q, 1, token=CancelSource().token)
    assert q.get_nowait() == 1


def test_cancel_before_leaves_a_ready_queue_alone() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(5)
    source = CancelSource()
    source.cancel()
    with pytest.raises(Cancelled):
        blocking.queue_get(q, token=source.token)
    assert q.get_nowait() == 5


def test_future_result_raises_the_future_exception_and_cancellation() -> None:
    token = CancelSource().token
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        blocking.future_result(failed, token=token)
    cancelled: concurrent.futures.Future[int] = concurrent.futures.Future()
    worker = Worker(lambda: blocking.future_result(cancelled, token=token))
    wait_until(lambda: len(cancelled._condition._waiters) > 0, "waits")  # type: ignore[attr-defined]
    cancelled.cancel()
    worker.join(10)
    assert isinstance(worker.error, concurrent.futures.CancelledError)


def test_future_from_an_executor() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        release = threading.Event()
        fut = pool.submit(lambda: release.wait(LONG) and 42)
        source = CancelSource()
        source.cancel_after(0.05)
        with pytest.raises(Cancelled):
            blocking.future_result(fut, token=source.token)
        assert not fut.done()
        release.set()
        assert blocking.future_result(fut, 10, token=CancelSource().token) == 42


def test_recv_on_a_non_blocking_socket_raises_like_recv() -> None:
    a, b = socket_pair()
    with a, b:
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            blocking.recv(a, 10, token=CancelSource().token)


def test_sendall_large_payload_with_a_concurrent_reader() -> None:
    a, b = socket_pair()
    with a, b:
        payload = os.urandom(3_000_000)
        reader = Worker(lambda: _read_all(b))
        blocking.sendall(a, payload, token=CancelSource().token)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
        assert reader.result == payload


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    token = CancelSource().token
    while chunk := blocking.recv(sock, 65536, token=token):
        chunks.append(chunk)
    return b"".join(chunks)


def test_connect_refused_raises_like_connect() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, not listening: refused
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            blocking.connect(sock, address, token=CancelSource().token)


def test_wait_readable_takes_objects_with_fileno() -> None:
    a, b = socket_pair()
    with a, b:
        b.sendall(b"x")
        assert blocking.wait_readable(a, 5, token=CancelSource().token)
        assert blocking.wait_writable(a, 5, token=CancelSource().token)


# -- tokens' descriptors ----------------------------------------------------------------


def test_token_fileno_is_readable_once_cancelled_and_closed_with_the_token() -> None:
    source = CancelSource()
    fd = source.token.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    assert source.token.fileno() == fd  # created once
    source.cancel()
    assert select.select([fd], [], [], 0)[0] == [fd]
    assert select.select([fd], [], [], 0)[0] == [fd]  # stays readable for every waiter
    os.fstat(fd)
    del source
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_token_fileno_of_a_cancelled_token_is_readable_at_once() -> None:
    source = CancelSource()
    source.cancel()
    assert select.select([source.token.fileno()], [], [], 0)[0]


# -- processes --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for init to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _sleeper(*extra: str) -> list[str]:
    return [PY, "-c", "import sys, time; print('up', flush=True); time.sleep(60)", *extra]


def test_wait_process_success_and_timeout() -> None:
    token = CancelSource().token
    proc = subprocess.Popen([PY, "-c", "raise SystemExit(3)"])
    assert blocking.wait_process(proc, token=token) == 3
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            blocking.wait_process(proc, 0.1, token=token)
        assert proc.poll() is None  # a timeout leaves the child running, as Popen.wait
    finally:
        proc.kill()
        proc.wait()


def test_wait_process_cancel_terminates_the_child() -> None:
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.PIPE)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        source = CancelSource()
        worker = Worker(lambda: blocking.wait_process(proc, token=source.token))
        wait_blocked(worker.thread)
        started = time.perf_counter()
        source.cancel()
        worker.cancelled(source.token)
        assert worker.ended_at - started < PROMPT
        assert proc.returncode == -signal.SIGTERM


def test_wait_process_cancel_kills_a_child_ignoring_sigterm_after_grace() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        source = CancelSource()
        source.cancel()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            blocking.wait_process(proc, grace=0.3, token=source.token)
        assert 0.25 < time.monotonic() - started < PROMPT
        assert proc.returncode == -signal.SIGKILL


def test_wait_process_with_the_never_cancelled_token_is_popen_wait() -> None:
    proc = subprocess.Popen([PY, "-c", "pass"])
    assert blocking.wait_process(proc) == 0


def test_run_subprocess_like_subprocess_run() -> None:
    token = CancelSource().token
    code = "import sys; d = sys.stdin.read(); print(d.upper()); print('e', file=sys.stderr)"
    result = blocking.run_subprocess(
        [PY, "-c", code],
        input="abc\r\n",
        capture_output=True,
        text=True,
        token=token,
    )
    expected = subprocess.run(
        [PY, "-c", code],
        input="abc\r\n",
        capture_output=True,
        text=True,
    )
    assert result.stdout == expected.stdout
    assert result.stderr == expected.stderr == "e\n"
    assert result.returncode == 0
    binary = blocking.run_subprocess(
        [PY, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
        input=b"\x00\x01" * 100_000,
        stdout=subprocess.PIPE,
        token=token,
    )
    assert binary.stdout == (b"\x00\x01" * 100_000)[::-1]
    assert binary.stderr is None


def test_run_subprocess_check_and_errors() -> None:
    token = CancelSource().token
    with pytest.raises(subprocess.CalledProcessError) as info:
        blocking.run_subprocess(
            [PY, "-c", "print('out'); raise SystemExit(2)"],
            capture_output=True,
            check=True,
            token=token,
        )
    assert info.value.returncode == 2
    assert info.value.stdout == b"out\n"
    with pytest.raises(ValueError, match="stdin and input"):
        blocking.run_subprocess([PY, "-c", "pass"], input=b"", stdin=subprocess.PIPE)
    with pytest.raises(ValueError, match="capture_output"):
        blocking.run_subprocess([PY, "-c", "pass"], capture_output=True, stdout=subprocess.PIPE)
    with pytest.raises(TypeError, match="text=True"):
        blocking.run_subprocess([PY, "-c", "pass"], input="str without text mode")


def test_run_subprocess_timeout_kills_and_keeps_partial_output() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        blocking.run_subprocess(_sleeper(), capture_output=True, timeout=1.0)
    assert info.value.stdout == b"up\n"
    assert info.value.timeout == 1.0


def test_run_subprocess_cancel_before_never_starts_the_child(tmp_path: Any) -> None:
    marker = tmp_path / "started"
    source = CancelSource()
    source.cancel()
    with pytest.raises(Cancelled):
        blocking.run_subprocess([PY, "-c", f"open({str(marker)!r}, 'w')"], token=source.token)
    assert not marker.exists()


def test_run_subprocess_cancel_stops_the_whole_process_tree(tmp_path: Any) -> None:
    pids = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}')\n"
        "time.sleep(60)\n"
    )
    source = CancelSource()
    worker = Worker(lambda: blocking.run_subprocess([PY, "-c", code], token=source.token))
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, "the tree is up")
    child, grandchild = map(int, pids.read_text().split())
    source.cancel()
    worker.cancelled(source.token)
    assert not _alive(child)
    wait_until(lambda: not _alive(grandchild), "the grandchild is gone", timeout=PROMPT)


def test_run_subprocess_from_current_token_in_a_thread(tmp_path: Any) -> None:
    source = CancelSource()
    worker = Worker(
        lambda: blocking.run_subprocess(_sleeper(), stdout=subprocess.DEVNULL), current=source.token
    )
    wait_blocked(worker.thread)
    source.cancel()
    worker.cancelled(source.token)


def test_process_waits_use_no_cpu() -> None:
    source = CancelSource()
    worker = Worker(
        lambda: blocking.run_subprocess(_sleeper(), capture_output=True, token=source.token)
    )
    wait_blocked(worker.thread)
    time.sleep(0.5)
    source.cancel()
    worker.cancelled(source.token)
    assert worker.switches < 30
    assert worker.cpu < 0.05


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: blocking.wait_event(threading.Lock()), TypeError, "threading.Event"),
        (lambda: blocking.wait_event(threading.Event(), -1), ValueError, "non-negative"),
        (lambda: blocking.wait_event(threading.Event(), float("nan")), ValueError, "non-negative"),
        (lambda: blocking.wait_event(threading.Event(), "1"), TypeError, "number of seconds"),
        (lambda: blocking.wait_condition(threading.Event(), bool), TypeError, "Condition"),
        (lambda: blocking.wait_condition(threading.Condition(), 1), TypeError, "predicate"),
        (lambda: blocking.acquire(object()), TypeError, "Lock, RLock, Semaphore"),
        (lambda: blocking.queue_get([]), TypeError, "queue.Queue"),
        (lambda: blocking.queue_put(queue.Queue(), 1, -2), ValueError, "non-negative"),
        (lambda: blocking.future_result(object()), TypeError, "await it instead"),
        (lambda: blocking.recv(object(), 1), TypeError, "socket.socket"),
        (lambda: blocking.wait_readable("3"), TypeError, "file descriptor"),
        (lambda: blocking.wait_readable(-1), ValueError, "closed"),
        (lambda: blocking.wait_process(object()), TypeError, "subprocess.Popen"),
        (
            lambda: blocking.wait_event(threading.Event(), token=CancelSource()),
            TypeError,
            "source.token",
        ),
        (lambda: blocking.run_subprocess(["true"], grace=-1), ValueError, "grace"),
    ],
)
def test_bad_input_is_refused_with_a_hint(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_public_names() -> None:
    assert list(blocking.__all__) == sorted(blocking.__all__)
    for name in blocking.__all__:
        assert hasattr(blocking, name), name
        if callable(getattr(blocking, name)):
            assert getattr(blocking, name).__doc__, name
    assert blocking.POLL_SLICE <= 0.01


@pytest.mark.parametrize("name", ["event", "condition", "semaphore", "queue_get", "future"])
def test_condition_waits_fall_back_to_slices(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where Condition internals are not as expected, waits poll in POLL_SLICE slices
    # with the same semantics.
    monkeypatch.setattr(blocking, "_WAKEABLE_CONDITIONS", False)
    harness = HARNESSES[name]()
    try:
        source = CancelSource()
        worker = Worker(lambda: harness.block(source.token))
        wait_blocked(worker.thread)
        source.cancel()
        worker.cancelled(source.token)
        harness.assert_unchanged()
        harness.timeout_call(CancelSource().token)
        worker = Worker(lambda: harness.block(CancelSource().token))
        wait_blocked(worker.thread)
        harness.make_ready()
        worker.join(10)
        assert worker.error is None
        harness.check_result(worker.result)
    finally:
        harness.close()


@pytest.mark.anyio
async def test_demo_cases_stop_promptly(anyio_backend: str) -> None:
    from bridgecancel._demo_blocking import demo_blocking_cases

    cases = await demo_blocking_cases()
    assert [label for label, _, _ in cases] == [
        "thread blocked in blocking.queue_get()",
        "thread blocked in blocking.recv() (loopback)",
    ]
    for label, ended, seconds in cases:
        assert ended == "cooperative", label
        assert seconds < PROMPT, label


@pytest.mark.anyio
async def test_wait_process_uses_the_run_sync_token(anyio_backend: str) -> None:
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.PIPE, start_new_session=True)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        with anyio.move_on_after(0.2) as scope:
            await bridgecancel.run_sync(blocking.wait_process, proc)
        assert scope.cancelled_caught
        assert anyio.current_time() - scope.deadline < PROMPT
        assert proc.returncode == -signal.SIGTERM
