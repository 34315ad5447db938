"""Tests for bridgecancel.blocking as a whole: every wait succeeds, times out and cancels."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import bridgecancel
from _blocking_harness import (
    EVENT_DRIVEN,
    HARNESSES,
    Harness,
    Worker,
    wait_blocked,
)
from bridgecancel import Cancelled, CancelSource, CancelToken, blocking


# The sendall harness costs over half a second a test (seconds where it must drain), and
# the quick subset (-m "not slow") keeps every other primitive.
@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.slow) if name == "sendall" else name
        for name in HARNESSES
    ]
)
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


@pytest.mark.slow
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


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: blocking.wait_event(threading.Lock()), TypeError, "threading.Event"),  # type: ignore[arg-type]
        (lambda: blocking.wait_event(threading.Event(), -1), ValueError, "non-negative"),
        (lambda: blocking.wait_event(threading.Event(), float("nan")), ValueError, "non-negative"),
        (lambda: blocking.wait_event(threading.Event(), "1"), TypeError, "number of seconds"),  # type: ignore[arg-type]
        (lambda: blocking.wait_condition(threading.Event(), bool), TypeError, "Condition"),  # type: ignore[arg-type]
        (lambda: blocking.wait_condition(threading.Condition(), 1), TypeError, "predicate"),  # type: ignore[arg-type]
        (lambda: blocking.acquire(object()), TypeError, "Lock, RLock, Semaphore"),  # type: ignore[arg-type]
        (lambda: blocking.queue_get([]), TypeError, "queue.Queue"),  # type: ignore[arg-type]
        (lambda: blocking.queue_put(queue.Queue(), 1, -2), ValueError, "non-negative"),
        (lambda: blocking.future_result(object()), TypeError, "await it instead"),  # type: ignore[arg-type]
        (lambda: blocking.recv(object(), 1), TypeError, "socket.socket"),  # type: ignore[arg-type]
        (lambda: blocking.wait_readable("3"), TypeError, "file descriptor"),  # type: ignore[arg-type]
        (lambda: blocking.wait_readable(-1), ValueError, "closed"),
        (lambda: blocking.wait_process(object()), TypeError, "subprocess.Popen"),  # type: ignore[arg-type]
        (
            lambda: blocking.wait_event(threading.Event(), token=CancelSource()),  # type: ignore[arg-type]
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
