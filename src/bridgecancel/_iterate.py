"""`iterate`: a sync iterable stepped through in worker threads, under one token.

Each step (one ``next()``) and the close (``generator.close()``) is a `run_sync` job, so
the limiter, the statistics, the structured rules and both backends are `run_sync`'s.
What this module adds is the iteration's own token, made current in every step in place
of the step's job token, and what becomes of the generator when the iteration ends:

* The token is one `CancelSource` for the whole iteration. While a step runs, it follows
  that step's job token, so it fires, with the same reason, when the caller of any step
  (or of `iterate.aclose`) is cancelled. A `Cancelled` for it, raised in a step whose
  caller was cancelled, is handed to `run_sync` as the job token's own, so that the
  caller sees its native cancellation. It is closed (not fired) when the iteration ends.
* Closing runs ``generator.close()`` in a worker, so the generator's ``finally`` runs
  there. A caller cancelled before that close could begin still gets it: the token is
  fired, the close run shielded, and the cancellation raised after it.
* An iteration left unclosed, dropped (garbage-collected) or abandoned by the task that
  last stepped it (that task has ended), cannot await anything, and its ``__del__`` may
  run in any thread, the event loop's included: the token is fired and the generator
  closed in a thread of its own, which nobody waits for. The task's end matters because
  a consumer that is cancelled between steps (a response whose client left) usually
  leaves the iteration in a reference cycle of exception tracebacks, which only a later
  garbage collection would find. A started generator is held by this module (`_held`)
  until it is closed, so that a garbage collection never closes it by itself (in its
  own thread, without the token) before the iteration's ``__del__`` has run.

`generator_function` is `iterate` for `bridgecancel.asgi.threaded`: a sync generator
function made an async generator function, which also passes on what is thrown into it
(FastAPI's ``yield`` dependencies rely on that).
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator
from types import GeneratorType, TracebackType
from typing import Any, Final, Generic, ParamSpec, TypeVar, cast, final

import anyio
import anyio.lowlevel

from ._backend import TaskExitWatch, canceller_reason, current_task
from ._supervise import check_options
from ._threads import run_sync
from ._timer import report_unraisable
from ._tokens import (
    CALLER_CANCELLED,
    UNCLOSED_REASON,
    Cancelled,
    CancelSource,
    current_token,
    use_token,
)
from ._util import Self, describe

__all__ = ("generator_function", "iterate")

T = TypeVar("T")
P = ParamSpec("P")

_END: Final = object()
"""What a step returns for ``StopIteration``, which cannot leave a coroutine as itself."""

_CLOSER_NAME: Final = "bridgecancel iterate closer"

_held: Final[set[Generator[Any, Any, Any]]] = set()
"""The generators of open iterations that have been stepped: held here, a root, so that
one in a reference cycle with its iteration is never closed by the garbage collector
before the iteration's ``__del__`` hands it to a worker. (A generator that refers to its
own iteration therefore lives until the iteration is closed or its task ends.)"""

_BUSY: Final = (
    "{}: this iterate() is running a step already; one task at a time may use an iteration"
)


@final
class iterate(Generic[T]):  # an async iterator, named as the function it stands for
    """An async iterator over a sync iterable, each step in a worker thread.

    ``async for row in iterate(rows()):`` runs each ``next()`` of the iterable through
    `run_sync`, so a slow step (waiting on a query, a queue, a socket) never blocks the
    event loop, and the caller's cancellation reaches it. Every step runs under one token
    for the whole iteration: `current_token()` is the same token in every step and in the
    generator's ``finally``.

    That token fires, with the canceller's reason, when the caller of any step is
    cancelled (or the caller of `aclose`): a step that waits on it (``token.wait()``,
    ``token.sleep()``, a `bridgecancel.blocking` wait) stops at once and raises
    `Cancelled`, which the caller sees as its own cancellation; a step that ignores it is
    waited for, and its item returned, as `run_sync` does. A caller cancelled between
    steps runs no more steps, and the generator is closed as below. A fired token stays
    fired: a later step that checks it raises `Cancelled`, and ``__anext__`` raises it as
    it is. While a step runs, the token reports that step's caller's deadline
    (``remaining()``). Each step's job (what `statistics` counts) has a token of its own,
    which the iteration's follows while the step runs; it is closed (never fired) when
    the iteration ends.

    Closing the iteration closes the generator in a worker thread, so its ``finally``
    runs there, never on the event loop thread: `aclose`, or leaving an
    ``async with iterate(...) as rows:`` block, closes it and waits for it. An iteration
    left unclosed is closed as soon as it is garbage-collected (an ``async for`` left
    early) or the task that last stepped it ends (a ``StreamingResponse`` whose client
    went away): its token fires and the generator is closed in a thread of its own,
    which nobody waits for. Use ``async with`` where the cleanup must be over before you
    go on.

    Only generators (and other objects with the generator protocol) are closed: an
    iterator of something you opened yourself (a file, a cursor) is yours to close.
    ``iter(iterable)`` is called in the first step, in the worker; an iterator is used as
    it is. A step's exception propagates, ``StopIteration`` ends the iteration, and
    ``StopAsyncIteration`` follows once it has ended or been closed.

    An iteration is used by one task at a time, as an async generator is; the limiter's
    token is borrowed for each step, not between steps.

    Args:
        iterable: a sync iterable: a generator, a list, a cursor.
        limiter: the capacity limiter each step (and the close) runs under, as
            `run_sync`'s; anyio's default thread limiter if omitted.
        interrupt_after: as `run_sync`'s, for each step and the close: raise `Cancelled`
            inside a step this many seconds after its token fired, if it is still running.

    Raises:
        TypeError: if `iterable` is not a sync iterable (an async iterable, a generator
            function not called), or `limiter` is not an ``anyio.CapacityLimiter``.
        ValueError: if `interrupt_after` is negative or NaN.
    """

    __slots__ = (
        "_busy",
        "_close_began",
        "_done",
        "_interrupt_after",
        "_iterable",
        "_iterator",
        "_limiter",
        "_source",
        "_watch",
        "__weakref__",
    )

    def __init__(
        self,
        iterable: Iterable[T],
        /,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        interrupt_after: float | None = None,
    ) -> None:
        interrupt_after, _ = check_options("iterate", limiter, interrupt_after=interrupt_after)
        _check_iterable(iterable)
        self._limiter = limiter
        self._interrupt_after = interrupt_after
        # An iterator's iter() is itself; anything else's __iter__ may do work (a cursor's
        # may run a query), so it is called in the first step, in a worker.
        self._iterator: Iterator[T] | None = None
        self._iterable: Iterable[T] | None = iterable
        if isinstance(iterable, Iterator):
            self._iterator, self._iterable = iterable, None
            _hold(iterable)
        self._source = CancelSource()
        self._watch: TaskExitWatch | None = None  # on the task that last stepped it
        self._busy = False  # a step or the close is running
        self._close_began = False  # the worker has begun closing the generator
        self._done = False  # exhausted or closed: no step runs again

    def __repr__(self) -> str:
        over = self._iterator if self._iterator is not None else self._iterable
        return f"<bridgecancel.iterate over {over!r}>"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        return await self._step(self._next)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the iteration: the generator is closed in a worker thread (its ``finally``
        runs there), and this returns once it has been.

        The token fires if the caller is cancelled meanwhile, or was already: the close
        then runs all the same, shielded, and the cancellation is raised after it. An
        error the generator raises while closing propagates. Closing again does nothing.

        Raises:
            RuntimeError: if a step is running (in another task).
        """
        if self._busy:
            raise RuntimeError(_BUSY.format("aclose()"))
        if self._done:
            return
        generator = self._end()
        try:
            if generator is not None and _close_runs_code(generator):
                self._busy = True
                await self._close_in_worker(cast(Generator[T, Any, Any], generator))
        finally:
            self._busy = False
            self._source.close()
            _held.discard(generator)

    def __del__(self) -> None:
        try:
            self._leave()
        except AttributeError:  # __init__ raised: nothing was started
            pass

    def _leave(self) -> None:
        """Left unclosed: dropped (from ``__del__``, in any thread, the event loop's
        included, even while the interpreter exits), or its task has ended (in the loop's
        thread). Nothing can be awaited: fire the token, close in a thread of its own."""
        if self._done or self._busy:
            return
        generator, source = self._end(), self._source
        if generator is None or not _close_runs_code(generator):
            _held.discard(generator)
            source.close()
            return
        source._cancel_detached(UNCLOSED_REASON)  # never runs user callbacks here
        try:
            threading.Thread(
                target=_close_unclosed, args=(generator, source), name=_CLOSER_NAME
            ).start()
        except RuntimeError:  # the interpreter is exiting: no new threads
            _held.discard(generator)  # Python closes it

    def _end(self) -> Iterator[T] | None:
        """Mark the iteration over: no step runs again. Returns its iterator, if made."""
        self._done = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.withdraw()
        iterator, self._iterator, self._iterable = self._iterator, None, None
        return iterator

    # -- in the event loop ------------------------------------------------------------

    async def _step(self, step: Callable[..., object], *args: object) -> T:
        """Run one step (`_next` or `_throw_in`) through `run_sync`."""
        if self._busy:
            raise RuntimeError(_BUSY.format("anext()"))
        if self._done:
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise StopAsyncIteration
        watch = self._watch
        if watch is None or watch.task is not current_task():
            self._watch_this_task()
        self._busy = True
        try:
            item = await run_sync(
                step, *args, limiter=self._limiter, interrupt_after=self._interrupt_after
            )
        finally:
            self._busy = False
        if item is _END:
            _held.discard(self._end())
            self._source.close()
            raise StopAsyncIteration
        return cast(T, item)

    def _watch_this_task(self) -> None:
        """Leave the iteration (`_leave`) if this task ends with it unclosed."""
        if self._watch is not None:
            self._watch.withdraw()
        self._watch = TaskExitWatch(functools.partial(_task_ended, weakref.ref(self)))

    async def _throw(self, exc: BaseException) -> T:
        """``generator.throw(exc)`` as a step: the next item, or StopAsyncIteration."""
        return await self._step(self._throw_in, exc)

    async def _close_in_worker(self, generator: Generator[T, Any, Any]) -> None:
        """``generator.close()`` in a worker, even if the caller is cancelled first."""
        cancelled: BaseException | None = None
        while True:
            try:
                with anyio.CancelScope(shield=cancelled is not None):
                    await run_sync(
                        self._close,
                        generator,
                        limiter=self._limiter,
                        interrupt_after=self._interrupt_after,
                    )
                break
            except anyio.get_cancelled_exc_class() as exc:
                if self._close_began:
                    raise  # the close ran (its caller was cancelled during it)
                # The close never began: the caller was cancelled before (or while
                # waiting for the limiter). Close all the same, as the cancelled caller's.
                if cancelled is None:
                    self._source._cancel_detached(canceller_reason(exc) or CALLER_CANCELLED)
                cancelled = exc
        if cancelled is not None:
            try:
                raise cancelled
            finally:
                del cancelled  # no cycle through this frame's traceback

    # -- in the worker thread ---------------------------------------------------------

    def _next(self) -> object:
        return self._in_step(self._next_item)

    def _throw_in(self, exc: BaseException) -> object:
        return self._in_step(self._throw_item, exc)

    def _close(self, generator: Generator[T, Any, Any]) -> None:
        self._close_began = True
        self._in_step(generator.close)

    def _in_step(self, fn: Callable[..., object], *args: object) -> object:
        """``fn(*args)`` with the iteration's token current and following the job's."""
        job_token = current_token()  # this step's own, set by run_sync
        source = self._source
        token = source._token
        source._inform(job_token.deadline)
        with source._follow_while(job_token), use_token(token):
            try:
                return fn(*args)
            except Cancelled as exc:
                if exc.token is token and job_token.cancel_called:
                    # The caller of this step was cancelled: as the job's own, run_sync
                    # turns it into the caller's native cancellation.
                    raise Cancelled._create(job_token, job_token.reason) from exc
                raise

    def _next_item(self) -> object:
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = iter(cast(Iterable[T], self._iterable))
            self._iterable = None
            _hold(iterator)
        try:
            return next(iterator)
        except StopIteration:
            return _END
        except StopAsyncIteration as exc:  # it would end the consumer's `async for`
            raise RuntimeError(f"{iterator!r} raised StopAsyncIteration") from exc

    def _throw_item(self, exc: BaseException) -> object:
        generator = cast(Generator[T, Any, Any], self._iterator)
        try:
            return generator.throw(exc)
        except StopIteration:
            return _END


