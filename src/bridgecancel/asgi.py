"""Web handlers: cancel a request's work when its client leaves, and run sync handlers cancellably.

`CancelOnDisconnectMiddleware` is pure ASGI (no framework is imported): it runs each HTTP
request's app call in a cancel scope that is cancelled when the client disconnects before
the response is complete, or when the request runs past an optional deadline. Work the
handler started with `bridgecancel.run_sync` or `bridgecancel.run_process` then stops
through its token.

`threaded` turns a plain ``def`` endpoint or dependency into an ``async def`` that runs it
through `bridgecancel.run_sync`, keeping its signature so FastAPI still injects its
parameters.

What the servers do, which this module relies on (checked by the tests under real servers):
uvicorn and hypercorn report a client that left only to an app that calls ``receive()``;
both report ``http.disconnect`` as soon as a response is complete (uvicorn on every later
``receive()``, hypercorn once, while the last message is being sent); hypercorn's
``receive()`` always yields to the event loop before it returns.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
import time
import types
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    MutableMapping,
)
from typing import Any, Final, ParamSpec, Protocol, TypeVar, overload

import anyio

from ._backend import BackgroundTask, new_cancel_scope, on_trio
from ._iterate import generator_function
from ._threads import run_sync
from ._tokens import DEADLINE_REASON
from ._util import check_seconds, describe, describe_error

__all__ = (
    "CancelOnDisconnectMiddleware",
    "ThreadedDecorator",
    "threaded",
)

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
# Named without an underscore: the middleware's signature in the docs shows it.
ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_WATCHER_NAME: Final = "bridgecancel.asgi watcher"

_TIMEOUT_BODY = b"The request took longer than the server allows; it was stopped.\n"

_MIDDLEWARE: Final = "CancelOnDisconnectMiddleware"  # how argument errors name the call

# Why the middleware cancelled a request, as its log record says (the `reason` field).
_DISCONNECTED_REASON: Final = "client disconnected"

_logger: Final = logging.getLogger("bridgecancel")

# True while an app runs under the middleware, for `threaded` to tell whether anything
# will cancel it. A context variable, because the request's task and what it starts see
# it: asyncio tasks, anyio and trio nursery tasks (Starlette's BaseHTTPMiddleware runs the
# rest of the app in one) and anyio's worker threads run in a copy of their starter's
# context (trio's system tasks do not, unless given one: bridgecancel's own are), and
# reading one costs a lookup. Set and reset per call: a task that goes on after the
# middleware returned (a test, an app that calls another app) is no longer under it.
_under_middleware: Final = contextvars.ContextVar(
    "bridgecancel.asgi.under_middleware", default=False
)


class CancelOnDisconnectMiddleware:
    """ASGI middleware: a client that leaves (or a request past its deadline) cancels its handler.

    Each HTTP request's app call runs in a cancel scope. The scope is cancelled when the
    client disconnects before the response is complete, so a handler waiting in
    `bridgecancel.run_sync` or `bridgecancel.run_process` sees its worker's token fire
    and the worker stop. A disconnect after the response is complete cancels nothing
    (work the app does after its response, such as background tasks, runs on). The
    handler sees an ordinary cancellation: ``finally`` blocks run, and `open_token()`
    inside it yields a token that fires with the request.

    To see the disconnect, the middleware is the only reader of the server's
    ``receive``: it reads ahead while the app runs and hands every message to the app,
    in order and untouched, when the app calls ``receive``. It holds at most about
    `max_buffered` bytes of request body that the app has not asked for yet (one
    message is never split, so it may hold one message more); past that it stops
    reading until the app reads, so that a large upload cannot fill memory. While it has
    stopped reading, it cannot see a disconnect: detection resumes when the app reads
    the body. An error from the server's ``receive``, or a message from it that is not
    an ASGI message (a dict with a ``"type"`` key; that raises `TypeError`), is raised by
    the app's next ``receive`` in turn.

    ``lifespan`` and ``websocket`` scopes pass through untouched.

    Args:
        app: the ASGI application to wrap (``ASGIApp``: an ``async`` callable taking
            ``scope, receive, send``).
        timeout: seconds a request may run before its handler is cancelled. If no
            response has started by then, the client gets ``503 Service Unavailable``;
            if one has, the connection is closed (the response is cut short, never
            passed off as complete). Once the response is complete, the deadline no
            longer applies. ``None`` (the default) or `math.inf` means no deadline.
        max_buffered: how many bytes of request body to read ahead of the app
            (1 MiB by default); 0 reads a message only when none is held.

    Raises:
        TypeError: if `app` is not callable or an option has the wrong type.
        ValueError: if `timeout` is not positive or is NaN, or `max_buffered` is negative.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | None = None,
        max_buffered: int = 1024 * 1024,
    ) -> None:
        if not callable(app):
            raise TypeError(f"CancelOnDisconnectMiddleware wraps an ASGI app, got {app!r}")
        if timeout is not None:
            # negative=True: 0 and below are refused just after, as not positive.
            # math.inf passes: it arms a scope deadline that never comes.
            seconds = check_seconds(
                timeout, _MIDDLEWARE, "timeout", none="for no deadline", negative=True
            )
            if seconds <= 0:
                raise ValueError(
                    f"{_MIDDLEWARE}() timeout must be a positive number of seconds, got "
                    f"{timeout!r}; pass None for no deadline"
                )
        if isinstance(max_buffered, bool) or not isinstance(max_buffered, int):
            raise TypeError(f"max_buffered must be a number of bytes, got {max_buffered!r}")
        if max_buffered < 0:
            raise ValueError(f"max_buffered must be 0 or more bytes, got {max_buffered}")
        self.app = app
        self.timeout = timeout
        self.max_buffered = max_buffered

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        # Every scope: a @threaded function in a websocket or lifespan handler has the
        # middleware around it too, and adding it again would not help.
        entered = _under_middleware.set(True)
        try:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            exchange = _Exchange(receive, send, self.max_buffered, self.timeout)
            try:
                with exchange.app_scope:
                    await _run_watched(self.app(scope, exchange.receive, exchange.send), exchange)
            finally:
                if exchange.watching:
                    await exchange.stop_watching()
                if exchange.disconnect_cancelled or (
                    self.timeout is not None and exchange.app_scope.cancel_called
                ):
                    exchange.log_cancelled(scope)
            if exchange.watch_error is not None:
                raise exchange.watch_error  # a bug in watch(), surfaced
            if self.timeout is not None and exchange.timed_out():
                await exchange.answer_timeout()
        finally:
            _under_middleware.reset(entered)


