"""Django: sync views that stop when their client leaves, their queries cancelled on the server.

Django (5.0 and later) cancels an async view's task when its client disconnects, but a
plain ``def`` view runs in a thread through asgiref's ``sync_to_async``, which cannot stop
it: the task ends (or waits) while the view runs on, holding its thread, its database
connection and its query to the end. `cancellable` turns such a view into an async one
that runs it through `bridgecancel.run_sync`: the view's `current_token()` fires when
Django cancels the request (its client left) or when the view's own deadline passes, and
every query the view runs through Django's database connections is cancelled on the
database server at that moment (`cancel_queries_on`).

Where the view runs, and what follows from it:

* In a bridgecancel worker thread (anyio's pool, bounded by its thread limiter), not in
  the request's thread-sensitive thread where Django runs sync middleware, signals and
  template rendering. So the view sees its own thread's state: thread-locals that sync
  middleware set are not visible in it.
* Django's database connections belong to the thread that opened them. In the worker the
  view gets its own, and at its end they are closed, whatever ``CONN_MAX_AGE`` says:
  a pooled worker thread may run no Django code again before it exits, and a connection
  kept there would be open with nobody to close it (Django advises against persistent
  connections under ASGI for the same reason; use the backend's connection pool).
  At its start, connections the thread already holds are closed if unusable or past
  their age, as Django's ``request_started`` does.
* ``ATOMIC_REQUESTS``: the view's transactions are opened in the worker, around the
  view, as Django would open them around a sync view (Django refuses to for an async
  one). A cancelled view's transaction is rolled back.

Only `bridgecancel.django` imports Django; the rest of bridgecancel never does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Final, ParamSpec, TypeVar, overload

import anyio

try:
    from django.db import DatabaseError, close_old_connections, connections, transaction
    from django.http import HttpResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bridgecancel.django needs Django 5.0 or later: pip install 'django>=5' "
        "(or, from the root of a bridgecancel checkout, pip install -e '.[django]')"
    ) from exc

from ._threads import run_sync
from ._tokens import CancelToken, current_token
from ._util import check_seconds

__all__ = (
    "cancel_queries_on",
    "cancellable",
)

P = ParamSpec("P")
T = TypeVar("T")

# How long a cancel request to PostgreSQL may take (psycopg's cancel_safe); it runs in
# bridgecancel's callback thread, never on the event loop.
_CANCEL_TIMEOUT: Final = 10.0

_TIMEOUT_BODY: Final = b"The request took longer than the server allows; it was stopped.\n"


# -- the decorator ---------------------------------------------------------------------------


@overload
def cancellable(
    view: Callable[P, T], /
) -> Callable[P, Coroutine[Any, Any, T | HttpResponse]]: ...


@overload
def cancellable(
    *,
    timeout: float | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> Callable[[Callable[P, T]], Callable[P, Coroutine[Any, Any, T | HttpResponse]]]: ...


def cancellable(
    view: Callable[P, T] | None = None,
    /,
    *,
    timeout: float | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> (
    Callable[P, Coroutine[Any, Any, T | HttpResponse]]
    | Callable[[Callable[P, T]], Callable[P, Coroutine[Any, Any, T | HttpResponse]]]
):
    """Make a sync Django view cancellable: it stops when its client leaves or its deadline passes.

    The decorated view is an ``async def`` (so Django calls it in its event loop and
    cancels it when the client disconnects) that runs the original view through
    `bridgecancel.run_sync`, in a worker thread. There:

    * `current_token()` is the request's token: it fires when Django cancels the request
      (the client left before the response) or at the `timeout`;
    * every query the view runs through Django's database connections is cancelled on
      the server when the token fires (PostgreSQL and SQLite; see `cancel_queries_on`),
      and raises `Cancelled`, so ``finally`` blocks run and transactions roll back;
    * the thread's database connections are closed when the view ends, and the
      transactions ``ATOMIC_REQUESTS`` asks for are opened and ended in the worker.

    As with `run_sync`, the request's cancellation waits until the view has stopped:
    nothing of it runs on after the request has ended. A view that returns after the
    token fired (it ignored the token) still has its response sent, if the client is
    there to get it.

    Use it bare (``@cancellable``) or with options (``@cancellable(timeout=30)``), as the
    outermost decorator (Django's own decorators below it run in the worker, where they
    see the view as the sync function it is). For a class-based view, decorate what
    ``as_view()`` returns: ``path("report", cancellable(ReportView.as_view()))``.

    Args:
        view: a sync view function (``request, *args, **kwargs``).
        timeout: seconds the view may run; past them its token fires (``deadline
            exceeded``) and, if the view stops, the client gets ``503 Service
            Unavailable``. `current_token().remaining()` tells the view how long it has.
            None (the default) or `math.inf`: no deadline.
        limiter: the ``anyio.CapacityLimiter`` bounding how many such views run at once
            (passed to `run_sync`; anyio's default thread limiter if omitted). A view
            whose client leaves while it waits for the limiter never starts.
        interrupt_after: passed to `run_sync`: if the view has not stopped this many
            seconds after its token fired, `Cancelled` is raised inside it.

    Raises:
        TypeError: if `view` is not a sync function (an async or generator function), or
            an option has the wrong type.
        ValueError: if `timeout` is not positive or is NaN, or `interrupt_after` is
            negative or NaN.
    """
    if timeout is not None:
        seconds = check_seconds(timeout, "cancellable", "timeout", none="for no deadline")
        if seconds <= 0:
            raise ValueError(
                f"cancellable() timeout must be a positive number of seconds, got {timeout!r};"
                " pass None for no deadline"
            )
        timeout = seconds
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(
            f"cancellable() takes limiter=anyio.CapacityLimiter(n) (or None for anyio's "
            f"default thread limiter), got {limiter!r}"
        )
    if interrupt_after is not None:
        interrupt_after = check_seconds(
            interrupt_after, "cancellable", "interrupt_after", none="to never interrupt"
        )
    decorate = functools.partial(
        _cancellable, timeout=timeout, limiter=limiter, interrupt_after=interrupt_after
    )
    if view is None:
        return decorate
    return decorate(view)


def _cancellable(
    view: Callable[P, T],
    *,
    timeout: float | None,
    limiter: anyio.CapacityLimiter | None,
    interrupt_after: float | None,
) -> Callable[P, Coroutine[Any, Any, T | HttpResponse]]:
    if not callable(view):
        raise TypeError(f"@cancellable decorates a view function, got {view!r}")
    if inspect.iscoroutinefunction(view) or inspect.isasyncgenfunction(view):
        raise TypeError(
            f"{view!r} is already async: Django cancels it itself when the client leaves; "
            "call run_sync() inside it for its blocking parts"
        )
    if inspect.isgeneratorfunction(view):
        raise TypeError(f"{view!r} is a generator function, not a view")
    transactions = _TransactionsInWorker(view)

    def run_view(*args: Any, **kwargs: Any) -> T:
        return _run_view(view, transactions, args, kwargs)

    @functools.wraps(view)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | HttpResponse:
        call = functools.partial(run_view, *args, **kwargs)
        if timeout is None:
            return await run_sync(call, limiter=limiter, interrupt_after=interrupt_after)
        with anyio.move_on_after(timeout):
            return await run_sync(call, limiter=limiter, interrupt_after=interrupt_after)
        # The deadline passed and the view stopped: it has no response to give.
        return HttpResponse(_TIMEOUT_BODY, status=503, content_type="text/plain; charset=utf-8")

    # Read by Django's handler in place of the view's own (functools.wraps copied it).
    wrapper._non_atomic_requests = transactions  # type: ignore[attr-defined]
    return wrapper


class _TransactionsInWorker:
    """The decorated view's ``_non_atomic_requests``, as Django's handler reads it.

    For each database with ``ATOMIC_REQUESTS``, Django wraps a sync view in
    ``transaction.atomic`` and refuses an async one, unless the view opts out of that
    database (``transaction.non_atomic_requests`` records the opt-out in this attribute).
    The view's transactions must be opened in the worker thread that runs it, on that
    thread's connections: so the handler is told that the view opts out of every
    database (``in`` is always true), and the worker opens them (`aliases`). The view's
    own opt-outs, made below or above this decorator (``add``), are kept.
    """

    __slots__ = ("_opted_out",)

    def __init__(self, view: Callable[..., object]) -> None:
        self._opted_out = set(getattr(view, "_non_atomic_requests", ()))

    def __contains__(self, alias: object) -> bool:
        return True

    def add(self, alias: str) -> None:
        self._opted_out.add(alias)

    def aliases(self) -> list[str]:
        """The databases whose transaction wraps the view, as Django would choose them."""
        return [
            alias
            for alias, settings_dict in connections.settings.items()
            if settings_dict["ATOMIC_REQUESTS"] and alias not in self._opted_out
        ]


def _run_view(
    view: Callable[..., T],
    transactions: _TransactionsInWorker,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """Run in the worker thread: the view, with its queries cancellable and its
    connections closed at the end."""
    close_old_connections()  # what Django's request_started does, in this thread
    try:
        with cancel_queries_on(), contextlib.ExitStack() as atomics:
            for alias in transactions.aliases():
                atomics.enter_context(transaction.atomic(using=alias))
            return view(*args, **kwargs)
    finally:
        # Never kept for a later request: see the module's docstring.
        connections.close_all()


# -- cancelling queries ----------------------------------------------------------------------


@contextlib.contextmanager
def cancel_queries_on(
    token: CancelToken | None = None, *, using: str | Iterable[str] | None = None
) -> Iterator[None]:
    """In the block, cancel Django's queries on the database server when the token fires.

    A sync context manager for ORM code in a worker thread: while a query runs in the
    block (through the current thread's Django connections), the token's firing asks the
    database server to stop it, and the query raises `Cancelled` (chained to the
    database's error) instead of running to its end. A query started once the token has
    fired raises `Cancelled` at once without reaching the server, except the statements
    that end a transaction (``ROLLBACK``, ``RELEASE SAVEPOINT``), which run, so that
    ``transaction.atomic`` blocks can roll back as the `Cancelled` passes through them.

    `cancellable` views run in this block already; use it for ORM code you run
    through `run_sync` yourself (and close the connections it opened at its end, with
    ``django.db.connections.close_all()``, since the worker thread may not serve Django
    again).

    How a query is stopped, by backend: PostgreSQL (psycopg 3, or psycopg2) through the
    connection's cancel request (``cancel_safe()``), which the server answers by
    stopping the query; SQLite through ``interrupt()``. Other backends are not stopped
    mid-query; their next query raises `Cancelled` all the same.

    Args:
        token: the token to follow; by default the current token (`current_token()`) of
            each query, so a query inside `shield()` is never cancelled.
        using: the database alias or aliases to watch; all of them by default.

    A cancel that reaches the server just before a query does finds nothing to stop:
    keep a ``statement_timeout`` as the server's own backstop.
    """
    if using is None:
        aliases = list(connections)
    elif isinstance(using, str):
        aliases = [using]
    else:
        aliases = list(using)
    wrapper = _QueryCanceller(token)
    with contextlib.ExitStack() as stack:
        for alias in aliases:
            stack.enter_context(connections[alias].execute_wrapper(wrapper))
        yield


class _QueryCanceller:
    """A Django execute wrapper: each query runs with its connection's cancel on the token."""

    __slots__ = ("_token",)

    def __init__(self, token: CancelToken | None) -> None:
        self._token = token

    def __call__(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        token = current_token() if self._token is None else self._token
        if token.cancel_called and _ends_a_transaction(sql):
            return execute(sql, params, many, context)  # the unwinding must be able to finish
        token.check()  # fired already: start no query that nobody would stop
        cancel = _server_cancel(context["connection"])
        if cancel is None:
            return execute(sql, params, many, context)
        canceller = _Canceller(cancel)
        try:
            with token.on_cancel(canceller):
                token.check()  # fired just now, before the callback was in place
                try:
                    return execute(sql, params, many, context)
                except DatabaseError:
                    token.check()  # stopped because the token fired: raise Cancelled
                    raise  # stopped by something else (statement_timeout, an admin)
        finally:
            # Before the connection runs anything else: a cancel on its way lands on
            # this query or on none, never on the next one.
            canceller.disarm()


def _ends_a_transaction(sql: object) -> bool:
    return isinstance(sql, str) and sql.lstrip()[:8].upper() in ("ROLLBACK", "RELEASE ")


def _server_cancel(db: Any) -> Callable[[], object] | None:
    """What stops the query running on Django connection `db`, from another thread."""
    raw = db.connection  # the DB-API connection: open while a query runs
    if raw is None:
        return None
    if db.vendor == "postgresql":
        cancel_safe = getattr(raw, "cancel_safe", None)  # psycopg 3.2 and later
        if cancel_safe is not None:
            return functools.partial(cancel_safe, timeout=_CANCEL_TIMEOUT)
        return getattr(raw, "cancel", None)  # psycopg2 and older psycopg 3
    if db.vendor == "sqlite":
        return getattr(raw, "interrupt", None)
    return None


class _Canceller:
    """A server cancel for a token's ``on_cancel``, until disarmed."""

    __slots__ = ("_armed", "_cancel", "_lock")

    def __init__(self, cancel: Callable[[], object]) -> None:
        self._cancel = cancel
        self._lock = threading.Lock()
        self._armed = True

    def __call__(self) -> None:
        with self._lock:
            if self._armed:
                self._cancel()

    def disarm(self) -> None:
        """Stop for good; if a cancel is being sent right now, wait until it is done."""
        with self._lock:
            self._armed = False

