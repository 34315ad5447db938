"""Run a function on a Dask cluster from anyio code, with the caller's scope as its token.

``await run_on_cluster(client, func, *args)`` submits ``func(*args)`` to the cluster
behind a `distributed.Client` and waits for it, on asyncio or trio, by the rules
`run_sync` and `run_process` follow: inside the task `current_token()` fires when the
calling scope is cancelled, the call returns only once the task has stopped on its
worker, and a result or error produced after the cancel is still delivered.

How the cancel travels (Dask's public plugin API only; Dask itself stops nothing):

* The caller asks the scheduler, through a handler that bridgecancel's `SchedulerPlugin`
  (in `_dask_cluster`) adds, to cancel the call. The scheduler knows whether the task
  has started and where: if it has not, it is marked so that it never starts, and the
  call returns at once; if it has, the scheduler forwards the cancel to that worker,
  whose `WorkerPlugin` handler fires the task's token. The task is then left to finish
  normally, so Dask keeps its thread busy until it has, and its result or error comes
  back the ordinary way.
* Every task first claims its call at the scheduler. A second claim for a call means
  the worker running the first attempt died (or left) and Dask retried the task
  elsewhere: the retry raises `BrokenWorkerError` instead of running the function again,
  so a crash is one error for that call, not one crash per worker. (An attempt that
  raised under Dask's ``retries=`` gives its claim back first, so that retry runs.)
* The worker plugin's ``transition`` hook fires the token of a running task whose future
  is released behind our back (the client was closed or lost), so orphans stop too.

The plugins are registered on the cluster by the first call with a client; the
scheduler and the workers must be able to import bridgecancel, as they import the
functions you submit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, Generic, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import checkpoint_if_cancelled

__all__ = (
    "run_on_cluster",
)

# Before the cluster's side, which imports Dask: say what to install if it is missing.
try:
    import distributed
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bridgecancel.dask needs Dask's distributed scheduler: pip install distributed "
        "(or, from the root of a bridgecancel checkout, pip install -e '.[dask]')"
    ) from exc

from . import _supervise as supervise
from ._backend import caller_deadline, threadsafe_caller
from ._dask_cluster import NOT_STARTED, Stopped, asyncio_loop, ensure_plugins, run_task
from ._exceptions import BrokenWorkerError
from ._supervise import Job, JobKind, JobState, Outcome
from ._util import PosArgsT, Unpack, describe

T = TypeVar("T")

# Options of Client.submit that make sense for one call; any other keyword argument
# would be passed by Dask to the function, which is never what the caller meant here.
_SUBMIT_OPTIONS: Final = frozenset(
    {"workers", "resources", "retries", "priority", "fifo_timeout", "allow_other_workers"}
)

_CANCEL_TIMEOUT: Final = 10.0


# -- the caller's side ---------------------------------------------------------------------


async def run_on_cluster(
    client: distributed.Client,
    func: Callable[[Unpack[PosArgsT]], T],
    *args: Unpack[PosArgsT],
    key: str | None = None,
    **submit_options: Any,
) -> T:
    """Run ``func(*args)`` on the Dask cluster behind `client` and return its result.

    Inside the task, `current_token()` fires as soon as the calling task is cancelled
    (by a cancel scope, a deadline, a failing task group, ``asyncio.timeout`` or
    ``Task.cancel()``), so ``token.check()``, ``token.wait()``, ``token.sleep()``,
    ``on_cancel`` callbacks and the `bridgecancel.blocking` waits stop it. The token's
    ``deadline`` is the caller's effective deadline; it is informative: only the
    caller's scope fires the token.

    The call returns once the task has stopped on its worker. A task that stopped
    because of the cancel becomes the caller's native cancellation; a task that
    returns or raises anyway has its value or error delivered (the cancellation then
    arrives at the caller's next checkpoint; under plain asyncio a cancellation still
    standing is raised instead, once the task has stopped); a task cancelled before it started never
    starts, and the call returns at once. An error from the task arrives as itself,
    with the worker's traceback.

    Works on asyncio and trio with a synchronous ``Client(...)`` (which runs its own
    event loop in a thread), and on asyncio with a ``Client(asynchronous=True)`` made
    on the same loop.

    Args:
        client: a connected `distributed.Client`.
        func: a sync callable the cluster can unpickle (Dask uses cloudpickle).
        args: positional arguments for `func`.
        key: a name for the task, shown on Dask's dashboard. A unique suffix is always
            added: reusing a key right after cancelling it would hand the new call the
            old run.
        submit_options: ``workers``, ``resources``, ``retries``, ``priority``,
            ``fifo_timeout`` or ``allow_other_workers``, passed to ``Client.submit``.

    Raises:
        BrokenWorkerError: the worker running the task died (Dask's retry on another
            worker is refused, so the function runs at most once per call).
        RuntimeError: the client is closed, or the task's future was cancelled or
            released by someone else.
        TypeError: `func` is not callable or is async, or an option is unknown.
        pickle.PicklingError: `func` or an argument cannot be pickled.
    """
    _check_call(client, func, key, submit_options)
    await checkpoint_if_cancelled()
    await ensure_plugins(client)
    task_key = f"{key or _key_prefix(func)}-{uuid.uuid4().hex}"
    deadline = caller_deadline()
    wall_deadline = math.inf if deadline == math.inf else time.time() + deadline - time.monotonic()
    try:
        future = client.submit(
            run_task, task_key, func, args, wall_deadline, bool(submit_options.get("retries")),
            key=task_key, pure=False, **submit_options,
        )
    except Exception as exc:
        if _is_pickling_error(exc):
            raise pickle.PicklingError(_unpicklable_message(func, args, exc)) from exc
        raise
    job = _ClusterJob(client, future, task_key, func, deadline)
    try:
        try:
            await job.wait()
        except anyio.get_cancelled_exc_class() as exc:
            return await supervise.deliver_cancelled(job, exc)  # type: ignore[no-any-return]
        return await supervise.deliver(job)  # type: ignore[no-any-return]
    finally:
        if job.state is JobState.RUNNING:  # the caller left (its coroutine was closed)
            supervise.abandon(job)


class _ClusterJob(Job):
    """One call's task on the cluster: the `_supervise.Job` of a cluster call.

    It is ``RUNNING`` from submission (the cluster has it; only the scheduler knows
    whether a worker has begun it). Firing it asks the scheduler to cancel the call: if
    the task has not started, it is marked so that it never does, and the job is
    ``DROPPED`` at once; if it has, the scheduler forwards the cancel to the worker
    running it, whose plugin fires the task's token, and the job ends when the task
    does. Dask cannot interrupt or kill a task, so there is no escalation.
    """

    kind: ClassVar[JobKind] = "cluster"

    __slots__ = ("_cancel_reply", "_changed", "_gathered", "client", "future", "key")

    def __init__(
        self,
        client: distributed.Client,
        future: distributed.Future[Any],
        key: str,
        func: Callable[..., Any],
        deadline: float,
    ) -> None:
        super().__init__(func, deadline)
        self.client = client
        self.future = future
        self.key = key
        self._changed = anyio.Event()  # set when a remote operation ends; then renewed
        # Dask's Client methods are untyped: call them through Any.
        untyped: Any = client
        self._gathered: _OnClientLoop[Any] = _OnClientLoop(
            client, lambda: untyped.gather(future, asynchronous=True), self._poke
        )
        self._cancel_reply: _OnClientLoop[str] | None = None
        self.move(_RUNNING)

    def _poke(self) -> None:
        self._changed.set()

    def _update(self) -> None:
        """Move the job on from what its remote operations have answered."""
        if self.ended:
            return
        reply = self._cancel_reply
        if reply is not None:  # cancelled: the scheduler's answer decides first
            if not reply.done:
                return
            try:
                answer = reply.result()
            except Exception:
                answer = NOT_STARTED  # no answer from the scheduler: let Dask drop the task
            if answer == NOT_STARTED:
                self.move(_DROPPED)
                # Dropping the future makes the gather end too (its outcome is ignored).
                client: Any = self.client
                _OnClientLoop(client, lambda: client.cancel(self.future, asynchronous=True))
                return
        if self._gathered.done:
            self.move(_FINISHED)

    async def wait(self, *, until_started: bool = False) -> None:
        while True:
            self._update()
            if self.ended or (until_started and self.began):
                return
            await self._changed.wait()
            self._changed = anyio.Event()

    def _cancel(self, reason: str) -> None:
        client, key = self.client, self.key
        self._cancel_reply = _OnClientLoop(
            client, lambda: _cancel_call(client, key, reason), self._poke
        )

    def outcome(self) -> Outcome:
        if self.state is _DROPPED:
            return "never_started"
        if isinstance(self._error(), (BrokenWorkerError, distributed.KilledWorker)):
            return "crashed"
        if self.reason is not None:
            return "cooperative"
        return "completed"

    def _error(self) -> BaseException | None:
        future = self._gathered.future
        return None if future.cancelled() else future.exception()

    @property
    def stopped_by_cancel(self) -> bool:
        return (
            self.reason is not None
            and self._error() is None
            and isinstance(self._gathered.result(), Stopped)
        )

    def result(self) -> Any:
        try:
            value = self._gathered.result()
        except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
            # Never let Dask's cancellation pass for the caller's own.
            raise RuntimeError(
                f"the Dask future running {describe(self.func)} was cancelled outside "
                "this call (was its client closed?)"
            ) from exc
        except distributed.KilledWorker as exc:  # allowed-failures was 0
            raise BrokenWorkerError(
                f"the Dask worker running {describe(self.func)} died: {exc}"
            ) from exc
        if isinstance(value, Stopped):
            raise RuntimeError(
                f"the Dask task {self.key} was cancelled on its worker "
                f"({value.reason or 'cancelled'}) but not by this call; was its future "
                "released or its client closed?"
            )
        return value


_RUNNING: Final = JobState.RUNNING
_FINISHED: Final = JobState.FINISHED
_DROPPED: Final = JobState.DROPPED


async def _cancel_call(client: distributed.Client, task_key: str, reason: str) -> str:
    scheduler: Any = client.scheduler
    reply: str = await asyncio.wait_for(
        scheduler.bridgecancel_cancel(key=task_key, reason=reason), _CANCEL_TIMEOUT
    )
    return reply


class _OnClientLoop(Generic[T]):
    """A coroutine running on the client's event loop, watched from the caller's loop.

    A synchronous Client runs its own asyncio loop in a thread; an asynchronous one
    runs on the caller's loop. Either way the coroutine is started with
    ``run_coroutine_threadsafe``, and `on_done` is called in the caller's loop when it is
    done, so the same code serves asyncio and trio callers without holding a thread.
    """

    def __init__(
        self,
        client: distributed.Client,
        make: Callable[[], Awaitable[T]],
        on_done: Callable[[], object] | None = None,
    ) -> None:
        async def run() -> T:
            return await make()

        self.future = asyncio.run_coroutine_threadsafe(run(), asyncio_loop(client))
        if on_done is not None:
            call_in_loop = threadsafe_caller()
            self.future.add_done_callback(lambda _: call_in_loop(on_done))

    @property
    def done(self) -> bool:
        return self.future.done()

    def result(self) -> T:
        return self.future.result()


def _dumps(obj: object) -> bytes:
    dumps: Any = distributed.protocol.pickle.dumps  # how Dask pickles a task
    data: bytes = dumps(obj)
    return data


# -- checking a call -----------------------------------------------------------------------


def _check_call(
    client: object, func: object, key: object, options: dict[str, Any]
) -> None:
    if not isinstance(client, distributed.Client):
        raise TypeError(
            f"run_on_cluster() needs a distributed.Client as its first argument, got {client!r}"
        )
    if client.status in ("closing", "closed"):
        raise RuntimeError(
            f"the Dask client {client.id} is {client.status}; create a new "
            "distributed.Client for the cluster"
        )
    if client.status != "running":
        raise RuntimeError(
            f"the Dask client {client.id} is not connected (status {client.status!r}); "
            "await an asynchronous Client before use"
        )
    supervise.check_func("run_on_cluster", func)
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str or None, got {key!r}")
    unknown = sorted(set(options) - _SUBMIT_OPTIONS)
    if unknown:
        raise TypeError(
            f"run_on_cluster() got unknown option(s) {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(_SUBMIT_OPTIONS))} (to pass keyword arguments to the "
            "function, use functools.partial)"
        )


def _is_pickling_error(exc: Exception) -> bool:
    return isinstance(exc, (pickle.PicklingError, TypeError, AttributeError)) and (
        "pickle" in str(exc).lower() or "serializ" in str(exc).lower()
    )


def _unpicklable_message(func: object, args: tuple[Any, ...], exc: Exception) -> str:
    culprit = f"{describe(func)} or its arguments"
    for index, arg in enumerate(args):
        try:
            _dumps(arg)
        except Exception:
            culprit = f"argument {index} of {describe(func)}, a {type(arg).__qualname__},"
            break
    return (
        f"cannot send {culprit} to the Dask cluster: pickling failed ({exc}); pass "
        "picklable data (locks, open files, sockets and generators cannot be pickled)"
    )


def _key_prefix(func: object) -> str:
    """The start of a Dask task key (what the dashboard shows), not a description:
    messages use `describe`."""
    name = getattr(func, "__name__", None) or type(func).__name__
    return str(name).replace("<", "").replace(">", "")
