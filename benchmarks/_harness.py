"""Shared pieces of the benchmark suite: rounds, statistics, machine info, printing, files.

Every benchmark measures bridgecancel and its anchors in the same run, taking turns in
rounds (A B, then B A, ...) so that load from other processes on a shared machine hits
all contenders alike; per-round figures are then summarised by their median.

A result dict that ``print_results`` understands has, besides any raw figures:

* ``tables``: a list of ``{"title", "columns", "rows", "notes"}``;
* ``ratios``: ``{"bridgecancel / anyio (noop, asyncio)": 1.04, ...}``;
* ``targets``: a list of ``{"name", "target", "measured", "met"}``; a target this run
  could not measure has ``"measured": None`` and ``"why"`` (printed "not measured (why)").

Standard library only, so that ``run.py`` can use it before anything else is imported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
VERSIONED = ("bridgecancel", "anyio", "trio", "trio-parallel", "sniffio", "outcome")


# -- anchors that may be missing ------------------------------------------------------

_SKIPPED: set[str] = set()


def optional_anchor(module: str, install: str) -> Any:
    """Import an anchor library, or say (once) how to install it and return None."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if module not in _SKIPPED:
            _SKIPPED.add(module)
            print(f"skipping the {module} anchor: it is not installed ({install})")
        return None


# -- rounds and statistics ------------------------------------------------------------


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The contenders' order in a round: forward in even rounds, reversed in odd ones.

    Alternating cancels out any cost of going first or last (a warm cache, the tail of
    the previous contender's garbage).
    """
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`th percentile (nearest rank) of `samples`."""
    ordered = sorted(samples)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-round ratios: each pair ran side by side, under the same load."""
    return median(a / b for a, b in zip(numerators, denominators, strict=True) if b > 0)


def latency_summary(samples: Sequence[float], per_round: Sequence[Sequence[float]]) -> dict[
    str, float
]:
    """Latency figures in milliseconds from samples in seconds.

    p50 and p99 are over all samples pooled (a tail needs many samples; the rounds were
    interleaved, so the pool is fair); ``p50_of_rounds_ms`` is the median of per-round
    medians, the figure least moved by a burst of load in one round.
    """
    return {
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "max_ms": max(samples) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
        "p50_of_rounds_ms": median(median(r) for r in per_round if r) * 1e3,
        "n": len(samples),
    }


# -- the machine ----------------------------------------------------------------------


def _version(dist: str) -> str | None:
    # Metadata only: never import a package just to learn its version.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=BENCH_DIR, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What a reader needs to weigh the figures: the machine, its load, the versions."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {dist: _version(dist) for dist in VERSIONED},
        "git": _git_revision(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


# -- files ----------------------------------------------------------------------------


def write_results(area: str, results: dict[str, Any], *, name: str | None = None) -> Path:
    """Write ``results/<name or area>.json`` (git-ignored unless named ``curated-*``)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name or area}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- printing -------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def format_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        # Text left-aligned, figures right-aligned.
        parts = [
            v.ljust(w) if i < 2 or not _numeric(v) else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    out = [title, line([str(c) for c in columns]), "  " + "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x"))
    except ValueError:
        return False
    return True


def _ratio(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.2f}x" if abs(value) >= 0.1 else f"{value:.2g}x"


def target_lines(targets: Any) -> list[tuple[str, bool | None, str]]:
    """(name, met, detail) for each target, from either result style in the suite.

    A target this run has no figure for (``"measured": None``, with ``"why"`` saying
    why, or a ``{"name": None}`` entry) has `met` None: it was neither met nor missed,
    and its detail says "not measured (why)".
    """
    unmeasured = "not measured ({})"
    if isinstance(targets, dict):  # {"name": bool, or None if not measured}
        return [
            (str(name), None, unmeasured.format("no figure in this run"))
            if met is None else (str(name), bool(met), "")
            for name, met in targets.items()
        ]
    lines: list[tuple[str, bool | None, str]] = []
    for t in targets or []:
        met: bool | None = bool(t.get("met"))
        if t.get("measured") is None:
            met = None
            detail = unmeasured.format(t.get("why") or "no figure in this run")
        else:
            detail = f"measured {t['measured']}"
        if t.get("target"):
            detail = f"target {t['target']}, {detail}"
        lines.append((str(t["name"]), met, detail))
    return lines


def format_target(name: str, met: bool | None, detail: str) -> str:
    """One target's line: ``met``, ``NOT met`` or ``-`` (not measured), name, detail."""
    status = "-      " if met is None else "met    " if met else "NOT met"
    suffix = f"  ({detail})" if detail else ""
    return f"  {status}  {name}{suffix}"


def print_results(results: dict[str, Any]) -> None:
    """Print tables, ratios and a met / NOT met / not measured line per target."""
    for table in results.get("tables", []):
        print()
        print(format_table(table["title"], table["columns"], table["rows"]))
        for note in table.get("notes", []):
            print(f"  note: {note}")
    ratios = results.get("ratios") or {}
    if ratios:
        print("\nratios:")
        for name, value in ratios.items():
            print(f"  {name} = {_ratio(value)}")
    lines = target_lines(results.get("targets"))
    if lines:
        print("\ntargets:")
        for line in lines:
            print(format_target(*line))


def standalone_main(
    area: str,
    doc: str | None,
    run: Callable[[bool], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    """The command line of a ``bench_<area>.py`` run on its own: run, print, write JSON."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under a minute)")
    args = parser.parse_args(argv)
    machine = machine_info()
    results = run(args.quick)
    results["machine"] = {**machine, "loadavg_after": machine_info().get("loadavg_1_5_15")}
    print_results(results)
    print(f"\nwritten to {write_results(area, results)}")
    return 0
