"""Tokens for libraries (issue 16): `use_token`, `shield`, and the sync `assert_cancels_within`.

Through the public API; async tests run on asyncio and trio.
"""

from __future__ import annotations

import contextvars
import threading
import time
from pathlib import Path

import anyio
import pytest

import _shield_jobs as jobs
import bridgecancel
from _proc_helpers import mark
from bridgecancel import (
    Cancelled,
    CancelSource,
    CancelToken,
    check_cancelled,
    current_token,
    run_process,
    run_sync,
    shield,
    use_token,
)
from bridgecancel.testing import assert_cancels_within

WAIT = 10.0  # generous: bounds "promptly", it does not measure speed
PROMPT = 2.0


async def _wait_for_file(path: Path) -> None:
    with anyio.fail_after(WAIT):
        while not path.exists():
            await anyio.sleep(0.005)


# -- use_token ---------------------------------------------------------------------------------


def test_use_token_makes_a_token_current_and_restores_the_one_before() -> None:
    never = current_token()
    outer, inner = CancelSource(), CancelSource()
    with use_token(outer.token) as entered:
        assert entered is outer.token
        assert current_token() is outer.token
        with use_token(inner.token):
            assert current_token() is inner.token
        assert current_token() is outer.token
        outer.cancel("stop")
        with pytest.raises(Cancelled) as info:
            check_cancelled()
        assert info.value.token is outer.token
        assert info.value.reason == "stop"
    assert current_token() is never
    assert not never.cancel_called


def test_use_token_is_per_thread() -> None:
    source = CancelSource()
    seen: list[CancelToken] = []
    with use_token(source.token):
        thread = threading.Thread(target=lambda: seen.append(current_token()))
        thread.start()
        thread.join(WAIT)
        copied = contextvars.copy_context().run(current_token)
    assert len(seen) == 1
    assert seen[0] is not source.token  # a new thread does not inherit it
    assert copied is source.token  # a copy of this context (as to_thread makes) does


def test_use_token_is_restored_after_an_error_and_refuses_a_source() -> None:
    source = CancelSource()
    with pytest.raises(KeyError), use_token(source.token):
        raise KeyError("x")
    assert current_token() is not source.token
    with pytest.raises(TypeError, match=r"pass source\.token"):
        use_token(source)  # type: ignore[arg-type]


def _library_loop() -> str:
    """Library code written to be cancelled: it only calls check_cancelled()."""
    while True:
        check_cancelled()
        time.sleep(0.001)


def test_sync_assert_cancels_within_cancels_code_that_calls_check_cancelled() -> None:
    # Before use_token the sync form ran such a function to its end (for ever, here).
    started = time.monotonic()
    with assert_cancels_within(PROMPT, after=0.05):
        _library_loop()
    assert time.monotonic() - started < WAIT


# -- shield ------------------------------------------------------------------------------------


def test_shield_outside_a_worker_only_shields_the_token() -> None:
    source = CancelSource()
    source.cancel()
    with use_token(source.token):
        with shield():
            check_cancelled()  # does not raise
            assert not current_token().cancel_called
        assert current_token() is source.token
        with pytest.raises(Cancelled):
            check_cancelled()


@pytest.mark.anyio
async def test_shield_in_a_thread_job_holds_the_token_and_fires_after() -> None:
    seen: list[object] = []
    inside, release = threading.Event(), threading.Event()

    def job() -> None:
        with shield():
            inside.set()
            release.wait(WAIT)  # the cancel comes meanwhile
            seen.append(current_token().cancel_called)
            check_cancelled()  # does not raise
            seen.append("committed")
        seen.append(current_token().cancel_called)
        check_cancelled()  # raises: the job's token fired meanwhile

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_then_release() -> None:
                await anyio.to_thread.run_sync(inside.wait, WAIT)
                scope.cancel()
                await anyio.sleep(0.05)
                release.set()

            tg.start_soon(cancel_then_release)
            await run_sync(job)
    assert scope.cancelled_caught
    assert seen == [False, "committed", True]


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_interrupt_falling_due_in_a_shield_lands_right_after_it() -> None:
    seen: list[str] = []
    inside = threading.Event()
    hold_for = 0.4

    def job() -> None:
        try:
            with shield():
                inside.set()
                end = time.monotonic() + hold_for  # a spin: interrupts land in bytecode
                while time.monotonic() < end:
                    pass
                seen.append("committed")
            seen.append("after the block")  # pragma: no cover - interrupted right here
        except Cancelled as exc:
            seen.append(f"interrupted: {exc.reason}")
            raise

    before = bridgecancel.statistics().threads
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_inside() -> None:
                await anyio.to_thread.run_sync(inside.wait, WAIT)
                scope.cancel()

            tg.start_soon(cancel_when_inside)
            started = time.monotonic()
            await run_sync(job, interrupt_after=0.05)
    took = time.monotonic() - started
    assert scope.cancelled_caught
    assert seen == ["committed", "interrupted: interrupted"]
    assert hold_for * 0.9 < took < hold_for + PROMPT
    after = bridgecancel.statistics().threads
    assert after.interrupted - before.interrupted == 1


