"""Token-aware child processes: ``wait_process`` and ``run_subprocess``.

A cancel stops the child (SIGTERM, SIGKILL after a grace period; its whole process group
when it leads one) before `Cancelled` is raised: see `_child_stop.Stopper`.
"""

from __future__ import annotations

import io
import math
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import IO, Any, Final

from .._tokens import _NEVER, Cancelled, CancelToken
from .._util import all_processes, open_pidfd
from ._common import (
    DEFAULT_GRACE,
    POLL_SLICE,
    begin,
    cancelled,
    check_seconds,
    check_type,
    remaining,
    wait_sliced,
)
from ._fd import HAVE_POLL, READ, wait_fd

__all__ = (
    "Stopper",
    "run_subprocess",
    "wait_exit",
    "wait_process",
)

StrOrBytesPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]  # typeshed's name


def wait_process(
    proc: subprocess.Popen[Any],
    timeout: float | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    token: CancelToken | None = None,
) -> int:
    """``proc.wait(timeout)``, stopping the child and raising `Cancelled` on cancel.

    Returns the child's exit code. On cancel (also when the token has already fired),
    the child gets SIGTERM, and SIGKILL if it has not exited `grace` seconds later; if
    it leads its own process group (``start_new_session=True`` or ``process_group=0``),
    the signals go to the whole group, whose members also get the rest of `grace`.
    `Cancelled` is raised once the child is reaped and its group is empty.
    Event-driven where the OS has pidfd (Linux 5.3+); elsewhere slices of `POLL_SLICE`.

    Raises:
        Cancelled: if the token fires before or during the wait.
        subprocess.TimeoutExpired: if `timeout` seconds pass first (the child runs on).
    """
    check_type(proc, subprocess.Popen, "wait_process", "a subprocess.Popen")
    grace = check_seconds(grace, "wait_process", "grace")
    # A token that has fired must still stop the child: no checkpoint before that.
    token, deadline, never = begin("wait_process", token, timeout, check=False)
    if never:
        return proc.wait(timeout)
    stopper = Stopper(proc)
    try:
        with token.on_cancel(stopper):
            if token.cancel_called:
                raise cancelled(token)
            if not wait_exit(proc, token, deadline):
                raise subprocess.TimeoutExpired(proc.args, timeout)  # type: ignore[arg-type]
    except Cancelled:
        stopper.stop(grace)
        raise
    stopper.finish()
    return proc.wait()


def _codec(encoding: str | None, errors: str | None) -> tuple[str, str]:
    """The encoding and error handler ``Popen`` would use for text pipes."""
    probe = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)
    return probe.encoding, probe.errors or "strict"


def _decode(data: bytes | None, codec: tuple[str, str] | None) -> str | bytes | None:
    # As Popen.communicate does in text mode: decode, then universal newlines.
    if codec is None or data is None:
        return data
    return data.decode(*codec).replace("\r\n", "\n").replace("\r", "\n")


def _encode_input(input: bytes | str | None, codec: tuple[str, str] | None) -> bytes | None:
    if input is None:
        return None
    if isinstance(input, str):
        if codec is None:
            raise TypeError(
                "run_subprocess() got str input without text mode: pass bytes, "
                "or text=True (or an encoding)"
            )
        return input.encode(*codec)
    if codec is not None:
        raise TypeError(
            "run_subprocess() in text mode takes str input, got bytes: decode it, or drop text=True"
        )
    return bytes(input)


