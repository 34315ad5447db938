"""The worker's side of `bridgecancel.celery`, and the Redis layout both sides share.

`wire` (called by ``install(app)``) connects what runs in the Celery worker's pool
processes: a ``task_prerun`` hook claims a call and registers its token source before the
task's body, the app's Task class gets a ``__call__`` that runs the body with that token
current (or, for a call cancelled before it started, not at all), and a listener thread in
each pool process fires the token of the task it names. No anyio and no supervisor here:
the caller's side, `bridgecancel.celery`, builds on this module's keys and scripts.

Per call, one Redis hash, ``bridgecancel:celery:<task id>``, with the fields:

* ``run``: ``"<attempt> <channel>"``, set by the claim when a task starts: its attempt (Celery's
  ``request.retries``) and the pub/sub channel of the pool process running it;
  removed when that attempt asks Celery to retry, so that between attempts the call has
  not started;
* ``stop``: the caller's cancel reason: the tombstone a later claim finds;
* ``waiting``: set by a cancel that found the task started: the caller then waits for a
  result, so an attempt that finds the tombstone stores one (``REVOKED``);
* ``kill``: the ``run`` value a caller's ``kill_after`` stage wants killed.

The claim and the cancel are Lua scripts, so each is atomic: whichever comes first decides
whether the task starts. A cancel is also published on the running process's channel;
the listener re-reads the tombstones of its running tasks every `SWEEP_INTERVAL` seconds
as well, so a message lost to a reconnection only delays the stop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import celery
import redis
from celery import signals
from celery.exceptions import Ignore

from ._tokens import Cancelled, CancelSource, _current, informative_source
from ._util import describe_error

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = (
    "HEADER",
    "KILLED_MARK",
    "STOP_MARK",
    "STOP_SECONDS",
    "Wiring",
    "fire_message",
    "registry",
    "stopped_reason",
    "task_key",
    "wire",
    "wiring_for",
)

logger: Final = logging.getLogger("bridgecancel")

HEADER: Final = "bridgecancel"
"""The message header of a call made by `run_on_celery`: ``{"deadline": <wall clock>}``."""

STOP_MARK: Final = "bridgecancel: "
"""How the reason of a ``REVOKED`` result stored for a cancelled call begins."""

KILLED_MARK: Final = STOP_MARK + "killed: "
"""How it begins when ``kill_after`` killed the pool process running the task."""

_KEY_PREFIX: Final = "bridgecancel:celery:"
_CHANNEL_PREFIX: Final = "bridgecancel:celery:process:"

STOP_SECONDS: Final = 86_400.0
"""How long a cancel is remembered (plus the task's countdown), so that a task still in
a queue, or reserved by a worker, never starts."""

CLAIM_SECONDS: Final = 3_600
"""How long a claim lives after its last renewal; the listener renews those of running
tasks every `RENEW_INTERVAL` seconds."""

RENEW_INTERVAL: Final = 600.0

SWEEP_INTERVAL: Final = 1.0
"""Seconds between the listener's re-reads of its running tasks' tombstones."""


def task_key(task_id: str) -> str:
    return _KEY_PREFIX + task_id


def stopped_reason(reason: str | None) -> str:
    """The reason of the ``REVOKED`` result a stopped call stores."""
    return STOP_MARK + (reason or "cancelled")


# -- the scripts ---------------------------------------------------------------------------

# The worker claims a call as its body is about to start. ARGV: run, claim seconds.
# Returns {verdict, reason}: "run"; "never" (cancelled before it started: nobody waits);
# "stopped" (cancelled after an earlier attempt started: the caller waits for a result).
_CLAIM_SCRIPT: Final = """
local stop = redis.call('HGET', KEYS[1], 'stop')
if stop then
  if redis.call('HEXISTS', KEYS[1], 'waiting') == 1 then return {'stopped', stop} end
  return {'never', stop}
end
redis.call('HSET', KEYS[1], 'run', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'run', ''}
"""

# An attempt that asked Celery to retry gives its claim back (if it is still its own).
# ARGV: run. Returns the reason of a cancel its caller waits on, or false.
_RELEASE_SCRIPT: Final = """
if redis.call('HGET', KEYS[1], 'run') == ARGV[1] then redis.call('HDEL', KEYS[1], 'run') end
if redis.call('HEXISTS', KEYS[1], 'waiting') == 1 then
  return redis.call('HGET', KEYS[1], 'stop')
end
return false
"""

_CANCEL_SCRIPT: Final = """
local run = redis.call('HGET', KEYS[1], 'run')
redis.call('HSETNX', KEYS[1], 'stop', ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not run then return false end
redis.call('HSET', KEYS[1], 'waiting', '1')
local channel = string.match(run, ' (.+)$')
return {run, redis.call('PUBLISH', channel, ARGV[3])}
"""
"""The caller's cancel. ARGV: reason, seconds to remember it, the message to publish.
Returns false if the call has not started (it never will), else {run, receivers}."""

_KILL_SCRIPT: Final = """
local run = redis.call('HGET', KEYS[1], 'run')
if not run then return false end
redis.call('HSET', KEYS[1], 'kill', run)
local channel = string.match(run, ' (.+)$')
local message = cjson.encode({op = 'kill', id = ARGV[1], run = run})
return {run, redis.call('PUBLISH', channel, message)}
"""
"""The caller's kill stage: kill the attempt running now. ARGV: the task id. Returns false
if no attempt is running."""


# -- wiring an app -------------------------------------------------------------------------


class Wiring:
    """What bridgecancel knows of one installed Celery app: where its Redis is, and this
    process's connection and listener (both made anew in a forked process)."""

    def __init__(self, app: celery.Celery, redis_url: str | None) -> None:
        # Weakly: `_wirings` maps the app to this, and must not keep it alive.
        self._app = weakref.ref(app)
        self._given_url = redis_url
        self._url: str | None = redis_url
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._listener: _Listener | None = None

    @property
    def app(self) -> celery.Celery:
        app = self._app()
        if app is None:  # pragma: no cover - a wiring is reached through its live app
            raise RuntimeError("the Celery app of this wiring is gone")
        return app

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = _find_redis_url(self.app)
        return self._url

    def _here(self) -> None:
        """In a new process (a forked pool process, or the first use), forget a parent's
        connection and listener, and its lock, which a thread of the parent may have
        held when it forked."""
        pid = os.getpid()
        if self._pid != pid:
            with _process_lock:
                if self._pid != pid:
                    self._lock = threading.Lock()
                    self._client = None
                    self._scripts = {}
                    self._listener = None
                    self._pid = pid

    def client(self) -> redis.Redis:
        """This process's Redis client (a thread-safe connection pool)."""
        self._here()
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    # Options in the URL win over these: a Redis that does not answer
                    # must not hang a claim or a cancel for ever.
                    client = redis.Redis.from_url(
                        self.url, socket_connect_timeout=5, socket_timeout=30,
                        health_check_interval=30,
                    )
                    self._scripts = {
                        name: client.register_script(text)
                        for name, text in (
                            ("claim", _CLAIM_SCRIPT),
                            ("release", _RELEASE_SCRIPT),
                            ("cancel", _CANCEL_SCRIPT),
                            ("kill", _KILL_SCRIPT),
                        )
                    }
                    self._client = client
        return client

    def script(self, name: str) -> Script:
        self.client()
        return self._scripts[name]

    def listener(self, patience: float = 30.0) -> _Listener:
        """This process's listener, started (and subscribed, within `patience` seconds)
        on first use."""
        self._here()
        listener = self._listener
        if listener is None:
            client = self.client()
            with self._lock:
                listener = self._listener
                if listener is None:
                    listener = self._listener = _Listener(client, patience)
        return listener

    def stop_listener(self) -> None:
        self._here()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()


_wirings: weakref.WeakKeyDictionary[celery.Celery, Wiring] = weakref.WeakKeyDictionary()
_wirings_lock = threading.Lock()
_process_lock = threading.Lock()  # made anew in a forked child (see `_Registry.forget`)


def wiring_for(app: celery.Celery) -> Wiring | None:
    """The app's wiring, if `install` wired it."""
    return _wirings.get(app)


def wire(app: celery.Celery, redis_url: str | None) -> Wiring:
    """Wire `app` (idempotent): the Task class's ``__call__`` and the worker's signals."""
    with _wirings_lock:
        wiring = _wirings.get(app)
        if wiring is not None:
            if redis_url is not None and redis_url != wiring._given_url:
                raise ValueError(
                    f"bridgecancel.celery.install() was already called for {app!r} with "
                    f"redis_url={wiring._given_url!r}; call it once, where the app is defined"
                )
            return wiring
        wiring = Wiring(app, redis_url)
        base: Any = app.Task
        if not _routes_through_us(base):
            # The app's own Task class (Celery makes one per app): every task of the app
            # derives from it, whether it was defined before or after this call.
            base.__call__ = _make_call(base)
        _wirings[app] = wiring
    _connect_signals()
    return wiring


def _find_redis_url(app: celery.Celery) -> str:
    conf: Any = app.conf
    for name in ("broker_url", "result_backend"):
        value = conf.get(name)
        if isinstance(value, str):
            first = value.split(";")[0].strip()
            if first.split("://")[0] in ("redis", "rediss", "unix"):
                return first
    raise RuntimeError(
        f"bridgecancel.celery sends cancels through Redis, and neither the broker nor the "
        f"result backend of {app.main or app!r} is Redis; pass install(app, "
        "redis_url='redis://...')"
    )


# -- the listener --------------------------------------------------------------------------


class _Listener:
    """A pool process's ear: a thread subscribed to the process's own channel.

    It fires the token of a running task named in a ``fire`` message and kills this
    process for a ``kill`` message naming the attempt it runs now; every `SWEEP_INTERVAL`
    seconds it re-reads its running tasks' tombstones and kill requests (a message sent
    while it was reconnecting is not lost) and renews their claims.
    """

    def __init__(self, client: redis.Redis, patience: float) -> None:
        self.channel = _CHANNEL_PREFIX + uuid.uuid4().hex
        self._client = client
        self._stopping = threading.Event()
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(self.channel)
        # Confirmed before any claim names the channel (the claim travels on another
        # connection): a cancel published after a claim is always heard.
        deadline = time.monotonic() + patience
        while True:
            message = self._pubsub.get_message(timeout=min(1.0, patience))
            if message is not None and message["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                self._pubsub.close()
                raise RuntimeError(f"Redis did not confirm the subscription to {self.channel}")
        self._thread = threading.Thread(
            target=self._listen, name="bridgecancel celery listener", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _listen(self) -> None:
        next_sweep = next_renewal = 0.0
        while not self._stopping.is_set():
            try:
                message = self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=SWEEP_INTERVAL
                )
                if message is not None:
                    _handle(message["data"])
                now = time.monotonic()
                if now >= next_sweep:
                    renew = now >= next_renewal
                    self._sweep(renew)
                    next_sweep = now + SWEEP_INTERVAL
                    if renew:
                        next_renewal = now + RENEW_INTERVAL
            except redis.RedisError as exc:
                logger.warning("bridgecancel's Celery listener lost Redis (%s); retrying", exc)
                self._stopping.wait(1.0)
            except Exception:  # pragma: no cover - a bug: keep listening all the same
                logger.exception("bridgecancel's Celery listener failed")
        try:
            self._pubsub.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass

    def _sweep(self, renew: bool) -> None:
        running = registry.snapshot()
        if not running:
            return
        pipe = self._client.pipeline(transaction=False)
        for task_id in running:
            pipe.hmget(task_key(task_id), "stop", "kill")
            if renew:
                pipe.expire(task_key(task_id), CLAIM_SECONDS)
        replies = pipe.execute()
        step = 2 if renew else 1
        for task_id, (stop, kill) in zip(running, replies[::step], strict=True):
            if stop is not None:
                registry.fire(task_id, stop.decode())
            if kill is not None:
                registry.kill(task_id, kill.decode())


def _handle(data: bytes | str) -> None:
    message = json.loads(data)
    if message.get("op") == "fire":
        registry.fire(message["id"], message["reason"])
    elif message.get("op") == "kill":
        registry.kill(message["id"], message["run"])


def fire_message(task_id: str, reason: str) -> str:
    return json.dumps({"op": "fire", "id": task_id, "reason": reason})


# -- the tasks running in this process -----------------------------------------------------


class _Entry:
    """A call whose task runs in this process: the task and its request, its source, its
    claim, the verdict."""

    __slots__ = ("request", "run", "source", "task", "verdict", "reason", "wrapped")

    def __init__(self, task: Any, source: CancelSource, run: str, wrapped: bool) -> None:
        self.task = task
        self.request = task.request
        self.source = source
        self.run = run
        self.wrapped = wrapped  # the task's class routes through our __call__
        self.verdict = "run"
        self.reason = ""


class _Registry:
    """The calls running in this process, by task id.

    A task leaves it the moment its body ends, under the lock a kill holds: a kill thus
    lands only while the body of the very attempt it names runs here.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.killable = False  # a prefork pool process: killing it kills one task only
        self._warned_unkillable = False

    def add(self, task_id: str, entry: _Entry) -> None:
        with self.lock:
            self._entries[task_id] = entry

    def get(self, task_id: str) -> _Entry | None:
        with self.lock:
            return self._entries.get(task_id)

    def remove(self, task_id: str, entry: _Entry) -> bool:
        with self.lock:
            if self._entries.get(task_id) is entry:
                del self._entries[task_id]
                return True
            return False

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self._entries)

    def fire(self, task_id: str, reason: str) -> None:
        entry = self.get(task_id)
        if entry is not None:
            # Waiters wake here; user callbacks run in bridgecancel's callback thread.
            entry.source._cancel_detached(reason)

    def kill(self, task_id: str, run: str) -> None:
        with self.lock:
            entry = self._entries.get(task_id)
            if entry is None or entry.run != run:
                return  # that attempt's body has ended here: never kill what came next
            if self.killable:
                logger.warning(
                    "bridgecancel: killing Celery pool process %d, still running task %s "
                    "after its caller's kill_after", os.getpid(), task_id,
                )
                _record_killed(task_id, entry)
                os.kill(os.getpid(), signal.SIGKILL)  # under the lock: the task is still here
            warn = not self._warned_unkillable
            self._warned_unkillable = True
        if warn:
            logger.warning(
                "bridgecancel: kill_after cannot stop task %s: only a prefork pool process "
                "runs one task alone (this pool shares its process); the caller waits for "
                "the task to end", task_id,
            )

    def forget(self) -> None:
        """In a forked child: the parent's tasks are not running here, and no lock of
        this module is held."""
        global _process_lock
        self.lock = threading.Lock()
        self._entries = {}
        self.killable = False
        _process_lock = threading.Lock()


registry: Final = _Registry()
os.register_at_fork(after_in_child=registry.forget)


def _record_killed(task_id: str, entry: _Entry) -> None:
    """Record the call as killed (``REVOKED``) before the kill, so that its caller hears
    of it at once: Celery's worker may take seconds to notice a pool process gone (it then
    records ``WorkerLostError`` over it)."""
    try:
        reason = KILLED_MARK + (entry.source.token.reason or "cancelled")
        entry.task.backend.mark_as_revoked(task_id, reason, request=entry.request)
    except Exception as exc:  # the caller will hear of it from Celery, later
        logger.warning("bridgecancel: could not record task %s as killed: %s", task_id, exc)


# -- the hooks -----------------------------------------------------------------------------


def _header(task: Any) -> dict[str, Any] | None:
    header = getattr(task.request, HEADER, None)
    return header if isinstance(header, dict) else None


def _job_source(header: dict[str, Any]) -> CancelSource:
    """The task's source: it reports the caller's deadline but fires only on cancel."""
    wall_deadline = header.get("deadline")
    if not isinstance(wall_deadline, (int, float)) or wall_deadline == math.inf:
        return CancelSource()
    return informative_source(time.monotonic() + wall_deadline - time.time())


def _routes_through_us(cls: type) -> bool:
    return any(getattr(vars(k).get("__call__"), "_bridgecancel", False) for k in cls.__mro__)


_routed: dict[type, bool] = {}
_warned_classes: set[str] = set()


def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
               **_: Any) -> None:
    """Before the body (in the thread that runs it): claim the call, register its source."""
    if task is None or task_id is None:
        return
    header = _header(task)
    wiring = wiring_for(task.app)
    if header is None or wiring is None:
        return
    cls = type(task)
    wrapped = _routed.get(cls)
    if wrapped is None:
        wrapped = _routed[cls] = _routes_through_us(cls)
    if not wrapped and task.name not in _warned_classes:
        _warned_classes.add(task.name)
        logger.error(
            "bridgecancel: the class of task %s does not derive from the app's Task "
            "(app.Task), so its token never fires and a cancelled call may still start; "
            "derive its base class from app.Task", task.name,
        )
    entry = _Entry(task, _job_source(header), "", wrapped)
    try:
        entry.run = _run_value(task, wiring)
        registry.add(task_id, entry)
        verdict, reason = wiring.script("claim")(
            keys=[task_key(task_id)], args=[entry.run, CLAIM_SECONDS]
        )
    except Exception as exc:  # the body must not run unclaimed: a cancel would miss it
        entry.verdict, entry.reason = "error", describe_error(exc)
        registry.add(task_id, entry)
        return
    entry.verdict = verdict.decode()
    entry.reason = reason.decode()


def _run_value(task: Any, wiring: Wiring) -> str:
    """The claim's ``run``: this attempt, and this process's channel."""
    return f"{task.request.retries or 0} {wiring.listener().channel}"


def _on_postrun(sender: Any = None, task_id: str | None = None, task: Any = None,
                state: str | None = None, **_: Any) -> None:
    if task is None or task_id is None or _header(task) is None:
        return
    entry = registry.get(task_id)
    if entry is not None and registry.remove(task_id, entry):
        entry.source.close()  # __call__ never ran: the task's class is not the app's
    wiring = wiring_for(task.app)
    if state == celery.states.RETRY and wiring is not None:
        # Celery will run the call again: until it does, the call has not started.
        stop = wiring.script("release")(
            keys=[task_key(task_id)], args=[_run_value(task, wiring)]
        )
        if stop is not None:  # cancelled while this attempt ran, and its caller waits:
            # the call is over now (the next attempt will not run), not after the countdown.
            reason = stopped_reason(stop.decode())
            task.backend.mark_as_revoked(task_id, reason, request=task.request)


def _make_call(base: Any) -> Callable[..., Any]:
    """The ``__call__`` of the app's Task class: a call's body under its token."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = registry.get(self.request.id) if self.request.id else None
        if entry is None:  # not a call from run_on_celery (or called directly)
            return super(base, self).__call__(*args, **kwargs)
        return _run_body(self, base, entry, args, kwargs)

    __call__._bridgecancel = True  # type: ignore[attr-defined]
    return __call__


def _run_body(
    task: Any, base: Any, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    task_id: str = task.request.id
    try:
        if entry.verdict == "error":
            raise RuntimeError(
                f"bridgecancel could not claim task {task.name} on Redis ({entry.reason}), "
                "so a cancel could not reach it: it was not run"
            )
        if entry.verdict == "never":  # cancelled before it started: its caller has left
            raise Ignore()
        if entry.verdict == "stopped":  # cancelled between attempts: its caller waits
            _store_stopped(task, entry.reason)
        token = entry.source.token
        reset = _current.set(token)
        try:
            return super(base, task).__call__(*args, **kwargs)
        except Cancelled as exc:
            if token.cancel_called:  # stopped because its caller was cancelled
                _store_stopped(task, token.reason)
            raise RuntimeError(
                f"task {task.name} raised Cancelled ({exc.reason}) for a token other than "
                "its own, which was not cancelled"
            ) from exc
        finally:
            _current.reset(reset)
    finally:
        if registry.remove(task_id, entry):  # the body has ended: no kill lands after this
            entry.source.close()


def _store_stopped(task: Any, reason: str | None) -> None:
    """Record the call as stopped (``REVOKED``), and end the task without a result of its
    own (Celery logs it as ignored, at INFO)."""
    task.backend.mark_as_revoked(task.request.id, stopped_reason(reason), request=task.request)
    raise Ignore()


def _on_process_init(**_: Any) -> None:
    """A prefork pool process: it runs one task at a time, so it may be killed for one.
    Its listener starts now, within Celery's 4 s for a pool process to start."""
    registry.killable = True
    for wiring in list(_wirings.values()):
        try:
            wiring.listener(patience=2.0)
        except Exception:  # the first task will try again, and say why
            logger.exception("bridgecancel: could not start the Celery listener")


def _on_process_shutdown(**_: Any) -> None:
    for wiring in list(_wirings.values()):
        wiring.stop_listener()


_connected = False


def _connect_signals() -> None:
    global _connected
    with _wirings_lock:
        if _connected:
            return
        _connected = True
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="bridgecancel.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="bridgecancel.postrun")
    signals.worker_process_init.connect(
        _on_process_init, weak=False, dispatch_uid="bridgecancel.process_init"
    )
    signals.worker_process_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="bridgecancel.process_shutdown"
    )
    signals.worker_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="bridgecancel.shutdown"
    )
