"""Jobs for tests/test_library_tokens.py that run in worker processes (importable there).

They report progress through marker files, written whole (see `_proc_helpers.mark`).
"""

from __future__ import annotations

import time

from _proc_helpers import mark

__all__ = ("commit_in_a_shield", "mark", "reason_when_fired", "token_inside_and_after_a_shield")
from bridgecancel import check_cancelled, current_token, shield


def commit_in_a_shield(started: str, committed: str, seconds: float) -> str:
    """A critical section that ignores the cancel and an interrupt, then checks."""
    with shield():
        mark(started)
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # a spin: only an injected Cancelled could stop it
            check_cancelled()  # never raises inside the shield
        mark(committed, "committed")
    # After the block: the job's token again, fired by the cancel meanwhile.
    while True:
        time.sleep(0.001)  # ignores the token: only the held interrupt stops it


def token_inside_and_after_a_shield(started: str) -> tuple[bool, bool]:
    with shield():
        mark(started)
        time.sleep(0.3)  # the cancel comes meanwhile
        seen_inside = current_token().cancel_called
    current_token().wait(5)
    return seen_inside, current_token().cancel_called


def reason_when_fired(started: str) -> str | None:
    mark(started)
    token = current_token()
    token.wait(10)
    return token.reason
