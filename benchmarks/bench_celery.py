"""Cancelling a Celery task: bridgecancel against Celery's own ``revoke()``, same run.

    python benchmarks/bench_celery.py [--quick]

A Redis server of the run's own and two ``celery worker`` processes, all on 127.0.0.1:
a prefork pool of one process and a threads pool of one thread. The task reports
"started" over loopback UDP, then waits on its token for up to JOB_SECONDS. Per sample,
seconds from the caller's ``scope.cancel()`` to:

* token fired: the task saw its token fire (stamped in the pool process with
  ``time.monotonic()``, a system-wide clock on Linux and macOS);
* caller free: ``run_on_celery`` returned (the task stopped cooperatively);
* worker free: the next task, sent at the cancel, started in the pool's only slot.

The anchor is Celery alone: ``revoke()`` on the same running task, which Celery does not
stop (it skips only tasks that have not started), so it runs to its end and holds the
slot until then. The call overhead is ``await run_on_celery(add.s(1, 2))`` against
``apply_async().get()`` in a worker thread (``anyio.to_thread.run_sync``), taking turns in
rounds; the ratio is the median of the per-round ratios of their medians.

Targets (worst of asyncio and trio): token fired p50 <= 20 ms and p99 <= 100 ms, on the
prefork and the threads pool; caller free p50 <= 50 ms; call overhead <= 1.2x.
Needs Celery and a ``redis-server`` (``pip install -e '.[celery]'``,
``apt-get install redis-server``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

JOB_SECONDS = 0.5
POOLS = ("prefork", "threads")


async def _cancels(local: Any, pool: str, quick: bool) -> dict[str, Any]:
    """The cancel samples on one pool, bridgecancel and revoke() taking turns."""
    import anyio

    from bridgecancel._demo.celery_case import cancel_with_bridgecancel, cancel_with_celery_alone

    rounds, per_round = (4, 8) if quick else (10, 20)
    queue = local.queues[pool]
    fired: list[list[float]] = []
    returned: list[list[float]] = []
    freed: list[list[float]] = []
    alone_ran_on: list[list[float]] = []
    alone_freed: list[list[float]] = []
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
        await cancel_with_bridgecancel(local.app, queue, sock, JOB_SECONDS)  # warm up
        for index in range(rounds):
            for name in h.round_order(("bridgecancel", "celery"), index):
                if name == "bridgecancel":
                    samples = [
                        await cancel_with_bridgecancel(local.app, queue, sock, JOB_SECONDS)
                        for _ in range(per_round)
                    ]
                    fired.append([s[0] for s in samples])
                    returned.append([s[1] for s in samples])
                    freed.append([s[2] for s in samples])
                else:
                    ran_on, next_started = await cancel_with_celery_alone(
                        local.app, queue, sock, JOB_SECONDS
                    )
                    alone_ran_on.append([ran_on])
                    alone_freed.append([next_started])
    return {
        "token_fired": _summary(fired),
        "caller_free": _summary(returned),
        "worker_free": _summary(freed),
        "celery_alone_task_stopped": _summary(alone_ran_on),
        "celery_alone_worker_free": _summary(alone_freed),
    }


async def _overhead(local: Any, pool: str, quick: bool) -> dict[str, Any]:
    """Seconds per call of the smallest task: run_on_celery against get() in a thread."""
    import anyio
    import anyio.to_thread

    from bridgecancel._demo.celery_app import ADD
    from bridgecancel.celery import run_on_celery

    rounds, per_round = (4, 30) if quick else (10, 60)
    signature = local.app.signature(ADD, (1, 2), queue=local.queues[pool])

    def get_in_thread() -> Any:
        return signature.apply_async().get(timeout=30)

    per_contender: dict[str, list[float]] = {"bridgecancel": [], "celery": []}
    for _ in range(10):  # warm up: connections, threads, the pool process
        await run_on_celery(signature)
        await anyio.to_thread.run_sync(get_in_thread)
    for index in range(rounds):
        for name in h.round_order(tuple(per_contender), index):
            samples = []
            for _ in range(per_round):
                start = time.perf_counter()
                if name == "bridgecancel":
                    await run_on_celery(signature)
                else:
                    await anyio.to_thread.run_sync(get_in_thread)
                samples.append(time.perf_counter() - start)
            per_contender[name].append(h.median(samples))
    return {
        "bridgecancel_ms": h.median(per_contender["bridgecancel"]) * 1e3,
        "celery_get_in_thread_ms": h.median(per_contender["celery"]) * 1e3,
        "ratio": h.paired_ratio(per_contender["bridgecancel"], per_contender["celery"]),
    }


async def _bench(local: Any, quick: bool) -> dict[str, Any]:
    return {
        pool: {
            **(await _cancels(local, pool, quick)),
            "overhead": await _overhead(local, pool, quick),
        }
        for pool in POOLS
    }


def _summary(per_round: list[list[float]]) -> dict[str, float]:
    return h.latency_summary([s for r in per_round for s in r], per_round)


def run(quick: bool) -> dict[str, Any]:
    import logging

    import anyio

    from bridgecancel._demo.celery_case import LocalCelery, missing

    why_not = missing()
    if why_not is not None:
        raise RuntimeError(f"the Celery benchmark needs Celery and Redis: {why_not}")
    # Cancelled calls are logged at DEBUG; the kill stage is not used here.
    logging.getLogger("bridgecancel").addHandler(logging.NullHandler())
    local = LocalCelery([(pool, 1) for pool in POOLS])
    try:
        figures = {
            backend: anyio.run(_bench, local, quick, backend=backend)
            for backend in ("asyncio", "trio")
        }
    finally:
        local.stop()
    rows = []
    overhead_rows = []
    for backend, per_pool in figures.items():
        for pool, f in per_pool.items():
            rows.append([
                "bridgecancel", pool, backend,
                f["token_fired"]["p50_ms"], f["token_fired"]["p99_ms"],
                f["caller_free"]["p50_ms"], f["caller_free"]["p99_ms"],
                f["worker_free"]["p50_ms"], f["token_fired"]["n"],
            ])
            rows.append([
                "Celery alone (revoke)", pool, backend,
                f["celery_alone_task_stopped"]["p50_ms"], "-",
                "-", "-",
                f["celery_alone_worker_free"]["p50_ms"], f["celery_alone_task_stopped"]["n"],
            ])
            o = f["overhead"]
            overhead_rows.append([
                pool, backend, o["bridgecancel_ms"], o["celery_get_in_thread_ms"], o["ratio"],
            ])
    every = [f for per_pool in figures.values() for f in per_pool.values()]
    worst_p50 = max(f["token_fired"]["p50_ms"] for f in every)
    worst_p99 = max(f["token_fired"]["p99_ms"] for f in every)
    worst_free = max(f["caller_free"]["p50_ms"] for f in every)
    worst_ratio = max(f["overhead"]["ratio"] for f in every)
    return {
        "area": "celery",
        "quick": quick,
        "job_seconds": JOB_SECONDS,
        "figures": figures,
        "tables": [
            {
                "title": "scope cancel -> task stopped / caller free / slot free (ms), "
                "one-slot prefork and threads workers",
                "columns": [
                    "contender", "pool", "backend", "stopped p50", "stopped p99",
                    "caller free p50", "caller free p99", "slot free p50", "n",
                ],
                "rows": rows,
                "notes": [
                    "bridgecancel: 'stopped' is the task's token firing; revoke(): the task "
                    f"runs on to its end ({JOB_SECONDS:g} s job)",
                    "slot free: the next task, sent at the cancel, starts in the pool's slot",
                ],
            },
            {
                "title": "one call of the smallest task (ms per call, median of rounds)",
                "columns": ["pool", "backend", "run_on_celery", "get() in a thread", "ratio"],
                "rows": overhead_rows,
                "notes": ["get() in a thread: await anyio.to_thread.run_sync(lambda: "
                          "sig.apply_async().get())"],
            },
        ],
        "ratios": {
            f"call, run_on_celery / get() in a thread ({pool}, {backend})": f["overhead"]["ratio"]
            for backend, per_pool in figures.items()
            for pool, f in per_pool.items()
        },
        "targets": [
            {"name": "token fired p50 <= 20 ms (worst pool and backend)", "target": "<= 20 ms",
             "measured": f"{worst_p50:.1f} ms", "met": worst_p50 <= 20},
            {"name": "token fired p99 <= 100 ms (worst pool and backend)",
             "target": "<= 100 ms", "measured": f"{worst_p99:.1f} ms", "met": worst_p99 <= 100},
            {"name": "caller free p50 <= 50 ms (cooperative stop, worst)", "target": "<= 50 ms",
             "measured": f"{worst_free:.1f} ms", "met": worst_free <= 50},
            {"name": "call overhead vs get() in a thread <= 1.2x (worst)", "target": "<= 1.2x",
             "measured": f"{worst_ratio:.2f}x", "met": worst_ratio <= 1.2},
        ],
    }


if __name__ == "__main__":
    sys.exit(h.standalone_main("celery", __doc__, run))
