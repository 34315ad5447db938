"""`run_process`: run a sync function in a pooled worker process, with a real token.

The pieces of the process side: `_pool` starts and keeps worker processes, `_child` is
the worker's own main loop, `_wire` the bytes between them; `_supervise` holds the
cancel, escalate, deliver and count logic shared with the thread bridge. This module
checks a call, pickles the job before any worker is used, picks a worker, and says how a
process job is signalled and stopped and what came back.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar

import anyio
from anyio.lowlevel import RunVar, checkpoint_if_cancelled

from .. import _supervise as supervise
from .._backend import caller_deadline
from .._exceptions import BrokenWorkerError, RemoteTraceback
from .._supervise import (
    DEFAULT_INTERRUPT_AFTER,
    DEFAULT_KILL_AFTER,
    Job,
    JobKind,
    JobState,
    Outcome,
    check_call,
)
from .._tokens import Cancelled
from .._util import PosArgsT, Unpack, describe, describe_error
from . import _wire as wire
from ._pool import WorkerProcess, main_is_loadable, pool

__all__ = (
    "DEFAULT_INTERRUPT_AFTER",
    "DEFAULT_KILL_AFTER",
    "check_not_loading_main",
    "current_default_process_limiter",
    "pickle_job",
    "run_process",
)

T = TypeVar("T")

_default_limiter: RunVar[anyio.CapacityLimiter] = RunVar("bridgecancel_process_limiter")


def current_default_process_limiter() -> anyio.CapacityLimiter:
    """The limiter `run_process` uses when given none: one per event loop.

    It allows as many jobs at once as this machine has CPUs (as ``anyio.to_process``
    and trio-parallel do); set its ``total_tokens`` to change that.
    """
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        _default_limiter.set(limiter)
        return limiter


async def run_process(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: Unpack[PosArgsT],
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = DEFAULT_INTERRUPT_AFTER,
    kill_after: float | None = DEFAULT_KILL_AFTER,
) -> T:
    """Call ``func(*args)`` in a pooled worker process and return its result.

    Inside the worker, `current_token()` is the job's token: it fires as soon as the
    calling task is cancelled (by a cancel scope, a deadline, ``asyncio.timeout``,
    ``Task.cancel()`` or a failing task group). Its ``deadline`` is the caller's effective
    deadline when the call began, for information: the token fires from the caller's
    scope, never by itself, so a deadline pushed back later does not stop the job.
    ``token.wait()`` in the worker wakes at once; there is no polling. The token's
    ``on_cancel`` callbacks run in the worker's control-listener thread, never in the
    caller's event loop.

    If the worker ignores its token, `interrupt_after` seconds after the cancel (or
    after the job's function began, if it had not yet) `Cancelled` is raised in its
    Python code (so ``finally`` blocks run), and
    `kill_after` seconds after that its whole process group is killed and the worker
    replaced. Pass None to skip a stage; with both None the call waits for the worker
    however long it takes. The call returns only once the job has ended.

    A job cancelled before its function began never starts, and the caller is free at
    once, whatever its worker is doing (starting, or importing the job's module): the
    worker finishes that for the pool and is reused. A worker that stopped because of
    the cancel becomes the caller's own cancellation.
    A worker that returns anyway has its result returned (the cancellation is delivered
    at the next checkpoint; under plain asyncio a cancellation still standing is raised
    instead, once the job has ended); an error it raises arrives as a copy of the same type,
    whose ``__cause__`` is a `RemoteTraceback`. A job cancelled while it waits for the
    limiter never starts. A worker found dead before the job began (an earlier job
    broke it) is replaced and the job sent to another one, once, unseen.

    Args:
        func: a sync callable that pickle can send (a module-level function; lambdas
            and closures need ``cloudpickle`` installed).
        args: positional arguments for `func`, also pickled.
        limiter: bounds how many jobs run at once; default
            `current_default_process_limiter()` (the CPU count).
        interrupt_after: seconds from the cancel to the interrupt, or None.
        kill_after: seconds from the interrupt (or the cancel, if `interrupt_after` is
            None) to the kill, or None.

    Raises:
        BrokenWorkerError: the worker exited or died by a signal while running the job
            (or a second worker did so before the job began).
        pickle.PicklingError: the function, an argument, the result or the error could
            not be pickled.
        pickle.UnpicklingError: the worker could not load the job, or the parent could
            not load what came back.
        TypeError: `func` is not a sync callable (an async function or async generator
            function), or `limiter` is not an ``anyio.CapacityLimiter``; checked before
            any worker is touched, with the same checks as `run_sync`.
        ValueError: `interrupt_after` or `kill_after` is negative or NaN.
    """
    if sys.platform == "win32":  # pragma: no cover - POSIX only
        raise NotImplementedError(
            "run_process() needs POSIX process groups and signals; on Windows use "
            "anyio.to_process.run_sync or trio_parallel.run_sync"
        )
    interrupt_after, kill_after = check_call(
        "run_process", func, limiter, interrupt_after=interrupt_after, kill_after=kill_after
    )
    check_not_loading_main()
    payload = pickle_job(func, args)
    if limiter is None:
        limiter = current_default_process_limiter()
    job = _ProcessJob(func, interrupt_after, kill_after, caller_deadline())
    try:
        await checkpoint_if_cancelled()
        try:
            # A free token is taken without yielding to the event loop; waiting for the
            # result is this call's schedule point.
            limiter.acquire_nowait()
            queued = False
        except anyio.WouldBlock:
            await limiter.acquire()
            queued = True
        try:
            if queued:  # cancelled while it waited for the limiter: the job never starts
                await checkpoint_if_cancelled()
            return await _run_in_worker(job, payload)  # type: ignore[no-any-return]
        finally:
            limiter.release()
    finally:
        if job.state is _QUEUED:  # the call ends, the job never began and is not counted
            job.move(_DROPPED)
            supervise.record(job)  # never_started, as a thread job would be


async def _run_in_worker(job: _ProcessJob, payload: bytes) -> Any:
    """Run `job` in a pooled worker, and in a second one if the first is found dead
    before the job began (it never began: sending it elsewhere changes nothing)."""
    while True:
        job.assign(await pool.take())
        try:
            await job.send(payload)
            try:
                await job.wait()
            except anyio.get_cancelled_exc_class() as exc:
                # A job whose function has not begun never will: the caller does not
                # wait for its worker to finish starting or loading it.
                job.withdraw()
                return await supervise.deliver_cancelled(job, exc)
            if job.state is _QUEUED:  # its worker died before the job began
                continue
            return await supervise.deliver(job)
        finally:
            job.return_worker()


class _ProcessJob(Job):
    """One job in a worker process: the `_supervise.Job` of a process."""

    kind: ClassVar[JobKind] = "processes"

    __slots__ = (
        "_exiting",
        "_retry",
        "_worker",
        "interrupted",
        "job_id",
        "message",
        "returncode",
        "withdrawn",
    )

    def __init__(
        self,
        func: Callable[..., object],
        interrupt_after: float | None,
        kill_after: float | None,
        deadline: float,
    ) -> None:
        super().__init__(func, deadline, interrupt_after, kill_after)
        self._worker: WorkerProcess | None = None
        self._retry = True  # a worker found dead before the job began is replaced, once
        self.job_id = 0
        self.message: tuple[int, bytes] | None = None  # the final (tag, payload)
        self.returncode: int | None = None  # set if the worker died during the job
        self.interrupted = False
        self.withdrawn = False  # taken back before the worker claimed it: it never starts
        self._exiting = False  # the worker's result pipe closed: it is exiting

    @property
    def worker(self) -> WorkerProcess:
        assert self._worker is not None, "the job has no worker yet"
        return self._worker

    def assign(self, worker: WorkerProcess) -> None:
        """Give the job to `worker` (again, to a new one, if the last one died first)."""
        if self._worker is not None:
            self._retry = False
        self._worker = worker
        self.job_id = worker.next_job_id()
        self.message = None
        self.returncode = None
        self._exiting = False

    async def send(self, payload: bytes) -> None:
        """Send the job, with its claim before it (see `_wire`)."""
        worker = self.worker
        message = wire.job_message(self.job_id, self.deadline, payload)
        worker.post_claim()
        try:
            rest = worker.send_nowait(message)
            if rest:  # a large job: finish sending it even if cancelled meanwhile
                with anyio.CancelScope(shield=True):
                    await worker.send_rest(rest)  # to a worker that has booted: it reads
        except BrokenPipeError:  # the worker is gone; wait() reaps it
            self._exiting = True
            worker.kill_group()  # and what its jobs left

    def withdraw(self) -> None:
        """The caller was cancelled: a job the worker has not claimed never starts.

        The job then ends at once, without its worker: the worker may still be loading
        it (importing its module), and tells the pool, not the caller, when it is done.
        """
        if self.state is _QUEUED and self.worker.withdraw():
            self.withdrawn = True
            self.move(_DROPPED)

    def _ended_as(self) -> JobState:
        return _FINISHED if self.began else _DROPPED

    async def wait(self, *, until_started: bool = False) -> None:
        worker = self.worker
        while not self.ended:
            if until_started and self.began:
                return
            if self._exiting:
                self.returncode = await worker.wait_exit()
                if not self.began and self._retry and self.reason is None:
                    return  # QUEUED still: the caller sends it to another worker
                self.move(self._ended_as())
                continue
            received = await worker.receive()
            if received is None:
                self._exiting = True
                worker.kill_group()  # the worker is gone; so are children it left
            elif received[0] == self.job_id:
                if received[1] == wire.STARTED:
                    self.move(_RUNNING)
                else:
                    self.message = (received[1], received[2])
                    if not worker.killed:  # a killed worker has ended once it is reaped
                        self.move(self._ended_as())

    def _cancel(self, reason: str) -> None:
        # A write to a pipe: no user code runs here (on_cancel runs in the worker).
        if not self.withdrawn:  # a withdrawn job needs no cancel: it never starts
            self.worker.control(wire.CANCEL, self.job_id, reason)

    def interrupt(self) -> None:
        self.interrupted = True
        self.worker.control(wire.INTERRUPT, self.job_id)

    def kill(self) -> None:
        self.worker.kill()

    def outcome(self) -> Outcome:
        if self._worker is not None and self._worker.killed:
            return "killed"
        if not self.began:
            # The caller gets BrokenWorkerError only when it was not cancelled.
            crashed = self.returncode is not None and self.reason is None
            return "crashed" if crashed else "never_started"
        if self.returncode is not None:
            return "crashed"
        if self.interrupted:
            return "interrupted"
        if self.reason is not None or self.stopped_by_cancel:
            return "cooperative"
        return "completed"

    @property
    def stopped_by_cancel(self) -> bool:
        if self.message is not None:  # it answered, maybe just before the kill landed
            return self.message[0] == wire.CANCELLED
        return self._worker is not None and self._worker.killed

    def return_worker(self) -> None:
        """Hand the worker back, on, or away, once the call is done with it."""
        worker = self.worker
        if self.returncode is not None:
            pool.discard(worker)  # reaped already
        elif self.withdrawn:
            pool.settle(worker, self.job_id)  # it answers the pool when it has loaded it
        elif not self.ended:  # the caller left before the job ended (the coroutine closed)
            if not self.began and worker.withdraw():
                # It never starts; run_process counts it never_started.
                pool.settle(worker, self.job_id)
                return
            pool.retire(worker, kill=True)
            self.move(self._ended_as())
            supervise.counters.count("processes", "killed")
        elif self.interrupted or worker.killed:
            pool.retire(worker, kill=worker.killed)  # an interrupt may leave it unwell
        else:
            pool.give_back(worker)

    def result(self) -> Any:
        if self.message is None:
            assert self.returncode is not None
            raise _broken_worker(self.worker.pid, self.returncode, self.func)
        tag, body = self.message
        if tag == wire.RETURNED:
            return _load(body, f"the result of {describe(self.func)}")
        if tag == wire.RAISED:
            error, tb_text = _load(body, f"the error raised by {describe(self.func)}")
            raise error from RemoteTraceback(tb_text)
        if tag == wire.CANCELLED:
            raise Cancelled._create(None, body.decode("utf-8", "replace") or None)
        if tag == wire.LOAD_FAILED:
            raise pickle.UnpicklingError(body.decode("utf-8", "replace"))
        raise pickle.PicklingError(body.decode("utf-8", "replace"))


_QUEUED: Final = JobState.QUEUED
_RUNNING: Final = JobState.RUNNING
_FINISHED: Final = JobState.FINISHED
_DROPPED: Final = JobState.DROPPED


def _load(body: bytes, what: str) -> Any:
    try:
        return pickle.loads(body)
    except Exception as exc:
        raise pickle.UnpicklingError(
            f"{what} came back from the worker but could not be unpickled here "
            f"({type(exc).__name__}: {exc}); make sure its class can be imported by the "
            "caller's process"
        ) from exc


def _broken_worker(pid: int, returncode: int, func: Callable[..., object]) -> BrokenWorkerError:
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return BrokenWorkerError(
            f"the worker process (pid {pid}) died by {name} while running "
            f"{describe(func)}; the pool has replaced it",
            signal=signum,
        )
    if returncode == wire.FAILED_EXIT:
        why = (
            "bridgecancel's own code in the worker failed, not the job; the worker's "
            "stderr (this process's stderr) says why"
        )
    else:
        why = "did it call sys.exit() or os._exit()?"
    return BrokenWorkerError(
        f"the worker process (pid {pid}) exited with code {returncode} while running "
        f"{describe(func)} ({why}); the pool has replaced it",
        exitcode=returncode,
    )


# -- pickling a job in the caller, before any worker is used -------------------------------
#
# So that a function or argument that cannot be sent fails the call at once, with a
# message naming the culprit and what to do, and never costs a worker.


def check_not_loading_main() -> None:
    worker = sys.modules.get("bridgecancel._process._child")
    if worker is not None and worker.loading_parent_main():
        raise RuntimeError(
            "run_process() was called while a worker process was importing the main "
            "script to load a function from it; put the script's top-level code under "
            "if __name__ == '__main__':"
        )


def pickle_job(func: Callable[..., object], args: tuple[object, ...]) -> bytes:
    """Pickle ``(func, args)`` now, so errors name the culprit before a worker is used."""
    if getattr(func, "__module__", None) == "__main__" and not main_is_loadable():
        return _pickle_by_value(func, args)
    try:
        return wire.dumps((func, args))
    except Exception as exc:
        raise pickle.PicklingError(_unpicklable_message(func, args)) from exc


def _pickle_by_value(func: Callable[..., object], args: tuple[object, ...]) -> bytes:
    """A function from an interactive ``__main__``: workers cannot import it by name."""
    try:
        import cloudpickle  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise pickle.PicklingError(
            f"{describe(func)} is defined in an interactive __main__ (a REPL, a notebook "
            "or python -c), which worker processes cannot import; define it in a module, "
            "or install cloudpickle (pip install cloudpickle) to send it by value"
        ) from None
    data: bytes = cloudpickle.dumps((func, args), pickle.HIGHEST_PROTOCOL)
    return data


def _unpicklable_message(func: Callable[..., object], args: tuple[object, ...]) -> str:
    fix = _cloudpickle_hint()
    try:
        wire.dumps(func)
    except Exception as exc:
        return (
            f"cannot send {describe(func)} to a worker process: pickling it failed "
            f"({describe_error(exc)}); define it at module level (lambdas, "
            f"closures and nested functions cannot be pickled by name){fix}"
        )
    for index, arg in enumerate(args):
        try:
            wire.dumps(arg)
        except Exception as exc:
            return (
                f"cannot send argument {index} of {describe(func)}, a "
                f"{type(arg).__qualname__}, to a worker process: pickling it failed "
                f"({describe_error(exc)}); pass picklable data (locks, "
                "open files, sockets and generators cannot be pickled)"
            )
    return f"cannot pickle the call {describe(func)} to send it to a worker process"


def _cloudpickle_hint() -> str:
    try:
        import cloudpickle  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return ", or install cloudpickle (pip install cloudpickle) to send it by value"
    return ""
