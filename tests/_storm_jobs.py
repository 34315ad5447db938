"""The jobs of tests/test_storm.py (importable in worker processes too).

Each job records, in the worker, when it started, whether it returned a value, and when
it finished (its last statement), so the test can compare with what each caller saw.
Thread jobs record into a `Record`; process jobs into files in a folder, since
``time.monotonic`` is the same clock in every process of the machine.
"""

from __future__ import annotations

import os
import threading
import time

from bridgecancel import current_token

# Thread jobs are never stubborn: interrupting a thread may skip its finally blocks on
# CPython 3.13 (python/cpython#139622), and the storm relies on them to record the end.
THREAD_KINDS = ("finish", "raise", "ignore", "cooperative")
PROCESS_KINDS = (*THREAD_KINDS, "stubborn")


class Record:
    """What the jobs did, by job number; `order` lists starts as they happened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[int] = []
        self.started: dict[int, float] = {}
        self.returned: set[int] = set()
        self.finished: dict[int, float] = {}

    def note(self, what: str, i: int, when: float) -> None:
        with self.lock:
            if what == "started":
                self.started[i] = when
                self.order.append(i)
            elif what == "returned":
                self.returned.add(i)
            else:
                self.finished[i] = when

    def start(self, i: int) -> None:
        self.note("started", i, time.monotonic())

    def will_return(self, i: int) -> None:
        self.note("returned", i, time.monotonic())

    def finish(self, i: int) -> None:
        self.note("finished", i, time.monotonic())


def _body(i: int, kind: str, on_return: object) -> int:
    token = current_token()
    if kind == "raise":
        raise ValueError(i)
    if kind == "ignore":  # ignores the token, briefly
        time.sleep(0.002)
    elif kind == "cooperative":  # stops when cancelled, raising Cancelled
        if token.wait(0.005):
            token.check()
    elif kind == "stubborn":  # ignores the token until interrupted (or 0.1 s pass)
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            time.sleep(0.001)
    assert callable(on_return)
    on_return(i)
    return i


def thread_job(i: int, kind: str, record: Record) -> int:
    record.start(i)
    try:
        return _body(i, kind, record.will_return)
    finally:
        record.finish(i)


def _log(path: str, what: str, i: int) -> None:
    # One small O_APPEND write per line: lines from many processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{what} {i} {time.monotonic()!r}\n".encode())
    finally:
        os.close(fd)


def process_job(i: int, kind: str, log: str) -> int:
    _log(log, "started", i)
    try:
        return _body(i, kind, lambda n: _log(log, "returned", n))
    finally:
        _log(log, "finished", i)


class LogReader:
    """Reads the process jobs' log into a `Record` as it grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.record = Record()

    def poll(self) -> Record:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.record
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            what, number, when = line.decode().split()
            self.record.note(what, int(number), float(when))
        return self.record
