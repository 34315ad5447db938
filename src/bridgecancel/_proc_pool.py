"""The pool of worker processes: one per parent process, shared by every event loop.

Idle workers are reused most-recent first, retire after `IDLE_TIMEOUT` seconds, and are
shut down at interpreter exit. A worker outlives event loops on purpose (the next
`asyncio.run` gets a warm worker). New workers are started in a worker thread, so a slow
start never stalls the event loop. A retiring worker takes its process group with it:
what its jobs left there is killed once it has exited.

One thread, ``bridgecancel idle reaper``, exists while the pool holds idle or retiring
workers: it retires idle workers on time and reaps the ones that exit.
"""

from __future__ import annotations

import atexit
import os
import select
import threading
import time
from typing import Final

import anyio
import anyio.to_thread

from ._proc_handle import WorkerProcess

IDLE_TIMEOUT: Final = 300.0
"""Seconds an idle worker waits for a job before it retires (as anyio's process pool)."""

_RETIRE_GRACE: Final = 2.0  # a retiring worker that has not exited by then is killed
_LIVENESS_PERIOD: Final = 1.0  # how often the reaper checks that idle workers are alive


class Pool:
    """The idle workers of this process, and the thread that retires and reaps them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[WorkerProcess] = []  # most recently used last
        self._retiring: list[WorkerProcess] = []
        self._all: set[WorkerProcess] = set()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self.idle_timeout = IDLE_TIMEOUT

    def idle_pids(self) -> set[int]:
        with self._lock:
            return {worker.pid for worker in self._idle}

    async def take(self) -> WorkerProcess:
        """A live idle worker at once, or a new one started in a worker thread.

        Starting a process (fork, exec, the wait for exec to succeed) blocks for a while
        on a loaded machine; in a thread it never stalls the event loop's other tasks.
        The start is not cancellable; a worker started for a caller that has left
        meanwhile is kept idle for the next call.
        """
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.exit_status() is None:
                    return worker
                self._discard_locked(worker)  # died while idle: already reaped by poll()
        started: list[WorkerProcess] = []

        def spawn() -> WorkerProcess:
            worker = WorkerProcess.spawn()
            with self._lock:
                self._all.add(worker)
            started.append(worker)
            return worker

        try:
            # A limiter of its own: starting a worker never waits behind the default
            # thread limiter, which the caller's other work may hold.
            return await anyio.to_thread.run_sync(spawn, limiter=anyio.CapacityLimiter(1))
        except BaseException:
            if started:
                self.give_back(started[0])
            raise

    def give_back(self, worker: WorkerProcess) -> None:
        """Return a worker whose job ended cleanly, for reuse."""
        worker.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(worker)
            self._ensure_thread_locked()

    def retire(self, worker: WorkerProcess, *, kill: bool = False) -> None:
        """Let a worker exit (or kill it) and have the reaper thread reap it."""
        worker.close_pipes()
        if kill:
            worker.kill()
        worker.retire_deadline = time.monotonic() + _RETIRE_GRACE
        with self._lock:
            self._retiring.append(worker)
            self._ensure_thread_locked()
            self._wake_locked()

    def discard(self, worker: WorkerProcess) -> None:
        """Forget a worker that has been reaped."""
        with self._lock:
            self._discard_locked(worker)

    def _discard_locked(self, worker: WorkerProcess) -> None:
        worker.release()
        self._all.discard(worker)

    # -- the reaper thread -------------------------------------------------------------

    def _ensure_thread_locked(self) -> None:
        if self._thread is None:
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(
                target=self._reap_loop, name="bridgecancel idle reaper", daemon=True
            )
            self._thread.start()

    def _wake_locked(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or shutting down

    def _reap_loop(self) -> None:
        while True:
            with self._lock:
                timeout = self._reap_once_locked(time.monotonic())
                if timeout is None:
                    self._thread = None
                    return
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                for worker in self._retiring:
                    if worker.exit_fd() >= 0:
                        poller.register(worker.exit_fd(), select.POLLIN)
                wake_r = self._wake_r
            events = poller.poll(max(0.0, timeout) * 1000)
            if any(fd == wake_r for fd, _ in events):
                try:
                    os.read(wake_r, 4096)
                except (BlockingIOError, OSError):
                    pass

    def _reap_once_locked(self, now: float) -> float | None:
        """Reap, retire and kill what is due; the seconds until next due (None: stop)."""
        still: list[WorkerProcess] = []
        for worker in self._retiring:
            if worker.has_exited():
                worker.reap_with_group()
                self._discard_locked(worker)
                continue
            if now >= worker.retire_deadline:
                worker.kill_group()
                worker.retire_deadline = now + _RETIRE_GRACE
            still.append(worker)
        self._retiring = still
        keep: list[WorkerProcess] = []
        for worker in self._idle:
            if worker.exit_status() is not None:  # died while idle
                self._discard_locked(worker)
            elif now - worker.idle_since >= self.idle_timeout:
                worker.close_pipes()
                worker.retire_deadline = now + _RETIRE_GRACE
                self._retiring.append(worker)
            else:
                keep.append(worker)
        self._idle = keep
        if not self._idle and not self._retiring:
            return None
        due = [_LIVENESS_PERIOD]
        due += (w.idle_since + self.idle_timeout - now for w in self._idle)
        due += (w.retire_deadline - now for w in self._retiring)
        if any(w.exit_fd() < 0 for w in self._retiring):
            due.append(0.02)  # no pidfd to wait on: poll exiting workers
        return min(due)

    # -- process-wide events -----------------------------------------------------------

    def shutdown(self, timeout: float = 1.0) -> None:
        """At interpreter exit: end every worker, politely first, and reap them all."""
        with self._lock:
            workers = list(self._all)
            self._idle.clear()
            self._retiring.clear()
            self._all.clear()
            self._wake_locked()
        for worker in workers:
            worker.close_pipes()  # idle workers exit; busy ones kill their group
        deadline = time.monotonic() + timeout
        for worker in workers:
            # Exited or not, its group goes now: what its jobs left, or the worker too.
            worker.wait_exited_blocking(max(0.0, deadline - time.monotonic()))
            worker.kill_group()
            worker.reap_blocking(5.0)
            worker.release()

    def after_fork_in_child(self) -> None:
        """A fork of the parent must not hold the workers' pipes (their watchdogs use EOF)."""
        self._lock = threading.Lock()
        for worker in self._all:
            worker.forget_after_fork()
        self._idle, self._retiring, self._all = [], [], set()
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


pool: Final = Pool()
atexit.register(pool.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=pool.after_fork_in_child)
