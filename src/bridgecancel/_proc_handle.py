"""One worker process, seen from the parent: start it, talk to it, end it.

A worker is ``python -c "from bridgecancel._worker import main; main()"`` (a plain
import) started with `subprocess`, in its own process group, talking over three private
pipes (see `_proc_wire`). A worker never outlives its parent: its control listener exits
when the control pipe closes. `_proc_pool` keeps the idle ones.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import Final

import anyio

from . import _proc_wire as wire
from ._pidfd import open_pidfd

_SRC_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A plain import: the package's __init__ loads no anyio (its anyio-backed names are lazy),
# so the worker stays standard-library only. The package's own directory goes first on the
# path, so the worker runs the same bridgecancel as its parent.
_BOOT: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from bridgecancel._worker import main; main()"
)


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
        """Start a worker. It boots while the first job is already waiting in its pipe."""
        fds: list[int] = []
        try:
            job_r, job_w = _pipe(fds)
            ctl_r, ctl_w = _pipe(fds)
            res_r, res_w = _pipe(fds)
            child_ends = (job_r, ctl_r, res_w)
            args = [sys.executable, "-c", _BOOT, _SRC_DIR, *map(str, child_ends)]
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
            wire.write_all(job_w, wire.job_message(wire.CONFIG_JOB_ID, math.inf, _config()))
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
        """The next ``(job id, kind, payload)`` from the worker; None once it has exited.

        Cancellable, and safe to call again after a cancel: a partly read message stays
        in the buffer.
        """
        buf = self._buf
        size = wire.RESULT_HEADER.size
        while True:
            need = size
            if len(buf) >= size:
                length, job_id, kind = wire.RESULT_HEADER.unpack_from(buf)
                need = size + length
                if len(buf) >= need:
                    payload = bytes(buf[size:need])
                    del buf[:need]
                    return job_id, kind, payload
            # Wait first: right after a job is sent, a read would only fail with EAGAIN.
            await anyio.wait_readable(self._res_r)
            try:
                chunk = os.read(self._res_r, max(65536, need - len(buf)))
            except BlockingIOError:
                continue
            if not chunk:
                return None
            buf += chunk

    def control(self, kind: int, job_id: int, reason: str | None = None) -> None:
        """Send a cancel or interrupt record; best effort (a dead worker needs neither)."""
        try:
            os.write(self._ctl_w, wire.control_record(kind, job_id, reason))
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

    def release(self) -> None:
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
        self.release()
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


def _config() -> bytes:
    """What a worker needs from the parent: its import path, and where __main__ lives."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    main_name = getattr(spec, "name", None)
    if main_name == "__main__":  # a directory or zip run as a script: use its path
        main_name = None
    main_path = getattr(main, "__file__", None)
    config = {
        "sys_path": list(sys.path),
        "main_name": main_name,
        "main_path": os.path.abspath(main_path) if main_path else None,
    }
    return pickle.dumps(config, pickle.HIGHEST_PROTOCOL)


def main_is_loadable() -> bool:
    """Whether a worker can import the parent's ``__main__`` (it has a file or a name)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return bool(getattr(spec, "name", None) or getattr(main, "__file__", None))
