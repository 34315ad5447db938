"""`open_token` (scope to token) and `cancel_on` (token to scope).

Async tests run on asyncio and trio through anyio; a few drive the bridge from plain
`asyncio.run` and `trio.run`. Threads are held on events or tokens, never on sleeps.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trio

from bridgecancel import (
    CancelSource,
    CancelToken,
    cancel_on,
    current_token,
    open_token,
    run_sync,
)

CALLER_CANCELLED = "the caller was cancelled"
WAIT = 10.0  # upper bound for any wait that should end much sooner
PROMPT = 2.0  # generous bound for "at once"


class _TokenWaiter:
    """A thread of our own that waits on a token, as work started outside run_sync."""

    def __init__(self, token: CancelToken) -> None:
        self.fired: list[bool] = []
        self.thread = threading.Thread(target=self._run, args=(token,))
        self.thread.start()

    def _run(self, token: CancelToken) -> None:
        self.fired.append(token.wait(WAIT))

    async def join(self) -> None:
        """Wait for the thread without blocking the event loop, even if cancelled."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.thread.join)


# -- open_token -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_open_token_fires_when_the_enclosing_scope_is_cancelled() -> None:
    start = time.monotonic()
    with anyio.CancelScope() as scope:
        async with open_token() as token:
            waiter = _TokenWaiter(token)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cancel_soon, scope)
                    await anyio.sleep_forever()
            finally:
                await waiter.join()
    assert scope.cancelled_caught
    assert waiter.fired == [True]
    assert time.monotonic() - start < PROMPT
    assert token.reason == CALLER_CANCELLED


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.lowlevel.checkpoint()
    scope.cancel()


@pytest.mark.anyio
async def test_open_token_fires_when_the_body_leaves_on_the_cancel_at_once() -> None:
    with anyio.CancelScope() as scope:
        async with open_token() as token:
            scope.cancel()
            await anyio.lowlevel.checkpoint()  # raises; no other task has run yet
    assert scope.cancelled_caught
    assert token.cancel_called
    assert token.reason == CALLER_CANCELLED


@pytest.mark.anyio
async def test_open_token_does_not_fire_on_a_normal_exit() -> None:
    async with open_token() as token:
        await anyio.lowlevel.checkpoint()
        assert not token.cancel_called
    assert not token.cancel_called


@pytest.mark.anyio
async def test_open_token_is_closed_after_the_block() -> None:
    with anyio.CancelScope() as scope:
        async with open_token() as token:
            pass
        scope.cancel()  # after the block: the token no longer follows the scope
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert not token.cancel_called


@pytest.mark.anyio
async def test_open_token_respects_shields() -> None:
    with anyio.CancelScope() as outer:
        with anyio.CancelScope(shield=True):
            async with open_token() as token:
                outer.cancel()
                await anyio.sleep(0.02)  # shielded: runs to its end
                fired_inside = token.cancel_called
        await anyio.lowlevel.checkpoint()
    assert outer.cancelled_caught
    assert not fired_inside
    assert not token.cancel_called


@pytest.mark.anyio
async def test_open_token_fires_for_a_scope_around_the_shield() -> None:
    """The shield only hides scopes outside it: one inside, around the token, counts."""
    with anyio.CancelScope(shield=True), anyio.CancelScope() as inner:
        async with open_token() as token:
            inner.cancel()
            await anyio.sleep_forever()
    assert inner.cancelled_caught
    assert token.cancel_called


@pytest.mark.anyio
async def test_open_token_carries_the_scopes_deadline() -> None:
    with anyio.fail_after(30):
        expected = time.monotonic() + 30
        async with open_token() as token:
            remaining = token.remaining()
    assert abs(token.deadline - expected) < PROMPT
    assert 30 - PROMPT < remaining <= 30

    async with open_token() as token:
        assert token.deadline == math.inf
    with anyio.fail_after(30), anyio.CancelScope(shield=True):
        async with open_token() as token:
            assert token.deadline == math.inf


@pytest.mark.anyio
async def test_open_token_fires_when_the_deadline_passes() -> None:
    start = time.monotonic()
    with anyio.move_on_after(0.1) as scope:
        async with open_token() as token:
            waiter = _TokenWaiter(token)
            try:
                await anyio.sleep_forever()
            finally:
                await waiter.join()
    assert scope.cancelled_caught
    assert waiter.fired == [True]
    assert time.monotonic() - start < PROMPT


@pytest.mark.anyio
async def test_open_token_checks_for_cancellation_first() -> None:
    entered: list[bool] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with open_token():
            entered.append(True)  # pragma: no cover
    assert scope.cancelled_caught
    assert entered == []


@pytest.mark.anyio
async def test_open_token_body_exception_propagates_as_itself() -> None:
    raised = ValueError("from the body")

    async def body() -> None:
        async with open_token():
            await anyio.lowlevel.checkpoint()
            raise raised

    with pytest.raises(ValueError, match="from the body") as excinfo:
        await body()
    assert excinfo.value is raised


@pytest.mark.anyio
async def test_open_token_body_exception_survives_the_scopes_cancellation() -> None:
    """An error raised while the scope is being cancelled is not swallowed by it."""
    tokens: list[CancelToken] = []

    async def body() -> None:
        with anyio.CancelScope() as scope:
            async with open_token() as token:
                tokens.append(token)
                scope.cancel()
                raise KeyError("from the body")

    with pytest.raises(KeyError, match="from the body"):
        await body()
    assert tokens[0].cancel_called


