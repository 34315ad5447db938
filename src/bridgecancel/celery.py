"""Send a Celery task from anyio, trio or asyncio code, with the caller's scope as its token.

``install(app)``, called once where the Celery app is defined, wires both sides; then
``await run_on_celery(add.s(2, 3))`` sends the task and waits for its result by the rules
`run_sync` and `run_process` follow: inside the task `current_token()` fires when the
calling scope is cancelled, with the canceller's reason; a task cancelled before it
started never starts; the call returns only once the task has ended; a result or error
produced after the cancel is still delivered. On the prefork pool, ``kill_after=`` kills
the pool process still running that very task.

How the cancel travels (Redis, which the broker or the result backend already is):

* As its body is about to start, the task claims its call in Redis, atomically, naming
  the pub/sub channel of the pool process running it (``task_prerun``, in that process).
  The caller's cancel is atomic too: if the task has not claimed the call, a tombstone
  makes sure it never will (also when a worker has already reserved it), and the call
  returns at once; if it has, the cancel is published on that process's channel.
* A listener thread in every pool process hears it and fires the task's token; the app's
  Task class runs the body with that token current, and turns the `Cancelled` it raises
  into a ``REVOKED`` result, which ends the call with the caller's native cancellation.
* ``kill_after`` publishes a kill naming the task and its attempt: the process kills
  itself only if its body still runs, checked under the lock the end of the body takes.

The waiting is Celery's own ``AsyncResult.get()``, in a worker thread, so results come
back however the app's result backend delivers them. See the docs' Celery page.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Final, NoReturn

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar, checkpoint_if_cancelled

__all__ = (
    "install",
    "run_on_celery",
)

# Before the worker's side, which imports Celery: say what to install if it is missing.
try:
    import celery
    import celery.canvas
    import celery.exceptions
    import celery.states
    import redis
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bridgecancel.celery needs Celery and the Redis client: "
        "pip install 'celery[redis]' (or, from a checkout, pip install -e '.[celery]')"
    ) from exc

from . import _supervise as supervise
from ._backend import caller_deadline, threadsafe_caller
from ._celery_worker import (
    HEADER,
    KILLED_MARK,
    STOP_MARK,
    STOP_SECONDS,
    Wiring,
    fire_message,
    stopped_reason,
    task_key,
    wire,
    wiring_for,
)
from ._exceptions import BrokenWorkerError, RemoteTraceback
from ._supervise import Job, JobKind, JobState, Outcome
from ._util import check_seconds

# How often a waiting call checks that the process running its task is still there, and
# after how many checks in a row that found it gone the call fails.
_CHECK_INTERVAL: Final = 2.0
_GONE_CHECKS: Final = 3

# How long a call whose task was killed waits for its pool process to be gone.
_KILL_PATIENCE: Final = 30.0

# Calls waiting for their results at once, per event loop: each waits in a thread.
_WAITERS: Final = 1000
_waiters: RunVar[anyio.CapacityLimiter] = RunVar("bridgecancel_celery_waiters")


def install(app: celery.Celery, *, redis_url: str | None = None) -> None:
    """Wire bridgecancel into the Celery `app`, for its callers and its workers.

    Call it once, where the app is defined (the module the worker loads with ``-A``),
    before the worker starts: it gives the app's Task class a ``__call__`` that runs
    the body of a call made by `run_on_celery` with its token current, and connects
    Celery's signals (``task_prerun``, ``task_postrun``, ``worker_process_init``, ...).
    Tasks defined before and after the call are covered, as long as their class derives
    from the app's Task (the default for ``@app.task``; use ``base=`` classes derived
    from ``app.Task``). Tasks called any other way run as before.

    Args:
        app: the Celery application.
        redis_url: the Redis server that carries cancels. By default the broker's URL
            if it is Redis, else the result backend's.

    Raises:
        TypeError: `app` is not a Celery application.
        ValueError: the app was installed before with another `redis_url`.
    """
    if not isinstance(app, celery.Celery):
        raise TypeError(f"install() takes a celery.Celery application, got {app!r}")
    if redis_url is not None and not isinstance(redis_url, str):
        raise TypeError(f"redis_url must be a str such as 'redis://host:6379/0', got {redis_url!r}")
    wire(app, redis_url)


async def run_on_celery(signature: celery.Signature, *, kill_after: float | None = None) -> Any:
    """Send the task `signature` describes, wait for it, and return its result.

    `signature` is one task's signature, with its options set as Celery users set them
    (``add.s(2, 3)``, ``add.s(2, 3).set(queue="cpu", countdown=5)``,
    ``app.signature("tasks.add", (2, 3))``). Inside the task, `current_token()` fires as
    soon as the calling task is cancelled (by a cancel scope, a deadline, a failing task
    group, ``asyncio.timeout`` or ``Task.cancel()``), with the canceller's reason, on the
    prefork, threads and solo pools. Its ``deadline`` is the caller's effective deadline,
    for information: only the caller's cancellation fires it.

    The call returns once the task has ended. A task that stopped because of the cancel
    (it raised `Cancelled`) becomes the caller's native cancellation; a task that returns
    or raises anyway has its value or error delivered, and the cancellation arrives at the
    caller's next checkpoint (under plain asyncio a cancellation still standing is raised
    instead, once the task has ended). A task cancelled before it started never starts,
    even if a worker has reserved it, and the call returns at once. An error from the task
    arrives as its own type (as Celery rebuilds it), with the worker's traceback as its
    ``__cause__``.

    Args:
        signature: a `celery.Signature` of one task (not a chain, group or chord) of an
            app wired with `install`, whose result is stored (not ``ignore_result``).
        kill_after: seconds after the cancel at which a task still running is stopped
            by killing the prefork pool process that runs it, if that process still runs
            that very task (Celery replaces it; the call then raises the caller's
            cancellation). None (the default): never. Threads and solo pools cannot kill
            one task: there the call waits for the task to end.

    Raises:
        BrokenWorkerError: the pool process running the task died (Celery's
            ``WorkerLostError``), or the worker process running it is gone.
        TypeError: `signature` is not one task's signature, or `kill_after` is not a
            number of seconds.
        RuntimeError: the app was not wired with `install`, or has no result backend.
    """
    wiring = _check_call(signature, kill_after)
    kill = None if kill_after is None else check_seconds(
        kill_after, "run_on_celery", "kill_after", none="to never kill"
    )
    await checkpoint_if_cancelled()
    deadline = caller_deadline()
    job = _CeleryJob(wiring, signature, deadline, None if kill == math.inf else kill)
    try:
        try:
            try:
                await anyio.to_thread.run_sync(
                    job.conduct, abandon_on_cancel=True, limiter=_waiter_limiter()
                )
            finally:
                job.stop_awaiting()
            await job.wait()
        except anyio.get_cancelled_exc_class() as exc:
            return await supervise.deliver_cancelled(job, exc)
        return await supervise.deliver(job)
    finally:
        if job.state is JobState.RUNNING:
            supervise.abandon(job)  # the caller left (its coroutine was closed)


def _waiter_limiter() -> anyio.CapacityLimiter:
    try:
        return _waiters.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_WAITERS)
        _waiters.set(limiter)
        return limiter


class _TaskName:
    """The task a job runs, as `_supervise`'s logs name a job's function."""

    def __init__(self, name: str) -> None:
        self.__qualname__ = name
        self.__module__ = ""

    def __repr__(self) -> str:
        return f"task {self.__qualname__}"


class _CeleryJob(Job):
    """One call's task on Celery: the `_supervise.Job` of `run_on_celery`.

    A worker thread (`conduct`) sends the task, then waits for its result with Celery's
    ``AsyncResult.get()``; while the caller awaits that thread, the thread hands the
    outcome over as it returns (one wake-up of the caller's loop, as for
    ``apply_async().get()`` in a thread), and posts it to the loop once the caller has
    stopped awaiting it (it was cancelled). The job is ``RUNNING`` from the start: Celery
    has the call, or will as soon as the thread has sent it. Firing it runs the cancel
    script (in a thread of its own, or in `conduct` if the task is still being sent): a
    task that has not started is ``DROPPED`` at once; one that has is told through its
    pool process's channel, and the job ends when the task does. The kill stage
    (``kill_after``) publishes a kill for the attempt running now.
    """

    kind: ClassVar[JobKind] = "celery"

    __slots__ = (
        "_caller_waits", "_changed", "_handed", "_kill_sent", "_lock", "_lost", "_options",
        "_pending_reason", "_post", "_result", "_send_error", "_sent", "_signature",
        "_stop_seconds", "_taken", "_wait_error", "_withdrawn", "name", "task_id", "wiring",
    )

    def __init__(
        self, wiring: Wiring, signature: Any, deadline: float, kill_after: float | None
    ) -> None:
        name: Any = _TaskName(str(signature.task))  # what the supervisor's logs call it
        super().__init__(name, deadline, None, kill_after)
        self.wiring = wiring
        self.name = str(signature.task)
        options: dict[str, Any] = signature.options
        self.task_id = str(options.get("task_id") or uuid.uuid4())
        wall_deadline = (  # JSON has no infinity: None for no deadline
            time.time() + deadline - time.monotonic() if math.isfinite(deadline) else None
        )
        self._signature = signature
        self._options = {
            "task_id": self.task_id,
            "headers": {**(options.get("headers") or {}), HEADER: {"deadline": wall_deadline}},
        }
        self._stop_seconds = int(STOP_SECONDS + _delay(options))
        self._post = threadsafe_caller()
        self._changed: anyio.Event | None = None
        self._lock = threading.Lock()  # between the loop and the thread in `conduct`
        self._taken = False  # `conduct` has begun: the task is being sent
        self._withdrawn = False  # cancelled before `conduct` began: nothing is sent
        self._sent = False
        self._pending_reason: str | None = None
        self._caller_waits = True  # the caller awaits `conduct`: it takes the outcome
        self._handed: tuple[str, Any] | None = None
        self._send_error: BaseException | None = None
        self._wait_error: BaseException | None = None
        self._result: tuple[str, Any, str | None] | None = None  # state, value, traceback
        self._lost: str | None = None  # the claim of a pool process found gone
        self._kill_sent = False
        self.move(_RUNNING)

    # -- in a worker thread ----------------------------------------------------------------

    def conduct(self) -> None:
        """Send the task and wait for its outcome (in a worker thread)."""
        with self._lock:
            if self._withdrawn:
                return
            self._taken = True
        try:
            result = self._signature.apply_async(**self._options)
        except Exception as exc:
            self._end("send", exc)
            return
        with self._lock:
            self._sent = True
            reason = self._pending_reason
        if reason is not None:  # cancelled while it was being sent
            self._send_cancel(reason)
        ending = self._await(result)
        if ending is not None:
            self._end(*ending)

    def _await(self, result: Any) -> tuple[str, Any] | None:
        """The task's outcome: its result, an error of the result backend, or the claim
        of a pool process that is gone; None once the job was dropped."""
        gone = 0
        while True:
            try:
                value = result.get(
                    timeout=_CHECK_INTERVAL, propagate=False, disable_sync_subtasks=False
                )
            except celery.exceptions.TimeoutError:
                if self.state is JobState.DROPPED:  # and marking it revoked failed
                    _stop_waiting(result)
                    return None
                gone = gone + 1 if self._process_gone() else 0
                if gone >= _GONE_CHECKS:
                    _stop_waiting(result)
                    return "lost", self._bury_lost()
                continue
            except Exception as exc:  # the result backend failed
                return "wait_error", exc
            if isinstance(value, BaseException) and str(value).startswith(KILLED_MARK):
                self._wait_until_gone()  # recorded just before the kill: wait for the kill
            return "result", (result.state, value, result.traceback)

    def _wait_until_gone(self) -> None:
        """Wait until the pool process running the task no longer listens on Redis: its
        sockets close when its last thread has exited."""
        deadline = time.monotonic() + _KILL_PATIENCE
        while time.monotonic() < deadline:
            try:
                client = self.wiring.client()
                run = _text(client.hget(task_key(self.task_id), "run"))
                if run is None:
                    return
                numsub: Any = client.pubsub_numsub(run.split(" ", 1)[1])
                if int(numsub[0][1]) == 0:
                    return
            except redis.RedisError:
                return
            time.sleep(0.005)

    def _end(self, kind: str, data: Any) -> None:
        """Hand the outcome to the caller awaiting this thread, or post it to its loop."""
        with self._lock:
            if self._caller_waits:
                self._handed = (kind, data)
                return
        self._post(functools.partial(self._apply, kind, data))

    def _process_gone(self) -> bool:
        """The call's task has started in a pool process that no longer listens."""
        try:
            client = self.wiring.client()
            run = _text(client.hget(task_key(self.task_id), "run"))
            if run is None:
                return False  # not started, or between attempts: nothing to watch
            numsub: Any = client.pubsub_numsub(run.split(" ", 1)[1])
            return int(numsub[0][1]) == 0
        except redis.RedisError:
            return False  # Redis itself is unreachable: that says nothing of the process

    def _bury_lost(self) -> str:
        """Leave a tombstone, so that Celery never runs the call again (``acks_late``);
        return the lost claim."""
        run = None
        try:
            run = _text(self.wiring.client().hget(task_key(self.task_id), "run"))
            self._run_cancel_script("the worker process running the task is gone")
        except redis.RedisError:
            pass
        return run or ""

    def _run_cancel_script(self, reason: str) -> Any:
        return self.wiring.script("cancel")(
            keys=[task_key(self.task_id)],
            args=[reason, self._stop_seconds, fire_message(self.task_id, reason)],
        )

    def _send_cancel(self, reason: str) -> None:
        """Run the cancel script; a task that had not started is dropped."""
        try:
            reply = self._run_cancel_script(reason)
        except Exception as exc:
            supervise.logger.warning(
                "could not send the cancel of Celery task %s %s to Redis (%s): the call "
                "waits for the task to end", self.name, self.task_id, exc,
            )
            return
        if reply is None:  # it had not started, and now never will
            self._post(self._on_not_started)
            try:
                # Celery's record of a task revoked before it ran; it also ends the wait
                # in `conduct`.
                app: Any = self._signature.app
                app.backend.mark_as_revoked(self.task_id, stopped_reason(reason))
            except Exception as exc:
                supervise.logger.debug("could not mark task %s revoked: %s", self.task_id, exc)

    def _send_kill(self) -> None:
        try:
            self.wiring.script("kill")(keys=[task_key(self.task_id)], args=[self.task_id])
        except Exception as exc:
            supervise.logger.warning(
                "could not send the kill of Celery task %s %s to Redis (%s)",
                self.name, self.task_id, exc,
            )

    # -- in the caller's event loop --------------------------------------------------------

    def stop_awaiting(self) -> None:
        """The caller no longer awaits `conduct` (it returned, or the caller was
        cancelled): take what it handed over; from now on it posts."""
        with self._lock:
            self._caller_waits = False
            handed, self._handed = self._handed, None
        if handed is not None:
            self._apply(*handed)

    def _apply(self, kind: str, data: Any) -> None:
        if not self.ended:
            if kind == "send":
                self._send_error = data
                self.move(_DROPPED)
            else:
                if kind == "result":
                    self._result = data
                elif kind == "wait_error":
                    self._wait_error = data
                else:
                    self._lost = data
                self.move(_FINISHED)
        self._poke()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _on_not_started(self) -> None:
        if self.state is JobState.RUNNING:
            self.move(_DROPPED)
        self._poke()

    async def wait(self, *, until_started: bool = False) -> None:
        while not (self.ended or (until_started and self.began)):
            self._changed = anyio.Event()
            await self._changed.wait()

    def _cancel(self, reason: str) -> None:
        if self.ended:
            return
        with self._lock:
            withdrawn = not self._taken
            if withdrawn:
                self._withdrawn = True
            else:
                self._pending_reason = reason
            sent = self._sent
        if withdrawn:  # no thread has begun to send it: it is never sent
            self.move(_DROPPED)
            self._poke()
        elif sent:
            _in_thread(self._send_cancel, reason)

    def kill(self) -> None:
        self._kill_sent = True
        _in_thread(self._send_kill)

    def outcome(self) -> Outcome:
        if self.state is _DROPPED:
            return "never_started"
        if self._lost is not None:
            return "crashed"
        if self._worker_lost() is not None:
            return "killed" if self._kill_sent else "crashed"
        if self._stopped_by_cancel_here(KILLED_MARK):
            return "killed"
        if self.reason is not None:
            return "cooperative"
        return "completed"

    def _worker_lost(self) -> BaseException | None:
        value = None if self._result is None else self._result[1]
        if isinstance(value, celery.exceptions.WorkerLostError):
            lost: BaseException = value
            return lost
        return None

    def _stopped_by_cancel_here(self, mark: str = STOP_MARK) -> bool:
        """The task recorded that a cancel stopped it (`KILLED_MARK`: a kill did)."""
        if self._result is None:
            return False
        state, value, _ = self._result
        return (
            state == celery.states.REVOKED
            and isinstance(value, celery.exceptions.TaskRevokedError)
            and str(value).startswith(mark)
        )

    @property
    def stopped_by_cancel(self) -> bool:
        if self.reason is None:
            return False
        if self._stopped_by_cancel_here():
            return True
        return self._kill_sent and self._worker_lost() is not None

    def result(self) -> Any:
        if self._send_error is not None:
            raise self._send_error
        if self._wait_error is not None:
            raise self._wait_error
        if self._lost is not None:
            raise BrokenWorkerError(
                f"the Celery worker process running task {self.name} {self.task_id} is gone "
                f"(it stopped listening on Redis for {_CHECK_INTERVAL * _GONE_CHECKS:g} s "
                "without storing a result); bridgecancel will not let Celery run it again: "
                "call again if that is safe"
            )
        assert self._result is not None
        state, value, traceback = self._result
        if state == celery.states.SUCCESS:
            return value
        lost = self._worker_lost()
        if lost is not None:
            exitcode, signal = _exit_status(str(lost))
            raise BrokenWorkerError(
                f"the Celery pool process running task {self.name} {self.task_id} died: "
                f"{lost}", exitcode=exitcode, signal=signal,
            ) from lost
        if self._stopped_by_cancel_here():
            raise RuntimeError(
                f"Celery task {self.name} {self.task_id} was stopped by a cancel that did "
                f"not come from this call ({value})"
            )
        if isinstance(value, BaseException):
            if traceback:
                raise value from RemoteTraceback(traceback)
            raise value
        return value


