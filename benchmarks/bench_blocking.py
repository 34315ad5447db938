"""Token-aware blocking waits (bridgecancel.blocking) beside the polling patterns they replace.

    python benchmarks/bench_blocking.py [--quick]

1. Wake-up latency, from ``source.cancel()`` to the waiting thread raising `Cancelled`,
   for a worker blocked in ``wait_event``, ``queue_get``, ``recv`` (TCP over loopback)
   and ``wait_process`` (a sleeping child, which is terminated and reaped before the
   waiter raises; the OS's own time to do that, without a waiter, is shown for
   reference). Beside them, the seed's pattern (``queue.get(timeout=0.5)`` in a loop
   that checks a flag) and a 10 ms polling loop (``queue.get(timeout=0.01)``, same
   loop), each cancelled at a random point of its period. Target: p50 <= 0.2 ms and
   p99 <= 1 ms for each bridgecancel wait.
2. CPU used by 100 threads waiting 5 s (process CPU time over the window, all threads
   seen blocked first): ``wait_event`` and ``queue_get`` beside the same two polling
   patterns, and the process with no waiting threads as the noise floor. Target:
   bridgecancel's waits within 20 ms of the noise floor.

Contenders take turns in rounds (A B, then B A, ...); latency percentiles are over the
pooled samples, CPU figures are medians of per-round figures. Results are printed and
written to ``benchmarks/results/blocking.json``.
"""

from __future__ import annotations

import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bridgecancel
from bridgecancel import CancelSource, CancelToken, blocking

if __name__ == "__main__":  # run as a script: make the sibling _harness importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

AREA = "blocking"
SEED_PERIOD = 0.5  # the seed's advice: queue.get(timeout=0.5), then look at a flag
POLL_PERIOD = 0.01  # a tighter polling loop
SEED = f"seed pattern (queue.get(timeout={SEED_PERIOD}) + flag)"
POLL = f"{POLL_PERIOD * 1000:.0f} ms polling loop (queue.get(timeout={POLL_PERIOD}) + flag)"
TARGET_P50_MS = 0.2
TARGET_P99_MS = 1.0
CPU_NOISE_MARGIN_S = 0.02


@dataclass(frozen=True)
class Config:
    latency_rounds: int
    fast_samples: int  # per contender per round, for the event-driven waits
    poll_samples: int  # per round, for the 10 ms loop
    seed_samples: int  # per round, for the 0.5 s loop
    cpu_rounds: int
    cpu_threads: int
    cpu_window_s: float


QUICK = Config(3, 20, 10, 3, 1, 100, 5.0)
FULL = Config(8, 50, 25, 5, 3, 100, 5.0)


# -- latency ----------------------------------------------------------------------------


class Waiter:
    """One waiting thread: `ready` is set just before the wait; `raised_at` when it ends."""

    def __init__(self, wait: Callable[[CancelToken], object], token: CancelToken) -> None:
        self.raised_at = 0.0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(wait, token), daemon=True)
        self.thread.start()

    def _run(self, wait: Callable[[CancelToken], object], token: CancelToken) -> None:
        self.ready.set()
        try:
            wait(token)
        except bridgecancel.Cancelled:
            self.raised_at = time.perf_counter()
        except BaseException as exc:  # reported by the caller
            self.error = exc


class Case:
    """A contender: sets up what the waiter blocks on, and tears it down."""

    name: str
    period = 0.0  # a polling pattern's period: the cancel lands at a random point of it

    def setup(self) -> None: ...

    def wait(self, token: CancelToken) -> object:
        raise NotImplementedError

    def teardown(self) -> None: ...


class EventCase(Case):
    name = "blocking.wait_event"

    def setup(self) -> None:
        self.event = threading.Event()

    def wait(self, token: CancelToken) -> object:
        return blocking.wait_event(self.event, token=token)


class QueueCase(Case):
    name = "blocking.queue_get"

    def setup(self) -> None:
        self.q: queue.Queue[object] = queue.Queue()

    def wait(self, token: CancelToken) -> object:
        return blocking.queue_get(self.q, token=token)


