"""bridgecancel.run_sync against anyio, trio and asyncio worker threads, in the same run.

    python benchmarks/bench_threads.py [--quick]

1. ``run_sync(noop)`` per call against ``anyio.to_thread.run_sync(noop)``, on anyio's
   asyncio and trio backends. Target: <= 1.05x on asyncio, <= 1.30x on trio.
2. Structured cancel latency: from ``scope.cancel()`` to the exit of the scope's ``with``
   block, with the worker finished; the worker waits in ``current_token().wait()``. Beside
   anyio's polling pattern (``from_thread.check_cancelled()`` every 10 ms), and on plain
   asyncio beside ``asyncio.to_thread``, which cannot stop its thread at all. Target:
   p50 <= 0.3 ms, p99 <= 1 ms.
3. Cost of ``token.cancel_called`` and ``token.check()`` inside a worker, beside
   ``threading.Event.is_set()``, ``anyio.from_thread.check_cancelled()`` and
   ``trio.from_thread.check_cancelled()``. Target: ``cancel_called`` <= 0.5x
   ``Event.is_set()``; ``check()`` at least 3x faster than anyio's check.
4. 10,000 jobs behind a limiter of 40, cancelled by one scope: time until the scope exits
   and how many queued jobs started. Target: <= 0.5 s, 0 started.

Contenders take turns in rounds (A B, B A, ...) and the figures are medians of per-round
figures (latency percentiles are over the pooled samples). Results are printed and
written to ``benchmarks/results/threads.json``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

import bridgecancel

if __name__ == "__main__":  # run as a script: make the sibling _harness importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

AREA = "threads"
# Issue 7's targets. trio's is looser: the known floor (a watcher task per call, since
# nothing public says that a shielded thread call's caller was cancelled) is about 1.3x.
NOOP_TARGET = {"asyncio": 1.05, "trio": 1.30}
BC = "bridgecancel.run_sync"
ANYIO = "anyio.to_thread.run_sync"
POLL_S = 0.0002  # how often the event loop looks whether a worker is ready
ANYIO_POLL_S = 0.010  # the polling pattern's period: from_thread.check_cancelled() every 10 ms

Call = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Config:
    noop_rounds: int
    noop_calls: int  # per contender per round
    latency_rounds: int
    latency_bc: int  # samples per round: event-driven waits
    latency_poll: int  # samples per round: the 10 ms polling pattern (slow to sample)
    to_thread_samples: int  # asyncio.to_thread: each sample runs a whole fixed-length job
    to_thread_job_s: float
    check_rounds: int
    check_loop_s: float  # each tight loop runs about this long
    flood_rounds: int
    flood_jobs: int = 10_000
    flood_limit: int = 40


QUICK = Config(
    noop_rounds=15, noop_calls=200,
    latency_rounds=10, latency_bc=30, latency_poll=8,
    to_thread_samples=5, to_thread_job_s=0.05,
    check_rounds=9, check_loop_s=0.004,
    flood_rounds=2,
)
FULL = Config(
    noop_rounds=41, noop_calls=500,
    latency_rounds=20, latency_bc=100, latency_poll=20,
    to_thread_samples=15, to_thread_job_s=0.05,
    check_rounds=25, check_loop_s=0.02,
    flood_rounds=6,
)


def _trio() -> Any:
    import trio  # only ever called on the trio backend

    return trio


async def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    try:
        with anyio.fail_after(60):
            while not predicate():
                await anyio.sleep(POLL_S)
    except TimeoutError:
        raise RuntimeError(f"gave up after 60 s waiting for {what}") from None


# -- 1. run_sync(noop) ------------------------------------------------------------------


def _noop() -> None:
    return None


async def _bench_noop(cfg: Config, backend: str) -> dict[str, list[float]]:
    """Per-round mean seconds per call, for each contender."""
    calls: dict[str, Call] = {BC: bridgecancel.run_sync, ANYIO: anyio.to_thread.run_sync}
    if backend == "trio":
        calls["trio.to_thread.run_sync (reference)"] = _trio().to_thread.run_sync
    else:
        calls["asyncio.to_thread (reference)"] = asyncio.to_thread
    for call in calls.values():  # warm up: start the worker threads, fill the caches
        for _ in range(100):
            await call(_noop)
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(cfg.noop_rounds):
        for name in h.round_order(list(calls), r):
            call = calls[name]
            start = time.perf_counter()
            for _ in range(cfg.noop_calls):
                await call(_noop)
            per_round[name].append((time.perf_counter() - start) / cfg.noop_calls)
    return per_round


# -- 2. structured cancel latency -------------------------------------------------------


class _Probe:
    """What the loop needs to know about one worker: started, blocked, finished."""

    __slots__ = ("ended_at", "finished", "ident", "ready")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.ident = 0
        self.ended_at = 0.0

    def start(self) -> None:
        self.ident = threading.get_ident()
        self.ready.set()

    def blocked(self) -> bool:
        """True once the worker has started and sits in a ``wait`` (not on its way in)."""
        if not self.ready.is_set():
            return False
        frame = sys._current_frames().get(self.ident)
        return frame is not None and frame.f_code.co_name == "wait"

    def started(self) -> bool:
        return self.ready.is_set()


def _wait_on_token(probe: _Probe) -> None:
    try:
        token = bridgecancel.current_token()
        probe.start()  # just before the wait
        token.wait()
        token.check()
    finally:
        probe.finished.set()


def _poll_anyio(probe: _Probe) -> None:
    try:
        probe.start()
        while True:
            anyio.from_thread.check_cancelled()
            time.sleep(ANYIO_POLL_S)
    finally:
        probe.finished.set()


def _fixed_job(length: float, probe: _Probe) -> None:
    """What asyncio.to_thread can offer: a job that ends by itself, whatever happens."""
    try:
        probe.start()
        time.sleep(length)
    finally:
        probe.ended_at = time.perf_counter()
        probe.finished.set()


async def _cancel_sample(
    call: Call, worker: Callable[[_Probe], None], ready: Callable[[_Probe], bool], settle: float
) -> float:
    """Seconds from ``scope.cancel()`` to the exit of the scope's ``with`` block."""
    probe = _Probe()
    cancelled_at = 0.0

    async def cancel_when_ready(scope: anyio.CancelScope) -> None:
        nonlocal cancelled_at
        await _wait_for(lambda: ready(probe), "the worker to start")
        await anyio.sleep(settle)
        cancelled_at = time.perf_counter()
        scope.cancel()

    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(cancel_when_ready, scope)
            await call(worker, probe)
        exited_at = time.perf_counter()
    if not scope.cancelled_caught or not probe.finished.is_set():
        raise RuntimeError(f"{worker.__name__}: the scope exited before the worker finished")
    return exited_at - cancelled_at


