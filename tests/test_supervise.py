"""The structured semantics (docs/structured.md), for threads and processes alike.

Each defect named in issues 7 and 8 that the supervisor fixes has a test here, on asyncio
and trio through anyio (and on plain asyncio where the defect is plain asyncio's).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

import _proc_helpers as h
import bridgecancel
from bridgecancel import BrokenWorkerError, CancelToken, current_token, run_process, run_sync

WAIT = 10.0  # upper bound for any wait that should end much sooner
PROMPT = 2.0  # generous bound for "at once"

pytestmark = pytest.mark.anyio


def _delta(kind: str, before: bridgecancel.JobStatistics) -> dict[str, int]:
    after = getattr(bridgecancel.statistics(), kind)
    names = [f for f in before.__dataclass_fields__ if f != "running"]
    changes = {name: getattr(after, name) - getattr(before, name) for name in names}
    return {name: n for name, n in changes.items() if n}


def _signal(event: anyio.Event) -> None:
    anyio.from_thread.run_sync(event.set)


async def _wait_for_file(path: Path) -> None:
    with anyio.fail_after(30):
        while not path.exists():
            await anyio.sleep(0.005)


class _Unraisable:
    """Collects what reaches sys.unraisablehook (callback errors go there)."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.threads: list[int] = []

    def __call__(self, info: Any) -> None:
        self.errors.append(info.exc_value)
        self.threads.append(threading.get_ident())

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while len(self.errors) < count:
                await anyio.sleep(0.005)


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> _Unraisable:
    hook = _Unraisable()
    monkeypatch.setattr(sys, "unraisablehook", hook)
    return hook


# -- defect 1: user callbacks never run on the event loop thread ---------------------------


@pytest.mark.parametrize("how", ["deadline", "cancel"])
@pytest.mark.slow
async def test_raising_callback_never_reaches_the_loop_or_the_caller(
    how: str, unraisable: _Unraisable
) -> None:
    running = anyio.Event()
    loop_thread = threading.get_ident()
    callback_threads: list[int] = []

    def failing_callback() -> None:
        callback_threads.append(threading.get_ident())
        raise KeyError("from a callback")

    def job() -> str:
        current_token().on_cancel(failing_callback)
        _signal(running)
        current_token().wait(WAIT)
        current_token().check()
        return "not reached"

    with anyio.CancelScope() as scope:
        if how == "deadline":
            scope.deadline = anyio.current_time() + 0.1
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_sync, job)
            await running.wait()
            if how == "cancel":
                scope.cancel()  # the canceller's own call raises nothing
    assert scope.cancelled_caught
    await unraisable.wait_for(1)
    assert "from a callback" in repr(unraisable.errors[0])  # alone or in a group
    assert callback_threads
    assert callback_threads[0] != loop_thread


async def test_blocking_callback_never_blocks_the_loop() -> None:
    running = anyio.Event()
    entered, release = threading.Event(), threading.Event()

    def blocking_callback() -> None:  # a driver's cancel() making a network round trip
        entered.set()
        release.wait(WAIT)

    def job() -> str:
        current_token().on_cancel(blocking_callback)
        _signal(running)
        fired = current_token().wait(WAIT)
        return "woke at once" if fired else "not woken"

    scope = anyio.CancelScope()
    results: list[str] = []

    async def caller() -> None:
        with scope:
            results.append(await run_sync(job))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await running.wait()
            start = time.monotonic()
            scope.cancel()
            while not entered.is_set():  # the loop runs on while the callback blocks
                await anyio.sleep(0.001)
            await anyio.sleep(0.01)
            loop_ran_after = time.monotonic() - start
            release.set()
    finally:
        release.set()
    assert loop_ran_after < PROMPT
    assert results == ["woke at once"]  # waiters woke without waiting for the callback


@pytest.mark.slow
async def test_open_token_callbacks_never_run_on_the_loop(unraisable: _Unraisable) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def failing_callback() -> None:
        threads.append(threading.get_ident())
        raise KeyError("from a callback")

    with anyio.move_on_after(0.05) as scope:
        async with bridgecancel.open_token() as token:
            token.on_cancel(failing_callback)
            await anyio.sleep(WAIT)
    assert scope.cancelled_caught
    await unraisable.wait_for(1)
    assert threads
    assert threads[0] != loop_thread


