"""The wire format between the pool and its worker processes (standard library only).

Four private pipes per worker, each written by one side and read by the other:

- jobs (parent -> worker main thread): first the boot record (`boot_record`: the
  parent's ``sys.path``, read by `BOOT` before the worker imports anything), then
  messages of ``JOB_HEADER`` and a pickled ``(func, args)``. The first message is the
  worker's configuration (job id 0).
- control (parent -> worker listener thread): fixed ``CONTROL_HEADER`` records that
  cancel or interrupt one job, followed by the cancel reason. Its end of file tells a
  worker that its parent is gone.
- results (worker -> parent): ``RESULT_HEADER`` then a payload whose meaning depends on
  the tag byte: ``READY`` once, when the worker has started; then per job ``STARTED``
  once the job's function begins, then one result.
- claims (parent -> worker, read by both): one byte per job, written before the job.
  Whoever reads it first decides: the worker, just before the job's function begins
  (it starts), or the parent, for a caller cancelled before that (it never will). A
  pipe read is atomic, so exactly one side gets the byte, and neither waits for the
  other.

Every message names its job, so a late control record never touches a later job.
"""

from __future__ import annotations

import io
import marshal
import os
import pickle
import struct
from typing import Any, Final

# payload length, job id, deadline (time.monotonic terms, inf for none)
JOB_HEADER: Final = struct.Struct("!IQd")
# tag, job id, reason length
CONTROL_HEADER: Final = struct.Struct("!BQH")
# payload length, job id, tag
RESULT_HEADER: Final = struct.Struct("!IQB")

# Control tags.
CANCEL: Final = 1
INTERRUPT: Final = 2

# Result tags.
RETURNED: Final = 0  # payload: the pickled return value
RAISED: Final = 1  # payload: pickled (exception, remote traceback text)
CANCELLED: Final = 2  # payload: the token's reason, UTF-8 (empty for None)
LOAD_FAILED: Final = 3  # payload: UTF-8 message; the job could not be unpickled
SEND_FAILED: Final = 4  # payload: UTF-8 message; the result or error could not be pickled
RESULT_TAGS: Final = frozenset((RETURNED, RAISED, CANCELLED, LOAD_FAILED, SEND_FAILED))
# Not a result: sent once per job, just before its function is called (empty payload).
# A job cancelled before it began gets CANCELLED without STARTED. The parent counts
# escalation timers from it, so a worker still starting or loading a job is never
# interrupted or killed for it.
STARTED: Final = 5
# Not a result: sent once by a worker that has started (job id CONFIG_JOB_ID), before it
# reads its first job (empty payload).
READY: Final = 6

# A cancel reason longer than this is cut, so a control record fits in one atomic write.
MAX_REASON: Final = 1024

FAILED_EXIT: Final = 70
"""The worker's exit status when bridgecancel's own code in it failed (EX_SOFTWARE);
it says why on its stderr first."""

CONFIG_JOB_ID: Final = 0  # the first message on the job pipe: the worker's configuration

Config = dict[str, Any]  # main_name, main_path (see _pool._config)

BOOT: Final = """\
import sys, marshal, posix  # built in: no file on any path can stand in for them
def _take(n, fd=int(sys.argv[1])):
    data = b""
    while len(data) < n:
        chunk = posix.read(fd, n - len(data))
        if not chunk:
            posix._exit(0)
        data += chunk
    return data
sys.path[:] = marshal.loads(_take(int.from_bytes(_take(4), "big")))
del _take
from bridgecancel._process._child import main
main()
"""
"""What a worker runs (``python -c BOOT <job> <control> <results> <claims>``).

``python -c`` puts the working directory first on ``sys.path``. So the worker imports
nothing before it has replaced the whole path with its parent's, read from the job pipe
with built-in modules only: from its first import on, it imports only from there.
"""


def boot_record(path: list[str]) -> bytes:
    """The first bytes on a worker's job pipe: the ``sys.path`` `BOOT` sets."""
    data = marshal.dumps(path)
    return len(data).to_bytes(4, "big") + data


def dumps(obj: object) -> bytes:
    """Pickle `obj`; fall back to cloudpickle (if installed) for lambdas and closures.

    Plain pickle comes first: it is faster, and it is what the other side can always
    load. cloudpickle is imported only when plain pickle has already failed.
    """
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        try:
            import cloudpickle  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise exc from None
        data: bytes = cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        return data


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly `n` bytes from a blocking descriptor; None at end of file."""
    if n == 0:
        return b""
    chunk = os.read(fd, n)
    if len(chunk) == n:
        return chunk
    if not chunk:
        return None
    buf = io.BytesIO()
    buf.write(chunk)
    remaining = n - len(chunk)
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        buf.write(chunk)
        remaining -= len(chunk)
    return buf.getvalue()


class MessageReader:
    """Reads job messages from a blocking descriptor, usually in one system call each."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""

    def read_job(self) -> tuple[int, float, bytes] | None:
        """The next ``(job id, deadline, payload)``; None at end of file."""
        size = JOB_HEADER.size
        buf = self._buf
        if len(buf) < size:
            more = self._fill(size - len(buf))
            if more is None:
                return None
            buf += more
        length, job_id, deadline = JOB_HEADER.unpack_from(buf)
        end = size + length
        if len(buf) < end:
            more = read_exact(self._fd, end - len(buf))
            if more is None:
                return None
            buf += more
        payload, self._buf = buf[size:end], buf[end:]
        return job_id, deadline, payload

    def _fill(self, at_least: int) -> bytes | None:
        chunk = os.read(self._fd, max(at_least, 65536))
        if not chunk:
            return None
        if len(chunk) < at_least:
            rest = read_exact(self._fd, at_least - len(chunk))
            if rest is None:
                return None
            chunk += rest
        return chunk


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to a blocking descriptor."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def control_record(tag: int, job_id: int, reason: str | None) -> bytes:
    encoded = (reason or "").encode("utf-8", "replace")[:MAX_REASON]
    return CONTROL_HEADER.pack(tag, job_id, len(encoded)) + encoded


def result_message(tag: int, job_id: int, payload: bytes) -> bytes:
    return RESULT_HEADER.pack(len(payload), job_id, tag) + payload


def job_message(job_id: int, deadline: float, payload: bytes) -> bytes:
    return JOB_HEADER.pack(len(payload), job_id, deadline) + payload
