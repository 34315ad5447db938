"""Demo cases in threads: `run_sync` beside ``asyncio.to_thread`` / anyio's ``to_thread``."""

from __future__ import annotations

from .._threads import run_sync
from . import _work
from ._common import WORK_SECONDS, Job, Start, compare, thread_anchor

__all__ = (
    "thread_blocked_in_queue_get",
    "thread_blocked_in_recv",
    "thread_cpu_loop",
    "thread_ignoring_its_token",
    "thread_running_a_subprocess",
    "thread_waiting_on_its_token",
)

_INTERRUPT_AFTER = 0.1


async def _run(job: Job, mark: str) -> None:
    await run_sync(job, mark, WORK_SECONDS)


async def _run_interrupted(job: Job, mark: str) -> None:
    await run_sync(job, mark, WORK_SECONDS, interrupt_after=_INTERRUPT_AFTER)


async def _compare(
    case: str, backend: str, job: Job, run: Start = _run, settings: str = "-"
) -> dict[str, str]:
    return await compare(case, backend, "threads", job, run, thread_anchor(backend), settings)


async def thread_waiting_on_its_token(backend: str) -> dict[str, str]:
    return await _compare("thread: token.sleep()", backend, _work.wait_on_token)


async def thread_cpu_loop(backend: str) -> dict[str, str]:
    return await _compare("thread: CPU loop calling token.check()", backend, _work.cpu_loop)


async def thread_ignoring_its_token(backend: str) -> dict[str, str]:
    return await _compare(
        "thread: ignores its token",
        backend,
        _work.ignore_token,
        _run_interrupted,
        f"interrupt_after={_INTERRUPT_AFTER}",
    )


async def thread_blocked_in_queue_get(backend: str) -> dict[str, str]:
    return await _compare("thread: blocking.queue_get()", backend, _work.queue_get)


async def thread_blocked_in_recv(backend: str) -> dict[str, str]:
    return await _compare("thread: blocking.recv() on loopback", backend, _work.recv)


async def thread_running_a_subprocess(backend: str) -> dict[str, str]:
    return await _compare("thread: blocking.run_subprocess(sleep)", backend, _work.subprocess_sleep)
