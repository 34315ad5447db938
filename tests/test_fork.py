"""A fork while another thread holds one of bridgecancel's locks (issue 15, item 5).

A metrics exporter polls `statistics()` in its thread; the main thread forks (a
``multiprocessing`` fork, a pre-fork server). The child has only the forking thread, so a
lock the exporter held stays held there for ever, unless the package makes it new in the
child. Every module-level lock of the package must be (per-object locks, a guard's or a
wait's, belong to a thread or a call that the child does not have).

Each case runs in a fresh interpreter: a thread holds the lock while the main thread
forks, and the child, bounded by an alarm, calls `statistics()` and `run_sync` and
takes the lock. To hold the lock for certain rather than by chance, the holder takes it
by its private name: nothing public holds it longer than a few instructions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _proc_helpers as h
from bridgecancel import run_process

TESTS_DIR = Path(__file__).parent

# Where each module-level lock lives: "module:attribute.path".
LOCKS = {
    "statistics": "bridgecancel._supervise:counters.lock",
    "process pool": "bridgecancel._process._pool:pool._lock",
    "cluster plugins": "bridgecancel._dask_cluster:_install_lock",
    "cluster tasks": "bridgecancel._dask_cluster:_running_lock",
}

FORK_SCRIPT = textwrap.dedent(
    """
    import functools, importlib, os, signal, sys, threading
    import anyio
    from bridgecancel import run_sync, statistics

    def lock_at(where):
        module, path = where.split(":")
        obj = importlib.import_module(module)
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj

    where, backend = sys.argv[1], sys.argv[2]
    held, release = threading.Event(), threading.Event()

    def holder():  # a metrics exporter in the middle of statistics(), say
        with lock_at(where):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # the bound: a child that hangs dies of SIGALRM
        statistics()
        assert anyio.run(functools.partial(run_sync, int, "7"), backend=backend) == 7
        assert lock_at(where).acquire(timeout=5)  # nobody in this process holds it
        os._exit(0)
    release.set()
    thread.join()
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("lock", list(LOCKS))
def test_a_fork_while_another_thread_holds_a_lock_leaves_the_child_working(
    lock: str, anyio_backend: str
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_SCRIPT, LOCKS[lock],
         anyio_backend],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    # Before the fix the child hung and its alarm killed it (-14, SIGALRM).
    assert result.stdout.split() == ["0"], result.stderr


@pytest.mark.anyio
async def test_a_fork_in_a_process_job_while_the_worker_holds_its_lock() -> None:
    """A job forks while the worker's control listener holds the worker's lock."""
    assert await run_process(h.fork_while_the_worker_lock_is_held) == 0
