"""`run_sync`, a drop-in for `anyio.to_thread.run_sync`.

Async tests run on asyncio and trio through anyio; the plain-asyncio and plain-trio tests
drive `run_sync` from `asyncio.run` and `trio.run` directly. Worker threads are held on
events or on their token, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import operator
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import sniffio
import trio

import bridgecancel
from bridgecancel import Cancelled, CancelSource, CancelToken, current_token, run_sync
from bridgecancel.testing import IDLE_THREAD_PREFIXES

CALLER_CANCELLED = "the caller was cancelled"
WAIT = 10.0  # upper bound for any wait that should end much sooner
PROMPT = 2.0  # generous bound for "at once"

_cvar: contextvars.ContextVar[str] = contextvars.ContextVar("test_threads_cvar")


def _signal(event: anyio.Event) -> None:
    """From a worker thread: set `event` in the event loop."""
    anyio.from_thread.run_sync(event.set)


def _thread_totals() -> int:
    stats = bridgecancel.statistics().threads
    return stats.completed + stats.cooperative + stats.abandoned + stats.running


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- drop-in for anyio.to_thread.run_sync ---------------------------------------------


@pytest.mark.anyio
async def test_returns_result_and_passes_positional_args() -> None:
    assert await run_sync(operator.add, 2, 3) == 5
    assert await run_sync(lambda: "no args") == "no args"


@pytest.mark.anyio
async def test_runs_in_another_thread() -> None:
    worker = await run_sync(threading.get_ident)
    assert worker != threading.get_ident()


@pytest.mark.anyio
async def test_worker_exception_propagates_unchanged() -> None:
    raised: list[BaseException] = []

    def fail() -> None:
        exc = ValueError("from the worker")
        raised.append(exc)
        raise exc

    with pytest.raises(ValueError, match="from the worker") as excinfo:
        await run_sync(fail)
    assert excinfo.value is raised[0]


@pytest.mark.anyio
async def test_stop_iteration_behaves_as_in_anyio() -> None:
    def stop() -> None:
        raise StopIteration("done")

    with pytest.raises(RuntimeError) as anyio_info:
        await anyio.to_thread.run_sync(stop)
    with pytest.raises(RuntimeError) as ours_info:
        await run_sync(stop)
    assert str(ours_info.value) == str(anyio_info.value)
    assert isinstance(ours_info.value.__cause__, StopIteration)
    assert isinstance(anyio_info.value.__cause__, StopIteration)


@pytest.mark.anyio
async def test_contextvars_are_copied_into_the_worker() -> None:
    _cvar.set("caller")

    def read_and_set() -> str:
        seen = _cvar.get()
        _cvar.set("worker")
        return seen

    assert await run_sync(read_and_set) == "caller"
    assert _cvar.get() == "caller", "the worker's changes must not leak back"


@pytest.mark.anyio
async def test_no_current_async_library_in_the_worker() -> None:
    def library() -> str:
        try:
            return sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return "none"

    assert await run_sync(library) == "none"
    assert await anyio.to_thread.run_sync(library) == "none"


def _this_thread_and_its_name() -> tuple[threading.Thread, str]:
    thread = threading.current_thread()
    return thread, thread.name


class _Job:
    def __call__(self) -> tuple[threading.Thread, str]:
        return _this_thread_and_its_name()


def _fail_in(threads: list[threading.Thread]) -> None:
    threads.append(threading.current_thread())
    raise LookupError(threading.current_thread().name)


@pytest.mark.anyio
@pytest.mark.parametrize("abandon_on_cancel", [False, True])
async def test_a_worker_thread_is_named_after_its_job_while_it_runs(
    abandon_on_cancel: bool,
) -> None:
    """While a job runs, its thread is called ``bridgecancel: module.function``; after it,
    the thread has its pool's own name back (an idle pooled thread, as leak checks see)."""
    run = functools.partial(run_sync, abandon_on_cancel=abandon_on_cancel)
    expected = f"bridgecancel: {__name__}._this_thread_and_its_name"
    thread, name = await run(_this_thread_and_its_name)
    assert name == expected
    assert thread.name.startswith(IDLE_THREAD_PREFIXES)
    thread, name = await run(functools.partial(_this_thread_and_its_name))
    assert name == expected  # a partial is named after its function
    thread, name = await run(_Job())
    assert name == f"bridgecancel: {__name__}._Job"  # a callable object, after its class
    assert thread.name.startswith(IDLE_THREAD_PREFIXES)

    threads: list[threading.Thread] = []
    with pytest.raises(LookupError) as raised:
        await run(_fail_in, threads)
    assert raised.value.args == (f"bridgecancel: {__name__}._fail_in",)
    assert threads[0].name.startswith(IDLE_THREAD_PREFIXES)  # restored after an error too


