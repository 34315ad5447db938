"""The worker process pool behind `run_process`: starting, keeping, retiring workers.

These tests reach into the pool itself (`bridgecancel._process._pool`): a pool of their
own, a slowed-down worker start, a shorter idle timeout. None of that has a public
surface (a user cannot swap the pool or set its idle timeout), so it is tested here,
privately; the jobs still go through the public `run_process`.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import _pool_helpers as h
from bridgecancel import run_process
from bridgecancel._process import _run as _processes
from bridgecancel._process._pool import Pool, WorkerProcess, pool
from bridgecancel.testing import idle_worker_pids

pytestmark = pytest.mark.anyio

SLOW_SPAWN = 0.5  # seconds a patched start takes, in its thread


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.005)
    return not alive(pid)


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pool]:
    """A pool of its own for run_process, with no idle worker to reuse; shut down after."""
    fresh = Pool()
    monkeypatch.setattr(_processes, "pool", fresh)
    yield fresh
    fresh.shutdown()


@pytest.fixture
def slow_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker start takes SLOW_SPAWN seconds longer (a loaded machine's fork)."""
    original = WorkerProcess.spawn

    def spawn() -> WorkerProcess:
        time.sleep(SLOW_SPAWN)
        return original()

    monkeypatch.setattr(WorkerProcess, "spawn", staticmethod(spawn))


async def _ticking(ticks: list[float]) -> None:
    while True:
        ticks.append(time.monotonic())
        await anyio.sleep(0.005)


def _largest_gap(ticks: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(ticks))


@pytest.mark.slow
async def test_a_slow_spawn_never_stalls_other_tasks(
    fresh_pool: Pool, slow_spawn: None
) -> None:
    ticks: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_ticking, ticks)
        await anyio.sleep(0.02)
        start = time.monotonic()
        worker = await run_process(h.pid)
        took = time.monotonic() - start
        tg.cancel_scope.cancel()
    assert took >= SLOW_SPAWN  # the start really was slow
    assert len(ticks) > 10
    # Before the fix the event loop stood still for the whole start.
    assert _largest_gap(ticks) < SLOW_SPAWN / 2
    assert worker in fresh_pool.idle_pids()


@pytest.mark.slow
async def test_idle_workers_retire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "idle_timeout", 0.2)  # every idle worker retires now
    worker = await run_process(h.pid)
    with anyio.fail_after(10):
        while worker in idle_worker_pids() or Path(f"/proc/{worker}").exists():
            await anyio.sleep(0.02)
    assert not idle_worker_pids()


async def test_take_reuses_an_idle_worker_without_a_thread(fresh_pool: Pool) -> None:
    first = await fresh_pool.take()
    fresh_pool.give_back(first)
    assert await fresh_pool.take() is first
    fresh_pool.give_back(first)


@pytest.mark.slow
async def test_a_caller_that_leaves_while_its_worker_starts_leaks_no_worker(
    fresh_pool: Pool, slow_spawn: None
) -> None:
    with anyio.move_on_after(SLOW_SPAWN / 5):
        await run_process(h.pid)  # its deadline passes while the worker starts
    with anyio.fail_after(10):
        while not fresh_pool.idle_pids():
            await anyio.sleep(0.01)
    (idle,) = fresh_pool.idle_pids()
    assert await run_process(h.pid) == idle  # kept for the next call, not leaked


async def test_an_interrupted_worker_takes_its_grandchild_with_it(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    worker = grandchild = 0
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_started() -> None:
                    while not marker.exists():
                        await anyio.sleep(0.005)
                    scope.cancel()

                tg.start_soon(cancel_once_started)
                await run_process(
                    h.grandchild_then_ignore_token,
                    str(marker),
                    interrupt_after=0.05,
                    kill_after=30,
                )
        assert scope.cancelled_caught
        worker, grandchild = map(int, marker.read_text().split())
        assert worker not in idle_worker_pids()  # retired, not reused
        # Before the fix the grandchild outlived the retired worker by seconds and more.
        assert wait_dead(grandchild, timeout=2.0)
        assert wait_dead(worker, timeout=2.0)
    finally:
        if grandchild and alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.slow
async def test_a_worker_retiring_when_idle_takes_its_group_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "started"
    grandchild = await run_process(h.grandchild_then_return, str(marker))
    try:
        worker = int(marker.read_text().split()[0])
        assert alive(grandchild)
        monkeypatch.setattr(pool, "idle_timeout", 0.1)  # the reaper retires it now
        assert wait_dead(worker, timeout=5.0)
        assert wait_dead(grandchild, timeout=2.0)
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
