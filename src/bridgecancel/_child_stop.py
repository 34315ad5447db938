"""Waiting for a child process to exit, and stopping it (and its process group) on cancel."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from typing import Any, Final

from ._blocking_common import POLL_SLICE, wait_sliced
from ._blocking_fd import wait_fd
from ._pidfd import open_pidfd
from ._procfs import all_processes
from ._token import CancelToken
from ._token_current import _NEVER

__all__ = ("Stopper", "wait_exit")

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
