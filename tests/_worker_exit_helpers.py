"""Functions tests/test_worker_exit.py runs in worker processes (importable there)."""

from __future__ import annotations

import atexit
import os
import threading
import time

from bridgecancel import current_token


class InterruptedWhilePickled:
    """A result whose pickling raises KeyboardInterrupt (as a SIGINT there would)."""

    def __reduce__(self) -> tuple[object, ...]:
        raise KeyboardInterrupt


def return_interrupting_result(_with_deadline: bool) -> InterruptedWhilePickled:
    # A normal interpreter shutdown would run this and never finish.
    atexit.register(time.sleep, 3600)
    return InterruptedWhilePickled()


class UnprintableError(Exception):
    """Cannot be pickled (it holds a lock), and even str() of it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def __str__(self) -> str:
        raise RuntimeError("no string for you")


def raise_unprintable() -> None:
    raise UnprintableError


class InterruptingError(Exception):
    """An exception whose pickling raises KeyboardInterrupt."""

    def __reduce__(self) -> tuple[object, ...]:
        raise KeyboardInterrupt


def raise_interrupting() -> None:
    raise InterruptingError("x")


def pid() -> int:
    return os.getpid()


def mark(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def spin(started: str) -> None:
    mark(started, str(os.getpid()))
    while True:
        pass


def wait_on_token(started: str) -> None:
    mark(started, str(os.getpid()))
    current_token().wait()


def sleep_in_c(started: str) -> None:
    mark(started, str(os.getpid()))
    time.sleep(3600)


def ignore_signals_and_sleep(started: str) -> None:
    import signal

    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    mark(started, str(os.getpid()))
    time.sleep(3600)
