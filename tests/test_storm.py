"""Cancel storms: thousands of jobs behind a limiter, cancelled at random instants.

Jobs finish, raise, ignore their token, or raise `Cancelled` (process jobs may also stay
stubborn until interrupted); each caller is cancelled before its job starts, while it
runs, or never. Afterwards, compared with what the workers recorded, these must all be
zero:

- lost results: a worker returned a value (or raised an error) its caller never saw;
- phantom results: a caller got a value no worker returned for it;
- early returns: a call returned before its worker finished, or a job started after its
  call had returned;
- leaks: jobs still running, threads or processes left (the autouse leak fixture).

Sized for a CI machine with two shared cores (well under a minute each); set
``BRIDGECANCEL_SOAK=1`` for a storm twenty times longer.
"""

from __future__ import annotations

import heapq
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

import _storm_jobs as jobs
import bridgecancel

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # seconds per storm, by design

SOAK = os.environ.get("BRIDGECANCEL_SOAK") == "1"
THREAD_JOBS = 4_000 * (20 if SOAK else 1)
PROCESS_JOBS = 1_500 * (20 if SOAK else 1)
# The soak outlasts the suite's per-test timeout.
long_when_soaking = pytest.mark.timeout(1800 if SOAK else 60)


@dataclass
class Seen:
    """What the callers saw, by job number."""

    returned: dict[int, Any] = field(default_factory=dict)
    raised: dict[int, BaseException] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    call_ended: dict[int, float] = field(default_factory=dict)


async def _storm(
    call: Callable[[int, str], Awaitable[Any]],
    record: Callable[[], jobs.Record],
    kinds_to_use: tuple[str, ...],
    n: int,
    seed: int,
    max_delay: float,
) -> tuple[Seen, dict[int, str]]:
    """Run `n` calls; `record()` returns what the workers did so far."""
    rng = random.Random(seed)
    kinds = {i: rng.choice(kinds_to_use) for i in range(n)}
    # A third never cancelled; a third cancelled at once (most are still queued behind
    # the limiter then); a third at a random instant up to `max_delay` after its job
    # started in the worker (maybe after it finished, maybe as it returns).
    plan = {i: rng.choice(("never", "at once", "while running")) for i in range(n)}
    seen = Seen()
    scopes: dict[int, anyio.CancelScope] = {}

    async def one(i: int) -> None:
        with anyio.CancelScope() as scope:
            scopes[i] = scope
            if plan[i] == "at once":
                scope.cancel()
            try:
                seen.returned[i] = await call(i, kinds[i])
            except ValueError as exc:
                seen.raised[i] = exc
            finally:
                seen.call_ended[i] = time.monotonic()
        if i not in seen.returned and i not in seen.raised:
            seen.cancelled.add(i)

    async def canceller() -> None:
        """Cancel each "while running" call at a random instant after its job started."""
        due: list[tuple[float, int]] = []
        taken = 0
        while len(seen.call_ended) < n:
            order = record().order
            for i in order[taken:]:
                if plan[i] == "while running":
                    heapq.heappush(due, (time.monotonic() + rng.uniform(0, max_delay), i))
            taken = len(order)
            now = time.monotonic()
            while due and due[0][0] <= now:
                scopes[heapq.heappop(due)[1]].cancel()
            await anyio.sleep(0.0005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(canceller)
        for i in range(n):
            tg.start_soon(one, i)
    return seen, kinds


def _check(seen: Seen, record: jobs.Record, kinds: dict[int, str], n: int) -> None:
    assert len(seen.call_ended) == n  # every call ended
    lost = sorted(i for i in record.returned if seen.returned.get(i) != i)
    lost_errors = sorted(
        i
        for i in record.started
        if kinds[i] == "raise"
        and not (isinstance(seen.raised.get(i), ValueError) and seen.raised[i].args == (i,))
    )
    phantom = sorted(
        i for i, value in seen.returned.items() if value != i or i not in record.returned
    )
    phantom += sorted(i for i in seen.raised if i not in record.started)
    early = sorted(
        i
        for i, finished in record.finished.items()
        if seen.call_ended[i] < finished
    )
    late_starts = sorted(
        i for i, started in record.started.items() if started > seen.call_ended[i]
    )
    unfinished = sorted(set(record.started) - set(record.finished))
    assert lost == [], f"{len(lost)} results lost: {lost[:10]}"
    assert lost_errors == [], f"{len(lost_errors)} errors lost: {lost_errors[:10]}"
    assert phantom == [], f"{len(phantom)} phantom results: {phantom[:10]}"
    assert early == [], f"{len(early)} calls returned before their worker finished"
    assert late_starts == [], f"{len(late_starts)} jobs started after their call returned"
    assert unfinished == [], f"{len(unfinished)} jobs never finished"
    # The storm did what it is for: every kind of ending happened.
    assert seen.cancelled
    assert seen.returned
    assert seen.raised
    assert len(record.started) < n  # some jobs were dropped before they started


@long_when_soaking
async def test_thread_cancel_storm() -> None:
    record = jobs.Record()
    limiter = anyio.CapacityLimiter(16)

    async def call(i: int, kind: str) -> Any:
        return await bridgecancel.run_sync(jobs.thread_job, i, kind, record, limiter=limiter)

    before = bridgecancel.statistics().threads
    with anyio.fail_after(1500 if SOAK else 50):
        seen, kinds = await _storm(
            call, lambda: record, jobs.THREAD_KINDS, THREAD_JOBS, seed=1, max_delay=0.004
        )
    after = bridgecancel.statistics().threads
    assert after.running == 0
    _check(seen, record, kinds, THREAD_JOBS)
    assert after.cooperative > before.cooperative  # jobs did stop when cancelled


@long_when_soaking
async def test_process_cancel_storm(tmp_path: Path) -> None:
    limiter = anyio.CapacityLimiter(4)
    log = jobs.LogReader(str(tmp_path / "log"))

    async def call(i: int, kind: str) -> Any:
        return await bridgecancel.run_process(
            jobs.process_job,
            i,
            kind,
            log.path,
            limiter=limiter,
            interrupt_after=0.02,  # stubborn jobs get interrupted, then retired
            kill_after=2.0,
        )

    before = bridgecancel.statistics().processes
    with anyio.fail_after(1500 if SOAK else 55):
        seen, kinds = await _storm(
            call, log.poll, jobs.PROCESS_KINDS, PROCESS_JOBS, seed=2, max_delay=0.01
        )
    after = bridgecancel.statistics().processes
    assert after.running == 0
    _check(seen, log.poll(), kinds, PROCESS_JOBS)
    assert after.cooperative > before.cooperative
    assert after.interrupted > before.interrupted  # stubborn jobs were interrupted
