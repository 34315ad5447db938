"""`bridgecancel.blocking`'s process waits: waiting for, and stopping, child processes.

The last tests are private: the process-group watcher (`bridgecancel.blocking._subprocess`,
how a stopped child's group is known to be empty without scanning /proc every time) and
the /proc and pidfd helpers (`bridgecancel._util`) have no public surface of their own.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Any

import anyio
import pytest

import bridgecancel
from _blocking_harness import (
    PROMPT,
    PY,
    Worker,
    wait_blocked,
    wait_until,
)
from bridgecancel import Cancelled, CancelSource, blocking
from bridgecancel._util import all_processes, open_pidfd
from bridgecancel.blocking import _subprocess as _child_stop

# -- processes --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for init to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _sleeper(*extra: str) -> list[str]:
    return [PY, "-c", "import sys, time; print('up', flush=True); time.sleep(60)", *extra]


def test_wait_process_success_and_timeout() -> None:
    token = CancelSource().token
    proc = subprocess.Popen([PY, "-c", "raise SystemExit(3)"])
    assert blocking.wait_process(proc, token=token) == 3
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            blocking.wait_process(proc, 0.1, token=token)
        assert proc.poll() is None  # a timeout leaves the child running, as Popen.wait
    finally:
        proc.kill()
        proc.wait()


def test_wait_process_cancel_terminates_the_child() -> None:
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.PIPE)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        source = CancelSource()
        worker = Worker(lambda: blocking.wait_process(proc, token=source.token))
        wait_blocked(worker.thread)
        started = time.perf_counter()
        source.cancel()
        worker.cancelled(source.token)
        assert worker.ended_at - started < PROMPT
        assert proc.returncode == -signal.SIGTERM


@pytest.mark.slow
def test_wait_process_cancel_kills_a_child_ignoring_sigterm_after_grace() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        source = CancelSource()
        source.cancel()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            blocking.wait_process(proc, grace=0.3, token=source.token)
        assert 0.25 < time.monotonic() - started < PROMPT
        assert proc.returncode == -signal.SIGKILL


def test_wait_process_with_the_never_cancelled_token_is_popen_wait() -> None:
    proc = subprocess.Popen([PY, "-c", "pass"])
    assert blocking.wait_process(proc) == 0


def test_run_subprocess_like_subprocess_run() -> None:
    token = CancelSource().token
    code = "import sys; d = sys.stdin.read(); print(d.upper()); print('e', file=sys.stderr)"
    result = blocking.run_subprocess(
        [PY, "-c", code],
        input="abc\r\n",
        capture_output=True,
        text=True,
        token=token,
    )
    expected = subprocess.run(
        [PY, "-c", code],
        input="abc\r\n",
        capture_output=True,
        text=True,
    )
    assert result.stdout == expected.stdout
    assert result.stderr == expected.stderr == "e\n"
    assert result.returncode == 0
    binary = blocking.run_subprocess(
        [PY, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])"],
        input=b"\x00\x01" * 100_000,
        stdout=subprocess.PIPE,
        token=token,
    )
    assert binary.stdout == (b"\x00\x01" * 100_000)[::-1]
    assert binary.stderr is None


def test_run_subprocess_check_and_errors() -> None:
    token = CancelSource().token
    with pytest.raises(subprocess.CalledProcessError) as info:
        blocking.run_subprocess(
            [PY, "-c", "print('out'); raise SystemExit(2)"],
            capture_output=True,
            check=True,
            token=token,
        )
    assert info.value.returncode == 2
    assert info.value.stdout == b"out\n"
    with pytest.raises(ValueError, match="stdin and input"):
        blocking.run_subprocess([PY, "-c", "pass"], input=b"", stdin=subprocess.PIPE)
    with pytest.raises(ValueError, match="capture_output"):
        blocking.run_subprocess([PY, "-c", "pass"], capture_output=True, stdout=subprocess.PIPE)
    with pytest.raises(TypeError, match="text=True"):
        blocking.run_subprocess([PY, "-c", "pass"], input="str without text mode")


@pytest.mark.slow
def test_run_subprocess_timeout_kills_and_keeps_partial_output() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        blocking.run_subprocess(_sleeper(), capture_output=True, timeout=1.0)
    assert info.value.stdout == b"up\n"
    assert info.value.timeout == 1.0


def test_run_subprocess_cancel_before_never_starts_the_child(tmp_path: Any) -> None:
    marker = tmp_path / "started"
    source = CancelSource()
    source.cancel()
    with pytest.raises(Cancelled):
        blocking.run_subprocess([PY, "-c", f"open({str(marker)!r}, 'w')"], token=source.token)
    assert not marker.exists()


def test_run_subprocess_cancel_stops_the_whole_process_tree(tmp_path: Any) -> None:
    pids = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}')\n"
        "time.sleep(60)\n"
    )
    source = CancelSource()
    worker = Worker(lambda: blocking.run_subprocess([PY, "-c", code], token=source.token))
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, "the tree is up")
    child, grandchild = map(int, pids.read_text().split())
    source.cancel()
    worker.cancelled(source.token)
    assert not _alive(child)
    wait_until(lambda: not _alive(grandchild), "the grandchild is gone", timeout=PROMPT)


def test_run_subprocess_from_current_token_in_a_thread(tmp_path: Any) -> None:
    source = CancelSource()
    worker = Worker(
        lambda: blocking.run_subprocess(_sleeper(), stdout=subprocess.DEVNULL), current=source.token
    )
    wait_blocked(worker.thread)
    source.cancel()
    worker.cancelled(source.token)


@pytest.mark.slow
def test_process_waits_use_no_cpu() -> None:
    source = CancelSource()
    worker = Worker(
        lambda: blocking.run_subprocess(_sleeper(), capture_output=True, token=source.token)
    )
    wait_blocked(worker.thread)
    time.sleep(0.5)
    source.cancel()
    worker.cancelled(source.token)
    assert worker.switches < 30
    assert worker.cpu < 0.05


@pytest.mark.anyio
@pytest.mark.slow
async def test_wait_process_uses_the_run_sync_token(anyio_backend: str) -> None:
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.PIPE, start_new_session=True)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        with anyio.move_on_after(0.2) as scope:
            await bridgecancel.run_sync(blocking.wait_process, proc)
        assert scope.cancelled_caught
        assert anyio.current_time() - scope.deadline < PROMPT
        assert proc.returncode == -signal.SIGTERM


# -- process-group liveness -------------------------------------------------------------


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_group_left_with_only_a_zombie_is_not_alive() -> None:
    # killpg(pgid, 0) answers for zombies too: the watch scans /proc before it believes it.
    proc = subprocess.Popen([PY, "-c", "pass"], start_new_session=True)
    try:
        wait_until(lambda: _state(proc.pid) == "Z", "the child is a zombie")
        watch = _child_stop._GroupWatch(proc.pid)
        assert watch.alive()  # kill(0) answers, and no scan is due yet
        watch.next_scan = 0.0
        assert not watch.alive()
    finally:
        proc.wait()
    assert not _child_stop._GroupWatch(proc.pid).alive()  # reaped: kill(0) says so


def test_stopping_a_group_that_empties_scans_no_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    scans: list[int] = []
    scan = _child_stop._live_member

    def counted(pgid: int) -> bool:
        scans.append(pgid)
        return scan(pgid)

    monkeypatch.setattr(_child_stop, "_live_member", counted)
    source = CancelSource()
    proc = subprocess.Popen(_sleeper(), stdout=subprocess.PIPE, start_new_session=True)
    with proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        worker = Worker(lambda: blocking.wait_process(proc, token=source.token))
        wait_blocked(worker.thread)
        source.cancel()
        worker.cancelled(source.token)
    assert proc.returncode == -signal.SIGTERM
    assert scans == []


def test_procfs_lists_this_process_with_its_parent_and_group() -> None:
    processes = all_processes()
    assert processes is not None
    me = [p for p in processes if p.pid == os.getpid()]
    assert len(me) == 1
    assert (me[0].ppid, me[0].pgid, me[0].state) == (os.getppid(), os.getpgrp(), "R")


def test_pidfd_is_readable_once_the_child_exits_and_none_once_reaped() -> None:
    proc = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    fd = open_pidfd(proc.pid)
    assert fd is not None
    try:
        assert select.select([fd], [], [], 0)[0] == []
        assert proc.stdin is not None
        proc.stdin.close()
        assert select.select([fd], [], [], 10)[0] == [fd]
    finally:
        os.close(fd)
        proc.wait()
    assert open_pidfd(proc.pid) is None