@pytest.mark.anyio
async def test_each_job_has_its_own_token_and_the_caller_an_inert_one() -> None:
    first = await run_sync(current_token)
    second = await run_sync(current_token)
    outside = current_token()
    assert len({id(first), id(second), id(outside)}) == 3
    assert not first.cancel_called
    assert not outside.cancel_called


@pytest.mark.anyio
async def test_default_limiter_is_anyios() -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    before = limiter.borrowed_tokens
    running = anyio.Event()
    release = threading.Event()
    borrowed: list[float] = []

    def job() -> None:
        _signal(running)
        release.wait(WAIT)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_sync, job)
        await running.wait()
        borrowed.append(limiter.borrowed_tokens)
        release.set()
    assert borrowed == [before + 1]
    assert limiter.borrowed_tokens == before


@pytest.mark.anyio
async def test_limiter_bounds_concurrency() -> None:
    limiter = anyio.CapacityLimiter(1)
    first_running = anyio.Event()
    release = threading.Event()
    active = 0
    peak = 0
    lock = threading.Lock()
    queued: list[int] = []

    def job(first: bool) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        if first:
            _signal(first_running)
            release.wait(WAIT)
        with lock:
            active -= 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(run_sync, job, True, limiter=limiter))
        await first_running.wait()
        tg.start_soon(functools.partial(run_sync, job, False, limiter=limiter))
        tg.start_soon(functools.partial(run_sync, job, False, limiter=limiter))
        while limiter.statistics().tasks_waiting < 2:
            await anyio.sleep(0.001)
        queued.append(limiter.statistics().tasks_waiting)
        release.set()
    assert queued == [2]
    assert peak == 1
    assert limiter.borrowed_tokens == 0


@pytest.mark.anyio
async def test_from_thread_run_and_run_sync_work_in_the_worker() -> None:
    async def add(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    def job() -> tuple[int, str]:
        total = anyio.from_thread.run(add, 1, 2)
        library = anyio.from_thread.run_sync(sniffio.current_async_library)
        return total, library

    total, library = await run_sync(job)
    assert total == 3
    assert library == sniffio.current_async_library()


@pytest.mark.anyio
async def test_from_thread_check_cancelled_in_the_worker() -> None:
    cancelled_exc = anyio.get_cancelled_exc_class()
    running = anyio.Event()
    seen: list[str] = []

    def job() -> str:
        anyio.from_thread.check_cancelled()  # not cancelled yet: returns
        seen.append("passed")
        _signal(running)
        current_token().wait(WAIT)
        try:
            anyio.from_thread.check_cancelled()
        except cancelled_exc:
            seen.append("cancelled")
            raise
        return "not cancelled"

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when, running, scope)
            await run_sync(job)
    assert seen == ["passed", "cancelled"]
    assert scope.cancelled_caught


