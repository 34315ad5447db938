"""Cancel a task on a Dask cluster from a cancel scope: it is told, stops, frees its thread.

Needs Dask's ``distributed`` scheduler (the ``dask`` extra), and trio to run it on trio:

    python -m pip install -e ".[dask,trio]"    # from the repository root
    python examples/dask_cancel.py [asyncio|trio]

Starts a local cluster of two worker processes (one thread each, on 127.0.0.1). A task
that checks its token between chunks of work is given a 1 s budget; it stops at once,
its ``finally`` block runs on the worker, and its thread takes the next task. A task
that finishes after the cancel has its result delivered; an error arrives as itself.
"""

from __future__ import annotations

import sys
import time

import anyio
import anyio.to_thread
from distributed import Client, LocalCluster

from bridgecancel import current_token, statistics
from bridgecancel.dask import run_on_cluster


def crunch(n: int) -> int:
    """CPU-bound work on a worker: checks its token every 100 000 steps."""
    token = current_token()
    total = 0
    try:
        for i in range(n):
            total += i * i
            if i % 100_000 == 0:
                token.check()  # raises Cancelled once the caller is cancelled
    finally:
        # Printed by the worker process (Dask forwards worker output to its terminal).
        print(f"  worker: cleaning up (cancelled: {token.cancel_called})", flush=True)
    return total


def fails() -> None:
    raise ValueError("bad input on the worker")


async def main(client: Client) -> None:
    print("crunching on the cluster with a 1 s budget ...")
    start = time.perf_counter()
    with anyio.move_on_after(1) as scope:
        await run_on_cluster(client, crunch, 10**12)
    print(f"  cancelled: {scope.cancelled_caught}, back after {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    result = await run_on_cluster(client, crunch, 1000)
    print(f"the freed worker answers at once: {result} in {time.perf_counter() - start:.3f} s")

    try:
        await run_on_cluster(client, fails)
    except ValueError as exc:
        print(f"the task's error arrives as itself: {exc!r}")
    print(f"statistics: {statistics().cluster}")


def run(backend: str) -> None:
    # The cluster and a synchronous Client run their own event loop in a thread, so the
    # same client serves asyncio and trio callers.
    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        anyio.run(main, client, backend=backend)


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "asyncio")
