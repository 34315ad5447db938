"""Cancel Celery tasks from a cancel scope: the task is told, stops, and frees its slot.

    pip install -e ".[celery,trio]"  (from a checkout of bridgecancel)
    redis-server --port 6379 &         # or any Redis; set REDIS_URL to use another
    python examples/celery_cancel.py [asyncio|trio]

The script is also the Celery app: it starts a worker on it (``celery -A celery_cancel
worker``, a prefork pool of two processes) for the run and stops it at the end. Then:

1. a task that checks its token between chunks of work is given a 1 s budget: it stops
   at once, its ``finally`` block runs in the pool process, and its slot takes the next
   task;
2. a task still queued behind busy pool processes is cancelled: it never starts;
3. a task that ignores its token is killed 0.5 s after the cancel (``kill_after``): only
   the pool process running it, which Celery replaces;
4. an error arrives as itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
from celery import Celery

from bridgecancel import current_token, statistics
from bridgecancel.celery import install, run_on_celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("celery_cancel", broker=REDIS_URL, backend=REDIS_URL)
app.conf.broker_connection_retry_on_startup = True
install(app)  # once, where the app is defined: the workers load this module too


@app.task
def crunch(n: int) -> int:
    """CPU-bound work in a pool process: checks its token every 100 000 steps."""
    token = current_token()
    total = 0
    try:
        for i in range(n):
            total += i * i
            if i % 100_000 == 0:
                token.check()  # raises Cancelled once the caller is cancelled
    finally:
        print(f"  pool process {os.getpid()}: cleaning up (cancelled: {token.cancel_called},"
              f" reason: {token.reason})", flush=True)
    return total


@app.task
def snooze(seconds: float) -> str:
    """Waits on its token (wakes at once on cancel)."""
    current_token().sleep(seconds)
    return "slept"


@app.task
def stubborn() -> None:
    """Ignores its token: only a kill stops it."""
    while True:
        time.sleep(0.1)


@app.task
def fails() -> None:
    raise ValueError("bad input on the worker")


async def main() -> None:
    print("crunching on Celery with a 1 s budget ...")
    start = time.perf_counter()
    with anyio.move_on_after(1) as scope:
        await run_on_celery(crunch.s(10**12))
    print(f"  cancelled: {scope.cancelled_caught}, back after {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    result = await run_on_celery(crunch.s(1000))
    print(f"the freed slot answers at once: {result} in {time.perf_counter() - start:.3f} s")

    print("two tasks busy both pool processes; a third, queued, is cancelled ...")
    async with anyio.create_task_group() as group:
        for _ in range(2):
            group.start_soon(run_on_celery, snooze.s(30))
        await anyio.sleep(0.5)
        with anyio.move_on_after(0.5) as queued:
            await run_on_celery(snooze.s(30))
        print(f"  the queued call is back at once (cancelled: {queued.cancelled_caught}); "
              "it will never start")
        group.cancel_scope.cancel()

    print("a task that ignores its token, with kill_after=0.5 ...")
    start = time.perf_counter()
    with anyio.move_on_after(0.5):
        await run_on_celery(stubborn.s(), kill_after=0.5)
    print(f"  its pool process was killed; back after {time.perf_counter() - start:.2f} s")

    try:
        await run_on_celery(fails.s())
    except ValueError as exc:
        print(f"the task's error arrives as itself: {exc!r}")
    print(f"statistics: {statistics().celery}")


def run(backend: str) -> None:
    here = Path(__file__).resolve().parent
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_cancel", "worker", "-P", "prefork",
         "-c", "2", "-l", "warning", "--without-gossip", "--without-mingle"],
        cwd=here, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])},
    )
    try:
        # Wait for the worker: a task it answers.
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                sys.exit("the Celery worker did not start (is Redis at REDIS_URL running?)")
        anyio.run(main, backend=backend)
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        worker.wait(timeout=30)


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "asyncio")