class _Output:
    """What a child wrote to its pipes so far."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[bytes]] = {}

    def of(self, file: IO[bytes] | None) -> bytes | None:
        if file is None:
            return None
        return b"".join(self.chunks.get(id(file), []))


def _communicate(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    token: CancelToken,
    deadline: float | None,
    output: _Output,
) -> None:
    """``proc.communicate(data)`` that also wakes when the token fires; no reaping.

    Raises `Cancelled` or `subprocess.TimeoutExpired` (without output: the caller adds
    it) with the pipes still open.
    """
    if proc.stdin is not None and not data:
        proc.stdin.close()
    if not HAVE_POLL:  # pragma: no cover - Windows
        _communicate_sliced(proc, data, token, deadline, output)
        return
    poller = select.poll()
    files: dict[int, IO[bytes]] = {}
    if proc.stdin is not None and data:
        files[proc.stdin.fileno()] = proc.stdin
        poller.register(proc.stdin.fileno(), select.POLLOUT)
    for file in (proc.stdout, proc.stderr):
        if file is not None:
            output.chunks[id(file)] = []
            files[file.fileno()] = file
            poller.register(file.fileno(), READ)
    if not token._never:
        poller.register(token.fileno(), select.POLLIN)
    view = memoryview(data or b"")
    offset = 0
    while files:
        left = remaining(deadline)
        ready = poller.poll(None if left is None else math.ceil(left * 1000))
        if token.cancel_called:
            raise cancelled(token)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, 0)
        for fd, _ in ready:
            file = files.get(fd)
            if file is None:
                continue
            if file is proc.stdin:
                try:
                    offset += os.write(fd, view[offset : offset + select.PIPE_BUF])
                except BrokenPipeError:
                    offset = len(view)
                done = offset >= len(view)
            else:
                chunk = os.read(fd, 65536)
                output.chunks[id(file)].append(chunk)
                done = not chunk
            if done:
                poller.unregister(fd)
                del files[fd]
                file.close()
    if not wait_exit(proc, token, deadline):
        raise subprocess.TimeoutExpired(proc.args, 0)


def _communicate_sliced(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    token: CancelToken,
    deadline: float | None,
    output: _Output,
) -> None:  # pragma: no cover - Windows only
    pending = [data]  # the input goes with the first slice only

    def attempt(seconds: float) -> bool:
        try:
            out, err = proc.communicate(pending.pop() if pending else None, timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        for file, chunk in ((proc.stdout, out), (proc.stderr, err)):
            if file is not None:
                output.chunks[id(file)] = [chunk]
        return True

    if not wait_sliced(attempt, token, deadline):
        raise subprocess.TimeoutExpired(proc.args, 0)


def _popen_kwargs(
    popen_kwargs: dict[str, Any], input: object, capture_output: bool
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """``Popen``'s arguments for `run_subprocess`, and the text codec (None: binary).

    Pipes stay binary; text mode is applied here, as ``Popen.communicate`` does it.
    """
    kwargs = dict(popen_kwargs)
    text = kwargs.pop("text", None)
    universal_newlines = kwargs.pop("universal_newlines", None)
    encoding = kwargs.pop("encoding", None)
    errors = kwargs.pop("errors", None)
    codec = _codec(encoding, errors) if text or universal_newlines or encoding or errors else None
    if input is not None:
        if "stdin" in kwargs:
            raise ValueError("stdin and input arguments may not both be used.")
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        if "stdout" in kwargs or "stderr" in kwargs:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if "start_new_session" not in kwargs and "process_group" not in kwargs:
        kwargs["start_new_session"] = True
    return kwargs, codec


def run_subprocess(
    args: StrOrBytesPath | Sequence[StrOrBytesPath],
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    grace: float = DEFAULT_GRACE,
    token: CancelToken | None = None,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(args, ...)``, stopping the child and raising `Cancelled` on cancel.

    Takes ``subprocess.run``'s arguments (`input`, `capture_output`, `timeout`, `check`,
    and ``Popen``'s: ``stdout``, ``text``, ``cwd``, ...) and returns the same
    `subprocess.CompletedProcess`. The child is started in a new session (its own
    process group) unless ``start_new_session`` or ``process_group`` is given, so that
    a cancel or a timeout reaches the processes it starts too.

    On cancel (including a token that has already fired: the child is then never
    started), the group gets SIGTERM, then SIGKILL `grace` seconds later if anything is
    left in it; `Cancelled` is raised once the child is reaped and the group is empty.
    On timeout, the group is killed at once, as ``subprocess.run`` kills the child.
    Event-driven on Linux (pipes and pidfd); elsewhere slices of `POLL_SLICE`.

    Raises:
        Cancelled: if the token fires before or while the child runs.
        subprocess.TimeoutExpired: if `timeout` seconds pass first (with the output so far).
        subprocess.CalledProcessError: if `check` is true and the exit code is not 0.
        ValueError: for argument combinations ``subprocess.run`` refuses.
    """
    grace = check_seconds(grace, "run_subprocess", "grace")
    token, deadline, _ = begin("run_subprocess", token, timeout)
    kwargs, codec = _popen_kwargs(popen_kwargs, input, capture_output)
    data = _encode_input(input, codec)
    output = _Output()
    proc: subprocess.Popen[bytes] = subprocess.Popen(args, **kwargs)
    stopper = Stopper(proc)
    try:
        with token.on_cancel(stopper):
            _communicate(proc, data, token, deadline, output)
        stopper.finish()
    except Cancelled:
        stopper.stop(grace)
        raise
    except subprocess.TimeoutExpired:
        stopper.stop(0)  # no grace: subprocess.run kills at once
        raise subprocess.TimeoutExpired(
            proc.args, timeout or 0, output.of(proc.stdout), output.of(proc.stderr)
        ) from None
    except BaseException:
        stopper.stop(0)
        raise
    finally:
        for file in (proc.stdin, proc.stdout, proc.stderr):
            if file is not None:
                file.close()
    returncode = proc.wait()
    result: subprocess.CompletedProcess[Any] = subprocess.CompletedProcess(
        proc.args,
        returncode,
        _decode(output.of(proc.stdout), codec),
        _decode(output.of(proc.stderr), codec),
    )
    if check:
        result.check_returncode()
    return result