async def _probe_from_worker(
    thread_runner: Callable[..., Awaitable[Any]], *, cancel_first: bool
) -> list[str]:
    """Cancel the caller's scope before or while the worker runs an async probe.

    Returns what the probe saw, then what `anyio.from_thread.run` raised in the worker.
    """
    seen: list[str] = []
    in_worker = anyio.Event()
    probing = anyio.Event()
    go_on = threading.Event()

    async def probe() -> None:
        probing.set()
        try:
            if cancel_first:
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep(WAIT)
        except anyio.get_cancelled_exc_class():
            seen.append("probe cancelled")
            raise
        seen.append("probe not cancelled")

    def job() -> None:
        _signal(in_worker)
        if cancel_first:
            go_on.wait(WAIT)
        try:
            anyio.from_thread.run(probe)
        except BaseException as exc:
            seen.append(f"run raised {type(exc).__name__}")

    async def canceller(scope: anyio.CancelScope) -> None:
        if cancel_first:
            await in_worker.wait()
            scope.cancel()
            go_on.set()
        else:
            await probing.wait()
            scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller, scope)
            await thread_runner(job)
    return seen


@pytest.mark.anyio
async def test_from_thread_run_is_cancelled_with_the_callers_scope() -> None:
    """An async function running via `from_thread.run` is cancelled with the caller."""
    seen = await _probe_from_worker(run_sync, cancel_first=False)
    assert seen[0] == "probe cancelled"
    assert seen[1] == "run raised " + anyio.get_cancelled_exc_class().__name__


@pytest.mark.anyio
async def test_from_thread_run_after_cancel_behaves_as_in_anyio(anyio_backend: str) -> None:
    """Started after the caller's scope was cancelled, it behaves as under anyio itself.

    On trio the function runs inside the caller's cancel scope (by design: the thread
    runs with trio's ``abandon_on_cancel=False``), so it sees the cancellation. On
    asyncio, anyio itself does not cancel it, and neither does `run_sync`.
    """
    ours = await _probe_from_worker(run_sync, cancel_first=True)
    anyios = await _probe_from_worker(anyio.to_thread.run_sync, cancel_first=True)
    assert ours == anyios
    if anyio_backend == "trio":
        assert ours == ["probe cancelled", "run raised Cancelled"]


# -- the caller's cancellation reaches the worker -------------------------------------


@pytest.mark.anyio
async def test_cancel_fires_token_and_cancelled_worker_gives_native_cancel() -> None:
    running = anyio.Event()
    tokens: list[CancelToken] = []

    def job() -> None:
        tokens.append(current_token())
        _signal(running)
        current_token().sleep(WAIT)  # raises Cancelled when the token fires

    start = time.monotonic()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when, running, scope)
            await run_sync(job)
        pytest.fail("the cancellation must propagate")  # pragma: no cover
    assert scope.cancelled_caught
    assert time.monotonic() - start < PROMPT
    assert tokens[0].cancel_called
    assert tokens[0].reason == CALLER_CANCELLED


@pytest.mark.anyio
async def test_returns_only_when_the_worker_has_finished() -> None:
    events: list[str] = []
    running = anyio.Event()
    proceed = threading.Event()

    def job() -> str:
        _signal(running)
        proceed.wait(WAIT)  # ignores the token
        events.append("worker finished")
        return "result"

    async def canceller(scope: anyio.CancelScope) -> None:
        await running.wait()
        scope.cancel()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.05)  # room for a premature return to show
        events.append("releasing the worker")
        proceed.set()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller, scope)
            events.append(await run_sync(job))
    assert scope.cancel_called
    assert events == ["releasing the worker", "worker finished", "result"]


@pytest.mark.anyio
async def test_result_after_cancel_is_delivered_then_cancel_at_next_checkpoint() -> None:
    running = anyio.Event()
    reached: list[str] = []

    def job() -> str:
        _signal(running)
        current_token().wait(WAIT)  # notices the cancel, but returns normally
        return "result"

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when, running, scope)
            reached.append(await run_sync(job))
            await anyio.lowlevel.checkpoint()
            reached.append("past the checkpoint")  # pragma: no cover
    assert reached == ["result"]
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_worker_exception_after_cancel_propagates_unchanged() -> None:
    tokens: list[CancelToken] = []

    def job() -> None:
        anyio.from_thread.run_sync(scope.cancel)
        tokens.append(current_token())
        current_token().wait(WAIT)
        raise KeyError("cleanup failed")

    with pytest.raises(KeyError, match="cleanup failed"), anyio.CancelScope() as scope:
        await run_sync(job)
    assert scope.cancel_called
    assert tokens[0].cancel_called


