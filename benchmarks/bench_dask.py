"""Cancelling a task on a local Dask cluster: bridgecancel against Dask alone, same run.

    python benchmarks/bench_dask.py [--quick]

A LocalCluster of one worker process with one thread, on 127.0.0.1. The task reports
"started" over loopback UDP, then waits on its token for up to JOB_SECONDS. Per sample,
seconds from the caller's ``scope.cancel()`` to:

* token fired: the task saw its token fire (stamped on the worker with
  ``time.monotonic()``, a system-wide clock on Linux and macOS);
* worker free: the next task, submitted right after the cancel, started on the
  worker's only thread;
* caller free: ``run_on_cluster`` returned.

The anchor is Dask alone: ``Future.cancel()`` on the same running task, which Dask does
not stop, so it runs to its end (JOB_SECONDS) and holds the thread until then.
Targets: token fired p50 <= 10 ms, worker free p50 <= 30 ms. Both backends.
Needs ``distributed`` (``pip install -e '.[dask]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

JOB_SECONDS = 0.5


async def _bench(quick: bool) -> dict[str, Any]:
    import anyio

    from bridgecancel._demo.cluster import (
        cancel_with_bridgecancel,
        cancel_with_dask_alone,
        local_cluster,
    )
    from bridgecancel.dask import run_on_cluster

    rounds, per_round = (4, 8) if quick else (10, 20)
    fired: list[list[float]] = []
    returned: list[list[float]] = []
    freed: list[list[float]] = []
    alone_ran_on: list[list[float]] = []
    alone_freed: list[list[float]] = []
    async with local_cluster() as client, await anyio.create_udp_socket(
        local_host="127.0.0.1"
    ) as sock:
        for _ in range(5):  # warm up: plugins, connections, imports on the worker
            await run_on_cluster(client, int)
        await cancel_with_bridgecancel(client, sock, JOB_SECONDS)
        for index in range(rounds):
            for name in h.round_order(("bridgecancel", "dask"), index):
                if name == "bridgecancel":
                    samples = [
                        await cancel_with_bridgecancel(client, sock, JOB_SECONDS)
                        for _ in range(per_round)
                    ]
                    fired.append([s[0] for s in samples])
                    returned.append([s[1] for s in samples])
                    freed.append([s[2] for s in samples])
                else:
                    ran_on, next_started = await cancel_with_dask_alone(
                        client, sock, JOB_SECONDS
                    )
                    alone_ran_on.append([ran_on])
                    alone_freed.append([next_started])
    return {
        "token_fired": _summary(fired),
        "caller_free": _summary(returned),
        "worker_free": _summary(freed),
        "dask_alone_task_stopped": _summary(alone_ran_on),
        "dask_alone_worker_free": _summary(alone_freed),
    }


def _summary(per_round: list[list[float]]) -> dict[str, float]:
    return h.latency_summary([s for r in per_round for s in r], per_round)


def run(quick: bool) -> dict[str, Any]:
    import anyio

    figures = {
        backend: anyio.run(_bench, quick, backend=backend) for backend in ("asyncio", "trio")
    }
    rows = []
    for backend, f in figures.items():
        rows.append([
            "bridgecancel", backend,
            f["token_fired"]["p50_ms"], f["token_fired"]["p99_ms"],
            f["worker_free"]["p50_ms"], f["worker_free"]["p99_ms"],
            f["caller_free"]["p50_ms"], f["token_fired"]["n"],
        ])
        rows.append([
            "Dask alone (Future.cancel)", backend,
            f["dask_alone_task_stopped"]["p50_ms"], f["dask_alone_task_stopped"]["p99_ms"],
            f["dask_alone_worker_free"]["p50_ms"], f["dask_alone_worker_free"]["p99_ms"],
            "-", f["dask_alone_task_stopped"]["n"],
        ])
    worst_fired = max(f["token_fired"]["p50_ms"] for f in figures.values())
    worst_free = max(f["worker_free"]["p50_ms"] for f in figures.values())
    return {
        "area": "dask",
        "quick": quick,
        "job_seconds": JOB_SECONDS,
        "figures": figures,
        "tables": [{
            "title": "scope cancel -> task stopped / worker free (ms), LocalCluster 1 x 1 thread",
            "columns": [
                "contender", "backend", "stopped p50", "stopped p99",
                "worker free p50", "worker free p99", "caller free p50", "n",
            ],
            "rows": rows,
            "notes": [
                "bridgecancel: 'stopped' is the task's token firing; Dask alone: the task "
                f"runs on to its end ({JOB_SECONDS:g} s job)",
                "worker free: the next task, submitted at the cancel, starts on the thread",
            ],
        }],
        "ratios": {
            f"worker free, Dask alone / bridgecancel ({backend})": (
                f["dask_alone_worker_free"]["p50_ms"] / f["worker_free"]["p50_ms"]
            )
            for backend, f in figures.items()
        },
        "targets": [
            {"name": "token fired p50 <= 10 ms (worst backend)", "target": "<= 10 ms",
             "measured": f"{worst_fired:.1f} ms", "met": worst_fired <= 10},
            {"name": "worker free p50 <= 30 ms (worst backend)", "target": "<= 30 ms",
             "measured": f"{worst_free:.1f} ms", "met": worst_free <= 30},
        ],
    }


if __name__ == "__main__":
    sys.exit(h.standalone_main("dask", __doc__, run))