# -- waiting for a child, and stopping it -------------------------------------

# Waiting for a child process to exit, and stopping it (and its process group) on cancel.

_SCAN_EVERY: Final = 0.1
"""Seconds between /proc scans while ``killpg(pgid, 0)`` still answers (see `_GroupWatch`)."""


def wait_exit(proc: subprocess.Popen[Any], token: CancelToken, deadline: float | None) -> bool:
    """Wait until the child exits (True, not reaped yet) or the deadline passes (False).

    Event-driven on a pidfd; where the OS has none, the child is polled in slices.
    Raises `Cancelled` when the token fires.
    """
    if proc.returncode is not None:
        return True
    fd = open_pidfd(proc.pid)
    if fd is not None:
        try:
            return wait_fd(fd, select.POLLIN, token, deadline)
        finally:
            os.close(fd)

    def exited(seconds: float) -> bool:
        if proc.poll() is None:
            token.wait(seconds)
        return proc.poll() is not None

    return wait_sliced(exited, token, deadline)


def _own_group(proc: subprocess.Popen[Any]) -> int | None:
    """The child's process group, if it leads one of its own (else None)."""
    try:
        pgid = os.getpgid(proc.pid)
    except (ProcessLookupError, AttributeError):  # gone, or not POSIX
        return None
    return pgid if pgid == proc.pid and pgid != os.getpgrp() else None


def _signal(proc: subprocess.Popen[Any], pgid: int | None, signum: int) -> None:
    if pgid is None:
        if proc.returncode is None:
            proc.send_signal(signum)
        return
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


class _GroupWatch:
    """Whether anything but zombies is left in a process group, asked cheaply.

    ``killpg(pgid, 0)`` is one system call and fails once the group is empty, which is
    how a stopped group usually ends: its members die and init (or a subreaper) reaps
    them. But it also counts zombies, which stay until their parent reaps them, and a
    parent that never does (a container whose PID 1 is not an init) would keep it
    answering forever. So while it answers, /proc is scanned for a live member, at most
    every `_SCAN_EVERY` seconds rather than on every check. A group has no descriptor to
    wait on, and its id cannot be reused while any member is left.
    """

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.next_scan = time.monotonic() + _SCAN_EVERY

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a member changed user
            return True
        now = time.monotonic()
        if now < self.next_scan:
            return True
        self.next_scan = now + _SCAN_EVERY
        return _live_member(self.pgid)


def _live_member(pgid: int) -> bool:
    """Whether /proc shows a member of `pgid` that is not a zombie (True without /proc)."""
    processes = all_processes()
    if processes is None:  # pragma: no cover - no procfs: trust kill(0)
        return True
    return any(p.pgid == pgid and p.state != "Z" for p in processes)


class Stopper:
    """Stops a child: SIGTERM from the cancelling thread, the rest in the waiting one.

    Registered with ``on_cancel`` while the child is waited on, so the child gets its
    SIGTERM the moment ``cancel()`` is called, while the waiter wakes up. The waiter
    calls `finish` before it reaps the child, after which no signal is sent from the
    callback (a reaped child's pid can be reused).
    """

    __slots__ = ("done", "mutex", "pgid", "proc", "terminated")

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.pgid = _own_group(proc) if proc.returncode is None else None
        self.mutex = threading.Lock()
        self.done = False
        self.terminated = False

    def __call__(self) -> None:
        with self.mutex:
            if not self.done and not self.terminated:
                self.terminated = True
                _signal(self.proc, self.pgid, signal.SIGTERM)

    def finish(self) -> None:
        with self.mutex:
            self.done = True

    def stop(self, grace: float) -> None:
        """Terminate the child (its whole group if it leads one), kill it after `grace`.

        Returns once the child is reaped and nothing but zombies is left in its group
        (a killed process takes a moment to die). The child's own children in the
        group get the rest of the grace, and are checked every `POLL_SLICE`.
        """
        proc, pgid = self.proc, self.pgid
        end = time.monotonic() + grace
        with self.mutex:
            self.done = True
            if not self.terminated:
                self.terminated = True
                _signal(proc, pgid, signal.SIGTERM)
        killed = False
        if not wait_exit(proc, _NEVER, end):
            _signal(proc, pgid, signal.SIGKILL)
            killed = True
        proc.wait()
        if pgid is None:
            return
        group = _GroupWatch(pgid)
        while group.alive():
            if not killed and time.monotonic() >= end:
                _signal(proc, pgid, signal.SIGKILL)
                killed = True
            time.sleep(POLL_SLICE)
