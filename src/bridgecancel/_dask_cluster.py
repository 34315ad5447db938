"""The cluster's side of `bridgecancel.dask`: the plugins and the task that runs a call.

The scheduler plugin knows, per call, whether its task has started and where, and
forwards a caller's cancel to that worker; the worker plugin fires the running task's
token; `run_task` is what Dask runs: it claims the call, then runs the function with
its token. `bridgecancel.dask` (the caller's side) submits `run_task` and registers the
plugins; the scheduler and the workers import this module to load them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.to_thread
import distributed
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from ._exceptions import BrokenWorkerError
from ._tokens import CALLER_CANCELLED, Cancelled, CancelSource, _current, informative_source
from ._util import describe

__all__ = (
    "NOT_STARTED",
    "Stopped",
    "asyncio_loop",
    "ensure_plugins",
    "run_task",
)

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler
    from distributed.worker import Worker


T = TypeVar("T")

PLUGIN_NAME: Final = "bridgecancel"

# Scheduler replies.
_RUN: Final = "run"
NOT_STARTED: Final = "not started"
_STARTED: Final = "started"
_LOST: Final = "lost"

# How long the scheduler remembers calls cancelled before they started, so that a
# worker that picks one up late (its release still on the wire) does not run it.
_TOMBSTONE_SECONDS: Final = 300.0

# A scheduler without our plugin (restarted since the client registered it) never
# answers (Dask logs the unknown handler and drops the message): a task waits this long
# for its claim before saying so, and a cancel then falls back to Future.cancel(), whose
# release the worker plugin still turns into the task's token firing.
_CLAIM_TIMEOUT: Final = 30.0


def asyncio_loop(client_or_worker: distributed.Client | Worker) -> asyncio.AbstractEventLoop:
    """The asyncio loop under a Dask client's or worker's (tornado) event loop."""
    loop: Any = client_or_worker.loop
    asyncio_loop: asyncio.AbstractEventLoop = loop.asyncio_loop
    return asyncio_loop


# -- plugins -----------------------------------------------------------------------------

_installed: set[tuple[str, str]] = set()
_install_lock = threading.Lock()


async def ensure_plugins(client: distributed.Client) -> None:
    """Register the scheduler and worker plugins once per client and scheduler."""
    scheduler: Any = client.scheduler
    ident = (client.id, str(scheduler.address))
    if ident in _installed:
        return
    try:
        if client.asynchronous:  # an asynchronous client on this very loop
            await client.register_plugin(_SchedulerCalls(), name=PLUGIN_NAME)
            await client.register_plugin(_WorkerTokens(), name=PLUGIN_NAME)
        else:
            await anyio.to_thread.run_sync(_register_blocking, client)
    except Exception as exc:
        raise RuntimeError(
            "could not register bridgecancel's plugins on the Dask cluster "
            f"({type(exc).__name__}: {exc}); the scheduler and every worker must be able "
            "to import bridgecancel (install it in the cluster's environment)"
        ) from exc
    with _install_lock:
        _installed.add(ident)


def _register_blocking(client: distributed.Client) -> None:
    client.register_plugin(_SchedulerCalls(), name=PLUGIN_NAME)
    client.register_plugin(_WorkerTokens(), name=PLUGIN_NAME)


class Stopped:
    """What a task returns when it stopped because its token fired."""

    __slots__ = ("reason",)

    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (Stopped, (self.reason,))


class _SchedulerCalls(SchedulerPlugin):
    """Knows, per call, whether it has started and on which worker; forwards cancels.

    A key's state is the address of the worker running it, or ``_FINISHED``;
    ``tombstones`` holds calls cancelled before they started.
    """

    _FINISHED: Final = ""
    # Registered by every client that calls run_on_cluster: keep the first instance,
    # which holds the state of the calls in flight.
    idempotent = True

    def __init__(self) -> None:
        self.calls: dict[str, str] = {}
        self.tombstones: OrderedDict[str, float] = OrderedDict()
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers["bridgecancel_claim"] = self.claim
        scheduler.handlers["bridgecancel_cancel"] = self.cancel
        scheduler.handlers["bridgecancel_release"] = self.release

    async def close(self) -> None:
        if self.scheduler is not None:
            for name in ("bridgecancel_claim", "bridgecancel_cancel", "bridgecancel_release"):
                self.scheduler.handlers.pop(name, None)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if key not in self.calls:
            return
        if finish == "forgotten":
            del self.calls[key]
        elif start == "processing" and finish in ("memory", "erred"):
            self.calls[key] = self._FINISHED  # the worker reported back: not lost

    def claim(self, key: str, worker: str) -> str:
        """A task starts on `worker`: may it run?"""
        if key in self.tombstones:
            return NOT_STARTED
        if self.calls.get(key, self._FINISHED) != self._FINISHED:
            return _LOST  # an attempt already started on a worker that is gone
        self.calls[key] = worker
        return _RUN

    def release(self, key: str, worker: str) -> None:
        """The attempt on `worker` raised, and Dask will retry it (``retries=``)."""
        if self.calls.get(key) == worker:
            self.calls[key] = self._FINISHED

    async def cancel(self, key: str, reason: str) -> str:
        """The caller was cancelled: stop the call, or make sure it never starts."""
        worker = self.calls.get(key)
        if worker is None:
            self._bury(key)
            return NOT_STARTED
        if worker != self._FINISHED and self.scheduler is not None:
            try:
                await self.scheduler.rpc(worker).bridgecancel_fire(key=key, reason=reason)
            except Exception:
                pass  # the worker is gone: the retry reports it lost
        return _STARTED

    def _bury(self, key: str) -> None:
        now = time.monotonic()
        self.tombstones[key] = now
        while self.tombstones:
            oldest, when = next(iter(self.tombstones.items()))
            if now - when < _TOMBSTONE_SECONDS:
                break
            del self.tombstones[oldest]


class _WorkerTokens(WorkerPlugin):
    """Fires a running task's token: on the scheduler's word, or if Dask releases it."""

    idempotent = True

    def setup(self, worker: Worker) -> None:
        worker.handlers["bridgecancel_fire"] = _fire

    def teardown(self, worker: Worker) -> None:
        worker.handlers.pop("bridgecancel_fire", None)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start in ("executing", "long-running") and finish in ("released", "cancelled"):
            _fire(str(key), "the task's Dask future was released")


# -- the worker's side -------------------------------------------------------------------

_running: dict[str, CancelSource] = {}
_running_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child gets new locks: a thread that held one at the fork is not here."""
    global _install_lock, _running_lock
    _install_lock = threading.Lock()
    _running_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _fire(key: str, reason: str) -> bool:
    """Fire the token of the task `key` running here, without blocking this loop.

    Runs on the worker's event loop: waiters wake at once, and user ``on_cancel``
    callbacks run in bridgecancel's callback thread, not here.
    """
    with _running_lock:
        source = _running.get(key)
    if source is None:
        return False
    source._cancel_detached(reason)
    return True