@pytest.mark.anyio
async def test_cancelled_for_another_token_propagates_unchanged() -> None:
    other = CancelSource()
    other.cancel("someone else")

    with pytest.raises(Cancelled) as excinfo:
        await run_sync(other.token.check)
    assert excinfo.value.token is other.token
    assert excinfo.value.reason == "someone else"


@pytest.mark.anyio
async def test_already_cancelled_caller_never_starts_the_job() -> None:
    ran: list[bool] = []
    before = _thread_totals()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await run_sync(ran.append, True)
    assert scope.cancelled_caught
    assert ran == []
    assert _thread_totals() == before


@pytest.mark.anyio
@pytest.mark.parametrize("abandon", [False, True], ids=["wait", "abandon"])
async def test_job_cancelled_behind_its_limiter_never_starts(abandon: bool) -> None:
    limiter = anyio.CapacityLimiter(1)
    holder_running = anyio.Event()
    release = threading.Event()
    ran: list[str] = []
    left_queue: list[float] = []

    def holder() -> None:
        _signal(holder_running)
        release.wait(WAIT)

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(run_sync, holder, limiter=limiter))
        await holder_running.wait()
        try:
            with anyio.CancelScope() as queued_scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(
                        functools.partial(
                            run_sync,
                            ran.append,
                            "queued",
                            limiter=limiter,
                            abandon_on_cancel=abandon,
                        )
                    )
                    while limiter.statistics().tasks_waiting < 1:
                        await anyio.sleep(0.001)
                    queued_scope.cancel()
            # The queued call has left at once, while the holder still runs.
            left_queue.append(limiter.statistics().tasks_waiting)
            left_queue.append(limiter.borrowed_tokens)
        finally:
            release.set()
    assert left_queue == [0, 1]
    assert ran == []
    assert limiter.borrowed_tokens == 0


# -- the caller's deadline ------------------------------------------------------------


@pytest.mark.anyio
async def test_token_carries_the_callers_effective_deadline() -> None:
    with anyio.fail_after(30):
        with anyio.fail_after(60):  # the outer, earlier deadline wins
            expected = time.monotonic() + 30
            deadline = await run_sync(lambda: current_token().deadline)
            remaining = await run_sync(lambda: current_token().remaining())
    assert abs(deadline - expected) < PROMPT
    assert 30 - PROMPT < remaining <= 30


@pytest.mark.anyio
async def test_token_has_no_deadline_without_one_or_under_a_shield() -> None:
    assert await run_sync(lambda: current_token().deadline) == math.inf
    with anyio.fail_after(30), anyio.CancelScope(shield=True):
        assert await run_sync(lambda: current_token().deadline) == math.inf


@pytest.mark.anyio
async def test_passing_deadline_is_reported_as_the_scopes_cancellation() -> None:
    start = time.monotonic()
    with anyio.move_on_after(0.1) as scope:
        await run_sync(lambda: current_token().sleep(WAIT))
        pytest.fail("the cancellation must propagate")  # pragma: no cover
    assert scope.cancelled_caught
    assert time.monotonic() - start < PROMPT


@pytest.mark.anyio
async def test_failing_task_group_cancels_the_worker() -> None:
    running = anyio.Event()
    tokens: list[CancelToken] = []

    def job() -> None:
        tokens.append(current_token())
        _signal(running)
        current_token().sleep(WAIT)

    async def fail() -> None:
        await running.wait()
        raise ValueError("sibling failed")

    start = time.monotonic()
    with pytest.RaisesGroup(ValueError):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_sync, job)
            tg.start_soon(fail)
    assert time.monotonic() - start < PROMPT
    assert tokens[0].cancel_called


