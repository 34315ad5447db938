"""Shared fixtures: every async test runs on asyncio and trio; no test may leak a worker."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

import bridgecancel

# Threads that pools keep on purpose while idle (they retire on their own timeout).
_IDLE_POOL_THREAD_PREFIXES = ("Trio thread", "AnyIO worker thread", "bridgecancel idle")
_SETTLE_SECONDS = 5.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _child_pids() -> set[int]:
    """Live (non-zombie and zombie alike) children of this process, from /proc."""
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            children.add(int(entry))
    return children


def _allowed_pids() -> set[int]:
    """Idle pooled worker processes, which may outlive a test by design."""
    try:
        from bridgecancel import _processes
    except ImportError:
        return set()
    idle = getattr(_processes, "idle_worker_pids", None)
    return set(idle()) if idle is not None else set()


def _leaked_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and not t.name.startswith(_IDLE_POOL_THREAD_PREFIXES)
    ]


@pytest.fixture(autouse=True)
def no_leaked_workers() -> Iterator[None]:
    """Fail the test if it leaves a thread, a running job or a child process behind."""
    threads_before = set(threading.enumerate())
    pids_before = _child_pids()
    yield
    deadline = time.monotonic() + _SETTLE_SECONDS
    while True:
        stats = bridgecancel.statistics()
        running = stats.threads.running + stats.processes.running
        threads = _leaked_threads(threads_before)
        pids = _child_pids() - pids_before - _allowed_pids()
        if not (running or threads or pids) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert running == 0, f"jobs still running after the test: {stats}"
    assert not threads, f"test leaked threads: {threads}"
    assert not pids, f"test leaked child processes: {sorted(pids)}"
