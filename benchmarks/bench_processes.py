"""run_process against trio-parallel and anyio.to_process, measured in the same run.

    python benchmarks/bench_processes.py [--quick]

1. A no-op call, per call (median), warm pools. Target: <= 1.0x the best anchor.
2. Cooperative cancel: a worker blocked in ``current_token().wait()``; seconds from
   ``scope.cancel()`` to the caller being free (p50, p99), then the time of the next
   call (warm: no respawn). Target: p50 <= 2 ms. The anchors can only kill on cancel
   (trio-parallel ``kill_on_cancel=True``, anyio ``cancellable=True``), so their next
   call pays for a new worker.
3. Forced path: a worker that ignores its token and swallows the interrupt; cancel to
   caller free, minus the configured escalation times. Target: <= 5 ms.
4. Cold start: the first call in a fresh interpreter (the library already imported).
5. Cancel before the job began: seconds from ``scope.cancel()`` to the caller being
   free (p50, p99) for a call cancelled 5 ms in, (a) on a cold start, in a fresh
   interpreter, while the worker is still starting, and (b) on a warm worker still
   importing the job's module (an import that takes 200 ms). Target: p50 <= 5 ms. The
   anchors, in the modes that stop on cancel, kill their worker.

Everything runs under trio (trio-parallel needs it); the no-op case is repeated on
asyncio for bridgecancel and anyio. Results go to ``benchmarks/results/processes.json``.
Worker-side functions live at the top of this module and import only the standard
library, so no library pays for heavy imports in its workers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

if __name__ == "__main__":  # run as a script: make the sibling _harness importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # standard library only, like the rest of the worker side

RESULTS = Path(__file__).parent / "results" / "processes.json"

# -- worker side (standard library only at import time) --------------------------------


def mark(path: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)


def wait_on_token(path: str) -> None:
    import bridgecancel

    token = bridgecancel.current_token()
    mark(path)
    token.wait()
    token.check()


def sleep_long(path: str) -> None:
    mark(path)
    time.sleep(3600)


def ignore_everything(path: str) -> None:
    mark(path)
    while True:
        try:
            while True:
                time.sleep(0.01)
        except BaseException:
            pass


def noop_with(_loaded: object) -> None:
    """A job whose argument takes its time to load: see `SlowImport`."""


class SlowImport:
    """An argument that imports a module when the worker loads it, as a job's own module
    would be imported: the modules of `_slow_modules` take `SLOW_IMPORT` seconds."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (importlib.import_module, (self.module,))


SLOW_IMPORT = 0.2  # seconds a slow module takes to import
CANCEL_AFTER = 0.005  # seconds from the call to the cancel, before the job can begin


# -- measuring -------------------------------------------------------------------------

Call = Callable[..., Awaitable[Any]]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _pct(samples, 50) * 1e3,
        "p99_ms": _pct(samples, 99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
        "n": len(samples),
    }


def _callers(backend: str) -> dict[str, tuple[Call, Call]]:
    """Per library: (plain call, call that stops its worker on cancel)."""
    import anyio.to_process

    from bridgecancel import run_process

    callers: dict[str, tuple[Call, Call]] = {
        "bridgecancel": (run_process, run_process),
        "anyio.to_process": (
            anyio.to_process.run_sync,
            lambda f, *a: anyio.to_process.run_sync(f, *a, cancellable=True),
        ),
    }
    trio_parallel = None
    if backend == "trio":
        trio_parallel = h.optional_anchor(
            "trio_parallel", 'pip install --group bench, or pip install trio-parallel'
        )
    if trio_parallel is not None:
        callers["trio_parallel"] = (
            trio_parallel.run_sync,
            lambda f, *a: trio_parallel.run_sync(f, *a, kill_on_cancel=True),
        )
    return callers