@pytest.mark.anyio
async def test_deadline_is_the_scopes_cancellation_and_the_tokens_reason() -> None:
    """The token fires from the scope at its deadline, with the deadline as its reason."""
    tokens: list[CancelToken] = []

    def job() -> None:
        tokens.append(current_token())
        current_token().sleep(WAIT)

    with anyio.move_on_after(0.1) as scope:
        await run_sync(job)
        pytest.fail("the cancellation must propagate")  # pragma: no cover
    assert scope.cancelled_caught
    assert tokens[0].reason == "deadline exceeded"


# -- abandon_on_cancel and its deprecated alias ---------------------------------------


async def _abandon(**options: Any) -> tuple[CancelToken, threading.Event, threading.Event]:
    """Cancel a run_sync(**options) whose worker ignores its token; return at once.

    Returns the worker's token, the event that releases the worker and one the worker
    sets when it ends. The caller must release the worker and wait for the end.
    """
    running = anyio.Event()
    release = threading.Event()
    ended = threading.Event()
    tokens: list[CancelToken] = []

    def job() -> str:
        try:
            tokens.append(current_token())
            _signal(running)
            release.wait(WAIT)
            return "discarded"
        finally:
            ended.set()

    try:
        start = time.monotonic()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when, running, scope)
                await run_sync(job, **options)
        assert scope.cancelled_caught
        assert time.monotonic() - start < PROMPT
        assert not ended.is_set(), "the call must return while the worker still runs"
    except BaseException:
        release.set()
        raise
    return tokens[0], release, ended


@pytest.mark.anyio
async def test_abandon_on_cancel_returns_at_once_and_fires_the_token() -> None:
    token, release, ended = await _abandon(abandon_on_cancel=True)
    assert token.cancel_called
    assert token.reason == CALLER_CANCELLED
    release.set()
    assert ended.wait(WAIT)


@pytest.mark.anyio
async def test_abandon_on_cancel_without_cancel_returns_the_result() -> None:
    assert await run_sync(operator.mul, 6, 7, abandon_on_cancel=True) == 42


@pytest.mark.anyio
async def test_cancellable_is_a_deprecated_alias_of_abandon_on_cancel() -> None:
    with pytest.warns(DeprecationWarning, match="abandon_on_cancel") as record:
        token, release, ended = await _abandon(cancellable=True)
    assert record[0].filename == __file__
    assert token.cancel_called
    release.set()
    assert ended.wait(WAIT)

    with pytest.warns(DeprecationWarning, match="cancellable"):
        assert await run_sync(operator.neg, 1, cancellable=False) == -1


# -- bad input ------------------------------------------------------------------------


async def _async_function() -> None:
    await anyio.lowlevel.checkpoint()  # pragma: no cover


class _AsyncCallable:
    async def __call__(self) -> None:
        await anyio.lowlevel.checkpoint()  # pragma: no cover


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("func", "match"),
    [
        pytest.param(42, "needs a callable", id="not-callable"),
        pytest.param(None, "needs a callable", id="none"),
        pytest.param(_async_function, "await it directly", id="async-function"),
        pytest.param(functools.partial(_async_function), "await it directly", id="async-partial"),
        pytest.param(_AsyncCallable(), "await it directly", id="returns-coroutine"),
        pytest.param(lambda: _async_function(), "returned a coroutine", id="lambda-coroutine"),
    ],
)
async def test_bad_function_raises_type_error_naming_the_fix(func: Any, match: str) -> None:
    limiter = anyio.CapacityLimiter(1)
    running_before = bridgecancel.statistics().threads.running
    with pytest.raises(TypeError, match=match):
        await run_sync(func, limiter=limiter)
    # Nothing else is affected: the limiter is free, nothing runs, the next call works.
    assert limiter.borrowed_tokens == 0
    assert bridgecancel.statistics().threads.running == running_before
    assert await run_sync(operator.add, 1, 1, limiter=limiter) == 2