@types.coroutine
def _run_watched(app_call: Awaitable[None], exchange: _Exchange) -> Generator[Any, Any, None]:
    """``await app_call``, starting `exchange`'s watcher the first time the app waits.

    Until the app first waits, no disconnect could be acted on anyway, and an app that
    answers without ever waiting (uvicorn's ``send`` does not wait while the client
    keeps up) costs no task at all. So this passes what the app yields to the event
    loop, and what the loop sends or throws back, exactly as ``await`` would, and starts
    the watcher at the first yield.
    """
    steps = app_call.__await__()
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            if thrown is None:
                yielded = steps.send(sent)
            else:
                yielded, thrown = steps.throw(thrown), None
        except StopIteration:
            return
        if not exchange.watching:
            exchange.start_watching()
        try:
            sent = yield yielded
        except GeneratorExit:
            close = getattr(steps, "close", None)
            if close is not None:
                close()
            raise
        except BaseException as exc:  # handed to the app, as await would
            sent, thrown = None, exc


class _Exchange:
    """One HTTP request: the watcher's read-ahead, the app's receive, and the response state."""

    # What most requests never change, as class-level defaults: an instance sets its own
    # only when it changes (fewer stores per request than setting them all in __init__).
    _held_bytes = 0
    _disconnect: _Message | None = None
    _receive_error: Exception | None = None  # what the server's receive raised
    # Made only when someone waits, and dropped once set: most requests never wait.
    _app_waiting: anyio.Event | None = None  # for a message to arrive
    _watcher_waiting: anyio.Event | None = None  # for the app to take one
    _trailers = False
    _watcher: BackgroundTask | None = None  # once started
    disconnect_cancelled = False  # the disconnect, rather than the deadline, cancelled
    watching = False
    watch_error: BaseException | None = None
    response_started = False
    response_complete = False

    def __init__(
        self, receive: _Receive, send: _Send, max_buffered: int, timeout: float | None
    ) -> None:
        self._server_receive = receive
        self._server_send = send
        self._max_buffered = max_buffered
        self._held: deque[_Message] = deque()
        self._on_trio = on_trio()
        self._timeout = timeout
        self._started = time.monotonic()  # for the log record of a cancelled request
        self.app_scope: Any = new_cancel_scope(self._on_trio)
        if timeout is not None:
            self.app_scope.deadline = anyio.current_time() + timeout

    def start_watching(self) -> None:
        # Held by no nursery (one per request would cost more than the rest of the
        # middleware together), and reaped before the request returns all the same
        # (stop_watching); what it raises is handed to the request (watch_error).
        self.watching = True
        self._watcher = BackgroundTask(self.watch, name=_WATCHER_NAME, trio_task=self._on_trio)

    async def stop_watching(self) -> None:
        """Cancel the watcher and wait until it has ended: no part of a request outlives it.

        A watcher that has read the disconnect has ended already (hypercorn reports one
        as every response completes): then there is nothing to wait for.
        """
        assert self._watcher is not None
        await self._watcher.stop()
        self.watch_error = self._watcher.error

    async def watch(self) -> None:
        """Read the server's messages ahead of the app until the client disconnects."""
        while True:
            while self._held and self._held_bytes >= self._max_buffered:
                # Bounded: wait until the app reads.
                self._watcher_waiting = self._watcher_waiting or anyio.Event()
                await self._watcher_waiting.wait()
            try:
                message = await self._server_receive()
            except Exception as exc:
                # The app's receive raises it in turn, as the server's would have.
                self._receive_error = exc
                self._wake_app()
                return
            try:
                kind = message["type"]
            except Exception:  # None, a list, a dict without "type"...: the app fails at once
                self._receive_error = _malformed(message)
                self._wake_app()
                return
            if kind == "http.disconnect":
                self._disconnect = message
                if not self.response_complete and not self.app_scope.cancel_called:
                    self.disconnect_cancelled = True
                    self.app_scope.cancel(_DISCONNECTED_REASON)
                self._wake_app()
                return  # uvicorn would repeat the disconnect forever
            self._held.append(message)
            self._held_bytes += _body_size(message)
            self._wake_app()

    async def receive(self) -> _Message:
        """The app's receive: hands back a held message at once, without yielding.

        Not yielding matters: code such as Starlette's ``is_disconnected()`` calls
        ``receive`` in an already cancelled scope to poll for a held message.
        """
        while True:
            if self._held:
                message = self._held.popleft()
                self._held_bytes -= _body_size(message)
                if self._watcher_waiting is not None:
                    self._watcher_waiting.set()
                    self._watcher_waiting = None
                return message
            if self._disconnect is not None:
                return self._disconnect
            if self._receive_error is not None:
                raise self._receive_error
            self._app_waiting = self._app_waiting or anyio.Event()
            await self._app_waiting.wait()

    def send(self, message: _Message) -> Awaitable[None]:
        """The app's send: marks the response complete before its last message goes out.

        Servers report ``http.disconnect`` while that last message is being sent (and
        after); marking it first makes that disconnect cancel nothing. A plain function
        that returns the server's own awaitable: no coroutine of its own per message.
        """
        kind = message["type"]
        if kind == "http.response.body" and not self._trailers:  # the common case first
            if not message.get("more_body", False):
                self.response_complete = True
                if self._timeout is not None:
                    self.app_scope.deadline = math.inf
        elif kind == "http.response.start":
            self.response_started = True
            self._trailers = bool(message.get("trailers", False))
        elif (
            (kind == "http.response.zerocopysend" and not self._trailers)
            and not message.get("more_body", False)
        ) or (
            (kind == "http.response.trailers" and not message.get("more_trailers", False))
            or kind == "http.response.pathsend"
        ):
            self._complete()
        return self._server_send(message)

    def _complete(self) -> None:
        self.response_complete = True
        if self._timeout is not None:
            self.app_scope.deadline = math.inf  # a complete response is never cut short

    def timed_out(self) -> bool:
        """True if the deadline stopped the app before its response was complete."""
        # cancel_called rather than cancelled_caught: an app that swallowed the
        # cancellation and returned without a response still gets its 503.
        return (
            self.app_scope.cancel_called and self._disconnect is None and not self.response_complete
        )

    def log_cancelled(self, scope: _Scope) -> None:
        """One INFO record for a request the middleware cancelled: what, why, how long.

        The path is the scope's, without the query string (which may hold secrets). The
        same values are on the record as `method`, `path`, `reason` and `duration_ms`,
        for formatters and structured logging.
        """
        if not _logger.isEnabledFor(logging.INFO):
            return
        duration_ms = (time.monotonic() - self._started) * 1000
        method = scope.get("method", "?")
        path = scope.get("path", "?")
        reason = _DISCONNECTED_REASON if self.disconnect_cancelled else DEADLINE_REASON
        _logger.info(
            "%s %s cancelled after %.0f ms: %s",
            method,
            path,
            duration_ms,
            reason,
            extra={"method": method, "path": path, "reason": reason, "duration_ms": duration_ms},
        )

    async def answer_timeout(self) -> None:
        if self.response_started:
            return  # returning with the response unfinished makes the server close it
        self.response_complete = True
        await self._server_send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
                ],
            }
        )
        await self._server_send({"type": "http.response.body", "body": _TIMEOUT_BODY})

    def _wake_app(self) -> None:
        if self._app_waiting is not None:
            self._app_waiting.set()
            self._app_waiting = None


