"""The two daemon threads behind tokens: the deadline timer and the callback runner.

Standard library only (the worker process imports it). Each thread exists only while it
has work, and no other thread ever waits on a lock either of them may hold: the
interpreter stops daemon threads wherever they are when it exits, and a signal handler
may cancel a token at any instant, so everything other threads do here is a single
atomic operation (a deque append, a ``SimpleQueue.put``, a non-blocking lock acquire, an
attribute store).
"""

from __future__ import annotations

import heapq
import math
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

# Below this many entries the heap is never compacted; above it, once half is dead.
_COMPACT_MIN = 64
# The timer takes in new entries at least once per this many schedules, so entries
# closed long before their deadline never pile up while the timer sleeps.
_BATCH = 64
# How long the callback runner waits for more work before its thread ends.
_RUNNER_IDLE = 0.25


def report_unraisable(exc: BaseException, message: str, obj: object) -> None:
    """Hand an error nobody can catch to ``sys.unraisablehook``. Never raises.

    The hook's argument type cannot be built from Python, so the default hook is
    replaced by an equivalent print; custom hooks (pytest's, an app's) get an object
    with the same attributes.
    """
    # Never raise: in the timer thread an error here would kill the thread, and no
    # later deadline would fire.
    if sys.unraisablehook is not sys.__unraisablehook__:
        try:
            sys.unraisablehook(
                SimpleNamespace(
                    exc_type=type(exc),
                    exc_value=exc,
                    exc_traceback=exc.__traceback__,
                    err_msg=message,
                    object=obj,
                )
            )
            return
        except BaseException as hook_exc:  # as CPython does when the hook fails
            _print_unraisable(hook_exc, "Exception ignored in sys.unraisablehook", obj)
    _print_unraisable(exc, message, obj)