def _job_source(wall_deadline: float) -> CancelSource:
    """The task's token source: it carries the caller's deadline but fires only on cancel."""
    if wall_deadline == math.inf:
        return CancelSource()
    return informative_source(time.monotonic() + wall_deadline - time.time())


def run_task(
    key: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    wall_deadline: float,
    may_retry: bool,
) -> Any:
    """The task Dask runs: claim the call, run `func` with its token, report a stop.

    With Dask's ``retries=``, an attempt that raised gives its claim back before the
    error reaches the scheduler, so the retry is not taken for a lost worker's.
    """
    worker = distributed.get_worker()
    source = _job_source(wall_deadline)
    with _running_lock:  # registered before the claim, so a cancel always finds it
        _running[key] = source
    try:
        claim = _on_worker_loop(worker, _claim(worker, key))
        try:
            verdict = claim.result(_CLAIM_TIMEOUT)
        except concurrent.futures.TimeoutError:
            claim.cancel()
            raise RuntimeError(
                f"the Dask scheduler did not answer {worker.address} within "
                f"{_CLAIM_TIMEOUT:g} s about starting {describe(func)}: it has no "
                "bridgecancel plugin (was it restarted?); call run_on_cluster() with a new "
                "Client to register it"
            ) from None
        if verdict == NOT_STARTED:
            return Stopped(CALLER_CANCELLED)
        if verdict == _LOST:
            raise BrokenWorkerError(
                f"the Dask worker running {describe(func)} was lost (it died or left the "
                f"cluster) and Dask retried the task on {worker.address}; bridgecancel does "
                "not run a call twice: call again if that is safe"
            )
        token = source.token
        reset = _current.set(token)
        try:
            return func(*args)
        except Cancelled as exc:
            if exc.token is token:
                return Stopped(token.reason)
            raise
        except BaseException:
            if may_retry:
                _on_worker_loop(worker, _release(worker, key)).result(_CLAIM_TIMEOUT)
            raise
        finally:
            _current.reset(reset)
    finally:
        with _running_lock:
            del _running[key]
        source.close()


def _on_worker_loop(worker: Worker, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
    async def run() -> T:
        return await coro

    return asyncio.run_coroutine_threadsafe(run(), asyncio_loop(worker))


async def _release(worker: Worker, key: str) -> None:
    await worker.scheduler.bridgecancel_release(key=key, worker=worker.address)


async def _claim(worker: Worker, key: str) -> str:
    verdict: str = await worker.scheduler.bridgecancel_claim(key=key, worker=worker.address)
    return verdict
