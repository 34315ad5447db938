"""`statistics()` and the ``bridgecancel`` logger.

Here for thread jobs (``run_sync``); `tests/test_processes.py` covers process jobs.
Counts are global, so each test compares against a snapshot taken before it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import anyio
import anyio.from_thread
import pytest

import bridgecancel
from bridgecancel import JobStatistics, Statistics, current_token, run_sync

WAIT = 10.0  # upper bound for any wait that should end much sooner
OUTCOMES = (
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
)


def _threads() -> JobStatistics:
    return bridgecancel.statistics().threads


def _delta(before: JobStatistics) -> dict[str, int]:
    """The outcome counts that changed since `before` (running excluded)."""
    after = _threads()
    changes = {name: getattr(after, name) - getattr(before, name) for name in OUTCOMES}
    return {name: n for name, n in changes.items() if n}


def _wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll a condition that a worker thread makes true just after its function returns."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bridgecancel"]


async def _cancel_while_running(
    job: Callable[[anyio.Event], object], *, abandon_on_cancel: bool = False
) -> None:
    """Run `job` with run_sync and cancel the caller once the job signals it runs."""
    running = anyio.Event()

    async def cancel_when_running(scope: anyio.CancelScope) -> None:
        await running.wait()
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_running, scope)
            await run_sync(job, running, abandon_on_cancel=abandon_on_cancel)
    assert scope.cancel_called


def test_statistics_is_a_frozen_record() -> None:
    stats = bridgecancel.statistics()
    assert isinstance(stats, Statistics)
    assert isinstance(stats.threads, JobStatistics)
    assert isinstance(stats.processes, JobStatistics)
    assert [f.name for f in dataclasses.fields(JobStatistics)] == [*OUTCOMES, "running"]
    # One record per kind of job: threads, processes, Dask and Celery calls.
    assert [f.name for f in dataclasses.fields(Statistics)] == [
        "threads", "processes", "cluster", "celery"
    ]
    assert all(isinstance(getattr(stats, f.name), JobStatistics) for f in dataclasses.fields(stats))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.threads = stats.processes  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.threads.completed = 0  # type: ignore[misc]


def test_statistics_is_a_snapshot() -> None:
    before = bridgecancel.statistics()
    completed = before.threads.completed

    async def one_job() -> int:
        return await run_sync(int)

    assert anyio.run(one_job) == 0
    assert before.threads.completed == completed, "a snapshot does not change"
    assert bridgecancel.statistics().threads.completed == completed + 1


@pytest.mark.anyio
async def test_completed_job_is_counted_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    before = _threads()
    processes_before = bridgecancel.statistics().processes
    assert await run_sync(int, "7") == 7
    assert _delta(before) == {"completed": 1}
    assert _threads().running == before.running
    assert bridgecancel.statistics().processes == processes_before
    assert _records(caplog) == []


@pytest.mark.anyio
async def test_job_raising_an_error_without_cancel_counts_as_completed() -> None:
    before = _threads()
    with pytest.raises(ZeroDivisionError):
        await run_sync(divmod, 1, 0)
    assert _delta(before) == {"completed": 1}


@pytest.mark.anyio
async def test_running_counts_jobs_in_their_worker() -> None:
    before = _threads().running
    running = anyio.Event()
    release = threading.Event()
    seen: list[int] = []

    def job() -> None:
        anyio.from_thread.run_sync(running.set)
        release.wait(WAIT)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_sync, job)
        await running.wait()
        seen.append(_threads().running)
        release.set()
    assert seen == [before + 1]
    assert _threads().running == before


def _raises_cancelled(running: anyio.Event) -> None:
    anyio.from_thread.run_sync(running.set)
    current_token().sleep(WAIT)


def _returns_after_cancel(running: anyio.Event) -> str:
    anyio.from_thread.run_sync(running.set)
    current_token().wait(WAIT)
    return "late result"


@pytest.mark.anyio
@pytest.mark.parametrize("job", [_raises_cancelled, _returns_after_cancel])
async def test_cooperative_job_is_counted_and_logged_at_debug(
    job: Callable[[anyio.Event], object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    before = _threads()
    await _cancel_while_running(job)
    assert _delta(before) == {"cooperative": 1}
    [record] = _records(caplog)
    assert record.levelno == logging.DEBUG
    message = record.getMessage()
    assert job.__qualname__ in message
    assert "cooperative" in message
    assert "the caller was cancelled" in message


@pytest.mark.anyio
async def test_job_cancelled_before_it_starts_is_counted_as_never_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    before = _threads()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await run_sync(int)
    assert scope.cancelled_caught
    assert _delta(before) == {"never_started": 1}
    assert _threads().running == before.running
    assert _records(caplog) == []


@pytest.mark.anyio
async def test_abandoned_job_is_counted_when_the_caller_leaves_and_logged_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridgecancel")
    before = _threads()
    release = threading.Event()
    ended = threading.Event()

    def ignores_token(running: anyio.Event) -> str:
        try:
            anyio.from_thread.run_sync(running.set)
            release.wait(WAIT)
            return "discarded"
        finally:
            ended.set()

    try:
        await _cancel_while_running(ignores_token, abandon_on_cancel=True)
        # The call has returned and the thread still runs: the job is abandoned now,
        # not running (issue 7, defect 6).
        assert _delta(before) == {"abandoned": 1}
        assert _threads().running == before.running
    finally:
        release.set()
    assert ended.wait(WAIT)
    assert _delta(before) == {"abandoned": 1}  # not counted again when the thread ends
    assert _threads().running == before.running
    [record] = _records(caplog)
    assert record.levelno == logging.WARNING
    assert "ignores_token" in record.getMessage()
    assert "abandoned" in record.getMessage()


@pytest.mark.anyio
async def test_abandon_on_cancel_job_that_is_not_cancelled_completes() -> None:
    before = _threads()
    assert await run_sync(int, "3", abandon_on_cancel=True) == 3
    assert _delta(before) == {"completed": 1}


@pytest.mark.anyio
async def test_logger_quiet_above_debug_for_cooperative_jobs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridgecancel")
    before = _threads()
    await _cancel_while_running(_raises_cancelled)
    assert _delta(before) == {"cooperative": 1}
    assert _records(caplog) == []