async def _bench_latency(cfg: Config) -> dict[str, dict[str, Any]]:
    # (call, worker, ready, settle, samples per round). A token waiter is cancelled once
    # it is seen blocked in wait(); the polling worker at a random point of its 10 ms
    # period, as a real cancel would find it.
    contenders: dict[str, tuple[Call, Any, Any, Callable[[], float], int]] = {
        f"{BC}, worker in current_token().wait()": (
            bridgecancel.run_sync, _wait_on_token, _Probe.blocked, lambda: 0.0, cfg.latency_bc
        ),
        f"{ANYIO}, worker polls check_cancelled() every 10 ms": (
            anyio.to_thread.run_sync,
            _poll_anyio,
            _Probe.started,
            lambda: random.uniform(0, ANYIO_POLL_S),
            cfg.latency_poll,
        ),
    }
    for call, worker, ready, settle, _ in contenders.values():  # warm up
        for _ in range(3):
            await _cancel_sample(call, worker, ready, settle())
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    rounds: dict[str, list[list[float]]] = {name: [] for name in contenders}
    for r in range(cfg.latency_rounds):
        for name in h.round_order(list(contenders), r):
            call, worker, ready, settle, n = contenders[name]
            this_round = [await _cancel_sample(call, worker, ready, settle()) for _ in range(n)]
            samples[name] += this_round
            rounds[name].append(this_round)
    return {name: h.latency_summary(samples[name], rounds[name]) for name in contenders}


# Plain asyncio (no anyio scope): Task.cancel() on the task awaiting the call.