class SocketCase(Case):
    name = "blocking.recv (TCP loopback)"

    def setup(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname())
            self.server, _ = listener.accept()

    def wait(self, token: CancelToken) -> object:
        return blocking.recv(self.client, 4096, token=token)

    def teardown(self) -> None:
        self.client.close()
        self.server.close()


class ProcessCase(Case):
    name = "blocking.wait_process (child stopped)"

    def setup(self) -> None:
        self.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)

    def wait(self, token: CancelToken) -> object:
        return blocking.wait_process(self.proc, token=token)

    def teardown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class ProcessFloorCase(Case):
    """Not a waiter: the OS's own time to stop and reap the same child, for reference."""

    name = "(reference) os.killpg(SIGTERM) + waitpid, no waiter"

    def measure(self) -> float:
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        time.sleep(0.003)
        started = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return time.perf_counter() - started


class PollingCase(Case):
    """The pattern bridgecancel replaces: wake every `period`, look at a flag."""

    def __init__(self, name: str, period: float) -> None:
        self.name = name
        self.period = period

    def setup(self) -> None:
        self.q: queue.Queue[object] = queue.Queue()

    def wait(self, token: CancelToken) -> object:
        while True:
            try:
                return self.q.get(timeout=self.period)
            except queue.Empty:
                token.check()


def _sample(case: Case, rng: random.Random) -> float:
    if isinstance(case, ProcessFloorCase):
        return case.measure()
    case.setup()
    try:
        source = CancelSource()
        waiter = Waiter(case.wait, source.token)
        waiter.ready.wait()
        # Long enough for the thread to be blocked; for a polling loop, a random point
        # of its period.
        time.sleep(0.003 + rng.uniform(0, case.period))
        cancelled_at = time.perf_counter()
        source.cancel()
        waiter.thread.join(10)
        if waiter.error is not None or waiter.thread.is_alive() or not waiter.raised_at:
            raise RuntimeError(
                f"{case.name}: the waiter did not raise Cancelled ({waiter.error!r})"
            )
        return waiter.raised_at - cancelled_at
    finally:
        case.teardown()


def bench_latency(cfg: Config) -> dict[str, Any]:
    cases: list[tuple[Case, int]] = [
        (EventCase(), cfg.fast_samples),
        (QueueCase(), cfg.fast_samples),
        (SocketCase(), cfg.fast_samples),
        (ProcessCase(), cfg.fast_samples),
        (ProcessFloorCase(), cfg.fast_samples),
        (PollingCase(POLL, POLL_PERIOD), cfg.poll_samples),
        (PollingCase(SEED, SEED_PERIOD), cfg.seed_samples),
    ]
    rng = random.Random(1)
    samples: dict[str, list[float]] = {case.name: [] for case, _ in cases}
    rounds: dict[str, list[list[float]]] = {case.name: [] for case, _ in cases}
    by_name = {case.name: (case, n) for case, n in cases}
    for r in range(cfg.latency_rounds):
        for name in h.round_order(list(by_name), r):
            case, n = by_name[name]
            got = [_sample(case, rng) for _ in range(n)]
            samples[name] += got
            rounds[name].append(got)
    return {name: h.latency_summary(samples[name], rounds[name]) for name in samples}


# -- CPU while waiting --------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_round(name: str, cfg: Config) -> float:
    """Process CPU seconds over the window, with `cfg.cpu_threads` threads waiting."""
    source = CancelSource()
    token = source.token
    threads: list[threading.Thread] = []
    ready = threading.Semaphore(0)
    events = [threading.Event() for _ in range(cfg.cpu_threads)]
    queues: list[queue.Queue[object]] = [queue.Queue() for _ in range(cfg.cpu_threads)]

    def waiter(i: int) -> None:
        ready.release()
        try:
            if name == EventCase.name:
                blocking.wait_event(events[i], token=token)
            elif name == QueueCase.name:
                blocking.queue_get(queues[i], token=token)
            else:
                period = SEED_PERIOD if name == SEED else POLL_PERIOD
                while True:
                    try:
                        queues[i].get(timeout=period)
                    except queue.Empty:
                        token.check()
        except bridgecancel.Cancelled:
            pass

    if name != "no waiting threads (noise floor)":
        for i in range(cfg.cpu_threads):
            thread = threading.Thread(target=waiter, args=(i,), daemon=True)
            thread.start()
            threads.append(thread)
        for _ in threads:
            ready.acquire()
        time.sleep(0.2)  # every thread in its wait
    before = _cpu_seconds()
    time.sleep(cfg.cpu_window_s)
    used = _cpu_seconds() - before
    source.cancel()
    for thread in threads:
        thread.join(10)
    return used