@pytest.mark.anyio
async def test_non_callable_is_rejected_before_any_thread_starts() -> None:
    before = _thread_totals()
    with pytest.raises(TypeError, match="needs a callable"):
        await run_sync("not a function")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="await it directly"):
        await run_sync(_async_function)  # type: ignore[unused-coroutine]
    assert _thread_totals() == before


# -- plain asyncio --------------------------------------------------------------------


def _asyncio_started(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    loop.call_soon_threadsafe(event.set)


def test_asyncio_timeout_cancels_the_worker() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("uses asyncio API that is new in Python 3.11")

    tokens: list[CancelToken] = []

    def job() -> None:
        tokens.append(current_token())
        current_token().sleep(WAIT)

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await run_sync(job)
        return time.monotonic() - start

    assert asyncio.run(main()) < PROMPT
    assert tokens[0].cancel_called
    assert tokens[0].reason == CALLER_CANCELLED


def test_asyncio_timeout_drops_a_late_result_and_times_out() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("uses asyncio API that is new in Python 3.11")

    reached: list[str] = []

    def job() -> str:
        current_token().wait(WAIT)
        return "result"

    async def main() -> None:
        async with asyncio.timeout(0.1):
            reached.append(await run_sync(job))
            await asyncio.sleep(0)
            reached.append("past the checkpoint")  # pragma: no cover

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert reached == []  # plain asyncio: the timeout is raised once the worker finished


def test_asyncio_task_cancel_cancels_the_worker() -> None:
    tokens: list[CancelToken] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()

        def job() -> None:
            tokens.append(current_token())
            _asyncio_started(loop, running)
            current_token().sleep(WAIT)

        task = asyncio.create_task(run_sync(job))
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert tokens[0].cancel_called


def test_asyncio_task_cancel_is_raised_once_the_worker_returned() -> None:
    reached: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()

        def job() -> str:
            _asyncio_started(loop, running)
            current_token().wait(WAIT)
            return "result"

        async def body() -> None:
            try:
                reached.append(await run_sync(job))
            except asyncio.CancelledError:
                if sys.version_info >= (3, 11):  # one request, not counted twice
                    this_task = asyncio.current_task()
                    assert this_task is not None
                    reached.append(f"cancelling={this_task.cancelling()}")
                raise

        task = asyncio.create_task(body())
        await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert reached == ["cancelling=1"][: 1 if sys.version_info >= (3, 11) else 0]


def test_asyncio_task_group_failure_cancels_the_worker() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("uses asyncio API that is new in Python 3.11")

    tokens: list[CancelToken] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()

        def job() -> None:
            tokens.append(current_token())
            _asyncio_started(loop, running)
            current_token().sleep(WAIT)

        async def fail() -> None:
            await running.wait()
            raise ValueError("sibling failed")

        with pytest.RaisesGroup(ValueError):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_sync(job))
                tg.create_task(fail())

    asyncio.run(main())
    assert tokens[0].cancel_called


