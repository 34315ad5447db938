"""`bridgecancel.iterate`: a sync iterable stepped through in worker threads, under one token.

Async tests run on asyncio and trio through anyio; one drives it from plain asyncio. Steps
are held on events or on their token, never on sleeps. Under real servers, with
``StreamingResponse``: tests/test_asgi_streaming.py.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

import bridgecancel
from bridgecancel import Cancelled, CancelToken, blocking, current_token, iterate

pytestmark = pytest.mark.anyio

WAIT = 10.0  # upper bound for any wait that should end much sooner
PROMPT = 2.0  # generous bound for "at once"
UNCLOSED = "the iteration was left unclosed"


def _signal(event: anyio.Event) -> None:
    """From a step (an anyio worker thread): set `event` in the event loop."""
    anyio.from_thread.run_sync(event.set)


class Record:
    """What a generator saw: the thread and token of each step and of its ``finally``."""

    def __init__(self) -> None:
        self.loop_thread = threading.current_thread()
        self.step_threads: list[threading.Thread] = []
        self.step_tokens: list[CancelToken] = []
        self.finally_thread: threading.Thread | None = None
        self.finally_token: CancelToken | None = None
        self.finally_fired: bool | None = None
        self.finally_reason: str | None = None
        self.finished = threading.Event()  # the finally has run

    def step(self) -> None:
        self.step_threads.append(threading.current_thread())
        self.step_tokens.append(current_token())

    def finish(self) -> None:
        token = current_token()
        self.finally_thread = threading.current_thread()
        self.finally_token = token
        self.finally_fired = token.cancel_called
        self.finally_reason = token.reason
        self.finished.set()

    async def wait_finished(self) -> None:
        """Wait (in a worker, not holding the loop) for the finally, wherever it runs."""
        assert await anyio.to_thread.run_sync(self.finished.wait, WAIT)

    def assert_finally_in_a_worker(self) -> None:
        assert self.finished.is_set()
        assert self.finally_thread is not None
        assert self.finally_thread is not self.loop_thread


def counting(record: Record, n: int) -> Iterator[int]:
    try:
        for i in range(n):
            record.step()
            yield i
    finally:
        record.finish()


def waiting_on_the_token(record: Record, started: anyio.Event) -> Iterator[int]:
    """Yields 0, then waits on its token in the next step (as for a slow query)."""
    try:
        record.step()
        yield 0
        record.step()
        _signal(started)
        current_token().wait(WAIT)
        current_token().check()
        yield 1  # pragma: no cover - the token fired
    finally:
        record.finish()


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope, reason: str) -> None:
    await event.wait()
    scope.cancel(reason)


# -- iterating ---------------------------------------------------------------------------


async def test_yields_the_items_in_order_each_step_in_a_worker_thread() -> None:
    record = Record()
    items = [item async for item in iterate(counting(record, 3))]
    assert items == [0, 1, 2]
    assert len(record.step_threads) == 3
    assert all(thread is not record.loop_thread for thread in record.step_threads)
    record.assert_finally_in_a_worker()  # it ran out: its finally ran in the last step


async def test_one_token_for_the_whole_iteration_in_every_step_and_the_finally() -> None:
    record = Record()
    other = Record()
    async with iterate(counting(record, 3)) as rows, iterate(counting(other, 1)) as others:
        async for _ in rows:
            pass
        async for _ in others:
            pass
    token = record.step_tokens[0]
    assert record.step_tokens == [token, token, token]
    assert record.finally_token is token
    assert not token.cancel_called  # nobody cancelled anything
    assert other.step_tokens[0] is not token  # each iteration has its own
    assert token is not current_token()


async def test_any_iterable_with_its_iter_called_in_a_worker() -> None:
    loop_thread = threading.current_thread()
    iter_threads: list[threading.Thread] = []

    class Cursor:
        def __iter__(self) -> Iterator[str]:
            iter_threads.append(threading.current_thread())  # may run a query
            return iter(["a", "b"])

    assert [row async for row in iterate(Cursor())] == ["a", "b"]
    assert len(iter_threads) == 1
    assert iter_threads[0] is not loop_thread
    assert [n async for n in iterate(range(3))] == [0, 1, 2]
    assert [c async for c in iterate("xy")] == ["x", "y"]


async def test_stop_iteration_ends_it_for_good() -> None:
    def returns() -> Iterator[int]:
        yield 1
        return

    rows = iterate(returns())
    assert [row async for row in rows] == [1]
    with pytest.raises(StopAsyncIteration):
        await rows.__anext__()
    await rows.aclose()  # nothing left to close


async def test_a_steps_exception_propagates_and_ends_the_generator() -> None:
    raised: list[BaseException] = []
    record = Record()

    def failing() -> Iterator[int]:
        try:
            yield 1
            error = ValueError("row 2 is broken")
            raised.append(error)
            raise error
        finally:
            record.finish()

    rows = iterate(failing())
    assert await rows.__anext__() == 1
    with pytest.raises(ValueError, match="row 2 is broken") as excinfo:
        await rows.__anext__()
    assert excinfo.value is raised[0]
    record.assert_finally_in_a_worker()  # in the step that raised
    with pytest.raises(StopAsyncIteration):
        await rows.__anext__()


async def test_each_step_is_a_run_sync_job() -> None:
    before = bridgecancel.statistics().threads.completed
    assert [row async for row in iterate(iter([1, 2]))] == [1, 2]
    # Two items and the step that found the end.
    assert bridgecancel.statistics().threads.completed - before == 3


async def test_the_token_reports_each_steps_deadline() -> None:
    deadlines: list[float] = []

    def rows() -> Iterator[int]:
        for i in range(2):
            deadlines.append(current_token().deadline)
            yield i

    async with iterate(rows()) as steps:
        with anyio.fail_after(WAIT):
            await steps.__anext__()
        await steps.__anext__()
    assert time.monotonic() < deadlines[0] <= time.monotonic() + WAIT
    assert deadlines[1] == float("inf")  # that step's caller has no deadline


# -- cancelling the consumer ---------------------------------------------------------------


async def test_cancelling_the_consumer_stops_a_step_waiting_on_the_token() -> None:
    record = Record()
    started = anyio.Event()
    async with iterate(waiting_on_the_token(record, started)) as rows:
        assert await rows.__anext__() == 0
        begin = time.monotonic()
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:
                group.start_soon(_cancel_when, started, scope, "the client left")
                await rows.__anext__()
        assert time.monotonic() - begin < PROMPT
    assert scope.cancelled_caught  # the caller's own cancellation, not Cancelled
    token = record.step_tokens[1]
    assert token is record.step_tokens[0]  # the iteration's token, which the step saw fire
    assert token.cancel_called
    assert token.reason == "the client left"
    record.assert_finally_in_a_worker()  # Cancelled went through the generator, in the step
    assert record.finally_token is token


async def test_a_blocking_wait_in_a_step_stops_at_once() -> None:
    record = Record()
    started = anyio.Event()
    jobs: queue.Queue[str] = queue.Queue()

    def consume() -> Iterator[str]:
        try:
            while True:
                _signal(started)
                yield blocking.queue_get(jobs)  # nothing ever comes
        finally:
            record.finish()

    begin = time.monotonic()
    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(_cancel_when, started, scope, "stop")
            async for _ in iterate(consume()):
                pass  # pragma: no cover - nothing comes
    assert time.monotonic() - begin < PROMPT
    assert scope.cancelled_caught
    record.assert_finally_in_a_worker()
    assert record.finally_fired


async def test_a_step_that_ignores_the_token_is_waited_for_and_its_item_kept() -> None:
    started = anyio.Event()
    release = threading.Event()
    tokens: list[CancelToken] = []
    got: list[object] = []

    def stubborn() -> Iterator[str]:
        tokens.append(current_token())
        _signal(started)
        release.wait(WAIT)  # not on the token: it finishes its step regardless
        yield "late row"

    async def cancel_then_release(scope: anyio.CancelScope) -> None:
        await started.wait()
        scope.cancel()
        await anyio.to_thread.run_sync(tokens[0].wait, WAIT)  # the step's token fired...
        assert got == []  # ...and the caller still waits for the step
        release.set()

    async with iterate(stubborn()) as rows, anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(cancel_then_release, scope)
            got.append(await rows.__anext__())
            await anyio.lowlevel.checkpoint()  # the cancellation is delivered here
            got.append("past the checkpoint")  # pragma: no cover
    assert got == ["late row"]
    assert scope.cancelled_caught
    assert tokens[0].cancel_called


async def test_the_token_fires_when_a_later_steps_caller_is_cancelled() -> None:
    record = Record()
    started = anyio.Event()
    rows = iterate(waiting_on_the_token(record, started))
    assert await rows.__anext__() == 0
    first_token = record.step_tokens[0]
    assert not first_token.cancel_called
    with anyio.move_on_after(0.05):
        await rows.__anext__()
    assert first_token.cancel_called
    assert first_token.reason == "deadline exceeded"
    with pytest.raises(StopAsyncIteration):  # the generator stopped with Cancelled
        await rows.__anext__()


async def test_a_caller_cancelled_before_a_step_never_runs_it() -> None:
    record = Record()
    async with iterate(counting(record, 3)) as rows:
        assert await rows.__anext__() == 0
        with anyio.CancelScope() as scope:
            scope.cancel()
            await rows.__anext__()
        assert scope.cancelled_caught
        assert len(record.step_threads) == 1  # the generator did not move
        assert await rows.__anext__() == 1


def test_plain_asyncio_task_cancel_stops_the_step() -> None:
    record = Record()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()

        def rows() -> Iterator[int]:
            try:
                record.step()
                loop.call_soon_threadsafe(running.set)
                current_token().sleep(WAIT)
                yield 0  # pragma: no cover - the token fired
            finally:
                record.finish()

        async def consume() -> None:
            async for _ in iterate(rows()):
                pass  # pragma: no cover

        task = asyncio.create_task(consume())
        await running.wait()
        task.cancel("shutting down")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert record.step_tokens[0].cancel_called
    assert record.step_tokens[0].reason == "shutting down"
    record.assert_finally_in_a_worker()


# -- closing ---------------------------------------------------------------------------------


async def test_aclose_closes_the_generator_in_a_worker_and_waits_for_it() -> None:
    record = Record()
    in_finally = anyio.Event()
    release = threading.Event()
    closed = anyio.Event()

    def rows() -> Iterator[int]:
        try:
            record.step()
            yield 0
            yield 1  # pragma: no cover - closed before
        finally:
            _signal(in_finally)
            release.wait(WAIT)
            record.finish()

    steps = iterate(rows())
    assert await steps.__anext__() == 0

    async def close() -> None:
        await steps.aclose()
        closed.set()

    async with anyio.create_task_group() as group:
        group.start_soon(close)
        with anyio.fail_after(WAIT):
            await in_finally.wait()
        assert not closed.is_set()  # aclose() waits for the finally
        release.set()
    record.assert_finally_in_a_worker()
    assert record.finally_token is record.step_tokens[0]
    assert not record.finally_fired  # closed, not cancelled
    with pytest.raises(StopAsyncIteration):
        await steps.__anext__()
    await steps.aclose()  # again: nothing to do


async def test_leaving_async_with_closes_it() -> None:
    record = Record()
    async with iterate(counting(record, 10)) as rows:
        async for row in rows:
            if row == 2:
                break
    record.assert_finally_in_a_worker()
    assert record.finally_token is record.step_tokens[0]


async def test_leaving_async_for_early_closes_it_in_another_thread() -> None:
    record = Record()
    async for row in iterate(counting(record, 10)):
        if row == 2:
            break  # the iteration is dropped unclosed
    await record.wait_finished()
    record.assert_finally_in_a_worker()
    assert record.finally_token is record.step_tokens[0]
    assert record.finally_fired  # nobody waits: the token asks the cleanup to be quick
    assert record.finally_reason == UNCLOSED


async def test_garbage_collected_in_a_reference_cycle_it_closes_in_another_thread() -> None:
    record = Record()
    cycle: list[Any] = [iterate(counting(record, 10))]
    cycle.append(cycle)
    assert await cycle[0].__anext__() == 0
    del cycle
    gc.collect()  # here, on the event loop's thread
    await record.wait_finished()
    record.assert_finally_in_a_worker()
    assert record.finally_token is record.step_tokens[0]
    assert record.finally_fired


async def test_the_task_that_stepped_it_ending_closes_it() -> None:
    record = Record()
    rows = iterate(counting(record, 10))  # still referenced here: not garbage

    async def take_one() -> None:
        assert await rows.__anext__() == 0

    async with anyio.create_task_group() as group:
        group.start_soon(take_one)
    await record.wait_finished()
    record.assert_finally_in_a_worker()
    assert record.finally_fired
    assert record.finally_reason == UNCLOSED
    with pytest.raises(StopAsyncIteration):
        await rows.__anext__()


async def test_an_iteration_stepped_by_another_task_lives_on() -> None:
    record = Record()
    rows = iterate(counting(record, 3))
    handed_over = anyio.Event()
    taken = anyio.Event()

    async def take_one_then_leave() -> None:
        assert await rows.__anext__() == 0
        handed_over.set()
        await taken.wait()

    async with rows, anyio.create_task_group() as group:
        group.start_soon(take_one_then_leave)
        await handed_over.wait()
        assert await rows.__anext__() == 1  # this task steps it now
        taken.set()
    assert record.finished.is_set()
    assert not record.finally_fired  # closed by the async with, not left by the task


async def test_closing_a_cancelled_caller_still_closes_in_a_worker_then_cancels() -> None:
    record = Record()
    rows = iterate(counting(record, 10))
    assert await rows.__anext__() == 0
    with anyio.CancelScope() as scope:
        scope.cancel("request cancelled")
        await rows.aclose()
    assert scope.cancelled_caught
    record.assert_finally_in_a_worker()
    assert record.finally_fired
    assert record.finally_reason == "request cancelled"


async def test_a_consumer_cancelled_between_steps_closes_it_with_the_token_fired() -> None:
    record = Record()
    with anyio.CancelScope() as scope:
        async with iterate(counting(record, 10)) as rows:
            async for _ in rows:
                scope.cancel("client left")
                await anyio.sleep_forever()  # cancelled here, between two steps
    assert scope.cancelled_caught
    record.assert_finally_in_a_worker()
    assert record.finally_fired
    assert record.finally_reason == "client left"


async def test_a_close_waiting_on_the_token_stops_when_its_caller_is_cancelled() -> None:
    record = Record()
    in_finally = anyio.Event()

    def rows() -> Iterator[int]:
        try:
            yield 0
        finally:
            _signal(in_finally)
            current_token().wait(WAIT)  # a cleanup that waits (a rollback, say)
            record.finish()

    steps = iterate(rows())
    assert await steps.__anext__() == 0
    begin = time.monotonic()
    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(_cancel_when, in_finally, scope, "hurry")
            await steps.aclose()  # the finally returned: as run_sync, no error, and...
            await anyio.lowlevel.checkpoint()  # ...the cancellation comes at a checkpoint
    assert time.monotonic() - begin < PROMPT
    assert scope.cancelled_caught
    record.assert_finally_in_a_worker()
    assert record.finally_reason == "hurry"


async def test_an_error_in_the_finally_propagates_from_aclose() -> None:
    def rows() -> Iterator[int]:
        try:
            yield 0
        finally:
            raise OSError("could not release the cursor")

    steps = iterate(rows())
    await steps.__anext__()
    with pytest.raises(OSError, match="could not release"):
        await steps.aclose()


async def test_only_generators_are_closed() -> None:
    closed: list[bool] = []

    class File:
        def __iter__(self) -> File:
            return self

        def __next__(self) -> str:
            return "line"

        def close(self) -> None:  # pragma: no cover - must not be called
            closed.append(True)

    async with iterate(File()) as lines:
        assert await lines.__anext__() == "line"
    assert closed == []  # what you opened is yours to close


async def test_closing_drops_the_tokens_callbacks() -> None:
    class Callback:
        def __call__(self) -> None:  # pragma: no cover - never fired
            pass

    refs: list[weakref.ref[Callback]] = []

    def rows() -> Iterator[int]:
        callback = Callback()
        refs.append(weakref.ref(callback))
        current_token().on_cancel(callback)
        yield 0

    async with iterate(rows()) as steps:
        await steps.__anext__()
    gc.collect()
    assert refs[0]() is None


# -- options and misuse ------------------------------------------------------------------------


async def test_the_limiter_is_held_for_each_step_not_between_steps() -> None:
    limiter = anyio.CapacityLimiter(1)
    during: list[int] = []

    def rows() -> Iterator[int]:
        for i in range(2):
            during.append(anyio.from_thread.run_sync(lambda: limiter.borrowed_tokens))
            yield i

    async with iterate(rows(), limiter=limiter) as steps:
        async for _ in steps:
            assert limiter.borrowed_tokens == 0
    assert during == [1, 1]


async def test_interrupt_after_stops_a_step_that_ignores_its_token() -> None:
    record = Record()
    started = anyio.Event()

    def spin() -> Iterator[int]:
        try:
            _signal(started)
            while True:
                pass
            yield 0  # pragma: no cover
        finally:
            record.finish()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:
                group.start_soon(_cancel_when, started, scope, "stop spinning")
                await iterate(spin(), interrupt_after=0.05).__anext__()
    assert scope.cancelled_caught
    record.assert_finally_in_a_worker()


async def test_one_task_at_a_time() -> None:
    started = anyio.Event()
    release = threading.Event()

    def rows() -> Iterator[int]:
        _signal(started)
        release.wait(WAIT)
        yield 0

    steps = iterate(rows())
    async with anyio.create_task_group() as group:
        group.start_soon(steps.__anext__)
        await started.wait()
        with pytest.raises(RuntimeError, match="running a step already"):
            await steps.__anext__()
        with pytest.raises(RuntimeError, match="running a step already"):
            await steps.aclose()
        release.set()
    await steps.aclose()


async def test_a_cancelled_for_another_token_propagates_as_it_is() -> None:
    other = bridgecancel.CancelSource()
    other.cancel("someone else")

    def rows() -> Iterator[int]:
        other.token.check()
        yield 0  # pragma: no cover

    with pytest.raises(Cancelled) as excinfo:
        await iterate(rows()).__anext__()
    assert excinfo.value.token is other.token


def test_what_it_cannot_iterate_is_refused_with_what_to_do() -> None:
    async def agen() -> AsyncIterator[int]:
        yield 1

    def gen() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async for"):
        iterate(agen())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator function: call it"):
        iterate(gen)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sync iterable"):
        iterate(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CapacityLimiter"):
        iterate([1], limiter=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interrupt_after"):
        iterate([1], interrupt_after=-1)


async def test_it_is_an_async_iterator_named_as_the_user_imports_it() -> None:
    rows = iterate([1])
    assert isinstance(rows, AsyncIterator)
    assert repr(rows) == "<bridgecancel.iterate over [1]>"
    assert iterate.__module__ == "bridgecancel"
    await rows.aclose()
