"""The one check of a number of seconds (and of a deadline), for every argument.

One rule for infinity everywhere: `math.inf` is accepted and returned as itself (no
limit); a caller for which it means "never" maps it. NaN, bools and non-numbers are
refused with a message naming the call and the argument. Standard library only.
"""

from __future__ import annotations

import math

__all__ = ("check_deadline", "check_seconds")


def check_seconds(
    value: object, caller: str, name: str, *, none: str = "", negative: bool = False
) -> float:
    """`value` as a float number of seconds, for argument `name` of ``caller()``.

    Args:
        none: what None means for this argument (say "to skip that stage"), if the
            caller takes None; messages then offer it. The caller handles None itself.
        negative: accept negative numbers (a deadline already passed), not just >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        alternative = " or None" if none else ""
        raise TypeError(
            f"{caller}() {name} must be a number of seconds{alternative}, got {value!r}"
        )
    if math.isnan(value) or (value < 0 and not negative):
        kind = "number" if negative else "non-negative number"
        alternative = f" (or None {none})" if none else ""
        got = "NaN (math.inf means no limit)" if math.isnan(value) else repr(value)
        raise ValueError(
            f"{caller}() {name} must be a {kind} of seconds{alternative}, got {got}"
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
