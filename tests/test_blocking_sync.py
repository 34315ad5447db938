"""`bridgecancel.blocking`: what is particular to threading, queue and futures waits."""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading

import pytest

from _blocking_harness import (
    LONG,
    Worker,
    wait_until,
)
from bridgecancel import Cancelled, CancelSource, CancelToken, blocking

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
        q._put("item")
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
        sem._value += 1
        sem._cond.notify()  # type: ignore[attr-defined]
        source.cancel()
    first.cancelled(source.token)
    second.join(10)
    assert second.result is True
    assert sem._value == 0


def test_many_cancelled_waiters_leave_the_queue_working() -> None:
    q: queue.Queue[int] = queue.Queue()
    sources = [CancelSource() for _ in range(20)]
    workers = [Worker(functools.partial(blocking.queue_get, q, token=s.token)) for s in sources]
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