async def _noop(callers: dict[str, Call], n: int, rounds: int = 10) -> dict[str, list[float]]:
    """Per-call times; the libraries take turns, so a shared machine's load hits all alike."""
    for call in callers.values():
        for _ in range(20):  # warm up: start and reuse the workers
            await call(int)
    samples: dict[str, list[float]] = {name: [] for name in callers}
    for _ in range(rounds):
        for name, call in callers.items():
            for _ in range(n // rounds):
                start = time.perf_counter()
                await call(int)
                samples[name].append(time.perf_counter() - start)
    return samples


async def _cancel_then_next(
    call: Call, func: Callable[[str], None], n: int, tmp: str, minus: float = 0.0
) -> tuple[list[float], list[float]]:
    """Cancel `func` once it runs; time cancel -> caller free, then the next call."""
    import anyio

    await call(int)
    freed: list[float] = []
    nexts: list[float] = []
    for i in range(n):
        marker = os.path.join(tmp, f"{func.__name__}-{id(call)}-{i}")
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(cast(Any, call), func, marker)
                with anyio.fail_after(60):
                    while not os.path.exists(marker):
                        await anyio.sleep(0.001)
                await anyio.sleep(0.002)  # let it settle into its wait
                start = time.perf_counter()
                scope.cancel()
        freed.append(time.perf_counter() - start - minus)
        start = time.perf_counter()
        await call(int)
        nexts.append(time.perf_counter() - start)
    return freed, nexts


async def _bench_trio(quick: bool) -> dict[str, Any]:
    from bridgecancel import run_process

    module = _worker_module()
    n_noop, n_cancel, n_forced = (1000, 30, 10) if quick else (3000, 200, 30)
    out: dict[str, Any] = {"noop": {}, "cooperative_cancel": {}, "forced": {}}
    callers = _callers("trio")
    noop = await _noop({name: plain for name, (plain, _) in callers.items()}, n_noop)
    out["noop"] = {name: _summary(samples) for name, samples in noop.items()}
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as tmp:
        for name, (_, cancellable) in callers.items():
            func = module.wait_on_token if name == "bridgecancel" else module.sleep_long
            freed, nexts = await _cancel_then_next(cancellable, func, n_cancel, tmp)
            out["cooperative_cancel"][name] = {
                "cancel_to_free": _summary(freed),
                "next_call": _summary(nexts),
            }
        for label, interrupt_after, kill_after in (
            ("kill_after=0.05", None, 0.05),
            ("interrupt_after=0.02, kill_after=0.05", 0.02, 0.05),
        ):

            def forced(f: Any, *a: Any, i: Any = interrupt_after, k: Any = kill_after) -> Any:
                return run_process(f, *a, interrupt_after=i, kill_after=k)

            minus = kill_after + (interrupt_after or 0.0)
            freed, nexts = await _cancel_then_next(
                forced, module.ignore_everything, n_forced, tmp, minus=minus
            )
            out["forced"][label] = {
                "overhead_beyond_escalation": _summary(freed),
                "next_call_respawn": _summary(nexts),
            }
    out["cancel_while_importing"] = await _cancel_while_importing(
        {name: stops for name, (_, stops) in callers.items()}, 15 if quick else 60
    )
    return out


async def _cancel_early(call: Call, *args: Any) -> float:
    """Call, cancel `CANCEL_AFTER` seconds in; seconds from the cancel to the caller free."""
    import anyio

    cancelled: list[float] = []

    async def cancel_soon(scope: anyio.CancelScope) -> None:
        await anyio.sleep(CANCEL_AFTER)
        cancelled.append(time.perf_counter())
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_soon, scope)
            await call(*args)
    if not cancelled:
        raise RuntimeError("the call ended before it could be cancelled")
    return time.perf_counter() - cancelled[0]


async def _cancel_while_importing(callers: dict[str, Call], n: int) -> dict[str, Any]:
    """Cancel a call while a warm worker imports the job's (slow) module."""
    module = _worker_module()
    samples: dict[str, list[float]] = {name: [] for name in callers}
    for i in range(n):
        for name in h.round_order(list(callers), i):
            call = callers[name]
            await call(int)  # a warm worker: the cancel lands in the import, not a start
            slow = module.SlowImport(_slow_module(f"{name.replace('.', '_')}_{i}"))
            samples[name].append(await _cancel_early(call, module.noop_with, slow))
    return {name: _summary(s) for name, s in samples.items()}


_slow_dir: list[str] = []  # the folder of the slow modules, once made (in the parent)


def _slow_module(suffix: str) -> str:
    """A new module, on every worker's path, whose import takes `SLOW_IMPORT` seconds."""
    name = f"bench_slow_import_{suffix}"
    Path(_slow_dir[0], f"{name}.py").write_text(f"import time\ntime.sleep({SLOW_IMPORT})\n")
    return name


def _put_slow_modules_on_path() -> None:
    """Before any worker starts: workers copy the path (or the environment) at start."""
    if not _slow_dir:
        _slow_dir.append(tempfile.mkdtemp(prefix="bench-slow-import-"))
        sys.path.append(_slow_dir[0])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, _slow_dir[0]])


