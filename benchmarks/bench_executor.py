"""bridgecancel.ThreadPoolExecutor against concurrent.futures.ThreadPoolExecutor, in the same run.

    python benchmarks/bench_executor.py [--quick]

1. Job overhead: ``executor.submit(noop).result()`` one after another on a one-thread
   pool, bridgecancel's executor beside the standard library's, in alternating rounds of
   a few calls. The caller and the pool's thread are pinned (``os.sched_setaffinity``,
   Linux), once both to one CPU and once to two: left to the scheduler, a pool thread
   lands beside its caller or on an idle CPU, whose wake-up costs more than the job
   (per-round figures then jump between about 25 and 100 us, for either executor).
   Beside them, a subclass whose ``submit`` only calls the base class's: the floor of
   any executor that wraps its jobs. Target: the median of per-round ratios <= 1.10x.
2. Cancel latency: a job waits in ``current_token().wait()``; once it is seen waiting,
   ``future.cancel()`` is called and the time runs until the job's wait has returned (in
   the job's thread). Beside it, the floor of any cross-thread wake-up: a thread waiting
   in ``threading.Event.wait()`` woken by ``Event.set()``. And, for reference, the same
   job run by ``asyncio.to_thread`` with the executor as the loop's default, from
   ``task.cancel()`` to the job's wait returning. Target: p50 <= 1 ms (p99 reported).

Figures are medians of per-round figures (latency percentiles are over pooled samples).
Results are printed and written to ``benchmarks/results/executor.json``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bridgecancel

if __name__ == "__main__":  # run as a script: make the sibling _harness importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

AREA = "executor"
OURS = "bridgecancel.ThreadPoolExecutor"
STDLIB = "concurrent.futures.ThreadPoolExecutor"
FLOOR = "a subclass whose submit() only calls the base class's"
OVERHEAD_TARGET = 1.10
LATENCY_TARGET_MS = 1.0
PATIENCE_S = 10.0  # no sample waits longer than this for its job


@dataclass(frozen=True)
class Config:
    overhead_rounds: int
    overhead_calls: int  # per contender per round: few, so that both see the same load
    latency_rounds: int
    latency_samples: int  # per contender per round


QUICK = Config(overhead_rounds=100, overhead_calls=50, latency_rounds=6, latency_samples=40)
FULL = Config(overhead_rounds=600, overhead_calls=50, latency_rounds=20, latency_samples=100)


# -- 1. overhead ------------------------------------------------------------------------


def _noop() -> None:
    return None


class _PassThrough(concurrent.futures.ThreadPoolExecutor):
    """The floor of any executor that wraps its jobs: a Python-level ``submit``."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        return super().submit(fn, *args, **kwargs)


def _per_call(pool: concurrent.futures.ThreadPoolExecutor, calls: int) -> float:
    """Seconds per ``submit(noop).result()``, one after another."""
    submit = pool.submit
    start = time.perf_counter()
    for _ in range(calls):
        submit(_noop).result()
    return (time.perf_counter() - start) / calls


def placements() -> dict[str, tuple[int, int] | None]:
    """Where the caller and the pool's thread run: ``(caller's CPU, thread's CPU)``, or
    None to leave it to the scheduler (without ``os.sched_setaffinity``)."""
    if not hasattr(os, "sched_setaffinity"):
        return {"unpinned": None}
    cpus = sorted(os.sched_getaffinity(0))
    found: dict[str, tuple[int, int] | None] = {"one CPU": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        found["two CPUs"] = (cpus[0], cpus[1])
    return found


def bench_overhead(cfg: Config, where: tuple[int, int] | None) -> dict[str, list[float]]:
    """Seconds per call, per round, for each executor, with threads placed `where`."""
    pin: dict[str, Any] = {}
    if where is not None:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {where[0]})  # this thread only (Linux)
        pin = {"initializer": os.sched_setaffinity, "initargs": (0, {where[1]})}
    pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {
        OURS: bridgecancel.ThreadPoolExecutor(1, **pin),
        STDLIB: concurrent.futures.ThreadPoolExecutor(1, **pin),
        FLOOR: _PassThrough(1, **pin),
    }
    try:
        for pool in pools.values():  # start the thread, warm the caches
            _per_call(pool, cfg.overhead_calls)
        per_round: dict[str, list[float]] = {name: [] for name in pools}
        for r in range(cfg.overhead_rounds):
            for name in h.round_order(list(pools), r):
                per_round[name].append(_per_call(pools[name], cfg.overhead_calls))
        return per_round
    finally:
        for pool in pools.values():
            pool.shutdown()
        if where is not None:
            os.sched_setaffinity(0, before)


# -- 2. cancel latency ------------------------------------------------------------------


def _wait_on_token(started: threading.Event, woke: list[float]) -> None:
    started.set()
    bridgecancel.current_token().wait(PATIENCE_S)
    woke.append(time.perf_counter())


def _sample_future_cancel(pool: bridgecancel.ThreadPoolExecutor) -> float:
    started, woke = threading.Event(), list[float]()
    future = pool.submit(_wait_on_token, started, woke)
    started.wait(PATIENCE_S)
    time.sleep(0.0005)  # let it reach token.wait()
    cancelled_at = time.perf_counter()
    if future.cancel():
        raise AssertionError("a running future was cancelled")
    future.result(PATIENCE_S)
    return float(woke[0] - cancelled_at)


