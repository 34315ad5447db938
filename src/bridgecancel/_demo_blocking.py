"""Demo cases for `bridgecancel.blocking`: workers blocked in a queue and in a socket."""

from __future__ import annotations

import queue
import socket
from collections.abc import Callable

import anyio
import anyio.from_thread

from . import blocking
from ._demo import Case, _cancel_once_started, _outcome
from ._stats import statistics
from ._threads import run_sync

__all__ = ("demo_blocking_cases",)


def _queue_get(ready: anyio.Event) -> object:
    q: queue.Queue[object] = queue.Queue()
    anyio.from_thread.run_sync(ready.set)
    return blocking.queue_get(q)  # nothing is ever put: only the cancel ends this


def _recv(ready: anyio.Event) -> bytes:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:  # the server side never sends
        anyio.from_thread.run_sync(ready.set)
        return blocking.recv(client, 4096)


async def demo_blocking_cases() -> list[Case]:
    """Cancel a worker blocked in `blocking.queue_get` and one in `blocking.recv`.

    Returns (case, how it ended, seconds from cancel to the worker stopped) per case.
    """
    cases: list[Case] = []
    labelled: list[tuple[str, Callable[[anyio.Event], object]]] = [
        ("thread blocked in blocking.queue_get()", _queue_get),
        ("thread blocked in blocking.recv() (loopback)", _recv),
    ]
    for label, func in labelled:
        before = statistics().threads

        async def start(ready: anyio.Event, func: Callable[..., object] = func) -> None:
            await run_sync(func, ready)

        seconds, _ = await _cancel_once_started(start)
        cases.append((label, _outcome(before, statistics().threads), seconds))
    return cases
