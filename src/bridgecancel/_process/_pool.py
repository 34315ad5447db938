"""The pool of worker processes: one per parent process, shared by every event loop.

Idle workers are reused most-recent first, retire after `IDLE_TIMEOUT` seconds, and are
shut down at interpreter exit. A worker outlives event loops on purpose (the next
`asyncio.run` gets a warm worker). New workers are started in a worker thread, so a slow
start never stalls the event loop. A retiring worker takes its process group with it:
what its jobs left there is killed once it has exited.

A caller never waits for a worker it no longer needs: one that leaves while its worker
is still starting, or while the worker is still loading a job that will now never
start, hands the worker to the pool, which reads the worker's answer (``READY``, or that
job's last record) and then keeps it idle (`Pool.settle`).

One thread, ``bridgecancel idle reaper``, exists while the pool holds idle, settling or
retiring workers: it retires idle workers on time, reads settling workers' answers, and
reaps the ones that exit.
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
# A settling worker that has not answered by then (a boot or a module import that hangs)
# is retired: nobody is waiting for it, and it would hold a process for nothing.
_SETTLE_LIMIT: Final = 60.0


class Pool:
    """The idle workers of this process, and the thread that retires and reaps them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[WorkerProcess] = []  # most recently used last
        self._settling: list[WorkerProcess] = []  # the pool reads their answer
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
        Then the worker boots (the interpreter starts, imports its modules) and says
        ``READY``. A caller cancelled meanwhile leaves at once: the worker, once started,
        is the pool's (`settle`), and joins the idle ones when it is ready.
        """
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.exit_status() is None:
                    return worker
                self._discard_locked(worker)  # died while idle: already reaped by poll()
        start = _Start()
        try:
            # A limiter of its own: starting a worker never waits behind the default
            # thread limiter, which the caller's other work may hold.
            worker = await anyio.to_thread.run_sync(
                self._spawn, start, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
            )
            await worker.wait_ready()
        except BaseException:
            with self._lock:
                start.left = True
                if start.worker is not None:
                    self._settle_locked(start.worker, wire.CONFIG_JOB_ID)
            raise
        return worker

    def _spawn(self, start: _Start) -> WorkerProcess:
        """In a worker thread: start a worker, for the caller or, if it left, the pool."""
        worker = WorkerProcess.spawn()
        with self._lock:
            self._all.add(worker)
            if start.left:
                self._settle_locked(worker, wire.CONFIG_JOB_ID)
            else:
                start.worker = worker
        return worker

    def give_back(self, worker: WorkerProcess) -> None:
        """Return a worker whose job ended cleanly, for reuse."""
        worker.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(worker)
            self._ensure_thread_locked()

    def settle(self, worker: WorkerProcess, job_id: int) -> None:
        """Take over a worker whose caller left before the worker answered.

        The worker is still starting (`job_id` is ``CONFIG_JOB_ID``) or still loading
        job `job_id`, which will never start. The reaper thread reads its answer
        (``READY``, or the job's last record) and then keeps it idle; a worker that
        says anything else, exits, or has not answered within `_SETTLE_LIMIT` seconds is
        retired.
        """
        with self._lock:
            self._settle_locked(worker, job_id)

    def _settle_locked(self, worker: WorkerProcess, job_id: int) -> None:
        worker.awaited = job_id
        worker.settle_deadline = time.monotonic() + _SETTLE_LIMIT
        self._settling.append(worker)
        self._ensure_thread_locked()
        self._wake_locked()

    def retire(self, worker: WorkerProcess, *, kill: bool = False) -> None:
        """Let a worker exit (or kill it) and have the reaper thread reap it."""
        with self._lock:
            self._retire_locked(worker, kill=kill)

    def _retire_locked(self, worker: WorkerProcess, *, kill: bool) -> None:
        worker.close_pipes()
        if kill:
            worker.kill()
        worker.retire_deadline = time.monotonic() + _RETIRE_GRACE
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
                for worker in self._settling:
                    poller.register(worker.answer_fd(), select.POLLIN)
                wake_r = self._wake_r
            events = poller.poll(max(0.0, timeout) * 1000)
            if any(fd == wake_r for fd, _ in events):
                try:
                    os.read(wake_r, 4096)
                except (BlockingIOError, OSError):
                    pass

    def _reap_once_locked(self, now: float) -> float | None:
        """Reap, retire and kill what is due; the seconds until next due (None: stop)."""
        settling: list[WorkerProcess] = []
        for worker in self._settling:
            answered = worker.settled()
            if answered:
                worker.idle_since = now
                self._idle.append(worker)
            elif answered is None and now < worker.settle_deadline:
                settling.append(worker)
            else:  # it exited, said something else, or hangs: nobody may use it
                self._retire_locked(worker, kill=True)
        self._settling = settling
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
        if not self._idle and not self._settling and not self._retiring:
            return None
        due = [_LIVENESS_PERIOD]
        due += (w.idle_since + self.idle_timeout - now for w in self._idle)
        due += (w.settle_deadline - now for w in self._settling)
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
            self._settling.clear()
            self._retiring.clear()
            self._all.clear()
            self._wake_locked()
        for worker in workers:
            worker.close_pipes()  # idle (and starting) workers exit; busy ones kill their group
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
        self._idle, self._settling, self._retiring, self._all = [], [], [], set()
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


class _Start:
    """A worker being started for a caller; whoever is second (the caller leaving, or
    the thread that started it) hands it to the pool. Guarded by the pool's lock."""

    __slots__ = ("left", "worker")

    def __init__(self) -> None:
        self.left = False  # the caller has left (cancelled, or it failed)
        self.worker: WorkerProcess | None = None  # started, and not yet the pool's


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
# talks over four private pipes (see `_wire`). A worker never outlives its parent: its
# control listener exits when the control pipe closes. The `Pool` above keeps the idle
# ones.

_SRC_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerProcess:
    """One worker process and the parent's ends of its pipes."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        job_w: int,
        ctl_w: int,
        res_r: int,
        claim_r: int,
        claim_w: int,
    ) -> None:
        self.pid: Final = proc.pid
        self._proc = proc
        self._job_w = job_w
        self._ctl_w = ctl_w
        self._res_r = res_r
        self._claim_r = claim_r  # the worker reads this pipe too: see `withdraw`
        self._claim_w = claim_w
        pidfd = open_pidfd(proc.pid)
        self._pidfd = -1 if pidfd is None else pidfd
        self._buf = bytearray()
        self._last_job_id = 0
        self.idle_since = 0.0
        self.awaited = 0  # while settling: the job whose last record the pool awaits
        self.settle_deadline = math.inf
        self.retire_deadline = math.inf
        self.killed = False

    @classmethod
    def spawn(cls) -> WorkerProcess:
        """Start a worker. It boots while its path and configuration wait in its pipe."""
        fds: list[int] = []
        try:
            job_r, job_w = _pipe(fds)
            ctl_r, ctl_w = _pipe(fds)
            res_r, res_w = _pipe(fds)
            claim_r, claim_w = _pipe(fds)
            os.set_blocking(claim_r, False)  # both sides: a claim is taken at once or never
            child_ends = (job_r, ctl_r, res_w, claim_r)
            # -P (3.11+): the working directory is never put on sys.path, not even for
            # what the interpreter imports before BOOT runs (3.13 imports traceback and
            # linecache there); on 3.10, BOOT replaces the path before its first import.
            safe_path = ["-P"] if sys.version_info >= (3, 11) else []
            args = [sys.executable, *safe_path, "-c", wire.BOOT, *map(str, child_ends)]
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
        for fd in (job_r, ctl_r, res_w):  # the parent keeps claim_r: it may withdraw
            os.close(fd)
        worker = cls(proc, job_w, ctl_w, res_r, claim_r, claim_w)
        try:
            # Small, into an empty pipe: this does not block (a huge sys.path would only
            # wait for the worker to read it, which it does first thing).
            wire.write_all(
                job_w,
                wire.boot_record(_boot_path())
                + wire.job_message(wire.CONFIG_JOB_ID, math.inf, _config()),
            )
        except BrokenPipeError:
            pass  # it died at start-up; its first job finds out
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

    def post_claim(self) -> None:
        """Put the next job's claim in the claims pipe; call just before sending it."""
        os.write(self._claim_w, b"\0")  # one byte into a pipe that holds none: never blocks

    def withdraw(self) -> bool:
        """Take the sent job's claim back, for a caller cancelled before it began.

        True if the job will now never start (the worker will answer it ``CANCELLED``,
        or ``LOAD_FAILED``); False if the worker has claimed it: its function has begun,
        or is about to (``STARTED`` is on its way), or it stopped before that, for the
        cancel it saw or because it could not load the job.
        """
        try:
            return os.read(self._claim_r, 1) == b"\0"
        except BlockingIOError:
            return False

    async def receive(self) -> tuple[int, int, bytes] | None:
        """The next ``(job id, tag, payload)`` from the worker; None once it has exited.

        Cancellable, and safe to call again after a cancel: a partly read message stays
        in the buffer.
        """
        while True:
            record = self._next_record()
            if record is not None:
                return record
            # Wait first: right after a job is sent, a read would only fail with EAGAIN.
            await anyio.wait_readable(self._res_r)
            try:
                chunk = os.read(self._res_r, max(65536, self._needed()))
            except BlockingIOError:
                continue
            if not chunk:
                return None
            self._buf += chunk

    async def wait_ready(self) -> None:
        """Wait until a new worker has booted: ``READY``, or the end of its results pipe
        (it died at start-up; the job sent to it finds out). Cancellable, as `receive`."""
        await self.receive()

    def _next_record(self) -> tuple[int, int, bytes] | None:
        """The next whole ``(job id, tag, payload)`` in the buffer, taken out of it."""
        buf = self._buf
        size = wire.RESULT_HEADER.size
        if len(buf) < size:
            return None
        length, job_id, tag = wire.RESULT_HEADER.unpack_from(buf)
        if len(buf) < size + length:
            return None
        payload = bytes(buf[size : size + length])
        del buf[: size + length]
        return job_id, tag, payload

    def _needed(self) -> int:
        """Bytes still missing from the next record (a header's worth if unknown)."""
        size = wire.RESULT_HEADER.size
        if len(self._buf) < size:
            return size - len(self._buf)
        length: int = wire.RESULT_HEADER.unpack_from(self._buf)[0]
        return size + length - len(self._buf)

    # -- a settling worker, read by the pool's reaper thread ------------------------------

    def answer_fd(self) -> int:
        """The descriptor that becomes readable when the worker says something."""
        return self._res_r

    def settled(self) -> bool | None:
        """Whether a settling worker has answered as it should; None: not yet.

        It should say ``READY`` (if `awaited` is ``CONFIG_JOB_ID``) or end job `awaited`
        without starting it, and nothing more. False if it says anything else, or has
        closed its results pipe (it is exiting).
        """
        while True:
            try:
                chunk = os.read(self._res_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                return False
            self._buf += chunk
        record = self._next_record()
        if record is None:
            return None
        job_id, tag, _ = record
        if self._buf:  # more than one answer: not what a settling worker says
            return False
        if self.awaited == wire.CONFIG_JOB_ID:
            return job_id == wire.CONFIG_JOB_ID and tag == wire.READY
        return job_id == self.awaited and tag in wire.RESULT_TAGS

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
        self._close("_job_w", "_ctl_w", "_res_r", "_claim_r", "_claim_w", "_pidfd")

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