async def _plain_wait_for(predicate: Callable[[], bool]) -> None:
    give_up = time.monotonic() + 60
    while not predicate():
        if time.monotonic() > give_up:
            raise RuntimeError("gave up after 60 s waiting for a worker")
        await asyncio.sleep(POLL_S)


async def _plain_cancel_sample(
    start: Callable[[_Probe], Awaitable[Any]], ready: Callable[[_Probe], bool]
) -> tuple[float, float, _Probe]:
    """(when ``task.cancel()`` was called, when the awaiting task was done, the probe)."""
    probe = _Probe()
    task = asyncio.ensure_future(start(probe))
    await _plain_wait_for(lambda: ready(probe))
    cancelled_at = time.perf_counter()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise RuntimeError("the task was cancelled but returned normally")
    return cancelled_at, time.perf_counter(), probe


async def _bench_plain_asyncio(cfg: Config) -> dict[str, Any]:
    async def ours(probe: _Probe) -> None:
        await bridgecancel.run_sync(_wait_on_token, probe)

    async def theirs(probe: _Probe) -> None:
        await asyncio.to_thread(_fixed_job, cfg.to_thread_job_s, probe)

    for _ in range(3):  # warm up
        await _plain_cancel_sample(ours, _Probe.blocked)
    samples: list[float] = []
    rounds: list[list[float]] = []
    freed: list[float] = []
    completed: list[float] = []
    # Interleaved: a round of bridgecancel samples, then one asyncio.to_thread sample.
    for _ in range(cfg.to_thread_samples):
        this_round = []
        for _ in range(cfg.latency_bc):
            cancelled_at, done_at, probe = await _plain_cancel_sample(ours, _Probe.blocked)
            if not probe.finished.is_set():
                raise RuntimeError("run_sync returned before its worker finished")
            this_round.append(done_at - cancelled_at)
        samples += this_round
        rounds.append(this_round)
        cancelled_at, done_at, probe = await _plain_cancel_sample(theirs, _Probe.started)
        if probe.finished.is_set():
            raise RuntimeError("asyncio.to_thread's worker stopped early: not expected")
        await _plain_wait_for(probe.finished.is_set)
        freed.append(done_at - cancelled_at)
        completed.append(probe.ended_at - cancelled_at)
    return {
        f"{BC}, worker in current_token().wait()": h.latency_summary(samples, rounds),
        "asyncio.to_thread": {
            "job_length_ms": cfg.to_thread_job_s * 1e3,
            "task_done_p50_ms": h.median(freed) * 1e3,
            "worker_done_p50_ms": h.median(completed) * 1e3,
            "n": len(completed),
        },
    }


# -- 3. cost of a cancellation check in a worker ----------------------------------------
# Each function times an empty loop and then the same loop with one read per iteration,
# in the same worker call; the figures are per read, raw and net of the empty loop.


def _empty_loop(r: range) -> int:
    start = time.perf_counter_ns()
    for _ in r:
        pass
    return time.perf_counter_ns() - start


def _loop_cancel_called(n: int) -> tuple[int, int]:
    r, token = range(n), bridgecancel.current_token()
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = token.cancel_called
    return empty, time.perf_counter_ns() - start


def _loop_check(n: int) -> tuple[int, int]:
    r, token = range(n), bridgecancel.current_token()
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = token.check()  # type: ignore[func-returns-value]  # the same shape as the others
    return empty, time.perf_counter_ns() - start


def _loop_check_cancelled(n: int) -> tuple[int, int]:
    r, check = range(n), bridgecancel.check_cancelled
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = check()
    return empty, time.perf_counter_ns() - start


def _loop_event_is_set(n: int) -> tuple[int, int]:
    r, event = range(n), threading.Event()
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = event.is_set()
    return empty, time.perf_counter_ns() - start


def _loop_anyio_check(n: int) -> tuple[int, int]:
    r, check = range(n), anyio.from_thread.check_cancelled
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = check()
    return empty, time.perf_counter_ns() - start


def _loop_trio_check(n: int) -> tuple[int, int]:
    r, check = range(n), _trio().from_thread.check_cancelled
    empty = _empty_loop(r)
    start = time.perf_counter_ns()
    for _ in r:
        _ = check()
    return empty, time.perf_counter_ns() - start


