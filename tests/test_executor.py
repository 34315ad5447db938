"""`bridgecancel.ThreadPoolExecutor` (issue 16, item 4): a ``concurrent.futures`` thread pool
whose jobs see their own token.

Through the public API. Sync code drives the executor directly; plain asyncio code
(``asyncio.to_thread``, ``run_in_executor``) runs under ``asyncio.run``; async code on
either backend waits for a future in a thread (the anyio plugin runs those on asyncio and
trio). Jobs are held on events, never on sleeps; every executor is shut down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import subprocess
import sys
import threading
from collections.abc import Generator, Iterator
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import anyio
import anyio.to_thread
import pytest

import bridgecancel
from bridgecancel import Cancelled, CancelSource, CancelToken, current_token, use_token

WAIT = 10.0  # generous: bounds "promptly", it does not measure speed
FUTURE_CANCELLED = "the future was cancelled"
SHUTTING_DOWN = "the executor is shutting down"


@pytest.fixture
def executor() -> Iterator[bridgecancel.ThreadPoolExecutor]:
    pool = bridgecancel.ThreadPoolExecutor(2, thread_name_prefix="test-executor")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Job:
    """A job to submit: says it started, keeps its token, then waits as told.

    ``on_token`` makes it wait on its token (and raise `Cancelled` if it fired), else it
    waits for `release`; ``then_release`` makes it wait for `release` afterwards too, so
    that it provably still runs after its token fired.
    """

    def __init__(self, *, on_token: bool = True, then_release: bool = False) -> None:
        self.on_token = on_token
        self.then_release = then_release
        self.started = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        self.tokens: list[CancelToken] = []
        self.ran = False

    def __call__(self, value: object = "done") -> object:
        self.ran = True
        token = current_token()
        self.tokens.append(token)
        self.started.set()
        try:
            if self.on_token:
                token.wait(WAIT)
            if self.then_release or not self.on_token:
                self.release.wait(WAIT)
            if self.on_token:
                token.check()
            return value
        finally:
            self.ended.set()

    @property
    def token(self) -> CancelToken:
        assert self.started.wait(WAIT), "the job never started"
        return self.tokens[0]


def _never() -> CancelToken:
    """The token `current_token()` returns outside any job."""
    return current_token()


# -- the class ---------------------------------------------------------------------------------


def test_it_is_a_concurrent_futures_thread_pool_with_the_same_constructor() -> None:
    assert issubclass(bridgecancel.ThreadPoolExecutor, concurrent.futures.ThreadPoolExecutor)
    seen: list[object] = []
    pool = bridgecancel.ThreadPoolExecutor(1, "named-pool", seen.append, ("initialised",))
    try:
        name = pool.submit(lambda: threading.current_thread().name).result(WAIT)
    finally:
        pool.shutdown()
    assert name.startswith("named-pool")
    assert seen == ["initialised"]
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        bridgecancel.ThreadPoolExecutor(0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        bridgecancel.ThreadPoolExecutor(1, initializer=42)  # type: ignore[arg-type]


def test_importing_the_package_does_not_load_concurrent_futures() -> None:
    code = (
        "import sys, bridgecancel\n"
        "before = 'concurrent.futures' in sys.modules\n"
        "pool = bridgecancel.ThreadPoolExecutor\n"
        "print(before, 'concurrent.futures' in sys.modules, 'anyio' in sys.modules,"
        " pool.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "True", "False", "bridgecancel"]


# -- each job sees its own token ---------------------------------------------------------------


def test_each_job_sees_a_token_of_its_own(executor: bridgecancel.ThreadPoolExecutor) -> None:
    first, second = Job(on_token=False), Job(on_token=False)
    futures = [executor.submit(first), executor.submit(second)]
    tokens = [first.token, second.token]  # both running at once, on two threads
    first.release.set()
    second.release.set()
    assert [f.result(WAIT) for f in futures] == ["done", "done"]
    assert tokens[0] is not tokens[1]
    assert _never() not in tokens
    assert not any(token.cancel_called for token in tokens)
    # A later job on a thread that ran one gets a new token again.
    assert executor.submit(current_token).result(WAIT) not in (*tokens, _never())


@pytest.mark.parametrize("how", ["ctx.run", "partial(ctx.run)"])
def test_a_job_run_in_a_context_of_the_callers_sees_its_token_there(
    executor: bridgecancel.ThreadPoolExecutor, how: str
) -> None:
    # asyncio.to_thread submits partial(ctx.run, func): the function runs in `ctx`, so the
    # token must be current in there. A context of the caller's own is left as it was.
    mine = CancelSource()
    with use_token(mine.token):
        ctx = contextvars.copy_context()
    if how == "ctx.run":
        future = executor.submit(ctx.run, current_token)
    else:
        future = executor.submit(functools.partial(ctx.run, current_token))
    seen = future.result(WAIT)
    assert seen is not mine.token
    assert seen is not _never()
    assert ctx.run(current_token) is mine.token


# -- future.cancel() -----------------------------------------------------------------------------


def test_cancelling_a_running_job_fires_its_token_and_answers_false(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    job = Job(then_release=True)
    future = executor.submit(job)
    token = job.token
    assert future.cancel() is False  # the Future contract: a running future still runs
    assert token.wait(WAIT)
    assert token.reason == FUTURE_CANCELLED
    assert future.running()
    assert not future.cancelled()
    assert not job.ended.is_set()
    job.release.set()
    with pytest.raises(Cancelled) as info:  # the job stopped by raising for its token
        future.result(WAIT)
    assert info.value.token is token
    assert info.value.reason == FUTURE_CANCELLED


def test_a_job_that_ignores_its_token_runs_on_and_returns_its_result(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    job = Job(on_token=False)
    future = executor.submit(job, "finished anyway")
    token = job.token
    assert future.cancel() is False
    assert token.wait(WAIT)
    assert token.reason == FUTURE_CANCELLED
    job.release.set()
    assert future.result(WAIT) == "finished anyway"
    assert not future.cancelled()


def test_cancelling_a_queued_job_answers_true_and_it_never_runs() -> None:
    pool = bridgecancel.ThreadPoolExecutor(1)
    try:
        busy, queued = Job(on_token=False), Job()
        running = pool.submit(busy)
        busy.token  # noqa: B018  (the one thread is busy)
        future = pool.submit(queued)
        assert future.cancel() is True
        assert future.cancelled()
        busy.release.set()
        assert running.result(WAIT) == "done"
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(WAIT)
        assert pool.submit(lambda: "next").result(WAIT) == "next"  # the queue moved past it
    finally:
        pool.shutdown()
    assert not queued.ran
    assert not busy.tokens[0].cancel_called


def test_cancelling_a_finished_job_answers_false_and_fires_nothing(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    future = executor.submit(current_token)
    token = future.result(WAIT)
    assert future.cancel() is False
    assert not token.cancel_called


def test_callbacks_of_a_cancelled_job_run_off_the_cancelling_thread(
    executor: bridgecancel.ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[BaseException] = []
    reported = threading.Event()

    def hook(info: Any) -> None:
        errors.append(info.exc_value)
        reported.set()

    monkeypatch.setattr(sys, "unraisablehook", hook)
    ran_in: list[threading.Thread] = []

    def callback() -> None:
        ran_in.append(threading.current_thread())
        raise KeyError("from a callback")

    def job() -> None:
        with current_token().on_cancel(callback):
            started.set()
            current_token().wait(WAIT)
            assert reported.wait(WAIT)

    started = threading.Event()
    future = executor.submit(job)
    assert started.wait(WAIT)
    assert future.cancel() is False  # neither runs the callback here nor raises its error
    future.result(WAIT)
    assert ran_in
    assert ran_in[0] is not threading.current_thread()
    assert isinstance(errors[0], KeyError)


# -- shutdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_cancel_futures_fires_running_tokens_and_drops_queued_jobs(wait: bool) -> None:
    pool = bridgecancel.ThreadPoolExecutor(1)
    running, queued = Job(), Job()
    first = pool.submit(running)
    token = running.token
    second = pool.submit(queued)
    pool.shutdown(wait=wait, cancel_futures=True)
    if wait:
        assert running.ended.is_set()  # it stopped on its token, so shutdown could return
    else:
        pool.shutdown(wait=True)
    assert token.reason == SHUTTING_DOWN
    with pytest.raises(Cancelled):
        first.result(0)
    assert second.cancelled()
    assert not queued.ran


def test_shutdown_without_cancel_futures_lets_every_job_finish() -> None:
    pool = bridgecancel.ThreadPoolExecutor(1)
    running, queued = Job(on_token=False), Job(on_token=False)
    first, second = pool.submit(running), pool.submit(queued)
    token = running.token
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    running.release.set()
    queued.release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert (first.result(0), second.result(0)) == ("done", "done")
    assert not token.cancel_called
    assert not queued.tokens[0].cancel_called


# -- as the base class ---------------------------------------------------------------------------


def test_an_exception_in_a_job_reaches_the_future_unchanged(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    error = ValueError("from the job")

    def fail() -> None:
        raise error

    future = executor.submit(fail)
    assert future.exception(WAIT) is error
    with pytest.raises(ValueError, match="from the job"):
        future.result(0)


def test_submit_after_shutdown_raises_as_the_base_class() -> None:
    pool = bridgecancel.ThreadPoolExecutor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(print)


def test_with_block_waits_for_the_jobs_without_cancelling_them() -> None:
    job = Job(on_token=False)
    with bridgecancel.ThreadPoolExecutor(1) as pool:
        future = pool.submit(job)
        job.token  # noqa: B018
        job.release.set()
    assert future.done()
    assert future.result(0) == "done"
    assert not job.tokens[0].cancel_called


def test_map_returns_in_order_and_its_early_exit_stops_the_running_job() -> None:
    pool = bridgecancel.ThreadPoolExecutor(1)
    try:
        assert list(pool.map(lambda x: x * x, range(5))) == [0, 1, 4, 9, 16]
        running, queued = Job(), Job()
        results = pool.map(lambda job: job(), [lambda: "first", running, queued])
        assert next(results) == "first"
        token = running.token
        assert isinstance(results, Generator)
        results.close()  # map cancels what is left: the queued job, and now the running one
        assert token.wait(WAIT)
        assert token.reason == FUTURE_CANCELLED
    finally:
        pool.shutdown()
    assert not queued.ran


def test_a_failing_initializer_breaks_the_pool_as_in_the_base_class() -> None:
    def broken() -> None:
        raise OSError("no database")

    pool = bridgecancel.ThreadPoolExecutor(1, initializer=broken)
    try:
        future = pool.submit(print)
        with pytest.raises(BrokenThreadPool):
            future.result(WAIT)
        with pytest.raises(BrokenThreadPool):
            pool.submit(print)
    finally:
        pool.shutdown()


def test_executor_jobs_are_not_counted_in_statistics(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    before = bridgecancel.statistics()
    job = Job(then_release=True)
    future = executor.submit(job)
    job.token  # noqa: B018
    assert bridgecancel.statistics() == before  # not running, for statistics()
    future.cancel()
    job.release.set()
    with pytest.raises(Cancelled):
        future.result(WAIT)
    assert bridgecancel.statistics() == before  # nor counted as cooperative


# -- plain asyncio: the default executor ---------------------------------------------------------


async def _until(event: threading.Event) -> None:
    """Wait for a thread's event without blocking the loop (or using its executor)."""
    for _ in range(int(WAIT / 0.001)):
        if event.is_set():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the job never started")