@pytest.mark.anyio
@pytest.mark.slow
async def test_shield_in_a_process_job_holds_the_interrupt_not_the_kill(tmp_path: Path) -> None:
    started, committed = tmp_path / "started", tmp_path / "committed"
    before = bridgecancel.statistics().processes
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_started() -> None:
                await _wait_for_file(started)
                scope.cancel()

            tg.start_soon(cancel_when_started)
            await run_process(
                jobs.commit_in_a_shield, str(started), str(committed), 0.5,
                interrupt_after=0.05, kill_after=None,
            )
    assert scope.cancelled_caught
    assert committed.read_text() == "committed"  # the interrupt waited for the section
    after = bridgecancel.statistics().processes
    assert after.interrupted - before.interrupted == 1
    assert after.killed == before.killed


@pytest.mark.anyio
@pytest.mark.slow
async def test_shield_in_a_process_job_sees_the_token_fired_after_the_block(
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    results: list[tuple[bool, bool]] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_started() -> None:
                await _wait_for_file(started)
                scope.cancel()

            tg.start_soon(cancel_when_started)
            results.append(await run_process(jobs.token_inside_and_after_a_shield, str(started)))
            await anyio.sleep(WAIT)  # the cancellation is delivered here
    assert results == [(False, True)]  # not fired inside the block; fired after it
    assert scope.cancelled_caught


def test_mark_helper_is_the_process_tests_one() -> None:
    assert mark is jobs.mark


# -- why it was cancelled ------------------------------------------------------------------------


def _reason_when_fired(running: threading.Event) -> str | None:
    """The token's reason once it fired, and the same from the `Cancelled` it raises."""
    running.set()
    token = current_token()
    token.wait(WAIT)
    with pytest.raises(Cancelled) as info:
        token.check()
    return token.reason if info.value.reason == token.reason else "Cancelled says otherwise"


async def _cancel_with(scope: anyio.CancelScope, running: threading.Event, reason: str) -> None:
    await anyio.to_thread.run_sync(running.wait, WAIT)
    scope.cancel(reason=reason)


@pytest.mark.anyio
async def test_an_anyio_scope_s_reason_reaches_the_thread_job() -> None:
    running, reasons = threading.Event(), []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_with, scope, running, "client went away")
            reasons.append(await run_sync(_reason_when_fired, running))
    assert reasons == ["client went away"]


@pytest.mark.anyio
async def test_an_anyio_scope_without_a_reason_keeps_the_default() -> None:
    running, reasons = threading.Event(), []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel() -> None:
                await anyio.to_thread.run_sync(running.wait, WAIT)
                scope.cancel()

            tg.start_soon(cancel)
            reasons.append(await run_sync(_reason_when_fired, running))
    assert reasons == ["the caller was cancelled"]


@pytest.mark.anyio
async def test_a_deadline_keeps_deadline_exceeded() -> None:
    reasons: list[str | None] = []
    with anyio.move_on_after(0.2):
        reasons.append(await run_sync(_reason_when_fired, threading.Event()))
    assert reasons == ["deadline exceeded"]


@pytest.mark.anyio
async def test_the_reason_reaches_a_process_job_and_open_token(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_started() -> None:
                await _wait_for_file(started)
                scope.cancel(reason="server shutting down")

            tg.start_soon(cancel_when_started)
            reason = await run_process(jobs.reason_when_fired, str(started))
            assert reason == "server shutting down"
    with anyio.CancelScope() as scope:
        async with bridgecancel.open_token() as token:
            scope.cancel(reason="a user pressed stop")
            await anyio.sleep(WAIT)
    assert token.reason == "a user pressed stop"


def test_plain_asyncio_task_cancel_message_reaches_the_job() -> None:
    import asyncio

    tokens: list[CancelToken] = []

    def record_token(running: threading.Event) -> str | None:
        tokens.append(current_token())
        return _reason_when_fired(running)

    async def main() -> asyncio.Task[str | None]:
        running = threading.Event()
        task = asyncio.ensure_future(run_sync(record_token, running))
        while not running.is_set():
            await asyncio.sleep(0.001)
        task.cancel("shutting down")
        await asyncio.wait([task])
        return task

    task = asyncio.run(main())
    assert task.cancelled()  # plain asyncio: the cancellation wins over the late value
    assert tokens[0].reason == "shutting down"
