"""Small helpers both sides share: naming a function in messages, the one check of a
number of seconds, the typing names newer than Python 3.10, and what Linux says about
processes (pidfd, /proc).

Standard library only (``typing_extensions`` on 3.10): the worker process imports it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import NamedTuple

__all__ = (
    "PosArgsT",
    "ProcessStat",
    "Self",
    "Unpack",
    "all_processes",
    "check_deadline",
    "check_seconds",
    "describe",
    "describe_error",
    "open_pidfd",
)


def describe(func: object) -> str:
    """``module.qualname()`` for a function, its repr for anything else."""
    name = getattr(func, "__qualname__", None)
    if name is None:
        return repr(func)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}()" if module else f"{name}()"


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for an error in a message, even one whose ``__str__`` raises."""
    try:
        text = str(exc)
    except BaseException as error:
        text = f"<str() failed with {type(error).__qualname__}>"
    return f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__


# -- typing names newer than Python 3.10 --------------------------------------

# In one place, with the `*args` type variable. Standard library only from 3.11
# (``typing_extensions`` on 3.10).

if sys.version_info >= (3, 11):
    from typing import Self, TypeVarTuple, Unpack
else:  # pragma: no cover - exercised on 3.10 only
    from typing_extensions import Self, TypeVarTuple, Unpack


PosArgsT = TypeVarTuple("PosArgsT")
"""The positional arguments of ``fn(*args)`` APIs, as in anyio's ``to_thread.run_sync``."""


# -- the one check of seconds -------------------------------------------------

# For every argument that is a number of seconds (and for deadlines).
#
# One rule for infinity everywhere: `math.inf` is accepted and returned as itself (no
# limit); an API for which it means "never" maps it. NaN, bools and non-numbers are
# refused with a message naming the call and the argument.

def check_seconds(
    value: object, api: str, name: str, *, none: str = "", negative: bool = False
) -> float:
    """`value` as a float number of seconds, for argument `name` of ``api()``.

    Args:
        api: the public function whose argument this is, named in the messages.
        none: what None means for this argument (say "to skip that stage"), if `api`
            takes None; messages then offer it. Handle None before calling this.
        negative: accept negative numbers (a deadline already passed), not just >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        alternative = " or None" if none else ""
        raise TypeError(
            f"{api}() {name} must be a number of seconds{alternative}, got {value!r}"
        )
    if math.isnan(value) or (value < 0 and not negative):
        wanted = "number" if negative else "non-negative number"
        alternative = f" (or None {none})" if none else ""
        got = "NaN (math.inf means no limit)" if math.isnan(value) else repr(value)
        raise ValueError(
            f"{api}() {name} must be a {wanted} of seconds{alternative}, got {got}"
        )
    return float(value)


def check_deadline(deadline: float) -> float:
    """A deadline in `time.monotonic` terms as a float (math.inf: none)."""
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        raise TypeError(
            f"deadline must be a float in time.monotonic() terms, got {deadline!r}"
        )
    deadline = float(deadline)
    if math.isnan(deadline):
        raise ValueError(
            "deadline is NaN: pass a time.monotonic() value, or math.inf for none"
        )
    return deadline


# -- pidfd --------------------------------------------------------------------

# A descriptor that becomes readable when a process exits (Linux's pidfd).

def open_pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (Linux 5.3+), or None where the OS has none or `pid` is gone.

    The caller closes it. Unlike a pid, it cannot come to name another process.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # pragma: no cover - not Linux
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ProcessLookupError included: already reaped
        return None
    return fd


# -- /proc --------------------------------------------------------------------

# What Linux's /proc says about every process: its state, parent and process group.

class ProcessStat(NamedTuple):
    pid: int
    state: str  # "Z" for a zombie: exited, not yet reaped by its parent
    ppid: int
    pgid: int


def all_processes() -> list[ProcessStat] | None:
    """Every process in /proc (one read of a small file each), or None without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux
        return None
    found = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                # After the command name, which may hold spaces and parentheses.
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # it exited meanwhile
            continue
        found.append(ProcessStat(int(entry), fields[0].decode(), int(fields[1]), int(fields[2])))
    return found
