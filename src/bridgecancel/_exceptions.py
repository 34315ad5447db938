"""The exceptions bridgecancel raises."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ._token import CancelToken

__all__ = ("BrokenWorkerError", "Cancelled", "RemoteTraceback")


class _NoPublicConstructor(type):
    """Metaclass that stops users from building an instance by calling the class.

    `Cancelled` means "this token fired"; letting users construct one would let code
    claim a cancellation that never happened. Library code uses ``_create``.
    """

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor: "
            "call token.check() or token.sleep() to raise it"
        )

    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


class Cancelled(BaseException, metaclass=_NoPublicConstructor):
    """Raised by token code in a worker when its `CancelToken` has fired.

    A `BaseException`, like `asyncio.CancelledError` and `trio.Cancelled`, so that
    ``except Exception:`` in user code does not swallow it. Let it propagate: the
    bridge turns it back into the caller's native cancellation.

    Attributes:
        token: the token that fired (``None`` once it has crossed a process boundary).
        reason: the reason given to ``CancelSource.cancel()``, or ``"deadline exceeded"``.
    """

    token: CancelToken | None
    reason: str | None

    def __init__(self, token: CancelToken | None, reason: str | None) -> None:
        super().__init__(reason if reason is not None else "cancelled")
        self.token = token
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # The token belongs to one process; a copy carries only the reason.
        return (_rebuild_cancelled, (self.reason,))


def _rebuild_cancelled(reason: str | None) -> Cancelled:
    cancelled: Cancelled = Cancelled._create(None, reason)
    return cancelled


class BrokenWorkerError(RuntimeError):
    """A worker process died while running a job (it exited, crashed or was killed).

    Only the call whose job was running is affected; the pool replaces the worker.

    Attributes:
        exitcode: the worker's exit code, or ``None`` if it died by a signal.
        signal: the number of the signal that ended it, or ``None``.
    """

    def __init__(
        self, message: str, *, exitcode: int | None = None, signal: int | None = None
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process, kept as text.

    It is the ``__cause__`` of the copy of the error that `run_process` raises, so it
    prints above the local traceback.

    Attributes:
        traceback: the formatted traceback, as the worker printed it.
    """

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'