CANCEL_CALLED = "token.cancel_called"
CHECK = "token.check()"
IS_SET = "threading.Event.is_set()"
ANYIO_CHECK = "anyio.from_thread.check_cancelled()"


async def _bench_checks(cfg: Config, backend: str) -> dict[str, dict[str, float]]:
    # Each read runs in the kind of worker it is meant for: token reads in a bridgecancel
    # worker, anyio's and trio's checks in their own workers (not cancellable-abandoning).
    loops: dict[str, tuple[Call, Callable[[int], tuple[int, int]]]] = {
        CANCEL_CALLED: (bridgecancel.run_sync, _loop_cancel_called),
        CHECK: (bridgecancel.run_sync, _loop_check),
        "bridgecancel.check_cancelled()": (bridgecancel.run_sync, _loop_check_cancelled),
        IS_SET: (anyio.to_thread.run_sync, _loop_event_is_set),
        ANYIO_CHECK: (anyio.to_thread.run_sync, _loop_anyio_check),
    }
    if backend == "trio":
        trio_run = _trio().to_thread.run_sync
        loops["trio.from_thread.check_cancelled()"] = (trio_run, _loop_trio_check)
    # Calibrate: enough iterations for each loop to run about check_loop_s.
    sizes: dict[str, int] = {}
    for name, (call, loop) in loops.items():
        _, took = await call(loop, 20_000)
        per_read = max(took / 20_000, 1.0)
        sizes[name] = max(20_000, int(cfg.check_loop_s * 1e9 / per_read))
    raw: dict[str, list[float]] = {name: [] for name in loops}
    net: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(cfg.check_rounds):
        for name in h.round_order(list(loops), r):
            call, loop = loops[name]
            n = sizes[name]
            empty, took = await call(loop, n)
            raw[name].append(took / n)
            net[name].append((took - empty) / n)
    out: dict[str, dict[str, Any]] = {
        name: {
            "net_ns": h.median(net[name]),
            "raw_ns": h.median(raw[name]),
            "reads_per_loop": sizes[name],
            "_net_rounds": net[name],
        }
        for name in loops
    }
    return out


# -- 4. 10,000 queued jobs, one cancel -----------------------------------------------------


def _flood_token_job(started: list[None], finished: list[None]) -> None:
    started.append(None)  # list.append is atomic: a safe counter across threads
    try:
        token = bridgecancel.current_token()
        token.wait()
        token.check()
    finally:
        finished.append(None)


def _flood_polling_job(started: list[None], finished: list[None]) -> None:
    started.append(None)
    try:
        while True:
            anyio.from_thread.check_cancelled()
            time.sleep(ANYIO_POLL_S)
    finally:
        finished.append(None)


async def _flood_round(cfg: Config, call: Call, job: Callable[..., None]) -> dict[str, float]:
    limiter = anyio.CapacityLimiter(cfg.flood_limit)
    started: list[None] = []
    finished: list[None] = []

    async def one_job() -> None:
        await call(job, started, finished, limiter=limiter)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            for _ in range(cfg.flood_jobs):
                group.start_soon(one_job)
            await _wait_for(lambda: len(started) >= cfg.flood_limit, "the first jobs to start")
            await anyio.sleep(0.02)  # let the running jobs settle into their waits
            running = len(started)
            cancelled_at = time.perf_counter()
            scope.cancel()
    exited_at = time.perf_counter()
    if len(finished) != len(started):
        raise RuntimeError("the scope exited while jobs were still running")
    return {
        "exit_s": exited_at - cancelled_at,
        "queued_started": float(len(started) - running),
        "running_at_cancel": float(running),
    }


async def _bench_flood(cfg: Config) -> dict[str, dict[str, Any]]:
    contenders: dict[str, tuple[Call, Callable[..., None]]] = {
        f"{BC}, running jobs wait on their token": (bridgecancel.run_sync, _flood_token_job),
        f"{ANYIO}, running jobs poll check_cancelled() every 10 ms": (
            anyio.to_thread.run_sync,
            _flood_polling_job,
        ),
    }
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for r in range(cfg.flood_rounds):
        for name in h.round_order(list(contenders), r):
            call, job = contenders[name]
            per_round[name].append(await _flood_round(cfg, call, job))
    return {
        name: {
            "exit_s": h.median(x["exit_s"] for x in rounds),
            "exit_s_max": max(x["exit_s"] for x in rounds),
            "queued_started_max": int(max(x["queued_started"] for x in rounds)),
            "rounds": len(rounds),
        }
        for name, rounds in per_round.items()
    }


