"""The exceptions bridgecancel raises."""

from __future__ import annotations

__all__ = (
    "BrokenWorkerError",
    "RemoteTraceback",
)


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