def bench_cpu(cfg: Config) -> dict[str, Any]:
    names = ["no waiting threads (noise floor)", EventCase.name, QueueCase.name, POLL, SEED]
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(cfg.cpu_rounds):
        for name in h.round_order(names, r):
            per_round[name].append(_cpu_round(name, cfg))
    return {
        name: {"cpu_s": h.median(values), "rounds": values} for name, values in per_round.items()
    }


# -- the run --------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    """Measure wake-up latency and CPU while waiting; return tables, ratios and targets."""
    cfg = QUICK if quick else FULL
    started = time.perf_counter()
    latency = bench_latency(cfg)
    cpu = bench_cpu(cfg)
    results = _summarise(cfg, latency, cpu)
    results["quick"] = quick
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    return results


def _summarise(cfg: Config, latency: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    seed, poll = latency[SEED], latency[POLL]
    ours = [EventCase.name, QueueCase.name, SocketCase.name, ProcessCase.name]
    rows = []
    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []
    for name, figures in latency.items():
        rows.append(
            [
                name,
                figures["p50_ms"],
                figures["p99_ms"],
                figures["max_ms"],
                figures["n"],
                figures["p50_ms"] / seed["p50_ms"],
                figures["p50_ms"] / poll["p50_ms"],
            ]
        )
    for name in ours:
        figures = latency[name]
        ratios[f"wake-up p50, {name} / seed pattern"] = figures["p50_ms"] / seed["p50_ms"]
        ratios[f"wake-up p50, {name} / 10 ms poll"] = figures["p50_ms"] / poll["p50_ms"]
        targets.append(
            {
                "name": f"{name}: wake-up p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms",
                "target": f"p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms",
                "measured": f"p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms",
                "met": figures["p50_ms"] <= TARGET_P50_MS and figures["p99_ms"] <= TARGET_P99_MS,
            }
        )
    floor = cpu["no waiting threads (noise floor)"]["cpu_s"]
    cpu_rows = [[name, figures["cpu_s"], figures["cpu_s"] - floor] for name, figures in cpu.items()]
    waiting = f"{cfg.cpu_threads} threads waiting {cfg.cpu_window_s:.0f} s"
    for name in (EventCase.name, QueueCase.name):
        used = cpu[name]["cpu_s"] - floor
        targets.append(
            {
                "name": f"{name}: CPU of {waiting} within noise of zero",
                "target": f"<= {CPU_NOISE_MARGIN_S} s above the noise floor",
                "measured": f"{used:+.4f} s",
                "met": used <= CPU_NOISE_MARGIN_S,
            }
        )
    return {
        "tables": [
            {
                "title": "wake-up latency: cancel() to the waiting thread raising Cancelled",
                "columns": [
                    "waiter",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "n",
                    "p50 / seed",
                    "p50 / 10 ms poll",
                ],
                "rows": rows,
                "notes": [
                    "polling loops are cancelled at a random point of their period",
                    "wait_process includes SIGTERM to the child's group, its exit and reaping;"
                    " the reference row is the OS's time for that alone",
                ],
            },
            {
                "title": f"CPU used by {cfg.cpu_threads} threads waiting {cfg.cpu_window_s:.0f} s",
                "columns": ["waiters", "CPU s", "above noise floor s"],
                "rows": cpu_rows,
                "notes": ["process CPU time over the window; median of rounds"],
            },
        ],
        "ratios": ratios,
        "targets": targets,
        "latency": latency,
        "cpu": cpu,
    }


def report(results: dict[str, Any]) -> None:
    """Print the tables, the ratios and a met / NOT met line per target."""
    h.print_results(results)


def main(argv: list[str] | None = None) -> int:
    return h.standalone_main(AREA, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