def _malformed(message: object) -> TypeError:
    """The app's error for a server message that is not an ASGI message.

    TypeError for every shape (None, a number, a list, a dict without "type"): the
    server handed over a value of the wrong type, and a TypeError is what an app
    reading ``message["type"]`` sees for most of them. One type, whatever the shape,
    so that one ``except`` handles the fault.
    """
    try:
        shown = repr(message)
    except Exception as exc:  # a repr that fails must not hide the fault
        shown = f"<{type(message).__qualname__} whose repr() raised {describe_error(exc)}>"
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return TypeError(
        f"the server's receive() returned {shown}, which is not an ASGI message (a dict "
        f'with a "type" key); {_MIDDLEWARE} stopped reading from it. The ASGI server, or '
        "a middleware between it and this one, is broken."
    )


def _body_size(message: _Message) -> int:
    body = message.get("body")
    return len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0


# -- threaded -----------------------------------------------------------------

# `threaded`: a sync endpoint or dependency made async, running through `run_sync`.
#
# It works without the middleware, but then nothing cancels it when the client leaves:
# the first call of each function outside the middleware logs a warning saying so.

P = ParamSpec("P")
T = TypeVar("T")


class ThreadedDecorator(Protocol):
    """What ``threaded(limiter=..., interrupt_after=...)`` returns."""

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Iterator[T]], /
    ) -> Callable[P, AsyncGenerator[T, None]]: ...

    @overload
    def __call__(self, func: Callable[P, T], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


@overload
def threaded(  # type: ignore[overload-overlap]
    func: Callable[P, Iterator[T]], /
) -> Callable[P, AsyncGenerator[T, None]]: ...


@overload
def threaded(func: Callable[P, T], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


@overload
def threaded(
    *,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> ThreadedDecorator: ...


def threaded(
    func: Callable[..., Any] | None = None,
    /,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> Any:
    """Turn a sync function into an async one that runs it through `bridgecancel.run_sync`.

    For web frameworks that run a plain ``def`` endpoint or dependency in
    ``anyio.to_thread.run_sync`` (which waits for the thread and gives it no way to
    stop): decorated, it runs in a worker thread whose `current_token()` fires when the
    request is cancelled (for instance by `CancelOnDisconnectMiddleware`). Called with no
    `CancelOnDisconnectMiddleware` around it, nothing cancels it when the client leaves:
    the first such call of each decorated function logs a WARNING on the
    ``bridgecancel`` logger that says so and how to add the middleware.

    A generator function becomes an async generator function that runs the generator
    through `bridgecancel.iterate`: each step in a worker thread, under one token for the
    whole iteration, and its ``finally`` in a worker too. FastAPI streams a generator
    endpoint's items (``response_class=StreamingResponse``, JSON Lines, server-sent
    events); as a ``yield`` dependency, its ``except`` blocks still see the endpoint's
    error, thrown into the generator in a worker thread.

    The wrapper keeps the function's name, docstring and signature (with string
    annotations evaluated where possible), so FastAPI injects path, query, body and
    ``Depends`` parameters as it did. Use it bare (``@threaded``) or with `run_sync`'s
    options (``@threaded(interrupt_after=1.0)``).

    Args:
        func: a synchronous function or generator function (not an ``async def``).
        limiter: passed to `run_sync` (or `iterate`).
        interrupt_after: passed to `run_sync` (or `iterate`).

    Raises:
        TypeError: if `func` is an async function or not callable, or `interrupt_after`
            is not a number.
        ValueError: if `interrupt_after` is negative or NaN.
    """
    if interrupt_after is not None:  # checked here, not at the first request
        interrupt_after = check_seconds(
            interrupt_after, "threaded", "interrupt_after", none="to never interrupt"
        )
    if func is None:
        return functools.partial(_threaded, limiter=limiter, interrupt_after=interrupt_after)
    return _threaded(func, limiter=limiter, interrupt_after=interrupt_after)


def _threaded(
    func: Callable[P, T],
    *,
    limiter: anyio.CapacityLimiter | None,
    interrupt_after: float | None,
) -> Callable[P, Any]:
    if not callable(func):
        raise TypeError(f"@threaded decorates a function, got {func!r}")
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"{func!r} is already async: @threaded is for plain `def` functions")
    # Popped by the first call with no middleware around it (list.pop() is atomic, so
    # the warning is logged once even if two event loops race for it); once it is
    # empty, a call costs one more truth test and nothing else.
    unwarned: list[Callable[..., object]] = [func]
    wrapper: Callable[P, Any]
    if inspect.isgeneratorfunction(func):
        wrapper = generator_function(func, limiter=limiter, interrupt_after=interrupt_after)
    else:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if unwarned and not _under_middleware.get():
                _warn_unguarded(unwarned)
            if kwargs:  # frameworks pass parameters by name
                call = functools.partial(func, *args, **kwargs)
                return await run_sync(call, limiter=limiter, interrupt_after=interrupt_after)
            return await run_sync(func, *args, limiter=limiter, interrupt_after=interrupt_after)

    wrapper = functools.wraps(func)(wrapper)
    wrapper.__signature__ = _signature(func)  # type: ignore[attr-defined]
    return wrapper


def _warn_unguarded(unwarned: list[Callable[..., object]]) -> None:
    """Say once per function that nothing cancels its thread when the client leaves.

    Once per function rather than per process: each warning names a function that
    nothing protects, so an app that has the middleware on one part only (a mounted
    sub-app, say) learns of every unprotected one, not just the first that was called.
    """
    try:
        func = unwarned.pop()
    except IndexError:  # another thread's call took it
        return
    _logger.warning(
        "@threaded %s runs without CancelOnDisconnectMiddleware around it: nothing "
        "cancels its worker thread when the client disconnects, so the thread runs to "
        "its end. Add the middleware to the ASGI app: "
        "app.add_middleware(CancelOnDisconnectMiddleware) in Starlette or FastAPI, or "
        "app = CancelOnDisconnectMiddleware(app) around any ASGI app (from "
        "bridgecancel.asgi import CancelOnDisconnectMiddleware). Logged once per function.",
        describe(func),
    )


def _signature(func: Callable[..., object]) -> inspect.Signature:
    # Evaluated annotations: a framework that resolves string annotations in the
    # wrapper's globals (older FastAPI releases do) would look in this module.
    try:
        return inspect.signature(func, eval_str=True)
    except Exception:  # a name only imported under TYPE_CHECKING, say
        return inspect.signature(func)