# -- running and reporting ------------------------------------------------------------------


async def _bench_backend(cfg: Config, backend: str) -> dict[str, Any]:
    return {
        "noop": await _bench_noop(cfg, backend),
        "latency": await _bench_latency(cfg),
        "checks": await _bench_checks(cfg, backend),
        "flood": await _bench_flood(cfg),
    }


def run(quick: bool) -> dict[str, Any]:
    """Run the four thread benchmarks on both anyio backends (and plain asyncio)."""
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    by_backend = {
        backend: anyio.run(_bench_backend, cfg, backend, backend=backend)
        for backend in ("asyncio", "trio")
    }
    plain = asyncio.run(_bench_plain_asyncio(cfg))
    results = _summarise(cfg, by_backend, plain)
    results["quick"] = quick
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    return results


def _summarise(
    cfg: Config, by_backend: dict[str, dict[str, Any]], plain: dict[str, Any]
) -> dict[str, Any]:
    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}

    def target(name: str, goal: str, measured: str, met: bool) -> None:
        targets.append({"name": name, "target": goal, "measured": measured, "met": met})

    # 1. noop
    rows: list[list[Any]] = []
    for backend, res in by_backend.items():
        noop = res["noop"]
        anchor = noop[ANYIO]
        for name, per_round in noop.items():
            rows.append([backend, name, h.median(per_round) * 1e6,
                         h.paired_ratio(per_round, anchor)])
        ratio = h.paired_ratio(noop[BC], anchor)
        ratios[f"1. run_sync(noop), {backend}: bridgecancel / anyio"] = ratio
        goal = NOOP_TARGET[backend]
        target(f"1. run_sync(noop) overhead, {backend}", f"<= {goal:.2f}x anyio",
               f"{ratio:.2f}x", ratio <= goal)
        figures.setdefault("noop_us", {})[backend] = {
            name: h.median(v) * 1e6 for name, v in noop.items()
        }
    tables = [{
        "title": f"1. run_sync(noop): time per call, median of {cfg.noop_rounds} per-round "
                 f"means ({cfg.noop_calls} calls per contender per round)",
        "columns": ["backend", "contender", "us/call", "/ anyio"],
        "rows": rows,
        "notes": ["'/ anyio' is the median of per-round ratios to anyio.to_thread.run_sync"],
    }]

    # 2. latency
    rows = []
    for backend, res in by_backend.items():
        for name, s in res["latency"].items():
            rows.append([backend, name, s["p50_ms"], s["p99_ms"], s["max_ms"], s["n"]])
        ours = res["latency"][f"{BC}, worker in current_token().wait()"]
        target(f"2. cancel latency p50, {backend}", "<= 0.3 ms",
               f"{ours['p50_ms']:.3f} ms", ours["p50_ms"] <= 0.3)
        target(f"2. cancel latency p99, {backend}", "<= 1 ms",
               f"{ours['p99_ms']:.3f} ms", ours["p99_ms"] <= 1.0)
        poll = next(v for k, v in res["latency"].items() if k.startswith(ANYIO))
        ratios[f"2. cancel latency p50, {backend}: bridgecancel / anyio polling"] = (
            ours["p50_ms"] / poll["p50_ms"]
        )
    figures["latency_ms"] = {b: res["latency"] for b, res in by_backend.items()}
    bc_plain = plain[f"{BC}, worker in current_token().wait()"]
    rows.append(["asyncio (plain)", f"{BC}, Task.cancel(), worker in token.wait()",
                 bc_plain["p50_ms"], bc_plain["p99_ms"], bc_plain["max_ms"], bc_plain["n"]])
    tt = plain["asyncio.to_thread"]
    rows.append(["asyncio (plain)",
                 f"asyncio.to_thread: never stops; a {tt['job_length_ms']:.0f} ms job ran to "
                 f"its end {tt['worker_done_p50_ms']:.1f} ms after cancel",
                 "never", "never", "never", tt["n"]])
    figures["latency_ms"]["asyncio (plain)"] = plain
    noop_anchor = {b: h.median(res["noop"][ANYIO]) * 1e3 for b, res in by_backend.items()}
    tables.append({
        "title": "2. cancel latency: scope.cancel() -> exit of the with block, worker "
                 "finished (ms)",
        "columns": ["backend", "contender", "p50", "p99", "max", "n"],
        "rows": rows,
        "notes": [
            "p50/p99 over all samples, gathered in interleaved rounds",
            "a loop -> thread -> loop round trip (anyio noop call) here: "
            + ", ".join(f"{b} {ms:.3f} ms" for b, ms in noop_anchor.items()),
            f"asyncio.to_thread: the awaiting task is released at once "
            f"({tt['task_done_p50_ms']:.3f} ms) but its thread runs on; it cannot be told "
            "to stop, so a job that waits forever never stops",
        ],
    })

    # 3. checks
    rows = []
    for backend, res in by_backend.items():
        checks = res["checks"]
        is_set = checks[IS_SET]["_net_rounds"]
        anyio_check = checks[ANYIO_CHECK]["_net_rounds"]
        for name, c in checks.items():
            rows.append([backend, name, c["net_ns"], c["raw_ns"],
                         h.paired_ratio(c["_net_rounds"], is_set)])
        cc = h.paired_ratio(checks[CANCEL_CALLED]["_net_rounds"], is_set)
        speedup = h.paired_ratio(anyio_check, checks[CHECK]["_net_rounds"])
        ratios[f"3. {backend}: token.cancel_called / Event.is_set()"] = cc
        ratios[f"3. {backend}: anyio check_cancelled() / token.check()"] = speedup
        target(f"3. token.cancel_called cost, {backend}", "<= 0.5x Event.is_set()",
               f"{cc:.2f}x", cc <= 0.5)
        target(f"3. token.check() speed, {backend}", ">= 3x faster than anyio's check",
               f"{speedup:.1f}x faster", speedup >= 3.0)
        for c in checks.values():
            del c["_net_rounds"]
        figures.setdefault("checks_ns", {})[backend] = checks
    tables.append({
        "title": f"3. cost of one cancellation check in a worker thread (ns per read, median "
                 f"of {cfg.check_rounds} rounds)",
        "columns": ["backend", "read", "net ns", "raw ns", "/ is_set"],
        "rows": rows,
        "notes": ["net = raw minus the same empty loop timed just before; '/ is_set' is "
                  "on net figures, median of per-round ratios"],
    })

    # 4. flood
    rows = []
    for backend, res in by_backend.items():
        for name, f in res["flood"].items():
            rows.append([backend, name, f["exit_s"], f["exit_s_max"], f["queued_started_max"],
                         f["rounds"]])
        ours = next(v for k, v in res["flood"].items() if k.startswith(BC))
        anchor = next(v for k, v in res["flood"].items() if k.startswith(ANYIO))
        ratios[f"4. 10,000 queued, {backend}: bridgecancel / anyio (time to exit)"] = (
            ours["exit_s"] / anchor["exit_s"]
        )
        target(f"4. 10,000 queued jobs cancelled, {backend}", "<= 0.5 s, 0 started",
               f"{ours['exit_s']:.3f} s, {ours['queued_started_max']} started",
               ours["exit_s"] <= 0.5 and ours["queued_started_max"] == 0)
    figures["flood"] = {b: res["flood"] for b, res in by_backend.items()}
    tables.append({
        "title": f"4. {cfg.flood_jobs:,} jobs behind a limiter of {cfg.flood_limit}, one "
                 "scope.cancel(): seconds until the scope exits",
        "columns": ["backend", "contender", "median s", "max s", "queued started", "rounds"],
        "rows": rows,
        "notes": ["anyio's running jobs cannot see a token: they poll "
                  "from_thread.check_cancelled() every 10 ms",
                  "'queued started' is the most, over the rounds, of queued jobs that "
                  "started after the cancel"],
    })
    return {"area": AREA, "figures": figures, "tables": tables, "ratios": ratios,
            "targets": targets}


def report(results: dict[str, Any]) -> None:
    """Print the tables, the ratios and a met / NOT met line per target."""
    h.print_results(results)


def main(argv: list[str] | None = None) -> int:
    return h.standalone_main(AREA, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