# -- defect 2: a deadline moved later never stops the job -----------------------------------


@pytest.mark.slow
async def test_thread_job_is_not_stopped_by_a_deadline_pushed_back() -> None:
    running = anyio.Event()
    tokens: list[CancelToken] = []

    def job() -> bool:
        tokens.append(current_token())
        _signal(running)
        return current_token().wait(0.6)  # True if the (old) deadline fired the token

    async def push_back(scope: anyio.CancelScope) -> None:
        await running.wait()
        scope.deadline += 30

    start = time.monotonic()
    with anyio.CancelScope(deadline=anyio.current_time() + 0.2) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(push_back, scope)
            fired = await run_sync(job)
    assert fired is False
    assert not scope.cancel_called
    assert time.monotonic() - start < 0.6 + PROMPT  # the caller never waits for the new one
    assert not tokens[0].cancel_called
    # The token kept the deadline the caller had at the start, for information.
    assert tokens[0].deadline < time.monotonic() + 1


@pytest.mark.slow
async def test_process_job_is_not_stopped_by_a_deadline_pushed_back(tmp_path: Path) -> None:
    marker = tmp_path / "started"

    async def push_back(scope: anyio.CancelScope) -> None:
        await _wait_for_file(marker)
        scope.deadline += 30

    start = time.monotonic()
    with anyio.CancelScope(deadline=anyio.current_time() + 1.0) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(push_back, scope)
            # Cancelled never escapes into async code: the job's own result comes back.
            fired = await run_process(h.wait_on_token, str(marker), 1.5)
    assert fired is False
    assert not scope.cancel_called
    assert time.monotonic() - start < 1.5 + 10


# -- defect 4: nested calls -------------------------------------------------------------------


async def test_nested_run_sync_through_from_thread_run() -> None:
    async def inner() -> int:
        return await run_sync(operator.add, 1, 2)

    def outer() -> int:
        return anyio.from_thread.run(inner) * 10

    assert await run_sync(outer) == 30


async def test_nested_run_sync_shares_an_explicit_limiter() -> None:
    limiter = anyio.CapacityLimiter(2)

    async def inner() -> int:
        return await run_sync(operator.add, 1, 2, limiter=limiter)

    def outer() -> int:
        return anyio.from_thread.run(inner)

    assert await run_sync(outer, limiter=limiter) == 3
    assert limiter.borrowed_tokens == 0


# -- defect 6: every job lands in exactly one outcome, the right one ------------------------


@pytest.mark.slow
async def test_process_job_cancelled_by_a_deadline_is_cooperative_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    before = bridgecancel.statistics().processes
    for i in range(3):
        with anyio.move_on_after(0.3):
            await run_process(h.wait_for_cancel, str(tmp_path / f"m{i}"))
    assert _delta("processes", before) == {"cooperative": 3}
    records = [r for r in caplog.records if r.name == "bridgecancel"]
    assert len(records) == 3
    assert all(r.levelno == logging.DEBUG for r in records)
    assert all("deadline exceeded" in r.getMessage() for r in records)


async def test_process_job_whose_worker_died_is_crashed() -> None:
    before = bridgecancel.statistics().processes
    with pytest.raises(BrokenWorkerError):
        await run_process(h.exit_with, 3)
    assert _delta("processes", before) == {"crashed": 1}
    assert bridgecancel.statistics().processes.running == before.running


# -- issue 8, defect 5: escalation waits for the job to start ----------------------------------


@pytest.mark.slow
async def test_process_job_cancelled_while_loading_never_starts_and_keeps_its_worker(
    tmp_path: Path,
) -> None:
    ran = tmp_path / "ran"
    await run_process(h.pid)  # a warm worker, so the job below is the one loading
    before = bridgecancel.statistics().processes
    with anyio.move_on_after(0.05) as scope:
        await run_process(
            h.mark_if_run, str(ran), h.SlowToLoad(0.5), interrupt_after=0.01, kill_after=0.02
        )
    assert scope.cancelled_caught
    assert not ran.exists()
    # Neither interrupted nor killed: the worker was still loading, and is reused.
    assert _delta("processes", before) == {"never_started": 1}
    assert await run_process(h.add, 1, 2) == 3


