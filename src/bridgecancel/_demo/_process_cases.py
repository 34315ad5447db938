"""Demo cases in worker processes: `run_process` beside ``anyio.to_process.run_sync``."""

from __future__ import annotations

from .._processes import run_process
from . import _work
from ._common import PROCESS_ANCHOR, WORK_SECONDS, Job, compare, process_anchor

__all__ = (
    "process_ignoring_its_token",
    "process_ignoring_the_interrupt",
    "process_waiting_on_its_token",
)

# Short escalation, so the stubborn cases end quickly; the row shows them.
_INTERRUPT_AFTER = 0.1
_KILL_AFTER = 0.2
_SETTINGS = f"interrupt_after={_INTERRUPT_AFTER}, kill_after={_KILL_AFTER}"


async def _run(job: Job, mark: str) -> None:
    await run_process(
        job, mark, WORK_SECONDS, interrupt_after=_INTERRUPT_AFTER, kill_after=_KILL_AFTER
    )


async def _compare(case: str, backend: str, job: Job) -> dict[str, str]:
    anchor = (PROCESS_ANCHOR, process_anchor)
    return await compare(case, backend, "processes", job, _run, anchor, _SETTINGS)


async def process_waiting_on_its_token(backend: str) -> dict[str, str]:
    return await _compare("process: token.sleep()", backend, _work.wait_on_token)


async def process_ignoring_its_token(backend: str) -> dict[str, str]:
    return await _compare("process: ignores its token", backend, _work.ignore_token)


async def process_ignoring_the_interrupt(backend: str) -> dict[str, str]:
    return await _compare("process: ignores token and interrupt", backend, _work.ignore_everything)
