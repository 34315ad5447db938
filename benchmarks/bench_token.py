"""Cancel tokens on their own: the cost of a read, and a deadline timer that does not grow.

    python benchmarks/bench_token.py [--quick]

1. ``token.cancel_called`` in a tight loop beside ``threading.Event.is_set()``, in the
   same run (rounds alternate the order). Target: ``cancel_called`` <= 0.5x
   ``Event.is_set()``.
2. The deadline timer under load: 100,000 sources, each with a long deadline (600 s),
   made and closed (or dropped, or made as children) one after another while one
   unrelated deadline stays pending, as a server handling calls under ``fail_after(600)``
   does. Memory (traced allocations still held) and time per call are sampled every
   block of calls; both must stay flat: the last blocks cost at most 1.5x the first, and
   held memory grows by less than 1 byte per call (the old timer kept every entry until
   its deadline, about 233 B per call, and closing scanned the whole heap).
3. Time per call with 10,000 other deadlines pending beside 1, alternating. Target:
   <= 1.5x.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the sibling _harness importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h
from bridgecancel import CancelSource, _timer

AREA = "token"
CANCEL_CALLED = "token.cancel_called"
IS_SET = "threading.Event.is_set()"


def _empty(n: int) -> int:
    r = range(n)
    start = time.perf_counter_ns()
    for _ in r:
        pass
    return time.perf_counter_ns() - start


def _loop_cancel_called(n: int) -> int:
    r, token = range(n), CancelSource().token
    start = time.perf_counter_ns()
    for _ in r:
        _ = token.cancel_called
    return time.perf_counter_ns() - start


def _loop_is_set(n: int) -> int:
    r, event = range(n), threading.Event()
    start = time.perf_counter_ns()
    for _ in r:
        _ = event.is_set()
    return time.perf_counter_ns() - start


def bench_reads(rounds: int, reads: int) -> dict[str, Any]:
    loops = {CANCEL_CALLED: _loop_cancel_called, IS_SET: _loop_is_set}
    net: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(rounds):
        for name in h.round_order(list(loops), r):
            empty = _empty(reads)
            took = loops[name](reads)
            net[name].append(max(took - empty, 1) / reads)
    ratio = h.paired_ratio(net[CANCEL_CALLED], net[IS_SET])
    return {
        "net_ns": {name: h.median(values) for name, values in net.items()},
        "ratio": ratio,
    }


def _one_call(kind: str, deadline: float) -> None:
    if kind == "closed":
        with CancelSource(deadline=deadline):
            pass
    elif kind == "dropped":  # never closed: collected when the last reference goes
        CancelSource(deadline=deadline)
    else:  # "child": a call's child token under a long-lived parent
        with _PARENT.token.child(deadline=deadline):
            pass


_PARENT = CancelSource()


def _time_block(kind: str, calls: int) -> float:
    """Microseconds per call over `calls` calls."""
    deadline = time.monotonic() + 600
    start = time.perf_counter()
    for _ in range(calls):
        _one_call(kind, deadline)
    return (time.perf_counter() - start) / calls * 1e6


def bench_timer(calls: int, blocks: int, kind: str) -> dict[str, Any]:
    """Time per call and memory held, sampled every ``calls // blocks`` calls.

    Two passes over `calls` calls each: one timed, one under tracemalloc (which slows
    every allocation, so it is not timed).
    """
    unrelated = CancelSource(deadline=time.monotonic() + 3600)
    per_block = calls // blocks
    try:
        times_us = [_time_block(kind, per_block) for _ in range(blocks)]
        gc.collect()
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            held: list[int] = []
            for _ in range(blocks):
                _time_block(kind, per_block)
                held.append(tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
        pending = _timer.timer.pending()
    finally:
        unrelated.close()
    quarter = max(1, blocks // 4)
    first, last = h.median(times_us[:quarter]), h.median(times_us[-quarter:])
    # Held memory wobbles with the batches the timer takes in; its trend is what grows.
    slope = (h.median(held[-quarter:]) - h.median(held[:quarter])) / (
        (blocks - quarter) * per_block
    )
    return {
        "kind": kind,
        "calls": calls,
        "first_us": first,
        "last_us": last,
        "time_growth": last / first,
        "peak_held_bytes": max(held),
        "bytes_per_call": slope,
        "pending_after": pending,
    }


def bench_pending(rounds: int, calls: int, crowd: int) -> dict[str, Any]:
    """Per-call time with 1 other deadline pending beside `crowd` others, alternating."""
    per: dict[str, list[float]] = {"1": [], str(crowd): []}
    base = time.monotonic() + 3600
    for r in range(rounds):
        for name in h.round_order(list(per), r):
            others = [CancelSource(deadline=base + i) for i in range(int(name))]
            per[name].append(_time_block("closed", calls))
            for other in others:
                other.close()
            del others
    return {
        "crowd": crowd,
        "us": {name: h.median(values) for name, values in per.items()},
        "ratio": h.paired_ratio(per[str(crowd)], per["1"]),
    }


def run(quick: bool) -> dict[str, Any]:
    reads = bench_reads(rounds=9 if quick else 31, reads=200_000 if quick else 2_000_000)
    calls = 20_000 if quick else 100_000
    timers = [bench_timer(calls, 20, kind) for kind in ("closed", "dropped", "child")]
    crowd = bench_pending(rounds=5 if quick else 15, calls=2_000, crowd=10_000)
    targets = [
        {
            "name": "cancel_called <= 0.5x Event.is_set()",
            "target": "<= 0.5x",
            "measured": f"{reads['ratio']:.2f}x",
            "met": reads["ratio"] <= 0.5,
        }
    ]
    for t in timers:
        flat = t["time_growth"] <= 1.5 and t["bytes_per_call"] < 1.0
        targets.append(
            {
                "name": f"timer flat over {t['calls']:,} calls ({t['kind']})",
                "target": "last/first block <= 1.5x, memory < 1 B per call",
                "measured": f"{t['time_growth']:.2f}x, {t['bytes_per_call']:.2f} B/call",
                "met": flat,
            }
        )
    targets.append(
        {
            "name": f"per-call time with {crowd['crowd']:,} other deadlines pending vs 1",
            "target": "<= 1.5x",
            "measured": f"{crowd['ratio']:.2f}x",
            "met": crowd["ratio"] <= 1.5,
        }
    )
    return {
        "area": AREA,
        "quick": quick,
        "reads": reads,
        "timer": timers,
        "pending": crowd,
        "tables": [
            {
                "title": "A token read beside Event.is_set() (ns per read, loop removed)",
                "columns": ["read", "ns"],
                "rows": [[name, ns] for name, ns in reads["net_ns"].items()],
                "notes": [],
            },
            {
                "title": "Sources with a 600 s deadline, one unrelated deadline pending",
                "columns": [
                    "how each ends", "calls", "first µs", "last µs", "growth",
                    "peak bytes held", "bytes/call", "pending after",
                ],
                "rows": [
                    [
                        t["kind"], t["calls"], t["first_us"], t["last_us"],
                        f"{t['time_growth']:.2f}x", t["peak_held_bytes"],
                        t["bytes_per_call"], t["pending_after"],
                    ]
                    for t in timers
                ],
                "notes": [
                    "first/last: median µs per call over the first and last quarter of blocks",
                    "bytes/call: trend of traced memory held (old timer: about 233)",
                    "'pending after' counts the unrelated deadline only: 1",
                ],
            },
            {
                "title": "Per-call time (closed sources) against other pending deadlines",
                "columns": ["other deadlines pending", "µs per call"],
                "rows": [[name, us] for name, us in crowd["us"].items()],
                "notes": [],
            },
        ],
        "ratios": {
            f"{CANCEL_CALLED} / {IS_SET}": reads["ratio"],
            f"per call, {crowd['crowd']:,} deadlines pending / 1": crowd["ratio"],
        },
        "targets": targets,
    }


if __name__ == "__main__":
    sys.exit(h.standalone_main(AREA, __doc__, run))