def _wait_on_event(started: threading.Event, stop: threading.Event, woke: list[float]) -> None:
    started.set()
    stop.wait(PATIENCE_S)
    woke.append(time.perf_counter())


def _sample_event_set(pool: concurrent.futures.ThreadPoolExecutor) -> float:
    started, stop, woke = threading.Event(), threading.Event(), list[float]()
    future = pool.submit(_wait_on_event, started, stop, woke)
    started.wait(PATIENCE_S)
    time.sleep(0.0005)
    set_at = time.perf_counter()
    stop.set()
    future.result(PATIENCE_S)
    return float(woke[0] - set_at)


async def _asyncio_samples(count: int) -> list[float]:
    """``task.cancel()`` on a task awaiting ``asyncio.to_thread``, to the job's wake-up."""
    loop = asyncio.get_running_loop()
    pool = bridgecancel.ThreadPoolExecutor(1)
    loop.set_default_executor(pool)
    samples = []
    try:
        for _ in range(count):
            started, woke = threading.Event(), list[float]()
            task = asyncio.create_task(asyncio.to_thread(_wait_on_token, started, woke))
            while not started.is_set():
                await asyncio.sleep(0.0002)
            await asyncio.sleep(0.0005)
            cancelled_at = time.perf_counter()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            while not woke:  # the task is back at once; the thread stops in its own time
                await asyncio.sleep(0.0002)
            samples.append(woke[0] - cancelled_at)
    finally:
        pool.shutdown()
    return samples


FUTURE_CANCEL = f"{OURS}: future.cancel(), job in current_token().wait()"
EVENT_SET = "threading.Event.set(), thread in Event.wait() (the floor)"
TO_THREAD = "asyncio.to_thread (executor as default): task.cancel()"


def bench_latency(cfg: Config) -> dict[str, dict[str, float]]:
    ours, stdlib = bridgecancel.ThreadPoolExecutor(1), concurrent.futures.ThreadPoolExecutor(1)
    contenders: dict[str, Callable[[], float]] = {
        FUTURE_CANCEL: lambda: _sample_future_cancel(ours),
        EVENT_SET: lambda: _sample_event_set(stdlib),
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    per_round: dict[str, list[list[float]]] = {name: [] for name in contenders}
    try:
        for r in range(cfg.latency_rounds):
            for name in h.round_order(list(contenders), r):
                got = [contenders[name]() for _ in range(cfg.latency_samples)]
                samples[name] += got
                per_round[name].append(got)
    finally:
        ours.shutdown()
        stdlib.shutdown()
    summary = {name: h.latency_summary(samples[name], per_round[name]) for name in contenders}
    to_thread = asyncio.run(_asyncio_samples(cfg.latency_samples * 2))
    summary[TO_THREAD] = h.latency_summary(to_thread, [to_thread])
    return summary


# -- the report -------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    overhead = {name: bench_overhead(cfg, where) for name, where in placements().items()}
    latency = bench_latency(cfg)
    ratios = {
        name: h.paired_ratio(per_round[OURS], per_round[STDLIB])
        for name, per_round in overhead.items()
    }
    cancel = latency[FUTURE_CANCEL]
    return {
        "area": AREA,
        "quick": quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "overhead_us": {
            where: {name: h.median(v) * 1e6 for name, v in per_round.items()}
            for where, per_round in overhead.items()
        },
        "overhead_ratio": ratios,
        "latency": latency,
        "tables": [
            {
                "title": f"1. submit(noop).result(): time per call, median of "
                f"{cfg.overhead_rounds} per-round means ({cfg.overhead_calls} calls per "
                "contender per round, a one-thread pool)",
                "columns": ["threads on", "executor", "us/call", "/ standard library"],
                "rows": [
                    [where, name, h.median(v) * 1e6, h.paired_ratio(v, per_round[STDLIB])]
                    for where, per_round in overhead.items()
                    for name, v in per_round.items()
                ],
                "notes": [
                    "the ratio is the median of per-round ratios",
                    "one CPU: the caller and the pool's thread pinned to the same CPU; "
                    "two CPUs: to two",
                ],
            },
            {
                "title": "2. Cancel latency: from the cancel to the job's wait returning (ms)",
                "columns": ["how", "p50", "p99", "max", "n"],
                "rows": [
                    [name, s["p50_ms"], s["p99_ms"], s["max_ms"], s["n"]]
                    for name, s in latency.items()
                ],
                "notes": [
                    "asyncio.to_thread: the awaiting task is back at once (not structured);"
                    " the time is until the thread saw its token fire",
                ],
            },
        ],
        "ratios": {
            f"1. submit(noop).result(), {where}: {OURS} / {STDLIB}": ratio
            for where, ratio in ratios.items()
        },
        "targets": [
            *(
                {
                    "name": f"1. job overhead (submit + result of a trivial job), {where}",
                    "target": f"<= {OVERHEAD_TARGET:.2f}x the standard library's",
                    "measured": f"{ratio:.2f}x",
                    "met": ratio <= OVERHEAD_TARGET,
                }
                for where, ratio in ratios.items()
            ),
            {
                "name": "2. future.cancel() to the running job's token fired, p50",
                "target": f"<= {LATENCY_TARGET_MS:g} ms",
                "measured": f"{cancel['p50_ms']:.3f} ms (p99 {cancel['p99_ms']:.3f} ms)",
                "met": cancel["p50_ms"] <= LATENCY_TARGET_MS,
            },
        ],
    }


if __name__ == "__main__":
    sys.exit(h.standalone_main(AREA, __doc__, run))