def _check_iterable(iterable: object) -> None:
    if isinstance(iterable, Iterable) or hasattr(type(iterable), "__getitem__"):
        return
    if hasattr(iterable, "__aiter__"):
        raise TypeError(
            f"{iterable!r} is an async iterable: iterate it with 'async for' directly, "
            "not through iterate()"
        )
    if inspect.isgeneratorfunction(iterable):
        raise TypeError(
            f"{describe(iterable)} is a generator function: call it, and pass iterate() "
            "the generator it returns"
        )
    raise TypeError(
        f"iterate() takes a sync iterable (a generator, a list, a cursor), got {iterable!r}"
    )


def _hold(iterator: object) -> None:
    if isinstance(iterator, Generator):
        _held.add(iterator)


def _task_ended(ref: weakref.ref[iterate[Any]]) -> None:
    """The task that last stepped an iteration has ended: leave it, if still open."""
    iteration = ref()
    if iteration is not None:
        try:
            iteration._leave()
        except BaseException as exc:  # pragma: no cover - a bug; trio would drop its hook
            report_unraisable(exc, "Exception leaving an iteration whose task ended", iteration)


def _close_runs_code(iterator: object) -> bool:
    """Whether closing `iterator` runs code of its own (then a worker must close it).

    A generator suspended at a ``yield`` runs its ``finally``; one not started yet runs
    nothing, and is closed here; one that has ended, or an iterator that is no generator,
    has nothing to close.
    """
    if isinstance(iterator, GeneratorType):
        state = inspect.getgeneratorstate(iterator)
        if state == inspect.GEN_CREATED:
            iterator.close()
        return state == inspect.GEN_SUSPENDED
    return isinstance(iterator, Generator)