# -- issue 15, item 7: every call ends in one outcome, by the same rule for every kind -------


async def _cancel_while_queued(bridge: Callable[..., Any], func: Callable[[], object]) -> None:
    """Call `bridge(func)` behind a limiter that is held, and cancel it while it waits."""
    limiter = anyio.CapacityLimiter(1)
    await limiter.acquire()
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: bridge(func, limiter=limiter))
                with anyio.fail_after(WAIT):
                    while limiter.statistics().tasks_waiting < 1:
                        await anyio.sleep(0.001)
                scope.cancel()
        assert scope.cancelled_caught
    finally:
        limiter.release()


async def _call_in_cancelled_scope(bridge: Callable[..., Any], func: Callable[[], object]) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await bridge(func)
    assert scope.cancelled_caught


@pytest.mark.parametrize(
    "situation", [_call_in_cancelled_scope, _cancel_while_queued], ids=["cancelled-scope", "queued"]
)
async def test_a_call_cancelled_before_its_job_began_counts_as_never_started_for_both_bridges(
    situation: Callable[[Callable[..., Any], Callable[[], object]], Any],
) -> None:
    deltas = {}
    for kind, bridge, func in (("threads", run_sync, int), ("processes", run_process, h.pid)):
        before = getattr(bridgecancel.statistics(), kind)
        await situation(bridge, func)
        deltas[kind] = _delta(kind, before)
        assert getattr(bridgecancel.statistics(), kind).running == before.running
    # Before the fix processes counted neither (threads counted both).
    assert deltas["processes"] == deltas["threads"] == {"never_started": 1}


# -- issue 8, defect 6: one argument check for both bridges -----------------------------------


async def _agen() -> AsyncIterator[int]:
    yield 1


async def _coro() -> None:
    pass


@pytest.mark.parametrize("bridge", [run_sync, run_process], ids=["run_sync", "run_process"])
@pytest.mark.parametrize(
    ("func", "options", "match"),
    [
        (_agen, {}, "async generator function"),
        (_coro, {}, "coroutine function"),
        (h.pid, {"limiter": 5}, r"anyio\.CapacityLimiter\(n\)"),
        (h.pid, {"limiter": 0}, r"anyio\.CapacityLimiter\(n\)"),
        (h.pid, {"limiter": "x"}, r"anyio\.CapacityLimiter\(n\)"),
    ],
    ids=["async-generator", "coroutine", "limiter-5", "limiter-0", "limiter-str"],
)
async def test_bad_input_is_rejected_clearly(
    bridge: Callable[..., Any], func: Callable[..., Any], options: dict[str, Any], match: str
) -> None:
    before = bridgecancel.statistics()
    with pytest.raises(TypeError, match=match):
        await bridge(func, **options)
    assert bridgecancel.statistics() == before


# -- plain asyncio, the same on every Python (issue 15, item 1) ----------------------------


# The plain asyncio rule (docs/structured.md): a cancellation still standing when the
# worker has finished (not withdrawn by the asyncio.timeout(), wait_for() or task group
# that asked) is raised as CancelledError, whatever the worker returned; a timeout then
# turns it into TimeoutError as usual. The tests give the worker 0.3 s to start before
# their timeout fires.


def _returns_after_cancel(running: threading.Event) -> str:
    running.set()
    current_token().wait(WAIT)
    return "kept"


async def _plain_run_sync(running: threading.Event) -> str:
    return await run_sync(_returns_after_cancel, running)


@pytest.mark.slow
def test_plain_asyncio_timeout_cancel_never_escapes_its_block() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("asyncio.timeout() is new in 3.11")

    async def main() -> list[str]:
        seen: list[str] = []
        running = threading.Event()
        try:
            async with asyncio.timeout(0.3):
                seen.append(await _plain_run_sync(running))
        except TimeoutError:
            seen.append("timed out")
        await asyncio.sleep(0.01)  # an unrelated await: no stray cancellation here
        seen.append("after")
        return seen

    assert asyncio.run(main()) == ["timed out", "after"]


