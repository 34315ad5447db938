"""What every `bridgecancel.blocking` wait shares: its opening and its sliced wait.

Each public wait starts the same way (`begin`): check the timeout, work out the deadline,
pick the token, raise if it has already fired, and say whether it can fire at all (if
not, the wait simply calls the wrapped method). Waits that cannot be woken from outside
go through `wait_sliced`, the one loop that polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, NamedTuple

from .._tokens import Cancelled, CancelToken, current_token
from .._util import check_seconds

__all__ = (
    "DEFAULT_GRACE",
    "Opening",
    "POLL_SLICE",
    "begin",
    "cancelled",
    "check_seconds",
    "check_type",
    "deadline_in",
    "remaining",
    "timed_out",
    "wait_sliced",
)

POLL_SLICE: Final = 0.01
"""The longest slice (seconds) of a wait that cannot be woken from outside: the bound
on how late such a wait notices a cancel."""

DEFAULT_GRACE: Final = 5.0
"""Seconds a child process gets between SIGTERM and SIGKILL when its wait is cancelled."""


def check_type(obj: object, expected: type | tuple[type, ...], api: str, hint: str) -> None:
    if not isinstance(obj, expected):
        raise TypeError(f"{api}() needs {hint}, got {obj!r}")


def deadline_in(timeout: float | None, api: str) -> float | None:
    """The monotonic deadline `timeout` seconds from now (None: no limit)."""
    if timeout is None:
        return None
    return time.monotonic() + check_seconds(timeout, api, "timeout", none="for no limit")


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (never negative; None: no limit)."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def cancelled(token: CancelToken) -> Cancelled:
    """The `Cancelled` a wait raises for `token`."""
    error: Cancelled = Cancelled._create(token, token.reason)
    return error


def timed_out() -> TimeoutError:
    return TimeoutError("timed out")  # what a socket with a timeout raises


class Opening(NamedTuple):
    """What `begin` worked out for one call."""

    token: CancelToken
    deadline: float | None
    never: bool
    """The token can never fire: call the wrapped method as it is."""


def begin(
    api: str, token: CancelToken | None, timeout: float | None = None, *, check: bool = True
) -> Opening:
    """The opening of every wait: arguments, deadline, token, and the checkpoint.

    Raises `Cancelled` if the token has already fired (unless `check` is false, for the
    subprocess waits, which must stop the child first).
    """
    deadline = deadline_in(timeout, api)
    if token is None:
        token = current_token()
    elif not isinstance(token, CancelToken):
        raise TypeError(
            f"{api}(token=...) takes a CancelToken, got {token!r}; "
            "pass source.token rather than the source"
        )
    if check and token.cancel_called:
        raise cancelled(token)
    return Opening(token, deadline, token._never)


def wait_sliced(
    attempt: Callable[[float], bool], token: CancelToken, deadline: float | None
) -> bool:
    """Call ``attempt(seconds)`` in slices of at most `POLL_SLICE` until it succeeds.

    `attempt` waits up to the seconds it is given for what the caller wants and returns
    whether it got it. Returns True once it does, False once the deadline has passed;
    raises `Cancelled` if the token fires between slices.
    """
    while True:
        left = remaining(deadline)
        if attempt(POLL_SLICE if left is None else min(POLL_SLICE, left)):
            return True
        if token.cancel_called:
            raise cancelled(token)
        if deadline is not None and time.monotonic() >= deadline:
            return False
