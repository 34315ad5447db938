"""The demo's executor case: a job on a thread pool, its awaiting task cancelled.

On asyncio, ``asyncio.to_thread`` runs the job on the loop's default executor: first a
`bridgecancel.ThreadPoolExecutor` set as the default, then the standard library's pool
(what every loop has by default). On trio, which has no default executor, async code
waits for the pool's future in a thread and cancels the future when its scope is
cancelled, as asyncio does by itself. Either way the caller is back at once (executors
are not structured); the row says how long each thread ran on after the cancel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import tempfile
import time
from collections.abc import Callable
from typing import Final

import anyio
import anyio.to_thread

from .._executor import ThreadPoolExecutor
from ._common import WORK_SECONDS
from ._work import ended_at, started, wait_on_token

__all__ = ("executor_cancel",)

CASE: Final = "executor: awaiting task cancelled"
_PATIENCE: Final = 30.0  # seconds to wait for a job to start or end before giving up


async def _until(done: Callable[[], bool]) -> None:
    with anyio.fail_after(_PATIENCE):
        while not done():
            await anyio.sleep(0.002)


async def _to_thread(pool: concurrent.futures.ThreadPoolExecutor, mark: str) -> float:
    """``asyncio.to_thread`` with `pool` as the loop's default; its task is cancelled once
    the job runs. Returns the time of the cancel (``time.monotonic()``)."""
    asyncio.get_running_loop().set_default_executor(pool)
    task = asyncio.ensure_future(asyncio.to_thread(wait_on_token, mark, WORK_SECONDS))
    await _until(lambda: started(mark))
    cancelled_at = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return cancelled_at


async def _future_in_thread(pool: concurrent.futures.ThreadPoolExecutor, mark: str) -> float:
    """The pool's future waited for in a thread, and cancelled when the waiting scope is
    cancelled (once the job runs). Returns the time of the cancel."""
    future = pool.submit(wait_on_token, mark, WORK_SECONDS)

    async def wait() -> None:
        try:
            await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            future.cancel()
            raise

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await _until(lambda: started(mark))
            cancelled_at = time.monotonic()
            scope.cancel()
    return cancelled_at


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


async def _side(pool: concurrent.futures.ThreadPoolExecutor, backend: str) -> tuple[str, str]:
    """Run the job on `pool` and cancel its caller: how long after the cancel the caller
    was back, and the thread had ended."""
    run = _to_thread if backend == "asyncio" else _future_in_thread
    with tempfile.TemporaryDirectory(prefix="bridgecancel-demo-") as tmp:
        mark = os.path.join(tmp, "job")
        try:
            cancelled_at = await run(pool, mark)
            returned = time.monotonic() - cancelled_at
            await _until(lambda: ended_at(mark) is not None)  # the thread, in its own time
        finally:
            pool.shutdown(wait=False)
        end = ended_at(mark)
    assert end is not None
    return _seconds(returned), _seconds(max(0.0, end - cancelled_at))


async def executor_cancel(backend: str) -> dict[str, str]:
    """The demo row: the same job on bridgecancel's pool and on the standard library's."""
    if backend == "asyncio":
        how = "asyncio.to_thread, pool as default executor"
    else:
        how = "future.result in a thread; cancel() on cancel"
    back, ended = await _side(ThreadPoolExecutor(1), backend)
    anchor_back, ran_on = await _side(concurrent.futures.ThreadPoolExecutor(1), backend)
    return {
        "case": CASE,
        "backend": backend,
        "settings": how,
        "bridgecancel": (
            f"bridgecancel.ThreadPoolExecutor: thread stopped after {ended}, "
            f"caller back in {back}"
        ),
        "anchor": (
            f"concurrent.futures.ThreadPoolExecutor: caller back in {anchor_back}; "
            f"thread ran on {ran_on}"
        ),
    }
