"""A descriptor that becomes readable when a process exits (Linux's pidfd)."""

from __future__ import annotations

import os

__all__ = ("open_pidfd",)


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
