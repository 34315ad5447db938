"""Cancel work in a worker process: it is told, it cleans up, and the worker is reused.

    python examples/process_cancel.py

A CPU-bound function checks its token between chunks of work; a stubborn one never
looks at it, so it is interrupted (its ``finally`` block runs), and a worker that
ignores even that would be killed `kill_after` seconds later.
"""

from __future__ import annotations

import time

import anyio

from bridgecancel import current_token, run_process, statistics


def crunch(n: int) -> int:
    """CPU-bound work that checks its token every 100 000 steps."""
    token = current_token()
    total = 0
    try:
        for i in range(n):
            total += i * i
            if i % 100_000 == 0:
                token.check()  # raises Cancelled once the caller is cancelled
    finally:
        print(f"  worker: cleaning up (cancelled: {token.cancel_called})")
    return total


def stubborn() -> None:
    """Never looks at its token: only the interrupt stops it."""
    try:
        while True:
            time.sleep(0.1)
    finally:
        print("  worker: finally block ran after the interrupt")


async def main() -> None:
    print("crunching with a 0.5 s budget ...")
    with anyio.move_on_after(0.5) as scope:
        await run_process(crunch, 10**12)
    print(f"  cancelled: {scope.cancelled_caught}")

    start = time.perf_counter()
    result = await run_process(crunch, 1000)
    print(f"the same warm worker answers at once: {result} in "
          f"{(time.perf_counter() - start) * 1000:.1f} ms")

    print("a stubborn worker, interrupted 0.2 s after the cancel ...")
    with anyio.move_on_after(0.2):
        await run_process(stubborn, interrupt_after=0.2, kill_after=1.0)
    print(statistics().processes)


if __name__ == "__main__":  # workers import this file to find crunch() and stubborn()
    anyio.run(main)