def test_asyncio_repeated_task_cancel_still_waits_for_the_worker() -> None:
    events: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = asyncio.Event()
        proceed = threading.Event()

        def job() -> str:
            _asyncio_started(loop, running)
            proceed.wait(WAIT)  # ignores the token
            events.append("worker finished")
            return "result"

        async def body() -> None:
            events.append(await run_sync(job))
            await asyncio.sleep(0)
            events.append("past the checkpoint")  # pragma: no cover

        task = asyncio.create_task(body())
        await running.wait()
        for _ in range(3):
            task.cancel()
            await asyncio.sleep(0.01)  # room for a premature return to show
        events.append("releasing the worker")
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The task waited for its worker, then ended cancelled (plain asyncio: the value is
    # dropped for the cancellation that still stands).
    assert events == ["releasing the worker", "worker finished"]


def test_asyncio_task_cancel_while_queued_behind_the_limiter() -> None:
    ran: list[str] = []

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        limiter = anyio.CapacityLimiter(1)
        holder_running = asyncio.Event()
        release = threading.Event()

        def holder() -> None:
            _asyncio_started(loop, holder_running)
            release.wait(WAIT)

        holding = asyncio.create_task(run_sync(holder, limiter=limiter))
        try:
            await holder_running.wait()
            queued = asyncio.create_task(run_sync(ran.append, "queued", limiter=limiter))
            while limiter.statistics().tasks_waiting < 1:
                await asyncio.sleep(0.001)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            waiting = limiter.statistics().tasks_waiting
        finally:
            release.set()
            await holding
        return waiting, limiter.borrowed_tokens

    assert asyncio.run(main()) == (0, 0)
    assert ran == []


def test_asyncio_native_tasks() -> None:
    async def main() -> list[int]:
        tasks = [asyncio.create_task(run_sync(operator.mul, n, n)) for n in range(4)]
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == [0, 1, 4, 9]


def test_asyncio_outside_asyncio_run() -> None:
    async def main() -> tuple[int, float]:
        with anyio.fail_after(30):
            return await run_sync(operator.add, 1, 2), await run_sync(
                lambda: current_token().remaining()
            )

    loop = asyncio.new_event_loop()
    try:
        total, remaining = loop.run_until_complete(main())
    finally:
        loop.close()
    assert total == 3
    assert 30 - PROMPT < remaining <= 30


def test_asyncio_worker_exception_propagates() -> None:
    async def main() -> None:
        with pytest.raises(ZeroDivisionError):
            await run_sync(operator.truediv, 1, 0)

    asyncio.run(main())


# -- plain trio -----------------------------------------------------------------------


def test_trio_nursery_failure_cancels_the_worker() -> None:
    tokens: list[CancelToken] = []

    async def main() -> None:
        running = trio.Event()

        def job() -> None:
            tokens.append(current_token())
            trio.from_thread.run_sync(running.set)
            current_token().sleep(WAIT)

        async def fail() -> None:
            await running.wait()
            raise ValueError("sibling failed")

        with pytest.RaisesGroup(ValueError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_sync, job)
                nursery.start_soon(fail)

    trio.run(main)
    assert tokens[0].cancel_called
    # trio's own reason for the nursery's cancellation reaches the token (issue 16).
    assert tokens[0].reason is not None
    assert "sibling failed" in tokens[0].reason


def test_trio_move_on_after_cancels_the_worker() -> None:
    tokens: list[CancelToken] = []

    def job() -> None:
        tokens.append(current_token())
        current_token().sleep(WAIT)

    async def main() -> tuple[bool, float]:
        start = time.monotonic()
        with trio.move_on_after(0.1) as scope:
            await run_sync(job)
        return scope.cancelled_caught, time.monotonic() - start

    caught, elapsed = trio.run(main)
    assert caught
    assert elapsed < PROMPT
    assert tokens[0].cancel_called
    assert 0 < tokens[0].deadline < time.monotonic()


def test_trio_scope_cancel_delivers_late_result_then_cancels() -> None:
    reached: list[str] = []

    async def main() -> bool:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                running = trio.Event()

                def job() -> str:
                    trio.from_thread.run_sync(running.set)
                    current_token().wait(WAIT)
                    return "result"

                async def cancel() -> None:
                    await running.wait()
                    scope.cancel()

                nursery.start_soon(cancel)
                reached.append(await run_sync(job))
                await trio.lowlevel.checkpoint()
                reached.append("past the checkpoint")  # pragma: no cover
        return scope.cancelled_caught

    assert trio.run(main)
    assert reached == ["result"]


def test_trio_worker_exception_is_not_wrapped_in_a_group() -> None:
    async def main() -> None:
        with pytest.raises(ZeroDivisionError):
            await run_sync(operator.truediv, 1, 0)
        with pytest.raises(KeyboardInterrupt):
            await run_sync(_raise_keyboard_interrupt)

    trio.run(main)


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt
