"""The process cases of ``python -m bridgecancel demo``.

The worker-side functions live at the top of this module and use the standard library
only, so a worker loads them without importing anyio; the async side imports anyio
when the demo runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._exceptions import Cancelled
from ._token import current_token

Case = tuple[str, str, float]  # (what ran, how it ended, seconds from cancel to exit)

# Short escalation times, so the stubborn cases finish quickly.
_INTERRUPT_AFTER = 0.2
_KILL_AFTER = 0.3


def _mark(path: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)


def _wait_on_token(started: str) -> None:
    _mark(started)
    current_token().wait()
    current_token().check()


def _ignore_token(started: str) -> None:
    _mark(started)
    try:
        while True:
            time.sleep(0.01)
    finally:
        pass  # cleanup would go here: the interrupt lets it run


def _ignore_everything(started: str) -> None:
    _mark(started)
    while True:
        try:
            while True:
                time.sleep(0.01)
        except Cancelled:
            pass  # swallows the interrupt: only a kill stops this


async def _run(run_process: Any, func: Callable[[str], None], started: str) -> None:
    await run_process(func, started, interrupt_after=_INTERRUPT_AFTER, kill_after=_KILL_AFTER)


async def demo_process_cases() -> list[Case]:
    """Cancel a cooperative, an interruptible and a stubborn process job."""
    import anyio

    from ._processes import run_process
    from ._stats import statistics

    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="bridgecancel-demo-") as tmp:
        for i, (label, func) in enumerate(
            (
                ("process waiting in token.wait()", _wait_on_token),
                ("process ignoring its token (interrupted)", _ignore_token),
                ("process ignoring token and interrupt (killed)", _ignore_everything),
            )
        ):
            started = os.path.join(tmp, f"started-{i}")
            before = statistics().processes
            cancelled_at = 0.0
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(_run, run_process, func, started)
                    with anyio.fail_after(30):
                        while not os.path.exists(started):
                            await anyio.sleep(0.002)
                    cancelled_at = time.perf_counter()
                    scope.cancel()
            seconds = time.perf_counter() - cancelled_at
            after = statistics().processes
            ended = [
                name
                for name in ("completed", "cooperative", "interrupted", "killed")
                if getattr(after, name) > getattr(before, name)
            ]
            cases.append((label, ", ".join(ended) or "unknown", seconds))
    return cases
