"""What Linux's /proc says about every process: its state, parent and process group."""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ("ProcessStat", "all_processes")


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
