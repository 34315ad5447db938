"""Run the benchmark suite: bridgecancel and its anchors, measured in the same run.

    python benchmarks/run.py [--full] [--curate] [--note TEXT] [--check]
                             [threads|processes|blocking ...]
    python benchmarks/run.py --show benchmarks/results/curated-threads.json

Runs the chosen areas (default: every ``bench_<area>.py`` present in this folder), in the
quick mode (about a minute per area) unless ``--full`` is given, prints
each area's tables, ratios and a met / NOT met / not measured (why) line per target, and writes
``benchmarks/results/<area>.json`` with the machine's details (git-ignored). ``--curate``
also writes ``results/curated-<area>.json``, the small file the docs show: run it on a
quiet machine in full mode. Needs only the project and its ``bench`` dependency group
(trio, trio-parallel).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
AREAS = ("threads", "processes", "blocking", "token", "executor", "web", "dask", "celery")


def _make_importable() -> None:
    """Let ``bench_<area>`` and ``_harness`` import by name, here and in worker processes.

    Worker processes unpickle the benchmark functions by module name, so they need the
    folder on their path too; PYTHONPATH is what they inherit.
    """
    folder = str(BENCH_DIR)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *paths])


def _load(area: str) -> ModuleType:
    module = importlib.import_module(f"bench_{area}")
    where = Path(getattr(module, "__file__", "") or "").resolve()
    if where != BENCH_DIR / f"bench_{area}.py":
        raise ImportError(f"bench_{area} was imported from {where}, not from {BENCH_DIR}")
    if not callable(getattr(module, "run", None)):
        raise ImportError(f"{where} has no run(quick: bool) -> dict")
    return module


def _report(module: ModuleType, results: dict[str, Any]) -> None:
    import _harness as h

    # An area prints itself if it knows how (report(), or the _print() of a script that
    # predates this runner); otherwise the shared printer reads tables/ratios/targets.
    printer = getattr(module, "report", None) or getattr(module, "_print", None)
    if callable(printer) and "tables" not in results:
        printer(results)
    else:
        h.print_results(results)


def _show(path: Path) -> int:
    import _harness as h

    results = json.loads(path.read_text(encoding="utf-8"))
    machine = results.get("machine", {})
    print(f"{path}: {results.get('area')} ({'quick' if results.get('quick') else 'full'}), "
          f"{machine.get('date')}, {machine.get('cpu_count')} CPUs, load "
          f"{machine.get('loadavg_1_5_15')} -> {machine.get('loadavg_after')}")
    if results.get("note"):
        print(f"note: {results['note']}")
    h.print_results(results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("areas", nargs="*", metavar="area",
                        help=f"any of {', '.join(AREAS)} (default: all present)")
    parser.add_argument("--full", action="store_true",
                        help="more samples, for published figures: several minutes per area")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples, about a minute per area (the default)")
    parser.add_argument("--curate", action="store_true",
                        help="also write results/curated-<area>.json (for the docs)")
    parser.add_argument("--note", default=None,
                        help="a remark stored with the results (e.g. how busy the machine was)")
    parser.add_argument("--show", metavar="FILE", default=None,
                        help="print a saved result file (e.g. a curated one) and exit")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if any target is not met")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("choose one of --full and --quick")
    args.quick = not args.full

    _make_importable()
    import _harness as h

    # The benchmarks cancel and kill jobs on purpose, and bridgecancel logs each forced
    # end as a WARNING; without a handler, logging would print them all. A null handler
    # keeps the logging work in the measured path but out of the report.
    logging.getLogger("bridgecancel").addHandler(logging.NullHandler())

    if args.show:
        return _show(Path(args.show))

    present = [a for a in AREAS if (BENCH_DIR / f"bench_{a}.py").exists()]
    areas = list(dict.fromkeys(args.areas)) or present
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown area {unknown[0]!r}: choose from {', '.join(AREAS)}")
    missing = [a for a in areas if a not in present]
    if missing:
        parser.error(f"no benchmarks/bench_{missing[0]}.py here (present: {present})")

    mode = "quick" if args.quick else "full"
    machine = h.machine_info()
    print(f"bridgecancel benchmarks ({mode}): {', '.join(areas)}")
    print(f"  {machine['cpu_count']} CPUs ({machine.get('cpu_model')}), load "
          f"{machine.get('loadavg_1_5_15')}, Python {machine['python']}, "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v))

    summary: list[tuple[str, str, bool | None, str]] = []
    failed: list[str] = []
    for area in areas:
        print(f"\n{'=' * 30} {area} ({mode}) {'=' * 30}")
        before = h.machine_info()
        started = time.perf_counter()
        try:
            module = _load(area)
            results = dict(module.run(args.quick))
        except Exception:
            traceback.print_exc()
            failed.append(area)
            continue
        elapsed = time.perf_counter() - started
        results["area"] = area
        results["quick"] = args.quick
        results["elapsed_s"] = round(elapsed, 1)
        # The area's own machine details win; ours fill in what it left out. The load
        # after the run says how busy the machine was while it ran.
        after = h.machine_info()
        results["machine"] = {
            **before,
            **(results.get("machine") or {}),
            "loadavg_after": after.get("loadavg_1_5_15"),
        }
        if args.note:
            results["note"] = args.note
        _report(module, results)
        path = h.write_results(area, results)
        print(f"\n{area}: {elapsed:.0f} s, load average before {before.get('loadavg_1_5_15')}, "
              f"after {after.get('loadavg_1_5_15')} ({machine['cpu_count']} CPUs); "
              f"written to {path.relative_to(BENCH_DIR.parent)}")
        if args.curate:
            curated = h.write_results(area, results, name=f"curated-{area}")
            print(f"{area}: curated copy in {curated.relative_to(BENCH_DIR.parent)}")
        summary += [(area, *line) for line in h.target_lines(results.get("targets"))]

    print(f"\n{'=' * 30} targets {'=' * 30}")
    for area, name, met, detail in summary:
        print(h.format_target(f"{area}: {name}", met, detail))
    for area in failed:
        print(f"  FAILED   {area}: the benchmark raised (traceback above)")
    not_met = sum(met is False for _, _, met, _ in summary)
    unmeasured = sum(met is None for _, _, met, _ in summary)
    measured = len(summary) - unmeasured
    print(f"  {measured - not_met} of {measured} targets met"
          + (f"; {unmeasured} not measured" if unmeasured else "")
          + (f"; {len(failed)} area(s) failed" if failed else ""))
    if failed:
        return 2
    return 1 if args.check and not_met else 0


if __name__ == "__main__":
    sys.exit(main())
