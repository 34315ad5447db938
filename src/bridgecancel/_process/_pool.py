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
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Final

import anyio
import anyio.to_thread

from .._util import open_pidfd
from . import _wire as wire

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
        worker.close_descriptors()
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
            worker.close_descriptors()

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


# -- one worker process -------------------------------------------------------

# Seen from the parent: start it, talk to it, end it.
#
# A worker is ``python -c`` `_wire.BOOT`, which sets the parent's ``sys.path`` before any
# import and then imports ``bridgecancel._process._child`` (a plain import: the package's
# __init__ loads no anyio, its anyio-backed names are lazy, so the worker stays
# standard-library only). It is started with `subprocess`, in its own process group, and
# talks over three private pipes (see `_wire`). A worker never outlives its parent: its
# control listener exits when the control pipe closes. The `Pool` above keeps the idle
# ones.

_SRC_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerProcess:
    """One worker process and the parent's ends of its pipes."""

    def __init__(
        self, proc: subprocess.Popen[bytes], job_w: int, ctl_w: int, res_r: int
    ) -> None:
        self.pid: Final = proc.pid
        self._proc = proc
        self._job_w = job_w
        self._ctl_w = ctl_w
        self._res_r = res_r
        pidfd = open_pidfd(proc.pid)
        self._pidfd = -1 if pidfd is None else pidfd
        self._buf = bytearray()
        self._last_job_id = 0
        self.idle_since = 0.0
        self.retire_deadline = math.inf
        self.killed = False

    @classmethod
    def spawn(cls) -> WorkerProcess:
        """Start a worker. It boots while its path and its first job wait in its pipe."""
        fds: list[int] = []
        try:
            job_r, job_w = _pipe(fds)
            ctl_r, ctl_w = _pipe(fds)
            res_r, res_w = _pipe(fds)
            child_ends = (job_r, ctl_r, res_w)
            args = [sys.executable, "-c", wire.BOOT, *map(str, child_ends)]
            if sys.version_info >= (3, 11):
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, pass_fds=child_ends, process_group=0
                )
            else:  # pragma: no cover - Python 3.10
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, pass_fds=child_ends, start_new_session=True
                )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in child_ends:
            os.close(fd)
        worker = cls(proc, job_w, ctl_w, res_r)
        try:
            # Small, into an empty pipe: this does not block (a huge sys.path would only
            # wait for the worker to read it, which it does first thing).
            wire.write_all(
                job_w,
                wire.boot_record(_boot_path())
                + wire.job_message(wire.CONFIG_JOB_ID, math.inf, _config()),
            )
        except BrokenPipeError:
            pass  # it died at start-up; the first job reports how
        for fd in (job_w, ctl_w, res_r):
            os.set_blocking(fd, False)
        return worker

    def __repr__(self) -> str:
        return f"<bridgecancel worker process {self.pid}>"

    # -- talking to the worker (async side) ---------------------------------------------

    def next_job_id(self) -> int:
        self._last_job_id += 1
        return self._last_job_id

    def send_nowait(self, data: bytes | memoryview) -> memoryview:
        """Write what fits in the job pipe now; return the rest (usually nothing)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._job_w, view)
            except BlockingIOError:
                break
            view = view[written:]
        return view

    async def send_rest(self, view: memoryview) -> None:
        """Write the rest of a message (shield this: a partial job breaks the pipe)."""
        while view:
            await anyio.wait_writable(self._job_w)
            view = self.send_nowait(view)

    async def receive(self) -> tuple[int, int, bytes] | None:
        """The next ``(job id, tag, payload)`` from the worker; None once it has exited.

        Cancellable, and safe to call again after a cancel: a partly read message stays
        in the buffer.
        """
        buf = self._buf
        size = wire.RESULT_HEADER.size
        while True:
            need = size
            if len(buf) >= size:
                length, job_id, tag = wire.RESULT_HEADER.unpack_from(buf)
                need = size + length
                if len(buf) >= need:
                    payload = bytes(buf[size:need])
                    del buf[:need]
                    return job_id, tag, payload
            # Wait first: right after a job is sent, a read would only fail with EAGAIN.
            await anyio.wait_readable(self._res_r)
            try:
                chunk = os.read(self._res_r, max(65536, need - len(buf)))
            except BlockingIOError:
                continue
            if not chunk:
                return None
            buf += chunk

    def control(self, tag: int, job_id: int, reason: str | None = None) -> None:
        """Send a cancel or interrupt record; best effort (a dead worker needs neither)."""
        try:
            os.write(self._ctl_w, wire.control_record(tag, job_id, reason))
        except OSError:  # a full pipe (a wedged worker) or a dead one
            pass

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: the worker and its children."""
        self.killed = True
        self.kill_group()

    def kill_group(self) -> None:
        # Safe until the worker is reaped: its zombie keeps the group id reserved.
        if self._proc.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def exit_status(self) -> int | None:
        """The worker's return code once it has exited (and is then reaped), else None."""
        return self._proc.poll()

    async def wait_exit(self) -> int:
        """Wait until the worker has exited, reap it, and return its return code."""
        delay = 0.0005
        while (returncode := self._proc.poll()) is None:
            if self._pidfd >= 0:
                await anyio.wait_readable(self._pidfd)
            else:  # no pidfd (not Linux): poll, briefly, since it is exiting already
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
        return returncode

    # -- ending ---------------------------------------------------------------------------

    def close_pipes(self) -> None:
        """Close the job and control pipes: an idle worker exits, a busy one kills itself."""
        self._close("_job_w", "_ctl_w")

    def close_descriptors(self) -> None:
        """Close every descriptor; call once the worker has been reaped."""
        self._close("_job_w", "_ctl_w", "_res_r", "_pidfd")

    def _close(self, *names: str) -> None:
        """Close the descriptors in these attributes, once each (-1 marks a closed one)."""
        for name in names:
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child of the parent: drop the parent's ends without reaping."""
        self.close_descriptors()
        # This process is not the worker's parent; keep Popen from warning or waiting.
        self._proc.returncode = 0

    def reap_blocking(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds (in a thread, not the event loop) for the exit."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_fd(self) -> int:
        """A descriptor that becomes readable when the worker exits (or -1)."""
        return self._pidfd

    def has_exited(self) -> bool:
        """Whether the worker has exited, without reaping it.

        Until it is reaped, its zombie keeps its process group id reserved, so
        `kill_group` can still take down what its jobs left in the group.
        """
        if self._proc.returncode is not None:
            return True
        waitid = getattr(os, "waitid", None)
        if waitid is None:  # pragma: no cover - no waitid: reap to find out
            return self._proc.poll() is not None
        try:
            return waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped by someone else
            return True

    def wait_exited_blocking(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds (not in the event loop) for the exit; no reaping."""
        end = time.monotonic() + timeout
        while not self.has_exited():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            if self._pidfd >= 0:
                select.select([self._pidfd], [], [], remaining)
            else:  # pragma: no cover - no pidfd (not Linux)
                time.sleep(min(remaining, 0.01))
        return True

    def reap_with_group(self) -> None:
        """Once it has exited: SIGKILL what its jobs left in its group, then reap it.

        A job's children and grandchildren share the worker's process group unless they
        started their own; a retired worker takes them with it.
        """
        self.kill_group()
        self._proc.poll()


def _pipe(fds: list[int]) -> tuple[int, int]:
    r, w = os.pipe()
    fds += (r, w)
    return r, w


def _boot_path() -> list[str]:
    """The worker's ``sys.path``: the parent's, from its first import on.

    bridgecancel's own directory is added at the end if the parent's path lacks it
    (the parent found bridgecancel some other way), so that the worker can import it
    without anything there shadowing what the parent's path finds.
    """
    path = [entry for entry in sys.path if isinstance(entry, str)]
    if _SRC_DIR not in path:
        path.append(_SRC_DIR)
    return path


def _config() -> bytes:
    """What a worker needs from the parent beyond its path: where __main__ lives."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    main_name = getattr(spec, "name", None)
    if main_name == "__main__":  # a directory or zip run as a script: use its path
        main_name = None
    main_path = getattr(main, "__file__", None)
    config = {
        "main_name": main_name,
        "main_path": os.path.abspath(main_path) if main_path else None,
    }
    return pickle.dumps(config, pickle.HIGHEST_PROTOCOL)


def main_is_loadable() -> bool:
    """Whether a worker can import the parent's ``__main__`` (it has a file or a name)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return bool(getattr(spec, "name", None) or getattr(main, "__file__", None))