def _print_unraisable(exc: BaseException, message: str, obj: object) -> None:
    try:
        print(f"{message}: {obj!r}", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    except BaseException:  # no usable stderr: nowhere left to report to
        pass


class _OnDemandThread:
    """A daemon thread that runs `_serve` while there is work, then ends.

    ``_running`` is held while the thread exists (acquired by whoever starts it,
    released by the thread as it ends), so starting is one non-blocking acquire.
    """

    name = ""

    def __init__(self) -> None:
        self._running = threading.Lock()

    def _start_if_idle(self) -> bool:
        """Start the thread unless it runs (then it sees the new work before it ends)."""
        if not self._running.acquire(False):
            return False
        try:
            threading.Thread(target=self._serve, name=self.name, daemon=True).start()
        except BaseException:  # at interpreter shutdown, say: let a later call retry
            self._running.release()
            raise
        return True

    def _may_end(self, has_work: Callable[[], bool]) -> bool:
        """Called by the thread when it is out of work: True if it should return."""
        self._running.release()
        # Work that arrived before the release is seen here; work that arrives after it
        # starts a new thread.
        return not has_work() or not self._running.acquire(False)

    def _serve(self) -> None:
        raise NotImplementedError


class DeadlineTimer(_OnDemandThread):
    """Fires tokens whose deadline passed, so reading `cancel_called` never checks a clock.

    Other threads append entries to ``_incoming`` and mark closed ones dead; only the
    timer thread touches the heap. Dead entries leave the heap lazily: dropped as they
    come in, popped when they reach the top, and swept out whenever half the heap is
    dead. Memory and time per deadline therefore do not depend on how many others are
    pending.
    """

    name = "bridgecancel deadline timer"

    def __init__(self) -> None:
        super().__init__()
        self._incoming: deque[Entry] = deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = 0
        self._compact_at = _COMPACT_MIN
        # When the timer thread will next look at its work by itself (-inf: it is awake
        # and will look before it sleeps again).
        self._next = -math.inf

    def after_fork(self) -> None:
        # In a forked child the thread is gone and its lock may be held: start afresh,
        # keeping the pending deadlines.
        self._running = threading.Lock()
        self._wake = queue.SimpleQueue()
        self._next = -math.inf
        if self._heap or self._incoming:
            self._start_if_idle()

    def add(self, entry: Entry) -> None:
        """Fire the entry's token at its deadline, unless it is discarded first."""
        incoming = self._incoming
        incoming.append(entry)
        if not self._start_if_idle() and (
            entry.deadline < self._next or len(incoming) % _BATCH == 0
        ):
            self._wake.put(None)

    def discard(self, entry: Entry) -> None:
        """The entry's token fired, was closed or collected: forget its deadline."""
        entry.live = False
        # The thread sleeps until its earliest entry: wake it if that was this one, so
        # it ends when no deadline is left. (It stores _next before it checks the top
        # entry is live: one of us sees the other's store.)
        if entry.deadline <= self._next:
            self._wake.put(None)

    def pending(self) -> int:
        """How many deadlines are pending (for tests)."""
        heap = list(self._heap)
        return sum(1 for *_, entry in heap if entry.live) + sum(
            1 for entry in list(self._incoming) if entry.live
        )

    def _serve(self) -> None:
        heap = self._heap
        while True:
            self._next = -math.inf
            self._take_incoming()
            self._fire_due()
            if not heap:
                if self._may_end(lambda: bool(self._incoming)):
                    return
                continue
            self._next = deadline = heap[0][0]
            if not heap[0][2].live:
                continue
            timeout = deadline - time.monotonic()
            if timeout > 0:
                try:
                    self._wake.get(timeout=min(timeout, threading.TIMEOUT_MAX))
                except queue.Empty:
                    pass

    def _take_incoming(self) -> None:
        heap, incoming = self._heap, self._incoming
        while incoming:
            entry = incoming.popleft()
            if entry.live:
                self._seq += 1
                heapq.heappush(heap, (entry.deadline, self._seq, entry))
        if len(heap) > self._compact_at:
            heap[:] = [item for item in heap if item[2].live]
            heapq.heapify(heap)
            self._compact_at = max(_COMPACT_MIN, 2 * len(heap))

    def _fire_due(self) -> None:
        heap = self._heap
        while heap:
            deadline, _, entry = heap[0]
            if entry.live and deadline > time.monotonic():
                return
            heapq.heappop(heap)
            if entry.live:
                entry.live = False
                token = entry()
                if token is not None:
                    try:
                        token._fire_for_deadline(entry)
                    except BaseException as exc:  # keep the timer alive for the others
                        report_unraisable(exc, "Exception in the deadline timer", token)
                    del token


class _Timed(Protocol):
    """What the timer fires: a token (`_tokens.CancelToken`)."""

    def _fire_for_deadline(self, entry: Entry) -> None: ...


class Entry(weakref.ref):  # type: ignore[type-arg]
    """A pending deadline: a weak reference to its token, dead once the token is gone.

    ``live`` goes False (one attribute store, from any thread) when the token fires,
    is closed, changes its deadline or is collected.
    """

    __slots__ = ("deadline", "live")

    def __new__(cls, token: _Timed, deadline: float) -> Entry:  # noqa: PYI034
        return super().__new__(cls, token, _entry_died)

    def __init__(self, token: _Timed, deadline: float) -> None:
        # weakref.ref.__init__ does nothing: __new__ made the reference.
        self.deadline = deadline
        self.live = True


def _entry_died(entry: Entry) -> None:
    timer.discard(entry)


class CallbackRunner(_OnDemandThread):
    """Runs the user callbacks of tokens fired by `CancelSource._cancel_detached`.

    One thread, off the canceller's, in order; errors go to ``sys.unraisablehook``.
    """

    name = "bridgecancel callbacks"

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.SimpleQueue[list[tuple[object, Callable[..., object], tuple[Any, ...]]]]
        self._queue = queue.SimpleQueue()

    def after_fork(self) -> None:
        self._running = threading.Lock()
        self._queue = queue.SimpleQueue()  # callbacks for the parent's tokens stay there

    def submit(self, batch: list[tuple[object, Callable[..., object], tuple[Any, ...]]]) -> None:
        """Run ``fn(*args)`` for each ``(token, fn, args)`` of `batch` in the runner thread."""
        self._queue.put(batch)
        try:
            self._start_if_idle()
        except BaseException:  # no new threads (interpreter shutdown): run them here
            while not self._queue.empty():
                _run_batch(self._queue.get())

    def _serve(self) -> None:
        while True:
            try:
                batch = self._queue.get(timeout=_RUNNER_IDLE)
            except queue.Empty:
                if self._may_end(lambda: not self._queue.empty()):
                    return
                continue
            _run_batch(batch)
            del batch


def _run_batch(batch: list[tuple[object, Callable[..., object], tuple[Any, ...]]]) -> None:
    for token, fn, args in batch:
        try:
            fn(*args)
        except BaseException as exc:  # every callback runs; nobody can catch these
            report_unraisable(exc, "Exception in on_cancel callback", token)


timer = DeadlineTimer()
runner = CallbackRunner()
if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=timer.after_fork)
    os.register_at_fork(after_in_child=runner.after_fork)