_RUNNING: Final = JobState.RUNNING
_FINISHED: Final = JobState.FINISHED
_DROPPED: Final = JobState.DROPPED


def _text(value: bytes | str | None) -> str | None:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


def _stop_waiting(result: Any) -> None:
    """Drop a result that will never come from its backend's pending results (as its
    ``__del__`` would, later, when Redis may be gone)."""
    try:
        result.backend.remove_pending_result(result)
    except Exception:  # a backend without pending results, or Redis already gone
        pass


def _in_thread(fn: Callable[..., object], *args: object) -> None:
    """Run a Redis round trip off the event loop thread, without waiting for it."""
    threading.Thread(target=fn, args=args, name="bridgecancel celery cancel", daemon=True).start()


def _exit_status(message: str) -> tuple[int | None, int | None]:
    """The exit code or signal in a ``WorkerLostError``'s message."""
    code = re.search(r"exitcode (-?\d+)", message)
    signal = re.search(r"signal (\d+)", message)
    return (int(code[1]) if code else None), (int(signal[1]) if signal else None)


def _delay(options: dict[str, Any]) -> float:
    """Seconds until the task is due (its countdown or eta), so a cancel outlives it."""
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and countdown > 0:
        return float(countdown)
    eta = options.get("eta")
    if isinstance(eta, datetime.datetime):
        now = datetime.datetime.now(eta.tzinfo)
        return max(0.0, (eta - now).total_seconds())
    return 0.0


