"""How jobs ended: counts per outcome, and the ``bridgecancel`` logger."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ("Outcome", "Statistics", "WorkerStatistics", "statistics")

Outcome = Literal[
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
]
Kind = Literal["threads", "processes", "cluster"]
_SINGULAR: Final = {"threads": "thread", "processes": "process", "cluster": "cluster"}

logger: Final = logging.getLogger("bridgecancel")

_OUTCOMES: Final = (
    "completed", "cooperative", "interrupted", "killed", "abandoned", "crashed", "never_started"
)


@dataclass(frozen=True)
class WorkerStatistics:
    """Counts of finished jobs per outcome, and of jobs running now.

    Attributes:
        completed: jobs that ended without being cancelled.
        cooperative: cancelled jobs whose worker stopped by itself (it raised
            `Cancelled` or returned after the token fired).
        interrupted: jobs stopped by raising `Cancelled` inside the worker.
        killed: process jobs whose worker was killed.
        abandoned: cancelled jobs left running (``abandon_on_cancel=True``), counted
            when the caller leaves them.
        crashed: process jobs whose worker died by itself (`BrokenWorkerError`).
        never_started: jobs cancelled before their function began, which then never ran
            (they cost their worker nothing).
        running: jobs whose function is running in a worker right now.
    """

    completed: int
    cooperative: int
    interrupted: int
    killed: int
    abandoned: int
    crashed: int
    never_started: int
    running: int


@dataclass(frozen=True)
class Statistics:
    """A snapshot of how bridgecancel's thread and process jobs ended."""

    threads: WorkerStatistics
    processes: WorkerStatistics
    # Calls made with bridgecancel.dask: ``running`` counts calls not yet ended.
    cluster: WorkerStatistics


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Kind, dict[str, int]] = {
            kind: dict.fromkeys((*_OUTCOMES, "running"), 0)
            for kind in ("threads", "processes", "cluster")
        }

    def started(self, kind: Kind) -> None:
        with self._lock:
            self._counts[kind]["running"] += 1

    def finished(self, kind: Kind, outcome: Outcome, *, was_running: bool = True) -> None:
        """Count an ended job; `was_running` if `started` counted it as running."""
        with self._lock:
            counts = self._counts[kind]
            if was_running:
                counts["running"] -= 1
            counts[outcome] += 1

    def snapshot(self) -> Statistics:
        with self._lock:
            return Statistics(
                threads=WorkerStatistics(**self._counts["threads"]),
                processes=WorkerStatistics(**self._counts["processes"]),
                cluster=WorkerStatistics(**self._counts["cluster"]),
            )


counters: Final = _Counters()


def statistics() -> Statistics:
    """Return a frozen record of how thread and process jobs have ended so far."""
    return counters.snapshot()


def log_cancelled(kind: Kind, outcome: Outcome, func: object, reason: str | None) -> None:
    """Log a cancelled job: DEBUG when it stopped by itself, WARNING when forced."""
    level = logging.DEBUG if outcome in ("cooperative", "never_started") else logging.WARNING
    if logger.isEnabledFor(level):
        name = getattr(func, "__qualname__", None) or repr(func)
        logger.log(
            level, "%s job %s ended %s after cancel (reason: %s)",
            _SINGULAR[kind], name, outcome, reason,
        )
