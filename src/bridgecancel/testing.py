"""Helpers for testing code that uses bridgecancel.

* `check_no_leaks`: a context manager that fails if the block leaves a thread, a
  running bridgecancel job or a child process behind.
* `assert_cancels_within`: a context manager (``with`` or ``async with``) that cancels
  the block and fails unless it stops within the given number of seconds.
* `idle_worker_pids`: the process ids of the idle pooled worker processes, which outlive
  calls on purpose, for leak checks of your own.
* A pytest plugin named ``bridgecancel.testing``, opt-in as anyio's is: installing
  bridgecancel registers it (a ``pytest11`` entry point); where entry points are not
  loaded, ``-p bridgecancel.testing`` or ``pytest_plugins = ["bridgecancel.testing"]`` in
  a conftest loads it. It provides the fixture ``no_leaked_workers``, which nothing uses
  unless a test asks for it (by name, with ``@pytest.mark.usefixtures``, or for every test
  with pytest's ``usefixtures`` setting), and the setting ``bridgecancel_leak_settle``
  (seconds to wait for stragglers; 5).

This module imports no pytest: the plugin lives in ``bridgecancel._pytest_plugin``, which
pytest loads when it loads this module as a plugin (see `pytest_plugins` below).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from types import TracebackType
from typing import Any, Final

from ._supervise import statistics
from ._tokens import Cancelled, CancelSource, use_token
from ._util import all_processes, check_seconds

__all__ = (
    "IDLE_THREAD_PREFIXES",
    "LeakError",
    "assert_cancels_within",
    "check_no_leaks",
    "idle_worker_pids",
)

# The installed entry point loads the plugin module itself. Where pytest loads this module
# as a plugin instead (``-p`` or a conftest's pytest_plugins with no installed entry point
# of that name, or on pytest 8, which looks a conftest's names up as modules), it loads
# the plugin modules named here too. A name, not an import: the plugin imports this
# module, and this module never imports pytest.
pytest_plugins: Final = ("bridgecancel._pytest_plugin",)

IDLE_THREAD_PREFIXES: Final = ("Trio thread", "AnyIO worker thread", "bridgecancel idle")
"""Names of threads that pools keep on purpose while idle (they retire on their own)."""


class LeakError(AssertionError):
    """A block left a thread, a running job or a child process behind.

    An `AssertionError`, so that test runners report it as a test failure.
    """


def _child_pids() -> set[int]:
    """This process's children, zombies included (a zombie is a child not reaped)."""
    me = os.getpid()
    # Without /proc (not Linux), child processes are not checked.
    return {p.pid for p in all_processes() or [] if p.ppid == me}


def idle_worker_pids() -> set[int]:
    """The process ids of bridgecancel's idle pooled worker processes, as a new set.

    Idle workers outlive the calls that used them on purpose (the next `run_process` gets
    a warm one) until their idle timeout or interpreter exit; they are the child
    processes a leak check should allow, as `check_no_leaks` does. Workers running a
    job are not idle, and not listed.
    """
    from ._process._pool import pool  # only now: it loads the process machinery

    return pool.idle_pids()


def _running_jobs() -> int:
    """Jobs running now, of every kind `statistics` counts (threads, processes, ...)."""
    stats = statistics()
    return sum(getattr(stats, kind.name).running for kind in fields(stats))


@contextmanager
def check_no_leaks(*, settle: float = 5.0, ignore_threads: Iterable[str] = ()) -> Iterator[None]:
    """Fail if the block leaves a thread, a running job or a child process behind.

    On exit, waits up to `settle` seconds for what the block started to finish (a
    thread that is ending, a child that is being reaped), then raises `LeakError`
    naming what is still there: threads started in the block and still alive (except
    idle pooled threads, see `IDLE_THREAD_PREFIXES`, and `ignore_threads` prefixes),
    bridgecancel jobs running that were not running before (`statistics`), and child
    processes started in the block (except bridgecancel's idle pooled workers). If
    the block raises, its exception propagates and nothing is checked.

    Checks the whole process, so run tests that use it one at a time, not in threads.
    """
    ignored = (*IDLE_THREAD_PREFIXES, *ignore_threads)
    threads_before = set(threading.enumerate())
    pids_before = _child_pids()
    running_before = _running_jobs()

    def leaks() -> list[str]:
        found = []
        if _running_jobs() > running_before:
            found.append(f"jobs still running ({statistics()})")
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not t.name.startswith(ignored)
        ]
        if threads:
            found.append(f"threads {threads}")
        pids = _child_pids() - pids_before
        if pids:
            pids -= idle_worker_pids()
        if pids:
            found.append(f"child processes {sorted(pids)}")
        return found

    yield
    deadline = time.monotonic() + settle
    while (left := leaks()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        raise LeakError("left behind: " + "; ".join(left))


class assert_cancels_within:
    """Cancel the block, and fail unless it stops within `seconds` of the cancel.

    As ``async with``, the block runs in a cancel scope that the cancel cancels (the
    scope swallows the cancellation, as ``anyio.move_on_after`` does); as ``with``, in
    sync code, the source's token is the current token in the block (`use_token`), so
    library code that calls `current_token()` or `check_cancelled()` stops, and the
    `Cancelled` it raises for that token is swallowed. Either way the ``as`` target is the
    `CancelSource` that cancels: it fires by itself `after` seconds, or call its
    ``cancel()``. The block may also end normally after the cancel (the work finished
    anyway); it must end within `seconds` of it all the same.

    Raises:
        AssertionError: if the block ended before it was cancelled, or took longer
            than `seconds` to stop after the cancel.
    """

    def __init__(self, seconds: float, *, after: float | None = None) -> None:
        self.seconds = check_seconds(seconds, "assert_cancels_within", "seconds")
        if after is not None:
            after = check_seconds(
                after, "assert_cancels_within", "after", none="to cancel it yourself"
            )
        self._after = after
        self._source = CancelSource()
        self._cancelled_at: float | None = None
        self._scope: Any = None
        self._using: use_token | None = None

    def _enter(self) -> CancelSource:
        self._source.token.on_cancel(self._mark)
        if self._after is not None:
            self._source.cancel_after(self._after)
        return self._source

    def _mark(self) -> None:
        self._cancelled_at = time.monotonic()

    def _check(self) -> None:
        ended = time.monotonic()
        self._source.close()
        if self._cancelled_at is None:
            raise AssertionError(
                "the block ended before it was cancelled: cancel sooner (after=) or make "
                "the block wait for the cancel"
            )
        took = ended - self._cancelled_at
        if took > self.seconds:
            raise AssertionError(
                f"the block took {took:.3f} s to stop after the cancel (allowed {self.seconds} s)"
            )

    def __enter__(self) -> CancelSource:
        self._using = use_token(self._source.token)
        self._using.__enter__()
        return self._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._using is not None:
            self._using.__exit__(exc_type, exc, tb)
            self._using = None
        ours = isinstance(exc, Cancelled) and exc.token is self._source.token
        if exc_type is not None and not ours:
            self._source.close()
            return False
        self._check()
        return ours

    async def __aenter__(self) -> CancelSource:
        from ._scopes import cancel_on  # only now: it needs anyio

        self._scope = cancel_on(self._source.token)
        self._scope.__enter__()
        return self._enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        swallowed = bool(self._scope.__exit__(exc_type, exc, tb))
        if exc_type is not None and not swallowed:
            self._source.close()
            return False
        self._check()
        return swallowed