# -- checking a call -----------------------------------------------------------------------


def _check_call(signature: object, kill_after: object) -> Wiring:
    if not isinstance(signature, celery.canvas.Signature):
        raise TypeError(
            "run_on_celery() takes a Celery task signature such as add.s(2, 3), "
            f"got {signature!r}"
        )
    sig: Any = signature
    if sig.subtask_type is not None:
        raise TypeError(
            f"run_on_celery() runs one task, got a {sig.subtask_type}: await the "
            "signature of each task instead"
        )
    if kill_after is not None and (isinstance(kill_after, bool) or not isinstance(
        kill_after, (int, float)
    )):
        raise TypeError(f"kill_after must be a number of seconds or None, got {kill_after!r}")
    app: Any = sig.app
    wiring = wiring_for(app)
    if wiring is None:
        raise RuntimeError(
            f"the Celery app {app.main or app!r} is not wired for bridgecancel: call "
            "bridgecancel.celery.install(app) where the app is defined, so that its "
            "workers are wired too"
        )
    checked = _checked.setdefault(app, set())
    name = sig.task
    if name not in checked:  # what the app and the task say, once per task
        if not app.conf.result_backend:
            raise RuntimeError(
                f"the Celery app {app.main or app!r} has no result backend, so a task's "
                "result cannot come back: set result_backend (Redis, say)"
            )
        if _ignores_result(sig):
            _refuse_ignored_result(name)
        checked.add(name)
    if sig.options.get("ignore_result"):
        _refuse_ignored_result(name)
    return wiring


# The task names whose app and class `_check_call` has checked, per app.
_checked: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _refuse_ignored_result(name: str) -> NoReturn:
    raise TypeError(
        f"task {name} ignores its result (ignore_result=True), so run_on_celery() could "
        "never return: set ignore_result=False for it"
    )


def _ignores_result(sig: Any) -> bool:
    try:
        task = sig.type
    except KeyError:  # not registered here (sent by name): nothing to check
        return False
    return bool(task.ignore_result)
