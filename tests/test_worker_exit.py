"""How a worker process ends: always at once (``os._exit``), never outliving its parent.

Issue 8, defect 2, and the unprintable exception noticed beside it.

One test calls the worker's private failure path (`bridgecancel._process._child._fail`)
in a plain interpreter: from outside, bridgecancel's own code in a worker can only be
made to fail by the KeyboardInterrupt trick the other tests use, which cannot show that
the exit skips interpreter shutdown (the ``atexit`` handler).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

import _proc_helpers as proc_helpers
import _worker_exit_helpers as h
from bridgecancel import BrokenWorkerError, run_process

pytestmark = pytest.mark.anyio

# A worker's exit status when bridgecancel's own code in it failed (EX_SOFTWARE), as
# docs/processes.md promises.
FAILED_EXIT = 70

TESTS_DIR = Path(__file__).parent


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("with_deadline", [False, True])
async def test_an_escape_from_the_worker_loop_breaks_that_call_only(
    with_deadline: bool,
) -> None:
    """A KeyboardInterrupt while pickling the result: the worker exits at once."""

    async def call() -> None:
        if with_deadline:
            with anyio.fail_after(600):  # the job token carries a deadline
                await run_process(h.return_interrupting_result, with_deadline)
        else:
            await run_process(h.return_interrupting_result, with_deadline)

    worker = await run_process(h.pid)
    # Before the fix: the worker hung in its interpreter shutdown, and so did the call.
    with anyio.fail_after(30), pytest.raises(BrokenWorkerError) as info:
        await call()
    assert info.value.exitcode == FAILED_EXIT
    assert not alive(worker)
    assert await run_process(h.pid) != worker  # the pool recovered


async def test_a_failed_worker_is_blamed_on_bridgecancel_not_on_sys_exit() -> None:
    # Exit status 70 is bridgecancel's own code failing in the worker: no sys.exit() hint.
    with anyio.fail_after(30), pytest.raises(BrokenWorkerError) as info:
        await run_process(h.return_interrupting_result, False)
    assert info.value.exitcode == FAILED_EXIT
    message = str(info.value)
    assert "bridgecancel's own code in the worker failed" in message
    assert "stderr" in message
    assert "sys.exit" not in message
    # A job's own exit status keeps the hint.
    with anyio.fail_after(30), pytest.raises(BrokenWorkerError) as info:
        await run_process(proc_helpers.exit_with, 3)
    assert "did it call sys.exit() or os._exit()?" in str(info.value)


def test_a_failing_worker_reports_on_stderr_and_exits_at_once() -> None:
    code = (
        "import atexit, time\n"
        "atexit.register(time.sleep, 3600)\n"  # skipped: no interpreter shutdown
        "from bridgecancel._process._child import _fail\n"
        "try:\n"
        "    raise KeyboardInterrupt\n"
        "except BaseException as exc:\n"
        "    _fail('serving jobs', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == FAILED_EXIT
    assert "serving jobs failed" in result.stderr
    assert "KeyboardInterrupt" in result.stderr
    assert "BrokenWorkerError" in result.stderr


async def test_an_unprintable_unpicklable_exception_keeps_the_worker() -> None:
    worker = await run_process(h.pid)
    with pytest.raises(pickle.PicklingError) as info:
        await run_process(h.raise_unprintable)
    message = str(info.value)
    assert "UnprintableError" in message
    assert "str() failed" in message
    assert "sys.exit" not in message
    assert await run_process(h.pid) == worker  # it stayed up and is reused


async def test_an_exception_whose_pickling_raises_keyboard_interrupt_keeps_the_worker() -> None:
    worker = await run_process(h.pid)
    with pytest.raises(pickle.PicklingError, match="InterruptingError: x"):
        await run_process(h.raise_interrupting)
    assert await run_process(h.pid) == worker


PARENT = textwrap.dedent(
    """
    import os, sys, anyio
    import _worker_exit_helpers as h
    from bridgecancel import run_process

    async def main():
        prefix, names = sys.argv[1], sys.argv[2:]
        limiter = anyio.CapacityLimiter(len(names) + 1)
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(
                    lambda f=getattr(h, name), path=prefix + name: run_process(
                        f, path, limiter=limiter
                    )
                )
            while not all(os.path.exists(prefix + name) for name in names):
                await anyio.sleep(0.005)
            # A worker of its own, idle in the pool from now on.
            print(await run_process(h.pid, limiter=limiter), flush=True)

    anyio.run(main, backend=sys.argv[1].rsplit("/", 1)[1].split("-")[0])
    """
)

BUSY_STATES = ("spin", "wait_on_token", "sleep_in_c", "ignore_signals_and_sleep")


@pytest.mark.slow
def test_workers_never_outlive_a_killed_parent_in_any_state(
    tmp_path: Path, anyio_backend: str
) -> None:
    prefix = str(tmp_path / f"{anyio_backend}-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, prefix, *BUSY_STATES],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        idle = parent.stdout.readline()  # once every busy job has started
        assert idle, "the parent failed before its jobs started"
        pids = [int(idle)]
        pids += [int(Path(prefix + name).read_text()) for name in BUSY_STATES]
        assert len(set(pids)) == len(pids)
        assert all(alive(pid) for pid in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [pid for pid in pids if alive(pid)] == []
