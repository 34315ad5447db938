"""Plain asyncio: the caller's deadline reaches the worker process.

    python examples/process_asyncio_deadline.py

The worker reads ``current_token().remaining()`` and passes it on as a timeout to
its own blocking call (here a child process), so the whole chain stops in time.
anyio's ``fail_after`` sets a deadline the worker can see; ``asyncio.wait_for`` (or
``asyncio.timeout``) cancels the call just the same, but its deadline is not visible
to anyio, so the token has none.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import anyio

from bridgecancel import current_token, run_process


def slow_query(seconds: float) -> str:
    """Stands in for a query or a request: a child process that takes `seconds`."""
    token = current_token()
    remaining = token.remaining()
    print(f"  worker: {remaining:.2f} s left, passing that on as the timeout")
    try:
        subprocess.run(
            [sys.executable, "-c", f"import time; time.sleep({seconds})"],
            timeout=remaining if remaining != float("inf") else None,
            check=True,
        )
    except subprocess.TimeoutExpired:
        # Our deadline passed (the token fires at the same moment): report it as the
        # caller's cancellation rather than as a subprocess error.
        token.wait(1.0)
        token.check()
        raise
    return f"done in {seconds} s"


async def main() -> None:
    print("a 0.2 s query with a 1 s deadline:")
    with anyio.fail_after(1.0):
        print(" ", await run_process(slow_query, 0.2))

    print("a 5 s query with a 1 s deadline:")
    try:
        with anyio.fail_after(1.0):
            await run_process(slow_query, 5.0)
    except TimeoutError:
        print("  TimeoutError, and the worker's own child was stopped in time")

    print("asyncio.wait_for cancels it too (the worker sees the cancel, not a deadline):")
    try:
        await asyncio.wait_for(run_process(slow_query, 5.0, interrupt_after=0.1), 0.5)
    except asyncio.TimeoutError:
        print("  TimeoutError")


if __name__ == "__main__":
    asyncio.run(main())