@pytest.mark.anyio
async def test_open_token_with_run_sync_inside() -> None:
    """The run_sync worker's token and the open_token token fire together."""
    running = anyio.Event()
    worker_tokens: list[CancelToken] = []

    def job() -> None:
        worker_tokens.append(current_token())
        anyio.from_thread.run_sync(running.set)
        current_token().sleep(WAIT)

    async def cancel_when_running(scope: anyio.CancelScope) -> None:
        await running.wait()
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with open_token() as token, anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_running, scope)
            await run_sync(job)
    assert scope.cancelled_caught
    assert token.cancel_called
    assert worker_tokens[0].cancel_called


def test_open_token_under_plain_trio() -> None:
    async def main() -> tuple[bool, list[bool], float]:
        with trio.move_on_after(30) as outer:
            deadline = time.monotonic() + 30
            async with open_token() as token:
                seen_deadline = token.deadline
                fired: list[bool] = []
                waiter = threading.Thread(target=lambda: fired.append(token.wait(WAIT)))
                waiter.start()
                try:
                    outer.cancel()
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(waiter.join)
        return outer.cancelled_caught, fired, seen_deadline - deadline

    caught, fired, drift = trio.run(main)
    assert caught
    assert fired == [True]
    assert abs(drift) < PROMPT


def test_open_token_under_plain_asyncio_timeout() -> None:
    if sys.version_info < (3, 11):  # a check mypy understands, unlike skipif
        pytest.skip("asyncio.timeout() is new in 3.11")

    async def main() -> CancelToken:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), open_token() as token:
                await asyncio.sleep(WAIT)
        return token

    token = asyncio.run(main())
    assert token.cancel_called


# -- cancel_on ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancel_on_cancels_the_block_from_another_thread() -> None:
    source = CancelSource()
    in_block = threading.Event()

    def gui_thread() -> None:
        if in_block.wait(WAIT):
            source.cancel("user pressed stop")

    thread = threading.Thread(target=gui_thread)
    thread.start()
    start = time.monotonic()
    try:
        with cancel_on(source.token) as scope:
            assert isinstance(scope, anyio.CancelScope)
            in_block.set()
            await anyio.sleep(WAIT)
    finally:
        in_block.set()
        thread.join(WAIT)
    assert scope.cancelled_caught
    assert time.monotonic() - start < PROMPT


@pytest.mark.anyio
async def test_cancel_on_cancels_the_block_from_the_loop_thread() -> None:
    source = CancelSource()

    async def stop() -> None:
        await anyio.lowlevel.checkpoint()
        source.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop)
        with cancel_on(source.token) as scope:
            await anyio.sleep(WAIT)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_cancel_on_token_fired_inside_the_block() -> None:
    source = CancelSource()
    reached: list[str] = []
    with cancel_on(source.token) as scope:
        source.cancel()
        reached.append("before the checkpoint")
        assert scope.cancel_called
        await anyio.lowlevel.checkpoint()
        reached.append("past the checkpoint")  # pragma: no cover
    assert scope.cancelled_caught
    assert reached == ["before the checkpoint"]


@pytest.mark.anyio
async def test_cancel_on_already_cancelled_token_cancels_at_first_checkpoint() -> None:
    source = CancelSource()
    source.cancel("too late")
    reached: list[str] = []
    with cancel_on(source.token) as scope:
        reached.append("entered")
        await anyio.lowlevel.checkpoint()
        reached.append("past the checkpoint")  # pragma: no cover
    assert scope.cancelled_caught
    assert reached == ["entered"]


@pytest.mark.anyio
async def test_cancel_on_token_deadline_cancels_the_block() -> None:
    source = CancelSource(deadline=time.monotonic() + 0.05)
    start = time.monotonic()
    with cancel_on(source.token) as scope:
        await anyio.sleep(WAIT)
    assert scope.cancelled_caught
    assert time.monotonic() - start < PROMPT


@pytest.mark.anyio
async def test_cancel_on_unfired_token_leaves_the_block_alone() -> None:
    source = CancelSource()
    with cancel_on(source.token) as scope:
        await anyio.lowlevel.checkpoint()
    assert not scope.cancel_called
    source.cancel()  # after the block: nothing left to cancel
    assert not scope.cancel_called
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_cancel_on_from_a_run_sync_worker() -> None:
    """A worker fires a token; the block around its own run_sync call is cancelled."""
    source = CancelSource()
    worker_tokens: list[CancelToken] = []

    def job() -> None:
        token = current_token()
        worker_tokens.append(token)
        source.cancel("stop from the worker")
        token.sleep(WAIT)  # woken when the block's cancel reaches run_sync

    start = time.monotonic()
    with cancel_on(source.token) as scope:
        await run_sync(job)
    assert scope.cancelled_caught
    assert worker_tokens[0].cancel_called
    assert time.monotonic() - start < PROMPT


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        pytest.param(CancelSource(), "pass source.token", id="source"),
        pytest.param("token", "takes a CancelToken", id="string"),
        pytest.param(None, "takes a CancelToken", id="none"),
    ],
)
async def test_cancel_on_rejects_what_is_not_a_token(bad: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match), cancel_on(bad):
        pass  # pragma: no cover
    # Nothing else is affected: no scope was left open around us.
    assert anyio.current_effective_deadline() == math.inf
    await anyio.lowlevel.checkpoint()


def test_cancel_on_under_plain_asyncio() -> None:
    source = CancelSource()

    async def main() -> bool:
        thread = threading.Thread(target=source.cancel)
        with cancel_on(source.token) as scope:
            thread.start()
            await asyncio.sleep(WAIT)
        thread.join(WAIT)
        return scope.cancelled_caught

    assert asyncio.run(main())


def test_cancel_on_under_plain_trio() -> None:
    source = CancelSource()

    async def main() -> bool:
        thread = threading.Thread(target=source.cancel)
        with cancel_on(source.token) as scope:
            thread.start()
            await trio.sleep(WAIT)
        thread.join(WAIT)
        return scope.cancelled_caught

    assert trio.run(main)