async def _bench_asyncio(quick: bool) -> dict[str, Any]:
    callers = {name: plain for name, (plain, _) in _callers("asyncio").items()}
    noop = await _noop(callers, 1000 if quick else 3000)
    return {name: _summary(samples) for name, samples in noop.items()}


COLD_SCRIPT = """
import os, sys, time
lib = sys.argv[1]
import trio
if lib == "bridgecancel":
    from bridgecancel import run_process as call
elif lib == "trio_parallel":
    from trio_parallel import run_sync as call
else:
    from anyio.to_process import run_sync as call
import anyio

async def main():
    start = time.perf_counter()
    await call(os.getpid)
    first = time.perf_counter() - start
    start = time.perf_counter()
    await call(os.getpid)
    print(first, time.perf_counter() - start)

anyio.run(main, backend="trio")
"""


CANCEL_COLD_SCRIPT = """
import sys, time
lib, cancel_after = sys.argv[1], float(sys.argv[2])
import anyio, trio
if lib == "bridgecancel":
    from bridgecancel import run_process as call
elif lib == "trio_parallel":
    import trio_parallel
    def call(f, *a):
        return trio_parallel.run_sync(f, *a, kill_on_cancel=True)
else:
    import anyio.to_process
    def call(f, *a):
        return anyio.to_process.run_sync(f, *a, cancellable=True)

async def main():
    cancelled = []

    async def cancel_soon(scope):
        await anyio.sleep(cancel_after)
        cancelled.append(time.perf_counter())
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_soon, scope)
            await call(time.sleep, 1.0)
    print(time.perf_counter() - cancelled[0])

anyio.run(main, backend="trio")
"""


def _cancel_cold(quick: bool) -> dict[str, Any]:
    """A first call in a fresh interpreter, cancelled while its worker starts."""
    names = ["bridgecancel", "trio_parallel", "anyio.to_process"]
    if h.optional_anchor("trio_parallel", "pip install trio-parallel") is None:
        names.remove("trio_parallel")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(8 if quick else 30):
        for name in h.round_order(names, i):
            result = subprocess.run(
                [sys.executable, "-c", CANCEL_COLD_SCRIPT, name, str(CANCEL_AFTER)],
                capture_output=True, text=True, check=True, timeout=120,
            )
            samples[name].append(float(result.stdout.split()[0]))
    return {name: _summary(s) for name, s in samples.items()}


