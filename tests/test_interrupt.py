"""`JobGuard`: injected cancellation, never leaking past its job.

Private (`bridgecancel._interrupt`): the guard is how `run_sync(..., interrupt_after=)`
interrupts a thread, and its races (an injection landing as the job ends, on a pooled
thread's next job) cannot be set up through `run_sync`; test_thread_interrupt.py tests
the public side.
"""

from __future__ import annotations

import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bridgecancel import Cancelled, CancelSource, CancelToken
from bridgecancel._interrupt import JobGuard
from bridgecancel._supervise import INTERRUPT_RETRY as RETRY_INTERVAL
from bridgecancel._tokens import INTERRUPTED_REASON

LONG = 30.0  # a spinning job gives up after this long, so a failing test cannot hang


def spin(seconds: float = LONG) -> int:
    """Pure-Python busy loop: it never looks at any token."""
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        count += 1
    return count


def spin_until(event: threading.Event) -> None:
    end = time.monotonic() + LONG
    while not event.is_set() and time.monotonic() < end:
        pass


class GuardedThread:
    """Runs one guarded job in a thread, recording how it ended."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.source = CancelSource()
        self.guard = JobGuard(self.source.token)
        self.result: Any = None
        self.error: BaseException | None = None
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn, args), name="test job")
        self.thread.start()
        assert self.running.wait(10)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        def job() -> Any:
            self.running.set()
            return fn(*args)

        try:
            self.result = self.guard.run(job)
        except BaseException as exc:
            self.error = exc

    def interrupt_until_finished(self) -> int:
        """Call interrupt() every RETRY_INTERVAL, as the bridge does; count injections."""
        injected = 0
        deadline = time.monotonic() + 10
        while not self.guard.finished:
            assert time.monotonic() < deadline, "the job never finished"
            injected += self.guard.interrupt()
            time.sleep(RETRY_INTERVAL)
        self.thread.join(10)
        assert not self.thread.is_alive()
        return injected


def assert_interrupted(error: BaseException | None, token: CancelToken) -> Cancelled:
    assert type(error) is Cancelled, f"expected a plain Cancelled, got {error!r}"
    assert error.token is token
    assert error.reason == INTERRUPTED_REASON
    return error


def test_interrupt_raises_cancelled_in_a_spinning_job() -> None:
    job = GuardedThread(spin)
    assert not job.guard.interrupted
    assert job.interrupt_until_finished() == 1
    error = assert_interrupted(job.error, job.source.token)
    assert job.guard.interrupted
    # The traceback shows where the job was when it was interrupted.
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert "spin" in frames


def test_the_job_sees_a_cancelled_with_its_token() -> None:
    seen: list[BaseException] = []

    def job() -> None:
        try:
            spin()
        except Cancelled as exc:
            seen.append(exc)
            raise

    guarded = GuardedThread(job)
    guarded.interrupt_until_finished()
    assert len(seen) == 1
    assert isinstance(seen[0], Cancelled)
    assert seen[0].token is guarded.source.token
    assert seen[0].reason == INTERRUPTED_REASON
    assert_interrupted(guarded.error, guarded.source.token)


def test_a_job_that_finishes_is_not_interrupted() -> None:
    guard = JobGuard(CancelSource().token)
    assert guard.interrupt() is False  # not started
    assert guard.run(lambda x: x + 1, 1) == 2
    assert guard.finished
    assert guard.interrupt() is False  # finished
    assert not guard.interrupted


def test_exceptions_from_the_job_pass_through_unchanged() -> None:
    guard = JobGuard(CancelSource().token)
    error = KeyError("k")

    def fail() -> None:
        raise error

    with pytest.raises(KeyError) as info:
        guard.run(fail)
    assert info.value is error


def test_a_guard_runs_one_job() -> None:
    guard = JobGuard(CancelSource().token)
    guard.run(lambda: None)
    with pytest.raises(RuntimeError, match="guard per job"):
        guard.run(lambda: None)


def test_guard_needs_a_token() -> None:
    with pytest.raises(TypeError, match="CancelToken"):
        JobGuard(CancelSource())  # type: ignore[arg-type]


def test_finally_blocks_run_undisturbed_by_retries() -> None:
    cleaned = threading.Event()

    def job() -> None:
        try:
            spin()
        finally:
            spin(0.2)  # slow cleanup, in Python: retries must not cut it short
            cleaned.set()

    guarded = GuardedThread(job)
    assert guarded.interrupt_until_finished() == 1
    assert cleaned.is_set()
    assert_interrupted(guarded.error, guarded.source.token)


def test_a_swallowed_interrupt_is_retried() -> None:
    swallowed = threading.Event()

    def job() -> None:
        try:
            spin()
        except BaseException:  # the kind of code interrupt escalation exists for
            swallowed.set()
        spin()

    guarded = GuardedThread(job)
    assert guarded.interrupt_until_finished() == 2
    assert swallowed.is_set()
    assert_interrupted(guarded.error, guarded.source.token)


def test_an_interrupt_waits_for_a_c_call_to_return() -> None:
    release = threading.Event()
    blocked = threading.Lock()
    blocked.acquire()

    def job() -> str:
        blocked.acquire()  # C: the exception cannot arrive until it returns
        release.set()
        spin()
        return "not reached"

    guarded = GuardedThread(job)
    assert guarded.guard.interrupt() is True
    assert guarded.guard.interrupt() is False  # already pending
    assert not release.is_set()
    blocked.release()
    guarded.thread.join(10)
    assert_interrupted(guarded.error, guarded.source.token)
    assert not release.is_set()  # raised right after the C call, before the next line


def _pooled_worker(
    jobs: queue.Queue[Any], outcomes: list[Any], current: list[Any] | None = None
) -> None:
    """A pool thread: runs jobs one after another, each under its own guard."""
    while True:
        item = jobs.get()
        if item is None:
            break
        guard, fn = item
        if current is not None:
            current[0] = guard  # interruptible from before run() starts
        try:
            outcomes.append(("returned", guard.run(fn)))
        except Cancelled as exc:
            outcomes.append(("cancelled", exc))
        except BaseException as exc:  # would be a leak into the pool's own code
            outcomes.append(("leaked", exc))
        try:
            spin(0.001)  # the pool's code between jobs, full of checkpoints
        except BaseException as exc:
            outcomes.append(("leaked", exc))


def test_pooled_thread_runs_the_next_job_cleanly_after_an_interrupt() -> None:
    jobs: queue.Queue[Any] = queue.Queue()
    outcomes: list[Any] = []
    pool = threading.Thread(target=_pooled_worker, args=(jobs, outcomes), name="test pool")
    pool.start()
    spinning = threading.Event()
    guards = [JobGuard(CancelSource().token) for _ in range(3)]

    def first() -> None:
        spinning.set()
        spin()

    jobs.put((guards[0], first))
    jobs.put((guards[1], lambda: spin(0.05) and "second"))
    jobs.put((guards[2], lambda: "third"))
    jobs.put(None)
    assert spinning.wait(10)
    assert guards[0].interrupt()
    pool.join(10)
    assert not pool.is_alive()
    assert [kind for kind, _ in outcomes] == ["cancelled", "returned", "returned"]
    assert outcomes[1][1] == "second"
    assert outcomes[2][1] == "third"
    # Late calls on the finished guard do nothing to the thread's later jobs.
    assert guards[0].interrupt() is False


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads often, so the interrupter lands at every point of a job's end."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_switching")
@pytest.mark.slow
def test_an_interrupt_due_as_the_job_finishes_never_reaches_the_next_job() -> None:
    """The pooled-thread race: a hammering interrupter, jobs ending at random moments."""
    jobs: queue.Queue[Any] = queue.Queue()
    outcomes: list[Any] = []
    current: list[JobGuard | None] = [None]
    stop = threading.Event()

    def interrupter() -> None:
        while not stop.is_set():
            guard = current[0]
            if guard is not None:
                guard.interrupt()

    rnd = random.Random(7)

    def make_job(guard: JobGuard) -> Callable[[], Any]:
        kind = rnd.randrange(3)
        size = rnd.randrange(0, 20_000)

        def job() -> Any:
            if kind == 0:
                return sum(i for i in range(size))  # Python bytecode
            if kind == 1:
                return sum(range(size * 10))  # one C call
            return time.sleep(0)  # releases the GIL: the interrupter runs right then

        return job

    count = 3000
    for _ in range(count):
        guard = JobGuard(CancelSource().token)
        jobs.put((guard, make_job(guard)))
    jobs.put(None)
    hammer = threading.Thread(target=interrupter, name="test interrupter")
    pool = threading.Thread(target=_pooled_worker, args=(jobs, outcomes, current), name="test pool")
    hammer.start()
    pool.start()
    pool.join(60)
    stop.set()
    hammer.join(10)
    assert not pool.is_alive()
    kinds = [kind for kind, _ in outcomes]
    assert kinds.count("leaked") == 0, [exc for kind, exc in outcomes if kind == "leaked"][:3]
    assert len(kinds) == count
    # Both sides of the race happened: jobs interrupted, and jobs that finished first.
    assert kinds.count("cancelled") > 0
    assert kinds.count("returned") > 0
    for kind, value in outcomes:
        if kind == "cancelled":
            assert type(value) is Cancelled
            assert value.reason == INTERRUPTED_REASON


def test_an_injection_landing_as_the_job_ends_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic version of the race: the injection is made after the job returned."""
    from bridgecancel import _interrupt

    real = _interrupt._set_async_exc
    paused = threading.Event()
    proceed = threading.Event()

    def slow_injection(ident: int, exc_class: type) -> int:
        paused.set()  # interrupt() saw the job running and holds the guard's lock
        assert proceed.wait(10)
        return int(real(ident, exc_class))

    monkeypatch.setattr(_interrupt, "_set_async_exc", slow_injection)
    finish = threading.Event()
    after_job: list[str] = []
    guard = JobGuard(CancelSource().token)
    started = threading.Event()

    def job() -> str:
        started.set()
        finish.wait(LONG)
        return "done"

    def pool_thread() -> None:
        try:
            after_job.append(guard.run(job))
            spin(0.05)  # the code after the job: a leaked injection would land here
            after_job.append("clean")
        except BaseException as exc:
            after_job.append(f"leaked {exc!r}")

    worker = threading.Thread(target=pool_thread, name="test pool")
    worker.start()
    assert started.wait(10)
    interrupter = threading.Thread(target=guard.interrupt, name="test interrupter")
    interrupter.start()
    assert paused.wait(10)
    finish.set()  # the job returns while the injection is on its way
    _wait_asleep(worker)  # in run(), waiting for the interrupter's lock
    proceed.set()
    interrupter.join(10)
    worker.join(10)
    assert after_job == ["done", "clean"]
    assert guard.finished
    assert not guard.interrupted


def _wait_asleep(thread: threading.Thread) -> None:
    steady = 0
    deadline = time.monotonic() + 10
    while steady < 5:
        assert time.monotonic() < deadline
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        steady = steady + 1 if state == "S" else 0
        time.sleep(0.002)