def _close_unclosed(generator: Generator[Any, Any, Any], source: CancelSource) -> None:
    """In a thread of its own: close the generator of an iteration dropped unclosed."""
    try:
        with use_token(source._token):
            generator.close()
    except Cancelled as exc:
        if exc.token is not source._token:
            report_unraisable(exc, _UNCLOSED_ERROR, generator)
    except BaseException as exc:  # nobody to hand it to, as when Python closes one
        report_unraisable(exc, _UNCLOSED_ERROR, generator)
    finally:
        source.close()
        _held.discard(generator)


_UNCLOSED_ERROR: Final = (
    "Exception ignored while closing a generator whose iterate() was dropped unclosed"
)


# -- threaded generator functions ----------------------------------------------------


def generator_function(
    func: Callable[P, Iterator[T]],
    *,
    limiter: anyio.CapacityLimiter | None,
    interrupt_after: float | None,
) -> Callable[P, AsyncGenerator[T, None]]:
    """An async generator function that runs the generator `func` returns through `iterate`.

    Besides iterating, it passes on what is thrown into it (``athrow``) to the sync
    generator, in a worker, as a ``yield`` dependency used as a context manager expects
    (``contextlib.asynccontextmanager``, FastAPI): the generator's ``except`` blocks see the
    error, and may swallow it. The backend's cancellation is not thrown in: it closes
    the generator with its token fired, as `iterate.aclose` does.
    """

    async def stream(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[T, None]:
        # Calling a generator function runs none of its body.
        steps = iterate(func(*args, **kwargs), limiter=limiter, interrupt_after=interrupt_after)
        async with steps:
            advance = functools.partial(steps._step, steps._next)
            while True:
                try:
                    item = await advance()
                except StopAsyncIteration:
                    return
                try:
                    yield item
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    advance = functools.partial(steps._throw, exc)
                else:
                    advance = functools.partial(steps._step, steps._next)

    return stream