def _cold_start(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pycache-") as pycache:
        # Cached bytecode for every library alike (installed packages have theirs; a
        # source checkout under PYTHONDONTWRITEBYTECODE would not), outside the tree.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        names = ["bridgecancel", "trio_parallel", "anyio.to_process"]
        if h.optional_anchor("trio_parallel", "pip install trio-parallel") is None:
            names.remove("trio_parallel")
        for name in names:
            firsts = []
            for i in range(1 + (5 if quick else 15)):
                result = subprocess.run(
                    [sys.executable, "-c", COLD_SCRIPT, name],
                    capture_output=True, text=True, check=True, timeout=120, env=env,
                )
                if i:  # the first run fills the bytecode cache
                    firsts.append(float(result.stdout.split()[0]))
            out[name] = _summary(firsts)
    return out


def _worker_module() -> Any:
    """This module under an importable name, so workers can find its functions."""
    if __name__ != "__main__":
        return sys.modules[__name__]
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_processes

    return bench_processes


def run(quick: bool) -> dict[str, Any]:
    """Run every benchmark; return (and save) the figures and ratios to the anchors."""
    import anyio

    _put_slow_modules_on_path()
    trio_results = anyio.run(_bench_trio, quick, backend="trio")
    asyncio_results = anyio.run(_bench_asyncio, quick, backend="asyncio")
    cold = _cold_start(quick)
    cancel_cold = _cancel_cold(quick)
    cancel_importing = trio_results["cancel_while_importing"]

    noop = trio_results["noop"]
    best_anchor = min(v["p50_ms"] for k, v in noop.items() if k != "bridgecancel")
    coop = trio_results["cooperative_cancel"]
    ours = coop["bridgecancel"]
    forced = trio_results["forced"].values()
    forced_p50 = max(v["overhead_beyond_escalation"]["p50_ms"] for v in forced)
    cold_best_anchor = min(v["p50_ms"] for k, v in cold.items() if k != "bridgecancel")
    results: dict[str, Any] = {
        "quick": quick,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "noop_trio": noop,
        "noop_asyncio": asyncio_results,
        "cooperative_cancel_trio": coop,
        "forced_trio": trio_results["forced"],
        "cold_start_trio": cold,
        "cancel_before_start_trio": {
            "cold_start": cancel_cold,
            "while_importing": cancel_importing,
        },
        "ratios": {
            "noop_vs_best_anchor": noop["bridgecancel"]["p50_ms"] / best_anchor,
            "cancel_to_free_vs_best_anchor": ours["cancel_to_free"]["p50_ms"]
            / min(v["cancel_to_free"]["p50_ms"] for k, v in coop.items() if k != "bridgecancel"),
            "next_call_vs_best_anchor": ours["next_call"]["p50_ms"]
            / min(v["next_call"]["p50_ms"] for k, v in coop.items() if k != "bridgecancel"),
            "cold_start_vs_best_anchor": cold["bridgecancel"]["p50_ms"] / cold_best_anchor,
        },
    }
    noop_ratio = results["ratios"]["noop_vs_best_anchor"]
    cancel_p50 = ours["cancel_to_free"]["p50_ms"]
    next_call, noop_p50 = ours["next_call"]["p50_ms"], noop["bridgecancel"]["p50_ms"]
    cold_free = cancel_cold["bridgecancel"]["p50_ms"]
    import_free = cancel_importing["bridgecancel"]["p50_ms"]
    results["targets"] = [
        {"name": "noop <= 1.0x best anchor", "target": "<= 1.0x",
         "measured": f"{noop_ratio:.2f}x", "met": noop_ratio <= 1.0},
        {"name": "cooperative cancel p50 <= 2 ms", "target": "<= 2 ms",
         "measured": f"{cancel_p50:.3f} ms", "met": cancel_p50 <= 2.0},
        {"name": "next call after cancel is warm (<= 2x noop p50)",
         "target": f"<= {2 * noop_p50:.3f} ms",
         "measured": f"{next_call:.3f} ms", "met": next_call <= 2 * noop_p50},
        {"name": "forced path <= kill_after + 5 ms (p50)", "target": "<= 5 ms beyond",
         "measured": f"{forced_p50:.2f} ms beyond", "met": forced_p50 <= 5.0},
        {"name": "cancel during a cold start: caller free <= 5 ms (p50)", "target": "<= 5 ms",
         "measured": f"{cold_free:.2f} ms", "met": cold_free <= 5.0},
        {"name": "cancel during a slow import: caller free <= 5 ms (p50)", "target": "<= 5 ms",
         "measured": f"{import_free:.2f} ms", "met": import_free <= 5.0},
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict[str, Any]) -> None:
    def table(title: str, rows: dict[str, dict[str, float]]) -> None:
        print(f"\n{title}")
        for name, s in rows.items():
            print(f"  {name:<42} p50 {s['p50_ms']:9.3f} ms   p99 {s['p99_ms']:9.3f} ms")

    table("no-op call (trio)", results["noop_trio"])
    table("no-op call (asyncio)", results["noop_asyncio"])
    coop = results["cooperative_cancel_trio"]
    table("cancel -> caller free (trio)", {k: v["cancel_to_free"] for k, v in coop.items()})
    table("next call after the cancel (trio)", {k: v["next_call"] for k, v in coop.items()})
    forced = results["forced_trio"]
    table(
        "forced path: cancel -> free, beyond the escalation times (bridgecancel, trio)",
        {k: v["overhead_beyond_escalation"] for k, v in forced.items()},
    )
    table("cold start: first call in a fresh interpreter (trio)", results["cold_start_trio"])
    early = results["cancel_before_start_trio"]
    table(
        "cancelled 5 ms in, on a cold start: cancel -> caller free (trio)", early["cold_start"]
    )
    table(
        "cancelled 5 ms in, while the worker imports the job's module: cancel -> caller free",
        early["while_importing"],
    )
    print("\nratios (bridgecancel / best anchor, p50):")
    for name, ratio in results["ratios"].items():
        print(f"  {name:<42} {ratio:6.2f}x")
    print("\ntargets:")
    for line in h.target_lines(results["targets"]):
        print(h.format_target(*line))
    print(f"\nwritten to {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under a minute)")
    args = parser.parse_args(argv)
    _print(run(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
