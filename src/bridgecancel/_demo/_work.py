"""The demo's jobs: each runs for `seconds` unless its token (or an escalation) stops it.

Every job takes a `mark` (a path prefix) and writes ``<mark>.started`` when it starts
and ``<mark>.ended`` (the ``time.monotonic()`` it ended at) when it ends, from threads
and worker processes alike, so the async side can tell when the work really stopped.
The same function runs under bridgecancel and under the anchor, where its token never
fires: there it runs its full `seconds`. Standard library and tokens only: no anyio.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import blocking
from .._tokens import Cancelled, current_token

__all__ = (
    "cpu_loop",
    "ended_at",
    "ignore_everything",
    "ignore_token",
    "queue_get",
    "recv",
    "started",
    "subprocess_sleep",
    "wait_on_token",
)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file


def started(mark: str) -> bool:
    return os.path.exists(f"{mark}.started")


def ended_at(mark: str) -> float | None:
    """When the job marked `mark` ended (``time.monotonic()``), or None if it never said."""
    try:
        return float(Path(f"{mark}.ended").read_text())
    except FileNotFoundError:
        return None


@contextmanager
def _marked(mark: str) -> Iterator[None]:
    _write(f"{mark}.started", str(os.getpid()))
    try:
        yield
    finally:
        _write(f"{mark}.ended", repr(time.monotonic()))


def wait_on_token(mark: str, seconds: float) -> None:
    with _marked(mark):
        current_token().sleep(seconds)


def cpu_loop(mark: str, seconds: float) -> None:
    token = current_token()
    end = time.monotonic() + seconds
    with _marked(mark):
        total = 0
        while time.monotonic() < end:
            for i in range(10_000):
                total += i * i
            token.check()


def ignore_token(mark: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    with _marked(mark):
        while time.monotonic() < end:  # never looks at its token
            time.sleep(0.01)


def ignore_everything(mark: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    with _marked(mark):
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except Cancelled:
                pass  # swallows the interrupt too: only a kill stops this


def queue_get(mark: str, seconds: float) -> None:
    q: queue.Queue[object] = queue.Queue()  # nothing is ever put
    with _marked(mark):
        try:
            blocking.queue_get(q, seconds)
        except queue.Empty:
            pass


def recv(mark: str, seconds: float) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server, _marked(mark):  # the server side never sends
        client.settimeout(seconds)
        try:
            blocking.recv(client, 4096)
        except TimeoutError:
            pass


def subprocess_sleep(mark: str, seconds: float) -> None:
    with _marked(mark):
        blocking.run_subprocess(["sleep", str(seconds)])