@pytest.mark.slow
def test_plain_asyncio_timeout_is_raised_once_the_worker_has_finished() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("asyncio.timeout() is new in 3.11")

    async def main() -> list[str]:
        seen: list[str] = []
        running = threading.Event()
        start = time.monotonic()
        try:
            async with asyncio.timeout(0.3):
                seen.append(await _plain_run_sync(running))
                await asyncio.sleep(WAIT)
        except TimeoutError:
            seen.append("timed out")
        assert time.monotonic() - start < PROMPT
        await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == ["timed out"]


@pytest.mark.slow
def test_plain_asyncio_wait_for_times_out_once_the_worker_has_finished() -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        running = threading.Event()
        try:
            seen.append(await asyncio.wait_for(_plain_run_sync(running), 0.3))
        except asyncio.TimeoutError:  # TimeoutError itself from 3.11
            seen.append("timed out")
        assert running.is_set()  # the worker had started: its value was there to keep
        await asyncio.sleep(0.01)
        seen.append("after")
        return seen

    assert asyncio.run(main()) == ["timed out", "after"]


def test_plain_asyncio_bare_task_cancel_still_cancels_the_task() -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        running = threading.Event()

        async def caller() -> None:
            seen.append(await _plain_run_sync(running))
            await asyncio.sleep(WAIT)
            seen.append("not cancelled")

        task = asyncio.create_task(caller())
        while not running.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            seen.append("cancelled")
        return seen

    assert asyncio.run(main()) == ["cancelled"]


@pytest.mark.parametrize("bridge", ["run_sync", "run_process"])
def test_plain_asyncio_bare_task_cancel_is_never_lost_when_the_call_is_the_last_await(
    bridge: str, tmp_path: Path
) -> None:
    # Issue 15, item 1: the worker returns a value after the cancel, and the call is the
    # task's last await. The task must end cancelled, with the canceller's message.
    async def main() -> asyncio.Task[str]:
        if bridge == "run_sync":
            running = threading.Event()
            task = asyncio.ensure_future(_plain_run_sync(running))
            while not running.is_set():
                await asyncio.sleep(0.001)
        else:
            marker = tmp_path / "started"
            task = asyncio.ensure_future(run_process(h.wait_then_return, str(marker)))
            await _wait_for_file(marker)
        task.cancel("shutting down")
        await asyncio.wait([task])
        return task

    task = asyncio.run(main())
    assert task.cancelled()
    # asyncio itself keeps the message on the task only from 3.11 (3.10's Task drops it).
    message = "shutting down" if sys.version_info >= (3, 11) else None
    with pytest.raises(asyncio.CancelledError, match=message):
        task.result()


@pytest.mark.anyio
async def test_an_anyio_scope_still_gets_the_late_result_then_its_cancellation() -> None:
    # The plain asyncio rule is for plain asyncio only: an anyio scope (on asyncio or
    # trio) delivers its cancellation again at the next checkpoint by itself, so the
    # worker's late value is handed over first.
    seen: list[str] = []
    running = threading.Event()
    with anyio.CancelScope() as scope:

        async def cancel_when_running() -> None:
            await anyio.to_thread.run_sync(running.wait)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_running)
            seen.append(await run_sync(_returns_after_cancel, running))
            await anyio.sleep(WAIT)
            seen.append("not cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert seen == ["kept"]


@pytest.mark.slow
def test_plain_asyncio_bare_cancel_beside_a_withdrawn_timeout_still_cancels() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("asyncio.timeout() is new in 3.11")

    async def main() -> list[str]:
        seen: list[str] = []
        noticed, release = threading.Event(), threading.Event()

        def job() -> str:
            current_token().wait(WAIT)  # fired by the timeout
            noticed.set()
            release.wait(WAIT)
            return "kept"

        async def caller() -> None:
            async with asyncio.timeout(0.3):
                seen.append(await run_sync(job))
            # The timeout withdraws its own request as the block exits, but the bare
            # Task.cancel() still stands: the block ends in CancelledError, not
            # TimeoutError, and nothing after it runs.
            seen.append("after the block")
            await asyncio.sleep(WAIT)
            seen.append("not cancelled")

        task = asyncio.create_task(caller())
        while not noticed.is_set():
            await asyncio.sleep(0.001)
        task.cancel()  # absorbed while the job finishes: a second, separate request
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            seen.append("cancelled")
        return seen

    assert asyncio.run(main()) == ["cancelled"]