def test_asyncio_to_thread_job_stops_when_its_task_is_cancelled(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    job = Job(then_release=True)
    caller = CancelSource()

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(executor)
        with use_token(caller.token):  # to_thread copies this context, token and all
            task = asyncio.create_task(asyncio.to_thread(job))
        await _until(job.started)
        task.cancel("the user left")
        with pytest.raises(asyncio.CancelledError):
            await task
        # Not structured: the task is back while its thread still runs, told to stop.
        assert not job.ended.is_set()
        assert job.token.wait(WAIT)
        job.release.set()

    asyncio.run(main())
    assert job.token is not caller.token
    assert job.token is not _never()
    # asyncio cancels the concurrent future with a bare cancel(): the task's message
    # does not reach it, on any Python version.
    assert job.token.reason == FUTURE_CANCELLED
    assert not caller.cancel_called


def test_asyncio_run_in_executor_job_stops_when_wait_for_times_out(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    job = Job()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(None, job), 0.05)
        assert job.token.wait(WAIT)

    asyncio.run(main())
    assert job.ended.wait(WAIT)
    assert job.token.reason == FUTURE_CANCELLED


def test_asyncio_to_thread_returns_the_jobs_result(
    executor: bridgecancel.ThreadPoolExecutor,
) -> None:
    async def main() -> tuple[CancelToken, CancelToken]:
        asyncio.get_running_loop().set_default_executor(executor)
        token = await asyncio.to_thread(current_token)
        return token, current_token()

    job_token, after = asyncio.run(main())
    assert job_token is not after
    assert not job_token.cancel_called
    assert after is _never()  # the caller's context never saw the job's token


def test_plain_asyncio_to_thread_runs_on_without_it() -> None:
    # The anchor: the loop's own default executor gives the job no token that fires.
    job = Job(on_token=False)

    async def main() -> None:
        task = asyncio.create_task(asyncio.to_thread(job))
        await _until(job.started)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not job.token.cancel_called
        job.release.set()

    asyncio.run(main())
    assert job.token is _never()


# -- async code on either backend: a future waited for in a thread -----------------------------


@pytest.mark.anyio
async def test_awaiting_a_future_in_a_thread_gives_its_result(
    executor: bridgecancel.ThreadPoolExecutor, anyio_backend: str
) -> None:
    future = executor.submit(current_token)
    token = await anyio.to_thread.run_sync(future.result, WAIT)
    assert isinstance(token, CancelToken)
    assert token is not _never()


@pytest.mark.anyio
async def test_a_cancelled_waiter_cancels_the_future_and_the_job_stops(
    executor: bridgecancel.ThreadPoolExecutor, anyio_backend: str
) -> None:
    job = Job()
    future = executor.submit(job)

    async def wait_for_it() -> object:
        # What async code on trio (or anyio) writes to wait for an executor's future:
        # asyncio.wrap_future does the same by itself on asyncio.
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            future.cancel()
            raise

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(wait_for_it)
            await anyio.to_thread.run_sync(job.started.wait, WAIT)
            scope.cancel()
    assert scope.cancelled_caught
    assert await anyio.to_thread.run_sync(job.ended.wait, WAIT)
    assert job.token.reason == FUTURE_CANCELLED
    with pytest.raises(Cancelled):
        future.result(WAIT)


# -- the job's side of a cancel that comes before it begins (no public surface) -----------------


@pytest.mark.parametrize("told", ["future.cancel()", "shutdown(cancel_futures=True)"])
def test_a_job_told_to_stop_before_it_began_starts_with_its_token_fired(told: str) -> None:
    # The window between the base class's worker taking the job from its queue and the
    # job making its token: no public API can hold a thread in it, so the job's own
    # protocol is driven here by hand, as the worker would.
    from bridgecancel._executor import _Job, _Jobs

    jobs = _Jobs()
    job = _Job(jobs)
    if told == "future.cancel()":
        job.fire(FUTURE_CANCELLED)
    else:
        jobs.stopping = SHUTTING_DOWN
    token = job.run(current_token, (), {})
    assert token.cancel_called
    assert token.reason == (FUTURE_CANCELLED if told == "future.cancel()" else SHUTTING_DOWN)
    assert not jobs.running  # it left when it ended
    job.fire(FUTURE_CANCELLED)  # too late: nothing happens, nothing raises
